"""``mematte_ext.varlen_attention`` and ``mematte_ext.window_attention``, the AVX512-BF16 CPU
flash attention, and the model-level wrappers built on them (``native.varlen_attention_bf16``,
``native.window_attention_bf16``).

The oracle is the per-sequence reference loop (``reference.varlen_attention`` /
``reference.rel_pos_attention`` / ``reference.window_attention``) computed in float64 from the
same bf16 inputs, so input rounding is counted against no one. The kernel's max abs error
against it may be at most twice PyTorch's own bf16 error there, plus a floor of 1e-3 for cases
where PyTorch happens to be exact (a one-token sequence returns v):

* plain attention: PyTorch's baseline is ``F.scaled_dot_product_attention`` on the bf16
  tensors, one sequence at a time (CPU flash attention, fp32 accumulators: the path the
  kernel replaces, ``native.varlen_attention``);
* with the position bias: ``reference.rel_pos_attention`` (for whole grids,
  ``reference.window_attention``) run in bf16 (SDPA cannot take a bf16 query with a
  higher-precision bias).

The kernel has two paths: sequences of at most 1024 tokens are packed per task ("short"),
longer ones once and shared by many tasks ("long"); its query and key blocks are 64 wide with
micro-tiles of 8 rows and 32 keys, hence the lengths 1, 7, 8, 31, 33, 63, 64, 65, 196, 1000,
1025 and 1100. ``window_attention`` runs the short path on the windows of a (B, H, W, 3C) qkv
grid read in place, with the positions past the grid's bottom/right edge taken as keys and
values from ``pad_qkv``; hence grids that are not multiples of the window (14 in the model).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mematte.backbone import rel_pos_table
from mematte_kernels import cpu_choices, dispatch, ext, native, reference

# Fresh tensors (the op's output included) start as NaN while a test runs: an element the
# kernel fails to write cannot pass.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

needs_bf16_attention = pytest.mark.skipif(
    not ext.cpu_bf16_kernels(),
    reason="mematte_kernels._C has no AVX512-BF16 attention kernels here (not built, or no AVX512-BF16 CPU)",
)

HEAD_DIM = 64
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-3


# ----------------------------------------------------------------------------- helpers


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def packed_qkv(lengths: list[int], heads: int, seed: int = 0):
    """bf16 q, k, v as ``unbind(1)`` views of one (T, 3, heads, 64) tensor, as the routed
    blocks' qkv projection gives them, and ``cu_seqlens``."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, HEAD_DIM, generator=g).bfloat16()
    return (*qkv.unbind(1), cu_seqlens_of(lengths))


