"""``mematte_ext.relpos_attention``, the AVX512-BF16 CPU flash attention over whole token grids
with per-query position terms (ViTMatte's global attention), and ``native.global_attention``
(its fp32 path: chunks of queries through fused attention) and ``global_attention_bf16``.

The oracle is upstream's N×N formula in float64 from the same inputs. The bf16 kernel may be
at most twice PyTorch's own bf16 error there (the reference run in bf16), plus a floor of
1e-3; the fp32 path is held to 1e-5. Grids cross the kernel's 32-query and 128-key blocks and
its 1024-token short/long split, with one-row and one-column grids and an empty batch.
"""
from __future__ import annotations

import pytest
import torch

from mematte.backbone import rel_pos_table
from mematte_kernels import ext, native, reference

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

needs_bf16_attention = pytest.mark.skipif(
    not ext.cpu_bf16_kernels() or not ext.has_kernel("relpos_attention", "cpu"),
    reason="mematte_kernels._C has no AVX512-BF16 relpos_attention kernel here (not built, or no AVX512-BF16 CPU)",
)

HEAD_DIM = 64

# (B, H, W, heads)
GRIDS = {
    "B1-1x1": (1, 1, 1, 1),
    "B1-1x150": (1, 1, 150, 1),
    "B1-33x1": (1, 33, 1, 2),
    "B2-5x7": (2, 5, 7, 2),
    "B1-13x11": (1, 13, 11, 1),
    "B1-34x38": (1, 34, 38, 1),  # 1292 tokens: the long path, ViTMatte's golden grid
    "B0-4x4": (0, 4, 4, 2),
}


def grid_case(B, H, W, heads, dtype, seed=0):
    """qkv (B, H, W, 3C) and gathered tables resized from 63-row ViTMatte tables."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * heads * HEAD_DIM, generator=g).to(dtype)
    table_h, table_w = (torch.randn(63, HEAD_DIM, generator=g) * 0.2 for _ in range(2))
    return qkv, rel_pos_table(H, H, table_h).to(dtype), rel_pos_table(W, W, table_w).to(dtype), heads


def upstream(qkv, rel_h, rel_w, heads, scale=HEAD_DIM**-0.5):
    return reference.global_attention(qkv.double(), rel_h.double(), rel_w.double(), heads, scale)


@pytest.mark.parametrize("B, H, W, heads", [pytest.param(*v, id=k) for k, v in GRIDS.items()])
def test_fp32_path_matches_upstream(B, H, W, heads):
    qkv, rel_h, rel_w, heads = grid_case(B, H, W, heads, torch.float32)
    out = native.global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    assert out.shape == (B, H, W, heads * HEAD_DIM)
    torch.testing.assert_close(out.double(), upstream(qkv, rel_h, rel_w, heads), rtol=0, atol=1e-5)


def test_fp32_path_chunks_the_queries(monkeypatch):
    """With strips of two query rows, the last one shorter (the bound the fp32 path keeps at
    4K), the same result."""
    qkv, rel_h, rel_w, heads = grid_case(1, 9, 7, 2, torch.float32, seed=1)
    whole = native.global_attention(qkv, rel_h, rel_w, heads, 0.3)
    monkeypatch.setattr(native, "GLOBAL_CHUNK_LOGITS", 2 * 63 * 7 * 2)  # heads x N x W x 2 rows
    torch.testing.assert_close(native.global_attention(qkv, rel_h, rel_w, heads, 0.3), whole, rtol=0, atol=1e-6)


@needs_bf16_attention
@pytest.mark.parametrize("B, H, W, heads", [pytest.param(*v, id=k) for k, v in GRIDS.items()])
def test_bf16_kernel_matches_upstream(B, H, W, heads):
    qkv, rel_h, rel_w, heads = grid_case(B, H, W, heads, torch.bfloat16)
    out = native.global_attention_bf16(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    expected = upstream(qkv, rel_h, rel_w, heads)
    torch_bf16 = reference.global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    assert out.shape == expected.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    if not out.numel():
        return
    error = (out.double() - expected).abs().max().item()
    torch_error = (torch_bf16.double() - expected).abs().max().item()
    assert error <= 2 * torch_error + 1e-3, (error, torch_error)


@needs_bf16_attention
def test_bf16_kernel_takes_the_bias_per_key():
    """The position terms change the output, and transposing the grid's terms changes it."""
    qkv, rel_h, rel_w, heads = grid_case(1, 6, 9, 1, torch.bfloat16, seed=2)
    with_bias = native.global_attention_bf16(qkv, rel_h, rel_w, heads, 0.125)
    without = native.global_attention_bf16(qkv, rel_h * 0, rel_w * 0, heads, 0.125)
    assert (with_bias.float() - without.float()).abs().max() > 1e-2


@needs_bf16_attention
def test_bf16_kernel_rejects_bad_input():
    q = torch.zeros(1, 6, 1, 64, dtype=torch.bfloat16)
    bias_h, bias_w = torch.zeros(1, 6, 1, 2), torch.zeros(1, 6, 1, 4)
    with pytest.raises(RuntimeError, match="the grid is 2x4"):
        ext.relpos_attention(q, q, q, bias_h, bias_w, 0.125)
    with pytest.raises(RuntimeError, match="bias_h must be a contiguous float32"):
        ext.relpos_attention(q, q, q, bias_h.bfloat16(), torch.zeros(1, 6, 1, 3), 0.125)
