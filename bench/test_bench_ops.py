"""The op cases of ``bench.ops`` under pytest-benchmark: ``pytest bench/ --benchmark-only``.

Same shape table, inputs, backends and dtypes as ``python -m bench ops``: the SD cases in fp16 and
bf16 on CUDA; on CPU the tiny ``--quick`` cases in fp32 on one thread (Triton interpreted, a few
rounds; no ``compile``, whose warm-up takes tens of seconds per shape). The repository's default
``pytest`` run (testpaths = tests) does not collect this file.
"""
from bench import common

common.prepare_environment()  # before kernels is imported (TRITON_INTERPRET on CPU)

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.float16, torch.bfloat16) if CUDA else (torch.float32,)  # as `bench ops` defaults


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with common.one_thread_on_cpu(DEVICE):
        yield


def _params():
    for case in ops.select_cases(ops.known_ops(), None, quick=not CUDA):
        for backend in ops.op_backends(case.op):
            if backend == "compile" and not CUDA:
                continue
            for dtype in DTYPES:
                yield pytest.param(case, backend, dtype,
                                   id=f"{case.op}-{case.name}-{backend}-{common.dtype_name(dtype)}")


@pytest.mark.parametrize("case,backend,dtype", list(_params()))
def test_op(benchmark, case, backend, dtype):
    if backend == "compile":
        ops._raise_recompile_limit()
    try:
        args, kwargs = ops.make_inputs(case, DEVICE, dtype)
        fn, ctx, note = ops.backend_callable(case.op, backend, args, kwargs, DEVICE)
    except common.Skip as e:
        pytest.skip(str(e))
    ref64 = ops.oracle(case.op, args, kwargs)

    def run():
        out = fn()
        common.synchronize(DEVICE)
        return out

    with ctx():
        try:
            out = ops._first_tensor(run())  # warm-up / compile, and the value checked below
        except Exception as e:  # as `bench ops`: an SDPA backend that cannot take the input is a skip
            if backend.startswith("sdpa-"):
                pytest.skip(f"{backend} cannot run this input: {str(e).splitlines()[0][:200]}")
            raise
        abs_err, rel_err = common.max_errors(out, ref64)
        nbytes, flops = ops.work(case, args, kwargs, out)
        benchmark.extra_info.update(shape=case.shape, reason=case.reason, dtype=common.dtype_name(dtype),
                                    max_abs_err=abs_err, max_rel_err=rel_err, bytes=nbytes, flops=flops,
                                    note=note)
        if note and not CUDA:  # interpreted Triton: about a second per call
            benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
        else:
            benchmark(run)
    assert torch.isfinite(out).all(), f"{case.op} {case.name} {backend}: non-finite output"
    ref_fn, ref_ctx, _ = ops.backend_callable(case.op, "reference", args, kwargs, DEVICE)
    with ref_ctx():
        ref_err, _ = common.max_errors(ops._first_tensor(ref_fn()), ref64)
    name = common.dtype_name(dtype)
    assert common.within_error(abs_err, ref_err, name), (
        f"{case.op} {case.name} {backend} {name}: max abs error {abs_err:.3g} against the oracle, over 2 x "
        f"reference's {ref_err:.3g} + {common.ERROR_ATOL[name]:g}")
