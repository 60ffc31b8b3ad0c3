"""Triton gather + LayerNorm and scatter + residual against the reference.

Token selections come from ``reference.token_index`` on random keep masks, so the indices
are those the model produces: image then token order, per-image runs of any length, images
with no token kept and images with all of them. Without a GPU the kernels run in Triton's
interpreter (see conftest.py).

The scatter is one add per element, computed in fp32 and rounded once, as torch does: it
must match the reference bitwise in every dtype. The gather's LayerNorm takes fp32 statistics
in a different summation order than torch's: fp32 within 1e-5, low precision within 2x
PyTorch's own error (tests/triton_tolerance.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mematte_kernels import reference
from mematte_kernels.triton import gather_layernorm, scatter_residual_
from mematte_kernels.triton.gather_scatter import launch_gather_layernorm

from triton_tolerance import DTYPE_NAMES, DTYPES, assert_close

# name: (B, N, C, fraction kept per image); T is the number of kept tokens.
SHAPES = {
    "B1-T1": (1, 1, 64, [1.0]),
    "B1-T63-all-kept": (1, 63, 96, [1.0]),
    "B2-T65-one-empty": (2, 65, 64, [1.0, 0.0]),
    "B4-T1000": (4, 400, 32, [0.9, 0.0, 1.0, 0.6]),
    "B3-T0": (3, 10, 64, [0.0, 0.0, 0.0]),
    "B1-T65-C768": (1, 130, 768, [0.5]),
    "B2-T52-C33": (2, 40, 33, [0.8, 0.5]),  # odd channels: a partial channel block
}


def cases(shapes=SHAPES, dtypes=DTYPES):
    return [
        pytest.param(shape, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}")
        for (name, shape), dtype in itertools.product(shapes.items(), dtypes)
    ]


def selection(B, N, C, kept, dtype, seed=0):
    """Tokens (B*N, C) with per-channel offsets, and the rows a router would keep: exactly
    ``round(fraction * N)`` random tokens of each image."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(B * N, C, generator=generator) * 2 + torch.randn(C, generator=generator) * 3).to(dtype)
    keep = torch.zeros(B, N, dtype=torch.bool)
    for b, fraction in enumerate(kept):
        keep[b, torch.randperm(N, generator=generator)[: round(fraction * N)]] = True
    index = reference.token_index(keep)[0]
    weight = (1 + 0.2 * torch.randn(C, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(C, generator=generator)).to(dtype)
    return x, index, weight, bias


@pytest.mark.parametrize("shape, dtype", cases())
def test_gather_layernorm_matches_reference(shape, dtype):
    x, index, weight, bias = selection(*shape, dtype)
    out = torch.full((index.numel(), x.shape[1]), float("nan"), dtype=dtype)  # unwritten rows stay NaN
    launch_gather_layernorm(x, index, weight, bias, 1e-6, out=out)

    expected = reference.gather_layernorm(x.float(), index, weight.float(), bias.float())
    low_precision = None if dtype == torch.float32 else reference.gather_layernorm(x, index, weight, bias)
    assert_close(out, expected, low_precision)


@pytest.mark.parametrize("shape, dtype", cases())
def test_scatter_residual_matches_reference_bitwise(shape, dtype):
    residual, index, _, _ = selection(*shape, dtype)
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(index.numel(), residual.shape[1], generator=generator).to(dtype)
    prior = torch.randn(residual.shape, generator=generator).to(dtype)
    out = prior.clone()
    out[index] = float("nan")  # the rows the kernel must write
    scatter_residual_(out, residual, rows, index)

    expected = prior.clone()
    reference.scatter_residual_(expected, residual, rows, index)
    assert torch.equal(out, expected)  # also: the other rows still hold their prior values


def test_scatter_into_the_residual_itself():
    """x = x + msa on the selected rows, written over x."""
    x, index, _, _ = selection(2, 65, 64, [0.5, 1.0], torch.float32)
    rows = torch.randn(index.numel(), 64)
    expected = x.clone()
    reference.scatter_residual_(expected, x.clone(), rows, index)
    scatter_residual_(x, x, rows, index)
    assert torch.equal(x, expected)


def test_strided_rows():
    """x and out as column slices of wider matrices (row stride > C)."""
    x, index, weight, bias = selection(2, 33, 64, [0.5, 1.0], torch.float32)
    wide = torch.cat([x, torch.randn(x.shape)], dim=1)[:, :64]
    assert_close(gather_layernorm(wide, index, weight, bias), reference.gather_layernorm(x, index, weight, bias))

    rows = torch.randn(index.numel(), 128)[:, ::2]
    out = torch.zeros(x.shape[0], 128)[:, 64:]
    expected = torch.zeros(x.shape)
    scatter_residual_(out, wide, rows, index)
    reference.scatter_residual_(expected, x, rows, index)
    assert torch.equal(out, expected)


def test_int32_index():
    x, index, weight, bias = selection(2, 40, 32, [0.5, 0.3], torch.float32)
    assert torch.equal(gather_layernorm(x, index.int(), weight, bias), gather_layernorm(x, index, weight, bias))


def test_opcheck():
    x, index, weight, bias = selection(2, 9, 16, [0.5, 1.0], torch.float32)
    torch.library.opcheck(torch.ops.mematte.gather_layernorm.default, (x, index, weight, bias, 1e-6))
    rows = torch.randn(index.numel(), 16)
    torch.library.opcheck(torch.ops.mematte.scatter_residual_.default, (x.clone(), x, rows, index))


def _bad_gather_inputs():
    x, index, weight, bias = selection(1, 8, 16, [0.5], torch.float32)
    yield "x-3d", (x[None], index, weight, bias), ValueError, r"x must be 2-D \(M, C\)"
    yield "index-float", (x, index.float(), weight, bias), TypeError, "index must be int64"
    yield "index-2d", (x, index[None], weight, bias), ValueError, r"index must be 1-D"
    yield "weight-shape", (x, index, weight[:8], bias), ValueError, r"weight must have shape \(16,\)"
    yield "x-int", (x.long(), index, weight, bias), TypeError, "x must be float16, bfloat16 or float32"


@pytest.mark.parametrize(
    "args, error, message",
    [pytest.param(args, error, message, id=name) for name, args, error, message in _bad_gather_inputs()],
)
def test_gather_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        gather_layernorm(*args)


def _bad_scatter_inputs():
    x, index, _, _ = selection(1, 8, 16, [0.5], torch.float32)
    rows = torch.randn(index.numel(), 16)
    yield "rows-shape", (x.clone(), x, rows[:, :8], index), ValueError, r"rows must have shape \(4, 16\)"
    yield "residual-dtype", (x.clone(), x.half(), rows, index), TypeError, "residual must have the same dtype"
    yield "residual-shape", (x.clone(), x[:4], rows, index), ValueError, r"residual must have shape \(8, 16\)"
    yield "index-float", (x.clone(), x, rows, index.float()), TypeError, "index must be int64"


@pytest.mark.parametrize(
    "args, error, message",
    [pytest.param(args, error, message, id=name) for name, args, error, message in _bad_scatter_inputs()],
)
def test_scatter_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        scatter_residual_(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_gpu_matches_reference(dtype):
    """The compiled kernels on ViT-B rows: two 1024x1024 images, a quarter of tokens kept."""
    x, index, weight, bias = (t.cuda() for t in selection(2, 4096, 768, [0.25, 0.3], dtype, seed=2))
    expected = reference.gather_layernorm(x.float(), index, weight.float(), bias.float())
    low_precision = None if dtype == torch.float32 else reference.gather_layernorm(x, index, weight, bias)
    assert_close(gather_layernorm(x, index, weight, bias), expected, low_precision)

    rows = torch.randn(index.numel(), 768, device="cuda").to(dtype)
    out, expected_out = x.clone(), x.clone()
    scatter_residual_(out, x, rows, index)
    reference.scatter_residual_(expected_out, x, rows, index)
    assert torch.equal(out, expected_out)