def position_tables(H: int, W: int, seed: int = 1):
    """Gathered bf16 tables (H, H, 64), (W, W, 64) from rel_pos parameters ~ N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    rel_pos_h = torch.randn(2 * H - 1, HEAD_DIM, generator=g) * 0.3
    rel_pos_w = torch.randn(2 * W - 1, HEAD_DIM, generator=g) * 0.3
    return rel_pos_table(H, H, rel_pos_h).bfloat16(), rel_pos_table(W, W, rel_pos_w).bfloat16()


def windows_qkv(windows: int, H: int, W: int, heads: int, seed: int = 0, dtype=torch.bfloat16, d: int = HEAD_DIM):
    """q, k, v (windows, heads, H*W, d) as the backbone makes them: views of the qkv
    projection's (windows, H*W, 3, heads, d) output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(windows, H * W, 3 * heads * d, generator=g).to(dtype)
    return qkv.reshape(windows, H * W, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def sdpa_per_sequence(q, k, v, cu_seqlens, scale):
    """PyTorch's bf16 attention, one sequence at a time (rows of empty sequences: none)."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            per_head = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, n, 64)
            out[start:end] = F.scaled_dot_product_attention(*per_head, scale=scale).transpose(0, 1)
    return out


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_within_bf16_rule(out, fp64_reference, torch_bf16) -> float:
    """The kernel's bf16 ``out`` against the fp64 oracle: finite, and within twice the error
    of PyTorch's bf16 result ``torch_bf16`` plus the floor. Returns kernel / PyTorch error."""
    assert out.shape == fp64_reference.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all(), "non-finite elements: unwritten (NaN-filled) or overflowed"
    error = max_abs_error(out, fp64_reference)
    torch_error = max_abs_error(torch_bf16, fp64_reference)
    bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
    assert error <= bound, f"max abs error {error:.3g} > 2 x PyTorch's {torch_error:.3g} + {LOW_PRECISION_FLOOR:g}"
    ratio = error / torch_error if torch_error > 0 else 0.0
    print(f"kernel error {error:.3g}, PyTorch bf16 error {torch_error:.3g}, ratio {ratio:.3f}")  # shown with -s / -rP
    return ratio


def attention(q, k, v, cu_seqlens, scale=HEAD_DIM**-0.5, rel_h=None, rel_w=None):
    return torch.ops.mematte_ext.varlen_attention(q, k, v, cu_seqlens, scale, rel_h, rel_w)


def windows_as_sequences(q, k, v):
    """(B, heads, N, 64) -> packed (B * N, heads, 64) copies, and cu_seqlens of B sequences."""
    B, heads, N, d = q.shape
    packed = [t.transpose(1, 2).reshape(B * N, heads, d).contiguous() for t in (q, k, v)]
    return (*packed, torch.arange(0, (B + 1) * N, N, dtype=torch.int32))


# --------------------------------------------------- plain attention against the oracle

# name: (sequence lengths, heads, scale); B = len(lengths), T = sum(lengths).
PLAIN_CASES = {
    "B1-T1-H1": ([1], 1, None),
    "B1-T7-H6": ([7], 6, None),
    "B1-T8-H12": ([8], 12, None),
    "B2-T64-H6": ([31, 33], 6, None),
    "B3-T192-H12": ([63, 64, 65], 12, None),
    "B4-T64-H1-empty-first-and-middle": ([0, 63, 0, 1], 1, None),
    "B1-T196-H6": ([196], 6, None),
    "B2-T1196-H6": ([1000, 196], 6, None),
    "B1-T1000-H12": ([1000], 12, None),
    "B1-T1025-H6-long": ([1025], 6, None),
    "B4-T1133-H12-long-empty-middle-and-last": ([1100, 0, 33, 0], 12, None),
    "B2-T2125-H1-two-long": ([1025, 1100], 1, None),
    "B4-T2225-H6-short-and-long": ([1000, 1025, 1, 199], 6, None),
    # Peaked softmax (logits ~ N(0, 64)): the running maximum moves across key blocks.
    "B1-T1100-H1-scale1": ([1100], 1, 1.0),
    "B3-T261-H6-scale0.3": ([196, 0, 65], 6, 0.3),
}


@needs_bf16_attention
@pytest.mark.parametrize("lengths, heads, scale", [pytest.param(*case, id=name) for name, case in PLAIN_CASES.items()])
def test_matches_fp64_per_sequence_loop(lengths, heads, scale):
    q, k, v, cu_seqlens = packed_qkv(lengths, heads)
    scale = HEAD_DIM**-0.5 if scale is None else scale
    out = attention(q, k, v, cu_seqlens, scale)
    assert out.is_contiguous()
    expected = reference.varlen_attention(q.double(), k.double(), v.double(), cu_seqlens, max(lengths), scale)
    assert_within_bf16_rule(out, expected, sdpa_per_sequence(q, k, v, cu_seqlens, scale))


@needs_bf16_attention
def test_result_does_not_depend_on_thread_count():
    """Every task computes its rows alone: 1 thread and all threads agree bitwise."""
    q, k, v, cu_seqlens = packed_qkv([1000, 7, 1025, 65], 3, seed=7)
    rel_h, rel_w = position_tables(3, 5)
    qb, kb, vb, cu_b = packed_qkv([15] * 9, 3, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = attention(q, k, v, cu_seqlens), attention(qb, kb, vb, cu_b, 0.125, rel_h, rel_w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(attention(q, k, v, cu_seqlens), single[0])
    assert torch.equal(attention(qb, kb, vb, cu_b, 0.125, rel_h, rel_w), single[1])


# ---------------------------------------------------------------------- strided inputs


@needs_bf16_attention
@pytest.mark.parametrize(
    "lengths, heads, grid",
    [
        pytest.param([63, 0, 1000, 1100], 6, None, id="B4-T2163-H6"),
        pytest.param([196, 196, 0, 196], 2, (14, 14), id="W3-14x14-H2-bias"),
    ],
)
def test_strided_views_equal_contiguous_copies(lengths, heads, grid):
    q, k, v, cu_seqlens = packed_qkv(lengths, heads, seed=3)
    assert q.stride() == (3 * heads * HEAD_DIM, HEAD_DIM, 1)  # views into (T, 3, heads, 64)
    tables = position_tables(*grid) if grid else (None, None)
    out = attention(q, k, v, cu_seqlens, 0.125, *tables)
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, 0.125, *tables))


@needs_bf16_attention
def test_other_layouts_equal_contiguous_copies():
    """Heads-major (heads, T, 64) transposed, padded rows (row stride 80), and a storage
    offset of one element (rows 2-byte aligned)."""
    lengths, heads = [65, 1025, 7], 2
    T = sum(lengths)
    cu_seqlens = cu_seqlens_of(lengths)
    g = torch.Generator().manual_seed(4)
    heads_major = torch.randn(heads, T, HEAD_DIM, generator=g).bfloat16().transpose(0, 1)
    padded = torch.randn(T, heads, 80, generator=g).bfloat16()[..., :HEAD_DIM]
    offset = torch.empty(T * heads * HEAD_DIM + 1, dtype=torch.bfloat16)[1:].view(T, heads, HEAD_DIM)
    offset.copy_(torch.randn(T, heads, HEAD_DIM, generator=g))
    out = attention(heads_major, padded, offset, cu_seqlens)
    contiguous = attention(heads_major.contiguous(), padded.contiguous(), offset.clone(), cu_seqlens)
    assert torch.equal(out, contiguous)


# ---------------------------------------------------------- every row, each sequence alone

# Short sequences on both sides of a long one; with 2 heads and 2 threads, sequence 1 is
# attended by the thread that packed the 1000 tokens of sequence 0 into the same buffers.
ISOLATION_LENGTHS = [1000, 7, 1025, 65]
ISOLATION_HEADS = 2


@needs_bf16_attention
@pytest.mark.parametrize("target", range(len(ISOLATION_LENGTHS)), ids=lambda b: f"seq{b}-of-T{ISOLATION_LENGTHS[b]}")
def test_nan_in_one_sequence_stays_there(target):
    q, k, v, cu_seqlens = packed_qkv(ISOLATION_LENGTHS, ISOLATION_HEADS, seed=5)
    start, end = cu_seqlens[target].item(), cu_seqlens[target + 1].item()
    v = v.clone()
    v[end - 1] = float("nan")  # the sequence's last key: in its (possibly partial) last block
    out = attention(q, k, v, cu_seqlens)
    inside = torch.zeros(out.shape[0], dtype=torch.bool)
    inside[start:end] = True
    assert out[inside].isnan().all(), "every query of the sequence attends to the NaN value"
    assert torch.isfinite(out[~inside]).all(), "a NaN value leaked into another sequence"


@needs_bf16_attention
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("position", [0, 5, 39], ids=lambda p: f"pos{p}")
def test_nan_in_q_or_k_propagates_like_the_reference(where, position):
    """A NaN query poisons its own row, a NaN key every row of its sequence, as in PyTorch."""
    q, k, v, cu_seqlens = packed_qkv([40, 9], 1, seed=6)
    q, k = q.clone(), k.clone()
    (q if where == "query" else k)[position] = float("nan")
    out = attention(q, k, v, cu_seqlens)
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, 40, HEAD_DIM**-0.5)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())


