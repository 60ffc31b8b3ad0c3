"""Autograd at the edges of the kernels: inference builds no graph whatever the caller's grad
mode, training tables keep only ops with a backward, and an op without one refuses to be
differentiated, naming itself."""

import sys
import weakref
from functools import cache
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from mematte import FastMEMatte
from mematte_kernels import dispatch, ext, native, reference
from mematte_kernels.triton import _common as triton_common

sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
import synth  # noqa: E402

needs_triton = pytest.mark.skipif(
    not (triton_common.INTERPRET or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
needs_ext = pytest.mark.skipif(not ext.available("cpu"), reason="the compiled extension is not built")


@cache
def weights():
    return synth.weights("mematte_vit_s", seed=7)


def build(backend, dtype=torch.float32):
    model = FastMEMatte("vit_s", backend=backend, dtype=dtype)
    model.load_state_dict(weights())
    return model


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage allocated under the mode and alive at once: what a
    graph's saved activations add to a forward's peak."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for t in existing:  # weights and inputs are not the forward's allocations
            self._seen[t.untyped_storage()] = True

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                self._seen[storage] = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


def tracked_call(model, batch, patch_decoder=True):
    """``model(batch)`` and the peak bytes its own tensors took."""
    existing = [*model.parameters(), *model.buffers(), *batch.values()]
    with PeakTensorBytes(existing) as tracker:
        outputs = model(batch, patch_decoder=patch_decoder)
    return outputs, tracker.peak


# The README call decodes in tiles; the bf16 reference decodes its 512-px tile canvas too
# slowly on a CPU, so it decodes the whole (small) image instead.
BACKEND_CASES = [
    pytest.param("reference", torch.float32, (96, 128), True, id="reference-fp32"),
    pytest.param("reference", torch.bfloat16, (96, 128), False, id="reference-bf16"),
    pytest.param("cpu", torch.float32, (96, 128), True, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, (96, 128), True, id="cpu-bf16"),
    pytest.param("triton", torch.float32, (64, 96), True, marks=needs_triton, id="triton-fp32"),
    pytest.param("triton", torch.bfloat16, (64, 96), True, marks=needs_triton, id="triton-bf16"),
]


@pytest.mark.parametrize("backend, dtype, size, patch_decoder", BACKEND_CASES)
def test_eval_call_without_no_grad_builds_no_graph(backend, dtype, size, patch_decoder):
    """The upstream-style call as written, with grad mode on: it runs, its outputs carry no
    graph yet are ordinary tensors (usable in later autograd, unlike inference tensors), and
    its peak memory is the no_grad run's."""
    model = build(backend, dtype)
    image, trimap = synth.inputs(*size, seed=5)
    batch = {"image": image, "trimap": trimap}
    assert torch.is_grad_enabled()
    with torch.no_grad():  # fills what the model keeps between calls (the resized position embedding)
        model(batch, patch_decoder=patch_decoder)
    (outputs, scores, decisions), peak = tracked_call(model, batch, patch_decoder)
    with torch.no_grad():
        (expected, _, expected_decisions), no_grad_peak = tracked_call(model, batch, patch_decoder)
    alpha = outputs["phas"]
    assert not alpha.requires_grad and alpha.grad_fn is None and not alpha.is_inference()
    assert all(not s.requires_grad for s in scores)
    assert torch.equal(alpha, expected["phas"])
    assert all(torch.equal(a, b) for a, b in zip(decisions, expected_decisions))
    assert sum(int(d.sum()) for d in decisions) > 0  # the routed attention ran
    assert peak == no_grad_peak and peak > 0

    weight = torch.ones((), requires_grad=True)
    (alpha * weight).sum().backward()
    assert weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_eval_call_on_the_gpu_peaks_as_under_no_grad(dtype):
    model = build("cuda", dtype).cuda()
    image, trimap = (t.cuda() for t in synth.inputs(1024, 1280, seed=5))
    peaks = []
    for grad_mode in (True, False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.set_grad_enabled(grad_mode):
            outputs = model({"image": image, "trimap": trimap})
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        assert not outputs[0]["phas"].requires_grad
        del outputs
    assert peaks[0] == peaks[1]


def test_vitmatte_eval_call_without_no_grad_builds_no_graph():
    from mematte.vitmatte import FastViTMatte

    model = FastViTMatte("vit_s", backend="cpu")
    model.load_state_dict(synth.weights("vitmatte_vit_s", seed=7))
    image, trimap = synth.inputs(64, 96, seed=5)
    batch = {"image": image, "trimap": trimap}
    existing = [*model.parameters(), *model.buffers(), image, trimap]
    with torch.no_grad():  # fills what the model keeps between calls (the resized position embedding)
        model(batch)
    with PeakTensorBytes(existing) as tracker:
        alpha = model(batch)["phas"]
    with torch.no_grad(), PeakTensorBytes(existing) as no_grad_tracker:
        expected = model(batch)["phas"]
    assert not alpha.requires_grad and torch.equal(alpha, expected)
    assert tracker.peak == no_grad_tracker.peak


def test_peak_tensor_bytes_sees_a_graph():
    """The tracker above measures what a graph keeps alive (so its equality means something)."""
    model = build("reference")
    model.train()
    image, trimap = synth.inputs(96, 128, seed=5)
    x = model.preprocess(image, trimap)
    ops = dispatch.resolve("reference", "cpu", training=True)

    def run():
        features = model.backbone.patch_embed(x, ops)
        for block in model.backbone.blocks[:2]:
            features = block(features, ops)
        return features

    with PeakTensorBytes([*model.parameters(), x]) as with_graph:
        run()
    with torch.no_grad(), PeakTensorBytes([*model.parameters(), x]) as without_graph:
        run()
    assert with_graph.peak > 2 * without_graph.peak


# ------------------------------------------------------------------ training tables


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto", pytest.param("triton", marks=needs_triton)])
def test_training_table_holds_only_ops_with_a_backward(backend):
    table = dispatch.resolve(backend, "cpu", training=True)
    for field in dispatch.fields(dispatch.OpTable):
        if field.name == "name":
            continue
        op = getattr(table, field.name)
        assert dispatch.has_backward(op, "cpu"), f"{field.name}: {op} has no backward"
    assert "training" in table.name


def test_training_table_keeps_differentiable_fast_ops_and_swaps_the_rest():
    inference, training = dispatch.resolve("cpu", "cpu"), dispatch.resolve("cpu", "cpu", training=True)
    assert training.router_scores is native.router_scores
    assert inference.window_attention is not reference.window_attention
    assert training.window_attention is reference.window_attention
    if ext.available("cpu"):
        expected = ext.dwconv_gelu if ext.has_kernel("dwconv_gelu_backward", "cpu") else reference.dwconv_gelu
        assert training.dwconv_gelu is expected
    assert dispatch.resolve("cpu", "cpu") == inference  # inference tables are unchanged


def _router_args():
    g = torch.Generator().manual_seed(0)
    C = 64
    shapes = [
        (2, 37, C),
        (C,),
        (C,),
        (C, C),
        (C,),
        (C // 2, C),
        (C // 2,),
        (C // 4, C // 2),
        (C // 4,),
        (2, C // 4),
        (2,),
    ]
    return [torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 1) for s in shapes]


DIFFERENTIABLE_CASES = [
    pytest.param(native.router_scores, reference.router_scores, _router_args, id="router_scores"),
]


@pytest.mark.parametrize("fast, ref, make_args", DIFFERENTIABLE_CASES)
def test_fast_ops_kept_for_training_give_the_reference_gradients(fast, ref, make_args):
    """The fast ops a training table keeps: gradients of every input as the reference's."""
    assert fast in dispatch.DIFFERENTIABLE
    torch.manual_seed(0)
    inputs, grads = make_args(), []
    for op in (fast, ref):
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in inputs]
        out = op(*args)
        out = out[0] if isinstance(out, tuple) else out
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append([a.grad for a in args if isinstance(a, torch.Tensor)])
    for got, expected in zip(*grads):
        assert got is not None
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ refusals by name


def _window_args(requires_grad):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 14, 14, 3 * 128, generator=g, requires_grad=requires_grad)
    rel = torch.randn(14, 14, 64, generator=g) * 0.02
    return qkv, torch.zeros(3 * 128), rel, rel.clone(), 2, 0.125, 14


@pytest.mark.parametrize(
    "name, call",
    [
        pytest.param(
            "mematte_kernels.native.window_attention",
            lambda: native.window_attention(*_window_args(True)),
            id="native-window-attention",
        ),
        pytest.param(
            "mematte_kernels.native.linear",
            lambda: native.linear(torch.randn(4, 8), torch.randn(16, 8, requires_grad=True), torch.randn(16)),
            marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN"),
            id="native-linear",
        ),
        pytest.param(
            "mematte_kernels.native.linear_gelu",
            lambda: native.linear_gelu(torch.randn(4, 8, requires_grad=True), torch.randn(16, 8), torch.randn(16)),
            marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN"),
            id="native-linear-gelu",
        ),
        pytest.param(
            "mematte_kernels.native.upsample_conv_relu_",
            lambda: native.upsample_conv_relu_(
                torch.zeros(1, 16, 8, 8), torch.randn(1, 4, 4, 4, requires_grad=True), torch.randn(16, 4, 3, 3)
            ),
            id="native-upsample-conv-relu",
        ),
    ],
)
def test_inference_only_native_ops_refuse_grad_by_name(name, call):
    with pytest.raises(RuntimeError, match=f"{name} has no backward"):
        call()


def test_refusal_is_only_where_a_gradient_is_needed():
    args = _window_args(True)
    with torch.no_grad():
        out = native.window_attention(*args)
    torch.testing.assert_close(out, reference.window_attention(*args).detach(), rtol=1e-5, atol=1e-5)
    native.window_attention(*_window_args(False))  # nothing requires grad: no refusal


@needs_triton
def test_triton_op_without_backward_fails_by_name_not_silently():
    from mematte_kernels import triton as triton_ops

    x = torch.randn(5, 32, requires_grad=True)
    index = torch.tensor([0, 2, 4])
    out = triton_ops.gather_layernorm(x, index, torch.ones(32), torch.zeros(32), 1e-6)
    with pytest.raises(RuntimeError, match=r"backward through mematte\.gather_layernorm"):
        out.sum().backward()
