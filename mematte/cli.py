"""The ``mematte`` command (``mematte --help``).

This module only builds the argument parser: ``mematte --help`` and usage errors must not
wait for torch to import. Each subcommand is registered in :data:`COMMANDS` as the
``"module:function"`` that adds its parser; that function sets ``run`` to the
``"module:function"`` that does the work, imported only when the command runs. A module
that adds a subcommand is imported by ``mematte --help``, so it (and its package's
``__init__``) must not import torch or numpy at module level.

Exit status: 0 all done, 1 some inputs (or the whole run) failed, 2 the command line was
refused before any work, 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed, or some inputs did
EXIT_USAGE = 2  # the command line was refused before any work
EXIT_INTERRUPTED = 130

# Subcommands in the order --help lists them: the "module:function" that adds each parser.
COMMANDS = (
    "mematte.cli:add_predict",
    "mematte.cli:add_eval",
    "mematte.cli:add_info",
    "mematte.cli:add_export",
    "mematte.serve.command:add_parser",
    "mematte.train.command:add_parser",
)

# The choices the model options offer. They mirror mematte_kernels.dispatch.BACKENDS and
# mematte.precision.DTYPES / mematte.model.DEFAULT_MAX_TOKENS (tests check that they agree),
# spelled out here so that building the parser imports no torch.
BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_TOKENS = 18500
MAX_TOKENS_LIMIT = 2**31 - 1  # mematte.model.MAX_TOKENS_LIMIT
MAX_PIXELS = 178_956_970  # mematte.io.MAX_PIXELS: Pillow's decompression-bomb limit

EXIT_CODES_TEXT = """\
exit status: 0 all done, 1 some images failed, 2 usage error (nothing was done),
130 interrupted (Ctrl-C or SIGTERM; no output is left half-written)."""

MAIN_EPILOG = f"""\
examples:
  mematte predict photo.jpg --trimap photo_trimap.png --checkpoint MEMatte_ViTS_DIM.pth
  mematte predict photos/ --mask masks/ --rgba -o cutouts/ --checkpoint MEMatte_ViTS_DIM.pth
  mematte eval Composition-1k-test/ --checkpoint MEMatte_ViTS_DIM.pth --csv scores.csv
  mematte info MEMatte_ViTS_DIM.pth

Checkpoints come from the MEMatte authors' release, https://github.com/linyiheng123/MEMatte;
nothing is downloaded automatically.

{EXIT_CODES_TEXT}
"""

PREDICT_EPILOG = f"""\
outputs, in OUT for each image <stem>.<ext>:
  <stem>_alpha.png      alpha matte, 8-bit grey (16-bit with --16bit)
  <stem>_rgba.png       with --rgba: cutout, estimated foreground colours + alpha (8-bit)
  <stem>_composite.png  with --background: the cutout over BG, scaled to cover the image
  <stem>_routing.png    with --save-routing: tokens each global block (2, 5, 8, 11) sent to
                        global attention (tinted) or to the light module (dimmed)
  <stem>_trimap.png     with --mask --save-trimap: the trimap built from the mask (0/128/255)
An image's outputs are written as a set: all complete, or none of them (a failure, Ctrl-C
or SIGTERM leaves no partial set and no temporary file). With --skip-existing an image
whose outputs all exist is skipped, so an interrupted batch resumes where it stopped.

Folders: every image x.* in INPUT is paired with the file x.* or x_trimap.* (x_mask.* with
--mask) in the trimap or mask folder, which may be INPUT itself; files named like this
command's outputs of an image in the same folder (x_alpha.png beside x.jpg) are skipped.
A file that fails is reported on stderr and skipped; a folder where no image has a trimap
or mask is a usage error. Every output location is checked before any work.

Trimaps: a trimap marks each pixel background, foreground or unknown (the band to matte).
A file holding exactly the values 0, 1 and 2 is read as class ids (background, unknown,
foreground); otherwise values up to 25% of full scale are background, from 75%
foreground, anything between unknown (0.5). 8- or 16-bit, grey or colour (luminance), grey palettes; the alpha channel
of an RGBA or LA file is never read. Masks are read the same way. EXIF orientation is
applied to every file, so pixels are matted as a viewer shows them. A trimap with no
unknown pixel, or nothing but unknown pixels, gets a warning, and so does one that does not
look like a trimap (colour, or many greys far from 0, 128 and 255: image and trimap swapped?).

