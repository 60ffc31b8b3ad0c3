"""Fast paths built from PyTorch's own fused kernels and the compiled ops: the CPU backend's
routed path and decoder fusion, and the window attention of every non-reference backend.

Same contracts as :mod:`mematte_kernels.reference`; differences are in how the work is
done: no (N, C) temporary for the router's global half, fused scaled-dot-product attention
(flash attention on CPU and GPU) instead of an n×n matrix, and the fusion blocks' conv of
an upsampled map as a low-resolution GEMM plus a compiled resampling epilogue.

The router, the patch embedding, the LayerNorm and :func:`varlen_attention` are built from
differentiable PyTorch ops. The others are for inference: called where autograd would need
their backward they raise, naming themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ext, reference
from ._grad import refuse_grad

# Windows per SDPA call: bounds the (windows, heads, 196, 196) position bias (ViT-B fp32:
# 118 MB).
WINDOW_CHUNK = 64
# Row alignment (elements) of that bias: the GPU's memory-efficient SDPA kernel needs every
# stride of the mask but the last to be a multiple of its alignment, and pads a copy
# otherwise; 16 elements satisfies it for every dtype.
MASK_ALIGNMENT = 16


def router_scores(
    x, norm_weight, norm_bias, in_weight, in_bias, out0_weight, out0_bias, out1_weight, out1_bias, out2_weight, out2_bias,
    eps: float = 1e-5,
):  # fmt: skip
    """The router with its global half folded into a per-image bias of ``out_conv.0``:
    ``W·cat(local, g) + b = W[:, :C/2]·local + (W[:, C/2:]·g + b)``.

    In the parameters' precision (fp32) throughout, except that bf16/fp16 tokens keep their
    precision through the two C-wide layers (LayerNorm with fp32 statistics, ``in_conv`` and
    the local half of ``out_conv.0``), the GEMMs that dominate the router's cost; the global
    mean, the narrow layers and the log-probabilities whose margin decides are fp32."""
    B, N, C = x.shape
    half = C // 2
    low = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    x = x.to(low)
    h = F.layer_norm(x, (C,), norm_weight.to(low), norm_bias.to(low), eps)
    h = F.gelu(F.linear(h, in_weight.to(low), in_bias.to(low)))
    glob = h[..., half:].float().mean(dim=1)  # (B, C/2)
    w0 = out0_weight.float()
    bias = F.linear(glob, w0[:, half:], out0_bias.float())  # (B, C/2)
    z = F.gelu(F.linear(h[..., :half], out0_weight[:, :half].to(low)).float() + bias[:, None, :])
    z = F.gelu(F.linear(z, out1_weight.float(), out1_bias.float()))
    scores = F.log_softmax(F.linear(z, out2_weight.float(), out2_bias.float()), dim=-1)
    return scores, scores[..., 0] > scores[..., 1]


# oneDNN runs bf16 only on x86 CPUs with AVX-512 (or AVX2-VNNI-2); elsewhere PyTorch's own GEMM does.
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether :func:`linear` and :func:`linear_gelu` run ``dtype`` through oneDNN here."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and ONEDNN_BF16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear(x) as one oneDNN call with the bias applied to the GEMM's output tiles; PyTorch's
    CPU addmm first copies the bias into every output row, one more pass over the output.
    CPU tensors; dtypes oneDNN cannot run here go to ``F.linear``."""
    if not onednn_runs(x.dtype):
        return F.linear(x, weight, bias)
    refuse_grad("mematte_kernels.native.linear", x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(Linear(x)) as one oneDNN call: bias and exact GELU applied to the GEMM's output
    tiles while they are in cache, instead of two more passes over a 4C-wide activation."""
    if not onednn_runs(x.dtype):
        return F.gelu(F.linear(x, weight, bias))
    refuse_grad("mematte_kernels.native.linear_gelu", x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")


def varlen_attention_bf16(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """:func:`varlen_attention` through the extension's AVX512-BF16 kernel where it applies
    (bf16, head dim 64): PyTorch's CPU flash attention runs bf16 at its fp32 rate on CPUs
    without AMX; the kernel runs both products on the bf16 dot-product instruction."""
    if q.dtype != torch.bfloat16 or q.shape[-1] != 64:
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    refuse_grad("mematte_kernels.native.varlen_attention_bf16", q, k, v)
    return ext.varlen_attention(q, k, v, cu_seqlens, q.shape[-1] ** -0.5 if scale is None else scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Per-sequence fused attention over packed (T, heads, d) tensors; O(T) memory."""
    return _varlen_sdpa(q, k, v, cu_seqlens, scale, q.dtype)


def varlen_attention_fp32(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """:func:`varlen_attention` of bf16/fp16 tensors computed in fp32, a sequence at a time."""
    refuse_grad("mematte_kernels.native.varlen_attention_fp32", q, k, v)
    return _varlen_sdpa(q, k, v, cu_seqlens, scale, torch.float32)


def _varlen_sdpa(q, k, v, cu_seqlens, scale: float | None, compute: torch.dtype) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None].to(compute) for t in (q, k, v))  # (1, heads, n, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def channels_first_layer_norm(x, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of (B, C, H, W) as one fused kernel over the
    channels-last view (the backbone's tokens are channels-last, so this is no copy)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def window_attention(qkv, pad_qkv, rel_h, rel_w, num_heads: int, scale: float, window: int) -> torch.Tensor:
    """:func:`mematte_kernels.reference.window_attention` with fused attention per window
    (:func:`rel_pos_attention`)."""
    refuse_grad("mematte_kernels.native.window_attention", qkv, pad_qkv, rel_h, rel_w)
    return reference.attend_windows(rel_pos_attention, qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window)


def window_attention_bf16(qkv, pad_qkv, rel_h, rel_w, num_heads: int, scale: float, window: int) -> torch.Tensor:
    """:func:`window_attention` through the extension's AVX512-BF16 kernel where it applies
    (bf16, head dim 64, windows up to 16×16): it reads each window's tokens where they lie in
    the grid, takes the padding as ``pad_qkv`` keys, and computes the position bias per query,
    so neither the padded grid, the windows, nor an N×N bias is ever written."""
    refuse_grad("mematte_kernels.native.window_attention_bf16", qkv, pad_qkv, rel_h, rel_w)
    if qkv.dtype != torch.bfloat16 or qkv.shape[-1] != 3 * 64 * num_heads or window > 16:
        return window_attention(qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window)
    tables = [t.to(torch.bfloat16).contiguous() for t in (rel_h, rel_w)]
    return ext.window_attention(
        qkv.contiguous(), pad_qkv.to(torch.bfloat16).contiguous(), *tables, num_heads, scale, window
    )


def rel_pos_attention(q, k, v, rel_h, rel_w, scale: float) -> torch.Tensor:
    """Window attention with the decomposed relative position as an additive bias of fused
    attention, a chunk of windows at a time."""
    B, heads, N, d = q.shape
    H, W = rel_h.shape[0], rel_w.shape[0]
    out = torch.empty_like(q)
    # One bias buffer for all chunks, its rows padded to the alignment (196 -> 208 for
    # 14 x 14 windows) so that the N x N view SDPA reads needs no padded copy per chunk.
    row = -(-N // MASK_ALIGNMENT) * MASK_ALIGNMENT
    buffer = q.new_empty((min(B, WINDOW_CHUNK) * heads, N, row))
    for s in range(0, B, WINDOW_CHUNK):
        qc = q[s : s + WINDOW_CHUNK]
        r_q = qc.reshape(-1, H, W, d)
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h.to(q.dtype))
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w.to(q.dtype))
        bias = buffer[: r_q.shape[0], :, :N]  # (windows * heads, N, N), rows `row` apart
        torch.add(bias_h[:, :, :, :, None], bias_w[:, :, :, None, :], out=bias.view(-1, H, W, H, W))
        out[s : s + WINDOW_CHUNK] = F.scaled_dot_product_attention(
            qc,
            k[s : s + WINDOW_CHUNK],
            v[s : s + WINDOW_CHUNK],
            attn_mask=bias.view(qc.shape[0], heads, N, N),
            scale=scale,
        )
    return out


