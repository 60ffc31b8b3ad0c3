"""model.predict: one image in the formats users have, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from mematte import FastMEMatte


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FastMEMatte("vit_s", backend="reference")


def make_pair(h=40, w=56):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    trimap = np.full((h, w), 128, np.uint8)
    trimap[:10] = 0
    trimap[-10:] = 255
    return image, trimap


def test_uint8_numpy_gives_alpha_with_known_regions_forced(model):
    image, trimap = make_pair()
    alpha = model.predict(image, trimap)
    assert alpha.shape == (40, 56) and alpha.dtype == np.float32
    assert (alpha[:10] == 0).all() and (alpha[-10:] == 1).all()
    unknown = alpha[10:-10]
    assert ((unknown > 0) & (unknown < 1)).all()


def test_pil_float_and_tensor_inputs_agree(model):
    image, trimap = make_pair()
    expected = model.predict(image, trimap)
    np.testing.assert_array_equal(model.predict(Image.fromarray(image), Image.fromarray(trimap)), expected)
    np.testing.assert_allclose(model.predict(image / 255.0, trimap / 255.0), expected, atol=1e-6)
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    np.testing.assert_allclose(model.predict(chw, torch.from_numpy(trimap)), expected, atol=1e-6)


def test_predict_matches_the_upstream_call(model):
    image, trimap = make_pair()
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    tri = torch.from_numpy(trimap)[None, None].float() / 255
    with torch.inference_mode():
        phas = model({"image": img, "trimap": tri})[0]["phas"][0, 0]
    alpha = model.predict(image, trimap)
    np.testing.assert_array_equal(alpha[10:-10], phas.numpy()[10:-10])


@pytest.mark.parametrize(
    "image, trimap, match",
    [
        (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8), r"H×W×3 RGB"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), r"H×W×3 RGB"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), r"image is 8×8 \(W×H\) but trimap is 9×8"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 1), np.uint8), r"trimap must be H×W"),
        (np.full((8, 8, 3), np.nan, np.float32), np.zeros((8, 8), np.uint8), r"image contains NaN or Inf"),
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8), np.inf, np.float32), r"trimap holds 0 NaN and 64 infinite"),
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8), np.nan, np.float32), r"trimap holds 64 NaN"),
        (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), r"a batch .* upstream call"),
        (np.zeros((0, 8, 3), np.uint8), np.zeros((0, 8), np.uint8), r"image is empty"),
        (np.full((8, 8, 3), 2.0, np.float32), np.zeros((8, 8), np.uint8), r"must lie in \[0, 1\]"),
        (np.zeros((8, 8, 3), np.int64), np.zeros((8, 8), np.uint8), r"dtype int64"),
    ],
    ids=[
        "rgba",
        "gray",
        "size-mismatch",
        "4d-trimap",
        "nan-image",
        "inf-trimap",
        "nan-trimap",
        "batch",
        "empty",
        "out-of-range",
        "int64",
    ],
)
def test_bad_input_is_refused_with_the_reason(model, image, trimap, match):
    with pytest.raises(ValueError, match=match):
        model.predict(image, trimap)


def test_batched_call_rejects_mismatched_shapes(model):
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        model({"image": torch.zeros(1, 4, 8, 8), "trimap": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError, match="differ in batch or size"):
        model({"image": torch.zeros(2, 3, 8, 8), "trimap": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"must be float tensors in \[0, 1\], got torch.uint8"):
        model({"image": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "trimap": torch.zeros(1, 1, 8, 8)})


def test_float16_is_refused_on_the_cpu():
    model = FastMEMatte("vit_s", dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 is for GPUs; on the CPU use torch.bfloat16"):
        model({"image": torch.zeros(1, 3, 8, 8), "trimap": torch.zeros(1, 1, 8, 8)})


# ---------------------------------------------------------------------- one trimap reading


def test_class_id_and_0_255_trimaps_read_as_the_8bit_one(model):
    image, trimap = make_pair()
    expected = model.predict(image, trimap, patch_decoder=False)
    class_ids = (trimap // 127).astype(np.uint8)  # 0 / 1 / 2
    assert set(np.unique(class_ids)) == {0, 1, 2}
    np.testing.assert_array_equal(model.predict(image, class_ids, patch_decoder=False), expected)
    np.testing.assert_array_equal(model.predict(image, class_ids.astype(np.int64), patch_decoder=False), expected)
    np.testing.assert_array_equal(
        model.predict(image, torch.from_numpy(class_ids)[None], patch_decoder=False), expected
    )
    np.testing.assert_array_equal(
        model.predict(image, trimap.astype(np.float32), patch_decoder=False), expected
    )  # 0..255 floats
    rgb = np.repeat(trimap[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(
        model.predict(Image.fromarray(image).convert("RGBA"), rgb, patch_decoder=False), expected
    )


@pytest.mark.parametrize("kind", ["all-known", "all-unknown"])
def test_a_trimap_that_leaves_nothing_to_matte_warns(model, kind):
    from mematte.trimap import TrimapWarning

    image, trimap = make_pair()
    trimap = np.where(trimap == 128, 255, trimap).astype(np.uint8) if kind == "all-known" else np.full_like(trimap, 128)
    with pytest.warns(TrimapWarning, match="no unknown region" if kind == "all-known" else "unknown everywhere"):
        alpha = model.predict(image, trimap, patch_decoder=False)
    if kind == "all-known":
        np.testing.assert_array_equal(alpha, trimap / 255.0)


# ---------------------------------------------------------------------- the upstream call


@pytest.mark.parametrize(
    "image, trimap, match",
    [
        (
            torch.full((1, 3, 8, 8), 255.0),
            torch.zeros(1, 1, 8, 8),
            r"'image' values must lie in \[0, 1\] \(RGB divided by 255\), got 255..255",
        ),
        (
            torch.zeros(1, 3, 8, 8),
            torch.full((1, 1, 8, 8), 128.0),
            r"'trimap' values must lie in \[0, 1\].*got 128..128",
        ),
        (torch.full((1, 3, 8, 8), float("nan")), torch.zeros(1, 1, 8, 8), r"'image' holds NaN or infinite"),
        (torch.zeros(1, 3, 8, 8), torch.full((1, 1, 8, 8), -float("inf")), r"'trimap' holds NaN or infinite"),
    ],
    ids=["image-0-255", "trimap-0-255", "nan-image", "inf-trimap"],
)
def test_upstream_call_refuses_values_outside_the_unit_range(model, image, trimap, match):
    with pytest.raises(ValueError, match=match):
        model({"image": image, "trimap": trimap})


def test_upstream_input_checks_read_the_device_once(monkeypatch):
    """All value checks cost one host read (one sync on a GPU)."""
    from mematte import matting

    reads = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k)
        )
    matting.check_values(torch.rand(2, 3, 16, 8), torch.rand(2, 1, 16, 8))
    assert reads == ["tolist"]


@pytest.mark.gpu
def test_upstream_input_checks_sync_once_on_a_gpu():
    import warnings

    from mematte import matting

    image, trimap = torch.rand(2, 3, 64, 64, device="cuda"), torch.rand(2, 1, 64, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            matting.check_values(image, trimap)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


# ---------------------------------------------------------------------- max_tokens, results


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (0, None), (1, 1), (np.int64(18500), 18500)],
    ids=["None", "zero", "one", "numpy-int"],
)
def test_max_tokens_none_or_zero_is_no_cap(value, expected):
    m = FastMEMatte("vit_s", max_tokens=value)
    assert m.max_tokens == expected
    m.max_tokens = 5
    assert m.max_tokens == 5


@pytest.mark.parametrize(
    "value, error, match",
    [
        (True, TypeError, "whole number of tokens.*got True"),
        (2.5, TypeError, "whole number of tokens.*got 2.5"),
        ("100", TypeError, "whole number of tokens"),
        (-1, ValueError, "must be ≥ 0"),
        (10**30, ValueError, "beyond any image"),
    ],
    ids=["bool", "float", "str", "negative", "huge"],
)
def test_max_tokens_refuses_what_is_not_a_token_count(value, error, match):
    with pytest.raises(error, match=match):
        FastMEMatte("vit_s", max_tokens=value)
    m = FastMEMatte("vit_s")
    with pytest.raises(error, match=match):
        m.max_tokens = value
    assert m.max_tokens == 18500


def test_a_non_finite_alpha_is_refused_not_returned():
    torch.manual_seed(0)
    broken = FastMEMatte("vit_s", backend="reference")
    with torch.no_grad():
        broken.decoder.matting_head.matting_convs[-1].bias.fill_(float("nan"))
    image, trimap = make_pair()
    with pytest.raises(ValueError, match="non-finite alpha"):
        broken.predict(image, trimap, patch_decoder=False)


def test_progress_is_reported_per_block_and_per_decoder_batch(model):
    from mematte import progress

    seen = []
    image, trimap = make_pair()
    with progress.reporting(lambda stage, done, total: seen.append((stage, done, total))):
        model.predict(image, trimap)
    model.predict(image, trimap)  # outside reporting: nothing
    assert seen[:12] == [("backbone", i, 12) for i in range(1, 13)]
    decoder = seen[12:]
    assert decoder and [d for _, d, _ in decoder] == list(range(1, len(decoder) + 1))
    assert all(stage == "decoder" and total == len(decoder) for stage, _, total in decoder)
