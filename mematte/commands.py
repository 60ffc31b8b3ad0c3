"""What the ``mematte`` subcommands do; their command lines are in :mod:`mematte.cli`.

Everything a command line can get wrong is checked before the model loads or any image
is read (exit status 2): the checkpoint file, device, dtype and backend together, and
every output location. Then each image is a unit of work: it either gets all its outputs
or none, and a failure is reported and skipped (exit status 1 at the end). Under torchrun,
``predict`` and ``eval`` share a folder among the processes (:mod:`mematte.distributed`).
"""

from __future__ import annotations

import argparse
import csv
import io as stdio
import resource
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import api, hf, io, metrics, progress
from .checkpoint import DATA_PARALLEL_PREFIX, IGNORED_PREFIXES, WRAPPERS, infer_variant
from .cli import EXIT_FAILED, EXIT_OK, UsageError
from .distributed import (
    FOLDER_RUN_TIMEOUT,
    Distributed,
    barrier,
    distributed_from_env,
    gather_to_all,
    process_group,
    shard,
    share_cpu_threads,
    take_device,
)
from .model import FastMEMatte
from .trimap import warn_if_degenerate
from .vitmatte import model_class, read_state_dict

LAYOUTS = {
    "Composition-1k": ("merged", "trimaps", "alpha_copy"),
    "AIM-500": ("original", "trimap", "mask"),
}

# Per-file errors: bad or missing files, bad values, and running out of memory on one
# large image. Anything else is a bug and stops the run.
FILE_ERRORS = (OSError, ValueError, MemoryError, torch.OutOfMemoryError)

# Progress inside one image is shown once the image has taken this long (seconds).
PROGRESS_AFTER_S = 2.0


# ---------------------------------------------------------------------- checks before any work


def _require_checkpoint(args: argparse.Namespace) -> None:
    # checked before anything else: without a checkpoint nothing else is worth reporting
    if args.checkpoint is None:
        raise UsageError(f"{api.NO_CHECKPOINT} Pass one with --checkpoint PATH.")
    if not args.checkpoint.exists():  # a file, or an HF model directory
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")


def _launch() -> Distributed:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 otherwise)."""
    try:
        return distributed_from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _runtime(args: argparse.Namespace, ddp: Distributed = Distributed()) -> tuple[torch.device, torch.dtype, str]:
    """Device, dtype and op table the model options give, or a usage error saying why
    they cannot run here (e.g. float16 or --backend cuda on a CPU). Under torchrun the
    device is the GPU of the local rank, or the CPU with this process's share of its cores."""
    try:
        device = take_device(ddp, api.resolve_device(args.device))  # before anything else touches CUDA
        backend = api.check_backend(args.backend, device)
        dtype = api.resolve_dtype(args.dtype, device, args.backend)
    except ValueError as e:
        raise UsageError(str(e)) from None
    share_cpu_threads(ddp, device)
    return device, dtype, backend


