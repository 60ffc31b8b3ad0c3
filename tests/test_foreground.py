"""Multi-level foreground estimation on composites whose true foreground is known."""

import numpy as np
import pytest
from PIL import Image

from mematte.foreground import estimate_foreground


def synthetic_composite(h=60, w=80):
    """A smooth orange-to-yellow foreground over a wavy blue background, with a solid core
    and a soft, hair-like rim: I = αF + (1 − α)B."""
    y, x = np.mgrid[:h, :w].astype(np.float32)
    fg = np.stack([0.9 + 0 * x, 0.3 + 0.5 * x / w, 0.1 + 0.2 * y / h], axis=2)
    bg = np.stack([0.1 + 0.1 * np.sin(x / 5), 0.2 + 0 * x, 0.8 + 0.1 * np.cos(y / 7)], axis=2)
    r = np.hypot(x - w / 2, y - h / 2)
    alpha = np.clip((h / 3 - r) / (h / 8) + 0.5, 0, 1) * (0.75 + 0.25 * np.sin(x / 2) * np.sin(y / 3)) ** 2
    alpha = np.where(r < h / 6, 1.0, np.clip(alpha, 0, 1)).astype(np.float32)
    image = alpha[:, :, None] * fg + (1 - alpha[:, :, None]) * bg
    return image.astype(np.float32), alpha, fg.astype(np.float32)


def test_recovers_the_true_foreground_where_alpha_is_fractional():
    image, alpha, true_fg = synthetic_composite()
    unknown = (alpha > 0.05) & (alpha < 0.95)
    assert unknown.sum() > 500
    fg = estimate_foreground(image, alpha)
    error = np.abs(fg - true_fg)[unknown].mean()
    naive = np.abs(image - true_fg)[unknown].mean()  # what multiplying the image by alpha keeps
    assert fg.shape == image.shape and fg.dtype == np.float32
    assert error < naive / 8, (error, naive)


def test_result_is_a_fixed_point_of_the_per_pixel_solve():
    """Each pixel's F, B minimise (αF + (1−α)B − I)² + Σ_n (ε + |α − α_n|)(|F − F_n|² + |B − B_n|²)
    given its 4 neighbours (clamped at the border), then clipped to [0, 1]."""
    image, alpha, _ = synthetic_composite(14, 18)
    eps = 1e-5
    fg, bg = estimate_foreground(image, alpha, regularization=eps, n_small_iterations=300, return_background=True)
    h, w = alpha.shape
    worst = 0.0
    for y in range(h):
        for x in range(w):
            a0, a1 = alpha[y, x], 1 - alpha[y, x]
            m = np.array([[a0 * a0, a0 * a1], [a0 * a1, a1 * a1]], np.float64)
            b = np.stack([a0 * image[y, x], a1 * image[y, x]]).astype(np.float64)
            for yy, xx in ((y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)):
                yy, xx = min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)
                wt = eps + abs(a0 - alpha[yy, xx])
                m += wt * np.eye(2)
                b += wt * np.stack([fg[yy, xx], bg[yy, xx]])
            solved = np.clip(np.linalg.solve(m, b), 0, 1)
            worst = max(worst, np.abs(solved - np.stack([fg[y, x], bg[y, x]])).max())
    assert worst < 1e-3


def test_known_foreground_keeps_the_image_colour_and_uint8_input_works():
    image, alpha, _ = synthetic_composite()
    as_uint8 = np.rint(image * 255).astype(np.uint8)
    fg = estimate_foreground(as_uint8, alpha)
    # inside the solid core (not on its rim, where the smoothness term couples F to the
    # rim's colours) F = (I + ε·Σ F_n) / (1 + 4ε) ≈ I
    opaque = alpha == 1
    solid = opaque.copy()
    solid[1:-1, 1:-1] &= opaque[:-2, 1:-1] & opaque[2:, 1:-1] & opaque[1:-1, :-2] & opaque[1:-1, 2:]
    assert solid.sum() > 50
    np.testing.assert_allclose(fg[solid], as_uint8[solid] / 255.0, atol=1e-3)


@pytest.mark.parametrize(
    "image, alpha, kwargs, message",
    [
        (np.zeros((4, 5, 3)), np.zeros((4, 6)), {}, r"alpha shape \(4, 6\) does not match image shape \(4, 5\)"),
        (np.zeros((4, 5, 4)), np.zeros((4, 5)), {}, r"image must be H×W×3 colour or H×W grey"),
        (np.zeros((4, 5, 3)), np.zeros((4, 5)), {"regularization": 0}, r"regularization must be > 0"),
        (np.zeros((4, 5, 3)), np.full((4, 5), np.nan), {}, r"alpha holds 20 NaN and 0 infinite values"),
        (np.full((4, 5, 3), np.inf), np.zeros((4, 5)), {}, r"image holds 0 NaN and 20 infinite values"),
        (np.full((4, 5, 3), 255.0), np.zeros((4, 5)), {}, r"image: float values must lie in \[0, 1\]"),
    ],
    ids=["size", "four-channels", "no-regularization", "nan-alpha", "inf-image", "float-0-255"],
)
def test_bad_input_is_refused(image, alpha, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_foreground(image, alpha, **kwargs)


def test_pil_and_grey_images_are_read_as_rgb():
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    alpha = rng.random((12, 10)).astype(np.float32)
    as_rgb = estimate_foreground(np.repeat(grey[:, :, None], 3, axis=2), alpha)
    np.testing.assert_array_equal(estimate_foreground(grey, alpha), as_rgb)
    np.testing.assert_array_equal(
        estimate_foreground(Image.fromarray(grey), Image.fromarray(np.uint8(alpha * 255))),
        estimate_foreground(grey, np.uint8(alpha * 255)),
    )
