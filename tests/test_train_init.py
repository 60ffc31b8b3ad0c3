"""Where training starts: ViTMatte and MEMatte checkpoints as --init, the teacher seeded as
upstream's preprocessing does, upstream's random init, and files that are neither."""

import json
from pathlib import Path

import pytest
import torch

from mematte.model import FastMEMatte
from mematte.train import init

SHAPES = json.loads((Path(__file__).parent / "data" / "state_dict_shapes.json").read_text())


def random_state_dict(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(SHAPES[name].items()):
        out[k] = (
            torch.randint(0, 5, shape, generator=g)
            if k.endswith("num_batches_tracked")
            else torch.randn(shape, generator=g)
        )
    return out


@pytest.fixture(scope="module")
def vitmatte_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vitmatte_s.pth"
    torch.save({"model": random_state_dict("vitmatte_vit_s", seed=1)}, path)
    return path


def test_vitmatte_init_seeds_student_and_teacher_as_upstream(vitmatte_file):
    source = random_state_dict("vitmatte_vit_s", seed=1)
    plan = init.plan_init(vitmatte_file)
    assert plan.kind == "vitmatte" and plan.variant == "vit_s" and plan.has_teacher
    teacher = {k for k in plan.state_dict if k.startswith("teacher_")}
    # every key containing "backbone" is copied to teacher_<key>
    assert teacher == {"teacher_" + k for k in source if "backbone" in k}
    assert len(teacher) == 207
    for k in teacher:
        assert torch.equal(plan.state_dict[k], source[k[len("teacher_") :]])
    student = set(plan.state_dict) - teacher
    mematte = set(SHAPES["mematte_vit_s"])
    # the routed blocks' rel-pos are dropped; routers and LTRMs are what stays random
    assert student == set(source) - set(init.VITMATTE_ONLY)
    assert student <= mematte
    assert all(k.startswith(init.NEW_IN_MEMATTE) for k in mematte - student)
    assert len(mematte - student) == 68
    for k in student:
        assert list(plan.state_dict[k].shape) == SHAPES["mematte_vit_s"][k]


def test_load_into_the_student(vitmatte_file):
    plan = init.plan_init(vitmatte_file)
    plan.state_dict = {k: v for k, v in plan.state_dict.items() if not k.startswith("teacher_")}
    torch.manual_seed(0)
    model = FastMEMatte("vit_s")
    router_before = model.backbone.routers[0].in_conv[1].weight.clone()
    report = init.load_init(model, plan)
    sd = model.state_dict()
    for k, v in plan.state_dict.items():
        assert torch.equal(sd[k], v), k
    assert torch.equal(model.backbone.routers[0].in_conv[1].weight, router_before)
    assert "68 left at their random init" in report[0]


def test_mematte_checkpoint_fine_tunes(tmp_path):
    sd = random_state_dict("mematte_vit_s", seed=2)
    sd.update(
        {"teacher_" + k: v for k, v in random_state_dict("vitmatte_vit_s", seed=3).items() if k.startswith("backbone.")}
    )
    path = tmp_path / "mematte.pth"
    torch.save({"model": sd, "iteration": 99}, path)
    plan = init.plan_init(path)
    assert plan.kind == "mematte" and plan.has_teacher
    assert set(plan.state_dict) == set(sd)
    model = FastMEMatte("vit_s")
    plan.state_dict = {k: v for k, v in plan.state_dict.items() if not k.startswith("teacher_")}
    init.load_init(model, plan)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plan.state_dict.items())


def test_separate_teacher(tmp_path, vitmatte_file):
    other = tmp_path / "teacher.pth"
    torch.save(random_state_dict("vitmatte_vit_s", seed=7), other)  # a bare state dict
    plan = init.plan_init(vitmatte_file, teacher=other)
    expected = random_state_dict("vitmatte_vit_s", seed=7)
    assert torch.equal(plan.state_dict["teacher_backbone.pos_embed"], expected["backbone.pos_embed"])
    vit_b = tmp_path / "teacher_b.pth"
    torch.save(
        {"backbone.pos_embed": torch.zeros(1, 197, 768), "backbone.blocks.0.norm1.weight": torch.zeros(768)}, vit_b
    )
    with pytest.raises(init.InitError, match="vit_b"):
        init.plan_init(vitmatte_file, teacher=vit_b)


