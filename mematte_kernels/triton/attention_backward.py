"""The backward kernels of varlen and policy attention: one dk/dv kernel, one dq kernel.

Per sequence and head, with P the forward's probabilities, dA[i, j] = dout_i . v_j and
delta_i = dout_i . out_i (flash-attention's backward):

    dv_j = sum_i P[i, j] dout_i
    dS   = P * (dA - delta)            (row i minus delta_i)
    dq   = scale * dS @ k,   dk = scale * dS^T @ q

Under a policy (:mod:`.policy_attention`) P is the policy-weighted softmax, dS gains the
gradient of the row max at each row's argmax, dv the eps / N term and the policy a gradient
of its own; :func:`._attention.tile_gradients` computes a tile of both cases. The dk/dv
kernel runs per key block over the sequence's query blocks and the dq kernel per query block
over its key blocks, recomputing P tile by tile from the forward's row statistics: O(T)
memory, no atomics, deterministic gradients.

Sequences are packed (T, heads, d) with ``cu_seqlens`` (varlen attention) or batched
(B, N, heads, d) (policy attention), read as :mod:`._attention` describes; the per-row
statistics are read at ``batch * stride_sb + head * stride_sh + seq_start + t``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention import (
    attention_kernel,
    base2_scale,
    length_bucket,
    load_rows,
    program_sequence,
    sequence_base,
    store_rows,
    tile_gradients,
)
from ._common import head_block

# Integer arguments that change with the batch or image size: one compilation for all.
VARYING = ["num_tokens", "stride_pb", "stride_sb", "stride_sh"]


@triton.jit
def load_query_stats(stat_ptrs, rows, query_mask, KEY_ROWS: tl.constexpr):
    """The forward's statistics at ``rows`` (BLOCK_M,) of the statistics tensors ``stat_ptrs``
    = (row_stat, delta, and under a policy denom, row_argmax, dmax; else None), expanded for a
    tile with queries along its rows, (BLOCK_M, 1), or with KEY_ROWS its columns, (1,
    BLOCK_M). Padded queries get an infinite row_stat, so probabilities of 0."""
    row_stat_ptr, delta_ptr, denom_ptr, row_argmax_ptr, dmax_ptr = stat_ptrs
    row_stat = along_queries(tl.load(row_stat_ptr + rows, mask=query_mask, other=float("inf")), KEY_ROWS)
    delta = along_queries(tl.load(delta_ptr + rows, mask=query_mask, other=0.0), KEY_ROWS)
    denom, row_argmax, dmax = None, None, None
    if denom_ptr is not None:
        denom = along_queries(tl.load(denom_ptr + rows, mask=query_mask, other=1.0), KEY_ROWS)
        row_argmax = along_queries(tl.load(row_argmax_ptr + rows, mask=query_mask, other=-1), KEY_ROWS)
        dmax = along_queries(tl.load(dmax_ptr + rows, mask=query_mask, other=0.0), KEY_ROWS)
    return row_stat, delta, denom, row_argmax, dmax


@triton.jit
def along_queries(values, KEY_ROWS: tl.constexpr):
    """(BLOCK_M,) values per query as a column, (BLOCK_M, 1), or with KEY_ROWS a row."""
    return values[None, :] if KEY_ROWS else values[:, None]


@attention_kernel("backward", do_not_specialize=VARYING)
def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    dk_ptr,
    dv_ptr,
    cu_seqlens_ptr,
    row_stat_ptr,
    delta_ptr,
    policy_ptr,
    denom_ptr,
    row_argmax_ptr,
    dmax_ptr,
    dpolicy_ptr,
    num_tokens,
    num_heads,
    qk_scale,
    scale,
    eps,
    seqlen_bucket,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_db,
    stride_dn,
    stride_dh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_pb,
    stride_pn,
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    batch, head, seq_start, seqlen = program_sequence(cu_seqlens_ptr, num_tokens, num_heads)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_key = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within the sequence
    key_mask = offs_key < seqlen
    k_base = sequence_base(k_ptr, batch, head, seq_start, stride_kb, stride_kn, stride_kh)
    v_base = sequence_base(v_ptr, batch, head, seq_start, stride_vb, stride_vn, stride_vh)
    q_base = sequence_base(q_ptr, batch, head, seq_start, stride_qb, stride_qn, stride_qh)
    dout_base = sequence_base(dout_ptr, batch, head, seq_start, stride_db, stride_dn, stride_dh)
    stats_base = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + seq_start
    stat_ptrs = (row_stat_ptr, delta_ptr, denom_ptr, row_argmax_ptr, dmax_ptr)
    k = load_rows(k_base, offs_key, stride_kn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = load_rows(v_base, offs_key, stride_vn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    policy = None
    if policy_ptr is not None:
        policy = tl.load(policy_ptr + batch * stride_pb + offs_key * stride_pn, mask=key_mask, other=0.0)
        policy = policy.to(tl.float32)[:, None]  # (BLOCK_N, 1)

    # Tiles are (BLOCK_N, BLOCK_M), keys along the rows: the dots into dk and dv take them as they are.
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dpolicy = tl.zeros((BLOCK_N,), tl.float32)  # per head; summed over heads after the launch
    dout_over_denom = tl.zeros((BLOCK_D,), tl.float32)  # sum_i dout_i / D_i, for the eps / N term of dv
    for query_start in range(0, seqlen, BLOCK_M):
        offs_query = query_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries of this block
        query_mask = offs_query < seqlen
        q = load_rows(q_base, offs_query, stride_qn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        dout = load_rows(dout_base, offs_query, stride_dn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        stats = load_query_stats(stat_ptrs, stats_base + offs_query, query_mask, KEY_ROWS=True)
        query, key = offs_query[None, :], offs_key[:, None]
        probs_t, dlogits_t, dkeep_t = tile_gradients(
            q, k, v, dout, query, key, key_mask[:, None], qk_scale, stats, policy, KEY_ROWS=True
        )  # (BLOCK_N, BLOCK_M) each
        dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision="ieee")
        dk = tl.dot(dlogits_t.to(q.dtype), q, dk, input_precision="ieee")
        if policy_ptr is not None:
            denom = stats[2]  # (1, BLOCK_M)
            dpolicy += tl.sum(dkeep_t, axis=1)
            dout_over_denom += tl.sum(dout.to(tl.float32) / tl.trans(denom), axis=0)

    if policy_ptr is not None:
        dv += (eps / num_tokens) * dout_over_denom[None, :]
        tl.store(dpolicy_ptr + stats_base + offs_key, dpolicy, mask=key_mask)
    dk_base = sequence_base(dk_ptr, batch, head, seq_start, stride_dkb, stride_dkn, stride_dkh)
    dv_base = sequence_base(dv_ptr, batch, head, seq_start, stride_dvb, stride_dvn, stride_dvh)
    store_rows(dk_base, offs_key, stride_dkn, key_mask, dk * scale, HEAD_DIM, BLOCK_D)
    store_rows(dv_base, offs_key, stride_dvn, key_mask, dv, HEAD_DIM, BLOCK_D)


@attention_kernel("backward", do_not_specialize=VARYING)
def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    dq_ptr,
    cu_seqlens_ptr,
    row_stat_ptr,
    delta_ptr,
    policy_ptr,
    denom_ptr,
    row_argmax_ptr,
    dmax_ptr,
    num_tokens,
    num_heads,
    qk_scale,
    scale,
    seqlen_bucket,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_db,
    stride_dn,
    stride_dh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_pb,
    stride_pn,
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    batch, head, seq_start, seqlen = program_sequence(cu_seqlens_ptr, num_tokens, num_heads)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within the sequence
    query_mask = offs_query < seqlen
    q_base = sequence_base(q_ptr, batch, head, seq_start, stride_qb, stride_qn, stride_qh)
    dout_base = sequence_base(dout_ptr, batch, head, seq_start, stride_db, stride_dn, stride_dh)
    k_base = sequence_base(k_ptr, batch, head, seq_start, stride_kb, stride_kn, stride_kh)
    v_base = sequence_base(v_ptr, batch, head, seq_start, stride_vb, stride_vn, stride_vh)
    stats_base = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + seq_start
    stat_ptrs = (row_stat_ptr, delta_ptr, denom_ptr, row_argmax_ptr, dmax_ptr)
    q = load_rows(q_base, offs_query, stride_qn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    dout = load_rows(dout_base, offs_query, stride_dn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    stats = load_query_stats(stat_ptrs, stats_base + offs_query, query_mask, KEY_ROWS=False)

    # Tiles are (BLOCK_M, BLOCK_N), queries along the rows, for the dot into dq.
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for key_start in range(0, seqlen, BLOCK_N):
        offs_key = key_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys of this block
        key_mask = offs_key < seqlen
        k = load_rows(k_base, offs_key, stride_kn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = load_rows(v_base, offs_key, stride_vn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        policy = None
        if policy_ptr is not None:
            policy = tl.load(policy_ptr + batch * stride_pb + offs_key * stride_pn, mask=key_mask, other=0.0)
            policy = policy.to(tl.float32)[None, :]  # (1, BLOCK_N)
        query, key = offs_query[:, None], offs_key[None, :]
        _, dlogits, _ = tile_gradients(
            q, k, v, dout, query, key, key_mask[None, :], qk_scale, stats, policy, KEY_ROWS=False
        )  # (BLOCK_M, BLOCK_N)
        dq = tl.dot(dlogits.to(k.dtype), k, dq, input_precision="ieee")

    dq_base = sequence_base(dq_ptr, batch, head, seq_start, stride_dqb, stride_dqn, stride_dqh)
    store_rows(dq_base, offs_query, stride_dqn, query_mask, dq * scale, HEAD_DIM, BLOCK_D)


def _sequence_strides(name: str, t: torch.Tensor) -> dict[str, int]:
    """The kernels' ``stride_<name>b/n/h`` arguments of ``t``: (batch, token, head) strides,
    the batch's 0 for packed (T, heads, d) tensors."""
    strides = (0, *t.stride()[:2]) if t.dim() == 3 else t.stride()[:3]
    return {f"stride_{name}{axis}": stride for axis, stride in zip("bnh", strides)}


