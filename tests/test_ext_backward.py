"""Gradients of the compiled LTRM ops (``mematte_ext.dwconv_gelu`` and ``mematte_ext.eca``
through their backward ops) against the autograd of their PyTorch references, and the
refusal of gradients by every other compiled op.

fp32 gradients must match the reference's autograd, run in float64 from the same inputs, to
1e-4 relative (max error over max magnitude), each gradient on its own. For bf16/fp16 the
error against an fp32 oracle (the reference's autograd on the upcast inputs and upcast
incoming gradient) may be at most twice PyTorch's own error, the reference's autograd run in
that dtype, plus a floor of 1e-5 of the largest magnitude.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mematte_kernels import ext, reference

import ltrm_cases
from ltrm_cases import cases, max_rel_err, shape_id

# Fresh tensors start as NaN while a test runs: an element a kernel fails to write cannot pass.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

needs_cpu_ops = pytest.mark.skipif(
    not ext.has_kernel("dwconv_gelu_backward", "cpu"), reason="mematte_kernels._C has no LTRM backward CPU kernels"
)

# (B, H, W, C): H and W from {1, 7, 33} (1 is all padding for the 5x5 conv), B 1 to 3,
# ViT-S's and ViT-B's channel counts and odd ones past a multiple of 32 (partial blocks).
SHAPES = [
    (1, 7, 33, 768),
    (3, 33, 7, 37),
    (2, 1, 33, 1535),
    (2, 33, 1, 101),
    (1, 33, 33, 37),
    (3, 7, 7, 767),
    (1, 1, 1, 5),
]

# Every case here takes an incoming gradient, drawn after the forward case's inputs.
dwconv_inputs = functools.partial(ltrm_cases.dwconv_inputs, with_grad=True)
eca_inputs = functools.partial(ltrm_cases.eca_inputs, with_grad=True)


def reference_grads(op, inputs: list[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The gradients of ``op(*inputs)`` for ``grad``, by the reference's autograd in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = op(*leaves)
    return list(torch.autograd.grad(out, leaves, grad.to(dtype)))


def kernel_grads(op, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the compiled ``op(*inputs)`` through its autograd formula."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = op(*leaves)
    assert out.requires_grad
    return list(torch.autograd.grad(out, leaves, grad))


def check_grads(op, ref_op, inputs: list[torch.Tensor], grad: torch.Tensor, names: list[str]) -> None:
    """The compiled op's gradients against the reference's: shape, dtype, finite, and the
    bound for the inputs' dtype, for each gradient."""
    grads = kernel_grads(op, inputs, grad)
    for name, g, t in zip(names, grads, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, f"grad_{name}: {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"grad_{name}: non-finite (or unwritten) values"
    dtype = inputs[0].dtype
    if dtype == torch.float32:
        for name, g, ref in zip(names, grads, reference_grads(ref_op, inputs, grad, torch.float64)):
            err = max_rel_err(g, ref)
            assert err <= 1e-4, f"grad_{name}: relative error {err:.3g}"
        return
    ref32 = reference_grads(ref_op, [t.float() for t in inputs], grad.float(), torch.float32)
    torch_grads = reference_grads(ref_op, inputs, grad, dtype)
    for name, g, ref, torch_g in zip(names, grads, ref32, torch_grads):
        torch_err = (torch_g.float() - ref).abs().max().item()
        kernel_err = (g.float() - ref).abs().max().item()
        floor = 1e-5 * ref.abs().max().item()
        assert kernel_err <= 2 * torch_err + floor, (
            f"grad_{name}: kernel error {kernel_err:.3g}, PyTorch's {dtype} error {torch_err:.3g}"
        )


# --------------------------------------------------------- gradients against autograd


@needs_cpu_ops
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16"], SHAPES) + cases(["fp16"], SHAPES[:2]))
def test_dwconv_gelu_grads_cpu(shape, dtype):
    x, weight, bias, grad = dwconv_inputs(shape, dtype)
    check_grads(ext.dwconv_gelu, reference.dwconv_gelu, [x, weight, bias], grad, ["x", "weight", "bias"])


@needs_cpu_ops
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16"], SHAPES) + cases(["fp16"], SHAPES[:2]))
def test_eca_grads_cpu(shape, dtype, with_residual):
    z, weight, residual, grad = eca_inputs(shape, dtype)
    names = ["z", "weight", "residual"] if with_residual else ["z", "weight"]
    check_grads(ext.eca, reference.eca, [z, weight, residual][: len(names)], grad, names)


@needs_cpu_ops
def test_eca_grads_many_chunks_wide_kernel():
    """More rows than one partial-sum chunk, and a 9-tap gate conv wider than some images' C."""
    z, _, residual, grad = eca_inputs((2, 48, 40, 7), torch.float32)
    weight = torch.randn(1, 1, 9, generator=torch.Generator().manual_seed(1))
    check_grads(ext.eca, reference.eca, [z, weight, residual], grad, ["z", "weight", "residual"])


@needs_cpu_ops
def test_dwconv_gelu_grads_long_image():
    """More rows than one weight-gradient task, so the per-task sums are combined."""
    x, weight, bias, grad = dwconv_inputs((2, 40, 9, 45), torch.float32)
    check_grads(ext.dwconv_gelu, reference.dwconv_gelu, [x, weight, bias], grad, ["x", "weight", "bias"])


@needs_cpu_ops
def test_eca_residual_grad_is_incoming_grad():
    z, weight, residual, grad = eca_inputs((2, 7, 9, 37), torch.float32)
    residual.requires_grad_()
    (grad_residual,) = torch.autograd.grad(ext.eca(z, weight, residual), residual, grad)
    assert torch.equal(grad_residual, grad)


@needs_cpu_ops
def test_fp32_weights_with_bf16_activations():
    """The model's inference mix: fp32 parameters, bf16 activations. The parameter gradients
    come back in fp32, summed in fp32 from the bf16 activations."""
    x, weight, bias, grad = dwconv_inputs((2, 7, 9, 64), torch.float32)
    x, grad = x.bfloat16(), grad.bfloat16()
    grad_x, grad_weight, grad_bias = kernel_grads(ext.dwconv_gelu, [x, weight, bias], grad)
    assert (grad_x.dtype, grad_weight.dtype, grad_bias.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    ref = reference_grads(reference.dwconv_gelu, [x.double(), weight, bias], grad.double(), torch.float64)
    assert max_rel_err(grad_weight, ref[1]) <= 1e-4
    assert max_rel_err(grad_bias, ref[2]) <= 1e-4
    assert max_rel_err(grad_x, ref[0]) <= 2**-8

    z, eca_weight, _, grad = eca_inputs((2, 7, 9, 64), torch.float32)
    z, grad = z.bfloat16(), grad.bfloat16()
    grad_z, grad_eca_weight = kernel_grads(ext.eca, [z, eca_weight], grad)
    assert (grad_z.dtype, grad_eca_weight.dtype) == (torch.bfloat16, torch.float32)
    ref = reference_grads(reference.eca, [z.double(), eca_weight], grad.double(), torch.float64)
    assert max_rel_err(grad_eca_weight, ref[1]) <= 1e-4
    assert max_rel_err(grad_z, ref[0]) <= 2**-8


@needs_cpu_ops
def test_noncontiguous_incoming_grad():
    """Autograd hands on expanded or permuted gradients; the formulas make them contiguous."""
    x, weight, bias, _ = dwconv_inputs((1, 7, 9, 40), torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    # sum() hands on an expanded gradient; the NCHW view a permuted one.
    loss = ext.dwconv_gelu(*leaves).sum() + (ext.dwconv_gelu(*leaves).permute(0, 3, 1, 2) * torch.arange(9.0)).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref_loss = (
        reference.dwconv_gelu(*ref_leaves).sum()
        + (reference.dwconv_gelu(*ref_leaves).permute(0, 3, 1, 2) * torch.arange(9.0, dtype=torch.float64)).sum()
    )
    for g, ref in zip(grads, torch.autograd.grad(ref_loss, ref_leaves)):
        assert max_rel_err(g, ref) <= 1e-4

    z, eca_weight, residual, _ = eca_inputs((1, 7, 9, 40), torch.float32)
    leaves = [t.requires_grad_() for t in (z, eca_weight, residual)]
    grads = torch.autograd.grad(ext.eca(*leaves).permute(0, 3, 1, 2).square().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (z, eca_weight, residual)]
    ref_grads = torch.autograd.grad(reference.eca(*ref_leaves).permute(0, 3, 1, 2).square().sum(), ref_leaves)
    for g, ref in zip(grads, ref_grads):
        assert max_rel_err(g, ref) <= 1e-4


@needs_cpu_ops
def test_only_inputs_that_need_grad():
    x, weight, bias, grad = dwconv_inputs((1, 7, 9, 40), torch.float32)
    weight.requires_grad_()
    (grad_weight,) = torch.autograd.grad(ext.dwconv_gelu(x, weight, bias), weight, grad)
    assert torch.equal(grad_weight, ext.dwconv_gelu_backward(grad, x, weight.detach(), bias)[1])


@needs_cpu_ops
@pytest.mark.parametrize("threads", [1, 2])
def test_weight_grads_do_not_depend_on_thread_count(threads):
    """Fixed-size tasks summed in a fixed order: bit-identical with any number of threads."""
    x, weight, bias, grad = dwconv_inputs((2, 40, 9, 45), torch.float32)
    z, eca_weight, _, eca_grad = eca_inputs((2, 48, 40, 7), torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _, grad_weight, grad_bias = ext.dwconv_gelu_backward(grad, x, weight, bias)
        _, grad_eca_weight = ext.eca_backward(eca_grad, z, eca_weight)
        torch.set_num_threads(1 if threads > 1 else 2)
        _, grad_weight_2, grad_bias_2 = ext.dwconv_gelu_backward(grad, x, weight, bias)
        _, grad_eca_weight_2 = ext.eca_backward(eca_grad, z, eca_weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grad_weight, grad_weight_2) and torch.equal(grad_bias, grad_bias_2)
    assert torch.equal(grad_eca_weight, grad_eca_weight_2)


@needs_cpu_ops
def test_backward_of_empty_input():
    x, weight, bias, grad = dwconv_inputs((2, 0, 5, 8), torch.float32)
    grad_x, grad_weight, grad_bias = ext.dwconv_gelu_backward(grad, x, weight, bias)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_weight, torch.zeros_like(weight)) and torch.equal(grad_bias, torch.zeros_like(bias))
    z, eca_weight, _, grad = eca_inputs((0, 3, 5, 8), torch.float32)
    grad_z, grad_eca_weight = ext.eca_backward(grad, z, eca_weight)
    assert grad_z.shape == z.shape and torch.equal(grad_eca_weight, torch.zeros_like(eca_weight))


# ----------------------------------------------------------- the references in fp64


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (1, 1, 3, 2), (1, 6, 1, 4)], ids=shape_id)
def test_gradcheck_dwconv_gelu_reference(shape):
    x, weight, bias, _ = dwconv_inputs(shape, torch.float64)
    leaves = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(reference.dwconv_gelu, leaves)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (1, 1, 3, 2), (1, 6, 1, 4)], ids=shape_id)
