"""Trimap clean-up (the 25 % / 75 % rule, every file mode) and trimaps from masks."""

import warnings

import numpy as np
import pytest
from PIL import Image

from mematte.io import read_gray
from mematte.trimap import TrimapWarning, normalize_trimap, trimap_from_mask, warn_if_degenerate


@pytest.mark.filterwarnings("ignore::mematte.trimap.TrimapWarning")  # rows of cut-point values, not a picture
def test_anti_aliased_8bit_values_fall_into_three_classes():
    values = np.array([[0, 25, 63, 64, 100, 128, 180, 191, 192, 230, 255]], np.uint8)
    # 63/255 ≤ 25 % < 64/255 and 191/255 < 75 % ≤ 192/255
    expected = [[0, 0, 0, 128, 128, 128, 128, 128, 255, 255, 255]]
    np.testing.assert_array_equal(normalize_trimap(values), expected)


@pytest.mark.filterwarnings("ignore::mematte.trimap.TrimapWarning")  # rows of cut-point values, not a picture
def test_float_and_16bit_trimaps_use_their_own_full_scale():
    floats = np.array([[0.0, 0.25, 0.2501, 0.5, 0.7499, 0.75, 1.0]], np.float32)
    np.testing.assert_array_equal(normalize_trimap(floats), [[0, 0, 128, 128, 128, 255, 255]])
    sixteen = np.array([[0, 16000, 16500, 32768, 49000, 49500, 65535]], np.uint16)
    np.testing.assert_array_equal(normalize_trimap(sixteen), [[0, 0, 128, 128, 128, 255, 255]])


@pytest.mark.filterwarnings("ignore::mematte.trimap.TrimapWarning")  # rows of cut-point values, not a picture
def test_float_trimaps_in_0_255_are_read_like_8bit_ones():
    np.testing.assert_array_equal(
        normalize_trimap(np.array([[0.0, 40.0, 128.0, 200.0, 255.0]])), [[0, 0, 128, 255, 255]]
    )


@pytest.mark.parametrize(
    "values, match",
    [
        ([[0.0, 300.0]], r"float values must lie in \[0, 1\] or \[0, 255\], got 0..300"),
        ([[-1.0, 128.0]], r"float values must lie in \[0, 1\] or \[0, 255\], got -1..128"),
        ([[0.0, np.nan]], r"trimap holds 1 NaN"),
    ],
    ids=["over-255", "negative", "nan"],
)
def test_float_trimap_outside_both_ranges_is_refused(values, match):
    with pytest.raises(ValueError, match=match):
        normalize_trimap(np.array(values))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float32, np.float64])
def test_class_ids_exactly_0_1_2_are_background_unknown_foreground(dtype):
    ids = np.array([[0, 1, 2, 1, 0]], dtype)
    np.testing.assert_array_equal(normalize_trimap(ids), [[0, 128, 255, 128, 0]])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0, 1]], [[0, 0]]),  # 8-bit: both nearly black
        ([[0, 2]], [[0, 0]]),
        ([[0, 1, 2, 3]], [[0, 0, 0, 0]]),
        ([[0.0, 1.0]], [[0, 255]]),  # floats in [0, 1]
        ([[0.0, 0.5, 2.0]], [[0, 0, 0]]),  # not whole numbers: 0..255 scale
    ],
    ids=["uint8-0-1", "uint8-0-2", "uint8-0-3", "float-0-1", "float-not-ids"],
)
def test_anything_but_exactly_0_1_2_is_not_read_as_class_ids(values, expected):
    a = np.array(values, np.uint8 if isinstance(values[0][0], int) else np.float32)
    np.testing.assert_array_equal(normalize_trimap(a), expected)


def test_grey_palette_trimap_is_read_through_its_palette(tmp_path):
    index = np.array([[0, 1, 2, 2]], np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette([255, 255, 255, 128, 128, 128, 0, 0, 0])  # index 0 white, 2 black
    im.save(tmp_path / "t.png")
    np.testing.assert_array_equal(normalize_trimap(read_gray(tmp_path / "t.png")), [[255, 128, 0, 0]])


def test_colour_palette_trimap_is_refused(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 255, 255, 255])  # red for "unknown"
    im.save(tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"t.png: a palette image with colours \(e.g. RGB \(255, 0, 0\)\).*greyscale"):
        read_gray(tmp_path / "t.png")


