"""The training data of MEMatte, as the published recipe makes it (Adobe-style foregrounds
composited on COCO-style backgrounds).

A dataset folder holds ``fg/`` and ``alpha/`` (foregrounds and their mattes, paired by file
stem) and ``bg/`` (backgrounds). One epoch has one sample per background: sample ``idx``
takes ``bg[idx]`` and ``fg[idx mod n_fg]`` (the foreground list shuffled once with
``RandomState(0)``). Each sample goes through, in order:

1. :func:`mix_second_foreground` and :func:`maybe_resize_foreground`
2. :func:`random_affine`
3. :func:`make_trimap` (from the eroded alpha)
4. :func:`random_crop` (centred on unknown pixels; the background is fitted first)
5. :func:`color_jitter`
6. :func:`composite`

Images stay in OpenCV's BGR order and 0–255 units until :meth:`MattingDataset.__getitem__`
turns them into the model's inputs: ``image`` (3, C, C) RGB in [0, 1], ``trimap`` (1, C, C)
in {0, 128/255, 1} and ``alpha`` (1, C, C) in [0, 1], C = the crop size.

Randomness: every sample draws from its own generator, seeded from (seed, epoch, index),
so a sample is the same whichever rank or data-loader worker makes it, and a resumed run
sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .. import io

log = logging.getLogger("mematte.train")

# cv2's "random interpolation" of the recipe: drawn uniformly at every resize and warp.
INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)
SECOND_FG_PROB = 0.5
RESIZE_FG_PROB = 0.25
RESIZE_FG_SIZE = 640  # the side of the square the occasional foreground resize goes to
TRIMAP_SIZE = 640  # alpha is eroded at this square size, then the trimap resized back
MAX_EROSION = 29  # erosion kernel sides are drawn from 1..MAX_EROSION
SCALE_RANGE = (0.8, 1.25)
SHEAR_DEGREES = 10.0
ROTATION_DEGREES = 30.0
ROTATION_MIN_SIDE = 1024  # smaller foregrounds are not rotated
FLIP_PROB = 0.5
MIN_CANDIDATES = 10  # unknown pixels needed to centre the crop on one
HUE_SHIFT = 40  # hue moves by an integer in [-HUE_SHIFT, HUE_SHIFT) degrees
UNKNOWN = 128  # trimap value of the unknown region (0 background, 255 foreground)


def random_interp(rng: np.random.Generator) -> int:
    return int(INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))])


# ---------------------------------------------------------------------- transforms


def mix_second_foreground(
    fg: np.ndarray, alpha: np.ndarray, fg2: np.ndarray, alpha2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Overlay a second foreground behind the first: ``fg2``/``alpha2`` are resized to the
    first's size, alpha becomes ``1 − (1 − α)(1 − α2)`` and colour ``fg·α + fg2·(1 − α)``
    (uint8). Skipped when the union would be opaque everywhere."""
    h, w = alpha.shape
    fg2 = cv2.resize(fg2, (w, h), interpolation=random_interp(rng))
    alpha2 = cv2.resize(alpha2, (w, h), interpolation=random_interp(rng))
    union = 1 - (1 - alpha) * (1 - alpha2)
    if not np.any(union < 1):
        return fg, alpha
    a = alpha[:, :, None]
    fg = (fg.astype(np.float32) * a + fg2.astype(np.float32) * (1 - a)).astype(np.uint8)
    return fg, union


