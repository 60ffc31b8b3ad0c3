"""FastViTMatte against the published ViTMatte: state-dict manifest and golden outputs of the
original code (ViT-S, fp32, CPU) on synthetic weights."""

import pytest
import torch

from mematte import FastViTMatte
from mematte.vitmatte import ViTMatteBackbone
from mematte_kernels import dispatch

from parity import DATA, assert_matches_manifest, manifest, synth


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
def test_state_dict_matches_official_manifest(variant):
    assert_matches_manifest(FastViTMatte(variant).state_dict(), f"vitmatte_{variant}")


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
def test_backbone_alone_holds_the_backbone_keys(variant):
    """The backbone module (MEMatte's teacher too) has exactly the checkpoint's backbone.* keys."""
    backbone = {
        k.removeprefix("backbone."): v for k, v in manifest(f"vitmatte_{variant}").items() if k.startswith("backbone.")
    }
    state = ViTMatteBackbone(variant).state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == backbone


@pytest.mark.parametrize("variant, params", [("vit_s", 25_814_753), ("vit_b", 96_686_561)])
def test_parameter_count_matches_published(variant, params):
    model = FastViTMatte(variant)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for _, b in model.named_buffers() if "decoder." in _) == 1_672  # BatchNorm


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA / "golden" / "vitmatte_vit_s.pt", weights_only=False)


@pytest.fixture(scope="module", params=["reference", "auto"])
def golden_run(request, golden):
    """The reference and the default backend (the fast path of this machine), in fp32."""
    model = FastViTMatte("vit_s", backend=request.param)
    model.load_state_dict(synth.weights("vitmatte_vit_s", seed=golden["weights_seed"]), strict=True)
    image, trimap = synth.inputs(**golden["input"])
    with torch.inference_mode():
        outputs = model({"image": image, "trimap": trimap})
        x = model.preprocess(image, trimap)
        features = model.backbone(x, dispatch.resolve(model.backend, "cpu"))
    return request.param, x, outputs, features


def test_golden_padding(golden_run, golden):
    _, x, _, features = golden_run
    assert tuple(x.shape[-2:]) == tuple(golden["padded_hw"])
    assert tuple(features.shape[-2:]) == tuple(golden["token_grid"])


def test_golden_alpha(golden_run, golden):
    backend, _, outputs, _ = golden_run
    assert set(outputs) == {"phas"} and outputs["phas"].shape == golden["alpha"].shape
    diff = (outputs["phas"] - golden["alpha"]).abs()
    mean_bar = 1e-6 if backend == "reference" else 1e-5
    assert diff.mean() <= mean_bar and diff.max() <= 5e-5, (diff.mean().item(), diff.max().item())


def test_golden_features(golden_run, golden):
    _, _, _, features = golden_run
    diff = (features - golden["features"]).abs()
    assert diff.max() <= 1e-4, diff.max().item()


def test_golden_alpha_bf16(golden):
    model = FastViTMatte.from_checkpoint(
        synth.weights("vitmatte_vit_s", seed=golden["weights_seed"]), dtype=torch.bfloat16
    )
    image, trimap = synth.inputs(**golden["input"])
    with torch.inference_mode():
        alpha = model({"image": image, "trimap": trimap})["phas"]
    assert alpha.dtype == torch.float32 and torch.isfinite(alpha).all()
    diff = (alpha - golden["alpha"]).abs()
    assert diff.mean() <= 5e-3, diff.mean().item()


def test_predict_follows_upstream_inference(golden):
    """predict() is the upstream call on one image: no clamping of the known regions."""
    model = FastViTMatte.from_checkpoint(
        synth.weights("vitmatte_vit_s", seed=golden["weights_seed"]), dtype=torch.float32
    )  # held to the fp32 golden alpha
    image, trimap = synth.inputs(**golden["input"])
    alpha = model.predict(image[0], trimap[0, 0])
    assert alpha.shape == (512, 600)
    diff = (torch.from_numpy(alpha) - golden["alpha"][0, 0]).abs()
    assert diff.mean() <= 1e-5 and diff.max() <= 5e-5
    known = trimap[0, 0] == 1
    assert (torch.from_numpy(alpha)[known] < 1).any()  # upstream leaves them as predicted
