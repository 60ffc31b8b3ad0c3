"""``mematte_ext.upsample_taps_relu_`` (CPU), the fusion-block op built on it,
``native.upsample_conv_relu_``, and the fused AVX512-BF16 ``mematte_ext.upsample_conv_relu_``
(``native.upsample_conv_relu_bf16``), against their PyTorch references.

The oracle is computed in float64 from the same (upcast) inputs. fp32 must match it to 1e-5
relative (max error over max magnitude). For bf16/fp16 the kernel accumulates in fp32 and
rounds once at the end, so its error may be at most twice that of the best any
implementation can do in the dtype: the fp64 result rounded to the dtype (plus a floor of
1e-5 of the largest magnitude for fp32 rounding that tips a value over a rounding midpoint).
The composite op, whose taps are rounded to the dtype by the 1x1 conv, and the fused op, whose
weights are read in bf16, are judged as in test_ext_ops.py: against the error of the
reference op run in that dtype.
"""

from __future__ import annotations

import pytest
import torch

from mematte_kernels import cpu_choices, dispatch, ext, native, reference

# Fresh tensors start as NaN while a test runs: an element an op fails to write cannot pass.
# (The op itself reads ``out``, so NaN in ``out`` is tested separately below.)
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

needs_cpu_ops = pytest.mark.skipif(
    not ext.has_kernel("upsample_taps_relu_", "cpu"), reason="mematte_kernels._C has no upsample_taps_relu_ CPU kernel"
)
needs_bf16_kernels = pytest.mark.skipif(
    not ext.cpu_bf16_kernels(),
    reason="mematte_kernels._C has no AVX512-BF16 upsample_conv_relu_ kernel here (not built, or no AVX512-BF16 CPU)",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Low-resolution (h, w): one pixel, a single row, odd and uneven sizes.
SIZES = [(1, 1), (1, 5), (3, 2), (7, 9), (17, 33)]
# One lane, a tail only, exactly one 16-lane block, two blocks, two blocks plus a tail.
CHANNELS = [1, 5, 16, 32, 37]


def taps_cases() -> list:
    params = []
    for B in (1, 2):
        for h, w in SIZES:
            for C in CHANNELS:
                if B == 2 and (h, w) == (17, 33) and C > 16:
                    continue  # keeps the run short; B = 2 is covered by every other size
                for name in DTYPES:
                    params.append(pytest.param(B, h, w, C, DTYPES[name], id=f"B{B}-h{h}w{w}-C{C}-{name}"))
    return params


def taps_inputs(B, h, w, C, dtype, seed=0):
    """out (B, 2h, 2w, C) and taps (B, h, w, 9C), both channels-last contiguous."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(B, 2 * h, 2 * w, C, generator=g)
    taps = torch.randn(B, h, w, 9 * C, generator=g) * 0.5
    return out.to(dtype), taps.to(dtype)


def taps_oracle(out: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """fp64 ``relu(out + conv3x3(up2(x)))`` for the given taps, by the upstream formulation:
    x = the taps as 9C channels, and a conv whose weight picks channel (3 ky + kx) C + c at
    kernel position (ky, kx) for output channel c. (reference.upsample_taps_relu_ computes in
    fp32 whatever the input dtype, so it is not the fp64 oracle; see
    test_reference_taps_matches_the_oracle.)"""
    B, H, W, C = out.shape
    x = taps.double().permute(0, 3, 1, 2)
    weight = torch.zeros(C, 9 * C, 3, 3, dtype=torch.float64)
    for ky in range(3):
        for kx in range(3):
            weight[torch.arange(C), (3 * ky + kx) * C + torch.arange(C), ky, kx] = 1.0
    result = reference.upsample_conv_relu_(out.double().permute(0, 3, 1, 2).clone(), x, weight)
    return result.permute(0, 2, 3, 1)


def run_ext(out: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    result = out.clone()
    assert ext.upsample_taps_relu_(result, taps) is None
    return result


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


# Worst errors seen per op and dtype, for reports (read after a run; not asserted on).
MEASURED: dict[str, dict[str, float]] = {}


def record(key: str, **errors: float) -> None:
    slot = MEASURED.setdefault(key, {})
    for name, value in errors.items():
        slot[name] = max(slot.get(name, 0.0), value)


def check_taps_kernel(out: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The ext op on (out, taps) against the fp64 oracle; returns the op's result."""
    result = run_ext(out, taps)
    assert result.shape == out.shape and result.dtype == out.dtype
    assert torch.isfinite(result).all()
    oracle = taps_oracle(out, taps)
    assert (result >= 0).all()  # the ReLU
    name = {v: k for k, v in DTYPES.items()}[out.dtype]
    if out.dtype == torch.float32:
        err = max_rel_err(result, oracle)
        record(f"taps-{name}", rel=err)
        assert err <= 1e-5, f"fp32 relative error {err:.3g}"
        return result
    # The baseline: the exact result rounded once to the dtype, the error of an ideal
    # implementation (and of PyTorch's reference, which computes in fp32 and rounds once).
    best_err = max_abs_err(oracle.to(out.dtype), oracle)
    kernel_err = max_abs_err(result, oracle)
    floor = 1e-5 * oracle.abs().max().item()
    record(f"taps-{name}", kernel=kernel_err, rounded_oracle=best_err, rel=kernel_err / oracle.abs().max().item())
    assert kernel_err <= 2 * best_err + floor, f"kernel error {kernel_err:.3g}, correctly rounded {best_err:.3g}"
    return result


# --------------------------------------------------------------------------- the kernel


@needs_cpu_ops
@pytest.mark.parametrize("B, h, w, C, dtype", taps_cases())
def test_upsample_taps_relu_cpu(B, h, w, C, dtype):
    out, taps = taps_inputs(B, h, w, C, dtype)
    before = out.clone()
    check_taps_kernel(out, taps)
    assert torch.equal(out, before)  # run_ext worked on a copy; the inputs are untouched


@needs_cpu_ops
@pytest.mark.parametrize(
    "B, h, w, C", [pytest.param(2, 7, 9, 37, id="B2-h7w9-C37"), pytest.param(1, 1, 5, 5, id="B1-h1w5-C5")]
)
def test_reference_taps_matches_the_oracle(B, h, w, C):
    """reference.upsample_taps_relu_ (sum of shifted upsampled taps) is the upstream
    formulation (conv3x3 of the upsampled input); it computes in fp32 even for fp64 tensors."""
    out, taps = taps_inputs(B, h, w, C, torch.float64)
    ref = out.clone()
    reference.upsample_taps_relu_(ref, taps)
    assert max_rel_err(ref, taps_oracle(out, taps)) <= 1e-6


@needs_cpu_ops
def test_writes_in_place_and_every_element():
    out, taps = taps_inputs(2, 7, 9, 37, torch.float32)
    expected = taps_oracle(out, taps)
    data_ptr = out.data_ptr()
    ext.upsample_taps_relu_(out, taps)
    assert out.data_ptr() == data_ptr
    assert max_rel_err(out, expected) <= 1e-5
    assert (out == 0).any() and (out > 0).any()  # the inputs exercise both sides of the ReLU


@needs_cpu_ops
def test_adds_into_out():
    """The result depends on out as out + conv: shifting out by +100 (no ReLU clamp there)
    shifts the result by exactly 100 up to fp32 rounding."""
    out, taps = taps_inputs(1, 3, 5, 37, torch.float32)
    zero = run_ext(torch.zeros_like(out), taps)
    shifted = run_ext(torch.full_like(out, 100.0), taps)
    expected = taps_oracle(torch.full_like(out, 100.0), taps).float()
    torch.testing.assert_close(shifted - 100.0, expected - 100.0, rtol=0, atol=5e-5)
    assert (zero == 0).any() and not (shifted == 0).any()


@needs_cpu_ops
def test_storage_offset_inputs():
    """Contiguous views that do not start at their storage's start."""
    out, taps = taps_inputs(2, 3, 5, 37, torch.float32)
    shifted_out = torch.empty(out.numel() + 1)[1:].view(out.shape).copy_(out)
    shifted_taps = torch.empty(taps.numel() + 1)[1:].view(taps.shape).copy_(taps)
    ext.upsample_taps_relu_(shifted_out, shifted_taps)
    torch.testing.assert_close(shifted_out, run_ext(out, taps), rtol=0, atol=0)


# ------------------------------------------------- border: bilinear clamps + zero padding


@needs_cpu_ops
@pytest.mark.parametrize(
    "h, w", [pytest.param(*s, id="h{}w{}".format(*s)) for s in [(1, 1), (1, 2), (2, 1), (1, 7), (6, 1), (2, 2)]]
)
@pytest.mark.parametrize("C", [3, 16, 21])
def test_one_pixel_wide_matches_reference(h, w, C):
    """h or w of 1: every output reads the same clamped source row/column and the conv's
    zero padding is on both sides at once."""
    out, taps = taps_inputs(2, h, w, C, torch.float32, seed=1)
    result = run_ext(out, taps)
    ref = out.clone()
    reference.upsample_taps_relu_(ref, taps)
    assert max_rel_err(result, ref) <= 1e-5
    assert max_rel_err(result, taps_oracle(out, taps)) <= 1e-5


@needs_cpu_ops
def test_zero_padding_not_replication():
    """With a single tap (the top-left one) non-zero, output row 0 and column 0 read
    outside the image: zero there, not the border value."""
    C = 4
    out = torch.zeros(1, 4, 6, C)
    taps = torch.zeros(1, 2, 3, 9 * C)
    taps[..., 0:C] = 1.0  # tap (ky, kx) = (0, 0): out(y, x) += up(tap)(y - 1, x - 1)
    result = run_ext(out, taps)
    assert (result[:, 0] == 0).all() and (result[:, :, 0] == 0).all()
    assert (result[:, 1:, 1:] == 1).all()  # bilinear of a constant map is the constant
    torch.testing.assert_close(result.double(), taps_oracle(out, taps), rtol=0, atol=0)


# --------------------------------------------------------------------------------- NaN


@needs_cpu_ops
@pytest.mark.parametrize("dtype", [pytest.param(DTYPES[n], id=n) for n in ("fp32", "bf16")])
def test_nan_in_out_stays_nan_and_alone(dtype):
    """The op reads out, so a NaN there must come out NaN (ReLU keeps NaN like torch.relu),
    in the 16-lane blocks and the tail, and touch no other element."""
    out, taps = taps_inputs(2, 3, 4, 37, dtype)
    nan_at = torch.zeros(out.shape, dtype=torch.bool)
    nan_at[0, 0, 0, 0] = nan_at[1, 5, 7, 36] = nan_at[0, 2, 3, 17] = nan_at[1, 4, 1, 33] = True
    # Where out is very negative the clean result would be 0; NaN must still win.
    out[1, 4, 1, 33] = -1e3
    nan_out = out.masked_fill(nan_at, float("nan"))
    result = run_ext(nan_out, taps)
    assert torch.equal(torch.isnan(result), nan_at)
    torch.testing.assert_close(result[~nan_at], run_ext(out, taps)[~nan_at], rtol=0, atol=0)


def receptive_mask(H: int, W: int, i: int, j: int, ky: int, kx: int, h: int, w: int) -> torch.Tensor:
    """Output pixels (y, x) whose tap (ky, kx) reads low-res pixel (i, j): up(y + ky - 1,
    x + kx - 1) has (i, j) among its bilinear sources (weight 0 included, 0 * NaN = NaN)."""

    def sources(o, n):
        src = max((o + 0.5) * 0.5 - 0.5, 0.0)
        i0 = int(src)
        return {i0, min(i0 + 1, n - 1)}

    mask = torch.zeros(H, W, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            r, c = y + ky - 1, x + kx - 1
            if 0 <= r < H and 0 <= c < W and i in sources(r, h) and j in sources(c, w):
                mask[y, x] = True
    return mask


@needs_cpu_ops
@pytest.mark.parametrize(
    "i, j, tap, channel",
    [
        pytest.param(0, 0, 4, 3, id="corner-centre_tap-block"),
        pytest.param(2, 3, 0, 36, id="interior-top_left_tap-tail"),
        pytest.param(4, 6, 8, 20, id="last-bottom_right_tap-block2"),
        pytest.param(4, 0, 2, 33, id="bottom_left-top_right_tap-tail"),
        pytest.param(2, 3, None, None, id="interior-whole_pixel"),
    ],
)
def test_nan_tap_contaminates_only_its_receptive_field(i, j, tap, channel):
    """A NaN at one low-res pixel of one tap (or all taps of the pixel) reaches exactly the
    outputs whose 2x-upsample + 3x3 neighbourhood reads it, in that channel only."""
    B, h, w, C = 2, 5, 7, 37
    out, taps = taps_inputs(B, h, w, C, torch.float32)
    clean = run_ext(out, taps)
    nan_taps = taps.clone()
    if tap is None:
        nan_taps[1, i, j, :] = float("nan")
    else:
        nan_taps[1, i, j, tap * C + channel] = float("nan")
    result = run_ext(out, nan_taps)

    ref = out.clone()
    reference.upsample_taps_relu_(ref, nan_taps)
    expected = torch.isnan(ref)
    assert torch.equal(torch.isnan(result), expected)
    # The reference's mask is the receptive field worked out by hand: batch 1 only, the one
    # channel (all channels for a whole-pixel NaN), the dilated bilinear footprint.
    by_hand = torch.zeros(B, 2 * h, 2 * w, C, dtype=torch.bool)
    for k in range(9) if tap is None else [tap]:
        field = receptive_mask(2 * h, 2 * w, i, j, k // 3, k % 3, h, w)
        if tap is None:
            by_hand[1] |= field[:, :, None]
        else:
            by_hand[1, :, :, channel] |= field
    assert torch.equal(expected, by_hand)
    # One low-res pixel feeds a 4x4 patch of its upsampled map (2x2 at a border); the 3x3
    # neighbourhood of the nine taps widens that to at most 6x6 output pixels.
    pixels = expected.any(dim=-1).sum().item()
    assert 0 < pixels <= (36 if tap is None else 16)
    torch.testing.assert_close(result[~expected], clean[~expected], rtol=0, atol=0)


# ------------------------------------------------------------------------------- empty


@needs_cpu_ops
@pytest.mark.parametrize(
    "out_shape, taps_shape",
    [
        pytest.param((0, 4, 6, 8), (0, 2, 3, 72), id="B0"),
        pytest.param((2, 0, 6, 8), (2, 0, 3, 72), id="h0"),
        pytest.param((2, 4, 0, 8), (2, 2, 0, 72), id="w0"),
        pytest.param((2, 4, 6, 0), (2, 2, 3, 0), id="C0"),
    ],
)
def test_empty(out_shape, taps_shape):
    out, taps = torch.empty(out_shape), torch.empty(taps_shape)
    ptr = out.data_ptr()
    ext.upsample_taps_relu_(out, taps)
    assert out.shape == out_shape and out.data_ptr() == ptr and out.numel() == 0


@needs_cpu_ops
def test_empty_still_checks_shapes():
    with pytest.raises(RuntimeError, match=r"taps must have shape \(B, H/2, W/2, 9C\)"):
        ext.upsample_taps_relu_(torch.empty(0, 4, 6, 8), torch.empty(0, 2, 2, 72))


# ----------------------------------------------------------------------- input checks


def _args(**override):
    out, taps = taps_inputs(2, 3, 4, 16, torch.float32)
    args = {"out": out, "taps": taps}
    args.update(override)
    return args["out"], args["taps"]


@needs_cpu_ops
@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(_args(taps=torch.randn(2, 3, 4, 128)), r"taps must have shape \(B, H/2, W/2, 9C\)", id="taps-8C"),
        pytest.param(_args(taps=torch.randn(2, 3, 4, 16)), r"taps must have shape \(B, H/2, W/2, 9C\)", id="taps-C"),
        pytest.param(_args(out=torch.randn(2, 6, 9, 16)), r"taps must have shape \(B, H/2, W/2, 9C\)", id="out-odd-W"),
        pytest.param(_args(out=torch.randn(2, 3, 4, 16)), r"taps must have shape \(B, H/2, W/2, 9C\)", id="out-not-2x"),
        pytest.param(_args(out=torch.randn(1, 6, 8, 16)), r"taps must have shape \(B, H/2, W/2, 9C\)", id="batch"),
        pytest.param(
            _args(taps=torch.randn(2, 3, 4, 144, dtype=torch.bfloat16)),
            r"taps must have out's dtype",
            id="dtype-mismatch",
        ),
        pytest.param(
            _args(out=torch.randn(2, 6, 8, 16).double(), taps=torch.randn(2, 3, 4, 144).double()),
            r"out must be float32, float16 or bfloat16",
            id="float64",
        ),
        pytest.param(
            _args(out=torch.randn(2, 16, 6, 8).permute(0, 2, 3, 1)), r"out must be contiguous", id="out-nchw-view"
        ),
        pytest.param(
            _args(taps=torch.randn(2, 144, 3, 4).permute(0, 2, 3, 1)), r"taps must be contiguous", id="taps-nchw-view"
        ),
        pytest.param(_args(out=torch.randn(6, 8, 16)), r"out must be a 4-D channels-last", id="out-3d"),
        pytest.param(_args(taps=torch.randn(3, 4, 144)), r"taps must be a 4-D channels-last", id="taps-3d"),
    ],
)
def test_rejects(args, message):
    out, taps = args
    before = out.clone()
    with pytest.raises(RuntimeError, match=message):
        ext.upsample_taps_relu_(out, taps)
    assert torch.equal(out, before)  # checked before anything is written


# ---------------------------------------------------------------- torch.library checks


@needs_cpu_ops
@pytest.mark.parametrize("dtype", [pytest.param(DTYPES[n], id=n) for n in ("fp32", "bf16")])
def test_opcheck(dtype):
    out, taps = taps_inputs(2, 3, 5, 37, dtype)
    torch.library.opcheck(torch.ops.mematte_ext.upsample_taps_relu_.default, (out, taps))


@needs_cpu_ops
def test_schema_declares_out_mutated():
    schema = torch.ops.mematte_ext.upsample_taps_relu_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert schema.arguments[1].alias_info is None and len(schema.returns) == 0


# ---------------------------------------------------------- the fusion-block op on top


# (Cin, C, h, w): the decoder's fusion blocks on small low-resolution maps.
FUSION_SHAPES = [(64, 32, 5, 7), (128, 64, 12, 12), (384, 256, 5, 7), (128, 64, 1, 3)]


def fusion_cases() -> list:
    return [
        pytest.param(Cin, C, h, w, DTYPES[n], id=f"Cin{Cin}-C{C}-h{h}w{w}-{n}")
        for Cin, C, h, w in FUSION_SHAPES
        for n in ("fp32", "bf16")
    ]


def fusion_inputs(Cin, C, h, w, dtype, B=2, seed=0):
    """out (B, C, 2h, 2w), x (B, Cin, h, w), weight (C, Cin, 3, 3), all channels-last as in
    FoldedDecoder; weights scaled so the conv output is O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(B, C, 2 * h, 2 * w, generator=g)
    x = torch.randn(B, Cin, h, w, generator=g)
    weight = torch.randn(C, Cin, 3, 3, generator=g) * (9 * Cin) ** -0.5
    return [t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (out, x, weight)]


@needs_cpu_ops
@pytest.mark.parametrize("Cin, C, h, w, dtype", fusion_cases())
def test_native_upsample_conv_relu(Cin, C, h, w, dtype):
    out, x, weight = fusion_inputs(Cin, C, h, w, dtype)
    result = out.clone()
    returned = native.upsample_conv_relu_(result, x, weight)
    assert returned is result
    assert result.is_contiguous(memory_format=torch.channels_last) and result.dtype == dtype
    assert torch.isfinite(result).all()
    oracle = reference.upsample_conv_relu_(out.double(), x.double(), weight.double())
    name = {v: k for k, v in DTYPES.items()}[dtype]
    if dtype == torch.float32:
        err = max_rel_err(result, oracle)
        record(f"fusion-{name}", rel=err)
        assert err <= 1e-5, f"fp32 relative error {err:.3g}"
        return
    # Baseline: the reference op run in the dtype (upsample, conv and add each rounded).
    torch_err = max_abs_err(reference.upsample_conv_relu_(out.clone(), x, weight), oracle)
    kernel_err = max_abs_err(result, oracle)
    floor = 1e-5 * oracle.abs().max().item()
    record(f"fusion-{name}", kernel=kernel_err, torch=torch_err, rel=kernel_err / oracle.abs().max().item())
    assert kernel_err <= 2 * torch_err + floor, f"kernel error {kernel_err:.3g}, PyTorch's {torch_err:.3g}"


@needs_cpu_ops
def test_native_upsample_conv_relu_rejects_nchw_out():
    """out must be channels-last: the ext op sees its (B, H, W, C) view."""
    out, x, weight = fusion_inputs(64, 32, 3, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"out must be contiguous"):
        native.upsample_conv_relu_(out.contiguous(), x, weight)


# ------------------------------------------------------- the fused AVX512-BF16 op

# The kernel makes the taps of 4 pixels at a time (tails of 1-3) in groups of 16 output lanes,
# 4 groups at a time: 9C / 16 groups leave tails of 1 (C 16: 9 groups), 2 (C 32: 18) and
# 3 (C 48: 27). Cin is consumed in pairs; each thread keeps a ring of 4 low-resolution rows.
FUSED_SIZES = [(1, 1), (1, 5), (3, 7), (5, 2), (9, 13)]
FUSED_CIN = [2, 6, 64, 128]
FUSED_C = [16, 32, 48]


def fused_inputs(B, h, w, Cin, C, seed=0, weight_dtype=torch.bfloat16):
    """bf16 out (B, 2h, 2w, C) and x (B, h, w, Cin), channels-last contiguous as the op takes
    them, and weight (C, Cin, 3, 3) scaled so the conv output is O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(B, 2 * h, 2 * w, C, generator=g)
    x = torch.randn(B, h, w, Cin, generator=g)
    weight = torch.randn(C, Cin, 3, 3, generator=g) * (9 * Cin) ** -0.5
    return out.bfloat16(), x.bfloat16(), weight.to(weight_dtype)


def nchw(t: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) channels-last view of a (B, H, W, C) tensor."""
    return t.permute(0, 3, 1, 2)


def run_fused(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    result = out.clone()
    assert ext.upsample_conv_relu_(result, x, weight) is None
    return result


def fused_reference(out, x, weight) -> torch.Tensor:
    """reference.upsample_conv_relu_ on the NHWC tensors, in their dtype: (B, 2h, 2w, C)."""
    return reference.upsample_conv_relu_(nchw(out).clone(), nchw(x), weight.to(out.dtype)).permute(0, 2, 3, 1)


def fused_cases() -> list:
    return [
        pytest.param(B, h, w, Cin, C, id=f"B{B}-h{h}w{w}-Cin{Cin}-C{C}")
        for B in (1, 2)
        for h, w in FUSED_SIZES
        for Cin in FUSED_CIN
        for C in FUSED_C
    ]


@needs_bf16_kernels
@pytest.mark.parametrize("B, h, w, Cin, C", fused_cases())
def test_upsample_conv_relu_fused(B, h, w, Cin, C):
    out, x, weight = fused_inputs(B, h, w, Cin, C)
    before = out.clone()
    result = run_fused(out, x, weight)
    assert torch.equal(out, before)  # run_fused worked on a copy
    assert result.shape == out.shape and result.dtype == torch.bfloat16
    assert torch.isfinite(result).all()
    assert (result >= 0).all()  # the ReLU
    oracle = fused_reference(out.double(), x.double(), weight.double())
    # Baselines: the reference op run in bf16 (upsample, conv and add each rounded), which the
    # bound is on, and the unfused native op (taps rounded to bf16), reported only.
    torch_err = max_abs_err(fused_reference(out, x, weight), oracle)
    unfused = out.clone()
    native.upsample_conv_relu_(nchw(unfused), nchw(x), weight)
    unfused_err = max_abs_err(unfused, oracle)
    kernel_err = max_abs_err(result, oracle)
    floor = 1e-5 * oracle.abs().max().item()
    ratio_torch, ratio_unfused = kernel_err / max(torch_err, 1e-30), kernel_err / max(unfused_err, 1e-30)
    record("fused-bf16", kernel=kernel_err, torch=torch_err, unfused=unfused_err, ratio_torch=ratio_torch)
    record("fused-bf16", ratio_unfused=ratio_unfused)
    print(
        f"kernel error {kernel_err:.3g}, PyTorch bf16 {torch_err:.3g} (ratio {ratio_torch:.3f}), "
        f"unfused native {unfused_err:.3g} (ratio {ratio_unfused:.3f})"
    )  # shown with -s / -rP
    assert kernel_err <= 2 * torch_err + floor, f"kernel error {kernel_err:.3g}, PyTorch's {torch_err:.3g}"


@needs_bf16_kernels
def test_upsample_conv_relu_fused_in_place():
    out, x, weight = fused_inputs(2, 3, 7, 64, 48, seed=1)
    expected = run_fused(out, x, weight)
    data_ptr = out.data_ptr()
    ext.upsample_conv_relu_(out, x, weight)
    assert out.data_ptr() == data_ptr and torch.equal(out, expected)
    assert (out == 0).any() and (out > 0).any()  # the inputs exercise both sides of the ReLU


@needs_bf16_kernels
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_upsample_conv_relu_fused_weight_dtypes(weight_dtype):
    """Any float weight is taken; the kernel reads it rounded to bf16 (vdpbf16ps operands)."""
    out, x, weight = fused_inputs(2, 3, 7, 6, 32, seed=2, weight_dtype=weight_dtype)
    result = run_fused(out, x, weight)
    assert torch.equal(result, run_fused(out, x, weight.bfloat16()))
    oracle = fused_reference(out.double(), x.double(), weight.double())
    torch_err = max_abs_err(fused_reference(out, x, weight), oracle)
    assert max_abs_err(result, oracle) <= 2 * torch_err + 1e-5 * oracle.abs().max().item()


@needs_bf16_kernels
def test_upsample_conv_relu_fused_does_not_depend_on_thread_count():
    """Row ranges of any length make the same taps: 1 thread and all threads agree bitwise."""
    out, x, weight = fused_inputs(2, 9, 13, 64, 48, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_fused(out, x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(run_fused(out, x, weight), single)


@needs_bf16_kernels
def test_upsample_conv_relu_fused_nan_in_out_stays_nan_and_alone():
    """The op reads out: a NaN there comes out NaN (even where the clean result is 0), in any
    of the 16-lane groups, and touches no other element."""
    out, x, weight = fused_inputs(2, 3, 4, 6, 48)
    nan_at = torch.zeros(out.shape, dtype=torch.bool)
    nan_at[0, 0, 0, 0] = nan_at[1, 5, 7, 47] = nan_at[0, 2, 3, 17] = nan_at[1, 4, 1, 33] = True
    out[1, 4, 1, 33] = -1e3
    nan_out = out.masked_fill(nan_at, float("nan"))
    result = run_fused(nan_out, x, weight)
    assert torch.equal(torch.isnan(result), nan_at)
    assert torch.equal(result[~nan_at], run_fused(out, x, weight)[~nan_at])


@needs_bf16_kernels
@pytest.mark.parametrize(
    "i, j, channel",
    [
        pytest.param(0, 0, 0, id="corner-first_tile"),
        pytest.param(2, 3, 5, id="interior-last_of_tile"),
        pytest.param(2, 4, 2, id="interior-tail_tile"),
        pytest.param(4, 6, 1, id="last_pixel"),
        pytest.param(4, 0, 4, id="bottom_left"),
    ],
)
def test_upsample_conv_relu_fused_nan_in_x_contaminates_only_its_receptive_field(i, j, channel):
    """A NaN in one channel of one low-res pixel makes all 9C taps of that pixel NaN (and no
    other pixel's: a 4-pixel tile keeps separate accumulators), so it reaches every channel of
    exactly the outputs whose 2x-upsample + 3x3 neighbourhood reads the pixel."""
    B, h, w, Cin, C = 2, 5, 7, 6, 48
    out, x, weight = fused_inputs(B, h, w, Cin, C, seed=4)
    clean = run_fused(out, x, weight)
    nan_x = x.clone()
    nan_x[1, i, j, channel] = float("nan")
    result = run_fused(out, nan_x, weight)

    by_hand = torch.zeros(B, 2 * h, 2 * w, C, dtype=torch.bool)
    for k in range(9):
        by_hand[1] |= receptive_mask(2 * h, 2 * w, i, j, k // 3, k % 3, h, w)[:, :, None]
    assert torch.equal(torch.isnan(result), by_hand)
    # The upstream formulation (in fp32) agrees on where the NaN goes.
    ref = fused_reference(out.float(), nan_x.float(), weight.float())
    assert torch.equal(torch.isnan(ref), by_hand)
    assert 0 < by_hand.any(dim=-1).sum().item() <= 36
    assert torch.equal(result[~by_hand], clean[~by_hand])


@needs_bf16_kernels
@pytest.mark.parametrize(
    "out_shape, x_shape",
    [
        pytest.param((0, 4, 6, 16), (0, 2, 3, 8), id="B0"),
        pytest.param((2, 0, 6, 16), (2, 0, 3, 8), id="h0"),
        pytest.param((2, 4, 0, 32), (2, 2, 0, 8), id="w0"),
    ],
)
def test_upsample_conv_relu_fused_empty(out_shape, x_shape):
    out, x = torch.empty(out_shape, dtype=torch.bfloat16), torch.empty(x_shape, dtype=torch.bfloat16)
    weight = torch.randn(out_shape[-1], x_shape[-1], 3, 3)
    ptr = out.data_ptr()
    ext.upsample_conv_relu_(out, x, weight)
    assert out.shape == out_shape and out.data_ptr() == ptr and out.numel() == 0


@needs_bf16_kernels
def test_upsample_conv_relu_fused_empty_still_checks_shapes():
    with pytest.raises(RuntimeError, match=r"out must have shape \(B, 2h, 2w, C\)"):
        ext.upsample_conv_relu_(
            torch.empty(0, 4, 6, 16).bfloat16(), torch.empty(0, 2, 2, 8).bfloat16(), torch.randn(16, 8, 3, 3)
        )


DTYPE_RULE = "out and x must be bfloat16, got "
OUT_SHAPE_RULE = r"for x of shape \(B, h, w, Cin\) = \[2, 3, 4, 8\] out must have shape \(B, 2h, 2w, C\), got \["


def _fused_args(**override):
    out, x, weight = fused_inputs(2, 3, 4, 8, 16)
    args = {"out": out, "x": x, "weight": weight}
    args.update(override)
    return args["out"], args["x"], args["weight"]


@needs_bf16_kernels
@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(_fused_args(out=torch.randn(2, 6, 8, 16)), DTYPE_RULE + "Float and BFloat16", id="fp32-out"),
        pytest.param(_fused_args(x=torch.randn(2, 3, 4, 8)), DTYPE_RULE + "BFloat16 and Float", id="fp32-x"),
        pytest.param(
            _fused_args(out=torch.randn(2, 6, 8, 24).bfloat16(), weight=torch.randn(24, 8, 3, 3)),
            r"needs C a multiple of 16 and Cin even, got C = 24, Cin = 8",
            id="C24",
        ),
        pytest.param(
            _fused_args(x=torch.randn(2, 3, 4, 7).bfloat16(), weight=torch.randn(16, 7, 3, 3)),
            r"needs C a multiple of 16 and Cin even, got C = 16, Cin = 7",
            id="Cin7",
        ),
        pytest.param(
            _fused_args(out=torch.randn(2, 6, 9, 16).bfloat16()), OUT_SHAPE_RULE + r"2, 6, 9, 16\]", id="out-not-2w"
        ),
        pytest.param(
            _fused_args(out=torch.randn(2, 3, 4, 16).bfloat16()), OUT_SHAPE_RULE + r"2, 3, 4, 16\]", id="out-not-2x"
        ),
        pytest.param(
            _fused_args(out=torch.randn(1, 6, 8, 16).bfloat16()), OUT_SHAPE_RULE + r"1, 6, 8, 16\]", id="batch"
        ),
        pytest.param(
            _fused_args(weight=torch.randn(16, 8, 5, 5)),
            r"weight must have shape \(C, Cin, 3, 3\) = \(16, 8, 3, 3\), got \[16, 8, 5, 5\]",
            id="weight-5x5",
        ),
        pytest.param(
            _fused_args(weight=torch.randn(16, 16, 3, 3)),
            r"weight must have shape \(C, Cin, 3, 3\) = \(16, 8, 3, 3\), got \[16, 16, 3, 3\]",
            id="weight-Cin16",
        ),
        pytest.param(
            _fused_args(weight=torch.randn(16, 8, 3, 3).double()),
            r"weight must be float32, float16 or bfloat16, got Double",
            id="weight-fp64",
        ),
        pytest.param(
            _fused_args(x=torch.randn(2, 8, 3, 4).bfloat16().permute(0, 2, 3, 1)),
            r"x must be contiguous in \(B, H, W, C\) order",
            id="x-nchw-view",
        ),
        pytest.param(
            _fused_args(out=torch.randn(2, 16, 6, 8).bfloat16().permute(0, 2, 3, 1)),
            r"out must be contiguous in \(B, H, W, C\) order",
            id="out-nchw-view",
        ),
        pytest.param(_fused_args(x=torch.randn(3, 4, 8).bfloat16()), r"x must be a 4-D channels-last", id="x-3d"),
    ],
)
def test_upsample_conv_relu_fused_rejects(args, message):
    out, x, weight = args
    before = out.clone()
    with pytest.raises(RuntimeError, match=r"mematte_ext\.upsample_conv_relu_: " + message):
        ext.upsample_conv_relu_(out, x, weight)
    assert torch.equal(out, before)  # checked before anything is written


@needs_bf16_kernels
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weight", "fp32-weight"])
def test_upsample_conv_relu_fused_opcheck(weight_dtype):
    out, x, weight = fused_inputs(2, 3, 5, 6, 48, weight_dtype=weight_dtype)
    torch.library.opcheck(torch.ops.mematte_ext.upsample_conv_relu_.default, (out, x, weight))


@needs_bf16_kernels
def test_upsample_conv_relu_fused_schema_declares_out_mutated():
    schema = torch.ops.mematte_ext.upsample_conv_relu_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert all(a.alias_info is None for a in schema.arguments[1:]) and len(schema.returns) == 0


# ------------------------------------------------------ native.upsample_conv_relu_bf16


@needs_bf16_kernels
@pytest.mark.parametrize("Cin, C", [(64, 32), (128, 64), (2, 16)], ids=["Cin64-C32", "Cin128-C64", "Cin2-C16"])
def test_native_upsample_conv_relu_bf16_runs_the_kernel(Cin, C):
    """On FoldedDecoder's channels-last NCHW tensors: the op on their NHWC views, in place."""
    out, x, weight = fusion_inputs(Cin, C, 5, 7, torch.bfloat16)
    result = out.clone()
    assert native.upsample_conv_relu_bf16(result, x, weight) is result
    assert result.is_contiguous(memory_format=torch.channels_last)
    direct = out.permute(0, 2, 3, 1).contiguous()
    ext.upsample_conv_relu_(direct, x.permute(0, 2, 3, 1), weight)
    assert torch.equal(result, nchw(direct))


@needs_cpu_ops
@pytest.mark.parametrize(
    "Cin, C, dtype",
    [
        pytest.param(64, 32, torch.float32, id="fp32"),
        pytest.param(256, 64, torch.bfloat16, id="bf16-Cin256"),
        pytest.param(64, 24, torch.bfloat16, id="bf16-C24"),
        pytest.param(7, 16, torch.bfloat16, id="bf16-Cin7"),
    ],
)
def test_native_upsample_conv_relu_bf16_falls_back(Cin, C, dtype):
    out, x, weight = fusion_inputs(Cin, C, 5, 7, dtype)
    result, unfused = out.clone(), out.clone()
    assert native.upsample_conv_relu_bf16(result, x, weight) is result
    native.upsample_conv_relu_(unfused, x, weight)
    assert torch.isfinite(result).all()
    assert torch.equal(result, unfused)


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def no_backend_override(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@needs_bf16_kernels
@pytest.mark.usefixtures("no_backend_override")
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_cpu_backend_uses_the_fused_op(backend):
    """The fused kernel is a candidate the CPU backend measures for bf16."""
    op = dispatch.resolve(backend, "cpu").upsample_conv_relu_
    assert op is cpu_choices.selected()["upsample_conv_relu_"]
    assert native.upsample_conv_relu_bf16 in [c.fn for c in op.runnable(torch.bfloat16)]


@needs_cpu_ops
@pytest.mark.usefixtures("no_backend_override")
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_cpu_backend_without_bf16_kernels_uses_the_native_op(backend, monkeypatch):
    monkeypatch.setattr(ext, "cpu_bf16_kernels", lambda: False)
    op = dispatch.resolve(backend, "cpu").upsample_conv_relu_
    assert [c.name for c in op.runnable(torch.bfloat16)] == ["gemm", "fp32"]
    assert [c.fn for c in op.runnable(torch.float32)] == [native.upsample_conv_relu_]


@pytest.mark.usefixtures("no_backend_override")
def test_reference_backend_uses_the_reference_op():
    assert dispatch.REFERENCE.upsample_conv_relu_ is reference.upsample_conv_relu_
    assert dispatch.resolve("reference", "cpu").upsample_conv_relu_ is reference.upsample_conv_relu_


@pytest.mark.usefixtures("no_backend_override")
def test_cpu_backend_without_the_kernel_falls_back_to_reference(monkeypatch):
    real = ext.has_kernel
    monkeypatch.setattr(ext, "has_kernel", lambda op, device: op != "upsample_taps_relu_" and real(op, device))
    assert dispatch.resolve("cpu", "cpu").upsample_conv_relu_ is reference.upsample_conv_relu_
