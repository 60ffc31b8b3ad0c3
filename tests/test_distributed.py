"""``mematte predict`` and ``eval`` under torchrun: the folder shared among the processes,
outputs and scores exactly those of one process; and the launch environment itself."""

import contextlib
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mematte import commands
from mematte.cli import main
from mematte.distributed import Distributed, distributed_from_env, shard, share_cpu_threads

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
# The CPU fast path picks kernels by timing them, so two processes may pick differently and
# differ in the last bit; the references compute alike in every process, which isolates
# what these tests are about: the sharding.
MODEL = ("--device", "cpu", "--backend", "reference")
# torchrun leaves each process its share of the cores; one process gets as many threads,
# so that both runs compute alike.
THREADS_PER_PROCESS = max(1, len(os.sched_getaffinity(0)) // PROCESSES)


def run(*argv):
    """main(argv) on the CPU in this process, with a torchrun process's threads: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS_PER_PROCESS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([*map(str, argv), *MODEL])
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


def torchrun(*argv):
    """``torchrun --standalone --nproc-per-node 2 -m mematte ... --device cpu --backend reference`` (gloo)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun's default
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(PROCESSES),
            "-m",
            "mematte",
            *map(str, argv),
            *MODEL,
        ],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Seven small images of odd sizes, their trimaps and ground truth (Composition-1k layout)."""
    root = tmp_path_factory.mktemp("dataset")
    for d in ("merged", "trimaps", "alpha_copy"):
        (root / d).mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        h, w = 37 + 4 * i, 61 - 3 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "merged" / f"img{i}.png")
        trimap = np.full((h, w), 128, np.uint8)
        trimap[:, : w // 4], trimap[:, -(w // 4) :] = 0, 255
        Image.fromarray(trimap).save(root / "trimaps" / f"img{i}.png")
        truth = np.zeros((h, w), np.uint8)
        truth[:, w // 2 + i - 3 :] = 255
        Image.fromarray(truth).save(root / "alpha_copy" / f"img{i}.png")
    return root


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def single_predict(dataset, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    rc, _, stderr = run(
        "predict", dataset / "merged", "--trimap", dataset / "trimaps", "--checkpoint", checkpoint, "-o", out, "--rgba"
    )
    assert rc == 0, stderr
    return out


def test_torchrun_predict_writes_the_outputs_of_one_process(dataset, checkpoint, single_predict, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(
        "predict", dataset / "merged", "--trimap", dataset / "trimaps", "--checkpoint", checkpoint, "-o", out, "--rgba"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert folder_bytes(out) == folder_bytes(single_predict)
    assert proc.stdout == f"7 of 7 images matted into {out}\n"  # rank 0 reports for both
    # described once, with its share of the cores; one progress bar, rank 0's
    assert proc.stderr.count("mematte: FastMEMatte(vit_s) on cpu") == 1
    assert f"; {PROCESSES} processes, each on its share of the images, {THREADS_PER_PROCESS} thread" in proc.stderr
    assert f"rank 0 of {PROCESSES}" in proc.stderr and "rank 1" not in proc.stderr
    assert "| 4/4 [" in proc.stderr  # rank 0's share: img0, img2, img4, img6


def test_torchrun_predict_skip_existing_resumes_on_every_rank(dataset, checkpoint, single_predict, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_predict, out)
    (out / "img3_rgba.png").unlink()  # rank 1's image, cut short
    (out / "img4_alpha.png").write_bytes(b"stale")  # rank 0's, cut short before its rgba
    (out / "img4_rgba.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(("img3", "img4"))}
    proc = torchrun(
        "predict",
        dataset / "merged",
        "--trimap",
        dataset / "trimaps",
        "--checkpoint",
        checkpoint,
        "-o",
        out,
        "--rgba",
        "--skip-existing",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == f"2 of 7 images matted into {out} (5 skipped: their outputs exist)\n"
    assert folder_bytes(out) == folder_bytes(single_predict)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


def test_torchrun_eval_prints_the_scores_and_means_of_one_process(dataset, checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.copy(data / "merged" / "img0.png", data / "merged" / "img7.png")  # no ground truth: fails, on rank 1
    shutil.copy(data / "trimaps" / "img0.png", data / "trimaps" / "img7.png")
    rc, single_out, single_err = run("eval", data, "--checkpoint", checkpoint, "--csv", tmp_path / "single.csv")
    proc = torchrun("eval", data, "--checkpoint", checkpoint, "--csv", tmp_path / "torchrun.csv")
    assert rc == 1 and proc.returncode == 1, proc.stderr[-4000:]

    def scores(stdout):  # every line, with time and peak memory left out
        return [
            line.split()[:5] if line.split()[0].startswith(("img", "mean")) and len(line.split()) == 7 else line
            for line in stdout.splitlines()
        ]

    assert scores(proc.stdout) == scores(single_out)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Composition-1k: 8 images in ")
    assert [line.split()[0] for line in lines[2:10]] == [f"img{i}.png" for i in range(7)] + ["mean"]
    assert lines[10] == "mean of 7 of 8 images; 1 failed and are not in it"
    assert len(lines) == 11  # printed once
    assert "failed: img7.png: no ground-truth alpha named img7.* in" in proc.stderr
    assert proc.stderr.count("mematte eval: 1 of 8 images failed") == 1

    def csv_scores(path):
        return [
            {k: v for k, v in row.items() if k not in ("time_s", "peak_mem_mib")} for row in csv.DictReader(path.open())
        ]

    assert csv_scores(tmp_path / "torchrun.csv") == csv_scores(tmp_path / "single.csv")


# ---------------------------------------------------------------------- the launch


def test_the_launch_is_read_from_torchrun_s_environment():
    assert distributed_from_env({}) == Distributed(0, 1, 0, 1)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert distributed_from_env(env) == Distributed(5, 8, 1, 4)
    with pytest.raises(ValueError, match="malformed: RANK='one'"):
        distributed_from_env({**env, "RANK": "one"})
    with pytest.raises(ValueError, match="inconsistent: RANK=8, WORLD_SIZE=8"):
        distributed_from_env({**env, "RANK": "8"})


def test_each_rank_takes_every_world_size_th_item_and_together_all():
    items = [f"img{i}" for i in range(8)]
    shares = [shard(items, Distributed(rank, 3, rank, 3)) for rank in range(3)]
    assert shares == [["img0", "img3", "img6"], ["img1", "img4", "img7"], ["img2", "img5"]]
    assert shard(items, Distributed()) == items


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "omp, ddp, device, threads",
    [
        ("1", Distributed(1, 4, 1, 2), "cpu", 4),  # torchrun's default: this process's share of 8 cores
        (None, Distributed(1, 4, 1, 2), "cpu", 4),
        ("3", Distributed(1, 4, 1, 2), "cpu", None),  # set by the user: kept
        ("1", Distributed(), "cpu", None),  # one process: as it is
        ("1", Distributed(1, 4, 1, 2), "cuda", None),
    ],
    ids=["torchrun-default", "unset", "user-set", "one-process", "cuda-device"],
)
def test_cpu_processes_share_the_cores(monkeypatch, keep_threads, omp, ddp, device, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(1)
    share_cpu_threads(ddp, torch.device(device))
    assert torch.get_num_threads() == (threads or 1)


class ModelLoaded(Exception):
    pass


def test_predict_takes_the_gpu_of_its_local_rank_before_the_model_loads(monkeypatch, dataset, checkpoint, tmp_path):
    events = []
    for name, value in {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", torch.device(device))))
    monkeypatch.setattr(commands, "process_group", lambda *args: contextlib.nullcontext())

    def load_model(checkpoint, *, device, **kwargs):
        events.append(("load_model", torch.device(device)))
        raise ModelLoaded

    monkeypatch.setattr(commands.api, "load_model", load_model)
    with pytest.raises(ModelLoaded):
        main(
            [
                "predict",
                str(dataset / "merged"),
                "--trimap",
                str(dataset / "trimaps"),
                "--checkpoint",
                str(checkpoint),
                "-o",
                str(tmp_path),
                "--dtype",
                "float32",
                "--backend",
                "reference",
            ]
        )
    assert events == [("set_device", torch.device("cuda", 1)), ("load_model", torch.device("cuda", 1))]
