"""MEMatte's router as three Triton launches.

The router (spec: "Router") is
    h      = GELU(LayerNorm(x) @ W_in^T + b_in)                      (B, N, C)
    local  = h[..., :C/2];  g = mean over the N tokens of h[..., C/2:]
    z      = GELU(cat(local, g) @ W0^T + b0) -> GELU(. @ W1^T + b1) -> . @ W2^T + b2
    scores = LogSoftmax(z)                                           (B, N, 2)

Because g is one vector per image, ``cat(local, g) @ W0^T + b0`` equals
``local @ W0[:, :C/2]^T + (W0[:, C/2:] @ g + b0)``: the second term is a per-image bias.
So the global half of h is never stored per token:

1. ``_router_hidden_kernel``, per (token tile, image): LayerNorm -> Linear -> GELU, one
   channel tile after another, so the statistics are computed once per token and the
   tile's re-reads of x hit L1/L2 (the C x C weight, shared by every program, stays in L2).
   Local channels are stored (B, N, C/2) in x's dtype; global channels are summed over
   the tile's tokens into ``partial`` (B, token tiles, C/2) fp32.
2. ``_router_fold_kernel``, per (channel tile, image): g = sum of the partials / N, and
   ``folded_bias = W0[:, C/2:] @ g + b0`` (B, C/2) fp32.
3. ``_router_head_kernel``, per (token tile, image): the MLP C/2 -> C/4 -> 2 with GELUs and
   the LogSoftmax; writes scores (B, N, 2) fp32 and keep (B, N) bool.

Per-tile partial sums instead of atomics keep the global mean, and so every routing
decision, identical from run to run. All accumulation is fp32. fp32 inputs use exact fp32
dots (``input_precision="ieee"``): the model's fp32 parity needs >= 99.9% of the routing
decisions identical to the reference, and TF32's 10-bit mantissa would flip tokens near
the boundary.
fp16/bf16 tokens take the tensor-core path for the two C-wide layers (``input_precision``
only affects fp32 operands), also with fp32 parameters, as the model runs its routers: the
tokens are never copied to fp32; the weights of those two layers are rounded to the tokens'
dtype, and the global mean, the narrow layers and the margins stay fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import check_devices, check_float, check_ndim, check_shape, on_input_device

# Tiles are fixed rather than autotuned: the hidden kernel's token tile also sizes the
# ``partial`` buffer, which is allocated before the launch. fp32 dots run on the FMA units
# with whole operand rows in registers, so the fp32 hidden tile has half the tokens; all of
# these compile without register spills for sm_80 and sm_90.
HIDDEN_TILES = {
    "tensor_core": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8),
    "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4),
}
FOLD_TILE = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_T=32, num_warps=4)
HEAD_TILE = dict(BLOCK_M=64, BLOCK_J=32, BLOCK_K=32, num_warps=8)


def hidden_tile(dtype: torch.dtype) -> dict:
    return HIDDEN_TILES["fp32" if dtype == torch.float32 else "tensor_core"]


def quarter_pad(C: int) -> int:
    """C/4 rounded up to a power of 2 (for tl.arange) and to 16 (the smallest tl.dot side)."""
    return max(16, triton.next_power_of_2(C // 4))


@triton.jit
def _gelu(x):
    # Exact (erf) GELU, as nn.GELU() computes it.
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit(do_not_specialize=["N"])  # N: tokens per image, one compilation for every size
def _router_hidden_kernel(
    x_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    in_weight_ptr,
    in_bias_ptr,
    local_ptr,
    partial_ptr,
    N,
    C,
    eps,
    stride_xb,
    stride_xn,
    stride_xc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (token tile, image) produces all C outputs of its tokens: the
    # statistics are computed once, and the tile's later reads of x come from L1/L2.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    half = C // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) input channels
    row_mask = offs_m < N
    x_rows = x_ptr + pid_b.to(tl.int64) * stride_xb + offs_m[:, None].to(tl.int64) * stride_xn  # (BLOCK_M, 1)

    # LayerNorm statistics in fp32, mean first and then the variance around it: one-pass
    # sum/sum-of-squares cancels badly on ViT channels with large offsets.
    row_sum = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :] * stride_xc, mask=row_mask[:, None] & (k[None, :] < C), other=0.0)
        row_sum += x.to(tl.float32)  # (BLOCK_M, BLOCK_K)
    mean = tl.sum(row_sum, axis=1) / C  # (BLOCK_M,)
    row_sq = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        k_mask = row_mask[:, None] & (k[None, :] < C)
        x = tl.load(x_rows + k[None, :] * stride_xc, mask=k_mask, other=0.0)
        centered = tl.where(k_mask, x.to(tl.float32) - mean[:, None], 0.0)  # (BLOCK_M, BLOCK_K)
        row_sq += centered * centered
    rstd = 1.0 / tl.sqrt(tl.sum(row_sq, axis=1) / C + eps)  # (BLOCK_M,)

    num_tiles = tl.num_programs(0)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < C
            x = tl.load(x_rows + k[None, :] * stride_xc, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gamma = tl.load(norm_weight_ptr + k, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
            beta = tl.load(norm_bias_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            # (BLOCK_M, BLOCK_K), normalised in fp32 and rounded to W_in's dtype for the dot
            x_hat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            # W_in is (C_out, C_in) row-major; read its transpose tile directly.
            w = tl.load(
                in_weight_ptr + offs_n[None, :] * C + k[:, None],
                mask=k_mask[:, None] & (offs_n[None, :] < C),
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(x_hat.to(w.dtype), w, acc, input_precision="ieee")
        b_in = tl.load(in_bias_ptr + offs_n, mask=offs_n < C, other=0.0).to(tl.float32)
        h = _gelu(acc + b_in[None, :])  # (BLOCK_M, BLOCK_N)

        # A channel tile may straddle C/2 (C/2 need not be a multiple of BLOCK_N): the
        # masks route each column to the local store or to the global sum.
        is_local = offs_n < half
        local_ptrs = local_ptr + (pid_b * N + offs_m[:, None]).to(tl.int64) * half + offs_n[None, :]
        tl.store(local_ptrs, h.to(local_ptr.dtype.element_ty), mask=row_mask[:, None] & is_local[None, :])

        is_global = (offs_n >= half) & (offs_n < C)
        tile_sum = tl.sum(tl.where(row_mask[:, None], h, 0.0), axis=0)  # (BLOCK_N,)
        partial_ptrs = partial_ptr + (pid_b * num_tiles + pid_m).to(tl.int64) * half + (offs_n - half)
        tl.store(partial_ptrs, tile_sum, mask=is_global)


@triton.jit(do_not_specialize=["N", "num_tiles"])  # N: tokens per image, one compilation for every size
def _router_fold_kernel(
    partial_ptr,
    out0_weight_ptr,
    out0_bias_ptr,
    folded_bias_ptr,
    N,
    C,
    num_tiles,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    half = C // 2

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) outputs of out_conv.0
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) global channels
    offs_t = tl.arange(0, BLOCK_T)  # (BLOCK_T,) token tiles
    n_mask = offs_n < half
    partial_rows = partial_ptr + pid_b.to(tl.int64) * num_tiles * half

    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, half, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < half
        tile_sums = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
        for t0 in range(0, num_tiles, BLOCK_T):
            t = t0 + offs_t
            tile_sums += tl.load(
                partial_rows + t[:, None] * half + k[None, :],
                mask=(t[:, None] < num_tiles) & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_K)
        g = tl.sum(tile_sums, axis=0) / N  # (BLOCK_K,) per-image mean of the global half
        w = tl.load(
            out0_weight_ptr + offs_n[:, None] * C + half + k[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_K): W0[:, C/2:]
        acc += w * g[None, :]
    folded = tl.sum(acc, axis=1) + tl.load(out0_bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(folded_bias_ptr + pid_b * half + offs_n, folded, mask=n_mask)


@triton.jit(do_not_specialize=["N"])  # N: tokens per image, one compilation for every size
def _router_head_kernel(
    local_ptr,
    folded_bias_ptr,
    out0_weight_ptr,
    out1_weight_ptr,
    out1_bias_ptr,
    out2_weight_ptr,
    out2_bias_ptr,
    scores_ptr,
    keep_ptr,
    N,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUARTER_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    half = C // 2
    quarter = C // 4

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) local channels
    offs_q = tl.arange(0, QUARTER_PAD)  # (QUARTER_PAD,) out_conv.2 outputs, padded to a power of 2
    row_mask = offs_m < N
    q_mask = offs_q < quarter
    tokens = (pid_b * N + offs_m).to(tl.int64)  # (BLOCK_M,) flat token index
    local_rows = local_ptr + tokens[:, None] * half  # (BLOCK_M, 1)

    # out_conv.0's outputs are produced BLOCK_J at a time and consumed at once by out_conv.2,
    # so the (BLOCK_M, C/2) activation never exists as a whole; the local tile is re-read
    # (from cache) for each BLOCK_J rather than held, as it would not fit in registers.
    acc2 = tl.zeros((BLOCK_M, QUARTER_PAD), tl.float32)
    for j0 in range(0, half, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # (BLOCK_J,) out_conv.0 outputs
        j_mask = offs_j < half
        acc1 = tl.zeros((BLOCK_M, BLOCK_J), tl.float32)
        for k0 in range(0, half, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < half
            local = tl.load(
                local_rows + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            w0 = tl.load(
                out0_weight_ptr + offs_j[None, :] * C + k[:, None],
                mask=k_mask[:, None] & j_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_J): W0[:, :C/2]^T
            acc1 = tl.dot(local, w0, acc1, input_precision="ieee")
        folded = tl.load(folded_bias_ptr + pid_b * half + offs_j, mask=j_mask, other=0.0)  # (BLOCK_J,)
        z1 = _gelu(acc1 + folded[None, :])  # (BLOCK_M, BLOCK_J)
        w1 = tl.load(
            out1_weight_ptr + offs_q[None, :] * half + offs_j[:, None],
            mask=j_mask[:, None] & q_mask[None, :],
            other=0.0,
        )  # (BLOCK_J, QUARTER_PAD): W1^T
        acc2 = tl.dot(z1.to(w1.dtype), w1, acc2, input_precision="ieee")
    b1 = tl.load(out1_bias_ptr + offs_q, mask=q_mask, other=0.0).to(tl.float32)
    z2 = _gelu(acc2 + b1[None, :])  # (BLOCK_M, QUARTER_PAD); padded columns are GELU(0) = 0

    # Two outputs are too narrow for tl.dot: reduce along the channels instead.
    w2_0 = tl.load(out2_weight_ptr + offs_q, mask=q_mask, other=0.0).to(tl.float32)
    w2_1 = tl.load(out2_weight_ptr + quarter + offs_q, mask=q_mask, other=0.0).to(tl.float32)
    logit0 = tl.sum(z2 * w2_0[None, :], axis=1) + tl.load(out2_bias_ptr).to(tl.float32)  # (BLOCK_M,)
    logit1 = tl.sum(z2 * w2_1[None, :], axis=1) + tl.load(out2_bias_ptr + 1).to(tl.float32)

    # LogSoftmax over the pair, in the same order of operations as torch's.
    top = tl.maximum(logit0, logit1)
    log_norm = tl.log(tl.exp(logit0 - top) + tl.exp(logit1 - top))
    score0 = (logit0 - top) - log_norm
    score1 = (logit1 - top) - log_norm
    tl.store(scores_ptr + tokens * 2, score0, mask=row_mask)
    tl.store(scores_ptr + tokens * 2 + 1, score1, mask=row_mask)
    tl.store(keep_ptr + tokens, score0 > score1, mask=row_mask)


PARAM_NAMES = (
    "norm_weight",
    "norm_bias",
    "in_weight",
    "in_bias",
    "out0_weight",
    "out0_bias",
    "out1_weight",
    "out1_bias",
    "out2_weight",
    "out2_bias",
)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_router_inputs(x: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    op = "router_scores"
    check_ndim(op, "x", x, 3, "(B, N, C)")
    check_float(op, "x", x)
    C = x.shape[-1]
    if C < 4 or C % 4 != 0:
        raise ValueError(f"{op}: the channel count C must be a positive multiple of 4, got C={C}")
    shapes = ((C,), (C,), (C, C), (C,), (C // 2, C), (C // 2,), (C // 4, C // 2), (C // 4,), (2, C // 4), (2,))
    param_dtype = params[0].dtype
    for name, t, shape in zip(PARAM_NAMES, params, shapes, strict=True):
        check_shape(op, name, t, shape)
        check_float(op, name, t)
        if t.dtype != param_dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as norm_weight ({param_dtype}), got {t.dtype}")
    if x.dtype != param_dtype and not (param_dtype == torch.float32 and x.dtype in LOW_PRECISION):
        raise TypeError(
            f"{op}: x must have the parameters' dtype ({param_dtype}), or be bfloat16/float16 "
            f"with float32 parameters, got {x.dtype}"
        )
    check_devices(op, x=x, **dict(zip(PARAM_NAMES, params)))


@on_input_device
def launch_router_scores(
    x: torch.Tensor, params: Sequence[torch.Tensor], eps: float, *, scores: torch.Tensor, keep: torch.Tensor
) -> None:
    """Run the router on ``x`` (B, N, C) with ``params`` in :data:`PARAM_NAMES` order into
    caller-provided ``scores`` (B, N, 2) float32 and ``keep`` (B, N) bool, both contiguous.
    Every element of both is written."""
    _check_router_inputs(x, params)
    B, N, C = x.shape
    for name, t, shape, dtype in (("scores", scores, (B, N, 2), torch.float32), ("keep", keep, (B, N), torch.bool)):
        check_shape("router_scores", name, t, shape)
        if t.dtype != dtype or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"router_scores: {name} must be a contiguous {dtype} tensor on {x.device}")
    if B == 0 or N == 0:
        return
    half = C // 2
    (
        norm_weight,
        norm_bias,
        in_weight,
        in_bias,
        out0_weight,
        out0_bias,
        out1_weight,
        out1_bias,
        out2_weight,
        out2_bias,
    ) = (t.contiguous() for t in params)

    # Low-precision tokens with fp32 parameters (the model's routers): the two C-wide
    # layers run on the tensor cores in the tokens' dtype, so their weights are rounded to
    # it; the statistics, the global mean, the narrow layers and the margins stay fp32.
    in_weight_dot, out0_weight_dot = in_weight.to(x.dtype), out0_weight.to(x.dtype)
    tile = hidden_tile(x.dtype)
    num_tiles = triton.cdiv(N, tile["BLOCK_M"])
    local = torch.empty((B, N, half), device=x.device, dtype=x.dtype)
    partial = torch.empty((B, num_tiles, half), device=x.device, dtype=torch.float32)
    _router_hidden_kernel[(num_tiles, B)](
        x,
        norm_weight,
        norm_bias,
        in_weight_dot,
        in_bias,
        local,
        partial,
        N,
        C,
        eps,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        **tile,
    )

    folded_bias = torch.empty((B, half), device=x.device, dtype=torch.float32)
    _router_fold_kernel[(triton.cdiv(half, FOLD_TILE["BLOCK_N"]), B)](
        partial,
        out0_weight,
        out0_bias,
        folded_bias,
        N,
        C,
        num_tiles,
        **FOLD_TILE,
    )

    _router_head_kernel[(triton.cdiv(N, HEAD_TILE["BLOCK_M"]), B)](
        local,
        folded_bias,
        out0_weight_dot,
        out1_weight,
        out1_bias,
        out2_weight,
        out2_bias,
        scores,
        keep,
        N,
        C,
        QUARTER_PAD=quarter_pad(C),
        **HEAD_TILE,
    )


@torch.library.custom_op("mematte::router_scores", mutates_args=())
def _router_scores_op(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    in_weight: torch.Tensor,
    in_bias: torch.Tensor,
    out0_weight: torch.Tensor,
    out0_bias: torch.Tensor,
    out1_weight: torch.Tensor,
    out1_bias: torch.Tensor,
    out2_weight: torch.Tensor,
    out2_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = (
        norm_weight,
        norm_bias,
        in_weight,
        in_bias,
        out0_weight,
        out0_bias,
        out1_weight,
        out1_bias,
        out2_weight,
        out2_bias,
    )
    scores = x.new_empty((*x.shape[:-1], 2), dtype=torch.float32)
    keep = x.new_empty(x.shape[:-1], dtype=torch.bool)
    launch_router_scores(x, params, eps, scores=scores, keep=keep)
    return scores, keep


@_router_scores_op.register_fake
def _(x, *params_and_eps):
    *params, _ = params_and_eps
    _check_router_inputs(x, tuple(params))
    B, N, _ = x.shape
    return x.new_empty((B, N, 2), dtype=torch.float32), x.new_empty((B, N), dtype=torch.bool)


def router_scores(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    in_weight: torch.Tensor,
    in_bias: torch.Tensor,
    out0_weight: torch.Tensor,
    out0_bias: torch.Tensor,
    out1_weight: torch.Tensor,
    out1_bias: torch.Tensor,
    out2_weight: torch.Tensor,
    out2_bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMatte's router on (B, N, C) tokens (C a multiple of 4), as
    :func:`mematte_kernels.reference.router_scores`: ``scores`` (B, N, 2) float32
    log-probabilities and ``keep`` (B, N) bool, ``scores[..., 0] > scores[..., 1]``.

    Runs in the parameters' dtype, except that bfloat16/float16 tokens given to float32
    parameters (the model keeps its routers in fp32) are not copied to fp32: the C-wide
    layers run in the tokens' dtype with fp32 statistics and accumulation, the rest in
    fp32 (as :func:`mematte_kernels.native.router_scores`). Other floating x is converted
    to the parameters' dtype."""
    mixed = norm_weight.dtype == torch.float32 and x.dtype in LOW_PRECISION
    if x.is_floating_point() and not mixed:
        x = x.to(norm_weight.dtype)
    return torch.ops.mematte.router_scores(
        x,
        norm_weight,
        norm_bias,
        in_weight,
        in_bias,
        out0_weight,
        out0_bias,
        out1_weight,
        out1_bias,
        out2_weight,
        out2_bias,
        eps,
    )
