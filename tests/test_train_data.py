"""The training data pipeline: each transform's contract, the dataset folder checks, and
reproducibility per seed, epoch, rank and worker."""

import cv2
import numpy as np
import pytest
import torch

from mematte.train import data

from train_helpers import make_dataset, soft_disc


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- trimap


def brute_erosion(mask: np.ndarray, k: int) -> np.ndarray:
    """1 where every pixel under the k×k ellipse centred there is 1 (outside counts as 1,
    OpenCV's default border for erosion)."""
    kernel = data.erosion_kernel(k).astype(bool)
    r = k // 2
    padded = np.pad(mask, r, constant_values=1)
    out = np.ones_like(mask)
    for dy, dx in zip(*np.nonzero(kernel)):
        out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


@pytest.mark.parametrize("k_fg, k_bg", [(1, 1), (5, 13), (29, 2)], ids=["k1-1", "k5-13", "k29-2"])
def test_trimap_classes_come_from_eroded_alpha(k_fg, k_bg):
    alpha = soft_disc(96, 120, rng(1)).astype(np.float32) / 255
    trimap = data.trimap_from_alpha(alpha, k_fg, k_bg)
    opaque = (alpha >= 1 - 1e-5).astype(np.uint8)
    clear = (alpha <= 1e-5).astype(np.uint8)
    expected = np.full(alpha.shape, 128, np.uint8)
    expected[brute_erosion(opaque, k_fg) == 1] = 255
    expected[brute_erosion(clear, k_bg) == 1] = 0
    np.testing.assert_array_equal(trimap, expected)
    if k_fg > 1 and k_bg > 1:  # erosion widens the unknown band beyond the soft edge
        assert (trimap == 128).sum() > ((alpha > 1e-5) & (alpha < 1 - 1e-5)).sum()


def test_make_trimap_keeps_classes_inside_their_regions():
    alpha = soft_disc(data.TRIMAP_SIZE, data.TRIMAP_SIZE, rng(2)).astype(np.float32) / 255  # no resize
    for seed in range(5):
        trimap = data.make_trimap(alpha, rng(seed))
        assert set(np.unique(trimap)) == {0, 128, 255}
        assert np.all(alpha[trimap == 255] >= 1 - 1e-5)
        assert np.all(alpha[trimap == 0] <= 1e-5)
        assert np.all(trimap[(alpha > 1e-5) & (alpha < 1 - 1e-5)] == 128)


# ---------------------------------------------------------------------- crop


def sample_of(h, w, seed=0, unknown=True):
    r = rng(seed)
    alpha = soft_disc(h, w, r).astype(np.float32) / 255
    trimap = data.trimap_from_alpha(alpha, 7, 7) if unknown else np.zeros((h, w), np.uint8)
    fg = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
    bg = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return data.Sample(fg, alpha, trimap, bg)


