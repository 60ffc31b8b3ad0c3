"""Global attention with decomposed relative position (Triton) against the N×N reference.

Without a GPU the kernel runs in Triton's interpreter (see conftest.py) with 32×32 blocks;
the grids are odd on purpose: h and w not multiples of the block, one-row and one-column
grids, h ≠ w, one token, an empty batch.
"""

from __future__ import annotations

import pytest
import torch

from mematte.backbone import rel_pos_table
from mematte_kernels import reference
from mematte_kernels.triton import global_attention, relpos_attention
from mematte_kernels.triton.relpos_attention import launch_relpos_attention, length_bucket

from triton_tolerance import DTYPE_NAMES, DTYPES, assert_close

HEAD_DIM = 64

# (B, H, W, heads)
GRIDS = {
    "B1-1x1": (1, 1, 1, 1),
    "B1-1x45": (1, 1, 45, 1),
    "B1-37x1": (1, 37, 1, 2),
    "B2-5x7": (2, 5, 7, 2),
    "B1-9x13": (1, 9, 13, 1),
    "B1-12x8": (1, 12, 8, 2),
    "B0-4x4": (0, 4, 4, 2),
}


def grid_inputs(B, H, W, heads, dtype, seed=0):
    """q, k, v as strided views of one (B, N, 3, heads, 64) qkv, and per-query tables from
    gathered position tables, all in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H * W, 3, heads, HEAD_DIM, generator=g).to(dtype)
    q, k, v = qkv.unbind(2)
    rel_h = (torch.randn(H, H, HEAD_DIM, generator=g) * 0.2).to(dtype)
    rel_w = (torch.randn(W, W, HEAD_DIM, generator=g) * 0.2).to(dtype)
    bias_h, bias_w = reference.rel_pos_bias(q.reshape(B, H, W, heads, HEAD_DIM), rel_h, rel_w)
    return q, k, v, bias_h, bias_w


def run_kernel(q, k, v, bias_h, bias_w, scale=None):
    """The kernel into a NaN-filled output, so any element it fails to write fails the test."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    launch_relpos_attention(q, k, v, bias_h, bias_w, scale, out=out)
    return out


def cases(grids=GRIDS, dtypes=DTYPES):
    return [
        pytest.param(*shape, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}")
        for name, shape in grids.items()
        for dtype in dtypes
    ]


@pytest.mark.parametrize("B, H, W, heads, dtype", cases())
def test_matches_reference(B, H, W, heads, dtype):
    q, k, v, bias_h, bias_w = grid_inputs(B, H, W, heads, dtype)
    out = run_kernel(q, k, v, bias_h, bias_w, scale=0.125)
    expected = reference.relpos_attention(*(t.float() for t in (q, k, v, bias_h, bias_w)), 0.125)
    low = None if dtype == torch.float32 else reference.relpos_attention(q, k, v, bias_h, bias_w, 0.125)
    assert_close(out, expected, low)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_global_attention_with_resized_tables(dtype):
    """The table entry point on a qkv projection, with ViTMatte's 63-row tables resized to
    the grid (2h - 1 = 13 and 2w - 1 = 19 rows), against upstream's formula."""
    B, H, W, heads = 1, 7, 10, 2
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H, W, 3 * heads * HEAD_DIM, generator=g).to(dtype)
    table_h, table_w = (torch.randn(63, HEAD_DIM, generator=g) * 0.2 for _ in range(2))
    rel_h, rel_w = rel_pos_table(H, H, table_h).to(dtype), rel_pos_table(W, W, table_w).to(dtype)
    out = global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    expected = reference.global_attention(qkv.float(), rel_h.float(), rel_w.float(), heads, HEAD_DIM**-0.5)
    low = None if dtype == torch.float32 else reference.global_attention(qkv, rel_h, rel_w, heads, HEAD_DIM**-0.5)
    assert out.shape == (B, H, W, heads * HEAD_DIM)
    assert_close(out, expected, low)


