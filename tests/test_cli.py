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
    t[::3, 15] = 40  # ≤ 25 %: background
    t[::3, 16] = 100  # unknown
    t[::3, 40] = 200  # ≥ 75 %: foreground
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
        trimaps / "rgba_trimap.png"
    )
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
    rc, stdout, stderr = run(
        "predict",
        images,
        "--trimap",
        trimaps,
        "--checkpoint",
        checkpoint,
        "-o",
        out,
        "--rgba",
        "--background",
        root / "bg.png",
        "--save-routing",
        "--16bit",
        "--no-tile",
    )
    return rc, stdout, stderr, out


GOOD = ("rgba_trimap", "la_trimap", "sixteen_bit")


def test_folder_run_reports_each_failure_with_its_reason_and_fails_at_the_end(folder_run):
    rc, stdout, stderr, _ = folder_run
    assert rc == 1
    assert "failed: broken.png: " in stderr and "broken.png: not a readable image" in stderr
    assert (
        "failed: wrong_size.png: trimap " in stderr
        and "wrong_size.png is 40×56 (W×H) but image " in stderr
        and "is 56×40 (W×H)" in stderr
    )
    assert "failed: no_trimap.png: no trimap named no_trimap.* in " in stderr
    assert "3 of 6 images failed" in stderr
    assert "3 of 6 images matted into" in stdout


