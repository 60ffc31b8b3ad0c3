"""Models people already run through other libraries, eager against ``mematte.accelerate``:
HF transformers' ``VitMatteForImageMatting`` (ViT-S, through ``VitMatteImageProcessor``) at
1024², 2048² and 3840x2160, and timm's ``samvit_base_patch16`` (built for 1024²)
``forward_features`` at 1024² and 2048², in fp32 and bf16. The eager model is each group's
reference (impl "reference"), of the same dtype.

Every case is one fresh process (bench/peers_worker.py) giving its latency, its peak RSS
and its output; from 2048² on that is one forward, below it the second of two. Accelerated
outputs are checked against the eager fp32 output of their size where it ran: fp32 within
mean |Δ| 1e-5 and max 1e-3 (alpha) or relative 1e-4 (features), bf16 within twice the eager
bf16 error; accelerated HF at 2048² must peak at most 3 GB. Eager cases whose estimated peak
does not fit the memory available now are skipped (HF's at 2048² fp32 needs ~20 GB: its
global layers build N×N logits three times).

    pytest bench/test_bench_peers.py                           the sizes above
    pytest bench/test_bench_peers.py --bench-sizes 1024        one size for both models
    pytest bench/test_bench_peers.py --benchmark-disable       smoke: 256², fp32, in process
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import harness
import peers_worker

HF_SIZES = (harness.Size(1024, 1024), harness.Size(2048, 2048), harness.Size(3840, 2160))
TIMM_SIZES = (harness.Size(1024, 1024), harness.Size(2048, 2048))
SMOKE_SIZE = harness.Size(256, 256)
HEADS = {"hf_vitmatte": 6, "timm_samvit_base": 12}


@dataclass(frozen=True)
class PeerCase:
    model: str  # a peers_worker.MODELS name
    size: harness.Size
    dtype: torch.dtype
    impl: str  # "reference" (the eager model) | "fast" (accelerated)

    @property
    def dtype_name(self) -> str:
        return harness.DTYPE_NAMES[self.dtype]

    @property
    def group(self) -> str:
        return f"{self.model} {self.size.id}"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.size.id}-{self.dtype_name}-{'eager' if self.impl == 'reference' else 'accelerated'}"

    @property
    def tokens(self) -> int:
        # HF's processor pads to multiples of 32; timm takes the input as it is.
        pad = 32 if self.model == "hf_vitmatte" else 16
        return -(-self.size.height // pad) * pad // 16 * (-(-self.size.width // pad) * pad // 16)


def cases(settings) -> list[PeerCase]:
    dtypes = (torch.float32,) if settings.smoke else settings.dtypes
    out = []
    for model, default in (("hf_vitmatte", HF_SIZES), ("timm_samvit_base", TIMM_SIZES)):
        sizes = settings.sizes or ((SMOKE_SIZE,) if settings.smoke else default)
        # Eager first in each size: the accelerated cases are checked against its outputs.
        out += [
            PeerCase(model, size, dtype, impl) for size in sizes for dtype in dtypes for impl in ("reference", "fast")
        ]
    return out


def pytest_generate_tests(metafunc):
    if "peer_case" in metafunc.fixturenames:
        found = cases(metafunc.config.stash[harness.SETTINGS])
        metafunc.parametrize("peer_case", found, ids=[c.id for c in found])


def peak_bytes(case: PeerCase) -> int:
    """An estimate of a forward's peak RSS, to skip what cannot fit: interpreter and
    weights, ViTMatte's full-resolution decoder planes, and for the eager models their
    global attention's N×N tensors (HF: logits, logits plus the row terms, plus the column
    terms; timm: the position bias and the fused attention's own copy)."""
    planes = 24 * case.size.pixels * 4 if case.model == "hf_vitmatte" else 0
    copies = 0 if case.impl == "fast" else 3 if case.model == "hf_vitmatte" else 2
    return int(1.5e9 + planes + copies * HEADS[case.model] * case.tokens**2 * case.dtype.itemsize)