@needs_bf16_attention
@pytest.mark.parametrize("target", range(len(ISOLATION_LENGTHS)), ids=lambda b: f"seq{b}-of-T{ISOLATION_LENGTHS[b]}")
def test_other_sequences_do_not_influence_a_sequence(target):
    q, k, v, cu_seqlens = packed_qkv(ISOLATION_LENGTHS, ISOLATION_HEADS, seed=6)
    start, end = cu_seqlens[target].item(), cu_seqlens[target + 1].item()
    out = attention(q, k, v, cu_seqlens)
    g = torch.Generator().manual_seed(60)
    outside = torch.ones(q.shape[0], dtype=torch.bool)
    outside[start:end] = False
    perturbed = [t.clone() for t in (q, k, v)]
    for t in perturbed:
        t[outside] = (torch.randn(t[outside].shape, generator=g) * 4).bfloat16()
    changed = attention(*perturbed, cu_seqlens)
    assert torch.equal(changed[start:end], out[start:end])
    assert not torch.equal(changed[outside], out[outside])  # the perturbation did reach the others


# ------------------------------------------------------------------------------- empty


@needs_bf16_attention
@pytest.mark.parametrize("bounds", [[0], [0, 0, 0]], ids=["B0-T0", "B2-T0"])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "bias"])
def test_no_tokens(bounds, biased):
    empty = torch.empty(0, 3, HEAD_DIM, dtype=torch.bfloat16)
    tables = position_tables(3, 5) if biased else (None, None)
    out = attention(empty, empty, empty, torch.tensor(bounds, dtype=torch.int32), 0.125, *tables)
    assert out.shape == (0, 3, HEAD_DIM) and out.dtype == torch.bfloat16


