"""FastMEMatte: memory-efficient ViT image matting (MEMatte) with fused kernels.

    from mematte import FastMEMatte
    model = FastMEMatte.from_checkpoint("MEMatte_ViTS_DIM.pth")
    alpha = model.predict(image, trimap)          # H×W float32 in [0, 1]
"""
from .model import FastMEMatte

__all__ = ["FastMEMatte"]
