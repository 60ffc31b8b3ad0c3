"""The Python API: files in, alpha / cutout / composite / routing picture out."""
import numpy as np
import pytest
from PIL import Image

from mematte.api import (
    NO_CHECKPOINT,
    fit_background,
    load_model,
    matte,
    output_paths,
    predict_file,
    read_pair,
    routing_picture,
)

H, W = 40, 56  # padded to 64×64 by the model: a 4×4 token grid


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, device="cpu")


def make_trimap():
    t = np.full((H, W), 128, np.uint8)
    t[:, :16] = 0
    t[:, -16:] = 255
    return t


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    Image.fromarray(make_trimap()).save(tmp_path / "cat_trimap.png")
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2:] = 255
    Image.fromarray(mask).save(tmp_path / "cat_mask.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "bg.jpg")
    return tmp_path


def test_predict_file_writes_every_output_and_returns_them(files, model):
    out = files / "out"
    result = predict_file(files / "cat.png", files / "cat_trimap.png", model=model, out_dir=out,
                          rgba=True, background=files / "bg.jpg", save_routing=True, tile=False)
    assert result.alpha.shape == (H, W) and result.alpha.dtype == np.float32
    assert (result.alpha[:, :16] == 0).all() and (result.alpha[:, -16:] == 1).all()
    assert result.foreground.shape == result.composite.shape == (H, W, 3)
    assert [r.shape for r in result.routing] == [(4, 4)] * 4
    assert result.written == output_paths(files / "cat.png", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "cat_alpha.png", "cat_composite.png", "cat_rgba.png", "cat_routing.png"]

    alpha_png = np.asarray(Image.open(out / "cat_alpha.png"))
    np.testing.assert_array_equal(alpha_png, np.rint(result.alpha * 255).astype(np.uint8))
    rgba = Image.open(out / "cat_rgba.png")
    assert rgba.mode == "RGBA" and rgba.size == (W, H)
    np.testing.assert_array_equal(np.asarray(rgba)[:, :, 3], alpha_png)
    assert Image.open(out / "cat_composite.png").size == (W, H)


def test_upstream_call_path_matches_model_predict(files, model):
    image, trimap = read_pair(files / "cat.png", files / "cat_trimap.png")
    alpha, _ = matte(model, image, trimap, tile=False)
    np.testing.assert_allclose(alpha, model.predict(image, trimap, patch_decoder=False), atol=1e-6)


def test_mask_instead_of_trimap_and_loading_from_a_checkpoint_path(files, checkpoint):
    result = predict_file(files / "cat.png", mask_path=files / "cat_mask.png", band=4,
                          checkpoint=checkpoint, tile=False)
    assert result.written == {}  # no out_dir: nothing written
    # mask edge between columns 27 and 28: unknown within 4 px on either side
    np.testing.assert_array_equal(np.unique(result.trimap[:, 24:32]), [128])
    assert (result.trimap[:, :24] == 0).all() and (result.trimap[:, 32:] == 255).all()
    assert (result.alpha[:, :24] == 0).all() and (result.alpha[:, 32:] == 1).all()


def test_size_mismatch_names_both_sizes(files, model):
    Image.fromarray(np.zeros((W, H), np.uint8)).save(files / "rotated.png")
    with pytest.raises(ValueError, match=r"trimap .*rotated.png is 40×56 \(W×H\) but image .*cat.png is 56×40 \(W×H\)"):
        predict_file(files / "cat.png", files / "rotated.png", model=model)


def test_exif_orientation_is_applied_to_each_file(files):
    # a camera image stored sideways with "rotate 90°" in EXIF, and a trimap painted on
    # the upright view (no tag): they line up once the tag is applied
    stored = Image.open(files / "cat.png").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    stored.save(files / "sideways.png", exif=exif)
    image, trimap = read_pair(files / "sideways.png", files / "cat_trimap.png")
    assert image.shape == (H, W, 3)
    np.testing.assert_array_equal(image, np.asarray(Image.open(files / "cat.png"), np.float32) / 255)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trimap_path": "t.png"}, "a checkpoint is required: a randomly initialised model would output noise"),
        ({"trimap_path": "t.png", "checkpoint": "c.pth", "model": object()}, "either a model or a checkpoint, not both"),
    ],
    ids=["no-model", "both-models"],
)
def test_model_must_be_given_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict_file("cat.png", **kwargs)


def test_trimap_and_mask_are_exclusive(files, model):
    with pytest.raises(ValueError, match="exactly one of a trimap or a mask"):
        predict_file(files / "cat.png", files / "cat_trimap.png", mask_path=files / "cat_mask.png", model=model)


def test_no_checkpoint_message_points_to_the_official_release():
    assert "github.com/linyiheng123/MEMatte" in NO_CHECKPOINT
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_model(None)


def test_routing_picture_tints_global_tokens_and_dims_the_rest():
    image = np.full((64, 80, 3), 0.5, np.float32)
    keep = np.zeros((6, 6), bool)  # token grid of the padded input (96×96), larger than the image
    keep[1, 0] = True  # pixels 16..31 × 0..15, below the label
    sheet = np.asarray(routing_picture(image, [keep] * 4))
    assert sheet.shape == (2 * 64 + 8, 2 * 80 + 8, 3)
    tinted, dimmed = sheet[24, 8], sheet[24, 40]
    assert tinted[0] > tinted[1] > tinted[2] and tinted[2] < 0.5 * 255  # orange over grey
    np.testing.assert_array_equal(dimmed, [38, 38, 38])  # 0.3 · 0.5 · 255


def test_background_is_scaled_to_cover_and_centre_cropped():
    bg = np.zeros((10, 40, 3), np.float32)
    bg[:, 18:22] = 1.0  # a white stripe in the middle, 8 px wide once scaled ×2
    fitted = fit_background(bg, 20, 20)
    assert fitted.shape == (20, 20, 3)
    assert fitted[:, 10].min() > 0.9 and fitted[:, 0].max() < 0.1
