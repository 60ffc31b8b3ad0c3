"""FastMEMatte against the published MEMatte: state-dict manifest and golden outputs of the
original code (fp32, CPU) on synthetic weights."""

import pytest
import torch

from mematte import FastMEMatte

from parity import DATA, assert_matches_manifest, synth


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
def test_state_dict_matches_official_manifest(variant):
    assert_matches_manifest(FastMEMatte(variant).state_dict(), f"mematte_{variant}")


@pytest.mark.parametrize("variant, params", [("vit_s", 29_192_965), ("vit_b", 110_109_061)])
def test_parameter_count_matches_published(variant, params):
    assert sum(t.numel() for t in FastMEMatte(variant).state_dict().values()) == params


@pytest.fixture(
    scope="module",
    params=[(v, b) for v in ("vit_s", "vit_b") for b in ("reference", "auto")],
    ids=lambda p: "-".join(p),
)
def golden_run(request):
    """The reference, and the default backend (the fast path of this machine), in fp32."""
    variant, backend = request.param
    golden = torch.load(DATA / "golden" / f"mematte_{variant}.pt")
    model = FastMEMatte(variant, backend=backend)
    model.load_state_dict(synth.weights(f"mematte_{variant}", seed=golden["weights_seed"]), strict=True)
    image, trimap = synth.inputs(**golden["input"])
    with torch.inference_mode():
        tiled = model({"image": image, "trimap": trimap}, patch_decoder=True)
        whole = model({"image": image, "trimap": trimap}, patch_decoder=False)
    return golden, tiled, whole


def test_golden_alpha_tiled_decoder(golden_run):
    golden, (outputs, _, _), _ = golden_run
    diff = (outputs["phas"] - golden["alpha"]).abs()
    assert outputs["phas"].shape == golden["alpha"].shape
    assert diff.mean() <= 1e-6 and diff.max() <= 5e-5, (diff.mean().item(), diff.max().item())


def test_golden_alpha_whole_image_decoder(golden_run):
    golden, _, (outputs, _, _) = golden_run
    diff = (outputs["phas"] - golden["alpha_whole_image_decoder"]).abs()
    assert diff.mean() <= 1e-6 and diff.max() <= 5e-5, (diff.mean().item(), diff.max().item())


def test_golden_routing(golden_run):
    golden, (_, scores, decisions), _ = golden_run
    assert len(scores) == len(decisions) == 4
    for ours, theirs in zip(decisions, golden["decisions"]):
        assert ours.shape == theirs.shape and ours.dtype == torch.bool
        assert (ours == theirs).float().mean() >= 0.999
    for ours, theirs in zip(scores, golden["scores"]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
