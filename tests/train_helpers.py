"""Shared by the training tests: a tiny generated dataset, and a small model with
FastMEMatte's parameter names and training interface for testing the loop itself."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_disc(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An opaque ellipse with a soft, wavy edge and a transparent surround: uint8 alpha
    with all three trimap classes after erosion."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(0.25, 0.35), w * rng.uniform(0.25, 0.35)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    r += 0.05 * np.sin(xx / rng.uniform(3, 8)) * np.cos(yy / rng.uniform(3, 8))
    return np.rint(np.clip((1.15 - r) / 0.3, 0, 1) * 255).astype(np.uint8)


def make_dataset(root: Path, n_fg: int = 3, n_bg: int = 8, size: tuple[int, int] = (176, 208), seed: int = 0) -> Path:
    """DATA/fg, DATA/alpha (PNG, paired by stem) and DATA/bg (JPEG) with smooth random
    colours, (h, w) = ``size``."""
    rng = np.random.default_rng(seed)
    h, w = size
    for name in ("fg", "alpha", "bg"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n_fg):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        fg = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "fg" / f"fg{i}.png"), fg)
        cv2.imwrite(str(root / "alpha" / f"fg{i}.png"), soft_disc(h, w, rng))
    for i in range(n_bg):
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "bg" / f"bg{i}.jpg"), cv2.resize(small, (w + 8 * i, h), interpolation=cv2.INTER_LINEAR))
    return root


class ToyMatte(nn.Module):
    """A small model with the training interface of FastMEMatte (a forward that returns
    named losses, ``routed_share``, a frozen ``teacher_backbone``) and a few of its
    parameter names, so that the loop can be tested without the full network."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.patch_embed = nn.Conv2d(4, width, 3, padding=1)
        self.backbone.routers = nn.ModuleList(nn.Linear(width, 2) for _ in range(4))
        self.decoder = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))
        self.teacher_backbone = nn.Module()
        self.teacher_backbone.patch_embed = nn.Conv2d(4, width, 3, padding=1)
        self.teacher_backbone.requires_grad_(False)
        self.register_buffer("routed_share", torch.zeros(4), persistent=False)

    def forward(self, batch):
        image, trimap, alpha = batch["image"], batch["trimap"], batch["alpha"]
        tri = torch.where(trimap < 85 / 255, 0.0, torch.where(trimap >= 170 / 255, 1.0, 0.5))
        x = torch.cat([image, tri], 1)
        feat = self.backbone.patch_embed(x)
        tokens = feat.mean((2, 3))
        # Hard straight-through decisions: exercises the torch RNG the loop seeds per step.
        shares = []
        for router in self.backbone.routers:
            p = F.gumbel_softmax(router(tokens), hard=True)[:, 0]
            shares.append(p)
            feat = feat * (1 + 0.1 * p[:, None, None, None])
        self.routed_share = torch.stack([s.detach().mean() for s in shares])
        pred = torch.sigmoid(self.decoder(feat))
        unknown = (tri == 0.5).float()
        with torch.no_grad():
            teacher = self.teacher_backbone.patch_embed(x)
        return {
            "unknown_l1_loss": ((pred - alpha).abs() * unknown).sum() / unknown.sum(),
            "known_l1_loss": ((pred - alpha).abs() * (1 - unknown)).sum() / (1 - unknown).sum().clamp(min=1),
            "mse_ratio_loss": (torch.stack(shares).mean() - 0.25) ** 2,
            "distill_loss": F.mse_loss(self.backbone.patch_embed(x), teacher),
        }


def toy_config(out: Path, **changes):
    """Engine settings for the small tests: crop 64, batch 2, short warmup, no workers."""
    from mematte.train.engine import TrainConfig

    settings = dict(
        out=out,
        iters=20,
        batch_size=2,
        crop=64,
        lr=1e-2,
        warmup=4,
        milestones=(10, 15),
        checkpoint_period=10,
        precision="fp32",
        seed=0,
        workers=0,
    )
    return TrainConfig(**{**settings, **changes})
