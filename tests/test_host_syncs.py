"""Host syncs of one forward: the GPU must not wait for the host in the routed loop.

A CUDA stream stalls whenever the host needs a value computed on the device. On the CPU the
ops that would do so are counted at the dispatcher (:class:`SyncCounter`); on a GPU, torch's
own sync debug mode counts the real ones.

The budget of one ``FastMEMatte`` forward is :data:`FORWARD_SYNC_BUDGET`: everything the
forward does, input checks included. The routed blocks take one each (the per-image token
counts, which size the packed buffers), so 4 of the 6 are theirs; the model's input checks
share what is left, and must fold all their value checks into one sync.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mematte import FastMEMatte
from mematte_kernels import reference
from mematte_kernels.triton import _common as triton_common

sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
import synth  # noqa: E402

FORWARD_SYNC_BUDGET = 6
ROUTED_BLOCKS = 4

aten = torch.ops.aten
# Ops that return host values computed from device data, or whose output shape depends on
# device data: each one waits for the stream.
SYNCING_OPS = {
    aten.nonzero,
    aten.item,
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
}
# Ops that sync when indexed with a boolean mask (it is turned into indices on the host).
MASK_INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

needs_triton = pytest.mark.skipif(
    not (triton_common.INTERPRET or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Counts, while active, the calls that would synchronise a CUDA stream: the ops in
    :data:`SYNCING_OPS`, boolean-mask indexing and ``repeat_interleave`` without an output
    size at the dispatcher, and ``Tensor.tolist`` (which bypasses it). Copies to the host
    (``.cpu()``, ``.numpy()``) are not seen: on the CPU they look like any other copy."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING_OPS:
            self.calls[str(packet)] += 1
        elif packet in MASK_INDEXING_OPS and _has_bool_index(args):
            self.calls[f"{packet} (boolean mask)"] += 1
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.calls[f"{packet} (no output_size)"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        calls = self.calls

        def tolist(tensor):
            calls["Tensor.tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.nonzero()
        float(x.sum())
        x[x > 2]
        x[x > 4] = 0
        x.masked_select(x > 1)
        x.tolist()
        x.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]))
        x[torch.tensor([0, 2])]  # integer indexing does not sync
    assert counter.total == 7, counter.calls


def test_cap_tokens_never_syncs():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, 2, generator=generator).log_softmax(-1)
    keep = scores[..., 0] > scores[..., 1]
    with SyncCounter() as counter:
        capped = reference.cap_tokens(keep, scores, 10)
    assert counter.total == 0, counter.calls
    assert (capped.sum(1) == keep.sum(1).clamp(max=10)).all()


def test_token_index_syncs_once():
    keep = torch.rand(3, 50, generator=torch.Generator().manual_seed(1)) < 0.3
    with SyncCounter() as counter:
        index, cu_seqlens, max_seqlen = reference.token_index(keep)
    assert counter.total == 1, counter.calls
    assert torch.equal(index, keep.flatten().nonzero().flatten())
    assert cu_seqlens.tolist() == [0, *keep.sum(1).cumsum(0).tolist()]
    assert max_seqlen == int(keep.sum(1).max())


def model(max_tokens, backend="triton"):
    m = FastMEMatte("vit_s", backend=backend, max_tokens=max_tokens)
    m.load_state_dict(synth.weights("mematte_vit_s", seed=7))
    return m


@needs_triton
@pytest.mark.parametrize("max_tokens", [pytest.param(None, id="no-cap"), pytest.param(5, id="cap-reached")])
def test_forward_stays_within_the_sync_budget(max_tokens):
    """The GPU path (Triton routed blocks) on the CPU: at most FORWARD_SYNC_BUDGET syncs in
    one forward, input checks included, whether or not the token cap is reached."""
    image, trimap = synth.inputs(64, 96, seed=4)  # 4 x 6 tokens
    m = model(max_tokens)
    with torch.inference_mode(), SyncCounter() as counter:
        _, _, decisions = m({"image": image, "trimap": trimap})
    routed = [int(d.sum()) for d in decisions]
    assert all(r > 0 for r in routed), routed  # every routed block did its bookkeeping
    if max_tokens is not None:
        assert max(routed) == max_tokens, routed
    assert counter.total <= FORWARD_SYNC_BUDGET, f"{counter.total} syncs in one forward: {dict(counter.calls)}"


@pytest.mark.gpu
@pytest.mark.parametrize("max_tokens", [None, 20], ids=["no-cap", "cap-reached"])
def test_gpu_forward_stays_within_the_sync_budget(max_tokens):
    """The real count on a GPU: torch's sync debug mode warns once per synchronising call."""
    image, trimap = (t.cuda() for t in synth.inputs(256, 320, seed=4))
    m = model(max_tokens, backend="auto").cuda()
    with torch.inference_mode():
        m({"image": image, "trimap": trimap})  # compile and autotune outside the count
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m({"image": image, "trimap": trimap})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= FORWARD_SYNC_BUDGET, syncs
