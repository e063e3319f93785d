"""Test setup: Triton runs under its interpreter when there is no GPU, and the `gpu` marker skips
cleanly without one. TRITON_INTERPRET must be set before any @triton.jit function is defined,
that is before `kernels` is imported, hence here at the top."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_kernel_choice():
    """Every test starts from the default backend choice and zeroed dispatch counters."""
    import kernels

    kernels.set_backend()
    kernels.reset_counts()
    yield
    kernels.set_backend()


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
