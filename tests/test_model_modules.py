"""Each piece of the spec against a small hand-computed or independently written expectation."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mematte import FastMEMatte
from mematte.backbone import (
    ResizedPosEmbed,
    abs_pos,
    eca_kernel_size,
    rel_pos_table,
)
from mematte.decoder import decode_tiled, tile_grid, tile_length
from mematte.model import padded_size
from mematte_kernels import reference

from decoder_cases import small_random_decoder

sys.path.insert(0, str(Path(__file__).parent / "data" / "golden"))
import synth  # noqa: E402


def random_inputs(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g)
    trimap = torch.full((b, 1, h, w), 128 / 255)
    trimap[..., : h // 4, :] = 0
    trimap[..., -h // 4 :, :] = 1
    return image, trimap


@pytest.fixture(scope="module")
def model_s():
    # The golden generator's weights route a real mix of tokens with wide margins.
    model = FastMEMatte("vit_s", backend="reference")
    model.load_state_dict(synth.weights("mematte_vit_s", seed=0))
    return model


# ---------------------------------------------------------------------------- input


@pytest.mark.parametrize("size, expected", [(512, 544), (600, 608), (1, 32), (31, 32), (33, 64), (64, 96)])
def test_padding_rule_grows_every_side(size, expected):
    assert padded_size(size) == expected


def test_preprocess_normalises_appends_trimap_and_pads_both_sides(model_s):
    image = torch.full((1, 3, 64, 40), 0.5)
    trimap = torch.full((1, 1, 64, 40), 1.0)
    x = model_s.preprocess(image, trimap)
    # 40 is not a multiple of 32, so BOTH sides grow, 64 -> 96 included.
    assert x.shape == (1, 4, 96, 64)
    expected_r = (0.5 - 123.675 / 255) / (58.395 / 255)
    assert x[0, 0, 0, 0].item() == pytest.approx(expected_r, rel=1e-6)
    assert x[0, 3, :64, :40].eq(1).all()
    assert x[:, :, 64:, :].eq(0).all() and x[:, :, :, 40:].eq(0).all()


def test_preprocess_leaves_multiples_of_32_alone(model_s):
    x = model_s.preprocess(torch.rand(1, 3, 64, 96), torch.zeros(1, 1, 64, 96))
    assert x.shape == (1, 4, 64, 96)


# ----------------------------------------------------------------------- backbone


def test_abs_pos_bicubic_resize_of_grid_without_class_token():
    pos = torch.randn(1, 197, 8)
    grid = pos[:, 1:].reshape(1, 14, 14, 8)
    assert torch.equal(abs_pos(pos, 14, 14), grid)
    expected = F.interpolate(grid.permute(0, 3, 1, 2), size=(5, 9), mode="bicubic", align_corners=False)
    torch.testing.assert_close(abs_pos(pos, 5, 9), expected.permute(0, 2, 3, 1))


def test_rel_pos_table_index_math():
    rows = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)  # 2*3-1 rows for a 3-wide axis
    table = rel_pos_table(3, 3, rows)
    for i in range(3):
        for j in range(3):
            assert torch.equal(table[i, j], rows[i - j + 2])


def test_rel_pos_table_resizes_linearly_when_length_differs():
    rows = torch.randn(27, 4)  # trained for 14, used on a 20-wide grid
    table = rel_pos_table(20, 20, rows)
    resized = F.interpolate(rows.T[None], size=39, mode="linear", align_corners=False)[0].T
    assert table.shape == (20, 20, 4)
    torch.testing.assert_close(table[7, 3], resized[7 - 3 + 19])


def test_rel_pos_attention_against_explicit_logits():
    g = torch.Generator().manual_seed(1)
    B, heads, H, W, d = 1, 2, 3, 4, 8
    q, k, v = (torch.randn(B, heads, H * W, d, generator=g, dtype=torch.float64) for _ in range(3))
    rel_h, rel_w = (
        torch.randn(H, H, d, generator=g, dtype=torch.float64),
        torch.randn(W, W, d, generator=g, dtype=torch.float64),
    )
    scale = d**-0.5
    logits = torch.empty(B, heads, H * W, H * W, dtype=torch.float64)
    for i in range(H * W):
        qh, qw = divmod(i, W)
        for j in range(H * W):
            kh, kw = divmod(j, W)
            qi = q[:, :, i]
            logits[:, :, i, j] = (
                (qi * k[:, :, j]).sum(-1) * scale + (qi * rel_h[qh, kh]).sum(-1) + (qi * rel_w[qw, kw]).sum(-1)
            )
    expected = logits.softmax(-1) @ v
    torch.testing.assert_close(reference.rel_pos_attention(q, k, v, rel_h, rel_w, scale), expected)


def test_window_partition_pads_with_the_given_vector_and_round_trips():
    x = torch.randn(2, 15, 17, 3)
    pad = torch.tensor([1.0, 2.0, 3.0])
    windows = reference.partition_windows(x, pad, 14)
    assert windows.shape == (2 * 4, 14 * 14, 3)
    second = windows[1].view(14, 14, 3)  # second window of a row: columns 17..27 are padding
    assert torch.equal(second[:, 3:], pad.expand(14, 11, 3)) and torch.equal(second[:1, :3], x[0, :1, 14:])
    assert torch.equal(reference.merge_windows(windows, (2, 15, 17), 14), x)


def test_window_attention_equals_upstream_zero_padding_before_the_projection():
    """Upstream pads norm1's output with zero tokens and then projects; the op gets the
    projection and pads it with the bias. Same numbers, in fp64."""
    g = torch.Generator().manual_seed(3)
    B, H, W, C, heads = 2, 15, 17, 8, 2
    tokens = torch.randn(B, H, W, C, generator=g, dtype=torch.float64)
    weight, bias = (
        torch.randn(3 * C, C, generator=g, dtype=torch.float64),
        torch.randn(3 * C, generator=g, dtype=torch.float64),
    )
    rel_h, rel_w = (
        rel_pos_table(14, 14, torch.randn(27, C // heads, generator=g, dtype=torch.float64)) for _ in range(2)
    )
    padded = torch.nn.functional.pad(tokens, (0, 0, 0, 28 - W, 0, 28 - H))
    windows = padded.view(B, 2, 14, 2, 14, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 196, C)
    q, k, v = (
        torch.nn.functional.linear(windows, weight, bias).view(-1, 196, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    )
    upstream = reference.rel_pos_attention(q, k, v, rel_h, rel_w, 0.5).transpose(1, 2).reshape(B, 2, 2, 14, 14, C)
    upstream = upstream.permute(0, 1, 3, 2, 4, 5).reshape(B, 28, 28, C)[:, :H, :W]
    qkv = torch.nn.functional.linear(tokens, weight, bias)
    out = reference.window_attention(qkv, bias, rel_h, rel_w, heads, 0.5, 14)
    torch.testing.assert_close(out, upstream, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels, k", [(384, 5), (768, 5), (64, 3), (256, 5), (2048, 7), (8, 3)])
def test_eca_kernel_size(channels, k):
    assert eca_kernel_size(channels) == k


def test_model_eca_modules_use_kernel_5():
    for variant in ("vit_s", "vit_b"):
        block = FastMEMatte(variant).backbone.blocks[2]
        assert block.efficient_block.eca.conv.kernel_size == (5,)
        assert block.efficient_block.eca.conv.padding == (2,)


def test_channels_first_layernorm_equals_layernorm_over_channels():
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), weight, bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(reference.channels_first_layer_norm(x, weight, bias, 1e-6), expected)


def test_router_global_half_is_a_per_image_bias():
    """The published router appends the image mean of the second half of in_conv's output to
    every token; that equals the local half through out_conv.0 plus a per-image bias."""
    torch.manual_seed(3)
    C, N = 16, 10
    args = [torch.randn(2, N, C)]
    args += [torch.randn(C), torch.randn(C), torch.randn(C, C), torch.randn(C)]
    args += [torch.randn(C // 2, C), torch.randn(C // 2), torch.randn(C // 4, C // 2), torch.randn(C // 4)]
    args += [torch.randn(2, C // 4), torch.randn(2)]
    scores, keep = reference.router_scores(*args)
    x, nw, nb, wi, bi, w0, b0, w1, b1, w2, b2 = args
    h = F.gelu(F.layer_norm(x, (C,), nw, nb, 1e-5) @ wi.T + bi)
    bias = h[..., C // 2 :].mean(1, keepdim=True) @ w0[:, C // 2 :].T + b0
    z = F.gelu(h[..., : C // 2] @ w0[:, : C // 2].T + bias)
    logits = F.gelu(z @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(scores, logits.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(keep, scores[..., 0] > scores[..., 1])
    assert torch.allclose(scores.exp().sum(-1), torch.ones(2, N))


# ------------------------------------------------------------------------ decoder


def test_tile_grid_places_tiles_with_context_inside_the_border():
    tiles = tile_grid(1024, 1536)
    assert len(tiles) == 2 * 3
    crops = {(c[0], c[2]): (c, place) for c, place in tiles}
    assert crops[(0, 0)] == ((0, 576, 0, 576), (0, 0, 512, 512))  # corner: context only inward
    assert crops[(448, 448)] == ((448, 1024, 448, 1088), (64, 64, 512, 512))  # middle of the last row
    assert crops[(448, 960)] == ((448, 1024, 960, 1536), (64, 64, 512, 512))


def test_tile_grid_balances_tiles_and_clips_crops_to_the_canvas():
    tiles = tile_grid(1024, 1536, tile=1024, context=32)
    assert [place for _, place in tiles] == [(0, 0, 1024, 768), (0, 32, 1024, 768)]
    assert [crop for crop, _ in tiles] == [(0, 1024, 0, 800), (0, 1024, 736, 1536)]


@pytest.mark.parametrize(
    "size, tile, expected",
    [(2160, 1024, 720), (3840, 1024, 960), (1536, 512, 512), (1000, 1024, 1008), (100, 64, 64), (16, 512, 16)],
)
def test_tile_length_is_even_and_on_the_token_grid(size, tile, expected):
    assert tile_length(size, tile) == expected


def test_tile_grid_over_part_of_a_canvas_takes_context_from_beyond_it():
    tiles = tile_grid(100, 200, tile=64, context=32, canvas=(512, 512))
    assert len(tiles) == 2 * 4  # tiles of 64×64, the last ones clipped to 100 - 64 and 200 - 192
    # The last crop ends on the token grid (112, 208) plus 32 px of context from the canvas.
    assert tiles[-1] == ((32, 144, 160, 240), (32, 32, 36, 8))


def test_32px_of_context_decodes_tiles_exactly_as_upstream():
    """The receptive field of the decoder is under 32 px, so larger tiles with 32 px of
    context give upstream's tiled result (fp64, so only the arithmetic order could differ)."""
    decoder = small_random_decoder()
    images = torch.randn(1, 4, 1024, 1536, dtype=torch.float64)
    features = torch.randn(1, 16, 64, 96, dtype=torch.float64)
    with torch.inference_mode():
        upstream = decode_tiled(decoder, features, images)
        fast = decode_tiled(decoder, features, images, tile=1024, context=32)
        seams = decode_tiled(decoder, features, images, tile=512, context=32)  # both directions, corners
        too_little = decode_tiled(decoder, features, images, tile=1024, context=16)
        image_only = decode_tiled(decoder, features, images, tile=1024, context=32, size=(1000, 1400))
    torch.testing.assert_close(fast, upstream, rtol=0, atol=1e-12)
    torch.testing.assert_close(image_only, upstream[..., :1000, :1400], rtol=0, atol=1e-12)
    torch.testing.assert_close(seams, upstream, rtol=0, atol=1e-12)
    assert (too_little - upstream).abs().max() > 1e-6  # the context does matter


