"""Policy attention: the reference against independent formulations and gradcheck.

The reference is written as upstream's ``softmax_with_policy``; here it is checked against
a row-by-row transcription of TRAINING.md's formula and against plain attention in the two
limits where the policy is trivial.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import reference

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
        expected = row_by_row(q, k, v, p, 8 ** -0.5 if scale is None else scale, eps)
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
