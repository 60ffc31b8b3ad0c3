"""One training iteration of ``mematte train`` (MEMatte-S, with the ViTMatte teacher, data
loading and AdamW step included): seconds per iteration and peak memory, the fast ops
against the reference backend in the same precision, each in a fresh process.

Default: crop 512, batch 2, fp32 and bf16 autocast on a CPU (fp16 autocast on a GPU, as
published), 6 iterations of which the first 2 are not timed (``--bench-train-iters N``: N,
the first of every three untimed). Smoke (--benchmark-disable): crop 64, 2 iterations, the
first precision only.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mematte.model import FastMEMatte

import harness

WORKER = Path(__file__).parent / "train_worker.py"


def pytest_generate_tests(metafunc):
    if "precision" in metafunc.fixturenames:
        settings = metafunc.config.stash[harness.SETTINGS]
        precisions = ["fp16"] if settings.device.type == "cuda" else ["fp32", "bf16"]
        metafunc.parametrize("precision", precisions[:1] if settings.smoke else precisions)


@pytest.mark.skipif(
    "teacher" not in inspect.signature(FastMEMatte.__init__).parameters,
    reason="FastMEMatte has no training mode in this build",
)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_train_step(impl, precision, settings, record):
    gpu = settings.device.type == "cuda"
    iters = settings.train_iters
    crop, iters, warmup = (64, 2, 1) if settings.smoke else (512, iters, max(1, iters // 3))
    spec = {
        "crop": crop,
        "batch_size": 2,
        "precision": precision,
        "iters": iters,
        "warmup": warmup,
        "backend": "reference" if impl == "reference" else "auto",
    }
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    record(
        kind="train",
        group=f"train step vit_s {crop}x{crop} x2 {precision}",
        case=f"train-{crop}-{precision}",
        impl=impl,
        dtype=precision,
        time_s=result["s_per_iter"],
        peak_mem_bytes=result["peak_bytes"],
        mem_kind="CUDA max allocated" if gpu else "peak RSS of a fresh process",
        routed=result["routed"],
        timer=f"median s/iter of {iters - warmup} iterations (data, forward, backward, AdamW)",
    )
