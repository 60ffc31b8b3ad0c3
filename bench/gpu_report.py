"""Everything a machine with one CUDA GPU should check and measure, in one call of at most
8 minutes:

    python3 bench/gpu_report.py [--budget 470] [--out bench/results] [--logs DIR]

Steps, in order; each has its own time limit, cut to what is left of the budget:

  build      setup.py build_ext --inplace, for the local GPU's architecture only
  tests-gpu  pytest tests -m gpu: every GPU-marked test, whichever file defines it
  memcheck   compute-sanitizer --tool memcheck over one small call of every Triton op
             (tests/kernel_calls.py), the compiled LTRM ops (and their backward), the
             window attention and a small model forward, in fp32, bf16 and fp16
  racecheck  compute-sanitizer --tool racecheck over the same calls, without the model
  attention  Triton varlen attention TFLOP/s at T = 4096 and 18500 tokens (ViT-S and ViT-B
             heads, bf16 and fp16), and ViTMatte's global attention (decomposed relative
             position, from the qkv grid) on the 128x128 and 240x135 grids of 2048² and
             3840x2160 images (ViT-S heads, bf16); torch's fused SDPA without the position
             terms on the same shapes alongside
  bench      pytest bench/test_bench_model.py at 2048² then 3840x2160: the reference (fp32)
             against the fast path in bf16 and fp16, CUDA events, max_memory_allocated

It writes ``<out>/<gpu>-<date>.json``: the machine, each step's status, time and the tail of
its log, the attention throughput and the benchmark records, and prints a short summary
last. The exit status is 1 when a step failed or ran out of time.

Without a GPU the GPU steps are skipped, each saying so, and the sanitizer's calls and the
attention measurement run once at tiny sizes on the CPU (Triton's interpreter), so that the
script itself is exercised end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import report  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_BUDGET_S = 470
BENCH_SIZES = ("2048", "3840x2160")
BENCH_SHARES = (0.4, 1.0)  # of the time left when each size starts: 4K costs about twice 2048²
# Each step's own limit (seconds); the budget left cuts it further. bench takes the rest.
STEP_LIMITS = {"build": 130, "tests-gpu": 110, "memcheck": 60, "racecheck": 45, "attention": 55}
# Without a GPU the steps that run (collecting the tests, Triton's interpreter) are slow.
CPU_STEP_LIMIT = 300
ATTENTION_LENGTHS = (4096, 18500)
ATTENTION_HEADS = {"vit_s": 6, "vit_b": 12}
GLOBAL_GRIDS = ((128, 128), (240, 135))  # (W, H) token grids of 2048² and 3840x2160 images
LOG_TAIL_LINES = 40


# ------------------------------------------------------------------------ the steps


class Runner:
    """Runs steps as subprocesses within one time budget and keeps what each one did."""

    def __init__(self, budget_s: float, logs: Path):
        self.deadline = time.monotonic() + budget_s
        self.logs = logs
        self.steps: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, name: str, reason: str) -> None:
        print(f"== {name}: skipped ({reason})", flush=True)
        self.steps[name] = {"status": "skipped", "reason": reason}

    def run(self, name: str, command: list[str], limit_s: float, env: dict | None = None) -> bool:
        timeout = min(limit_s, self.left())
        if timeout < 5:
            self.skip(name, "out of time budget")
            return False
        log = self.logs / f"{name}.log"
        print(f"== {name} (limit {timeout:.0f} s): {' '.join(command)}", flush=True)
        start = time.monotonic()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, **(env or {})})
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = "timeout"
        seconds = time.monotonic() - start
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        self.steps[name] = {"status": status, "seconds": round(seconds, 1), "command": command, "log_tail": tail}
        print(f"   {status} in {seconds:.0f} s; log: {log}", flush=True)
        if status != "ok":
            print("   " + "\n   ".join(tail[-15:]), flush=True)
        return status == "ok"


def local_arch() -> str:
    return "%d.%d" % torch.cuda.get_device_capability()


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit torch's extensions build with."""
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("compute-sanitizer")
    if found is None and CUDA_HOME:
        found = shutil.which("compute-sanitizer", path=f"{CUDA_HOME}/bin:{CUDA_HOME}/compute-sanitizer")
    return found


