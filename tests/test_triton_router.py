"""The fused Triton router against the reference router.

Without a GPU the kernels run in Triton's interpreter (see conftest.py). Token counts are odd
on purpose (not multiples of the 32/64-token tiles, so the global mean is summed over
partial tiles) and C covers tiles straddling C/2 (C/2 = 48) and MEMatte's 384 and 768.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mematte_kernels import native, reference
from mematte_kernels.triton import router_scores
from mematte_kernels.triton.router import launch_router_scores

from triton_tolerance import DTYPE_NAMES, DTYPES, assert_close

# name: (B, N, C)
SHAPES = {
    "B1-N1-C8": (1, 1, 8),
    "B2-N63-C64": (2, 63, 64),
    "B2-N65-C96": (2, 65, 96),
    "B1-N1000-C32": (1, 1000, 32),
    "B4-N17-C64": (4, 17, 64),
    "B1-N130-C384": (1, 130, 384),
}


def cases(shapes=SHAPES, dtypes=DTYPES):
    return [
        pytest.param(shape, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}")
        for (name, shape), dtype in itertools.product(shapes.items(), dtypes)
    ]


def make_router(C: int, seed: int = 0):
    """Router parameters in reference order, initialised like trained ones in scale: unit
    gain LayerNorm, fan-in scaled weights, small biases."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    def linear(out_features, in_features):
        return randn(out_features, in_features, std=in_features**-0.5), randn(out_features, std=0.1)

    return [
        1 + randn(C, std=0.2),
        randn(C, std=0.1),
        *linear(C, C),
        *linear(C // 2, C),
        *linear(C // 4, C // 2),
        *linear(2, C // 4),
    ]


def make_tokens(B, N, C, seed=0):
    # ViT tokens carry per-channel offsets; LayerNorm must cope with them.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=generator) * 2 + torch.randn(C, generator=generator) * 3


def run_kernel(x, params, eps=1e-5):
    """The kernels into outputs pre-filled so that any element left unwritten fails: scores
    with NaN, keep with the opposite of the reference's decision."""
    expected_keep = reference.router_scores(x, *params, eps=eps)[1]
    scores = torch.full((*x.shape[:2], 2), float("nan"))
    keep = ~expected_keep
    launch_router_scores(x, params, eps, scores=scores, keep=keep)
    return scores, keep


@pytest.mark.parametrize("shape, dtype", cases())
def test_matches_reference(shape, dtype):
    x, params = make_tokens(*shape), make_router(shape[-1])
    x_low, params_low = x.to(dtype), [p.to(dtype) for p in params]
    scores, keep = run_kernel(x_low, params_low)

    expected, expected_keep = reference.router_scores(x_low.float(), *(p.float() for p in params_low))
    low_precision = None if dtype == torch.float32 else reference.router_scores(x_low, *params_low)[0]
    assert_close(scores, expected, low_precision)
    assert torch.equal(keep, scores[..., 0] > scores[..., 1])
    # Decisions can only differ where the reference's margin is within rounding of a tie.
    margin = (expected[..., 0] - expected[..., 1]).abs()
    near_tie = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.equal(keep[margin > near_tie], expected_keep[margin > near_tie])


def test_fp32_decisions_match_at_model_width():
    """ViT-B width (C = 768): the fp32 routing decisions agree with the reference."""
    x, params = make_tokens(1, 40, 768, seed=1), make_router(768, seed=1)
    scores, keep = run_kernel(x, params)
    expected, expected_keep = reference.router_scores(x, *params)
    assert_close(scores, expected)
    assert (keep == expected_keep).float().mean() >= 0.999


def test_strided_tokens():
    """Tokens viewed from a channels-first (B, C, N) tensor."""
    x = make_tokens(2, 65, 64, seed=2).transpose(1, 2).contiguous().transpose(1, 2)
    params = make_router(64, seed=2)
    assert not x.is_contiguous()
    scores, _ = run_kernel(x, params)
    assert_close(scores, reference.router_scores(x, *params)[0])


def test_ties_are_not_kept():
    """keep is strict: equal scores (a zero last layer) route nothing to global attention."""
    params = make_router(32, seed=3)
    params[-2:] = [torch.zeros(2, 8), torch.zeros(2)]
    scores, keep = run_kernel(make_tokens(2, 5, 32, seed=3), params)
    assert torch.equal(scores, torch.full_like(scores, -torch.log(torch.tensor(2.0)).item()))
    assert not keep.any()


@pytest.mark.parametrize("shape", [pytest.param((2, 0, 32), id="N0"), pytest.param((0, 7, 32), id="B0")])
def test_empty(shape):
    scores, keep = router_scores(torch.randn(shape), *make_router(32))
    assert scores.shape == (*shape[:2], 2) and scores.dtype == torch.float32
    assert keep.shape == shape[:2] and keep.dtype == torch.bool


def test_public_function_runs_the_kernel():
    x, params = make_tokens(2, 40, 32, seed=4), make_router(32, seed=4)
    # A non-default eps, so a wrapper that dropped it would not pass.
    scores, keep = router_scores(x, *params, eps=1e-2)
    expected_scores, expected_keep = run_kernel(x, params, eps=1e-2)
    assert torch.equal(scores, expected_scores) and torch.equal(keep, expected_keep)


def test_opcheck():
    x, params = make_tokens(2, 9, 16, seed=5), make_router(16, seed=5)
    torch.library.opcheck(torch.ops.mematte.router_scores.default, (x, *params, 1e-5))


def _bad_inputs():
    x, params = make_tokens(1, 4, 32), make_router(32)
    yield "x-2d", (x[0], *params), ValueError, r"x must be 3-D \(B, N, C\)"
    yield "C-not-multiple-of-4", (torch.randn(1, 4, 30), *make_router(32)), ValueError, "multiple of 4"
    yield "x-int", (x.long(), *params), TypeError, "x must be float16, bfloat16 or float32"
    yield (
        "param-dtype",
        (x, *params[:2], params[2].half(), *params[3:]),
        TypeError,
        "in_weight must have the same dtype",
    )
    in_weight, out2_weight = params[2][:16], params[8][:1]
    yield "in-weight-shape", (x, *params[:2], in_weight, *params[3:]), ValueError, r"in_weight must have shape \(32,"
    yield "out2-shape", (x, *params[:8], out2_weight, params[9]), ValueError, r"out2_weight must have shape \(2, 8\)"


@pytest.mark.parametrize(
    "args, error, message",
    [pytest.param(args, error, message, id=name) for name, args, error, message in _bad_inputs()],
)
def test_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        router_scores(*args)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize(
    "shape", [pytest.param((2, 65, 96), id="B2-N65-C96"), pytest.param((1, 130, 384), id="B1-N130-C384")]
)
def test_low_precision_tokens_with_fp32_parameters(shape, dtype):
    """The model keeps routers in fp32 and hands them bf16/fp16 tokens: the wide layers run
    in the tokens' dtype, the rest in fp32, within 2x the error of the same scheme in
    PyTorch (the CPU fast path's router) against the fp32 reference."""
    x, params = make_tokens(*shape, seed=8).to(dtype), make_router(shape[-1], seed=8)
    scores, keep = router_scores(x, *params)
    expected, expected_keep = reference.router_scores(x.float(), *params)
    assert_close(scores, expected, native.router_scores(x, *params)[0])
    assert torch.equal(keep, scores[..., 0] > scores[..., 1])
    margin = (expected[..., 0] - expected[..., 1]).abs()
    assert torch.equal(keep[margin > 0.1], expected_keep[margin > 0.1])


def test_low_precision_tokens_are_not_copied_to_fp32():
    """No fp32 tensor as large as the tokens is made: the bf16 tokens go to the kernels as
    they are (the model's routers are fp32, its tokens bf16)."""
    x, params = make_tokens(2, 65, 96, seed=9).bfloat16(), make_router(96, seed=9)
    large_fp32 = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= x.numel():
                    large_fp32.append(str(func))
            return out

    with Allocations():
        router_scores(x, *params)
    assert not large_fp32, large_fp32


@pytest.mark.gpu
@pytest.mark.parametrize("C", [384, 768])
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_gpu_matches_reference(C, dtype):
    """The compiled kernels on a 1024x1024 image's tokens (N = 64 * 64), two images."""
    x = make_tokens(2, 4096, C, seed=6).cuda().to(dtype)
    params = [p.cuda().to(dtype) for p in make_router(C, seed=6)]
    scores, keep = router_scores(x, *params)
    expected, expected_keep = reference.router_scores(x.float(), *(p.float() for p in params))
    low_precision = None if dtype == torch.float32 else reference.router_scores(x, *params)[0]
    assert_close(scores, expected, low_precision)
    if dtype == torch.float32:
        assert (keep == expected_keep).float().mean() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("C", [384, 768])
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.bfloat16, torch.float16)])
def test_gpu_low_precision_tokens_with_fp32_parameters(C, dtype):
    """What the model runs on a GPU: fp32 routers on bf16/fp16 tokens, 2 x 4096 tokens."""
    x = make_tokens(2, 4096, C, seed=10).cuda().to(dtype)
    params = [p.cuda() for p in make_router(C, seed=10)]
    scores, keep = router_scores(x, *params)
    expected, expected_keep = reference.router_scores(x.float(), *params)
    assert_close(scores, expected, native.router_scores(x, *params)[0])
    margin = (expected[..., 0] - expected[..., 1]).abs()
    assert torch.equal(keep[margin > 0.1], expected_keep[margin > 0.1])


def test_traces_with_torch_compile():
    """The op's fake implementation under torch.compile (aot_eager: no C++ compiler needed)."""
    x, params = make_tokens(2, 33, 32, seed=7), make_router(32, seed=7)
    compiled = torch.compile(router_scores, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(x, *params), router_scores(x, *params)):
        assert torch.equal(got, expected)
