"""Plain PyTorch references for every op in :mod:`mematte_kernels`.

Each function here is the oracle its kernel is tested and benchmarked against, and the
``reference`` backend of the model runs exactly these. They follow the published MEMatte
computation step by step and favour being obviously right over being fast.

Shapes follow the model: tokens are channels-last, (B, N, C) or (B, H, W, C); packed
(varlen) tensors follow flash-attention's convention: (T, heads, head_dim) with
``cu_seqlens`` (B + 1,) int32 and ``max_seqlen``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- router


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
    """MEMatte's router on (B, N, C) tokens, in the parameters' precision (tokens of a
    lower precision are converted).

    Returns ``scores`` (B, N, 2) float32 log-probabilities and ``keep`` (B, N) bool: a
    token goes to global attention iff ``scores[..., 0] > scores[..., 1]``.
    """
    x = x.to(norm_weight.dtype)
    B, N, C = x.shape
    if N == 0:
        return x.new_empty((B, 0, 2), dtype=torch.float32), x.new_empty((B, 0), dtype=torch.bool)
    h = F.gelu(F.linear(F.layer_norm(x, (C,), norm_weight, norm_bias, eps), in_weight, in_bias))
    local = h[..., : C // 2]
    glob = h[..., C // 2 :].mean(dim=1, keepdim=True)
    z = torch.cat([local, glob.expand(B, N, C // 2)], dim=-1)
    z = F.gelu(F.linear(z, out0_weight, out0_bias))
    z = F.gelu(F.linear(z, out1_weight, out1_bias))
    scores = F.log_softmax(F.linear(z, out2_weight, out2_bias), dim=-1).float()
    return scores, scores[..., 0] > scores[..., 1]


def cap_tokens(keep: torch.Tensor, scores: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """Keep at most ``max_tokens`` of the kept tokens per image: those with the largest
    margin ``scores[..., 0] - scores[..., 1]``. Images under the cap come back unchanged.

    Computed for every image on the device, without asking the host which images are over
    the cap (that would cost a host sync per routed block)."""
    N = keep.shape[1]
    if max_tokens is None or max_tokens >= N:
        return keep
    margin = (scores[..., 0] - scores[..., 1]).masked_fill(~keep, float("-inf"))
    top = margin.topk(max_tokens, dim=1).indices  # (B, max_tokens)
    return torch.zeros_like(keep).scatter_(1, top, True) & keep


# ----------------------------------------------------------------- gather / scatter


def token_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """From ``keep`` (B, N) bool: flat indices (T,) int64 into the (B*N) rows, in image
    then token order; ``cu_seqlens`` (B + 1,) int32; and the longest sequence.

    The per-image counts come to the host once (one host sync): they size the packed
    buffers and give ``max_seqlen``; the index is then found with that size known."""
    counts = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    per_image = counts.tolist()
    index = torch.nonzero_static(keep.flatten(), size=sum(per_image)).flatten()
    return index, cu_seqlens, max(per_image, default=0)


def gather_layernorm(
    x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Rows ``index`` of ``x`` (M, C), each LayerNorm-ed: (T, C) in x's dtype."""
    return F.layer_norm(x[index], (x.shape[-1],), weight, bias, eps)


