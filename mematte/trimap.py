"""Trimaps: cleaning up real-world trimaps and making one from a coarse mask.

A trimap here is always uint8 H×W holding exactly 0 (background), 128 (unknown) and 255
(foreground) — the 8-bit convention of the matting data sets and of the upstream
inference code, which divides by 255 (so "unknown" reaches the model as 128/255 ≈ 0.5).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .io import gray_array

BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255

# Painted trimaps are anti-aliased and saved by editors with arbitrary greys; these cut
# the [0, 1] range into the three classes.
BACKGROUND_MAX = 0.25
FOREGROUND_MIN = 0.75

def normalize_trimap(trimap: np.ndarray | Image.Image) -> np.ndarray:
    """Map any grey trimap to uint8 0/128/255.

    ``trimap`` is a Pillow image or an array in any form :func:`mematte.io.gray_array`
    accepts (8-bit and integer values divided by 255, uint16 by 65535, floats in [0, 1];
    colour: luminance; grey + alpha: the grey channel). Values ≤ 0.25 become background,
    values ≥ 0.75 foreground, the rest unknown.
    """
    t = gray_array(trimap, name="trimap")
    out = np.full(t.shape, UNKNOWN, dtype=np.uint8)
    out[t <= BACKGROUND_MAX] = BACKGROUND
    out[t >= FOREGROUND_MIN] = FOREGROUND
    return out


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
