"""bench.plot draws the memory and time pictures from benchmark result files."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
plot = sys.modules["bench_plot"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def _record(impl, dtype, size, time_s, peak, group_prefix="model"):
    width, height = map(int, size.split("x"))
    return {
        "kind": "model",
        "group": f"{group_prefix} vit_s {size}",
        "impl": impl,
        "variant": "vit_s",
        "dtype": dtype,
        "size": size,
        "megapixels": width * height / 1e6,
        "time_s": time_s,
        "peak_mem_bytes": peak,
    }


def _result(path, records, created="2026-12-01T00:00:00+0000", commit="0123456789abcdef"):
    path.write_text(
        json.dumps(
            {
                "created": created,
                "machine": {"device": "cpu", "cpu": "Test CPU", "cpu_cores": 2},
                "git": {"commit": commit, "dirty": False},
                "records": records,
            }
        )
    )
    return path


@pytest.fixture
def results(tmp_path):
    first = _result(
        tmp_path / "a.json",
        [
            _record("reference", "fp32", "1024x1024", 4.0, 3 << 30),
            _record("fast", "bf16", "1024x1024", 1.0, 1 << 30),
            _record("fast", "bf16", "2048x2048", 9.0, 2 << 30),
            {"kind": "op", "group": "varlen", "impl": "fast", "dtype": "bf16", "time_s": 0.1},
        ],
    )
    # A later run of one case replaces the earlier measurement.
    second = _result(
        tmp_path / "b.json",
        [_record("fast", "bf16", "2048x2048", 5.0, 2 << 30)],
        created="2026-12-02T00:00:00+0000",
        commit="fedcba9876543210",
    )
    return [first, second]


def test_points_one_line_per_implementation_latest_measurement_kept(results):
    points = plot.load_points(results)
    assert {p.line for p in points} == {"MEMatte ViT-S reference fp32", "MEMatte ViT-S fast bf16"}
    fast = sorted((p.size, p.time_s, p.commit) for p in points if p.line == "MEMatte ViT-S fast bf16")
    assert fast == [("1024x1024", 1.0, "0123456"), ("2048x2048", 5.0, "fedcba9")]


def test_cli_draws_memory_and_time(results, tmp_path):
    out = tmp_path / "pictures"
    run = subprocess.run(
        [sys.executable, "-m", "bench.plot", *map(str, results), "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for name in ("memory.png", "time.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 400 and picture.height > 300


def test_cli_names_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    run = subprocess.run(
        [sys.executable, "-m", "bench.plot", str(bad), "-o", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "notes.json" in run.stderr and "not a benchmark result" in run.stderr
    assert not (tmp_path / "memory.png").exists()


def test_peer_records_read_eager_and_accelerated_and_only_keeps_the_named_lines(tmp_path):
    peer = {
        "kind": "model",
        "group": "hf_vitmatte 1024x1024",
        "model": "hf_vitmatte",
        "size": "1024x1024",
        "time_s": 14.0,
        "peak_mem_bytes": 2 << 30,
    }
    path = _result(
        tmp_path / "peers.json",
        [
            {**peer, "impl": "reference", "dtype": "fp32"},
            {**peer, "impl": "fast", "dtype": "bf16", "time_s": 2.0},
            _record("fast", "bf16", "1024x1024", 1.0, 1 << 30),
            _record("all_global", "bf16", "1024x1024", 1.3, 1 << 30),
        ],
    )
    points = plot.load_points([path])
    assert {p.line for p in points} == {
        "HF VitMatte eager fp32",
        "HF VitMatte accelerated bf16",
        "MEMatte ViT-S fast bf16",
        "MEMatte ViT-S all-global bf16",
    }
    kept = plot.select(points, ["MEMatte ViT-S fast", "HF VitMatte eager"])
    assert sorted(p.line for p in kept) == ["HF VitMatte eager fp32", "MEMatte ViT-S fast bf16"]
