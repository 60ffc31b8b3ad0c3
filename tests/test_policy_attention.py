"""Policy attention: the reference against independent formulations and gradcheck, then
the Triton kernels (forward and backward) against the reference.

The reference is written as upstream's ``softmax_with_policy``; here it is checked against
a row-by-row transcription of TRAINING.md's formula and against plain attention in the two
limits where the policy is trivial. Without a GPU the kernels run in Triton's interpreter
(see conftest.py), so their sizes are small and odd (not multiples of the blocks).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import native, reference
from mematte_kernels.triton import policy_attention
from mematte_kernels.triton.policy_attention import launch_backward, launch_forward

from triton_tolerance import DTYPE_NAMES, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, max_abs_error

HEAD_DIM = 64


def make_inputs(B, N, heads, d=HEAD_DIM, dtype=torch.float32, policy="random", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, heads, d, generator=generator).to(dtype) for _ in range(3))
    if policy == "zeros":
        p = torch.zeros(B, N)
    elif policy == "ones":
        p = torch.ones(B, N)
    elif policy == "random":
        p = (torch.rand(B, N, generator=generator) > 0.5).float()
    elif policy == "soft":
        p = torch.rand(B, N, generator=generator)
    else:
        raise ValueError(policy)
    return q, k, v, p.to(dtype)


def row_by_row(q, k, v, policy, scale, eps):
    """TRAINING.md's formula, one query at a time, in fp64."""
    B, N, heads, d = q.shape
    q, k, v, policy = (t.double() for t in (q, k, v, policy))
    out = torch.empty(B, N, heads, d, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            for i in range(N):
                logits = (q[b, i, h] * scale) @ k[b, :, h].T  # (N,)
                keep = policy[b].clone()
                keep[i] = 1.0
                a = torch.exp(logits - logits.max()) * keep
                attn = (a + eps / N) / (a.sum() + eps)
                out[b, i, h] = attn @ v[b, :, h]
    return out


@pytest.mark.parametrize("policy", ["zeros", "ones", "random", "soft"])
@pytest.mark.parametrize("B, N", [(1, 1), (2, 7), (3, 13)], ids=lambda x: str(x))
def test_reference_matches_formula(B, N, policy):
    q, k, v, p = make_inputs(B, N, 2, d=8, policy=policy)
    # A large eps makes the eps/N terms visible in fp32.
    for scale, eps in ((None, 1e-6), (0.7, 0.3)):
        out = reference.policy_attention(q, k, v, p, scale, eps)
        expected = row_by_row(q, k, v, p, 8**-0.5 if scale is None else scale, eps)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_reference_limits():
    """With eps = 0: an all-one policy is plain softmax attention, an all-zero one returns v."""
    q, k, v, ones = make_inputs(2, 37, 3, policy="ones")
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(reference.policy_attention(q, k, v, ones, eps=0.0), sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.policy_attention(q, k, v, torch.zeros_like(ones), eps=0.0), v)


@pytest.mark.parametrize("policy", ["random", "soft"])
def test_reference_gradcheck(policy):
    q, k, v, p = make_inputs(2, 5, 2, d=4, dtype=torch.float64, policy=policy)
    # Soft values away from 0 and 1 keep the check off the policy's domain edges.
    p = p.clamp(0.05, 0.95) if policy == "soft" else p
    inputs = [t.clone().requires_grad_() for t in (q, k, v, p)]
    # A large eps makes the gradient through the row max (eps-sized) count.
    assert torch.autograd.gradcheck(lambda *t: reference.policy_attention(*t, eps=0.05), inputs)
    assert torch.autograd.gradcheck(lambda *t: reference.policy_attention(*t, scale=0.3), inputs)


# ------------------------------------------------------------------------- the kernels

# fp32: within 1e-4 of the fp64 reference's largest magnitude, per tensor, or, where a
# gradient is a small difference of large terms (an all-zero policy leaves dq and dk only
# the eps-sized terms, ~1e-3 against dv's ~5), within twice PyTorch's own fp32 error there.
FP32_RTOL = 1e-4
# Where the exact gradient is 0 (one token: out = v whatever q and k) it is still computed
# as a sum of terms that cancel: their rounding, 1e-6 of the largest output or gradient.
FP32_FLOOR = 1e-6

# (B, N, heads)
SHAPES = {"B1-N1": (1, 1, 1), "B2-N63": (2, 63, 2), "B3-N65": (3, 65, 1), "B1-N300": (1, 300, 2)}
POLICIES = ("zeros", "ones", "random", "soft")


def kernel_cases():
    cases = []
    for (name, shape), policy in itertools.product(SHAPES.items(), POLICIES):
        cases.append(pytest.param(shape, policy, torch.float32, id=f"{name}-{policy}-fp32"))
    # Low precision: every shape once, every policy once (the interpreter is slow), and the
    # zero policy, where a query keeps mostly itself, beyond one token.
    for (name, shape), policy, dtype in zip(SHAPES.items(), POLICIES, (torch.bfloat16, torch.float16) * 2):
        cases.append(pytest.param(shape, policy, dtype, id=f"{name}-{policy}-{DTYPE_NAMES[dtype]}"))
        other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
        cases.append(pytest.param(shape, "random", other, id=f"{name}-random-{DTYPE_NAMES[other]}"))
    for dtype in (torch.bfloat16, torch.float16):
        cases.append(pytest.param(SHAPES["B2-N63"], "zeros", dtype, id=f"B2-N63-zeros-{DTYPE_NAMES[dtype]}"))
    return cases


def nan_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype)


