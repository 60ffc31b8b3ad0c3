"""Kernels for MEMatte's routed ViT: Triton (router, gather/scatter, varlen attention),
C++/CUDA (fused depthwise conv + GELU, ECA), and a plain PyTorch reference for each."""
from . import reference
from .dispatch import BACKENDS, OpTable, resolve

__all__ = ["BACKENDS", "OpTable", "reference", "resolve"]
