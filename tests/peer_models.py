"""HF transformers' ViTMatte and timm's SAM ViT built from configs with seeded weights, for
the tests of ``mematte.accelerate`` (nothing is downloaded)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def seeded_init(model: nn.Module, seed: int) -> nn.Module:
    """Weights that keep activations of order one through the network, so that the output
    depends on every attention: the libraries' own initialisations (BatchNorm scales of
    0.02 in HF's ViTMatte) flatten the alpha to 0.5 ± 1e-7. Relative position tables are
    large enough that the position terms move the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)) or "Norm" in type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                if norm:
                    mean, std = (1.0 if name == "weight" else 0.0), 0.1
                elif name.startswith("rel_pos"):
                    mean, std = 0.0, 0.3
                elif name == "weight" and p.dim() >= 2:
                    mean, std = 0.0, 1 / math.sqrt(p[0].numel())
                else:
                    mean, std = 0.0, 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std + mean)
    return model.eval()


# ------------------------------------------------------------------------- transformers


def vitdet_config(layers: int = 4, relative_position: bool = True, **overrides):
    """ViT-S's widths (384 channels, 6 heads of 64) with ``layers`` layers, windowed and
    global alternating (global last, with the residual blocks, as in ViTMatte)."""
    from transformers import VitDetConfig

    return VitDetConfig(**{
        "hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": layers, "num_channels": 4,
        "image_size": 512, "patch_size": 16, "window_size": 14, "mlp_ratio": 4,
        "window_block_indices": list(range(0, layers, 2)), "residual_block_indices": list(range(1, layers, 2)),
        "use_relative_position_embeddings": relative_position, "out_features": [f"stage{layers}"],
        **overrides,
    })  # fmt: skip


def hf_vitmatte(seed: int = 0, layers: int = 4, relative_position: bool = True, **backbone):
    """``VitMatteForImageMatting`` with ViT-S's widths; ``backbone`` overrides the
    :func:`vitdet_config` fields."""
    from transformers import VitMatteConfig, VitMatteForImageMatting

    config = VitMatteConfig(backbone_config=vitdet_config(layers, relative_position, **backbone), hidden_size=384,
                            fusion_hidden_sizes=[256, 128, 64, 32], convstream_hidden_sizes=[48, 96, 192])  # fmt: skip
    return seeded_init(VitMatteForImageMatting(config), seed)


# ViTMatte's ViT-S backbone as published: 12 layers, global attention in 2, 5, 8 and 11.
VIT_S_BACKBONE = {
    "layers": 12,
    "window_block_indices": [0, 1, 3, 4, 6, 7, 9, 10],
    "residual_block_indices": [2, 5, 8, 11],
}


def hf_inputs(height: int, width: int, seed: int = 0):
    """A random photo and trimap through HF's ``VitMatteImageProcessor``."""
    from transformers import VitMatteImageProcessor

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    trimap = rng.choice(np.array([0, 128, 255], dtype=np.uint8), (height, width))
    return VitMatteImageProcessor()(images=image, trimaps=trimap, return_tensors="pt")


# ------------------------------------------------------------------------------- timm


def timm_sam(name: str = "samvit_base_patch16", img_size: int = 256, depth: int | None = 4, seed: int = 0, **kwargs):
    """A timm SAM ViT with ``depth`` blocks, windowed and global alternating; with depth
    None, the published depth and global blocks."""
    import timm

    if depth is not None:
        kwargs.update(depth=depth, global_attn_indexes=list(range(1, depth, 2)))
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
    return seeded_init(model, seed)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.double(), expected.double()
    return float((a - b).norm() / b.norm())
