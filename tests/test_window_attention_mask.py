"""The window attention's position bias as SDPA receives it: allocated once per call with
rows aligned for the GPU's memory-efficient kernel, which otherwise pads a copy of the
196-wide bias of every chunk of windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mematte_kernels import native, reference

from triton_tolerance import assert_close


def window_inputs(windows: int, heads: int = 2, size: int = 14, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(windows, heads, size * size, 64, generator=generator) for _ in range(3))
    rel_h, rel_w = (torch.randn(size, size, 64, generator=generator) * 0.1 for _ in range(2))
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("windows", [pytest.param(1, id="one-chunk"), pytest.param(5, id="three-chunks")])
def test_bias_rows_aligned_and_allocated_once(monkeypatch, windows):
    monkeypatch.setattr(native, "WINDOW_CHUNK", 2)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(native.F, "scaled_dot_product_attention", recording_sdpa)
    q, k, v, rel_h, rel_w = window_inputs(windows)
    out = native.rel_pos_attention(q, k, v, rel_h, rel_w, 0.125)

    assert len(masks) == -(-windows // 2)
    for mask in masks:
        assert mask.shape[-2:] == (196, 196) and mask.stride(-1) == 1
        assert all(stride % native.MASK_ALIGNMENT == 0 for stride in mask.stride()[:-1]), mask.stride()
    assert len({mask.untyped_storage().data_ptr() for mask in masks}) == 1  # one buffer for every chunk
    torch.testing.assert_close(out, reference.rel_pos_attention(q, k, v, rel_h, rel_w, 0.125), rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_window_attention_matches_reference(dtype):
    q, k, v, rel_h, rel_w = (t.cuda() for t in window_inputs(70, heads=6, seed=1))
    low = [t.to(dtype) for t in (q, k, v)]
    out = native.rel_pos_attention(*low, rel_h, rel_w, 0.125)
    expected = reference.rel_pos_attention(*(t.float() for t in low), rel_h, rel_w, 0.125)
    torch_low = None if dtype == torch.float32 else reference.rel_pos_attention(*low, rel_h, rel_w, 0.125)
    assert_close(out, expected, torch_low, atol=1e-4)  # fp32: SDPA may run TF32-free but reordered