def upsample_conv_relu_bf16(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`upsample_conv_relu_` in one pass of the extension's AVX512-BF16 kernel where it
    applies (bf16, C a multiple of 16) and pays: the taps never leave the cache, which beats
    the GEMM for the shallow projections of the full- and half-resolution blocks (Cin 64,
    128) and ties or loses from Cin 256 on, where the GEMM runs at full rate."""
    refuse_grad("mematte_kernels.native.upsample_conv_relu_bf16", out, x, weight)
    C, Cin = weight.shape[:2]
    if out.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or C % 16 or Cin % 2 or Cin > 128:
        return upsample_conv_relu_(out, x, weight)
    ext.upsample_conv_relu_(out.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), weight)
    return out


def upsample_conv_relu_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out = relu(out + conv3x3(upsample2x(x), weight))`` with the channel mixing done before
    the upsampling, where it costs a quarter: one 1×1 conv of x onto the nine taps' weights,
    then ``mematte_ext.upsample_taps_relu_``. x and out channels-last (B, C, H, W) tensors."""
    refuse_grad("mematte_kernels.native.upsample_conv_relu_", out, x, weight)
    return _upsample_taps_relu_(out, x, weight, reference.conv2d)


def upsample_conv_relu_fp32(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`upsample_conv_relu_` of bf16/fp16 tensors with the taps' GEMM in fp32
    (:func:`conv2d_fp32`); the taps are kept, and the epilogue run, in the tensors' dtype."""
    refuse_grad("mematte_kernels.native.upsample_conv_relu_fp32", out, x, weight)
    return _upsample_taps_relu_(out, x, weight, conv2d_fp32)


def _upsample_taps_relu_(out, x, weight, conv) -> torch.Tensor:
    C, Cin = weight.shape[:2]
    tap_weight = weight.permute(2, 3, 0, 1).reshape(9 * C, Cin, 1, 1)
    taps = conv(x, tap_weight.contiguous(memory_format=torch.channels_last), None)
    ext.upsample_taps_relu_(out.permute(0, 2, 3, 1), taps.permute(0, 2, 3, 1))
    return out


# Logits per SDPA call of the global attention (heads x queries x keys): bounds the chunk's
# position bias, the only N-wide temporary (fp32: 128 MB).
GLOBAL_CHUNK_LOGITS = 32 << 20


def global_attention(qkv, rel_h, rel_w, num_heads: int, scale: float) -> torch.Tensor:
    """:func:`mematte_kernels.reference.global_attention` without the N×N matrix: a strip of
    query rows at a time, its position terms as per-query tables (H + W values per query and
    head) and then its bias, through fused attention; memory O(N) plus a bounded strip."""
    refuse_grad("mematte_kernels.native.global_attention", qkv, rel_h, rel_w)
    return _global_sdpa(qkv, rel_h, rel_w, num_heads, scale, qkv.dtype)


def _global_sdpa(qkv, rel_h, rel_w, num_heads: int, scale: float, compute: torch.dtype) -> torch.Tensor:
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    N, d = H * W, C // num_heads
    grid = qkv.reshape(B, H, W, 3, num_heads, d)
    rel_h, rel_w = rel_h.to(compute), rel_w.to(compute)
    out = qkv.new_empty((B, H, W, num_heads, d))
    rows = max(1, min(H, GLOBAL_CHUNK_LOGITS // max(1, num_heads * N * W)))
    # One buffer for every strip's bias: a fresh allocation of this size is new pages from
    # the OS each time, and faulting them in costs more than writing the bias.
    bias_storage = qkv.new_empty(num_heads * rows * W * N, dtype=compute)
    for b in range(B):
        k, v = (
            grid[b, :, :, i].reshape(N, num_heads, d).transpose(0, 1).to(compute).contiguous()[None] for i in (1, 2)
        )
        for top in range(0, H, rows):
            q = grid[b, top : top + rows, :, 0].to(compute)  # (r, W, heads, d)
            r = q.shape[0]
            # The strip's per-query position terms (as reference.rel_pos_bias), then its bias.
            bias_h = torch.einsum("yxnc,ykc->nyxk", q, rel_h[top : top + r])  # (heads, r, W, H)
            bias_w = torch.einsum("yxnc,xkc->nyxk", q, rel_w)  # (heads, r, W, W)
            bias = bias_storage[: num_heads * r * W * N].view(num_heads, r, W, H, W)
            torch.add(bias_h[..., None], bias_w[..., None, :], out=bias)
            o = F.scaled_dot_product_attention(
                q.reshape(r * W, num_heads, d).transpose(0, 1)[None],
                k,
                v,
                attn_mask=bias.view(1, num_heads, r * W, N),
                scale=scale,
            )  # (1, heads, rW, d)
            out[b, top : top + r] = o[0].transpose(0, 1).reshape(r, W, num_heads, d)
    return out.view(B, H, W, C)


def global_attention_bf16(qkv, rel_h, rel_w, num_heads: int, scale: float) -> torch.Tensor:
    """:func:`global_attention` through the extension's AVX512-BF16 kernel where it applies
    (bf16, head dim 64, an extension that has the op): q, k, v read in place from ``qkv``,
    each query block's position terms computed in fp32 by the kernel."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    if qkv.dtype != torch.bfloat16 or C != 64 * num_heads or not ext.has_kernel("relpos_attention", qkv.device):
        return global_attention(qkv, rel_h, rel_w, num_heads, scale)
    if B == 0 or H * W == 0:
        return qkv.new_empty((B, H, W, C))
    q, k, v = qkv.contiguous().view(B, H * W, 3, num_heads, 64).unbind(2)
    return ext.relpos_attention(q, k, v, rel_h.float().contiguous(), rel_w.float().contiguous(), scale).view(B, H, W, C)


def global_attention_avx2(qkv, rel_h, rel_w, num_heads: int, scale: float) -> torch.Tensor:
    """:func:`global_attention` through the extension's AVX2 + FMA kernel where it applies
    (head dim 64, an extension that has the op): flash-style, each query's position terms
    gathered inside the key loop, computed in fp32 for fp32, bf16 and fp16 tensors."""
    B, H, W, C3 = qkv.shape
    if C3 != 3 * 64 * num_heads or qkv.device.type != "cpu" or not ext.cpu_avx2_kernels():
        return global_attention(qkv, rel_h, rel_w, num_heads, scale)
    refuse_grad("mematte_kernels.native.global_attention_avx2", qkv, rel_h, rel_w)
    return ext.global_attention(
        qkv.contiguous(), rel_h.float().contiguous(), rel_w.float().contiguous(), num_heads, scale
    )


# ------------------------------------------------------ bf16/fp16 computed in fp32
#
# Where the CPU has no bf16 dot-product instructions (no AVX512-BF16, no AMX), torch emulates
# bf16 GEMMs and convolutions, several times slower than the same work in fp32. These run
# low-precision tensors' products in fp32 and round the result once; the selection
# (:mod:`mematte_kernels.selection`) picks them only where they measure faster. Their fp32
# copies are made a bounded chunk at a time, so a low-precision model keeps its peak memory.

FP32_CHUNK_BYTES = 8 << 20


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`linear` of bf16/fp16 tensors computed in fp32, a chunk of rows at a time."""
    refuse_grad("mematte_kernels.native.linear_fp32", x, weight, bias)
    return _rows_in_fp32(linear, x, weight, bias)


def linear_gelu_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`linear_gelu` of bf16/fp16 tensors computed in fp32, a chunk of rows at a time."""
    refuse_grad("mematte_kernels.native.linear_gelu_fp32", x, weight, bias)
    return _rows_in_fp32(linear_gelu, x, weight, bias)


def _rows_in_fp32(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    K, N = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, K)
    out = x.new_empty((rows.shape[0], N))
    weight, bias = weight.float(), bias.float()
    step = max(1, FP32_CHUNK_BYTES // (4 * (K + N)))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = fn(rows[start : start + step].float(), weight, bias)
    return out.view(*x.shape[:-1], N)


def conv2d_fp32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """:func:`mematte_kernels.reference.conv2d` of bf16/fp16 tensors computed in fp32, a band
    of output rows at a time: each band reads its input rows plus the kernel's halo, zero
    rows standing in for the padding at the image's top and bottom."""
    refuse_grad("mematte_kernels.native.conv2d_fp32", x, weight, bias)
    B, Cin, H, W = x.shape
    C, _, kh, kw = weight.shape
    out_h = (H + 2 * padding - kh) // stride + 1
    out_w = (W + 2 * padding - kw) // stride + 1
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((B, C, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=layout)
    weight = weight.float()
    bias = None if bias is None else bias.float()
    band = max(1, FP32_CHUNK_BYTES // max(1, 4 * B * (out_w * C + stride * W * Cin)))
    for top in range(0, out_h, band):
        bottom = min(top + band, out_h)
        first, last = top * stride - padding, (bottom - 1) * stride - padding + kh  # input rows [first, last)
        rows = x[:, :, max(first, 0) : min(last, H)].float()
        if first < 0 or last > H:
            rows = F.pad(rows, (0, 0, max(-first, 0), max(last - H, 0)))
        out[:, :, top:bottom] = F.conv2d(rows, weight, bias, stride=stride, padding=(0, padding))
    return out


def router_scores_fp32(x, *params):
    """:func:`router_scores` of bf16/fp16 tokens computed in fp32 (same arguments)."""
    refuse_grad("mematte_kernels.native.router_scores_fp32", x)
    return router_scores(x.float(), *params)


def patch_embed_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`mematte_kernels.reference.patch_embed` of a bf16/fp16 image computed in fp32, a
    band of patch rows at a time."""
    refuse_grad("mematte_kernels.native.patch_embed_fp32", x, weight, bias)
    B, Cin, H, W = x.shape
    p, C = weight.shape[-1], weight.shape[0]
    out = x.new_empty((B, H // p, W // p, C))
    weight, bias = weight.float(), bias.float()
    band = max(1, FP32_CHUNK_BYTES // max(1, 4 * B * W * (Cin * p + C)))
    for row in range(0, H // p, band):
        out[:, row : row + band] = reference.patch_embed(x[:, :, row * p : (row + band) * p].float(), weight, bias)
    return out


def window_attention_fp32(qkv, pad_qkv, rel_h, rel_w, num_heads: int, scale: float, window: int) -> torch.Tensor:
    """:func:`window_attention` of bf16/fp16 tensors computed in fp32, a strip of whole
    window rows at a time (windows start at the grid's top-left corner, so such strips hold
    whole windows and the padding stays where it was)."""
    refuse_grad("mematte_kernels.native.window_attention_fp32", qkv, pad_qkv, rel_h, rel_w)
    B, H, W, C3 = qkv.shape
    out = qkv.new_empty((B, H, W, C3 // 3))
    tables = pad_qkv.float(), rel_h.float(), rel_w.float()
    rows = max(1, FP32_CHUNK_BYTES // max(1, 4 * B * W * C3 * window)) * window
    for top in range(0, H, rows):
        out[:, top : top + rows] = window_attention(qkv[:, top : top + rows].float(), *tables, num_heads, scale, window)
    return out


def global_attention_fp32(qkv, rel_h, rel_w, num_heads: int, scale: float) -> torch.Tensor:
    """:func:`global_attention` of bf16/fp16 tensors computed in fp32: keys and values
    converted once, queries a strip at a time."""
    refuse_grad("mematte_kernels.native.global_attention_fp32", qkv, rel_h, rel_w)
    return _global_sdpa(qkv, rel_h, rel_w, num_heads, scale, torch.float32)


# Queries per chunk of the CPU policy attention: bounds its (B, heads, chunk, N) fp32 tiles
# (ViT-S, B 2, N 18,500: 0.2 GB each) where the reference holds several N x N matrices.
POLICY_CHUNK = 256


class _PolicyAttention(torch.autograd.Function):
    """:func:`mematte_kernels.reference.policy_attention` a chunk of queries at a time, with
    the Triton kernels' formulation (module docstring of
    :mod:`mematte_kernels.triton.policy_attention`): the forward keeps the row max, its key
    and the denominator; the backward recomputes each chunk's logits from them."""

    @staticmethod
    def forward(ctx, q, k, v, policy, scale, eps):
        B, N, heads, d = q.shape
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, heads, N, d) fp32
        p = policy.float()[:, None, None, :]  # (B, 1, 1, N)
        vsum = vh.sum(dim=2, keepdim=True)  # (B, heads, 1, d)
        out = torch.empty_like(qh)
        row_max = qh.new_empty((B, heads, N))
        row_argmax = torch.empty((B, heads, N), dtype=torch.long, device=q.device)
        denom = qh.new_empty((B, heads, N))
        for start in range(0, N, POLICY_CHUNK):
            rows = slice(start, min(start + POLICY_CHUNK, N))
            logits = (qh[:, :, rows] @ kh.transpose(-2, -1)) * scale  # (B, heads, c, N)
            m, arg = logits.max(dim=-1, keepdim=True)
            a = (logits - m).exp_().mul_(_keep(p, rows, N))
            D = a.sum(dim=-1, keepdim=True) + eps
            out[:, :, rows] = (a @ vh + (eps / N) * vsum) / D
            row_max[:, :, rows], row_argmax[:, :, rows], denom[:, :, rows] = m[..., 0], arg[..., 0], D[..., 0]
        # delta = dout . out must come from the fp32 output: with a rounded one it misses the
        # dA[i, i] it cancels against, and where a query keeps mostly itself (a zero policy)
        # dq and dk are that small difference.
        out = out.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, policy, out, row_max, row_argmax, denom)
        ctx.scale, ctx.eps = scale, eps
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, policy, out, row_max, row_argmax, denom = ctx.saved_tensors
        scale, eps = ctx.scale, ctx.eps
        B, N, heads, d = q.shape
        qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))  # out: fp32
        p = policy.float()[:, None, None, :]
        vsum = vh.sum(dim=2, keepdim=True)
        delta = (oh * doh).sum(-1)  # (B, heads, N)
        dmax = -(eps / denom) * (delta - (doh * vsum).sum(-1) / N)  # through the row max
        dq, dk, dv = torch.empty_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        dpolicy = torch.zeros_like(p[:, 0, 0])  # (B, N)
        for start in range(0, N, POLICY_CHUNK):
            rows = slice(start, min(start + POLICY_CHUNK, N))
            logits = (qh[:, :, rows] @ kh.transpose(-2, -1)) * scale
            e = (logits - row_max[:, :, rows, None]).exp_()  # (B, heads, c, N)
            keep = _keep(p, rows, N)
            D = denom[:, :, rows, None]
            dv += (e * keep / D).transpose(-2, -1) @ doh[:, :, rows]
            g = e.mul_((doh[:, :, rows] @ vh.transpose(-2, -1)).sub_(delta[:, :, rows, None])).div_(D)
            dpolicy += g.sum(dim=(1, 2))
            dpolicy[:, rows] -= _diagonal(g, rows).sum(dim=1)  # keep[i, i] does not depend on p_i
            dlogits = g.mul_(keep)
            dlogits.scatter_add_(-1, row_argmax[:, :, rows, None], dmax[:, :, rows, None])
            dq[:, :, rows] = dlogits @ kh * scale
            dk += dlogits.transpose(-2, -1) @ qh[:, :, rows] * scale
        dv += (eps / N) * (doh / denom[..., None]).sum(dim=2, keepdim=True)
        grads = (t.transpose(1, 2).to(q.dtype) for t in (dq, dk, dv))
        return (*grads, dpolicy.to(policy.dtype), None, None)


def _keep(p: torch.Tensor, rows: slice, N: int) -> torch.Tensor:
    """keep[i, j] = p_j + (1 - p_j) [i == j] for the queries ``rows``: (B, 1, c, N)."""
    keep = p.expand(-1, -1, rows.stop - rows.start, -1).clone()
    index = torch.arange(rows.start, rows.stop, device=p.device)
    keep[:, :, index - rows.start, index] = 1.0
    return keep


def _diagonal(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """t[..., i, i] for the queries ``rows`` of a (B, heads, c, N) chunk: (B, heads, c)."""
    index = torch.arange(rows.start, rows.stop, device=t.device)
    return t[:, :, index - rows.start, index]


def policy_attention(q, k, v, policy, scale: float | None = None, eps: float = 1e-6) -> torch.Tensor:
    """:func:`mematte_kernels.reference.policy_attention` in query chunks, fp32 inside:
    O(chunk x N) memory in the forward and the backward instead of several N x N matrices."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _PolicyAttention.apply(q, k, v, policy, scale, eps)
