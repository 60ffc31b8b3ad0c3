"""What the flash-attention kernels share: one list of tile configs per direction, the
autotuner that chooses among them, and the tile loops.

Varlen attention (packed sequences), policy attention (MEMatte's training) and ViTMatte's
relative-position attention differ only in what enters a tile of logits (a position bias
gathered per key, a policy weighing each key) and in what a program stores. Their forwards
run one online-softmax loop over key blocks, :func:`attend_keys`, whose step is
:func:`online_softmax_step`; the backward kernels (:mod:`.attention_backward`) recompute each
tile's probabilities and logit gradients in one place, :func:`tile_gradients`.

Addressing: a tensor is read as (batch, token, head, d) with a contiguous d; token t of the
sequence of (batch, head) is at ``ptr + batch * stride_b + (seq_start + t) * stride_n +
head * stride_h``. Packed varlen tensors (T, heads, d) pass stride_b = 0 and their sequence's
offset in cu_seqlens as seq_start; batched ones (B, N, heads, d) pass seq_start = 0.

The softmax runs in base 2: the fp32 logits are multiplied by ``scale * log2(e)`` (a bias by
log2(e)). fp32 uses exact fp32 dots (``input_precision="ieee"``); fp16/bf16 use the tensor
cores with fp32 accumulation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE_OPTIONS, INTERPRET

LOG2E = tl.constexpr(math.log2(math.e))


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The logits' scale: ``scale``, or head_dim ** -0.5 where it is None."""
    return head_dim**-0.5 if scale is None else scale


def base2_scale(scale: float) -> float:
    """The factor of the fp32 q . k products that gives base-2 logits: ``scale * log2(e)``."""
    return scale * LOG2E.value


# Tensor-core (fp16/bf16) and FMA (fp32) tiles. fp32 dots hold whole operand rows in
# registers, so its tiles are smaller: at head dim 64 these are ones ptxas compiles without
# spilling tiles for sm_80 and sm_90. A backward program holds four (BLOCK_N, d) tiles (k, v and their
# gradients), so the backward's tiles are smaller than the forward's; its 32 x 32
# tensor-core tiles are the ones within Turing's 64 KiB of shared memory at head dim 128.
CONFIGS = {
    "forward": {
        "tensor_core": [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        ],
        "fp32": [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        ],
    },
    "backward": {
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
    },
}
# The interpreter would time every config on the CPU: it runs this one alone.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)

# MEMATTE_TRITON_AUTOTUNE=0 (read at import): every autotuned kernel runs the first config of
# its list instead of timing them all, for runs that cannot spend the first call's tuning
# time (a short GPU report on a fresh machine).
TIME_CONFIGS = os.environ.get("MEMATTE_TRITON_AUTOTUNE") != "0"


def configs_for(direction: str, dtype: torch.dtype) -> list[triton.Config]:
    """The configs the autotuner tries for a ``direction`` ("forward" or "backward") kernel
    on q/k/v of ``dtype``."""
    configs = CONFIGS[direction]["fp32" if dtype == torch.float32 else "tensor_core"]
    return configs if TIME_CONFIGS else configs[:1]


def length_bucket(max_seqlen: int) -> int:
    """The autotuning bucket of a launch: max_seqlen rounded up to a power of 2."""
    return triton.next_power_of_2(max(max_seqlen, 1))


def attention_kernel(direction: str, key=(), do_not_specialize=(), interpreter_config=INTERPRETER_CONFIG):
    """``triton.jit`` and ``triton.autotune`` over the ``direction``'s configs, keyed on the
    head dimension, the kernel's ``seqlen_bucket`` argument (a 64-token warm-up must not
    choose the tiles of 18,500-token images; token counts of one bucket share a tuning) and
    the constexpr flags named in ``key``. The autotuner adds every tensor argument's dtype to
    the key, not whether an optional one is None: a kernel whose launches differ in that
    names a flag that tells them apart. ``do_not_specialize``: the integer arguments that
    change with the image size, so one compilation serves every size."""

    def prune(configs, named_args: dict, **kwargs) -> list[triton.Config]:
        if INTERPRET:
            return configs
        q = kwargs["q_ptr"] if "q_ptr" in kwargs else named_args["q_ptr"]
        return configs_for(direction, q.dtype)

    configs = CONFIGS[direction]
    return lambda fn: triton.autotune(
        configs=[interpreter_config] if INTERPRET else configs["tensor_core"] + configs["fp32"],
        key=["HEAD_DIM", "seqlen_bucket", *key],
        prune_configs_by={"early_config_prune": prune},
        **AUTOTUNE_OPTIONS,
    )(triton.jit(do_not_specialize=["seqlen_bucket", *do_not_specialize])(fn))


