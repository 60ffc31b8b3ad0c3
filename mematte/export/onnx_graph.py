"""FastMEMatte and FastViTMatte as one ONNX graph, right at every input size.

The graph is written operator by operator (``onnx.helper``), standard ONNX domain only:

- inputs ``image`` (1, 3, H, W) and ``trimap`` (1, 1, H, W), float32 in [0, 1], H and W
  dynamic; output ``alpha`` (1, 1, H, W) float32; MEMatte adds ``decisions`` (4, h, w)
  bool, the tokens each routed block sent to global attention (h, w: the padded input / 16);
- normalisation, the published padding, the bicubic position-embedding resize and the
  linear resize of the relative-position tables are computed from the input's size;
- global attention (ViTMatte's, and the attention among MEMatte's routed tokens) runs over
  strips of ``STRIP`` queries in a ``Loop``: at most STRIP × N logits per head at a time;
- MEMatte's routing: router log-probabilities, the cap by ``TopK`` of the margin,
  ``NonZero`` + ``GatherND`` of the routed tokens and ``ScatterND`` of their output (an
  ``If`` skips attention when no token is routed); the LTRM as convolutions;
- the decoder runs over bands of rows in a ``Loop``, each band with 32 px of context above
  and below (more than its receptive field), so that its activations are those of a band,
  not of the whole image, and equal the whole-image (ViTMatte) or 512-px-tiled (MEMatte)
  decoding of the reference.

With ``dtype=float16`` weights and activations are fp16; LayerNorm statistics, softmaxes,
the routers, the position resizes and the final sigmoid run in fp32.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mematte_kernels.reference import rel_pos_table

from ..backbone import GLOBAL_BLOCKS, PATCH, WINDOW_SIZE, RoutedBlock
from ..decoder import FAST_CONTEXT, TILE, FoldedDecoder
from ..model import PAD_MULTIPLE, PIXEL_MEAN, PIXEL_STD, FastMEMatte
from ..vitmatte import FastViTMatte

STRIP = 256  # queries per step of global attention
# Pixels of a decoder band (context included): its peak is ~130 channels per pixel.
DECODER_BAND_PIXELS = 1 << 20
MIN_OPSET = 18  # LayerNormalization (17), reduction axes as inputs (18)
DEFAULT_OPSET = 20  # Gelu
ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16}


class Graph:
    """Nodes of one ONNX graph; subgraphs (Loop and If bodies) share the root's
    initializers and name counter, and read the outer graph's values by name."""

    def __init__(self, opset: int, dtype: torch.dtype, strip: int = STRIP, root: Graph | None = None):
        self.opset, self.dtype, self.strip = opset, dtype, strip
        self.root = root or self
        self.nodes: list[onnx.NodeProto] = []
        if root is None:
            self.initializers: list[onnx.TensorProto] = []
            self.counter = itertools.count()

    def subgraph(self) -> Graph:
        return Graph(self.opset, self.dtype, self.strip, self.root)

    def name(self, hint: str) -> str:
        return f"{hint}_{next(self.root.counter)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=None, hint: str = "const") -> str:
        name = self.name(hint)
        self.root.initializers.append(numpy_helper.from_array(np.array(value, dtype, order="C"), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), hint="ints")

    def weight(self, tensor: torch.Tensor, hint: str = "w", fp32: bool = False) -> str:
        dtype = np.float32 if fp32 else NUMPY_TYPES[self.dtype]
        return self.const(tensor.detach().float().cpu().numpy().astype(dtype), hint=hint)

    def scalar(self, value: float, fp32: bool = False) -> str:
        return self.const(np.array(value, np.float32 if fp32 else NUMPY_TYPES[self.dtype]))

    # ---------------------------------------------------------- shape arithmetic
    # Sizes are 1-element int64 vectors, so that they concatenate into shapes.

    def dim(self, x: str, axis: int) -> str:
        return self.op("Shape", x, start=axis, end=axis + 1)

    def shape(self, *parts) -> str:
        return self.op("Concat", *[self.ints(p) if isinstance(p, int) else p for p in parts], axis=0)

    def reshape(self, x: str, *parts) -> str:
        return self.op("Reshape", x, self.shape(*parts))

    def arith(self, op_type: str, a, b) -> str:
        return self.op(op_type, *[self.ints(v) if isinstance(v, int) else v for v in (a, b)])

    def ceil_div(self, a: str, b) -> str:
        return self.arith("Div", self.arith("Add", a, self.arith("Sub", b, 1) if not isinstance(b, int) else b - 1), b)

    def slice(self, x: str, start, end, axis: int) -> str:
        as_vec = lambda v: self.ints(v) if isinstance(v, int) else v  # noqa: E731
        return self.op("Slice", x, as_vec(start), as_vec(end), self.ints(axis))

    # ------------------------------------------------------------------ layers

    def to_fp32(self, x: str) -> str:
        return x if self.dtype == torch.float32 else self.op("Cast", x, to=TensorProto.FLOAT)

    def from_fp32(self, x: str) -> str:
        return x if self.dtype == torch.float32 else self.op("Cast", x, to=ONNX_TYPES[self.dtype])

    def linear(self, x: str, layer: torch.nn.Linear, fp32: bool = False) -> str:
        """(M, in) -> (M, out)."""
        return self.op("Gemm", x, self.weight(layer.weight, fp32=fp32), self.weight(layer.bias, fp32=fp32), transB=1)

    def gelu(self, x: str, fp32: bool = False) -> str:
        """Exact (erf) GELU; ``fp32`` for an fp32 tensor in an fp16 graph (the routers)."""
        if self.opset >= 20:
            return self.op("Gelu", x)
        half, root2, one = (self.scalar(v, fp32) for v in (0.5, math.sqrt(2.0), 1.0))
        return self.op("Mul", self.op("Mul", x, half), self.op("Add", self.op("Erf", self.op("Div", x, root2)), one))

    def layer_norm(self, x: str, norm, eps: float | None = None) -> str:
        """LayerNorm over the last axis, statistics in fp32."""
        eps = norm.eps if eps is None else eps
        y = self.op(
            "LayerNormalization",
            self.to_fp32(x),
            self.weight(norm.weight, fp32=True),
            self.weight(norm.bias, fp32=True),
            epsilon=float(eps),
            axis=-1,
        )
        return self.from_fp32(y)

    def channels_first_layer_norm(self, x: str, norm) -> str:
        """LayerNorm over axis 1 of (1, C, h, w), written out as upstream does, in fp32."""
        x = self.to_fp32(x)
        mean = self.op("ReduceMean", x, self.ints(1), keepdims=1)
        centred = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Mul", centred, centred), self.ints(1), keepdims=1)
        y = self.op("Div", centred, self.op("Sqrt", self.op("Add", var, self.scalar(norm.eps, fp32=True))))
        shape = (1, -1, 1, 1)
        weight = self.const(norm.weight.detach().float().numpy().reshape(shape))
        bias = self.const(norm.bias.detach().float().numpy().reshape(shape))
        return self.from_fp32(self.op("Add", self.op("Mul", y, weight), bias))

    def softmax(self, x: str) -> str:
        return self.from_fp32(self.op("Softmax", self.to_fp32(x), axis=-1))

    def conv(
        self,
        x: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> str:
        inputs = [x, self.weight(weight.contiguous())] + ([self.weight(bias)] if bias is not None else [])
        k = weight.shape[-1]
        return self.op(
            "Conv",
            *inputs,
            kernel_shape=[k] * (weight.dim() - 2),
            strides=[stride] * (weight.dim() - 2),
            pads=[padding] * (2 * (weight.dim() - 2)),
            group=groups,
        )


def loop(g: Graph, trips: str, body_fn, out_type: int) -> str:
    """``Loop`` of ``trips`` steps with one scan output: ``body_fn(body_graph, i)`` returns
    the step's output (i: its index, a 1-element int64 vector). Returns the stacked outputs."""
    body = g.subgraph()
    step, cond_in = g.name("step"), g.name("cond_in")
    out = body_fn(body, body.op("Unsqueeze", step, body.ints(0)))
    cond_out = body.op("Identity", cond_in)
    out_id = body.op("Identity", out)
    graph = helper.make_graph(
        body.nodes,
        g.name("loop_body"),
        [
            helper.make_tensor_value_info(step, TensorProto.INT64, []),
            helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
            helper.make_tensor_value_info(out_id, out_type, None),
        ],
    )
    true = g.const(np.array(True))
    return g.op("Loop", g.op("Squeeze", trips), true, body=graph)


def branch(g: Graph, build, out_type: int) -> onnx.GraphProto:
    body = g.subgraph()
    out = body.op("Identity", build(body))
    return helper.make_graph(body.nodes, g.name("branch"), [], [helper.make_tensor_value_info(out, out_type, None)])


# ------------------------------------------------------------------ attention


def strip_attention(g: Graph, q: str, k: str, v: str, tokens: str, position=None) -> str:
    """softmax(q kᵀ + position) v over strips of ``g.strip`` queries: q (heads, T, d) already
    scaled, k and v (heads, T, d); ``position`` = (bias_h (heads, T, h), bias_w (heads, T, w),
    h, w) adds decomposed relative position. Returns (heads, T, d)."""
    strips = g.ceil_div(tokens, g.strip)
    padded = g.arith("Mul", strips, g.strip)
    pad_rows = g.shape(0, 0, 0, 0, g.arith("Sub", padded, tokens), 0)
    q = g.op("Pad", q, pad_rows)
    keys_t = g.op("Transpose", k, perm=[0, 2, 1])  # (heads, d, T)
    if position is not None:
        bias_h, bias_w, h, w = position
        bias_h, bias_w = g.op("Pad", bias_h, pad_rows), g.op("Pad", bias_w, pad_rows)

    def body(s: Graph, i: str) -> str:
        start = s.arith("Mul", i, g.strip)
        end = s.arith("Add", start, g.strip)
        logits = s.op("MatMul", s.slice(q, start, end, 1), keys_t)  # (heads, STRIP, T)
        if position is not None:
            grid = s.reshape(logits, 0, g.strip, h, w)
            grid = s.op("Add", grid, s.op("Unsqueeze", s.slice(bias_h, start, end, 1), s.ints(3)))
            grid = s.op("Add", grid, s.op("Unsqueeze", s.slice(bias_w, start, end, 1), s.ints(2)))
            logits = s.reshape(grid, 0, g.strip, -1)
        return s.op("MatMul", s.softmax(logits), v)  # (heads, STRIP, d)

    out = loop(g, strips, body, ONNX_TYPES[g.dtype])  # (strips, heads, STRIP, d)
    out = g.op("Transpose", out, perm=[1, 0, 2, 3])
    return g.slice(g.reshape(out, 0, -1, g.dim(v, 2)), 0, tokens, 1)


def heads_qkv(g: Graph, qkv: str, attn) -> tuple[str, str, str]:
    """(T, 3C) -> q, k, v (heads, T, d)."""
    qkv = g.reshape(qkv, -1, 3, attn.num_heads, attn.head_dim)
    q, k, v = g.op("Split", g.op("Transpose", qkv, perm=[1, 2, 0, 3]), g.ints(1, 1, 1), axis=0, outputs=3)
    return tuple(g.op("Squeeze", t, g.ints(0)) for t in (q, k, v))


def merge_heads(g: Graph, out: str, channels: int) -> str:
    """(heads, T, d) -> (T, C)."""
    return g.reshape(g.op("Transpose", out, perm=[1, 0, 2]), -1, channels)


def window_attention_block(g: Graph, x: str, block, size) -> str:
    h, w, C = size
    attn = block.attn
    n, d = attn.num_heads, attn.head_dim
    # Upstream pads norm1's output with zero tokens to multiples of the window.
    y = g.reshape(g.layer_norm(x, block.norm1), h, w, C)
    pad_h, pad_w = (g.arith("Mod", g.op("Neg", s), WINDOW_SIZE) for s in (h, w))
    y = g.op("Pad", y, g.shape(0, 0, 0, pad_h, pad_w, 0))
    cols = g.op("Div", g.arith("Add", w, pad_w), g.ints(WINDOW_SIZE))
    qkv = g.linear(g.reshape(y, -1, C), attn.qkv)
    qkv = g.reshape(qkv, -1, WINDOW_SIZE, cols, WINDOW_SIZE, 3, n, d)
    qkv = g.op("Transpose", qkv, perm=[4, 0, 2, 5, 1, 3, 6])  # (3, rows, cols, n, 14, 14, d)
    q, k, v = g.op("Split", g.reshape(qkv, 3, -1, n, WINDOW_SIZE, WINDOW_SIZE, d), g.ints(1, 1, 1), axis=0, outputs=3)
    q, k, v = (g.op("Squeeze", t, g.ints(0)) for t in (q, k, v))  # (windows, n, 14, 14, d)
    rel_h = g.weight(rel_pos_table(WINDOW_SIZE, WINDOW_SIZE, attn.rel_pos_h))
    rel_w = g.weight(rel_pos_table(WINDOW_SIZE, WINDOW_SIZE, attn.rel_pos_w))
    bias_h = g.op("Einsum", q, rel_h, equation="bnyxc,ykc->bnyxk")
    bias_w = g.op("Einsum", q, rel_w, equation="bnyxc,xkc->bnyxk")
    tokens = WINDOW_SIZE * WINDOW_SIZE
    q, k, v = (g.reshape(t, -1, n, tokens, d) for t in (q, k, v))
    logits = g.op("MatMul", g.op("Mul", q, g.scalar(attn.scale)), g.op("Transpose", k, perm=[0, 1, 3, 2]))
    logits = g.reshape(logits, -1, n, WINDOW_SIZE, WINDOW_SIZE, WINDOW_SIZE, WINDOW_SIZE)
    logits = g.op("Add", logits, g.op("Unsqueeze", bias_h, g.ints(5)))
    logits = g.op("Add", logits, g.op("Unsqueeze", bias_w, g.ints(4)))
    out = g.op("MatMul", g.softmax(g.reshape(logits, -1, n, tokens, tokens)), v)  # (windows, n, 196, d)
    out = g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3]), -1, cols, WINDOW_SIZE, WINDOW_SIZE, C)
    out = g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3, 4]), -1, g.arith("Mul", cols, WINDOW_SIZE), C)
    out = g.slice(g.slice(out, 0, h, 0), 0, w, 1)
    x = g.op("Add", x, g.linear(g.reshape(out, -1, C), attn.proj))
    return mlp(g, x, block)


