"""The attention kernels' autotuning is kept on disk: a second process reads the first one's
choice instead of timing the configs again, for a new token count of a bucket already tuned
too; a new bucket is timed.

Each process runs this file as a script on a stand-in Ampere GPU: the driver reports sm_86,
the kernel launches are recorded instead of run, and the timing (the autotuner's do_bench)
gives each config a made-up time. The first process prefers the largest tiles, the second
the smallest, so a second process that timed again would choose differently. (The test
session runs the kernels in Triton's interpreter, which tunes nothing.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAD_DIM = 80


def autotuned_kernels():
    import importlib

    # The package exports functions of these modules' names.
    policy = importlib.import_module("mematte_kernels.triton.policy_attention")
    relpos = importlib.import_module("mematte_kernels.triton.relpos_attention")
    varlen = importlib.import_module("mematte_kernels.triton.varlen_attention")
    backward = importlib.import_module("mematte_kernels.triton.attention_backward")
    # (name, kernel, flags): varlen's statistics pass is the forward kernel, tuned apart.
    return [
        ("_varlen_attention_kernel", varlen._varlen_attention_kernel, {"STATS_ONLY": False}),
        ("_varlen_attention_kernel[statistics]", varlen._varlen_attention_kernel, {"STATS_ONLY": True}),
        ("_relpos_attention_kernel", relpos._relpos_attention_kernel, {}),
        ("_policy_attention_fwd_kernel", policy._policy_attention_fwd_kernel, {}),
        ("_attention_bwd_dkdv_kernel", backward._attention_bwd_dkdv_kernel, {}),
        ("_attention_bwd_dq_kernel", backward._attention_bwd_dq_kernel, {}),
    ]


def tune(prefer: str, launches: list[tuple[int, int]]) -> dict:
    """Launch every autotuned kernel once per (tokens, bucket) of ``launches``; per kernel, per
    launch, how many configs were timed and the config launched."""
    from unittest import mock

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from mematte_kernels.triton._common import head_block

    class Ampere:
        def get_current_target(self):
            return GPUTarget("cuda", 86, 32)

    driver.set_active(Ampere())
    sign = {"largest": -1, "smallest": 1}[prefer]
    results = {}
    for name, kernel, flags in autotuned_kernels():
        assert kernel.cache_results
        launched, timed = [], []

        def record_launch(*args, **kwargs):
            launched.append({name: kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")})

        def made_up_time(kernel_call, quantiles):
            kernel_call()
            timed.append(launched[-1])
            ms = 1.0 + sign * launched[-1]["BLOCK_M"] * launched[-1]["BLOCK_N"] * launched[-1]["num_warps"] / 1e6
            return [ms] * len(quantiles)

        constexprs = {"HEAD_DIM": HEAD_DIM, "BLOCK_D": head_block(HEAD_DIM), **flags}
        runs = []
        with mock.patch.object(kernel.fn, "run", record_launch), mock.patch.object(kernel, "_do_bench", made_up_time):
            for tokens, bucket in launches:
                args = [
                    torch.empty(0, dtype=torch.float16)
                    if arg.endswith("_ptr")
                    else bucket
                    if arg == "seqlen_bucket"
                    else tokens
                    for arg in kernel.arg_names
                    if arg not in constexprs and arg not in ("BLOCK_M", "BLOCK_N")
                ]
                before = len(timed)
                kernel[(1,)](*args, **constexprs)
                runs.append({"timed": len(timed) - before, "launched": launched[-1]})
        results[name] = runs
    return results


def run_process(cache_dir: Path, prefer: str, launches) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        TRITON_CACHE_DIR=str(cache_dir), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    )
    result = subprocess.run(
        [sys.executable, __file__, prefer, json.dumps(launches)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("triton-cache")
    first = run_process(cache_dir, "largest", [(700, 1024)])
    # The same bucket at another token count, then a bucket of its own.
    second = run_process(cache_dir, "smallest", [(1000, 1024), (3000, 4096)])
    return first, second


def test_first_process_times_every_config(two_processes):
    first, _ = two_processes
    # varlen (forward and statistics pass), relpos and policy forward; the dk/dv and dq kernels
    assert len(first) == 6
    for name, [run] in first.items():
        assert run["timed"] > 1, name


def test_second_process_reads_the_choice_from_disk(two_processes):
    first, second = two_processes
    for name, runs in second.items():
        assert runs[0]["timed"] == 0, f"{name} timed its configs again"
        assert runs[0]["launched"] == first[name][0]["launched"], name


def test_a_new_bucket_is_timed(two_processes):
    first, second = two_processes
    for name, runs in second.items():
        assert runs[1]["timed"] == first[name][0]["timed"], name
        # This process's made-up times prefer other tiles than the first's.
        assert runs[1]["launched"] != first[name][0]["launched"], name


if __name__ == "__main__":
    json.dump(tune(sys.argv[1], [tuple(launch) for launch in json.loads(sys.argv[2])]), sys.stdout)
