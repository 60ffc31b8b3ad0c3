"""``torch.export`` of the fast path: one program file for every image size, run by a
process that imports only ``torch`` and ``mematte_kernels``, equal to the eager model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mematte import FastMEMatte, FastViTMatte
from mematte.export.torch_program import export_program, package_aoti

REPO = Path(__file__).resolve().parents[1]
# A grid of exactly one 14-token window (224² px, 196 tokens), one of several windows off the
# 32-px grid (512 tokens), and one of a single window, off the grid, narrower than tall (24).
SIZES = [(224, 224), (240, 470), (70, 45)]
# Under the routed counts of the larger sizes and over the smallest's token count: one file
# applies the cap at some sizes and not at others.
MAX_TOKENS = 30

RUN_PROGRAM = """
import json, sys, torch, mematte_kernels
import mematte_kernels.triton.varlen_attention  # ops of the same namespace must not displace the program's
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
exported = torch.export.load(sys.argv[1])
program = exported.module()
errors = []
for inputs in sys.argv[2:]:
    image, trimap, expected = torch.load(inputs)
    alpha = program(image, trimap)
    errors.append([list(alpha.shape), (alpha - expected).abs().max().item()])
nonzero = [node.meta["val"].shape[0] for node in exported.graph.nodes if node.target is torch.ops.aten.nonzero.default]
print(json.dumps({"errors": errors, "mematte imported": "mematte" in sys.modules,
                  "nonzero counts unbacked": [bool(free_unbacked_symbols(n)) for n in nonzero]}))
"""


def shallow(model):
    """``model`` with four of its twelve blocks (window, global, window, global) and, for
    MEMatte, the two routers of its global blocks: every kind of block at a third of the
    export time."""
    backbone = model.backbone
    backbone.blocks = nn.ModuleList(backbone.blocks[i] for i in (1, 2, 3, 5))
    if isinstance(model, FastMEMatte):
        backbone.routers = backbone.routers[:2]
    return model


@pytest.fixture(scope="module", params=[FastMEMatte, FastViTMatte], ids=lambda cls: cls.__name__)
def exported(request, tmp_path_factory):
    """What a fresh process finds running the model's program file at each size, and (MEMatte)
    the eager model's routed token counts per block at each size."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param.__name__)
    model = shallow(request.param("vit_s"))
    if isinstance(model, FastMEMatte):
        model.max_tokens = MAX_TOKENS
    path = export_program(model, folder / "model.pt2", max_tokens=getattr(model, "max_tokens", None))
    inputs, routed = [], []
    for H, W in SIZES:
        image, trimap = torch.rand(1, 3, H, W), torch.rand(1, 1, H, W)
        outputs = model({"image": image, "trimap": trimap})
        alpha, decisions = (outputs[0]["phas"], outputs[2]) if isinstance(outputs, tuple) else (outputs["phas"], [])
        inputs.append(folder / f"{H}x{W}.pt")
        torch.save((image, trimap, alpha), inputs[-1])
        routed.append([int(d.sum()) for d in decisions])
    done = subprocess.run(
        [sys.executable, "-c", RUN_PROGRAM, path, *inputs], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), routed


def test_a_fresh_process_runs_the_file_at_every_size(exported):
    """``torch.export.load`` and a run with the package's model code never imported: alpha
    within 1e-5 of the eager fast path's at every size, from the one file."""
    result, _ = exported
    assert not result["mematte imported"]
    for (H, W), (shape, error) in zip(SIZES, result["errors"]):
        assert shape == [1, 1, H, W]
        assert error <= 1e-5, f"{H}x{W}: max |Δ| {error}"


def test_routed_token_counts_are_unbacked_sizes(exported):
    """MEMatte's routed tokens are ``nonzero`` of the decisions, one count per routed block
    that the program learns only when it runs; ViTMatte's program has no such count."""
    result, routed = exported
    if routed[0]:
        assert result["nonzero counts unbacked"] == [True, True]
        # The sizes route different counts, the cap binding at the larger ones only.
        assert routed[:2] == [[MAX_TOKENS] * 2] * 2 and all(0 < n < MAX_TOKENS for n in routed[2])
    else:
        assert result["nonzero counts unbacked"] == []


