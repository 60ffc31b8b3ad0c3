"""Optimiser and schedule against TRAINING.md: layer ids, lr decay, weight-decay groups,
warmup and multi-step, and the published numbers."""

import pytest
import torch

from mematte.backbone import ChannelsFirstLayerNorm
from mematte.model import FastMEMatte
from mematte.train import optim


@pytest.fixture(scope="module")
def model():
    return FastMEMatte("vit_s")


@pytest.mark.parametrize(
    "name, layer",
    [
        ("backbone.pos_embed", 0),
        ("backbone.patch_embed.proj.weight", 0),
        ("backbone.blocks.0.norm1.weight", 1),
        ("backbone.blocks.2.efficient_block.fc1.weight", 3),
        ("backbone.blocks.2.residual.conv1.weight", 13),
        ("backbone.blocks.11.attn.qkv.bias", 12),
        ("backbone.routers.0.in_conv.1.weight", 13),
        ("decoder.fusion_blks.0.conv.conv.weight", 13),
        ("teacher_backbone.blocks.0.norm1.weight", 13),
    ],
)
def test_layer_ids(name, layer):
    assert optim.layer_id(name) == layer


def test_groups_cover_every_trainable_parameter_once(model):
    groups = optim.param_groups(model)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == sum(1 for p in model.parameters())
    frozen = FastMEMatte("vit_s")
    frozen.backbone.blocks[0].requires_grad_(False)
    names = {n for g in optim.param_groups(frozen) for n in g["names"]}
    assert not any(n.startswith("backbone.blocks.0.") for n in names)


def test_learning_rates_and_weight_decay_follow_the_recipe(model):
    lr = 1e-3
    per_name = {n: (g["lr"], g["weight_decay"]) for g in optim.param_groups(model, lr=lr) for n in g["names"]}
    modules = dict(model.named_modules())
    for name, (group_lr, wd) in per_name.items():
        assert group_lr == pytest.approx(lr * 0.65 ** (13 - optim.layer_id(name)))
        owner = modules[name.rsplit(".", 1)[0]]
        no_decay = isinstance(owner, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) or name.endswith("pos_embed")
        assert wd == (0.0 if no_decay else 0.1), name
    # the channels-first LayerNorms of the ResBottlenecks decay, as upstream
    assert isinstance(modules["backbone.blocks.2.residual.norm1"], ChannelsFirstLayerNorm)
    assert per_name["backbone.blocks.2.residual.norm1.weight"][1] == 0.1
    assert per_name["backbone.blocks.2.attn.qkv.bias"][1] == 0.1
    # the new LTRMs of blocks 2/5/8/11 get 0.013/0.049/0.18/0.65 of the lr, the routers all of it
    ltrm = [per_name[f"backbone.blocks.{b}.efficient_block.fc1.weight"][0] / lr for b in (2, 5, 8, 11)]
    assert ltrm == pytest.approx([0.0135, 0.0490, 0.1785, 0.65], abs=5e-4)
    assert per_name["backbone.routers.3.out_conv.4.bias"][0] == pytest.approx(lr)


def test_adamw_settings(model):
    opt = optim.build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and opt.defaults["fused"]
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(5e-4)


def test_fused_update_equals_the_default_one():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, c, g in zip(params, copies, grads):
            p.grad, c.grad = g, g.clone()
        fused.step()
        plain.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


def test_schedule_warmup_and_steps():
    m = (1000, 1800)
    assert optim.lr_multiplier(0, m) == pytest.approx(0.001)
    assert optim.lr_multiplier(125, m) == pytest.approx(0.001 + 0.999 / 2)
    assert optim.lr_multiplier(250, m) == 1.0
    assert optim.lr_multiplier(999, m) == 1.0
    assert optim.lr_multiplier(1000, m) == pytest.approx(0.1)
    assert optim.lr_multiplier(1800, m) == pytest.approx(0.05)
    # a milestone inside the warmup: the ramp heads for the value at the warmup's end
    assert optim.lr_multiplier(200, (100, 300), warmup_iters=250) == pytest.approx(0.001 + (0.1 - 0.001) * 0.8)


def test_scheduler_sets_every_group_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5}])
    sched = optim.WarmupMultiStep(opt, (6, 8), warmup_iters=4)
    seen = []
    for i in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if i == 4:
            saved_opt, saved = opt.state_dict(), sched.state_dict()
    for i, lrs in enumerate(seen):
        expected = optim.lr_multiplier(i, (6, 8), warmup_iters=4)
        assert lrs == pytest.approx([expected, 0.5 * expected])
    opt2 = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5}])
    sched2 = optim.WarmupMultiStep(opt2, (6, 8), warmup_iters=4)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(seen[5])


def test_published_numbers():
    assert optim.milestones_for(40406, optim.MILESTONE_FRACTIONS["vit_s"]) == [8081, 35018]
    assert optim.milestones_for(64650, optim.MILESTONE_FRACTIONS["vit_b"]) == [32325, 56030]
    assert [r["iters"] // optim.CHECKPOINTS_PER_RUN for r in optim.RECIPE.values()] == [2693, 4310]
