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
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), r"trimap must be H×W"),
        (np.full((8, 8, 3), np.nan, np.float32), np.zeros((8, 8), np.uint8), r"image contains NaN or Inf"),
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8), np.inf, np.float32), r"trimap contains NaN or Inf"),
        (np.zeros((0, 8, 3), np.uint8), np.zeros((0, 8), np.uint8), r"image is empty"),
        (np.full((8, 8, 3), 2.0, np.float32), np.zeros((8, 8), np.uint8), r"must lie in \[0, 1\]"),
        (np.zeros((8, 8, 3), np.int64), np.zeros((8, 8), np.uint8), r"dtype int64"),
    ],
    ids=["rgba", "gray", "size-mismatch", "rgb-trimap", "nan-image", "inf-trimap", "empty", "out-of-range", "int64"],
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
