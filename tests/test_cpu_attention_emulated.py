"""The AVX512-BF16 attention kernel's own source (``csrc/attention_cpu.cpp``) compiled against
scalar stand-ins for its intrinsics (``tests/avx512_emulation.h``), so its logic is checked on
CPUs without AVX-512 too: blocking, packing, the online softmax, window padding, and the
whole-grid position terms of ``relpos_attention``.

The stand-ins are checked first on the paths that run on AVX512-BF16 hardware elsewhere in
the suite (varlen and window attention): same 2x rule against a float64 reference.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mematte.backbone import rel_pos_table
from mematte_kernels import reference

REPO = Path(__file__).resolve().parents[1]
HEADER = Path(__file__).with_name("avx512_emulation.h")

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

BINDING = """
#include <torch/extension.h>
#include "ltrm.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("relpos_attention", &mematte::relpos_attention_cpu);
  m.def("window_attention", &mematte::window_attention_cpu);
  m.def("varlen_attention", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu, double scale) {
    return mematte::varlen_attention_cpu(q, k, v, cu, scale, std::nullopt, std::nullopt);
  });
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    # ninja may be installed next to the interpreter (a virtual environment) but not on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("c++", path=path) is None or shutil.which("ninja", path=path) is None:
        pytest.skip("needs a C++ compiler and ninja")
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("avx512_emulated")
    source = (REPO / "csrc" / "attention_cpu.cpp").read_text()
    # The stand-ins replace the intrinsics header, after every system header; the CPU check
    # says yes.
    source = source.replace('#include "cpu_math.h"\n', "")
    source = source.replace('#include "ltrm.h"\n', f'#include "ltrm.h"\n#include "{HEADER}"\n')
    source = re.sub(r'__builtin_cpu_supports\("[a-z0-9]+"\)', "true", source)
    (build / "attention_emulated.cpp").write_text(source)
    (build / "binding.cpp").write_text(BINDING)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = path
    try:
        return load(
            "mematte_attention_emulated", [str(build / "attention_emulated.cpp"), str(build / "binding.cpp")],
            extra_cflags=["-O2", "-std=c++20", "-fopenmp", "-Wno-psabi"], extra_include_paths=[str(REPO / "csrc")],
            build_directory=str(build),
        )  # fmt: skip
    finally:
        os.environ["PATH"] = saved


def within_twice_torch(out, expected, torch_bf16, floor=1e-3):
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed elements"
    error = (out.double() - expected).abs().max().item()
    torch_error = (torch_bf16.double() - expected).abs().max().item()
    assert error <= 2 * torch_error + floor, (error, torch_error)


@pytest.mark.parametrize("lengths", [[7, 0, 65], [1100]], ids=["short", "long"])
def test_stand_ins_run_the_varlen_path_correctly(kernel, lengths):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(sum(lengths), 3, 2, 64, generator=g).bfloat16().unbind(1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = kernel.varlen_attention(q, k, v, cu, 0.125)
    expected = reference.varlen_attention(q.double(), k.double(), v.double(), cu, max(lengths), 0.125)
    within_twice_torch(out, expected, reference.varlen_attention(q, k, v, cu, max(lengths), 0.125))


def test_stand_ins_run_the_window_path_correctly(kernel):
    g = torch.Generator().manual_seed(1)
    heads = 2
    qkv = torch.randn(1, 17, 20, 3 * 64 * heads, generator=g).bfloat16()
    pad = torch.randn(3 * 64 * heads, generator=g).bfloat16()
    rel_h, rel_w = (rel_pos_table(14, 14, torch.randn(27, 64, generator=g) * 0.2).bfloat16() for _ in range(2))
    out = kernel.window_attention(qkv, pad, rel_h, rel_w, heads, 0.125, 14)
    expected = reference.window_attention(qkv.double(), pad.double(), rel_h.double(), rel_w.double(), heads, 0.125, 14)
    within_twice_torch(out, expected, reference.window_attention(qkv, pad, rel_h, rel_w, heads, 0.125, 14))


# (B, H, W, heads): one token, 1×N and N×1, h ≠ w, the long path (> 1024 tokens), two images.
GRIDS = {"1x1": (1, 1, 1, 1), "1x150": (1, 1, 150, 1), "33x1": (1, 33, 1, 2), "B2-5x7": (2, 5, 7, 2),
         "13x11": (1, 13, 11, 1), "34x38": (1, 34, 38, 2), "B2-40x27": (2, 40, 27, 1)}  # fmt: skip


@pytest.mark.parametrize("B, H, W, heads", [pytest.param(*v, id=k) for k, v in GRIDS.items()])
def test_whole_grid_position_terms(kernel, B, H, W, heads):
    g = torch.Generator().manual_seed(H * 100 + W)
    qkv = torch.randn(B, H, W, 3 * heads * 64, generator=g).bfloat16()
    rel_h = rel_pos_table(H, H, torch.randn(63, 64, generator=g) * 0.2).bfloat16()
    rel_w = rel_pos_table(W, W, torch.randn(63, 64, generator=g) * 0.2).bfloat16()
    q, k, v = qkv.view(B, H * W, 3, heads, 64).unbind(2)
    out = kernel.relpos_attention(q, k, v, rel_h.float(), rel_w.float(), 0.125).view(B, H, W, -1)
    expected = reference.global_attention(qkv.double(), rel_h.double(), rel_w.double(), heads, 0.125)
    within_twice_torch(out, expected, reference.global_attention(qkv, rel_h, rel_w, heads, 0.125))
    if H * W > 1:  # the terms matter: without them the output is far off
        unbiased = reference.global_attention(qkv.double(), rel_h.double() * 0, rel_w.double() * 0, heads, 0.125)
        assert (unbiased - expected).abs().max() > 0.1
