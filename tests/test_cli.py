"""The ``mematte`` command end to end, on small generated images and a random checkpoint."""
import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mematte.cli import main

H, W = 40, 56  # padded to 64×64 by the model
BG_COLS, FG_COLS = slice(0, 16), slice(40, 56)


def image(seed=0, h=H, w=W):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def trimap_values():
    """Background, unknown and foreground columns, with the stray greys of a painted,
    anti-aliased trimap in each."""
    t = np.full((H, W), 128, np.uint8)
    t[:, BG_COLS] = 0
    t[:, FG_COLS] = 255
    t[::3, 15] = 40     # ≤ 25 %: background
    t[::3, 16] = 100    # unknown
    t[::3, 40] = 200    # ≥ 75 %: foreground
    return t


def run(*argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------- predict, folders


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, checkpoint):
    """One folder run over trimaps in every awkward format, plus three broken inputs."""
    root = tmp_path_factory.mktemp("folder")
    images, trimaps, out = root / "images", root / "trimaps", root / "out"
    images.mkdir()
    trimaps.mkdir()
    t = trimap_values()
    transparent = np.zeros((H, W, 1), np.uint8)  # the alpha channel must be ignored

    image(1).save(images / "rgba_trimap.png")
    Image.fromarray(np.concatenate([t[:, :, None].repeat(3, axis=2), transparent], axis=2)).save(
        trimaps / "rgba_trimap.png")
    image(2).save(images / "la_trimap.jpg")
    Image.fromarray(np.concatenate([t[:, :, None], transparent], axis=2)).save(trimaps / "la_trimap.png")
    image(3).save(images / "sixteen_bit.png")
    Image.fromarray(t.astype(np.uint16) * 257).save(trimaps / "sixteen_bit.png")

    (images / "broken.png").write_bytes(b"this is not a PNG")
    Image.fromarray(t).save(trimaps / "broken.png")
    image(4).save(images / "wrong_size.png")
    Image.fromarray(np.zeros((W, H), np.uint8)).save(trimaps / "wrong_size.png")
    image(5).save(images / "no_trimap.png")

    image(6, 30, 20).save(root / "bg.png")
    rc, stdout, stderr = run("predict", images, "--trimap", trimaps, "--checkpoint", checkpoint,
                             "-o", out, "--rgba", "--background", root / "bg.png", "--save-routing",
                             "--16bit", "--no-tile")
    return rc, stdout, stderr, out


GOOD = ("rgba_trimap", "la_trimap", "sixteen_bit")


def test_folder_run_reports_each_failure_with_its_reason_and_fails_at_the_end(folder_run):
    rc, stdout, stderr, _ = folder_run
    assert rc == 1
    assert "failed: broken.png: " in stderr and "broken.png: not a readable image" in stderr
    assert ("failed: wrong_size.png: trimap " in stderr
            and "wrong_size.png is 40×56 (W×H) but image " in stderr and "is 56×40 (W×H)" in stderr)
    assert "failed: no_trimap.png: no trimap named no_trimap.* in " in stderr
    assert "3 of 6 images failed" in stderr
    assert "3 of 6 images matted into" in stdout


def test_folder_run_writes_every_output_of_the_good_files_and_nothing_else(folder_run):
    *_, out = folder_run
    expected = sorted(f"{stem}_{kind}.png" for stem in GOOD
                      for kind in ("alpha", "rgba", "composite", "routing"))
    assert sorted(p.name for p in out.iterdir()) == expected  # no temporary files either
    for stem in GOOD:
        assert Image.open(out / f"{stem}_rgba.png").mode == "RGBA"
        assert Image.open(out / f"{stem}_composite.png").size == (W, H)
        assert Image.open(out / f"{stem}_routing.png").size == (2 * W + 8, 2 * H + 8)


