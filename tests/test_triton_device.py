"""Every Triton launch runs under its inputs' device.

Triton launches on the current CUDA device, whatever device the pointers are on: a call with
tensors on ``cuda:1`` while ``cuda:0`` is current runs on the wrong GPU. The wrappers make the
inputs' device current first (``_common.on_input_device``). On the CPU this is checked by
recording, for every kernel launch, whether it happened inside that guard and for which
device; with two GPUs, by running every op on the second one.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import pytest
import torch

import mematte_kernels.triton as triton_ops
from mematte_kernels.triton import _common

from kernel_calls import triton_op_calls


def package_kernels() -> set[str]:
    """The names of every Triton kernel defined in mematte_kernels.triton's modules."""
    kernels = set()
    for module_info in pkgutil.iter_modules(triton_ops.__path__):
        module = importlib.import_module(f"{triton_ops.__name__}.{module_info.name}")
        for name in vars(module):
            if name.startswith("_") and name.endswith("_kernel"):
                kernels.add(name)
    return kernels


def _kernel_name(launcher) -> str:
    fn = launcher
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
        fn = fn.fn
    return fn.__name__


def test_every_launch_runs_under_the_inputs_device(monkeypatch):
    """A launch outside the guard, or under another device than its inputs', fails."""
    from triton.runtime import interpreter, jit

    guarded: list[torch.device] = []
    launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def recording_context(device):
        guarded.append(device)
        try:
            yield
        finally:
            guarded.pop()

    def recording_run(original):
        def run(self, *args, **kwargs):
            launches.append((_kernel_name(self), guarded[-1] if guarded else None))
            return original(self, *args, **kwargs)

        return run

    monkeypatch.setattr(_common, "_device_context", recording_context, raising=False)
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        monkeypatch.setattr(cls, "run", recording_run(cls.run))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, call in triton_op_calls(device):
        launches.clear()
        call()
        assert launches, f"{name} launched no kernel"
        outside = [kernel for kernel, launch_device in launches if launch_device != device]
        assert not outside, f"{name}: {outside} launched outside its inputs' device guard"


def test_every_kernel_is_covered():
    """Each kernel of the package is launched by one of the calls above, so a new kernel
    cannot skip the guard unnoticed: add its op to :func:`kernel_calls.triton_op_calls`."""
    from triton.runtime import interpreter, jit

    launched = set()
    originals = {cls: cls.run for cls in (interpreter.InterpretedFunction, jit.JITFunction)}

    def recorder(original):
        def run(self, *args, **kwargs):
            launched.add(_kernel_name(self))
            return original(self, *args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as patch:
        for cls, original in originals.items():
            patch.setattr(cls, "run", recorder(original))
        for _, call in triton_op_calls(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
            call()
    assert package_kernels() <= launched, f"kernels no call launches: {sorted(package_kernels() - launched)}"


def test_guard_makes_the_inputs_cuda_device_current(monkeypatch):
    """What the guard enters for CUDA inputs, without a GPU: torch.cuda.device(that device)."""
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    cuda1 = torch.device("cuda", 1)
    with _common._device_context(cuda1):
        pass
    assert entered == [cuda1]
    assert isinstance(_common._device_context(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_on_the_second_gpu_match_the_first():
    """With cuda:0 current, every op on cuda:1 tensors computes what it does on cuda:0."""
    torch.cuda.set_device(0)
    first = [call() for _, call in triton_op_calls(torch.device("cuda", 0))]
    second = [call() for _, call in triton_op_calls(torch.device("cuda", 1))]
    torch.cuda.synchronize(1)
    for (name, _), a, b in zip(triton_op_calls(torch.device("cuda", 0)), first, second):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert y.device == torch.device("cuda", 1), name
            assert torch.equal(x, y.to(x.device)), f"{name} differs on cuda:1"


def _attention_launches(out):
    """Each attention op's launch into ``out``, on fp32 inputs of the right shape."""
    from mematte_kernels.triton.policy_attention import launch_forward
    from mematte_kernels.triton.relpos_attention import launch_relpos_attention
    from mematte_kernels.triton.varlen_attention import launch_varlen_attention

    q4 = torch.zeros(1, 6, 2, 64)
    q3 = torch.zeros(6, 2, 64)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    bias_h, bias_w = torch.zeros(1, 6, 2, 2), torch.zeros(1, 6, 2, 3)
    return {
        "varlen_attention": lambda: launch_varlen_attention(q3, q3, q3, cu, 6, out=out(q3)),
        "relpos_attention": lambda: launch_relpos_attention(q4, q4, q4, bias_h, bias_w, out=out(q4)),
        "policy_attention": lambda: launch_forward(
            q4,
            q4,
            q4,
            torch.ones(1, 6),
            None,
            1e-6,
            out=out(q4),
            out_fp32=None,
            row_max=None,
            row_argmax=None,
            denom=None,
        ),
    }


@pytest.mark.parametrize("op", ["varlen_attention", "relpos_attention", "policy_attention"])
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda q: torch.zeros_like(q, dtype=torch.float16), id="dtype"),
        pytest.param(lambda q: torch.zeros_like(q)[:-1], id="shape"),
        pytest.param(lambda q: torch.zeros(*q.shape[:-1], 2 * q.shape[-1])[..., ::2], id="head-dim-strided"),
    ],
)
def test_attention_launches_name_an_out_that_cannot_take_the_result(op, bad):
    with pytest.raises(ValueError, match=f"{op}: out must be a torch.float32 tensor of shape"):
        _attention_launches(bad)[op]()