def test_folder_run_writes_every_output_of_the_good_files_and_nothing_else(folder_run):
    *_, out = folder_run
    expected = sorted(f"{stem}_{kind}.png" for stem in GOOD for kind in ("alpha", "rgba", "composite", "routing"))
    assert sorted(p.name for p in out.iterdir()) == expected  # no temporary files either
    for stem in GOOD:
        assert Image.open(out / f"{stem}_rgba.png").mode == "RGBA"
        assert Image.open(out / f"{stem}_composite.png").size == (W, H)
        routing = Image.open(out / f"{stem}_routing.png")
        assert routing.width >= 2 * W + 8 and routing.height >= 2 * H + 8


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
    rc, stdout, stderr = run(
        "predict",
        tmp_path / "dog.png",
        "--mask",
        tmp_path / "dog_mask.png",
        "--band",
        4,
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "out",
    )
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
    rc, _, stderr = run(
        "predict", tmp_path / "a.png", "--trimap", tmp_path / "t.png", "--checkpoint", tmp_path / "a.png"
    )
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
    for text in (
        "<stem>_alpha.png",
        "<stem>_rgba.png",
        "<stem>_composite.png",
        "<stem>_routing.png",
        "up to 25% of full scale are background, from 75% foreground",
        "EXIF orientation is applied",
    ):
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

    rc, stdout, stderr = run(
        "eval", tmp_path, "--checkpoint", checkpoint, "--csv", tmp_path / "scores.csv", "--no-tile"
    )
    assert rc == 1
    assert "failed: y.png: no ground-truth alpha named y.* in" in stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("Composition-1k: 2 images")
    assert lines[1].split() == ["image", "SAD÷1000", "MSE×1000", "Grad÷1000", "Conn÷1000", "time_s", "peak_MiB"]
    assert lines[2].split()[0] == "x.png" and lines[3].split()[0] == "mean"
    assert lines[4] == "mean of 1 of 2 images; 1 failed and are not in it"

    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["image"] for r in rows] == ["x.png", "mean"]
    x = rows[0]
    # a random model's alpha against a hard edge: clearly wrong, but finite
    assert 0 < float(x["sad_div1000"]) < H * 24 / 1000 and 0 < float(x["mse_x1000"]) <= 1000
    assert float(x["time_s"]) > 0 and float(x["peak_mem_mib"]) > 0
    assert {k: float(v) for k, v in rows[1].items() if k != "image"} == {
        k: float(v) for k, v in x.items() if k != "image"
    }


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
        [
            script,
            "predict",
            tmp_path / "a.png",
            "--trimap",
            tmp_path / "t.png",
            "--checkpoint",
            checkpoint,
            "-o",
            tmp_path / "out",
            "--no-tile",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == tmp_path / "out" / "a_alpha.png"
    assert Image.open(tmp_path / "out" / "a_alpha.png").size == (W, H)


# ---------------------------------------------------------------------- start-up


def test_help_imports_neither_torch_nor_numpy():
    code = (
        "import sys; from mematte.cli import main; rc = main(['--help']); "
        "[main([c, '--help']) for c in ('predict', 'eval', 'info')]; "
        "print(rc, sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"


def test_the_parser_offers_what_the_model_takes():
    from mematte import cli, io, model, precision
    from mematte_kernels import dispatch

    assert cli.BACKENDS == dispatch.BACKENDS
    assert cli.DTYPES == ("auto", *precision.DTYPES)
    assert cli.DEFAULT_MAX_TOKENS == model.DEFAULT_MAX_TOKENS
    assert cli.MAX_TOKENS_LIMIT == model.MAX_TOKENS_LIMIT
    assert cli.MAX_PIXELS == io.MAX_PIXELS


# ---------------------------------------------------------------------- refused before any work


def single(tmp_path, seed=0):
    image(seed).save(tmp_path / "a.png")
    Image.fromarray(trimap_values()).save(tmp_path / "t.png")
    return tmp_path / "a.png", tmp_path / "t.png"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--max-tokens", "99999999999999999999"), "must be ≤ 2,147,483,647"),
        (("--max-tokens", "-1"), "must be ≥ 0"),
        (("--max-tokens", "2.5"), "'2.5' is not a whole number of tokens"),
        (("--band", "0"), "must be ≥ 1"),
        (("--device", "meta"), "device 'meta' cannot run the model"),
        (("--device", "cpu", "--dtype", "float16"), "float16 is for GPUs"),
    ],
    ids=["huge-max-tokens", "negative-max-tokens", "float-max-tokens", "zero-band", "meta-device", "fp16-cpu"],
)
def test_options_that_cannot_work_are_usage_errors_before_the_model_loads(tmp_path, checkpoint, extra, message):
    img, tri = single(tmp_path)
    rc, stdout, stderr = run(
        "predict", img, "--trimap", tri, "--checkpoint", checkpoint, "-o", tmp_path / "out", *extra
    )
    assert rc == 2
    assert message in stderr
    assert "mematte: FastMEMatte(vit_s) on" not in stderr  # the model never loaded
    assert not (tmp_path / "out").exists()


def test_gpu_backends_on_a_cpu_are_refused_up_front(tmp_path, checkpoint):
    img, tri = single(tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mematte",
            "predict",
            img,
            "--trimap",
            tri,
            "--checkpoint",
            checkpoint,
            "--device",
            "cpu",
            "--backend",
            "triton",
            "-o",
            tmp_path / "out",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "backend 'triton' runs Triton kernels, which need CUDA tensors" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_output_folder_is_checked_before_any_work(tmp_path, checkpoint, where):
    img, tri = single(tmp_path)
    out = tmp_path / "a.png" / "out" if where == "under-a-file" else Path("/proc/mematte-out")
    rc, stdout, stderr = run("predict", img, "--trimap", tri, "--checkpoint", checkpoint, "-o", out)
    assert rc == 2
    assert ("a.png is a file, not a folder" if where == "under-a-file" else "cannot write in /proc") in stderr
    assert "mematte: FastMEMatte(vit_s) on" not in stderr


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "under-a-file"])
def test_eval_csv_is_checked_before_any_work(tmp_path, checkpoint, where):
    for d in ("merged", "trimaps", "alpha_copy"):
        (tmp_path / d).mkdir()
    image(8).save(tmp_path / "merged" / "x.png")
    Image.fromarray(trimap_values()).save(tmp_path / "trimaps" / "x.png")
    Image.fromarray(trimap_values()).save(tmp_path / "alpha_copy" / "x.png")
    target = {
        "missing-folder": tmp_path / "nope" / "s.csv",
        "a-folder": tmp_path / "merged",
        "under-a-file": tmp_path / "merged" / "x.png" / "s.csv",
    }[where]
    rc, stdout, stderr = run("eval", tmp_path, "--checkpoint", checkpoint, "--csv", target)
    assert rc == 2
    assert {
        "missing-folder": "nope does not exist",
        "a-folder": "is a folder; give a file name",
        "under-a-file": "x.png is a file",
    }[where] in stderr
    assert stdout == ""  # no table: nothing was evaluated


