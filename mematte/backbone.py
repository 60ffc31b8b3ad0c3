"""MEMatte's ViT backbone: window blocks, and global blocks whose routers send only the
informative tokens to attention while all tokens take the light LTRM path.

Module and parameter names are those of the official checkpoints, and a fresh backbone is
initialised as upstream's (TRAINING.md "Initialisation"). Tokens are channels-last
(B, h, w, C) with h = H/16. Every op that has a kernel goes through the op table
(:class:`mematte_kernels.OpTable`) the caller passes in.

ViTMatte's backbone (:class:`ViTMatteBackbone`, also MEMatte's distillation teacher) shares
the window blocks; its global blocks attend over all tokens, with no router or LTRM.

In training (:meth:`ViT.forward_train`) the routed blocks mix the attention of all tokens
with the LTRM by a straight-through Gumbel policy instead of gathering the selected tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mematte_kernels import OpTable
from mematte_kernels.reference import rel_pos_table

WINDOW_SIZE = 14
GLOBAL_BLOCKS = (2, 5, 8, 11)
VARIANTS = {
    # name: (embed dim, heads)
    "vit_s": (384, 6),
    "vit_b": (768, 12),
}
DEPTH = 12
PATCH = 16


# ----------------------------------------------------------------- embeddings


class PatchEmbed(nn.Module):
    """Conv2d(4, C, 16, stride 16): (B, 4, H, W) -> (B, H/16, W/16, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        # Contiguous tokens: every later op reads channels as the innermost dimension.
        return ops.patch_embed(x, self.proj.weight, self.proj.bias)


def abs_pos(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The 14×14 pretraining grid of ``pos_embed`` (class token dropped), bicubic-resized
    to h×w: (1, h, w, C)."""
    grid = pos_embed[:, 1:]
    size = int(math.sqrt(grid.shape[1]))
    grid = grid.reshape(1, size, size, -1)
    if (size, size) == (h, w):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class ResizedPosEmbed:
    """:func:`abs_pos` that keeps, outside autograd, the last grid it resized to: at 4K the
    bicubic resize costs a tenth of a second or more on a CPU, and its result changes only
    with the weights: another tensor (``.to()``, ``load_state_dict(assign=True)``) or an
    in-place update, which moves the tensor's version counter (weights made under
    ``torch.inference_mode()`` have none, and are resized every call)."""

    def __init__(self):
        self.key, self.grid = None, None

    def __call__(self, pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if torch.is_grad_enabled() or pos_embed.is_inference():
            return abs_pos(pos_embed, h, w)
        key = (h, w, id(pos_embed), pos_embed.data_ptr(), pos_embed._version, pos_embed.dtype, pos_embed.device)
        if key != self.key:
            self.key, self.grid = key, abs_pos(pos_embed, h, w)
        return self.grid


# ------------------------------------------------------ window attention blocks


class Attention(nn.Module):
    """Multi-head attention's parameters; window blocks add decomposed relative position.
    The blocks run it through the op table (window attention, varlen attention)."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_size is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        return ops.linear(ops.linear_gelu(x, self.fc1.weight, self.fc1.bias), self.fc2.weight, self.fc2.bias)


class WindowBlock(nn.Module):
    """x = x + WinAttn(norm1(x)); x = x + MLP(norm2(x)). Windows are 14×14; norm1's output
    is zero-padded to a multiple of 14 and the padding tokens take part as keys (their
    projection is the qkv bias, which is how the op table receives them)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_size=WINDOW_SIZE)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        attn = self.attn
        qkv = ops.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)
        rel_h = rel_pos_table(WINDOW_SIZE, WINDOW_SIZE, attn.rel_pos_h)
        rel_w = rel_pos_table(WINDOW_SIZE, WINDOW_SIZE, attn.rel_pos_w)
        out = ops.window_attention(qkv, attn.qkv.bias, rel_h, rel_w, attn.num_heads, attn.scale, WINDOW_SIZE)
        x = x + ops.linear(out, attn.proj.weight, attn.proj.bias)
        return x + self.mlp(self.norm2(x), ops)


# ---------------------------------------------------------------------- router


class Router(nn.Module):
    """Scores each token: (B, N, C) -> log-probabilities (B, N, 2); index 0 means global
    attention. ``in_conv`` = LayerNorm(eps 1e-5), Linear(C, C), GELU; the second half of its
    output is averaged over the image and appended to the first half of every token;
    ``out_conv`` = Linear(C, C/2), GELU, Linear(C/2, C/4), GELU, Linear(C/4, 2), LogSoftmax."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, tokens: torch.Tensor, ops: OpTable) -> tuple[torch.Tensor, torch.Tensor]:
        norm, fc_in = self.in_conv[0], self.in_conv[1]
        fc0, fc1, fc2 = self.out_conv[0], self.out_conv[2], self.out_conv[4]
        return ops.router_scores(
            tokens,
            norm.weight, norm.bias,
            fc_in.weight, fc_in.bias,
            fc0.weight, fc0.bias,
            fc1.weight, fc1.bias,
            fc2.weight, fc2.bias,
            norm.eps,
        )  # fmt: skip


# ------------------------------------------------------------------------ LTRM


def eca_kernel_size(channels: int) -> int:
    """ECA's adaptive kernel size: t = int(|log2(C)/2 + 1/2|), made odd."""
    t = int(abs(math.log2(channels) / 2 + 0.5))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)


