"""``mematte.accelerate`` on HF transformers' ViTMatte/ViTDet and timm's SAM ViT: the
accelerated model's outputs against the same model unaccelerated (the peer is the oracle),
in fp32 and bf16, with gradients, and the switch back."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import mematte

from peer_models import hf_inputs, hf_vitmatte, relative_error, timm_sam, vitdet_config

pytest.importorskip("transformers")
pytest.importorskip("timm")

# HF processor sizes (height, width): padded to multiples of 32 by the processor, except the
# first, whose grid is cut into windows with padding.
HF_SIZES = [(200, 296), (256, 256), (320, 448)]


@pytest.fixture(scope="module")
def vitmatte():
    return hf_vitmatte(seed=0)


def accelerated(model: nn.Module, **kwargs) -> nn.Module:
    return mematte.accelerate(copy.deepcopy(model), **kwargs)


def alpha_errors(alpha: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    delta = (alpha.float() - expected.float()).abs()
    return float(delta.mean()), float(delta.max())


# ------------------------------------------------------------------------ transformers


@pytest.mark.parametrize("size", HF_SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_hf_vitmatte_alpha_equals_unaccelerated(vitmatte, size):
    inputs = hf_inputs(*size)
    with torch.inference_mode():
        expected = vitmatte(**inputs).alphas
        alpha = accelerated(vitmatte)(**inputs).alphas
    assert alpha.shape == expected.shape == (1, 1, *inputs.pixel_values.shape[-2:])
    mean, worst = alpha_errors(alpha, expected)
    assert mean <= 1e-5 and worst <= 1e-3, f"mean |Δ| {mean:.2e}, max {worst:.2e}"


def test_hf_vitmatte_decoder_in_strips_equals_whole_image(vitmatte, monkeypatch):
    from mematte.peers import hf_vitdet

    inputs = hf_inputs(640, 384)  # strips of 16 rows + 2 × 64 rows of context: 40 strips
    monkeypatch.setattr(hf_vitdet, "STRIP_PIXELS", 384 * (16 + 2 * 64))
    fast = accelerated(vitmatte)
    with torch.inference_mode():
        expected = vitmatte(**inputs).alphas
        mean, worst = alpha_errors(fast(**inputs).alphas, expected)
        assert mean <= 1e-6 and worst <= 1e-5, f"mean |Δ| {mean:.2e}, max {worst:.2e}"
        # Too little context shows at the seams: the strips above were really cut.
        monkeypatch.setattr(hf_vitdet, "STRIP_CONTEXT", 16)
        assert alpha_errors(fast(**inputs).alphas, expected)[1] > 1e-3


def test_hf_vitmatte_alpha_depends_on_the_attention(vitmatte):
    # The parity above could not tell a wrong position table from a right one if the alpha
    # ignored the attention: one global table reversed moves it far beyond the tolerance.
    inputs = hf_inputs(256, 256)
    changed = copy.deepcopy(vitmatte)
    global_attention = changed.backbone.encoder.layer[-1].attention
    with torch.no_grad():
        global_attention.rel_pos_h.copy_(global_attention.rel_pos_h.flip(0))
    with torch.inference_mode():
        mean, _ = alpha_errors(changed(**inputs).alphas, vitmatte(**inputs).alphas)
    assert mean > 1e-3


def test_hf_vitmatte_bf16_error_within_twice_hf_bf16(vitmatte):
    inputs = hf_inputs(256, 320)
    pixels = inputs.pixel_values.bfloat16()
    eager = copy.deepcopy(vitmatte).bfloat16()
    with torch.inference_mode():
        expected = vitmatte(**inputs).alphas
        eager_mean, eager_max = alpha_errors(eager(pixel_values=pixels).alphas, expected)
        mean, worst = alpha_errors(accelerated(eager)(pixel_values=pixels).alphas, expected)
    assert eager_mean > 0  # bf16 differs from fp32 at all: the bound below means something
    assert mean <= 2 * eager_mean, f"mean |Δ| {mean:.2e} vs HF bf16's {eager_mean:.2e}"
    assert worst <= 2 * eager_max, f"max |Δ| {worst:.2e} vs HF bf16's {eager_max:.2e}"


def test_hf_output_attentions_runs_hf_attention_for_that_call(vitmatte):
    inputs = hf_inputs(128, 160)
    fast = accelerated(vitmatte)
    with torch.inference_mode():
        expected = vitmatte(**inputs, output_attentions=True)
        got = fast(**inputs, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) == 4
    for maps, expected_maps in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    torch.testing.assert_close(got.alphas, expected.alphas, rtol=0, atol=0)
    layer = fast.backbone.encoder.layer[1]
    assert "forward" in vars(layer.attention)  # still accelerated for the next call


@pytest.mark.parametrize("relative_position", [True, False], ids=["relative-position", "no-position-terms"])
@pytest.mark.parametrize("model_class", ["VitDetModel", "VitDetBackbone"])
def test_hf_vitdet_features_equal_unaccelerated(model_class, relative_position):
    import transformers

    from peer_models import seeded_init

    # Tables learned for 128² (8×8 tokens), upsized for the 14×18 grid (the ViTMatte cases
    # above shrink theirs).
    config = vitdet_config(layers=2, relative_position=relative_position, num_channels=3, image_size=128)
    model = seeded_init(getattr(transformers, model_class)(config), seed=1)
    pixels = torch.randn(1, 3, 224, 288, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(pixels)[0]
        got = accelerated(model)(pixels)[0]
    expected, got = (t[0] if isinstance(t, tuple) else t for t in (expected, got))
    assert relative_error(got, expected) <= 1e-5


def test_hf_vitmatte_gradients_equal_unaccelerated():
    model = hf_vitmatte(seed=2, layers=2).train()
    fast = accelerated(model)
    inputs = hf_inputs(96, 128, seed=2)
    weights = torch.rand(inputs.pixel_values.shape[-2:], generator=torch.Generator().manual_seed(2))
    for m in (model, fast):
        (m(**inputs).alphas * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        assert relative_error(q.grad, p.grad) <= 1e-4, name


def test_hf_disable_puts_original_forwards_back(vitmatte):
    inputs = hf_inputs(128, 128)
    model = copy.deepcopy(vitmatte)
    attentions = [layer.attention for layer in model.backbone.encoder.layer]
    assert mematte.accelerate(model) is model
    assert all("forward" in vars(a) for a in [*attentions, model.decoder])
    first = attentions[0].forward
    mematte.accelerate(model, backend="reference")  # already accelerated: left as it is
    assert attentions[0].forward == first and attentions[0]._mematte_backend == "auto"
    copied = copy.deepcopy(model)  # a copy's forwards are bound to the copy's modules
    assert all(layer.attention.forward.__self__ is layer.attention for layer in copied.backbone.encoder.layer)
    assert mematte.accelerate(model, enabled=False) is model
    assert not any("forward" in vars(a) or hasattr(a, "_mematte_backend") for a in attentions)
    assert "forward" not in vars(model.decoder)
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).alphas, vitmatte(**inputs).alphas, rtol=0, atol=0)


# ------------------------------------------------------------------------------- timm

# (img_size the model is built for, input height, width): the last is a non-square input
# the model resizes its position embedding and tables for.
TIMM_CASES = [(256, 256, 256), (512, 512, 512), (256, 192, 320)]


@pytest.mark.parametrize("img_size,height,width", TIMM_CASES, ids=["256", "512", "dynamic-192x320"])
def test_timm_sam_features_equal_unaccelerated(img_size, height, width):
    model = timm_sam(img_size=img_size, seed=3)
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model.forward_features(image)
        got = accelerated(model).forward_features(image)
    assert got.shape == expected.shape == (1, 256, height // 16, width // 16)
    assert relative_error(got, expected) <= 1e-4


@pytest.mark.parametrize("name,kwargs", [
    ("samvit_large_patch16", {}),
    ("samvit_huge_patch16", {}),  # head dim 80: the kernels' general path
    ("samvit_base_patch16", {"qk_norm": True}),
], ids=["large", "huge", "base-qk-norm"])  # fmt: skip
def test_timm_sam_variants_equal_unaccelerated(name, kwargs):
    model = timm_sam(name, img_size=224, depth=2, seed=4, **kwargs)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model.forward_features(image)
        got = accelerated(model).forward_features(image)
    assert relative_error(got, expected) <= 1e-4


def test_timm_sam_bf16_error_within_twice_timm_bf16():
    model = timm_sam(img_size=256, seed=5)
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    eager = copy.deepcopy(model).bfloat16()
    with torch.inference_mode():
        expected = model.forward_features(image)
        eager_error = relative_error(eager.forward_features(image.bfloat16()), expected)
        error = relative_error(accelerated(eager).forward_features(image.bfloat16()), expected)
    assert 0 < eager_error and error <= 2 * eager_error, f"{error:.2e} vs timm bf16's {eager_error:.2e}"


def test_timm_sam_gradients_equal_unaccelerated():
    model = timm_sam(img_size=128, depth=2, seed=6).train()
    fast = accelerated(model)
    image = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(6))
    for m in (model, fast):
        m.forward_features(image).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert relative_error(q.grad, p.grad) <= 1e-4, name


def test_timm_attention_dropout_in_training_runs_timm_attention():
    model = timm_sam(img_size=128, depth=2, seed=7, attn_drop_rate=0.5).train()
    fast = accelerated(model)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    outputs = []
    for m in (model, fast):
        torch.manual_seed(0)  # the same dropout masks
        outputs.append(m.forward_features(image))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------ misuse


def test_unsupported_model_raises_type_error_naming_it_and_the_supported():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*VitMatteForImageMatting.*samvit"):
        mematte.accelerate(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mematte.accelerate("model")


def test_unknown_backend_raises(vitmatte):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        mematte.accelerate(copy.deepcopy(vitmatte), backend="fast")


def test_importing_mematte_imports_neither_transformers_nor_timm():
    code = ("import sys, mematte; mematte.accelerate; "
            "print(sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
