"""FastViTMatte's parts: tiles that equal whole-image decoding, the global block's op, and
the model's contract (dtypes, batch, errors)."""

import pytest
import torch

from mematte import FastViTMatte
from mematte.decoder import decode_tiled
from mematte_kernels import dispatch, reference

from decoder_cases import small_random_decoder


def test_tiles_on_the_input_canvas_equal_whole_image_decoding():
    """ViTMatte decodes the whole padded input at once; tiles with 32 px of context over a
    canvas that is the input itself (no padding to 512) give the same alpha everywhere,
    the input's edges included (fp64, so only the arithmetic order could differ)."""
    decoder = small_random_decoder()
    images = torch.randn(1, 4, 288, 416, dtype=torch.float64)
    features = torch.randn(1, 16, 18, 26, dtype=torch.float64)
    with torch.inference_mode():
        whole = decoder(features, images)
        tiled = decode_tiled(decoder, features, images, tile=128, context=32, canvas_multiple=16)
        part = decode_tiled(decoder, features, images, tile=128, context=32, size=(270, 400), canvas_multiple=16)
        canvas_512 = decode_tiled(decoder, features, images, tile=128, context=32)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(part, whole[..., :270, :400], rtol=0, atol=1e-12)
    # MEMatte's canvas (zeros to 512 px before decoding) differs at the input's edge.
    assert (canvas_512[..., :288, :416] - whole).abs().max() > 1e-6


def test_canvas_multiple_must_be_token_aligned():
    decoder = small_random_decoder()
    with pytest.raises(ValueError, match="canvas multiple"):
        decode_tiled(
            decoder,
            torch.zeros(1, 16, 2, 2, dtype=torch.float64),
            torch.zeros(1, 4, 32, 32, dtype=torch.float64),
            canvas_multiple=24,
        )


@pytest.mark.parametrize("grid", [(5, 7), (1, 9), (6, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_global_attention_reference_is_upstreams_formula(grid):
    """The per-query-table form (rel_pos_bias + relpos_attention) and the fused path equal
    upstream's N×N computation, in fp64."""
    H, W = grid
    heads, d = 2, 8
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, H, W, 3 * heads * d, generator=g, dtype=torch.float64)
    rel_h = torch.randn(H, H, d, generator=g, dtype=torch.float64)
    rel_w = torch.randn(W, W, d, generator=g, dtype=torch.float64)
    expected = reference.global_attention(qkv, rel_h, rel_w, heads, 0.3)
    q, k, v = qkv.view(2, H * W, 3, heads, d).unbind(2)
    bias_h, bias_w = reference.rel_pos_bias(q.reshape(2, H, W, heads, d), rel_h, rel_w)
    tables = reference.relpos_attention(q, k, v, bias_h, bias_w, 0.3).reshape(2, H, W, heads * d)
    torch.testing.assert_close(tables, expected, rtol=0, atol=1e-12)
    from mematte_kernels import native

    torch.testing.assert_close(native.global_attention(qkv, rel_h, rel_w, heads, 0.3), expected, rtol=0, atol=1e-12)


def test_every_table_has_a_global_attention():
    for backend in ("reference", "cpu"):
        assert callable(dispatch.resolve(backend, "cpu").global_attention)


def test_batch_equals_separate_images():
    torch.manual_seed(0)
    model = FastViTMatte("vit_s", backend="auto")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, 0.02)
    image, trimap = torch.rand(2, 3, 64, 80), torch.rand(2, 1, 64, 80)
    with torch.inference_mode():
        both = model({"image": image, "trimap": trimap})["phas"]
        one = [model({"image": image[i : i + 1], "trimap": trimap[i : i + 1]})["phas"] for i in range(2)]
    assert both.shape == (2, 1, 64, 80)
    torch.testing.assert_close(both, torch.cat(one), rtol=0, atol=1e-5)


def test_bad_input_is_named():
    model = FastViTMatte("vit_s")
    with pytest.raises(ValueError, match="'image' must be"):
        model({"image": torch.rand(1, 4, 32, 32), "trimap": torch.rand(1, 1, 32, 32)})
    with pytest.raises(ValueError, match="unknown variant"):
        FastViTMatte("vit_l")
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        FastViTMatte("vit_s", dtype=torch.float16)(
            {"image": torch.rand(1, 3, 32, 32), "trimap": torch.rand(1, 1, 32, 32)}
        )


def test_triton_backend_runs_the_model_like_the_reference():
    """The triton table's global attention (the flash kernel; interpreted without a GPU)
    inside the whole model, against the reference backend, fp32."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
    import synth

    weights = synth.weights("vitmatte_vit_s", seed=7)
    image, trimap = synth.inputs(80, 100, seed=1)  # padded to 128×128: an 8×8 grid, tables resized
    alphas = {}
    for backend in ("reference", "triton"):
        model = FastViTMatte.from_checkpoint(weights, backend=backend)
        with torch.inference_mode():
            alphas[backend] = model({"image": image, "trimap": trimap})["phas"]
    assert dispatch.resolve("triton", "cpu").global_attention is not reference.global_attention
    diff = (alphas["triton"] - alphas["reference"]).abs()
    assert diff.mean() <= 1e-5 and diff.max() <= 5e-5, (diff.mean().item(), diff.max().item())
