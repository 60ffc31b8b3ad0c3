"""Build, test and benchmark everything on a machine with one CUDA GPU, in one go:

    python bench/gpu_report.py [--bench-full]

1. ``pip install --no-build-isolation --no-deps -e .`` (compiles the CUDA extension)
2. ``pytest tests -m gpu``, then the whole test suite
3. ``compute-sanitizer --tool memcheck`` on every kernel run once (when it is on PATH or
   in the CUDA toolkit)
4. ``pytest bench``, whose summary table is printed again at the end

Each step's output goes to ``bench/results/gpu-report-<time>/<step>.log``. The exit status
is non-zero when any step failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_step(name: str, command: list[str], logs: Path, env: dict | None = None) -> bool:
    log = logs / f"{name}.log"
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    ok = proc.returncode == 0
    print(f"   {'ok' if ok else f'FAILED (exit {proc.returncode})'} in {time.perf_counter() - start:.0f} s; log: {log.relative_to(ROOT)}")
    if not ok:
        print("   " + "\n   ".join(log.read_text().splitlines()[-30:]))
    return ok


def run_kernels_once() -> None:
    """Every op of every GPU backend once, on small inputs in each precision, then a small
    whole-model forward: what compute-sanitizer watches."""
    import harness  # imports the package, which exists once the install step has run
    from mematte import FastMEMatte
    from mematte_kernels import dispatch

    device = torch.device("cuda")
    weights = harness.base_weights("vit_s")
    size = harness.Size(512, 512)
    for backend in ("cuda", "triton"):
        table = dispatch.resolve(backend, device)
        for dtype in harness.DTYPE_NAMES:
            for op, spec in harness.OPS.items():
                if op == "router" and dtype != torch.float32:
                    continue  # the model runs its routers in fp32 whatever its dtype
                case = harness.OpCase(op, "vit_s", size, None if op == "router" else 0.25, dtype, "fast")
                getattr(table, spec.function)(*harness.op_inputs(case, weights, device)["args"])
            _ltrm_and_window_ops(table, dtype, device)
            model = FastMEMatte("vit_s", backend=backend, dtype=dtype).to(device)
            with torch.inference_mode():
                model({"image": torch.rand(1, 3, 256, 320, device=device), "trimap": torch.rand(1, 1, 256, 320, device=device)})
    torch.cuda.synchronize()
    print("every kernel ran once")


def _ltrm_and_window_ops(table, dtype: torch.dtype, device: torch.device) -> None:
    C, heads, d = 384, 6, 64

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    keep = torch.rand(2, 300, device=device) < 0.3
    scores = torch.randn(2, 300, 2, device=device).log_softmax(-1)
    table.token_index(table.cap_tokens(keep, scores, 50))
    table.dwconv_gelu(randn(1, 20, 24, 2 * C), randn(2 * C, 1, 5, 5), randn(2 * C))
    table.eca(randn(1, 20, 24, C), randn(1, 1, 5), randn(1, 20, 24, C))
    table.window_attention(randn(1, 20, 30, 3 * C), randn(3 * C), randn(14, 14, d), randn(14, 14, d), heads, d**-0.5, 14)
    table.channels_first_layer_norm(randn(1, C, 20, 24), randn(C), randn(C), 1e-6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-full", action="store_true", help="pass --bench-full to pytest bench (ViT-B, 8K)")
    parser.add_argument("--kernels-once", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's target
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_report.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.kernels_once:
        run_kernels_once()
        return 0

    logs = RESULTS / f"gpu-report-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True)
    py = sys.executable
    if not run_step("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], logs):
        return 1  # nothing after this means anything without the extension
    results = {
        "tests-gpu": run_step("tests-gpu", [py, "-m", "pytest", "tests", "-m", "gpu", "-q"], logs),
        "tests": run_step("tests", [py, "-m", "pytest", "tests", "-q"], logs),
    }
    # On PATH, or where the CUDA toolkit that built the extension keeps it.
    from torch.utils.cpp_extension import CUDA_HOME

    sanitizer = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path=f"{CUDA_HOME}/bin")
    if sanitizer:
        # Without the caching allocator every tensor is its own allocation, so an access past
        # its end is caught instead of landing in a neighbour.
        results["memcheck"] = run_step(
            "memcheck",
            [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", py, str(Path(__file__).resolve()),
             "--kernels-once"],  # fmt: skip
            logs,
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        )
    else:
        print("== memcheck: skipped, compute-sanitizer is not on PATH")
    started = time.time()
    bench = [py, "-m", "pytest", "bench", "-q", *(["--bench-full"] if args.bench_full else [])]
    results["bench"] = run_step("bench", bench, logs)

    latest = RESULTS / f"latest-{report.device_slug(report.machine(torch.device('cuda')))}.json"
    print()
    if latest.exists() and latest.stat().st_mtime >= started:
        print(report.load_table(latest))
    print("\n" + "  ".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