def test_gradcheck_eca_reference(shape, with_residual):
    z, weight, residual, _ = eca_inputs(shape, torch.float64)
    leaves = (z, weight, residual) if with_residual else (z, weight)
    assert torch.autograd.gradcheck(reference.eca, tuple(t.requires_grad_() for t in leaves))


# ---------------------------------------------------------------- torch.library checks


@needs_cpu_ops
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_opcheck_backward_ops(dtype):
    x, weight, bias, grad = dwconv_inputs((2, 5, 6, 40), dtype)
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu_backward.default, (grad, x, weight, bias))
    z, eca_weight, _, grad = eca_inputs((2, 5, 6, 40), dtype)
    torch.library.opcheck(torch.ops.mematte_ext.eca_backward.default, (grad, z, eca_weight))


@needs_cpu_ops
def test_opcheck_dwconv_gelu_with_grad():
    x, weight, bias, _ = dwconv_inputs((2, 5, 6, 40), torch.float32)
    args = tuple(t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu.default, args)


@needs_cpu_ops
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
def test_opcheck_eca_with_grad(with_residual):
    z, weight, residual, _ = eca_inputs((2, 5, 6, 40), torch.float32)
    args = (z.requires_grad_(), weight.requires_grad_(), residual.requires_grad_() if with_residual else None)
    torch.library.opcheck(torch.ops.mematte_ext.eca.default, args)


