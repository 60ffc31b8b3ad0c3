"""``mematte train`` after its numbers are checked: every input is validated, then the
model is built and trained (see :mod:`mematte.train.engine`)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from ..api import resolve_device
from ..cli import UsageError
from ..distributed import Distributed, distributed_from_env, share_cpu_threads, take_device
from . import optim
from .data import DatasetError, DatasetFiles, find_dataset
from .engine import TrainConfig, Trainer, existing_run, find_resume_checkpoint, init_distributed
from .init import InitError, InitPlan, load_init, plan_init, plan_teacher, upstream_init

SHOWN_SKIPS = 10


@dataclass
class Prepared:
    cfg: TrainConfig
    files: DatasetFiles
    device: torch.device
    ddp: Distributed
    plan: InitPlan | None
    teacher: dict[str, torch.Tensor] | None
    backend: str


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything the run needs, checked; raises :class:`UsageError` for what cannot work."""
    try:
        ddp = distributed_from_env()
        device = take_device(ddp, resolve_device(args.device))  # before anything else touches CUDA
    except ValueError as e:
        raise UsageError(str(e)) from None
    share_cpu_threads(ddp, device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU; on CPUs use bf16 (or fp32)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; it must be a folder")
    if not args.resume and existing_run(args.out):
        raise UsageError(
            f"{args.out} already holds a run ({existing_run(args.out)[-1].name}); pass "
            "--resume to continue it, or choose another --out"
        )

    try:
        files = find_dataset(args.data)
    except DatasetError as e:
        raise UsageError(str(e)) from None

    plan = teacher = None
    try:
        if args.init is not None:
            plan = plan_init(args.init, args.teacher)
        elif args.teacher is not None:
            teacher = plan_teacher(args.teacher, args.variant)
    except InitError as e:
        raise UsageError(f"--init/--teacher: {e}") from None
    variant = args.variant or (plan.variant if plan else "vit_s")
    if plan is not None and plan.variant != variant:
        raise UsageError(f"--variant {variant} but --init {args.init} is {plan.variant}")

    iters = args.iters or optim.RECIPE[variant]["iters"]
    batch_size = args.batch_size or default_batch_size(variant, ddp.world_size)
    fractions = args.milestones or optim.MILESTONE_FRACTIONS[variant]
    if len(files.bg) < batch_size * ddp.world_size:
        raise UsageError(
            f"{len(files.bg)} backgrounds cannot fill one batch of {batch_size} on each of "
            f"{ddp.world_size} processes: add backgrounds or lower --batch-size"
        )
    cfg = TrainConfig(
        out=args.out,
        variant=variant,
        iters=iters,
        batch_size=batch_size,
        crop=args.crop,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_decay=args.lr_decay,
        warmup=args.warmup,
        milestones=tuple(optim.milestones_for(iters, fractions)),
        checkpoint_period=args.checkpoint_period or default_checkpoint_period(iters),
        precision=precision,
        seed=args.seed,
        resume=args.resume,
        workers=default_workers(ddp) if args.workers is None else args.workers,
    )
    return Prepared(cfg, files, device, ddp, plan, teacher, args.backend)


def default_checkpoint_period(iters: int) -> int:
    """The published 15 checkpoints per run, but none more often than every
    :data:`optim.MIN_CHECKPOINT_PERIOD` iterations (the final one is always written)."""
    return max(optim.MIN_CHECKPOINT_PERIOD, iters // optim.CHECKPOINTS_PER_RUN)


def default_workers(ddp: Distributed) -> int:
    """:data:`optim.WORKERS` data-loading processes, or fewer: no more than this process's share
    of the cores it may run on."""
    return max(1, min(optim.WORKERS, len(os.sched_getaffinity(0)) // ddp.local_world_size))


def default_batch_size(variant: str, world_size: int) -> int:
    """Crops per process that make the published global batch over ``world_size`` processes."""
    published = optim.published_batch(variant)
    per_process, rest = divmod(published, world_size)
    if rest or per_process < 2:
        fits = [str(n) for n in range(1, published + 1) if published % n == 0 and published // n >= 2]
        raise UsageError(
            f"the published global batch of {variant}, {published} crops, does not divide among {world_size} "
            f"processes into batches of 2 or more (the decoder's BatchNorm needs 2 per process): run "
            f"{', '.join(fits)} processes, or give --batch-size (crops per process)"
        )
    return per_process


def describe_batch(cfg: TrainConfig, world_size: int) -> str:
    """The run's global batch, set against the published one."""
    recipe, published = optim.RECIPE[cfg.variant], optim.published_batch(cfg.variant)
    global_batch = cfg.batch_size * world_size
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    comparison = (
        "as published" if global_batch == published else f"{global_batch / published:.3g}× the published {published}"
    )
    return (
        f"global batch {global_batch} ({cfg.batch_size} crops of {cfg.crop}² per process × {processes}), "
        f"{comparison} ({recipe['gpus']} GPUs × {recipe['batch_per_gpu']})"
    )


def build_model(p: Prepared) -> tuple[torch.nn.Module, list[str]]:
    """The model at its starting weights (the same on every rank), and what was done."""
    from ..model import FastMEMatte

    has_teacher = bool(p.teacher) or (p.plan is not None and p.plan.has_teacher)
    torch.manual_seed(p.cfg.seed)
    model = FastMEMatte(p.cfg.variant, teacher=has_teacher, backend=p.backend)
    upstream_init(model)
    if p.plan is not None:
        report = load_init(model, p.plan)
    else:
        report = ["no --init: starting from random weights (the published recipe starts from a ViTMatte checkpoint)"]
        if p.teacher:
            model.load_state_dict(p.teacher, strict=False)
    if not has_teacher:
        report.append("no teacher: training without distillation (give --teacher, or --init a ViTMatte checkpoint)")
    return model, report


def train_command(args: argparse.Namespace) -> int:
    p = prepare(args)
    main = p.ddp.main

    def say(*lines: str) -> None:
        if main:
            for line in lines:
                print(line, file=sys.stderr)

    if p.files.skipped:
        say(
            f"skipping {len(p.files.skipped)} dataset files:",
            *(f"  {s}" for s in p.files.skipped[:SHOWN_SKIPS]),
            *([f"  … and {len(p.files.skipped) - SHOWN_SKIPS} more"] if len(p.files.skipped) > SHOWN_SKIPS else []),
        )
    resume_from = find_resume_checkpoint(args.out) if args.resume else None
    if args.resume and resume_from is None:
        say(f"--resume: {args.out} has no checkpoint yet; starting a new run")
    model, report = build_model(p)
    if resume_from is None:
        say(*report)
    cfg = p.cfg
    init_distributed(p.ddp, p.device)
    trainer = Trainer(model, p.files, cfg, p.device, p.ddp)
    if resume_from is not None:
        try:
            trainer.resume(resume_from)
        except ValueError as e:
            raise UsageError(str(e)) from None
        say(f"resuming {resume_from} at iteration {trainer.start_iter}")
        if trainer.start_iter >= cfg.iters:
            say(f"{cfg.out} has finished its {cfg.iters} iterations")
            return 0
    say(
        f"training {cfg.variant}: {cfg.iters} iterations, {describe_batch(cfg, p.ddp.world_size)}; "
        f"{cfg.precision} on {p.device}; {len(p.files.fg)} foregrounds, {len(p.files.bg)} backgrounds"
    )
    try:
        final = trainer.train()
    finally:
        if p.ddp.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if final is not None:
        say(f"wrote {final}")
    return 0
