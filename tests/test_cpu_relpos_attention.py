"""ViTMatte's global attention on CPUs (every query of a token grid against all its keys, with
per-query position terms): ``mematte_ext.relpos_attention``, the AVX512-BF16 flash kernel;
``mematte_ext.global_attention``, the AVX2 + FMA flash kernel computed in fp32 for every
dtype; ``native.global_attention`` (strips of queries through fused attention) and the
wrappers the CPU selection offers.

The oracle is upstream's N×N formula in float64 from the same inputs. A kernel on bf16/fp16
tensors may be at most twice PyTorch's own error there (the reference run in that dtype),
plus a floor of 1e-3 for the bf16 kernel; fp32 is held to 1e-5. Grids cross the kernels'
query blocks (32, 48), key blocks (128) and tiles (16), the AVX512 kernel's 1024-token
short/long split, one-row and one-column grids, h ≠ w, resized tables and an empty batch.
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

needs_avx2_attention = pytest.mark.skipif(
    not ext.cpu_avx2_kernels(),
    reason="mematte_kernels._C has no AVX2 global_attention kernel here (not built, or no AVX2 + FMA CPU)",
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
    "B1-7x40": (1, 7, 40, 3),  # 280 tokens: query blocks and a short last key block across rows
    "B1-12x12": (1, 12, 12, 1),  # 144 tokens: whole 48-query blocks, whole 16-key tiles
    "B1-16x16": (1, 16, 16, 1),  # 256 tokens: whole 128-key blocks
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
    rel_h, rel_w = torch.zeros(2, 2, 64), torch.zeros(4, 4, 64)
    with pytest.raises(RuntimeError, match="the grid is 2x4"):
        ext.relpos_attention(q, q, q, rel_h, rel_w, 0.125)
    with pytest.raises(RuntimeError, match="rel_h must be a contiguous float32"):
        ext.relpos_attention(q, q, q, rel_h.bfloat16(), torch.zeros(3, 3, 64), 0.125)
    with pytest.raises(RuntimeError, match=r"rel_w must be a gathered table \(n, n, 64\)"):
        ext.relpos_attention(q, q, q, rel_h, torch.zeros(3, 2, 64), 0.125)


def _check_low_precision(out, qkv, rel_h, rel_w, heads, floor=0.0):
    expected = upstream(qkv, rel_h, rel_w, heads)
    assert out.shape == expected.shape and out.dtype == qkv.dtype
    assert torch.isfinite(out).all()
    if not out.numel():
        return
    torch_lp = reference.global_attention(qkv, rel_h.to(qkv.dtype), rel_w.to(qkv.dtype), heads, HEAD_DIM**-0.5)
    error = (out.double() - expected).abs().max().item()
    torch_error = (torch_lp.double() - expected).abs().max().item()
    assert error <= 2 * torch_error + floor, (error, torch_error)


@needs_avx2_attention
@pytest.mark.parametrize(
    "dtype", [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.bfloat16, torch.float16)]
)
@pytest.mark.parametrize("B, H, W, heads", [pytest.param(*v, id=k) for k, v in GRIDS.items()])
def test_avx2_kernel_matches_upstream(B, H, W, heads, dtype):
    qkv, rel_h, rel_w, heads = grid_case(B, H, W, heads, dtype)
    out = ext.global_attention(qkv, rel_h.float(), rel_w.float(), heads, HEAD_DIM**-0.5)
    if dtype == torch.float32:
        assert out.shape == (B, H, W, heads * HEAD_DIM) and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), upstream(qkv, rel_h, rel_w, heads), rtol=0, atol=1e-5)
    else:
        _check_low_precision(out, qkv, rel_h, rel_w, heads)
        # Computed in fp32 throughout: the fp32 result on the same values, rounded once.
        upcast = ext.global_attention(qkv.float(), rel_h.float(), rel_w.float(), heads, HEAD_DIM**-0.5)
        assert torch.equal(out, upcast.to(dtype))


@needs_avx2_attention
def test_avx2_kernel_takes_the_bias_per_key():
    """Each grid axis's position terms change the output, and the two are not interchangeable."""
    qkv, rel_h, rel_w, heads = grid_case(1, 6, 9, 1, torch.float32, seed=2)
    expected = upstream(qkv, rel_h, rel_w, heads)
    for h, w in ((rel_h * 0, rel_w), (rel_h, rel_w * 0)):
        out = ext.global_attention(qkv, h, w, heads, HEAD_DIM**-0.5)
        assert (out.double() - expected).abs().max() > 1e-2
        torch.testing.assert_close(out.double(), upstream(qkv, h, w, heads), rtol=0, atol=1e-5)


@needs_avx2_attention
def test_avx2_kernel_keeps_nan_where_the_input_has_it():
    """A NaN query spoils its own row only; a NaN key spoils every row (as upstream's softmax)."""
    qkv, rel_h, rel_w, heads = grid_case(1, 5, 6, 1, torch.float32, seed=3)
    qkv[0, 2, 3, 0] = float("nan")  # a query element
    out = ext.global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    assert out[0, 2, 3].isnan().all() and out.isnan().sum() == HEAD_DIM
    qkv[0, 2, 3, 0] = 0.0
    qkv[0, 1, 1, 64] = float("nan")  # a key element
    assert ext.global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5).isnan().all()


@needs_avx2_attention
@pytest.mark.parametrize("make_args, message", [
    pytest.param(lambda qkv, h, w: (qkv.double(), h, w), "qkv must be a contiguous float32, float16 or bfloat16", id="fp64"),
    pytest.param(lambda qkv, h, w: (qkv[:, :, :3], h, w), "qkv must be a contiguous", id="strided"),
    pytest.param(lambda qkv, h, w: (qkv[..., :300], h, w), r"qkv must be \(B, H, W, 3C\)", id="not-3C"),
    pytest.param(lambda qkv, h, w: (qkv, w, h), r"rel_h must be the gathered table \(4, 4, 64\)", id="tables-swapped"),
    pytest.param(lambda qkv, h, w: (qkv, h.bfloat16(), w), "rel_h must be a contiguous float32", id="table-bf16"),
])  # fmt: skip
def test_avx2_kernel_rejects_bad_input(make_args, message):
    qkv, rel_h, rel_w = torch.zeros(1, 4, 5, 384), torch.zeros(4, 4, 64), torch.zeros(5, 5, 64)
    with pytest.raises(RuntimeError, match=message):
        ext.global_attention(*make_args(qkv, rel_h, rel_w), 2, 0.125)


@needs_avx2_attention
def test_opcheck_global_attention():
    qkv, rel_h, rel_w, heads = grid_case(1, 3, 5, 2, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.mematte_ext.global_attention.default, (qkv, rel_h, rel_w, heads, 0.125))


@needs_avx2_attention
@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.bfloat16)])
def test_avx2_wrapper_takes_tables_in_the_model_dtype(dtype):
    """native.global_attention_avx2, as the CPU selection calls it: tables in the model's dtype."""
    qkv, rel_h, rel_w, heads = grid_case(1, 9, 7, 2, dtype, seed=5)
    out = native.global_attention_avx2(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    expected = ext.global_attention(qkv, rel_h.float(), rel_w.float(), heads, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
