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

Three launches: a per-row preprocess (delta, dmax), then the dk/dv/dp and dq kernels that
varlen attention's backward runs too (:mod:`.attention_backward`), each recomputing the
logits tile by tile; nothing N x N is stored, and there are no atomics, so gradients are
deterministic. The forward is the online-softmax loop of :mod:`._attention` with the policy
weighing each key.

q, k, v are (B, N, heads, d), possibly strided views, with a contiguous head dimension; d up
to 128, held in BLOCK_D lanes (the next power of two).
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
    check_float,
    check_ndim,
    check_qkv,
    head_block,
    on_input_device,
)
from .attention_backward import launch_attention_backward

# Queries per program of the backward's per-row preprocess: it holds (64, d) tiles of out and
# dout in fp32, and is memory-bound.
PREPROCESS_BLOCK_M = 64


@triton.jit
def load_column_sum(vsum_ptr, image_head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j v_j of one (image, head): (BLOCK_D,) fp32, zeros past HEAD_DIM."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(vsum_ptr + image_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)


# ----------------------------------------------------------------------------- forward


# Integer arguments that change with the image size (policy is (B, N)): one compilation for all.
@attention_kernel("forward", do_not_specialize=["N", "stride_pb"])
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
):
    # out_fp32_ptr: for fp16/bf16 inputs, the output again in fp32 ((B, N, heads, HEAD_DIM)
    # contiguous, for the backward's delta = dout . out); None for fp32 inputs.
    pid_m = tl.program_id(0)
    batch, head, seq_start, _ = program_sequence(None, N, num_heads)
    image_head = batch * num_heads + head  # row of the column sums, plane of the statistics
    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    query_mask = offs_query < N
    q_base = sequence_base(q_ptr, batch, head, seq_start, stride_qb, stride_qn, stride_qh)
    q = load_rows(q_base, offs_query, stride_qn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)

    # acc = sum_j a v_j and row_sum = sum_j a, relative to row_max (base 2).
    keys = (
        sequence_base(k_ptr, batch, head, seq_start, stride_kb, stride_kn, stride_kh),
        sequence_base(v_ptr, batch, head, seq_start, stride_vb, stride_vn, stride_vh),
        stride_kn,
        stride_vn,
        N,
    )
    policy = (policy_ptr + batch.to(tl.int64) * stride_pb, stride_pn)
    acc, row_max, row_sum, row_argmax = attend_keys(
        (q, offs_query, query_mask),
        keys,
        qk_scale,
        policy=policy,
        bias=None,
        HEAD_DIM=HEAD_DIM,
        BLOCK_D=BLOCK_D,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        ACCUMULATE=True,
    )
    vsum = load_column_sum(vsum_ptr, image_head, HEAD_DIM, BLOCK_D)  # (BLOCK_D,)
    denom = row_sum + eps  # (BLOCK_M,)
    out = (acc + (eps / N) * vsum[None, :]) / denom[:, None]  # (BLOCK_M, BLOCK_D)
    out_base = sequence_base(out_ptr, batch, head, seq_start, stride_ob, stride_on, stride_oh)
    store_rows(out_base, offs_query, stride_on, query_mask, out, HEAD_DIM, BLOCK_D)
    if out_fp32_ptr is not None:
        row_stride = num_heads * HEAD_DIM
        out_fp32_base = sequence_base(
            out_fp32_ptr, batch, head, seq_start, N.to(tl.int64) * row_stride, row_stride, HEAD_DIM
        )
        store_rows(out_fp32_base, offs_query, row_stride, query_mask, out, HEAD_DIM, BLOCK_D)
    stats = image_head.to(tl.int64) * N + offs_query  # (BLOCK_M,) rows of the (B, heads, N) statistics
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
    # Per query: delta = dout . out and the gradient of its row max,
    # dmax = -(eps / D) * (delta - dout . vsum / N).
    pid_m = tl.program_id(0)
    batch, head, seq_start, _ = program_sequence(None, N, num_heads)
    image_head = batch * num_heads + head
    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    query_mask = offs_query < N
    out_base = sequence_base(out_ptr, batch, head, seq_start, stride_ob, stride_on, stride_oh)
    dout_base = sequence_base(dout_ptr, batch, head, seq_start, stride_db, stride_dn, stride_dh)
    out = load_rows(out_base, offs_query, stride_on, query_mask, HEAD_DIM, BLOCK_D).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    dout = load_rows(dout_base, offs_query, stride_dn, query_mask, HEAD_DIM, BLOCK_D).to(tl.float32)
    vsum = load_column_sum(vsum_ptr, image_head, HEAD_DIM, BLOCK_D)  # (BLOCK_D,)
    stats = image_head.to(tl.int64) * N + offs_query
    denom = tl.load(denom_ptr + stats, mask=query_mask, other=1.0)  # (BLOCK_M,)

    delta = tl.sum(out * dout, axis=1)  # (BLOCK_M,)
    dmax = -(eps / denom) * (delta - tl.sum(dout * vsum[None, :], axis=1) / N)
    tl.store(delta_ptr + stats, delta, mask=query_mask)
    tl.store(dmax_ptr + stats, dmax, mask=query_mask)


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
    qk_scale = base2_scale(softmax_scale(scale, head_dim))
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
        out_fp32 if store_fp32 else None,
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
    scale = softmax_scale(scale, head_dim)
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
    launch_attention_backward(
        dout,
        q,
        k,
        v,
        dq=dq,
        dk=dk,
        dv=dv,
        row_stat=row_max,
        delta=delta,
        num_sequences=B,
        max_seqlen=N,
        scale=scale,
        policy=policy,
        denom=denom,
        row_argmax=row_argmax,
        dmax=dmax,
        dpolicy=dpolicy_per_head,
        eps=eps,
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