# ----------------------------------------------------------------------- input checks


@needs_cpu_ops
@pytest.mark.parametrize(
    "make_args, message",
    [
        pytest.param(
            lambda x, w, b, g: (g[:, :-1].contiguous(), x, w, b),
            r"dwconv_gelu_backward: grad_out must have x's shape",
            id="dwconv-grad-shape",
        ),
        pytest.param(
            lambda x, w, b, g: (g.double(), x, w, b),
            r"dwconv_gelu_backward: grad_out must be float32, float16 or bfloat16",
            id="dwconv-grad-float64",
        ),
        pytest.param(
            lambda x, w, b, g: (g.bfloat16(), x, w, b),
            r"dwconv_gelu_backward: grad_out must have x's dtype",
            id="dwconv-grad-dtype",
        ),
        pytest.param(
            lambda x, w, b, g: (g.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), x, w, b),
            r"dwconv_gelu_backward: grad_out must be contiguous",
            id="dwconv-grad-nchw-view",
        ),
        pytest.param(
            lambda x, w, b, g: (g, x, w[:8], b),
            r"dwconv_gelu_backward: weight has 8 channels but x has C = 16",
            id="dwconv-weight-channels",
        ),
    ],
)
def test_dwconv_gelu_backward_rejects(make_args, message):
    with pytest.raises(RuntimeError, match=message):
        ext.dwconv_gelu_backward(*make_args(*dwconv_inputs((1, 4, 4, 16), torch.float32)))


