"""Everything a machine with one CUDA GPU should measure and check, in one call of under
7 minutes, the measurements first:

    python3 bench/gpu_report.py [--budget 400] [--out bench/results] [--logs DIR] [--steps a,b]

Steps, in order; each must end by the sum of its own and the earlier steps' limits (so time
an earlier step leaves unused goes to the next), and all within ``--budget``:

  build            setup.py build_ext --inplace (ninja), for the local GPU's architecture only
  bench-3840x2160  pytest bench/test_bench_model.py at 3840x2160: the reference (fp32) against
                   the fast path in bf16 and fp16, CUDA events, max_memory_allocated
  bench-2048       the same at 2048x2048
  attention        Triton varlen attention TFLOP/s at T = 4096 and 18500 tokens (ViT-S and
                   ViT-B heads, bf16 and fp16), and ViTMatte's global attention (decomposed
                   relative position, from the qkv grid) on the 128x128 and 240x135 grids of
                   2048² and 3840x2160 images (ViT-S heads, bf16); torch's fused SDPA without
                   the position terms on the same shapes alongside
  tests-gpu        pytest tests -m gpu: every GPU-marked test, whichever file defines it
  memcheck         compute-sanitizer --tool memcheck over one small call of every Triton op
                   (tests/kernel_calls.py), the compiled LTRM ops (and their backward), the
                   window attention and a small model forward, in fp32, bf16 and fp16
  racecheck        compute-sanitizer --tool racecheck over the same calls, without the model

Each step runs in a process group of its own; at its time limit the whole group is killed
(the compiler's and the tests' children too) and the next step starts. The benchmark and
attention steps run each autotuned kernel's first config (MEMATTE_TRITON_AUTOTUNE=0), as
tuning every config at the first call would not fit; --autotune tunes them.

``<out>/<gpu>-<date>.json`` is rewritten before and after every step, so a kill leaves
what was measured: the machine, each step's status (a step in flight reads "running", with
its process group), time and log tail, the benchmark records and the attention throughput.
SIGTERM or Ctrl-C kills the step in flight and records it as "interrupted". A one-screen
summary is printed last; the exit status is 1 when a step failed or ran out of time.

Without a GPU the GPU steps are skipped, each saying so; the GPU-marked tests are collected
(and skipped), and the calls the sanitizers would watch and the attention measurement run
once at tiny sizes in Triton's interpreter, so that the script itself is exercised end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
BENCH_SIZES = {"bench-3840x2160": "3840x2160", "bench-2048": "2048"}
# Each step's limit on a GPU, in run order (seconds). They sum to 400 s, which leaves the
# script's start, its JSON and its summary well inside 7 minutes.
STEP_LIMITS = {
    "build": 120,  # 16 cores: the C++ CPU sources dominate; the CUDA ones for one arch
    "bench-3840x2160": 90,  # three cases: compile, warm-up, timed rounds
    "bench-2048": 50,
    "attention": 45,
    "tests-gpu": 50,
    "memcheck": 30,
    "racecheck": 15,
}
DEFAULT_BUDGET_S = sum(STEP_LIMITS.values())
# Without a GPU the steps that run (collecting the tests, Triton's interpreter) are slow.
CPU_STEP_LIMIT = 300
MIN_STEP_S = 5
ATTENTION_LENGTHS = (4096, 18500)
ATTENTION_HEADS = {"vit_s": 6, "vit_b": 12}
GLOBAL_GRIDS = ((128, 128), (240, 135))  # (W, H) token grids of 2048² and 3840x2160 images
LOG_TAIL_LINES = 40
# What a step replaced by --hang runs: a child that waits, and a grandchild that waits too.
HANG = (
    "import os, subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
    "print('pids', os.getpid(), child.pid, flush=True); time.sleep(3600)"
)


# ------------------------------------------------------------------------ the steps


class Interrupted(Exception):
    """SIGTERM (or SIGINT) reached the script."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group (it leads one: start_new_session) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Runner:
    """Runs steps as subprocesses, each by its deadline, and writes the report's JSON before
    and after each one."""

    def __init__(self, doc: dict, path: Path, logs: Path, budget_s: float, hang: str | None = None):
        self.doc, self.path, self.logs, self.hang = doc, path, logs, hang
        self.start = time.monotonic()
        self.budget_end = self.start + budget_s
        self.allotted = 0.0  # the sum of the limits of the steps so far
        self.steps: dict[str, dict] = doc.setdefault("steps", {})

    def save(self) -> None:
        """Write the JSON whole or not at all: to a temporary file, then renamed over."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)

    def skip(self, name: str, reason: str, limit_s: float = 0.0) -> None:
        self.allotted += limit_s
        print(f"== {name}: skipped ({reason})", flush=True)
        self.steps[name] = {"status": "skipped", "reason": reason}
        self.save()

    def run(self, name: str, command: list[str], limit_s: float, env: dict | None = None) -> bool:
        """Run ``command`` by this step's deadline (the earlier steps' limits plus ``limit_s``
        after the start, within the budget); at the deadline kill its process group."""
        self.allotted += limit_s
        now = time.monotonic()
        timeout = min(self.start + self.allotted, self.budget_end) - now
        if timeout < MIN_STEP_S:
            self.skip(name, "out of time budget")
            return False
        if name == self.hang:
            command = [sys.executable, "-c", HANG]
        log = self.logs / f"{name}.log"
        print(f"== {name} (limit {timeout:.0f} s): {' '.join(command)}", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            self.steps[name] = {"status": "running", "process_group": proc.pid, "limit_s": round(timeout),
                                "command": command}  # fmt: skip
            self.save()
            try:
                returncode = proc.wait(timeout=timeout)
                status = "ok" if returncode == 0 else f"failed (exit {returncode})"
            except subprocess.TimeoutExpired:
                kill_group(proc)
                status = "timeout"
            except BaseException:
                kill_group(proc)
                self._record(name, "interrupted", now, log)
                raise
        self._record(name, status, now, log)
        if status != "ok":
            print("   " + "\n   ".join(self.steps[name]["log_tail"][-15:]), flush=True)
        return status == "ok"

    def _record(self, name: str, status: str, started: float, log: Path) -> None:
        seconds = time.monotonic() - started
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        self.steps[name] = {"status": status, "seconds": round(seconds, 1), "command": self.steps[name]["command"],
                            "log_tail": tail}  # fmt: skip
        self.save()
        print(f"   {status} in {seconds:.0f} s; log: {log}", flush=True)


def local_arch() -> str:
    return "%d.%d" % torch.cuda.get_device_capability()


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit torch's extensions build with."""
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("compute-sanitizer")
    if found is None and CUDA_HOME:
        found = shutil.which("compute-sanitizer", path=f"{CUDA_HOME}/bin:{CUDA_HOME}/compute-sanitizer")
    return found