# ------------------------------------------------------------- decomposed position bias

# name: (windows, H, W, heads); every window is one sequence of H*W tokens.
BIAS_CASES = {
    "W3-14x14-H6": (3, 14, 14, 6),
    "W2-3x5-H6": (2, 3, 5, 6),
    "W4-1x1-H12": (4, 1, 1, 12),
    "W2-16x16-H12": (2, 16, 16, 12),
    "W1-16x5-H1": (1, 16, 5, 1),
    "W4-5x16-H2": (4, 5, 16, 2),
}


@needs_bf16_attention
@pytest.mark.parametrize("windows, H, W, heads", [pytest.param(*case, id=name) for name, case in BIAS_CASES.items()])
def test_position_bias_matches_fp64_reference(windows, H, W, heads):
    q, k, v = windows_qkv(windows, H, W, heads)
    rel_h, rel_w = position_tables(H, W)
    scale = HEAD_DIM**-0.5
    pq, pk, pv, cu_seqlens = windows_as_sequences(q, k, v)
    out = attention(pq, pk, pv, cu_seqlens, scale, rel_h, rel_w)
    out = out.view(windows, H * W, heads, HEAD_DIM).transpose(1, 2)
    expected = reference.rel_pos_attention(*(t.double() for t in (q, k, v, rel_h, rel_w)), scale)
    torch_bf16 = reference.rel_pos_attention(q, k, v, rel_h, rel_w, scale)
    assert_within_bf16_rule(out, expected, torch_bf16)
    if H * W > 1:
        # The bias matters at these magnitudes: attention without it fails the same bound.
        unbiased = attention(pq, pk, pv, cu_seqlens, scale).view(windows, H * W, heads, HEAD_DIM).transpose(1, 2)
        bound = LOW_PRECISION_FACTOR * max_abs_error(torch_bf16, expected) + LOW_PRECISION_FLOOR
        assert max_abs_error(unbiased, expected) > bound


@needs_bf16_attention
def test_position_bias_with_empty_sequences():
    """Zero-length sequences may sit among the H*W-token windows."""
    H, W, heads = 14, 14, 3
    q, k, v = windows_qkv(2, H, W, heads, seed=9)
    rel_h, rel_w = position_tables(H, W, seed=10)
    pq, pk, pv, _ = windows_as_sequences(q, k, v)
    out = attention(pq, pk, pv, cu_seqlens_of([0, H * W, 0, H * W, 0]), 0.125, rel_h, rel_w)
    expected = reference.rel_pos_attention(*(t.double() for t in (q, k, v, rel_h, rel_w)), 0.125)
    torch_bf16 = reference.rel_pos_attention(q, k, v, rel_h, rel_w, 0.125)
    assert_within_bf16_rule(out.view(2, H * W, heads, HEAD_DIM).transpose(1, 2), expected, torch_bf16)


# ------------------------------------------------------------------ window attention

WINDOW = 14  # the backbone's window size


def grid_qkv(B: int, H: int, W: int, heads: int, seed: int = 0, dtype=torch.bfloat16, d: int = HEAD_DIM):
    """The qkv projection of a (B, H, W) token grid, (B, H, W, 3 * heads * d), and ``pad_qkv``
    (3 * heads * d,): the projection's bias, which is what the padding tokens project to."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * heads * d, generator=g)
    pad_qkv = torch.randn(3 * heads * d, generator=g)
    return qkv.to(dtype), pad_qkv.to(dtype)


def window_tables(window: int, d: int = HEAD_DIM, seed: int = 1, dtype=torch.bfloat16):
    """Gathered (window, window, d) tables from rel_pos parameters ~ N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    params = (torch.randn(2 * window - 1, d, generator=g) * 0.3 for _ in range(2))
    return tuple(rel_pos_table(window, window, p).to(dtype) for p in params)


