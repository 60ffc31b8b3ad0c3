"""Builds ``mematte_kernels._C``: the compiled ops (``torch.ops.mematte_ext``) for CPU, plus
the LTRM ops' CUDA kernels when torch has CUDA and nvcc is found. Package metadata lives in
pyproject.toml.

Environment:
  MEMATTE_NO_CUDA=1       build the CPU ops only.
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (else /usr/local/cuda, else nvcc on PATH).
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "7.5;8.0;8.6;9.0+PTX": code for Turing
                          (2080 Ti), A100, Ampere consumer cards (3090; the 4090 runs it too)
                          and H100, PTX that newer GPUs compile at load, and code for the
                          local GPUs).
  MAX_JOBS                parallel compile jobs (with ninja).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

CSRC = Path("csrc")
CPU_SOURCES = [
    "ops.cpp",
    "dwconv_gelu_cpu.cpp",
    "eca_cpu.cpp",
    "upsample_taps_cpu.cpp",
    "attention_cpu.cpp",
    "global_attention_cpu.cpp",
]
CUDA_SOURCES = ["dwconv_gelu.cu", "eca.cu"]
# Turing (2080 Ti), A100, consumer Ampere (3090; Ada's sm_89 runs sm_86 code), H100.
DEFAULT_CUDA_ARCHS = ("7.5", "8.0", "8.6", "9.0")


def _arch_key(arch: str) -> tuple[int, ...]:
    return tuple(int(part) for part in arch.removesuffix("+PTX").split("."))


def cuda_arch_list(requested: str | None, local_archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for the build: ``requested`` (the variable) as given, else code for
    Turing, the A100, consumer Ampere and the H100, with the H100's PTX, which GPUs after it
    (sm_100, sm_120) compile when the module loads, plus code for each local GPU
    (``local_archs``, e.g. ["12.0"])."""
    if requested and requested.strip():
        return requested.strip()
    archs = sorted(set(DEFAULT_CUDA_ARCHS) | set(local_archs), key=_arch_key)
    ptx = DEFAULT_CUDA_ARCHS[-1]
    return ";".join(f"{arch}+PTX" if arch == ptx else arch for arch in archs)


def local_cuda_archs() -> list[str]:
    """Compute capabilities of the GPUs on this machine, e.g. ["9.0"]; none without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


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
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), local_cuda_archs())

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    # -O3 vectorises the channel loops; the ISA-specific versions come from target_clones in
    # the sources, so no -march flag ties the wheel to the build machine.
    cxx_flags = ["-O3", "-fopenmp"]
    if skip_reason is None:
        print(
            f"mematte_kernels._C: building CPU ops and CUDA ops "
            f"(arch {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA in {cuda_home})"
        )
        extension = CUDAExtension(
            "mematte_kernels._C",
            sources=[str(CSRC / s) for s in CPU_SOURCES + CUDA_SOURCES],
            # Recorded so that a failed launch can say which GPUs the code was built for.
            define_macros=[
                ("MEMATTE_WITH_CUDA", None),
                ("MEMATTE_CUDA_ARCH_LIST", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'),
            ],
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


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
