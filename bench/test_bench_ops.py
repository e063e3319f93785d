"""The op cases of ``bench.ops`` under pytest-benchmark: ``pytest bench/ --benchmark-only``.

Same shape table, inputs and backends as ``python -m bench ops``: the tiny ``--quick`` cases in
fp32 on CPU (Triton interpreted, a few rounds), the SD cases in fp16 on CUDA. The repository's
default ``pytest`` run (testpaths = tests) does not collect this file.
"""
from bench import common

common.prepare_environment()  # before kernels is imported (TRITON_INTERPRET on CPU)

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
BACKENDS = ("reference", "triton", "sdpa", "compile") if CUDA else ("reference", "triton", "sdpa")


def _params():
    for case in ops.select_cases(ops.known_ops(), None, quick=not CUDA):
        for backend in BACKENDS:
            if backend == "sdpa" and case.op != "attention":
                continue
            yield pytest.param(case, backend, id=f"{case.op}-{case.name}-{backend}-{common.dtype_name(DTYPE)}")


@pytest.mark.parametrize("case,backend", list(_params()))
def test_op(benchmark, case, backend):
    if backend == "compile":
        ops._raise_recompile_limit()
    try:
        args, kwargs = ops.make_inputs(case, DEVICE, DTYPE)
        fn, ctx, note = ops.backend_callable(case.op, backend, args, kwargs, DEVICE)
    except common.Skip as e:
        pytest.skip(str(e))
    ref64 = ops.oracle(case.op, args, kwargs)

    def run():
        out = fn()
        common.synchronize(DEVICE)
        return out

    with ctx():
        out = ops._first_tensor(run())  # warm-up / compile, and the value checked below
        abs_err, rel_err = common.max_errors(out, ref64)
        nbytes, flops = ops.work(case, args, kwargs, out)
        benchmark.extra_info.update(shape=case.shape, reason=case.reason, dtype=common.dtype_name(DTYPE),
                                    max_abs_err=abs_err, max_rel_err=rel_err, bytes=nbytes, flops=flops,
                                    note=note)
        if note and not CUDA:  # interpreted Triton: about a second per call
            benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
        else:
            benchmark(run)
    assert torch.isfinite(out).all(), f"{case.op} {case.name} {backend}: non-finite output"
