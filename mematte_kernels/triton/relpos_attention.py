"""Forward flash attention over a whole H×W token grid with decomposed relative position:
ViTMatte's global attention.

    out[i] = softmax_j(scale * q[i]·k[j] + bias_h[i, row(j)] + bias_w[i, col(j)]) v[j]

q, k, v are (B, N, heads, d), N = H*W in row-major order, possibly strided views of the
(B, N, 3, heads, d) qkv projection (the head dimension contiguous; d up to 128, held in
BLOCK_D lanes, the next power of two). The position terms come as per-query tables for the
queries of one launch, bias_h (B, n, heads, H) and bias_w (B, n, heads, W): H + W values per
query, gathered inside the tile loop for each key's row and column; no N×N matrix (logits or
bias) ever exists. :func:`global_attention` launches a strip of grid rows at a time with the
tables of that strip alone, as the CPU path does, so the tables stay within STRIP_TABLE_BYTES
at any image size (whole-grid ones would take 3.3 GB each at 8K in fp32).

One program computes BLOCK_M queries of one (image, head) with the attention kernels' shared
online-softmax loop (:func:`._attention.attend_keys`), the position terms added per key
block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import native, reference
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

# The position tables of one launch (both, in q's dtype) take at most this much, or one grid
# row's worth where a row alone takes more.
STRIP_TABLE_BYTES = 64 << 20

# The interpreter's blocks are smaller than the tests' grids, so they cross grid rows and
# leave partial blocks.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)


# The query and key counts, the grid width and the tables' strides follow the image size:
# not specialised, one compilation for all sizes.
@attention_kernel(
    "forward",
    do_not_specialize=["num_queries", "N", "grid_w", *(f"stride_{t}{d}" for t in "hw" for d in "bnh")],
    interpreter_config=INTERPRETER_CONFIG,
)
def _relpos_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_h_ptr,
    bias_w_ptr,
    out_ptr,
    num_queries,
    N,
    grid_w,
    num_heads,
    qk_scale,
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
    stride_hb,
    stride_hn,
    stride_hh,
    stride_wb,
    stride_wn,
    stride_wh,
    stride_ob,
    stride_on,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Queries: the num_queries rows of q, out and the tables (a strip of the grid); keys: all N.
    pid_m = tl.program_id(0)
    batch, head, seq_start, _ = program_sequence(None, N, num_heads)
    offs_query = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    query_mask = offs_query < num_queries
    q_base = sequence_base(q_ptr, batch, head, seq_start, stride_qb, stride_qn, stride_qh)
    q = load_rows(q_base, offs_query, stride_qn, query_mask, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    # Each query's row of the two position tables: (BLOCK_M,) pointers.
    bias_h_rows = sequence_base(bias_h_ptr, batch, head, seq_start, stride_hb, stride_hn, stride_hh)
    bias_h_rows += offs_query.to(tl.int64) * stride_hn
    bias_w_rows = sequence_base(bias_w_ptr, batch, head, seq_start, stride_wb, stride_wn, stride_wh)
    bias_w_rows += offs_query.to(tl.int64) * stride_wn

    keys = (
        sequence_base(k_ptr, batch, head, seq_start, stride_kb, stride_kn, stride_kh),
        sequence_base(v_ptr, batch, head, seq_start, stride_vb, stride_vn, stride_vh),
        stride_kn,
        stride_vn,
        N,
    )
    bias = (bias_h_rows, bias_w_rows, grid_w)
    acc, _, row_sum, _ = attend_keys(
        (q, offs_query, query_mask),
        keys,
        qk_scale,
        policy=None,
        bias=bias,
        HEAD_DIM=HEAD_DIM,
        BLOCK_D=BLOCK_D,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        ACCUMULATE=True,
    )
    out_base = sequence_base(out_ptr, batch, head, seq_start, stride_ob, stride_on, stride_oh)
    store_rows(out_base, offs_query, stride_on, query_mask, acc / row_sum[:, None], HEAD_DIM, BLOCK_D)


def _check_inputs(q, k, v, bias_h, bias_w, out=None) -> None:
    """q (B, n, heads, d) queries and their tables bias_h (B, n, heads, H), bias_w (B, n, heads,
    W); k, v (B, N, heads, d) with N = H * W keys; ``out`` the queries' output."""
    op = "relpos_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(op, name, t, 4, "(B, N, heads, head_dim)")
    # The head-dimension, dtype and stride checks of q, k, v; then q's rows may be fewer.
    check_qkv(op, q[:, :0], k[:, :0], v[:, :0], 4, "(B, N, heads, head_dim)")
    B, N, heads, head_dim = k.shape
    n = q.shape[1]
    if k.shape != v.shape or n > N:
        raise ValueError(
            f"{op}: k and v must have one shape (B, N, heads, head_dim) and q at most N rows, "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    for name, t in (("bias_h", bias_h), ("bias_w", bias_w)):
        check_ndim(op, name, t, 4, "(B, n, heads, H or W)")
        check_float(op, name, t, q.dtype)
        if tuple(t.shape[:3]) != (B, n, heads) or t.stride(-1) != 1:
            raise ValueError(
                f"{op}: {name} must be ({B}, {n}, {heads}, H or W) with a contiguous last dimension, "
                f"got shape {tuple(t.shape)} strides {t.stride()}"
            )
    if bias_h.shape[-1] * bias_w.shape[-1] != N:
        raise ValueError(
            f"{op}: the grid is {bias_h.shape[-1]}×{bias_w.shape[-1]} (from bias_h, bias_w) "
            f"but k holds {N} tokens per image"
        )
    check_devices(op, q=q, k=k, v=v, bias_h=bias_h, bias_w=bias_w)


@on_input_device
def launch_relpos_attention(q, k, v, bias_h, bias_w, scale: float | None = None, *, out: torch.Tensor) -> None:
    """The attention of queries q (B, n, heads, d), with their position tables, to the N keys
    of the grid (k, v (B, N, heads, d)) into ``out`` (q's shape and dtype). n may be N (the
    whole grid) or a run of consecutive queries (a strip of grid rows)."""
    _check_inputs(q, k, v, bias_h, bias_w)
    check_attention_out("relpos_attention", out, q)
    B, n, heads, head_dim = q.shape
    N = k.shape[1]
    if B == 0 or n == 0 or heads == 0 or head_dim == 0:
        return
    scale = softmax_scale(scale, head_dim)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), B * heads)

    _relpos_attention_kernel[grid](
        q,
        k,
        v,
        bias_h,
        bias_w,
        out,
        n,
        N,
        bias_w.shape[-1],
        heads,
        base2_scale(scale),
        length_bucket(N),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *bias_h.stride()[:3],
        *bias_w.stride()[:3],
        *out.stride()[:3],
        HEAD_DIM=head_dim,
        BLOCK_D=head_block(head_dim),
    )


