"""MEMatte's training losses (BATR), each of weight 1, under upstream's names.

Regions come from the quantised trimap of the network input: unknown U = (trimap == 0.5),
known K = not U. A region mean ``mean_R(t) = Σ_R |t| / |R|`` is pooled over the whole batch
(upstream writes it as ``l1_loss(t·R)·B·262144/ΣR``, the same for its 512×512 crops). An
empty region gives 0 (upstream guards the known region only; an unknown-free batch gave
inf/NaN there).

1. ``unknown_l1_loss``        mean_U |α̂ − α|
2. ``known_l1_loss``          mean_K |α̂ − α|
3. ``loss_pha_laplacian``     (1/5) Σ_l 2^l · mean |Lp_l(α̂) − Lp_l(α)|, 5 levels
4. ``loss_gradient_penalty``  mean_U |Gx α̂ − Gx α| + mean_U |Gy α̂ − Gy α|
                              + 0.01 · (mean_U |Gx α̂| + mean_U |Gy α̂|)   (Sobel)
5. ``distill_loss``           MSE between the student's and the teacher's last features
6. ``mse_ratio_loss``         (r − 0.25)², r the hard routed share averaged over the batch,
                              the tokens, then the 4 routers

The losses are computed in fp32 (fp64 for an fp64 model), outside autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PYRAMID_LEVELS = 5
ROUTED_TARGET = 0.25  # ``topk``: the share of tokens BATR steers to global attention
GAUSS_5 = (1.0, 4.0, 6.0, 4.0, 1.0)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def unknown_region(trimap: torch.Tensor) -> torch.Tensor:
    """U as a 0/1 float map from the quantised trimap (0, 0.5, 1)."""
    return (trimap == 0.5).float()


def region_mean(t: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Σ_R |t| / |R| over the whole batch; 0 for an empty region (Σ_R |t| is 0 there too)."""
    return (t.abs() * region).sum() / region.sum().clamp(min=1)


# ------------------------------------------------------------------------ L1 losses


def unknown_l1_loss(pred: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    return region_mean(pred - target, unknown)


def known_l1_loss(pred: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    return region_mean(pred - target, 1 - unknown)


# ------------------------------------------------------------------ Laplacian pyramid


def gauss_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 5×5 binomial blur [1,4,6,4,1]ᵀ[1,4,6,4,1] / 256: (1, 1, 5, 5)."""
    g = torch.tensor(GAUSS_5, device=device, dtype=dtype)
    return (g[:, None] * g[None, :] / 256)[None, None]


def blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 5×5 blur with reflect padding 2."""
    B, C, H, W = img.shape
    out = F.conv2d(F.pad(img.reshape(B * C, 1, H, W), (2, 2, 2, 2), mode="reflect"), kernel)
    return out.reshape(B, C, H, W)


def laplacian_pyramid(img: torch.Tensor, levels: int = PYRAMID_LEVELS) -> list[torch.Tensor]:
    """Band-pass levels Lp_0..Lp_{levels-1}, finest first; no low-pass residual. Per level:
    crop to even H, W; down = blur(cur)[::2, ::2]; up = blur(zero-insert(down)·4);
    Lp = cur − up; cur = down."""
    kernel = gauss_kernel(img.device, img.dtype)
    pyramid, current = [], img
    for _ in range(levels):
        H, W = current.shape[-2:]
        current = current[:, :, : H - H % 2, : W - W % 2]
        down = blur(current, kernel)[:, :, ::2, ::2]
        spread = torch.zeros_like(current)
        spread[:, :, ::2, ::2] = down * 4
        pyramid.append(current - blur(spread, kernel))
        current = down
    return pyramid


def loss_pha_laplacian(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = 0
    for level, (p, t) in enumerate(zip(laplacian_pyramid(pred), laplacian_pyramid(target))):
        loss = loss + 2**level * F.l1_loss(p, t)
    return loss / PYRAMID_LEVELS


# ------------------------------------------------------------------ gradient penalty


def sobel(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-correlation of (B, 1, H, W) with Gx and Gy = Gxᵀ, zero padding 1."""
    gx = torch.tensor(SOBEL_X, device=img.device, dtype=img.dtype)[None, None]
    return F.conv2d(img, gx, padding=1), F.conv2d(img, gx.transpose(-2, -1), padding=1)


def loss_gradient_penalty(pred: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    pred_x, pred_y = sobel(pred)
    target_x, target_y = sobel(target)
    return (
        region_mean(pred_x - target_x, unknown)
        + region_mean(pred_y - target_y, unknown)
        + 0.01 * (region_mean(pred_x, unknown) + region_mean(pred_y, unknown))
    )


# -------------------------------------------------------------- distillation, BATR


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(student.dtype, torch.float32)
    return F.mse_loss(student.to(dtype), teacher.to(dtype))


def mse_ratio_loss(policies: list[torch.Tensor], target: float = ROUTED_TARGET) -> torch.Tensor:
    """(r − target)² with r = ¼ Σ_k mean_{b,n} p_k: one batch-and-router average is
    constrained, not each image or block. Gradients reach the routers through p."""
    ratio = sum(p.sum() / p.numel() for p in policies) / len(policies)
    return F.mse_loss(ratio, torch.tensor(target, device=ratio.device))


# ------------------------------------------------------------------------ together


def matting_losses(pred: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four alpha losses of ``pred`` against ``target`` (B, 1, H, W), with regions from
    the quantised ``trimap``, in at least fp32, outside autocast."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.to(dtype), target.to(dtype)
        unknown = unknown_region(trimap)
        return {
            "unknown_l1_loss": unknown_l1_loss(pred, target, unknown),
            "known_l1_loss": known_l1_loss(pred, target, unknown),
            "loss_pha_laplacian": loss_pha_laplacian(pred, target),
            "loss_gradient_penalty": loss_gradient_penalty(pred, target, unknown),
        }