def test_hf_names(tmp_path):
    """An HF VitMatte checkpoint (renamed by the rules of VITMATTE.md), as a file and as a
    model folder, initialises exactly as its upstream-named original."""
    source = random_state_dict("vitmatte_vit_s", seed=4)
    rules = [
        ("backbone.blocks", "backbone.encoder.layer"),
        ("attn", "attention"),
        ("fusion_blks", "fusion_blocks"),
        ("bn", "batch_norm"),
    ]
    exact = {
        "backbone.pos_embed": "backbone.embeddings.position_embeddings",
        "backbone.patch_embed.proj.weight": "backbone.embeddings.projection.weight",
        "backbone.patch_embed.proj.bias": "backbone.embeddings.projection.bias",
    }
    hf = {}
    for k, v in source.items():
        name = exact.get(k, k)
        for a, b in rules:
            name = name.replace(a, b)
        hf[name] = v
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(hf, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vitmatte",
                "backbone_config": {
                    "hidden_size": 384,
                    "num_attention_heads": 6,
                    "num_hidden_layers": 12,
                    "window_size": 14,
                    "residual_block_indices": [2, 5, 8, 11],
                    "num_channels": 4,
                    "patch_size": 16,
                },
            }
        )
    )
    torch.save(source, tmp_path / "upstream.pth")
    upstream = init.plan_init(tmp_path / "upstream.pth")
    for path in (folder, folder / "model.safetensors"):
        plan = init.plan_init(path)
        assert plan.kind == "vitmatte" and plan.has_teacher
        assert set(plan.state_dict) == set(upstream.state_dict)
        assert all(torch.equal(plan.state_dict[k], upstream.state_dict[k]) for k in plan.state_dict)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage", "not a PyTorch checkpoint"),
        ({"decoder.x": torch.zeros(1)}, "not a ViTMatte or MEMatte checkpoint"),
        (
            {
                "backbone.pos_embed": torch.zeros(1, 197, 100),
                "backbone.blocks.0.x": torch.zeros(1),
                "decoder.y": torch.zeros(1),
            },
            "cannot tell ViT-S from ViT-B",
        ),
        ({"optimizer": {"lr": 1.0}}, "holds no state dict"),
    ],
    ids=["not-torch", "no-backbone", "unknown-width", "no-tensors"],
)
def test_bad_init_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(init.InitError, match=message):
        init.plan_init(path)


def test_wrong_shapes_are_refused(vitmatte_file):
    plan = init.plan_init(vitmatte_file)
    plan.state_dict = {k: v for k, v in plan.state_dict.items() if not k.startswith("teacher_")}
    plan.state_dict["decoder.matting_head.matting_convs.0.bias"] = torch.zeros(3)
    with pytest.raises(init.InitError, match="shapes differ"):
        init.load_init(FastMEMatte("vit_s"), plan)


def test_upstream_random_init():
    torch.manual_seed(0)
    model = FastMEMatte("vit_s")
    init.upstream_init(model)
    fc = model.backbone.blocks[0].mlp.fc1
    assert abs(fc.weight.std().item() - 0.02) < 0.001  # PyTorch's default would give 0.0295
    assert torch.all(fc.bias == 0)
    router_ln = model.backbone.routers[1].in_conv[0]
    assert torch.all(router_ln.weight == 1) and torch.all(router_ln.bias == 0)
    res = model.backbone.blocks[2].residual
    assert torch.all(res.norm3.weight == 0) and torch.all(res.norm1.weight == 1)
    # the LTRM's depthwise conv keeps PyTorch's default: U(±1/√25)
    dw = model.backbone.blocks[5].efficient_block.dwconv.weight
    assert dw.abs().max() <= 0.2 and dw.abs().max() > 0.15