class LTRM(nn.Module):
    """The light path every token of a global block takes (``efficient_block``):
    GELU(fc1) -> GELU(depthwise 5×5) -> fc2 -> ECA, on (B, h, w, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 5, padding=2, groups=2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.eca = ECA(dim)

    def forward(self, x: torch.Tensor, ops: OpTable, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``z + z * s`` with s the ECA gate, plus ``residual`` when given."""
        a = ops.dwconv_gelu(ops.linear_gelu(x, self.fc1.weight, self.fc1.bias), self.dwconv.weight, self.dwconv.bias)
        return ops.eca(ops.linear(a, self.fc2.weight, self.fc2.bias), self.eca.conv.weight, residual)


# ------------------------------------------------------------- ResBottleneck


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        return ops.channels_first_layer_norm(x, self.weight, self.bias, self.eps)


class ResBottleneck(nn.Module):
    """x + norm3(conv3(GELU(norm2(conv2(GELU(norm1(conv1(x)))))))) on (B, C, H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = ChannelsFirstLayerNorm(mid)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = ChannelsFirstLayerNorm(mid)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv2d(mid, dim, 1, bias=False)
        self.norm3 = ChannelsFirstLayerNorm(dim)
        for conv in (self.conv1, self.conv2, self.conv3):  # detectron2's c2_msra_fill
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        # The block starts as the identity: its last norm is zero.
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        out = self.act1(self.norm1(ops.conv2d(x, self.conv1.weight, None), ops))
        out = self.act2(self.norm2(ops.conv2d(out, self.conv2.weight, None, 1, 1), ops))
        return x + self.norm3(ops.conv2d(out, self.conv3.weight, None), ops)


# ------------------------------------------------------------ routed block


class RoutedBlock(nn.Module):
    """A MEMatte global block at inference:

        msa = LTRM(x)                             on all tokens
        msa[sel] = proj(attn(qkv(norm1(x[sel]))))  plain attention among the selected
        x = x + msa;  x = x + MLP(norm2(x));  x = ResBottleneck(x)

    The selection attends per image (varlen), so a batch equals separate calls.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_size=None)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.efficient_block = LTRM(dim)
        self.residual = ResBottleneck(dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, ops: OpTable) -> torch.Tensor:
        B, h, w, C = x.shape
        attn = self.attn
        x = x.contiguous()  # the compiled LTRM ops read it as (B*h*w, C) rows
        rows_in = x.view(B * h * w, C)
        # x + msa for every token; the selected rows are overwritten below.
        out = self.efficient_block(x, ops, residual=x).reshape(B * h * w, C)

        index, cu_seqlens, max_seqlen = ops.token_index(keep)
        if index.numel():
            packed = ops.gather_layernorm(rows_in, index, self.norm1.weight, self.norm1.bias, self.norm1.eps)
            qkv = ops.linear(packed, attn.qkv.weight, attn.qkv.bias).view(-1, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv.unbind(1)  # (T, heads, d)
            o = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, attn.scale)
            ops.scatter_residual_(out, rows_in, ops.linear(o.reshape(-1, C), attn.proj.weight, attn.proj.bias), index)

        x = out.view(B, h, w, C)
        x = x + self.mlp(self.norm2(x), ops)
        return self.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)

    def forward_train(self, x: torch.Tensor, policy: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """The block in training: with the policy p (B, N) (0/1 forward values),

            fast = LTRM(x);  slow = proj(policy_attention(qkv(norm1(x)), p))  over all tokens
            x = x + slow·p + fast·(1 − p);  x = x + MLP(norm2(x));  x = ResBottleneck(x)

        Gradients reach the router through p in the mix and in the attention's key mask."""
        B, h, w, C = x.shape
        attn = self.attn
        fast = self.efficient_block(x.contiguous(), ops).reshape(B, h * w, C)
        qkv = ops.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias).reshape(
            B, h * w, 3, attn.num_heads, attn.head_dim
        )
        q, k, v = qkv.unbind(2)  # (B, N, heads, d)
        o = ops.policy_attention(q, k, v, policy, attn.scale)
        slow = ops.linear(o.reshape(B, h * w, C), attn.proj.weight, attn.proj.bias)
        p = policy[..., None]
        x = x + (slow * p + fast * (1.0 - p)).view(B, h, w, C)
        x = x + self.mlp(self.norm2(x), ops)
        return self.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)


