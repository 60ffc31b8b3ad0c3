"""``mematte train``: its command line (built without importing torch) and what it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import BACKENDS, EXIT_OK

# The published recipe; mirrors mematte.train.optim (a test checks that they agree),
# spelled out so that building the parser imports no torch.
VARIANTS = ("vit_s", "vit_b")
RECIPE = {
    "vit_s": {"iters": 40406, "gpus": 2, "batch_per_gpu": 16},
    "vit_b": {"iters": 64650, "gpus": 4, "batch_per_gpu": 10},
}
LR, WEIGHT_DECAY, LR_DECAY, WARMUP = 5e-4, 0.1, 0.65, 250
CROP_MULTIPLE = 32
# Defaults that do not come from the paper (mirrors mematte.train.optim's, like the recipe).
MIN_CHECKPOINT_PERIOD = 1000
WORKERS = 4
PRECISIONS = ("fp32", "bf16", "fp16")

TRAIN_EPILOG = """\
DATA layout (Adobe Image Matting style, files paired by stem):
  DATA/fg/     foregrounds (any of .png .jpg .jpeg .tif .tiff .bmp .webp)
  DATA/alpha/  their alpha mattes, same stem and size (grey, 8-bit)
  DATA/bg/     backgrounds (e.g. COCO); one epoch = one sample per background

Each sample: a random second foreground mixed in, random affine, a trimap from the eroded
alpha, a crop centred on unknown pixels, colour jitter, composited on the background.

The published recipe is the default: AdamW, lr 5e-4 with layer-wise decay 0.65, weight
decay 0.1, 250 warmup iterations, lr x0.1 and x0.05 at 6/30 and 26/30 of the run (ViT-S;
ViT-B: 30/60, 52/60), ViT-S 40406 iterations of a global batch of 32 crops (2 GPUs x 16),
ViT-B 64650 of 40 (4 GPUs x 10), 15 checkpoints per run, fp16 mixed precision on GPUs.
Without --batch-size the global batch is divided among the processes (ViT-S on 4 GPUs:
8 crops each); --batch-size sets the crops per process.

Several processes: torchrun --nproc-per-node N -m mematte train DATA --out RUN ...
(DDP: NCCL on GPUs, each process on the GPU of its local rank; gloo on CPUs).

RUN/ receives model_{iteration:07d}.pth and model_final.pth (detectron2 layout, loadable by
FastMEMatte.from_checkpoint and by the original code), last_checkpoint and metrics.csv.
--resume continues from the checkpoint last_checkpoint names, exactly as if never stopped.

exit status: 0 done, 1 the run failed, 2 usage error (nothing was done), 130 interrupted.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train or fine-tune MEMatte (BATR, the published recipe)",
        description="Train MEMatte as published (batch-constrained adaptive token routing, "
        "distilled from ViTMatte), on one process or many under torchrun.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", type=Path, help="dataset folder with fg/, alpha/ and bg/")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="folder for checkpoints and metrics")
    w = p.add_argument_group("weights")
    w.add_argument(
        "--init",
        type=Path,
        metavar="CKPT",
        help="ViTMatte checkpoint (upstream or HF names) to start from, as published; "
        "or a MEMatte checkpoint to fine-tune (default: random weights)",
    )
    w.add_argument(
        "--teacher",
        type=Path,
        metavar="CKPT",
        help="ViTMatte checkpoint whose backbone is the distillation teacher "
        "(default: the --init ViTMatte, or the teacher a MEMatte --init holds)",
    )
    w.add_argument("--variant", choices=VARIANTS, help="model size (default: that of --init, else vit_s)")
    s = p.add_argument_group("schedule")
    s.add_argument("--iters", type=int, metavar="N", help="iterations (default: 40406 ViT-S, 64650 ViT-B)")
    s.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="crops per process and iteration, ≥ 2 (default: the published global batch, "
        "32 ViT-S or 40 ViT-B, divided among the processes)",
    )
    s.add_argument(
        "--crop",
        type=int,
        default=512,
        metavar="PX",
        help="training crop side, a multiple of 32 (default: %(default)s)",
    )
    s.add_argument("--lr", type=float, default=LR, help="base learning rate (default: %(default)s)")
    s.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="(default: %(default)s)")
    s.add_argument(
        "--lr-decay", type=float, default=LR_DECAY, help="layer-wise lr decay of the ViT blocks (default: %(default)s)"
    )
    s.add_argument(
        "--warmup", type=int, default=WARMUP, metavar="N", help="linear warmup iterations (default: %(default)s)"
    )
    s.add_argument(
        "--milestones",
        type=float,
        nargs=2,
        metavar=("F1", "F2"),
        help="fractions of --iters where the lr drops to 0.1 and 0.05 of its peak "
        "(default: 0.2 0.8667 ViT-S, 0.5 0.8667 ViT-B)",
    )
    s.add_argument(
        "--checkpoint-period",
        type=int,
        metavar="N",
        help="iterations between checkpoints (default: --iters / 15, at least "
        f"{MIN_CHECKPOINT_PERIOD:,}); the final model is always saved",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N (default: auto; "
        "under torchrun each process takes the GPU of its local rank)",
    )
    r.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or mixed precision with bf16 or fp16 autocast (fp16 adds a "
        "GradScaler; GPUs only) (default: fp16 on GPUs, as published; fp32 on CPUs)",
    )
    r.add_argument("--backend", choices=BACKENDS, default="auto", help="kernel implementation (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN from its last checkpoint (starts fresh if it has none)",
    )
    r.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"data-loading processes per training process (default: {WORKERS}, or the "
        "cores each process has if fewer)",
    )
    p.set_defaults(run="mematte.train.command:run_train")
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before anything is read."""
    from ..cli import UsageError

    if args.crop < CROP_MULTIPLE or args.crop % CROP_MULTIPLE:
        raise UsageError(
            f"--crop must be a positive multiple of {CROP_MULTIPLE} (the model's patch grid), got {args.crop}"
        )
    if args.batch_size is not None and args.batch_size < 2:
        raise UsageError(
            f"--batch-size must be ≥ 2: the decoder's BatchNorm normalises over the "
            f"crops of each process (got {args.batch_size}); for one crop per GPU "
            "use fewer processes with --batch-size 2 or more"
        )
    for name in ("iters", "checkpoint_period"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if args.warmup < 0 or (args.workers is not None and args.workers < 0):
        raise UsageError("--warmup and --workers must be ≥ 0")
    if not args.lr > 0 or args.weight_decay < 0 or not 0 < args.lr_decay <= 1:
        raise UsageError("--lr must be > 0, --weight-decay ≥ 0 and --lr-decay in (0, 1]")
    if args.milestones is not None and not 0 <= args.milestones[0] <= args.milestones[1] <= 1:
        raise UsageError(f"--milestones must be fractions 0 ≤ F1 ≤ F2 ≤ 1, got {args.milestones}")


def run_train(args: argparse.Namespace) -> int:
    check_numbers(args)
    from .run import train_command

    return train_command(args) or EXIT_OK
