"""Policy-masked flash attention, forward and backward, as MEMatte trains its routed blocks.

For one (image, head), with logits ``l = scale * q @ k^T`` over all N tokens and the router's
policy p (N,) (spec: TRAINING.md, "Routed block in training"):

    keep[i, j] = p_j + (1 - p_j) * [i == j]          a query always keeps itself
    m_i        = max_j l[i, j]                        over ALL keys, masked ones included
    a[i, j]    = exp(l[i, j] - m_i) * keep[i, j]
    D_i        = sum_j a[i, j] + eps
    out_i      = sum_j (a[i, j] + eps / N) / D_i * v_j
               = (sum_j a[i, j] v_j + eps / N * vsum) / D_i,    vsum = sum_j v_j

so the eps terms need only the column sum of v, precomputed per (image, head). The forward
keeps an online softmax over key blocks whose running max runs over every key; the final
``a`` are relative to the final max, as the formula has it. It stores per row the max, its
key (the first one on ties) and D for the backward.

Backward, with dA[i, j] = dout_i . v_j and delta_i = dout_i . out_i (out in fp32: for fp16/
bf16 inputs the forward also writes it, since with a rounded out delta misses the dA[i, i] it
cancels against, and where a query keeps mostly itself dq and dk are that small difference):

    G[i, j]      = exp(l[i, j] - m_i) * (dA[i, j] - delta_i) / D_i
    dl[i, j]     = keep[i, j] * G[i, j] + [j == argmax_i] * dmax_i   (a / D: see below)
    dmax_i       = -(eps / D_i) * (delta_i - dout_i . vsum / N)      the max is not detached
    dq_i         = scale * sum_j dl[i, j] k_j,   dk_j = scale * sum_i dl[i, j] q_i
    dv_j         = sum_i a[i, j] / D_i * dout_i + eps / N * sum_i dout_i / D_i
    dp_j         = sum_{i != j} G[i, j]          summed over heads too (keep' = 1 - [i == j])

For fp16/bf16 the weights a are rounded to v's dtype where they meet v, and D sums those
rounded weights (forward) and the backward's a / D uses them too: consistent rounding, so a
query that keeps only itself gets out = v and dv = dout exactly, as the reference does.

Three launches: a per-row preprocess (delta, dmax), then dk/dv/dp per key block looping over
query blocks, and dq per query block looping over key blocks. Both recompute the logits;
nothing N x N is stored, and there are no atomics, so gradients are deterministic.

q, k, v are (B, N, heads, d), possibly strided views, with a contiguous head dimension; d up
to 128, held in BLOCK_D lanes (the next power of two). Keys past N are loaded as zeros, so
their logit is 0 whatever the real ones are: the backward masks their weights to 0
(``tl.where``), since where every real logit of a query lies below about -88 exp2(0 - max)
overflows to inf, and inf times a zero-loaded k is NaN.
Logits are the fp32 dot result times ``scale * log2(e)`` (the exponentials run in base 2);
fp32 uses exact fp32 dots (``input_precision="ieee"``), fp16/bf16 the tensor cores with fp32
accumulation.
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
    check_float,
    check_ndim,
    check_qkv,
    head_block,
    on_input_device,
)
from .varlen_attention import length_bucket

LOG2E = math.log2(math.e)

# Tensor-core (fp16/bf16) and FMA (fp32) tiles. fp32 dots hold whole operand rows in
# registers, so its tiles are smaller. The backward holds four (BLOCK_N, d) tiles (k, v
# and their gradients) per program, so its tiles are smaller than the forward's; its
# 32 x 32 tiles are the ones within Turing's 64 KiB of shared memory at head dim 128.
FORWARD_CONFIGS = {
    "tensor_core": [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ],
}
BACKWARD_CONFIGS = {
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
PREPROCESS_BLOCK_M = 64
# The interpreter would benchmark every config on the CPU: it runs this one alone.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "tensor_core"


def forward_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the forward's autotuner tries for q/k/v of ``dtype``."""
    return FORWARD_CONFIGS[_kind(dtype)]


def backward_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the backward kernels' autotuners try for q/k/v of ``dtype``."""
    return BACKWARD_CONFIGS[_kind(dtype)]


def _all(configs: dict) -> list[triton.Config]:
    return [INTERPRETER_CONFIG] if INTERPRET else configs["tensor_core"] + configs["fp32"]