def test_position_bias_matters():
    """Guards the test above against a kernel that drops the bias: it changes the output."""
    q, k, v, bias_h, bias_w = grid_inputs(1, 6, 5, 1, torch.float32, seed=4)
    with_bias = run_kernel(q, k, v, bias_h, bias_w)
    without = run_kernel(q, k, v, torch.zeros_like(bias_h), torch.zeros_like(bias_w))
    transposed = run_kernel(q, k, v, bias_w.new_zeros(bias_h.shape), bias_h.new_zeros(bias_w.shape))
    assert (with_bias - without).abs().max() > 1e-2
    assert_close(without, transposed)  # zero bias: the grid's orientation cannot matter


def test_public_function_and_opcheck():
    q, k, v, bias_h, bias_w = grid_inputs(2, 3, 4, 2, torch.float32, seed=5)
    out = relpos_attention(q, k, v, bias_h, bias_w, 0.3)
    assert out.shape == q.shape and out.is_contiguous()
    assert torch.equal(out, run_kernel(q, k, v, bias_h, bias_w, 0.3))
    torch.library.opcheck(torch.ops.mematte.relpos_attention.default, (q, k, v, bias_h, bias_w, 0.3))


def test_autotune_key_is_a_power_of_two_bucket():
    assert [length_bucket(n) for n in (0, 1, 2, 3, 1292, 2048, 2049)] == [1, 1, 2, 4, 2048, 2048, 4096]


def _bad_inputs():
    q, k, v, bh, bw = grid_inputs(1, 3, 4, 2, torch.float32)
    yield "grid-mismatch", (q, k, v, bh[..., :2], bw), ValueError, r"grid is 2×4"
    wide = torch.randn(1, 12, 2, 256)
    yield "head-dim-256", (wide, wide, wide, bh, bw), ValueError, "takes head_dim up to 128, got head_dim 256"
    yield (
        "float64",
        (q.double(), k.double(), v.double(), bh.double(), bw.double()),
        TypeError,
        "float16, bfloat16 or float32",
    )
    yield "bias-dtype", (q, k, v, bh.half(), bw), TypeError, "bias_h must have the same dtype"
    yield "bias-shape", (q, k, v, bh[:, :5], bw), ValueError, r"bias_h must be \(1, 12, 2, H or W\)"
    yield "3d-q", (q[0], k[0], v[0], bh, bw), ValueError, r"q must be 4-D \(B, N, heads, head_dim\)"
    yield "device", (q, k, v, bh.to("meta"), bw), ValueError, "bias_h is on meta but q is on cpu"


@pytest.mark.parametrize("args, error, message", [pytest.param(a, e, m, id=name) for name, a, e, m in _bad_inputs()])
def test_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        relpos_attention(*args)


@pytest.mark.parametrize(
    "shape, heads, message",
    [
        pytest.param((1, 2, 2, 190), 1, r"\(190\) must be 3 \* C", id="not-3C"),
        pytest.param((1, 2, 2, 3 * 96), 5, r"multiple of num_heads \(5\)", id="C-not-a-multiple-of-heads"),
        pytest.param((4, 3 * 64), 1, r"qkv must be 4-D", id="2d"),
    ],
)
def test_global_attention_names_a_bad_qkv(shape, heads, message):
    with pytest.raises(ValueError, match=message):
        global_attention(torch.zeros(shape), None, None, heads, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_gpu_matches_reference(dtype):
    """The compiled kernel, every autotuned path, on a ViTMatte-S grid (1024×1376 px, padded)."""
    q, k, v, bias_h, bias_w = (t.cuda() for t in grid_inputs(1, 66, 88, 6, dtype, seed=6))
    out = relpos_attention(q, k, v, bias_h, bias_w)
    expected = reference.relpos_attention(*(t.float() for t in (q, k, v, bias_h, bias_w)), HEAD_DIM**-0.5)
    low = None if dtype == torch.float32 else reference.relpos_attention(q, k, v, bias_h, bias_w, HEAD_DIM**-0.5)
    assert_close(out, expected, low)
