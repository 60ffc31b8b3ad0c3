"""The patch embedding, Conv2d(4, C, 16, stride 16), as one GEMM on every backend.

torch 2.14's oneDNN bf16 conv2d on Intel CPUs with AMX returns wrong numbers for this shape
(4 input channels, 16 x 16 stride-16 kernel: mean error 0.81 on outputs of scale 4.2), and
the reference backend used to inherit it. The bf16 test below fails on such a CPU when the
conv is used; everywhere, no backend may run a convolution for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mematte_kernels import dispatch, reference
from mematte_kernels.triton import _common as triton_common

SIZES = [pytest.param(1, 16, 16, id="B1-1x1-tokens"), pytest.param(2, 48, 80, id="B2-3x5-tokens")]


def inputs(B, H, W, dtype, C=384, seed=7):
    """Inputs like the model's: normalised RGB + trimap, fan-in scaled weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g)
    weight = torch.randn(C, 4, 16, 16, generator=g) * (4 * 16 * 16) ** -0.5 * 4
    bias = torch.randn(C, generator=g) * 0.1
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def conv_tokens(x, weight, bias):
    return F.conv2d(x, weight, bias, stride=16).permute(0, 2, 3, 1)


@pytest.mark.parametrize("B, H, W", SIZES)
def test_is_the_conv(B, H, W):
    x, weight, bias = inputs(B, H, W, torch.float64)
    out = reference.patch_embed(x, weight, bias)
    assert out.shape == (B, H // 16, W // 16, 384) and out.is_contiguous()
    torch.testing.assert_close(out, conv_tokens(x, weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B, H, W", SIZES)
def test_bf16_is_as_close_as_rounding_allows(B, H, W):
    """bf16 within twice the error of rounding the exact result to bf16: the conv on an AMX
    CPU is off by about a fifth of the output scale."""
    x, weight, bias = inputs(B, H, W, torch.bfloat16)
    out = reference.patch_embed(x, weight, bias)
    exact = conv_tokens(x.double(), weight.double(), bias.double())
    rounding = (exact.to(torch.bfloat16).double() - exact).abs().mean()
    error = (out.double() - exact).abs().mean()
    assert error <= 2 * rounding, (
        f"mean error {error:.3g} vs bf16 rounding {rounding:.3g} (output scale {exact.abs().mean():.3g})"
    )


BACKENDS = [
    "reference",
    "cpu",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not triton_common.INTERPRET, reason="the triton backend on CPU tensors needs TRITON_INTERPRET=1"
        ),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_runs_a_convolution(backend):
    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    table = dispatch.resolve(backend, "cpu")
    with Recorder():
        table.patch_embed(*inputs(1, 32, 48, torch.bfloat16))
    assert calls and not [c for c in calls if "conv" in c], calls