@pytest.fixture(scope="module")
def outputs():
    """Eager outputs kept for the accelerated cases of their size: {(model, size, dtype): tensor}."""
    return {}


def run(case: PeerCase, settings, directory: Path) -> tuple[dict, torch.Tensor]:
    spec = {"model": case.model, "width": case.size.width, "height": case.size.height, "dtype": case.dtype_name,
            "accelerate": case.impl == "fast", "runs": 1 if case.size.pixels >= 2048 * 2048 else 2,
            "out": str(directory / f"{case.id}.pt")}  # fmt: skip
    if settings.smoke:  # in process: the smoke run checks outputs, not memory
        spec["runs"] = 1
        result = peers_worker.main(spec)
    else:
        proc = subprocess.run([sys.executable, str(Path(peers_worker.__file__)), json.dumps(spec)],
                              capture_output=True, text=True, cwd=harness.ROOT)  # fmt: skip
        if proc.returncode < 0 or (proc.returncode and any(m in proc.stderr for m in harness.ALLOCATION_FAILURES)):
            pytest.skip(f"{case.id}: out of memory ({proc.stderr.strip().splitlines()[-1:]})")
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    out = torch.load(spec["out"])
    Path(spec["out"]).unlink()
    return result, out


def errors(case: PeerCase, out: torch.Tensor, expected: torch.Tensor) -> dict:
    if case.model == "hf_vitmatte":
        delta = (out - expected).abs()
        return {"alpha_mean_abs_error": float(delta.mean()), "alpha_max_abs_error": float(delta.max())}
    return {"rel_error": harness.relative_error(out, expected)}


def test_peer(peer_case, settings, outputs, record, tmp_path):
    case = peer_case
    if settings.device.type != "cpu":
        pytest.skip("the peers' benchmark runs on the CPU")
    if case.impl == "reference":
        reason = harness.fits(peak_bytes(case), settings.device)
        if reason:
            pytest.skip(reason)
    result, out = run(case, settings, tmp_path)
    checks = {}
    eager_fp32 = outputs.get((case.model, case.size, torch.float32))
    if case.impl == "reference":
        outputs[(case.model, case.size, case.dtype)] = out
        if case.dtype != torch.float32 and eager_fp32 is not None:
            checks = errors(case, out, eager_fp32)
    elif eager_fp32 is not None:
        checks = errors(case, out, eager_fp32)
        eager = outputs.get((case.model, case.size, case.dtype))
        if case.dtype == torch.float32 and case.model == "hf_vitmatte":
            assert checks["alpha_mean_abs_error"] <= 1e-5 and checks["alpha_max_abs_error"] <= 1e-3, checks
        elif case.dtype == torch.float32:
            assert checks["rel_error"] <= 1e-4, checks
        elif eager is not None:
            bound = {name: 2 * value for name, value in errors(case, eager, eager_fp32).items()}
            assert all(checks[name] <= bound[name] for name in bound), f"{checks} vs twice eager bf16's {bound}"
    record(kind="model", group=case.group, case=case.id, impl=case.impl, model=case.model, size=case.size.id,
           tokens=case.tokens, dtype=case.dtype_name, megapixels=case.size.pixels / 1e6, backend=result["backend"],
           time_s=result["latency_s"], cpu_s=result["cpu_s"], rounds=1,
           timer="in process, one run (smoke)" if settings.smoke else "one run in a fresh process",
           peak_mem_bytes=None if settings.smoke else result["peak_rss_bytes"],
           loaded_rss_bytes=result["loaded_rss_bytes"], mem_kind="peak RSS of a fresh process", **checks)  # fmt: skip
    at_2048 = case.size == harness.Size(2048, 2048)
    if case.model == "hf_vitmatte" and case.impl == "fast" and at_2048 and not settings.smoke:
        # What accelerating is for: HF's ViT-S at 2048² in at most 3 GB (eager: ~20 GB).
        assert result["peak_rss_bytes"] <= 3e9, f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB"
