"""The training losses on inputs whose values are known in closed form."""

import math

import pytest
import torch

from mematte import losses
from mematte.model import training_trimap


def test_training_trimap_quantises_at_85_and_170():
    raw = torch.tensor([0, 1, 84, 85, 127, 128, 169, 170, 254, 255], dtype=torch.float32)
    expected = torch.tensor([0, 0, 0, 0.5, 0.5, 0.5, 0.5, 1, 1, 1])
    assert torch.equal(training_trimap(raw / 255), expected)


def test_region_means_pool_the_batch():
    """mean_U over the whole batch: an image with many unknown pixels weighs more than one
    with few (not the mean of per-image means)."""
    trimap = torch.zeros(2, 1, 4, 4)
    trimap[0, :, :2] = 0.5  # 8 unknown pixels, error 1 each
    trimap[1, :, 0, 0] = 0.5  # 1 unknown pixel, error 4
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.ones(2, 1, 4, 4)
    pred[1] = 4
    unknown = losses.unknown_region(trimap)
    assert losses.unknown_l1_loss(pred, target, unknown).item() == pytest.approx((8 * 1 + 1 * 4) / 9)
    # known: 8 pixels with error 1 and 15 with error 4
    assert losses.known_l1_loss(pred, target, unknown).item() == pytest.approx((8 * 1 + 15 * 4) / 23)


def test_empty_regions_give_zero_and_a_zero_gradient():
    pred = torch.rand(1, 1, 8, 8, requires_grad=True)
    target = torch.rand(1, 1, 8, 8)
    all_known = torch.zeros(1, 1, 8, 8)
    all_unknown = torch.full((1, 1, 8, 8), 0.5)
    terms = [
        losses.unknown_l1_loss(pred, target, losses.unknown_region(all_known)),
        losses.loss_gradient_penalty(pred, target, losses.unknown_region(all_known)),
        losses.known_l1_loss(pred, target, losses.unknown_region(all_unknown)),
    ]
    assert all(t.item() == 0 for t in terms)
    sum(terms).backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_gradient_penalty_of_a_ramp():
    """α̂ = a·x, α = 0 inside the unknown interior: Gx α̂ = 8a, Gy α̂ = 0, so the penalty is
    8a + 0.01·8a."""
    a = 0.01
    pred = (a * torch.arange(16.0)).expand(1, 1, 12, 16).clone()
    target = torch.zeros_like(pred)
    unknown = torch.zeros_like(pred)
    unknown[..., 1:-1, 1:-1] = 1  # Sobel's zero padding stays outside
    value = losses.loss_gradient_penalty(pred, target, unknown).item()
    assert value == pytest.approx(8 * a * 1.01, rel=1e-5)
    gx, gy = losses.sobel(pred)
    assert torch.allclose(gx[..., 1:-1, 1:-1], torch.full((10, 14), 8 * a)) and gy[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_laplacian_pyramid_removes_constants_and_keeps_band_pass_detail():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 64, 80)
    shifted = losses.loss_pha_laplacian(target + 0.3, target)
    assert shifted.item() < 1e-6  # no low-pass residual term: a constant offset is free
    assert all(level.abs().max() < 1e-6 for level in losses.laplacian_pyramid(torch.full((1, 1, 64, 64), 0.7)))
    # A one-pixel checkerboard lives in the finest band: level 0 holds most of it, weight 1/5.
    checker = ((torch.arange(64)[:, None] + torch.arange(80)[None, :]) % 2).float()[None, None] * 0.1
    pyramid = losses.laplacian_pyramid(checker)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(64, 80), (32, 40), (16, 20), (8, 10), (4, 4)]
    assert pyramid[0].abs().mean() > 0.04 and pyramid[1].abs().mean() < 1e-6
    value = losses.loss_pha_laplacian(target + checker, target).item()
    assert value == pytest.approx(pyramid[0].abs().mean().item() / 5, rel=1e-4)


def test_pyramid_crops_odd_sizes_to_even():
    pyramid = losses.laplacian_pyramid(torch.rand(1, 1, 93, 75))
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(92, 74), (46, 36), (22, 18), (10, 8), (4, 4)]


def test_ratio_loss_constrains_one_average_and_reaches_the_soft_policy():
    soft = torch.rand(4, 2, 16, requires_grad=True)
    hard = torch.zeros(4, 2, 16)
    hard[0, 0, :8] = 1  # shares per router: 0.25, 0.5, 0, 0.75 -> r = 0.375
    hard[1, :, :] = torch.tensor([1.0, 0.0])[:, None]
    hard[3, :, :12] = 1
    policies = [h - s.detach() + s for h, s in zip(hard, soft)]
    loss = losses.mse_ratio_loss(policies)
    assert loss.item() == pytest.approx((0.375 - 0.25) ** 2)
    loss.backward()
    # d/dp = 2(r - 0.25) / (4 · 32) for every token of every router
    torch.testing.assert_close(soft.grad, torch.full_like(soft, 2 * 0.125 / 128))


def test_matting_losses_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    pred = torch.rand(1, 1, 64, 64).bfloat16().requires_grad_()
    target = torch.rand(1, 1, 64, 64)
    trimap = training_trimap(torch.rand(1, 1, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = losses.matting_losses(pred, target, trimap)
    expected = losses.matting_losses(pred.detach().float(), target, trimap)
    assert list(terms) == ["unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian", "loss_gradient_penalty"]
    for name, value in terms.items():
        assert value.dtype == torch.float32 and value.dim() == 0
        assert value.item() == expected[name].item(), name
    sum(terms.values()).backward()
    assert pred.grad.dtype == torch.bfloat16 and math.isfinite(pred.grad.float().sum().item())
