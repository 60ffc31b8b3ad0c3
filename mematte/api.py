"""Matting files from Python: numpy and Pillow in, numpy and PNG files out.

    from mematte.api import load_model, predict_file

    model = load_model("MEMatte_ViTS_DIM.pth")            # once, reused for every file
    result = predict_file("photo.jpg", "photo_trimap.png", model=model,
                          out_dir="out", rgba=True)
    result.alpha                                          # H×W float32 in [0, 1]
    result.written                                        # {"alpha": Path(...), "rgba": ...}

Inputs are read with :mod:`mematte.io` (EXIF orientation applied, alpha channels never
used as trimaps) and trimaps cleaned up with :func:`mematte.trimap.normalize_trimap`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import io
from .backbone import GLOBAL_BLOCKS
from .foreground import estimate_foreground
from .model import DEFAULT_MAX_TOKENS, FastMEMatte, padded_size
from .trimap import BACKGROUND, FOREGROUND, normalize_trimap, trimap_from_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What predict_file writes into out_dir, by kind; "{stem}" is the input image's file stem.
OUTPUT_NAMES = {
    "alpha": "{stem}_alpha.png",
    "rgba": "{stem}_rgba.png",
    "composite": "{stem}_composite.png",
    "routing": "{stem}_routing.png",
}

NO_CHECKPOINT = (
    "a checkpoint is required: a randomly initialised model would output noise. "
    "Official MEMatte checkpoints come from the authors' release "
    "(https://github.com/linyiheng123/MEMatte); nothing is downloaded automatically."
)


@dataclass
class Matte:
    """The result of matting one image."""

    alpha: np.ndarray                      # H×W float32 in [0, 1]
    trimap: np.ndarray                     # H×W uint8 0/128/255, as given to the model
    routing: list[np.ndarray]              # per global block 2/5/8/11: bool (h, w) on the
                                           # padded input's 16-pixel token grid
    foreground: np.ndarray | None = None   # H×W×3 float32, when a cutout or composite was asked
    composite: np.ndarray | None = None    # H×W×3 float32, when a background was given
    written: dict[str, Path] = field(default_factory=dict)  # kind -> file, see OUTPUT_NAMES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first CUDA GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def load_model(
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    backend: str = "auto",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> FastMEMatte:
    """Load a MEMatte or ViTMatte checkpoint (detectron2 .pth, bare state dict or
    .safetensors; for ViTMatte also HF weights or an HF model directory). The model class
    follows from the keys; ``max_tokens`` applies to MEMatte.

    Raises ValueError when ``checkpoint`` is None, is not a checkpoint, or does not match
    the model; nothing is ever downloaded.
    """
    if checkpoint is None:
        raise ValueError(NO_CHECKPOINT)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    from .vitmatte import load_matting_model

    return load_matting_model(
        checkpoint, map_location=resolve_device(device), backend=backend,
        max_tokens=max_tokens, dtype=dtype,
    )


def read_pair(
    image_path: str | os.PathLike,
    trimap_path: str | os.PathLike | None = None,
    *,
    mask_path: str | os.PathLike | None = None,
    band: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (float32 H×W×3 in [0, 1]) and its trimap (uint8 0/128/255).

    The trimap comes from ``trimap_path`` or is built from the coarse mask at ``mask_path``
    (see :func:`mematte.trimap.trimap_from_mask`); exactly one must be given. Raises
    ValueError when the sizes differ, naming both.
    """
    if (trimap_path is None) == (mask_path is None):
        raise ValueError("give exactly one of a trimap or a mask")
    image = io.read_image(image_path)
    guide_path = trimap_path if trimap_path is not None else mask_path
    guide = io.read_gray(guide_path)
    if guide.shape != image.shape[:2]:
        what = "trimap" if trimap_path is not None else "mask"
        raise ValueError(
            f"{what} {guide_path} is {io.size_text(guide.shape)} (W×H) but image "
            f"{image_path} is {io.size_text(image.shape)} (W×H)"
        )
    trimap = normalize_trimap(guide) if trimap_path is not None else trimap_from_mask(guide, band)
    return image, trimap


