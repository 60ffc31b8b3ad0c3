"""``model.estimate_memory``: against the peak resident memory of fresh processes matting
one image on the CPU (tests/memory_worker.py), and as ``mematte info --size`` prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mematte import FastMEMatte, FastViTMatte
from mematte.cli import main

WORKER = Path(__file__).with_name("memory_worker.py")
ROOT = WORKER.parents[1]
# Sizes apart from those the constants were fitted at (256² .. 2048², docs/serving.md).
CASES = [
    ("mematte", "bfloat16", 384, 640),
    ("mematte", "float32", 640, 480),
    ("vitmatte", "bfloat16", 640, 480),
    ("vitmatte", "float32", 384, 640),
]


@pytest.fixture(scope="module")
def measured():
    """Every case's worker at once (they are small), each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), kind, dtype, str(h), str(w)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind, dtype, h, w in CASES
    ]
    results = {}
    for case, proc in zip(CASES, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results[case] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("case", CASES, ids=[f"{k}-{d}-{h}x{w}" for k, d, h, w in CASES])
def test_estimate_is_within_25_percent_of_the_measured_peak(measured, case):
    result = measured[case]
    assert 0.75 <= result["estimated"] / result["measured"] <= 1.25, result


@pytest.mark.parametrize("cls", [FastMEMatte, FastViTMatte])
def test_estimate_grows_with_the_image_and_the_dtype(cls):
    small, large = cls("vit_s", dtype=torch.float32), cls("vit_s", dtype=torch.bfloat16)
    sizes = [(64, 64), (512, 512), (1080, 1920), (2160, 3840)]
    fp32 = [small.estimate_memory(h, w) for h, w in sizes]
    assert fp32 == sorted(fp32) and len(set(fp32)) == len(fp32)
    assert all(large.estimate_memory(h, w) < e for (h, w), e in zip(sizes, fp32))
    with pytest.raises(ValueError, match="at least one pixel"):
        small.estimate_memory(0, 10)


def test_info_prints_the_estimate_for_each_size(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--size", "3840x2160", "--size", "640×480"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("memory:")]
    assert len(lines) == 2 and "3840×2160" in lines[0] and "640×480" in lines[1]
    model = FastMEMatte.from_checkpoint(
        torch.load(checkpoint, weights_only=True), dtype=torch.bfloat16 if "bfloat16" in lines[0] else torch.float32
    )
    assert f"{model.estimate_memory(2160, 3840) / 2**30:.2f} GiB" in lines[0]


def test_info_refuses_a_malformed_size(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--size", "3840by2160"]) == 2
    assert "not a size like 3840x2160" in capsys.readouterr().err