@needs_cpu_ops
@pytest.mark.parametrize(
    "make_args, message",
    [
        pytest.param(
            lambda z, w, g: (g[..., :8].contiguous(), z, w),
            r"eca_backward: grad_out must have z's shape",
            id="grad-shape",
        ),
        pytest.param(lambda z, w, g: (g.half(), z, w), r"eca_backward: grad_out must have z's dtype", id="grad-dtype"),
        pytest.param(
            lambda z, w, g: (g, z, w[..., :4]), r"eca_backward: weight must be a Conv1d kernel", id="weight-even-k"
        ),
        pytest.param(lambda z, w, g: (g, z[0], w), r"eca_backward: z must be a 4-D channels-last", id="z-3d"),
    ],
)
def test_eca_backward_rejects(make_args, message):
    z, weight, _, grad = eca_inputs((1, 4, 4, 16), torch.float32)
    with pytest.raises(RuntimeError, match=message):
        ext.eca_backward(*make_args(z, weight, grad))


# ------------------------------------------------------- ops without a backward


DIFFERENTIABLE = {"dwconv_gelu", "eca"}


def _no_backward_args() -> dict[str, tuple]:
    """Valid-looking arguments for every op without a backward (the refusal comes first)."""
    bf16 = {"dtype": torch.bfloat16}
    seqlens = torch.tensor([0, 16], dtype=torch.int32)
    return {
        "dwconv_gelu_backward": tuple(dwconv_inputs((1, 4, 4, 16), torch.float32)[i] for i in (3, 0, 1, 2)),
        "eca_backward": tuple(eca_inputs((1, 4, 4, 16), torch.float32)[i] for i in (3, 0, 1)),
        "upsample_taps_relu_": (torch.randn(1, 4, 4, 16), torch.randn(1, 2, 2, 144)),
        "upsample_conv_relu_": (
            torch.randn(1, 4, 4, 16, **bf16),
            torch.randn(1, 2, 2, 8, **bf16),
            torch.randn(16, 8, 3, 3),
        ),
        "varlen_attention": (*(torch.randn(16, 1, 64, **bf16) for _ in range(3)), seqlens, 0.125),
        "relpos_attention": (
            *(torch.randn(1, 16, 1, 64, **bf16) for _ in range(3)),
            torch.randn(4, 4, 64),
            torch.randn(4, 4, 64),
            0.125,
        ),
        "global_attention": (torch.randn(1, 4, 4, 384), torch.randn(4, 4, 64), torch.randn(4, 4, 64), 2, 0.125),
        "window_attention": (
            torch.randn(1, 4, 4, 192, **bf16),
            torch.randn(192, **bf16),
            torch.randn(4, 4, 64, **bf16),
            torch.randn(4, 4, 64, **bf16),
            1,
            0.125,
            4,
        ),
    }


