"""ViTMatte's ViT backbone: MEMatte's window blocks, and global blocks in which every token
attends to every other with decomposed relative position (no router, no LTRM).

Module and parameter names are those of the official ViTMatte checkpoints (``backbone.*``);
the same module is MEMatte's distillation teacher (``teacher_backbone.*``). Tokens are
channels-last (B, h, w, C); every op with a kernel goes through the op table.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from mematte_kernels import OpTable, dispatch

from .backbone import (
    DEPTH,
    GLOBAL_BLOCKS,
    PATCH,
    VARIANTS,
    Attention,
    Mlp,
    PatchEmbed,
    ResBottleneck,
    ResizedPosEmbed,
    WindowBlock,
    rel_pos_table,
)
from . import hf
from .decoder import FAST_CONTEXT, FAST_TILE, DetailCapture, FoldedDecoder, decode_tiled
from .checkpoint import load_checkpoint_state_dict, state_dict_of
from .model import FastMEMatte, MattingModel

# The global blocks' position tables cover the 512-px pretraining grid: 2 * 32 - 1 rows,
# resized at run time to the grid's 2h - 1 and 2w - 1.
GLOBAL_REL_POS_SIZE = 512 // PATCH


class GlobalBlock(nn.Module):
    """x = x + Attn(norm1(x)) over all tokens with decomposed relative position;
    x = x + MLP(norm2(x)); x = ResBottleneck(x)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_size=GLOBAL_REL_POS_SIZE)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.residual = ResBottleneck(dim)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        B, h, w, C = x.shape
        attn = self.attn
        qkv = ops.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)
        rel_h = rel_pos_table(h, h, attn.rel_pos_h)
        rel_w = rel_pos_table(w, w, attn.rel_pos_w)
        out = ops.global_attention(qkv, rel_h, rel_w, attn.num_heads, attn.scale)
        x = x + ops.linear(out, attn.proj.weight, attn.proj.bias)
        x = x + self.mlp(self.norm2(x), ops)
        return self.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)


class ViTMatteBackbone(nn.Module):
    """Patch embedding + absolute positions, then 12 blocks: window blocks, and global
    blocks at 2, 5, 8, 11. ``forward(x, ops)`` maps the preprocessed (B, 4, H, W) input
    (H, W multiples of 16) to features (B, C, H/16, W/16)."""

    def __init__(self, variant: str):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        dim, heads = VARIANTS[variant]
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(4, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 1, dim))
        self.blocks = nn.ModuleList(
            GlobalBlock(dim, heads) if i in GLOBAL_BLOCKS else WindowBlock(dim, heads) for i in range(DEPTH)
        )
        self.resized_pos_embed = ResizedPosEmbed()

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        x = self.patch_embed(x, ops)
        x = x + self.resized_pos_embed(self.pos_embed, *x.shape[1:3])
        for block in self.blocks:
            x = block(x, ops)
        return x.permute(0, 3, 1, 2)


