"""The refusal every op without a backward makes when autograd would need one: a clear
error naming the op instead of a gradient that silently stops at it."""

from __future__ import annotations

import torch


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on ``tensors`` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_grad(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise if an op with no backward is called where a gradient is expected."""
    if needs_grad(*tensors):
        raise RuntimeError(
            f"{op} has no backward, and some of its inputs require grad; for training use the op table "
            f"of mematte_kernels.resolve(backend, device, training=True), or call it under torch.no_grad()"
        )
