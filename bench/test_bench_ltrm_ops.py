"""CPU micro-benchmark of the compiled LTRM ops against their PyTorch references.

MEMatte-S shapes: the dwconv runs on fc1's output (2C = 768 channels), ECA on fc2's (C = 384),
with the block's residual. h x w = 64 x 64 tokens is a 1024 px image, 128 x 128 a 2048 px one.
Each group holds one op at one shape and dtype: "fast" (the mematte_kernels._C op) next to
its reference. ``bytes`` is the traffic the op cannot avoid, the same for both.

    pytest bench/test_bench_ltrm_ops.py                      # timings
    pytest bench/test_bench_ltrm_ops.py --benchmark-disable  # smoke test: each runs once
"""

from __future__ import annotations

import pytest
import torch

from mematte_kernels import ext, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENS = [64, 128]
IMPLS = ["reference", "fast"]

OPS = {
    "dwconv_gelu": (ext.dwconv_gelu, reference.dwconv_gelu),
    "eca_residual": (ext.eca, reference.eca),
}


def essential_bytes(op: str, x: torch.Tensor) -> int:
    """dwconv: read x, write the output; ECA: read z twice (statistics, then gate) and the
    residual once, write the output."""
    return (2 if op == "dwconv_gelu" else 4) * x.numel() * x.element_size()


def op_inputs(op: str, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if op == "dwconv_gelu":
        C = 768
        tensors = (
            torch.randn(1, tokens, tokens, C, generator=g),
            torch.randn(C, 1, 5, 5, generator=g) * 0.2,
            torch.randn(C, generator=g),
        )
    else:
        C = 384
        tensors = (
            torch.randn(1, tokens, tokens, C, generator=g),
            torch.randn(1, 1, 5, generator=g),
            torch.randn(1, tokens, tokens, C, generator=g),
        )
    return tuple(t.to(dtype) for t in tensors)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS, ids=[f"{t}x{t}" for t in TOKENS])
@pytest.mark.parametrize("op", list(OPS))
def test_ltrm_op_cpu(benchmark, op, tokens, dtype_name, impl):
    if impl == "fast" and not ext.available("cpu"):
        pytest.skip("mematte_kernels._C is not built")
    fn = OPS[op][0] if impl == "fast" else OPS[op][1]
    inputs = op_inputs(op, tokens, DTYPES[dtype_name])
    benchmark.group = f"{op} {tokens}x{tokens} {dtype_name} (cpu, {torch.get_num_threads()} threads)"
    benchmark.extra_info.update(impl=impl, dtype=dtype_name, bytes=essential_bytes(op, inputs[0]))
    out = benchmark(fn, *inputs)
    assert out.shape == inputs[0].shape and torch.isfinite(out).all()