def _check_output_folder(folder: Path, flag: str) -> None:
    """``folder`` is, or can be created as, a folder this process can write in."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise UsageError(f"{flag} {folder}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder")
    _probe_writable(existing, f"{flag} {folder}")


def _check_output_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise UsageError(f"{flag} {path}: the folder {path.parent} {what}")
    _probe_writable(path.parent, f"{flag} {path}")


def _probe_writable(folder: Path, what: str) -> None:
    # Trying is the only sure test: permission bits say nothing for root or on a
    # read-only mount.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".mematte-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def _load(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, backend: str, ddp: Distributed = Distributed()
):
    """The model, or None after reporting why the checkpoint cannot be loaded."""
    try:
        model = api.load_model(
            args.checkpoint,
            device=device,
            dtype=dtype,
            backend=args.backend,
            max_tokens=args.max_tokens,
            allow_tf32=args.allow_tf32,
        )
    except FILE_ERRORS as e:
        print(f"mematte {args.command}: error: {e}", file=sys.stderr)
        return None
    if not isinstance(model, FastMEMatte):
        cap = "every token global"
    elif model.max_tokens is None:
        cap = "no cap"
    else:
        cap = f"at most {model.max_tokens:,} global tokens per image"
    if ddp.main:
        launch = ""
        if ddp.enabled:
            n = torch.get_num_threads()
            threads = f", {n} thread{'s' if n > 1 else ''} each" if device.type == "cpu" else ""
            launch = f"; {ddp.world_size} processes, each on its share of the images{threads}"
        print(
            f"mematte: {type(model).__name__}({model.variant}) on {device}, "
            f"{str(dtype).removeprefix('torch.')}, backend {backend}, {cap}{launch}",
            file=sys.stderr,
        )
    return model


def _fail(name: str, error: BaseException) -> None:
    tqdm.write(f"failed: {name}: {error}", file=sys.stderr)


class _ImageProgress:
    """Progress inside one image (backbone blocks, decoder batches), shown only once the
    image has taken :data:`PROGRESS_AFTER_S` seconds, so quick images stay quiet."""

    UNITS = {"backbone": "block", "decoder": "tile batch"}

    def __init__(self, name: str):
        self.name, self.start = name, time.monotonic()
        self.bar: tqdm | None = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None and time.monotonic() - self.start < PROGRESS_AFTER_S:
            return
        if self.bar is None or stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=total,
                desc=f"{self.name}: {stage}",
                unit=self.UNITS.get(stage, "step"),
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_one(name: str, work, *, show_progress: bool = True):
    """``work()`` with progress inside the image, and its warnings printed once, naming it."""
    shown = _ImageProgress(name) if show_progress else None
    try:
        with warnings.catch_warnings(record=True) as caught, progress.reporting(shown):
            warnings.simplefilter("always")
            result = work()
    finally:
        if shown is not None:
            shown.close()
    for message in dict.fromkeys(str(w.message) for w in caught):
        tqdm.write(f"warning: {name}: {message}", file=sys.stderr)
    return result


def _folder_bar(items: list, total: int, ddp: Distributed) -> tqdm:
    """The progress bar over a folder: under torchrun only rank 0 shows one, over its share."""
    desc = f"rank 0 of {ddp.world_size}" if ddp.enabled else None
    return tqdm(items, unit="image", desc=desc, disable=total < 2 or not ddp.main, file=sys.stderr)


def _release_gpu_memory(error: BaseException) -> None:
    # after running out of GPU memory on one image, the next one should start clean
    if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    _require_checkpoint(args)
    args.max_pixels = args.max_pixels or None
    ddp = _launch()
    device, dtype, backend = _runtime(args, ddp)
    _check_output_folder(args.output, "-o")
    if args.background is not None and not args.background.is_file():
        raise UsageError(f"--background {args.background}: no such file")
    if args.save_trimap and args.mask is None:
        raise UsageError("--save-trimap writes the trimap built from --mask; with --trimap it is the file given")
    guide, guide_path = ("mask", args.mask) if args.mask is not None else ("trimap", args.trimap)
    jobs = _pair_inputs(args.input, guide_path, guide, report=ddp.main)
    background = None
    if args.background is not None:
        try:
            background = io.read_image(args.background, max_pixels=args.max_pixels)
        except FILE_ERRORS as e:
            print(f"mematte predict: error: --background: {e}", file=sys.stderr)
            return EXIT_FAILED
    with process_group(ddp, "gloo", FOLDER_RUN_TIMEOUT):
        model = _load(args, device, dtype, backend, ddp)
        if model is None:
            return EXIT_FAILED
        if args.save_routing and not isinstance(model, FastMEMatte):
            raise UsageError(
                f"--save-routing: {args.checkpoint} holds a {model.family} model, which has no "
                "routers (every token of its global blocks attends globally), so there is no "
                "routing to draw; drop --save-routing"
            )
        return _predict_share(args, model, jobs, guide, background, ddp)


def _predict_share(args, model, jobs, guide: str, background, ddp: Distributed) -> int:
    """Matte this process's share of ``jobs``; rank 0 reports on all of them."""
    failed = skipped = 0
    bar = _folder_bar(shard(jobs, ddp), len(jobs), ddp)
    for image_path, guide_file in bar:
        bar.set_postfix_str(image_path.name, refresh=False)
        wanted = api.requested_outputs(
            image_path,
            args.output,
            rgba=args.rgba,
            composite=background is not None,
            save_routing=args.save_routing,
            save_trimap=args.save_trimap,
        )
        if args.skip_existing and all(p.is_file() for p in wanted.values()):
            skipped += 1
            continue
        try:
            if isinstance(guide_file, Exception):
                raise guide_file
            result = _run_one(
                image_path.name,
                lambda: api.predict_file(
                    image_path,
                    trimap_path=guide_file if guide == "trimap" else None,
                    mask_path=guide_file if guide == "mask" else None,
                    band=args.band,
                    model=model,
                    out_dir=args.output,
                    rgba=args.rgba,
                    background=background,
                    save_routing=args.save_routing,
                    save_trimap=args.save_trimap,
                    bits=args.bits,
                    tile=args.tile,
                    max_pixels=args.max_pixels,
                ),
                show_progress=ddp.main,
            )
        except FILE_ERRORS as e:
            failed += 1
            _fail(image_path.name, e)
            _release_gpu_memory(e)
            continue
        if len(jobs) == 1:
            for path in result.written.values():
                print(path)
    counts = gather_to_all(ddp, (failed, skipped))
    failed, skipped = sum(f for f, _ in counts), sum(s for _, s in counts)
    if ddp.main:
        _predict_summary(args, jobs, failed, skipped)
    barrier(ddp)  # the other ranks end after rank 0 has reported
    return EXIT_FAILED if failed else EXIT_OK


