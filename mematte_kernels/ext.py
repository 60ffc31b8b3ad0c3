"""The compiled LTRM ops, ``torch.ops.mematte_ext``, from :mod:`mematte_kernels._C`.

``dwconv_gelu`` and ``eca`` take the arguments of, and match,
:func:`mematte_kernels.reference.dwconv_gelu` and :func:`mematte_kernels.reference.eca` on
contiguous channels-last (B, H, W, C) tensors. Weights may be float32 even for float16/bfloat16
activations; they are read in fp32. The ops have no autograd formula: they are for inference.
This module imports without the extension: then :func:`available` is false for every device.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("mematte_kernels")

try:
    from . import _C  # importing it registers torch.ops.mematte_ext
except ImportError as exc:
    _C = None
    log.warning("mematte_kernels: compiled LTRM ops (mematte_kernels._C) unavailable: %s", exc)

OPS = ("dwconv_gelu", "eca")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def available(device: torch.device | str) -> bool:
    """Whether both ops have a kernel for ``device``'s type in this build."""
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    return (
        _C is not None
        and key is not None
        and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mematte_ext::{op}", key) for op in OPS)
    )


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 conv (padding 2) + bias + exact GELU on (B, H, W, C), in one pass."""
    return torch.ops.mematte_ext.dwconv_gelu(x, weight, bias)


def eca(z: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``z + z * sigmoid(conv1d(mean_hw(z)))`` on (B, H, W, C), plus ``residual`` in the same pass."""
    return torch.ops.mematte_ext.eca(z, weight, residual)


if _C is not None:
    # Shapes for FakeTensor / torch.compile: both ops return a tensor like their input.

    @torch.library.register_fake("mematte_ext::dwconv_gelu")
    def _dwconv_gelu_fake(x, weight, bias):
        return torch.empty_like(x)

    @torch.library.register_fake("mematte_ext::eca")
    def _eca_fake(z, weight, residual=None):
        return torch.empty_like(z)