def test_help_documents_exit_codes_and_the_default_dtype():
    for command in ((), ("predict",), ("eval",), ("info",)):
        rc, stdout, _ = run(*command, "--help")
        assert rc == 0
        text = " ".join(stdout.split())
        assert "exit status: 0 all done, 1 some images failed, 2 usage error" in text
        assert "130 interrupted (Ctrl-C or SIGTERM" in text
    rc, stdout, _ = run("predict", "--help")
    assert "auto: bfloat16 on CPUs with AVX512-BF16" in " ".join(stdout.split())


# ---------------------------------------------------------------------- running


def test_the_run_is_described_once_and_max_tokens_0_means_no_cap(tmp_path, checkpoint):
    from mematte_kernels import ext

    img, tri = single(tmp_path)
    rc, _, stderr = run(
        "predict",
        img,
        "--trimap",
        tri,
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "out",
        "--max-tokens",
        0,
        "--no-tile",
    )
    assert rc == 0, stderr
    dtype = "bfloat16" if ext.cpu_bf16_kernels() else "float32"
    assert stderr.count("mematte: FastMEMatte(vit_s) on cpu") == 1
    assert f"mematte: FastMEMatte(vit_s) on cpu, {dtype}, backend cpu" in stderr and stderr.rstrip().endswith("no cap")


def test_progress_inside_a_long_image(tmp_path, checkpoint, monkeypatch):
    from mematte import commands

    monkeypatch.setattr(commands, "PROGRESS_AFTER_S", 0.0)  # every image counts as long here
    img, tri = single(tmp_path)
    rc, _, stderr = run("predict", img, "--trimap", tri, "--checkpoint", checkpoint, "-o", tmp_path / "out")
    assert rc == 0, stderr
    assert "a.png: backbone" in stderr and "/12 [" in stderr
    assert "a.png: decoder" in stderr


def test_a_degenerate_trimap_is_warned_about_once_per_image(tmp_path, checkpoint):
    img, _ = single(tmp_path)
    hard = np.where(trimap_values() > 128, 255, 0).astype(np.uint8)
    Image.fromarray(hard).save(tmp_path / "hard.png")
    rc, _, stderr = run(
        "predict",
        img,
        "--trimap",
        tmp_path / "hard.png",
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "out",
        "--no-tile",
    )
    assert rc == 0, stderr
    assert stderr.count("has no unknown region") == 1
    assert "warning: a.png: trimap of" in stderr


