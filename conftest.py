"""pytest setup shared by tests/ and bench/'s pytest-benchmark cases.

Triton runs under its interpreter when there is no GPU: TRITON_INTERPRET must be set before any
@triton.jit function is defined, that is before ``kernels`` is imported, hence here at the top.
``--sdlab-plugin`` imports research backends before collection, so the files that parametrise over
backends or variants (tests/test_conformance.py, bench/test_bench_pipelines.py) see them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--sdlab-plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                     help="import a module or .py file that registers research backends: "
                          "tests/test_conformance.py then holds them to every op's equivalence cases, "
                          "and bench/test_bench_pipelines.py runs them as --sd-variant op=backend")


def pytest_configure(config):
    if config.getoption("--sdlab-plugin"):
        import kernels

        for spec in config.getoption("--sdlab-plugin"):
            if not kernels.load_plugin(spec):  # an import that fails raises, with its traceback
                raise pytest.UsageError(f"--sdlab-plugin {spec}: it registered no backend")