def fold_bench_json(started: float) -> dict | None:
    """The JSON the bench step wrote (latest-<gpu>.json, if written since ``started``)."""
    latest = RESULTS / f"latest-{report.device_slug(report.machine(torch.device('cuda')))}.json"
    if latest.exists() and latest.stat().st_mtime >= started:
        return json.loads(latest.read_text())
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <gpu>-<date>.json goes")
    parser.add_argument("--logs", type=Path, help="where each step's log goes (default: a temporary folder)")
    # The subprocesses' own entry points.
    parser.add_argument("--kernels-once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernels_once:
        run_kernels_once(ours_only=args.ours_only)
        return 0
    if args.attention:
        args.attention.write_text(json.dumps(attention_throughput(), indent=1))
        return 0

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="gpu-report-"))
    logs.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.budget, logs)
    py = sys.executable
    me = str(Path(__file__).resolve())
    no_gpu = "no CUDA GPU"
    doc: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget}

    # build: only the local architecture, which is all this run needs and the fastest to build.
    if gpu:
        doc["arch"] = local_arch()
        runner.run("build", [py, "setup.py", "build_ext", "--inplace"], STEP_LIMITS["build"],
                   env={"TORCH_CUDA_ARCH_LIST": doc["arch"], "MAX_JOBS": str(os.cpu_count() or 4)})
    else:
        runner.skip("build", no_gpu)

    # tests-gpu: without a GPU the GPU-marked tests are collected and skipped by conftest.
    runner.run("tests-gpu", [py, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
               STEP_LIMITS["tests-gpu"] if gpu else CPU_STEP_LIMIT)

    sanitizer = find_sanitizer() if gpu else None
    once = [py, me, "--kernels-once"]
    # racecheck looks at shared memory, which only the kernels of this project are checked for.
    for tool, extra in (("memcheck", []), ("racecheck", ["--ours-only"])):
        if sanitizer:
            # Without the caching allocator every tensor is its own allocation, so an access
            # past its end is caught instead of landing in a neighbour.
            runner.run(tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20",
                              *once, *extra], STEP_LIMITS[tool], env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        else:
            runner.skip(tool, "compute-sanitizer not found" if gpu else no_gpu)
    if not gpu:
        # The calls the sanitizer would watch, at tiny sizes on the CPU: the script's own check.
        runner.run("kernel-calls", once, CPU_STEP_LIMIT, env={"TRITON_INTERPRET": "1"})

    attention_json = logs / "attention.json"
    runner.run("attention", [py, me, "--attention", str(attention_json)],
               STEP_LIMITS["attention"] if gpu else CPU_STEP_LIMIT, env={} if gpu else {"TRITON_INTERPRET": "1"})
    if attention_json.exists():
        doc["attention"] = json.loads(attention_json.read_text())

    doc["bench"] = {}
    for size, share in zip(BENCH_SIZES, BENCH_SHARES):
        name = f"bench-{size}"
        if not gpu:
            runner.skip(name, no_gpu)
            continue
        started = time.time()
        runner.run(name, [py, "-m", "pytest", "bench/test_bench_model.py", "-q", "-p", "no:cacheprovider",
                          "--bench-sizes", size, "-k", "reference or bf16-fast or fp16-fast"],
                   share * runner.left())
        doc["bench"][size] = fold_bench_json(started)

    info = report.machine(device)
    doc.update(machine=info, git=report.git_state(), steps=runner.steps)
    if gpu:
        from mematte_kernels import ext

        doc["extension"] = {"cuda_arch_list": ext.cuda_arch_list(), "cuda_available": ext.available("cuda")}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{report.device_slug(info)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))

    print()
    for size, bench in doc["bench"].items():
        if bench:
            print(report.table(report.comparisons(bench["records"]), report.header(bench["machine"], bench["git"],
                                                                                   f"gpu report {size}")))
    for record in doc.get("attention", []):
        print(f"attention {record['case']}: {record['time_s'] * 1e3:.3g} ms, {record['tflops']:.3g} TFLOP/s "
              f"(torch SDPA {record['sdpa_tflops']:.3g})")
    print("  ".join(f"{name}: {step['status']}" for name, step in runner.steps.items()))
    print(f"report: {path}")
    failed = [s for s in runner.steps.values() if s["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


# ------------------------------------------------- what the sanitizer runs (a subprocess)


def run_kernels_once(ours_only: bool) -> None:
    """Every kernel once at small sizes, in every dtype the device runs; unless
    ``ours_only``, also the window attention (torch's SDPA) and a small model forward."""
    from kernel_calls import triton_op_calls
    from mematte import FastMEMatte
    from mematte_kernels import ext, native

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    calls = 0
    for dtype in dtypes:
        for _, call in triton_op_calls(device, dtype):
            call()
            calls += 1
        C, heads, d = 96, 2, 64
        if ext.available(device):
            x = randn(1, 9, 11, 2 * C, dtype=dtype).requires_grad_(ext.has_kernel("dwconv_gelu_backward", device))
            a = ext.dwconv_gelu(x, randn(2 * C, 1, 5, 5, dtype=torch.float32), randn(2 * C, dtype=torch.float32))
            z = randn(1, 9, 11, C, dtype=dtype).requires_grad_(ext.has_kernel("eca_backward", device))
            e = ext.eca(z, randn(1, 1, 3, dtype=torch.float32), randn(1, 9, 11, C, dtype=dtype))
            for out, inp in ((a, x), (e, z)):
                if inp.requires_grad:
                    out.float().sum().backward()
            calls += 2
        if ours_only:
            continue
        native.window_attention(randn(1, 20, 30, 3 * heads * d, dtype=dtype), randn(3 * heads * d, dtype=dtype),
                                randn(14, 14, d, dtype=dtype), randn(14, 14, d, dtype=dtype), heads, d**-0.5, 14)
        calls += 1
        model = FastMEMatte("vit_s", backend="auto", dtype=dtype, max_tokens=40).to(device)
        image = torch.rand(1, 3, 96, 128, generator=generator).to(device)
        with torch.inference_mode():
            model({"image": image, "trimap": torch.rand(1, 1, 96, 128, generator=generator).to(device)})
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{calls} calls on {device} ({', '.join(map(str, dtypes))}) ran")


# ------------------------------------------------ attention throughput (a subprocess)


def attention_throughput() -> list[dict]:
    """Triton varlen attention on one sequence of T tokens, and ViTMatte's global attention
    on one image's token grid, each against torch's fused SDPA (no position terms)."""
    import torch.nn.functional as F

    from mematte_kernels.reference import rel_pos_table
    from mematte_kernels.triton import global_attention, varlen_attention

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    lengths = ATTENTION_LENGTHS if gpu else (70,)
    dtypes = (torch.bfloat16, torch.float16) if gpu else (torch.bfloat16,)
    heads_of = ATTENTION_HEADS if gpu else {"tiny": 2}

    def median_s(fn) -> float:
        if gpu:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    records = []
    for T in lengths:
        for variant, heads in heads_of.items():
            for dtype in dtypes:
                qkv = torch.randn(T, 3, heads, 64, device=device, dtype=dtype)
                q, k, v = qkv.unbind(1)
                cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
                flops = 4 * T * T * 64 * heads
                triton_s = median_s(lambda: varlen_attention(q, k, v, cu_seqlens, T))
                per_head = [t.transpose(0, 1)[None] for t in (q, k, v)]
                sdpa_s = median_s(lambda: F.scaled_dot_product_attention(*per_head))
                records.append({
                    "case": f"T{T}-{variant}-{heads}h-{str(dtype).removeprefix('torch.')}", "op": "varlen_attention",
                    "tokens": T, "heads": heads, "dtype": str(dtype), "flops": flops,
                    "time_s": triton_s, "tflops": flops / triton_s / 1e12,
                    "sdpa_time_s": sdpa_s, "sdpa_tflops": flops / sdpa_s / 1e12,
                    "timer": "triton.testing.do_bench median (CUDA events)" if gpu else "perf_counter median of 3",
                })  # fmt: skip
    heads = ATTENTION_HEADS["vit_s"] if gpu else 2
    for W, H in GLOBAL_GRIDS if gpu else ((7, 5),):
        qkv = torch.randn(1, H, W, 3 * heads * 64, device=device, dtype=torch.bfloat16)
        tables = torch.randn(2, 2 * max(H, W) - 1, 64, device=device, dtype=torch.bfloat16) * 0.02
        rel_h, rel_w = rel_pos_table(H, H, tables[0]), rel_pos_table(W, W, tables[1])
        T = H * W
        flops = 4 * T * T * 64 * heads + 2 * T * (H + W) * 64 * heads  # q·k, p·v, the position terms
        triton_s = median_s(lambda: global_attention(qkv, rel_h, rel_w, heads, 0.125))
        per_head = [t.reshape(T, heads, 64).transpose(0, 1)[None] for t in qkv.unflatten(-1, (3, -1)).unbind(-2)]
        sdpa_s = median_s(lambda: F.scaled_dot_product_attention(*per_head))
        records.append({
            "case": f"grid{W}x{H}-{heads}h-bfloat16", "op": "global_attention", "tokens": T, "heads": heads,
            "dtype": str(torch.bfloat16), "flops": flops, "time_s": triton_s, "tflops": flops / triton_s / 1e12,
            "sdpa_time_s": sdpa_s, "sdpa_tflops": 4 * T * T * 64 * heads / sdpa_s / 1e12,
            "timer": "triton.testing.do_bench median (CUDA events)" if gpu else "perf_counter median of 3",
        })  # fmt: skip
    return records


if __name__ == "__main__":
    sys.exit(main())
