"""Pictures of whole-model benchmark results: peak memory and time against resolution.

    python -m bench.plot [RESULTS.json ...] [--only LABEL ...] -o docs/

reads the JSON files ``pytest bench`` writes (default: every ``bench/results/latest-*.json``)
and draws ``memory.png`` and ``time.png``: one line per implementation (the reference, the
fast path per dtype, and any peer such as HF's eager VitMatte) for each model, megapixels
on the x axis, both axes logarithmic, and the machines and commits measured in the
caption. Only whole-model records (``kind == "model"``) are drawn; a case measured more
than once keeps its latest measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Group prefixes of the benchmarks, as people name the models.
MODEL_NAMES = {
    "model": "MEMatte",
    "mematte": "MEMatte",
    "vitmatte": "ViTMatte",
    "hf_vitmatte": "HF VitMatte",
    "samvit": "timm SAM ViT",
    "timm_samvit_base": "timm SAM ViT-B",
}
VARIANT_NAMES = {"vit_s": "ViT-S", "vit_b": "ViT-B"}
IMPL_NAMES = {"reference": "reference", "fast": "fast", "all_global": "all-global"}
# A peer's "reference" is the library's own (eager) model, its "fast" the same model after
# mematte.accelerate.
PEER_IMPL_NAMES = {"reference": "eager", "fast": "accelerated"}


@dataclass(frozen=True)
class Point:
    line: str  # legend label: model, variant, implementation and dtype
    megapixels: float
    size: str  # "WxH", the x-axis tick label
    time_s: float
    peak_mem_bytes: int | None
    machine: str
    commit: str


def _machine(info: dict) -> str:
    if info.get("device") == "cuda":
        return info.get("gpu", "GPU")
    cores = info.get("cpu_cores")
    return f"{info.get('cpu', 'CPU')}, {cores} cores" if cores else info.get("cpu", "CPU")


def _megapixels(record: dict) -> float | None:
    if record.get("megapixels"):
        return float(record["megapixels"])
    size = record.get("size")
    if not isinstance(size, str) or "x" not in size:
        return None
    width, height = size.split("x")
    return int(width) * int(height) / 1e6


def _line(record: dict) -> str:
    group = record.get("group", "")
    prefix = group.split(" ", 1)[0]
    model = MODEL_NAMES.get(record.get("model") or prefix, record.get("model") or prefix)
    variant = record.get("variant")
    impl = record.get("impl", "?")
    impl = (PEER_IMPL_NAMES if model.startswith(("HF", "timm")) else IMPL_NAMES).get(impl, impl)
    parts = [model, VARIANT_NAMES.get(variant, variant), impl, record.get("dtype")]
    return " ".join(p for p in parts if p)


def load_points(paths: Iterable[Path]) -> list[Point]:
    """The whole-model measurements of the result files; raises ValueError naming a file
    that is not a benchmark result."""
    latest: dict[tuple[str, float, str], tuple[str, Point]] = {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            records, info = result["records"], result["machine"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a benchmark result file ({e})") from None
        machine = _machine(info)
        commit = (result.get("git") or {}).get("commit") or "unknown"
        for record in records:
            megapixels = _megapixels(record)
            if record.get("kind") != "model" or megapixels is None or not record.get("time_s"):
                continue
            point = Point(
                _line(record),
                megapixels,
                record.get("size") or f"{megapixels:.1f} MP",
                float(record["time_s"]),
                record.get("peak_mem_bytes"),
                machine,
                commit[:7],
            )
            key = (point.line, point.megapixels, machine)
            created = result.get("created", "")
            if key not in latest or latest[key][0] <= created:
                latest[key] = (created, point)
    return [point for _, point in latest.values()]


def _caption(points: list[Point]) -> str:
    machines = sorted({p.machine for p in points})
    commits = {m: ", ".join(sorted({p.commit for p in points if p.machine == m})) for m in machines}
    return "Measured on " + "; ".join(f"{m} at commit {commits[m]}" for m in machines)


def select(points: list[Point], only: Iterable[str]) -> list[Point]:
    """The points whose line label starts with one of ``only`` (all of them when it is empty)."""
    only = tuple(only)
    return [p for p in points if not only or p.line.startswith(only)]


def draw(points: list[Point], out_dir: Path) -> list[Path]:
    """Write memory.png and time.png into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    if not points:
        raise ValueError("no whole-model records (kind 'model' with a size and a time) to draw")
    out_dir.mkdir(parents=True, exist_ok=True)
    machines = sorted({p.machine for p in points})
    written = []
    for name, value, ylabel in (
        ("memory", lambda p: p.peak_mem_bytes / 2**30 if p.peak_mem_bytes else None, "peak memory (GiB)"),
        ("time", lambda p: p.time_s, "time per image (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for machine in machines:
            for line in sorted({p.line for p in points if p.machine == machine}):
                series = sorted(
                    (p.megapixels, value(p))
                    for p in points
                    if p.machine == machine and p.line == line and value(p) is not None
                )
                if not series:
                    continue
                label = line if len(machines) == 1 else f"{line} ({machine})"
                # dashed: the computations this package is measured against
                linestyle = "--" if " reference " in f" {line} " or " eager " in f" {line} " else "-"
                ax.plot(*zip(*series), marker="o", linestyle=linestyle, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = dict(sorted((p.megapixels, p.size.replace("x", "×")) for p in points))
        ax.set_xticks(list(ticks), list(ticks.values()), rotation=30)
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("image size (log scale of pixels)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, _caption(points), fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="*", type=Path, help="result JSON files (default: bench/results/latest-*.json)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="LABEL",
        help="draw only the lines whose label starts with LABEL (repeatable), "
        "e.g. --only 'MEMatte ViT-S fast' --only 'HF VitMatte'",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("docs"), help="folder for the pictures (default docs/)")
    args = parser.parse_args(argv)
    paths = args.results or sorted(RESULTS.glob("latest-*.json"))
    try:
        written = draw(select(load_points(paths), args.only), args.out)
    except ValueError as e:
        print(f"bench.plot: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
