"""The attention ops as public functions, for pipelines other than MEMatte's model.

Each checks its input, then runs the implementation :func:`mematte_kernels.dispatch.resolve`
picks for the tensors' device, as the model does: the Triton kernels on CUDA tensors, the CPU
path otherwise, ``MEMATTE_BACKEND`` honoured (``MEMATTE_BACKEND=triton`` runs the kernels on
CPU tensors when ``TRITON_INTERPRET=1`` was set before import). All are differentiable:
when an input needs a gradient, the table is a training one (an inference-only kernel is
swapped for its reference there).
"""

from __future__ import annotations

import torch

from . import dispatch
from .reference import rel_pos_table

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _table(*inputs: torch.Tensor) -> dispatch.OpTable:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return dispatch.resolve("auto", inputs[0].device, training=needs_grad)


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: q, k and v must have one dtype, got {name} {t.dtype} vs q {q.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{op}: q, k and v must have one shape, got {name} {tuple(t.shape)} vs q {tuple(q.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Policy-masked attention over all tokens, as MEMatte trains its routed blocks.

    q, k, v (B, N, heads, d) as flash-attention's ``flash_attn_func``; policy (B, N) float in
    [0, 1]: query i keeps key j with weight ``p_j`` (always itself), and
    ``A = (exp(l - max l) * keep + eps / N) / (sum(exp(l - max l) * keep) + eps)`` with
    ``l = scale * q @ k^T`` (see :func:`mematte_kernels.reference.policy_attention`).
    Returns (B, N, heads, d); differentiable in q, k, v and policy. ``scale`` defaults to
    d ** -0.5.
    """
    op = "policy_attention"
    _check_qkv(op, q, k, v, 4, "(B, N, heads, head_dim)")
    if not isinstance(policy, torch.Tensor):
        raise TypeError(f"{op}: policy must be a tensor, got {type(policy).__name__}")
    if policy.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: policy must be float16, bfloat16 or float32, got {policy.dtype}")
    if tuple(policy.shape) != tuple(q.shape[:2]):
        raise ValueError(f"{op}: policy must have shape (B, N) = {tuple(q.shape[:2])}, got {tuple(policy.shape)}")
    if policy.device != q.device:
        raise ValueError(f"{op}: policy is on {policy.device} but q is on {q.device}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    return _table(q, k, v, policy).policy_attention(q, k, v, policy, scale, eps)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence, as flash-attention's
    ``flash_attn_varlen_func`` (no dropout, not causal): q, k, v (T, heads, d), sequence b in
    rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. ``cu_seqlens`` (B + 1,) int32 on q's device,
    from 0 to T, non-decreasing; ``max_seqlen`` at least the longest sequence. Returns
    (T, heads, d); differentiable in q, k and v. ``scale`` defaults to d ** -0.5.

    Checking ``cu_seqlens`` reads it on the host (one sync for CUDA tensors).
    """
    op = "varlen_attention"
    _check_qkv(op, q, k, v, 3, "(T, heads, head_dim)")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with B + 1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"{op}: max_seqlen must be an int, got {type(max_seqlen).__name__}")
    bounds = cu_seqlens.tolist()
    T = q.shape[0]
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(
            f"{op}: cu_seqlens must run from 0 to T = {T} (the sequences cover every row), "
            f"got {bounds[0]} to {bounds[-1]}"
        )
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {bounds}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"{op}: max_seqlen {max_seqlen} is shorter than the longest sequence ({max(lengths)})")
    return _table(q, k, v).varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)


def global_attention(
    qkv: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Global attention with decomposed relative position over a token grid, as the global
    blocks of ViTDet, SAM's image encoder and ViTMatte compute it, without the N×N matrix on
    the fast paths (flash attention with each query's H + W position terms).

    qkv (B, H, W, 3 * num_heads * d): the block's qkv projection on the H×W grid (q, k, v in
    that order along the last dim, heads within each, as ``qkv(x).reshape(B, H, W, 3, heads,
    d)``); rel_pos_h (Lh, d) and rel_pos_w (Lw, d): the block's learned tables, linearly
    resized to 2H − 1 and 2W − 1 rows where their length differs, as upstream does. The logit
    of query i and key j is ``scale * q_i·k_j + q_i·Rh[row(i) − row(j)] + q_i·Rw[col(i) −
    col(j)]``. Returns (B, H, W, num_heads * d) before the output projection. ``scale``
    defaults to d ** -0.5. Differentiable in qkv and both tables (through the reference,
    which builds the N×N logits, when one of them needs a gradient).
    """
    op = "global_attention"
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    for name, t in (("qkv", qkv), ("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != qkv.device:
            raise ValueError(f"{op}: {name} is on {t.device} but qkv is on {qkv.device}")
    if qkv.dim() != 4 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"{op}: qkv must be 4-D (B, H, W, 3 * num_heads * head_dim) with num_heads = {num_heads}, "
            f"got shape {tuple(qkv.shape)}"
        )
    d = qkv.shape[-1] // (3 * num_heads)
    for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != d:
            raise ValueError(f"{op}: {name} must be a (length, head_dim = {d}) table, got shape {tuple(t.shape)}")
    B, H, W, _ = qkv.shape
    rel_h = rel_pos_table(H, H, rel_pos_h).to(qkv.dtype)
    rel_w = rel_pos_table(W, W, rel_pos_w).to(qkv.dtype)
    table = _table(qkv, rel_pos_h, rel_pos_w)
    return table.global_attention(qkv, rel_h, rel_w, num_heads, d**-0.5 if scale is None else scale)