@pytest.mark.parametrize("crop", [64, 128])
def test_crop_is_centred_on_an_unknown_pixel(crop):
    s = sample_of(300, 340)
    for seed in range(10):
        out = data.random_crop(s, crop, rng(seed))
        assert out.trimap.shape == out.alpha.shape == (crop, crop)
        assert out.fg.shape == out.bg.shape == (crop, crop, 3)
        assert out.trimap[crop // 2, crop // 2] == 128
        # a window of the input, not a resize: it occurs in the input as it is
        rows, cols = np.nonzero(np.all(s.fg == out.fg[0, 0], axis=-1))
        assert any(np.array_equal(s.fg[y : y + crop, x : x + crop], out.fg) for y, x in zip(rows, cols))


def test_crop_scales_up_small_images():
    s = sample_of(100, 150)
    out = data.random_crop(s, 128, rng(0))
    assert out.trimap.shape == (128, 128) and out.fg.shape == (128, 128, 3)
    assert set(np.unique(out.trimap)) <= {0, 128, 255}  # nearest keeps the classes


def test_crop_without_unknown_resizes_everything():
    s = sample_of(200, 260, unknown=False)
    out = data.random_crop(s, 64, rng(0))
    assert out.alpha.shape == (64, 64)
    expected = cv2.resize(s.trimap, (64, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out.trimap, expected)


# ---------------------------------------------------------------------- compositing, colour, affine


def test_composite_formula_with_clipping():
    r = rng(3)
    fg = r.uniform(-20, 280, (8, 9, 3)).astype(np.float32)
    bg = r.uniform(-20, 280, (8, 9, 3)).astype(np.float32)
    alpha = r.uniform(-0.2, 1.2, (8, 9)).astype(np.float32)
    image, a = data.composite(fg, bg, alpha)
    ac = np.clip(alpha, 0, 1)[:, :, None]
    expected = np.clip(fg, 0, 255) * ac + np.clip(bg, 0, 255) * (1 - ac)
    np.testing.assert_allclose(image, expected, rtol=1e-6)
    np.testing.assert_array_equal(a, np.clip(alpha, 0, 1))
    assert image.min() >= 0 and image.max() <= 255


def test_second_foreground_mixing_formula():
    r = rng(4)
    fg = r.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    fg2 = r.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # same size: any interpolation is exact
    alpha = r.uniform(0, 1, (20, 30)).astype(np.float32)
    alpha2 = r.uniform(0, 1, (20, 30)).astype(np.float32)
    out, a = data.mix_second_foreground(fg, alpha, fg2, alpha2, r)
    np.testing.assert_allclose(a, 1 - (1 - alpha) * (1 - alpha2), rtol=1e-6)
    expected = (fg * alpha[:, :, None] + fg2 * (1 - alpha[:, :, None])).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # float rounding at the cast
    opaque = np.ones_like(alpha)
    same, a_same = data.mix_second_foreground(fg, opaque, fg2, alpha2, r)
    assert same is fg and a_same is opaque  # an opaque union leaves the sample alone


def test_color_jitter_stays_in_range_and_skips_empty_alpha():
    r = rng(5)
    fg = r.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = np.ones((16, 16), np.float32)
    out = data.color_jitter(fg, alpha, r)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255 + 1e-3
    assert not np.allclose(out, fg)
    np.testing.assert_array_equal(data.color_jitter(fg, np.zeros_like(alpha), r), fg.astype(np.float32))


def test_affine_fixes_the_centre_and_keeps_scale_in_range():
    for seed in range(20):
        h, w = 90, 130
        m = data.affine_matrix(h, w, rng(seed))
        centre = np.array([w * 0.5 + 0.5, h * 0.5 + 0.5])
        np.testing.assert_allclose(m[:, :2] @ centre + m[:, 2], centre, atol=1e-9)
        # no rotation below 1024 px: the inverse map's determinant is ±1/(sx·sy)
        det = abs(np.linalg.det(m[:, :2]))
        assert 1 / 1.25**2 - 1e-9 <= det <= 1 / 0.8**2 + 1e-9


# ---------------------------------------------------------------------- the folder


def test_find_dataset_pairs_and_reports(tmp_path):
    root = make_dataset(tmp_path / "d", n_fg=3, n_bg=3)
    cv2.imwrite(str(root / "fg" / "orphan.png"), np.zeros((10, 10, 3), np.uint8))
    cv2.imwrite(str(root / "alpha" / "lonely.png"), np.zeros((10, 10), np.uint8))
    (root / "bg" / "broken.jpg").write_bytes(b"not an image")
    cv2.imwrite(str(root / "fg" / "small.png"), np.zeros((10, 10, 3), np.uint8))
    cv2.imwrite(str(root / "alpha" / "small.png"), np.zeros((12, 10), np.uint8))
    files = data.find_dataset(root)
    assert sorted(p.stem for p in files.fg) == ["fg0", "fg1", "fg2"]
    assert [p.stem for p in files.fg] == [p.stem for p in files.alpha]
    assert len(files.bg) == 3
    text = "\n".join(files.skipped)
    for name in ("orphan", "lonely", "broken.jpg", "small"):
        assert name in text


@pytest.mark.parametrize(
    "broken, message",
    [
        ("no_bg", "lacks bg/"),
        ("empty_fg", "holds no images"),
        ("unpaired", "no usable foreground/alpha pair"),
    ],
)
def test_find_dataset_refuses_unusable_folders(tmp_path, broken, message):
    root = make_dataset(tmp_path / "d", n_fg=2, n_bg=2)
    if broken == "no_bg":
        for p in (root / "bg").iterdir():
            p.unlink()
        (root / "bg").rmdir()
    elif broken == "empty_fg":
        for p in (root / "fg").iterdir():
            p.unlink()
    else:
        for i, p in enumerate(sorted((root / "alpha").iterdir())):
            p.rename(p.with_name(f"other{i}.png"))
    with pytest.raises(data.DatasetError, match=message):
        data.find_dataset(root)


# ---------------------------------------------------------------------- samples


def test_sample_contract(dataset_dir):
    ds = data.MattingDataset(data.find_dataset(dataset_dir), crop=128, seed=0)
    for i in range(len(ds)):
        s = ds[(i, 0)]
        assert s["image"].shape == (3, 128, 128) and s["trimap"].shape == s["alpha"].shape == (1, 128, 128)
        assert s["image"].min() >= 0 and s["image"].max() <= 1
        assert s["alpha"].min() >= 0 and s["alpha"].max() <= 1
        values = set(np.unique(s["trimap"].numpy() * 255).round().astype(int))
        assert values <= {0, 128, 255}
        assert 128 in values  # every crop has unknown pixels to learn from


def test_samples_are_reproducible_per_seed_and_epoch(dataset_dir):
    files = data.find_dataset(dataset_dir)
    a, b = data.MattingDataset(files, 128, seed=0), data.MattingDataset(files, 128, seed=0)
    other = data.MattingDataset(files, 128, seed=1)
    for key in [(0, 0), (3, 0), (3, 1)]:
        for name in ("image", "trimap", "alpha"):
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
    assert not torch.equal(a[(3, 0)]["image"], a[(3, 1)]["image"])  # a new epoch draws anew
    assert not torch.equal(a[(3, 0)]["image"], other[(3, 0)]["image"])


def test_unreadable_file_mid_run_is_skipped(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", n_fg=2, n_bg=3)
    files = data.find_dataset(root)
    files.bg[1].write_bytes(files.bg[1].read_bytes()[:40])  # header intact, data truncated
    ds = data.MattingDataset(files, 64, seed=0)
    with caplog.at_level("WARNING", logger="mematte.train"):
        s = ds[(1, 0)]
    assert s["image"].shape == (3, 64, 64)
    assert files.bg[1].name in caplog.text


# ---------------------------------------------------------------------- sampling


def batches(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_splits_ranks_and_reshuffles_each_epoch():
    ranks = [data.TrainSampler(10, 2, num_replicas=2, rank=r, seed=0) for r in range(2)]
    per_rank = [batches(s, 4) for s in ranks]  # 10 // 2 = 5 per rank -> 2 batches per epoch
    for e in (0, 1):
        seen = [i for r in range(2) for b in per_rank[r][2 * e : 2 * e + 2] for i, ep in b]
        assert len(set(seen)) == 8 and all(
            ep == e for r in range(2) for b in per_rank[r][2 * e : 2 * e + 2] for _, ep in b
        )
    epoch0 = [i for b in per_rank[0][:2] for i, _ in b]
    epoch1 = [i for b in per_rank[0][2:] for i, _ in b]
    assert epoch0 != epoch1


def test_sampler_resumes_where_it_stopped():
    straight = batches(data.TrainSampler(11, 3, seed=4), 9)
    resumed = batches(data.TrainSampler(11, 3, seed=4, start_batch=5), 4)
    assert resumed == straight[5:]


def test_loader_is_the_same_with_workers(dataset_dir):
    ds = data.MattingDataset(data.find_dataset(dataset_dir), 64, seed=0)

    def first(workers):
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=data.TrainSampler(len(ds), 2, seed=0), num_workers=workers
        )
        it = iter(loader)
        return [next(it) for _ in range(3)]

    for x, y in zip(first(0), first(2)):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
