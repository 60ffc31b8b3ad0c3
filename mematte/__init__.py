"""FastMEMatte: memory-efficient ViT image matting (MEMatte) with fused kernels.

    from mematte import FastMEMatte
    model = FastMEMatte.from_checkpoint("MEMatte_ViTS_DIM.pth")
    alpha = model.predict(image, trimap)          # H×W float32 in [0, 1]

The same as files: ``mematte.predict_file``; metrics as papers report them:
``mematte.metrics.sad/mse/grad/conn``.
"""
from . import metrics
from .api import Matte, load_model, predict_file
from .foreground import estimate_foreground
from .model import FastMEMatte
from .trimap import normalize_trimap, trimap_from_mask

__all__ = [
    "FastMEMatte",
    "Matte",
    "estimate_foreground",
    "load_model",
    "metrics",
    "normalize_trimap",
    "predict_file",
    "trimap_from_mask",
]