def launch_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    row_stat: torch.Tensor,
    delta: torch.Tensor,
    num_sequences: int,
    max_seqlen: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    policy: torch.Tensor | None = None,
    denom: torch.Tensor | None = None,
    row_argmax: torch.Tensor | None = None,
    dmax: torch.Tensor | None = None,
    dpolicy: torch.Tensor | None = None,
    eps: float = 0.0,
) -> None:
    """dq, dk, dv (q's shape and dtype) of attention over packed sequences ((T, heads, d)
    tensors and ``cu_seqlens``) or batched ones ((B, N, heads, d) tensors), from the
    forward's statistics per query: ``row_stat`` and ``delta``, (heads, T) packed or
    (B, heads, N) batched; under a ``policy`` (B, N) also ``denom``, ``row_argmax`` and
    ``dmax``, and its per-head gradient into ``dpolicy`` (B, heads, N). The statistics
    tensors are contiguous, all of ``row_stat``'s layout; the caller has checked the inputs."""
    heads, head_dim = q.shape[-2:]
    stats_strides = (0, row_stat.stride(0)) if cu_seqlens is not None else row_stat.stride()[:2]
    policy_strides = policy.stride() if policy is not None else (0, 0)
    common = dict(
        cu_seqlens_ptr=cu_seqlens,
        row_stat_ptr=row_stat,
        delta_ptr=delta,
        policy_ptr=policy,
        denom_ptr=denom,
        row_argmax_ptr=row_argmax,
        dmax_ptr=dmax,
        num_tokens=q.shape[0] if cu_seqlens is not None else q.shape[1],
        num_heads=heads,
        qk_scale=base2_scale(scale),
        scale=scale,
        seqlen_bucket=length_bucket(max_seqlen),
        **_sequence_strides("q", q),
        **_sequence_strides("k", k),
        **_sequence_strides("v", v),
        **_sequence_strides("d", dout),
        stride_pb=policy_strides[0],
        stride_pn=policy_strides[1],
        stride_sb=stats_strides[0],
        stride_sh=stats_strides[1],
        HEAD_DIM=head_dim,
        BLOCK_D=head_block(head_dim),
    )
    _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), num_sequences * heads)](
        q,
        k,
        v,
        dout,
        dk,
        dv,
        dpolicy_ptr=dpolicy,
        eps=eps,
        **_sequence_strides("dk", dk),
        **_sequence_strides("dv", dv),
        **common,
    )
    _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_sequences * heads)](
        q,
        k,
        v,
        dout,
        dq,
        **_sequence_strides("dq", dq),
        **common,
    )
