"""ViTMatte checkpoints: upstream files and state dicts, HF transformers' names (a file or a
model directory), the key map, clear errors, and the tools choosing the model class."""

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mematte import FastMEMatte, FastViTMatte, hf, load_model
from mematte.cli import main
from mematte.vitmatte import model_class

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA / "golden"))
import synth  # noqa: E402

MANIFEST = json.loads((DATA / "state_dict_shapes.json").read_text())

# Written out from HF's VitMatteForImageMatting module tree, independently of the rename rules.
HF_EXAMPLES = {
    "backbone.pos_embed": "backbone.embeddings.position_embeddings",
    "backbone.patch_embed.proj.weight": "backbone.embeddings.projection.weight",
    "backbone.blocks.2.attn.qkv.weight": "backbone.encoder.layer.2.attention.qkv.weight",
    "backbone.blocks.5.attn.rel_pos_h": "backbone.encoder.layer.5.attention.rel_pos_h",
    "backbone.blocks.11.residual.norm3.weight": "backbone.encoder.layer.11.residual.norm3.weight",
    "backbone.blocks.0.mlp.fc2.bias": "backbone.encoder.layer.0.mlp.fc2.bias",
    "decoder.convstream.convs.1.bn.running_var": "decoder.convstream.convs.1.batch_norm.running_var",
    "decoder.fusion_blks.3.conv.bn.num_batches_tracked": "decoder.fusion_blocks.3.conv.batch_norm.num_batches_tracked",
    "decoder.fusion_blks.0.conv.conv.weight": "decoder.fusion_blocks.0.conv.conv.weight",
    "decoder.matting_head.matting_convs.1.weight": "decoder.matting_head.matting_convs.1.weight",
}


@pytest.fixture(scope="module")
def upstream_state():
    return synth.weights("vitmatte_vit_s", seed=5)


@pytest.mark.parametrize("variant", ["vit_s", "vit_b"])
def test_key_map_is_one_to_one_over_all_keys(variant):
    keys = list(MANIFEST[f"vitmatte_{variant}"])
    hf_keys = [hf.hf_name(k) for k in keys]
    assert len(set(hf_keys)) == len(keys) == 258
    assert [hf.upstream_name(k) for k in hf_keys] == keys
    assert not any(k.startswith("backbone.blocks") or ".bn." in k or "fusion_blks" in k for k in hf_keys)
    assert hf.is_hf_state_dict(dict.fromkeys(hf_keys)) and not hf.is_hf_state_dict(dict.fromkeys(keys))


@pytest.mark.parametrize("upstream, expected", HF_EXAMPLES.items(), ids=list(HF_EXAMPLES))
def test_key_map_gives_hf_names(upstream, expected):
    assert hf.hf_name(upstream) == expected
    assert hf.upstream_name(expected) == upstream


def _same_weights(model, state):
    loaded = model.state_dict()
    return all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("form", ["safetensors", "bin", "mapping"])
def test_hf_named_checkpoint_loads(tmp_path, upstream_state, form):
    hf_state = hf.hf_from_upstream(upstream_state)
    if form == "safetensors":
        save_file(hf_state, tmp_path / "model.safetensors")
        source = tmp_path / "model.safetensors"
    elif form == "bin":
        torch.save(hf_state, tmp_path / "pytorch_model.bin")
        source = tmp_path / "pytorch_model.bin"
    else:
        source = hf_state
    model = FastViTMatte.from_checkpoint(source, dtype="float32")  # weights compared exactly
    assert model.variant == "vit_s" and _same_weights(model, upstream_state)


def _hf_config(hidden=384, heads=6):
    return {
        "model_type": "vitmatte",
        "hidden_size": hidden,
        "backbone_config": {
            "model_type": "vitdet",
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": 12,
            "window_size": 14,
            "residual_block_indices": [2, 5, 8, 11],
            "num_channels": 4,
            "patch_size": 16,
        },
    }


