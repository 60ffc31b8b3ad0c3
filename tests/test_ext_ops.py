"""The compiled LTRM ops (mematte_kernels._C) against their PyTorch references.

fp32 must match the reference to 1e-5 relative (max error over max magnitude). Half
precision is judged against an fp32 reference computed from the same (upcast) inputs: the
kernel's error may be at most twice PyTorch's own error in that dtype.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mematte_kernels import ext, reference

from ltrm_cases import DTYPES, cases, dwconv_inputs, eca_inputs, max_rel_err, shape_id

# Outputs start as NaN: an element an op fails to write cannot pass.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")


needs_cpu_ops = pytest.mark.skipif(not ext.available("cpu"), reason="mematte_kernels._C is not built")

# (B, H, W, C): H or W of 1 (all padding), odd sizes, the model's channel counts (768 is 2C
# of ViT-S for the dwconv, 1536 of ViT-B) and counts that are not a multiple of 8 or 32.
SHAPES = [
    (1, 7, 33, 768),
    (2, 33, 7, 100),
    (1, 1, 33, 37),
    (2, 33, 1, 1536),
    (2, 7, 7, 384),
    (1, 33, 33, 37),
]


def check_against_reference(op, ref_op, inputs: list[torch.Tensor]) -> None:
    """``op(*inputs)`` against ``ref_op``: shape, dtype, all finite, and the error bound for
    the inputs' dtype."""
    out = op(*inputs)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "non-finite (or unwritten) outputs"
    ref32 = ref_op(*(t.float() for t in inputs))
    if inputs[0].dtype == torch.float32:
        assert max_rel_err(out, ref32) <= 1e-5
        return
    torch_err = (ref_op(*inputs).float() - ref32).abs().max().item()
    kernel_err = (out.float() - ref32).abs().max().item()
    floor = 1e-5 * ref32.abs().max().item()
    assert kernel_err <= 2 * torch_err + floor, f"kernel error {kernel_err:.3g}, PyTorch's {torch_err:.3g}"


# ------------------------------------------------------------------------------ build


def cuda_toolkit_present() -> bool:
    """Whether setup.py would have found nvcc (same search order)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(h and (Path(h) / "bin" / "nvcc").exists() for h in homes) or shutil.which("nvcc") is not None


def test_extension_built_with_cpu_ops():
    assert ext._C is not None, "mematte_kernels._C did not import: the extension was not built"
    assert ext.available("cpu")


def test_cuda_ops_compiled_when_toolkit_present():
    if ext._C is None:
        pytest.fail("mematte_kernels._C did not import: the extension was not built")
    if ext._C.cuda_opted_out:
        pytest.skip("built with MEMATTE_NO_CUDA=1")
    if torch.version.cuda is None or not cuda_toolkit_present():
        pytest.skip("no CUDA torch or no CUDA toolkit: the CUDA half is not expected")
    assert ext._C.cuda_compiled
    for op in ext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mematte_ext::{op}", "CUDA")


# ------------------------------------------------------------------------ CPU kernels


@needs_cpu_ops
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16", "fp16"], SHAPES))
def test_dwconv_gelu_cpu(shape, dtype):
    check_against_reference(ext.dwconv_gelu, reference.dwconv_gelu, dwconv_inputs(shape, dtype))


@needs_cpu_ops
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16", "fp16"], SHAPES))
def test_eca_cpu(shape, dtype):
    z, weight, residual = eca_inputs(shape, dtype)
    check_against_reference(ext.eca, reference.eca, [z, weight])
    check_against_reference(ext.eca, reference.eca, [z, weight, residual])


@needs_cpu_ops
@pytest.mark.parametrize("shape", [pytest.param(s, id=shape_id(s)) for s in SHAPES[:3]])
def test_eca_adds_residual(shape):
    z, weight, residual = eca_inputs(shape, torch.float32)
    with_residual = ext.eca(z, weight, residual)
    torch.testing.assert_close(with_residual - ext.eca(z, weight), residual, rtol=0, atol=1e-5)


@needs_cpu_ops
def test_eca_long_image_many_chunks():
    """More rows than one partial-sum chunk, so the chunked reduction is exercised."""
    z, weight, residual = eca_inputs((1, 48, 40, 64), torch.float32)
    check_against_reference(ext.eca, reference.eca, [z, weight, residual])


@needs_cpu_ops
def test_eca_wider_kernel():
    z, weight, _ = eca_inputs((2, 7, 9, 37), torch.float32)
    check_against_reference(ext.eca, reference.eca, [z, torch.randn(1, 1, 9)])


@needs_cpu_ops
def test_fp32_weights_with_bf16_activations():
    x, weight, bias = dwconv_inputs((1, 7, 9, 64), torch.float32)
    out = ext.dwconv_gelu(x.bfloat16(), weight, bias)
    ref32 = reference.dwconv_gelu(x.bfloat16().float(), weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref32, rtol=2**-8, atol=1e-5)


@needs_cpu_ops
def test_storage_offset_inputs():
    """Contiguous views that do not start at their storage's start."""
    shape = (1, 7, 9, 64)
    x, weight, bias = dwconv_inputs(shape, torch.float32)
    shifted = torch.empty(x.numel() + 1)[1:].view(shape).copy_(x)
    torch.testing.assert_close(ext.dwconv_gelu(shifted, weight, bias), ext.dwconv_gelu(x, weight, bias))
    z, eca_weight, residual = eca_inputs(shape, torch.float32)
    shifted = torch.empty(z.numel() + 1)[1:].view(shape).copy_(z)
    torch.testing.assert_close(ext.eca(shifted, eca_weight, residual), ext.eca(z, eca_weight, residual))