# name: (B, H, W, heads, window); H and W are padded up to multiples of the window.
WINDOW_CASES = {
    "B1-1x1-H1": (1, 1, 1, 1, WINDOW),  # one token among 195 padding keys
    "B1-13x15-H6": (1, 13, 15, 6, WINDOW),
    "B1-15x29-H1": (1, 15, 29, 1, WINDOW),
    "B1-28x28-H6-no-padding": (1, 28, 28, 6, WINDOW),
    "B2-13x15-H6": (2, 13, 15, 6, WINDOW),
    "B2-15x29-H6": (2, 15, 29, 6, WINDOW),
    "B2-17x9-H1-window16": (2, 17, 9, 1, 16),
    "B1-11x13-H6-window5": (1, 11, 13, 6, 5),
    "B1-3x2-H1-window1": (1, 3, 2, 1, 1),
}


def window_reference(qkv, pad_qkv, rel_h, rel_w, heads, scale, window):
    """(fp64 oracle, PyTorch's bf16 result) of reference.window_attention."""
    expected = reference.window_attention(*(t.double() for t in (qkv, pad_qkv, rel_h, rel_w)), heads, scale, window)
    return expected, reference.window_attention(qkv, pad_qkv, rel_h, rel_w, heads, scale, window)


@needs_bf16_attention
@pytest.mark.parametrize(
    "B, H, W, heads, window", [pytest.param(*case, id=name) for name, case in WINDOW_CASES.items()]
)
def test_window_attention_matches_fp64_reference(B, H, W, heads, window):
    qkv, pad_qkv = grid_qkv(B, H, W, heads, seed=11)
    rel_h, rel_w = window_tables(window, seed=12)
    scale = HEAD_DIM**-0.5
    out = native.window_attention_bf16(qkv, pad_qkv, rel_h, rel_w, heads, scale, window)
    assert out.shape == (B, H, W, heads * HEAD_DIM) and out.is_contiguous()
    assert_within_bf16_rule(out, *window_reference(qkv, pad_qkv, rel_h, rel_w, heads, scale, window))
    # native.window_attention_bf16 hands bf16 tensors to the op as they are.
    assert torch.equal(out, ext.window_attention(qkv, pad_qkv, rel_h, rel_w, heads, scale, window))


@needs_bf16_attention
def test_native_window_attention_bf16_converts_the_parameters():
    """The model's qkv bias and position tables may be fp32 next to bf16 tokens."""
    qkv, pad_qkv = grid_qkv(2, 13, 15, 2, seed=13)
    rel_h, rel_w = window_tables(WINDOW, seed=14)
    out = native.window_attention_bf16(qkv, pad_qkv.float(), rel_h.float(), rel_w.float(), 2, 0.125, WINDOW)
    assert torch.equal(out, ext.window_attention(qkv, pad_qkv, rel_h, rel_w, 2, 0.125, WINDOW))