class _CropRecorder(torch.nn.Module):
    """Stands in for the decoder: returns channel 0 of its crop, recording crop shapes."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, features, images):
        self.shapes.append((tuple(features.shape), tuple(images.shape)))
        assert features.shape[-2] * 16 == images.shape[-2] and features.shape[-1] * 16 == images.shape[-1]
        return images[:, :1]


@pytest.mark.parametrize("memory", [None, 1 << 34], ids=["one-by-one", "all-at-once"])
def test_decode_tiled_stitches_each_tile_centre_in_place(memory):
    images = torch.randn(2, 4, 544, 608)
    features = torch.randn(2, 8, 34, 38)
    recorder = _CropRecorder()
    alpha = decode_tiled(recorder, features, images, memory=memory)
    assert alpha.shape == (2, 1, 1024, 1024)
    torch.testing.assert_close(alpha[:, :, :544, :608], images[:, :1], rtol=0, atol=0)
    assert alpha[:, :, 544:, :].eq(0).all() and alpha[:, :, :, 608:].eq(0).all()
    image_crops = sorted({s[1][-2:] for s in recorder.shapes})
    assert image_crops == [(576, 576)]  # 2×2 tiles, each with 64 px of context inward only
    assert [s[1][0] for s in recorder.shapes] == ([2] * 4 if memory is None else [8])


def test_decode_tiled_over_the_image_only_skips_the_padding():
    images = torch.randn(2, 4, 544, 608)
    features = torch.randn(2, 8, 34, 38)
    recorder = _CropRecorder()
    alpha = decode_tiled(recorder, features, images, size=(530, 600))
    assert alpha.shape == (2, 1, 530, 600)
    torch.testing.assert_close(alpha, images[:, :1, :530, :600], rtol=0, atol=0)
    decoded = sum(s[1][-2] * s[1][-1] for s in recorder.shapes) // 2  # pixels per image
    assert decoded < 1024 * 1024 // 2  # vs the whole 1024² canvas
    with pytest.raises(ValueError, match="within the 1024×1024 canvas"):
        decode_tiled(recorder, features, images, size=(1100, 600))


def test_tiled_and_whole_image_decoding_agree_away_from_tile_seams(model_s):
    image, trimap = random_inputs(1, 40, 48)
    with torch.inference_mode():
        tiled = model_s({"image": image, "trimap": trimap}, patch_decoder=True)[0]["phas"]
        whole = model_s({"image": image, "trimap": trimap}, patch_decoder=False)[0]["phas"]
    # One tile covers this small image, so the only difference is the zero padding to 512.
    torch.testing.assert_close(tiled[..., :32, :32], whole[..., :32, :32], rtol=0, atol=1e-5)


# ------------------------------------------------------------------- token cap


def test_token_cap_keeps_the_largest_margins_per_image(model_s):
    image, trimap = random_inputs(2, 64, 64, seed=2)
    with torch.inference_mode():
        _, scores, free = model_s({"image": image, "trimap": trimap})
        model_s.max_tokens = 5
        try:
            _, capped_scores, capped = model_s({"image": image, "trimap": trimap})
        finally:
            model_s.max_tokens = 18500
    first_free, first_capped = free[0].flatten(1), capped[0].flatten(1)
    assert torch.equal(capped_scores[0], scores[0])  # the first router sees the same input
    for b in range(2):
        n = int(first_free[b].sum())
        assert n > 5
        assert int(first_capped[b].sum()) == 5
        margin = (scores[0][b, ..., 0] - scores[0][b, ..., 1]).flatten()
        assert set(first_capped[b].nonzero().flatten().tolist()) == set(margin.topk(5).indices.tolist())
    for d in capped:
        assert (d.flatten(1).sum(1) <= 5).all()


def test_cap_tokens_only_touches_images_over_the_cap():
    keep = torch.tensor([[True, True, False, True], [True, False, False, False]])
    scores = torch.tensor([[[3.0, 0], [1.0, 0], [0, 1.0], [2.0, 0]], [[1.0, 0], [0, 2.0], [0, 1.0], [0, 3.0]]])
    capped = reference.cap_tokens(keep, scores.log_softmax(-1), 2)
    assert capped.tolist() == [[True, False, False, True], [True, False, False, False]]
    assert reference.cap_tokens(keep, scores, None) is keep


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown variant 'vit_h'"):
        FastMEMatte("vit_h")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        FastMEMatte("vit_s", backend="fast")
    with pytest.raises(ValueError, match="max_tokens must be ≥ 0"):
        FastMEMatte("vit_s", max_tokens=-1)
    assert FastMEMatte("vit_s", max_tokens=0).max_tokens is None  # 0 means no cap, as on the command line


def test_decode_tiled_rejects_tiles_off_the_token_grid():
    with pytest.raises(ValueError, match="multiples of the 16-px token"):
        decode_tiled(_CropRecorder(), torch.zeros(1, 8, 32, 32), torch.zeros(1, 4, 512, 512), tile=500)


def test_env_var_forces_backend(monkeypatch):
    from mematte_kernels import dispatch

    monkeypatch.setenv("MEMATTE_BACKEND", "reference")
    assert dispatch.resolve("auto", "cpu").name == "reference"
    monkeypatch.setenv("MEMATTE_BACKEND", "warp")
    with pytest.raises(ValueError, match="unknown MEMATTE_BACKEND 'warp'"):
        dispatch.resolve("auto", "cpu")


def test_upstream_call_shapes(model_s):
    image, trimap = random_inputs(1, 50, 70)
    with torch.inference_mode():
        outputs, scores, decisions = model_s({"image": image, "trimap": trimap})
    h, w = padded_size(50) // 16, padded_size(70) // 16
    assert outputs["phas"].shape == (1, 1, 50, 70)
    assert [s.shape for s in scores] == [(1, h, w, 2)] * 4
    assert [d.shape for d in decisions] == [(1, h, w, 1)] * 4
    assert all(math.isclose(s.exp().sum(-1).mean().item(), 1.0, rel_tol=1e-5) for s in scores)


def test_resized_pos_embed_is_kept_until_the_weights_change():
    pos = torch.nn.Parameter(torch.randn(1, 197, 8))
    resized = ResizedPosEmbed()
    with torch.no_grad():
        first = resized(pos, 5, 9)
        assert resized(pos, 5, 9) is first  # kept
        assert not torch.equal(resized(pos, 6, 9), first)  # another grid: resized again
        pos.add_(1.0)  # an in-place update (an optimiser step)
        torch.testing.assert_close(resized(pos, 6, 9), abs_pos(pos, 6, 9), rtol=0, atol=0)
        pos.data = torch.randn(1, 197, 8)  # new weights under the same Parameter
        torch.testing.assert_close(resized(pos, 6, 9), abs_pos(pos, 6, 9), rtol=0, atol=0)
    out = resized(pos, 6, 9)  # with autograd: part of the graph
    assert out.requires_grad and out is not resized.grid


def test_model_output_follows_newly_loaded_weights(checkpoint):
    g = torch.Generator().manual_seed(0)
    image, trimap = torch.rand(1, 3, 64, 96, generator=g), torch.randint(0, 3, (1, 1, 64, 96), generator=g) / 2
    model = FastMEMatte.from_checkpoint(checkpoint)
    other = {k: (v + 0.5 if k == "backbone.pos_embed" else v) for k, v in model.state_dict().items()}
    with torch.inference_mode():
        model({"image": image, "trimap": trimap})
    model.load_state_dict(other)
    fresh = FastMEMatte.from_checkpoint(other)
    with torch.inference_mode():
        torch.testing.assert_close(
            model({"image": image, "trimap": trimap})[0]["phas"],
            fresh({"image": image, "trimap": trimap})[0]["phas"],
            rtol=0,
            atol=0,
        )