Running: the device, dtype and backend are printed once on stderr; an image that takes
more than a couple of seconds shows its progress (backbone blocks, decoder tiles).
--dtype auto is bfloat16 on CPUs with AVX512-BF16 running the CPU fast path (whose bf16
kernels are tested against fp32), float16 on GPUs without bf16 (compute capability below
8.0, e.g. a GeForce 2080 Ti), float32 everywhere else. float32 runs with TF32 off unless
--allow-tf32 is given (faster on Ampere and later GPUs, errors of order 1e-4 to 1e-3 on alpha).

Several GPUs or machines: torchrun --nproc-per-node N -m mematte predict DIR ...; process r
takes images r, r+N, ... of the sorted folder, on the GPU of its local rank (or the CPU).

{EXIT_CODES_TEXT}
"""

EVAL_EPILOG = f"""\
layouts (files paired by stem):
  Composition-1k style:  DATASET/merged/  DATASET/trimaps/  DATASET/alpha_copy/
  AIM-500:               DATASET/original/  DATASET/trimap/  DATASET/mask/

SAD, Grad and Conn are printed ÷1000 and MSE ×1000 (the table and CSV headers say so:
SAD÷1000 / sad_div1000, MSE×1000 / mse_x1000), over the trimap's unknown region, as
papers report them; maps are divided by 255 (not min-max normalised), and the prediction
is rounded to 8 bits first, as the published protocol scores saved PNGs. time: the model
call alone; peak memory: max allocated on a GPU, on a CPU the process's peak resident size
so far.

Several GPUs or machines: torchrun --nproc-per-node N -m mematte eval DATASET ...; the
images are shared among the processes, and rank 0 prints the scores of every image.

