"""fp32 means fp32: an inference forward turns TF32 off for matmuls and convolutions and
gives the caller's settings back, also on error; ``allow_tf32`` opts out. And GPUs without
bf16 (Turing, compute capability 7.5) refuse bfloat16 and get float16 from ``auto``.

The flags are process-wide settings that need no GPU to read, so every check runs on the
CPU; the GPU's properties are mocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mematte import FastMEMatte, api, precision
from mematte.model import MattingModel
from mematte.vitmatte import FastViTMatte

MATMUL, CUDNN = torch.backends.cuda.matmul, torch.backends.cudnn


def tf32_flags() -> tuple[bool, bool]:
    return MATMUL.allow_tf32, CUDNN.allow_tf32


@pytest.fixture
def caller_allows_tf32():
    """The caller has TF32 on for both (as code tuned for speed sets it)."""
    saved = tf32_flags()
    MATMUL.allow_tf32 = CUDNN.allow_tf32 = True
    yield
    MATMUL.allow_tf32, CUDNN.allow_tf32 = saved


@pytest.fixture
def flags_seen_inside():
    """The TF32 flags as every module inside a model finds them (the model's own hook runs
    after its forward has returned)."""
    seen = []

    def record(module, inputs, output):
        if not isinstance(module, MattingModel):
            seen.append(tf32_flags())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


def batch(size=48):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=generator)
    trimap = torch.full((1, 1, size, size), 0.5)
    return {"image": image, "trimap": trimap}


MODELS = [pytest.param(FastMEMatte, id="mematte"), pytest.param(FastViTMatte, id="vitmatte")]


@pytest.mark.parametrize("cls", MODELS)
def test_fp32_forward_runs_without_tf32_and_restores_the_callers_flags(cls, caller_allows_tf32, flags_seen_inside):
    model = cls("vit_s", backend="reference")
    model(batch())
    assert len(flags_seen_inside) > 10  # patch embedding, blocks, decoder...
    assert set(flags_seen_inside) == {(False, False)}
    assert tf32_flags() == (True, True)


@pytest.mark.parametrize("cls", MODELS)
def test_allow_tf32_leaves_the_callers_flags_in_force(cls, caller_allows_tf32, flags_seen_inside):
    model = cls("vit_s", backend="reference", allow_tf32=True)
    model(batch())
    assert flags_seen_inside and set(flags_seen_inside) == {(True, True)}
    assert tf32_flags() == (True, True)


@pytest.mark.parametrize("cls", MODELS)
def test_flags_are_restored_when_the_forward_raises(cls, caller_allows_tf32):
    model = cls("vit_s", backend="reference")
    seen = []

    def fail(module, inputs):
        seen.append(tf32_flags())
        raise RuntimeError("out of memory in the backbone")

    model.backbone.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory in the backbone"):
        model(batch())
    assert seen == [(False, False)]
    assert tf32_flags() == (True, True)


def test_nested_scopes_restore_once_the_outermost_ends(caller_allows_tf32):
    with precision.tf32_off():
        with precision.tf32_off():
            assert tf32_flags() == (False, False)
        assert tf32_flags() == (False, False)  # the outer scope is still open
    assert tf32_flags() == (True, True)


def test_a_caller_off_stays_off(flags_seen_inside):
    saved = tf32_flags()
    MATMUL.allow_tf32, CUDNN.allow_tf32 = False, True  # PyTorch's defaults
    try:
        with precision.tf32_off():
            assert tf32_flags() == (False, False)
        assert tf32_flags() == (False, True)
    finally:
        MATMUL.allow_tf32, CUDNN.allow_tf32 = saved


def test_a_caller_on_the_fp32_precision_api_gets_its_settings_back():
    """PyTorch refuses to read the old flags once the new API set them, so the scope must
    switch through the API the caller used. In a fresh process: the mix sticks."""
    code = textwrap.dedent("""
        import torch
        from mematte import precision
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        with precision.tf32_off():
            print(matmul.fp32_precision, conv.fp32_precision)
        print(matmul.fp32_precision, conv.fp32_precision)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    inside, after = done.stdout.splitlines()
    assert "tf32" not in inside.split(), inside  # "ieee", or "none": inherited, not TF32
    assert after.split() == ["tf32", "tf32"]


@pytest.mark.parametrize(
    "flag, inside", [([], (False, False)), (["--allow-tf32"], (True, True))], ids=["default", "allow-tf32"]
)
def test_cli_predict_runs_fp32_without_tf32_unless_allowed(
    tmp_path, checkpoint, caller_allows_tf32, flags_seen_inside, flag, inside
):
    """--allow-tf32 reaches the model through load_model and from_checkpoint."""
    from test_cli import run, single

    img, tri = single(tmp_path)
    rc, _, stderr = run(
        "predict",
        img,
        "--trimap",
        tri,
        "--checkpoint",
        checkpoint,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--backend",
        "reference",
        "-o",
        tmp_path / "out",
        *flag,
    )
    assert rc == 0, stderr
    assert flags_seen_inside and set(flags_seen_inside) == {inside}


# ---------------------------------------------------------------------- GPUs without bf16


@pytest.fixture
def turing(monkeypatch):
    """A GeForce 2080 Ti: compute capability 7.5, fp16 tensor cores, no bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 2080 Ti")


@pytest.fixture
def ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))


def test_bf16_on_turing_is_refused_naming_the_gpu(turing):
    with pytest.raises(
        ValueError,
        match=r"bfloat16 needs a GPU of compute capability 8\.0 or newer; "
        r"NVIDIA GeForce RTX 2080 Ti is 7\.5: use float16",
    ):
        api.resolve_dtype("bfloat16", torch.device("cuda"))
    with pytest.raises(ValueError, match="bfloat16 needs a GPU"):
        api.resolve_dtype(torch.bfloat16, torch.device("cuda:0"))


def test_load_model_refuses_bf16_on_turing_before_reading_weights(turing, tmp_path):
    not_a_checkpoint = tmp_path / "weights.pth"
    not_a_checkpoint.write_bytes(b"never read")
    with pytest.raises(ValueError, match="bfloat16 needs a GPU"):
        api.load_model(not_a_checkpoint, device="cuda", dtype="bfloat16", backend="reference")


def test_cli_refuses_bf16_on_turing_as_a_usage_error(turing, tmp_path, checkpoint):
    from test_cli import run, single

    img, tri = single(tmp_path)
    rc, _, stderr = run(
        "predict",
        img,
        "--trimap",
        tri,
        "--checkpoint",
        checkpoint,
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
        "--backend",
        "reference",
        "-o",
        tmp_path / "out",
    )
    assert rc == 2
    assert "bfloat16 needs a GPU of compute capability 8.0 or newer" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_auto_dtype_is_float16_on_turing(turing, backend):
    assert api.resolve_dtype("auto", torch.device("cuda"), backend) == torch.float16
    assert api.resolve_dtype("float16", torch.device("cuda"), backend) == torch.float16
    assert api.resolve_dtype("float32", torch.device("cuda"), backend) == torch.float32


def test_bf16_and_auto_on_ampere_are_unchanged(ampere):
    assert api.resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert api.resolve_dtype("auto", torch.device("cuda")) == torch.float32


def test_the_cpu_always_has_bf16(turing):
    assert precision.has_bf16(torch.device("cpu"))
    assert api.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
