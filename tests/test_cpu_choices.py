"""Every candidate of every CPU op the backend chooses among by measurement
(:mod:`mematte_kernels.cpu_choices`) against the op's reference: whichever a CPU picks, the
output is the reference's. fp32 within fp32 rounding; bf16/fp16 within 2x the low-precision
error against the reference in fp32: the larger of the reference's own error run in that
dtype and the error of rounding the fp32 result to it (some references compute in fp32)."""

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import cpu_choices, dispatch, native, reference

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
CASES = [(op, c.name) for op, selected in cpu_choices.selected().items() for c in selected.candidates]


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run(fn, field, args):
    """The op's output (the in-place upsample-conv writes into a copy of its first argument);
    the router's log-probabilities."""
    if field == "upsample_conv_relu_":
        args = (args[0].clone(), *args[1:])
    out = fn(*args)
    return out[0] if field == "router_scores" else out


def upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("field, name", [pytest.param(*case, id="-".join(case)) for case in CASES])
def test_candidate_matches_reference(field, name, dtype):
    selected = cpu_choices.selected()[field]
    candidate = next(c for c in selected.candidates if c.name == name)
    if not candidate.runs(dtype):
        pytest.skip(f"{field}/{name} does not run {dtype} on this machine")
    ref_fn = getattr(dispatch.REFERENCE, field)
    args = selected.probe(dtype)
    with torch.inference_mode():
        out = run(candidate.fn, field, args)
        ref32 = run(ref_fn, field, upcast(args))
        assert out.shape == ref32.shape and not out.isnan().any()
        if dtype == torch.float32:
            assert rel_error(out, ref32) <= 2e-5
        else:
            assert out.dtype == (torch.float32 if field == "router_scores" else dtype)
            ref_low = run(ref_fn, field, args)
            low_error = max(rel_error(ref_low, ref32), rel_error(ref32.to(dtype), ref32))
            assert rel_error(out, ref32) <= 2 * low_error


