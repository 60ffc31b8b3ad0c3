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

from mematte_kernels import dispatch

from . import io
from .backbone import GLOBAL_BLOCKS
from .foreground import estimate_foreground
from .model import DEFAULT_MAX_TOKENS, FastMEMatte, check_alpha, padded_size
from .precision import resolve_dtype
from .trimap import BACKGROUND, FOREGROUND, normalize_trimap, trimap_from_mask, warn_if_degenerate

# What predict_file writes into out_dir, by kind; "{stem}" is the input image's file stem.
OUTPUT_NAMES = {
    "alpha": "{stem}_alpha.png",
    "rgba": "{stem}_rgba.png",
    "composite": "{stem}_composite.png",
    "routing": "{stem}_routing.png",
    "trimap": "{stem}_trimap.png",
}

NO_CHECKPOINT = (
    "a checkpoint is required: a randomly initialised model would output noise. "
    "Official MEMatte checkpoints come from the authors' release "
    "(https://github.com/linyiheng123/MEMatte); nothing is downloaded automatically."
)


@dataclass
class Matte:
    """The result of matting one image."""

    alpha: np.ndarray  # H×W float32 in [0, 1]
    trimap: np.ndarray  # H×W uint8 0/128/255, as given to the model
    routing: list[np.ndarray]  # per global block 2/5/8/11: bool (h, w) on the
    # padded input's 16-pixel token grid
    foreground: np.ndarray | None = None  # H×W×3 float32, when a cutout or composite was asked
    composite: np.ndarray | None = None  # H×W×3 float32, when a background was given
    written: dict[str, Path] = field(default_factory=dict)  # kind -> file, see OUTPUT_NAMES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first CUDA GPU when there is one, else the CPU.

    Only ``cpu`` and ``cuda[:N]`` run the model; anything else, or a GPU that is not
    there, raises ValueError.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} cannot run the model; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


def check_backend(backend: str, device: torch.device) -> str:
    """The name of the op table ``backend`` gives on ``device``; ValueError if it cannot
    run there (e.g. ``cuda`` or ``triton`` on a CPU)."""
    return dispatch.resolve(backend, device).name


def load_model(
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    backend: str = "auto",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    allow_tf32: bool = False,
) -> FastMEMatte:
    """Load a MEMatte or ViTMatte checkpoint (detectron2 .pth, bare state dict or
    .safetensors; for ViTMatte also HF weights or an HF model directory). The model class
    follows from the keys; ``max_tokens`` applies to MEMatte.

    ``dtype`` is ``"auto"`` (the default, as everywhere: see :func:`resolve_dtype`),
    ``"float32"``, ``"bfloat16"``, ``"float16"`` (GPUs) or a torch dtype; ``max_tokens``
    0 or None: no cap;
    ``allow_tf32`` lets fp32 matmuls and convolutions run in TF32 on Ampere and later GPUs
    (faster, errors of order 1e-4 to 1e-3 on alpha). Raises
    ValueError when ``checkpoint`` is None, is not a checkpoint, does not match the model,
    or the device, dtype and backend cannot run together — before reading any weights;
    nothing is ever downloaded.
    """
    if checkpoint is None:
        raise ValueError(NO_CHECKPOINT)
    device = resolve_device(device)
    check_backend(backend, device)
    dtype = resolve_dtype(dtype, device, backend)
    from .vitmatte import load_matting_model

    return load_matting_model(
        checkpoint,
        map_location=device,
        backend=backend,
        max_tokens=max_tokens,
        dtype=dtype,
        allow_tf32=allow_tf32,
    )


