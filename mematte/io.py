"""Reading images, trimaps and masks, and writing results without half-written files.

Conventions (the same for every reader here):

* Files are opened with Pillow and their EXIF orientation is applied, each file by its own
  tag, so pixels are in the orientation a viewer shows. An image and its trimap then line
  up whether or not the camera's tag survived in the trimap (editors that paint a trimap
  over a photo save the pixels as displayed).
* Colour images come back as float32 H×W×3 in [0, 1]: RGBA loses its alpha, grey images
  are replicated to three channels, 16-bit grey is divided by 65535. Pillow reads 16-bit
  colour PNGs at 8-bit precision.
* Grey maps (trimaps, masks, ground-truth alpha) come back as float32 H×W in [0, 1]:
  colour files give their luminance (ITU-R 601, as Pillow's "L"), LA files their L
  channel, 16-bit files are divided by 65535. An alpha channel is never read.
* Every writer goes through :func:`write_atomic`: the data lands in a temporary file in
  the destination folder, which is then renamed over the target, so an interrupted run
  leaves either the old file or the complete new one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one
    that is not a readable image (unknown format, truncated, corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later mid-pipeline
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def size_text(shape: tuple[int, ...]) -> str:
    """'W×H' for an array shape (H, W, ...), the way image sizes are usually quoted."""
    return f"{shape[1]}×{shape[0]}"


def image_to_array(im: Image.Image) -> np.ndarray:
    """A Pillow image as float32 H×W×3 RGB in [0, 1] (see the module notes)."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        grey = gray_to_array(im)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def gray_to_array(im: Image.Image) -> np.ndarray:
    """A Pillow image as float32 H×W in [0, 1]: luminance or L channel, never alpha."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(im, dtype=np.float32).clip(0, 65535) / 65535.0
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32).clip(0.0, 1.0)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a colour image as float32 H×W×3 in [0, 1]."""
    return image_to_array(open_image(path))


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a trimap, mask or alpha file as float32 H×W in [0, 1]."""
    return gray_to_array(open_image(path))


def gray_array(x: np.ndarray | Image.Image, *, name: str = "map") -> np.ndarray:
    """Any grey map a user may hold, as float32 H×W in [0, 1].

    Accepts a Pillow image (as :func:`gray_to_array`) or an array H×W, H×W×1, H×W×2
    (grey + alpha: the grey channel), H×W×3 or H×W×4 (luminance of the colour channels).
    uint8 and other integer arrays are divided by 255, uint16 by 65535, bool maps to 0/1,
    and float arrays must already lie in [0, 1]. ``name`` is used in error messages.
    """
    if isinstance(x, Image.Image):
        return gray_to_array(x)
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = _unit_scale(a[:, :, :3], name)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be H×W or H×W×C with C in 1..4, got shape {a.shape}")
    return _unit_scale(a, name)


def _unit_scale(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"{name}: integer values must be 8-bit (0..255), got {a.min()}..{a.max()}; "
                "pass 16-bit data as uint16"
            )
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise ValueError(
                f"{name}: float values must lie in [0, 1], got {np.nanmin(a):g}..{np.nanmax(a):g}"
                " (divide 8-bit data by 255)"
            )
        return a
    raise ValueError(f"{name}: unsupported dtype {a.dtype}")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that it is either complete or absent, never half-written.

    ``write`` receives a binary file object. The temporary file lives in the target's
    folder (a rename is only atomic within one file system) and gets the permissions a
    normally created file would (umask applied).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_png(path: str | os.PathLike, im: Image.Image) -> Path:
    return write_atomic(path, lambda f: im.save(f, format="PNG"))


def save_alpha(path: str | os.PathLike, alpha: np.ndarray, *, bits: int = 8) -> Path:
    """Save an H×W alpha in [0, 1] as a grey PNG with 8 or 16 bits per pixel."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    q = np.rint(np.clip(alpha, 0.0, 1.0) * top).astype(dtype)
    return save_png(path, Image.fromarray(q))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def save_rgb(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Save an H×W×3 float image in [0, 1] as an 8-bit RGB PNG."""
    return save_png(path, Image.fromarray(to_uint8(rgb)))


def save_rgba(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray) -> Path:
    """Save colours H×W×3 and alpha H×W (floats in [0, 1]) as an 8-bit RGBA PNG."""
    rgba = np.concatenate([rgb, alpha[:, :, None]], axis=2)
    return save_png(path, Image.fromarray(to_uint8(rgba)))


def find_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def index_by_stem(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """The images of ``folder`` grouped by file stem, for matching files across folders."""
    index: dict[str, list[Path]] = {}
    for p in find_images(folder):
        index.setdefault(p.stem, []).append(p)
    return index


def lookup_stem(index: dict[str, list[Path]], stem: str, folder: str | os.PathLike,
                *, what: str) -> Path:
    """The one file named ``stem`` in an :func:`index_by_stem` of ``folder``.

    Raises FileNotFoundError when there is none and ValueError when several qualify.
    """
    hits = index.get(stem, [])
    if not hits:
        raise FileNotFoundError(f"no {what} named {stem}.* in {folder}")
    if len(hits) > 1:
        names = ", ".join(p.name for p in hits)
        raise ValueError(f"several {what}s named {stem}.* in {folder}: {names}")
    return hits[0]