def _predict_summary(args, jobs, failed: int, skipped: int) -> None:
    if len(jobs) > 1:
        done = len(jobs) - failed - skipped
        note = f" ({skipped} skipped: their outputs exist)" if skipped else ""
        where = f" into {args.output}" if done else ""  # with none done, OUT may never have been made
        print(f"{done} of {len(jobs)} images matted{where}{note}")
    elif skipped:
        print(f"{jobs[0][0].name}: skipped, its outputs exist in {args.output}", file=sys.stderr)
    if failed:
        print(f"mematte predict: {failed} of {len(jobs)} images failed", file=sys.stderr)
    sys.stdout.flush()


# Besides a file of the image's own stem, the trimap or mask of x.jpg may be x_trimap.png
# or x_mask.png, also in the image's own folder.
GUIDE_SUFFIXES = {"trimap": "_trimap", "mask": "_mask"}


def _pair_inputs(inp: Path, guide: Path, what: str, *, report: bool = True) -> list[tuple[Path, Path | Exception]]:
    """(image, trimap or mask) per image, sorted; a pairing problem is kept as that file's
    error, and no pair at all is a usage error. ``report``: say which files are left out
    as outputs of this command."""
    if not inp.exists():
        raise UsageError(f"{inp}: no such file or folder")
    if not guide.exists():
        raise UsageError(f"--{what} {guide}: no such file or folder")
    if not inp.is_dir():
        if not guide.is_dir():
            return [(inp, guide)]
        jobs = [(inp, _guide_of(inp, io.index_by_stem(guide), guide, what))]
    else:
        if not guide.is_dir():
            raise UsageError(f"INPUT {inp} is a folder, so --{what} must be a folder too")
        images = io.find_images(inp)
        if guide.samefile(inp):  # the trimaps or masks beside the images are not images to matte
            images = _without_guides(images, what)
        images = _without_own_outputs(images, report)
        if not images:
            raise UsageError(f"no images ({', '.join(io.IMAGE_SUFFIXES)}) in {inp}")
        stems = [p.stem for p in images]
        index = io.index_by_stem(guide)
        jobs = []
        for image in images:
            if stems.count(image.stem) > 1:
                jobs.append(
                    (image, ValueError(f"several images named {image.stem}.* in {inp}; their outputs would collide"))
                )
            else:
                jobs.append((image, _guide_of(image, index, guide, what)))
    if all(isinstance(found, Exception) for _, found in jobs):
        first = jobs[0][1]
        raise UsageError(
            str(first)
            if len(jobs) == 1
            else f"none of the {len(jobs)} images in {inp} has a {what} in {guide} (e.g. {first})"
        )
    return jobs


def _guide_of(image: Path, index: dict[str, list[Path]], folder: Path, what: str) -> Path | Exception:
    """The one trimap or mask of ``image`` in ``folder`` (``index``: its files by stem),
    named ``<stem>.*`` or ``<stem>_trimap.*`` / ``<stem>_mask.*``; else the error why not."""
    names = (image.stem, image.stem + GUIDE_SUFFIXES[what])
    hits = [p for name in names for p in index.get(name, []) if p != image]
    if not hits:
        return FileNotFoundError(f"no {what} named {names[0]}.* in {folder} (nor {names[1]}.*)")
    if len(hits) > 1:
        return ValueError(f"several {what}s of {image.name} in {folder}: {', '.join(p.name for p in hits)}")
    return hits[0]


