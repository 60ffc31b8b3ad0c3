"""``mematte train`` under torchrun: the published global batch divided among the
processes, and each rank on the GPU of its local rank before the model is built."""

import contextlib
import io

import pytest
import torch

from mematte.cli import build_parser, main
from mematte.train import run as train_run

from train_helpers import make_dataset

# (variant, processes) -> crops per process: the published 2 GPUs × 16 (ViT-S) and
# 4 GPUs × 10 (ViT-B), divided among the processes.
PER_PROCESS = {
    ("vit_s", 1): 32,
    ("vit_s", 2): 16,
    ("vit_s", 4): 8,
    ("vit_b", 1): 40,
    ("vit_b", 2): 20,
    ("vit_b", 4): 10,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # enough backgrounds for one batch of 2 crops on each of 32 processes
    return make_dataset(tmp_path_factory.mktemp("data"), n_fg=1, n_bg=64, size=(32, 48))


@pytest.fixture
def launched(monkeypatch):
    """Pretend to be one rank of a torchrun launch (and keep this process's threads)."""
    threads = torch.get_num_threads()

    def launch(rank, world, local_rank=None, local_world=None):
        local_rank = rank if local_rank is None else local_rank
        for name, value in {
            "RANK": rank,
            "WORLD_SIZE": world,
            "LOCAL_RANK": local_rank,
            "LOCAL_WORLD_SIZE": local_world or world,
        }.items():
            monkeypatch.setenv(name, str(value))

    yield launch
    torch.set_num_threads(threads)


def parse(data_dir, tmp_path, *options):
    return build_parser().parse_args(["train", str(data_dir), "--out", str(tmp_path / "run"), *map(str, options)])


def run(*argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_without_batch_size_the_published_global_batch_is_divided_among_the_processes(
    data_dir, tmp_path, launched, variant, world
):
    launched(world - 1, world)
    prepared = train_run.prepare(parse(data_dir, tmp_path, "--variant", variant, "--device", "cpu"))
    assert prepared.cfg.batch_size == PER_PROCESS[variant, world]
    published = {"vit_s": 32, "vit_b": 40}[variant]
    text = train_run.describe_batch(prepared.cfg, world)
    assert text.startswith(
        f"global batch {published} ({PER_PROCESS[variant, world]} crops of 512² per process × {world} "
    )
    assert text.endswith("as published (2 GPUs × 16)" if variant == "vit_s" else "as published (4 GPUs × 10)")


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_size_stays_per_process_and_the_start_compares_it_with_the_published_batch(
    data_dir, tmp_path, launched, variant, world
):
    launched(0, world)
    prepared = train_run.prepare(parse(data_dir, tmp_path, "--variant", variant, "--device", "cpu", "--batch-size", 5))
    assert prepared.cfg.batch_size == 5
    published = {"vit_s": 32, "vit_b": 40}[variant]
    text = train_run.describe_batch(prepared.cfg, world)
    assert text.startswith(f"global batch {5 * world} (5 crops of 512² per process × {world} ")
    assert f"× the published {published} " in text and "as published" not in text


@pytest.mark.parametrize(
    "variant, world, fits",
    [
        ("vit_s", 3, "1, 2, 4, 8, 16"),
        ("vit_b", 3, "1, 2, 4, 5, 8, 10, 20"),
        ("vit_s", 32, "1, 2, 4, 8, 16"),  # 1 crop per process: BatchNorm needs 2
    ],
    ids=["vit_s-3-processes", "vit_b-3-processes", "vit_s-32-processes"],
)
def test_a_world_size_that_does_not_divide_the_published_batch_is_refused(
    data_dir, tmp_path, launched, variant, world, fits
):
    launched(0, world)
    rc, err = run("train", data_dir, "--out", tmp_path / "run", "--variant", variant, "--device", "cpu")
    assert rc == 2
    assert f"does not divide among {world} processes" in err and f"run {fits} processes" in err
    assert "--batch-size" in err
    assert not (tmp_path / "run").exists()
    # --batch-size says what each process takes, so any world size goes
    prepared = train_run.prepare(parse(data_dir, tmp_path, "--variant", variant, "--device", "cpu", "--batch-size", 2))
    assert prepared.cfg.batch_size == 2


class ModelBuilt(Exception):
    pass


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA as torch would report two GPUs; every device made current is recorded."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", torch.device(device))))
    return events


def test_each_rank_takes_the_gpu_of_its_local_rank_before_the_model_is_built(
    data_dir, tmp_path, launched, two_gpus, monkeypatch
):
    launched(3, 4, local_rank=1, local_world=2)  # the second GPU of the second machine

    def build_model(prepared):
        two_gpus.append(("build_model", prepared.device))
        raise ModelBuilt

    monkeypatch.setattr(train_run, "build_model", build_model)
    with pytest.raises(ModelBuilt):
        train_run.train_command(parse(data_dir, tmp_path))
    gpu = torch.device("cuda", 1)
    assert two_gpus == [("set_device", gpu), ("build_model", gpu)]


def test_a_rank_without_a_gpu_of_its_own_is_refused(data_dir, tmp_path, launched, two_gpus):
    launched(2, 3)  # three processes on a machine with two GPUs
    rc, err = run("train", data_dir, "--out", tmp_path / "run", "--batch-size", 2)
    assert rc == 2
    assert "local rank 2 has no GPU of its own: this machine has 2" in err
    assert two_gpus == []
