"""Kernels for MEMatte's routed ViT: Triton (router, gather/scatter, varlen and policy
attention), C++/CUDA (fused depthwise conv + GELU, ECA), and a plain PyTorch reference for
each. :func:`policy_attention`, :func:`varlen_attention` and :func:`global_attention` are
public, differentiable ops."""

from . import exportable, reference  # noqa: F401  (exportable registers torch.ops.mematte)
from .dispatch import BACKENDS, OpTable, resolve
from .functional import global_attention, policy_attention, varlen_attention

__all__ = ["BACKENDS", "OpTable", "global_attention", "policy_attention", "reference", "resolve", "varlen_attention"]