RUN_PACKAGE = """
import json, sys, torch, mematte_kernels
program = torch._inductor.aoti_load_package(sys.argv[1])
errors = []
for inputs in sys.argv[2:]:
    image, trimap, expected = torch.load(inputs)
    alpha = program(image, trimap)
    errors.append([list(alpha.shape), (alpha - expected).abs().max().item()])
print(json.dumps({"errors": errors, "mematte imported": "mematte" in sys.modules}))
"""


@pytest.mark.skipif(not os.environ.get("MEMATTE_TEST_AOTI"), reason="compiles for minutes; MEMATTE_TEST_AOTI=1 runs it")
@pytest.mark.parametrize("cls", [FastMEMatte, FastViTMatte], ids=lambda cls: cls.__name__)
def test_an_aoti_package_runs_in_a_fresh_process_at_every_size(cls, tmp_path):
    torch.manual_seed(0)
    model = shallow(cls("vit_s"))
    if isinstance(model, FastMEMatte):
        model.max_tokens = MAX_TOKENS
    path = package_aoti(model, tmp_path / "model.pt2", max_tokens=getattr(model, "max_tokens", None))
    inputs = []
    for H, W in SIZES:
        image, trimap = torch.rand(1, 3, H, W), torch.rand(1, 1, H, W)
        outputs = model({"image": image, "trimap": trimap})
        inputs.append(tmp_path / f"{H}x{W}.pt")
        torch.save((image, trimap, (outputs[0] if isinstance(outputs, tuple) else outputs)["phas"]), inputs[-1])
    done = subprocess.run(
        [sys.executable, "-c", RUN_PACKAGE, path, *inputs], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert not result["mematte imported"]
    for (H, W), (shape, error) in zip(SIZES, result["errors"]):
        assert shape == [1, 1, H, W]
        assert error <= 1e-5, f"{H}x{W}: max |Δ| {error}"


@pytest.fixture
def saved_by(monkeypatch):
    """Export with the trace skipped and ``torch.export.save`` replaced by the given writer."""

    def use(save):
        monkeypatch.setattr(torch.export, "save", save)
        monkeypatch.setattr("mematte.export.torch_program.trace", lambda model, max_tokens: None)

    return use


def test_a_failed_save_leaves_the_old_file_and_no_other(tmp_path, saved_by):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous")

    def fail(program, f):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    saved_by(fail)
    with pytest.raises(OSError, match="disk full"):
        export_program(FastViTMatte("vit_s"), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_a_saved_file_replaces_the_old_one_with_the_usual_permissions(tmp_path, saved_by):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous")
    saved_by(lambda program, f: Path(f).write_bytes(b"program"))
    umask = os.umask(0o022)
    try:
        assert export_program(FastViTMatte("vit_s"), path) == path
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"program"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_other_models_are_refused():
    with pytest.raises(TypeError, match="FastMEMatte or FastViTMatte"):
        export_program(nn.Linear(2, 2), "unused.pt2")


def test_export_command_writes_a_program_from_a_checkpoint(checkpoint, tmp_path):
    """``mematte export CKPT OUT.pt2``: the program of the checkpoint's model, one file,
    equal to the model the checkpoint loads into."""
    import contextlib
    import io

    from mematte.cli import main
    from mematte.vitmatte import load_matting_model

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["export", str(checkpoint), str(tmp_path / "model.pt2")])
    assert rc == 0, err.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]
    program = torch.export.load(tmp_path / "model.pt2").module()
    model = load_matting_model(checkpoint, backend="reference")
    torch.manual_seed(1)
    image, trimap = torch.rand(1, 3, 61, 90), torch.rand(1, 1, 61, 90)
    expected = model({"image": image, "trimap": trimap})[0]["phas"]
    assert (program(image, trimap) - expected).abs().max().item() <= 1e-5