def mlp(g: Graph, x: str, block) -> str:
    hidden = g.gelu(g.linear(g.layer_norm(x, block.norm2), block.mlp.fc1))
    return g.op("Add", x, g.linear(hidden, block.mlp.fc2))


def resized_rel_pos(g: Graph, table: torch.Tensor, size: str) -> str:
    """``rel_pos_table(size, size, table)``: the table linearly resized (in fp32, as
    ``F.interpolate(mode="linear")``) to 2·size − 1 rows, gathered to (size, size, d)."""
    length = g.arith("Sub", g.arith("Mul", size, 2), 1)
    rows = g.const(table.detach().float().numpy().T[None, :, None, :])  # (1, d, 1, L)
    resized = g.op(
        "Resize",
        rows,
        "",
        "",
        g.shape(1, table.shape[1], 1, length),
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    resized = g.op("Transpose", g.reshape(resized, table.shape[1], -1), perm=[1, 0])  # (2·size − 1, d)
    n = g.op("Squeeze", size)
    coords = g.op("Range", g.const(np.array(0, np.int64)), n, g.const(np.array(1, np.int64)))
    relative = g.op(
        "Add",
        g.op("Sub", g.op("Unsqueeze", coords, g.ints(1)), g.op("Unsqueeze", coords, g.ints(0))),
        g.arith("Sub", size, 1),
    )
    return g.from_fp32(g.op("Gather", resized, relative, axis=0))


def global_attention_block(g: Graph, x: str, block, size) -> str:
    """ViTMatte's global block: attention of all tokens with decomposed relative position."""
    h, w, C = size
    attn = block.attn
    tokens = g.dim(x, 0)
    q, k, v = heads_qkv(g, g.linear(g.layer_norm(x, block.norm1), attn.qkv), attn)
    grid = g.reshape(q, attn.num_heads, h, w, attn.head_dim)
    bias_h = g.op("Einsum", grid, resized_rel_pos(g, attn.rel_pos_h, h), equation="nyxc,ykc->nyxk")
    bias_w = g.op("Einsum", grid, resized_rel_pos(g, attn.rel_pos_w, w), equation="nyxc,xkc->nyxk")
    position = (g.reshape(bias_h, attn.num_heads, -1, h), g.reshape(bias_w, attn.num_heads, -1, w), h, w)
    out = strip_attention(g, g.op("Mul", q, g.scalar(attn.scale)), k, v, tokens, position)
    x = g.op("Add", x, g.linear(merge_heads(g, out, C), attn.proj))
    return res_bottleneck(g, mlp(g, x, block), block.residual, size)


def to_channels_first(g: Graph, x: str, size) -> str:
    h, w, C = size
    return g.op("Unsqueeze", g.op("Transpose", g.reshape(x, h, w, -1), perm=[2, 0, 1]), g.ints(0))


def to_tokens(g: Graph, x: str) -> str:
    return g.op("Transpose", g.reshape(x, g.dim(x, 1), -1), perm=[1, 0])


def res_bottleneck(g: Graph, x: str, block, size) -> str:
    y = to_channels_first(g, x, size)
    out = g.gelu(g.channels_first_layer_norm(g.conv(y, block.conv1.weight), block.norm1))
    out = g.gelu(g.channels_first_layer_norm(g.conv(out, block.conv2.weight, padding=1), block.norm2))
    out = g.channels_first_layer_norm(g.conv(out, block.conv3.weight), block.norm3)
    return to_tokens(g, g.op("Add", y, out))


# ------------------------------------------------------------------ routing


def router(g: Graph, x: str, router_module, channels: int) -> tuple[str, str]:
    """Log-probabilities (N, 2) in fp32 and the margin scores[:, 0] − scores[:, 1] (N,)."""
    fc_in, (fc0, fc1, fc2) = router_module.in_conv[1], router_module.out_conv[0::2]
    norm = router_module.in_conv[0]
    t = g.op(
        "LayerNormalization",
        g.to_fp32(x),
        g.weight(norm.weight, fp32=True),
        g.weight(norm.bias, fp32=True),
        epsilon=float(norm.eps),
        axis=-1,
    )
    t = g.gelu(g.linear(t, fc_in, fp32=True), fp32=True)
    half = channels // 2
    local = g.slice(t, 0, half, 1)
    pooled = g.op("ReduceMean", g.slice(t, half, channels, 1), g.ints(0), keepdims=1)
    t = g.op("Concat", local, g.op("Expand", pooled, g.op("Shape", local)), axis=1)
    t = g.gelu(g.linear(t, fc0, fp32=True), fp32=True)
    t = g.gelu(g.linear(t, fc1, fp32=True), fp32=True)
    scores = g.op("LogSoftmax", g.linear(t, fc2, fp32=True), axis=-1)
    first, second = g.op("Split", scores, g.ints(1, 1), axis=1, outputs=2)
    return scores, g.reshape(g.op("Sub", first, second), -1)


def routed_tokens(g: Graph, margin: str, max_tokens: int | None) -> str:
    """keep (N,) bool: margin > 0, capped to the ``max_tokens`` largest margins."""
    keep = g.op("Greater", margin, g.const(np.array(0.0, np.float32)))
    if max_tokens is None:
        return keep
    masked = g.op("Where", keep, margin, g.const(np.array(-np.inf, np.float32)))
    count = g.op("Min", g.dim(margin, 0), g.ints(max_tokens))
    top = g.op("TopK", masked, count, axis=0, largest=1, sorted=0, outputs=2)[1]
    none_chosen = g.op(
        "ConstantOfShape", g.dim(margin, 0), value=helper.make_tensor("", TensorProto.BOOL, [1], [False])
    )
    chosen = g.op(
        "ScatterElements", none_chosen, top, g.op("Expand", g.const(np.array([True])), g.op("Shape", top)), axis=0
    )
    return g.op("And", keep, chosen)


def ltrm(g: Graph, x: str, module, size) -> str:
    """LTRM(x) + x on (N, C) tokens."""
    a = g.gelu(g.linear(x, module.fc1))
    channels = module.dwconv.weight.shape[0]
    a = g.conv(to_channels_first(g, a, size), module.dwconv.weight, module.dwconv.bias, padding=2, groups=channels)
    z = g.linear(to_tokens(g, g.gelu(a)), module.fc2)
    mean = g.reshape(g.op("ReduceMean", g.to_fp32(z), g.ints(0), keepdims=1), 1, 1, -1)
    weight = module.eca.conv.weight
    k = weight.shape[-1]
    gate = g.op("Conv", mean, g.weight(weight, fp32=True), kernel_shape=[k], pads=[(k - 1) // 2] * 2)
    gate = g.from_fp32(g.reshape(g.op("Sigmoid", gate), 1, -1))
    return g.op("Add", g.op("Add", z, g.op("Mul", z, gate)), x)


def routed_block(g: Graph, x: str, block: RoutedBlock, keep: str, size) -> str:
    h, w, C = size
    attn = block.attn
    out = ltrm(g, x, block.efficient_block, size)
    index = g.op("Transpose", g.op("NonZero", keep), perm=[1, 0])  # (T, 1)
    count = g.dim(index, 0)

    def attend(s: Graph) -> str:
        rows = s.op("GatherND", x, index)
        q, k, v = heads_qkv(s, s.linear(s.layer_norm(rows, block.norm1), attn.qkv), attn)
        o = strip_attention(s, s.op("Mul", q, s.scalar(attn.scale)), k, v, count)
        return s.op("ScatterND", out, index, s.op("Add", rows, s.linear(merge_heads(s, o, C), attn.proj)))

    any_routed = g.op("Squeeze", g.op("Greater", count, g.ints(0)))
    dtype = ONNX_TYPES[g.dtype]
    x = g.op(
        "If",
        any_routed,
        then_branch=branch(g, attend, dtype),
        else_branch=branch(g, lambda s: s.op("Identity", out), dtype),
    )
    return res_bottleneck(g, mlp(g, x, block), block.residual, size)


# -------------------------------------------------------------------- model


def backbone(g: Graph, x: str, model, max_tokens: int | None) -> tuple[str, list[str]]:
    """Features (1, C, h, w) and, for MEMatte, each routed block's keep (N,) bool."""
    vit = model.backbone
    C = vit.embed_dim
    patches = g.conv(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=PATCH)
    h, w = g.dim(patches, 2), g.dim(patches, 3)
    size = (h, w, C)
    grid = vit.pos_embed.detach().float()[0, 1:]
    side = int(math.isqrt(grid.shape[0]))
    grid = g.const(grid.numpy().T.reshape(1, C, side, side))
    pos = g.op(
        "Resize",
        grid,
        "",
        "",
        g.shape(1, C, h, w),
        mode="cubic",
        cubic_coeff_a=-0.75,
        coordinate_transformation_mode="half_pixel",
    )
    tokens = g.op("Add", to_tokens(g, patches), g.from_fp32(to_tokens(g, pos)))
    decisions = []
    routers = iter(getattr(vit, "routers", ()))
    for i, block in enumerate(vit.blocks):
        if isinstance(block, RoutedBlock):
            _, margin = router(g, tokens, next(routers), C)
            keep = routed_tokens(g, margin, max_tokens)
            decisions.append(keep)
            tokens = routed_block(g, tokens, block, keep, size)
        elif i in GLOBAL_BLOCKS:
            tokens = global_attention_block(g, tokens, block, size)
        else:
            tokens = window_attention_block(g, tokens, block, size)
    return to_channels_first(g, tokens, size), decisions


def decode(g: Graph, folded: FoldedDecoder, features: str, images: str) -> str:
    """The Detail Capture decoder (BatchNorm folded) of one band: alpha logits' sigmoid in fp32."""
    details = [images]
    for weight, bias in folded.stream:
        details.append(g.op("Relu", g.conv(details[-1], weight, bias, stride=2, padding=1)))
    x = features
    scales = g.const(np.array([1, 1, 2, 2], np.float32))
    for (w_detail, w_up, bias), detail in zip(folded.fusion, reversed(details)):
        up = g.op("Resize", x, "", scales, mode="linear", coordinate_transformation_mode="half_pixel")
        x = g.op("Relu", g.op("Add", g.conv(detail, w_detail, bias, padding=1), g.conv(up, w_up, padding=1)))
    x = g.op("Relu", g.conv(x, *folded.head, padding=1))
    return g.op("Sigmoid", g.to_fp32(g.conv(x, *folded.head_out)))


def decode_bands(
    g: Graph, folded: FoldedDecoder, features: str, x: str, height: str, width: str, canvas_multiple: int
) -> str:
    """Alpha (1, 1, height, width) decoded band by band over the padded input ``x`` (1, 4, Hp, Wp)
    and its features, on the canvas the reference decodes (the input zero-padded to a
    multiple of ``canvas_multiple``), whose rows and columns beyond the image's last token
    plus the context are never needed."""
    region = []
    for size, axis in ((height, 2), (width, 3)):
        padded = g.dim(x, axis)
        canvas = g.arith("Mul", g.ceil_div(padded, canvas_multiple), canvas_multiple)
        region.append(g.op("Min", canvas, g.arith("Add", g.arith("Mul", g.ceil_div(size, PATCH), PATCH), FAST_CONTEXT)))
    rh, rw = region
    x = g.op("Pad", x, g.shape(0, 0, 0, 0, 0, 0, g.arith("Sub", rh, g.dim(x, 2)), g.arith("Sub", rw, g.dim(x, 3))))
    grid_h, grid_w = g.arith("Div", rh, PATCH), g.arith("Div", rw, PATCH)
    features = g.op(
        "Pad",
        features,
        g.shape(
            0, 0, 0, 0, 0, 0, g.arith("Sub", grid_h, g.dim(features, 2)), g.arith("Sub", grid_w, g.dim(features, 3))
        ),
    )
    rows = g.arith("Mul", g.arith("Div", g.arith("Div", g.ints(DECODER_BAND_PIXELS), rw), PATCH), PATCH)
    band = g.op("Max", g.arith("Sub", rows, 2 * FAST_CONTEXT), g.ints(4 * PATCH))
    bands = g.ceil_div(height, band)

    def body(s: Graph, i: str) -> str:
        start = s.arith("Mul", i, band)
        top = s.op("Max", s.arith("Sub", start, FAST_CONTEXT), s.ints(0))
        bottom = s.op("Min", s.arith("Add", s.op("Add", start, band), FAST_CONTEXT), rh)
        alpha = decode(
            s,
            folded,
            s.slice(features, s.arith("Div", top, PATCH), s.arith("Div", bottom, PATCH), 2),
            s.slice(x, top, bottom, 2),
        )
        offset = s.op("Sub", start, top)
        alpha = s.slice(alpha, offset, s.op("Add", offset, band), 2)
        return s.op("Pad", alpha, s.shape(0, 0, 0, 0, 0, 0, s.op("Sub", band, s.dim(alpha, 2)), 0))

    out = loop(g, bands, body, TensorProto.FLOAT)  # (bands, 1, 1, band, rw)
    out = g.reshape(out, 1, 1, -1, rw)
    return g.slice(g.slice(out, 0, height, 2), 0, width, 3)


def build_model(model, dtype: torch.dtype, opset: int, max_tokens: int | None, strip: int = STRIP) -> onnx.ModelProto:
    g = Graph(opset, dtype, strip)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])
    trimap = helper.make_tensor_value_info("trimap", TensorProto.FLOAT, [1, 1, "height", "width"])
    mean = g.const(np.array(PIXEL_MEAN, np.float32).reshape(1, 3, 1, 1))
    std = g.const(np.array(PIXEL_STD, np.float32).reshape(1, 3, 1, 1))
    x = g.op("Concat", g.op("Div", g.op("Sub", "image", mean), std), "trimap", axis=1)
    height, width = g.dim("image", 2), g.dim("image", 3)
    # The published padding: both sides grow to the next multiple of 32 when either is not one.
    rest_h, rest_w = g.arith("Mod", height, PAD_MULTIPLE), g.arith("Mod", width, PAD_MULTIPLE)
    grow = g.op("Cast", g.op("Greater", g.op("Add", rest_h, rest_w), g.ints(0)), to=TensorProto.INT64)
    pad_h = g.op("Mul", grow, g.arith("Sub", PAD_MULTIPLE, rest_h))
    pad_w = g.op("Mul", grow, g.arith("Sub", PAD_MULTIPLE, rest_w))
    x = g.from_fp32(g.op("Pad", x, g.shape(0, 0, 0, 0, 0, 0, pad_h, pad_w)))
    features, decisions = backbone(g, x, model, max_tokens)
    folded = FoldedDecoder(model.decoder, dtype, ops=None)
    canvas_multiple = TILE if isinstance(model, FastMEMatte) else PATCH
    g.op("Identity", decode_bands(g, folded, features, x, height, width, canvas_multiple))
    g.nodes[-1].output[0] = "alpha"
    outputs = [helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [1, 1, "height", "width"])]
    if decisions:
        grid = g.shape(
            g.arith("Div", g.op("Add", height, pad_h), PATCH), g.arith("Div", g.op("Add", width, pad_w), PATCH)
        )
        stacked = g.op("Concat", *[g.op("Unsqueeze", keep, g.ints(0)) for keep in decisions], axis=0)
        g.nodes.append(helper.make_node("Reshape", [stacked, g.shape(len(decisions), grid)], ["decisions"]))
        outputs.append(
            helper.make_tensor_value_info("decisions", TensorProto.BOOL, [len(decisions), "grid_height", "grid_width"])
        )
    kind = "MEMatte" if isinstance(model, FastMEMatte) else "ViTMatte"
    graph = helper.make_graph(g.nodes, f"{kind}-{model.variant}", [image, trimap], outputs, initializer=g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mematte")
    return onnx_model


def check_exportable(model) -> None:
    if not isinstance(model, (FastMEMatte, FastViTMatte)):
        raise TypeError(f"export_onnx takes a FastMEMatte or FastViTMatte, got {type(model).__name__}")


def export_onnx(model, path, *, dtype=None, opset: int | None = None, max_tokens=18500):
    """Write ``model`` (FastMEMatte or FastViTMatte, any backend and dtype: the weights are
    read in fp32) as one ONNX file that runs at any H×W, atomically. ``dtype``:
    ``torch.float32`` (default) or ``torch.float16`` weights and activations (inputs and
    output stay float32). ``opset``: 18 up to what the installed onnx knows (default 20;
    under 20 GELU is written with Erf). ``max_tokens``: MEMatte's cap on the tokens each
    routed block sends to global attention (0 or None: no cap); ViTMatte ignores it.
    Returns the path."""
    import pathlib

    from ..model import check_max_tokens
    from .atomic import atomic_output

    check_exportable(model)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in ONNX_TYPES:
        raise ValueError(f"ONNX export dtype must be torch.float32 or torch.float16, got {dtype}")
    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be a whole number from {MIN_OPSET} to {newest} (the installed onnx), got {opset!r}"
        )
    max_tokens = check_max_tokens(max_tokens)
    onnx_model = build_model(model, dtype, opset, max_tokens)
    onnx.checker.check_model(onnx_model, full_check=True)
    path = pathlib.Path(path)
    with atomic_output(path) as tmp:
        onnx.save(onnx_model, tmp)
    return path