def compiled_ops() -> list[str]:
    return sorted(
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("mematte_ext::")
    )


@needs_cpu_ops
def test_every_compiled_op_has_autograd_or_refuses_grad():
    """A new op must come with a backward or be listed as refusing gradients."""
    assert set(compiled_ops()) == DIFFERENTIABLE | set(_no_backward_args())


@needs_cpu_ops
@pytest.mark.parametrize("op", sorted(_no_backward_args()))
def test_op_without_backward_refuses_grad(op):
    args = _no_backward_args()[op]
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    message = rf"mematte_ext\.{op} has no backward, but its argument \w+ requires grad"
    for t in tensors:
        t.requires_grad_(True)
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.mematte_ext, op)(*args)
        t.requires_grad_(False)


@needs_cpu_ops
def test_op_without_backward_runs_under_no_grad():
    out, taps = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 2, 144, requires_grad=True)
    expected = out.clone()
    reference.upsample_taps_relu_(expected, taps.detach())
    with torch.no_grad():
        ext.upsample_taps_relu_(out, taps)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected)


@needs_cpu_ops
def test_in_place_op_without_backward_bumps_version():
    """A graph that saved ``out`` before the in-place op notices the change at backward."""
    leaf = torch.randn(1, 4, 4, 16, requires_grad=True)
    out, taps = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 2, 144)
    loss = (leaf * out).sum()  # saves out
    version = out._version
    ext.upsample_taps_relu_(out, taps)
    assert out._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_cpu_ops
def test_double_backward_refused_by_name():
    x, weight, bias, grad = dwconv_inputs((1, 4, 4, 16), torch.float32)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match=r"mematte_ext\.dwconv_gelu_backward has no backward"):
        torch.autograd.grad(ext.dwconv_gelu(x, weight, bias), x, grad, create_graph=True)


# ----------------------------------------------------------------------- CUDA kernels


def test_cuda_build_has_the_backward_kernels():
    """A build with the forward CUDA kernels has the backward ones too: training on the GPU
    never meets a forward op whose backward is missing."""
    if ext._C is None or not ext._C.cuda_compiled:
        pytest.skip("the extension's CUDA half is not built")
    for op in ("dwconv_gelu_backward", "eca_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mematte_ext::{op}", "CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16"], SHAPES) + cases(["fp16"], SHAPES[:2]))
