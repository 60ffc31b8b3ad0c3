"""Ops registered with ``torch.library`` for exported programs (``torch.export``).

An exported graph may hold no Python loop whose count depends on the data. The ops here
wrap the implementations that have one, so that a graph holds each as a single node with a
fake (its output's shape from its inputs'); ``torch.export.load`` finds them once
``mematte_kernels`` is imported.
"""

from __future__ import annotations

import torch

from . import native


@torch.library.custom_op("mematte::varlen_sdpa", mutates_args=())
def varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: float) -> torch.Tensor:  # fmt: skip
    """:func:`mematte_kernels.native.varlen_attention` (reference:
    :func:`mematte_kernels.reference.varlen_attention`) over packed (T, heads, d) tensors,
    T possibly 0: fused attention per sequence of ``cu_seqlens``. A name of its own: the
    Triton kernels' ``mematte::varlen_attention`` has another signature."""
    return native.varlen_attention(q, k, v, cu_seqlens, 0, scale)


@varlen_sdpa.register_fake
def _varlen_sdpa_fake(q, k, v, cu_seqlens, scale):
    return torch.empty_like(q)
