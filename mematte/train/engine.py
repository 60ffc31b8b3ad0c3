"""The training loop: one process, or one per device under ``torchrun`` (DDP).

A run directory holds ``model_{iteration:07d}.pth`` every ``checkpoint_period``
iterations and ``model_final.pth`` at the end, each in detectron2's layout
(``{"model", "iteration", "optimizer", "scheduler"}``, plus ``grad_scaler`` under fp16
and ``trainer``, the settings a resumed run must share); ``last_checkpoint`` names the
newest, as detectron2 does, and ``metrics.csv`` has one row per iteration. Only rank 0
writes; checkpoints are written atomically.

Reproducibility: a sample's augmentation is seeded by (seed, epoch, index), and before
every forward each rank seeds torch from (seed, rank, iteration) (the Gumbel noise of the
routers). A run resumed from a checkpoint therefore continues bit for bit: model,
optimiser, schedule and scaler come from the checkpoint, the data order and every random
draw from the iteration number.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .. import io
from ..distributed import Distributed, init_process_group
from . import optim
from .data import DatasetFiles, MattingDataset, TrainSampler

log = logging.getLogger("mematte.train")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAST_CHECKPOINT = "last_checkpoint"
METRICS = "metrics.csv"
ROUTED_BLOCKS = (2, 5, 8, 11)
MAX_NONFINITE = 10  # iterations in a row with a non-finite loss before the run stops


def emulated_precision_warning(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why mixed precision would slow training down here, or None: on a CPU without dot
    products in ``dtype`` (no AVX512-BF16 or AMX for bf16), autocast's GEMMs and convolutions
    run emulated, several times slower than fp32. The CPU backend's measured choice for its
    dense layers says which it is (:mod:`mematte_kernels.selection`)."""
    if device.type != "cpu" or dtype is None:
        return None
    from mematte_kernels import cpu_choices

    if cpu_choices.selected()["linear"].choose(dtype).name != "fp32":
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return (
        f"{name} autocast on this CPU runs its GEMMs and convolutions emulated: they measure slower "
        f"in {name} than in fp32 here, so --precision fp32 trains faster"
    )


