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
* Palette trimaps and masks are read through their palette only when it is grey;
  colour palettes are refused (their luminance is no trimap value anyone painted).
* Images over :data:`MAX_PIXELS` are refused before decoding, with the memory they would
  need; ``max_pixels`` raises or (None) lifts the limit.
* Every writer goes through :func:`write_files`: the data lands in temporary files in the
  destination folder, which are then renamed over the targets, so an interrupted or
  failed run leaves a set of outputs either complete or absent, and no temporary file.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Pillow refuses images over twice its MAX_IMAGE_PIXELS as possible decompression bombs;
# the same limit by default, but one that a caller can raise.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
# Peak memory per pixel of matting one image, rounded up from the measured fast bf16 CPU
# path at 7680×4320 (2.46 GiB peak RSS for 33 Mpx, see README), for the refusal message.
BYTES_PER_PIXEL = 80

_pillow_limit = threading.Lock()  # Pillow's own limit is a global: set it under a lock


def open_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one
    that is not a readable image (unknown format, truncated, corrupt) or has more than
    ``max_pixels`` pixels (None: no limit).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with _pillow_limit:  # only while Pillow reads the header, where it checks the size
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            _check_pixels(path, im.size, max_pixels)  # from the header, before decoding
            im.load()  # decode now: a truncated file fails here, not later mid-pipeline
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def read_header(path: str | os.PathLike, *, formats: tuple[str, ...] | None = None) -> tuple[str, int, int]:
    """The format and the (height, width) a viewer shows (EXIF orientation applied; for a
    PNG only where its EXIF precedes the pixels) of an image file, from its header alone:
    nothing is decoded, so a file that claims a huge size costs nothing. ``formats``
    limits the formats tried (Pillow's names).

    Raises PIL.UnidentifiedImageError for a file in none of them and OSError for an
    unreadable header.
    """
    with _pillow_limit:  # the size is checked by the caller, not by Pillow
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path, formats=formats) as im:
                # a PNG's EXIF may follow its pixels, where Pillow would decode them to reach it
                stored_exif = im.format != "PNG" or "exif" in im.info
                orientation = im.getexif().get(0x0112, 1) if stored_exif else 1
                size, fmt = im.size, im.format
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = size
    return fmt, *((width, height) if orientation in (5, 6, 7, 8) else (height, width))


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is None or w * h <= max_pixels:
        return
    need = w * h * BYTES_PER_PIXEL / 2**30
    raise ValueError(
        f"{path}: {w}×{h} is {w * h / 1e6:.0f} megapixels, over the limit of "
        f"{max_pixels / 1e6:.0f} megapixels that guards against decompression bombs; "
        f"matting it needs roughly {need:.0f} GiB of memory. If that is what you want, "
        f"allow it with --max-pixels {w * h} (max_pixels={w * h} in Python)"
    )


def size_text(shape: tuple[int, ...]) -> str:
    """'W×H' for an array shape (H, W, ...), the way image sizes are usually quoted."""
    return f"{shape[1]}×{shape[0]}"


def image_to_array(im: Image.Image) -> np.ndarray:
    """A Pillow image as float32 H×W×3 RGB in [0, 1] (see the module notes)."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        grey = gray_to_array(im)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def gray_to_array(im: Image.Image) -> np.ndarray:
    """A Pillow image as float32 H×W in [0, 1]: luminance or L channel, never alpha;
    palette images through a grey palette (a colour palette is refused)."""
    if im.mode in ("P", "PA"):
        return _grey_palette(im)
    if im.mode in SIXTEEN_BIT_MODES:
        return np.asarray(im, dtype=np.float32).clip(0, 65535) / 65535.0
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32).clip(0.0, 1.0)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _grey_palette(im: Image.Image) -> np.ndarray:
    index = np.asarray(im.getchannel(0) if im.mode == "PA" else im, dtype=np.uint8)
    flat = im.getpalette("RGB") or []
    palette = np.array(flat, dtype=np.uint8).reshape(-1, 3)
    if not len(palette):  # no palette stored: the indices are the greys
        return index.astype(np.float32) / 255.0
    palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)])
    used = np.unique(index)
    colours = palette[used]
    if not ((colours[:, 0] == colours[:, 1]) & (colours[:, 1] == colours[:, 2])).all():
        odd = next(tuple(int(c) for c in rgb) for rgb in colours if len(set(rgb.tolist())) > 1)
        raise ValueError(
            f"a palette image with colours (e.g. RGB {odd}) cannot be read as grey values; "
            "save the trimap or mask as greyscale (0 background, 128 unknown, 255 foreground)"
        )
    return palette[:, 0][index].astype(np.float32) / 255.0


def read_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a colour image as float32 H×W×3 in [0, 1]."""
    return image_to_array(open_image(path, max_pixels=max_pixels))


