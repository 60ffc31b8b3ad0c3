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

A map that cannot be a trimap — colour content, or many pixels at grey levels far from 0,
½ and 1, as a photo passed in its place — gets a :class:`TrimapWarning`.
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

# What a trimap does not look like. A pixel is coloured when its channels spread over more
# than COLOUR_SPREAD of full scale (JPEG noise on a grey trimap stays below), and at an odd
# level when it is further than ODD_LEVEL from 0, ½ and 1 (anti-aliased edges are a thin
# band of those); a map with more than these shares of such pixels is not a trimap.
COLOUR_SPREAD, MAX_COLOURED = 0.1, 0.01
ODD_LEVEL, MAX_ODD = 0.1, 0.1


class TrimapWarning(UserWarning):
    """A trimap that the model can do nothing useful with, or that is not a trimap at all."""


def normalize_trimap(trimap: np.ndarray | Image.Image, *, name: str = "trimap") -> np.ndarray:
    """Map any trimap to uint8 0/128/255 (see the module notes for the rules).

    ``trimap`` is a Pillow image or an array H×W or H×W×C (C ≤ 4: grey, grey + alpha,
    colour: luminance, colour + alpha; an alpha channel is never read). Warns
    (:class:`TrimapWarning`, naming it ``name``) when it does not look like a trimap.
    """
    if isinstance(trimap, Image.Image):
        t = gray_array(trimap, name=name)
        if trimap.mode != "F":  # the levels as stored, to recognise class ids
            levels = np.rint(t * (65535.0 if trimap.mode in SIXTEEN_BIT_MODES else 255.0))
            if _class_ids(levels):
                return _CLASS_LUT[levels.astype(np.intp)]
        colour = np.asarray(trimap.convert("RGB")) if trimap.mode in ("RGB", "RGBA", "CMYK", "YCbCr") else None
        _warn_if_not_a_trimap(t, colour, name)
        return _cut(t)
    a = np.asarray(trimap)
    if a.ndim == 2 and _class_ids(a):
        return _CLASS_LUT[a.astype(np.intp)]
    if np.issubdtype(a.dtype, np.floating) and a.size and np.isfinite(a).all() and a.max() > 1.0:
        if a.max() > 255.0 or a.min() < 0.0:
            raise ValueError(f"{name}: float values must lie in [0, 1] or [0, 255], got {a.min():g}..{a.max():g}")
        a = a.astype(np.float32) / 255.0
    t = gray_array(a, name=name)
    colour = None
    if a.ndim == 3 and a.shape[2] in (3, 4):
        colour = np.stack([gray_array(a[:, :, c], name=name) for c in range(3)], axis=2)
    _warn_if_not_a_trimap(t, colour, name)
    return _cut(t)


def _warn_if_not_a_trimap(grey: np.ndarray, colour: np.ndarray | None, name: str) -> None:
    """Warn when a map has colour content or many grey levels far from 0, ½ and 1: likely a
    photo given as the trimap (``grey`` in [0, 1]; ``colour`` H×W×3, any scale, or None)."""
    if not grey.size:
        return
    if colour is not None:
        full_scale = 255.0 if colour.dtype == np.uint8 else 1.0
        spread = (colour.max(axis=2).astype(np.float32) - colour.min(axis=2)) / full_scale
        coloured = float((spread > COLOUR_SPREAD).mean())
        if coloured > MAX_COLOURED:
            _not_a_trimap(name, f"{coloured:.0%} of its pixels are coloured")
            return
    distance = np.minimum(np.minimum(grey, np.abs(grey - 0.5)), 1.0 - grey)
    odd = float((distance > ODD_LEVEL).mean())
    if odd > MAX_ODD:
        _not_a_trimap(name, f"{odd:.0%} of its pixels are grey levels far from 0, 50% and 100%")


def _not_a_trimap(name: str, why: str) -> None:
    warnings.warn(
        f"{name}: does not look like a trimap: {why} (a trimap is grey: 0 background, "
        "128 unknown, 255 foreground). Were the image and the trimap swapped?",
        TrimapWarning,
        stacklevel=4,
    )


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
        warnings.warn(
            f"{name} has no unknown region (no value between 25% and 75%), so the alpha is just the trimap",
            TrimapWarning,
            stacklevel=2,
        )
    elif counts[BACKGROUND] == 0 and counts[FOREGROUND] == 0:
        warnings.warn(
            f"{name} is unknown everywhere (no background and no foreground), so "
            "the model has no hint of what the subject is",
            TrimapWarning,
            stacklevel=2,
        )


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
