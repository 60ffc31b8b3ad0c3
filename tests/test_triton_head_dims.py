"""The public attention ops on the Triton backend at head dims other than MEMatte's 64: 32
(narrow heads), 80 (not a power of two: padded lanes), 128 (the widest the kernels take) and
160 (past the kernels: PyTorch's attention), forward and backward against the fp64 reference; and backward passes whose every logit lies
far below zero, where keys past a sequence's end must not take part.

Without a GPU the kernels run in Triton's interpreter (see conftest.py) on small sizes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mematte_kernels
from mematte_kernels import dispatch, reference
from mematte_kernels import triton as triton_ops

HEAD_DIMS = (32, 80, 128, 160)
# fp32 against fp64, relative to the largest magnitude of each expected tensor.
FP32_RTOL = 1e-5


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    for training in (False, True):
        table = dispatch.resolve("auto", "cpu", training=training)
        assert table.varlen_attention is triton_ops.varlen_attention
        assert table.policy_attention is triton_ops.policy_attention
    assert dispatch.resolve("auto", "cpu").global_attention is triton_ops.global_attention


def max_abs_error(actual, expected):
    return (actual.double() - expected).abs().max().item()


def assert_relatively_close(name, actual, expected, torch_own=None, factor=2):
    """Within FP32_RTOL of the largest expected magnitude or, where ``torch_own`` (the
    reference run in fp32) is given, within ``factor`` times its error if that is larger."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite elements"
    error = max_abs_error(actual, expected)
    bound = FP32_RTOL * expected.abs().max().item()
    if torch_own is not None:
        bound = max(bound, factor * max_abs_error(torch_own, expected))
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


def forward_and_grads(op, inputs, dout):
    """``op``'s output and the gradients of <out, dout> in every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = op(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def packed_sequences(lengths, heads, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return q, k, v, cu_seqlens


def check_against_reference(op, reference_op, names, inputs, large_logits=False, seed=1):
    """``op`` on fp32 ``inputs`` against ``reference_op`` in fp64, output and gradients. With
    ``large_logits``, the fp32 rounding of logits of magnitude ~100 alone moves the result by
    more than FP32_RTOL: there the kernels must be as close as PyTorch's own fp32 is, within
    twice its error for the output and three times for gradients."""
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    actual = forward_and_grads(op, inputs, dout)
    expected = forward_and_grads(reference_op, [t.double() for t in inputs], dout)
    torch_own = forward_and_grads(reference_op, inputs, dout) if large_logits else [None] * len(names)
    for i, (name, a, e, t) in enumerate(zip(names, actual, expected, torch_own)):
        assert_relatively_close(name, a, e, t, factor=2 if i == 0 else 3)


def check_varlen(q, k, v, cu_seqlens, max_seqlen, large_logits=False):
    check_against_reference(
        lambda *t: mematte_kernels.varlen_attention(*t, cu_seqlens, max_seqlen),
        lambda *t: reference.varlen_attention(*t, cu_seqlens, max_seqlen),
        ("out", "dq", "dk", "dv"),
        (q, k, v),
        large_logits,
    )


def check_policy(q, k, v, policy, large_logits=False):
    check_against_reference(
        mematte_kernels.policy_attention,
        reference.policy_attention,
        ("out", "dq", "dk", "dv", "dpolicy"),
        (q, k, v, policy),
        large_logits,
    )


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_varlen_attention(head_dim):
    q, k, v, cu_seqlens = packed_sequences([37, 70], 2, head_dim)
    check_varlen(q, k, v, cu_seqlens, 70)


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_policy_attention(head_dim):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 2, head_dim, generator=generator) for _ in range(3))
    policy = torch.rand(2, 37, generator=generator)
    check_policy(q, k, v, policy)


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_global_attention(head_dim):
    # Forward only: with a gradient wanted, the op runs the reference.
    B, H, W, heads = 1, 5, 7, 2
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3 * heads * head_dim, generator=generator)
    rel_pos_h, rel_pos_w = (torch.randn(2 * n - 1, head_dim, generator=generator) * 0.2 for n in (H, W))
    out = mematte_kernels.global_attention(qkv, rel_pos_h, rel_pos_w, heads)
    rel_h, rel_w = reference.rel_pos_table(H, H, rel_pos_h), reference.rel_pos_table(W, W, rel_pos_w)
    expected = reference.global_attention(qkv.double(), rel_h.double(), rel_w.double(), heads, head_dim**-0.5)
    assert_relatively_close("out", out, expected)


def far_below_zero(rows, heads, head_dim, generator):
    """q and k whose every logit q·k / sqrt(d) lies below -100, and v: the softmax is still
    far from uniform (the logits spread over several units)."""
    q = 4.0 + 0.5 * torch.randn(*rows, heads, head_dim, generator=generator)
    k = -4.0 + 0.5 * torch.randn(*rows, heads, head_dim, generator=generator)
    v = torch.randn(*rows, heads, head_dim, generator=generator)
    return q, k, v


# The padded keys' exp2 overflows to inf before tl.where drops it: numpy says so under the
# interpreter.
BELOW_ZERO_OVERFLOWS = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


# 65 and 130 tokens: the last key block of 64 (32 on a GPU in fp32) holds one or two keys.
@BELOW_ZERO_OVERFLOWS
@pytest.mark.parametrize("lengths", [[65], [130], [65, 130]], ids=lambda n: "T" + "+".join(map(str, n)))
def test_varlen_backward_with_every_logit_below_minus_100(lengths):
    head_dim = 64
    q, k, v = far_below_zero((sum(lengths),), 1, head_dim, torch.Generator().manual_seed(2))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        logits = torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) * head_dim**-0.5
        assert logits.max() < -100
        assert (logits.amax(-1) - logits.amin(-1)).min() > 5  # not a uniform softmax
    check_varlen(q, k, v, cu_seqlens, max(lengths), large_logits=True)


@BELOW_ZERO_OVERFLOWS
@pytest.mark.parametrize("N", [65, 130], ids=lambda n: f"N{n}")
def test_policy_backward_with_every_logit_below_minus_100(N):
    head_dim = 64
    generator = torch.Generator().manual_seed(3)
    q, k, v = far_below_zero((1, N), 1, head_dim, generator)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * head_dim**-0.5
    assert logits.max() < -100
    policy = torch.rand(1, N, generator=generator)
    check_policy(q, k, v, policy, large_logits=True)