def test_hf_model_directory_loads(tmp_path, upstream_state):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    hf_state = hf.hf_from_upstream(upstream_state)
    # Sharded, as large hub checkpoints are stored.
    keys = sorted(hf_state)
    shards = {"model-00001-of-00002.safetensors": keys[:100], "model-00002-of-00002.safetensors": keys[100:]}
    for name, part in shards.items():
        save_file({k: hf_state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = FastViTMatte.from_checkpoint(tmp_path, dtype="float32")
    assert _same_weights(model, upstream_state)
    assert isinstance(load_model(tmp_path, device="cpu"), FastViTMatte)


def test_hf_directory_errors_are_named(tmp_path, upstream_state):
    with pytest.raises(ValueError, match="without config.json"):
        FastViTMatte.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    with pytest.raises(ValueError, match="holds no weights"):
        FastViTMatte.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(hidden=1024, heads=16)))
    with pytest.raises(ValueError, match="hidden_size 1024"):
        FastViTMatte.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_hf_config(), "model_type": "vitdet"}))
    with pytest.raises(ValueError, match="not 'vitmatte'"):
        FastViTMatte.from_checkpoint(tmp_path)


def test_upstream_detectron2_file_loads(tmp_path, upstream_state):
    torch.save({"model": upstream_state, "iteration": 5}, tmp_path / "ViTMatte_S_Com.pth")
    model = FastViTMatte.from_checkpoint(tmp_path / "ViTMatte_S_Com.pth", dtype="float32")
    assert _same_weights(model, upstream_state)


def test_mixed_names_are_refused(upstream_state):
    mixed = dict(upstream_state)
    mixed["backbone.encoder.layer.0.norm1.weight"] = mixed["backbone.blocks.0.norm1.weight"]
    with pytest.raises(ValueError, match="mixes HF and upstream names: 1 parameters .*backbone.blocks.0.norm1.weight"):
        FastViTMatte.from_checkpoint(mixed)


def test_wrong_keys_get_the_mismatch_message(upstream_state):
    broken = {k: v for k, v in hf.hf_from_upstream(upstream_state).items() if "layer.3." not in k}
    broken["backbone.encoder.layer.0.attention.rel_pos_h"] = torch.zeros(63, 64)
    with pytest.raises(ValueError) as e:
        FastViTMatte.from_checkpoint(broken)
    message = str(e.value)
    assert "checkpoint does not match FastViTMatte('vit_s')" in message
    assert "missing 14 keys: backbone.blocks.3." in message  # a window block
    assert "backbone.blocks.0.attn.rel_pos_h (63, 64) vs (27, 64)" in message
    with pytest.raises(ValueError, match=r"does not match FastViTMatte\('vit_s'\).*unexpected 68 keys"):
        FastViTMatte.from_checkpoint({**upstream_state, **FastMEMatte("vit_s").state_dict()})


def test_model_class_follows_the_keys(upstream_state):
    assert model_class(upstream_state) is FastViTMatte
    assert model_class(FastMEMatte("vit_s").state_dict()) is FastMEMatte
    assert model_class({"x": torch.zeros(1)}) is FastMEMatte  # not ViTMatte: MEMatte's errors apply


def test_tools_take_a_vitmatte_checkpoint(tmp_path, upstream_state):
    path = tmp_path / "vitmatte.safetensors"
    save_file(hf.hf_from_upstream(upstream_state), path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["info", str(path)]) == 0
    assert "loads into:  FastViTMatte(vit_s)" in out.getvalue()
    assert "HF transformers names" in out.getvalue()
    assert "parameters:  25,816,425 (25,814,753 learned + 1,672 BatchNorm statistics)" in out.getvalue()

    model = load_model(path, device="cpu", max_tokens=100)
    assert isinstance(model, FastViTMatte)
    from PIL import Image

    from mematte import predict_file

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    trimap = np.full((40, 56), 128, np.uint8)
    trimap[:, :16] = 0
    Image.fromarray(trimap).save(tmp_path / "t.png")
    result = predict_file(tmp_path / "a.png", tmp_path / "t.png", model=model, out_dir=tmp_path / "out")
    assert result.alpha.shape == (40, 56) and np.isfinite(result.alpha).all()
