"""The PyTorch-native fast ops (CPU backend, window attention of every fast backend)
against their references."""

import pytest
import torch

from mematte_kernels import native, reference

# Outputs start as NaN: an element an op fails to write cannot pass.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def router_args(B, N, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return [
        r(B, N, C),
        1 + r(C, scale=0.1), r(C, scale=0.1),
        r(C, C, scale=C**-0.5), r(C, scale=0.1),
        r(C // 2, C, scale=C**-0.5), r(C // 2, scale=0.1),
        r(C // 4, C // 2, scale=(C // 2) ** -0.5), r(C // 4, scale=0.1),
        r(2, C // 4, scale=4.0), r(2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "B, N, C",
    [
        pytest.param(1, 1, 8, id="B1-N1-C8"),
        pytest.param(2, 63, 384, id="B2-N63-C384"),
        pytest.param(3, 1000, 96, id="B3-N1000-C96"),
    ],
)
def test_router_folds_global_half_into_bias(B, N, C):
    args = router_args(B, N, C, torch.float32)
    scores, keep = native.router_scores(*args)
    ref_scores, ref_keep = reference.router_scores(*args)
    assert scores.dtype == torch.float32 and scores.shape == (B, N, 2)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=2e-5)
    assert torch.equal(keep, scores[..., 0] > scores[..., 1])
    margin = (ref_scores[..., 0] - ref_scores[..., 1]).abs()
    assert torch.equal(keep[margin > 1e-4], ref_keep[margin > 1e-4])


def test_router_keeps_fp32_margins_for_bf16_tokens():
    """bf16 tokens go through the two wide layers in bf16, the rest in fp32: the scores are
    within 2x the error of a router run wholly in bf16, and decisions with a clear margin
    are those of the fp32 router."""
    args = router_args(2, 500, 128, torch.float32)
    x_bf16 = args[0].bfloat16()
    scores, keep = native.router_scores(x_bf16, *args[1:])
    expected, expected_keep = reference.router_scores(x_bf16.float(), *args[1:])
    all_bf16, _ = reference.router_scores(x_bf16, *(p.bfloat16() for p in args[1:]))
    assert scores.dtype == torch.float32
    error = (scores - expected).abs().max().item()
    assert error <= 2 * (all_bf16.float() - expected).abs().max().item()
    clear = (expected[..., 0] - expected[..., 1]).abs() > 0.1
    assert clear.float().mean() > 0.5 and torch.equal(keep[clear], expected_keep[clear])


def packed(lengths, heads=3, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    qkv = torch.randn(T, 3, heads, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return qkv.unbind(1), cu, max(lengths, default=0)


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([1], id="T1"),
        pytest.param([63], id="T63"),
        pytest.param([65, 0, 1000], id="B3-T1065-empty"),
        pytest.param([0, 0], id="B2-all-empty"),
        pytest.param([17, 33, 1, 64], id="B4-T115"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_attention_matches_per_sequence_loop(lengths, dtype):
    (q, k, v), cu, max_len = packed(lengths, dtype=dtype)
    out = native.varlen_attention(q, k, v, cu, max_len)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    ref32 = reference.varlen_attention(q.float(), k.float(), v.float(), cu, max_len)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=0, atol=1e-5)
    elif out.numel():
        ref_low = reference.varlen_attention(q, k, v, cu, max_len)
        assert rel_error(out, ref32) <= 2 * rel_error(ref_low, ref32) + 1e-4


@pytest.mark.parametrize("windows, size", [pytest.param(3, 14, id="W3-14x14"), pytest.param(300, 5, id="W300-5x5")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rel_pos_attention_as_additive_bias(windows, size, dtype):
    g = torch.Generator().manual_seed(4)
    heads, d = 2, 64
    q, k, v = (torch.randn(windows, heads, size * size, d, generator=g).to(dtype) for _ in range(3))
    rel_h, rel_w = (torch.randn(size, size, d, generator=g).mul(0.1).to(dtype) for _ in range(2))
    out = native.rel_pos_attention(q, k, v, rel_h, rel_w, d**-0.5)
    ref32 = reference.rel_pos_attention(*(t.float() for t in (q, k, v, rel_h, rel_w)), d**-0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=0, atol=1e-5)
    else:
        ref_low = reference.rel_pos_attention(q, k, v, rel_h, rel_w, d**-0.5)
        assert rel_error(out, ref32) <= 2 * rel_error(ref_low, ref32) + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_first_layer_norm_on_channels_last_tokens(dtype):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 7, 9, 48, generator=g).mul(3).add(1).to(dtype)  # (B, H, W, C) as the backbone holds them
    x = tokens.permute(0, 3, 1, 2)
    weight, bias = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    out = native.channels_first_layer_norm(x, weight, bias, 1e-6)
    ref32 = reference.channels_first_layer_norm(x.float(), weight.float(), bias.float(), 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=0, atol=1e-5)
    else:
        ref_low = reference.channels_first_layer_norm(x, weight, bias, 1e-6)
        assert rel_error(out, ref32) <= 2 * rel_error(ref_low, ref32) + 1e-4


@pytest.mark.parametrize(
    "shape, out_features",
    [
        pytest.param((1, 1, 1, 8), 16, id="1x1-C8"),
        pytest.param((2, 7, 9, 384), 1536, id="B2-7x9-C384"),
        pytest.param((33, 48), 37, id="T33-C48-odd"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["linear", "linear_gelu"])
def test_fused_linear_matches_reference(op, shape, out_features, dtype):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g).to(dtype)
    weight = (torch.randn(out_features, shape[-1], generator=g) * shape[-1] ** -0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    out = getattr(native, op)(x, weight, bias)
    ref32 = getattr(reference, op)(x.float(), weight.float(), bias.float())
    assert out.shape == (*shape[:-1], out_features) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        ref_low = getattr(reference, op)(x, weight, bias)
        assert rel_error(out, ref32) <= 2 * rel_error(ref_low, ref32) + 1e-4


def test_cpu_table_uses_the_fused_dense_ops(monkeypatch):
    from mematte_kernels import dispatch

    monkeypatch.delenv("MEMATTE_BACKEND", raising=False)
    table = dispatch.resolve("cpu", "cpu")
    if torch.backends.mkldnn.is_available():
        assert native.linear in [c.fn for c in table.linear.candidates]
        assert native.linear_gelu in [c.fn for c in table.linear_gelu.candidates]
    assert dispatch.REFERENCE.linear is reference.linear and dispatch.REFERENCE.patch_embed is reference.patch_embed


@pytest.mark.parametrize("op", ["linear", "linear_gelu"])
def test_fused_linear_leaves_bf16_to_pytorch_where_onednn_cannot(op, monkeypatch):
    monkeypatch.setattr(native, "ONEDNN_BF16", False)
    g = torch.Generator().manual_seed(8)
    x, weight, bias = (torch.randn(*shape, generator=g).bfloat16() for shape in ((5, 32), (16, 32), (16,)))
    assert torch.equal(getattr(native, op)(x, weight, bias), getattr(reference, op)(x, weight, bias))


def test_cpu_backend_forced_on_cuda_tensors_keeps_cpu_only_ops_out(monkeypatch):
    """backend="cpu" on a CUDA model: oneDNN and the AVX512-BF16 kernels take CPU tensors only."""
    from mematte_kernels import dispatch

    monkeypatch.delenv("MEMATTE_BACKEND", raising=False)
    table = dispatch.resolve("cpu", "cuda")
    assert table.linear is reference.linear and table.linear_gelu is reference.linear_gelu
    assert table.varlen_attention is native.varlen_attention
    assert table.window_attention is native.window_attention
    assert table.upsample_conv_relu_ is reference.upsample_conv_relu_
