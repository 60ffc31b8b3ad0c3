"""One small call of every public Triton op (and backward), for the checks that must reach every kernel: the
device-guard test (which also fails when a kernel of the package is launched by none of
these) and the GPU report's compute-sanitizer runs.

Inputs are as the model passes them: low-precision tokens with fp32 router parameters,
q/k/v as strided views of one qkv tensor, an empty sequence among the packed ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import mematte_kernels.triton as triton_ops

HEAD_DIM = 64


def triton_op_calls(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[tuple[str, Callable]]:
    """(name, thunk) for every public Triton op on small ``dtype`` inputs on ``device``; each
    thunk returns the op's output (a tensor or a tuple of them)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dtype, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(device, dtype)

    C = 32
    x = randn(40, C)
    index = torch.tensor([3, 0, 17, 39], device=device)
    weight, bias = randn(C), randn(C)
    out = x.clone()
    rows = randn(4, C)

    tokens = randn(2, 33, C, std=2.0)
    router = [
        1 + randn(C, dtype=torch.float32, std=0.2), randn(C, dtype=torch.float32, std=0.1),
        randn(C, C, dtype=torch.float32, std=C**-0.5), randn(C, dtype=torch.float32, std=0.1),
        randn(C // 2, C, dtype=torch.float32, std=C**-0.5), randn(C // 2, dtype=torch.float32, std=0.1),
        randn(C // 4, C // 2, dtype=torch.float32, std=(C // 2) ** -0.5), randn(C // 4, dtype=torch.float32, std=0.1),
        randn(2, C // 4, dtype=torch.float32, std=(C // 4) ** -0.5), randn(2, dtype=torch.float32, std=0.1),
    ]  # fmt: skip

    qkv = randn(10, 3, 2, HEAD_DIM)
    cu_seqlens = torch.tensor([0, 7, 7, 10], dtype=torch.int32, device=device)

    H, W = 3, 4  # a 3 x 4 token grid
    grid_qkv = randn(1, H * W, 3, 2, HEAD_DIM)
    bias_h, bias_w = randn(1, H * W, 2, H), randn(1, H * W, 2, W)

    def scatter():
        triton_ops.scatter_residual_(out, x, rows, index)
        return out

    def with_grads(op, inputs):
        """``op(*inputs)`` and the gradients of its output's sum: the backward kernels."""
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        result = op(*inputs)
        result.backward(torch.ones_like(result))
        return (result, *(t.grad for t in inputs))

    policy_qkv = [randn(2, 9, 2, HEAD_DIM) for _ in range(3)]
    policy = (torch.rand(2, 9, generator=generator) > 0.5).to(device, dtype)

    return [
        ("router_scores", lambda: triton_ops.router_scores(tokens, *router)),
        ("gather_layernorm", lambda: triton_ops.gather_layernorm(x, index, weight, bias)),
        ("scatter_residual_", scatter),
        ("varlen_attention", lambda: triton_ops.varlen_attention(*qkv.unbind(1), cu_seqlens, 7)),
        ("relpos_attention", lambda: triton_ops.relpos_attention(*grid_qkv.unbind(2), bias_h, bias_w)),
        (
            "varlen_attention backward",
            lambda: with_grads(lambda q, k, v: triton_ops.varlen_attention(q, k, v, cu_seqlens, 7), qkv.unbind(1)),
        ),
        ("policy_attention and its backward", lambda: with_grads(triton_ops.policy_attention, [*policy_qkv, policy])),
    ]
