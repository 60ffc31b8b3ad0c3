"""HF transformers' ViTDet attention (``VitDetAttention``, the backbone of
``VitMatteForImageMatting``) on this package's kernels.

HF's layer cuts windowed layers' tokens into zero-padded windows before the attention and
hands global layers the whole grid; its attention projects qkv, adds decomposed relative
position with tables resized by ``get_rel_pos``, and projects the output. The accelerated
forward keeps both projections and replaces what lies between.
"""
from __future__ import annotations

import torch
from transformers.models.vitdet.modeling_vitdet import VitDetAttention, VitDetBackbone, VitDetLayer, VitDetModel
from transformers.models.vitmatte.modeling_vitmatte import VitMatteForImageMatting

from .attention import plain_attention, relpos_attention, swap_forward

MODELS = (VitMatteForImageMatting, VitDetBackbone, VitDetModel)


def supports(model) -> bool:
    if isinstance(model, VitMatteForImageMatting):
        return isinstance(model.backbone, (VitDetBackbone, VitDetModel))
    return isinstance(model, MODELS)


def accelerate(model, backend: str) -> None:
    for layer in model.modules():
        if isinstance(layer, VitDetLayer):
            swap_forward(layer.attention, forward, backend, windowed=layer.window_size > 0)


def forward(self: VitDetAttention, hidden_state: torch.Tensor, output_attentions: bool = False):
    """``VitDetAttention.forward`` on the package's kernels."""
    if output_attentions:
        # The attention maps are the N×N matrix the kernels never build: HF's own path.
        return type(self).forward(self, hidden_state, output_attentions=True)
    qkv = self.qkv(hidden_state)  # (B, H, W, 3 * heads * d)
    if self.use_relative_position_embeddings:
        out = relpos_attention(qkv, self.rel_pos_h, self.rel_pos_w, self.num_heads, self.scale,
                               self._mematte_backend, self._mematte_windowed)  # fmt: skip
    else:
        out = plain_attention(qkv, self.num_heads, self.scale)
    return (self.proj(out),)