def _without_guides(images: list[Path], what: str) -> list[Path]:
    """Drop the trimaps or masks of the other images, when they share the images' folder."""
    stems, suffix = {p.stem for p in images}, GUIDE_SUFFIXES[what]
    return [p for p in images if not (p.stem.endswith(suffix) and p.stem[: -len(suffix)] in stems)]


def _without_own_outputs(images: list[Path], report: bool) -> list[Path]:
    """Drop the files this command wrote for images of the same folder (``x_alpha.png``
    beside ``x.jpg``, as when -o is the input folder), so a rerun does not matte them."""
    stems = {p.stem for p in images}
    suffixes = tuple(name.format(stem="") for name in api.OUTPUT_NAMES.values())  # "_alpha.png", …
    own = [p for p in images if any(p.name.endswith(s) and p.name[: -len(s)] in stems for s in suffixes)]
    if own and report:
        print(f"skipping {len(own)} files that are outputs of mematte predict (e.g. {own[0].name})", file=sys.stderr)
    return [p for p in images if p not in own]


# ---------------------------------------------------------------------- eval


COLUMNS = ("image", "sad", "mse", "grad", "conn", "time_s", "peak_mem_mib")  # a row's keys
# Both headers state the units the scores are in: SAD, Grad and Conn ÷ 1000 and MSE × 1000,
# as papers report them (mematte.metrics).
CSV_HEADER = ("image", "sad_div1000", "mse_x1000", "grad_div1000", "conn_div1000", "time_s", "peak_mem_mib")
HEADINGS = ("image", "SAD÷1000", "MSE×1000", "Grad÷1000", "Conn÷1000", "time_s", "peak_MiB")  # printed table


def run_eval(args: argparse.Namespace) -> int:
    _require_checkpoint(args)
    args.max_pixels = args.max_pixels or None
    ddp = _launch()
    device, dtype, backend = _runtime(args, ddp)
    if args.csv is not None:
        _check_output_file(args.csv, "--csv")
    layout, folders = _find_layout(args.dataset)
    jobs = _dataset_items(folders)
    with process_group(ddp, "gloo", FOLDER_RUN_TIMEOUT):
        model = _load(args, device, dtype, backend, ddp)
        if model is None:
            return EXIT_FAILED
        _warm_up(model, args.tile)
        if ddp.main:
            print(f"{layout}: {len(jobs)} images in {args.dataset}")
            print(_row_text(HEADINGS))
        rows, failed = _score_share(args, model, device, jobs, ddp)
        if ddp.main:
            _eval_summary(args, jobs, rows, failed, show_rows=ddp.enabled)
        barrier(ddp)  # the other ranks end after rank 0 has reported
    return EXIT_FAILED if failed else EXIT_OK


def _score_share(args, model, device: torch.device, jobs, ddp: Distributed) -> tuple[list[dict], int]:
    """Score this process's share of ``jobs``: the rows of every process in the order of
    ``jobs``, and how many images failed on all of them. One process prints each row as it
    is scored; under torchrun rank 0 prints them all at the end."""
    mine, failed = [], 0
    bar = _folder_bar(shard(list(enumerate(jobs)), ddp), len(jobs), ddp)
    for position, (name, paths) in bar:
        bar.set_postfix_str(name, refresh=False)
        try:
            if isinstance(paths, Exception):
                raise paths
            row = _run_one(
                name,
                lambda: _score(model, device, *paths, tile=args.tile, max_pixels=args.max_pixels),
                show_progress=ddp.main,
            )
        except FILE_ERRORS as e:
            failed += 1
            _fail(name, e)
            _release_gpu_memory(e)
            continue
        row = {"image": name, **row}
        mine.append((position, row))
        if not ddp.enabled:
            tqdm.write(_row_text([row[c] for c in COLUMNS]))
    shares = gather_to_all(ddp, (mine, failed))
    everyones = sorted((entry for share_rows, _ in shares for entry in share_rows), key=lambda entry: entry[0])
    return [row for _, row in everyones], sum(f for _, f in shares)


