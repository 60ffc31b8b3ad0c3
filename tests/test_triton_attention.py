"""Varlen flash attention (Triton) against the per-sequence reference loop, and in fp32 also
against torch's scaled_dot_product_attention run sequence by sequence.

Without a GPU the kernel runs in Triton's interpreter (see conftest.py); the sizes are odd on
purpose (not multiples of the 64-row blocks) and include empty and one-token sequences.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import reference
from mematte_kernels.triton import gather_layernorm, scatter_residual_, varlen_attention
from mematte_kernels.triton.varlen_attention import _varlen_attention_kernel, launch_varlen_attention

from triton_tolerance import DTYPE_NAMES, DTYPES, assert_close, max_abs_error

HEAD_DIM = 64

# (sequence lengths, heads): B = len(lengths), T = sum(lengths).
SHAPES = {
    "B1-T1": ([1], 1),
    "B1-T63": ([63], 2),
    "B1-T65": ([65], 2),
    "B1-T1000": ([1000], 1),
    "B3-T128-one-empty": ([63, 0, 65], 2),
    "B3-T1-two-empty": ([0, 1, 0], 1),
    "B4-T1000-one-empty": ([300, 0, 650, 50], 1),
    "B1-T0": ([0], 2),
    "B0-T0": ([], 2),
}


def cases(shapes=SHAPES, dtypes=DTYPES):
    return [
        pytest.param(lengths, heads, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}")
        for (name, (lengths, heads)), dtype in itertools.product(shapes.items(), dtypes)
    ]


def packed_qkv(lengths: list[int], heads: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as strided views of one (T, 3, heads, 64) tensor, as the model's qkv gives
    them, with ``cu_seqlens`` and ``max_seqlen``."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, HEAD_DIM, generator=generator).to(dtype)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return (*qkv.unbind(1), cu_seqlens, max(lengths, default=0))


def run_kernel(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """The kernel into a NaN-filled output, so any element it fails to write fails the test."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, out=out)
    return out


def check_against_reference(q, k, v, cu_seqlens, max_seqlen, scale=None):
    out = run_kernel(q, k, v, cu_seqlens, max_seqlen, scale)
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, scale)
    low_precision = None
    if q.dtype != torch.float32:
        low_precision = reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    assert_close(out, expected, low_precision)


@pytest.mark.parametrize("lengths, heads, dtype", cases())
def test_matches_reference(lengths, heads, dtype):
    check_against_reference(*packed_qkv(lengths, heads, dtype))


@pytest.mark.parametrize(
    "lengths, heads, dtype",
    cases({name: SHAPES[name] for name in ("B1-T63", "B1-T1000", "B4-T1000-one-empty")}, [torch.float32]),
)
def test_fp32_matches_sdpa(lengths, heads, dtype):
    """An independent fp32 check: torch's own attention, one sequence at a time."""
    q, k, v, cu_seqlens, max_seqlen = packed_qkv(lengths, heads, dtype, seed=1)
    out = run_kernel(q, k, v, cu_seqlens, max_seqlen)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            per_head = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, n, 64)
            expected = F.scaled_dot_product_attention(*per_head).transpose(0, 1)
            assert_close(out[start:end], expected)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_custom_scale_and_contiguous_inputs(dtype):
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([70, 0, 33], 2, dtype, seed=2)
    check_against_reference(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale=0.3)


# Scaled logits of this standard deviation: their rounding, not the softmax's, dominates.
LARGE_LOGIT_STD = 5.0
# The kernel and torch's fused attention compute the same fp32 logits and differ only in
# block order and where the probabilities are rounded.
FUSED_ATTENTION_FACTOR = 1.5


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.bfloat16, torch.float16)])
def test_large_logits_as_precise_as_fused_attention(dtype):
    """Large logits: the kernel scales the fp32 logits, as flash-attention does, and stays
    within 1.5x the error of torch's fused attention in the same dtype. Folding the scale
    into q and rounding it to the dtype first costs about 3x (bf16 and fp16 alike).

    The 2x-PyTorch rule of the other tests does not see this: the unfused reference rounds
    the logits themselves to the low precision and is worse than both."""
    lengths, heads = [300, 77], 2
    generator = torch.Generator().manual_seed(8)
    q, k = (torch.randn(sum(lengths), heads, HEAD_DIM, generator=generator) * LARGE_LOGIT_STD**0.5 for _ in "qk")
    v = torch.randn(sum(lengths), heads, HEAD_DIM, generator=generator)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)

    out = run_kernel(q, k, v, cu_seqlens, max(lengths))
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, max(lengths))
    fused = torch.cat(
        [
            F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for start, end in itertools.pairwise(cu_seqlens.tolist())
        ]
    )
    fused_error = max_abs_error(fused, expected)
    error = assert_close(out, expected, atol=FUSED_ATTENTION_FACTOR * fused_error)
    assert error > 0  # the comparison means something: bf16/fp16 outputs are not exact


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.bfloat16, torch.float16)])
def test_relpos_large_logits_as_precise_as_fused_attention(dtype):
    """The same rule for ViTMatte's global attention kernel, whose position bias is added to
    the scaled fp32 logits: torch's fused attention gets the bias as a mask."""
    from mematte_kernels.triton import relpos_attention

    B, H, W, heads = 1, 15, 20, 2
    generator = torch.Generator().manual_seed(9)
    q, k = (torch.randn(B, H * W, heads, HEAD_DIM, generator=generator) * LARGE_LOGIT_STD**0.5 for _ in "qk")
    v = torch.randn(B, H * W, heads, HEAD_DIM, generator=generator)
    bias_h, bias_w = (torch.randn(B, H * W, heads, n, generator=generator) for n in (H, W))
    q, k, v, bias_h, bias_w = (t.to(dtype) for t in (q, k, v, bias_h, bias_w))

    out = relpos_attention(q, k, v, bias_h, bias_w)
    scale = HEAD_DIM**-0.5
    expected = reference.relpos_attention(*(t.float() for t in (q, k, v, bias_h, bias_w)), scale)
    mask = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, H * W, heads, H * W).transpose(1, 2)
    fused = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    error = assert_close(out, expected, atol=FUSED_ATTENTION_FACTOR * max_abs_error(fused, expected))
    assert error > 0


