"""What the Triton wrappers share: the interpreter switch, the device guard every launch
runs under, the attention kernels' head-dimension tiles and autotuning settings, and input
checks with clear errors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
from triton import knobs

# Read once: kernels are decorated at import, and the interpreter decides how.
INTERPRET = bool(knobs.runtime.interpret)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The attention kernels hold a head's row as one power-of-two vector of BLOCK_D lanes: a head
# dimension that is not a power of two (80, as in SAM's ViT-H) is padded to the next one by
# masked loads and stores, which costs nothing where it is one and, unlike a fallback to
# PyTorch's fused attention, runs the same code under the interpreter as on the GPU. tl.dot
# needs at least 16 lanes. Past MAX_HEAD_DIM the (BLOCK_M, BLOCK_D) fp32 accumulators no
# longer fit the registers: the public functions run PyTorch's fused attention there.
MAX_HEAD_DIM = 128


def head_block(head_dim: int) -> int:
    """BLOCK_D of a head dimension: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


# Autotuning timer: a launch to compile (a config over the card's shared memory raises
# there, and the autotuner drops it), then CUDA events around a few launches. Triton's
# default timer clears the L2 cache with a 256 MB tensor before every launch, which raises
# the caching allocator's peak by as much in the first forward of a 4K image.
AUTOTUNE_REPS = 10


def time_launches(kernel_call: Callable[[], None], quantiles) -> list[float]:
    """Milliseconds of ``kernel_call`` at each of ``quantiles``, as Triton's ``do_bench``
    returns them."""
    kernel_call()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(AUTOTUNE_REPS)
    ]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in events])
    return torch.quantile(times, torch.tensor(list(quantiles))).tolist()


# Every autotuned kernel keeps its timings on disk (Triton's cache directory), keyed by the
# GPU's architecture, Triton's version, the kernel's source, its configs and the tuning key
# (head dimension, length bucket, dtypes): a second process, or an image whose token count
# falls in a bucket already tuned, reads them instead of timing the configs again.
AUTOTUNE_OPTIONS = dict(cache_results=True, do_bench=time_launches)


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


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    """q, k, v: one float dtype, one ``ndim``-D shape of ``layout``, a head dimension of at
    most MAX_HEAD_DIM with unit stride (the kernels load a head's row as one vector)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(op, name, t, ndim, layout)
        check_float(op, name, t, q.dtype)
        if t.shape != q.shape:
            raise ValueError(f"{op}: q, k and v must have one shape, got {name} {tuple(t.shape)} vs q {tuple(q.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in the head dimension, got strides {t.stride()}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: the Triton kernel takes head_dim up to {MAX_HEAD_DIM}, got head_dim {q.shape[-1]} "
            "(mematte_kernels.triton's public functions run PyTorch's fused attention there)"
        )


def check_attention_out(op: str, out: torch.Tensor, q: torch.Tensor) -> None:
    """``out`` can take the attention of ``q``: its shape, dtype and device, unit stride in the
    head dimension."""
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"{op}: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} "
            "with a contiguous head dimension"
        )


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