def _eval_summary(args, jobs, rows: list[dict], failed: int, *, show_rows: bool) -> None:
    if show_rows:
        for row in rows:
            print(_row_text([row[c] for c in COLUMNS]))
    if rows:
        mean = {"image": "mean", **{c: float(np.mean([r[c] for r in rows])) for c in COLUMNS[1:]}}
        print(_row_text([mean[c] for c in COLUMNS]))
        print(f"mean of {len(rows)} of {len(jobs)} images" + (f"; {failed} failed and are not in it" if failed else ""))
        if args.csv is not None:
            _write_csv(args.csv, rows + [mean])
    if failed:
        print(f"mematte eval: {failed} of {len(jobs)} images failed", file=sys.stderr)
    sys.stdout.flush()


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


def _score(
    model: FastMEMatte,
    device: torch.device,
    image_path: Path,
    trimap_path: Path,
    alpha_path: Path,
    *,
    tile: bool,
    max_pixels: int | None,
) -> dict[str, float]:
    image, trimap = api.read_pair(image_path, trimap_path, max_pixels=max_pixels)
    truth = io.read_gray(alpha_path, max_pixels=max_pixels)
    warn_if_degenerate(trimap, name=f"trimap {trimap_path}")
    if truth.shape != trimap.shape:
        raise ValueError(
            f"ground truth {alpha_path} is {io.size_text(truth.shape)} (W×H) but "
            f"image {image_path} is {io.size_text(image.shape)} (W×H)"
        )
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
    writer = csv.writer(text)
    writer.writerow(CSV_HEADER)
    writer.writerows([row[c] for c in COLUMNS] for row in rows)
    io.write_atomic(path, lambda f: f.write(text.getvalue().encode()))


# ---------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    path = args.checkpoint
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    try:
        state_dict = read_state_dict(path)  # also refuses NaN or infinite weights
        container, keys = (
            _container(path) if path.is_file() else ("HF model directory (config.json + weights)", list(state_dict))
        )
    except ValueError as e:
        print(f"mematte info: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    teacher = sum(k.startswith(IGNORED_PREFIXES) for k in keys)
    if hf.is_hf_state_dict(dict.fromkeys(keys)):
        container += ", HF transformers names"
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"file:        {path} ({size / 2**20:.1f} MiB)")
    print(f"format:      {container}")
    print(f"tensors:     {len(keys)}")
    print(
        "teacher:     "
        + (f"{teacher} teacher_backbone.* tensors (training-time distillation teacher; ignored)" if teacher else "none")
    )
    try:
        variant = infer_variant(state_dict)
        print(f"variant:     {variant}")
        cls = model_class(state_dict)
        model = cls.from_checkpoint(state_dict)
    except ValueError as e:
        print(f"loads into:  nothing: {e}")
        return EXIT_FAILED
    learned = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() for t in model.state_dict().values())
    # Papers count the state dict, BatchNorm statistics included.
    print(f"parameters:  {stored:,} ({learned:,} learned + {stored - learned:,} BatchNorm statistics)")
    print(f"loads into:  {cls.__name__}({variant})")
    if args.size:
        device = torch.device("cpu")
        dtype = api.resolve_dtype("auto", device)
        model = cls.from_checkpoint(state_dict, dtype=dtype)
        for height, width in args.size:
            need = model.estimate_memory(height, width)
            print(
                f"memory:      {width}×{height}: {need / 2**30:.2f} GiB beyond the weights "
                f"({need / (height * width):.0f} B/px), cpu, {str(dtype).removeprefix('torch.')}"
            )
    return EXIT_OK


def _container(path: Path) -> tuple[str, list[str]]:
    """How the file stores its tensors, and all its keys (teacher included)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # reads the header only
            return "safetensors", list(f.keys())
    # The file was fully read once already; memory-map it this time (only the zip
    # format, torch.save's default since 1.6, can be mapped).
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    container = "bare state dict"
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                container = (
                    'detectron2 checkpoint ({"model": state dict})'
                    if key == "model"
                    else f'checkpoint wrapping a state dict under "{key}"'
                )
                obj = obj[key]
                break
    keys = [str(k) for k in obj]
    if keys and all(k.startswith(DATA_PARALLEL_PREFIX) for k in keys):
        container += f", keys prefixed {DATA_PARALLEL_PREFIX!r} (DataParallel; stripped)"
        keys = [k[len(DATA_PARALLEL_PREFIX) :] for k in keys]
    return container, keys
