"""Backward of the varlen flash attention (``mematte::varlen_attention``), as flash-attention's.

Per packed sequence and head, with P = softmax(scale * q @ k^T), out = P @ v and
delta_i = dout_i . out_i:

    dv_j = sum_i P[i, j] dout_i
    dS   = P * (dout @ v^T - delta)          (row i minus delta_i)
    dq   = scale * dS @ k,   dk = scale * dS^T @ q

The forward is the inference kernel and keeps no statistics (inference pays nothing for
training), so the backward first recomputes each row's log-sum-exp in one pass over the keys,
then runs dk/dv per key block over the sequence's query blocks and dq per query block over its
key blocks, recomputing P tile by tile: O(T) memory, no atomics. Logits are the fp32 dot
result times ``scale * log2(e)``; fp32 uses exact fp32 dots, fp16/bf16 the tensor cores.

Keys past a sequence's end are loaded as zeros, so their logit is 0 whatever the real ones
are; where every real logit of a query lies below about -88, exp2(0 - lse) overflows to inf.
Their probabilities are therefore masked to 0 (``tl.where``), never left to a product with a
zero-loaded k or v (inf * 0 is NaN).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE_OPTIONS, INTERPRET, check_devices, head_block, on_input_device
from .varlen_attention import _check_attention_inputs, length_bucket

LOG2E = math.log2(math.e)

# The tensor-core (fp16/bf16) 32 x 32 tiles are the ones within Turing's 64 KiB of shared
# memory at head dim 128.
CONFIGS = {
    "tensor_core": [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ],
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the backward kernels' autotuners try for q/k/v of ``dtype``."""
    return CONFIGS["fp32" if dtype == torch.float32 else "tensor_core"]


def _prune_configs(configs, named_args: dict, **kwargs) -> list[triton.Config]:
    return configs_for(named_args["q_ptr"].dtype)


