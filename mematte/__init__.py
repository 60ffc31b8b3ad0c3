"""FastMEMatte: memory-efficient ViT image matting (MEMatte) with fused kernels.

    from mematte import FastMEMatte
    model = FastMEMatte.from_checkpoint("MEMatte_ViTS_DIM.pth")
    alpha = model.predict("photo.png", "photo_trimap.png")  # H×W float32 in [0, 1]

The same as files: ``mematte.predict_file``; metrics as papers report them:
``mematte.metrics.sad/mse/grad/conn``.

Names are imported on first use, so that ``mematte --help`` does not wait for torch.
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "FastMEMatte": "mematte.model",
    "FastViTMatte": "mematte.vitmatte",
    "Matte": "mematte.api",
    "TrimapWarning": "mematte.trimap",
    "accelerate": "mematte.peers",
    "estimate_foreground": "mematte.foreground",
    "export_onnx": "mematte.export",
    "load_model": "mematte.api",
    "metrics": None,  # the submodule itself
    "normalize_trimap": "mematte.trimap",
    "predict_file": "mematte.api",
    "trimap_from_mask": "mematte.trimap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mematte' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (
        importlib.import_module(f"mematte.{name}") if module is None else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
