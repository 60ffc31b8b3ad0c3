"""Detail Capture decoder (``decoder.*``) and tiled ("patch") decoding.

ConvStream extracts detail features D1..D3 (1/2, 1/4, 1/8) from the 4-channel input D0;
four fusion blocks upsample the ViT features ×2 each and fuse them with D3..D0; a small
head gives alpha = sigmoid(conv).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mematte_kernels import OpTable

from . import progress

TILE = 512  # pixels each tile contributes, and the unit the input is padded to
CONTEXT = 64  # pixels of context decoded around a tile, where the input has them
PATCH = 16
# The decoder's receptive field reaches 31 px into its input (the 3×3 convs and ×2
# upsamplings of ConvStream and the fusion blocks) and 2 tokens into the features, so a
# tile's centre is decoded identically with 32 px of context as with upstream's 64. Fast
# backends decode larger tiles with that context: a quarter of the work, same output.
FAST_TILE = 1024
FAST_CONTEXT = 32
# Channels alive at once per full-resolution pixel at the decoder's peak, for its tile
# budget: the upstream-exact decoder's last fusion block (detail maps, upsampled features,
# their concatenation, conv and BatchNorm outputs); the fast decoder needs less.
PEAK_CHANNELS_PER_PIXEL = 224


class BasicConv3x3(nn.Module):
    """Conv3×3 (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ConvStream(nn.Module):
    """Three stride-2 BasicConv3x3, 4 -> 48 -> 96 -> 192: returns [D0, D1, D2, D3]."""

    def __init__(self, in_chans: int = 4, out_chans: tuple[int, ...] = (48, 96, 192)):
        super().__init__()
        chans = (in_chans, *out_chans)
        self.convs = nn.ModuleList(BasicConv3x3(a, b, stride=2) for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        details = [x]
        for conv in self.convs:
            details.append(conv(details[-1]))
        return details


class FusionBlock(nn.Module):
    """Bilinear ×2 upsample (align_corners=False), concat [D, F], BasicConv3x3 stride 1."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = BasicConv3x3(in_chans, out_chans, stride=1)

    def forward(self, x: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(torch.cat([detail, up], dim=1))


class MattingHead(nn.Module):
    """Conv3×3(32 -> 16, bias) -> BatchNorm -> ReLU -> Conv1×1(16 -> 1, bias): logits."""

    def __init__(self, in_chans: int = 32, mid_chans: int = 16):
        super().__init__()
        self.matting_convs = nn.Sequential(
            nn.Conv2d(in_chans, mid_chans, 3, 1, 1),
            nn.BatchNorm2d(mid_chans),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_chans, 1, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matting_convs(x)


class DetailCapture(nn.Module):
    def __init__(self, in_chans: int, fusion_out: tuple[int, ...] = (256, 128, 64, 32)):
        super().__init__()
        self.convstream = ConvStream()
        detail_chans = (4, 48, 96, 192)
        fusion_in = (in_chans, *fusion_out[:-1])
        self.fusion_blks = nn.ModuleList(
            FusionBlock(fusion_in[i] + detail_chans[-(i + 1)], fusion_out[i]) for i in range(len(fusion_out))
        )
        self.matting_head = MattingHead(fusion_out[-1])

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w) and images (B, 4, 16h, 16w) -> alpha (B, 1, 16h, 16w) fp32."""
        details = self.convstream(images)
        x = features
        for i, fuse in enumerate(self.fusion_blks):
            x = fuse(x, details[-(i + 1)])
        return torch.sigmoid(self.matting_head(x).float())


class FoldedDecoder:
    """The decoder as the fast backends run it, prepared once per forward:

    - each BatchNorm (eval mode: an affine map) is folded into the convolution before it,
      in fp32, then cast to the compute dtype — one pass over each output instead of two;
    - a fusion block's convolution over ``cat([D, up])`` runs as two convolutions summed,
      ``conv(D, W_D) + conv(up, W_up)``, so the concatenation is never written, and the
      second one (with the ReLU) is the op table's ``upsample_conv_relu_``, which need not
      write the upsampled map either;
    - activations are channels-last, the layout the CPU and GPU convolution libraries
      are fastest in.
    """

    def __init__(self, decoder: DetailCapture, dtype: torch.dtype, ops: OpTable):
        self.dtype = dtype
        self.ops = ops
        self.stream = [self._fold(block.conv, block.bn) for block in decoder.convstream.convs]
        convs = decoder.convstream.convs
        detail_chans = [convs[0].conv.in_channels] + [block.conv.out_channels for block in convs]
        self.fusion = []  # (weight over D, weight over the upsampled features, bias)
        for block, chans in zip(decoder.fusion_blks, reversed(detail_chans)):
            weight, bias = self._fold(block.conv.conv, block.conv.bn)
            w_detail, w_up = (
                w.contiguous(memory_format=torch.channels_last)
                for w in weight.split([chans, weight.shape[1] - chans], 1)
            )
            self.fusion.append((w_detail, w_up, bias))
        conv1, bn, _, conv2 = decoder.matting_head.matting_convs
        self.head = self._fold(conv1, bn)
        self.head_out = (conv2.weight.to(dtype), conv2.bias.to(dtype))

    def _fold(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        shift = bn.bias.float() - bn.running_mean.float() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        weight = conv.weight.float() * scale[:, None, None, None]
        return weight.to(self.dtype).contiguous(memory_format=torch.channels_last), shift.to(self.dtype)

    def __call__(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last)
        details = [x]
        for weight, bias in self.stream:
            details.append(self.ops.conv2d(details[-1], weight, bias, 2, 1).relu_())
        x = features.contiguous(memory_format=torch.channels_last)
        for (w_detail, w_up, bias), detail in zip(self.fusion, reversed(details)):
            x = self.ops.upsample_conv_relu_(self.ops.conv2d(detail, w_detail, bias, 1, 1), x, w_up)
        x = self.ops.conv2d(x, *self.head, 1, 1).relu_()
        return torch.sigmoid(self.ops.conv2d(x, *self.head_out).float())


def tile_length(size: int, tile: int) -> int:
    """The length of the tiles that cover ``size`` px with as few tiles of at most ``tile``
    px as possible, all equal but the last, on the token grid: 2160 px in 1024-px tiles are
    three of 720, not two of 1024 and a sliver."""
    count = -(-size // tile)
    return -(-size // (count * PATCH)) * PATCH


def tile_grid(
    height: int, width: int, tile: int = TILE, context: int = CONTEXT, canvas: tuple[int, int] | None = None
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Tiles covering the top-left (height, width) of a canvas (by default exactly that
    size): for each, its crop (top, bottom, left, right) with up to ``context`` px beyond the
    tile on each side that stays inside the canvas, and the tile's place inside that crop
    (dy, dx, tile height, tile width)."""
    canvas_h, canvas_w = canvas or (height, width)
    tile_h, tile_w = tile_length(height, tile), tile_length(width, tile)
    # Crops stay on the token grid: a region that ends mid-token is decoded to the token's end.
    grid_h, grid_w = -(-height // PATCH) * PATCH, -(-width // PATCH) * PATCH
    tiles = []
    for y in range(0, height, tile_h):
        for x in range(0, width, tile_w):
            top, left = max(y - context, 0), max(x - context, 0)
            bottom = min(min(y + tile_h, grid_h) + context, canvas_h)
            right = min(min(x + tile_w, grid_w) + context, canvas_w)
            place = (y - top, x - left, min(tile_h, height - y), min(tile_w, width - x))
            tiles.append(((top, bottom, left, right), place))
    return tiles


def tiles_per_batch(crop_pixels: int, images_per_tile: int, element_size: int, memory: int) -> int:
    """How many tiles of ``crop_pixels`` fit the decoder's ``memory`` budget (at least 1)."""
    per_tile = crop_pixels * images_per_tile * PEAK_CHANNELS_PER_PIXEL * element_size
    return max(1, memory // per_tile)


def tile_batches(
    height: int,
    width: int,
    canvas: tuple[int, int],
    tile: int,
    context: int,
    images_per_tile: int,
    element_size: int,
    memory: int | None,
) -> list[list]:
    """The tiles of :func:`tile_grid` in the batches :func:`decode_tiled` decodes together:
    tiles of the same crop size, as many as fit ``memory`` bytes (one at a time when None)."""
    by_shape: dict[tuple[int, int], list] = {}
    for crop, place in tile_grid(height, width, tile, context, canvas=canvas):
        by_shape.setdefault((crop[1] - crop[0], crop[3] - crop[2]), []).append((crop, place))
    chunks = []
    for (crop_h, crop_w), group in by_shape.items():
        max_batch = 1 if memory is None else tiles_per_batch(crop_h * crop_w, images_per_tile, element_size, memory)
        chunks += [group[start : start + max_batch] for start in range(0, len(group), max_batch)]
    return chunks


def decode_tiled(
    decoder: DetailCapture | FoldedDecoder,
    features: torch.Tensor,
    images: torch.Tensor,
    memory: int | None = None,
    tile: int = TILE,
    context: int = CONTEXT,
    size: tuple[int, int] | None = None,
    canvas_multiple: int = TILE,
) -> torch.Tensor:
    """Decode tiles (upstream: 512×512 with 64 px of context) and stitch their centres.

    The input is zero-padded bottom/right to a multiple of ``canvas_multiple`` px (the
    canvas; upstream MEMatte: 512) and the features to match. With a multiple of 16 the
    canvas is the input itself, and the tiles give what decoding the whole input at once
    does (ViTMatte): a crop that reaches the input's edge is zero-padded there as the whole
    image is. Tiles cover the top-left ``size`` (height, width)
    of the canvas, all of it when None as upstream does; a caller that crops the alpha to the
    image can ask for just the image and skip decoding the padding (a fifth of the work at
    3840×2160). Tiles of the same crop size are decoded together, as many as fit
    ``memory`` bytes (one at a time when None); BatchNorm is in eval mode, so tiles are
    independent. Returns fp32 (B, 1, *size).
    """
    if tile % PATCH or context % PATCH or tile <= 0:
        raise ValueError(f"tile ({tile} px) and context ({context} px) must be multiples of the {PATCH}-px token")
    if canvas_multiple % PATCH or canvas_multiple <= 0:
        raise ValueError(f"canvas multiple ({canvas_multiple} px) must be a multiple of the {PATCH}-px token")
    B, _, H, W = images.shape
    Hp, Wp = -(-H // canvas_multiple) * canvas_multiple, -(-W // canvas_multiple) * canvas_multiple
    images = F.pad(images, (0, Wp - W, 0, Hp - H))
    features = F.pad(features, (0, Wp // PATCH - features.shape[-1], 0, Hp // PATCH - features.shape[-2]))
    height, width = size or (Hp, Wp)
    if not (0 < height <= Hp and 0 < width <= Wp):
        raise ValueError(f"size {size} must be within the {Hp}×{Wp} canvas")
    alpha = images.new_empty((B, 1, height, width), dtype=torch.float32)
    chunks = tile_batches(height, width, (Hp, Wp), tile, context, B, images.element_size(), memory)
    for done, chunk in enumerate(chunks, 1):
        imgs = torch.cat([images[:, :, t:b, l:r] for (t, b, l, r), _ in chunk])
        feats = torch.cat(
            [features[:, :, t // PATCH : b // PATCH, l // PATCH : r // PATCH] for (t, b, l, r), _ in chunk]
        )
        out = decoder(feats, imgs)
        for i, ((t, _, l, _), (dy, dx, th, tw)) in enumerate(chunk):
            alpha[:, :, t + dy : t + dy + th, l + dx : l + dx + tw] = out[
                i * B : (i + 1) * B, :, dy : dy + th, dx : dx + tw
            ]
        progress.report("decoder", done, len(chunks))
    return alpha
