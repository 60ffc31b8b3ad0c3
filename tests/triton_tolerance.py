"""The accuracy rule of the Triton kernel tests.

fp32 kernels are held to an absolute tolerance against the fp32 reference.

A float16/bfloat16 kernel is compared with the reference computed in fp32 from the same
low-precision inputs (so input rounding is not counted against anyone), and must be within
twice PyTorch's own error there (the same reference run in the low-precision dtype), plus a
tiny floor for cases where PyTorch happens to be exact (a one-token attention returns v).
"""

from __future__ import annotations

import torch

FP32_ATOL = 1e-5
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-6

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = tuple(DTYPE_NAMES)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0


def assert_close(
    actual: torch.Tensor,
    fp32_reference: torch.Tensor,
    torch_low_precision: torch.Tensor | None = None,
    *,
    atol: float = FP32_ATOL,
) -> float:
    """Check ``actual`` against ``fp32_reference``: within ``atol`` when
    ``torch_low_precision`` is None (an fp32 kernel), else within twice the error of
    ``torch_low_precision`` plus the floor. Returns the kernel's max abs error."""
    assert actual.shape == fp32_reference.shape
    assert torch.isfinite(actual).all(), "non-finite elements: unwritten (NaN-filled) or overflowed"
    error = max_abs_error(actual, fp32_reference)
    if torch_low_precision is None:
        assert error <= atol, f"max abs error {error:.3g} > {atol:.3g}"
    else:
        torch_error = max_abs_error(torch_low_precision, fp32_reference)
        bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
        assert error <= bound, f"max abs error {error:.3g} > 2 x PyTorch's {torch_error:.3g} + floor"
    return error
