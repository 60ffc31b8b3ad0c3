"""Foreground colour estimation for cutouts and composites.

Multiplying the image by alpha leaves the old background's colour in every semi-transparent
pixel (hair turns the colour of the wall behind it). The cutout needs the foreground
colour F of I = αF + (1 − α)B instead. This is the multi-level method of Germer et al.,
"Fast Multi-Level Foreground Estimation" (ICPR 2020; pymatting's ``estimate_foreground_ml``):
per pixel, F and B minimise

    (αF + (1 − α)B − I)² + Σ_neighbours (ε + |Δα|)·(|ΔF|² + |ΔB|²)

solved coarse to fine — a few iterations per level on an image pyramid whose sides grow
geometrically from 1×1 to the full size, each level starting from the previous one.

Pymatting sweeps the pixels in order (Gauss–Seidel); here each iteration updates the red
then the black squares of a checkerboard, which on the 4-neighbour grid is the same
method in a vectorised order, so it runs as whole-image tensor operations (4K in seconds
on a CPU, faster on a GPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F_
from PIL import Image

from .io import gray_array, image_to_array


def estimate_foreground(
    image: np.ndarray,
    alpha: np.ndarray,
    *,
    regularization: float = 1e-5,
    n_small_iterations: int = 10,
    n_big_iterations: int = 2,
    small_size: int = 32,
    return_background: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Estimate the foreground colours of ``image`` given its ``alpha`` matte.

    ``image`` is H×W×3 colour (uint8, uint16, or float in [0, 1]), H×W grey, or a PIL
    image (any mode, read as RGB); ``alpha`` is H×W or a PIL image (any form
    :func:`mematte.io.gray_array` accepts: float in [0, 1], uint8 ÷ 255, uint16 ÷ 65535).
    NaN or infinite values are refused, naming them.
    ``regularization`` (ε) smooths the colours; levels no larger than ``small_size`` on both
    sides get ``n_small_iterations``, larger ones ``n_big_iterations`` — pymatting's
    defaults. Returns the foreground, float32 H×W×3 in [0, 1], or with
    ``return_background`` the pair (foreground, background). ``device`` is where the
    arithmetic runs ("cuda" is much faster on large images).
    """
    if not regularization > 0:
        raise ValueError(f"regularization must be > 0, got {regularization}")
    img = _colour_array(image)
    a = gray_array(alpha, name="alpha")
    if a.shape != img.shape[:2]:
        raise ValueError(f"alpha shape {a.shape} does not match image shape {img.shape[:2]}")
    image_t = torch.as_tensor(img, dtype=torch.float32, device=device).permute(2, 0, 1)
    alpha_t = torch.as_tensor(a, dtype=torch.float32, device=device)[None]
    with torch.no_grad():
        fgbg = _multilevel(image_t, alpha_t, regularization, n_small_iterations, n_big_iterations, small_size)
    fg, bg = (x.permute(1, 2, 0).cpu().numpy() for x in (fgbg[:3], fgbg[3:]))
    return (fg, bg) if return_background else fg


