"""Full fp32 arithmetic for the length of a call, which reduced precisions a GPU has, and
the compute dtype ``"auto"`` stands for.

PyTorch lets cuBLAS matmuls and cuDNN convolutions of fp32 tensors run in TF32 (a 10-bit
mantissa) on Ampere and later GPUs, and cuDNN's convolutions do so by default. A model
built for fp32 turns that off while it runs (:func:`tf32_off`) and gives the caller's
settings back afterwards, also when the call raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from mematte_kernels import dispatch, ext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Compute capability from which a GPU has bf16 arithmetic (Ampere).
BF16_CAPABILITY = (8, 0)

_lock = threading.Lock()
_depth = 0  # scopes open, across threads: the first one in saves, the last one out restores
_restore: list[Callable[[], None]] = []


def _switch_off(legacy, new) -> Callable[[], None]:
    """Turn TF32 off for one backend (``legacy.allow_tf32`` / ``new.fp32_precision``),
    through the API the caller's setting can be read by; return what restores it."""
    try:
        before = legacy.allow_tf32
    except RuntimeError:
        # The caller set it with the fp32_precision API, and PyTorch refuses to read it
        # through the old one: save and restore it through the one it was set with.
        precision = new.fp32_precision
        new.fp32_precision = "ieee"
        return lambda: setattr(new, "fp32_precision", precision)
    legacy.allow_tf32 = False
    return lambda: setattr(legacy, "allow_tf32", before)


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """cuBLAS matmuls and cuDNN convolutions in full fp32 inside the block; the caller's
    settings (either API) restored after it, also on error. The settings are process-wide,
    so nested and concurrent blocks share one: it ends when the last of them does."""
    global _depth
    with _lock:
        if _depth == 0:
            _restore[:] = [
                _switch_off(torch.backends.cuda.matmul, torch.backends.cuda.matmul),
                _switch_off(torch.backends.cudnn, torch.backends.cudnn.conv),
            ]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for restore in reversed(_restore):
                    restore()
                _restore.clear()


def has_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16: every CPU (natively or emulated), GPUs of
    compute capability 8.0 (Ampere) and later. Turing and older only emulate it."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= BF16_CAPABILITY


def check_bf16_device(dtype: torch.dtype, device: torch.device) -> None:
    """ValueError for bfloat16 on a GPU older than Ampere, naming the GPU."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and not has_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"bfloat16 needs a GPU of compute capability {BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use float16 (or float32)"
        )


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, backend: str = "auto") -> torch.dtype:
    """The compute dtype; ``"auto"`` is bfloat16 where the CPU fast path runs its
    AVX512-BF16 kernels (whose parity with fp32 is tested), float16 on GPUs without bf16
    (compute capability below 8.0, e.g. Turing: fp32 has no tensor cores there), float32
    everywhere else.

    Raises ValueError for an unknown dtype, for float16 on the CPU and for bfloat16 on a
    GPU without bf16.
    """
    if isinstance(dtype, str):
        if dtype == "auto":
            if not has_bf16(device):
                return torch.float16
            ops = dispatch.resolve(backend, device)
            fast_cpu = device.type == "cpu" and ops.name.startswith("cpu")
            return torch.bfloat16 if fast_cpu and ext.cpu_bf16_kernels() else torch.float32
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is for GPUs; on the CPU use bfloat16 (or float32)")
    check_bf16_device(dtype, device)
    return dtype
