"""HF transformers' ViTDet attention (``VitDetAttention``, the backbone of
``VitMatteForImageMatting``) on this package's kernels, and ViTMatte's decoder in strips.

HF's layer cuts windowed layers' tokens into zero-padded windows before the attention and
hands global layers the whole grid; its attention projects qkv, adds decomposed relative
position with tables resized by ``get_rel_pos``, and projects the output. The accelerated
forward keeps both projections and replaces what lies between.

Once the attention builds no N×N matrix, ViTMatte's decoder is what holds the most memory:
its last blocks work on full-resolution planes of 32 to 68 channels (~5 GB at 2048² in
fp32). In inference the decoder runs HF's own forward on strips of rows with enough context
that every alpha row is the one the whole image gives.
"""

from __future__ import annotations

import torch
from transformers.models.vitdet.modeling_vitdet import VitDetAttention, VitDetBackbone, VitDetLayer, VitDetModel
from transformers.models.vitmatte.modeling_vitmatte import VitMatteDetailCaptureModule, VitMatteForImageMatting

from .attention import plain_attention, relpos_attention, swap_forward

MODELS = (VitMatteForImageMatting, VitDetBackbone, VitDetModel)

# Decoder strips: about this many pixels each, context included.
STRIP_PIXELS = 1 << 20
# Rows of context above and below a strip: more than the decoder's receptive field
# (~55 rows through its 3×3 convolutions and ×2 upsamplings), a multiple of the
# features' stride 16 so that every level's crop starts on its own grid.
STRIP_CONTEXT = 64
FEATURE_STRIDE = 16


def supports(model) -> bool:
    if isinstance(model, VitMatteForImageMatting):
        return isinstance(model.backbone, (VitDetBackbone, VitDetModel))
    return isinstance(model, MODELS)


def accelerate(model, backend: str) -> None:
    for layer in model.modules():
        if isinstance(layer, VitDetLayer):
            swap_forward(layer.attention, forward, backend=backend, windowed=layer.window_size > 0)
        elif isinstance(layer, VitMatteDetailCaptureModule):
            swap_forward(layer, decoder_forward)


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


def decoder_forward(self: VitMatteDetailCaptureModule, features: torch.Tensor, pixel_values: torch.Tensor):
    """``VitMatteDetailCaptureModule.forward`` on strips of rows: features (B, C, H/16, W/16),
    pixel_values (B, 4, H, W) -> alphas (B, 1, H, W). Whole-image where strips could differ
    (batch statistics in training, a gradient) or would not save anything."""
    height, width = pixel_values.shape[-2:]
    rows = max(FEATURE_STRIDE, (STRIP_PIXELS // width - 2 * STRIP_CONTEXT) // FEATURE_STRIDE * FEATURE_STRIDE)
    whole = (self.training or torch.is_grad_enabled() or height % FEATURE_STRIDE
             or features.shape[-2] * FEATURE_STRIDE != height or height <= rows + 2 * STRIP_CONTEXT)  # fmt: skip
    if whole:
        return type(self).forward(self, features, pixel_values)
    alphas = pixel_values.new_empty(pixel_values.shape[0], 1, height, width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        low, high = max(top - STRIP_CONTEXT, 0), min(bottom + STRIP_CONTEXT, height)
        strip = type(self).forward(self, features[:, :, low // FEATURE_STRIDE : high // FEATURE_STRIDE],
                                   pixel_values[:, :, low:high])  # fmt: skip
        alphas[:, :, top:bottom] = strip[:, :, top - low : bottom - low]
    return alphas
