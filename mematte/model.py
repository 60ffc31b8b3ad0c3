"""FastMEMatte: MEMatte with the official module tree, so official checkpoints load
unchanged, and with every kernel-backed op behind one dispatch point.

Input -> normalise, append trimap, pad -> ViT backbone (routed global blocks) -> Detail
Capture decoder (tiled by default) -> crop.

In training mode the same call takes the ground-truth alpha and returns upstream's losses
(TRAINING.md): Gumbel routing over all tokens, the whole-image decoder with batch-statistics
BatchNorm, and optionally the frozen ViTMatte backbone as the distillation teacher.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from mematte_kernels import dispatch

from .backbone import ViT, ViTMatteBackbone
from .decoder import CONTEXT, FAST_CONTEXT, FAST_TILE, TILE, DetailCapture, FoldedDecoder, decode_tiled
from .losses import distill_loss, matting_losses, mse_ratio_loss
from .matting import (  # the shared base; its public names are also importable from here
    PAD_MULTIPLE,
    PIXEL_MEAN,
    PIXEL_STD,
    MattingModel,
    check_alpha,
    check_batch,
    check_values,
    padded_size,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_TOKENS_LIMIT",
    "MIN_TRAIN_SIZE",
    "PAD_MULTIPLE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "FastMEMatte",
    "MattingModel",
    "check_alpha",
    "check_max_tokens",
    "padded_size",
    "training_trimap",
]

DEFAULT_MAX_TOKENS = 18500
# Token counts are int32 (cu_seqlens); a cap beyond that is a mistake, not a wish.
MAX_TOKENS_LIMIT = 2**31 - 1
MIN_TRAIN_SIZE = 64  # the 5-level Laplacian loss needs 4 px at its coarsest level


def training_trimap(trimap: torch.Tensor) -> torch.Tensor:
    """The trimap as training feeds it to the network: < 85/255 -> 0, >= 170/255 -> 1, the
    rest -> 0.5 (upstream quantises its raw 0-255 trimaps so)."""
    return torch.where(trimap < 85 / 255, 0.0, torch.where(trimap >= 170 / 255, 1.0, 0.5)).to(trimap.dtype)


class FastMEMatte(MattingModel):
    """MEMatte (ViT-S or ViT-B) for inference.

    ``model({"image": img, "trimap": tri}, patch_decoder=True)`` takes ``image``
    (B, 3, H, W) RGB in [0, 1] and ``trimap`` (B, 1, H, W) in [0, 1] and returns
    ``(outputs, scores, decisions)`` as upstream does: ``outputs["phas"]`` (B, 1, H, W),
    and per routed block the router log-probabilities (B, h, w, 2) and decisions
    (B, h, w, 1). Inputs outside [0, 1] or not finite are refused (one host sync for all
    the checks). Routing and attention are per image, and ``max_tokens`` caps the tokens
    routed to global attention per image (by router margin); 0 or None: no cap.

    ``backend`` picks the ops (see :mod:`mematte_kernels.dispatch`); ``dtype`` is
    ``torch.float32`` (exact, the default), ``torch.bfloat16`` or, on GPUs,
    ``torch.float16`` (bfloat16 on GPUs from Ampere on); ``decoder_memory`` bounds the
    decoder's activations per batch of tiles in bytes (a per-device default when None).
    In eval mode the call never builds an autograd graph, whatever the caller's grad mode,
    and runs its fp32 arithmetic in full fp32: TF32 is off for matmuls and convolutions
    during the call (the caller's settings are restored after it); ``allow_tf32=True``
    leaves TF32 to the caller's settings, faster on Ampere and later GPUs at a cost of
    errors of order 1e-4 to 1e-3 on alpha.

    Training (``model.train()``): ``model({"image": img, "trimap": tri, "alpha": gt},
    gumbel_noise=None)`` returns a dict of 0-dim losses under upstream's names
    (:mod:`mematte.losses`): ``unknown_l1_loss``, ``known_l1_loss``,
    ``loss_pha_laplacian``, ``loss_gradient_penalty``, ``distill_loss`` (with a teacher)
    and ``mse_ratio_loss``; their sum is upstream's loss. ``alpha`` (B, 1, H, W) is in
    [0, 1]; the trimap is quantised as training does (:func:`training_trimap`).
    ``gumbel_noise`` (4 tensors (B, N, 2); N tokens of the padded input, row-major)
    replaces the routers' Gumbel draws. After the step, ``routed_share`` (4,) holds each
    router's hard routed share over the batch, and ``train_outputs`` the detached
    ``pred_alpha``, ``router_scores`` and ``policy`` (hard, (B, N) per router). Training
    takes fp32 weights, under autocast for bf16/fp16.

    ``teacher=True`` adds ``teacher_backbone``, the ViTMatte backbone upstream distils
    from (keys ``teacher_backbone.*``): frozen (no parameter requires grad), always in eval
    mode, run without a graph.
    """

    family = "MEMatte"

    def __init__(
        self,
        variant: str = "vit_s",
        backend: str = "auto",
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        dtype: torch.dtype = torch.float32,
        decoder_memory: int | None = None,
        teacher: bool = False,
        allow_tf32: bool = False,
    ):
        super().__init__(variant, backend, dtype, decoder_memory, allow_tf32)
        self.max_tokens = max_tokens
        self.backbone = ViT(variant)
        self.decoder = DetailCapture(in_chans=self.backbone.embed_dim)
        self.teacher_backbone = None
        if teacher:
            self.teacher_backbone = ViTMatteBackbone(variant).requires_grad_(False)
        self.routed_share: torch.Tensor | None = None
        self.train_outputs: dict | None = None
        # Routers decide which tokens get attention: their weights and margins stay in fp32
        # (backends may run their wide layers on the low-precision tokens).
        self._cast(dtype)
        self.backbone.routers.float()
        self._report_progress()
        self.eval()

    @property
    def max_tokens(self) -> int | None:
        """The most tokens per image routed to global attention; None: no cap."""
        return self._max_tokens

    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None:
        self._max_tokens = check_max_tokens(value)

    def train(self, mode: bool = True) -> FastMEMatte:
        """Training mode for the student; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher_backbone is not None:
            self.teacher_backbone.eval()
        return self

    def forward(
        self,
        batched_inputs: Mapping[str, torch.Tensor],
        patch_decoder: bool = True,
        gumbel_noise: list[torch.Tensor] | None = None,
    ):
        if self.training:
            return self._training_losses(batched_inputs, gumbel_noise)
        if gumbel_noise is not None:
            raise ValueError("gumbel_noise drives training-mode routing; call model.train() first")
        # As upstream infers under no_grad; not inference_mode, whose tensors could not
        # enter a later graph.
        with torch.no_grad(), self._precision():
            return self._infer(batched_inputs, patch_decoder)

    def _infer(self, batched_inputs: Mapping[str, torch.Tensor], patch_decoder: bool):
        x, H, W, ops = self._prepare(batched_inputs)
        features, scores, decisions = self.backbone(x, ops, self.max_tokens)
        if ops is dispatch.REFERENCE:  # exactly as upstream
            decoder, tile, context, size = self.decoder, TILE, CONTEXT, None
        else:  # the same alpha over the image, without decoding the padding
            decoder, tile, context, size = FoldedDecoder(self.decoder, self.dtype, ops), FAST_TILE, FAST_CONTEXT, (H, W)
        if patch_decoder:
            alpha = decode_tiled(decoder, features, x, self._decoder_memory(), tile, context, size)
        else:
            alpha = decoder(features, x)
        return {"phas": alpha[:, :, :H, :W]}, scores, decisions

    def _alpha(self, batched_inputs, patch_decoder: bool) -> torch.Tensor:
        return self(batched_inputs, patch_decoder=patch_decoder)[0]["phas"]

    def _training_losses(self, batched_inputs, gumbel_noise) -> dict[str, torch.Tensor]:
        if "alpha" not in batched_inputs:
            raise ValueError("training mode needs the ground truth under 'alpha'; call model.eval() for inference")
        image, trimap, target = batched_inputs["image"], batched_inputs["trimap"], batched_inputs["alpha"]
        check_batch(image, trimap)
        if not isinstance(target, torch.Tensor) or not target.is_floating_point() or target.shape != trimap.shape:
            got = f"{target.dtype} {tuple(target.shape)}" if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"'alpha' must be a float tensor shaped like the trimap {tuple(trimap.shape)}, got {got}")
        check_values(image, trimap)
        lo, hi = torch.stack(torch.aminmax(target.detach())).float().tolist()
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise ValueError(f"'alpha' values must be finite and lie in [0, 1], got {lo:g}..{hi:g}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"training takes fp32 weights (this model is {self.dtype}); use autocast for bf16/fp16")
        H, W = image.shape[-2:]
        if min(H, W) < MIN_TRAIN_SIZE:
            raise ValueError(
                f"training crops must be at least {MIN_TRAIN_SIZE} px a side (the Laplacian loss), got {W}×{H}"
            )
        device = self.pixel_mean.device
        trimap = training_trimap(trimap.to(device))
        x = self.preprocess(image.to(device), trimap)
        ops = dispatch.resolve(self.backend, device, training=True)
        features, scores, policies = self.backbone.forward_train(x, ops, gumbel_noise)
        alpha = self.decoder(features, x)[:, :, :H, :W]
        losses = matting_losses(alpha, target.to(device), trimap)
        if self.teacher_backbone is not None:
            with torch.no_grad():
                teacher_features = self.teacher_backbone(x, ops)
            losses["distill_loss"] = distill_loss(features, teacher_features)
        losses["mse_ratio_loss"] = mse_ratio_loss(policies)
        self.routed_share = torch.stack([p.detach().mean() for p in policies])
        self.train_outputs = {
            "pred_alpha": alpha.detach(),
            "router_scores": [s.detach() for s in scores],
            "policy": [p.detach() for p in policies],
        }
        return losses


def check_max_tokens(value) -> int | None:
    """``max_tokens`` as the model keeps it: a positive int, or None for no cap (0 too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"max_tokens must be a whole number of tokens, or 0 or None for no cap; "
            f"got {value!r} ({type(value).__name__})"
        )
    value = int(value)
    if value < 0:
        raise ValueError(f"max_tokens must be ≥ 0 (0 or None: no cap), got {value}")
    if value > MAX_TOKENS_LIMIT:
        raise ValueError(
            f"max_tokens {value} is beyond any image (at most {MAX_TOKENS_LIMIT:,}); use 0 or None for no cap"
        )
    return value or None
