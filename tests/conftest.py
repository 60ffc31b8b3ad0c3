import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable
# must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A randomly initialised ViT-S checkpoint file: enough to drive the tools end to end."""
    from mematte import FastMEMatte

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random_vit_s.pth"
    torch.save(FastMEMatte("vit_s").state_dict(), path)
    return path
