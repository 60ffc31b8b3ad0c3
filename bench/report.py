"""Benchmark records -> one summary table and one JSON file.

A record is a dict describing one measured case. Records of one workload share a
``group``; within a group each record whose ``impl`` is not ``"reference"`` is compared
with the group's reference record (speed-up = reference time / time, memory ratio =
memory / reference memory). A record with ``baseline_rev`` (impl ``fast@<commit>``) is
the same case run by an older commit's code; the record of its impl without the commit
(``fast``) is also compared with it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from mematte.io import write_atomic
from mematte_kernels.selection import cpu_model, cpuinfo

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- machine


def cpu_flags() -> set[str]:
    """The ISA flags /proc/cpuinfo lists for the first CPU (empty where it cannot be read)."""
    return set((cpuinfo("flags") or "").split())


def machine(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def device_slug(info: dict) -> str:
    name = info["gpu"] if info["device"] == "cuda" else f"cpu-{info['cpu']}-{info['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except OSError:
        return {"commit": None, "dirty": None}


# ------------------------------------------------------------------------ records


# "reference", "ref" or "fast" as a word of a test name (letters on neither side).
IMPL_WORD = re.compile(r"(?<![a-z])(reference|ref|fast)(?![a-z])", re.IGNORECASE)


def foreign_record(bench) -> dict:
    """A pytest-benchmark result from a file that does not record through the harness.

    Its impl is ``extra_info["impl"]``, else "reference" when the test name has the word
    reference or ref, else "fast"; its group is ``benchmark.group``, else the test name
    without those words (so a fast test and its reference pair up).
    """
    extra = dict(bench.extra_info)
    found = {m.lower() for m in IMPL_WORD.findall(bench.name)}
    impl = extra.pop("impl", None) or ("reference" if found & {"reference", "ref"} else "fast")
    s = bench.stats
    record = {
        "kind": "op",
        "group": bench.group or IMPL_WORD.sub("", bench.name),
        "case": bench.name,
        "nodeid": bench.fullname,
        "impl": impl,
        "time_s": s.median,
        "min_s": s.min,
        "mean_s": s.mean,
        "rounds": s.rounds,
        "timer": "pytest-benchmark",
    }
    return with_rates(record | extra)


def with_rates(record: dict) -> dict:
    """Add the throughputs that the record's work counts allow."""
    t = record["time_s"]
    if record.get("flops"):
        record["tflops"] = record["flops"] / t / 1e12
    if record.get("bytes"):
        record["gbps"] = record["bytes"] / t / 1e9
    if record.get("megapixels"):
        record["mp_per_s"] = record["megapixels"] / t
    return record


