"""timm's SAM ViT (``vision_transformer_sam``) attention on this package's kernels.

timm's blocks cut windowed blocks' tokens into zero-padded windows before the attention;
its attention projects qkv, applies the optional q/k norms, adds decomposed relative
position as an N×N bias of fused attention (tables resized by ``get_rel_pos``), and
projects the output. The accelerated forward keeps the projections and norms and replaces
the attention. Attention with rotary position instead of relative position is left as
timm has it (fused attention without a bias builds no N×N matrix).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM

from .attention import relpos_attention, swap_forward


def supports(model) -> bool:
    return isinstance(model, VisionTransformerSAM)


def accelerate(model, backend: str) -> None:
    for block in model.modules():
        if isinstance(block, Block) and block.attn.use_rel_pos:
            swap_forward(block.attn, forward, backend=backend, windowed=block.window_size > 0)


def forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` of timm's SAM ViT on the package's kernels."""
    if self.training and self.attn_drop.p > 0:
        # Dropout on the attention probabilities needs them: timm's own path.
        return type(self).forward(self, x)
    B, H, W, _ = x.shape
    qkv = self.qkv(x)  # (B, H, W, 3 * heads * d)
    if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
        q, k, v = qkv.view(B, H, W, 3, self.num_heads, -1).unbind(3)
        qkv = torch.stack((self.q_norm(q), self.k_norm(k), v), dim=3).reshape(B, H, W, -1)
    out = relpos_attention(qkv, self.rel_pos_h, self.rel_pos_w, self.num_heads, self.scale,
                           self._mematte_backend, self._mematte_windowed)  # fmt: skip
    return self.proj_drop(self.proj(out))
