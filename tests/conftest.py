import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable
# must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _cpu_kernel_choices_in_a_temporary_cache(tmp_path_factory):
    """The CPU backend's measured kernel choices are kept on disk: the tests keep theirs in a
    directory of their own, not in the user's cache."""
    previous = os.environ.get("MEMATTE_CACHE_DIR")
    os.environ["MEMATTE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mematte-cache"))
    yield
    if previous is None:
        os.environ.pop("MEMATTE_CACHE_DIR", None)
    else:
        os.environ["MEMATTE_CACHE_DIR"] = previous


def pytest_report_header(config):
    from mematte_kernels import ext

    if ext._C is None:
        return "mematte_kernels._C: not built (the LTRM ops fall back to PyTorch)"
    cuda = "compiled" if ext._C.cuda_compiled else "not compiled"
    return f"mematte_kernels._C: CPU ops built, CUDA ops {cuda}; CUDA device present: {torch.cuda.is_available()}"


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


@pytest.fixture(scope="session")
def vitmatte_checkpoint(tmp_path_factory):
    """The same for ViTMatte: a randomly initialised ViT-S FastViTMatte checkpoint file."""
    from mematte import FastViTMatte

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vitmatte") / "random_vitmatte_s.pth"
    torch.save(FastViTMatte("vit_s").state_dict(), path)
    return path


@pytest.fixture
def nan_filled_outputs():
    """Every fresh tensor (an op's output included) starts as NaN while the test runs."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]
