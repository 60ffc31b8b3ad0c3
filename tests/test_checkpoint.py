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
    model = FastMEMatte.from_checkpoint(path, dtype="float32")  # weights compared exactly
    assert model.variant == "vit_s" and not model.training
    assert_same_weights(model, source)


def test_bare_state_dict_file_and_mapping(tmp_path, source):
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)
    assert_same_weights(FastMEMatte.from_checkpoint(path, dtype="float32"), source)
    assert_same_weights(FastMEMatte.from_checkpoint(source.state_dict(), dtype="float32"), source)


def test_safetensors_file(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = FastMEMatte.from_checkpoint(path, max_tokens=100, dtype="float32")
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
    state = {
        k: v for k, v in FastMEMatte("vit_s").state_dict().items() if "routers" not in k and "efficient_block" not in k
    }
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


# ---------------------------------------------------------------------- wrappers and prefixes


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer_step": 7},
    ],
    ids=["state_dict-wrapper", "module-prefix", "both"],
)
def test_training_loop_checkpoints_load(tmp_path, source, wrap):
    path = tmp_path / "trained.pth"
    torch.save(wrap(dict(source.state_dict())), path)
    assert_same_weights(FastMEMatte.from_checkpoint(path, dtype="float32"), source)


def test_variant_is_accepted_and_checked_against_the_keys(source):
    assert FastMEMatte.from_checkpoint(source.state_dict(), variant="vit_s").variant == "vit_s"
    with pytest.raises(
        ValueError,
        match=r"variant='vit_b' was asked for, but the checkpoint holds a vit_s "
        r"model \(backbone.pos_embed is 384 wide\)",
    ):
        FastMEMatte.from_checkpoint(source.state_dict(), variant="vit_b")
    with pytest.raises(ValueError, match="unknown variant 'vit_h'"):
        FastMEMatte.from_checkpoint(source.state_dict(), variant="vit_h")


# ---------------------------------------------------------------------- refused, with the reason


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_first_tensor(tmp_path, source, bad):
    state = dict(source.state_dict())
    first, later = "backbone.blocks.3.mlp.fc1.weight", "decoder.matting_head.matting_convs.3.bias"
    state[later] = state[later].clone().fill_(float(bad))
    state[first] = state[first].clone()
    state[first][0, :2] = float(bad)
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    counts = "2 NaN and 0 infinite" if bad == "nan" else "0 NaN and 2 infinite"
    for checkpoint in (path, state):
        with pytest.raises(
            ValueError,
            match=rf"non-finite weights: {first} has {counts} values of "
            rf"{state[first].numel()} \(2 tensors in all\)",
        ):
            FastMEMatte.from_checkpoint(checkpoint)


def test_map_location_cuda_without_a_gpu_says_so(tmp_path, source):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = tmp_path / "ok.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match="'cuda': CUDA is not available here"):
        FastMEMatte.from_checkpoint(path, map_location="cuda")


class Config:  # what a training script might pickle beside the weights
    lr = 1e-3


def test_a_pickle_that_needs_arbitrary_code_gets_our_message(tmp_path, source):
    path = tmp_path / "with_config.pth"
    torch.save({"model": source.state_dict(), "cfg": Config()}, path)
    with pytest.raises(ValueError) as err:
        FastMEMatte.from_checkpoint(path)
    message = str(err.value)
    assert "holds Python objects besides tensors (it stores a test_checkpoint.Config object)" in message
    assert "could run arbitrary code" in message and "state_dict()" in message
    assert "weights_only" not in message


def test_not_a_checkpoint_message_carries_no_advice_to_drop_the_safety_check(tmp_path):
    path = tmp_path / "photo.pth"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
    with pytest.raises(ValueError) as err:
        FastMEMatte.from_checkpoint(path)
    assert "is not a PyTorch checkpoint" in str(err.value) and "not a pickle of tensors" in str(err.value)
    assert "weights_only" not in str(err.value)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        FastMEMatte.from_checkpoint(tmp_path / "empty.pth")


def test_loading_reads_every_weight_for_the_finiteness_check_once(tmp_path, source, monkeypatch):
    import mematte.checkpoint as checkpoint
    from mematte.api import load_model

    path = tmp_path / "once.pth"
    torch.save({"model": source.state_dict()}, path)
    calls = []
    real = checkpoint.check_finite
    monkeypatch.setattr(checkpoint, "check_finite", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_model(path, device="cpu")
    assert len(calls) == 1
