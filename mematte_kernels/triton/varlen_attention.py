"""Forward flash attention over packed variable-length sequences (one per image).

q, k, v are (T, heads, d) with sequence b in rows ``cu_seqlens[b]:cu_seqlens[b+1]``; they
may be strided views (e.g. slices of a (T, 3, heads, d) qkv tensor) as long as the head
dimension is contiguous. d up to 128, held in BLOCK_D lanes (the next power of two). One
program computes BLOCK_M queries of one (sequence, head) with an online softmax over
BLOCK_N-key blocks, so memory is O(T) and no n x n matrix exists.

The grid is (query blocks of the longest sequence, B * heads); programs past the end of a
shorter sequence exit at once. Softmax runs in base 2: the fp32 logits are multiplied by
``scale * log2(e)``.
fp32 uses exact fp32 dots (``input_precision="ieee"``); fp16/bf16 use the tensor cores with
fp32 accumulation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import native
from ._common import (
    AUTOTUNE_OPTIONS,
    INTERPRET,
    MAX_HEAD_DIM,
    check_attention_out,
    check_devices,
    check_ndim,
    check_qkv,
    head_block,
    on_input_device,
)

# Tensor-core (fp16/bf16) and FMA (fp32) tiles. fp32 dots hold whole operand rows in
# registers, so its tiles are smaller: these are the ones ptxas compiles without spills for
# sm_80 and sm_90.
TENSOR_CORE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
# The interpreter would benchmark every config on the CPU: it runs this one alone.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the autotuner tries for q/k/v of ``dtype``."""
    return FP32_CONFIGS if dtype == torch.float32 else TENSOR_CORE_CONFIGS


def length_bucket(max_seqlen: int) -> int:
    """The autotuning bucket of a launch: max_seqlen rounded up to a power of 2."""
    return triton.next_power_of_2(max(max_seqlen, 1))


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return configs_for(named_args["q_ptr"].dtype)


@triton.jit
def _attend_key_block(
    acc,
    row_max,
    row_sum,
    q,
    k_ptrs,
    v_ptrs,
    d_mask,
    key_start,
    seqlen,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    offs_n = key_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys of this block
    if MASK_KEYS:
        key_mask = offs_n < seqlen
        k = tl.load(k_ptrs, mask=d_mask[:, None] & key_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_ptrs, mask=key_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    # Scaled in fp32, as flash-attention does: folding the scale into a bf16 q would round
    # every logit's factor to 8 bits.
    logits = tl.dot(q, k, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
    if MASK_KEYS:
        logits = tl.where(key_mask[None, :], logits, float("-inf"))
    # Every block holds at least one real key, so new_max is finite and no -inf - -inf occurs.
    new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # (BLOCK_M,)
    p = tl.math.exp2(logits - new_max[:, None])  # (BLOCK_M, BLOCK_N)
    rescale = tl.math.exp2(row_max - new_max)  # (BLOCK_M,); 0 on the first block
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision="ieee")  # (BLOCK_M, BLOCK_D)
    return acc, new_max, row_sum


@triton.autotune(
    configs=[INTERPRETER_CONFIG] if INTERPRET else TENSOR_CORE_CONFIGS + FP32_CONFIGS,
    # The autotuner adds every tensor argument's dtype. The length bucket keeps a 64-token
    # warm-up from choosing the tiles of 18,500-token sequences.
    key=["HEAD_DIM", "seqlen_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **AUTOTUNE_OPTIONS,
)
@triton.jit(do_not_specialize=["seqlen_bucket"])
def _varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_seqlens_ptr,
    num_heads,
    qk_scale,
    seqlen_bucket,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # seqlen_bucket is read by the autotuner only (its key), not by the kernel.
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
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) lanes of the head dimension
    d_mask = offs_d < HEAD_DIM
    q_mask = offs_m < seqlen
    # Packed row offsets in int64: T * stride can pass 2**31 for batches of 8K images.
    q_rows = (seq_start + offs_m).to(tl.int64)
    key_rows = (seq_start + offs_n).to(tl.int64)

    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=q_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    k_ptrs = k_ptr + key_rows[None, :] * stride_kt + head * stride_kh + offs_d[:, None]  # (BLOCK_D, BLOCK_N): k^T
    v_ptrs = v_ptr + key_rows[:, None] * stride_vt + head * stride_vh + offs_d[None, :]  # (BLOCK_N, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    # Full key blocks need no mask; only the last, partial one does.
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    for key_start in range(0, full_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_ptrs, v_ptrs, d_mask, key_start, seqlen, qk_scale, BLOCK_N, MASK_KEYS=False
        )
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    if full_end < seqlen:
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_ptrs, v_ptrs, d_mask, full_end, seqlen, qk_scale, BLOCK_N, MASK_KEYS=True
        )

    out = acc / row_sum[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask[:, None] & d_mask[None, :],
    )


def _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    op = "varlen_attention"
    check_qkv(op, q, k, v, 3, "(T, heads, head_dim)")
    check_ndim(op, "cu_seqlens", cu_seqlens, 1, "(B + 1,)")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens must hold B + 1 >= 1 offsets, got an empty tensor")
    if max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen must be >= 0, got {max_seqlen}")
    check_devices(op, q=q, k=k, v=v, cu_seqlens=cu_seqlens)


@on_input_device
def launch_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    out: torch.Tensor,
) -> None:
    """Attention of every packed sequence into ``out`` (T, heads, d), q's dtype.

    ``max_seqlen`` must be at least the longest sequence and ``cu_seqlens`` must be
    non-decreasing with ``cu_seqlens[-1] <= T``: both are not checked, as that would need a
    host sync. Rows past ``cu_seqlens[-1]`` are left as they are."""
    _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    check_attention_out("varlen_attention", out, q)
    T, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen == 0 or heads == 0 or head_dim == 0:
        return
    scale = head_dim**-0.5 if scale is None else scale

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)

    _varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        heads,
        scale * math.log2(math.e),
        length_bucket(max_seqlen),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=head_block(head_dim),
    )


@torch.library.custom_op("mematte::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    out = q.new_empty(q.shape)
    launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, out=out)
    return out


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale=None):
    _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    return q.new_empty(q.shape)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence, as
    :func:`mematte_kernels.reference.varlen_attention`: q, k, v (T, heads, d) ->
    (T, heads, d) contiguous. ``cu_seqlens`` (B + 1,) int32; ``max_seqlen`` at least the
    longest sequence; ``scale`` defaults to head_dim ** -0.5. Head dimensions past
    MAX_HEAD_DIM run PyTorch's fused attention a sequence at a time."""
    if q.shape[-1] > MAX_HEAD_DIM:
        return native.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    return torch.ops.mematte.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
