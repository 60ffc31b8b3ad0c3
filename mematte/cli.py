"""The ``mematte`` command: predict, eval and info (``mematte --help``)."""
from __future__ import annotations

import argparse
import csv
import io as stdio
import resource
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mematte_kernels.dispatch import BACKENDS

from . import api, io, metrics
from .checkpoint import IGNORED_PREFIXES, infer_variant, load_checkpoint_state_dict
from .model import DEFAULT_MAX_TOKENS, FastMEMatte

EXIT_FAILED = 1  # the work failed, or some inputs did
EXIT_USAGE = 2   # the command line was refused before any work

MAIN_EPILOG = """\
examples:
  mematte predict photo.jpg --trimap photo_trimap.png --checkpoint MEMatte_ViTS_DIM.pth
  mematte predict photos/ --mask masks/ --rgba -o cutouts/ --checkpoint MEMatte_ViTS_DIM.pth
  mematte eval Composition-1k-test/ --checkpoint MEMatte_ViTS_DIM.pth --csv scores.csv
  mematte info MEMatte_ViTS_DIM.pth

Checkpoints come from the MEMatte authors' release, https://github.com/linyiheng123/MEMatte;
nothing is downloaded automatically.
"""

PREDICT_EPILOG = """\
outputs, in OUT for each image <stem>.<ext>:
  <stem>_alpha.png      alpha matte, 8-bit grey (16-bit with --16bit)
  <stem>_rgba.png       with --rgba: cutout, estimated foreground colours + alpha (8-bit)
  <stem>_composite.png  with --background: the cutout over BG, scaled to cover the image
  <stem>_routing.png    with --save-routing: tokens each global block (2, 5, 8, 11) sent to
                        global attention (tinted) or to the light module (dimmed)
Files are written atomically: a file is either complete or absent.

Folders: every image in INPUT is paired with the file of the same stem in the trimap or
mask folder. A file that fails is reported on stderr and skipped; the exit status is 1 if
any failed, 2 if the command line was refused.

Trimaps: values up to 25% of full scale are background, from 75% foreground, anything
between unknown (0.5). 8- or 16-bit, grey or colour (luminance); the alpha channel of an
RGBA or LA file is never read. Masks are read the same way. EXIF orientation is applied
to every file, so pixels are matted as a viewer shows them.
"""

EVAL_EPILOG = """\
layouts (files paired by stem):
  Composition-1k style:  DATASET/merged/  DATASET/trimaps/  DATASET/alpha_copy/
  AIM-500:               DATASET/original/  DATASET/trimap/  DATASET/mask/

SAD, Grad and Conn are printed ÷1000 and MSE ×1000, over the trimap's unknown region, as
papers report them; maps are divided by 255 (not min-max normalised), and the prediction
is rounded to 8 bits first, as the published protocol scores saved PNGs. time: the model
call alone; peak memory: max allocated on a GPU, on a CPU the process's peak resident size
so far.
"""

LAYOUTS = {
    "Composition-1k": ("merged", "trimaps", "alpha_copy"),
    "AIM-500": ("original", "trimap", "mask"),
}