@dataclass
class TrainConfig:
    """A run's settings, checked by the command line before they get here."""

    out: Path
    variant: str = "vit_s"
    iters: int = optim.RECIPE["vit_s"]["iters"]
    batch_size: int = optim.RECIPE["vit_s"]["batch_per_gpu"]  # per process
    crop: int = 512
    lr: float = optim.LR
    weight_decay: float = optim.WEIGHT_DECAY
    lr_decay: float = optim.LR_DECAY
    warmup: int = optim.WARMUP_ITERS
    milestones: tuple[int, ...] = (8081, 35018)
    checkpoint_period: int = 2693
    precision: str = "fp32"
    seed: int = 0
    workers: int = 4
    resume: bool = False

    def shared(self) -> dict:
        """What a resumed run must have in common with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "workers", "resume")}


def init_distributed(ddp: Distributed, device: torch.device) -> None:
    init_process_group(ddp, "nccl" if device.type == "cuda" else "gloo")


def step_seed(seed: int, rank: int, iteration: int) -> int:
    """The torch seed of one rank's forward at one iteration."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0] >> 1)


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def find_resume_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``last_checkpoint`` names in ``out``, if any."""
    pointer = out / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = out / pointer.read_text().strip()
    return path if path.is_file() else None


def existing_run(out: Path) -> list[Path]:
    """Checkpoints already in ``out`` (a fresh run refuses to overwrite them)."""
    return sorted(out.glob("model_*.pth")) if out.is_dir() else []


def _worker_init(worker_id: int) -> None:
    # Each worker is one process: OpenCV's and torch's own thread pools only oversubscribe.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class Trainer:
    """Trains ``model`` (a module whose training forward returns a dict of loss tensors
    and which records ``routed_share``, as :class:`mematte.FastMEMatte` does) on
    ``files`` with the settings of ``cfg``."""

    def __init__(
        self,
        model: nn.Module,
        files: DatasetFiles,
        cfg: TrainConfig,
        device: torch.device,
        ddp: Distributed | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.device = device
        self.ddp = ddp or Distributed()
        self.progress = progress and self.ddp.main
        for name, p in model.named_parameters():
            if "teacher" in name:  # the distillation teacher is frozen, as upstream's main.py does
                p.requires_grad_(False)
        self.model = model.to(device)
        self.optimizer = optim.build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.lr_decay)
        self.scheduler = optim.WarmupMultiStep(self.optimizer, cfg.milestones, cfg.warmup)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.start_iter = 0
        self.dataset = MattingDataset(files, cfg.crop, cfg.seed)
        self._columns: list[str] | None = None

    # ------------------------------------------------------------------ checkpoints

    def state(self, iteration: int) -> dict:
        state = {
            "model": self.model.state_dict(),
            "iteration": iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {**self.cfg.shared(), "world_size": self.ddp.world_size},
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self, name: str, iteration: int) -> Path:
        path = self.cfg.out / name
        state = self.state(iteration)
        io.write_atomic(path, lambda f: torch.save(state, f))
        io.write_atomic(self.cfg.out / LAST_CHECKPOINT, lambda f: f.write(name.encode()))
        return path

    def resume(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (made by this trainer with the same settings)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = state.get("trainer", {})
        mine = {**self.cfg.shared(), "world_size": self.ddp.world_size}
        differ = [
            f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in mine.items() if _plain(saved.get(k)) != _plain(v)
        ]
        if differ:
            raise ValueError(f"{path} was trained with other settings; resume with the same ones ({'; '.join(differ)})")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.start_iter = int(state["iteration"]) + 1

    # ------------------------------------------------------------------ metrics

    def _open_metrics(self):
        path = self.cfg.out / METRICS
        rows: list[list[str]] = []
        if self.start_iter > 0 and path.is_file():
            with open(path, newline="") as f:
                reader = csv.reader(f)
                self._columns = next(reader, None)
                width = len(self._columns or [])
                # keep complete rows of the iterations before the resumed one
                rows = [r for r in reader if len(r) == width and r[0].isdigit() and int(r[0]) < self.start_iter]
        text = "".join(",".join(r) + "\n" for r in ([self._columns] + rows if self._columns else []))
        io.write_atomic(path, lambda f: f.write(text.encode()))
        # One write per row: an interrupted run leaves at most a partial last row, which
        # resuming drops.
        return open(path, "a", buffering=1, newline="")

    def _metrics_row(self, f, iteration: int, values: dict[str, float]) -> None:
        if self._columns is None:
            self._columns = ["iteration", *values]
            f.write(",".join(self._columns) + "\n")
        f.write(",".join([str(iteration), *(f"{values.get(c, float('nan')):.6g}" for c in self._columns[1:])]) + "\n")

    # ------------------------------------------------------------------ loop

    def loader(self) -> torch.utils.data.DataLoader:
        sampler = TrainSampler(
            len(self.dataset),
            self.cfg.batch_size,
            num_replicas=self.ddp.world_size,
            rank=self.ddp.rank,
            seed=self.cfg.seed,
            start_batch=self.start_iter,
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.workers,
            worker_init_fn=_worker_init if self.cfg.workers else None,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.workers > 0,
        )

    def train(self) -> Path | None:
        """Run the remaining iterations; returns ``model_final.pth`` (rank 0) or None."""
        cfg, ddp = self.cfg, self.ddp
        model = self.model
        if ddp.enabled:
            # DDP's defaults are upstream's settings: BatchNorm statistics broadcast from
            # rank 0 at each forward, every parameter used in every step.
            model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if cfg.precision == "fp16" and self.device.type == "cuda":  # as published
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        model.train()
        autocast = (
            torch.autocast(self.device.type, dtype=PRECISIONS[cfg.precision])
            if PRECISIONS[cfg.precision] is not None
            else nullcontext()
        )
        if ddp.main:
            if warning := emulated_precision_warning(self.device, PRECISIONS[cfg.precision]):
                log.warning(warning)
            cfg.out.mkdir(parents=True, exist_ok=True)
        metrics = self._open_metrics() if ddp.main else None
        bar = tqdm(
            range(self.start_iter, cfg.iters),
            initial=self.start_iter,
            total=cfg.iters,
            unit="it",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        final = None
        nonfinite = 0
        batches = iter(self.loader())
        try:
            for iteration in bar:
                start = time.perf_counter()
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                torch.manual_seed(step_seed(cfg.seed, ddp.rank, iteration))
                with autocast:
                    losses = model(batch)
                total = sum(losses.values())
                values = self._reduce(losses, total)  # before backward: every rank takes the same branch
                if np.isfinite(values["total_loss"]):
                    nonfinite = 0
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.scaler is not None:
                        self.scaler.scale(total).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        total.backward()
                        self.optimizer.step()
                else:
                    # e.g. unknown_l1_loss of a batch whose crops have no unknown pixel (0/0,
                    # as upstream): skip the update as a GradScaler skips an overflow.
                    nonfinite += 1
                    text = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                    if nonfinite >= MAX_NONFINITE:
                        raise FloatingPointError(
                            f"losses not finite for {nonfinite} iterations in a row, last at {iteration}: {text}"
                        )
                    if ddp.main:
                        tqdm.write(f"iteration {iteration}: loss not finite ({text}); update skipped", file=sys.stderr)
                lr = max(g["lr"] for g in self.optimizer.param_groups)
                with warnings.catch_warnings():
                    # The schedule follows iterations, skipped updates included; torch warns
                    # when the first ones were skipped.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    self.scheduler.step()
                seconds = time.perf_counter() - start
                if metrics is not None:
                    self._metrics_row(metrics, iteration, {**values, "lr": lr, "s_per_iter": seconds})
                bar.set_postfix(loss=f"{values['total_loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                last = iteration == cfg.iters - 1
                if (iteration + 1) % cfg.checkpoint_period == 0 or last:
                    self._check_ranks_agree(iteration)
                if ddp.main and ((iteration + 1) % cfg.checkpoint_period == 0):
                    self.save(checkpoint_name(iteration), iteration)
                if ddp.main and last:
                    final = self.save("model_final.pth", iteration)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return final

    def _check_ranks_agree(self, iteration: int) -> None:
        """DDP keeps every rank's parameters identical; a checkpoint is only written if they
        are (one sum per parameter, compared across ranks)."""
        if not self.ddp.enabled:
            return
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.ddp.world_size)]
        dist.all_gather(gathered, sums)
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise RuntimeError(f"at iteration {iteration} the parameters of rank(s) {differ} differ from rank 0's")

    def _reduce(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
        """Losses, total and per-router routed share, averaged over the ranks."""
        names = [*losses, "total_loss"]
        values = [v.detach().float() for v in losses.values()] + [total.detach().float()]
        share = getattr(_unwrap(self.model), "routed_share", None)
        if share is not None:
            names += [f"routed_share_block{b}" for b in ROUTED_BLOCKS]
            values += list(share.detach().float().reshape(-1))
        stacked = torch.stack(values)
        if self.ddp.enabled:
            dist.all_reduce(stacked)
            stacked /= self.ddp.world_size
        return dict(zip(names, stacked.tolist()))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _plain(v):
    """Settings compared across a resume: tuples and lists alike."""
    return list(v) if isinstance(v, (tuple, list)) else v
