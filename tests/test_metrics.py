"""Matting metrics against values worked out by hand on tiny maps."""

import math
from collections import deque

import numpy as np
import pytest

from mematte.metrics import _largest_component_4, conn, evaluate, gaussian_derivative_kernels, grad, mse, sad

U, BG, FG = 128, 0, 255


def small_case():
    # multiples of 0.2 are exact in 8 bits (0.2 = 51/255) and in 16 bits (13107/65535)
    pred = np.array([[0.2, 0.6], [1.0, 1.0]])
    gt = np.array([[0.0, 0.6], [0.4, 0.0]])
    trimap = np.array([[U, U], [U, BG]], np.uint8)  # the last pixel is outside U
    return pred, gt, trimap


def test_sad_and_mse_by_hand():
    pred, gt, trimap = small_case()
    # |diff| over U: 0.2, 0, 0.6
    assert sad(pred, gt, trimap) == pytest.approx(0.8 / 1000)
    assert mse(pred, gt, trimap) == pytest.approx((0.04 + 0.0 + 0.36) / 3 * 1000)


def test_8bit_and_16bit_maps_are_divided_by_their_full_scale():
    pred, gt, trimap = small_case()
    expected = sad(pred, gt, trimap)
    p8, g8 = np.rint(pred * 255).astype(np.uint8), np.rint(gt * 255).astype(np.uint8)
    p16 = np.rint(pred * 65535).astype(np.uint16)
    assert sad(p8, g8, trimap) == pytest.approx(expected)
    assert sad(p16, gt, trimap) == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore::mematte.trimap.TrimapWarning")  # rows of cut-point values, not a picture
def test_anti_aliased_trimap_defines_the_same_unknown_region():
    pred, gt, trimap = small_case()
    soft = np.array([[100, 150], [120, 30]], np.uint8)  # 25 % < unknown < 75 %, and background
    assert sad(pred, gt, soft) == sad(pred, gt, trimap)


def test_mse_of_an_empty_unknown_region_is_zero():
    pred, gt, _ = small_case()
    assert mse(pred, gt, np.full((2, 2), FG, np.uint8)) == 0.0


def test_shapes_must_agree():
    pred, gt, trimap = small_case()
    with pytest.raises(ValueError, match=r"shapes differ: prediction \(2, 2\), ground truth \(2, 3\)"):
        sad(pred, np.zeros((2, 3)), trimap)


def test_gradient_filter_is_the_9x9_gaussian_derivative_for_sigma_1_4():
    smooth, deriv = gaussian_derivative_kernels(1.4)
    assert len(smooth) == len(deriv) == 9  # half-size ceil(1.4·sqrt(−2·ln(sqrt(2π)·1.4·0.01))) = 4
    hx = np.outer(smooth, deriv)
    assert np.sum(hx * hx) == pytest.approx(1.0)
    np.testing.assert_allclose(deriv, -deriv[::-1])  # odd: a constant map has no gradient


def test_grad_is_zero_for_identical_maps_and_for_a_constant_shift():
    rng = np.random.default_rng(0)
    gt = rng.random((16, 20)) * 0.7
    trimap = np.full(gt.shape, U, np.uint8)
    assert grad(gt, gt, trimap) == 0.0
    assert grad(gt + 0.3, gt, trimap) == pytest.approx(0.0, abs=1e-12)


def test_grad_of_a_ramp_against_a_flat_map():
    # p = a·x. Away from the left/right borders the filter sees an exact ramp, so
    # gx = a · Σ_ij hx[i, j]·j, with hx[i, j] = G(i)·G'(j) normalised to unit L2 norm, and
    # gy = 0. For σ = 1.4, |Σ_ij hx[i, j]·j| = 9.6838…
    sigma, a = 1.4, 0.01
    offsets = np.arange(-4, 5)
    g = np.exp(-(offsets**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    hx = np.outer(g, -offsets * g / sigma**2)
    hx /= np.sqrt(np.sum(hx**2))
    response = abs(np.sum(hx * offsets[None, :]))
    assert response == pytest.approx(9.6838, abs=1e-4)

    pred = np.tile(a * np.arange(30), (12, 1))
    trimap = np.zeros((12, 30), np.uint8)
    trimap[:, 4:26] = U  # the columns whose 9-tap window stays inside the image
    expected = 12 * 22 * (a * response) ** 2 / 1000
    assert grad(pred, np.zeros_like(pred), trimap) == pytest.approx(expected, rel=1e-6)  # maps are float32


def test_conn_is_zero_for_identical_maps():
    rng = np.random.default_rng(1)
    gt = rng.random((12, 14))
    assert conn(gt, gt, np.full(gt.shape, U, np.uint8)) == 0.0


def test_conn_by_hand():
    # p = [0.5, 0, 1], g = [0.5, 0, 0.5], all unknown.
    # t = 0.1 … 0.5: (p ≥ t) & (g ≥ t) = pixels 0 and 2, two components of one pixel;
    #   the first, pixel 0, is Ω. At t = 0.1, pixels 1 and 2 (not in Ω) get l = 0.
    # t = 0.6: g ≥ 0.6 nowhere, Ω is empty, so pixel 0 gets l = 0.5.
    # l = [0.5, 0, 0]; d_p = [0, 0, 1] → φ_p = [1, 1, 0]; d_g = [0, 0, 0.5] → φ_g = [1, 1, 0.5]
    # Conn = 0.5 / 1000 (taking pixel 2 as Ω instead gives the same total).
    pred = np.array([[0.5, 0.0, 1.0]])
    gt = np.array([[0.5, 0.0, 0.5]])
    assert conn(pred, gt, np.full((1, 3), U, np.uint8)) == pytest.approx(0.5 / 1000)


def test_conn_counts_only_the_unknown_region():
    pred = np.array([[0.5, 0.0, 1.0]])
    gt = np.array([[0.5, 0.0, 0.5]])
    assert conn(pred, gt, np.array([[U, U, FG]], np.uint8)) == 0.0


def _largest_by_flood_fill(mask):
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best = np.zeros_like(mask)
    for y0 in range(h):  # raster order: the first of equal-sized components wins
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            comp = np.zeros_like(mask)
            queue = deque([(y0, x0)])
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                comp[y, x] = True
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
            if comp.sum() > best.sum():
                best = comp
    return best


@pytest.mark.parametrize("seed", range(6))
def test_largest_4_connected_component_matches_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((15, 17)) < rng.uniform(0.35, 0.65)
    np.testing.assert_array_equal(_largest_component_4(mask), _largest_by_flood_fill(mask))


def test_diagonal_neighbours_are_not_connected():
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
    np.testing.assert_array_equal(_largest_component_4(mask), [[0, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_evaluate_reports_all_four():
    pred, gt, trimap = small_case()
    scores = evaluate(pred, gt, trimap)
    assert set(scores) == {"sad", "mse", "grad", "conn"}
    assert scores["sad"] == sad(pred, gt, trimap)