@torch.library.custom_op("mematte::relpos_attention", mutates_args=())
def _relpos_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_h: torch.Tensor,
    bias_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    out = q.new_empty(q.shape)
    launch_relpos_attention(q, k, v, bias_h, bias_w, scale, out=out)
    return out


@_relpos_attention_op.register_fake
def _(q, k, v, bias_h, bias_w, scale=None):
    _check_inputs(q, k, v, bias_h, bias_w)
    return q.new_empty(q.shape)


def relpos_attention(q, k, v, bias_h, bias_w, scale: float | None = None) -> torch.Tensor:
    """:func:`mematte_kernels.reference.relpos_attention` without the N×N matrix: q, k, v
    (B, N, heads, d), bias_h (B, N, heads, H), bias_w (B, N, heads, W), all one dtype ->
    (B, N, heads, d) contiguous. ``scale`` defaults to head_dim ** -0.5."""
    return torch.ops.mematte.relpos_attention(q, k, v, bias_h, bias_w, scale)


def strip_rows(B: int, H: int, W: int, heads: int, dtype: torch.dtype) -> int:
    """Grid rows per launch of :func:`global_attention`: as many as keep both position tables
    within STRIP_TABLE_BYTES, at least one."""
    row_bytes = B * W * heads * (H + W) * torch.finfo(dtype).bits // 8
    return max(1, min(H, STRIP_TABLE_BYTES // max(row_bytes, 1)))


def global_attention(qkv, rel_h, rel_w, num_heads: int, scale: float) -> torch.Tensor:
    """:func:`mematte_kernels.reference.global_attention` through the flash kernel, a strip of
    grid rows at a time: the strip's position tables from one batched product each, then the
    kernel over the strip's queries and every key, q, k, v read in place from ``qkv``
    (B, H, W, 3C) -> (B, H, W, C). Head dimensions past MAX_HEAD_DIM run PyTorch's fused
    attention, a strip at a time."""
    check_ndim("global_attention", "qkv", qkv, 4, "(B, H, W, 3C)")
    B, H, W, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(
            f"global_attention: qkv's last dimension ({C3}) must be 3 * C with C a multiple of num_heads ({num_heads})"
        )
    C = C3 // 3
    d = C // num_heads
    if d > MAX_HEAD_DIM:
        return native.global_attention(qkv, rel_h, rel_w, num_heads, scale)
    q, k, v = qkv.reshape(B, H * W, 3, num_heads, d).unbind(2)
    out = qkv.new_empty((B, H, W, C))
    rows = strip_rows(B, H, W, num_heads, qkv.dtype)
    for top in range(0, H, rows):
        bottom = min(top + rows, H)
        strip = slice(top * W, bottom * W)
        bias_h, bias_w = reference.rel_pos_bias(
            q[:, strip].reshape(B, bottom - top, W, num_heads, d), rel_h[top:bottom], rel_w
        )
        out[:, top:bottom] = relpos_attention(q[:, strip], k, v, bias_h, bias_w, scale).view(B, bottom - top, W, C)
    return out
