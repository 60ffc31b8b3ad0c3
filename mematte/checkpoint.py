"""Reading official MEMatte checkpoints: detectron2 files (``{"model": state_dict}``), bare
state dicts, and ``.safetensors``. Nothing is ever downloaded."""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch

from .backbone import VARIANTS

IGNORED_PREFIXES = ("teacher_backbone.",)  # the distillation teacher of training checkpoints


def load_checkpoint_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state dict stored in ``path``, whatever of the three formats it is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not a readable .safetensors checkpoint: {e}") from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path!r} is not a PyTorch checkpoint (expected a detectron2 .pth, a state dict, "
            f"or .safetensors): {first}"
        ) from None
    return state_dict_of(obj, source=path)


def state_dict_of(obj: object, source: str = "checkpoint") -> dict:
    """The state dict inside a loaded checkpoint object (unwraps ``{"model": ...}``)."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source} does not hold a state dict (a mapping of parameter names to tensors, "
            f"or a detectron2 file with one under 'model')"
        )
    return {k: v for k, v in obj.items() if not k.startswith(IGNORED_PREFIXES)}


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"vit_s"`` or ``"vit_b"`` from the embedding width of ``backbone.pos_embed``."""
    pos = state_dict.get("backbone.pos_embed")
    if pos is None:
        raise ValueError("cannot tell the variant: the state dict has no 'backbone.pos_embed' (not a MEMatte checkpoint?)")
    for name, (dim, _) in VARIANTS.items():
        if pos.shape[-1] == dim:
            return name
    known = ", ".join(f"{n} ({d})" for n, (d, _) in VARIANTS.items())
    raise ValueError(f"backbone.pos_embed has width {pos.shape[-1]}; known variants: {known}")
