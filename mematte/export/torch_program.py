"""``torch.export`` of the fast path: an ``ExportedProgram`` with dynamic height and width.

The program maps ``image`` (1, 3, H, W) RGB in [0, 1] and ``trimap`` (1, 1, H, W) in [0, 1]
to ``alpha`` (1, 1, H, W) in [0, 1]; normalisation, padding, position-embedding and
relative-position resizing happen inside it, from the input's size. It holds ATen ops and
the ops :mod:`mematte_kernels` registers (``torch.ops.mematte_ext``, compiled, and
``torch.ops.mematte``), so it runs with ``torch.export.load`` in a process that imports only
``torch`` and ``mematte_kernels``.

The model's own forward is shaped for eager speed: loops over strips, windows and tiles
whose counts follow the image size, and one host sync per routed block for the token
counts. The program is the same computation written so that one trace holds for every
size:

- sizes are symbolic: the published padding rule and the decoder's canvas are integer
  expressions of H and W (``torch.sym_min``), never branches;
- the routed tokens are ``nonzero`` of the router's decisions, an unbacked size (bounded by
  the token count and by ``max_tokens``), attended by one ``mematte::varlen_sdpa``
  node (fused SDPA, a Python loop over sequences inside the op); the cap is a
  ``topk`` over ``min(max_tokens, N)`` tokens;
- window attention runs over all windows in one fused SDPA call, ViTMatte's global attention
  in the extension's flash kernel (no N×N matrix) where it has one;
- the decoder decodes the image (plus the context the tiles of the eager model see) in one
  piece: the same alpha as the tiles, since its receptive field is under their context.
"""

from __future__ import annotations

import math
import os
import pathlib
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from mematte_kernels import exportable, ext, native, reference

from ..backbone import PATCH, RoutedBlock
from ..decoder import FAST_CONTEXT, TILE, FoldedDecoder
from ..model import DEFAULT_MAX_TOKENS, PAD_MULTIPLE, FastMEMatte, check_max_tokens
from ..vitmatte import FastViTMatte, GlobalBlock
from .atomic import atomic_output

# Sides the program is traced for: from one 16-px token to beyond 8K.
MIN_SIDE, MAX_SIDE = 16, 16384


# ------------------------------------------------------------------------ ops