{EXIT_CODES_TEXT}
"""


class UsageError(Exception):
    """The command line cannot work; reported with exit status 2 before any work."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: every cleanup that runs on Ctrl-C runs."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _resolve(args.run)(args)
    except UsageError as e:
        print(f"mematte {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mematte",
        description="MEMatte image matting: alpha mattes, cutouts and benchmark scores.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mematte {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for target in COMMANDS:
        _resolve(target)(sub)
    return parser


def _version() -> str:
    """The installed package's version (from its metadata: no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mematte-kernels")
    except PackageNotFoundError:
        return "(not installed)"


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------- the subcommands


def add_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="matte an image or a folder of images",
        description="Matte an image or every image of a folder, given trimaps or coarse masks.",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="an image, or a folder of images")
    guide = p.add_mutually_exclusive_group(required=True)
    guide.add_argument(
        "--trimap", type=Path, metavar="T", help="the trimap, or a folder of trimaps named like the images"
    )
    guide.add_argument(
        "--mask",
        type=Path,
        metavar="M",
        help="a coarse mask (foreground ≥ 50%%) or a folder of them; the "
        "trimap is made by eroding and dilating it by --band",
    )
    p.add_argument(
        "--band",
        type=_whole(1, "pixels"),
        default=10,
        metavar="PX",
        help="with --mask: pixels within PX of the mask edge, on either side, become unknown (default: %(default)s)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("."),
        metavar="OUT",
        help="folder for the outputs, created if needed (default: current folder)",
    )
    p.add_argument(
        "--16bit", dest="bits", action="store_const", const=16, default=8, help="write the alpha as a 16-bit PNG"
    )
    p.add_argument("--rgba", action="store_true", help="also write the cutout with estimated foreground colours")
    p.add_argument("--background", type=Path, metavar="BG", help="also write a composite over this image")
    p.add_argument(
        "--save-routing",
        action="store_true",
        help="also write the routing picture of the four global blocks (MEMatte only)",
    )
    p.add_argument("--save-trimap", action="store_true", help="with --mask: also write the trimap built from the mask")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip images whose requested outputs all exist in OUT (resume a batch)",
    )
    add_max_pixels(p)
    add_model_options(p)
    p.set_defaults(run="mematte.commands:run_predict")
    return p


def add_eval(sub) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval",
        help="score a checkpoint on a benchmark folder",
        description="Score a checkpoint on a matting benchmark: SAD, MSE, Grad, Conn, time "
        "and peak memory per image, and their mean.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("dataset", metavar="DATASET", type=Path, help="the benchmark folder")
    e.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write the table as CSV")
    add_max_pixels(e)
    add_model_options(e)
    e.set_defaults(run="mematte.commands:run_eval")
    return e


def add_info(sub) -> argparse.ArgumentParser:
    i = sub.add_parser(
        "info",
        help="describe a checkpoint file",
        description="Describe a checkpoint: its format, variant, parameter count, what it "
        "loads into, and whether it holds a training-time teacher.",
        epilog=EXIT_CODES_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    i.add_argument(
        "--size",
        type=_image_size,
        action="append",
        default=[],
        metavar="WxH",
        help="also print the memory matting a W×H image takes (model.estimate_memory), "
        "on the CPU in the dtype --dtype auto picks (repeatable)",
    )
    i.set_defaults(run="mematte.commands:run_info")
    return i


EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "torch"}

EXPORT_EPILOG = f"""\
formats: onnx (OUT.onnx): one ONNX file for ONNX Runtime and other runtimes, any H×W;
inputs image (1, 3, H, W) and trimap (1, 1, H, W) float32 in [0, 1], output alpha.
torch (OUT.pt2): a torch.export program of the fast path, any H×W.
The file is written whole or not at all; the checkpoint, the output location and the
options are checked before any work.

{EXIT_CODES_TEXT}
"""


def add_export(sub) -> argparse.ArgumentParser:
    x = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or a torch.export program",
        description="Export a MEMatte or ViTMatte checkpoint as one file that runs at any image size.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument("checkpoint", metavar="CKPT", type=Path, help="MEMatte or ViTMatte checkpoint (upstream or HF)")
    x.add_argument("output", metavar="OUT", type=Path, help="the file to write (.onnx or .pt2)")
    x.add_argument(
        "--format",
        choices=sorted(set(EXPORT_FORMATS.values())),
        help="onnx or torch (default: from OUT's suffix, .onnx or .pt2)",
    )
    x.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="ONNX weights and activations; float16 is for GPU runtimes (default: %(default)s)",
    )
    x.add_argument("--opset", type=_whole(1, "opset"), metavar="N", help="ONNX opset, from 18 (default: 20)")
    x.add_argument(
        "--max-tokens",
        type=_whole(0, "tokens", MAX_TOKENS_LIMIT),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="MEMatte: most tokens per image sent to global attention; 0: no cap (default: %(default)s)",
    )
    x.set_defaults(run="mematte.export.command:run_export")
    return x


def _whole(least: int, unit: str, most: int | None = None):
    """An argparse type: a whole number ≥ ``least`` (and ≤ ``most``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {unit}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} {unit}: must be ≥ {least}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} {unit}: must be ≤ {most:,}")
        return value

    return parse


def _image_size(text: str) -> tuple[int, int]:
    """An argparse type: ``WxH`` (or ``W×H``) as (height, width)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 3840x2160 (width x height)")
    return int(parts[1]), int(parts[0])


def add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=_whole(0, "pixels"),
        default=MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels, which guards against decompression "
        "bombs; 0: no limit (default: %(default)s, Pillow's limit)",
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --device, --dtype, --backend, --max-tokens, --tile: how the model runs."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        type=Path,
        metavar="CKPT",
        help="MEMatte checkpoint (.pth or .safetensors) from the authors' release, "
        "https://github.com/linyiheng123/MEMatte (required)",
    )
    g.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N (default: auto)"
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype; auto: bfloat16 on CPUs with AVX512-BF16 (CPU fast path), "
        "float16 on GPUs without bf16 (before Ampere), float32 elsewhere; float16 only "
        "on GPUs, bfloat16 on CPUs and GPUs from Ampere on (default: %(default)s)",
    )
    g.add_argument(
        "--allow-tf32",
        action="store_true",
        help="let float32 matmuls and convolutions run in TF32 on Ampere and later GPUs: "
        "faster, errors of order 1e-4 to 1e-3 on alpha (default: full float32)",
    )
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="kernel implementation (default: %(default)s)")
    g.add_argument(
        "--max-tokens",
        type=_whole(0, "tokens", MAX_TOKENS_LIMIT),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="most tokens per image sent to global attention; 0: no cap (default: %(default)s)",
    )
    g.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode in tiles, as published (default: on; whole-image decoding with --no-tile)",
    )
