"""What the Triton wrappers share: the interpreter switch, the device guard every launch
runs under, and input checks with clear errors."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch
from triton import knobs

# Read once: kernels are decorated at import, and the interpreter decides how.
INTERPRET = bool(knobs.runtime.interpret)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``t`` is float16/bfloat16/float32, and ``dtype`` when given."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have the same dtype as the input ({dtype}), got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str,
              head_dim: int) -> None:
    """q, k, v: one float dtype, one ``ndim``-D shape of ``layout``, head dimension ``head_dim`` with
    unit stride (the kernels load a head's row as one vector)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(op, name, t, ndim, layout)
        check_float(op, name, t, q.dtype)
        if t.shape != q.shape:
            raise ValueError(f"{op}: q, k and v must have one shape, got {name} {tuple(t.shape)} vs q {tuple(q.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in the head dimension, got strides {t.stride()}")
    if q.shape[-1] != head_dim:
        raise ValueError(f"{op}: only head_dim {head_dim} is supported, got head_dim {q.shape[-1]}")


def check_attention_out(op: str, out: torch.Tensor, q: torch.Tensor) -> None:
    """``out`` can take the attention of ``q``: its shape, dtype and device, unit stride in the
    head dimension."""
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} "
                         "with a contiguous head dimension")


def check_devices(op: str, **tensors: torch.Tensor) -> None:
    """All on one device, and a CUDA one unless the interpreter runs the kernels."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{op}: {name} is on {device} but {first_name} is on {first}")
    if first.type != "cuda" and not INTERPRET and first.type != "meta":
        raise ValueError(
            f"{op}: tensors are on {first}; the Triton kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 before import to run them on CPU)"
        )


F = TypeVar("F", bound=Callable)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            found = _first_tensor(value, {})
            if found is not None:
                return found
    return None


def _device_context(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device
    and its current stream, whatever device the pointers belong to."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_input_device(launch: F) -> F:
    """Run ``launch`` with its first tensor argument's device current (as flash-linear-
    attention's ``input_guard``): with tensors on ``cuda:1`` and ``cuda:0`` current, the
    kernels would otherwise run on ``cuda:0`` with ``cuda:1`` pointers. Every function that
    launches a kernel is wrapped; ``check_devices`` makes sure the other tensors agree."""

    @functools.wraps(launch)
    def guarded(*args, **kwargs):
        tensor = _first_tensor(args, kwargs)
        if tensor is None:
            return launch(*args, **kwargs)
        with _device_context(tensor.device):
            return launch(*args, **kwargs)

    return guarded  # type: ignore[return-value]
