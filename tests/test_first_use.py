"""What a new user meets first: file paths to predict, a swapped image and trimap, folder
pairs named as the README names them, the wrong loader for a checkpoint, and the smaller
command-line options (--version, --save-trimap, eval's units)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mematte
from mematte import FastMEMatte, TrimapWarning
from mematte.trimap import normalize_trimap

from test_cli import image, run, single, trimap_values


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FastMEMatte("vit_s", backend="reference")


def photo(seed=0, h=40, w=56):
    """A random colour picture: what a trimap must not look like."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- predict takes paths


def test_predict_takes_file_paths_as_str_and_pathlike(tmp_path, model):
    picture, trimap = photo(), trimap_values()
    Image.fromarray(picture).save(tmp_path / "photo.png")
    Image.fromarray(trimap).save(tmp_path / "photo_trimap.png")
    Image.fromarray(normalize_trimap(trimap) // 127).save(tmp_path / "class_ids.png")  # 0 / 1 / 2
    expected = model.predict(picture, trimap)
    np.testing.assert_array_equal(
        model.predict(str(tmp_path / "photo.png"), str(tmp_path / "photo_trimap.png")), expected
    )
    # a file's stored levels are read, so a class-id trimap file is one
    np.testing.assert_array_equal(model.predict(tmp_path / "photo.png", tmp_path / "class_ids.png"), expected)


def test_predict_on_a_missing_file_names_it(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"nope\.png: no such file"):
        model.predict(tmp_path / "nope.png", trimap_values())


# ---------------------------------------------------------------------- not a trimap


@pytest.mark.parametrize(
    "given, why",
    [
        (lambda: photo(), "are coloured"),
        (lambda: Image.fromarray(photo()), "are coloured"),
        (lambda: photo() / 255.0, "are coloured"),
        (lambda: Image.fromarray(photo()).convert("L"), "are grey levels far from 0, 50% and 100%"),
        (lambda: np.linspace(0.0, 1.0, 40 * 56).reshape(40, 56), "are grey levels far from 0, 50% and 100%"),
    ],
    ids=["rgb-array", "rgb-pil", "rgb-float", "grey-photo", "ramp"],
)
def test_a_photo_given_as_the_trimap_gets_a_trimap_warning(given, why):
    assert issubclass(TrimapWarning, UserWarning)
    with pytest.warns(TrimapWarning, match=rf"does not look like a trimap: \d+% of its pixels {why}.*swapped"):
        normalize_trimap(given())


@pytest.mark.parametrize(
    "given",
    [
        lambda: trimap_values(),  # painted, anti-aliased greys
        lambda: np.repeat(trimap_values()[:, :, None], 3, axis=2),  # saved as RGB
        lambda: (trimap_values() // 127).astype(np.uint8),  # class ids
        lambda: np.clip(
            trimap_values()[:, :, None].astype(int) + np.random.default_rng(0).integers(-8, 9, (40, 56, 3)), 0, 255
        ).astype(np.uint8),  # JPEG-like noise on each channel
    ],
    ids=["painted", "rgb", "class-ids", "jpeg-noise"],
)
def test_real_trimaps_raise_no_warning(given):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalize_trimap(given())


def test_predict_warns_about_a_swapped_image_and_trimap(model):
    with pytest.warns(TrimapWarning, match="trimap: does not look like a trimap"):
        model.predict(np.repeat(trimap_values()[:, :, None], 3, axis=2), photo())


def test_the_cli_prints_the_warning_for_swapped_files(tmp_path, checkpoint):
    img, tri = single(tmp_path)
    rc, _, stderr = run(
        "predict", tri, "--trimap", img, "--checkpoint", checkpoint, "-o", tmp_path / "out", "--no-tile"
    )
    assert rc == 0, stderr
    assert stderr.count("does not look like a trimap") == 1
    assert f"warning: t.png: {img}: does not look like a trimap" in stderr


# ---------------------------------------------------------------------- folders named as the README names them


def test_a_folder_of_photos_beside_their_stem_trimap_files_is_paired(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, stem in enumerate(("cat", "dog")):
        image(i).save(photos / f"{stem}.jpg")
        Image.fromarray(trimap_values()).save(photos / f"{stem}_trimap.png")
    rc, stdout, stderr = run(
        "predict", photos, "--trimap", photos, "--checkpoint", checkpoint, "-o", tmp_path / "out", "--no-tile"
    )
    assert rc == 0, stderr
    assert "2 of 2 images matted into" in stdout  # the trimaps themselves are not matted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat_alpha.png", "dog_alpha.png"]


def test_masks_named_stem_mask_pair_in_another_folder(tmp_path):
    from mematte.commands import _pair_inputs

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image().save(images / "cat.png")
    image().save(images / "dog.png")
    Image.fromarray(trimap_values()).save(masks / "cat_mask.png")
    Image.fromarray(trimap_values()).save(masks / "dog.png")
    assert _pair_inputs(images, masks, "mask") == [
        (images / "cat.png", masks / "cat_mask.png"),
        (images / "dog.png", masks / "dog.png"),
    ]
    Image.fromarray(trimap_values()).save(masks / "dog_mask.png")
    jobs = dict(_pair_inputs(images, masks, "mask"))
    assert str(jobs[images / "dog.png"]) == f"several masks of dog.png in {masks}: dog.png, dog_mask.png"


def test_a_folder_without_any_pair_is_a_usage_error_before_the_model_loads(tmp_path):
    photos, trimaps = tmp_path / "photos", tmp_path / "trimaps"
    photos.mkdir()
    trimaps.mkdir()
    image().save(photos / "cat.png")
    image().save(photos / "dog.png")
    Image.fromarray(trimap_values()).save(trimaps / "cat-trimap.png")
    not_a_checkpoint = tmp_path / "weights.pth"
    not_a_checkpoint.write_bytes(b"never read")  # loading it would fail with exit 1
    rc, stdout, stderr = run(
        "predict", photos, "--trimap", trimaps, "--checkpoint", not_a_checkpoint, "-o", tmp_path / "out"
    )
    assert rc == 2
    assert (
        f"error: none of the 2 images in {photos} has a trimap in {trimaps} "
        f"(e.g. no trimap named cat.* in {trimaps} (nor cat_trimap.*))"
    ) in stderr
    assert stdout == "" and "matted into" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_run_that_matted_nothing_does_not_claim_its_output_folder(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for stem in ("cat", "dog"):
        (photos / f"{stem}.png").write_bytes(b"not a PNG")
        Image.fromarray(trimap_values()).save(photos / f"{stem}_trimap.png")
    rc, stdout, stderr = run("predict", photos, "--trimap", photos, "--checkpoint", checkpoint, "-o", tmp_path / "out")
    assert rc == 1
    assert stdout == "0 of 2 images matted\n"
    assert "2 of 2 images failed" in stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the loader that fits the file


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A ViTMatte and a MEMatte checkpoint file, as their releases store them."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save({"model": mematte.FastViTMatte("vit_s").state_dict()}, root / "ViTMatte_S_Com.pth")
    torch.save({"model": FastMEMatte("vit_s", teacher=True).state_dict()}, root / "MEMatte_ViTS_DIM.pth")
    return root / "ViTMatte_S_Com.pth", root / "MEMatte_ViTS_DIM.pth"


def test_each_loader_names_the_model_of_the_other_ones_file(weights):
    vitmatte, memattes = weights
    with pytest.raises(
        ValueError,
        match=rf"^{vitmatte} holds a ViTMatte model, not MEMatte: load it with "
        r"FastViTMatte\.from_checkpoint, or with mematte\.load_model",
    ):
        FastMEMatte.from_checkpoint(vitmatte)
    with pytest.raises(
        ValueError,
        match=rf"^{memattes} holds a MEMatte model, not ViTMatte: load it with "
        r"FastMEMatte\.from_checkpoint, or with mematte\.load_model",
    ):
        mematte.FastViTMatte.from_checkpoint(memattes)  # its ViTMatte teacher does not make it one


def test_hf_vitmatte_weights_are_named_too(weights):
    from mematte import hf

    upstream = torch.load(weights[0], weights_only=True)["model"]
    with pytest.raises(ValueError, match="the state dict holds a ViTMatte model, not MEMatte"):
        FastMEMatte.from_checkpoint(hf.hf_from_upstream(upstream))


def test_from_checkpoint_load_model_and_the_cli_default_to_the_same_dtype(weights):
    from mematte.cli import build_parser
    from mematte.precision import resolve_dtype

    path = weights[1]
    auto = resolve_dtype("auto", torch.device("cpu"))
    assert FastMEMatte.from_checkpoint(path).dtype == auto
    assert mematte.load_model(path, device="cpu").dtype == auto
    assert build_parser().parse_args(["predict", "x.png", "--trimap", "t.png"]).dtype == "auto"
    # fp32 where asked, and wherever "auto" resolves to it (the reference backend)
    assert FastMEMatte.from_checkpoint(path, dtype="float32").dtype == torch.float32
    assert FastMEMatte.from_checkpoint(path, backend="reference").dtype == torch.float32


# ---------------------------------------------------------------------- mematte train's defaults


def train_config(tmp_path, *options):
    from mematte.cli import build_parser
    from mematte.train.run import prepare

    from train_helpers import make_dataset

    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, n_fg=1, n_bg=2, size=(64, 64))
    args = build_parser().parse_args(
        ["train", str(data), "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "2", *options]
    )
    return prepare(args).cfg


@pytest.mark.parametrize(
    "iters, period",
    [(3, 1000), (15_000, 1000), (40406, 2693)],
    ids=["3-iterations", "15000-iterations", "published-40406"],
)
def test_a_short_run_saves_only_its_final_checkpoint_unless_asked(tmp_path, iters, period):
    assert train_config(tmp_path, "--iters", str(iters)).checkpoint_period == period
    assert train_config(tmp_path, "--iters", "3", "--checkpoint-period", "1").checkpoint_period == 1


@pytest.mark.parametrize(
    "cores, local_processes, workers",
    [(2, 1, 2), (16, 1, 4), (2, 2, 1), (8, 4, 2)],
    ids=["2-cores", "16-cores", "2-cores-2-processes", "8-cores-4-processes"],
)
def test_data_workers_are_at_most_the_cores_each_process_has(monkeypatch, tmp_path, cores, local_processes, workers):
    from mematte.distributed import Distributed
    from mematte.train.run import default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers(Distributed(local_world_size=local_processes)) == workers
    if local_processes == 1:
        assert train_config(tmp_path, "--iters", "3").workers == workers
        assert train_config(tmp_path, "--iters", "3", "--workers", "6").workers == 6  # as asked


# ---------------------------------------------------------------------- smaller command-line options


def test_version_is_printed_without_any_other_work():
    from importlib.metadata import version

    rc, stdout, _ = run("--version")
    assert rc == 0 and stdout == f"mematte {version('mematte-kernels')}\n"


def test_save_routing_on_a_vitmatte_checkpoint_is_refused(tmp_path, weights):
    img, tri = single(tmp_path)
    rc, stdout, stderr = run(
        "predict", img, "--trimap", tri, "--checkpoint", weights[0], "--save-routing", "-o", tmp_path / "out"
    )
    assert rc == 2
    assert (
        f"mematte predict: error: --save-routing: {weights[0]} holds a ViTMatte model, which has no routers" in stderr
    )
    assert stdout == "" and not (tmp_path / "out").exists()


def test_save_trimap_writes_the_trimap_built_from_the_mask(tmp_path, checkpoint):
    from mematte.trimap import trimap_from_mask

    img, _ = single(tmp_path)
    mask = np.zeros((40, 56), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    rc, stdout, stderr = run(
        "predict",
        img,
        "--mask",
        tmp_path / "a_mask.png",
        "--band",
        "3",
        "--save-trimap",
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "out",
        "--no-tile",
    )
    assert rc == 0, stderr
    assert stdout.splitlines() == [str(tmp_path / "out" / "a_alpha.png"), str(tmp_path / "out" / "a_trimap.png")]
    written = np.asarray(Image.open(tmp_path / "out" / "a_trimap.png"))
    np.testing.assert_array_equal(written, trimap_from_mask(mask, band=3))

    rc, _, stderr = run(
        "predict",
        img,
        "--trimap",
        tmp_path / "a_mask.png",
        "--save-trimap",
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "out2",
    )
    assert rc == 2 and "--save-trimap writes the trimap built from --mask" in stderr