class UsageError(Exception):
    """The command line cannot work; reported with exit status 2 before any work."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except UsageError as e:
        print(f"mematte {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mematte",
        description="MEMatte image matting: alpha mattes, cutouts and benchmark scores.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict", help="matte an image or a folder of images",
        description="Matte an image or every image of a folder, given trimaps or coarse masks.",
        epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="an image, or a folder of images")
    guide = p.add_mutually_exclusive_group(required=True)
    guide.add_argument("--trimap", type=Path, metavar="T",
                       help="the trimap, or a folder of trimaps named like the images")
    guide.add_argument("--mask", type=Path, metavar="M",
                       help="a coarse mask (foreground ≥ 50%%) or a folder of them; the "
                            "trimap is made by eroding and dilating it by --band")
    p.add_argument("--band", type=int, default=10, metavar="PX",
                   help="with --mask: pixels within PX of the mask edge, on either side, "
                        "become unknown (default: %(default)s)")
    p.add_argument("-o", "--output", type=Path, default=Path("."), metavar="OUT",
                   help="folder for the outputs, created if needed (default: current folder)")
    p.add_argument("--16bit", dest="bits", action="store_const", const=16, default=8,
                   help="write the alpha as a 16-bit PNG")
    p.add_argument("--rgba", action="store_true",
                   help="also write the cutout with estimated foreground colours")
    p.add_argument("--background", type=Path, metavar="BG",
                   help="also write a composite over this image")
    p.add_argument("--save-routing", action="store_true",
                   help="also write the routing picture of the four global blocks")
    _model_options(p)
    p.set_defaults(run=run_predict)

    e = sub.add_parser(
        "eval", help="score a checkpoint on a benchmark folder",
        description="Score a checkpoint on a matting benchmark: SAD, MSE, Grad, Conn, time "
                    "and peak memory per image, and their mean.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("dataset", metavar="DATASET", type=Path, help="the benchmark folder")
    e.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write the table as CSV")
    _model_options(e)
    e.set_defaults(run=run_eval)

    i = sub.add_parser(
        "info", help="describe a checkpoint file",
        description="Describe a checkpoint: its format, variant, parameter count, what it "
                    "loads into, and whether it holds a training-time teacher.",
    )
    i.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    i.set_defaults(run=run_info)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=Path, metavar="CKPT",
                   help="MEMatte checkpoint (.pth or .safetensors) from the authors' release, "
                        "https://github.com/linyiheng123/MEMatte (required)")
    g.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--dtype", choices=list(api.DTYPES), default="float32",
                   help="compute dtype (default: %(default)s)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernel implementation (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="most tokens per image sent to global attention; 0: no cap "
                        "(default: %(default)s)")
    g.add_argument("--tile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode in tiles, as published (default: on; whole-image decoding with --no-tile)")


def _require_checkpoint(args: argparse.Namespace) -> None:
    # checked before anything else: without a checkpoint nothing else is worth reporting
    if args.checkpoint is None:
        raise UsageError(f"{api.NO_CHECKPOINT} Pass one with --checkpoint PATH.")


def _load_model(args: argparse.Namespace) -> FastMEMatte:
    """The model the options ask for (options that cannot work exit with status 2)."""
    if not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {args.checkpoint}: no such file")
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be ≥ 0, got {args.max_tokens}")
    try:
        api.resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return api.load_model(args.checkpoint, device=args.device, dtype=args.dtype,
                          backend=args.backend, max_tokens=args.max_tokens or None)


def _fail(name: str, error: BaseException) -> None:
    tqdm.write(f"failed: {name}: {error}", file=sys.stderr)


# Per-file errors: bad or missing files, bad values, and running out of memory on one
# large image. Anything else is a bug and stops the run.
FILE_ERRORS = (OSError, ValueError, MemoryError, torch.OutOfMemoryError)


# ---------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    _require_checkpoint(args)
    if args.band < 1:
        raise UsageError(f"--band must be ≥ 1 pixel, got {args.band}")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"-o {args.output} is a file; it must be a folder")
    guide, guide_path = ("mask", args.mask) if args.mask is not None else ("trimap", args.trimap)
    jobs = _pair_inputs(args.input, guide_path, guide)
    model = _load_or_report(args)
    if model is None:
        return EXIT_FAILED
    background = None
    if args.background is not None:
        try:
            background = io.read_image(args.background)
        except FILE_ERRORS as e:
            print(f"mematte predict: error: background: {e}", file=sys.stderr)
            return EXIT_FAILED

    failed = 0
    progress = tqdm(jobs, unit="image", disable=len(jobs) < 2, file=sys.stderr)
    for image_path, guide_file in progress:
        progress.set_postfix_str(image_path.name, refresh=False)
        try:
            if isinstance(guide_file, Exception):
                raise guide_file
            result = api.predict_file(
                image_path,
                trimap_path=guide_file if guide == "trimap" else None,
                mask_path=guide_file if guide == "mask" else None,
                band=args.band, model=model,
                out_dir=args.output, rgba=args.rgba, background=background,
                save_routing=args.save_routing, bits=args.bits, tile=args.tile,
            )
        except FILE_ERRORS as e:
            failed += 1
            _fail(image_path.name, e)
            _release_gpu_memory(e)
            continue
        if len(jobs) == 1:
            for path in result.written.values():
                print(path)
    if len(jobs) > 1:
        print(f"{len(jobs) - failed} of {len(jobs)} images matted into {args.output}")
    if failed:
        print(f"mematte predict: {failed} of {len(jobs)} images failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _pair_inputs(inp: Path, guide: Path, what: str) -> list[tuple[Path, Path | Exception]]:
    """(image, trimap or mask) per image; a pairing problem is kept as that file's error."""
    if not inp.exists():
        raise UsageError(f"{inp}: no such file or folder")
    if not guide.exists():
        raise UsageError(f"--{what} {guide}: no such file or folder")
    if not inp.is_dir():
        if not guide.is_dir():
            return [(inp, guide)]
        return [(inp, _lookup(io.index_by_stem(guide), inp.stem, guide, what))]
    if not guide.is_dir():
        raise UsageError(f"INPUT {inp} is a folder, so --{what} must be a folder too")
    images = io.find_images(inp)
    if not images:
        raise UsageError(f"no images ({', '.join(io.IMAGE_SUFFIXES)}) in {inp}")
    stems = [p.stem for p in images]
    index = io.index_by_stem(guide)
    jobs: list[tuple[Path, Path | Exception]] = []
    for image in images:
        if stems.count(image.stem) > 1:
            jobs.append((image, ValueError(
                f"several images named {image.stem}.* in {inp}; their outputs would collide")))
        else:
            jobs.append((image, _lookup(index, image.stem, guide, what)))
    return jobs


