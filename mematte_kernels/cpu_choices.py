"""The CPU ops with more than one implementation: their candidates, in the order tried, and a
small representative input each is timed on (shapes of ViT-S, whose costs scale like the
real calls'). The ``cpu`` backend's table holds these as :class:`~.selection.SelectedOp`.

Candidate names, as ``MEMATTE_CPU_KERNELS`` takes them:
  ``own``        the extension's AVX512-BF16 kernel (bf16, CPUs with the instruction)
  ``own_avx2``   the extension's AVX2 + FMA kernel, computed in fp32 (every dtype)
  ``fused``      the extension's AVX512-BF16 upsample-conv kernel (same)
  ``sdpa``       torch's fused attention (flash attention on CPU)
  ``sdpa_fp32``  the same on bf16/fp16 tensors computed in fp32
  ``onednn``     one oneDNN call with the epilogue fused (dtypes oneDNN runs here)
  ``gemm``       a 1×1 conv onto the nine taps at low resolution, then the compiled epilogue
  ``torch``      torch's own op in the tensors' dtype
  ``fp32``       bf16/fp16 tensors computed in fp32 (:mod:`.native`'s ``*_fp32``)
"""

from __future__ import annotations

import functools

import torch

from . import ext, native, reference
from .selection import Candidate, SelectedOp

LOW_PRECISION = (torch.bfloat16, torch.float16)
# ViT-S: 384 channels, 6 heads of 64; 14×14 windows.
DIM, HEADS, HEAD_DIM, WINDOW = 384, 6, 64, 14


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def _onednn(dtype: torch.dtype) -> bool:
    return torch.backends.mkldnn.is_available() and native.onednn_runs(dtype)


def _own_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and ext.cpu_bf16_kernels()


def _own_relpos(dtype: torch.dtype) -> bool:
    return _own_bf16(dtype) and ext.has_kernel("relpos_attention", "cpu")


def _own_avx2(dtype: torch.dtype) -> bool:
    return ext.cpu_avx2_kernels()


def _taps(dtype: torch.dtype) -> bool:
    return ext.has_kernel("upsample_taps_relu_", "cpu")


def _taps_low_precision(dtype: torch.dtype) -> bool:
    return _taps(dtype) and _low_precision(dtype)


def _randn(*shape, dtype, scale=1.0, channels_last=False):
    generator = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=generator) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _linear_probe(out_features: int):
    def probe(dtype):
        return (_randn(1024, DIM, dtype=dtype), _randn(out_features, DIM, dtype=dtype, scale=DIM**-0.5),
                _randn(out_features, dtype=dtype, scale=0.02))  # fmt: skip

    return probe


def _conv_probe(dtype):
    # A ResBottleneck-like 3x3 conv; the decoder's are the same GEMM shape with fewer channels.
    return (_randn(1, 64, 48, 48, dtype=dtype, channels_last=True),
            _randn(64, 64, 3, 3, dtype=dtype, scale=(64 * 9) ** -0.5, channels_last=True), None, 1, 1)  # fmt: skip


