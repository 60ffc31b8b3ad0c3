"""Matting metrics exactly as the literature reports them (Deep Image Matting evaluation).

Every function takes a prediction ``pred`` and ground truth ``gt`` (H×W alpha: floats in
[0, 1], uint8 divided by 255, uint16 by 65535) and the trimap, and measures only the
unknown region U = the trimap's unknown pixels (128 in an 8-bit 0/128/255 trimap; other
trimaps go through :func:`mematte.trimap.normalize_trimap` first).

Normalisation: 8-bit maps are divided by 255, as the common Python ports do — not the
min-max rescaling (``mat2gray``) of the original MATLAB code. The two agree whenever both
maps span the full 0..255 range.

Each function returns the number in the unit papers print:
SAD ÷ 1000, MSE × 1000, Grad ÷ 1000, Conn ÷ 1000.
"""

from __future__ import annotations

import math

import numpy as np

from .io import gray_array
from .trimap import UNKNOWN, normalize_trimap


def _inputs(pred, gt, trimap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = gray_array(pred, name="prediction").astype(np.float64)
    g = gray_array(gt, name="ground truth").astype(np.float64)
    u = normalize_trimap(trimap) == UNKNOWN
    if p.shape != g.shape or p.shape != u.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, ground truth {g.shape}, trimap {u.shape}")
    return p, g, u


def sad(pred, gt, trimap) -> float:
    """Sum of absolute differences over U, ÷ 1000."""
    p, g, u = _inputs(pred, gt, trimap)
    return float(np.abs(p - g)[u].sum() / 1000.0)


def mse(pred, gt, trimap) -> float:
    """Mean squared error over U, × 1000 (0 when U is empty)."""
    p, g, u = _inputs(pred, gt, trimap)
    n = int(u.sum())
    return float(((p - g)[u] ** 2).sum() / n * 1000.0) if n else 0.0


def grad(pred, gt, trimap, sigma: float = 1.4) -> float:
    """Gradient error Σ_U (|∇p| − |∇g|)², ÷ 1000, with Gaussian-derivative gradients."""
    p, g, u = _inputs(pred, gt, trimap)
    err = (_gradient_magnitude(p, sigma) - _gradient_magnitude(g, sigma)) ** 2
    return float(err[u].sum() / 1000.0)


def conn(pred, gt, trimap, step: float = 0.1) -> float:
    """Connectivity error Σ_U |φ(p) − φ(g)|, ÷ 1000."""
    p, g, u = _inputs(pred, gt, trimap)
    n_steps = round(1.0 / step)
    # k/n rather than accumulated k·step, so thresholds such as 0.6 are exact
    thresholds = [k / n_steps for k in range(n_steps + 1)]
    level = np.full(p.shape, -1.0)
    for prev, t in zip(thresholds, thresholds[1:]):
        omega = _largest_component_4((p >= t) & (g >= t))
        level[(level == -1.0) & ~omega] = prev
    level[level == -1.0] = 1.0
    dp = p - level
    dg = g - level
    phi_p = 1.0 - dp * (dp >= 0.15)
    phi_g = 1.0 - dg * (dg >= 0.15)
    return float(np.abs(phi_p - phi_g)[u].sum() / 1000.0)


def evaluate(pred, gt, trimap) -> dict[str, float]:
    """All four metrics, keyed ``sad``, ``mse``, ``grad``, ``conn``, in reported units."""
    return {
        "sad": sad(pred, gt, trimap),
        "mse": mse(pred, gt, trimap),
        "grad": grad(pred, gt, trimap),
        "conn": conn(pred, gt, trimap),
    }


def gaussian_derivative_kernels(sigma: float = 1.4) -> tuple[np.ndarray, np.ndarray]:
    """The two 1-D factors of the evaluation code's filter ``hx[i, j] = G(i)·G'(j)``.

    The half-size is ceil(σ·sqrt(−2·ln(sqrt(2π)·σ·0.01))) (4 for σ = 1.4). hx is
    normalised to unit L2 norm; since it is an outer product, that is normalising each
    factor. Returns (smooth, derivative): smooth runs along y and derivative along x for
    the x-gradient, the other way round for y (hy = hxᵀ).
    """
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 0.01)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-x * x / (2.0 * sigma * sigma)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -x * gauss / (sigma * sigma)
    return gauss / np.linalg.norm(gauss), dgauss / np.linalg.norm(dgauss)


def _gradient_magnitude(a: np.ndarray, sigma: float) -> np.ndarray:
    smooth, deriv = gaussian_derivative_kernels(sigma)
    # Correlation, where MATLAB's imfilter(..., 'conv') convolves: for this odd derivative
    # filter that only flips the sign of each component, not the magnitude.
    gx = _filter_1d(_filter_1d(a, smooth, axis=0), deriv, axis=1)
    gy = _filter_1d(_filter_1d(a, deriv, axis=0), smooth, axis=1)
    return np.sqrt(gx * gx + gy * gy)


def _filter_1d(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along one axis with borders replicated ('replicate' in imfilter)."""
    half = len(taps) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (half, half)
    padded = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.zeros_like(a)
    for k, tap in enumerate(taps):
        out += tap * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def _largest_component_4(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean map (all False if there is none).

    Ties go to the component met first in row-major order, as in the Python ports that
    label with scikit-image. Works on horizontal runs of pixels rather than pixels (far
    fewer), joined where runs of neighbouring rows overlap, with a vectorised union-find.
    """
    if not mask.any():
        return np.zeros_like(mask)
    h, w = mask.shape
    padded = np.zeros((h, w + 1), bool)  # a False column ends every row's last run
    padded[:, :w] = mask
    flat = padded.ravel()
    starts = flat & ~np.concatenate([[False], flat[:-1]])
    run_of = np.cumsum(starts) - 1  # run index of each pixel (meaningful where mask is set)
    run_of = run_of.reshape(h, w + 1)[:, :w]
    lengths = np.bincount(run_of[mask])

    # one link per stretch where two neighbouring rows are both set: along a stretch the
    # upper and lower runs do not change
    both = mask[:-1] & mask[1:]
    first = both & ~np.pad(both, ((0, 0), (1, 0)))[:, :w]
    parent = _union_find(len(lengths), run_of[:-1][first], run_of[1:][first])
    # every root is the smallest run index of its component, hence the raster-first run
    sizes = np.bincount(parent, weights=lengths)
    largest = np.argmax(sizes)
    return mask & (parent[run_of] == largest)


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each of n nodes' root (its component's smallest index), given edges a[k]–b[k].

    Each round hooks every root to the smallest root it touches, then compresses paths
    fully; the number of roots at least halves per round.
    """
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(ra[differ], rb[differ]), np.minimum(ra[differ], rb[differ]))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
