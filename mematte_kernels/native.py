"""Fast paths built from PyTorch's own fused kernels: the CPU backend's routed path, and
the window attention of every non-reference backend.

Same contracts as :mod:`mematte_kernels.reference`; differences are in how the work is
done: no (N, C) temporary for the router's global half, and fused scaled-dot-product
attention (flash attention on CPU and GPU) instead of an n×n matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Windows per SDPA call: bounds the (windows, heads, 196, 196) position bias (ViT-B fp32:
# 118 MB).
WINDOW_CHUNK = 64


def router_scores(
    x, norm_weight, norm_bias, in_weight, in_bias, out0_weight, out0_bias, out1_weight, out1_bias, out2_weight, out2_bias,
    eps: float = 1e-5,
):  # fmt: skip
    """The router with its global half folded into a per-image bias of ``out_conv.0``:
    ``W·cat(local, g) + b = W[:, :C/2]·local + (W[:, C/2:]·g + b)``. Runs in fp32."""
    B, N, C = x.shape
    half = C // 2
    x = x.float()
    h = F.gelu(F.linear(F.layer_norm(x, (C,), norm_weight.float(), norm_bias.float(), eps), in_weight.float(), in_bias.float()))
    glob = h[..., half:].mean(dim=1)  # (B, C/2)
    w0 = out0_weight.float()
    bias = F.linear(glob, w0[:, half:], out0_bias.float())  # (B, C/2)
    z = F.gelu(F.linear(h[..., :half], w0[:, :half]) + bias[:, None, :])
    z = F.gelu(F.linear(z, out1_weight.float(), out1_bias.float()))
    scores = F.log_softmax(F.linear(z, out2_weight.float(), out2_bias.float()), dim=-1)
    return scores, scores[..., 0] > scores[..., 1]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Per-sequence fused attention over packed (T, heads, d) tensors; O(T) memory."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def channels_first_layer_norm(x, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of (B, C, H, W) as one fused kernel over the
    channels-last view (the backbone's tokens are channels-last, so this is no copy)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def rel_pos_attention(q, k, v, rel_h, rel_w, scale: float) -> torch.Tensor:
    """Window attention with the decomposed relative position as an additive bias of fused
    attention, a chunk of windows at a time."""
    B, heads, N, d = q.shape
    H, W = rel_h.shape[0], rel_w.shape[0]
    out = torch.empty_like(q)
    for s in range(0, B, WINDOW_CHUNK):
        qc = q[s : s + WINDOW_CHUNK]
        r_q = qc.reshape(-1, H, W, d)
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h.to(q.dtype))
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w.to(q.dtype))
        # Written straight into a contiguous (.., H, W, H, W) buffer so that viewing it as
        # (.., N, N) costs no copy.
        bias = q.new_empty((r_q.shape[0], H, W, H, W))
        torch.add(bias_h[:, :, :, :, None], bias_w[:, :, :, None, :], out=bias)
        out[s : s + WINDOW_CHUNK] = F.scaled_dot_product_attention(
            qc, k[s : s + WINDOW_CHUNK], v[s : s + WINDOW_CHUNK], attn_mask=bias.view(qc.shape[0], heads, N, N), scale=scale
        )
    return out
