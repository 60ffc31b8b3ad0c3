"""One training step of the model (MEMatte-S with its ViTMatte-S teacher: forward, the
six losses, backward; no data loading or optimiser), the fast training table against the
reference backend, each in a fresh process: seconds per step and peak memory (peak RSS on
a CPU, CUDA max allocated on a GPU), and the losses of both, which must agree.

Default: crop 512, batch 2, fp32 and bf16 autocast (fp16 on a GPU), 3 steps of which the
first is not timed. Smoke (--benchmark-disable): crop 64, 2 steps, fp32.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "forward_backward_worker.py"
# Relative loss difference fast vs reference: fp32 is the golden parity bar; low precision
# runs its own arithmetic in each table, and routing may differ on a few tokens.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 5e-2}


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference_runs():
    return {}


@pytest.mark.parametrize("precision", ["fp32", "low"])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_forward_backward(impl, precision, settings, record, reference_runs):
    gpu = settings.device.type == "cuda"
    if precision == "low":
        if settings.smoke:
            pytest.skip("smoke runs fp32 only")
        precision = "fp16" if gpu else "bf16"
    crop, steps, warmup = (64, 2, 1) if settings.smoke else (512, 3, 1)
    spec = {
        "backend": "reference" if impl == "reference" else "auto",
        "crop": crop,
        "batch": 2,
        "precision": precision,
        "steps": steps,
        "warmup": warmup,
    }
    result = _run(spec)
    if impl == "reference":
        reference_runs[precision] = result
    elif precision in reference_runs:
        expected = reference_runs[precision]["losses"]
        for name, value in result["losses"].items():
            assert abs(value - expected[name]) <= LOSS_RTOL[precision] * abs(expected[name]) + 1e-7, (
                name,
                value,
                expected[name],
            )
    record(
        kind="forward_backward",
        group=f"forward+backward vit_s+teacher {crop}x{crop} x2 {precision}",
        case=f"forward-backward-{crop}-{precision}",
        impl=impl,
        backend=result["backend"],
        dtype=precision,
        time_s=result["s_per_step"],
        peak_mem_bytes=result["peak_bytes"],
        loaded_rss_bytes=result["loaded_rss_bytes"],
        mem_kind="CUDA max allocated" if gpu else "peak RSS of a fresh process",
        routed=result["routed"],
        timer=f"median s/step of {steps - warmup} steps (forward, losses, backward)",
    )
