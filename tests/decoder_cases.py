"""A small decoder for the tiling tests of both models."""

from __future__ import annotations

import torch

from mematte.decoder import DetailCapture


def small_random_decoder() -> DetailCapture:
    """MEMatte's and ViTMatte's decoder layers at narrower widths, in fp64, with random
    BatchNorm statistics: the receptive field is a property of the layers, not the widths."""
    torch.manual_seed(0)
    decoder = DetailCapture(in_chans=16, fusion_out=(32, 16, 16, 16)).double().eval()
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return decoder