# ----------------------------------------------------------------------------- addressing


@triton.jit
def sequence_base(ptr, batch, head, seq_start, stride_b, stride_n, stride_h):
    """Where token 0 of the sequence of (batch, head) is in a (batch, token, head, d) tensor,
    in int64: the offsets of a batch of 8K images pass 2**31."""
    return ptr + batch.to(tl.int64) * stride_b + seq_start.to(tl.int64) * stride_n + head.to(tl.int64) * stride_h


@triton.jit
def program_sequence(cu_seqlens_ptr, num_tokens, num_heads):
    """The (batch, head) of this program (grid axis 1) and its sequence's first token and
    length: from ``cu_seqlens`` (B + 1,) for packed sequences, else tokens 0..num_tokens."""
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    if cu_seqlens_ptr is not None:
        seq_start = tl.load(cu_seqlens_ptr + batch)
        seqlen = tl.load(cu_seqlens_ptr + batch + 1) - seq_start
    else:
        seq_start = tl.full((), 0, tl.int32)
        seqlen = num_tokens
    return batch, head, seq_start, seqlen


@triton.jit
def load_rows(base, rows, stride_row, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(rows), BLOCK_D): row r at ``base + rows[r] * stride_row``, zeros past HEAD_DIM and
    where ``row_mask`` is false."""
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) lanes of the head dimension
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(base, rows, stride_row, row_mask, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``value`` (len(rows), BLOCK_D) into the rows ``load_rows`` reads, in the tensor's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------- forward


@triton.jit
def online_softmax_step(row_max, row_sum, logits, keep, WEIGHT_DTYPE: tl.constexpr):
    """One key block of an online softmax in base 2. ``logits`` (BLOCK_M, BLOCK_N) are -inf at
    padded keys and every block holds a real key, so the new max is finite and no -inf - -inf
    occurs; ``keep`` (1.0 or a (BLOCK_M, BLOCK_N) tile) weighs the probabilities.

    Returns the block's weights exp2(logits - new max) * keep in WEIGHT_DTYPE, the factor that
    rescales what came before (0 on the first block), and the new row max and row sum. The sum
    counts the weights as rounded to WEIGHT_DTYPE, as a product with v of that dtype uses them."""
    new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # (BLOCK_M,)
    weights = (tl.math.exp2(logits - new_max[:, None]) * keep).to(WEIGHT_DTYPE)  # (BLOCK_M, BLOCK_N)
    rescale = tl.math.exp2(row_max - new_max)  # (BLOCK_M,)
    row_sum = row_sum * rescale + tl.sum(weights.to(tl.float32), axis=1)
    return weights, rescale, new_max, row_sum


@triton.jit
def attend_keys(
    queries,
    keys,
    qk_scale,
    policy,
    bias,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """The online softmax of a program's queries over every key of their sequence, a key block
    at a time.

    ``queries`` = (q (BLOCK_M, BLOCK_D), their tokens in the sequence (BLOCK_M,), which are
    real (BLOCK_M,)); ``keys`` = (k_base, v_base: token 0 of the sequence's keys and values,
    their token strides, the number of keys). Optional terms, None where absent: ``policy``
    = (a pointer to the sequence's (keys,) weights, their stride) weighs each key, and a query keeps
    itself; ``bias`` = (bias_h_rows, bias_w_rows: (BLOCK_M,) pointers to each query's rows of
    the position tables, the width of the key grid) adds a position term per key.

    Returns, relative to the final row max: acc (BLOCK_M, BLOCK_D) = sum_j w_ij v_j (zeros
    unless ACCUMULATE), row_max (BLOCK_M,) in base 2, row_sum (BLOCK_M,) = sum_j w_ij and
    row_argmax (BLOCK_M,) int32, the first key with the row's max (under a policy).

    Every block masks its keys: a loop of unmasked full blocks plus a masked last one would
    compile the body twice, and ptxas then spills the forward's accumulators (sm_80/sm_90)."""
    q, offs_query, query_mask = queries
    k_base, v_base, stride_kn, stride_vn, num_keys = keys
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    row_argmax = tl.zeros((BLOCK_M,), tl.int32)
    for key_start in range(0, num_keys, BLOCK_N):
        offs_key = key_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys of this block
        key_mask = offs_key < num_keys
        k = load_rows(k_base, offs_key, stride_kn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        # Scaled in fp32, as flash-attention does: folding the scale into a bf16 q would round
        # every logit's factor to 8 bits.
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if bias is not None:
            # Each key's grid row and column pick its terms from the query's two table rows.
            bias_h_rows, bias_w_rows, grid_w = bias
            key_row = offs_key // grid_w  # (BLOCK_N,)
            key_col = offs_key - key_row * grid_w
            bias_mask = query_mask[:, None] & key_mask[None, :]
            position = tl.load(bias_h_rows[:, None] + key_row[None, :], mask=bias_mask, other=0.0).to(tl.float32)
            position += tl.load(bias_w_rows[:, None] + key_col[None, :], mask=bias_mask, other=0.0).to(tl.float32)
            logits += position * LOG2E  # (BLOCK_M, BLOCK_N)
        logits = tl.where(key_mask[None, :], logits, float("-inf"))

        if policy is None:
            weights, rescale, row_max, row_sum = online_softmax_step(row_max, row_sum, logits, 1.0, tl.float32)
        else:
            policy_base, stride_pn = policy
            key_weights = tl.load(policy_base + offs_key * stride_pn, mask=key_mask, other=0.0).to(tl.float32)
            # keep[i, j] = p_j + (1 - p_j) [i == j]: a query always keeps itself.
            keep = tl.where(offs_query[:, None] == offs_key[None, :], 1.0, key_weights[None, :])
            # Strictly greater: the first key with the row's max keeps it.
            block_argmax = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int32) + key_start  # (BLOCK_M,)
            row_argmax = tl.where(tl.max(logits, axis=1) > row_max, block_argmax, row_argmax)
            # The sum counts the weights as the product with v rounds them: a query that keeps
            # mostly itself then gets its own v back, as the reference gives it.
            weights, rescale, row_max, row_sum = online_softmax_step(row_max, row_sum, logits, keep, k.dtype)
        if ACCUMULATE:
            v = load_rows(v_base, offs_key, stride_vn, key_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            acc = tl.dot(weights.to(v.dtype), v, acc * rescale[:, None], input_precision="ieee")
    return acc, row_max, row_sum, row_argmax


# ------------------------------------------------------------------------------- backward


@triton.jit
def tile_gradients(q, k, v, dout, query, key, key_mask, qk_scale, stats, policy, KEY_ROWS: tl.constexpr):
    """One (query block, key block) tile of attention's backward, recomputed from the
    forward's row statistics: q, dout (BLOCK_M, BLOCK_D), k, v (BLOCK_N, BLOCK_D).

    The tile has queries along its rows, (BLOCK_M, BLOCK_N), or with KEY_ROWS keys, (BLOCK_N,
    BLOCK_M), as the kernel's next dots want it; the per-query and per-key values come
    expanded to match, (BLOCK_M, 1) and (1, BLOCK_N) or the other way round: the token
    indices ``query`` and ``key``, ``key_mask``, ``policy`` (each key's weight; None without
    a policy) and ``stats`` = (row_stat: the log-sum-exp in base 2, or under a policy the row
    max; delta = dout . out; and under a policy, else None: the row denominator, the key of
    the row max and the gradient of that max), from :func:`load_query_stats`.

    Returns three tiles: the probabilities P, the logits' gradient dS (before the scale) and,
    under a policy, the gradient of each key's keep weight (zero on the diagonal, which does
    not depend on the policy)."""
    row_stat, delta, denom, row_argmax, dmax = stats
    if KEY_ROWS:
        logits = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        dprobs = tl.dot(v, tl.trans(dout), input_precision="ieee")  # (BLOCK_N, BLOCK_M): dout_i . v_j
    else:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        dprobs = tl.dot(dout, tl.trans(v), input_precision="ieee")  # (BLOCK_M, BLOCK_N): dout_i . v_j
    # Keys past the end are loaded as zeros, so their logit is 0 whatever the real ones are:
    # where every real logit of a query lies below about -88, exp2(0 - row_stat) overflows
    # to inf, and inf times a zero-loaded v is NaN. Their weights are masked to 0 instead.
    weights = tl.where(key_mask, tl.math.exp2(logits - row_stat), 0.0)
    if policy is None:
        probs = weights
        dlogits = probs * (dprobs - delta)
        dkeep = tl.zeros_like(dlogits)  # no policy, no keep weights (and unused)
    else:
        keep = tl.where(query == key, 1.0, policy)
        # a / D with a rounded to v's dtype, as the forward summed it into D.
        probs = (weights * keep).to(v.dtype).to(tl.float32) / denom
        dlogits = probs * (dprobs - delta)
        # The row max is not detached: its key takes the max's gradient.
        dlogits += tl.where(key == row_argmax, dmax, 0.0)
        dkeep = tl.where(query != key, weights * (dprobs - delta) / denom, 0.0)
    return probs, dlogits, dkeep
