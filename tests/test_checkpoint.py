"""Loading checkpoints in every format the official release and users produce, and the
errors for everything else."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mematte import FastMEMatte
from mematte.checkpoint import infer_variant, load_checkpoint_state_dict


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = FastMEMatte("vit_s")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def assert_same_weights(model, source):
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_detectron2_file_with_teacher_is_loaded(tmp_path, source):
    state = dict(source.state_dict())
    state["teacher_backbone.pos_embed"] = torch.zeros(1, 197, 384)
    path = tmp_path / "MEMatte_ViTS_DIM.pth"
    torch.save({"model": state, "iteration": 10}, path)
    model = FastMEMatte.from_checkpoint(path)
    assert model.variant == "vit_s" and not model.training
    assert_same_weights(model, source)


def test_bare_state_dict_file_and_mapping(tmp_path, source):
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)
    assert_same_weights(FastMEMatte.from_checkpoint(path), source)
    assert_same_weights(FastMEMatte.from_checkpoint(source.state_dict()), source)


def test_safetensors_file(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = FastMEMatte.from_checkpoint(path, max_tokens=100)
    assert model.max_tokens == 100
    assert_same_weights(model, source)


def test_variant_is_inferred_from_shapes():
    assert infer_variant(FastMEMatte("vit_b").state_dict()) == "vit_b"
    with pytest.raises(ValueError, match="width 512"):
        infer_variant({"backbone.pos_embed": torch.zeros(1, 197, 512)})
    with pytest.raises(ValueError, match="no 'backbone.pos_embed'"):
        infer_variant({"decoder.x": torch.zeros(1)})


def test_mismatch_lists_missing_and_unexpected_keys_and_the_variant(source):
    state = dict(source.state_dict())
    del state["backbone.routers.0.in_conv.1.weight"]
    del state["decoder.matting_head.matting_convs.3.bias"]
    state["backbone.extra.weight"] = torch.zeros(3)
    state["backbone.blocks.0.attn.rel_pos_h"] = torch.zeros(63, 64)  # a ViTMatte global-size table
    with pytest.raises(ValueError) as err:
        FastMEMatte.from_checkpoint(state)
    message = str(err.value)
    assert "FastMEMatte('vit_s')" in message
    assert "missing 2 keys: backbone.routers.0.in_conv.1.weight, decoder.matting_head.matting_convs.3.bias" in message
    assert "unexpected 1 keys: backbone.extra.weight" in message
    assert "backbone.blocks.0.attn.rel_pos_h (63, 64) vs (27, 64)" in message


def test_vitmatte_checkpoint_is_refused_with_the_router_keys_missing():
    state = {k: v for k, v in FastMEMatte("vit_s").state_dict().items() if "routers" not in k and "efficient_block" not in k}
    with pytest.raises(ValueError, match=r"missing \d+ keys: backbone.blocks.11.efficient_block"):
        FastMEMatte.from_checkpoint(state)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a checkpoint at all", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
    ],
    ids=["text", "empty"],
)
def test_non_checkpoint_files_get_a_clear_error(tmp_path, content, match):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        FastMEMatte.from_checkpoint(path)


def test_a_picture_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        FastMEMatte.from_checkpoint(path)


def test_pickled_object_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        FastMEMatte.from_checkpoint(path)


def test_broken_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors checkpoint"):
        load_checkpoint_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FastMEMatte.from_checkpoint(tmp_path / "nope.pth")
