"""Forward flash attention over packed variable-length sequences (one per image).

q, k, v are (T, heads, d) with sequence b in rows ``cu_seqlens[b]:cu_seqlens[b+1]``; they
may be strided views (e.g. slices of a (T, 3, heads, d) qkv tensor) as long as the head
dimension is contiguous. d up to 128, held in BLOCK_D lanes (the next power of two). One
program computes BLOCK_M queries of one (sequence, head) with an online softmax over
BLOCK_N-key blocks, so memory is O(T) and no n x n matrix exists.

The grid is (query blocks of the longest sequence, B * heads); programs past the end of a
shorter sequence exit at once. The loop is the attention kernels' shared one
(:func:`._attention.attend_keys`). Without an output and with a log-sum-exp tensor the same
kernel is the backward's statistics pass: no v, no product with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import native
from ._attention import (
    attend_keys,
    attention_kernel,
    base2_scale,
    length_bucket,
    load_rows,
    program_sequence,
    sequence_base,
    softmax_scale,
    store_rows,
)
from ._common import (
    MAX_HEAD_DIM,
    check_attention_out,
    check_devices,
    check_ndim,
    check_qkv,
    head_block,
    on_input_device,
)


# The statistics pass is tuned apart from the forward: it loads no v.
@attention_kernel("forward", key=["STATS_ONLY"], do_not_specialize=["num_tokens"])
def _varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    num_tokens,
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
    STATS_ONLY: tl.constexpr,
):
    # Writes the output, and each row's log-sum-exp (base 2) into lse (heads, T) where lse_ptr
    # is given; with STATS_ONLY the log-sum-exp alone (the backward's statistics pass: no v).
    pid_m = tl.program_id(0)
    batch, head, seq_start, seqlen = program_sequence(cu_seqlens_ptr, num_tokens, num_heads)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within the sequence
    query_mask = offs_query < seqlen
    # Packed (T, heads, d): no batch stride, the sequence starts at row seq_start.
    q_base = sequence_base(q_ptr, batch, head, seq_start, 0, stride_qt, stride_qh)
    k_base = sequence_base(k_ptr, batch, head, seq_start, 0, stride_kt, stride_kh)
    v_base = sequence_base(v_ptr, batch, head, seq_start, 0, stride_vt, stride_vh)
    q = load_rows(q_base, offs_query, stride_qt, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)

    keys = (k_base, v_base, stride_kt, stride_vt, seqlen)
    acc, row_max, row_sum, _ = attend_keys(
        (q, offs_query, query_mask),
        keys,
        qk_scale,
        policy=None,
        bias=None,
        HEAD_DIM=HEAD_DIM,
        BLOCK_D=BLOCK_D,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        ACCUMULATE=not STATS_ONLY,
    )
    if not STATS_ONLY:
        out_base = sequence_base(out_ptr, batch, head, seq_start, 0, stride_ot, stride_oh)
        store_rows(out_base, offs_query, stride_ot, query_mask, acc / row_sum[:, None], HEAD_DIM, BLOCK_D)
    if lse_ptr is not None:
        lse_rows = head.to(tl.int64) * num_tokens + seq_start + offs_query  # (BLOCK_M,) of (heads, T)
        tl.store(lse_ptr + lse_rows, row_max + tl.math.log2(row_sum), mask=query_mask)


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
    out: torch.Tensor | None,
    lse: torch.Tensor | None = None,
) -> None:
    """Attention of every packed sequence into ``out`` (T, heads, d), q's dtype, and where
    ``lse`` (heads, T) float32 is given each row's log-sum-exp of base-2 logits into it;
    ``out=None`` computes the log-sum-exp alone (the backward's statistics).

    ``max_seqlen`` must be at least the longest sequence and ``cu_seqlens`` must be
    non-decreasing with ``cu_seqlens[-1] <= T``: both are not checked, as that would need a
    host sync. Rows past ``cu_seqlens[-1]`` are left as they are."""
    _check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    T, heads, head_dim = q.shape
    if out is None and lse is None:
        raise ValueError("varlen_attention: give out, lse or both")
    if out is not None:
        check_attention_out("varlen_attention", out, q)
    if lse is not None:
        if lse.shape != (heads, T) or lse.dtype != torch.float32 or not lse.is_contiguous():
            raise ValueError(f"varlen_attention: lse must be a contiguous float32 tensor of shape {(heads, T)}")
        check_devices("varlen_attention", q=q, lse=lse)
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen == 0 or heads == 0 or head_dim == 0:
        return
    scale = softmax_scale(scale, head_dim)

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)

    out_strides = (0, 0) if out is None else out.stride()[:2]
    _varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        T,
        heads,
        base2_scale(scale),
        length_bucket(max_seqlen),
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        *out_strides,
        HEAD_DIM=head_dim,
        BLOCK_D=head_block(head_dim),
        STATS_ONLY=out is None,
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
