"""The training loop itself, with a small stand-in model (tests/train_helpers.ToyMatte) that
has FastMEMatte's training interface: resume equals a straight run, checkpoint layout,
metrics, a frozen teacher, and DDP under torchrun (gloo)."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from mematte.train.data import TrainSampler, find_dataset
from mematte.train.engine import LAST_CHECKPOINT, Trainer, emulated_precision_warning, step_seed

from train_helpers import ToyMatte, make_dataset, toy_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_fg=3, n_bg=6, size=(96, 112))


def trainer(data_dir, out, **changes):
    torch.manual_seed(0)
    return Trainer(ToyMatte(), find_dataset(data_dir), toy_config(out, **changes), CPU, progress=False)


def assert_same_state(a: dict, b: dict):
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    trainer(data_dir, out).train()
    return out


def test_checkpoint_layout(straight):
    names = sorted(p.name for p in straight.glob("model_*.pth"))
    assert names == ["model_0000009.pth", "model_0000019.pth", "model_final.pth"]
    assert (straight / LAST_CHECKPOINT).read_text() == "model_final.pth"
    ckpt = torch.load(straight / "model_0000009.pth", weights_only=True)
    assert {"model", "iteration", "optimizer", "scheduler", "trainer"} <= set(ckpt)
    assert ckpt["iteration"] == 9 and ckpt["scheduler"]["last_epoch"] == 10
    assert any(k.startswith("teacher_backbone.") for k in ckpt["model"])
    assert not list(straight.glob(".*.tmp"))  # no temporary file left behind


def test_teacher_is_frozen(straight, data_dir):
    start = trainer(data_dir, straight / "unused").model.state_dict()
    final = torch.load(straight / "model_final.pth", weights_only=True)["model"]
    teacher = [k for k in final if k.startswith("teacher_backbone.")]
    assert teacher and all(torch.equal(final[k], start[k]) for k in teacher)
    assert not torch.equal(final["backbone.patch_embed.weight"], start["backbone.patch_embed.weight"])


def test_metrics(straight):
    with open(straight / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(20))
    for column in ("unknown_l1_loss", "total_loss", "routed_share_block2", "routed_share_block11", "lr", "s_per_iter"):
        assert column in rows[0]
    first = rows[0]
    parts = sum(float(first[k]) for k in ("unknown_l1_loss", "known_l1_loss", "mse_ratio_loss", "distill_loss"))
    assert float(first["total_loss"]) == pytest.approx(parts, rel=1e-5)
    assert float(rows[0]["lr"]) == pytest.approx(1e-2 * 0.001)  # warmup starts at 0.001×
    assert float(rows[19]["lr"]) == pytest.approx(1e-2 * 0.05)  # after both milestones


def test_resume_equals_straight_run(straight, data_dir, tmp_path):
    """Stop after 10 of 20 iterations (a half-written metrics row included), resume, and
    land on the straight run's final state bit for bit."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(straight / "model_0000009.pth", run)
    (run / LAST_CHECKPOINT).write_text("model_0000009.pth")
    with open(straight / "metrics.csv") as f:
        lines = f.readlines()
    (run / "metrics.csv").write_text("".join(lines[:13]) + lines[13][:7])  # rows 0..11, then a torn row
    t = trainer(data_dir, run)
    t.resume(run / "model_0000009.pth")
    assert t.start_iter == 10
    t.train()
    assert_same_state(
        torch.load(run / "model_final.pth", weights_only=True),
        torch.load(straight / "model_final.pth", weights_only=True),
    )
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == list(range(20))


def test_resume_refuses_other_settings(straight, data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, batch_size=3)
    with pytest.raises(ValueError, match="batch_size: 2 then, 3 now"):
        t.resume(straight / "model_0000009.pth")


# ---------------------------------------------------------------------- DDP


