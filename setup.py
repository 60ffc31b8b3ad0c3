"""Builds ``mematte_kernels._C``: the compiled ops (``torch.ops.mematte_ext``) for CPU, plus
the LTRM ops' CUDA kernels when torch has CUDA and nvcc is found. Package metadata lives in
pyproject.toml.

Environment:
  MEMATTE_NO_CUDA=1       build the CPU ops only.
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (else /usr/local/cuda, else nvcc on PATH).
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0": A100 and H100).
  MAX_JOBS                parallel compile jobs (with ninja).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

CSRC = Path("csrc")
CPU_SOURCES = ["ops.cpp", "dwconv_gelu_cpu.cpp", "eca_cpu.cpp", "upsample_taps_cpu.cpp", "attention_cpu.cpp"]
CUDA_SOURCES = ["dwconv_gelu.cu", "eca.cu"]


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with, or None. Decided here because torch's own guess
    (made when cpp_extension is imported) falls back to /usr/local on machines without a GPU."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def cuda_skip_reason(torch_cuda: str | None, cuda_home: str | None) -> str | None:
    if os.environ.get("MEMATTE_NO_CUDA") == "1":
        return "MEMATTE_NO_CUDA=1"
    if torch_cuda is None:
        return "torch was built without CUDA"
    if cuda_home is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def extensions() -> tuple[list, dict]:
    import torch

    cuda_home = find_cuda_home()
    skip_reason = cuda_skip_reason(torch.version.cuda, cuda_home)
    if skip_reason is None:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    # -O3 vectorises the channel loops; the ISA-specific versions come from target_clones in
    # the sources, so no -march flag ties the wheel to the build machine.
    cxx_flags = ["-O3", "-fopenmp"]
    if skip_reason is None:
        print(f"mematte_kernels._C: building CPU ops and CUDA ops "
              f"(arch {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA in {cuda_home})")
        extension = CUDAExtension(
            "mematte_kernels._C",
            sources=[str(CSRC / s) for s in CPU_SOURCES + CUDA_SOURCES],
            define_macros=[("MEMATTE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"mematte_kernels._C: building CPU ops only (no CUDA ops: {skip_reason})")
        # Recorded so that tests can tell a deliberate CPU-only build from a broken one.
        opted_out = [("MEMATTE_CUDA_OPTED_OUT", None)] if os.environ.get("MEMATTE_NO_CUDA") == "1" else []
        extension = CppExtension(
            "mematte_kernels._C",
            sources=[str(CSRC / s) for s in CPU_SOURCES],
            define_macros=opted_out,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = BuildExtension.with_options(use_ninja=is_ninja_available())
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
