"""FastViTMatte: ViTMatte (its backbone in :mod:`mematte.backbone`, MEMatte's decoder) with
upstream's module tree and keys (``backbone.*``), so official ViTMatte and HF checkpoints
load unchanged; and the loading dispatch, :func:`load_matting_model`, which tells MEMatte and
ViTMatte files apart by their keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mematte_kernels import dispatch

from . import hf
from .backbone import PATCH, GlobalBlock, ViTMatteBackbone
from .checkpoint import is_vitmatte, load_checkpoint_state_dict, state_dict_of
from .decoder import FAST_CONTEXT, FAST_TILE, DetailCapture, FoldedDecoder, decode_tiled
from .matting import MattingModel
from .model import FastMEMatte  # for the loading dispatch below; model.py imports nothing of this module

__all__ = [
    "FastViTMatte",
    "GlobalBlock",
    "ViTMatteBackbone",
    "is_vitmatte",
    "load_matting_model",
    "model_class",
    "read_state_dict",
]


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
    _MEMORY_FIT = {
        torch.bfloat16: (5.34, 77.9, 8_500_000),
        torch.float32: (5.51, 148.9, 11_600_000),
    }  # see MattingModel

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
            alpha = decode_tiled(
                decoder, features, x, self._decoder_memory(), FAST_TILE, FAST_CONTEXT, (H, W), canvas_multiple=PATCH
            )
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