class ExportOps:
    """The op table the program is traced with: the fast CPU/GPU ops whose graphs do not
    depend on the input's size, in place of those that loop over size-dependent counts."""

    def __init__(self, device: torch.device):
        cpu = device.type == "cpu"
        # ATen's linear: oneDNN's fused linear takes an empty Scalar list that torch.export
        # cannot serialise.
        self.linear = reference.linear
        self.linear_gelu = reference.linear_gelu
        self.patch_embed = reference.patch_embed
        self.conv2d = reference.conv2d
        self.router_scores = native.router_scores
        self.gather_layernorm = reference.gather_layernorm
        self.channels_first_layer_norm = native.channels_first_layer_norm
        ltrm = ext.available(device)
        self.dwconv_gelu = ext.dwconv_gelu if ltrm else reference.dwconv_gelu
        self.eca = ext.eca if ltrm else reference.eca
        self.upsample_conv_relu_ = (
            native.upsample_conv_relu_
            if ext.has_kernel("upsample_taps_relu_", device)
            else reference.upsample_conv_relu_
        )
        self.global_attention = (
            native.global_attention_avx2 if cpu and ext.cpu_avx2_kernels() else reference.global_attention
        )

    @staticmethod
    def window_attention(qkv, pad_qkv, rel_h, rel_w, num_heads: int, scale: float, window: int) -> torch.Tensor:
        """Window attention over every window in one fused SDPA call, the position terms as
        its additive bias. The grid is padded (with ``pad_qkv``, the padding tokens'
        projection) past its end and to at least two windows each way: windows of padding
        only change nothing, and the layout of every tensor is then the same at every size
        (a trace at one size would otherwise hold only where the grid fills its windows
        exactly, or only where it has one window)."""
        B, H, W, C3 = qkv.shape
        Hp, Wp = torch.sym_max(H // window + 1, 2) * window, torch.sym_max(W // window + 1, 2) * window
        rows = torch.cat([qkv, pad_qkv.expand(B, H, Wp - W, C3)], dim=2)
        padded = torch.cat([rows, pad_qkv.expand(B, Hp - H, Wp, C3)], dim=1)
        windows = padded.view(B, Hp // window, window, Wp // window, window, C3).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, window * window, 3, num_heads, C3 // 3 // num_heads)
        q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)  # (windows, heads, N, d)
        r_q = q.reshape(-1, window, window, q.shape[-1])
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h.to(q.dtype))
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w.to(q.dtype))
        N = window * window
        bias = (bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]).reshape(q.shape[0], num_heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (windows, heads, N, d)
        grid = out.transpose(1, 2).reshape(B, Hp // window, Wp // window, window, window, C3 // 3)
        grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C3 // 3)
        return grid[:, :H, :W].contiguous()


# -------------------------------------------------------------- symbolic sizes


def padded_side(side, other):
    """The published padding (:func:`mematte.model.padded_size`) as an expression of both
    sides: +32 - side % 32 when either side is off the 32-px grid, else nothing."""
    off_grid = torch.sym_min(1, side % PAD_MULTIPLE + other % PAD_MULTIPLE)
    return PAD_MULTIPLE * (side // PAD_MULTIPLE + off_grid)


def square_rel_pos_table(size, rel_pos: torch.Tensor) -> torch.Tensor:
    """:func:`mematte_kernels.reference.rel_pos_table` for a size × size axis, the table
    resized to 2 * size - 1 rows (linear resizing to its own length is the identity)."""
    rel_pos = F.interpolate(rel_pos.T[None], size=2 * size - 1, mode="linear")[0].T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


# ------------------------------------------------------------------- program


class MattingProgram(nn.Module):
    """What is exported: (image, trimap) -> alpha for one image of any size, with a
    FastMEMatte's or FastViTMatte's weights."""

    def __init__(self, model: FastMEMatte | FastViTMatte, max_tokens: int | None):
        super().__init__()
        self.model = model = frozen_copy(model)
        self.routed = isinstance(model, FastMEMatte)
        self.max_tokens = max_tokens
        self.ops = ExportOps(model.pixel_mean.device)
        # BatchNorm folded into the convolutions once, here, not in the graph.
        with torch.no_grad():
            self.decoder = FoldedDecoder(model.decoder, model.dtype, self.ops)
        # Weights the program never reads would only weigh down its file.
        del model.decoder
        if getattr(model, "teacher_backbone", None) is not None:
            del model.teacher_backbone
        # The eager models' decoding canvas: MEMatte pads to 512-px tiles, ViTMatte decodes the input.
        self.canvas_multiple = TILE if self.routed else PATCH

    def forward(self, image: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
        model = self.model
        H, W = image.shape[-2:]
        Hp, Wp = padded_side(H, W), padded_side(W, H)
        x = torch.cat([(image.float() - model.pixel_mean) / model.pixel_std, trimap.float()], dim=1)
        x = F.pad(x.to(model.dtype), (0, Wp - W, 0, Hp - H))
        features = self.backbone(x)
        alpha = self.decode(features, x, H, W)
        # Cropped by negative padding, a fresh tensor: a slice's strides would depend on
        # whether the crop is empty, which would tie the program to the traced size.
        return F.pad(alpha, (0, W - alpha.shape[-1], 0, H - alpha.shape[-2]))

    # ---------------------------------------------------------------- backbone

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        backbone, ops = self.model.backbone, self.ops
        x = ops.patch_embed(x, backbone.patch_embed.proj.weight, backbone.patch_embed.proj.bias)
        _, h, w, C = x.shape
        x = x + resized_abs_pos(backbone.pos_embed, h, w)
        routers = iter(getattr(backbone, "routers", ()))
        for block in backbone.blocks:
            if isinstance(block, RoutedBlock):
                x = self.routed_block(block, next(routers), x)
            elif isinstance(block, GlobalBlock):
                x = self.global_block(block, x)
            else:
                x = block(x, ops)
        return x.permute(0, 3, 1, 2)

    def routed_block(self, block: RoutedBlock, router, x: torch.Tensor) -> torch.Tensor:
        """:class:`mematte.backbone.RoutedBlock` for one image, the routed tokens an unbacked count."""
        ops, attn = self.ops, block.attn
        _, h, w, C = x.shape
        rows_in = x.reshape(h * w, C)
        scores, keep = router(rows_in[None], ops)
        index = cap_tokens(keep[0], scores[0], self.max_tokens).nonzero()[:, 0]  # (T,)
        torch._check(index.shape[0] <= h * w)
        out = block.efficient_block(x.contiguous(), ops, residual=x).reshape(h * w, C)
        packed = ops.gather_layernorm(rows_in, index, block.norm1.weight, block.norm1.bias, block.norm1.eps)
        qkv = ops.linear(packed, attn.qkv.weight, attn.qkv.bias).view(-1, 3, attn.num_heads, attn.head_dim)
        cu_seqlens = F.pad(index.shape[0] * torch.ones(1, dtype=torch.int32, device=x.device), (1, 0))
        o = exportable.varlen_sdpa(*qkv.unbind(1), cu_seqlens, attn.scale)
        routed = rows_in[index] + ops.linear(o.reshape(-1, C), attn.proj.weight, attn.proj.bias)
        x = out.index_put((index,), routed).view(1, h, w, C)
        x = x + block.mlp(block.norm2(x), ops)
        return block.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)

    def global_block(self, block: GlobalBlock, x: torch.Tensor) -> torch.Tensor:
        """:class:`mematte.backbone.GlobalBlock` with its position tables resized by expressions of the grid."""
        ops, attn = self.ops, block.attn
        _, h, w, C = x.shape
        qkv = ops.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)
        rel_h, rel_w = square_rel_pos_table(h, attn.rel_pos_h), square_rel_pos_table(w, attn.rel_pos_w)
        out = ops.global_attention(qkv.contiguous(), rel_h, rel_w, attn.num_heads, attn.scale)
        x = x + ops.linear(out, attn.proj.weight, attn.proj.bias)
        x = x + block.mlp(block.norm2(x), ops)
        return block.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)

    # ----------------------------------------------------------------- decoder

    def decode(self, features: torch.Tensor, x: torch.Tensor, H, W) -> torch.Tensor:
        """The eager fast path's tiled decoding as one tile: the canvas (the input zero-padded to
        the canvas multiple, the features to match) cropped to the image's tokens plus the
        tiles' context."""
        m = self.canvas_multiple
        Hp, Wp = x.shape[-2:]
        Hc, Wc = (Hp + m - 1) // m * m, (Wp + m - 1) // m * m
        bottom = torch.sym_min((H + PATCH - 1) // PATCH * PATCH + FAST_CONTEXT, Hc)
        right = torch.sym_min((W + PATCH - 1) // PATCH * PATCH + FAST_CONTEXT, Wc)
        # The crop ends at or past the padded input (fresh zero-padded tensors, no slices
        # whose layout would depend on whether they are the whole canvas).
        torch._check(bottom >= Hp)
        torch._check(right >= Wp)
        x = F.pad(x, (0, right - Wp, 0, bottom - Hp))
        features = F.pad(features, (0, right // PATCH - features.shape[-1], 0, bottom // PATCH - features.shape[-2]))
        return self.decoder(features, x)


def frozen_copy(model: nn.Module) -> nn.Module:
    """``model`` with its parameters as buffers, sharing their storage: the program's weights
    are constants, so that running it never records a graph for autograd."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy = deepcopy(model, memo=dict(tensors))
    for module in copy.modules():
        for name, param in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, None if param is None else param.detach())
    return copy


def resized_abs_pos(pos_embed, h, w):
    """:func:`mematte.backbone.abs_pos` without its branch for the pretraining grid's own
    size (bicubic resizing to its own size is the identity)."""
    grid = pos_embed[:, 1:]
    size = int(math.sqrt(grid.shape[1]))
    grid = grid.reshape(1, size, size, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def cap_tokens(keep: torch.Tensor, scores: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """:func:`mematte_kernels.reference.cap_tokens` for one image's (N,) decisions, with a
    ``topk`` over ``min(max_tokens, N)`` tokens instead of a branch on N."""
    if max_tokens is None:
        return keep
    margin = (scores[:, 0] - scores[:, 1]).masked_fill(~keep, float("-inf"))
    top = margin.topk(torch.sym_min(max_tokens, keep.shape[0])).indices
    return torch.zeros_like(keep).scatter_(0, top, True) & keep


# -------------------------------------------------------------------- export


def export_program(
    model: FastMEMatte | FastViTMatte, path: str | os.PathLike, *, max_tokens=DEFAULT_MAX_TOKENS
) -> pathlib.Path:
    """Write ``model``'s fast path as an ``ExportedProgram`` (``torch.export.save``) at
    ``path``, for any height and width from 16 to 16384 px: ``image`` (1, 3, H, W) and
    ``trimap`` (1, 1, H, W) in [0, 1] to ``alpha`` (1, 1, H, W). ``max_tokens`` caps
    MEMatte's routed tokens per image (None or 0: no cap). The file appears whole or not
    at all."""
    program = trace(model, max_tokens)
    with atomic_output(path) as tmp:
        torch.export.save(program, tmp)
    return pathlib.Path(path)


def package_aoti(
    model: FastMEMatte | FastViTMatte, path: str | os.PathLike, *, max_tokens=DEFAULT_MAX_TOKENS
) -> pathlib.Path:
    """:func:`export_program`'s program compiled ahead of time by Inductor for the model's
    device, packaged at ``path`` (a ``.pt2``) for ``torch._inductor.aoti_load_package``.
    Needs a C++ compiler; takes minutes."""
    program = trace(model, max_tokens)
    with atomic_output(path) as tmp:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    return pathlib.Path(path)


def trace(model: FastMEMatte | FastViTMatte, max_tokens=DEFAULT_MAX_TOKENS) -> torch.export.ExportedProgram:
    """The :class:`MattingProgram` of ``model``, exported with dynamic height and width."""
    if not isinstance(model, (FastMEMatte, FastViTMatte)):
        raise TypeError(f"expected a FastMEMatte or FastViTMatte, got {type(model).__name__}")
    program = MattingProgram(model, check_max_tokens(max_tokens)).eval()
    # An example off the 32-px grid, of unequal sides, with two windows along each.
    H, W = 260, 390
    device = model.pixel_mean.device
    example = (torch.rand(1, 3, H, W, device=device), torch.rand(1, 1, H, W, device=device))
    height, width = Dim("height", min=MIN_SIDE, max=MAX_SIDE), Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    shapes = {"image": {2: height, 3: width}, "trimap": {2: height, 3: width}}
    with torch.no_grad():
        return torch.export.export(program, example, dynamic_shapes=shapes, strict=False)
