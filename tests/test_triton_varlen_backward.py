"""Varlen attention's backward (Triton) against the per-sequence reference's autograd, and in
fp32 also against torch's scaled_dot_product_attention backward run sequence by sequence.

Without a GPU the kernels run in Triton's interpreter (see conftest.py): odd lengths, empty
and one-token sequences, small sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import reference
from mematte_kernels.triton import varlen_attention
from mematte_kernels.triton.varlen_attention import launch_varlen_attention
from mematte_kernels.triton.varlen_attention_backward import launch_varlen_attention_backward

from test_triton_attention import SHAPES, cases, packed_qkv
from triton_tolerance import DTYPE_NAMES, DTYPES, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, max_abs_error

# fp32: within 1e-4 of the fp64 reference's largest magnitude, per tensor, and no worse than
# twice PyTorch's own fp32 error (for gradients that are small differences of large terms).
FP32_RTOL = 1e-4
FP32_FLOOR = 1e-6  # a one-token sequence: out = v, so dq = dk = 0 exactly

BACKWARD_SHAPES = {
    name: SHAPES[name] for name in ("B1-T1", "B1-T65", "B3-T128-one-empty", "B3-T1-two-empty", "B1-T0", "B0-T0")
}
BACKWARD_SHAPES["B2-T300"] = ([300, 37], 1)


def run_backward(q, k, v, cu_seqlens, max_seqlen, dout, scale=None):
    """Forward, then backward into NaN-filled gradients: an unwritten element fails."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, out=out)
    dq, dk, dv = (torch.full(q.shape, float("nan"), dtype=q.dtype) for _ in range(3))
    launch_varlen_attention_backward(dout, q, k, v, out, cu_seqlens, max_seqlen, scale, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


def reference_grads(q, k, v, cu_seqlens, max_seqlen, dout, dtype, scale=None):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference.varlen_attention(*inputs, cu_seqlens, max_seqlen, scale)
    if not out.requires_grad:  # no rows: nothing reached the graph
        return [torch.zeros_like(t) for t in inputs]
    out.backward(dout.to(dtype))
    return [t.grad for t in inputs]


def check_backward(q, k, v, cu_seqlens, max_seqlen, scale=None, seed=0):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 100)).to(q.dtype)
    actual = run_backward(q, k, v, cu_seqlens, max_seqlen, dout, scale)
    high = torch.float64 if q.dtype == torch.float32 else torch.float32
    expected = reference_grads(q, k, v, cu_seqlens, max_seqlen, dout, high, scale)
    torch_own = reference_grads(q, k, v, cu_seqlens, max_seqlen, dout, q.dtype, scale)
    for name, a, e, t in zip(("dq", "dk", "dv"), actual, expected, torch_own):
        assert torch.isfinite(a).all(), f"{name}: non-finite elements (unwritten or overflowed)"
        error, torch_error = max_abs_error(a, e), max_abs_error(t, e)
        if q.dtype == torch.float32:
            bound = max(FP32_RTOL * (e.abs().max().item() if e.numel() else 0.0) + FP32_FLOOR, 2 * torch_error)
        else:
            bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
        assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g} (PyTorch's own: {torch_error:.3g})"


@pytest.mark.parametrize("lengths, heads, dtype", cases(BACKWARD_SHAPES))
def test_backward_matches_reference(lengths, heads, dtype):
    check_backward(*packed_qkv(lengths, heads, dtype))


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_backward_custom_scale_and_contiguous_inputs(dtype):
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([70, 0, 33], 2, dtype, seed=2)
    check_backward(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale=0.3)


def test_fp32_backward_matches_sdpa():
    """An independent fp32 check: torch's own attention backward, one sequence at a time."""
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([50, 0, 81], 2, torch.float32, seed=1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    dq, dk, dv = run_backward(q, k, v, cu_seqlens, max_seqlen, dout)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            per_head = [t[start:end].transpose(0, 1).clone().requires_grad_() for t in (q, k, v)]
            F.scaled_dot_product_attention(*per_head).backward(dout[start:end].transpose(0, 1))
            for actual, t in zip((dq, dk, dv), per_head):
                torch.testing.assert_close(actual[start:end], t.grad.transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_autograd_through_the_op():
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([20, 0, 9], 2, torch.float32, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    varlen_attention(*inputs, cu_seqlens, max_seqlen, scale=0.4).backward(dout)
    for t, expected in zip(inputs, run_backward(q, k, v, cu_seqlens, max_seqlen, dout, scale=0.4)):
        assert torch.equal(t.grad, expected)


def test_opcheck_with_gradients():
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([5, 0, 3], 2, torch.float32, seed=6)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.mematte.varlen_attention.default, (*inputs, cu_seqlens, max_seqlen, None))
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    torch.library.opcheck(
        torch.ops.mematte.varlen_attention_backward.default,
        (torch.randn(q.shape), q, k, v, out, cu_seqlens, max_seqlen, None),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_gpu_backward_matches_reference(dtype):
    """The compiled kernels, every autotuned path, on MEMatte-sized sequences (ViT-S heads)."""
    q, k, v, cu_seqlens, max_seqlen = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in packed_qkv([4099, 0, 1, 777, 2048], 6, dtype, seed=7)
    )
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    varlen_attention(*inputs, cu_seqlens, max_seqlen).backward(dout)
    high = torch.float64 if dtype == torch.float32 else torch.float32
    expected = reference_grads(q, k, v, cu_seqlens, max_seqlen, dout, high)
    torch_own = reference_grads(q, k, v, cu_seqlens, max_seqlen, dout, dtype)
    for name, t, e, o in zip(("dq", "dk", "dv"), inputs, expected, torch_own):
        error, torch_error = max_abs_error(t.grad, e), max_abs_error(o, e)
        if dtype == torch.float32:
            bound = max(FP32_RTOL * e.abs().max().item() + FP32_FLOOR, 2 * torch_error)
        else:
            bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
        assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


def test_backward_traces_with_torch_compile():
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([7, 0, 12], 2, torch.float32, seed=8)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*inputs) * 2).sum().backward()
        return [t.grad for t in inputs]

    def attend(q, k, v):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    for got, expected in zip(run(compiled), run(attend)):
        assert torch.equal(got, expected)