def _lookup(index, stem: str, folder: Path, what: str) -> Path | Exception:
    try:
        return io.lookup_stem(index, stem, folder, what=what)
    except (FileNotFoundError, ValueError) as e:
        return e


def _load_or_report(args: argparse.Namespace) -> FastMEMatte | None:
    try:
        return _load_model(args)
    except FILE_ERRORS as e:
        print(f"mematte {args.command}: error: {e}", file=sys.stderr)
        return None


def _release_gpu_memory(error: BaseException) -> None:
    # after running out of GPU memory on one image, the next one should start clean
    if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- eval


COLUMNS = ("image", "sad", "mse", "grad", "conn", "time_s", "peak_mem_mib")  # CSV header
HEADINGS = ("image", "SAD", "MSE", "Grad", "Conn", "time_s", "peak_MiB")  # printed table


def run_eval(args: argparse.Namespace) -> int:
    _require_checkpoint(args)
    layout, folders = _find_layout(args.dataset)
    jobs = _dataset_items(folders)
    model = _load_or_report(args)
    if model is None:
        return EXIT_FAILED
    device = model.pixel_mean.device
    _warm_up(model, args.tile)

    print(f"{layout}: {len(jobs)} images in {args.dataset}")
    print(_row_text(HEADINGS))
    rows, failed = [], 0
    progress = tqdm(jobs, unit="image", disable=len(jobs) < 2, file=sys.stderr)
    for name, paths in progress:
        progress.set_postfix_str(name, refresh=False)
        try:
            if isinstance(paths, Exception):
                raise paths
            row = _score(model, device, *paths, tile=args.tile)
        except FILE_ERRORS as e:
            failed += 1
            _fail(name, e)
            _release_gpu_memory(e)
            continue
        rows.append({"image": name, **row})
        tqdm.write(_row_text([rows[-1][c] for c in COLUMNS]))
    if rows:
        mean = {"image": "mean", **{c: float(np.mean([r[c] for r in rows])) for c in COLUMNS[1:]}}
        print(_row_text([mean[c] for c in COLUMNS]))
        if args.csv is not None:
            _write_csv(args.csv, rows + [mean])
    if failed:
        print(f"mematte eval: {failed} of {len(jobs)} images failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _find_layout(dataset: Path) -> tuple[str, tuple[Path, Path, Path]]:
    if not dataset.is_dir():
        raise UsageError(f"{dataset}: no such folder")
    for layout, names in LAYOUTS.items():
        folders = tuple(dataset / n for n in names)
        if all(f.is_dir() for f in folders):
            return layout, folders
    known = "; ".join(f"{k}: {', '.join(n + '/' for n in v)}" for k, v in LAYOUTS.items())
    raise UsageError(f"{dataset} has no known benchmark layout ({known})")


def _dataset_items(folders: tuple[Path, Path, Path]) -> list[tuple[str, tuple[Path, ...] | Exception]]:
    images_dir, trimaps_dir, alphas_dir = folders
    images = io.find_images(images_dir)
    if not images:
        raise UsageError(f"no images in {images_dir}")
    trimaps, alphas = io.index_by_stem(trimaps_dir), io.index_by_stem(alphas_dir)
    items = []
    for image in images:
        try:
            trimap = io.lookup_stem(trimaps, image.stem, trimaps_dir, what="trimap")
            alpha = io.lookup_stem(alphas, image.stem, alphas_dir, what="ground-truth alpha")
            items.append((image.name, (image, trimap, alpha)))
        except (FileNotFoundError, ValueError) as e:
            items.append((image.name, e))
    return items


def _warm_up(model: FastMEMatte, tile: bool) -> None:
    """One small untimed call, so the first image's time excludes one-off start-up costs
    (kernel compilation, library initialisation)."""
    api.matte(model, np.zeros((64, 64, 3), np.float32), np.full((64, 64), 128, np.uint8), tile=tile)


def _score(model: FastMEMatte, device: torch.device, image_path: Path, trimap_path: Path,
           alpha_path: Path, *, tile: bool) -> dict[str, float]:
    image, trimap = api.read_pair(image_path, trimap_path)
    truth = io.read_gray(alpha_path)
    if truth.shape != trimap.shape:
        raise ValueError(f"ground truth {alpha_path} is {io.size_text(truth.shape)} (W×H) but "
                         f"image {image_path} is {io.size_text(image.shape)} (W×H)")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    alpha, _ = api.matte(model, image, trimap, tile=tile)  # returns on the CPU: synchronised
    seconds = time.perf_counter() - start
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    scores = metrics.evaluate(np.rint(alpha * 255.0) / 255.0, truth, trimap)
    return {**scores, "time_s": seconds, "peak_mem_mib": peak}


def _row_text(values) -> str:
    cells = []
    for column, v in zip(COLUMNS, values):
        if isinstance(v, str):
            cells.append(f"{v:<24.24}" if column == "image" else f"{v:>12}")
        elif column == "peak_mem_mib":
            cells.append(f"{v:>12.0f}")
        else:
            cells.append(f"{v:>12.3f}" if column == "time_s" else f"{v:>12.2f}")
    return " ".join(cells)


def _write_csv(path: Path, rows: list[dict]) -> None:
    text = stdio.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    io.write_atomic(path, lambda f: f.write(text.getvalue().encode()))


# ---------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    path = args.checkpoint
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        state_dict = load_checkpoint_state_dict(path)
        container, keys = _container(path)
    except ValueError as e:
        print(f"mematte info: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    teacher = sum(k.startswith(IGNORED_PREFIXES) for k in keys)
    print(f"file:        {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"format:      {container}")
    print(f"tensors:     {len(keys)}")
    print("teacher:     " + (f"{teacher} teacher_backbone.* tensors (training-time "
                              "distillation teacher; ignored)" if teacher else "none"))
    try:
        variant = infer_variant(state_dict)
        print(f"variant:     {variant}")
        model = FastMEMatte.from_checkpoint(state_dict)
    except ValueError as e:
        print(f"loads into:  nothing: {e}")
        return EXIT_FAILED
    learned = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() for t in model.state_dict().values())
    # Papers count the state dict, BatchNorm statistics included.
    print(f"parameters:  {stored:,} ({learned:,} learned + {stored - learned:,} BatchNorm statistics)")
    print(f"loads into:  FastMEMatte({variant})")
    return 0


def _container(path: Path) -> tuple[str, list[str]]:
    """How the file stores its tensors, and all its keys (teacher included)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # reads the header only
            return "safetensors", list(f.keys())
    # The file was fully read once already; memory-map it this time (only the zip
    # format, torch.save's default since 1.6, can be mapped).
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return 'detectron2 checkpoint ({"model": state dict})', list(obj["model"])
    return "bare state dict", list(obj)
