"""Test setup: Triton runs under its interpreter when there is no GPU, and the `gpu` marker skips
cleanly without one. TRITON_INTERPRET must be set before any @triton.jit function is defined,
that is before `kernels` is imported, hence here at the top."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--sdlab-plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                     help="import a module or .py file that registers research backends; "
                          "tests/test_conformance.py then holds them to every op's equivalence cases")


def pytest_configure(config):
    if config.getoption("--sdlab-plugin"):
        import kernels

        for spec in config.getoption("--sdlab-plugin"):
            if not kernels.load_plugin(spec):
                raise pytest.UsageError(f"--sdlab-plugin {spec}: it registered no backend")


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


PLUGIN = """
import kernels

@kernels.register("attention", "plugin_attention")
def plugin_attention(q, k, v, scale=None, causal=False):
    return kernels.attention_reference(q, k, v, scale, causal)
"""


@pytest.fixture
def plugin_file(tmp_path):
    """A research-backend plugin file registering attention's 'plugin_attention' (the reference
    under another name); unregistered and forgotten afterwards, so each test loads it afresh."""
    import kernels

    path = tmp_path / "plugin_kernels.py"
    path.write_text(PLUGIN)
    yield path
    kernels.unload_plugin(str(path))
