"""MEMATTE_TRITON_AUTOTUNE=0 runs every autotuned kernel's first config instead of timing them
all: what a short GPU run on a fresh machine (bench/gpu_report.py) needs, where the first
call would otherwise compile and time each config of each kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# For each autotuned kernel of the package: how many configs it would time for fp16 inputs
# (the pruning reads the dtype of q), and which config it would start with.
PROBE = """
import collections, json, sys
import torch
import mematte_kernels.triton
from triton.runtime.autotuner import Autotuner

found = {}
for name, module in list(sys.modules.items()):
    if not name.startswith("mematte_kernels.triton."):
        continue
    for attr, tuner in vars(module).items():
        if isinstance(tuner, Autotuner):
            tuner.nargs = collections.defaultdict(lambda: torch.empty(0, dtype=torch.float16))
            configs = tuner.prune_configs({})
            found[f"{name}.{attr}"] = [len(configs), str(configs[0])]
print(json.dumps(found))
"""


def probe(autotune: str | None) -> dict:
    # Compiled for a GPU, not the interpreter: that one has one config per kernel anyway.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMATTE_TRITON_AUTOTUNE")}
    if autotune is not None:
        env["MEMATTE_TRITON_AUTOTUNE"] = autotune
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def tuned():
    return probe(None)


def test_kernels_are_autotuned_by_default(tuned):
    assert "mematte_kernels.triton.varlen_attention._varlen_attention_kernel" in tuned
    assert all(count > 1 for count, _ in tuned.values()), tuned


def test_autotune_off_runs_the_first_config_of_each_kernel(tuned):
    fixed = probe("0")
    assert fixed.keys() == tuned.keys()
    for kernel, (count, first) in fixed.items():
        assert count == 1, kernel
        assert first == tuned[kernel][1], kernel


def test_other_values_keep_autotuning(tuned):
    assert probe("1") == tuned
