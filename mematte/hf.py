"""HF transformers' ``VitMatteForImageMatting`` checkpoints in upstream ViTMatte's names.

HF's conversion script renames upstream's 258 keys one to one and changes no tensor: qkv stays
fused, position tables and BatchNorm buffers are carried over. Upstream -> HF, substring
replacements in this order: ``backbone.blocks`` -> ``backbone.encoder.layer``, ``attn`` ->
``attention``, ``fusion_blks`` -> ``fusion_blocks``, ``bn`` -> ``batch_norm``; and exactly
``backbone.pos_embed`` -> ``backbone.embeddings.position_embeddings``,
``backbone.patch_embed.proj.*`` -> ``backbone.embeddings.projection.*``.

An HF model directory (``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``,
sharded or not) is read without the transformers package. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .backbone import DEPTH, GLOBAL_BLOCKS, VARIANTS, WINDOW_SIZE

RENAMES = (
    ("backbone.blocks", "backbone.encoder.layer"),
    ("attn", "attention"),
    ("fusion_blks", "fusion_blocks"),
    ("bn", "batch_norm"),
)
EXACT = {
    "backbone.pos_embed": "backbone.embeddings.position_embeddings",
    "backbone.patch_embed.proj.weight": "backbone.embeddings.projection.weight",
    "backbone.patch_embed.proj.bias": "backbone.embeddings.projection.bias",
}
# Names only HF uses: a state dict with one of these is in HF's naming.
HF_MARKERS = ("backbone.encoder.layer.", "backbone.embeddings.", "decoder.fusion_blocks.", ".batch_norm.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_name(key: str) -> str:
    """The HF name of an upstream ViTMatte key."""
    if key in EXACT:
        return EXACT[key]
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def upstream_name(key: str) -> str:
    """The upstream name of an HF ViTMatte key (the inverse of :func:`hf_name`); names that
    are already upstream's come back unchanged."""
    for upstream, hf in EXACT.items():
        if key == hf:
            return upstream
    for old, new in reversed(RENAMES):
        key = key.replace(new, old)
    return key


def is_hf_state_dict(state_dict: Mapping[str, object]) -> bool:
    """Whether any key is in HF's naming."""
    return any(marker in key for key in state_dict for marker in HF_MARKERS)


def hf_from_upstream(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An upstream ViTMatte state dict in HF's names (the tensors themselves, not copies)."""
    return {hf_name(k): v for k, v in state_dict.items()}


def upstream_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``VitMatteForImageMatting`` state dict in upstream ViTMatte's names. Raises
    ValueError naming them when two keys map to the same name (a state dict that mixes both
    namings)."""
    out: dict[str, torch.Tensor] = {}
    clashes = []
    for key, value in state_dict.items():
        name = upstream_name(key)
        if name in out:
            clashes.append(name)
        out[name] = value
    if clashes:
        shown = ", ".join(sorted(clashes)[:5]) + (f" … (+{len(clashes) - 5} more)" if len(clashes) > 5 else "")
        raise ValueError(
            f"the state dict mixes HF and upstream names: {len(clashes)} parameters appear under both ({shown})"
        )
    return out


def variant_of_config(config: Mapping) -> str:
    """The ViTMatte variant an HF ``config.json`` describes; ValueError for anything this
    model does not implement."""
    if config.get("model_type") != "vitmatte":
        raise ValueError(f"config.json describes a {config.get('model_type')!r} model, not 'vitmatte'")
    backbone = config.get("backbone_config") or {}
    dim, heads = backbone.get("hidden_size"), backbone.get("num_attention_heads")
    variant = next((name for name, spec in VARIANTS.items() if spec == (dim, heads)), None)
    if variant is None:
        known = ", ".join(f"{n} (hidden {d}, {h} heads)" for n, (d, h) in VARIANTS.items())
        raise ValueError(f"config.json: backbone hidden_size {dim} with {heads} heads; known variants: {known}")
    expected = {
        "num_hidden_layers": DEPTH,
        "window_size": WINDOW_SIZE,
        "residual_block_indices": list(GLOBAL_BLOCKS),
        "num_channels": 4,
        "patch_size": 16,
    }
    wrong = {k: backbone[k] for k, v in expected.items() if k in backbone and backbone[k] != v}
    if wrong:
        raise ValueError(f"config.json: backbone settings this model does not implement: {wrong} (expected {expected})")
    return variant


def read_hf_directory(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of an HF VitMatte model directory, in upstream names."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is a directory without config.json: not an HF model directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path!r} is not readable JSON: {e}") from None
    variant_of_config(config)
    files = _weight_files(path)
    from .checkpoint import load_checkpoint_state_dict

    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_checkpoint_state_dict(file, map_location))
    return upstream_from_hf(state_dict)


def _weight_files(path: str) -> list[str]:
    for name in WEIGHT_FILES:
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{index!r} is not a readable shard index: {e}") from None
            return [os.path.join(path, shard) for shard in shards]
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise ValueError(
        f"HF model directory {path!r} holds no weights ({' or '.join(WEIGHT_FILES)}, or their shard index)"
    )