@needs_bf16_attention
def test_window_attention_padding_comes_from_pad_qkv():
    """A 15x29 grid in 14x14 windows: of each image's 2x3 windows only the top row's first
    two (rows 0-13, columns 0-27) have no padding. The padding's keys and values are
    pad_qkv[C:]; its queries (pad_qkv[:C]) are never computed, and their outputs cropped."""
    B, H, W, heads = 2, 15, 29, 2
    C = heads * HEAD_DIM
    qkv, pad_qkv = grid_qkv(B, H, W, heads, seed=15)
    rel_h, rel_w = window_tables(WINDOW, seed=16)
    scale = HEAD_DIM**-0.5

    def run(pad):
        return ext.window_attention(qkv, pad, rel_h, rel_w, heads, scale, WINDOW)

    out = run(pad_qkv)
    g = torch.Generator().manual_seed(17)
    new_kv = pad_qkv.clone()
    new_kv[C:] = torch.randn(2 * C, generator=g).bfloat16()
    changed = run(new_kv)
    unpadded = torch.zeros(H, W, dtype=torch.bool)
    unpadded[:WINDOW, : 2 * WINDOW] = True
    assert torch.equal(changed[:, unpadded], out[:, unpadded])
    # Every token of a padded window (the bottom row, the right column) attends to the padding.
    assert (changed[:, ~unpadded] != out[:, ~unpadded]).any(dim=-1).all()
    expected, torch_bf16 = window_reference(qkv, new_kv, rel_h, rel_w, heads, scale, WINDOW)
    assert_within_bf16_rule(changed, expected, torch_bf16)
    # pad_qkv matters at these magnitudes: the first result fails the bound for the second pad.
    bound = LOW_PRECISION_FACTOR * max_abs_error(torch_bf16, expected) + LOW_PRECISION_FLOOR
    assert max_abs_error(out, expected) > bound

    new_q = pad_qkv.clone()
    new_q[:C] = torch.randn(C, generator=g).bfloat16() * 4
    assert torch.equal(run(new_q), out)


@needs_bf16_attention
def test_window_attention_does_not_depend_on_thread_count():
    qkv, pad_qkv = grid_qkv(2, 29, 15, 3, seed=18)
    rel_h, rel_w = window_tables(WINDOW, seed=19)
    args = (qkv, pad_qkv, rel_h, rel_w, 3, 0.125, WINDOW)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ext.window_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ext.window_attention(*args), single)


@needs_bf16_attention
@pytest.mark.parametrize("B, H, W", [(0, 5, 7), (2, 0, 7), (2, 5, 0)], ids=["B0", "H0", "W0"])
def test_window_attention_no_tokens(B, H, W):
    qkv, pad_qkv = grid_qkv(B, H, W, 2)
    rel_h, rel_w = window_tables(4)
    out = ext.window_attention(qkv, pad_qkv, rel_h, rel_w, 2, 0.125, 4)
    assert out.shape == (B, H, W, 2 * HEAD_DIM) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, window, d",
    [
        pytest.param(torch.float32, WINDOW, HEAD_DIM, id="fp32"),
        pytest.param(torch.bfloat16, 17, HEAD_DIM, id="bf16-window17"),
        pytest.param(torch.bfloat16, WINDOW, 32, id="bf16-d32"),
    ],
)
def test_native_window_attention_bf16_falls_back(dtype, window, d):
    qkv, pad_qkv = grid_qkv(2, 19, 20, 2, seed=20, dtype=dtype, d=d)
    rel_h, rel_w = window_tables(window, d=d, seed=21, dtype=dtype)
    scale = d**-0.5
    out = native.window_attention_bf16(qkv, pad_qkv, rel_h, rel_w, 2, scale, window)
    assert out.shape == (2, 19, 20, 2 * d) and torch.isfinite(out).all()
    assert torch.equal(out, native.window_attention(qkv, pad_qkv, rel_h, rel_w, 2, scale, window))


# -------------------------------------------------------------- native.varlen_attention_bf16


@needs_bf16_attention
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale0.3"])
def test_native_varlen_attention_bf16_runs_the_kernel(scale):
    q, k, v, cu_seqlens = packed_qkv([63, 0, 1025], 2, seed=15)
    out = native.varlen_attention_bf16(q, k, v, cu_seqlens, 1025, scale)
    assert torch.equal(out, attention(q, k, v, cu_seqlens, HEAD_DIM**-0.5 if scale is None else scale))


@pytest.mark.parametrize("dtype, d", [(torch.float32, HEAD_DIM), (torch.bfloat16, 32)], ids=["fp32", "bf16-d32"])
def test_native_varlen_attention_bf16_falls_back(dtype, d):
    g = torch.Generator().manual_seed(16)
    lengths = [7, 0, 65]
    q, k, v = torch.randn(sum(lengths), 3, 2, d, generator=g).to(dtype).unbind(1)
    cu_seqlens = cu_seqlens_of(lengths)
    out = native.varlen_attention_bf16(q, k, v, cu_seqlens, 65)
    assert torch.equal(out, native.varlen_attention(q, k, v, cu_seqlens, 65))


# ---------------------------------------------------------------------- input checks