def read_gray(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a trimap, mask or alpha file as float32 H×W in [0, 1]."""
    im = open_image(path, max_pixels=max_pixels)
    try:
        return gray_to_array(im)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


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
                f"{name}: integer values must be 8-bit (0..255), got {a.min()}..{a.max()}; pass 16-bit data as uint16"
            )
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.isnan(a).sum())
            raise ValueError(f"{name} holds {nan} NaN and {a.size - int(finite.sum()) - nan} infinite values")
        if a.size and not (a.min() >= 0.0 and a.max() <= 1.0):
            raise ValueError(
                f"{name}: float values must lie in [0, 1], got {np.nanmin(a):g}..{np.nanmax(a):g}"
                " (divide 8-bit data by 255)"
            )
        return a
    raise ValueError(f"{name}: unsupported dtype {a.dtype}")


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block is done (only where signals can be masked)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_files(files: Mapping[str | os.PathLike, Callable[[BinaryIO], None]]) -> list[Path]:
    """Write several files as one set: all of them complete, or none of them.

    Each writer receives a binary file object. Every file is first written in full to a
    temporary file in its target's folder (a rename is only atomic within one file
    system), with the permissions a normally created file gets (umask applied); then all
    are renamed over their targets, with Ctrl-C and SIGTERM held until the renames are
    done. If anything fails or is interrupted, the temporary files are removed, and if it
    happens while renaming, every target of the set too, so that no mix of old and new
    files remains.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, write in files.items():
            target = Path(target)
            tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            with _signals_deferred():  # a created file is always on the list to clean up
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        with _signals_deferred():
            try:
                for tmp, target in staged:
                    os.replace(tmp, target)
            except BaseException:
                for _, target in staged:
                    target.unlink(missing_ok=True)
                raise
    except BaseException:
        with _signals_deferred():
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in staged]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write one file so that it is either complete or absent (see :func:`write_files`)."""
    return write_files({path: write})[0]


def png(im: Image.Image) -> Callable[[BinaryIO], None]:
    """A writer of ``im`` as PNG, for :func:`write_files`."""
    return lambda f: im.save(f, format="PNG")


def alpha_image(alpha: np.ndarray, *, bits: int = 8) -> Image.Image:
    """An H×W alpha in [0, 1] as a grey image with 8 or 16 bits per pixel."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    return Image.fromarray(np.rint(np.clip(alpha, 0.0, 1.0) * top).astype(dtype))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def rgb_image(rgb: np.ndarray) -> Image.Image:
    """An H×W×3 float image in [0, 1] as 8-bit RGB."""
    return Image.fromarray(to_uint8(rgb))


def rgba_image(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Colours H×W×3 and alpha H×W (floats in [0, 1]) as 8-bit RGBA."""
    return Image.fromarray(to_uint8(np.concatenate([rgb, alpha[:, :, None]], axis=2)))


def find_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def index_by_stem(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """The images of ``folder`` grouped by file stem, for matching files across folders."""
    index: dict[str, list[Path]] = {}
    for p in find_images(folder):
        index.setdefault(p.stem, []).append(p)
    return index


def lookup_stem(index: dict[str, list[Path]], stem: str, folder: str | os.PathLike, *, what: str) -> Path:
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