def test_ddp_ranks_agree_and_first_step_equals_one_process(data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = Path(__file__).parent / "train_ddp_toy.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(data_dir),
            str(out),
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_same_state(ranks[0], ranks[1])
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000000.pth",
        "model_0000001.pth",
        "model_0000002.pth",
        "model_final.pth",
    ]

    # The first step on one process: each rank's batch and Gumbel draws, gradients averaged.
    t = trainer(data_dir, tmp_path / "single", iters=3, checkpoint_period=1)
    model, ds = t.model, t.dataset
    model.train()
    grads = []
    for rank in range(2):
        keys = next(iter(TrainSampler(len(ds), 2, num_replicas=2, rank=rank, seed=0)))
        batch = default_collate([ds[k] for k in keys])
        torch.manual_seed(step_seed(0, rank, 0))
        model.zero_grad()
        sum(model(batch).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n, p in model.named_parameters():
        if n in grads[0]:
            p.grad = (grads[0][n] + grads[1][n]) / 2
    t.optimizer.step()
    first = torch.load(out / "model_0000000.pth", weights_only=True)["model"]
    start = trainer(data_dir, tmp_path / "start").model.state_dict()
    for n, p in model.named_parameters():
        torch.testing.assert_close(first[n], p.detach(), rtol=1e-6, atol=1e-7, msg=n)
        if not n.startswith("teacher_"):
            assert not torch.equal(p.detach(), start[n]), f"{n} did not move"


class NanAt(ToyMatte):
    """Returns a NaN unknown L1 (a batch without unknown pixels) at the given calls."""

    def __init__(self, calls):
        super().__init__()
        self.calls, self.count = set(calls), 0

    def forward(self, batch):
        losses = super().forward(batch)
        if self.count in self.calls:
            losses["unknown_l1_loss"] = losses["unknown_l1_loss"] * float("nan")
        self.count += 1
        return losses


def test_a_nonfinite_loss_skips_the_update(data_dir, tmp_path):
    torch.manual_seed(0)
    model = NanAt({1})
    t = Trainer(model, find_dataset(data_dir), toy_config(tmp_path, iters=3, checkpoint_period=1), CPU, progress=False)
    t.train()
    after = [torch.load(tmp_path / f"model_000000{i}.pth", weights_only=True)["model"] for i in range(3)]
    name = "backbone.patch_embed.weight"
    assert torch.equal(after[0][name], after[1][name])  # iteration 1 changed nothing
    assert not torch.equal(after[1][name], after[2][name])  # and training went on
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["total_loss"] == "nan" and rows[2]["total_loss"] != "nan"


@pytest.mark.filterwarnings("error::UserWarning")  # skipped updates keep the schedule quietly
def test_losses_that_stay_nonfinite_stop_the_run(data_dir, tmp_path):
    torch.manual_seed(0)
    model = NanAt(range(100))
    t = Trainer(model, find_dataset(data_dir), toy_config(tmp_path, iters=30), CPU, progress=False)
    with pytest.raises(FloatingPointError, match="10 iterations in a row"):
        t.train()


@pytest.mark.parametrize(
    "choice, warns", [pytest.param("fp32", True, id="bf16-emulated"), pytest.param("onednn", False, id="bf16-native")]
)
def test_mixed_precision_on_a_cpu_that_emulates_it_is_called_out(choice, warns, monkeypatch):
    """The warning follows the CPU backend's measured choice for bf16 dense layers."""
    from mematte_kernels import cpu_choices

    linear = cpu_choices.selected()["linear"]
    chosen = next(c for c in linear.candidates if c.name == choice)
    monkeypatch.setattr(linear, "choose", lambda dtype: chosen)
    warning = emulated_precision_warning(torch.device("cpu"), torch.bfloat16)
    assert (warning is not None) == warns
    if warns:
        assert "bf16 autocast" in warning and "--precision fp32" in warning
    assert emulated_precision_warning(torch.device("cpu"), None) is None
    assert emulated_precision_warning(torch.device("cuda"), torch.bfloat16) is None