def _bad_arguments():
    """(name, args after the defaults are overridden, message): each breaks one rule."""
    q, k, v, cu = packed_qkv([3, 2], 2)
    tables = position_tables(3, 5)
    grid_q, grid_k, grid_v, _ = packed_qkv([15, 14], 2)
    yield "fp32-q", (q.float(), k, v, cu, 0.125, None, None), r"q must be bfloat16, got Float"
    yield "fp32-v", (q, k, v.float(), cu, 0.125, None, None), r"v must be bfloat16"
    narrow = torch.randn(5, 2, 32).bfloat16()
    yield "head-dim-32", (narrow, narrow, narrow, cu, 0.125, None, None), r"q must be packed \(T, heads, 64\)"
    strided = torch.randn(5, 2, 128).bfloat16()[..., ::2]
    yield "head-dim-strided", (strided, strided, strided, cu, 0.125, None, None), r"q must have a contiguous head dim"
    k3 = torch.randn(5, 3, HEAD_DIM).bfloat16()
    yield "k-heads-3", (q, k3, v, cu, 0.125, None, None), r"k has shape \[5, 3, 64\] but q has \[5, 2, 64\]"
    yield "k-T-4", (q, k[:4], v, cu, 0.125, None, None), r"k has shape \[4, 2, 64\] but q has"
    yield "cu-seqlens-int64", (q, k, v, cu.long(), 0.125, None, None), r"cu_seqlens must be a contiguous 1-D int32 CPU"
    end4 = torch.tensor([0, 3, 4], dtype=torch.int32)
    yield (
        "cu-seqlens-ends-at-4",
        (q, k, v, end4, 0.125, None, None),
        r"cu_seqlens must run from 0 to T = 5, got 0 \.\. 4",
    )
    start1 = torch.tensor([1, 3, 5], dtype=torch.int32)
    yield "cu-seqlens-starts-at-1", (q, k, v, start1, 0.125, None, None), r"cu_seqlens must run from 0 to T = 5"
    decreasing = torch.tensor([0, 4, 3, 5], dtype=torch.int32)
    yield "cu-seqlens-decreasing", (q, k, v, decreasing, 0.125, None, None), r"non-decreasing, got 4 then 3"
    yield "rel-h-alone", (q, k, v, cu, 0.125, tables[0], None), r"rel_h and rel_w come together"
    yield "rel-w-alone", (q, k, v, cu, 0.125, None, tables[1]), r"rel_h and rel_w come together"
    big = position_tables(17, 17)
    q289, k289, v289, cu289 = packed_qkv([289], 1)
    yield (
        "rel-17x17",
        (q289, k289, v289, cu289, 0.125, *big),
        r"rel_h must be a gathered position table \(n, n, 64\) with n <= 16",
    )
    yield "rel-w-fp32", (q, k, v, cu, 0.125, tables[0], tables[1].float()), r"rel_w must be a contiguous bfloat16"
    grid_args = (grid_q, grid_k, grid_v, cu_seqlens_of([15, 14]), 0.125, *tables)
    yield "seq-not-3x5", grid_args, r"every sequence must be the 3x5 grid of 15 tokens, got one of 14"


@needs_bf16_attention
@pytest.mark.parametrize("args, message", [pytest.param(a, m, id=name) for name, a, m in _bad_arguments()])
def test_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        ext.varlen_attention(*args)


