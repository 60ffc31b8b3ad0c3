"""The public ops mematte_kernels.policy_attention, varlen_attention and global_attention:
dispatch as the model's (MEMATTE_BACKEND honoured), gradients on every backend, and clear
errors for bad input."""

from __future__ import annotations

import pytest
import torch

import mematte_kernels
from mematte_kernels import dispatch, reference
from mematte_kernels import triton as triton_ops
from mematte_kernels.triton import _common as triton_common

from test_policy_attention import make_inputs
from test_triton_attention import packed_qkv

BACKENDS = ["reference", "cpu", "auto"] + (["triton"] if triton_common.INTERPRET or torch.cuda.is_available() else [])


def grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def assert_matches_fp64(fn, reference_fn, inputs, dout, rtol=1e-4):
    out, got = grads(fn, inputs, dout)
    expected_out, expected = grads(reference_fn, [t.double() for t in inputs], dout.double())
    for name, a, e in zip(["out", *[f"d{i}" for i in range(len(inputs))]], [out, *got], [expected_out, *expected]):
        assert a is not None, f"{name}: no gradient"
        error = (a.double() - e).abs().max().item()
        assert error <= rtol * e.abs().max().item() + 1e-6, f"{name}: max abs error {error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_attention_every_backend(backend, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    q, k, v, p = make_inputs(2, 33, 2, policy="soft", seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    assert_matches_fp64(
        lambda *t: mematte_kernels.policy_attention(*t, scale=0.3, eps=1e-3),
        lambda *t: reference.policy_attention(*t, scale=0.3, eps=1e-3),
        [q, k, v, p],
        dout,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_every_backend(backend, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([40, 0, 9], 2, torch.float32, seed=13)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(14))
    assert_matches_fp64(
        lambda *t: mematte_kernels.varlen_attention(*t, cu_seqlens, max_seqlen, scale=0.3),
        lambda *t: reference.varlen_attention(*t, cu_seqlens, max_seqlen, scale=0.3),
        [q, k, v],
        dout,
    )


def test_training_tables_keep_the_attention_paths():
    """With gradients, the CPU path and the Triton kernels stay: both have a backward (the
    dense reference would hold N x N matrices)."""
    from mematte_kernels import native

    cpu = dispatch.resolve("cpu", "cpu", training=True)
    assert cpu.policy_attention is native.policy_attention
    assert cpu.varlen_attention is native.varlen_attention
    if triton_common.INTERPRET:
        table = dispatch.resolve("triton", "cpu", training=True)
        assert table.policy_attention is triton_ops.policy_attention
        assert table.varlen_attention is triton_ops.varlen_attention


@pytest.mark.skipif(not triton_common.INTERPRET, reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
def test_triton_backend_runs_the_kernels(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    q, k, v, p = make_inputs(1, 20, 2, policy="random", seed=15)
    assert torch.equal(mematte_kernels.policy_attention(q, k, v, p), triton_ops.policy_attention(q, k, v, p))
    q, k, v, cu_seqlens, max_seqlen = packed_qkv([12, 5], 2, torch.float32, seed=16)
    assert torch.equal(
        mematte_kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen),
        triton_ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen),
    )
    qkv, table_h, table_w = grid_inputs(1, 3, 4, 1, seed=17)
    rel_h, rel_w = reference.rel_pos_table(3, 3, table_h), reference.rel_pos_table(4, 4, table_w)
    assert torch.equal(
        mematte_kernels.global_attention(qkv, table_h, table_w, 1),
        triton_ops.global_attention(qkv, rel_h, rel_w, 1, 0.125),
    )


def grid_inputs(B, H, W, heads, dtype=torch.float32, seed=0):
    """qkv (B, H, W, 3 * heads * 64) and learned tables of 13 rows (resized for H, W != 7)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * heads * 64, generator=g).to(dtype)
    return qkv, torch.randn(13, 64, generator=g) * 0.2, torch.randn(13, 64, generator=g) * 0.2


def upstream_global(qkv, table_h, table_w, heads, scale):
    """ViTDet's global attention: tables resized and gathered, then the N×N formula."""
    H, W = qkv.shape[1:3]
    rel_h, rel_w = reference.rel_pos_table(H, H, table_h), reference.rel_pos_table(W, W, table_w)
    return reference.global_attention(qkv, rel_h, rel_w, heads, scale)