def _router_probe(dtype):
    weights = [(DIM, DIM), (DIM // 2, DIM), (DIM // 4, DIM // 2), (2, DIM // 4)]
    params = [torch.ones(DIM), torch.zeros(DIM)]
    for out_features, in_features in weights:
        params += [_randn(out_features, in_features, dtype=torch.float32, scale=in_features**-0.5),
                   torch.zeros(out_features)]  # fmt: skip
    return (_randn(1, 1024, DIM, dtype=dtype), *params, 1e-5)


def _patch_probe(dtype):
    return (_randn(1, 4, 256, 256, dtype=dtype), _randn(DIM, 4, 16, 16, dtype=dtype, scale=1024**-0.5),
            _randn(DIM, dtype=dtype, scale=0.02))  # fmt: skip


def _varlen_probe(dtype):
    q, k, v = (_randn(1024, HEADS, HEAD_DIM, dtype=dtype) for _ in range(3))
    return q, k, v, torch.tensor([0, 600, 1024], dtype=torch.int32), 600, HEAD_DIM**-0.5


def _window_probe(dtype):
    side = 2 * WINDOW
    rel = _randn(WINDOW, WINDOW, HEAD_DIM, dtype=dtype, scale=0.02)  # gathered (q, k, d) tables
    return (_randn(1, side, side, 3 * DIM, dtype=dtype), _randn(3 * DIM, dtype=dtype, scale=0.02),
            rel, rel, HEADS, HEAD_DIM**-0.5, WINDOW)  # fmt: skip


def _global_probe(dtype):
    # A 640² image's grid: at 32×32 one SDPA strip covers the grid and hides the per-strip
    # bias that dominates from 1024² on (measured on an AVX2 EPYC: SDPA 1.1× the flash kernel
    # at 32×32, 1.8× at 40×40, 2.0× at 64×64).
    side = 40
    rel = _randn(side, side, HEAD_DIM, dtype=dtype, scale=0.02)
    return _randn(1, side, side, 3 * DIM, dtype=dtype), rel, rel, HEADS, HEAD_DIM**-0.5


def _upsample_probe(dtype):
    return (_randn(1, 32, 64, 64, dtype=dtype, channels_last=True), _randn(1, 64, 32, 32, dtype=dtype, channels_last=True),
            _randn(32, 64, 3, 3, dtype=dtype, scale=(64 * 9) ** -0.5))  # fmt: skip


@functools.cache
def selected() -> dict[str, SelectedOp]:
    """{op table field: SelectedOp} for CPU tensors; one set per process, so each choice is
    made once."""
    ops = {
        "router_scores": SelectedOp("router_scores", [
            Candidate("torch", native.router_scores),
            Candidate("fp32", native.router_scores_fp32, _low_precision),
        ], _router_probe, trainable=native.router_scores),
        "patch_embed": SelectedOp("patch_embed", [
            Candidate("torch", reference.patch_embed),
            Candidate("fp32", native.patch_embed_fp32, _low_precision),
        ], _patch_probe, trainable=reference.patch_embed),
        "linear": SelectedOp("linear", [
            Candidate("onednn", native.linear, _onednn),
            Candidate("torch", reference.linear),
            Candidate("fp32", native.linear_fp32, _low_precision),
        ], _linear_probe(3 * DIM)),
        "linear_gelu": SelectedOp("linear_gelu", [
            Candidate("onednn", native.linear_gelu, _onednn),
            Candidate("torch", reference.linear_gelu),
            Candidate("fp32", native.linear_gelu_fp32, _low_precision),
        ], _linear_probe(4 * DIM)),
        "conv2d": SelectedOp("conv2d", [
            Candidate("torch", reference.conv2d),
            Candidate("fp32", native.conv2d_fp32, _low_precision),
        ], _conv_probe, trainable=reference.conv2d),
        "varlen_attention": SelectedOp("varlen_attention", [
            Candidate("own", native.varlen_attention_bf16, _own_bf16),
            Candidate("sdpa", native.varlen_attention),
            Candidate("sdpa_fp32", native.varlen_attention_fp32, _low_precision),
        ], _varlen_probe, trainable=native.varlen_attention),
        "window_attention": SelectedOp("window_attention", [
            Candidate("own", native.window_attention_bf16, _own_bf16),
            Candidate("sdpa", native.window_attention),
            Candidate("sdpa_fp32", native.window_attention_fp32, _low_precision),
        ], _window_probe),
        "global_attention": SelectedOp("global_attention", [
            Candidate("own", native.global_attention_bf16, _own_relpos),
            Candidate("own_avx2", native.global_attention_avx2, _own_avx2),
            Candidate("sdpa", native.global_attention),
            Candidate("sdpa_fp32", native.global_attention_fp32, _low_precision),
        ], _global_probe),
        # Used where the extension has its epilogue (upsample_taps_relu_); see dispatch.
        "upsample_conv_relu_": SelectedOp("upsample_conv_relu_", [
            Candidate("fused", native.upsample_conv_relu_bf16, _own_bf16),
            Candidate("gemm", native.upsample_conv_relu_, _taps),
            Candidate("fp32", native.upsample_conv_relu_fp32, _taps_low_precision),
        ], _upsample_probe),
    }  # fmt: skip
    return ops
