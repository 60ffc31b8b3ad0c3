"""The one-call GPU script, run end to end on whatever machine this is: without a GPU its
GPU steps are skipped, and the kernel calls and attention measurement it would hand to the
GPU run at tiny sizes in Triton's interpreter, so a broken script shows here rather than on
a lent GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("gpu_report.py")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script builds and benchmarks for minutes")
def test_runs_end_to_end_without_a_gpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"),
                             "--budget", "900"], capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [path] = (tmp_path / "out").glob("*.json")
    doc = json.loads(path.read_text())
    status = {name: step["status"] for name, step in doc["steps"].items()}
    assert status == {
        "build": "skipped", "tests-gpu": "ok", "memcheck": "skipped", "racecheck": "skipped",
        "kernel-calls": "ok", "attention": "ok", "bench-2048": "skipped", "bench-3840x2160": "skipped",
    }  # fmt: skip
    assert "skipped" in doc["steps"]["tests-gpu"]["log_tail"][-1]  # GPU tests were collected, then skipped
    assert "calls on cpu" in doc["steps"]["kernel-calls"]["log_tail"][-1]
    assert [r["op"] for r in doc["attention"]] == ["varlen_attention", "global_attention"]
    assert all(r["tflops"] > 0 and r["sdpa_tflops"] > 0 for r in doc["attention"])
    assert doc["machine"]["device"] == "cpu"