@pytest.mark.parametrize("H, W", [pytest.param(3, 4, id="3x4-both-resized"), pytest.param(1, 7, id="1x7-w-as-learned")])
def test_global_attention_reference_gradcheck(H, W):
    """The path gradients take: the learned tables resized (13 rows to 2n - 1) and gathered,
    then the N×N formula, in float64."""
    qkv, table_h, table_w = grid_inputs(1, H, W, 1, torch.float64, seed=21)
    inputs = tuple(t.double().requires_grad_() for t in (qkv, table_h, table_w))
    assert torch.autograd.gradcheck(lambda *t: upstream_global(*t, 1, 0.3), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_attention_every_backend(backend, monkeypatch):
    """Gradients in qkv and both learned tables (one resized: 13 rows for a 5-row grid)."""
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    qkv, table_h, table_w = grid_inputs(2, 5, 7, 2, seed=18)
    dout = torch.randn(2, 5, 7, 128, generator=torch.Generator().manual_seed(19))
    assert_matches_fp64(
        lambda *t: mematte_kernels.global_attention(*t, 2, scale=0.3),
        lambda *t: upstream_global(*t, 2, 0.3),
        [qkv, table_h, table_w],
        dout,
    )


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_global_attention_inference_runs_the_fast_path(backend, dtype, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    qkv, table_h, table_w = grid_inputs(1, 9, 6, 2, dtype, seed=20)
    with torch.inference_mode():
        out = mematte_kernels.global_attention(qkv, table_h, table_w, 2)
    expected = upstream_global(qkv.double(), table_h.double(), table_w.double(), 2, 64**-0.5)
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    else:
        torch_bf16 = upstream_global(qkv, table_h.to(dtype), table_w.to(dtype), 2, 64**-0.5)
        assert (out.double() - expected).abs().max() <= 2 * (torch_bf16.double() - expected).abs().max()


def _bad_global_inputs():
    qkv, th, tw = grid_inputs(1, 3, 4, 2)
    yield "float64", (qkv.double(), th, tw, 2), TypeError, "qkv must be float16, bfloat16 or float32, got torch.float64"
    yield "heads-zero", (qkv, th, tw, 0), ValueError, "num_heads must be a positive int, got 0"
    yield "heads-float", (qkv, th, tw, 2.0), ValueError, "num_heads must be a positive int, got 2.0"
    yield "not-3-heads-d", (qkv[..., :380], th, tw, 2), ValueError, r"qkv must be 4-D \(B, H, W, 3 \* num_heads"
    yield "3d-qkv", (qkv[0], th, tw, 2), ValueError, r"qkv must be 4-D"
    yield "table-dim", (qkv, th[:, :32], tw, 2), ValueError, r"rel_pos_h must be a \(length, head_dim = 64\) table"
    yield "table-empty", (qkv, th, tw[:0], 2), ValueError, r"rel_pos_w must be a \(length, head_dim = 64\) table"
    yield "table-device", (qkv, th.to("meta"), tw, 2), ValueError, "rel_pos_h is on meta but qkv is on cpu"
    yield "table-list", (qkv, th, tw.tolist(), 2), TypeError, "rel_pos_w must be a tensor, got list"


@pytest.mark.parametrize(
    "args, error, message", [pytest.param(a, e, m, id=name) for name, a, e, m in _bad_global_inputs()]
)
def test_global_attention_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        mematte_kernels.global_attention(*args)


def _bad_policy_inputs():
    q, k, v, p = make_inputs(2, 5, 2)
    yield "float64", (q.double(), k.double(), v.double(), p), TypeError, "q must be float16, bfloat16 or float32"
    yield "mixed-dtypes", (q, k.half(), v, p), TypeError, "one dtype, got k torch.float16"
    yield "v-shape", (q, k, v[:, :4], p), ValueError, "one shape, got v"
    yield "3d-q", (q[:, 0], k, v, p), ValueError, r"q must be 4-D \(B, N, heads, head_dim\)"
    yield "policy-shape", (q, k, v, p[:1]), ValueError, r"policy must have shape \(B, N\) = \(2, 5\), got \(1, 5\)"
    yield "policy-int", (q, k, v, p.long()), TypeError, "policy must be float16, bfloat16 or float32, got torch.int64"
    yield "policy-device", (q, k, v, p.to("meta")), ValueError, "policy is on meta but q is on cpu"
    yield "k-device", (q, k.to("meta"), v, p), ValueError, "k is on meta but q is on cpu"
    yield "policy-list", (q, k, v, p.tolist()), TypeError, "policy must be a tensor, got list"


@pytest.mark.parametrize(
    "args, error, message", [pytest.param(a, e, m, id=name) for name, a, e, m in _bad_policy_inputs()]
)
def test_policy_attention_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        mematte_kernels.policy_attention(*args)


def test_policy_attention_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        mematte_kernels.policy_attention(*make_inputs(1, 3, 1), eps=-1.0)


def _bad_varlen_inputs():
    q, k, v, cu, n = packed_qkv([3, 2], 2, torch.float32)
    yield "cu-seqlens-int64", (q, k, v, cu.long(), n), TypeError, "cu_seqlens must be int32, got torch.int64"
    yield "cu-seqlens-short", (q, k, v, cu[:-1], n), ValueError, r"cu_seqlens must run from 0 to T = 5 .* got 0 to 3"
    yield "cu-seqlens-offset", (q, k, v, cu + 1, n), ValueError, "cu_seqlens must run from 0 to T = 5"
    yield (
        "cu-seqlens-decreasing",
        (q, k, v, torch.tensor([0, 4, 2, 5], dtype=torch.int32), 4),
        ValueError,
        "non-decreasing",
    )
    yield "cu-seqlens-2d", (q, k, v, cu[None], n), ValueError, "cu_seqlens must be 1-D"
    yield "cu-seqlens-empty", (q, k, v, cu[:0], n), ValueError, "cu_seqlens must be 1-D with B \\+ 1 >= 1 offsets"
    yield "cu-seqlens-device", (q, k, v, cu.to("meta"), n), ValueError, "cu_seqlens is on meta but q is on cpu"
    yield "max-seqlen-short", (q, k, v, cu, 2), ValueError, r"max_seqlen 2 is shorter than the longest sequence \(3\)"
    yield "max-seqlen-tensor", (q, k, v, cu, torch.tensor(3)), TypeError, "max_seqlen must be an int"
    yield "2d-q", (q[:, 0], k, v, cu, n), ValueError, r"q must be 3-D \(T, heads, head_dim\)"
    yield "mixed-dtypes", (q, k, v.bfloat16(), cu, n), TypeError, "one dtype, got v torch.bfloat16"


@pytest.mark.parametrize(
    "args, error, message", [pytest.param(a, e, m, id=name) for name, a, e, m in _bad_varlen_inputs()]
)
def test_varlen_attention_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        mematte_kernels.varlen_attention(*args)