def _prune_forward(configs, named_args: dict, **kwargs) -> list[triton.Config]:
    return forward_configs_for(named_args["q_ptr"].dtype)


def _prune_backward(configs, named_args: dict, **kwargs) -> list[triton.Config]:
    return backward_configs_for(named_args["q_ptr"].dtype)


# The autotuners add every tensor argument's dtype to the key; seqlen_bucket (N rounded up
# to a power of 2, read by the autotuner only) keeps a small warm-up from choosing the tiles
# of 18,500-token images, and lets token counts of one bucket share a tuning.
AUTOTUNE_KEY = ["HEAD_DIM", "seqlen_bucket"]
# Integer arguments that change with the image size (policy is (B, N)): one compilation for all.
VARYING = ["N", "seqlen_bucket", "stride_pb"]


@triton.jit
def _keep_weight(policy, offs_query, offs_key):
    """keep[i, j] = p_j + (1 - p_j) * [i == j] for a (queries, keys) tile; policy (keys,)."""
    diagonal = offs_query[:, None] == offs_key[None, :]
    return tl.where(diagonal, 1.0, policy[None, :])


# ----------------------------------------------------------------------------- forward


@triton.autotune(
    configs=_all(FORWARD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_forward},
    **AUTOTUNE_OPTIONS,
)
@triton.jit(do_not_specialize=VARYING)
def _policy_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    policy_ptr,
    vsum_ptr,
    out_ptr,
    out_fp32_ptr,
    row_max_ptr,
    row_argmax_ptr,
    denom_ptr,
    N,
    seqlen_bucket,
    num_heads,
    qk_scale,
    eps,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_pb,
    stride_pn,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within a key block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) lanes of the head dimension
    d_mask = offs_d < HEAD_DIM
    query_mask = offs_m < N
    row_mask = query_mask[:, None] & d_mask[None, :]
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh

    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # sum_j a v_j, relative to row_max
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # base-2 logits
    row_argmax = tl.zeros((BLOCK_M,), tl.int32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)  # sum_j a, relative to row_max
    for key_start in range(0, N, BLOCK_N):
        offs_key = key_start + offs_n
        key_mask = offs_key < N
        k = tl.load(
            k_base + offs_key[None, :] * stride_kn + offs_d[:, None],
            mask=d_mask[:, None] & key_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N): k^T
        v = tl.load(
            v_base + offs_key[:, None] * stride_vn + offs_d[None, :],
            mask=key_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        policy = tl.load(policy_ptr + batch * stride_pb + offs_key * stride_pn, mask=key_mask, other=0.0).to(
            tl.float32
        )  # (BLOCK_N,)

        logits = tl.dot(q, k, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        logits = tl.where(key_mask[None, :], logits, float("-inf"))
        # Every block holds a real key, so new_max is finite. Strictly greater: the first
        # key with the row's max keeps it.
        block_max = tl.max(logits, axis=1)  # (BLOCK_M,)
        block_argmax = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int32) + key_start
        row_argmax = tl.where(block_max > row_max, block_argmax, row_argmax)
        new_max = tl.maximum(row_max, block_max)
        rescale = tl.math.exp2(row_max - new_max)  # (BLOCK_M,); 0 on the first block
        a = tl.math.exp2(logits - new_max[:, None]) * _keep_weight(policy, offs_m, offs_key)  # (BLOCK_M, BLOCK_N)
        # The denominator sums the weights the product with v uses, rounded to v's dtype: a
        # query that keeps mostly itself then gets its own v back, as the reference gives it.
        a = a.to(v.dtype)
        row_sum = row_sum * rescale + tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, v, acc * rescale[:, None], input_precision="ieee")
        row_max = new_max

    vsum = tl.load(vsum_ptr + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)  # (BLOCK_D,) fp32
    denom = row_sum + eps
    out = (acc + (eps / N) * vsum[None, :]) / denom[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(
        out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask,
    )
    if STORE_FP32:
        # (B, N, heads, HEAD_DIM) contiguous, for the backward's delta = dout . out.
        rows = (batch.to(tl.int64) * N + offs_m) * num_heads + head
        tl.store(out_fp32_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_mask)
    stats = pid_bh.to(tl.int64) * N + offs_m  # (BLOCK_M,) rows of the (B, heads, N) statistics
    tl.store(row_max_ptr + stats, row_max, mask=query_mask)
    tl.store(row_argmax_ptr + stats, row_argmax, mask=query_mask)
    tl.store(denom_ptr + stats, denom, mask=query_mask)


# ---------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["N"])
def _policy_attention_bwd_preprocess_kernel(
    out_ptr,
    dout_ptr,
    vsum_ptr,
    denom_ptr,
    delta_ptr,
    dmax_ptr,
    N,
    num_heads,
    eps,
    stride_ob,
    stride_on,
    stride_oh,
    stride_db,
    stride_dn,
    stride_dh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query_mask = offs_m < N
    row_mask = query_mask[:, None] & d_mask[None, :]

    out = tl.load(
        out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    ).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    dout = tl.load(
        dout_ptr + batch.to(tl.int64) * stride_db + head * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    ).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    vsum = tl.load(vsum_ptr + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)  # (BLOCK_D,)
    stats = pid_bh.to(tl.int64) * N + offs_m
    denom = tl.load(denom_ptr + stats, mask=query_mask, other=1.0)  # (BLOCK_M,)

    delta = tl.sum(out * dout, axis=1)  # (BLOCK_M,)
    dmax = -(eps / denom) * (delta - tl.sum(dout * vsum[None, :], axis=1) / N)
    tl.store(delta_ptr + stats, delta, mask=query_mask)
    tl.store(dmax_ptr + stats, dmax, mask=query_mask)


@triton.autotune(
    configs=_all(BACKWARD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_backward},
    **AUTOTUNE_OPTIONS,
)
@triton.jit(do_not_specialize=VARYING)
def _policy_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    policy_ptr,
    dout_ptr,
    row_max_ptr,
    row_argmax_ptr,
    denom_ptr,
    delta_ptr,
    dmax_ptr,
    dk_ptr,
    dv_ptr,
    dpolicy_ptr,
    N,
    seqlen_bucket,
    num_heads,
    qk_scale,
    scale,
    eps,
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
    stride_pb,
    stride_pn,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
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

    offs_key = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries, within a query block
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    key_mask = offs_key < N
    kv_mask = key_mask[:, None] & d_mask[None, :]
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
    dout_base = dout_ptr + batch.to(tl.int64) * stride_db + head * stride_dh
    stats_base = pid_bh.to(tl.int64) * N

    k = tl.load(
        k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh + offs_key[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh + offs_key[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    policy = tl.load(policy_ptr + batch * stride_pb + offs_key * stride_pn, mask=key_mask, other=0.0).to(
        tl.float32
    )  # (BLOCK_N,)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dpolicy = tl.zeros((BLOCK_N,), tl.float32)  # per head; summed over heads after the launch
    dout_over_denom = tl.zeros((BLOCK_D,), tl.float32)  # sum_i dout_i / D_i, for the eps / N term of dv
    for query_start in range(0, N, BLOCK_M):
        offs_query = query_start + offs_m
        query_mask = offs_query < N
        q = tl.load(
            q_base + offs_query[None, :] * stride_qn + offs_d[:, None],
            mask=d_mask[:, None] & query_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_M): q^T
        dout = tl.load(
            dout_base + offs_query[:, None] * stride_dn + offs_d[None, :],
            mask=query_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        # Padded queries: an infinite max makes their weights 0. Row statistics are (BLOCK_M,).
        row_max = tl.load(row_max_ptr + stats_base + offs_query, mask=query_mask, other=float("inf"))
        row_argmax = tl.load(row_argmax_ptr + stats_base + offs_query, mask=query_mask, other=-1)
        denom = tl.load(denom_ptr + stats_base + offs_query, mask=query_mask, other=1.0)
        delta = tl.load(delta_ptr + stats_base + offs_query, mask=query_mask, other=0.0)
        dmax = tl.load(dmax_ptr + stats_base + offs_query, mask=query_mask, other=0.0)

        logits_t = tl.dot(k, q, input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        weights_t = tl.where(
            key_mask[:, None], tl.math.exp2(logits_t - row_max[None, :]), 0.0
        )  # (BLOCK_N, BLOCK_M): exp(l - m)
        keep_t = tl.where(offs_key[:, None] == offs_query[None, :], 1.0, policy[:, None])  # (BLOCK_N, BLOCK_M)
        # a / D with a rounded to v's dtype, as the forward summed it into D.
        probs_t = (weights_t * keep_t).to(v.dtype).to(tl.float32) / denom[None, :]
        dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision="ieee")
        dattn_t = tl.dot(v, tl.trans(dout), input_precision="ieee")  # (BLOCK_N, BLOCK_M): dA^T
        g_t = weights_t * (dattn_t - delta[None, :]) / denom[None, :]
        is_argmax = offs_key[:, None] == row_argmax[None, :]
        dlogits_t = probs_t * (dattn_t - delta[None, :]) + tl.where(is_argmax, dmax[None, :], 0.0)
        dk = tl.dot(dlogits_t.to(q.dtype), tl.trans(q), dk, input_precision="ieee")
        off_diagonal = offs_key[:, None] != offs_query[None, :]
        dpolicy += tl.sum(tl.where(off_diagonal, g_t, 0.0), axis=1)
        dout_over_denom += tl.sum(dout.to(tl.float32) / denom[:, None], axis=0)

    dv += (eps / N) * dout_over_denom[None, :]
    tl.store(
        dk_ptr + batch.to(tl.int64) * stride_dkb + head * stride_dkh + offs_key[:, None] * stride_dkn + offs_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dv_ptr + batch.to(tl.int64) * stride_dvb + head * stride_dvh + offs_key[:, None] * stride_dvn + offs_d[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(dpolicy_ptr + stats_base + offs_key, dpolicy, mask=key_mask)


@triton.autotune(
    configs=_all(BACKWARD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_backward},
    **AUTOTUNE_OPTIONS,
)
@triton.jit(do_not_specialize=VARYING)
def _policy_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    policy_ptr,
    dout_ptr,
    row_max_ptr,
    row_argmax_ptr,
    denom_ptr,
    delta_ptr,
    dmax_ptr,
    dq_ptr,
    N,
    seqlen_bucket,
    num_heads,
    qk_scale,
    scale,
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
    stride_pb,
    stride_pn,
    stride_dqb,
    stride_dqn,
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

    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys, within a key block
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query_mask = offs_query < N
    row_mask = query_mask[:, None] & d_mask[None, :]
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh
    stats = pid_bh.to(tl.int64) * N + offs_query

    q = tl.load(
        q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh + offs_query[:, None] * stride_qn + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    dout = tl.load(
        dout_ptr
        + batch.to(tl.int64) * stride_db
        + head * stride_dh
        + offs_query[:, None] * stride_dn
        + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    # Row statistics, (BLOCK_M,) each; padded queries get an infinite max, so weights of 0.
    row_max = tl.load(row_max_ptr + stats, mask=query_mask, other=float("inf"))
    row_argmax = tl.load(row_argmax_ptr + stats, mask=query_mask, other=-1)
    denom = tl.load(denom_ptr + stats, mask=query_mask, other=1.0)
    delta = tl.load(delta_ptr + stats, mask=query_mask, other=0.0)
    dmax = tl.load(dmax_ptr + stats, mask=query_mask, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for key_start in range(0, N, BLOCK_N):
        offs_key = key_start + offs_n
        key_mask = offs_key < N
        k = tl.load(
            k_base + offs_key[:, None] * stride_kn + offs_d[None, :],
            mask=key_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_base + offs_key[None, :] * stride_vn + offs_d[:, None],
            mask=d_mask[:, None] & key_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N): v^T
        policy = tl.load(policy_ptr + batch * stride_pb + offs_key * stride_pn, mask=key_mask, other=0.0).to(
            tl.float32
        )  # (BLOCK_N,)

        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        weights = tl.where(
            key_mask[None, :], tl.math.exp2(logits - row_max[:, None]), 0.0
        )  # (BLOCK_M, BLOCK_N): exp(l - m)
        dattn = tl.dot(dout, v, input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        # a / D with a rounded to v's dtype, as the forward summed it into D.
        probs = (weights * _keep_weight(policy, offs_query, offs_key)).to(v.dtype).to(tl.float32) / denom[:, None]
        dlogits = probs * (dattn - delta[:, None])
        dlogits += tl.where(offs_key[None, :] == row_argmax[:, None], dmax[:, None], 0.0)
        dq = tl.dot(dlogits.to(k.dtype), k, dq, input_precision="ieee")

    tl.store(
        dq_ptr
        + batch.to(tl.int64) * stride_dqb
        + head * stride_dqh
        + offs_query[:, None] * stride_dqn
        + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=row_mask,
    )


# ----------------------------------------------------------------------------- launches


def check_inputs(q, k, v, policy) -> None:
    op = "policy_attention"
    check_qkv(op, q, k, v, 4, "(B, N, heads, head_dim)")
    check_ndim(op, "policy", policy, 2, "(B, N)")
    check_float(op, "policy", policy)
    if tuple(policy.shape) != tuple(q.shape[:2]):
        raise ValueError(f"{op}: policy must have shape (B, N) = {tuple(q.shape[:2])}, got {tuple(policy.shape)}")
    check_devices(op, q=q, k=k, v=v, policy=policy)


def _stats(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, N, heads, _ = q.shape
    return q.new_empty((B, heads, N), dtype=dtype)


def _column_sum(v: torch.Tensor) -> torch.Tensor:
    """sum_j v_j per (image, head): (B * heads, head_dim) fp32, contiguous."""
    return v.sum(dim=1, dtype=torch.float32).reshape(-1, v.shape[-1]).contiguous()


def _scales(scale: float | None, head_dim: int) -> tuple[float, float]:
    scale = head_dim**-0.5 if scale is None else scale
    return scale, scale * LOG2E


@on_input_device
def launch_forward(
    q, k, v, policy, scale: float | None, eps: float, *, out, out_fp32, row_max, row_argmax, denom
) -> None:
    """The forward into ``out`` (B, N, heads, d), for fp16/bf16 inputs also into
    ``out_fp32`` (the same in fp32, contiguous; None for fp32 inputs), and the row statistics
    (B, heads, N): ``row_max`` fp32 (base-2 logits), ``row_argmax`` int32, ``denom`` fp32."""
    check_inputs(q, k, v, policy)
    B, N, heads, head_dim = q.shape
    check_attention_out("policy_attention", out, q)
    store_fp32 = q.dtype != torch.float32
    if store_fp32 and (
        out_fp32 is None or out_fp32.shape != q.shape or out_fp32.dtype != torch.float32 or not out_fp32.is_contiguous()
    ):
        raise ValueError(
            f"policy_attention: out_fp32 must be a contiguous float32 tensor of shape {tuple(q.shape)} "
            f"for {q.dtype} inputs"
        )
    for name, t, dtype in (
        ("row_max", row_max, torch.float32),
        ("row_argmax", row_argmax, torch.int32),
        ("denom", denom, torch.float32),
    ):
        if t.shape != (B, heads, N) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"policy_attention: {name} must be a contiguous {dtype} tensor of shape {(B, heads, N)}")
    if B == 0 or N == 0 or heads == 0 or head_dim == 0:
        return
    scale, qk_scale = _scales(scale, head_dim)
    tiles = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * heads)

    _policy_attention_fwd_kernel[grid](
        q,
        k,
        v,
        policy,
        _column_sum(v),
        out,
        out_fp32 if store_fp32 else out,
        row_max,
        row_argmax,
        denom,
        N,
        length_bucket(N),
        heads,
        qk_scale,
        eps,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *policy.stride(),
        **tiles,
        STORE_FP32=store_fp32,
    )


@on_input_device
def launch_backward(
    dout,
    q,
    k,
    v,
    policy,
    out,
    row_max,
    row_argmax,
    denom,
    scale: float | None,
    eps: float,
    *,
    dq,
    dk,
    dv,
    dpolicy_per_head,
) -> None:
    """Gradients into dq, dk, dv (q's shape and dtype) and ``dpolicy_per_head`` (B, heads, N)
    fp32, from the forward's output in fp32 (``out``: the output itself for fp32 inputs,
    ``out_fp32`` for fp16/bf16 ones) and row statistics."""
    if out.dtype != torch.float32:
        raise TypeError(f"policy_attention backward: out must be the forward's float32 output, got {out.dtype}")
    check_devices(
        "policy_attention backward",
        dout=dout,
        q=q,
        k=k,
        v=v,
        policy=policy,
        out=out,
        row_max=row_max,
        row_argmax=row_argmax,
        denom=denom,
        dq=dq,
        dk=dk,
        dv=dv,
        dpolicy=dpolicy_per_head,
    )
    B, N, heads, head_dim = q.shape
    if B == 0 or N == 0 or heads == 0 or head_dim == 0:
        return
    scale, qk_scale = _scales(scale, head_dim)
    tiles = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim))
    vsum = _column_sum(v)
    delta, dmax = _stats(q), _stats(q)
    _policy_attention_bwd_preprocess_kernel[(triton.cdiv(N, PREPROCESS_BLOCK_M), B * heads)](
        out,
        dout,
        vsum,
        denom,
        delta,
        dmax,
        N,
        heads,
        eps,
        *out.stride()[:3],
        *dout.stride()[:3],
        **tiles,
        BLOCK_M=PREPROCESS_BLOCK_M,
    )
    common = (N, length_bucket(N), heads, qk_scale, scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *policy.stride())
    _policy_attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * heads)](
        q,
        k,
        v,
        policy,
        dout,
        row_max,
        row_argmax,
        denom,
        delta,
        dmax,
        dk,
        dv,
        dpolicy_per_head,
        *common,
        eps,
        *strides,
        *dk.stride()[:3],
        *dv.stride()[:3],
        **tiles,
    )
    _policy_attention_bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * heads)](
        q,
        k,
        v,
        policy,
        dout,
        row_max,
        row_argmax,
        denom,
        delta,
        dmax,
        dq,
        *common,
        *strides,
        *dq.stride()[:3],
        **tiles,
    )


# ------------------------------------------------------------------------ custom ops


def _fp32_output(q: torch.Tensor) -> torch.Tensor:
    """The forward's fp32 copy of its output: (B, N, heads, d) for fp16/bf16 inputs, empty for
    fp32 ones (the output itself serves)."""
    return q.new_empty(q.shape if q.dtype != torch.float32 else (0,), dtype=torch.float32)


@torch.library.custom_op("mematte::policy_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    scale: float | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_inputs(q, k, v, policy)
    out, out_fp32 = q.new_empty(q.shape), _fp32_output(q)
    row_max, row_argmax, denom = _stats(q), _stats(q, torch.int32), _stats(q)
    launch_forward(
        q,
        k,
        v,
        policy,
        scale,
        eps,
        out=out,
        out_fp32=out_fp32 if out_fp32.numel() else None,
        row_max=row_max,
        row_argmax=row_argmax,
        denom=denom,
    )
    return out, out_fp32, row_max, row_argmax, denom


@_forward_op.register_fake
def _(q, k, v, policy, scale, eps):
    check_inputs(q, k, v, policy)
    return q.new_empty(q.shape), _fp32_output(q), _stats(q), _stats(q, torch.int32), _stats(q)


@torch.library.custom_op("mematte::policy_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    row_argmax: torch.Tensor,
    denom: torch.Tensor,
    scale: float | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    dpolicy_per_head = _stats(q)
    launch_backward(
        dout.contiguous(),
        q,
        k,
        v,
        policy,
        out,
        row_max,
        row_argmax,
        denom,
        scale,
        eps,
        dq=dq,
        dk=dk,
        dv=dv,
        dpolicy_per_head=dpolicy_per_head,
    )
    return dq, dk, dv, dpolicy_per_head.sum(dim=1).to(policy.dtype)


@_backward_op.register_fake
def _(dout, q, k, v, policy, out, row_max, row_argmax, denom, scale, eps):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), policy.new_empty(policy.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, policy, scale, eps = inputs
    out, out_fp32, row_max, row_argmax, denom = output
    ctx.save_for_backward(q, k, v, policy, out_fp32 if q.dtype != torch.float32 else out, row_max, row_argmax, denom)
    ctx.scale, ctx.eps = scale, eps


def _backward(ctx, dout, *unused_stat_grads):
    q, k, v, policy, out, row_max, row_argmax, denom = ctx.saved_tensors
    dq, dk, dv, dpolicy = torch.ops.mematte.policy_attention_backward(
        dout, q, k, v, policy, out, row_max, row_argmax, denom, ctx.scale, ctx.eps
    )
    return dq, dk, dv, dpolicy, None, None


torch.library.register_autograd("mematte::policy_attention_forward", _backward, setup_context=_setup_context)


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Policy-masked attention over all tokens, as
    :func:`mematte_kernels.reference.policy_attention`: q, k, v (B, N, heads, d), policy
    (B, N) float -> (B, N, heads, d) contiguous, differentiable in q, k, v and policy.
    ``scale`` defaults to head_dim ** -0.5. Head dimensions past MAX_HEAD_DIM run the
    chunked PyTorch implementation."""
    if q.shape[-1] > MAX_HEAD_DIM:
        return native.policy_attention(q, k, v, policy, scale, eps)
    return torch.ops.mematte.policy_attention_forward(q, k, v, policy, scale, eps)[0]