def fold_bench_json(slug: str, started: float) -> dict | None:
    """The JSON the bench step wrote (latest-<gpu>.json, if written since ``started``)."""
    latest = RESULTS / f"latest-{slug}.json"
    if latest.exists() and latest.stat().st_mtime >= started:
        return json.loads(latest.read_text())
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <gpu>-<date>.json goes")
    parser.add_argument("--logs", type=Path, help="where each step's log goes (default: a temporary folder)")
    parser.add_argument("--steps", help="comma-separated steps to run (default: all)")
    parser.add_argument("--autotune", action="store_true", help="let the benchmarks autotune the Triton kernels")
    # Tests: this step's command is replaced by one that never ends.
    parser.add_argument("--hang", help=argparse.SUPPRESS)
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
    all_steps = [*STEP_LIMITS, "kernel-calls"]
    wanted = args.steps.split(",") if args.steps else all_steps
    unknown = sorted(set(wanted) - set(all_steps))
    if unknown:
        parser.error(f"unknown steps {unknown}; the steps are {', '.join(all_steps)}")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="gpu-report-"))
    logs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = report.machine(device)
    slug = report.device_slug(info)
    doc: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget, "machine": info,
                 "git": report.git_state(), "autotune": args.autotune, "logs": str(logs), "steps": {}}  # fmt: skip
    if gpu:
        doc["arch"] = local_arch()
    path = args.out / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    runner = Runner(doc, path, logs, args.budget, hang=args.hang)
    runner.save()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_steps(runner, doc, gpu, wanted, slug, args.autotune)
    except (Interrupted, KeyboardInterrupt) as stop:
        doc["interrupted"] = str(stop) or "SIGINT"
        runner.save()
        print(f"\ninterrupted ({doc['interrupted']}); report so far: {path}", flush=True)
        return 130
    summary(doc, path)
    failed = [s for s in runner.steps.values() if s["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


def run_steps(runner: Runner, doc: dict, gpu: bool, wanted: list[str], slug: str, autotune: bool) -> None:
    py = sys.executable
    me = str(Path(__file__).resolve())
    no_gpu = "no CUDA GPU"
    fixed_configs = {} if autotune else {"MEMATTE_TRITON_AUTOTUNE": "0"}

    def limit(name: str) -> float:
        return STEP_LIMITS[name] if gpu else CPU_STEP_LIMIT

    def step(name: str, command: list[str] | None, skip_reason: str = no_gpu, env: dict | None = None) -> None:
        if name not in wanted:
            return
        if command is None:
            runner.skip(name, skip_reason, limit(name) if gpu else 0.0)
        else:
            runner.run(name, command, limit(name), env)

    # build: only the local architecture, which is all this run needs and the fastest to build.
    step(
        "build",
        [py, "setup.py", "build_ext", "--inplace"] if gpu else None,
        env={"TORCH_CUDA_ARCH_LIST": doc.get("arch", ""), "MAX_JOBS": str(os.cpu_count() or 4)},
    )

    doc["bench"] = {}
    for name, size in BENCH_SIZES.items():
        started = time.time()
        step(name, [py, "-m", "pytest", "bench/test_bench_model.py", "-q", "-p", "no:cacheprovider",
                    "--bench-sizes", size, "-k", "reference or bf16-fast or fp16-fast"] if gpu else None,
             env=fixed_configs)  # fmt: skip
        if gpu and name in wanted:
            doc["bench"][size] = fold_bench_json(slug, started)
            runner.save()

    attention_json = runner.logs / "attention.json"
    step(
        "attention",
        [py, me, "--attention", str(attention_json)],
        env=fixed_configs if gpu else {"TRITON_INTERPRET": "1"},
    )
    if attention_json.exists():
        doc["attention"] = json.loads(attention_json.read_text())
        runner.save()

    # Without a GPU the GPU-marked tests are collected and skipped by conftest.
    step("tests-gpu", [py, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"])

    sanitizer = find_sanitizer() if gpu else None
    once = [py, me, "--kernels-once"]
    # racecheck looks at shared memory, which only the kernels of this project are checked for.
    for tool, extra in (("memcheck", []), ("racecheck", ["--ours-only"])):
        # Without the caching allocator every tensor is its own allocation, so an access past
        # its end is caught instead of landing in a neighbour.
        step(tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20", *once, *extra]
             if sanitizer else None, "compute-sanitizer not found" if gpu else no_gpu,
             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})  # fmt: skip
    if not gpu and "kernel-calls" in wanted:
        # The calls the sanitizers would watch, at tiny sizes on the CPU: the script's own check.
        runner.run("kernel-calls", once, CPU_STEP_LIMIT, env={"TRITON_INTERPRET": "1"})
    if gpu:
        from mematte_kernels import ext

        doc["extension"] = {"cuda_arch_list": ext.cuda_arch_list(), "cuda_available": ext.available("cuda")}
        runner.save()


def summary(doc: dict, path: Path) -> None:
    """One screen: the whole-model benchmarks, the attention throughput, the steps."""
    info = doc["machine"]
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"
    tuning = "" if "arch" not in doc else "; autotune " + ("on" if doc["autotune"] else "off (first configs)")
    print(f"\n{where}; torch {info['torch']}, triton {info['triton']}{tuning}")
    for size, bench in doc.get("bench", {}).items():
        if not bench:
            print(f"model {size}: no records")
            continue
        print(f"model {size} (time: CUDA events, median; mem: max allocated)")
        for row in report.comparisons(bench["records"]):
            r = row["record"]
            if r.get("kind") != "model":
                continue
            err = r.get("alpha_mean_abs_error")
            print(
                f"  {r['impl']:<10} {r.get('dtype') or '':<9} {report.fmt_time(r['time_s']):>10} "
                f"{report.fmt_bytes(r.get('peak_mem_bytes')):>10}"
                + (f"  {row['speedup']:.2f}x ref" if "speedup" in row else "")
                + (f", mem {row['mem_ratio']:.2f}x" if "mem_ratio" in row else "")
                + (f", alpha err {err:.1e}" if err is not None else "")
            )
    for record in doc.get("attention", []):
        print(
            f"attention {record['case']:<28} {record['time_s'] * 1e3:8.3g} ms {record['tflops']:7.3g} TFLOP/s "
            f"(torch SDPA {record['sdpa_tflops']:.3g})"
        )
    print("steps: " + "  ".join(f"{name} {step['status']}" + (f" {step['seconds']:.0f}s" if "seconds" in step else "")
                                for name, step in doc["steps"].items()))  # fmt: skip
    print(f"report: {path}")


# ------------------------------------------------- what the sanitizer runs (a subprocess)


def run_kernels_once(ours_only: bool) -> None:
    """Every kernel once at small sizes, in every dtype the device runs; unless
    ``ours_only``, also the window attention (torch's SDPA) and a small model forward."""
    from mematte import FastMEMatte
    from mematte_kernels import ext, native

    from kernel_calls import triton_op_calls

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (
        (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    )
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
        native.window_attention(
            randn(1, 20, 30, 3 * heads * d, dtype=dtype),
            randn(3 * heads * d, dtype=dtype),
            randn(14, 14, d, dtype=dtype),
            randn(14, 14, d, dtype=dtype),
            heads,
            d**-0.5,
            14,
        )
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
