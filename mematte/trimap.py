"""Trimaps: reading them the same way at every entry point, and making one from a mask.

A trimap marks every pixel of an image as background (certainly not the subject),
foreground (certainly the subject) or unknown (hair, fur, glass, motion blur: the band the
model mattes). Here a normalised trimap is always uint8 H×W holding exactly 0
(background), 128 (unknown) and 255 (foreground) — the 8-bit convention of the matting
data sets and of the upstream inference code, which divides by 255 (so "unknown" reaches
the model as 128/255 ≈ 0.5).

:func:`normalize_trimap` is the one reading of a user's trimap, used by
``FastMEMatte.predict``, :func:`mematte.predict_file` and the command line:

* class ids: an integer or whole-valued array, or an image file (passed as a Pillow
  image, whose stored levels are read), whose values are exactly {0, 1, 2} is
  background / unknown / foreground;
* otherwise the values are scaled to [0, 1] — uint8 and other integers ÷ 255, uint16
  ÷ 65535, bool as 0/1, floats as they are when none exceeds 1, else ÷ 255 (floats in
  0..255) — and cut in three: ≤ 0.25 background, ≥ 0.75 foreground, the rest unknown, so
  anti-aliased and painted trimaps work.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from .io import SIXTEEN_BIT_MODES, gray_array

BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255

# Painted trimaps are anti-aliased and saved by editors with arbitrary greys; these cut
# the [0, 1] range into the three classes.
BACKGROUND_MAX = 0.25
FOREGROUND_MIN = 0.75

_CLASS_LUT = np.array([BACKGROUND, UNKNOWN, FOREGROUND], np.uint8)  # class id -> value


class TrimapWarning(UserWarning):
    """A trimap that the model can do nothing useful with."""


def normalize_trimap(trimap: np.ndarray | Image.Image) -> np.ndarray:
    """Map any trimap to uint8 0/128/255 (see the module notes for the rules).

    ``trimap`` is a Pillow image or an array H×W or H×W×C (C ≤ 4: grey, grey + alpha,
    colour: luminance, colour + alpha; an alpha channel is never read).
    """
    if isinstance(trimap, Image.Image):
        t = gray_array(trimap, name="trimap")
        if trimap.mode != "F":  # the levels as stored, to recognise class ids
            levels = np.rint(t * (65535.0 if trimap.mode in SIXTEEN_BIT_MODES else 255.0))
            if _class_ids(levels):
                return _CLASS_LUT[levels.astype(np.intp)]
        return _cut(t)
    a = np.asarray(trimap)
    if a.ndim == 2 and _class_ids(a):
        return _CLASS_LUT[a.astype(np.intp)]
    if np.issubdtype(a.dtype, np.floating) and a.size and np.isfinite(a).all() and a.max() > 1.0:
        if a.max() > 255.0 or a.min() < 0.0:
            raise ValueError(
                f"trimap: float values must lie in [0, 1] or [0, 255], got {a.min():g}..{a.max():g}"
            )
        a = a.astype(np.float32) / 255.0
    return _cut(gray_array(a, name="trimap"))


def _class_ids(a: np.ndarray) -> bool:
    """Whether ``a``'s values are exactly the set {0, 1, 2}."""
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        return False
    if not a.size or a.min() != 0 or a.max() != 2:
        return False
    if np.issubdtype(a.dtype, np.floating) and not (a == np.floor(a)).all():
        return False
    return bool((a == 1).any())


def _cut(t: np.ndarray) -> np.ndarray:
    out = np.full(t.shape, UNKNOWN, dtype=np.uint8)
    out[t <= BACKGROUND_MAX] = BACKGROUND
    out[t >= FOREGROUND_MIN] = FOREGROUND
    return out


def warn_if_degenerate(trimap: np.ndarray, name: str = "trimap") -> None:
    """Warn (:class:`TrimapWarning`) when a normalised trimap gives the model nothing to do
    or nothing to go on: no unknown pixel (the alpha is then the trimap itself), or only
    unknown pixels (no hint of which side is the subject)."""
    counts = np.bincount(trimap.ravel(), minlength=256)
    if counts[UNKNOWN] == 0:
        warnings.warn(f"{name} has no unknown region (no value between 25% and 75%), "
                      "so the alpha is just the trimap", TrimapWarning, stacklevel=2)
    elif counts[BACKGROUND] == 0 and counts[FOREGROUND] == 0:
        warnings.warn(f"{name} is unknown everywhere (no background and no foreground), so "
                      "the model has no hint of what the subject is", TrimapWarning, stacklevel=2)


def trimap_from_mask(mask: np.ndarray | Image.Image, band: int = 10) -> np.ndarray:
    """Build a uint8 0/128/255 trimap from a coarse foreground mask.

    The mask (any form :func:`mematte.io.gray_array` accepts) is foreground where it is at
    least 0.5. Pixels closer than or exactly ``band`` pixels (Euclidean) to the other side
    of the mask edge become unknown, so the unknown band is about ``2 * band`` wide: the
    mask is eroded and dilated by a disc of radius ``band``.

    Raises ValueError for a band below 1 or a mask without both foreground and background
    (it has no edge to matte).
    """
    if isinstance(band, bool) or int(band) != band or band < 1:
        raise ValueError(f"band must be a whole number of pixels ≥ 1, got {band!r}")
    fg = gray_array(mask, name="mask") >= 0.5
    if not fg.any():
        raise ValueError("mask has no foreground (no value ≥ 50%), so there is no edge to matte")
    if fg.all():
        raise ValueError("mask is foreground everywhere (no value < 50%), so there is no edge to matte")
    band = int(band)
    near_fg = _within_distance(fg, band)
    near_bg = _within_distance(~fg, band)
    out = np.full(fg.shape, UNKNOWN, dtype=np.uint8)
    out[~near_fg] = BACKGROUND
    out[~near_bg] = FOREGROUND
    return out


def _within_distance(seeds: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose Euclidean distance to the nearest True pixel of ``seeds`` is ≤ radius.

    Exact, in O(radius · H · W): first the distance to the nearest seed within each row,
    then the minimum over the rows at most ``radius`` away of dy² + row distance².
    """
    h, w = seeds.shape
    far = float(radius + 1)  # anything beyond the radius is simply "too far"
    cols = np.arange(w, dtype=np.float32)
    left = np.maximum.accumulate(np.where(seeds, cols, -np.inf), axis=1)
    right = np.minimum.accumulate(np.where(seeds, cols, np.inf)[:, ::-1], axis=1)[:, ::-1]
    row_dist = np.minimum(np.minimum(cols - left, right - cols), far)
    row_d2 = row_dist * row_dist

    best = row_d2.copy()
    for dy in range(1, min(radius, h - 1) + 1):
        shift = np.float32(dy * dy)
        np.minimum(best[dy:], row_d2[:-dy] + shift, out=best[dy:])
        np.minimum(best[:-dy], row_d2[dy:] + shift, out=best[:-dy])
    return best <= radius * radius