class FastViTMatte(MattingModel):
    """ViTMatte (ViT-S or ViT-B) for inference, with upstream's module tree and keys.

    ``model({"image": img, "trimap": tri})`` takes ``image`` (B, 3, H, W) RGB in [0, 1] and
    ``trimap`` (B, 1, H, W) in [0, 1] and returns ``{"phas": (B, 1, H, W)}`` as upstream
    does: normalised inside the model with ImageNet statistics, padded by upstream's rule,
    the whole image decoded at once, known regions not clamped. The reference backend runs
    exactly that; the fast backends decode the same canvas in tiles with enough context
    that every pixel gets the same value, and only the tiles over the image.

    ``backend``, ``dtype``, ``decoder_memory`` and ``allow_tf32`` as in :class:`FastMEMatte`.
    """

    family = "ViTMatte"
    clamp_known = False  # upstream's inference script leaves the trimap's known regions as predicted
    _canvas_multiple = PATCH  # the decoder's canvas is the padded input itself
    _MEMORY_FIT = {torch.bfloat16: (5.34, 77.9, 8_500_000), torch.float32: (5.51, 148.9, 11_600_000)}  # see MattingModel

    def __init__(
        self,
        variant: str = "vit_s",
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        decoder_memory: int | None = None,
        allow_tf32: bool = False,
    ):
        super().__init__(variant, backend, dtype, decoder_memory, allow_tf32)
        self.backbone = ViTMatteBackbone(variant)
        self.decoder = DetailCapture(in_chans=self.backbone.embed_dim)
        self._cast(dtype)
        self._report_progress()
        self.eval()

    @classmethod
    def _read_state_dict(cls, checkpoint, map_location) -> dict:
        """Upstream (detectron2 ``.pth``, bare state dict, ``.safetensors``) or HF
        (``.safetensors``/``.bin`` with HF names, or a model directory) weights, in
        upstream's names."""
        return read_state_dict(checkpoint, map_location)

    def forward(self, batched_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self._precision():  # inference builds no graph, as FastMEMatte's
            return self._infer(batched_inputs)

    def _infer(self, batched_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, H, W, ops = self._prepare(batched_inputs)
        features = self.backbone(x, ops)
        if ops is dispatch.REFERENCE:
            alpha = self.decoder(features, x)
        else:
            decoder = FoldedDecoder(self.decoder, self.dtype, ops)
            alpha = decode_tiled(decoder, features, x, self._decoder_memory(), FAST_TILE, FAST_CONTEXT, (H, W),
                                 canvas_multiple=PATCH)
        return {"phas": alpha[:, :, :H, :W]}

    def _alpha(self, batched_inputs, patch_decoder: bool) -> torch.Tensor:
        # Decoding is upstream's whole-image one on every backend (tiles only where they are
        # equal to it), so there is nothing to choose.
        return self(batched_inputs)["phas"]


# ------------------------------------------------------------------ checkpoints


def read_state_dict(checkpoint: str | os.PathLike | Mapping, map_location: str | torch.device = "cpu") -> dict:
    """The state dict of any checkpoint this package loads, in upstream names: MEMatte or
    ViTMatte files and state dicts as :mod:`mematte.checkpoint` reads them, HF ViTMatte weights
    (HF names are mapped), or an HF model directory."""
    if isinstance(checkpoint, Mapping):
        state_dict = state_dict_of(checkpoint)
    elif os.path.isdir(checkpoint):
        return hf.read_hf_directory(checkpoint, map_location)
    else:
        state_dict = load_checkpoint_state_dict(checkpoint, map_location)
    return hf.upstream_from_hf(state_dict) if hf.is_hf_state_dict(state_dict) else state_dict


def is_vitmatte(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict (in upstream names) is ViTMatte's rather than MEMatte's: position
    tables in a global block, and no router or LTRM. Anything else is taken for MEMatte."""
    mematte_only = any(k.startswith("backbone.routers.") or ".efficient_block." in k for k in state_dict)
    vitmatte_only = any(f"backbone.blocks.{i}.attn.rel_pos_" in k for i in GLOBAL_BLOCKS for k in state_dict)
    return vitmatte_only and not mematte_only


def model_class(state_dict: Mapping[str, torch.Tensor]) -> type[MattingModel]:
    """FastViTMatte or FastMEMatte, whichever the keys are of."""
    return FastViTMatte if is_vitmatte(state_dict) else FastMEMatte


def load_matting_model(
    checkpoint: str | os.PathLike | Mapping, map_location: str | torch.device = "cpu", max_tokens=..., **kwargs
) -> MattingModel:
    """The model a checkpoint holds, MEMatte or ViTMatte (told apart by its keys), loaded
    strictly. ``max_tokens`` applies to MEMatte only; ``kwargs`` go to the constructor."""
    state_dict = read_state_dict(checkpoint, map_location)
    cls = model_class(state_dict)
    if cls is FastMEMatte and max_tokens is not ...:
        kwargs["max_tokens"] = max_tokens
    return cls.from_checkpoint(state_dict, map_location, **kwargs)