def maybe_resize_foreground(
    fg: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """With probability 1/4, resize foreground and alpha to 640×640 (aspect not kept)."""
    if rng.random() < RESIZE_FG_PROB:
        size = (RESIZE_FG_SIZE, RESIZE_FG_SIZE)
        fg = cv2.resize(fg, size, interpolation=random_interp(rng))
        alpha = cv2.resize(alpha, size, interpolation=random_interp(rng))
    return fg, alpha


def affine_matrix(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The inverse map (output pixel → input pixel, 2×3) of a random affine transform about
    the centre (w/2 + 0.5, h/2 + 0.5): flip each axis with p = 1/2, scale x and y by
    independent factors in [0.8, 1.25], rotate by up to ±30° (only when the larger side is
    ≥ 1024), shear by up to ±10°. No translation."""
    rotate = ROTATION_DEGREES if max(h, w) >= ROTATION_MIN_SIDE else 0.0
    angle = math.radians(rng.uniform(-rotate, rotate))
    scale = rng.uniform(*SCALE_RANGE, size=2)
    shear = math.radians(rng.uniform(-SHEAR_DEGREES, SHEAR_DEGREES))
    flip = np.where(rng.random(2) < FLIP_PROB, -1.0, 1.0)
    sx, sy = flip / scale
    d = math.cos(angle + shear) * math.cos(angle) + math.sin(angle + shear) * math.sin(angle)
    m = (
        np.array(
            [
                [math.cos(angle) * sx, math.sin(angle + shear) * sx, 0.0],
                [-math.sin(angle) * sy, math.cos(angle + shear) * sy, 0.0],
            ]
        )
        / d
    )
    cx, cy = w * 0.5 + 0.5, h * 0.5 + 0.5
    m[:, 2] = m[:, :2] @ [-cx, -cy] + [cx, cy]
    return m


def random_affine(fg: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Warp foreground and alpha by one :func:`affine_matrix`, zero outside, each with its
    own random interpolation."""
    h, w = alpha.shape
    m = affine_matrix(h, w, rng)
    fg = cv2.warpAffine(fg, m, (w, h), flags=random_interp(rng) | cv2.WARP_INVERSE_MAP)
    alpha = cv2.warpAffine(alpha, m, (w, h), flags=random_interp(rng) | cv2.WARP_INVERSE_MAP)
    return fg, alpha


def erosion_kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def trimap_from_alpha(alpha: np.ndarray, k_fg: int, k_bg: int) -> np.ndarray:
    """uint8 trimap of ``alpha``: 255 where the opaque region (α ≥ 1 − 1e-5) survives
    erosion by a k_fg×k_fg ellipse, 0 where the transparent region (α ≤ 1e-5) survives a
    k_bg×k_bg one, 128 elsewhere."""
    fg_mask = (alpha + 1e-5).astype(np.int32).astype(np.uint8)  # 1 where α ≥ 1 − 1e-5
    bg_mask = (1 - alpha + 1e-5).astype(np.int32).astype(np.uint8)  # 1 where α ≤ 1e-5
    fg_mask = cv2.erode(fg_mask, erosion_kernel(k_fg))
    bg_mask = cv2.erode(bg_mask, erosion_kernel(k_bg))
    trimap = np.full(alpha.shape, UNKNOWN, np.uint8)
    trimap[fg_mask == 1] = 255
    trimap[bg_mask == 1] = 0
    return trimap


def make_trimap(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`trimap_from_alpha` with k_fg, k_bg uniform in 1..29, computed on alpha
    resized to 640×640 and resized back (nearest), so the unknown band scales with the
    image."""
    h, w = alpha.shape
    small = cv2.resize(alpha, (TRIMAP_SIZE, TRIMAP_SIZE), interpolation=random_interp(rng))
    k_fg, k_bg = rng.integers(1, MAX_EROSION + 1, size=2)
    trimap = trimap_from_alpha(small, int(k_fg), int(k_bg))
    return cv2.resize(trimap, (w, h), interpolation=cv2.INTER_NEAREST)


@dataclass
class Sample:
    fg: np.ndarray  # H×W×3 BGR, uint8 or float32 in 0..255
    alpha: np.ndarray  # H×W float32
    trimap: np.ndarray  # H×W uint8 0/128/255
    bg: np.ndarray  # H×W×3 BGR


def fit_background(bg: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The background resized to the foreground's w×h (aspect not kept)."""
    return cv2.resize(bg, (w, h), interpolation=random_interp(rng))


def random_crop(s: Sample, crop: int, rng: np.random.Generator) -> Sample:
    """A crop×crop window of every map (background already fitted to the foreground).

    Sides ≤ crop are first scaled up, all maps together, by 1.1·crop/short side until
    both exceed it. The window is centred on an unknown pixel drawn on a 4-pixel grid at
    least crop/2 from the border when there are ≥ 10 such pixels, else placed uniformly.
    A trimap with no unknown pixel at all is resized to crop×crop instead."""
    h, w = s.trimap.shape
    if h <= crop or w <= crop:
        ratio = 1.1 * crop / min(h, w)
        while h <= crop or w <= crop:
            size = (int(w * ratio), int(h * ratio))
            s = Sample(
                fg=cv2.resize(s.fg, size, interpolation=random_interp(rng)),
                alpha=cv2.resize(s.alpha, size, interpolation=random_interp(rng)),
                trimap=cv2.resize(s.trimap, size, interpolation=cv2.INTER_NEAREST),
                bg=cv2.resize(s.bg, size, interpolation=random_interp(rng)),
            )
            h, w = s.trimap.shape
    if not np.any(s.trimap == UNKNOWN):
        size = (crop, crop)
        return Sample(
            fg=cv2.resize(s.fg, size, interpolation=random_interp(rng)),
            alpha=cv2.resize(s.alpha, size, interpolation=random_interp(rng)),
            trimap=cv2.resize(s.trimap, size, interpolation=cv2.INTER_NEAREST),
            bg=cv2.resize(s.bg, size, interpolation=random_interp(rng)),
        )
    margin = crop // 2
    quarter = cv2.resize(s.trimap, (w // 4, h // 4), interpolation=cv2.INTER_NEAREST)  # quarter[i, j] = trimap[4i, 4j]
    inner = quarter[margin // 4 : (h - margin) // 4, margin // 4 : (w - margin) // 4]
    rows, cols = np.nonzero(inner == UNKNOWN)
    if len(rows) >= MIN_CANDIDATES:
        k = rng.integers(len(rows))
        top, left = int(rows[k]) * 4, int(cols[k]) * 4  # that pixel sits at (top + margin, left + margin)
    else:
        top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    window = (slice(top, top + crop), slice(left, left + crop))
    return Sample(fg=s.fg[window], alpha=s.alpha[window], trimap=s.trimap[window], bg=s.bg[window])


def color_jitter(fg: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Jitter the foreground in HSV (float, H in degrees): hue by an integer in [−40, 40),
    saturation and value each by ``u·(1.1 − m)/5 − (1.1 − m)/10`` (u uniform in [0, 1), m
    the channel's mean where α > 0), folded back into [0, 1] (|x|, then 2 − x above 1).
    Returns float32 BGR in 0..255; skipped (fg as float32) when alpha is all zero."""
    fg = fg.astype(np.float32)
    if not np.any(alpha > 0):
        return fg
    hsv = cv2.cvtColor(fg / 255.0, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = np.remainder(hsv[:, :, 0] + rng.integers(-HUE_SHIFT, HUE_SHIFT), 360)
    for c in (1, 2):
        mean = hsv[:, :, c][alpha > 0].mean()
        channel = np.abs(hsv[:, :, c] + rng.random() * (1.1 - mean) / 5 - (1.1 - mean) / 10)
        channel[channel > 1] = 2 - channel[channel > 1]
        hsv[:, :, c] = channel
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0


def composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``I = fg·α + bg·(1 − α)`` with α clipped to [0, 1] and colours to [0, 255]:
    (image float32 H×W×3 in 0..255, the clipped alpha)."""
    alpha = np.clip(alpha, 0, 1).astype(np.float32)
    fg = np.clip(fg.astype(np.float32), 0, 255)
    bg = np.clip(bg.astype(np.float32), 0, 255)
    a = alpha[:, :, None]
    return fg * a + bg * (1 - a), alpha


# ---------------------------------------------------------------------- files


class DatasetError(ValueError):
    """The dataset folder cannot be trained on; the message says why."""


@dataclass
class DatasetFiles:
    fg: list[Path]  # foregrounds, in training order (shuffled once)
    alpha: list[Path]  # their mattes, paired with fg
    bg: list[Path]  # backgrounds, sorted by name
    skipped: list[str]  # why files were left out, one line each


def _image_size(path: Path) -> tuple[int, int]:
    """(w, h) as decoded with EXIF orientation applied, read from the header alone."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90°
            w, h = h, w
        return w, h


def _readable(path: Path, skipped: list[str]) -> tuple[int, int] | None:
    try:
        return _image_size(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        skipped.append(f"{path}: not a readable image ({e})")
        return None


def find_dataset(root: str | Path) -> DatasetFiles:
    """The training files of ``root`` (``fg/``, ``alpha/``, ``bg/``), checked before any work.

    Raises :class:`DatasetError` when a folder is missing or empty, or when no
    foreground has a readable matte of its size. Foregrounds without a matte (and mattes
    without a foreground), files that are not readable images (judged from their
    headers), and pairs whose sizes differ are left out and listed in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    folders = {name: root / name for name in ("fg", "alpha", "bg")}
    missing = [f"{name}/" for name, path in folders.items() if not path.is_dir()]
    if missing:
        raise DatasetError(
            f"{root} lacks {', '.join(missing)} (expected fg/ and alpha/ paired by file stem, and bg/ with backgrounds)"
        )
    listed = {name: io.find_images(path) for name, path in folders.items()}
    for name, files in listed.items():
        if not files:
            raise DatasetError(f"{folders[name]} holds no images ({', '.join(io.IMAGE_SUFFIXES)})")

    skipped: list[str] = []
    alphas = io.index_by_stem(folders["alpha"])
    fg_stems = {p.stem for p in listed["fg"]}
    for p in listed["alpha"]:
        if p.stem not in fg_stems:
            skipped.append(f"{p}: no foreground named {p.stem}.* in {folders['fg']}")
    pairs = []
    for fg in listed["fg"]:
        try:
            alpha = io.lookup_stem(alphas, fg.stem, folders["alpha"], what="alpha matte")
        except (FileNotFoundError, ValueError) as e:
            skipped.append(f"{fg}: {e}")
            continue
        fg_size, alpha_size = _readable(fg, skipped), _readable(alpha, skipped)
        if fg_size is None or alpha_size is None:
            continue
        if fg_size != alpha_size:
            skipped.append(
                f"{fg}: foreground is {fg_size[0]}×{fg_size[1]} but {alpha.name} is {alpha_size[0]}×{alpha_size[1]}"
            )
            continue
        pairs.append((fg, alpha))
    if not pairs:
        raise DatasetError(f"no usable foreground/alpha pair in {root}:\n  " + "\n  ".join(skipped[:10]))
    bgs = [p for p in listed["bg"] if _readable(p, skipped) is not None]
    if not bgs:
        raise DatasetError(f"no readable background in {folders['bg']}")
    order = np.random.RandomState(0).permutation(len(pairs))  # the recipe's one shuffle of the foregrounds
    return DatasetFiles(
        fg=[pairs[i][0] for i in order],
        alpha=[pairs[i][1] for i in order],
        bg=bgs,
        skipped=skipped,
    )


def read_color(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot be decoded")
    return image


def read_alpha(path: Path) -> np.ndarray:
    alpha = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if alpha is None:
        raise ValueError(f"{path}: cannot be decoded")
    return alpha.astype(np.float32) / 255.0


# ---------------------------------------------------------------------- dataset


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class MattingDataset(torch.utils.data.Dataset):
    """Composited training crops. Indexed by ``(index, epoch)`` (what
    :class:`~mematte.train.sampler.TrainSampler` yields) or by a plain index (epoch 0).

    A file that passed :func:`find_dataset` but cannot be decoded is reported once and
    the sample moves on to the next background index: a run never stops on one bad file.
    """

    def __init__(self, files: DatasetFiles, crop: int, seed: int = 0):
        self.files = files
        self.crop = crop
        self.seed = seed
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.files.bg)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                return self.make(i, sample_rng(self.seed, epoch, i))
            except ValueError as e:
                if str(e) not in self._reported:
                    self._reported.add(str(e))
                    log.warning("skipping a sample: %s", e)
        raise RuntimeError("no sample of the dataset can be decoded")

    def make(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n_fg = len(self.files.fg)
        fg = read_color(self.files.fg[index % n_fg])
        alpha = read_alpha(self.files.alpha[index % n_fg])
        if rng.random() < SECOND_FG_PROB:
            j = (index + int(rng.integers(n_fg))) % n_fg
            fg, alpha = mix_second_foreground(
                fg, alpha, read_color(self.files.fg[j]), read_alpha(self.files.alpha[j]), rng
            )
        fg, alpha = maybe_resize_foreground(fg, alpha, rng)
        fg, alpha = random_affine(fg, alpha, rng)
        trimap = make_trimap(alpha, rng)
        bg = read_color(self.files.bg[index])
        h, w = alpha.shape
        s = random_crop(Sample(fg, alpha, trimap, fit_background(bg, h, w, rng)), self.crop, rng)
        fg = color_jitter(s.fg, s.alpha, rng)
        image, alpha = composite(fg, s.bg, s.alpha)
        return to_tensors(image, s.trimap, alpha)


def to_tensors(image: np.ndarray, trimap: np.ndarray, alpha: np.ndarray) -> dict[str, torch.Tensor]:
    """BGR 0..255 → RGB [0, 1] (3, H, W); trimap and alpha as (1, H, W) in [0, 1]."""
    rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)) / 255.0
    return {
        "image": torch.from_numpy(rgb.astype(np.float32)),
        "trimap": torch.from_numpy(trimap.astype(np.float32)[None] / 255.0),
        "alpha": torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32)[None]),
    }


# ---------------------------------------------------------------------- sampling


class TrainSampler(torch.utils.data.Sampler):
    """Endless per-rank batches of ``(index, epoch)`` keys, from ``start_batch`` on.

    Each epoch is a :class:`torch.utils.data.DistributedSampler` pass (shuffled with
    ``seed``, reshuffled every epoch through ``set_epoch``, the tail that does not fill a
    whole global batch dropped), cut into batches of ``batch_size``. A run resumed at
    iteration i starts at ``start_batch = i`` and sees exactly the batches the
    uninterrupted run would have.
    """

    def __init__(
        self, size: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, start_batch: int = 0
    ):
        self.sampler = torch.utils.data.DistributedSampler(
            range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{size} backgrounds cannot fill one batch of {batch_size} on each of {num_replicas} "
                f"processes: add backgrounds or lower --batch-size"
            )
        self.start_batch = start_batch

    def __iter__(self):
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for b in range(skip, self.batches_per_epoch):
                yield [(i, epoch) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]
            epoch, skip = epoch + 1, 0