def comparisons(records: list[dict]) -> list[dict]:
    """One row per record, grouped (whole-model groups first), reference first; every other
    record is paired with its group's reference (the one of the same dtype when there are
    several), and a record that has a baseline (same group, impl and dtype, ``baseline_rev``
    set) with that too."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r.get("kind") != "model"):  # stable: run order within
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for group, members in groups.items():
        refs = [r for r in members if r["impl"] == "reference"]
        baselines = [r for r in members if r.get("baseline_rev")]
        for r in refs + [r for r in members if r["impl"] != "reference"]:
            ref = None
            if r["impl"] != "reference" and refs:
                ref = next((x for x in refs if x.get("dtype") == r.get("dtype")), refs[0])
            row = {"group": group, "impl": r["impl"], "dtype": r.get("dtype"), "record": r, "reference": ref}
            if ref is not None:
                row["speedup"] = ref["time_s"] / r["time_s"]
                if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                    row["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
            base = None if r.get("baseline_rev") else next(
                (b for b in baselines if b["impl"].partition("@")[0] == r["impl"] and b.get("dtype") == r.get("dtype")),
                None,
            )  # fmt: skip
            if base is not None:
                row["baseline"] = base
                row["baseline_speedup"] = base["time_s"] / fresh_process_time(r)
                if r.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
                    row["baseline_mem_ratio"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
            rows.append(row)
    return rows


def fresh_process_time(record: dict) -> float:
    """The record's latency in a fresh process, as a baseline row is timed: its time, or
    for a case timed in process, the one run of its worker."""
    return record.get("fresh_process_time_s") or record["time_s"]


# ------------------------------------------------------------------------- format


def fmt_time(s: float | None) -> str:
    if s is None:
        return ""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    if not b:
        return ""
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_rate(r: dict | None) -> str:
    if r is None:
        return ""
    if "tflops" in r:
        return f"{r['tflops']:.3g} TFLOP/s"
    if "gbps" in r:
        return f"{r['gbps']:.3g} GB/s"
    return ""


def table(rows: list[dict], header: str) -> str:
    columns = ["case", "impl", "time", "reference", "speed-up", "peak mem", "ref mem", "mem ratio", "MP/s",
               "throughput", "ref throughput", "alpha err", "agree %", "routed %"]  # fmt: skip
    lines = []
    for row in rows:
        r, ref = row["record"], row["reference"]
        paired = ref is not None
        label = r["impl"] + (f" {r['dtype']}" if r.get("kind") == "model" and r.get("dtype") else "")
        lines.append([
            row["group"],
            label,
            fmt_time(r["time_s"]),
            fmt_time(ref["time_s"]) if paired else "",
            f"{row['speedup']:.2f}x" if "speedup" in row else "",
            fmt_bytes(r.get("peak_mem_bytes")),
            fmt_bytes(ref.get("peak_mem_bytes")) if paired else "",
            f"{row['mem_ratio']:.2f}x" if "mem_ratio" in row else "",
            f"{r['mp_per_s']:.3g}" if "mp_per_s" in r else "",
            fmt_rate(r),
            fmt_rate(ref) if paired else "",
            f"{r['alpha_mean_abs_error']:.1e}" if r.get("alpha_mean_abs_error") is not None else "",
            f"{r['decisions_agreement'] * 100:.1f}" if r.get("decisions_agreement") is not None else "",
            " ".join(f"{x * 100:.0f}" for x in r.get("routed", ())),
        ])  # fmt: skip
    out = [header, *_render(columns, lines, left={0, 1, len(columns) - 1})]
    against = [row for row in rows if "baseline" in row]
    if against:
        out += ["", "against an older commit, in this run, one fresh process each: speed-up = baseline time / time; "
                "mem ratio = peak mem / baseline's"]  # fmt: skip
        columns = ["case", "impl", "baseline", "time", "baseline time", "speed-up", "peak mem", "baseline mem",
                   "mem ratio"]  # fmt: skip
        lines = []
        for row in against:
            r, base = row["record"], row["baseline"]
            lines.append([
                row["group"],
                r["impl"] + (f" {r['dtype']}" if r.get("dtype") else ""),
                base["impl"],
                fmt_time(fresh_process_time(r)),
                fmt_time(base["time_s"]),
                f"{row['baseline_speedup']:.2f}x",
                fmt_bytes(r.get("peak_mem_bytes")),
                fmt_bytes(base.get("peak_mem_bytes")),
                f"{row['baseline_mem_ratio']:.2f}x" if "baseline_mem_ratio" in row else "",
            ])  # fmt: skip
        out += _render(columns, lines, left={0, 1, 2})
    return "\n".join(line.rstrip() for line in out)


def _render(columns: list[str], lines: list[list[str]], left: set[int]) -> list[str]:
    """Heading, rule and rows, each column as wide as its widest cell; ``left`` aligned left."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [render(columns), render(["-" * w for w in widths]), *map(render, lines)]


def header(info: dict, git: dict, mode: str) -> str:
    where = info["gpu"] if info["device"] == "cuda" else f"{info['cpu']} ({info['cpu_cores']} cores)"
    commit = (git["commit"] or "unknown")[:10] + (" (dirty)" if git["dirty"] else "")
    return (
        f"MEMatte benchmarks [{mode}] on {where}; torch {info['torch']}, triton {info['triton']}, commit {commit}\n"
        "time = median; reference = the published computation (whole model: reference backend in fp32); "
        "speed-up = reference / time; mem ratio = peak mem / reference's; routed % = per router"
    )


# --------------------------------------------------------------------------- JSON


def save(directory: Path, info: dict, git: dict, mode: str, options: dict, records: list[dict]) -> Path:
    """Write ``<device>-<time>.json`` and ``latest-<device>.json``; returns the first."""
    rows = comparisons(records)
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode,
        "options": options,
        "machine": info,
        "git": git,
        "records": records,
        "comparisons": [
            {k: v for k, v in row.items() if k not in ("record", "reference", "baseline")}
            | {"case": row["record"]["case"], "reference_case": row["reference"]["case"] if row["reference"] else None}
            | ({"baseline_case": row["baseline"]["case"]} if "baseline" in row else {})
            for row in rows
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    slug = device_slug(info)
    path = directory / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = json.dumps(doc, indent=1, default=str).encode()
    for target in (path, directory / f"latest-{slug}.json"):
        write_atomic(target, lambda f: f.write(data))  # an interrupted run leaves no torn JSON
    return path


def load_table(path: Path) -> str:
    """The summary table of a saved run."""
    doc = json.loads(Path(path).read_text())
    return table(comparisons(doc["records"]), header(doc["machine"], doc["git"], doc["mode"]))