@needs_cpu_ops
def test_empty_input():
    x, weight, bias = dwconv_inputs((2, 0, 5, 8), torch.float32)
    assert ext.dwconv_gelu(x, weight, bias).shape == (2, 0, 5, 8)
    z, eca_weight, _ = eca_inputs((0, 3, 5, 8), torch.float32)
    assert ext.eca(z, eca_weight).shape == (0, 3, 5, 8)


# ---------------------------------------------------------------------- input checks


def _dwconv_args(**override):
    x, weight, bias = dwconv_inputs((1, 4, 4, 16), torch.float32)
    args = {"x": x, "weight": weight, "bias": bias}
    args.update(override)
    return args["x"], args["weight"], args["bias"]


def _eca_args(**override):
    z, weight, residual = eca_inputs((1, 4, 4, 16), torch.float32)
    args = {"z": z, "weight": weight, "residual": residual}
    args.update(override)
    return args["z"], args["weight"], args["residual"]


@needs_cpu_ops
@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(_dwconv_args(x=torch.randn(4, 4, 16)), r"x must be a 4-D channels-last", id="x-3d"),
        pytest.param(
            _dwconv_args(x=torch.randn(1, 16, 4, 4).permute(0, 2, 3, 1)), r"x must be contiguous", id="x-nchw-view"
        ),
        pytest.param(
            _dwconv_args(x=torch.randn(1, 4, 4, 16, dtype=torch.float64)),
            r"x must be float32, float16 or bfloat16",
            id="x-float64",
        ),
        pytest.param(
            _dwconv_args(weight=torch.randn(8, 1, 5, 5)),
            r"weight has 8 channels but x has C = 16",
            id="weight-channels",
        ),
        pytest.param(_dwconv_args(weight=torch.randn(16, 1, 3, 3)), r"depthwise 5x5 kernel", id="weight-3x3"),
        pytest.param(_dwconv_args(bias=torch.randn(8)), r"bias must have shape \(C,\) = \(16,\)", id="bias-shape"),
        pytest.param(
            _dwconv_args(bias=torch.randn(16, dtype=torch.float64)),
            r"bias must be float32, float16 or bfloat16",
            id="bias-float64",
        ),
    ],
)
def test_dwconv_gelu_rejects(args, message):
    with pytest.raises(RuntimeError, match=message):
        ext.dwconv_gelu(*args)