@pytest.mark.parametrize("shape, weight_shape, stride, padding", [
    pytest.param((1, 5, 13, 11), (7, 5, 3, 3), 1, 1, id="13x11-3x3"),
    pytest.param((2, 4, 13, 11), (6, 4, 3, 3), 2, 1, id="B2-13x11-3x3-stride2"),
    pytest.param((1, 8, 9, 7), (3, 8, 1, 1), 1, 0, id="9x7-1x1"),
    pytest.param((1, 3, 6, 5), (2, 3, 3, 3), 1, 0, id="6x5-3x3-valid"),
])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_conv_in_one_row_bands_equals_one_fp32_conv(
    shape, weight_shape, stride, padding, channels_last, monkeypatch
):
    """Bands of one output row each (the smallest chunk) cover the whole output, halo and
    padding included: the result is the fp32 convolution, rounded once."""
    monkeypatch.setattr(native, "FP32_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).bfloat16()
    weight = torch.randn(weight_shape, generator=g).bfloat16()
    bias = torch.randn(weight_shape[0], generator=g).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = native.conv2d_fp32(x, weight, bias, stride, padding)
    expected = F.conv2d(x.float(), weight.float(), bias.float(), stride=stride, padding=padding).bfloat16()
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["linear_fp32", "linear_gelu_fp32"])
def test_fp32_linear_in_one_row_chunks_equals_one_fp32_linear(op, monkeypatch):
    monkeypatch.setattr(native, "FP32_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 33, generator=g).half()
    weight, bias = torch.randn(17, 33, generator=g).half(), torch.randn(17, generator=g).half()
    out = getattr(native, op)(x, weight, bias)
    expected = getattr(native, op.removesuffix("_fp32"))(x.float(), weight.float(), bias.float())
    # oneDNN picks another GEMM kernel for one row than for fourteen, so the fp32 sums may
    # differ in their last bits (a K=33 sum of O(1) products: ~1e-6); rounded to fp16 that is
    # at most one ulp. A lost, repeated or misaligned row would be off by O(1).
    torch.testing.assert_close(out.float(), expected, rtol=2**-10, atol=1e-5)


def test_fp32_patch_embed_in_one_row_bands_equals_one_fp32_embedding(monkeypatch):
    monkeypatch.setattr(native, "FP32_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 48, 80, generator=g).bfloat16()
    weight, bias = torch.randn(24, 4, 16, 16, generator=g).bfloat16(), torch.randn(24, generator=g).bfloat16()
    out = native.patch_embed_fp32(x, weight, bias)
    expected = reference.patch_embed(x.float(), weight.float(), bias.float()).bfloat16()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("H, W", [pytest.param(29, 17, id="29x17"), pytest.param(14, 30, id="14x30")])
def test_fp32_window_attention_in_strips_of_one_window_row_equals_one_call(H, W, monkeypatch):
    """Strips of one window row (the smallest), the last one padded: the whole grid's
    fp32 window attention, rounded once."""
    g = torch.Generator().manual_seed(6)
    heads, d, window = 2, 16, 7
    qkv = torch.randn(1, H, W, 3 * heads * d, generator=g).bfloat16()
    pad = torch.randn(3 * heads * d, generator=g).bfloat16()
    rel_h, rel_w = (torch.randn(window, window, d, generator=g).bfloat16() * 0.2 for _ in range(2))
    expected = native.window_attention(qkv.float(), pad.float(), rel_h.float(), rel_w.float(), heads, d**-0.5, window)
    monkeypatch.setattr(native, "FP32_CHUNK_BYTES", 1)
    out = native.window_attention_fp32(qkv, pad, rel_h, rel_w, heads, d**-0.5, window)
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-6)


def test_fp32_global_attention_in_strips_of_one_row_equals_one_call(monkeypatch):
    g = torch.Generator().manual_seed(7)
    heads, d, H, W = 2, 16, 5, 7
    qkv = torch.randn(2, H, W, 3 * heads * d, generator=g).bfloat16()
    rel_h, rel_w = (
        torch.randn(H, H, d, generator=g).bfloat16() * 0.2,
        torch.randn(W, W, d, generator=g).bfloat16() * 0.2,
    )
    expected = native.global_attention(qkv.float(), rel_h.float(), rel_w.float(), heads, d**-0.5)
    monkeypatch.setattr(native, "GLOBAL_CHUNK_LOGITS", 1)
    out = native.global_attention_fp32(qkv, rel_h, rel_w, heads, d**-0.5)
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("op, args", [
    pytest.param(native.conv2d_fp32, lambda: (torch.zeros(0, 3, 8, 8).bfloat16(), torch.ones(2, 3, 3, 3).bfloat16(), None, 1, 1),
                 id="conv2d-B0"),
    pytest.param(native.linear_fp32, lambda: (torch.zeros(0, 8).bfloat16(), torch.ones(4, 8).bfloat16(), torch.ones(4).bfloat16()),
                 id="linear-T0"),
    pytest.param(native.varlen_attention_fp32,
                 lambda: (*(torch.zeros(0, 2, 64).bfloat16() for _ in range(3)), torch.zeros(1, dtype=torch.int32), 0),
                 id="varlen-T0"),
])  # fmt: skip
def test_fp32_candidates_take_empty_inputs(op, args):
    out = op(*args())
    assert out.numel() == 0 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("op, args", [
    pytest.param(native.conv2d_fp32, lambda: (torch.ones(1, 2, 4, 4, requires_grad=True), torch.ones(1, 2, 3, 3), None), id="conv2d"),
    pytest.param(native.linear_fp32, lambda: (torch.ones(3, 2, requires_grad=True), torch.ones(2, 2), torch.ones(2)), id="linear"),
])  # fmt: skip
def test_fp32_candidates_refuse_gradients_by_name(op, args):
    with pytest.raises(RuntimeError, match=op.__name__):
        op(*args())


@pytest.mark.parametrize(
    "stride, padding", [pytest.param(1, 1, id="s1-p1"), pytest.param(2, 1, id="s2-p1"), pytest.param(1, 0, id="s1-p0")]
)
def test_conv2d_reference_gradcheck(stride, padding):
    """The conv2d table op trains through its reference: gradients of input, weight and bias."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: reference.conv2d(*t, stride, padding), (x, weight, bias))
