"""Every Python block of the README and docs/ runs as written on a CPU, and every relative
link of those pages resolves.

A page's blocks run in order in one namespace (a reader goes top to bottom), in a folder
holding the files the snippets name: random-weight checkpoints built from the configs and a
small photo with its trimap. A block whose info string carries a title in SKIPPED_TITLES
(```python title="gpu"```) needs what this test cannot give — a GPU, torchrun, or most of
its time budget (title="slow": exports of a whole model, which tests/test_export_*.py run
end to end) — and is not run.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mematte import FastMEMatte, FastViTMatte, hf

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
SKIPPED_TITLES = {"gpu", "torchrun", "slow"}
# Libraries of the optional extras: a page that imports one is skipped where it is missing.
OPTIONAL = {"transformers", "timm", "onnx", "onnxruntime", "fastapi", "matplotlib"}

BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[tuple[str, str]]:
    """(info string after ```python, code) of each Python block of ``page``."""
    return [(m.group(1).strip(), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def runnable(info: str) -> bool:
    title = re.search(r'title="([^"]*)"', info)
    return not (title and title.group(1) in SKIPPED_TITLES)


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


PAGES_WITH_CODE = [p for p in PAGES if any(runnable(info) for info, _ in python_blocks(p))]


def _photo(size=(192, 128)) -> tuple[Image.Image, Image.Image]:
    """A small photo and its trimap: the demo photo resized, or a synthetic pair without it."""
    if (PHOTOS / "retriever_rgb.png").exists():
        image = Image.open(PHOTOS / "retriever_rgb.png").convert("RGB").resize(size, Image.BILINEAR)
        trimap = Image.open(PHOTOS / "retriever_trimap.png").convert("L").resize(size, Image.NEAREST)
        return image, trimap
    g = np.random.default_rng(0)
    w, h = size
    image = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    trimap = np.where(r < h / 4, 255, np.where(r < h / 3, 128, 0)).astype(np.uint8)
    return image, Image.fromarray(trimap)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the snippets name, built once."""
    folder = tmp_path_factory.mktemp("snippet-files")
    torch.manual_seed(0)
    torch.save({"model": FastMEMatte("vit_s").state_dict()}, folder / "MEMatte_ViTS_DIM.pth")
    vitmatte = FastViTMatte("vit_s").state_dict()
    torch.save({"model": vitmatte}, folder / "ViTMatte_S_Com.pth")
    from safetensors.torch import save_file

    hf_dir = folder / "vitmatte-small-composition-1k"
    hf_dir.mkdir()
    save_file({k: v.contiguous() for k, v in hf.hf_from_upstream(vitmatte).items()}, hf_dir / "model.safetensors")
    (hf_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vitmatte",
                "architectures": ["VitMatteForImageMatting"],
                "hidden_size": 384,
                "convstream_hidden_sizes": [48, 96, 192],
                "fusion_hidden_sizes": [256, 128, 64, 32],
                "backbone_config": {
                    "model_type": "vitdet",
                    "hidden_size": 384,
                    "num_attention_heads": 6,
                    "num_hidden_layers": 12,
                    "num_channels": 4,
                    "patch_size": 16,
                    "image_size": 512,
                    "window_size": 14,
                    "window_block_indices": [0, 1, 3, 4, 6, 7, 9, 10],
                    "residual_block_indices": [2, 5, 8, 11],
                    "use_relative_position_embeddings": True,
                    "out_features": ["stage12"],
                    "out_indices": [12],
                },
            }
        )
    )
    shutil.copy(hf_dir / "model.safetensors", folder / "model.safetensors")

    image, trimap = _photo()
    image.save(folder / "photo.png")
    trimap.save(folder / "photo_trimap.png")
    t = np.asarray(trimap)
    Image.fromarray(np.where(t > 64, 255, 0).astype(np.uint8)).save(folder / "photo_mask.png")
    Image.fromarray(np.where(t == 128, 100, t).astype(np.uint8)).save(folder / "photo_gt_alpha.png")
    return folder


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_page_id)
def test_python_blocks_run_as_written(page, files, tmp_path, monkeypatch):
    blocks = [code for info, code in python_blocks(page) if runnable(info)]
    for module in sorted(OPTIONAL):
        if any(re.search(rf"^\s*(import|from) {module}\b", code, re.M) for code in blocks):
            pytest.importorskip(module)
    for path in files.iterdir():
        (tmp_path / path.name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__snippet__"}
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{_page_id(page)}, Python block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{_page_id(page)}: Python block {number} fails: {e!r}\n{code}") from e


def test_the_pages_run_some_code_and_skip_only_marked_blocks():
    """The extraction finds the blocks: a regex that matched nothing would pass vacuously."""
    assert {"README.md", "docs/python.md", "docs/kernels.md"} <= set(map(_page_id, PAGES_WITH_CODE))
    for page in PAGES:
        text = page.read_text()
        assert text.count("```python") == len(python_blocks(page)), f"{_page_id(page)}: unclosed block"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs; anchors within the page
        path, _, anchor = target.partition("#")
        linked = page.parent / path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{_page_id(page)} links to missing files: {broken}"
