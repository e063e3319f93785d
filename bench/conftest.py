"""Options of the pipeline cases under pytest-benchmark (bench/test_bench_pipelines.py); the op
cases take ``python -m bench ops``'s defaults. ``--sdlab-plugin`` is the root conftest.py's."""
import pytest


def pytest_addoption(parser):
    g = parser.getgroup("sdlab", "SD Kernel Lab pipeline benchmarks (bench/test_bench_pipelines.py)")
    g.addoption("--sd-preset", default=None,
                help="model preset (sdcore.config.PRESETS; default sd15 on CUDA, tiny on CPU); the "
                     "unet9 case takes its -inpaint sibling")
    g.addoption("--sd-ckpt", default=None, help="a checkpoint to load with sdcore.load instead of a preset")
    g.addoption("--sd-steps", type=int, default=None, help="sampler steps (default 50 on CUDA, 2 on CPU)")
    g.addoption("--sd-dtype", default=None, help="fp16, bf16 or fp32 (default fp16 on CUDA, fp32 on CPU)")
    g.addoption("--sd-variant", action="append", default=[], metavar="VARIANT",
                help="run these variants only (repeatable; default: every one bench pipelines has): "
                     "reference, triton, triton:<op>, the UNet-step baselines, or op=backend[+op=backend] "
                     "for a research backend that --sdlab-plugin registered")
    g.addoption("--sd-interpreted", action="store_true",
                help="on CPU, run the triton variants too (interpreted: tens of seconds per tiny UNet call)")


SD_OPTIONS = ("--sd-preset", "--sd-ckpt", "--sd-steps", "--sd-dtype", "--sd-variant", "--sd-interpreted")


@pytest.hookimpl(trylast=True)  # after the root conftest.py's --sdlab-plugin: its backends are valid variants
def pytest_configure(config):
    """Check the --sd-* options before collection: a bad one is pytest's one-line usage error, not a
    traceback from collecting bench/test_bench_pipelines.py. Without any, nothing is imported."""
    values = [config.getoption(name, None) for name in SD_OPTIONS]
    if any(v is not None and v is not False and v != [] for v in values):  # --sd-steps 0 is given
        from bench.test_bench_pipelines import options

        options(config)  # raises pytest.UsageError naming the option, the value and the valid ones