def run_kernels(q, k, v, p, dout, scale=None, eps=1e-6):
    """Forward and backward launches into NaN-filled buffers, so any element a kernel fails
    to write fails the test. Returns out, dq, dk, dv, dpolicy."""
    B, N, heads, _ = q.shape
    out = nan_like(q)
    out_fp32 = None if q.dtype == torch.float32 else nan_like(q, torch.float32)
    stats = torch.full((B, heads, N), float("nan"))
    row_max, denom, row_argmax = stats.clone(), stats.clone(), torch.full((B, heads, N), -7, dtype=torch.int32)
    launch_forward(
        q, k, v, p, scale, eps, out=out, out_fp32=out_fp32, row_max=row_max, row_argmax=row_argmax, denom=denom
    )
    if out_fp32 is not None:
        assert torch.equal(out_fp32.to(q.dtype), out)
    dq, dk, dv, dpolicy_per_head = nan_like(q), nan_like(q), nan_like(q), stats.clone()
    launch_backward(
        dout,
        q,
        k,
        v,
        p,
        out if out_fp32 is None else out_fp32,
        row_max,
        row_argmax,
        denom,
        scale,
        eps,
        dq=dq,
        dk=dk,
        dv=dv,
        dpolicy_per_head=dpolicy_per_head,
    )
    return out, dq, dk, dv, dpolicy_per_head.sum(1)


def reference_with_grads(q, k, v, p, dout, dtype, scale=None, eps=1e-6):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, p)]
    out = reference.policy_attention(*inputs, scale, eps)
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in inputs]


def check_kernels(q, k, v, p, scale=None, eps=1e-6, seed=0):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 100)).to(q.dtype)
    actual = run_kernels(q, k, v, p, dout, scale, eps)
    # fp64 for the fp32 kernel; for a low-precision one, fp32 from the same rounded inputs.
    expected = reference_with_grads(
        q, k, v, p, dout, torch.float64 if q.dtype == torch.float32 else torch.float32, scale, eps
    )
    assert_all_close(actual, expected, reference_with_grads(q, k, v, p, dout, q.dtype, scale, eps), q.dtype)


def assert_all_close(actual, expected, torch_own, dtype):
    """out, dq, dk, dv, dpolicy against the high-precision reference, by the rule above;
    ``torch_own`` is the reference run in ``dtype``."""
    problem_scale = max((e.abs().max().item() for e in expected if e.numel()), default=0.0)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dpolicy")):
        assert actual[i].shape == expected[i].shape, name
        assert torch.isfinite(actual[i]).all(), f"{name}: non-finite elements (unwritten or overflowed)"
        error = max_abs_error(actual[i], expected[i])
        torch_error = max_abs_error(torch_own[i], expected[i])
        if dtype == torch.float32:
            largest = expected[i].abs().max().item() if expected[i].numel() else 0.0
            bound = max(FP32_RTOL * largest + FP32_FLOOR * problem_scale, 2 * torch_error)
        else:
            bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
        assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g} (PyTorch's own: {torch_error:.3g})"


@pytest.mark.parametrize("shape, policy, dtype", kernel_cases())
def test_kernels_match_reference(shape, policy, dtype):
    check_kernels(*make_inputs(*shape, dtype=dtype, policy=policy))


def run_cpu_path(q, k, v, p, dout, scale=None, eps=1e-6):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, p)]
    out = native.policy_attention(*inputs, scale, eps)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in inputs]


# Several query chunks, the last one partial.
CPU_SHAPES = {**SHAPES, "B2-N600": (2, 2 * native.POLICY_CHUNK + 88, 3)}


@pytest.mark.parametrize(
    "shape, policy, dtype",
    [
        pytest.param(shape, policy, dtype, id=f"{name}-{policy}-{DTYPE_NAMES[dtype]}")
        for (name, shape), policy, dtype in itertools.product(
            CPU_SHAPES.items(), POLICIES, (torch.float32, torch.bfloat16)
        )
    ],
)
def test_cpu_path_matches_reference(shape, policy, dtype):
    """The chunked CPU path (fp32 inside), forward and backward, by the kernels' rule."""
    q, k, v, p = make_inputs(*shape, dtype=dtype, policy=policy, seed=2)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for scale, eps in ((None, 1e-6), (0.3, 0.05)):
        actual = run_cpu_path(q, k, v, p, dout, scale, eps)
        high = torch.float64 if dtype == torch.float32 else torch.float32
        expected = reference_with_grads(q, k, v, p, dout, high, scale, eps)
        assert_all_close(actual, expected, reference_with_grads(q, k, v, p, dout, dtype, scale, eps), dtype)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.float32, torch.bfloat16)])