def matte(model: FastMEMatte, image: np.ndarray, trimap: np.ndarray, *,
          tile: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the model on one image: (alpha H×W float32, routing decisions per global block).

    ``image`` is float32 H×W×3 in [0, 1], ``trimap`` uint8 0/128/255 (as :func:`read_pair`
    returns). The upstream call is used rather than ``model.predict`` because it also
    returns the router decisions, so the routing picture shows the very run that made the
    alpha. As upstream, alpha is 0 where the trimap is background and 1 where foreground.
    ``tile`` selects the tiled decoder (the published default). A FastViTMatte model is
    called as upstream ViTMatte's inference does (whole-image decoding, known regions not
    clamped); its "routing" sends every token to global attention.
    """
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    tri = torch.from_numpy(trimap.astype(np.float32) / 255.0)[None, None]
    if not isinstance(model, FastMEMatte):  # ViTMatte: every token of a global block attends
        with torch.inference_mode():
            alpha = model({"image": img, "trimap": tri})["phas"][0, 0].float().cpu().numpy()
        H, W = image.shape[:2]
        if H % 32 or W % 32:
            H, W = padded_size(H), padded_size(W)
        return alpha, [np.ones((H // 16, W // 16), bool) for _ in range(4)]
    with torch.inference_mode():
        outputs, _, decisions = model({"image": img, "trimap": tri}, patch_decoder=tile)
        alpha = outputs["phas"][0, 0].float().cpu().numpy()
    alpha[trimap == BACKGROUND] = 0.0
    alpha[trimap == FOREGROUND] = 1.0
    return alpha, [d[0, :, :, 0].bool().cpu().numpy() for d in decisions]


def fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale a background (H'×W'×3 float in [0, 1]) to cover height×width, keeping its
    aspect ratio, and crop the middle — a new backdrop should not look stretched."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    sh, sw = max(height, round(bh * scale)), max(width, round(bw * scale))
    im = Image.fromarray(io.to_uint8(background)).resize((sw, sh), Image.Resampling.LANCZOS)
    top, left = (sh - height) // 2, (sw - width) // 2
    return np.asarray(im, dtype=np.float32)[top:top + height, left:left + width] / 255.0


def composite(foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """αF + (1 − α)B for H×W×3 colours and an H×W alpha, all floats in [0, 1]."""
    a = alpha[:, :, None]
    return a * foreground + (1.0 - a) * background


def routing_picture(image: np.ndarray, routing: list[np.ndarray], max_side: int = 1024) -> Image.Image:
    """The router figure of the MEMatte paper: one panel per global block (2×2 grid).

    Tokens sent to global attention are tinted orange; the rest, handled by the
    lightweight module, are dimmed. Each token is 16×16 pixels of the padded input, so
    the token grid overhangs the image bottom/right. Panels are at most ``max_side``
    pixels long, so a 4K image does not give an 8K picture; they are shrunk before
    tinting to keep memory small.
    """
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    base = Image.fromarray(io.to_uint8(image))
    if (ph, pw) != (h, w):
        base = base.resize((pw, ph), Image.Resampling.BOX)
    base = np.asarray(base, dtype=np.float32) / 255.0
    # the token under the centre of each panel pixel
    rows = ((np.arange(ph) + 0.5) * (h / ph)).astype(int) // 16
    cols = ((np.arange(pw) + 0.5) * (w / pw)).astype(int) // 16
    tokens_in_image = (slice(0, -(-h // 16)), slice(0, -(-w // 16)))
    tinted = 0.45 * base + 0.55 * np.array([1.0, 0.55, 0.0], dtype=np.float32)
    dimmed = 0.3 * base
    gap = 8
    sheet = Image.new("RGB", (2 * pw + gap, 2 * ph + gap), (255, 255, 255))
    for k, (block, keep) in enumerate(zip(GLOBAL_BLOCKS, routing)):
        panel = np.where(keep[np.ix_(rows, cols)][:, :, None], tinted, dimmed)
        share = keep[tokens_in_image].mean()
        sheet.paste(_labelled(panel, f"block {block}: {share:.0%} global"),
                    ((k % 2) * (pw + gap), (k // 2) * (ph + gap)))
    return sheet


def _labelled(panel: np.ndarray, text: str) -> Image.Image:
    im = Image.fromarray(io.to_uint8(panel))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(10, im.height // 18))
    box = draw.textbbox((4, 2), text, font=font)
    draw.rectangle((0, 0, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)
    return im


def output_paths(image_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Where :func:`predict_file` writes each kind of output for ``image_path``."""
    stem = Path(image_path).stem
    return {kind: Path(out_dir) / name.format(stem=stem) for kind, name in OUTPUT_NAMES.items()}


def predict_file(
    image_path: str | os.PathLike,
    trimap_path: str | os.PathLike | None = None,
    *,
    mask_path: str | os.PathLike | None = None,
    band: int = 10,
    checkpoint: str | os.PathLike | None = None,
    model: FastMEMatte | None = None,
    out_dir: str | os.PathLike | None = None,
    rgba: bool = False,
    background: str | os.PathLike | np.ndarray | None = None,
    save_routing: bool = False,
    bits: int = 8,
    tile: bool = True,
) -> Matte:
    """Matte one image file, optionally writing the results into ``out_dir``.

    Give the trimap (``trimap_path``) or a coarse mask (``mask_path``, turned into a
    trimap with an unknown band ``band`` pixels wide on each side of its edge), and either
    a loaded ``model`` (see :func:`load_model`; reuse it across files) or a ``checkpoint``
    path. ``rgba`` adds the cutout with estimated foreground colours; ``background`` (a
    path or an H×W×3 float array in [0, 1]) adds a composite over it, scaled to cover the
    image. With ``out_dir`` the results are written atomically as named in
    :data:`OUTPUT_NAMES` — the alpha always (``bits`` 8 or 16), the cutout, composite and
    routing picture (``save_routing``) when asked; without it nothing is written.
    """
    if (model is None) == (checkpoint is None):
        if model is None:
            raise ValueError(NO_CHECKPOINT)
        raise ValueError("give either a model or a checkpoint, not both")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if model is None:
        model = load_model(checkpoint)
    image, trimap = read_pair(image_path, trimap_path, mask_path=mask_path, band=band)
    if isinstance(background, (str, os.PathLike)):
        background = io.read_image(background)

    alpha, routing = matte(model, image, trimap, tile=tile)
    result = Matte(alpha=alpha, trimap=trimap, routing=routing)
    if rgba or background is not None:
        result.foreground = estimate_foreground(image, alpha, device=model.pixel_mean.device)
    if background is not None:
        backdrop = fit_background(background, *alpha.shape)
        result.composite = composite(result.foreground, alpha, backdrop)

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        paths = output_paths(image_path, out_dir)
        result.written["alpha"] = io.save_alpha(paths["alpha"], alpha, bits=bits)
        if rgba:
            result.written["rgba"] = io.save_rgba(paths["rgba"], result.foreground, alpha)
        if result.composite is not None:
            result.written["composite"] = io.save_rgb(paths["composite"], result.composite)
        if save_routing:
            result.written["routing"] = io.save_png(paths["routing"], routing_picture(image, routing))
    return result
