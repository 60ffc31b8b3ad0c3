"""ONNX export: one file per model, checked against the PyTorch reference backend (fp32)
at several sizes in ONNX Runtime's CPU provider, and the ``mematte export`` command."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mematte import FastMEMatte, FastViTMatte  # noqa: E402
from mematte.cli import main  # noqa: E402
from mematte.export import atomic_output, export_onnx  # noqa: E402

from parity import synth  # noqa: E402

MODELS = {"mematte": (FastMEMatte, "mematte_vit_s"), "vitmatte": (FastViTMatte, "vitmatte_vit_s")}
# MEMatte's cap on routed tokens in the exported file: the seeded routers send at most 237 of
# 400 tokens at 320×320 (under it) and up to 764 of 1472 at 512×736 (over it, so the graph's
# TopK must keep the tokens the reference keeps).
CAP = 300


def seeded(kind: str, **kwargs):
    cls, weights = MODELS[kind]
    model = cls("vit_s", backend="reference", **kwargs)
    model.load_state_dict(synth.weights(weights), strict=True)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (reference model, ONNX path, its session), exported once: every size runs
    from this file."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for kind in MODELS:
        model = seeded(kind, **({"max_tokens": CAP} if kind == "mematte" else {}))
        path = export_onnx(model, folder / f"{kind}.onnx", max_tokens=CAP)
        out[kind] = model, path, session(path)
    return out


def session(path, **options):
    so = ort.SessionOptions()
    for name, value in options.items():
        setattr(so, name, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(height, width):
    image, trimap = synth.inputs(height, width)
    return image, trimap, {"image": image.numpy(), "trimap": trimap.numpy()}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("height, width", [(320, 320), (512, 736)], ids=["320x320", "512x736"])
def test_onnx_runtime_matches_the_reference(exported, kind, height, width):
    model, _, onnx_session = exported[kind]
    image, trimap, inputs = feeds(height, width)
    outputs = onnx_session.run(None, inputs)
    reference = model({"image": image, "trimap": trimap})
    alpha = reference[0]["phas"] if kind == "mematte" else reference["phas"]
    assert outputs[0].shape == (1, 1, height, width)
    assert np.abs(outputs[0] - alpha.numpy()).mean() <= 1e-4
    if kind == "mematte":
        decisions = torch.stack([d[0, ..., 0] for d in reference[2]]).numpy()
        assert outputs[1].shape == decisions.shape
        assert (outputs[1] == decisions).mean() >= 0.995
        assert 0 < decisions.mean() < 1  # routing is exercised both ways
        routed = decisions.reshape(len(decisions), -1).sum(1)
        assert routed.max() <= CAP and (routed.max() == CAP) == (height == 512)


@pytest.mark.parametrize("kind", MODELS)
def test_graph_is_standard_onnx(exported, kind):
    _, path, _ = exported[kind]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)

    def domains(graph):
        for node in graph.node:
            yield node.domain
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from domains(attr.g)

    assert set(domains(model.graph)) == {""}
    assert [i.name for i in model.graph.input] == ["image", "trimap"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [[1, 3, "height", "width"], [1, 1, "height", "width"]]


@pytest.mark.parametrize("kind", MODELS)
def test_no_tensor_is_quadratic_in_the_tokens(exported, tmp_path, kind):
    """Every node's output shape, Loop and If bodies included (ONNX Runtime's profile), at
    640×640: N = 1600 tokens, more than any channel count, all of them routed to global
    attention. No tensor has two axes as long as N: attention runs over strips of queries."""
    if kind == "mematte":
        model = seeded(kind, max_tokens=None)
        with torch.no_grad():
            for router in model.backbone.routers:  # every token global
                router.out_conv[4].bias[0] += 1e4
        path = export_onnx(model, tmp_path / "m.onnx", max_tokens=None)
    else:
        path = exported[kind][1]
    sess = session(path, enable_profiling=True, profile_file_prefix=str(tmp_path / "profile"))
    outputs = sess.run(None, feeds(640, 640)[2])
    if kind == "mematte":
        assert outputs[1].all()
    events = json.loads(open(sess.end_profiling()).read())
    shapes = [
        (event["args"]["op_name"], dims)
        for event in events
        if event.get("cat") == "Node" and "output_type_shape" in event.get("args", {})
        for output in event["args"]["output_type_shape"]
        for dims in output.values()
    ]
    tokens = 40 * 40
    assert any(op == "MatMul" and tokens in dims for op, dims in shapes)  # the attention ran
    quadratic = [(op, dims) for op, dims in shapes if sum(d >= tokens for d in dims) >= 2]
    assert not quadratic


def test_float16_export_runs_in_onnx_runtime(exported, tmp_path):
    model, _, _ = exported["vitmatte"]
    path = export_onnx(model, tmp_path / "half.onnx", dtype=torch.float16)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for t in onnx.load(str(path)).graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    # Only LayerNorm affines and the position tables, resized in fp32, stay fp32.
    assert sizes[onnx.TensorProto.FLOAT16] > 20 * sizes[onnx.TensorProto.FLOAT]
    image, trimap, inputs = feeds(320, 320)
    alpha = session(path).run(None, inputs)[0]
    assert alpha.dtype == np.float32 and np.isfinite(alpha).all()
    assert np.abs(alpha - model({"image": image, "trimap": trimap})["phas"].numpy()).mean() <= 1e-2


def test_export_refuses_bad_arguments(exported, tmp_path):
    model, _, _ = exported["vitmatte"]
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(model, tmp_path / "m.onnx", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=12)
    with pytest.raises(TypeError, match="FastMEMatte or FastViTMatte"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".onnx"
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_importing_mematte_does_not_import_onnx():
    code = (
        "import sys, mematte, mematte.export; f = mematte.export_onnx; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ the command


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", *map(str, argv)])
    return rc, err.getvalue()


def test_export_command_writes_one_file(checkpoint, tmp_path):
    rc, err = run(checkpoint, tmp_path / "m.onnx", "--opset", 18)
    assert rc == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.opset_import[0].version == 18
    assert [o.name for o in model.graph.output] == ["alpha", "decisions"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing checkpoint", "no such file"),
        ("damaged checkpoint", "cannot load"),
        ("unknown suffix", "cannot tell the format"),
        ("unknown format", "invalid choice"),
        ("missing folder", "does not exist"),
        ("output is a folder", "is a folder"),
        ("opset too old", "--opset 12"),
        ("dtype for torch", "ONNX options"),
    ],
)
def test_export_command_refuses_before_any_work(checkpoint, tmp_path, monkeypatch, case, message):
    import mematte.export.onnx_graph as onnx_graph

    def no_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(onnx_graph, "build_model", no_export)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    argv = {
        "missing checkpoint": (tmp_path / "nope.pth", tmp_path / "m.onnx"),
        "damaged checkpoint": (damaged, tmp_path / "m.onnx"),
        "unknown suffix": (checkpoint, tmp_path / "m.xyz"),
        "unknown format": (checkpoint, tmp_path / "m.onnx", "--format", "tflite"),
        "missing folder": (checkpoint, tmp_path / "no" / "m.onnx"),
        "output is a folder": (checkpoint, tmp_path, "--format", "onnx"),
        "opset too old": (checkpoint, tmp_path / "m.onnx", "--opset", 12),
        "dtype for torch": (checkpoint, tmp_path / "m.pt2", "--dtype", "float16"),
    }[case]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", *map(str, argv)])
    assert rc == 2
    assert message in err.getvalue()
    assert {p.name for p in tmp_path.iterdir()} <= {"damaged.pth"}


def test_export_command_failure_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    import mematte.export.onnx_graph as onnx_graph

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(onnx_graph, "build_model", failing)
    rc, err = run(checkpoint, tmp_path / "m.onnx")
    assert rc == 1 and "out of memory" in err
    assert not list(tmp_path.iterdir())


def test_export_command_without_onnx_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    rc, err = run(checkpoint, tmp_path / "m.onnx")
    assert rc == 2 and "mematte-kernels[export]" in err
    assert not list(tmp_path.iterdir())