def test_dwconv_gelu_grads_cuda(shape, dtype):
    assert ext.has_kernel("dwconv_gelu_backward", "cuda")
    x, weight, bias, grad = dwconv_inputs(shape, dtype, "cuda")
    check_grads(ext.dwconv_gelu, reference.dwconv_gelu, [x, weight, bias], grad, ["x", "weight", "bias"])


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("shape, dtype", cases(["fp32", "bf16"], SHAPES) + cases(["fp16"], SHAPES[:2]))
def test_eca_grads_cuda(shape, dtype, with_residual):
    assert ext.has_kernel("eca_backward", "cuda")
    z, weight, residual, grad = eca_inputs(shape, dtype, "cuda")
    names = ["z", "weight", "residual"] if with_residual else ["z", "weight"]
    check_grads(ext.eca, reference.eca, [z, weight, residual][: len(names)], grad, names)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_grads_large_image(dtype):
    """MEMatte-S at 2K: many row chunks for the weight gradient, many partial-sum chunks for ECA."""
    x, weight, bias, grad = dwconv_inputs((2, 128, 128, 768), dtype, "cuda")
    check_grads(ext.dwconv_gelu, reference.dwconv_gelu, [x, weight, bias], grad, ["x", "weight", "bias"])
    z, eca_weight, residual, grad = eca_inputs((2, 128, 128, 384), dtype, "cuda")
    check_grads(ext.eca, reference.eca, [z, eca_weight, residual], grad, ["z", "weight", "residual"])


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """A copy of t that starts one element into its storage: misaligned for vector accesses."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.gpu
def test_cuda_unaligned_inputs_match_aligned():
    """Storage offsets of one element (bias included) take the scalar kernels, same results."""
    x, weight, bias, grad = dwconv_inputs((2, 9, 11, 64), torch.bfloat16, "cuda")
    bias = bias.float()
    torch.testing.assert_close(ext.dwconv_gelu(x, weight, _shifted(bias)), ext.dwconv_gelu(x, weight, bias))
    aligned = ext.dwconv_gelu_backward(grad, x, weight, bias)
    for args in [
        (_shifted(grad), x, weight, bias),
        (grad, _shifted(x), weight, bias),
        (grad, x, weight, _shifted(bias)),
    ]:
        for got, expected in zip(ext.dwconv_gelu_backward(*args), aligned):
            torch.testing.assert_close(got, expected)
    z, eca_weight, _, grad = eca_inputs((2, 9, 11, 64), torch.bfloat16, "cuda")
    aligned = ext.eca_backward(grad, z, eca_weight)
    for args in [(_shifted(grad), z, eca_weight), (grad, _shifted(z), eca_weight)]:
        for got, expected in zip(ext.eca_backward(*args), aligned):
            torch.testing.assert_close(got, expected)


@pytest.mark.gpu
def test_cuda_weight_grads_reproducible():
    x, weight, bias, grad = dwconv_inputs((2, 64, 48, 768), torch.bfloat16, "cuda")
    first, second = ext.dwconv_gelu_backward(grad, x, weight, bias), ext.dwconv_gelu_backward(grad, x, weight, bias)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    z, eca_weight, _, grad = eca_inputs((2, 64, 48, 384), torch.bfloat16, "cuda")
    first, second = ext.eca_backward(grad, z, eca_weight), ext.eca_backward(grad, z, eca_weight)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_opcheck_cuda_with_grad():
    x, weight, bias, grad = dwconv_inputs((2, 5, 6, 40), torch.float32, "cuda")
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu_backward.default, (grad, x, weight, bias))
    args = tuple(t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(torch.ops.mematte_ext.dwconv_gelu.default, args)
    z, eca_weight, residual, grad = eca_inputs((2, 5, 6, 40), torch.float32, "cuda")
    torch.library.opcheck(torch.ops.mematte_ext.eca_backward.default, (grad, z, eca_weight))
    torch.library.opcheck(
        torch.ops.mematte_ext.eca.default, tuple(t.requires_grad_() for t in (z, eca_weight, residual))
    )
