"""One training step of MEMatte-S (BATR, with the ViTMatte-S teacher) against the original
code's: losses, routing decisions, gradients, the teacher left untouched, BatchNorm
statistics after the step. The golden file (tests/data/golden/README.md) holds the
original's outputs of one fp32 step on synthetic weights, inputs and Gumbel noise."""

import math
import sys
from pathlib import Path

import pytest
import torch

from mematte import FastMEMatte
from mematte.model import training_trimap

DATA = Path(__file__).parent / "data" / "golden"
sys.path.insert(0, str(DATA))
import synth  # noqa: E402

GOLDEN = torch.load(DATA / "mematte_vit_s_train.pt")
# Its gradient is 0 in exact arithmetic (a train-mode BatchNorm follows it): compared absolutely.
ZERO_GRAD = "decoder.matting_head.matting_convs.0.bias"


def golden_alpha(trimap: torch.Tensor, seed: int) -> torch.Tensor:
    """The ground truth of the golden batch, as its README builds it: a smoothstep of a
    wobbly ellipse in float64 on synth's grid, exact where the trimap is known."""
    h, w = trimap.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
    )
    r = (xx / 0.6) ** 2 + (yy / 0.8) ** 2
    t = ((1.15 - r) / 0.30).clamp(0, 1)
    u = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    A, f1, f2, p1, p2 = 0.1 + 0.1 * u[0], 1 + 3 * u[1], 1 + 3 * u[2], 2 * math.pi * u[3], 2 * math.pi * u[4]
    s = (t + A * torch.sin(f1 * math.pi * xx + p1) * torch.cos(f2 * math.pi * yy + p2) * 4 * t * (1 - t)).clamp(0, 1)
    alpha = (s**2 * (3 - 2 * s)).float()[None, None]
    return torch.where(trimap == 1, 1.0, torch.where(trimap == 0, 0.0, alpha))


def golden_batch() -> dict[str, torch.Tensor]:
    h, w = GOLDEN["input_hw"]
    images, trimaps, alphas = [], [], []
    for seed in GOLDEN["input_seeds"]:
        image, trimap = synth.inputs(h, w, seed=seed)
        images.append(image), trimaps.append(trimap), alphas.append(golden_alpha(trimap, seed))
    return {"image": torch.cat(images), "trimap": torch.cat(trimaps), "alpha": torch.cat(alphas)}


def golden_weights() -> dict[str, torch.Tensor]:
    student = synth.weights("mematte_vit_s", seed=GOLDEN["student_weights_seed"])
    teacher = synth.weights("vitmatte_vit_s", seed=GOLDEN["teacher_weights_seed"])
    return {**student, **{f"teacher_{k}": v for k, v in teacher.items() if k.startswith("backbone.")}}


@pytest.fixture(scope="module", params=["auto", "reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def step(request):
    """One fp32 training step on the golden batch, as upstream's trainer runs it; the
    results on the CPU for the comparisons."""
    device = "cuda" if request.param == "cuda" else "cpu"
    model = FastMEMatte("vit_s", backend=request.param, teacher=True)
    model.load_state_dict(golden_weights(), strict=True)
    model.to(device).train()
    data = golden_batch()
    teacher_before = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    losses = model(
        {k: v.to(device) for k, v in data.items()}, gumbel_noise=[g.to(device) for g in GOLDEN["gumbel_noise"]]
    )
    sum(losses.values()).backward()
    model.cpu()  # gradients included
    model.routed_share = model.routed_share.cpu()
    model.train_outputs = {
        k: v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] for k, v in model.train_outputs.items()
    }
    return (
        model,
        data,
        {k: v.detach().cpu() for k, v in losses.items()},
        {k: v.cpu() for k, v in teacher_before.items()},
    )


def test_the_batch_is_the_golden_batch(step):
    _, data, _, _ = step
    unknown = (training_trimap(data["trimap"]) == 0.5).float().mean().item()
    assert unknown == pytest.approx(0.113, abs=5e-4)  # the README's 11.3 % unknown pixels
    known = training_trimap(data["trimap"]) != 0.5
    assert torch.equal(data["alpha"][known], training_trimap(data["trimap"])[known])


def test_losses(step):
    _, _, losses, _ = step
    assert list(losses) == list(GOLDEN["losses"])
    for name, expected in GOLDEN["losses"].items():
        got = losses[name].detach()
        if name == "mse_ratio_loss":  # a function of the hard decisions only
            assert got.item() == expected.item()
        else:
            assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item()), (name, got.item(), expected.item())


def test_routing(step):
    model, _, _, _ = step
    outputs = model.train_outputs
    for k in range(4):
        assert torch.equal(outputs["policy"][k], GOLDEN["policy_hard"][k][..., 0]), f"router {k}"
        assert (outputs["router_scores"][k] - GOLDEN["router_scores"][k]).abs().max() <= 5e-4
    expected_share = torch.stack([p.float().mean() for p in GOLDEN["policy_hard"]])
    assert torch.equal(model.routed_share, expected_share)


def test_predicted_alpha(step):
    model, _, _, _ = step
    diff = (model.train_outputs["pred_alpha"] - GOLDEN["pred_alpha"]).abs()
    assert diff.mean() <= 2e-6 and diff.max() <= 5e-5, (diff.mean().item(), diff.max().item())


def test_gradients(step):
    model, _, _, _ = step
    params = dict(model.named_parameters())
    for name, expected in GOLDEN["grads"].items():
        got = params[name].grad
        if name == ZERO_GRAD:
            assert got.abs().max() <= 1e-5, name
            continue
        assert (got - expected).norm() <= 5e-3 * expected.norm(), (
            name,
            ((got - expected).norm() / expected.norm()).item(),
        )
    for name, stats in GOLDEN["grad_stats"].items():
        if name == ZERO_GRAD:
            continue
        got = params[name].grad.double()
        assert abs(got.norm().item() - stats["norm"]) <= 5e-3 * stats["norm"], name
        assert abs(got.abs().sum().item() - stats["abs_sum"]) <= 5e-3 * stats["abs_sum"], name
        assert abs(got.sum().item() - stats["sum"]) <= 1e-3 * stats["abs_sum"], name
        if "head" in stats:
            head = got.flatten()[: stats["head"].numel()].float()
            assert (head - stats["head"]).norm() <= 5e-3 * stats["head"].norm(), name


def test_gradient_norm_and_coverage(step):
    model, _, _, _ = step
    student = [(n, p) for n, p in model.named_parameters() if n.startswith(("backbone.", "decoder."))]
    assert [n for n, p in student if p.grad is None] == GOLDEN["student_params_without_grad"] == []
    norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for _, p in student))
    assert abs(norm - GOLDEN["grad_norm_student"]) <= 5e-4 * GOLDEN["grad_norm_student"], norm


def test_teacher_is_frozen(step):
    model, _, _, teacher_before = step
    teacher = model.teacher_backbone
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_batchnorm_running_stats_after_the_step(step):
    model, _, _, _ = step
    state = model.state_dict()
    for name, expected in GOLDEN["bn_running_after"].items():
        torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-6, msg=name)
