"""FastMEMatte in training mode, tested the way training fails: the Gumbel routing is
upstream's, the routed block with a hard policy is the inference block, a fixed batch's loss
goes down, gradients reach every student parameter and never the teacher."""

import math
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mematte import FastMEMatte
from mematte.backbone import GLOBAL_BLOCKS, ResBottleneck, gumbel_policy
from mematte.model import training_trimap
from mematte_kernels import dispatch
from mematte_kernels.triton import _common as triton_common

sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
import synth  # noqa: E402

needs_triton = pytest.mark.skipif(
    not (triton_common.INTERPRET or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
LOSS_NAMES = ["unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian", "loss_gradient_penalty", "mse_ratio_loss"]


@cache
def weights(seed=7):
    return synth.weights("mematte_vit_s", seed=seed)


def build(backend="reference", **kwargs):
    """A model in training mode on synth weights (its teacher, if any, at its fresh init)."""
    model = FastMEMatte("vit_s", backend=backend, **kwargs)
    missing, unexpected = model.load_state_dict(weights(), strict=False)
    assert not unexpected and all(k.startswith("teacher_backbone.") for k in missing)
    return model.train()


def batch(size=(64, 96), seeds=(1, 2)):
    images, trimaps, alphas = [], [], []
    for seed in seeds:
        image, trimap = synth.inputs(*size, seed=seed)
        alpha = (image.mean(1, keepdim=True) * 1.3 - 0.2).clamp(0, 1)
        alpha = torch.where(trimap == 1, 1.0, torch.where(trimap == 0, 0.0, alpha))
        images.append(image), trimaps.append(trimap), alphas.append(alpha)
    return {"image": torch.cat(images), "trimap": torch.cat(trimaps), "alpha": torch.cat(alphas)}


def noise_for(data, seed=0):
    B, _, H, W = data["image"].shape
    g = torch.Generator().manual_seed(seed)
    return [-torch.empty(B, (H // 16) * (W // 16), 2).exponential_(generator=g).log() for _ in range(4)]


# ---------------------------------------------------------------------- Gumbel routing


def test_gumbel_policy_is_torch_gumbel_softmax_bit_for_bit():
    """The same draws as F.gumbel_softmax(hard=True): values and gradients identical."""
    scores = F.log_softmax(torch.randn(3, 50, 2) * 3, dim=-1)
    results = []
    for fn in (lambda s: F.gumbel_softmax(s, tau=1, hard=True)[..., 0], gumbel_policy):
        s = scores.clone().requires_grad_()
        torch.manual_seed(5)
        p = fn(s)
        (p * torch.linspace(-1, 1, 50)).sum().backward()
        results.append((p, s.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert set(results[0][0].unique().tolist()) <= {0.0, 1.0}


def test_given_noise_replaces_the_draw():
    scores = F.log_softmax(torch.randn(2, 30, 2), dim=-1)
    noise = -torch.empty(2, 30, 2).exponential_(generator=torch.Generator().manual_seed(3)).log()
    policy = gumbel_policy(scores, noise)
    assert torch.equal(policy, ((scores + noise)[..., 0] > (scores + noise)[..., 1]).float())
    torch.manual_seed(0)
    assert torch.equal(gumbel_policy(scores, noise), policy)  # the global RNG plays no part


def test_routed_block_with_a_hard_policy_is_the_inference_block():
    """Training's policy-masked attention over all tokens, mixed with the LTRM by p, equals
    inference's attention among the selected tokens (TRAINING.md: agree within 2e-6)."""
    torch.manual_seed(0)
    model = build()
    block = model.backbone.blocks[2]
    x = torch.randn(2, 5, 7, 384) * 0.5
    keep = torch.rand(2, 35) < 0.4
    keep[1, :3] = True
    ops = dispatch.resolve("reference", "cpu", training=True)
    with torch.no_grad():
        trained = block.forward_train(x, keep.float(), ops)
        inferred = block(x, keep, dispatch.resolve("reference", "cpu"))
    torch.testing.assert_close(trained, inferred, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------- the losses


def test_training_call_returns_upstream_losses_and_routing_record():
    model = build()
    data = batch()
    losses = model(data, gumbel_noise=noise_for(data))
    assert list(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and v.requires_grad and math.isfinite(v.item()) for v in losses.values())
    share = model.routed_share
    policies = model.train_outputs["policy"]
    assert share.shape == (4,) and not share.requires_grad
    torch.testing.assert_close(share, torch.stack([p.mean() for p in policies]))
    r = share.mean()
    assert losses["mse_ratio_loss"].item() == pytest.approx(((r - 0.25) ** 2).item(), rel=1e-6)
    assert model.train_outputs["pred_alpha"].shape == data["alpha"].shape
    assert [tuple(s.shape) for s in model.train_outputs["router_scores"]] == [(2, 24, 2)] * 4


def test_fixed_batch_loss_decreases_and_every_student_parameter_learns():
    torch.manual_seed(0)
    model = build()
    data = batch()
    noise = noise_for(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    totals = []
    for step in range(6):
        losses = model(data, gumbel_noise=noise)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            # A block's LTRM learns only where its router left tokens to it.
            policies = model.train_outputs["policy"]
            all_routed = tuple(
                f"backbone.blocks.{b}.efficient_block." for b, p in zip(GLOBAL_BLOCKS, policies) if p.all()
            )
            assert len(all_routed) < 4
            without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert [n for n in without if not n.startswith(all_routed)] == []
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_batchnorm_learns_batch_statistics_in_training():
    model = build()
    before = model.decoder.matting_head.matting_convs[1].running_mean.clone()
    model(batch(), gumbel_noise=noise_for(batch()))
    after = model.decoder.matting_head.matting_convs[1].running_mean
    assert not torch.equal(before, after)
    assert model.decoder.matting_head.matting_convs[1].num_batches_tracked.item() == 101


def test_training_without_noise_draws_from_the_global_generator():
    model = build()
    data = batch()
    torch.manual_seed(3)
    first = model(data)
    first_policy = model.train_outputs["policy"]
    torch.manual_seed(3)
    second = model(data)
    assert all(torch.equal(a, b) for a, b in zip(first_policy, model.train_outputs["policy"]))
    assert all(first[k].item() == second[k].item() for k in first)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_fast_backends_train_with_the_reference_gradients(backend):
    """Gradients are judged against the reference run in fp64: a gradient that cancels
    (the ECA kernels' sums over the image) is off by ~6e-3 in the fp32 reference itself, so a
    fast backend may be as far from fp64 as the golden bar or twice the fp32 reference's error."""
    data = batch()
    noise = noise_for(data)
    runs = []
    for name, dtype in (("reference", torch.float64), ("reference", torch.float32), (backend, torch.float32)):
        model = build(name).to(dtype)
        losses = model({k: v.to(dtype) for k, v in data.items()}, gumbel_noise=[n.to(dtype) for n in noise])
        sum(losses.values()).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        runs.append((losses, grads, model.train_outputs["policy"]))
    (_, exact, exact_policy), (ref_losses, ref_grads, ref_policy), (losses, grads, policy) = runs
    assert all(torch.equal(a, b) for a, b in zip(policy, ref_policy))
    assert all(torch.equal(a.float(), b) for a, b in zip(exact_policy, ref_policy))
    for name in ref_losses:
        assert losses[name].item() == pytest.approx(ref_losses[name].item(), rel=1e-5, abs=1e-7), name
    for name, g in exact.items():
        if name == "decoder.matting_head.matting_convs.0.bias":  # 0 in exact arithmetic (BatchNorm follows)
            assert grads[name].abs().max() <= 1e-5
        else:
            bar = max(5e-3 * g.norm(), 2 * (ref_grads[name] - g).norm())
            assert (grads[name] - g).norm() <= bar, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_trains_close_to_fp32(dtype):
    """Upstream trains under fp16 autocast: the ops take what autocast hands them, the
    losses stay fp32, and every gradient is finite."""
    data = batch()
    noise = noise_for(data)
    model = build("cpu")
    fp32 = model(data, gumbel_noise=noise)
    with torch.autocast("cpu", dtype=dtype):
        low = model(data, gumbel_noise=noise)
    sum(low.values()).backward()
    assert all(v.dtype == torch.float32 for v in low.values())
    for name in ("unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian"):
        assert low[name].item() == pytest.approx(fp32[name].item(), rel=0.05), name
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- the teacher


def test_teacher_is_frozen_and_distils_into_the_backbone_only():
    model = build(teacher=True)
    assert not model.teacher_backbone.training and model.backbone.training
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    data = batch()
    losses = model(data, gumbel_noise=noise_for(data))
    assert list(losses) == [*LOSS_NAMES[:4], "distill_loss", "mse_ratio_loss"]
    assert losses["distill_loss"].item() > 0
    losses["distill_loss"].backward()
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # the distillation ends at the features
    assert model.backbone.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_teacher_keys_load_only_into_a_model_with_a_teacher(tmp_path):
    torch.manual_seed(0)
    model = FastMEMatte("vit_s", backend="reference", teacher=True)
    path = tmp_path / "with_teacher.pth"
    torch.save({"model": model.state_dict()}, path)
    with_teacher = FastMEMatte.from_checkpoint(path, backend="reference", teacher=True)
    loaded = with_teacher.state_dict()
    assert len(loaded) == 525 and all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in with_teacher.teacher_backbone.parameters())
    plain = FastMEMatte.from_checkpoint(path, backend="reference")
    assert plain.teacher_backbone is None and len(plain.state_dict()) == 318
    with pytest.raises(ValueError, match="missing 207 keys: teacher_backbone"):
        FastMEMatte.from_checkpoint(plain.state_dict(), backend="reference", teacher=True)


# ---------------------------------------------------------------------- initialisation


def test_fresh_model_is_initialised_as_upstream():
    torch.manual_seed(0)
    model = FastMEMatte("vit_s")
    linears = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    weights_ = torch.cat([m.weight.flatten() for m in linears])
    assert weights_.std().item() == pytest.approx(0.02, rel=0.01) and weights_.abs().max() < 0.2
    assert all(not m.bias.any() for m in linears)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert all((m.weight == 1).all() and not m.bias.any() for m in norms)
    assert model.backbone.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    for block in (m for m in model.backbone.modules() if isinstance(m, ResBottleneck)):
        assert not block.norm3.weight.any() and not block.norm3.bias.any()  # starts as the identity
        fan_out = block.conv2.weight.shape[0] * 9
        assert block.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    dwconv = model.backbone.blocks[2].efficient_block.dwconv.weight  # PyTorch's default, U(±1/√25)
    assert dwconv.abs().max() <= 0.2 and dwconv.std().item() == pytest.approx(0.2 / math.sqrt(3), rel=0.05)
    assert all(not p.any() for n, p in model.named_parameters() if "rel_pos" in n)


# ---------------------------------------------------------------------- bad calls


def test_training_refuses_bad_calls_by_name():
    model = build()
    data = batch()
    with pytest.raises(ValueError, match="'alpha'"):
        model({"image": data["image"], "trimap": data["trimap"]})
    with pytest.raises(ValueError, match="'alpha' must be"):
        model({**data, "alpha": data["alpha"][:, :, :32]})
    with pytest.raises(ValueError, match="'alpha' values must be finite"):
        model({**data, "alpha": data["alpha"] * 2})
    with pytest.raises(ValueError, match=r"gumbel_noise\[2\]"):
        model(data, gumbel_noise=[*noise_for(data)[:2], torch.zeros(2, 7, 2), torch.zeros(2, 24, 2)])
    with pytest.raises(ValueError, match="4 tensors"):
        model(data, gumbel_noise=noise_for(data)[:3])
    with pytest.raises(ValueError, match="at least 64 px"):
        small = batch(size=(48, 64))
        model(small)
    model.eval()
    with pytest.raises(ValueError, match="model.train"):
        model(data, gumbel_noise=noise_for(data))
    with pytest.raises(ValueError, match="fp32 weights"):
        FastMEMatte("vit_s", backend="reference", dtype=torch.bfloat16).train()(data)


def test_training_trimap_is_what_the_network_sees():
    trimap = torch.tensor([0, 100, 128, 200, 255], dtype=torch.float32) / 255
    assert training_trimap(trimap).tolist() == [0, 0.5, 0.5, 1, 1]