def test_a_colour_palette_trimap_fails_with_the_reason(tmp_path, checkpoint):
    img, _ = single(tmp_path)
    palette = Image.fromarray((trimap_values() // 128).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 255, 255, 255])
    palette.save(tmp_path / "p.png")
    rc, _, stderr = run(
        "predict", img, "--trimap", tmp_path / "p.png", "--checkpoint", checkpoint, "-o", tmp_path / "out"
    )
    assert rc == 1
    assert "p.png: a palette image with colours" in stderr
    assert not (tmp_path / "out").exists()


def test_images_over_max_pixels_fail_naming_the_flag(tmp_path, checkpoint):
    img, tri = single(tmp_path)
    rc, _, stderr = run(
        "predict", img, "--trimap", tri, "--checkpoint", checkpoint, "-o", tmp_path / "out", "--max-pixels", 1000
    )
    assert rc == 1
    assert "over the limit of 0 megapixels" in stderr and "--max-pixels 2240" in stderr


def test_a_checkpoint_with_nan_is_refused_by_info_and_predict(tmp_path, checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    state["backbone.blocks.5.attn.proj.weight"][0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    rc, stdout, stderr = run("info", tmp_path / "nan.pth")
    assert rc == 1
    assert "non-finite weights: backbone.blocks.5.attn.proj.weight has 1 NaN" in stderr
    img, tri = single(tmp_path)
    rc, _, stderr = run("predict", img, "--trimap", tri, "--checkpoint", tmp_path / "nan.pth", "-o", tmp_path / "out")
    assert rc == 1 and "non-finite weights" in stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_info_names_wrappers_and_the_module_prefix(tmp_path, checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, tmp_path / "ddp.pth")
    rc, stdout, stderr = run("info", tmp_path / "ddp.pth")
    assert rc == 0, stderr
    assert (
        'format:      checkpoint wrapping a state dict under "state_dict", keys prefixed '
        "'module.' (DataParallel; stripped)"
    ) in stdout
    assert "loads into:  FastMEMatte(vit_s)" in stdout


# ---------------------------------------------------------------------- batches: resume, reruns


def small_folder(root, n=3):
    images, trimaps = root / "images", root / "trimaps"
    images.mkdir()
    trimaps.mkdir()
    for i in range(n):
        image(20 + i).save(images / f"img{i}.png")
        Image.fromarray(trimap_values()).save(trimaps / f"img{i}.png")
    return images, trimaps


def test_skip_existing_resumes_a_batch_and_redoes_incomplete_sets(tmp_path, checkpoint):
    images, trimaps = small_folder(tmp_path)
    out = tmp_path / "out"
    argv = ("predict", images, "--trimap", trimaps, "--checkpoint", checkpoint, "-o", out, "--rgba", "--no-tile")
    assert run(*argv)[0] == 0
    (out / "img1_rgba.png").unlink()  # as if that image had been cut short
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, stdout, stderr = run(*argv, "--skip-existing")
    assert rc == 0, stderr
    assert "1 of 3 images matted into" in stdout and "(2 skipped: their outputs exist)" in stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(after) == sorted(f"img{i}_{k}.png" for i in range(3) for k in ("alpha", "rgba"))
    assert all(after[n] == before[n] for n in before if n.startswith(("img0", "img2")))
    assert after["img1_alpha.png"] != before["img1_alpha.png"]


def test_a_rerun_into_the_input_folder_skips_its_own_outputs(tmp_path, checkpoint):
    images, trimaps = small_folder(tmp_path, n=2)
    argv = ("predict", images, "--trimap", trimaps, "--checkpoint", checkpoint, "-o", images, "--rgba", "--no-tile")
    assert run(*argv)[0] == 0
    rc, stdout, stderr = run(*argv)
    assert rc == 0, stderr
    assert "skipping 4 files that are outputs of mematte predict" in stderr
    assert "2 of 2 images matted" in stdout


def test_sigterm_during_a_batch_leaves_only_complete_sets(tmp_path, checkpoint):
    import os
    import signal
    import time

    images, trimaps = small_folder(tmp_path, n=12)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mematte",
            "predict",
            images,
            "--trimap",
            trimaps,
            "--checkpoint",
            checkpoint,
            "-o",
            out,
            "--rgba",
            "--save-routing",
            "--no-tile",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(out.glob("*_alpha.png"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "terminated" in stderr
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporary files
    done = {n.split("_")[0] for n in names}
    assert 1 <= len(done) < 12
    assert names == sorted(f"{stem}_{kind}.png" for stem in done for kind in ("alpha", "rgba", "routing"))
