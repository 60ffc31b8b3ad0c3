"""Backward of the varlen flash attention (``mematte::varlen_attention``).

The forward is the inference kernel and keeps no statistics (inference pays nothing for
training), so the backward first recomputes each row's log-sum-exp with the forward kernel
(its statistics pass: no v, no output), then runs the shared dk/dv and dq kernels of
:mod:`.attention_backward` on the packed sequences.
"""

from __future__ import annotations

import torch

from ._attention import softmax_scale
from ._common import check_devices, on_input_device
from .attention_backward import launch_attention_backward
from .varlen_attention import _check_attention_inputs, launch_varlen_attention


@on_input_device
def launch_varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Gradients of every packed sequence's attention into dq, dk, dv ((T, heads, d), q's
    dtype, contiguous head dimension), from the forward's ``out``. Rows past
    ``cu_seqlens[-1]`` are left as they are."""
    _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    check_devices("varlen_attention backward", dout=dout, q=q, out=out, dq=dq, dk=dk, dv=dv)
    for name, t in (("dout", dout), ("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        if t.shape != q.shape or t.stride(-1) != 1:
            raise ValueError(
                f"varlen_attention backward: {name} must have shape {tuple(q.shape)} with a contiguous "
                f"head dimension, got shape {tuple(t.shape)}, strides {t.stride()}"
            )
    T, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen == 0 or heads == 0 or head_dim == 0:
        return
    scale = softmax_scale(scale, head_dim)
    lse = q.new_empty((heads, T), dtype=torch.float32)
    launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, out=None, lse=lse)
    delta = (out.float() * dout.float()).sum(-1).t().contiguous()  # (heads, T)
    launch_attention_backward(
        dout,
        q,
        k,
        v,
        dq=dq,
        dk=dk,
        dv=dv,
        row_stat=lse,
        delta=delta,
        num_sequences=batch,
        max_seqlen=max_seqlen,
        scale=scale,
        cu_seqlens=cu_seqlens,
    )


@torch.library.custom_op("mematte::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Zeros: rows outside every sequence get no gradient.
    dq, dk, dv = (q.new_zeros(q.shape) for _ in range(3))
    launch_varlen_attention_backward(
        dout.contiguous(), q, k, v, out, cu_seqlens, max_seqlen, scale, dq=dq, dk=dk, dv=dv
    )
    return dq, dk, dv


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, cu_seqlens, max_seqlen, scale=None):
    _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, dout):
    q, k, v, out, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.mematte.varlen_attention_backward(dout, q, k, v, out, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("mematte::varlen_attention", _backward, setup_context=_setup_context)
