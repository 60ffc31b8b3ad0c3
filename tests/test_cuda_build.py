"""Which GPUs the extension is built for, and what a launch on another one reports.

A build without code for the GPU it runs on registers its CUDA ops (so they look available)
and fails at the first launch with "no kernel image is available for execution on the
device". The default architecture list has code for Turing (the paper's 2080 Ti), the A100,
consumer Ampere and the H100, and carries PTX, so GPUs newer than the H100 compile it when
the module loads; the local GPUs' own architectures are added when there are any.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from mematte_kernels import ext

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("mematte_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


@pytest.mark.parametrize(
    "requested, local, expected",
    [
        pytest.param(None, [], "7.5;8.0;8.6;9.0+PTX", id="no-gpu"),
        pytest.param(None, ["9.0"], "7.5;8.0;8.6;9.0+PTX", id="h100"),
        pytest.param(None, ["7.5"], "7.5;8.0;8.6;9.0+PTX", id="rtx2080ti"),
        pytest.param(None, ["8.9"], "7.5;8.0;8.6;8.9;9.0+PTX", id="rtx4090"),
        pytest.param(None, ["12.0"], "7.5;8.0;8.6;9.0+PTX;12.0", id="rtx5090"),
        pytest.param(None, ["10.0", "8.0"], "7.5;8.0;8.6;9.0+PTX;10.0", id="b200-and-a100"),
        pytest.param("", ["12.0"], "7.5;8.0;8.6;9.0+PTX;12.0", id="empty-variable"),
        pytest.param("8.9", ["12.0"], "8.9", id="variable-wins"),
    ],
)
def test_arch_list(setup_module, requested, local, expected):
    assert setup_module.cuda_arch_list(requested, local) == expected


def test_default_arch_list_carries_ptx(setup_module):
    """Without PTX, sm_100 and sm_120 GPUs have no code to run."""
    assert "+PTX" in setup_module.cuda_arch_list(None, [])


def _launch_failure(*args):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


@pytest.mark.skipif(ext._C is None, reason="the compiled extension is not built")
@pytest.mark.parametrize("op", ["dwconv_gelu", "eca"])
def test_launch_failure_names_the_gpu_and_the_build(monkeypatch, op):
    monkeypatch.setattr(torch.ops.mematte_ext, op, _launch_failure)
    monkeypatch.setattr(ext, "_C", types.SimpleNamespace(cuda_arch_list="8.0;9.0+PTX"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # what the wrapper reads
    with pytest.raises(RuntimeError) as caught:
        getattr(ext, op)(on_gpu, None, None)
    message = str(caught.value)
    assert f"mematte_ext::{op} failed on NVIDIA GeForce RTX 5090 (compute capability 12.0)" in message
    assert "TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'" in message and "TORCH_CUDA_ARCH_LIST='12.0'" in message
    assert "no kernel image" in message


@pytest.mark.skipif(ext._C is None, reason="the compiled extension is not built")
def test_other_errors_pass_through(monkeypatch):
    def bad_input(*args):
        raise RuntimeError("dwconv_gelu: x must be contiguous")

    monkeypatch.setattr(torch.ops.mematte_ext, "dwconv_gelu", bad_input)
    for device in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match=r"^dwconv_gelu: x must be contiguous$"):
            ext.dwconv_gelu(types.SimpleNamespace(device=torch.device(device)), None, None)


@pytest.mark.skipif(ext._C is None, reason="the compiled extension is not built")
def test_extension_records_its_arch_list():
    assert isinstance(ext.cuda_arch_list(), str)
    assert bool(ext.cuda_arch_list()) == bool(ext._C.cuda_compiled)


@pytest.mark.gpu
def test_build_covers_the_local_gpu(setup_module):
    """On a GPU machine the extension (built there) has code for that GPU."""
    if not ext.available("cuda"):
        pytest.skip("the extension has no CUDA code")
    local = "%d.%d" % torch.cuda.get_device_capability()
    built = [arch.removesuffix("+PTX") for arch in ext.cuda_arch_list().split(";")]
    assert local in built, (local, ext.cuda_arch_list())
    assert setup_module.local_cuda_archs() == sorted(
        {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    )


@pytest.mark.parametrize(
    "built, reason",
    [
        pytest.param(None, "mematte_kernels._C is not built", id="no-extension"),
        pytest.param(
            types.SimpleNamespace(cuda_compiled=False, cuda_opted_out=True), "MEMATTE_NO_CUDA=1", id="opted-out"
        ),
        pytest.param(types.SimpleNamespace(cuda_compiled=False, cuda_opted_out=False), "nvcc not found", id="no-nvcc"),
    ],
)
def test_auto_on_a_gpu_without_cuda_ltrm_ops_warns(monkeypatch, caplog, built, reason):
    """'auto' on a GPU falls back to the reference LTRM ops when the extension has no CUDA
    code: a WARNING says so and why, once."""
    from mematte_kernels import dispatch

    monkeypatch.setattr(ext, "_C", built)
    monkeypatch.setattr(ext, "available", lambda device: False)
    monkeypatch.setattr(ext, "has_kernel", lambda op, device: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level("WARNING", logger="mematte_kernels"):
        table = dispatch._build("auto", torch.device("cuda"))
        dispatch._build("auto", torch.device("cuda"))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "LTRM ops (dwconv_gelu, eca) as PyTorch reference code on the GPU" in warnings[0].getMessage()
    assert reason in warnings[0].getMessage()
    assert table.dwconv_gelu is dispatch.reference.dwconv_gelu


def test_cpu_fallback_does_not_warn(monkeypatch, caplog):
    from mematte_kernels import dispatch

    monkeypatch.setattr(ext, "available", lambda device: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level("WARNING", logger="mematte_kernels"):
        dispatch._build("auto", torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


TURING_SHARED_MEMORY = 64 * 1024  # bytes per block on sm_75 (the 2080 Ti)


@pytest.mark.parametrize("source", sorted(path.name for path in (SETUP_PY.parent / "csrc").glob("*.cu")))
def test_cuda_sources_compile_for_turing(setup_module, tmp_path, source):
    """The default arch list builds sm_75 code: every kernel of the LTRM ops compiles for
    the 2080 Ti (bf16 too, which Turing converts in software), without register spills and
    within its shared memory. Device code only (--cubin), so no host compiler pass."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    cuda_home = setup_module.find_cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found")
    command = [
        f"{cuda_home}/bin/nvcc", "--cubin", "-arch=sm_75", "-std=c++20", "-O3", "-Xptxas", "-v",
        str(SETUP_PY.parent / "csrc" / source), "-o", str(tmp_path / "out.cubin"),
        *COMMON_NVCC_FLAGS, "-DMEMATTE_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(f"-I{path}" for path in [*include_paths("cuda"), sysconfig.get_paths()["include"], SETUP_PY.parent / "csrc"]),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = result.stdout + result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_75'", report)
    assert kernels, report[-2000:]
    assert not re.findall(r"[1-9]\d* bytes spill (?:stores|loads)", report)
    assert all(int(n) <= TURING_SHARED_MEMORY for n in re.findall(r"(\d+) bytes smem", report))