def _colour_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return image_to_array(image)
    img = np.asarray(image)
    if img.ndim == 2:
        return np.repeat(gray_array(img, name="image")[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be H×W×3 colour or H×W grey, got shape {img.shape}")
    return np.stack([gray_array(img[:, :, c], name="image") for c in range(3)], axis=2)


def _multilevel(
    image: torch.Tensor, alpha: torch.Tensor, eps: float, n_small: int, n_big: int, small_size: int
) -> torch.Tensor:
    """image (3,H,W), alpha (1,H,W) → foreground and background stacked (6,H,W)."""
    h0, w0 = alpha.shape[1:]
    n_levels = max(1, math.ceil(math.log2(max(h0, w0))))
    fgbg = None  # foreground and background stacked: (6, h, w)
    for level in range(n_levels + 1):
        h = round(h0 ** (level / n_levels))
        w = round(w0 ** (level / n_levels))
        img_l = _resize_nearest(image, h, w)
        alpha_l = _resize_nearest(alpha, h, w)
        if fgbg is None:  # the 1×1 top of the pyramid starts from the image itself
            fgbg = torch.cat([img_l, img_l])
        else:
            fgbg = _resize_nearest(fgbg, h, w)
        n_iter = n_small if (h <= small_size and w <= small_size) else n_big
        fgbg = _relax(fgbg, img_l, alpha_l, eps, n_iter)
    return fgbg


def _resize_nearest(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # source index = floor(dst · src / dst), as pymatting's resize
    return F_.interpolate(x[None], size=(h, w), mode="nearest")[0]


# The 4-neighbourhood as (dy, dx). On a checkerboard every neighbour of a square has the
# other colour, so all squares of one colour can be updated at once from the others.
_OFFSETS = ((0, -1), (0, 1), (-1, 0), (1, 0))
_RED = ((0, 0), (1, 1))  # (row parity, column parity) of the red squares
_BLACK = ((0, 1), (1, 0))


def _relax(fgbg: torch.Tensor, image: torch.Tensor, alpha: torch.Tensor, eps: float, n_iter: int) -> torch.Tensor:
    """Red–black Gauss–Seidel iterations of the per-pixel 2×2 solve.

    The state lives in a buffer with a one-pixel replicated border, because pymatting
    clamps a border pixel's missing neighbour to the pixel itself. Each colour is handled
    as its two parity sub-grids (every other row and column), so a sweep touches each
    pixel once; all work buffers are made once per level, since fresh multi-megabyte
    allocations (page faults) would otherwise cost as much as the arithmetic.
    """
    h, w = alpha.shape[1:]
    state = F_.pad(fgbg[None], (1, 1, 1, 1), mode="replicate")[0]
    a_pad = F_.pad(alpha[None], (1, 1, 1, 1), mode="replicate")[0]
    grids = {parity: _Grid(a_pad, image, eps, *parity, h, w) for parity in _RED + _BLACK}
    for _ in range(n_iter):
        for colour in (_RED, _BLACK):
            for parity in colour:
                grids[parity].update(state)
            _refresh_border(state)
    return state[:, 1:-1, 1:-1]


def _parity_view(padded: torch.Tensor, py: int, px: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """In a one-pixel padded h×w tensor, the pixels of parity (py, px) moved by (dy, dx)."""
    ny, nx = (h - py + 1) // 2, (w - px + 1) // 2
    y0, x0 = 1 + py + dy, 1 + px + dx
    return padded[:, y0 : y0 + 2 * ny - 1 : 2, x0 : x0 + 2 * nx - 1 : 2]


class _Grid:
    """The pixels of one parity: their constant coefficients and their update."""

    def __init__(self, a_pad: torch.Tensor, image: torch.Tensor, eps: float, py: int, px: int, h: int, w: int):
        self.where = (py, px, h, w)
        a0 = _parity_view(a_pad, py, px, 0, 0, h, w)
        a1 = 1.0 - a0
        self.weights = [(a0 - _parity_view(a_pad, py, px, dy, dx, h, w)).abs_().add_(eps) for dy, dx in _OFFSETS]
        total = sum(self.weights)
        a00 = a0 * a0 + total
        a11 = a1 * a1 + total
        a01 = a0 * a1
        inv_det = 1.0 / (a00 * a11 - a01 * a01)  # det = T·(a0² + a1²) + T² > 0 as ε > 0
        self.ff, self.fb, self.bb = inv_det * a11, -inv_det * a01, inv_det * a00
        img = image[:, py::2, px::2]
        self.rhs = torch.cat([a0 * img, a1 * img])  # (6, ny, nx): F rows then B rows
        self.acc = torch.empty_like(self.rhs)
        self.new = torch.empty_like(self.rhs)

    def update(self, state: torch.Tensor) -> None:
        py, px, h, w = self.where
        acc, new = self.acc, self.new
        acc.copy_(self.rhs)
        for wt, (dy, dx) in zip(self.weights, _OFFSETS):
            acc.addcmul_(wt, _parity_view(state, py, px, dy, dx, h, w))
        b0, b1 = acc[:3], acc[3:]
        torch.mul(b0, self.ff, out=new[:3]).addcmul_(b1, self.fb)
        torch.mul(b0, self.fb, out=new[3:]).addcmul_(b1, self.bb)
        _parity_view(state, py, px, 0, 0, h, w).copy_(new.clamp_(0.0, 1.0))


def _refresh_border(state: torch.Tensor) -> None:
    state[:, 0, :] = state[:, 1, :]
    state[:, -1, :] = state[:, -2, :]
    state[:, :, 0] = state[:, :, 1]
    state[:, :, -1] = state[:, :, -2]
