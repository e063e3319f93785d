"""Benchmarks of the kernels and the pipelines that use them: ``python -m bench --help``.

- :mod:`bench.ops`: each op x backend x the shapes SD calls x dtype (the shape tables live there).
- :mod:`bench.pipelines`: each pipeline x kernel setting, and the UNet step with baselines.
- :mod:`bench.host` (``python -m bench.host``): a Triton call's host time by layer, on a CPU with
  Triton's driver stubbed; :mod:`bench.sm90` (``python -m bench.sm90``): the kernels compiled for
  Hopper offline.
- :mod:`bench.common`: timing, device ceilings, environment, result rows, JSON / markdown / plots.
- ``bench/test_bench_ops.py``, ``bench/test_bench_pipelines.py``: the op, UNet-step and pipeline cases
  under pytest-benchmark (``pytest bench/ --benchmark-only``; options in ``bench/conftest.py``).
"""