def gumbel_policy(scores: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gumbel_softmax(scores, tau=1, hard=True)[..., 0]`` on (B, N, 2) log-probabilities:
    (B, N) with the hard one-hot's value (1 = global attention) and the soft sample's
    gradient. ``noise`` (B, N, 2) replaces the Gumbel draw ``-log(Exponential(1))``."""
    if noise is None:
        noise = -torch.empty_like(scores).exponential_().log()
    y_soft = (scores + noise.to(scores)).softmax(dim=-1)
    y_hard = torch.zeros_like(scores).scatter_(-1, y_soft.argmax(dim=-1, keepdim=True), 1.0)
    return (y_hard - y_soft.detach() + y_soft)[..., 0]


# -------------------------------------------------------------------- backbone


class ViT(nn.Module):
    """Patch embedding + absolute positions, then 12 blocks; blocks 2, 5, 8, 11 are routed
    (``routers.0..3`` in that order). Returns features (B, C, h, w) and per routed block the
    router scores (B, h, w, 2) and decisions (B, h, w, 1) bool."""

    def __init__(self, variant: str):
        super().__init__()
        dim, heads = VARIANTS[variant]
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(4, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 1, dim))
        self.blocks = nn.ModuleList(
            RoutedBlock(dim, heads) if i in GLOBAL_BLOCKS else WindowBlock(dim, heads) for i in range(DEPTH)
        )
        self.routers = nn.ModuleList(Router(dim) for _ in GLOBAL_BLOCKS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)
        self.resized_pos_embed = ResizedPosEmbed()

    def forward(
        self, x: torch.Tensor, ops: OpTable, max_tokens: int | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        x = self.patch_embed(x, ops)
        B, h, w, C = x.shape
        x = x + self.resized_pos_embed(self.pos_embed, h, w)
        scores, decisions = [], []
        routers = iter(self.routers)
        for block in self.blocks:
            if isinstance(block, RoutedBlock):
                score, keep = next(routers)(x.reshape(B, h * w, C), ops)
                keep = ops.cap_tokens(keep, score, max_tokens)
                x = block(x, keep, ops)
                scores.append(score.view(B, h, w, 2))
                decisions.append(keep.view(B, h, w, 1))
            else:
                x = block(x, ops)
        return x.permute(0, 3, 1, 2), scores, decisions

    def forward_train(
        self, x: torch.Tensor, ops: OpTable, gumbel_noise: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Training forward: features (B, C, h, w), and per router the scores (B, N, 2) and the
        straight-through policy (B, N), tokens in row-major order. ``gumbel_noise`` holds
        the four routers' Gumbel draws (B, N, 2), in order."""
        x = self.patch_embed(x, ops)
        B, h, w, C = x.shape
        if gumbel_noise is not None:
            if len(gumbel_noise) != len(self.routers):
                raise ValueError(f"gumbel_noise must hold {len(self.routers)} tensors, got {len(gumbel_noise)}")
            for k, noise in enumerate(gumbel_noise):
                if tuple(noise.shape) != (B, h * w, 2):
                    raise ValueError(f"gumbel_noise[{k}] must be (B, N, 2) = {(B, h * w, 2)}, got {tuple(noise.shape)}")
        x = x + abs_pos(self.pos_embed, h, w)
        scores, policies = [], []
        for block in self.blocks:
            if isinstance(block, RoutedBlock):
                k = len(policies)
                score, _ = self.routers[k](x.reshape(B, h * w, C), ops)
                policy = gumbel_policy(score, None if gumbel_noise is None else gumbel_noise[k])
                x = block.forward_train(x, policy, ops)
                scores.append(score)
                policies.append(policy)
            else:
                x = block(x, ops)
        return x.permute(0, 3, 1, 2), scores, policies


def init_weights(module: nn.Module) -> None:
    """Upstream ViT's ``_init_weights``: Linear weights ~ N(0, 0.02²) truncated at ±2 (in
    effect untruncated), biases 0; LayerNorm 1 and 0. PyTorch's defaults elsewhere."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------ ViTMatte's backbone
# ViTMatte's model and MEMatte's distillation teacher (``teacher_backbone.*``): the same
# window blocks, and global blocks in which every token attends to every other.

# The global blocks' position tables cover the 512-px pretraining grid: 2 * 32 - 1 rows,
# resized at run time to the grid's 2h - 1 and 2w - 1.
GLOBAL_REL_POS_SIZE = 512 // PATCH


class GlobalBlock(nn.Module):
    """x = x + Attn(norm1(x)) over all tokens with decomposed relative position;
    x = x + MLP(norm2(x)); x = ResBottleneck(x)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_size=GLOBAL_REL_POS_SIZE)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.residual = ResBottleneck(dim)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        B, h, w, C = x.shape
        attn = self.attn
        qkv = ops.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)
        rel_h = rel_pos_table(h, h, attn.rel_pos_h)
        rel_w = rel_pos_table(w, w, attn.rel_pos_w)
        out = ops.global_attention(qkv, rel_h, rel_w, attn.num_heads, attn.scale)
        x = x + ops.linear(out, attn.proj.weight, attn.proj.bias)
        x = x + self.mlp(self.norm2(x), ops)
        return self.residual(x.permute(0, 3, 1, 2), ops).permute(0, 2, 3, 1)


class ViTMatteBackbone(nn.Module):
    """Patch embedding + absolute positions, then 12 blocks: window blocks, and global
    blocks at 2, 5, 8, 11. ``forward(x, ops)`` maps the preprocessed (B, 4, H, W) input
    (H, W multiples of 16) to features (B, C, H/16, W/16)."""

    def __init__(self, variant: str):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        dim, heads = VARIANTS[variant]
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(4, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 1, dim))
        self.blocks = nn.ModuleList(
            GlobalBlock(dim, heads) if i in GLOBAL_BLOCKS else WindowBlock(dim, heads) for i in range(DEPTH)
        )
        self.resized_pos_embed = ResizedPosEmbed()

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        x = self.patch_embed(x, ops)
        x = x + self.resized_pos_embed(self.pos_embed, *x.shape[1:3])
        for block in self.blocks:
            x = block(x, ops)
        return x.permute(0, 3, 1, 2)