def scatter_residual_(out: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """In place: ``out[index] = residual[index] + rows`` for ``out``/``residual`` (M, C)
    and ``rows`` (T, C). ``index`` holds distinct rows (as :func:`token_index` gives); the
    other rows of ``out`` are left as they are."""
    out[index] = residual[index] + rows


# ---------------------------------------------------------------- routed attention


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence: q, k, v (T, heads, d) -> (T, heads, d).

    Sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``, and the sequences cover all T
    rows (``cu_seqlens[-1] == T``); no token attends across sequences. Computed as upstream
    does: ``softmax((q * scale) @ k^T) @ v`` per sequence.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
        attn = ((qs * scale) @ ks.transpose(-2, -1)).softmax(dim=-1)
        out[start:end] = (attn @ vs).transpose(0, 1)
    return out


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Policy-masked attention over all N tokens, as MEMatte trains its routed blocks
    (DynamicViT's ``softmax_with_policy``): q, k, v (B, N, heads, d), policy (B, N) float in
    [0, 1] -> (B, N, heads, d).

    Logits ``l = (q * scale) @ k^T``; query i keeps key j with weight
    ``keep[i, j] = p_j + (1 - p_j) * [i == j]`` (a query always keeps itself);
    ``a = exp(l - max_j l) * keep`` with the max over all keys, masked ones included;
    ``A = (a + eps / N) / (sum_j a + eps)``. exp and normalisation run in (at least) fp32 and A is cast
    back to the logits' dtype before ``A @ v``. Differentiable in q, k, v and policy.
    """
    B, N, heads, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    logits = (qh * scale) @ kh.transpose(-2, -1)  # (B, heads, N, N)
    compute = torch.promote_types(logits.dtype, torch.float32)
    p = policy.reshape(B, 1, 1, N).to(compute)
    eye = torch.eye(N, dtype=compute, device=q.device).view(1, 1, N, N)
    keep = p + (1.0 - p) * eye
    # torch.max, not amax: upstream's gradient through the max goes to one key per row.
    row_max = torch.max(logits, dim=-1, keepdim=True)[0]
    a = (logits - row_max).to(compute).exp() * keep
    attn = (a + eps / N) / (a.sum(dim=-1, keepdim=True) + eps)
    return (attn.to(logits.dtype) @ vh).transpose(1, 2)


# ------------------------------------------------------------------ dense layers


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The ViT's patch embedding, Conv2d(Cin, C, p, stride p): (B, Cin, H, W) -> channels-last
    tokens (B, H/p, W/p, C), contiguous.

    Computed as what that conv is, one GEMM of the flattened p x p patches with the flattened
    kernel, not through conv2d: torch 2.14's oneDNN bf16 conv2d on Intel CPUs with AMX
    returns wrong numbers for 4 (or 8) input channels and a 16 x 16 stride-16 kernel (mean
    error 0.8 on outputs of scale 4), and convolution libraries run this shape slowly anyway.
    """
    B, Cin, H, W = x.shape
    p = weight.shape[-1]
    patches = x.reshape(B, Cin, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, Cin * p * p)
    return F.linear(patches, weight.reshape(weight.shape[0], -1), bias)


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """Conv2d(x): the ResBottlenecks' and the decoder's convolutions (square stride and
    padding, no dilation or groups)."""
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear(x): the backbone's projections (qkv, proj, fc2)."""
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(Linear(x)), exact (erf) GELU: the first layer of the MLP and of the LTRM."""
    return F.gelu(F.linear(x, weight, bias))


# ------------------------------------------------------------------------- LTRM ops


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 conv (padding 2) + bias + exact GELU on channels-last (B, H, W, C)."""
    C = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2, groups=C)
    return F.gelu(y).permute(0, 2, 3, 1).contiguous()


def eca(z: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Efficient channel attention on (B, H, W, C): ``z + z * sigmoid(conv1d(mean_hw(z)))``,
    plus ``residual`` when given. ``weight`` is the (1, 1, k) Conv1d kernel (no bias)."""
    B, H, W, C = z.shape
    m = z.mean(dim=(1, 2))  # (B, C)
    s = torch.sigmoid(F.conv1d(m[:, None, :], weight, padding=(weight.shape[-1] - 1) // 2))[:, 0]
    out = z + z * s[:, None, None, :]
    return out if residual is None else out + residual


# ---------------------------------------------------------- ResBottleneck norms


def channels_first_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channel axis of (B, C, H, W), written out as upstream does;
    statistics in at least fp32."""
    dtype = x.dtype
    stats = torch.promote_types(dtype, torch.float32)
    x = x.to(stats)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return (weight[:, None, None].to(stats) * x + bias[:, None, None].to(stats)).to(dtype)


# ------------------------------------------------------------ decoder fusion


def upsample_conv_relu_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The upsampled half of a decoder fusion block, added into ``out`` in place:
    ``out = relu(out + conv3x3(upsample2x(x), weight))`` with bilinear ×2 upsampling
    (align_corners=False) and zero padding 1, no bias. x (B, Cin, h, w); weight (C, Cin, 3, 3);
    out (B, C, 2h, 2w). Returns ``out``."""
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return out.add_(F.conv2d(up, weight, padding=1)).relu_()


def upsample_taps_relu_(out: torch.Tensor, taps: torch.Tensor) -> None:
    """:func:`upsample_conv_relu_` from the conv's taps applied at low resolution, on
    channels-last tensors: out (B, 2h, 2w, C), taps (B, h, w, 9C) with
    ``taps[..., (3 * ky + kx) * C + c] = (weight[:, :, ky, kx] @ x)[c]``.

    Upsampling and channel mixing commute, so the conv of the upsampled input is the sum,
    over taps, of each upsampled tap map shifted by the tap's offset (zero outside)."""
    B, H, W, C = out.shape
    compute = torch.promote_types(out.dtype, torch.float32)
    up = F.interpolate(taps.permute(0, 3, 1, 2).to(compute), scale_factor=2, mode="bilinear", align_corners=False)
    up = F.pad(up.view(B, 3, 3, C, H, W), (1, 1, 1, 1))
    total = out.permute(0, 3, 1, 2).to(compute)
    for ky in range(3):
        for kx in range(3):
            total = total + up[:, ky, kx, :, ky : ky + H, kx : kx + W]
    out.copy_(total.relu().permute(0, 2, 3, 1))


# ------------------------------------------------------------- window attention


def rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention with decomposed relative position, as in ViTDet/ViTMatte windows.

    q, k, v: (B, heads, H*W, d) over an H×W grid; rel_h (H, H, d) and rel_w (W, W, d) are the
    gathered position tables (``Rh[i, j] = rel_pos_h[i - j + H - 1]``). Logits are
    ``(q * scale) @ k^T + q·Rh + q·Rw`` with the UNSCALED q in the position terms.
    Returns (B, heads, H*W, d).
    """
    B, heads, N, d = q.shape
    H, W = rel_h.shape[0], rel_w.shape[0]
    attn = (q * scale) @ k.transpose(-2, -1)
    r_q = q.reshape(B * heads, H, W, d)
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w)
    attn = attn.view(B * heads, H, W, H, W) + bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
    attn = attn.view(B, heads, N, N).softmax(dim=-1)
    return attn @ v


# ------------------------------------------------------------ global attention


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather relative positions for a q_size × k_size grid axis: (q_size, k_size, d) with
    ``R[i, j] = rel_pos[i - j + k_size - 1]`` (scaled when q_size != k_size). The table is
    linearly resized first when its length is not ``2 * max(q_size, k_size) - 1``."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def rel_pos_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-query position terms of decomposed relative position over an H×W grid.

    q (B, H, W, heads, d), unscaled; rel_h (H, H, d), rel_w (W, W, d) gathered tables. Returns
    ``bias_h`` (B, H*W, heads, H) with ``bias_h[b, i, n, r] = q[b, i, n] · rel_h[row(i), r]`` and
    ``bias_w`` (B, H*W, heads, W) likewise over columns: H + W values per query, so that
    ``logit[i, j] += bias_h[i, row(j)] + bias_w[i, col(j)]``."""
    B, H, W, heads, d = q.shape
    bias_h = torch.einsum("byxnc,ykc->byxnk", q, rel_h.to(q.dtype))
    bias_w = torch.einsum("byxnc,xkc->byxnk", q, rel_w.to(q.dtype))
    return bias_h.reshape(B, H * W, heads, H), bias_w.reshape(B, H * W, heads, W)


def relpos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of every query of an H×W grid to all its keys with a decomposed position bias:

        out[i] = softmax_j(scale * q[i]·k[j] + bias_h[i, row(j)] + bias_w[i, col(j)]) v

    q, k, v (B, N, heads, d) with N = H*W in row-major order; bias_h (B, N, heads, H) and
    bias_w (B, N, heads, W) as :func:`rel_pos_bias` gives them. Returns (B, N, heads, d). The
    oracle of the flash kernels: it builds the N×N logits."""
    B, N, heads, d = q.shape
    attn = (q.transpose(1, 2) * scale) @ k.permute(0, 2, 3, 1)  # (B, heads, N, N)
    bias = bias_h.transpose(1, 2)[..., :, None] + bias_w.transpose(1, 2)[..., None, :]  # (B, heads, N, H, W)
    attn = (attn + bias.reshape(B, heads, N, N)).softmax(dim=-1)
    return (attn @ v.transpose(1, 2)).transpose(1, 2)


def global_attention(
    qkv: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """The global attention of ViTMatte's blocks 2, 5, 8, 11: every token of the (B, H, W)
    grid attends to all tokens of its image with decomposed relative position, from the
    tokens' qkv projection (B, H, W, 3C) and the gathered tables rel_h (H, H, d), rel_w
    (W, W, d). Computed as upstream does (:func:`rel_pos_attention` over the whole grid):
    (B, H, W, C)."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, H * W, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = rel_pos_attention(q, k, v, rel_h, rel_w, scale)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(B, H, W, C)


def partition_windows(grid: torch.Tensor, pad: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) padded bottom/right to multiples of ``size`` with the vector ``pad`` (C,)
    and cut into windows: (B * nH * nW, size * size, C), windows in row-major order."""
    B, H, W, C = grid.shape
    Hp, Wp = -(-H // size) * size, -(-W // size) * size
    padded = grid
    if (Hp, Wp) != (H, W):
        padded = grid.new_empty((B, Hp, Wp, C))
        padded[:, :H, :W] = grid
        padded[:, H:] = pad
        padded[:, :H, W:] = pad
    windows = padded.view(B, Hp // size, size, Wp // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(-1, size * size, C)


def merge_windows(windows: torch.Tensor, shape: tuple[int, int, int], size: int) -> torch.Tensor:
    """Inverse of :func:`partition_windows` for (B, H, W): the windows put back in the grid
    and the padding cropped: (B, H, W, C)."""
    B, H, W = shape
    Hp, Wp = -(-H // size) * size, -(-W // size) * size
    grid = windows.view(B, Hp // size, Wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(B, Hp, Wp, -1)[:, :H, :W].contiguous()


def attend_windows(attention, qkv, pad_qkv, rel_h, rel_w, num_heads: int, scale: float, window: int) -> torch.Tensor:
    """Window attention as upstream runs it, with ``attention`` (:func:`rel_pos_attention` or
    a fused equivalent) per window: see :func:`window_attention`."""
    B, H, W, C3 = qkv.shape
    windows = partition_windows(qkv, pad_qkv, window)
    n_windows, N = windows.shape[:2]
    q, k, v = windows.view(n_windows, N, 3, num_heads, C3 // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, rel_h, rel_w, scale)  # (windows, heads, N, d)
    return merge_windows(out.transpose(1, 2).reshape(n_windows, N, C3 // 3), (B, H, W), window)


def window_attention(
    qkv: torch.Tensor,
    pad_qkv: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    num_heads: int,
    scale: float,
    window: int,
) -> torch.Tensor:
    """The ViT's window attention from the tokens' qkv projection (B, H, W, 3C).

    Upstream pads norm1's output with zero tokens to multiples of ``window`` before the
    projection; their projection is the bias, so padding the projection with ``pad_qkv``
    (the qkv bias, (3C,)) is the same computation. The padded grid is cut into windows, each
    attended with decomposed relative position (``rel_h``, ``rel_w``: the gathered
    (window, window, d) tables), merged and cropped: (B, H, W, C)."""
    return attend_windows(rel_pos_attention, qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window)
