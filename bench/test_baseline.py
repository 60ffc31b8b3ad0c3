"""``--bench-baseline REV``: an older commit unpacked and built once in a cache, its worker
run beside the fast cases, and its rows paired with theirs in the summary. The build step
is swapped for a copy of this checkout's compiled ops (compiling takes minutes), so what
is tested is everything around it: unpacking, reuse, a failed build's message, a worker
run from the other tree, and the pairing in the table and JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import harness
import report

COMPILED = sorted((harness.ROOT / "mematte_kernels").glob("_C*.so"))


def head() -> str:
    return harness.resolve_commit("HEAD")


def copy_compiled_ops(calls: list):
    """A build that puts this checkout's compiled ops into the tree (the tree is HEAD's)."""

    def build(tree: Path, log) -> int:
        calls.append(tree)
        log.write("copying the compiled ops\n")
        for path in COMPILED:
            shutil.copy2(path, tree / "mematte_kernels" / path.name)
        return 0

    return build


def test_cases_pair_every_fast_case_with_its_baseline():
    commit = "572baf7cb81e2bab3c4586a885a233de005158ee"
    settings = harness.Settings(torch.device("cpu"), smoke=False, full=False, sizes=(harness.Size(512, 512),),
                                baseline=commit)  # fmt: skip
    cases = harness.model_cases(settings)
    baselines = [c for c in cases if c.baseline]
    assert [c.id for c in baselines] == ["vit_s-512x512-fp32-fast@572baf7", "vit_s-512x512-bf16-fast@572baf7"]
    for case in baselines:
        fast = cases[cases.index(case) - 1]  # each runs right after its fast case
        assert (fast.impl, fast.dtype, fast.size, fast.group) == ("fast", case.dtype, case.size, case.group)
        assert (case.backend, case.fraction, case.max_tokens) == (fast.backend, fast.fraction, fast.max_tokens)
    without = harness.model_cases(harness.Settings(torch.device("cpu"), smoke=False, full=False, sizes=settings.sizes))
    assert without == [c for c in cases if not c.baseline]


def test_a_revision_git_does_not_know_is_named():
    with pytest.raises(harness.BaselineError, match="'no-such-rev' names no commit"):
        harness.resolve_commit("no-such-rev")


@pytest.mark.skipif(not COMPILED, reason="needs this checkout's compiled ops to stand in for a build")
def test_unpacked_and_built_once_then_reused(tmp_path, data):
    commit, calls = head(), []
    tree = harness.prepare_baseline(commit, tmp_path, build=copy_compiled_ops(calls))
    assert tree == tmp_path / f"baseline-{commit}" and calls == [tree]
    shown = subprocess.run(["git", "show", f"{commit}:bench/worker.py"], cwd=harness.ROOT, capture_output=True,
                           text=True)  # fmt: skip
    assert (tree / "bench" / "worker.py").read_text() == shown.stdout
    assert (tree / "build.log").read_text() == "copying the compiled ops\n"

    assert harness.prepare_baseline(commit, tmp_path, build=copy_compiled_ops(calls)) == tree
    assert calls == [tree]  # reused: neither unpacked nor built again

    stamp = tree / harness.BUILD_STAMP
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "torch": "another version"}))
    harness.prepare_baseline(commit, tmp_path, build=copy_compiled_ops(calls))
    assert calls == [tree, tree]  # built for another torch: built again

    # The tree's own worker runs the case, in the tree, on the benchmark's files.
    size = harness.Size(256, 256)
    case = harness.ModelCase("vit_s", size, torch.bfloat16, f"fast@{commit[:7]}")
    weights = data.weights_path(case.variant, size, case.fraction)
    result = harness.run_worker(case, weights, data.inputs_path(size), tree=tree)
    assert result["latency_s"] > 0 and result["peak_rss_bytes"] >= result["loaded_rss_bytes"] > 0
    assert len(result["routed"]) == 4 and all(0 < r < 1 for r in result["routed"])


def test_a_failed_build_says_why_and_is_tried_again(tmp_path):
    commit, calls = head(), []

    def failing(tree: Path, log) -> int:
        calls.append(tree)
        log.write("".join(f"compiling part {i}\n" for i in range(40)) + "attention_cpu.cpp:12: error: no member 'x'\n")
        return 2

    with pytest.raises(harness.BaselineError) as error:
        harness.prepare_baseline(commit, tmp_path, build=failing)
    message = str(error.value)
    assert f"building commit {commit[:10]} failed (exit 2)" in message
    assert str(tmp_path / f"baseline-{commit}" / "build.log") in message
    assert message.endswith("attention_cpu.cpp:12: error: no member 'x'")
    assert "compiling part 39" in message and "compiling part 0\n" not in message  # the tail, not the whole log
    with pytest.raises(harness.BaselineError):
        harness.prepare_baseline(commit, tmp_path, build=failing)
    assert len(calls) == 2


def test_a_build_that_leaves_no_compiled_ops_is_refused(tmp_path):
    # Without this the baseline would run on the pure-PyTorch fallbacks, and look slow.
    commit = head()
    with pytest.raises(harness.BaselineError, match="do not all import from the tree: mematte_kernels._C"):
        harness.prepare_baseline(commit, tmp_path, build=lambda tree, log: 0)
    assert not (tmp_path / f"baseline-{commit}" / harness.BUILD_STAMP).exists()


def model_record(impl: str, dtype: str, time_s: float, peak: int, **extra) -> dict:
    return {"kind": "model", "group": "model vit_s 512x512", "case": f"vit_s-512x512-{dtype}-{impl}", "impl": impl,
            "dtype": dtype, "time_s": time_s, "peak_mem_bytes": peak, **extra}  # fmt: skip


def test_report_pairs_each_fast_row_with_its_baseline(tmp_path):
    commit = "572baf7cb81e2bab3c4586a885a233de005158ee"
    records = [
        model_record("reference", "fp32", 10.0, 4 << 30),
        model_record("fast", "fp32", 4.0, 2 << 30),  # no baseline row of its dtype
        model_record("fast", "bf16", 2.0, 1 << 30, fresh_process_time_s=2.5),  # timed in process
        model_record("fast@572baf7", "bf16", 5.0, 5 << 28, baseline_rev=commit),
    ]
    rows = {row["record"]["case"]: row for row in report.comparisons(records)}
    fast, base = rows["vit_s-512x512-bf16-fast"], rows["vit_s-512x512-bf16-fast@572baf7"]
    assert fast["baseline"] is records[3]
    assert fast["baseline_speedup"] == pytest.approx(5.0 / 2.5)  # fresh process against fresh process
    assert fast["baseline_mem_ratio"] == pytest.approx(0.8)
    assert fast["speedup"] == pytest.approx(10.0 / 2.0)
    assert base["speedup"] == pytest.approx(10.0 / 5.0) and "baseline" not in base
    assert "baseline" not in rows["vit_s-512x512-fp32-fast"]

    text = report.table(list(rows.values()), "header")
    main, against = text.split("\n\n")
    assert "fast@572baf7 bf16" in main  # its own row, beside the others
    [line] = [line for line in against.splitlines() if line.startswith("model vit_s 512x512")]
    assert line.split() == ["model", "vit_s", "512x512", "fast", "bf16", "fast@572baf7", "2.50", "s", "5.00", "s",
                            "2.00x", "1.00", "GiB", "1.25", "GiB", "0.80x"]  # fmt: skip

    info = {"device": "cpu", "cpu": "test cpu", "cpu_cores": 2}
    doc = json.loads(report.save(tmp_path, info, {"commit": None, "dirty": None}, "default", {}, records).read_text())
    [entry] = [c for c in doc["comparisons"] if c["case"] == "vit_s-512x512-bf16-fast"]
    assert entry["baseline_case"] == "vit_s-512x512-bf16-fast@572baf7"
    assert entry["baseline_speedup"] == pytest.approx(2.0) and entry["baseline_mem_ratio"] == pytest.approx(0.8)
    [saved] = [r for r in doc["records"] if r.get("baseline_rev")]
    assert (saved["baseline_rev"], saved["time_s"], saved["peak_mem_bytes"]) == (commit, 5.0, 5 << 28)
