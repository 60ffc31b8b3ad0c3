"""The one-call GPU script, run on whatever machine this is: without a GPU its GPU steps
are skipped, and the kernel calls and attention measurement it would hand to the GPU run at
tiny sizes in Triton's interpreter, so a broken script shows here rather than on a lent GPU.
A step that hangs (``--hang STEP``) stands in for a compile or a test that never ends: the
JSON on disk keeps the steps before it through a kill, and a timeout or SIGTERM ends the
step's whole process group."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("gpu_report.py")
without_a_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it builds and benchmarks for minutes")


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--logs",
                             str(tmp_path / "logs"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)  # fmt: skip


def report_json(tmp_path: Path) -> dict:
    [path] = (tmp_path / "out").glob("*.json")
    return json.loads(path.read_text())


def wait_until_running(proc: subprocess.Popen, tmp_path: Path, step: str, timeout_s: float = 120) -> dict:
    """The report's JSON once it says ``step`` is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if list((tmp_path / "out").glob("*.json")):
            doc = report_json(tmp_path)
            if doc["steps"].get(step, {}).get("status") == "running":
                return doc
        time.sleep(0.2)
    raise AssertionError(f"{step} did not start within {timeout_s} s")


def hang_pids(log: Path) -> list[int]:
    """The hanging step's process and its child, as it printed them."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith("pids ")]
        if lines:
            return [int(pid) for pid in lines[0].split()[1:]]
        time.sleep(0.1)
    raise AssertionError(f"no pids in {log}")


def gone(pid: int, timeout_s: float = 10) -> bool:
    """Whether ``pid`` has ended (exited, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@without_a_gpu
@pytest.mark.slow
def test_runs_end_to_end_without_a_gpu(tmp_path):
    proc = start(tmp_path, "--budget", "900")
    output, _ = proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    doc = report_json(tmp_path)
    status = {name: step["status"] for name, step in doc["steps"].items()}
    assert list(status.items()) == [
        ("build", "skipped"),
        ("bench-3840x2160", "skipped"),
        ("bench-2048", "skipped"),
        ("attention", "ok"),
        ("tests-gpu", "ok"),
        ("memcheck", "skipped"),
        ("racecheck", "skipped"),
        ("kernel-calls", "ok"),
    ]  # fmt: skip: measurements first, then the tests and the sanitizers
    assert "skipped" in doc["steps"]["tests-gpu"]["log_tail"][-1]  # GPU tests were collected, then skipped
    assert "calls on cpu" in doc["steps"]["kernel-calls"]["log_tail"][-1]
    assert [r["op"] for r in doc["attention"]] == ["varlen_attention", "global_attention"]
    assert all(r["tflops"] > 0 and r["sdpa_tflops"] > 0 for r in doc["attention"])
    assert doc["machine"]["device"] == "cpu"
    assert "steps: build skipped" in output.splitlines()[-2]  # the summary ends the output


@without_a_gpu
def test_a_kill_mid_step_leaves_the_steps_before_on_disk(tmp_path):
    proc = start(tmp_path, "--steps", "build,tests-gpu,kernel-calls", "--hang", "kernel-calls")
    group = None
    try:
        group = wait_until_running(proc, tmp_path, "kernel-calls")["steps"]["kernel-calls"]["process_group"]
        proc.kill()  # SIGKILL: the script gets no chance to write anything more
        proc.wait()
        doc = report_json(tmp_path)
    finally:
        proc.kill()
        if group is not None:  # the step leads a session of its own, so it outlives the script
            os.killpg(group, signal.SIGKILL)
    assert doc["steps"]["build"] == {"status": "skipped", "reason": "no CUDA GPU"}
    tests = doc["steps"]["tests-gpu"]
    assert tests["status"] == "ok" and "skipped" in tests["log_tail"][-1]
    assert doc["steps"]["kernel-calls"]["status"] == "running"
    assert doc["machine"]["device"] == "cpu"
    assert not list((tmp_path / "out").glob("*.tmp"))


@without_a_gpu
def test_sigterm_kills_the_step_in_flight_and_its_children(tmp_path):
    proc = start(tmp_path, "--steps", "kernel-calls", "--hang", "kernel-calls")
    try:
        wait_until_running(proc, tmp_path, "kernel-calls")
        pids = hang_pids(tmp_path / "logs" / "kernel-calls.log")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    doc = report_json(tmp_path)
    assert doc["steps"]["kernel-calls"]["status"] == "interrupted"
    assert doc["interrupted"] == "SIGTERM"
    assert all(gone(pid) for pid in pids), pids


@pytest.fixture
def gpu_report(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository on it
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path, gpu_report, monkeypatch):
    monkeypatch.setattr(gpu_report, "MIN_STEP_S", 1)
    doc = {"steps": {}}
    runner = gpu_report.Runner(doc, tmp_path / "report.json", tmp_path, budget_s=60, hang="compile")
    start_s = time.monotonic()
    assert not runner.run("compile", ["never", "run"], limit_s=2)
    assert time.monotonic() - start_s < 10
    assert json.loads((tmp_path / "report.json").read_text())["steps"]["compile"]["status"] == "timeout"
    pids = [int(pid) for pid in doc["steps"]["compile"]["log_tail"][0].split()[1:]]
    assert len(pids) == 2 and all(gone(pid) for pid in pids), pids


def test_each_step_ends_by_its_share_of_the_budget(tmp_path, gpu_report, monkeypatch):
    """Limits add up: a step may use what the steps before it left, never more than the budget."""
    assert gpu_report.DEFAULT_BUDGET_S == sum(gpu_report.STEP_LIMITS.values()) <= 400  # 7 min with the start
    monkeypatch.setattr(gpu_report, "MIN_STEP_S", 1)
    runner = gpu_report.Runner({"steps": {}}, tmp_path / "report.json", tmp_path, budget_s=8)
    runner.skip("build", "no CUDA GPU", limit_s=3)
    start_s = time.monotonic()
    assert not runner.run("bench", [sys.executable, "-c", "import time; time.sleep(60)"], limit_s=1)
    assert 3.5 <= time.monotonic() - start_s < 6  # 3 s left by the skipped step + 1 s of its own
    runner.skip("attention", "no CUDA GPU", limit_s=20)
    assert runner.run("tests", [sys.executable, "-c", "pass"], limit_s=20)  # ~4 s of the budget left
    runner.budget_end = time.monotonic()
    assert not runner.run("memcheck", [sys.executable, "-c", "pass"], limit_s=20)
    assert [step["status"] for step in runner.steps.values()] == ["skipped", "timeout", "skipped", "ok", "skipped"]
    assert runner.steps["memcheck"]["reason"] == "out of time budget"


@pytest.mark.parametrize("autotune", [False, True], ids=["first-configs", "autotune"])
def test_on_a_gpu_the_measurements_come_first(tmp_path, gpu_report, monkeypatch, autotune):
    """The steps a GPU machine runs (commands recorded, not run): build for the local arch,
    the whole-model benchmarks at 4K then 2048², attention, then the tests and sanitizers."""
    calls = []
    monkeypatch.setattr(
        gpu_report.Runner,
        "run",
        lambda self, name, command, limit_s, env=None: calls.append((name, command, limit_s, env)),
    )
    monkeypatch.setattr(gpu_report, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(gpu_report, "fold_bench_json", lambda slug, started: {"records": []})
    doc = {"steps": {}, "arch": "9.0"}
    runner = gpu_report.Runner(doc, tmp_path / "report.json", tmp_path, budget_s=gpu_report.DEFAULT_BUDGET_S)
    gpu_report.run_steps(runner, doc, gpu=True, wanted=[*gpu_report.STEP_LIMITS], slug="h100", autotune=autotune)
    assert [name for name, *_ in calls] == [
        "build", "bench-3840x2160", "bench-2048", "attention", "tests-gpu", "memcheck", "racecheck",
    ]  # fmt: skip
    assert {name: limit for name, _, limit, _ in calls} == gpu_report.STEP_LIMITS
    command = {name: " ".join(command) for name, command, *_ in calls}
    env = {name: env or {} for name, _, _, env in calls}
    assert env["build"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "--bench-sizes 3840x2160" in command["bench-3840x2160"] and "--bench-sizes 2048" in command["bench-2048"]
    assert command["memcheck"].startswith("/opt/cuda/bin/compute-sanitizer --tool memcheck")
    fixed = {name for name, variables in env.items() if variables.get("MEMATTE_TRITON_AUTOTUNE") == "0"}
    assert fixed == (set() if autotune else {"bench-3840x2160", "bench-2048", "attention"})
    assert set(doc["bench"]) == {"3840x2160", "2048"}