_AUTOTUNE = dict(
    configs=[INTERPRETER_CONFIG] if INTERPRET else CONFIGS["tensor_core"] + CONFIGS["fp32"],
    # The autotuner adds every tensor argument's dtype; seqlen_bucket is read by it only.
    key=["HEAD_DIM", "seqlen_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **AUTOTUNE_OPTIONS,
)
# Integer arguments that change with every batch or image size: one compilation for all.
_VARYING = ["total", "seqlen_bucket"]


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=_VARYING)
def _varlen_attention_lse_kernel(
    q_ptr,
    k_ptr,
    cu_seqlens_ptr,
    lse_ptr,
    total,
    num_heads,
    qk_scale,
    seqlen_bucket,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    seq_start = tl.load(cu_seqlens_ptr + batch)
    seqlen = tl.load(cu_seqlens_ptr + batch + 1) - seq_start
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within the sequence
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within a key block
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query_mask = offs_m < seqlen
    q_rows = (seq_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=query_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # base-2 logits
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for key_start in range(0, seqlen, BLOCK_N):
        key_mask = key_start + offs_n < seqlen
        key_rows = (seq_start + key_start + offs_n).to(tl.int64)
        k = tl.load(
            k_ptr + key_rows[None, :] * stride_kt + head * stride_kh + offs_d[:, None],
            mask=d_mask[:, None] & key_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N): k^T
        logits = tl.dot(q, k, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        logits = tl.where(key_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.math.exp2(row_max - new_max) + tl.sum(tl.math.exp2(logits - new_max[:, None]), axis=1)
        row_max = new_max
    # lse is (heads, T): row t of head h at h * total + t.
    tl.store(lse_ptr + head.to(tl.int64) * total + q_rows, row_max + tl.math.log2(row_sum), mask=query_mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=_VARYING)
def _varlen_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    cu_seqlens_ptr,
    dk_ptr,
    dv_ptr,
    total,
    num_heads,
    qk_scale,
    scale,
    seqlen_bucket,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dt,
    stride_dh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    seq_start = tl.load(cu_seqlens_ptr + batch)
    seqlen = tl.load(cu_seqlens_ptr + batch + 1) - seq_start
    if pid_n * BLOCK_N >= seqlen:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within the sequence
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within a query block
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    key_mask = offs_n < seqlen
    key_rows = (seq_start + offs_n).to(tl.int64)
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_ptr + key_rows[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        v_ptr + key_rows[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0
    )  # (BLOCK_N, BLOCK_D)
    stats = head.to(tl.int64) * total

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for query_start in range(0, seqlen, BLOCK_M):
        query_mask = query_start + offs_m < seqlen
        q_rows = (seq_start + query_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[None, :] * stride_qt + head * stride_qh + offs_d[:, None],
            mask=d_mask[:, None] & query_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_M): q^T
        dout = tl.load(
            dout_ptr + q_rows[:, None] * stride_dt + head * stride_dh + offs_d[None, :],
            mask=query_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        # Padded queries: an infinite log-sum-exp makes their probabilities 0.
        lse = tl.load(lse_ptr + stats + q_rows, mask=query_mask, other=float("inf"))
        delta = tl.load(delta_ptr + stats + q_rows, mask=query_mask, other=0.0)

        logits_t = tl.dot(k, q, input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        probs_t = tl.where(key_mask[:, None], tl.math.exp2(logits_t - lse[None, :]), 0.0)
        dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision="ieee")
        dprobs_t = tl.dot(v, tl.trans(dout), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        dlogits_t = probs_t * (dprobs_t - delta[None, :])
        dk = tl.dot(dlogits_t.to(q.dtype), tl.trans(q), dk, input_precision="ieee")

    tl.store(
        dk_ptr + key_rows[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dv_ptr + key_rows[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=kv_mask,
    )


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=_VARYING)
def _varlen_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    cu_seqlens_ptr,
    dq_ptr,
    total,
    num_heads,
    qk_scale,
    scale,
    seqlen_bucket,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dt,
    stride_dh,
    stride_dqt,
    stride_dqh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    seq_start = tl.load(cu_seqlens_ptr + batch)
    seqlen = tl.load(cu_seqlens_ptr + batch + 1) - seq_start
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within the sequence
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within a key block
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query_mask = offs_m < seqlen
    q_rows = (seq_start + offs_m).to(tl.int64)
    row_mask = query_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=row_mask, other=0.0
    )  # (BLOCK_M, BLOCK_D)
    dout = tl.load(
        dout_ptr + q_rows[:, None] * stride_dt + head * stride_dh + offs_d[None, :], mask=row_mask, other=0.0
    )  # (BLOCK_M, BLOCK_D)
    stats = head.to(tl.int64) * total + q_rows
    lse = tl.load(lse_ptr + stats, mask=query_mask, other=float("inf"))
    delta = tl.load(delta_ptr + stats, mask=query_mask, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for key_start in range(0, seqlen, BLOCK_N):
        key_mask = key_start + offs_n < seqlen
        key_rows = (seq_start + key_start + offs_n).to(tl.int64)
        k = tl.load(
            k_ptr + key_rows[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
            mask=key_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_ptr + key_rows[None, :] * stride_vt + head * stride_vh + offs_d[:, None],
            mask=d_mask[:, None] & key_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N): v^T
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        probs = tl.where(key_mask[None, :], tl.math.exp2(logits - lse[:, None]), 0.0)
        dprobs = tl.dot(dout, v, input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        dlogits = probs * (dprobs - delta[:, None])
        dq = tl.dot(dlogits.to(k.dtype), k, dq, input_precision="ieee")

    tl.store(
        dq_ptr + q_rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=row_mask,
    )


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
    scale = head_dim**-0.5 if scale is None else scale
    tiles = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim))
    qk_scale, bucket = scale * LOG2E, length_bucket(max_seqlen)
    lse = q.new_empty((heads, T), dtype=torch.float32)
    delta = (out.float() * dout.float()).sum(-1).t().contiguous()  # (heads, T)

    def query_grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)

    _varlen_attention_lse_kernel[query_grid](
        q,
        k,
        cu_seqlens,
        lse,
        T,
        heads,
        qk_scale,
        bucket,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        **tiles,
    )
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
    )
    _varlen_attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), batch * heads)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        cu_seqlens,
        dk,
        dv,
        T,
        heads,
        qk_scale,
        scale,
        bucket,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        **tiles,
    )
    _varlen_attention_bwd_dq_kernel[query_grid](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        cu_seqlens,
        dq,
        T,
        heads,
        qk_scale,
        scale,
        bucket,
        *strides,
        dq.stride(0),
        dq.stride(1),
        **tiles,
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
