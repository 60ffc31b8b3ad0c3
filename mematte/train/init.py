"""Where a training run's weights start: random (as upstream initialises), a ViTMatte
checkpoint (the published recipe), or a MEMatte checkpoint (fine-tuning).

From a ViTMatte checkpoint, as upstream's ``pretrained/preprocess.py`` and its non-strict
load do: every weight the student shares with ViTMatte is loaded (patch and position
embeddings, all blocks with the window blocks' relative positions, ResBottlenecks,
decoder); the routed blocks' 63-row relative positions are dropped (MEMatte's global
blocks have none); routers and LTRMs keep their random init; and every key containing
``backbone`` is copied to ``teacher_<key>`` to seed the distillation teacher.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..backbone import GLOBAL_BLOCKS, VARIANTS, ResBottleneck
from ..hf import is_hf_state_dict, read_hf_directory, upstream_from_hf

TEACHER_PREFIX = "teacher_"
# What a ViTMatte checkpoint cannot give the student, and what it has that the student lacks.
NEW_IN_MEMATTE = ("backbone.routers.",) + tuple(f"backbone.blocks.{b}.efficient_block." for b in GLOBAL_BLOCKS)
VITMATTE_ONLY = tuple(f"backbone.blocks.{b}.attn.rel_pos_{a}" for b in GLOBAL_BLOCKS for a in "hw")


class InitError(ValueError):
    """The checkpoint cannot initialise the model; the message says why."""


@dataclass
class InitPlan:
    """What to load into the model (non-strict) and how it was obtained."""

    kind: str  # "vitmatte" or "mematte"
    variant: str
    state_dict: dict[str, torch.Tensor]
    has_teacher: bool
    notes: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (teacher included), in upstream names: detectron2
    ``.pth`` (``{"model": ...}``), bare state dicts, ``.safetensors``, HF-named files and
    HF model folders (``config.json`` and weights)."""
    path = Path(path)
    if path.is_dir():
        try:
            return read_hf_directory(path)
        except ValueError as e:
            raise InitError(str(e)) from None
    if not path.is_file():
        raise InitError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _upstream_names(load_file(path))
        except (SafetensorError, OSError) as e:
            raise InitError(f"{path} is not a readable .safetensors file: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InitError(f"{path} is not a PyTorch checkpoint: {first}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitError(f"{path} holds no state dict (names → tensors, or a detectron2 file with one under 'model')")
    return _upstream_names(obj)


def _variant(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    pos = state_dict.get("backbone.pos_embed")
    for name, (dim, _) in VARIANTS.items():
        if pos is not None and pos.shape[-1] == dim:
            return name
    raise InitError(
        f"{source}: cannot tell ViT-S from ViT-B (backbone.pos_embed is "
        f"{'missing' if pos is None else tuple(pos.shape)})"
    )


def plan_init(path: str | os.PathLike, teacher: str | os.PathLike | None = None) -> InitPlan:
    """Read ``path`` and, when given, a separate ``teacher`` ViTMatte checkpoint, and say
    what the model loads. Raises :class:`InitError` for a file that is neither a ViTMatte
    nor a MEMatte checkpoint."""
    sd = read_state_dict(path)
    source = str(path)
    kind = "vitmatte"
    if not any(k.startswith("backbone.blocks.") for k in sd) or "backbone.pos_embed" not in sd:
        raise InitError(
            f"{source} is not a ViTMatte or MEMatte checkpoint: it has no "
            "backbone.pos_embed / backbone.blocks.* weights"
        )
    variant = _variant(sd, source)
    notes = []
    if any(k.startswith("backbone.routers.") for k in sd):
        kind = "mematte"
        student = {k: v for k, v in sd.items() if not k.startswith(TEACHER_PREFIX)}
        teacher_sd = {k: v for k, v in sd.items() if k.startswith(TEACHER_PREFIX)}
    else:
        if not any(k.startswith("decoder.") for k in sd):
            raise InitError(f"{source} has no decoder.* weights: not a ViTMatte matting checkpoint")
        student = {k: v for k, v in sd.items() if k not in VITMATTE_ONLY and not k.startswith(TEACHER_PREFIX)}
        teacher_sd = {
            TEACHER_PREFIX + k: v for k, v in sd.items() if "backbone" in k and not k.startswith(TEACHER_PREFIX)
        }
        notes.append(
            "routers and LTRMs start random; the relative positions of blocks "
            f"{', '.join(map(str, GLOBAL_BLOCKS))} are dropped; the teacher is this ViTMatte backbone"
        )
    if teacher is not None:
        teacher_sd = plan_teacher(teacher, variant)
        notes.append(f"the teacher comes from {teacher}")
    return InitPlan(kind, variant, {**student, **teacher_sd}, has_teacher=bool(teacher_sd), notes=notes)


def plan_teacher(teacher: str | os.PathLike, variant: str | None = None) -> dict[str, torch.Tensor]:
    """``teacher_backbone.*`` from the backbone of a ViTMatte checkpoint (of ``variant``
    when given)."""
    tsd = read_state_dict(teacher)
    if any(k.startswith("backbone.routers.") for k in tsd) or "backbone.pos_embed" not in tsd:
        raise InitError(f"--teacher {teacher} is not a ViTMatte checkpoint")
    if variant is not None and _variant(tsd, str(teacher)) != variant:
        raise InitError(f"--teacher {teacher} is {_variant(tsd, str(teacher))}, the student {variant}")
    return {TEACHER_PREFIX + k: v for k, v in tsd.items() if k.startswith("backbone.")}


def _upstream_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers' VitMatte names mapped to upstream's; other state dicts unchanged."""
    if not is_hf_state_dict(state_dict):
        return dict(state_dict)
    try:
        return upstream_from_hf(state_dict)
    except ValueError as e:
        raise InitError(str(e)) from None


def load_init(model: nn.Module, plan: InitPlan) -> list[str]:
    """Load ``plan`` into ``model`` non-strictly, checking that only what may be missing
    is: routers and LTRMs from a ViTMatte checkpoint, the teacher when the plan has none
    (a teacher it has must be complete).
    Returns a short report."""
    expected = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in plan.state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise InitError(f"{len(mismatched)} shapes differ (checkpoint vs model): {', '.join(mismatched[:5])}")
    allowed_missing = (NEW_IN_MEMATTE if plan.kind != "mematte" else ()) + (
        () if plan.has_teacher else (TEACHER_PREFIX,)
    )
    missing = [k for k in expected if k not in plan.state_dict and not k.startswith(allowed_missing)]
    if missing:
        raise InitError(f"the checkpoint lacks {len(missing)} weights the model needs: {', '.join(missing[:5])}")
    unexpected = [k for k in plan.state_dict if k not in expected]
    if unexpected:
        raise InitError(f"the checkpoint has {len(unexpected)} weights the model does not: {', '.join(unexpected[:5])}")
    model.load_state_dict(plan.state_dict, strict=False)
    left_random = sum(1 for k in expected if k not in plan.state_dict)
    return [
        f"initialised from a {plan.kind} checkpoint ({len(plan.state_dict)} tensors, "
        f"{left_random} left at their random init)",
        *plan.notes,
    ]


def upstream_init(model: nn.Module) -> None:
    """Initialise the student backbone as upstream's ViT does: every Linear trunc-normal
    (std 0.02) with zero bias, every LayerNorm 1/0, ``pos_embed`` trunc-normal (std
    0.02); ResBottleneck convs MSRA-filled (fan-out, ReLU gain), their first two norms
    1/0 and the last 0/0, so each block starts as the identity. The decoder keeps
    PyTorch's defaults, as upstream."""
    backbone = model.backbone
    for m in backbone.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(backbone.pos_embed, std=0.02)
    for m in backbone.modules():
        if isinstance(m, ResBottleneck):
            for conv in (m.conv1, m.conv2, m.conv3):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            for norm in (m.norm1, m.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
            nn.init.zeros_(m.norm3.weight)
            nn.init.zeros_(m.norm3.bias)
