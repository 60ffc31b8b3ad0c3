"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) compute bfloat16 as the GPU does.

The interpreter stores bfloat16 as raw ``uint16`` bit patterns, and two of its paths that
the kernels here rely on get the value wrong:

* ``tl.dot`` converts only 8-bit float operands before ``np.matmul``, so a bfloat16 dot
  multiplies bit patterns (triton-lang/triton#11584; upstream treats bfloat16 as not yet
  supported by the interpreter).
* fp32 -> bfloat16 casts truncate, where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest
  even; truncation doubles the rounding error of every bfloat16 output.

Both are replaced by exact conversions through torch. The patch is applied only when the
interpreter is on and changes nothing for other dtypes.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _as_fp32_operand(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    # bf16 x bf16 products are exact in fp32, so this is what the tensor cores compute.
    return interpreter.TensorHandle(_bf16_bits_to_fp32(handle.data), tl.float32)


def apply() -> None:
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_mematte_bf16_fixed", False):
        return
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def create_dot_bf16(self, a, b, *accumulator_and_options):
        return create_dot(self, _as_fp32_operand(a), _as_fp32_operand(b), *accumulator_and_options)

    def cast_impl_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot = create_dot_bf16
    builder.cast_impl = cast_impl_rtne
    builder._mematte_bf16_fixed = True
