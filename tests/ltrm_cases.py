"""Inputs and error measures shared by the tests of the compiled LTRM ops (forward and
backward): the same inputs from the same seed, so a forward case and its gradient case
see the same tensors."""

from __future__ import annotations

import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shape_id(shape: tuple[int, int, int, int]) -> str:
    return "B{}-H{}-W{}-C{}".format(*shape)


def cases(dtypes: list[str], shapes: list[tuple[int, int, int, int]]) -> list:
    return [pytest.param(shape, DTYPES[d], id=f"{shape_id(shape)}-{d}") for shape in shapes for d in dtypes]


def dwconv_inputs(shape, dtype, device="cpu", seed=0, with_grad=False):
    """x, weight, bias, and an incoming gradient after them when ``with_grad``."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g)
    weight = torch.randn(C, 1, 5, 5, generator=g) * 0.2
    bias = torch.randn(C, generator=g) * 0.5
    tensors = [x, weight, bias]
    if with_grad:
        tensors.append(torch.randn(shape, generator=g))
    return [t.to(device=device, dtype=dtype) for t in tensors]


def eca_inputs(shape, dtype, device="cpu", seed=0, with_grad=False):
    """z, weight, residual, and an incoming gradient after them when ``with_grad``."""
    g = torch.Generator().manual_seed(seed)
    # An offset keeps the channel means away from 0, so the gate is not ~0.5 everywhere; one on
    # the incoming gradient keeps sum(grad * z) from averaging out.
    z = torch.randn(shape, generator=g) + torch.randn(shape[-1], generator=g)
    weight = torch.randn(1, 1, 5, generator=g)
    residual = torch.randn(shape, generator=g)
    tensors = [z, weight, residual]
    if with_grad:
        tensors.append(torch.randn(shape, generator=g) + torch.randn(shape[-1], generator=g))
    return [t.to(device=device, dtype=dtype) for t in tensors]


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the reference's largest magnitude."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
