"""The attention both adapters call, and how an accelerated module's forward is swapped.

An accelerated module keeps its class, parameters and buffers; an instance attribute
``forward`` (one of the adapters' module-level forwards, bound to it) is added, with the
state that forward reads as ``_mematte_*`` attributes, and :func:`restore_forward` deletes
them to bring the class's forward back.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from mematte_kernels import dispatch
from mematte_kernels.reference import rel_pos_table

# The forwards the adapters bind; a module whose own forward is one of them is accelerated.
ACCELERATED_FORWARDS: set = set()
# The prefix of the attributes set beside an accelerated forward.
PREFIX = "_mematte_"


def relpos_attention(
    qkv: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    num_heads: int,
    scale: float,
    backend: str,
    windowed: bool,
) -> torch.Tensor:
    """Attention of every token of each (H, W) grid to all tokens of its grid with
    decomposed relative position, as ViTDet and SAM compute it: qkv (B, H, W, 3 * heads *
    d) -> (B, H, W, heads * d), before the output projection.

    The learned tables are resized and gathered as upstream's ``get_rel_pos`` does. A
    ``windowed`` module's grids are its padded windows (B = batch × windows), which the
    window attention kernel takes in one call; global grids go to the global attention.
    With a gradient, the backend's training table runs (references where a kernel has no
    backward)."""
    B, H, W, _ = qkv.shape
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, rel_pos_h, rel_pos_w))
    table = dispatch.resolve(backend, qkv.device, training=needs_grad)
    rel_h = rel_pos_table(H, H, rel_pos_h).to(qkv.dtype)
    rel_w = rel_pos_table(W, W, rel_pos_w).to(qkv.dtype)
    if windowed and H == W:
        # One window per grid: the padding HF and timm added is already in qkv, so the
        # kernel pads nothing (pad_qkv is never read).
        no_padding = qkv.new_zeros(qkv.shape[-1])
        return table.window_attention(qkv, no_padding, rel_h, rel_w, num_heads, scale, H)
    return table.global_attention(qkv, rel_h, rel_w, num_heads, scale)


def plain_attention(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention without position terms, through PyTorch's fused attention (no N×N
    matrix on its flash paths): qkv (B, H, W, 3 * heads * d) -> (B, H, W, heads * d)."""
    B, H, W, C3 = qkv.shape
    q, k, v = qkv.reshape(B, H * W, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, C3 // 3)


def swap_forward(module: nn.Module, forward, **state) -> None:
    """Make ``forward(module, ...)`` the module's forward, each ``state`` item an attribute
    ``module._mematte_<name>`` it reads."""
    ACCELERATED_FORWARDS.add(forward)
    module.forward = types.MethodType(forward, module)
    for name, value in state.items():
        setattr(module, PREFIX + name, value)


def is_accelerated(module: nn.Module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) in ACCELERATED_FORWARDS


def restore_forward(module: nn.Module) -> None:
    """Bring back the class's forward of a module :func:`swap_forward` changed."""
    if is_accelerated(module):
        del module.forward
        for name in [name for name in vars(module) if name.startswith(PREFIX)]:
            delattr(module, name)