@pytest.mark.parametrize(
    "values, match",
    [
        ([[0, 255, 255]], "no unknown region"),
        ([[128, 128, 128]], "unknown everywhere"),
    ],
    ids=["no-unknown", "only-unknown"],
)
def test_degenerate_trimaps_warn(values, match):
    with pytest.warns(TrimapWarning, match=match):
        warn_if_degenerate(np.array(values, np.uint8), name="t.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_degenerate(np.array([[0, 128, 255]], np.uint8))


def _trimap_values():
    t = np.zeros((4, 6), np.uint8)
    t[:, 2:4] = 128
    t[:, 4:] = 255
    return t


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_trimap_files_of_every_mode_read_the_same_and_ignore_alpha(tmp_path, mode):
    t = _trimap_values()
    if mode == "I;16":
        im = Image.fromarray(t.astype(np.uint16) * 257)
    elif mode in ("LA", "RGBA"):
        colour = t[:, :, None].repeat(1 if mode == "LA" else 3, axis=2)
        alpha = np.full((4, 6, 1), 7, np.uint8)  # nearly transparent: must not matter
        im = Image.fromarray(np.concatenate([colour, alpha], axis=2))
    else:
        im = Image.fromarray(t).convert(mode)
    assert im.mode == mode
    im.save(tmp_path / "t.png")
    np.testing.assert_array_equal(normalize_trimap(read_gray(tmp_path / "t.png")), t)


def test_arrays_with_channels_use_grey_or_luminance():
    t = _trimap_values()
    la = np.stack([t, np.zeros_like(t)], axis=2)
    rgba = np.concatenate([t[:, :, None].repeat(3, axis=2), np.zeros_like(t)[:, :, None]], axis=2)
    np.testing.assert_array_equal(normalize_trimap(la), t)
    np.testing.assert_array_equal(normalize_trimap(rgba), t)
    np.testing.assert_array_equal(normalize_trimap(Image.fromarray(t)), t)


def test_mask_band_is_exactly_band_pixels_on_each_side_of_the_edge():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 255  # vertical edge between columns 19 and 20
    tri = trimap_from_mask(mask, band=3)
    row = tri[17]
    # background pixel 16 is 4 px from the nearest foreground pixel (20); 17 is 3 px away
    np.testing.assert_array_equal(row[15:25], [0, 0, 128, 128, 128, 128, 128, 128, 255, 255])
    assert (tri == tri[0]).all()  # the same in every row


def test_mask_band_is_round_around_corners():
    mask = np.zeros((30, 30), bool)
    mask[15:, 15:] = True  # foreground square whose corner pixel is (15, 15)
    tri = trimap_from_mask(mask, band=5)
    # (11, 11) is √32 ≈ 5.66 px from the corner: outside a disc, inside a square
    assert tri[11, 11] == 0
    assert tri[11, 12] == 128  # √(16 + 9) = 5
    assert tri[21, 21] == 255  # 7 px from the nearest background pixel, (14, 21)


def test_mask_values_threshold_at_one_half_and_accept_any_scale():
    soft = np.linspace(0, 1, 50, dtype=np.float32)[None].repeat(20, axis=0)
    tri = trimap_from_mask(soft, band=2)
    first_fg = int(np.argmax(soft[0] >= 0.5))
    # the first foreground pixel is 1 px from the background, its left neighbour 1 px
    # from the foreground
    assert tri[0, first_fg + 1] == 128 and tri[0, first_fg + 2] == 255
    assert tri[0, first_fg - 2] == 128 and tri[0, first_fg - 3] == 0
    np.testing.assert_array_equal(trimap_from_mask((soft * 65535).astype(np.uint16), band=2), tri)


@pytest.mark.parametrize(
    "mask, band, message",
    [
        (np.zeros((8, 8), np.uint8), 3, "mask has no foreground"),
        (np.full((8, 8), 255, np.uint8), 3, "mask is foreground everywhere"),
        (np.eye(8, dtype=np.uint8) * 255, 0, "band must be a whole number of pixels ≥ 1"),
        (np.eye(8, dtype=np.uint8) * 255, 2.5, "band must be a whole number of pixels ≥ 1"),
    ],
    ids=["empty", "full", "zero-band", "fractional-band"],
)
def test_unusable_masks_are_refused_with_the_reason(mask, band, message):
    with pytest.raises(ValueError, match=message):
        trimap_from_mask(mask, band=band)


@pytest.mark.parametrize("mode", ["L", "I;16", "P"])
def test_class_id_files_read_as_class_ids(tmp_path, mode):
    ids = np.array([[0, 1, 2, 2, 1, 0]], np.uint8)
    if mode == "P":
        im = Image.fromarray(ids, "P")
        im.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2])
    else:
        im = Image.fromarray(ids.astype(np.uint16) if mode == "I;16" else ids)
    im.save(tmp_path / "ids.png")
    from mematte.io import open_image

    np.testing.assert_array_equal(normalize_trimap(open_image(tmp_path / "ids.png")), [[0, 128, 255, 255, 128, 0]])
