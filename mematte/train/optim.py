"""Optimiser and learning-rate schedule of the published recipe.

AdamW (lr 5e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.1) over every parameter that
requires grad (the teacher has none), with

* weight decay 0 for the parameters of ``nn.LayerNorm`` and BatchNorm modules and for
  ``pos_embed``; everything else decays, biases included, and so do the ResBottleneck's
  channels-first LayerNorms (they are not ``nn.LayerNorm`` modules, as upstream);
* layer-wise lr decay: ``lr · 0.65^(13 − id)`` with :func:`layer_id`;
* a multiplier on every group's lr: linear warmup from 0.001 to 1 over the first 250
  iterations, then 1, 0.1 and 0.05 split at two milestones.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import torch.nn as nn

NUM_LAYERS = 12
LR = 5e-4
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.999)
EPS = 1e-8
LR_DECAY = 0.65
WARMUP_ITERS = 250
WARMUP_FACTOR = 0.001
STEP_VALUES = (1.0, 0.1, 0.05)
NORM_TYPES = (
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
NO_DECAY_NAMES = ("pos_embed",)


def layer_id(name: str, num_layers: int = NUM_LAYERS) -> int:
    """The ViT layer a parameter belongs to for lr decay: 0 for the patch and position
    embeddings, i + 1 in ``backbone.blocks.i`` (its ResBottleneck excepted), and
    ``num_layers + 1`` for everything else (ResBottlenecks, routers, decoder)."""
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            return 0
        if ".blocks." in name and ".residual." not in name:
            return int(name[name.find(".blocks.") :].split(".")[2]) + 1
    return num_layers + 1


def lr_scale(name: str, decay: float = LR_DECAY, num_layers: int = NUM_LAYERS) -> float:
    return decay ** (num_layers + 1 - layer_id(name, num_layers))


def param_groups(
    model: nn.Module, lr: float = LR, weight_decay: float = WEIGHT_DECAY, lr_decay: float = LR_DECAY
) -> list[dict]:
    """One group per (lr, weight decay) pair, in order of first appearance; each group
    records its parameter names under ``"names"``."""
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = 0.0 if isinstance(module, NORM_TYPES) or param_name in NO_DECAY_NAMES else weight_decay
            group_lr = lr * lr_scale(name, lr_decay)
            group = groups.setdefault(
                (group_lr, decay), {"params": [], "names": [], "lr": group_lr, "weight_decay": decay}
            )
            group["params"].append(p)
            group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, lr: float = LR, weight_decay: float = WEIGHT_DECAY, lr_decay: float = LR_DECAY
) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, lr_decay)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    # The fused kernel: the same update as the default implementation, one pass per tensor;
    # on a CPU the default loops in Python and takes ~35x longer for ViT-S (measured).
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=True)


def lr_multiplier(
    iteration: int,
    milestones: Sequence[int],
    warmup_iters: int = WARMUP_ITERS,
    warmup_factor: float = WARMUP_FACTOR,
    values: Sequence[float] = STEP_VALUES,
) -> float:
    """The schedule's factor on every group's lr at ``iteration`` (0-based): the
    multi-step value, ramped linearly from ``warmup_factor`` of its start during warmup."""
    step = values[bisect.bisect_right(list(milestones), iteration)]
    if iteration < warmup_iters:
        start = warmup_factor * values[0]
        end = values[bisect.bisect_right(list(milestones), warmup_iters)]
        return start + (end - start) * iteration / warmup_iters
    return step


class WarmupMultiStep(torch.optim.lr_scheduler.LRScheduler):
    """Sets each group's lr to its base lr × :func:`lr_multiplier` (stepped once per
    iteration, after the optimiser)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        warmup_iters: int = WARMUP_ITERS,
        warmup_factor: float = WARMUP_FACTOR,
        last_epoch: int = -1,
    ):
        self.milestones = list(milestones)
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        m = lr_multiplier(self.last_epoch, self.milestones, self.warmup_iters, self.warmup_factor)
        return [base * m for base in self.base_lrs]


# Published milestones and checkpoint period as fractions of the iterations: ViT-S trains
# 30 "epochs" and drops the lr after 6 and 26, ViT-B 60 and drops after 30 and 52; both
# save 15 checkpoints.
MILESTONE_FRACTIONS = {"vit_s": (6 / 30, 26 / 30), "vit_b": (30 / 60, 52 / 60)}
CHECKPOINTS_PER_RUN = 15
# Not from the paper: a short run (a fine-tune, a smoke test) writes no more checkpoints
# than its final one, and data workers never outnumber the cores.
MIN_CHECKPOINT_PERIOD = 1000
WORKERS = 4
# The published runs: iterations, GPUs and crops per GPU (a global batch of 32 for ViT-S,
# 40 for ViT-B; the iteration counts are 30 and 60 "epochs" of 43,100 samples at that batch).
RECIPE = {
    "vit_s": {"iters": 40406, "gpus": 2, "batch_per_gpu": 16},
    "vit_b": {"iters": 64650, "gpus": 4, "batch_per_gpu": 10},
}


def published_batch(variant: str) -> int:
    """The global batch of the published run of ``variant``."""
    return RECIPE[variant]["gpus"] * RECIPE[variant]["batch_per_gpu"]


def milestones_for(iters: int, fractions: Sequence[float]) -> list[int]:
    """``int(iters · f)`` for each fraction, as the published configs compute them."""
    return [int(iters * f) for f in fractions]