@pytest.mark.parametrize("stem", GOOD)
def test_rgba_la_and_16bit_trimaps_are_read_by_value_not_alpha(folder_run, stem):
    *_, out = folder_run
    alpha_png = Image.open(out / f"{stem}_alpha.png")
    assert alpha_png.mode == "I;16"  # --16bit
    alpha = np.asarray(alpha_png)
    assert (alpha[:, BG_COLS] == 0).all() and (alpha[:, FG_COLS] == 65535).all()
    assert ((alpha[:, 16:40] > 0) & (alpha[:, 16:40] < 65535)).mean() > 0.9


# ---------------------------------------------------------------------- predict, single files


def test_mask_gives_a_trimap_with_a_band_and_paths_are_printed(tmp_path, checkpoint):
    image(7).save(tmp_path / "dog.png")
    mask = np.zeros((H, W), np.uint8)
    mask[:, 28:] = 255
    Image.fromarray(mask).save(tmp_path / "dog_mask.png")
    rc, stdout, stderr = run("predict", tmp_path / "dog.png", "--mask", tmp_path / "dog_mask.png",
                             "--band", 4, "--checkpoint", checkpoint, "-o", tmp_path / "out")
    assert rc == 0, stderr
    assert stdout.split() == [str(tmp_path / "out" / "dog_alpha.png")]
    alpha = np.asarray(Image.open(tmp_path / "out" / "dog_alpha.png"))
    assert alpha.dtype == np.uint8  # 8-bit unless --16bit
    assert (alpha[:, :24] == 0).all() and (alpha[:, 32:] == 255).all()


def test_without_checkpoint_predict_and_eval_refuse_and_say_where_to_get_one(tmp_path):
    image().save(tmp_path / "a.png")
    Image.fromarray(trimap_values()).save(tmp_path / "t.png")
    for argv in (("predict", tmp_path / "a.png", "--trimap", tmp_path / "t.png"), ("eval", tmp_path)):
        rc, _, stderr = run(*argv)
        assert rc == 2
        assert "randomly initialised model would output noise" in stderr
        assert "https://github.com/linyiheng123/MEMatte" in stderr
        assert "nothing is downloaded" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "t.png"]


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path):
    image().save(tmp_path / "a.png")
    Image.fromarray(trimap_values()).save(tmp_path / "t.png")
    rc, _, stderr = run("predict", tmp_path / "a.png", "--trimap", tmp_path / "t.png",
                        "--checkpoint", tmp_path / "a.png")
    assert rc == 1
    assert "a.png' is not a PyTorch checkpoint" in stderr


def test_folder_input_needs_a_folder_of_trimaps(tmp_path, checkpoint):
    image().save(tmp_path / "a.png")
    rc, _, stderr = run("predict", tmp_path, "--trimap", tmp_path / "a.png", "--checkpoint", checkpoint)
    assert rc == 2
    assert "is a folder, so --trimap must be a folder too" in stderr


def test_help_documents_output_names_and_the_trimap_rule():
    rc, stdout, _ = run("predict", "--help")
    assert rc == 0
    for text in ("<stem>_alpha.png", "<stem>_rgba.png", "<stem>_composite.png", "<stem>_routing.png",
                 "up to 25% of full scale are background, from 75% foreground", "EXIF orientation is applied"):
        assert text in " ".join(stdout.split()), text


# ---------------------------------------------------------------------- eval