def test_autotune_key_buckets_the_longest_sequence(monkeypatch):
    """Autotuning is keyed on a power-of-two bucket of max_seqlen (never the exact count),
    so a 64-token call and an 18,500-token call get their own tiles. Nothing runs: the
    launches are caught with meta tensors."""
    keys = []

    def record_key(*args, grid, warmup, **kwargs):
        named = {**dict(zip(_varlen_attention_kernel.arg_names, args)), **kwargs}
        keys.append(tuple(named[name] for name in _varlen_attention_kernel.keys))

    monkeypatch.setattr(_varlen_attention_kernel, "run", record_key)
    for max_seqlen in (64, 18500, 18000):
        q = torch.empty(max_seqlen, 6, HEAD_DIM, device="meta", dtype=torch.bfloat16)
        cu_seqlens = torch.empty(2, device="meta", dtype=torch.int32)
        launch_varlen_attention(q, q, q, cu_seqlens, max_seqlen, out=torch.empty_like(q))
    short, long, nearly_as_long = keys
    assert short != long
    assert long == nearly_as_long


def test_public_function_runs_the_kernel():
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([40, 0, 9], 2, torch.float32, seed=3)
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=0.3)  # not the default scale
    assert out.shape == q.shape and out.is_contiguous()
    assert torch.equal(out, run_kernel(q, k, v, cu_seqlens, max_seqlen, scale=0.3))


def test_opcheck():
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([5, 0, 3], 2, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.mematte.varlen_attention.default, (q, k, v, cu_seqlens, max_seqlen, None))


def _bad_inputs():
    q, k, v, cu, n = packed_qkv([3, 2], 2, torch.float32)
    yield "cu-seqlens-int64", (q, k, v, cu.long(), n), TypeError, "cu_seqlens must be int32"
    yield "float64", (q.double(), k.double(), v.double(), cu, n), TypeError, "float16, bfloat16 or float32"
    yield "mixed-dtypes", (q, k.half(), v, cu, n), TypeError, "k must have the same dtype"
    yield "k-shape", (q, k[:4], v, cu, n), ValueError, "one shape"
    yield "2d-q", (q[:, 0], k[:, 0], v[:, 0], cu, n), ValueError, r"q must be 3-D \(T, heads, head_dim\)"
    strided = torch.randn(5, 2, 128)[..., ::2]
    yield "head-dim-not-contiguous", (strided, strided, strided, cu, n), ValueError, "contiguous in the head dimension"
    yield "cu-seqlens-2d", (q, k, v, cu[None], n), ValueError, "cu_seqlens must be 1-D"
    yield "negative-max-seqlen", (q, k, v, cu, -1), ValueError, "max_seqlen must be >= 0"
    yield "cu-seqlens-device", (q, k, v, cu.to("meta"), n), ValueError, "cu_seqlens is on meta but q is on cpu"


@pytest.mark.parametrize(
    "args, error, message",
    [pytest.param(args, error, message, id=name) for name, args, error, message in _bad_inputs()],
)
def test_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        varlen_attention(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_NAMES[d]) for d in DTYPES])
def test_gpu_matches_reference(dtype):
    """The compiled kernel, every autotuned path, on MEMatte-sized sequences (ViT-S heads)."""
    q, k, v, cu_seqlens, max_seqlen = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in packed_qkv([4099, 0, 1, 777, 2048], 6, dtype, seed=5)
    )
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen)
    low_precision = None if dtype == torch.float32 else reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    assert_close(out, expected, low_precision)


@pytest.mark.gpu
def test_gpu_compiles_with_torch_compile():
    q, k, v, cu_seqlens, max_seqlen = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in packed_qkv([300, 0, 129], 6, torch.bfloat16, seed=6)
    )
    compiled = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu_seqlens, max_seqlen) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), varlen_attention(q, k, v, cu_seqlens, max_seqlen) * 2)


def test_routed_block_traces_with_torch_compile():
    """gather + LayerNorm -> qkv -> varlen attention -> scatter + residual, as the routed
    block chains them, through torch.compile: the ops' fake implementations and the
    functionalised in-place scatter (aot_eager, so no C++ compiler is needed)."""
    generator = torch.Generator().manual_seed(7)
    heads, C = 2, 2 * HEAD_DIM
    x = torch.randn(3 * 50, C, generator=generator)
    keep = torch.rand(3, 50, generator=generator) < torch.tensor([[0.5], [0.0], [1.0]])
    index, cu_seqlens, max_seqlen = reference.token_index(keep)
    norm_weight, norm_bias = torch.randn(C, generator=generator), torch.randn(C, generator=generator)
    qkv_weight = torch.randn(3 * C, C, generator=generator) * C**-0.5

    def routed_block(x, index, cu_seqlens):
        h = gather_layernorm(x, index, norm_weight, norm_bias)
        q, k, v = (h @ qkv_weight.T).view(-1, 3, heads, HEAD_DIM).unbind(1)
        msa = varlen_attention(q, k, v, cu_seqlens, max_seqlen).flatten(1)
        out = x.clone()
        scatter_residual_(out, x, msa, index)
        return out

    compiled = torch.compile(routed_block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, index, cu_seqlens), routed_block(x, index, cu_seqlens))
