"""What every matting model of the package shares (:class:`MattingModel`): argument checks,
the dtype, strict checkpoint loading, preprocessing (normalise, append the trimap, pad by
the published rule), the memory estimate and one-image prediction, and the checks of the
inputs of both the upstream-style call and :meth:`MattingModel.predict`.

:class:`mematte.model.FastMEMatte` and :class:`mematte.vitmatte.FastViTMatte` build on it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from mematte_kernels import dispatch

from . import hf, precision, progress
from .backbone import PATCH, VARIANTS
from .checkpoint import (
    IGNORED_PREFIXES,
    check_map_location,
    infer_variant,
    load_checkpoint_state_dict,
    model_family,
    state_dict_of,
)
from .decoder import FAST_CONTEXT, FAST_TILE, TILE, tile_batches
from .io import image_to_array, open_image, read_image
from .trimap import BACKGROUND, FOREGROUND, normalize_trimap, warn_if_degenerate

PIXEL_MEAN = (123.675 / 255, 116.280 / 255, 103.530 / 255)
PIXEL_STD = (58.395 / 255, 57.120 / 255, 57.375 / 255)
PAD_MULTIPLE = 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bytes of decoder activations per batch of tiles: GPUs gain from batching tiles, CPUs
# hardly do and keep the peak low instead.
DECODER_MEMORY = {"cuda": 2 << 30, "cpu": 256 << 20}


def padded_size(size: int) -> int:
    """The published padding: ``size + 32 - size % 32`` whenever either side of the image
    is not a multiple of 32 — so a side that already is one still grows by 32."""
    return size + PAD_MULTIPLE - size % PAD_MULTIPLE


class MattingModel(nn.Module):
    """What FastMEMatte and FastViTMatte share: argument checks, the dtype, checkpoint
    loading, preprocessing and one-image prediction. A subclass builds ``backbone`` and
    ``decoder`` and defines ``forward`` and :meth:`_alpha`."""

    # Whether predict() sets alpha to the trimap's known values (MEMatte's inference script
    # does, ViTMatte's does not).
    clamp_known = True
    family = ""  # the model a checkpoint holds, as mematte.checkpoint.model_family names it

    def __init__(
        self, variant: str, backend: str, dtype: torch.dtype, decoder_memory: int | None, allow_tf32: bool = False
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(map(str, DTYPES))}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(dispatch.BACKENDS)}")
        self.variant = variant
        self.backend = backend
        self.decoder_memory = decoder_memory
        self.allow_tf32 = allow_tf32
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    def _precision(self):
        """The scope of an inference forward: fp32 arithmetic in full fp32 (TF32 off for
        matmuls and convolutions, the caller's settings restored after) unless the model
        was built with ``allow_tf32=True``."""
        return contextlib.nullcontext() if self.allow_tf32 else precision.tf32_off()

    def _report_progress(self) -> None:
        """Report each backbone block to :mod:`mematte.progress` (a no-op unless a caller
        installed a callback)."""
        for i, block in enumerate(self.backbone.blocks):
            block.register_forward_hook(progress.BlockHook(i + 1, len(self.backbone.blocks)))

    def _cast(self, dtype: torch.dtype) -> None:
        """Parameters to ``dtype``; the input statistics stay fp32."""
        if dtype != torch.float32:
            self.to(dtype)
            self.pixel_mean, self.pixel_std = self.pixel_mean.float(), self.pixel_std.float()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the backbone and decoder."""
        return self.backbone.patch_embed.proj.weight.dtype

    # ------------------------------------------------------------------ loading

    @classmethod
    def _read_state_dict(cls, checkpoint, map_location) -> dict:
        if isinstance(checkpoint, Mapping):
            return state_dict_of(checkpoint, keep_teacher=True)
        return load_checkpoint_state_dict(checkpoint, map_location, keep_teacher=True)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Mapping,
        map_location: str | torch.device = "cpu",
        variant: str | None = None,
        **kwargs,
    ) -> MattingModel:
        """Build the model a checkpoint was trained as and load it strictly.

        ``checkpoint`` is a path (detectron2 ``.pth`` holding ``{"model": sd}``, a bare
        state dict, ``{"state_dict": sd}``, or ``.safetensors``) or an already-loaded
        state dict; a ``module.`` prefix on every key is stripped, ``teacher_backbone.*``
        loaded into a model built with a teacher (``teacher=True``) and dropped otherwise,
        and NaN or infinite weights refused. The variant is inferred from shapes;
        ``variant``, when given, must agree with it. ``kwargs`` go to the constructor
        (``backend``, ``dtype``, and the model's own options); ``dtype`` is ``"auto"``
        unless given, as for :func:`mematte.load_model` and the command line (see
        :func:`mematte.precision.resolve_dtype`). A checkpoint of the other model
        (ViTMatte for FastMEMatte and the reverse) is refused, saying what loads it.
        """
        device = check_map_location(map_location)
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        kwargs["dtype"] = precision.resolve_dtype(kwargs.get("dtype", "auto"), device, kwargs.get("backend", "auto"))
        state_dict = cls._read_state_dict(checkpoint, map_location)
        held = "ViTMatte" if hf.is_hf_state_dict(state_dict) else model_family(state_dict)
        if held is not None and held != cls.family:
            source = "the state dict" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
            loader = "FastViTMatte" if held == "ViTMatte" else "FastMEMatte"
            raise ValueError(
                f"{source} holds a {held} model, not {cls.family}: load it with "
                f"{loader}.from_checkpoint, or with mematte.load_model, which picks the "
                "model a file holds"
            )
        found = infer_variant(state_dict)
        if variant is not None and variant != found:
            width = state_dict["backbone.pos_embed"].shape[-1]
            raise ValueError(
                f"variant={variant!r} was asked for, but the checkpoint holds a {found} "
                f"model (backbone.pos_embed is {width} wide)"
            )
        variant = found
        model = cls(variant, **kwargs)
        expected = model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(IGNORED_PREFIXES)}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = sorted(
            k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                _mismatch_message(f"{cls.__name__}({variant!r})", missing, unexpected, mismatched, expected, state_dict)
            )
        model.load_state_dict(state_dict, strict=True)
        return model.to(map_location)

    # ------------------------------------------------------------------ forward

    def preprocess(self, image: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
        """Normalise RGB (in fp32), append the trimap as the 4th channel, and zero-pad
        bottom/right with the published rule when H or W is not a multiple of 32:
        (B, 4, Hp, Wp) in the model's dtype."""
        B, _, H, W = image.shape
        if H % PAD_MULTIPLE or W % PAD_MULTIPLE:
            H, W = padded_size(H), padded_size(W)
        x = image.new_zeros((B, 4, H, W), dtype=self.dtype)
        for b in range(B):  # one image at a time bounds the fp32 temporaries
            x[b, :3, : image.shape[-2], : image.shape[-1]] = (image[b].float() - self.pixel_mean) / self.pixel_std
            x[b, 3:, : image.shape[-2], : image.shape[-1]] = trimap[b]
        return x

    def _prepare(self, batched_inputs: Mapping[str, torch.Tensor]):
        """Checked, preprocessed input of an upstream-style call: (x, H, W, ops)."""
        image, trimap = batched_inputs["image"], batched_inputs["trimap"]
        check_batch(image, trimap)
        check_values(image, trimap)
        H, W = image.shape[-2:]
        device = self.pixel_mean.device
        if self.dtype == torch.float16 and device.type == "cpu":
            raise ValueError("float16 is for GPUs; on the CPU use torch.bfloat16 (or float32)")
        precision.check_bf16_device(self.dtype, device)
        x = self.preprocess(image.to(device), trimap.to(device))
        return x, H, W, dispatch.resolve(self.backend, device)

    def _decoder_memory(self) -> int:
        device = self.pixel_mean.device
        return self.decoder_memory or DECODER_MEMORY.get(device.type, DECODER_MEMORY["cpu"])

    def _alpha(self, batched_inputs: Mapping[str, torch.Tensor], patch_decoder: bool) -> torch.Tensor:
        """The (B, 1, H, W) alpha of an upstream-style call."""
        raise NotImplementedError

    # ------------------------------------------------------------------ memory

    # Bytes per unit of work at the peak of one call, by dtype, fitted to the peak RSS of
    # fresh processes on the CPU (docs/serving.md): per token and channel of the backbone,
    # per pixel of the largest batch of decoder tiles, and a constant.
    _MEMORY_FIT: dict[torch.dtype, tuple[float, float, int]] = {
        torch.bfloat16: (5.23, 77.4, 18_100_000),
        torch.float32: (5.48, 147.7, 22_200_000),
    }
    _canvas_multiple = TILE

    def estimate_memory(self, height: int, width: int) -> int:
        """Predicted peak bytes that matting one height×width image takes on the model's
        device beyond the loaded model (its weights): the input tensors, the backbone's
        activations, the largest batch of decoder tiles and the alpha, for the fast
        backends' tiled decoding.

        On the CPU this is the growth of what the process holds (its resident memory with
        glibc's mmap threshold fixed; tested within 25 % at several sizes); on a GPU the same formula stands for the growth of
        ``torch.cuda.max_memory_allocated`` (with the GPU's larger tile budget) and is not
        measured. The reference backend and whole-image decoding need more.
        """
        if height < 1 or width < 1:
            raise ValueError(f"the image must have at least one pixel, got {width}×{height} (W×H)")
        Hp, Wp = (
            (padded_size(height), padded_size(width))
            if height % PAD_MULTIPLE or width % PAD_MULTIPLE
            else (height, width)
        )
        element = self.dtype.itemsize
        pixels = height * width
        # the image and trimap as float32 tensors, the preprocessed input, the alpha
        # (fp32 tensor and its numpy copy)
        inputs = pixels * (12 + 4 + 2 * 4) + Hp * Wp * 4 * element
        per_token_channel, per_decoder_pixel, constant = self._MEMORY_FIT[
            self.dtype if self.dtype in self._MEMORY_FIT else torch.float32
        ]
        tokens = Hp * Wp // PATCH**2
        backbone = tokens * self.backbone.embed_dim * per_token_channel * element
        canvas = tuple(-(-n // self._canvas_multiple) * self._canvas_multiple for n in (Hp, Wp))
        batches = tile_batches(height, width, canvas, FAST_TILE, FAST_CONTEXT, 1, element, self._decoder_memory())
        decoder_pixels = max(sum((b - t) * (r - l) for (t, b, l, r), _ in batch) for batch in batches)
        decoder = decoder_pixels * per_decoder_pixel * element
        return int(inputs + backbone + decoder + constant)

    # ------------------------------------------------------------------ one image

    @torch.inference_mode()
    def predict(self, image, trimap, patch_decoder: bool = True) -> np.ndarray:
        """Alpha matte of one image: H×W float32 in [0, 1].

        ``image``: H×W×3 RGB — an image file's path (str or os.PathLike, EXIF orientation
        applied), a numpy array (uint8, uint16, or float in [0, 1]), a PIL image (any
        mode, converted to RGB), or a tensor H×W×3 or 3×H×W. Batches (B, 3, H, W) are for
        the upstream call, ``model({"image": ..., "trimap": ...})``. ``trimap``: H×W — a
        path, numpy, PIL, or a tensor (also 1×H×W) — read by
        :func:`mematte.trimap.normalize_trimap`: class ids {0, 1, 2}, 0..255, or floats in
        [0, 1]. Where the class clamps known regions (FastMEMatte, as its upstream
        inference script does), alpha is 0 where the trimap is background and 1 where
        foreground. Warns on a trimap with nothing to matte or that does not look like
        one; raises FileNotFoundError for a missing file and ValueError for an unreadable
        one, and rather than return a NaN or infinite alpha.
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        trimap_name = "trimap"
        if isinstance(trimap, (str, os.PathLike)):
            trimap_name, trimap = f"trimap {trimap}", open_image(trimap)
        img = _image_tensor(image)
        tri = normalize_trimap(_trimap_array(trimap), name=trimap_name)
        if img.shape[-2:] != tri.shape:
            raise ValueError(
                f"image is {img.shape[-1]}×{img.shape[-2]} (W×H) but trimap is {tri.shape[1]}×{tri.shape[0]}"
            )
        warn_if_degenerate(tri, name=trimap_name)
        device = self.pixel_mean.device
        tri_t = torch.from_numpy(tri.astype(np.float32) / 255.0)
        alpha = self._alpha({"image": img[None].to(device), "trimap": tri_t[None, None].to(device)}, patch_decoder)
        alpha = alpha[0, 0].float().cpu().numpy()
        check_alpha(alpha)
        if self.clamp_known:
            alpha[tri == BACKGROUND] = 0
            alpha[tri == FOREGROUND] = 1
        return alpha


# ---------------------------------------------------------------------- helpers


def _mismatch_message(model, missing, unexpected, mismatched, expected, state_dict, shown=5) -> str:
    def first(keys):
        more = f" … (+{len(keys) - shown} more)" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    parts = [f"checkpoint does not match {model} (variant guessed from backbone.pos_embed)"]
    if missing:
        parts.append(f"missing {len(missing)} keys: {first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys: {first(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
        parts.append(f"{len(mismatched)} shape mismatches (checkpoint vs model): {first(shapes)}")
    return "; ".join(parts)


def check_batch(image: torch.Tensor, trimap: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or not isinstance(trimap, torch.Tensor):
        raise ValueError("'image' and 'trimap' must be tensors; use predict() for numpy or PIL inputs")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"'image' must be (B, 3, H, W), got {tuple(image.shape)}")
    if trimap.dim() != 4 or trimap.shape[1] != 1:
        raise ValueError(f"'trimap' must be (B, 1, H, W), got {tuple(trimap.shape)}")
    if not image.is_floating_point() or not trimap.is_floating_point():
        raise ValueError(f"'image' and 'trimap' must be float tensors in [0, 1], got {image.dtype} and {trimap.dtype}")
    if image.shape[0] != trimap.shape[0] or image.shape[-2:] != trimap.shape[-2:]:
        raise ValueError(f"'image' {tuple(image.shape)} and 'trimap' {tuple(trimap.shape)} differ in batch or size")
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        raise ValueError(f"empty image: {tuple(image.shape)}")


def check_values(image: torch.Tensor, trimap: torch.Tensor) -> None:
    """Finite values in [0, 1], at the cost of one host sync whatever the device: the
    extremes of both inputs are gathered into one small tensor and read at once."""
    stats = torch.stack([*torch.aminmax(image.detach()), *torch.aminmax(trimap.detach())]).float()
    lo_i, hi_i, lo_t, hi_t = stats.tolist()
    for name, lo, hi, hint in (
        ("image", lo_i, hi_i, "RGB divided by 255"),
        (
            "trimap",
            lo_t,
            hi_t,
            "0 background, 0.5 unknown, 1 foreground: divide 8-bit trimaps by 255, or pass any trimap to predict()",
        ),
    ):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"'{name}' holds NaN or infinite values")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"'{name}' values must lie in [0, 1] ({hint}), got {lo:g}..{hi:g}")


def check_alpha(alpha: np.ndarray) -> None:
    """Refuse a NaN or infinite alpha, so that it is never clipped into a plausible matte."""
    finite = np.isfinite(alpha)
    if not finite.all():
        bad = alpha.size - int(finite.sum())
        raise ValueError(
            f"the model gave a non-finite alpha ({bad} of {alpha.size} pixels NaN or infinite); "
            "its weights or its inputs are damaged"
        )


def _as_array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # PIL images convert; anything else is not an image
        raise ValueError(f"{what} must be a numpy array, PIL image or tensor, got {type(x).__name__}") from e


def _to_unit_float(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == bool:
        return a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must be uint8, uint16 or float in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or Inf")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{what} values must lie in [0, 1] for float input, got [{a.min():g}, {a.max():g}]")
    return a


def _image_tensor(image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from H×W×3 / 3×H×W arrays, PIL images or tensors."""
    if isinstance(image, Image.Image):
        image = image_to_array(image)
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        a = _as_array(image, "image").transpose(1, 2, 0)
    else:
        a = _as_array(image, "image")
    if a.ndim == 4:
        raise ValueError(
            f"image must be one H×W×3 RGB image, got a batch of shape {a.shape}; "
            "batches (B, 3, H, W) go through the upstream call, model({'image': ..., 'trimap': ...})"
        )
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be H×W×3 RGB (or 3×H×W), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image is empty: shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(_to_unit_float(a, "image").transpose(2, 0, 1)))


def _trimap_array(trimap) -> np.ndarray | Image.Image:
    """H×W (or H×W×C) for :func:`normalize_trimap`, from arrays, PIL images or tensors."""
    if isinstance(trimap, Image.Image):
        return trimap
    a = _as_array(trimap, "trimap")
    if a.ndim == 3 and a.shape[0] == 1 and isinstance(trimap, torch.Tensor):
        a = a[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"trimap must be H×W (one channel), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"trimap is empty: shape {a.shape}")
    return a