def read_pair(
    image_path: str | os.PathLike,
    trimap_path: str | os.PathLike | None = None,
    *,
    mask_path: str | os.PathLike | None = None,
    band: int = 10,
    max_pixels: int | None = io.MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (float32 H×W×3 in [0, 1]) and its trimap (uint8 0/128/255).

    The trimap comes from ``trimap_path`` or is built from the coarse mask at ``mask_path``
    (see :func:`mematte.trimap.trimap_from_mask`); exactly one must be given. Raises
    ValueError when the sizes differ, naming both, and for images over ``max_pixels``.
    """
    if (trimap_path is None) == (mask_path is None):
        raise ValueError("give exactly one of a trimap or a mask")
    image = io.read_image(image_path, max_pixels=max_pixels)
    if trimap_path is not None:
        # the file's own levels, so that a class-id file (0/1/2) reads as one
        guide_path, what = trimap_path, "trimap"
        try:
            guide = normalize_trimap(io.open_image(trimap_path, max_pixels=max_pixels), name=str(trimap_path))
        except ValueError as e:
            raise ValueError(e if str(trimap_path) in str(e) else f"{trimap_path}: {e}") from None
    else:
        guide_path, what = mask_path, "mask"
        guide = io.read_gray(mask_path, max_pixels=max_pixels)
    if guide.shape != image.shape[:2]:
        raise ValueError(
            f"{what} {guide_path} is {io.size_text(guide.shape)} (W×H) but image "
            f"{image_path} is {io.size_text(image.shape)} (W×H)"
        )
    return image, (guide if trimap_path is not None else trimap_from_mask(guide, band))


def matte(
    model: FastMEMatte, image: np.ndarray, trimap: np.ndarray, *, tile: bool = True
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the model on one image: (alpha H×W float32, routing decisions per global block).

    ``image`` is float32 H×W×3 in [0, 1], ``trimap`` uint8 0/128/255 (as :func:`read_pair`
    returns). The upstream call is used rather than ``model.predict`` because it also
    returns the router decisions, so the routing picture shows the very run that made the
    alpha. As upstream, alpha is 0 where the trimap is background and 1 where foreground.
    ``tile`` selects the tiled decoder (the published default). A FastViTMatte model is
    called as upstream ViTMatte's inference does (whole-image decoding, known regions not
    clamped); its "routing" sends every token to global attention. Raises ValueError
    rather than return a NaN or infinite alpha.
    """
    return matte_batch(model, [image], [trimap], tile=tile)[0]


def matte_batch(
    model: FastMEMatte, images: list[np.ndarray], trimaps: list[np.ndarray], *, tile: bool = True
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """:func:`matte` of several images of one size in one forward pass (routing and
    attention are per image, so each alpha is the one :func:`matte` gives)."""
    img = torch.from_numpy(np.stack([np.ascontiguousarray(image.transpose(2, 0, 1)) for image in images]))
    tri = torch.from_numpy(np.stack([trimap.astype(np.float32) / 255.0 for trimap in trimaps]))[:, None]
    if not isinstance(model, FastMEMatte):  # ViTMatte: every token of a global block attends
        with torch.inference_mode():
            alphas = model({"image": img, "trimap": tri})["phas"][:, 0].float().cpu().numpy()
        H, W = images[0].shape[:2]
        if H % 32 or W % 32:
            H, W = padded_size(H), padded_size(W)
        results = []
        for alpha in alphas:
            check_alpha(alpha)
            results.append((alpha, [np.ones((H // 16, W // 16), bool) for _ in range(4)]))
        return results
    with torch.inference_mode():
        outputs, _, decisions = model({"image": img, "trimap": tri}, patch_decoder=tile)
        alphas = outputs["phas"][:, 0].float().cpu().numpy()
    results = []
    for b, (alpha, trimap) in enumerate(zip(alphas, trimaps)):
        check_alpha(alpha)
        alpha[trimap == BACKGROUND] = 0.0
        alpha[trimap == FOREGROUND] = 1.0
        results.append((alpha, [d[b, :, :, 0].bool().cpu().numpy() for d in decisions]))
    return results


def background_array(background) -> np.ndarray:
    """A background as float32 H×W×3 in [0, 1]: a path, a Pillow image (any mode), or an
    array H×W×3 or H×W (grey) — uint8, uint16, or float in [0, 1]."""
    if isinstance(background, (str, os.PathLike)):
        return io.read_image(background)
    if isinstance(background, Image.Image):
        return io.image_to_array(background)
    if not isinstance(background, np.ndarray):
        raise ValueError(f"background must be a path, a PIL image or a numpy array, got {type(background).__name__}")
    if background.ndim == 3 and background.shape[2] == 3:
        channels = [io.gray_array(background[:, :, c], name="background") for c in range(3)]
        return np.stack(channels, axis=2)
    if background.ndim == 2:
        return np.repeat(io.gray_array(background, name="background")[:, :, None], 3, axis=2)
    raise ValueError(f"background must be H×W×3 colour or H×W grey, got shape {background.shape}")


def fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale a background (H'×W'×3 float in [0, 1]) to cover height×width, keeping its
    aspect ratio, and crop the middle — a new backdrop should not look stretched."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    sh, sw = max(height, round(bh * scale)), max(width, round(bw * scale))
    im = Image.fromarray(io.to_uint8(background)).resize((sw, sh), Image.Resampling.LANCZOS)
    top, left = (sh - height) // 2, (sw - width) // 2
    return np.asarray(im, dtype=np.float32)[top : top + height, left : left + width] / 255.0


def composite(foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """αF + (1 − α)B for H×W×3 colours and an H×W alpha, all floats in [0, 1]."""
    a = alpha[:, :, None]
    return a * foreground + (1.0 - a) * background


# Colours of the routing picture: tokens sent to global attention are tinted orange, the
# rest (the light module) dimmed.
TINT = (1.0, 0.55, 0.0)
MIN_PANEL = 96  # px: below this a panel's label and tokens cannot be made out


def routing_picture(image: np.ndarray, routing: list[np.ndarray], max_side: int = 1024) -> Image.Image:
    """The router figure of the MEMatte paper: one panel per global block (2×2 grid), and
    a legend below.

    Tokens sent to global attention are tinted orange; the rest, handled by the
    lightweight module, are dimmed. Each token is 16×16 pixels of the padded input, so
    the token grid overhangs the image bottom/right. Panels are at most ``max_side``
    pixels long, so a 4K image does not give an 8K picture, and at least
    :data:`MIN_PANEL` on each side (a small image is enlarged, a very long one stretched
    across); they are resized before tinting to keep memory small.
    """
    h, w = image.shape[:2]
    scale = min(max_side / max(h, w), max(1.0, MIN_PANEL / min(h, w)))
    ph, pw = max(MIN_PANEL, round(h * scale)), max(MIN_PANEL, round(w * scale))
    base = Image.fromarray(io.to_uint8(image))
    if (ph, pw) != (h, w):
        base = base.resize((pw, ph), Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST)
    base = np.asarray(base, dtype=np.float32) / 255.0
    # the token under the centre of each panel pixel
    rows = ((np.arange(ph) + 0.5) * (h / ph)).astype(int) // 16
    cols = ((np.arange(pw) + 0.5) * (w / pw)).astype(int) // 16
    tokens_in_image = (slice(0, -(-h // 16)), slice(0, -(-w // 16)))
    tinted = 0.45 * base + 0.55 * np.array(TINT, dtype=np.float32)
    dimmed = 0.3 * base
    gap = 8
    legend = _legend(2 * pw + gap, max(12, ph // 18))  # as large as the panels' labels
    sheet = Image.new("RGB", (2 * pw + gap, 2 * ph + gap + legend.height), (255, 255, 255))
    for k, (block, keep) in enumerate(zip(GLOBAL_BLOCKS, routing)):
        panel = np.where(keep[np.ix_(rows, cols)][:, :, None], tinted, dimmed)
        share = keep[tokens_in_image].mean()
        sheet.paste(
            _labelled(panel, f"block {block}: {share:.0%} global"), ((k % 2) * (pw + gap), (k // 2) * (ph + gap))
        )
    sheet.paste(legend, (0, 2 * ph + gap))
    return sheet


def _legend(width: int, size: int) -> Image.Image:
    """Two swatches, what the tint and the dimming mean, one per line; text ``size`` px."""
    font = ImageFont.load_default(size=size)
    entries = (
        ("sent to global attention", tuple(round(255 * (0.45 * 0.5 + 0.55 * c)) for c in TINT)),
        ("light module (LTRM)", (38, 38, 38)),
    )
    line = size + 6
    im = Image.new("RGB", (width, 4 + line * len(entries)), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for i, (text, colour) in enumerate(entries):
        top = 4 + i * line
        draw.rectangle((4, top, 4 + size, top + size), fill=colour, outline=(0, 0, 0))
        draw.text((10 + size, top), text, fill=(0, 0, 0), font=font)
    return im


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


def requested_outputs(
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rgba: bool = False,
    composite: bool = False,
    save_routing: bool = False,
    save_trimap: bool = False,
) -> dict[str, Path]:
    """The files :func:`predict_file` writes for these options, by kind."""
    wanted = {"alpha": True, "rgba": rgba, "composite": composite, "routing": save_routing, "trimap": save_trimap}
    return {kind: p for kind, p in output_paths(image_path, out_dir).items() if wanted[kind]}


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
    background: str | os.PathLike | np.ndarray | Image.Image | None = None,
    save_routing: bool = False,
    save_trimap: bool = False,
    bits: int = 8,
    tile: bool = True,
    max_pixels: int | None = io.MAX_PIXELS,
) -> Matte:
    """Matte one image file, optionally writing the results into ``out_dir``.

    Give the trimap (``trimap_path``; read by :func:`mematte.trimap.normalize_trimap`) or
    a coarse mask (``mask_path``, turned into a trimap with an unknown band ``band`` pixels
    wide on each side of its edge), and either a loaded ``model`` (see :func:`load_model`;
    reuse it across files) or a ``checkpoint`` path. ``rgba`` adds the cutout with
    estimated foreground colours; ``background`` (a path, a PIL image, or an H×W×3 or H×W
    array, see :func:`background_array`) adds a composite over it, scaled to cover the
    image. With ``out_dir`` the results are written as named in :data:`OUTPUT_NAMES` — the
    alpha always (``bits`` 8 or 16), the cutout, composite, routing picture
    (``save_routing``) and the trimap the model was given (``save_trimap``: 0/128/255, e.g.
    the one built from ``mask_path``) when asked — as one set: all complete, or (on any failure or
    interruption) none of them and no temporary file. Without it nothing is written.
    Images over ``max_pixels`` pixels are refused (None: no limit).
    """
    if (model is None) == (checkpoint is None):
        if model is None:
            raise ValueError(NO_CHECKPOINT)
        raise ValueError("give either a model or a checkpoint, not both")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if background is not None:
        background = background_array(background)
    if model is None:
        model = load_model(checkpoint)
    image, trimap = read_pair(image_path, trimap_path, mask_path=mask_path, band=band, max_pixels=max_pixels)

    warn_if_degenerate(trimap, name=f"trimap of {image_path}")
    alpha, routing = matte(model, image, trimap, tile=tile)
    return finish_matte(
        image_path,
        image,
        trimap,
        alpha,
        routing,
        device=model.pixel_mean.device,
        out_dir=out_dir,
        rgba=rgba,
        background=background,
        save_routing=save_routing,
        save_trimap=save_trimap,
        bits=bits,
    )


def finish_matte(
    image_path: str | os.PathLike,
    image: np.ndarray,
    trimap: np.ndarray,
    alpha: np.ndarray,
    routing: list[np.ndarray],
    *,
    device: torch.device,
    out_dir: str | os.PathLike | None = None,
    rgba: bool = False,
    background: np.ndarray | None = None,
    save_routing: bool = False,
    save_trimap: bool = False,
    bits: int = 8,
) -> Matte:
    """The second half of :func:`predict_file`, after the model: foreground colours and
    composite where asked, and the outputs written as one set. ``background`` as
    :func:`background_array` returns it."""
    result = Matte(alpha=alpha, trimap=trimap, routing=routing)
    if rgba or background is not None:
        result.foreground = estimate_foreground(image, alpha, device=device)
    if background is not None:
        backdrop = fit_background(background, *alpha.shape)
        result.composite = composite(result.foreground, alpha, backdrop)

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        paths = requested_outputs(
            image_path,
            out_dir,
            rgba=rgba,
            composite=background is not None,
            save_routing=save_routing,
            save_trimap=save_trimap,
        )
        pictures = {
            "alpha": lambda: io.alpha_image(alpha, bits=bits),
            "rgba": lambda: io.rgba_image(result.foreground, alpha),
            "composite": lambda: io.rgb_image(result.composite),
            "routing": lambda: routing_picture(image, routing),
            "trimap": lambda: Image.fromarray(trimap),
        }
        io.write_files({paths[kind]: io.png(pictures[kind]()) for kind in paths})
        result.written = paths
    return result