def test_kernels_visible_eps_and_scale(dtype):
    """A large eps makes the eps/N terms and the gradient through the row max count, and a
    masked key holding the row max (all-zero policy, large logits) makes D small."""
    q, k, v, p = make_inputs(2, 45, 2, dtype=dtype, policy="random", seed=3)
    check_kernels(q, k, v, p, scale=0.3, eps=0.05)
    check_kernels(q * 3, k * 3, v, torch.zeros_like(p), eps=1e-3, seed=1)


def test_kernels_take_strided_views():
    """q, k, v as views of one (B, N, 3, heads, 64) tensor, as the model's qkv gives them."""
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 37, 3, 2, HEAD_DIM, generator=generator)
    p = (torch.rand(2, 37, generator=generator) > 0.3).float()
    check_kernels(*qkv.unbind(2), p)


def test_autograd_op_matches_launches():
    q, k, v, p = make_inputs(2, 20, 2, policy="soft", seed=6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    inputs = [t.clone().requires_grad_() for t in (q, k, v, p)]
    out = policy_attention(*inputs, scale=0.4, eps=1e-3)
    out.backward(dout)
    expected = run_kernels(q, k, v, p, dout, scale=0.4, eps=1e-3)
    assert torch.equal(out.detach(), expected[0])
    for t, grad in zip(inputs, expected[1:]):
        assert torch.equal(t.grad, grad)


def test_opcheck():
    q, k, v, p = make_inputs(2, 5, 2, policy="soft", seed=8)
    args = tuple(t.requires_grad_() for t in (q, k, v, p)) + (None, 1e-6)
    torch.library.opcheck(torch.ops.mematte.policy_attention_forward.default, args)
    out, _, *stats = torch.ops.mematte.policy_attention_forward(*(t.detach() for t in args[:4]), None, 1e-6)
    dout = torch.randn(q.shape)
    torch.library.opcheck(
        torch.ops.mematte.policy_attention_backward.default,
        (dout, *(t.detach() for t in args[:4]), out, *stats, None, 1e-6),
    )


def test_empty_inputs():
    for B, N, heads in ((0, 5, 1), (2, 0, 1), (1, 3, 0)):
        q, k, v, p = make_inputs(B, N, heads)
        out = policy_attention(*(t.requires_grad_() for t in (q, k, v, p)))
        assert out.shape == q.shape
        out.sum().backward()
        assert q.grad.shape == q.shape and p.grad.shape == p.shape


def _bad_inputs():
    q, k, v, p = make_inputs(2, 5, 2)
    yield "float64", (q.double(), k.double(), v.double(), p), TypeError, "float16, bfloat16 or float32"
    yield "mixed-dtypes", (q, k.half(), v, p), TypeError, "k must have the same dtype"
    yield "k-shape", (q, k[:, :4], v, p), ValueError, "one shape"
    yield "3d-q", (q[:, 0], k[:, 0], v[:, 0], p), ValueError, r"q must be 4-D \(B, N, heads, head_dim\)"
    strided = torch.randn(2, 5, 2, 128)[..., ::2]
    yield "head-dim-not-contiguous", (strided, strided, strided, p), ValueError, "contiguous in the head dimension"
    yield "policy-shape", (q, k, v, p[:, :4]), ValueError, r"policy must have shape \(B, N\) = \(2, 5\)"
    yield "policy-bool", (q, k, v, p > 0), TypeError, "policy must be float16, bfloat16 or float32"
    yield "policy-device", (q, k, v, p.to("meta")), ValueError, "policy is on meta but q is on cpu"


@pytest.mark.parametrize(
    "args, error, message",
    [pytest.param(args, error, message, id=name) for name, args, error, message in _bad_inputs()],
)
def test_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        policy_attention(*args)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.float32, torch.bfloat16, torch.float16)]
)
@pytest.mark.parametrize("N", [1024, 4099])
def test_gpu_matches_reference(N, dtype):
    """The compiled kernels, every autotuned path, at MEMatte's sizes (ViT-S heads)."""
    q, k, v, p = (t.cuda() for t in make_inputs(2, N, 6, dtype=dtype, policy="random", seed=9))
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, p)]
    out = policy_attention(*inputs)
    out.backward(dout)
    actual = [out.detach()] + [t.grad for t in inputs]
    expected = reference_with_grads(q, k, v, p, dout, torch.float64)
    assert_all_close(actual, expected, reference_with_grads(q, k, v, p, dout, dtype), dtype)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.float32, torch.bfloat16)])
def test_traces_with_torch_compile(dtype):
    """Forward and backward through torch.compile: the ops' fake implementations (the fp32
    output copy's shape depends on the dtype) and the registered autograd (aot_eager, so no
    C++ compiler is needed). Gradients equal eager mode's."""
    q, k, v, p = make_inputs(2, 20, 2, dtype=dtype, policy="soft", seed=10)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, p)]
        (fn(*inputs) * 2).float().sum().backward()
        return [t.grad for t in inputs]

    compiled = torch.compile(lambda *t: policy_attention(*t), backend="aot_eager", fullgraph=True)
    for got, expected in zip(run(compiled), run(policy_attention)):
        assert torch.equal(got, expected)
