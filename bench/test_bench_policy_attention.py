"""Policy attention (MEMatte's routed blocks in training) against the dense reference.

MEMatte-S shapes: 6 heads of 64, batch 2, N = 1024 tokens (a 512 px image) and 4096
(1024 px), a random 0/1 policy. "fast" is what the public op runs for the device
(``dispatch.resolve("auto", device)``: the Triton kernels on GPU, the CPU path on CPU);
"reference" is :func:`mematte_kernels.reference.policy_attention`, whose N x N matrices the
kernels never hold. ``forward`` times the output alone, ``forward+backward`` the output and
the gradients of q, k, v and the policy. Each fast case is first checked against the
reference on the same inputs. Memory: on GPU the peak allocated while timed; on CPU the
peak RSS of a fresh process running one call, above what it held with the inputs made.

    pytest bench/test_bench_policy_attention.py                      # timings
    pytest bench/test_bench_policy_attention.py --benchmark-disable  # smoke test: each runs once
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mematte_kernels import dispatch, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 on CPU runs PyTorch's matmuls at their fp32 rate without AMX: fp32 only there.
DTYPES = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if DEVICE.type == "cuda" else {})
BATCH, HEADS, HEAD_DIM = 2, 6, 64
TOKENS = [1024, 4096]
PASSES = ["forward", "forward+backward"]
IMPLS = ["reference", "fast"]
# Fast vs reference, relative to the reference's largest magnitude: fp32 and bf16 (2x
# PyTorch's bf16 error, rounded up).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def inputs(tokens: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, tokens, HEADS, HEAD_DIM, generator=g).to(DEVICE, dtype) for _ in range(3))
    policy = (torch.rand(BATCH, tokens, generator=g) > 0.5).float().to(DEVICE)
    dout = torch.randn(BATCH, tokens, HEADS, HEAD_DIM, generator=g).to(DEVICE, dtype)
    return q, k, v, policy, dout


def step(fn, q, k, v, policy, dout, backward: bool):
    if not backward:
        return (fn(q, k, v, policy),)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, policy)]
    out = fn(*leaves)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


# One call in a fresh process; prints its peak RSS above what it held with the inputs made,
# in bytes (VmHWM, not ru_maxrss: Linux carries that over exec from the forked parent).
_PEAK_RSS_SCRIPT = """
import json, sys
sys.path.insert(0, {bench!r})
import torch
import test_bench_policy_attention as bench
from worker import status_bytes
from mematte_kernels import dispatch, reference
fn = dispatch.resolve("auto", "cpu").policy_attention if {impl!r} == "fast" else reference.policy_attention
args = bench.inputs({tokens}, getattr(torch, {dtype!r}))
before = status_bytes("VmRSS")
bench.step(fn, *args, {backward})
print(json.dumps(status_bytes("VmHWM") - before))
"""


def cpu_peak_rss(tokens: int, dtype: torch.dtype, impl: str, backward: bool) -> int:
    script = _PEAK_RSS_SCRIPT.format(
        bench=str(Path(__file__).parent),
        impl=impl,
        tokens=tokens,
        dtype=str(dtype).removeprefix("torch."),
        backward=backward,
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy(), check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def synchronized(call):
    def run():
        result = call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("tokens", TOKENS, ids=[f"N{n}" for n in TOKENS])
def test_policy_attention(benchmark, tokens, passes, dtype_name, impl):
    dtype = DTYPES[dtype_name]
    backward = passes == "forward+backward"
    fast = dispatch.resolve("auto", DEVICE).policy_attention
    if impl == "fast" and fast is reference.policy_attention:
        pytest.skip(f"the {DEVICE.type} path is the reference")
    fn = fast if impl == "fast" else reference.policy_attention
    args = inputs(tokens, dtype)
    if impl == "fast":
        got, expected = step(fast, *args, backward), step(reference.policy_attention, *args, backward)
        for name, a, e in zip(("out", "dq", "dk", "dv", "dpolicy"), got, expected):
            error = (a.float() - e.float()).abs().max().item() / e.float().abs().max().item()
            assert error <= RTOL[dtype], f"{name}: relative error {error:.2e} vs reference"
        del got, expected

    flops = 4 * BATCH * HEADS * tokens**2 * HEAD_DIM * (3.5 if backward else 1)  # backward: 2.5x forward
    benchmark.group = f"policy_attention B{BATCH}-N{tokens}-h{HEADS} {passes} {dtype_name} ({DEVICE.type})"
    benchmark.extra_info.update(impl=impl, dtype=dtype_name, flops=flops)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The dense reference takes minutes at N = 4096 on a CPU: one round there.
    slow = DEVICE.type == "cpu" and tokens > 1024
    result = benchmark.pedantic(
        synchronized(lambda: step(fn, *args, backward)), rounds=1 if slow else 3, warmup_rounds=0 if slow else 1
    )
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    elif not benchmark.disabled:
        benchmark.extra_info["peak_mem_bytes"] = cpu_peak_rss(tokens, dtype, impl, backward)
    assert all(torch.isfinite(t).all() for t in result)