def test_eval_composition_1k_layout_prints_the_table_and_writes_csv(tmp_path, checkpoint):
    for d in ("merged", "trimaps", "alpha_copy"):
        (tmp_path / d).mkdir()
    image(8).save(tmp_path / "merged" / "x.png")
    Image.fromarray(trimap_values()).save(tmp_path / "trimaps" / "x.png")
    truth = np.zeros((H, W), np.uint8)
    truth[:, 28:] = 255
    Image.fromarray(truth).save(tmp_path / "alpha_copy" / "x.png")
    image(9).save(tmp_path / "merged" / "y.png")  # no trimap or alpha for this one
    Image.fromarray(trimap_values()).save(tmp_path / "trimaps" / "y.png")

    rc, stdout, stderr = run("eval", tmp_path, "--checkpoint", checkpoint, "--csv", tmp_path / "scores.csv",
                             "--no-tile")
    assert rc == 1
    assert "failed: y.png: no ground-truth alpha named y.* in" in stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("Composition-1k: 2 images")
    assert lines[1].split() == ["image", "SAD", "MSE", "Grad", "Conn", "time_s", "peak_MiB"]
    assert lines[2].split()[0] == "x.png" and lines[3].split()[0] == "mean"

    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["image"] for r in rows] == ["x.png", "mean"]
    x = rows[0]
    # a random model's alpha against a hard edge: clearly wrong, but finite
    assert 0 < float(x["sad"]) < H * 24 / 1000 and 0 < float(x["mse"]) <= 1000
    assert float(x["time_s"]) > 0 and float(x["peak_mem_mib"]) > 0
    assert {k: float(v) for k, v in rows[1].items() if k != "image"} == {
        k: float(v) for k, v in x.items() if k != "image"}


def test_eval_aim500_layout(tmp_path, checkpoint):
    for d in ("original", "trimap", "mask"):
        (tmp_path / d).mkdir()
    image(10).save(tmp_path / "original" / "z.jpg")
    Image.fromarray(trimap_values()).save(tmp_path / "trimap" / "z.png")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "mask" / "z.png")
    rc, stdout, stderr = run("eval", tmp_path, "--checkpoint", checkpoint, "--no-tile")
    assert rc == 0, stderr
    assert stdout.startswith("AIM-500: 1 images")


def test_eval_names_the_layouts_it_knows(tmp_path, checkpoint):
    rc, _, stderr = run("eval", tmp_path, "--checkpoint", checkpoint)
    assert rc == 2
    assert "no known benchmark layout" in stderr and "merged/" in stderr and "original/" in stderr


# ---------------------------------------------------------------------- info


def test_info_describes_a_training_checkpoint_with_a_teacher(tmp_path, checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    state["teacher_backbone.pos_embed"] = torch.zeros(1, 197, 384)
    torch.save({"model": state, "iteration": 100}, tmp_path / "train.pth")
    rc, stdout, _ = run("info", tmp_path / "train.pth")
    assert rc == 0
    assert 'format:      detectron2 checkpoint ({"model": state dict})' in stdout
    assert "teacher:     1 teacher_backbone.* tensors" in stdout
    assert "variant:     vit_s" in stdout
    assert "loads into:  FastMEMatte(vit_s)" in stdout
    assert "parameters:  29,192,965 (29,191,293 learned + 1,672 BatchNorm statistics)" in stdout  # as published


def test_info_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    image().save(tmp_path / "a.png")
    rc, _, stderr = run("info", tmp_path / "a.png")
    assert rc == 1
    assert "is not a PyTorch checkpoint" in stderr


# ---------------------------------------------------------------------- the installed command


def test_installed_console_script(tmp_path, checkpoint):
    image().save(tmp_path / "a.png")
    Image.fromarray(trimap_values()).save(tmp_path / "t.png")
    script = Path(sys.executable).with_name("mematte")
    done = subprocess.run(
        [script, "predict", tmp_path / "a.png", "--trimap", tmp_path / "t.png",
         "--checkpoint", checkpoint, "-o", tmp_path / "out", "--no-tile"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == tmp_path / "out" / "a_alpha.png"
    assert Image.open(tmp_path / "out" / "a_alpha.png").size == (W, H)


# ---------------------------------------------------------------------- start-up


def test_help_imports_neither_torch_nor_numpy():
    code = ("import sys; from mematte.cli import main; rc = main(['--help']); "
            "[main([c, '--help']) for c in ('predict', 'eval', 'info')]; "
            "print(rc, sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"


def test_the_parser_offers_what_the_model_takes():
    from mematte import api, cli, model
    from mematte_kernels import dispatch

    assert cli.BACKENDS == dispatch.BACKENDS
    assert cli.DTYPES == tuple(api.DTYPES)
    assert cli.DEFAULT_MAX_TOKENS == model.DEFAULT_MAX_TOKENS
