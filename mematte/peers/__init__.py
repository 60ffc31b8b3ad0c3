"""``mematte.accelerate(model)``: the attention of models built with HF transformers or timm,
switched in place to this package's attention kernels.

Supported: transformers' ``VitMatteForImageMatting``, ``VitDetBackbone`` and ``VitDetModel``
(:mod:`.hf_vitdet`), and timm's SAM ViT ``VisionTransformerSAM`` (:mod:`.timm_sam`). Each
adapter imports its library only when handed one of its models, and a model's library is
already imported by then: importing ``mematte`` imports neither.
"""

from __future__ import annotations

import sys

import torch.nn as nn

from mematte_kernels import dispatch

from .attention import is_accelerated, restore_forward

SUPPORTED = (
    "transformers: VitMatteForImageMatting, VitDetBackbone, VitDetModel",
    "timm: VisionTransformerSAM (samvit_base_patch16, samvit_large_patch16, samvit_huge_patch16)",
)


def _adapter(model: nn.Module):
    """The adapter module that knows ``model``'s class, or None. Only libraries already
    imported are asked: a model of a library that is not imported cannot exist."""
    if "transformers" in sys.modules:
        from . import hf_vitdet

        if hf_vitdet.supports(model):
            return hf_vitdet
    if "timm" in sys.modules:
        from . import timm_sam

        if timm_sam.supports(model):
            return timm_sam
    return None


def accelerate(model: nn.Module, backend: str = "auto", enabled: bool = True) -> nn.Module:
    """Switch ``model``'s attention modules in place to this package's kernels and return
    the same object; with ``enabled=False``, put their original forwards back.

    Global attention with decomposed relative position runs through the kernels of
    :func:`mematte_kernels.global_attention` (no N×N matrix in inference), windowed
    attention through the package's window attention; the model's call, weights, processor
    and outputs are unchanged. ``backend`` is as for the package's models ("auto",
    "cpu", "cuda", "triton", "reference"; ``MEMATTE_BACKEND`` overrides it). A model that
    is already accelerated is returned as it is. Any other model raises ``TypeError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() takes a torch.nn.Module, got {type(model).__name__}")
    adapter = _adapter(model)
    if adapter is None:
        raise TypeError(
            f"accelerate() does not support {type(model).__module__}.{type(model).__qualname__}; "
            f"supported: {'; '.join(SUPPORTED)}"
        )
    if not enabled:
        for module in model.modules():
            restore_forward(module)
        return model
    dispatch.requested_backend(backend)  # an unknown name fails here, not at the first forward
    if any(is_accelerated(module) for module in model.modules()):
        return model
    adapter.accelerate(model, backend)
    return model
