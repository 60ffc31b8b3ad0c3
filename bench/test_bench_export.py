"""The exported ONNX graph in ONNX Runtime's CPU provider against this package's fast path
(backend "auto", fp32) and the reference (fp32), FastViTMatte-S and FastMEMatte-S, image +
trimap -> alpha, one image at 1024², 2048² and 3840x2160.

Every case is one run in a fresh process, which gives its latency and its peak RSS: the
ONNX one imports only numpy and onnxruntime (bench/onnx_worker.py), the PyTorch ones the
package (bench/worker.py). Both models are exported once per session, and every size runs
from that one file. The ONNX alpha is checked against the reference's (mean |Δ| ≤ 1e-4,
MEMatte's routing decisions ≥ 99.5 % equal) where the reference ran, else against the fast
path's; the reference is skipped where its estimated peak does not fit (ViTMatte's at
2048² needs ~20 GB). MEMatte's routers are calibrated as in test_bench_model (25 % routed),
with the default cap of 18,500 tokens.

    pytest bench/test_bench_export.py                       1024², 2048², 3840x2160
    pytest bench/test_bench_export.py --bench-sizes 2048    one size
    pytest bench/test_bench_export.py --benchmark-disable   smoke: MEMatte at 256², ONNX
                                                            against the reference
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mematte import FastMEMatte, FastViTMatte
from mematte.model import DEFAULT_MAX_TOKENS

import harness
import test_bench_vitmatte

pytest.importorskip("onnxruntime")

DEFAULT_SIZES = (harness.Size(1024, 1024), harness.Size(2048, 2048), harness.Size(3840, 2160))
IMPLS = ("reference", "fast", "onnx")  # reference first: the others are checked against it
ALPHA_TOLERANCE = 1e-4
DECISIONS_AGREEMENT = 0.995


@dataclass(frozen=True)
class ExportCase:
    model: str  # "vitmatte" | "mematte"
    size: harness.Size
    impl: str  # one of IMPLS
    variant: str = "vit_s"
    dtype: torch.dtype = torch.float32

    @property
    def backend(self) -> str:
        return "reference" if self.impl == "reference" else "auto"

    @property
    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS if self.model == "mematte" else None

    @property
    def group(self) -> str:
        return f"export {self.model} {self.variant} {self.size.id}"

    @property
    def id(self) -> str:
        return f"export-{self.model}-{self.variant}-{self.size.id}-fp32-{self.impl}"


def export_cases(settings) -> list[ExportCase]:
    if settings.smoke:  # MEMatte's path covers ViTMatte's, and its routing
        return [ExportCase("mematte", harness.Size(256, 256), impl) for impl in ("reference", "onnx")]
    sizes = settings.sizes or DEFAULT_SIZES
    return [ExportCase(model, size, impl) for size in sizes for model in ("vitmatte", "mematte") for impl in IMPLS]


def pytest_generate_tests(metafunc):
    if "export_case" in metafunc.fixturenames:
        cases = export_cases(metafunc.config.stash[harness.SETTINGS])
        metafunc.parametrize("export_case", cases, ids=[c.id for c in cases])


# ------------------------------------------------------------------------ files


def weights_path(case: ExportCase, data) -> Path:
    if case.model == "vitmatte":
        return test_bench_vitmatte.weights_path(data, case.variant)
    return data.weights_path(case.variant, case.size, harness.ROUTED_FRACTION)


def onnx_path(case: ExportCase, data) -> Path:
    """The case's model exported once: every size of a model (and, for MEMatte, of a
    calibration) runs from one file."""
    from mematte.export import export_onnx

    weights = weights_path(case, data)
    path = data.directory / f"{weights.stem}.onnx"
    if not path.exists():
        cls = FastViTMatte if case.model == "vitmatte" else FastMEMatte
        model = cls.from_checkpoint(weights, backend="reference")
        export_onnx(model, path, max_tokens=case.max_tokens)
    return path


def numpy_inputs(case: ExportCase, data) -> Path:
    path = data.directory / f"inputs-{case.size.id}.npz"
    if not path.exists():
        image, trimap = data.inputs(case.size)
        np.savez(path, image=image.cpu().numpy(), trimap=trimap.cpu().numpy())
    return path


# ------------------------------------------------------------------------ runs


def unavailable(case: ExportCase) -> str | None:
    """Why a PyTorch case cannot run here (its estimated peak does not fit: the
    reference's attention is quadratic in the tokens), or None."""
    cpu = torch.device("cpu")
    if case.model == "vitmatte":
        vit_case = test_bench_vitmatte.ViTMatteCase(case.variant, case.size, case.dtype, case.impl)
        return test_bench_vitmatte.unavailable(vit_case, cpu, test_bench_vitmatte.model_peak_bytes(vit_case))
    return harness.model_unavailable(harness.ModelCase(case.variant, case.size, case.dtype, case.impl), cpu)


def run_torch(case: ExportCase, data, alpha_path: Path) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    reason = unavailable(case)
    if reason:
        pytest.skip(reason)
    try:
        result = harness.run_worker(case, weights_path(case, data), data.inputs_path(case.size), alpha_path=alpha_path)
    except MemoryError as e:
        pytest.skip(str(e))
    saved = torch.load(alpha_path)
    alpha_path.unlink()
    decisions = [d[0, ..., 0].numpy() for d in saved["decisions"]]
    return result, saved["alpha"].numpy(), decisions


def run_onnx(case: ExportCase, data, alpha_path: Path) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    spec = {"model": str(onnx_path(case, data)), "inputs": str(numpy_inputs(case, data)), "alpha_out": str(alpha_path)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("onnx_worker.py")), json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    if proc.returncode < 0:
        pytest.skip(f"ONNX Runtime worker for {case.id} killed by signal {-proc.returncode} (out of memory?)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(alpha_path) as saved:
        alpha = saved["alpha"]
        decisions = list(saved["decisions"]) if "decisions" in saved else []
    alpha_path.unlink()
    result["backend"] = "onnxruntime CPUExecutionProvider"
    result["routed"] = [float(d.mean()) for d in decisions]
    return result, alpha, decisions


def against(case: ExportCase, data, alpha: np.ndarray, decisions: list[np.ndarray]) -> dict:
    """Keep the reference's and the fast path's outputs for the ONNX case of their size;
    the ONNX case's error against the reference where it ran, else against the fast path."""
    key = ("export", case.model, case.size)
    kept = data.reference_alpha.setdefault(key, {})
    if case.impl != "onnx":
        kept[case.impl] = alpha, decisions
        return {}
    oracle = "reference" if "reference" in kept else "fast" if "fast" in kept else None
    if oracle is None:
        return {}
    expected_alpha, expected_decisions = kept.pop(oracle)
    kept.clear()
    error = float(np.abs(alpha - expected_alpha).mean())
    assert alpha.shape == expected_alpha.shape
    assert error <= ALPHA_TOLERANCE, f"{case.id}: mean |alpha - {oracle} fp32| = {error:.2e}"
    fields = {"compared_with": oracle, "alpha_mean_abs_error": error}
    if expected_decisions:
        equal = sum(int((a == b).sum()) for a, b in zip(decisions, expected_decisions))
        agreement = equal / sum(d.size for d in expected_decisions)
        assert agreement >= DECISIONS_AGREEMENT, f"{case.id}: routing decisions {agreement:.4f} equal to the {oracle}'s"
        fields["decisions_agreement"] = agreement
    return fields


def test_export(export_case, settings, data, record):
    case = export_case
    if settings.device.type != "cpu":
        pytest.skip("ONNX Runtime's CPU provider against the package on the CPU")
    alpha_path = data.directory / f"alpha-{case.id}.{'npz' if case.impl == 'onnx' else 'pt'}"
    result, alpha, decisions = (run_onnx if case.impl == "onnx" else run_torch)(case, data, alpha_path)
    accuracy = against(case, data, alpha, decisions)
    record(
        kind="model", group=case.group, case=case.id, impl=case.impl, variant=case.variant, model=case.model,
        size=case.size.id, tokens=case.size.tokens, dtype="fp32", max_tokens=case.max_tokens,
        megapixels=case.size.pixels / 1e6, backend=result["backend"], time_s=result["latency_s"], rounds=1,
        timer="one run in a fresh process", peak_mem_bytes=result["peak_rss_bytes"],
        loaded_rss_bytes=result["loaded_rss_bytes"], mem_kind="peak RSS of a fresh process",
        routed=result.get("routed", []), **accuracy,
    )  # fmt: skip
