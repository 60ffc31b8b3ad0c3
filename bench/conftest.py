"""``pytest bench``: options, shared fixtures, and at the end one summary table and one
JSON file (under bench/results/) with every benchmark of the run, including those of
files that use pytest-benchmark directly (see report.foreign_record for how they pair).

    pytest bench                         ViT-S, 512² .. 3840x2160, fp32 + bf16 (+ fp16 on GPU)
    pytest bench --bench-full            also ViT-B and 7680x4320
    pytest bench --bench-sizes 512,3840x2160
    pytest bench --bench-baseline 572baf7
                                         also each whole-model fast case with that commit's code
    pytest bench --benchmark-disable     smoke: smallest sizes, one run each, outputs
                                         checked against the reference, nothing written
"""

import tempfile
from pathlib import Path

import pytest
import torch

import harness
import report

RESULTS = Path(__file__).parent / "results"
RECORDS = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("mematte bench")
    group.addoption("--bench-full", action="store_true", help="also ViT-B and 7680x4320 (slow on CPU)")
    group.addoption(
        "--bench-sizes",
        default="",
        help="comma-separated sizes replacing the defaults for ops and the whole model, e.g. 512,3840x2160",
    )
    group.addoption(
        "--bench-baseline",
        metavar="REV",
        default=None,
        help="also run each whole-model fast case with the code of this git revision, built once in "
        "${XDG_CACHE_HOME:-~/.cache}/mematte-bench, as its own row fast@<commit>",
    )
    group.addoption(
        "--bench-train-iters",
        type=int,
        default=6,
        metavar="N",
        help="training iterations per train-step case, the first of every three untimed (default 6: 4 timed); "
        "fewer where a step takes minutes (bf16 on a CPU without bf16 dot products)",
    )


def pytest_configure(config):
    # The summary table replaces pytest-benchmark's per-group tables; --benchmark-json still works.
    config.option.benchmark_quiet = True
    sizes = tuple(harness.Size.parse(s) for s in config.getoption("bench_sizes").split(",") if s.strip())
    if config.getoption("bench_train_iters") < 2:
        raise pytest.UsageError("--bench-train-iters: at least 2 (one untimed, one timed)")
    rev = config.getoption("bench_baseline")
    try:
        baseline = harness.resolve_commit(rev) if rev else None
    except harness.BaselineError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[harness.SETTINGS] = harness.Settings(
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        smoke=bool(config.getoption("benchmark_disable")),
        full=config.getoption("bench_full"),
        sizes=sizes,
        baseline=baseline,
        train_iters=config.getoption("bench_train_iters"),
    )
    config.stash[RECORDS] = []


@pytest.fixture(scope="session")
def settings(pytestconfig) -> harness.Settings:
    return pytestconfig.stash[harness.SETTINGS]


@pytest.fixture(scope="session")
def data(settings):
    # Calibrated checkpoints are 0.1-0.5 GB each: a directory that goes away with the session.
    with tempfile.TemporaryDirectory(prefix="mematte-bench-") as directory:
        yield harness.BenchData(Path(directory), settings.device)


@pytest.fixture(scope="session")
def baseline_tree(settings) -> Path:
    """The --bench-baseline commit's tree with its extension built; prepared on first use
    (minutes when it has to compile), then reused from the cache by later runs too."""
    try:
        return harness.prepare_baseline(settings.baseline, harness.baseline_cache())
    except harness.BaselineError as e:
        error = str(e)
    pytest.fail(error, pytrace=False)  # outside the except: the message alone, no chained traceback


@pytest.fixture
def record(request):
    """``record(**fields)`` adds one measured case to the summary."""

    def add(**fields):
        fields["nodeid"] = request.node.nodeid
        request.config.stash[RECORDS].append(report.with_rates(fields))

    return add


def pytest_terminal_summary(terminalreporter, config):
    if harness.SETTINGS not in config.stash:
        return
    settings = config.stash[harness.SETTINGS]
    records = list(config.stash[RECORDS])
    mine = {r["nodeid"] for r in records}
    for bench in getattr(getattr(config, "_benchmarksession", None), "benchmarks", ()):
        if bench and not bench.has_error and bench.fullname not in mine:
            records.append(report.foreign_record(bench))
    if not records:
        return
    info, git = report.machine(settings.device), report.git_state()
    mode = "smoke" if settings.smoke else "full" if settings.full else "default"
    terminalreporter.section("MEMatte benchmark summary")
    terminalreporter.write_line(report.table(report.comparisons(records), report.header(info, git, mode)))
    if settings.smoke:
        terminalreporter.write_line("smoke run: one run per case at the smallest sizes; no results written")
        return
    baseline = settings.baseline and {"rev": config.getoption("bench_baseline"), "commit": settings.baseline}
    options = {
        "bench_full": settings.full,
        "bench_sizes": [s.id for s in settings.sizes],
        "bench_baseline": baseline,
        "device": str(settings.device),
    }
    path = report.save(RESULTS, info, git, mode, options, records)
    terminalreporter.write_line(
        f"results: {path.relative_to(RESULTS.parent.parent)} (and latest-{report.device_slug(info)}.json)"
    )