@needs_cpu_ops
@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(_eca_args(z=torch.randn(16, 16)), r"z must be a 4-D channels-last", id="z-2d"),
        pytest.param(_eca_args(weight=torch.randn(1, 1, 4)), r"shape \(1, 1, k\) with k odd", id="weight-even-k"),
        pytest.param(_eca_args(weight=torch.randn(5)), r"shape \(1, 1, k\) with k odd", id="weight-1d"),
        pytest.param(_eca_args(residual=torch.randn(1, 4, 4, 8)), r"residual must have z's shape", id="residual-shape"),
        pytest.param(
            _eca_args(residual=torch.randn(1, 4, 4, 16, dtype=torch.bfloat16)),
            r"residual must have z's dtype",
            id="residual-dtype",
        ),
        pytest.param(
            _eca_args(residual=torch.randn(1, 16, 4, 4).permute(0, 2, 3, 1)),
            r"residual must be contiguous",
            id="residual-nchw-view",
        ),
    ],
)
def test_eca_rejects(args, message):
    with pytest.raises(RuntimeError, match=message):
        ext.eca(*args)


# ---------------------------------------------------------------- torch.library checks


@needs_cpu_ops
def test_opcheck_dwconv_gelu():
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu.default, tuple(dwconv_inputs((2, 5, 6, 40), torch.float32)))


@needs_cpu_ops
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
def test_opcheck_eca(with_residual):
    z, weight, residual = eca_inputs((2, 5, 6, 40), torch.float32)
    torch.library.opcheck(torch.ops.mematte_ext.eca.default, (z, weight, residual if with_residual else None))


# ----------------------------------------------------------------------- CUDA kernels


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16", "fp16"], SHAPES))
def test_dwconv_gelu_cuda(shape, dtype):
    assert ext.available("cuda")
    check_against_reference(ext.dwconv_gelu, reference.dwconv_gelu, dwconv_inputs(shape, dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16", "fp16"], SHAPES))
def test_eca_cuda(shape, dtype):
    assert ext.available("cuda")
    z, weight, residual = eca_inputs(shape, dtype, "cuda")
    check_against_reference(ext.eca, reference.eca, [z, weight])
    check_against_reference(ext.eca, reference.eca, [z, weight, residual])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
def test_cuda_large_image(dtype):
    """MEMatte-S at 2K: many row tiles for the dwconv, many partial-sum chunks for ECA."""
    check_against_reference(ext.dwconv_gelu, reference.dwconv_gelu, dwconv_inputs((1, 128, 128, 768), dtype, "cuda"))
    check_against_reference(ext.eca, reference.eca, eca_inputs((1, 128, 128, 384), dtype, "cuda"))


@pytest.mark.gpu
def test_cuda_unaligned_views_match_aligned():
    """A storage offset of one element takes the scalar (unvectorised) kernels."""
    shape = (2, 9, 11, 64)
    x, weight, bias = dwconv_inputs(shape, torch.bfloat16, "cuda")
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view(shape).copy_(x)
    torch.testing.assert_close(ext.dwconv_gelu(shifted, weight, bias), ext.dwconv_gelu(x, weight, bias))
    z, eca_weight, residual = eca_inputs(shape, torch.bfloat16, "cuda")
    shifted = torch.empty(z.numel() + 1, dtype=z.dtype, device="cuda")[1:].view(shape).copy_(z)
    torch.testing.assert_close(ext.eca(shifted, eca_weight, residual), ext.eca(z, eca_weight, residual))


@pytest.mark.gpu
def test_cuda_rejects_weight_on_cpu():
    x, weight, bias = dwconv_inputs((1, 4, 4, 16), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"weight must be on the input's device"):
        ext.dwconv_gelu(x, weight.cpu(), bias)


@pytest.mark.gpu
def test_opcheck_cuda():
    dwconv_args = tuple(dwconv_inputs((2, 5, 6, 40), torch.float32, "cuda"))
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu.default, dwconv_args)
    torch.library.opcheck(torch.ops.mematte_ext.eca.default, tuple(eca_inputs((2, 5, 6, 40), torch.float32, "cuda")))
