"""Every backend against the reference on the same weights: fp32 and bf16 parity, batch
independence, the token cap and predict behave the same everywhere."""

import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from mematte import FastMEMatte
from mematte_kernels import dispatch, ext
from mematte_kernels.triton import _common as triton_common

sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
import synth  # noqa: E402

needs_triton = pytest.mark.skipif(
    not (triton_common.INTERPRET or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


@cache
def weights():
    return synth.weights("mematte_vit_s", seed=7)


def build(backend, dtype=torch.float32, **kwargs):
    model = FastMEMatte("vit_s", backend=backend, dtype=dtype, **kwargs)
    model.load_state_dict(weights())
    return model


@cache
def run_cached(backend, dtype, h, w, batch=1):
    image, trimap = synth.inputs(h, w, seed=11)
    image, trimap = image.expand(batch, -1, -1, -1).clone(), trimap.expand(batch, -1, -1, -1).clone()
    if batch > 1:
        trimap[1:] = trimap[1:].flip(-1)  # a different routing per image
    with torch.inference_mode():
        outputs, scores, decisions = build(backend, dtype)({"image": image, "trimap": trimap})
    return outputs["phas"], decisions


def assert_alpha_close(alpha, ref_alpha, fp32):
    """fp32: mean and max as the published-parity bars; low precision: mean, and the 99.9th
    percentile so that a broken tile or seam cannot hide in the mean."""
    diff = (alpha - ref_alpha).abs().flatten()
    mean_bar = 1e-5 if fp32 else 5e-3
    assert diff.mean() <= mean_bar, f"alpha mean |diff| {diff.mean():.2e} > {mean_bar:.0e}"
    if fp32:
        assert diff.max() <= 5e-5, f"alpha max |diff| {diff.max():.2e} > 5e-05"
    else:
        p999 = torch.kthvalue(diff, int(0.999 * diff.numel())).values
        assert p999 <= 0.1, f"alpha 99.9th percentile |diff| {p999:.2e} > 0.1"


def compare(backend, dtype, h, w, agree_bar, min_routed=0):
    ref_alpha, ref_decisions = run_cached("reference", torch.float32, h, w)
    alpha, decisions = run_cached(backend, dtype, h, w)
    agreement = torch.cat([(a == b).flatten() for a, b in zip(decisions, ref_decisions)]).float().mean()
    routed = [int(d.sum()) for d in ref_decisions]
    assert min(routed) >= min_routed, f"routed {routed} tokens; the comparison needs more"
    assert_alpha_close(alpha, ref_alpha, fp32=dtype == torch.float32)
    assert agreement >= agree_bar, f"decisions agree on {agreement:.4f} < {agree_bar}"


def test_auto_resolves_to_the_cpu_fast_path_on_cpu():
    table = dispatch.resolve("auto", "cpu")
    assert table.name.startswith("cpu") and table is not dispatch.REFERENCE
    if ext.available("cpu"):
        assert table.dwconv_gelu is ext.dwconv_gelu and table.eca is ext.eca


def test_cpu_backend_fp32_matches_reference():
    compare("cpu", torch.float32, 512, 600, agree_bar=0.999)


def test_cpu_backend_bf16_matches_reference_on_thousands_of_routed_tokens():
    # 1024×1280 gives 66×82 tokens; the routers send 800 to 5,100 of them to attention.
    compare("cpu", torch.bfloat16, 1024, 1280, agree_bar=0.98, min_routed=700)


@needs_triton
def test_triton_backend_fp32_matches_reference():
    compare("triton", torch.float32, 224, 256, agree_bar=0.999)


@needs_triton
def test_triton_backend_bf16_matches_reference():
    compare("triton", torch.bfloat16, 224, 256, agree_bar=0.98)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_backend_matches_reference(dtype):
    ref_alpha, ref_decisions = run_cached("reference", torch.float32, 1024, 1280)
    image, trimap = synth.inputs(1024, 1280, seed=11)
    model = build("cuda", dtype).cuda()
    with torch.inference_mode():
        outputs, _, decisions = model({"image": image.cuda(), "trimap": trimap.cuda()})
    agreement = torch.cat([(a.cpu() == b).flatten() for a, b in zip(decisions, ref_decisions)]).float().mean()
    fp32 = dtype == torch.float32
    assert_alpha_close(outputs["phas"].cpu(), ref_alpha, fp32)
    assert agreement >= (0.999 if fp32 else 0.98)


@pytest.mark.parametrize(
    "backend, size",
    [("reference", (200, 232)), ("cpu", (200, 232)), pytest.param("triton", (96, 128), marks=needs_triton)],
    ids=["reference", "cpu", "triton"],
)
def test_batch_of_two_equals_two_single_calls(backend, size):
    """Routing and attention are per image: the second image's tokens never reach the first."""
    model = build(backend)
    image, trimap = synth.inputs(*size, seed=4)
    image = torch.cat([image, image.flip(-1)])
    trimap = torch.cat([trimap, trimap.flip(-2)])
    with torch.inference_mode():
        both, _, both_decisions = model({"image": image, "trimap": trimap})
        for i in range(2):
            single, _, decisions = model({"image": image[i : i + 1], "trimap": trimap[i : i + 1]})
            torch.testing.assert_close(both["phas"][i : i + 1], single["phas"], rtol=0, atol=1e-5)
            assert all(torch.equal(a[i : i + 1], b) for a, b in zip(both_decisions, decisions))
    routed = torch.stack([d.float().mean() for d in both_decisions])
    assert (routed > 0.02).all() and (routed < 0.98).all(), routed  # a real mix was routed


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=needs_triton)])
def test_token_cap_is_the_same_on_every_backend(backend):
    image, trimap = synth.inputs(200, 232, seed=4)
    with torch.inference_mode():
        _, ref_scores, _ = build("reference", max_tokens=None)({"image": image, "trimap": trimap})
        _, _, decisions = build(backend, max_tokens=20)({"image": image, "trimap": trimap})
    first = decisions[0].flatten()
    margin = (ref_scores[0][..., 0] - ref_scores[0][..., 1]).flatten()
    assert int(first.sum()) == 20
    assert set(first.nonzero().flatten().tolist()) == set(margin.topk(20).indices.tolist())
    assert all(int(d.sum()) <= 20 for d in decisions)


def test_predict_is_the_same_on_every_backend():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
    trimap = np.full((48, 72), 128, np.uint8)
    trimap[:8], trimap[-8:] = 0, 255
    expected = build("reference").predict(image, trimap)
    alpha = build("cpu").predict(image, trimap)
    assert (alpha[:8] == 0).all() and (alpha[-8:] == 1).all()
    np.testing.assert_allclose(alpha, expected, atol=1e-5)


def test_forcing_a_gpu_backend_on_cpu_tensors_explains_itself(monkeypatch):
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        dispatch.resolve("cuda", "cpu")


def test_env_var_overrides_the_model_backend(monkeypatch):
    monkeypatch.setenv("MEMATTE_BACKEND", "reference")
    image, trimap = synth.inputs(64, 64, seed=1)
    model = build("cpu")
    with torch.inference_mode():
        forced = model({"image": image, "trimap": trimap})[0]["phas"]
    monkeypatch.delenv("MEMATTE_BACKEND")
    with torch.inference_mode():
        reference = build("reference")({"image": image, "trimap": trimap})[0]["phas"]
    assert torch.equal(forced, reference)