def _bad_window_arguments():
    """(name, ext.window_attention's arguments, message): each breaks one rule."""
    qkv, pad_qkv = grid_qkv(1, 5, 7, 2)  # C = 128
    rel_h, rel_w = window_tables(4)

    def args(**override):
        a = dict(qkv=qkv, pad_qkv=pad_qkv, rel_h=rel_h, rel_w=rel_w, num_heads=2, scale=0.125, window=4)
        a.update(override)
        return tuple(a.values())

    yield "window-0", args(window=0), r"window must be 1\.\.16, got 0"
    big = window_tables(17)
    yield "window-17", args(rel_h=big[0], rel_w=big[1], window=17), r"window must be 1\.\.16, got 17"
    yield "heads-0", args(num_heads=0), r"num_heads must be positive, got 0"
    qkv_shape = r"qkv must be \(B, H, W, 3C\) with C = num_heads \* 64 = "
    narrow = grid_qkv(1, 5, 7, 2, d=32)[0]
    yield "head-dim-32", args(qkv=narrow), qkv_shape + r"128, got shape \[1, 5, 7, 192\]"
    yield "heads-3", args(num_heads=3), qkv_shape + r"192, got shape \[1, 5, 7, 384\]"
    yield "qkv-3d", args(qkv=qkv[0]), r"qkv must be \(B, H, W, 3C\)"
    yield "fp32-qkv", args(qkv=qkv.float()), r"qkv must be a contiguous bfloat16 tensor, got Float"
    transposed = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    yield "qkv-not-contiguous", args(qkv=transposed), r"qkv must be a contiguous bfloat16 tensor, got BFloat16 with"
    pad_rule = r"pad_qkv must be a contiguous bfloat16 \(3C,\) = \(384,\) tensor on qkv's device, got "
    yield "pad-383", args(pad_qkv=pad_qkv[:-1]), pad_rule + r"BFloat16 of shape \[383\]"
    yield "pad-fp32", args(pad_qkv=pad_qkv.float()), pad_rule + r"Float of shape \[384\]"
    table_rule = r" must be the gathered table \(window, window, 64\) = \(4, 4, 64\), got shape "
    yield "rel-h-5x5", args(rel_h=window_tables(5)[0]), "rel_h" + table_rule + r"\[5, 5, 64\]"
    yield "rel-w-d32", args(rel_w=window_tables(4, d=32)[1]), "rel_w" + table_rule + r"\[4, 4, 32\]"
    yield "rel-w-fp32", args(rel_w=rel_w.float()), r"rel_w must be a contiguous bfloat16 tensor on qkv's device"


@needs_bf16_attention
@pytest.mark.parametrize("args, message", [pytest.param(a, m, id=name) for name, a, m in _bad_window_arguments()])
def test_window_attention_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=r"mematte_ext\.window_attention: " + message):
        ext.window_attention(*args)


# ---------------------------------------------------------------- torch.library checks


@needs_bf16_attention
def test_opcheck():
    q, k, v, cu_seqlens = packed_qkv([5, 0, 3], 2, seed=17)
    torch.library.opcheck(torch.ops.mematte_ext.varlen_attention.default, (q, k, v, cu_seqlens, 0.125, None, None))


@needs_bf16_attention
def test_opcheck_with_position_bias():
    q, k, v, cu_seqlens = packed_qkv([15, 0, 15], 2, seed=18)
    rel_h, rel_w = position_tables(3, 5)
    torch.library.opcheck(torch.ops.mematte_ext.varlen_attention.default, (q, k, v, cu_seqlens, 0.125, rel_h, rel_w))


@needs_bf16_attention
def test_opcheck_window_attention():
    qkv, pad_qkv = grid_qkv(2, 5, 7, 2, seed=22)
    rel_h, rel_w = window_tables(4)
    torch.library.opcheck(torch.ops.mematte_ext.window_attention.default, (qkv, pad_qkv, rel_h, rel_w, 2, 0.125, 4))


# --------------------------------------------------------------------------- dispatch


@needs_bf16_attention
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_cpu_backend_uses_the_kernel(backend, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    """The kernels are candidates the CPU backend measures for bf16 (mematte_kernels.selection)."""
    table = dispatch.resolve(backend, "cpu")
    for field, kernel in (
        ("varlen_attention", native.varlen_attention_bf16),
        ("window_attention", native.window_attention_bf16),
    ):
        assert getattr(table, field) is cpu_choices.selected()[field]
        assert kernel in [c.fn for c in getattr(table, field).runnable(torch.bfloat16)]


def test_cpu_backend_without_the_kernel_uses_sdpa(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(ext, "cpu_bf16_kernels", lambda: False)
    table = dispatch.resolve("cpu", "cpu")
    for field, sdpa in (("varlen_attention", native.varlen_attention), ("window_attention", native.window_attention)):
        op = getattr(table, field)
        assert [c.name for c in op.runnable(torch.bfloat16)] == ["sdpa", "sdpa_fp32"]
        assert [c.fn for c in op.runnable(torch.float32)] == [sdpa]


def test_reference_backend_uses_the_reference_window_attention(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.REFERENCE.window_attention is reference.window_attention
    assert dispatch.resolve("reference", "cpu").window_attention is reference.window_attention
