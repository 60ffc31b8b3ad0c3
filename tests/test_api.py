"""The Python API: files in, alpha / cutout / composite / routing picture out."""

import numpy as np
import pytest
from PIL import Image

from mematte.api import (
    MIN_PANEL,
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
    mask[:, W // 2 :] = 255
    Image.fromarray(mask).save(tmp_path / "cat_mask.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "bg.jpg")
    return tmp_path


def test_predict_file_writes_every_output_and_returns_them(files, model):
    out = files / "out"
    result = predict_file(
        files / "cat.png",
        files / "cat_trimap.png",
        model=model,
        out_dir=out,
        rgba=True,
        background=files / "bg.jpg",
        save_routing=True,
        save_trimap=True,
        tile=False,
    )
    assert result.alpha.shape == (H, W) and result.alpha.dtype == np.float32
    assert (result.alpha[:, :16] == 0).all() and (result.alpha[:, -16:] == 1).all()
    assert result.foreground.shape == result.composite.shape == (H, W, 3)
    assert [r.shape for r in result.routing] == [(4, 4)] * 4
    assert result.written == output_paths(files / "cat.png", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "cat_alpha.png",
        "cat_composite.png",
        "cat_rgba.png",
        "cat_routing.png",
        "cat_trimap.png",
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "cat_trimap.png")), result.trimap)

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
    result = predict_file(
        files / "cat.png", mask_path=files / "cat_mask.png", band=4, checkpoint=checkpoint, tile=False
    )
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
        (
            {"trimap_path": "t.png", "checkpoint": "c.pth", "model": object()},
            "either a model or a checkpoint, not both",
        ),
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
    image = np.full((96, 128, 3), 0.5, np.float32)
    keep = np.zeros((8, 10), bool)  # token grid of the padded input (128×160), larger than the image
    keep[1, 0] = True  # pixels 16..31 × 0..15, below the label
    sheet = np.asarray(routing_picture(image, [keep] * 4))
    legend = 4 + 2 * 18
    assert sheet.shape == (2 * 96 + 8 + legend, 2 * 128 + 8, 3)
    tinted, dimmed = sheet[24, 8], sheet[24, 40]
    assert tinted[0] > tinted[1] > tinted[2] and tinted[2] < 0.5 * 255  # orange over grey
    np.testing.assert_array_equal(dimmed, [38, 38, 38])  # 0.3 · 0.5 · 255
    # the legend's swatches are the two colours, each followed by its meaning in black
    swatches = sheet[2 * 96 + 8 + 4 + 6, 10], sheet[2 * 96 + 8 + 4 + 18 + 6, 10]
    # (the legend tints an exact mid-grey, the panels the image's 128/255: one level apart)
    np.testing.assert_allclose(swatches[0], tinted, atol=1)
    np.testing.assert_allclose(swatches[1], dimmed, atol=1)
    assert (sheet[2 * 96 + 8 :, 22:200] < 100).any()


@pytest.mark.parametrize("h, w", [(16, 8000), (8000, 16), (8, 8)], ids=["wide", "tall", "tiny"])
def test_routing_picture_panels_keep_a_minimum_size_at_any_aspect_ratio(h, w):
    image = np.full((h, w, 3), 0.5, np.float32)
    keep = np.ones((-(-h // 16) + 2, -(-w // 16) + 2), bool)
    sheet = routing_picture(image, [keep] * 4)
    white_rows = (np.asarray(sheet) == 255).all(axis=(1, 2))  # panels are tinted or dimmed, never white
    panel_w, panel_h = (sheet.width - 8) // 2, int(np.argmax(white_rows))
    assert min(panel_w, panel_h) >= MIN_PANEL and max(panel_w, panel_h) <= 1024
    assert sheet.width >= 2 * MIN_PANEL + 8


def test_background_is_scaled_to_cover_and_centre_cropped():
    bg = np.zeros((10, 40, 3), np.float32)
    bg[:, 18:22] = 1.0  # a white stripe in the middle, 8 px wide once scaled ×2
    fitted = fit_background(bg, 20, 20)
    assert fitted.shape == (20, 20, 3)
    assert fitted[:, 10].min() > 0.9 and fitted[:, 0].max() < 0.1


# ---------------------------------------------------------------------- outputs as a set


def test_a_failure_while_writing_leaves_no_output_and_no_temporary_file(files, model, monkeypatch):
    import mematte.api as api

    out = files / "out"
    out.mkdir()
    (out / "cat_alpha.png").write_bytes(b"from an earlier run")

    def broken_picture(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(api, "routing_picture", broken_picture)
    with pytest.raises(OSError, match="disk full"):
        predict_file(
            files / "cat.png",
            files / "cat_trimap.png",
            model=model,
            out_dir=out,
            rgba=True,
            save_routing=True,
            tile=False,
        )
    # the alpha was encoded first, but nothing of this run was renamed into place
    assert sorted(p.name for p in out.iterdir()) == ["cat_alpha.png"]
    assert (out / "cat_alpha.png").read_bytes() == b"from an earlier run"


def test_a_failure_while_renaming_removes_the_whole_set(files, model, monkeypatch):
    import os

    out = files / "out"
    calls = []
    real_replace = os.replace

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("device went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="device went away"):
        predict_file(files / "cat.png", files / "cat_trimap.png", model=model, out_dir=out, rgba=True, tile=False)
    assert len(calls) == 2
    assert list(out.iterdir()) == []  # neither the renamed alpha nor any temporary file


def test_an_interrupt_while_writing_cleans_up(files, model, monkeypatch):
    from mematte import io

    out = files / "out"
    real_png = io.png

    def interrupted(im):
        write = real_png(im)

        def write_then_interrupt(f):
            write(f)
            raise KeyboardInterrupt

        return write_then_interrupt

    monkeypatch.setattr(io, "png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_file(files / "cat.png", files / "cat_trimap.png", model=model, out_dir=out, tile=False)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------- inputs


def test_background_may_be_a_pil_image_or_a_grey_array(files, model):
    grey = np.random.default_rng(1).integers(0, 256, (30, 20), dtype=np.uint8)
    from_array = predict_file(files / "cat.png", files / "cat_trimap.png", model=model, background=grey, tile=False)
    from_pil = predict_file(
        files / "cat.png",
        files / "cat_trimap.png",
        model=model,
        background=Image.fromarray(grey).convert("RGB"),
        tile=False,
    )
    np.testing.assert_allclose(from_array.composite, from_pil.composite, atol=1e-6)
    with pytest.raises(ValueError, match=r"background must be H×W×3 colour or H×W grey, got shape \(30, 20, 4\)"):
        predict_file(files / "cat.png", files / "cat_trimap.png", model=model, background=np.zeros((30, 20, 4)))


def test_a_degenerate_trimap_warns_naming_the_image(files, model):
    from mematte.trimap import TrimapWarning

    Image.fromarray(np.where(make_trimap() == 128, 255, make_trimap()).astype(np.uint8)).save(files / "hard.png")
    with pytest.warns(TrimapWarning, match=r"trimap of .*cat.png has no unknown region"):
        predict_file(files / "cat.png", files / "hard.png", model=model, tile=False)


def test_images_over_max_pixels_are_refused_with_the_memory_needed(files, model):
    with pytest.raises(
        ValueError,
        match=r"cat.png: 56×40 is 0 megapixels, over the limit of 0 megapixels .*"
        r"roughly 0 GiB.*--max-pixels 2240",
    ):
        predict_file(files / "cat.png", files / "cat_trimap.png", model=model, max_pixels=1000)
    predict_file(files / "cat.png", files / "cat_trimap.png", model=model, max_pixels=2240, tile=False)


# ---------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "meta"}, r"device 'meta' cannot run the model; use auto, cpu, cuda or cuda:N"),
        ({"device": "gpu"}, r"unknown device 'gpu'"),
        ({"device": "cpu", "dtype": "float16"}, "float16 is for GPUs"),
        ({"device": "cpu", "dtype": "half"}, "unknown dtype 'half'"),
        ({"device": "cpu", "max_tokens": 2.5}, "whole number of tokens"),
    ],
    ids=["meta", "unknown-name", "fp16-cpu", "unknown-dtype", "float-max-tokens"],
)
def test_load_model_refuses_what_cannot_run(checkpoint, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_model(checkpoint, **kwargs)


def test_load_model_auto_dtype_and_no_cap(checkpoint):
    import torch

    from mematte_kernels import ext

    model = load_model(checkpoint, device="cpu", dtype="auto", max_tokens=0)
    assert model.max_tokens is None
    assert model.dtype == (torch.bfloat16 if ext.cpu_bf16_kernels() else torch.float32)
    assert load_model(checkpoint, device="cpu", dtype="auto", backend="reference").dtype == torch.float32


def test_max_pixels_lifts_pillows_own_limit_and_restores_it(files, monkeypatch):
    from mematte import io

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 56×40 now
    with pytest.raises(Image.DecompressionBombError):
        Image.open(files / "cat.png")
    assert io.read_image(files / "cat.png", max_pixels=None).shape == (H, W, 3)
    assert io.read_image(files / "cat.png", max_pixels=H * W).shape == (H, W, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_a_class_id_trimap_file_gives_the_same_matte_as_the_8bit_one(files, model):
    Image.fromarray((make_trimap() // 127).astype(np.uint8)).save(files / "ids.png")  # 0 / 1 / 2
    _, from_ids = read_pair(files / "cat.png", files / "ids.png")
    _, from_8bit = read_pair(files / "cat.png", files / "cat_trimap.png")
    np.testing.assert_array_equal(from_ids, from_8bit)
