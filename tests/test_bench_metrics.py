"""Exact values of the numbers the benchmarks report: bytes and flops, GB/s and TFLOP/s, % of peak,
timing quantiles, host time per call, device ceilings, speed-ups, the accuracy rule, environment
fields, PSNR and the pipeline columns.

Each expected value is computed here from first principles (or from a timer pinned to a known
value), not read back from the code under test, so a slip of a factor (ms for s, 1e9 for 1e12,
n³ for 2n³, per-sample for per-call) changes a number these tests name exactly. Runs are CPU-sized:
synthetic rows, monkeypatched timers and meters, the ops' tiny cases, the tiny preset.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import subprocess
import types

import pytest
import torch

import pipelines.common
from bench import common

CPU = torch.device("cpu")
REL = 1e-9  # a formula recomputed in the same floating point: only rounding may differ


def _case(op: str, name: str):
    from bench import ops

    (case,) = [c for c in ops.CASES[op] if c.name == name]
    return case


# ------------------------------------------------------------------------------- ops: work
def test_work_counts_group_norm_bytes_read_and_written_exactly():
    """GroupNorm+SiLU moves x, weight and bias in and y out, each once: for ``tiny.res`` (2, 64, 8, 8)
    fp32 that is 4 B x (2·64·8·8 + 64 + 64 + 2·64·8·8) = 66 048 B. Leaving the output write out
    (a mutation that passed the older tests) would give 33 280 B and halve every GB/s."""
    from bench import ops

    case = _case("group_norm_silu", "tiny.res")
    args, kwargs = ops.make_inputs(case, CPU, torch.float32)
    out = torch.empty(2, 64, 8, 8)  # what the op writes: x's shape and dtype
    n, c = 2 * 64 * 8 * 8, 64
    expected = 4 * (n + c + c + n)
    nbytes, flops = ops.work(case, args, kwargs, out)
    assert nbytes == expected == 66048, f"group_norm_silu tiny.res bytes {nbytes}, expected {expected} (x + w + b + y)"
    assert flops is None, f"a memory-bound op has no flop count, got {flops}"


def test_work_counts_attention_flops_as_4_b_h_lq_lkv_d():
    """Attention's forward does two matmuls of B·H·Lq·Lkv·D multiply-adds, 4·B·H·Lq·Lkv·D flops.
    ``tiny.cross`` (B2 H2 Lq64 Lkv7 D8) has Lq != Lkv, so Lq·Lq (a mutation) or a factor 2 would
    both show: 4·2·2·64·7·8 = 57 344. Bytes: q and out are (2, 64, 16) fp32, k and v (2, 7, 16)."""
    from bench import ops

    case = _case("attention", "tiny.cross")
    args, kwargs = ops.make_inputs(case, CPU, torch.float32)
    out = torch.empty(2, 2, 64, 8)
    nbytes, flops = ops.work(case, args, kwargs, out)
    assert flops == 4 * 2 * 2 * 64 * 7 * 8 == 57344, f"attention tiny.cross flops {flops}, expected 57344"
    q = o = 2 * 64 * 2 * 8
    k = v = 2 * 7 * 2 * 8
    assert nbytes == 4 * (q + k + v + o) == 18176, f"attention tiny.cross bytes {nbytes}, expected 18176"


def test_causal_attention_counts_the_pairs_it_scores():
    """Under the top-left causal mask query i scores keys 0..i: a causal case counted as dense
    would report about 2x its TFLOP/s. Counted against a brute-force mask."""
    from bench.ops import attended_pairs

    for lq, lkv in ((1, 1), (5, 5), (7, 3), (3, 7), (64, 77)):
        brute = int(torch.ones(lq, lkv).tril().sum())
        assert attended_pairs(lq, lkv, causal=True) == brute, (lq, lkv)
        assert attended_pairs(lq, lkv) == lq * lkv


# ---------------------------------------------------------------------------- ops: run_case
def _run_ref(case_op, case_name, dtype=torch.float32, **kw):
    from bench import ops

    return ops.run_case(_case(case_op, case_name), "reference", dtype, CPU, {}, kw.pop("ceilings", None),
                        quick=True, **kw)


def test_a_compile_row_compiles_its_case_alone(monkeypatch):
    """scheduler_step's compile is torch.compile(dynamic=None): after earlier cases it recompiled
    with symbolic sizes, so the row measured other code than the same case run alone. Dynamo is
    reset before each compile row's callable is made."""
    from bench import ops

    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    real = ops.backend_callable
    monkeypatch.setattr(ops, "backend_callable", lambda *a, **k: events.append(a[1]) or real(*a, **k))
    case = _case("scheduler_step", "tiny.latent")
    for backend in ("reference", "compile"):
        ops.run_case(case, backend, torch.float32, CPU, {}, None, quick=True)
    assert events[:3] == ["reference", "reset", "compile"], events


def test_op_rows_report_gbps_and_tflops_per_second_in_si_units():
    """GB/s = bytes / (median ms · 1e-3 s/ms) / 1e9 and TFLOP/s = flops / seconds / 1e12, recomputed
    from the row's own bytes, flops and median (a GB/s from ms, or TFLOP/s over 1e9, is off by 1e3).
    The ceilings and the same-size copy time are given, so % of peak = value / ceiling and % of copy
    = copy ms / op ms are exact too (either one inverted would differ)."""
    copy_gbps, fp32_tflops, same_copy_ms = 7.0, 3.0, 0.125
    ceilings = {"copy_gbps": copy_gbps, "matmul_tflops": {"fp32": fp32_tflops}}
    gn_case = _case("group_norm_silu", "tiny.res")
    copies = {66048 // 2: same_copy_ms}  # common.copy_ms's cache: half the bytes read, half written
    gn = _run_ref("group_norm_silu", "tiny.res", ceilings=ceilings, copies=copies)
    attn = _run_ref("attention", "tiny.cross", ceilings=ceilings)
    assert gn["status"] == attn["status"] == "ok", (gn["note"], attn["note"])
    assert gn["case"] == gn_case.name and gn["bytes"] == 66048, gn
    for r in (gn, attn):
        sec = r["median_ms"] * 1e-3
        assert r["median_ms"] > 0, r
        assert r["gbps"] == pytest.approx(r["bytes"] / sec / 1e9, rel=REL), \
            f"{r['op']}: gbps {r['gbps']} != bytes {r['bytes']} / {sec} s / 1e9"
    sec = attn["median_ms"] * 1e-3
    assert attn["tflops"] == pytest.approx(57344 / sec / 1e12, rel=REL), \
        f"attention tflops {attn['tflops']} != 57344 flops / {sec} s / 1e12"
    assert gn["tflops"] is None, gn
    assert gn["frac_of_peak"] == pytest.approx(gn["gbps"] / copy_gbps, rel=REL), \
        f"group_norm % of peak {gn['frac_of_peak']} != gbps {gn['gbps']} / copy {copy_gbps}"
    assert attn["frac_of_peak"] == pytest.approx(attn["tflops"] / fp32_tflops, rel=REL), \
        f"attention % of peak {attn['frac_of_peak']} != tflops {attn['tflops']} / fp32 matmul {fp32_tflops}"
    assert gn["copy_ms"] == same_copy_ms, gn
    assert gn["frac_of_copy"] == pytest.approx(same_copy_ms / gn["median_ms"], rel=REL), \
        f"% of copy {gn['frac_of_copy']} != copy {same_copy_ms} ms / op {gn['median_ms']} ms"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_percent_of_peak_uses_the_matmul_rate_of_the_rows_dtype(dtype):
    """A half-precision attention row is held against the matmul rate in its own dtype, not fp32's:
    fake ceilings 1 (fp32), 4 (bf16) and 8 (fp16) TFLOP/s make the two readings differ by 4-8x."""
    name = common.dtype_name(dtype)
    ceilings = {"copy_gbps": 1.0, "matmul_tflops": {"fp32": 1.0, "bf16": 4.0, "fp16": 8.0}}
    row = _run_ref("attention", "tiny.cross", dtype=dtype, ceilings=ceilings)
    assert row["status"] == "ok" and row["dtype"] == name, row
    peak = ceilings["matmul_tflops"][name]
    assert row["frac_of_peak"] == pytest.approx(row["tflops"] / peak, rel=REL), \
        f"{name} attention % of peak {row['frac_of_peak']} != tflops {row['tflops']} / {name} ceiling {peak}"


def test_a_backend_that_raises_is_an_error_row_without_timing_or_speed_up(monkeypatch):
    """A backend whose call raises RuntimeError gives status ``error`` (never ``ok``: a crashed
    kernel must not read as a result), naming the exception, with no median and no speed-up even
    after speed-ups are filled in beside an ok reference row."""
    from bench import ops

    def boom():
        raise RuntimeError("kernel crashed")

    real = ops.backend_callable
    monkeypatch.setattr(ops, "backend_callable", lambda op, backend, *a: (
        (boom, contextlib.nullcontext, "") if backend == "triton" else real(op, backend, *a)))
    case = _case("group_norm_silu", "tiny.res")
    ref = ops.run_case(case, "reference", torch.float32, CPU, {}, None, quick=True)
    bad = ops.run_case(case, "triton", torch.float32, CPU, {}, None, quick=True)
    common.add_speedups([ref, bad], ("op", "case", "dtype"))
    assert bad["status"] == "error", f"crashing backend row has status {bad['status']!r}: {bad}"
    assert "RuntimeError: kernel crashed" in bad["note"], bad["note"]
    assert bad["median_ms"] is None and bad["speedup_vs_reference"] is None and bad["gbps"] is None, bad
    assert ref["status"] == "ok" and ref["speedup_vs_reference"] == 1.0, ref


def test_ops_run_gives_speed_ups_within_a_case_and_none_to_inaccurate_rows(monkeypatch):
    """ops.run fills speed-ups per (op, case, dtype) after turning inaccurate rows into errors. With
    run_case faked: tiny.res has reference 2 ms and triton 1 ms (accurate) -> 2.0; odd.hw has
    reference 8 ms and triton 4 ms but 10x the error allowed -> an error row with no speed-up (filled
    in before the accuracy check, it would keep 2.0). Across cases the base would be the other
    case's reference (tiny.res triton against odd.hw's 8 ms: 8.0)."""
    from bench import ops

    times = {("tiny.res", "reference"): (2.0, 1e-7), ("tiny.res", "triton"): (1.0, 1e-7),
             ("odd.hw", "reference"): (8.0, 1e-7), ("odd.hw", "triton"): (4.0, 1e-4)}

    def fake_run_case(case, backend, dtype, device, env, ceilings, **kw):
        ms, err = times[(case.name, backend)]
        return common.make_row(env, suite="ops", op=case.op, case=case.name, dtype=common.dtype_name(dtype),
                               backend=backend, status="ok", median_ms=ms, max_abs_err=err)

    monkeypatch.setattr(ops, "run_case", fake_run_case)
    rows = ops.run(["group_norm_silu"], ["reference", "triton"], [torch.float32], ["tiny.res", "odd.hw"], CPU, {},
                   None, quick=True, progress=False)
    got = {(r["case"], r["backend"]): (r["status"], r["speedup_vs_reference"]) for r in rows}
    assert got == {("tiny.res", "reference"): ("ok", 1.0), ("tiny.res", "triton"): ("ok", 2.0),
                   ("odd.hw", "reference"): ("ok", 1.0), ("odd.hw", "triton"): ("error", None)}, got


# ------------------------------------------------------------------------------- timing
def _linear_quantile(values, p):
    """The 'inclusive' (linear interpolation between closest ranks, numpy's default) quantile."""
    s = sorted(values)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("times, median, p20, p80", [
    # 6 values: sorted 1 2 3 4 5 100; median (3+4)/2; p20 at rank 0.2·5 = 1 -> 2; p80 at rank 4 -> 5
    ([4.0, 1.0, 3.0, 2.0, 100.0, 5.0], 3.5, 2.0, 5.0),
    # 7 values: ranks 1.2 and 4.8 fall between samples: 2 + 0.2·(3-2) = 2.2, 5 + 0.8·(7-5) = 6.6
    ([7.0, 1.0, 3.0, 2.0, 100.0, 5.0, 4.0], 4.0, 2.2, 6.6),
])
def test_summarize_gives_the_exact_median_and_inclusive_20_80_quantiles(times, median, p20, p80):
    """summarize's documented rule (median; 20/80 % quantiles, inclusive method): worked out by hand
    in the parameters and by an independent interpolation here. The mean (19.17 / 17.43) or the
    10/90 % quantiles (1.5/52.5 and 1.6/41.2) would differ."""
    t = common.summarize(times)
    assert (_linear_quantile(times, 0.2), _linear_quantile(times, 0.8)) == pytest.approx((p20, p80), rel=REL)
    assert t.median_ms == pytest.approx(median, rel=REL), f"median {t.median_ms}, expected {median}"
    assert t.p20_ms == pytest.approx(p20, rel=REL), f"p20 {t.p20_ms}, expected {p20} for {sorted(times)}"
    assert t.p80_ms == pytest.approx(p80, rel=REL), f"p80 {t.p80_ms}, expected {p80} for {sorted(times)}"
    assert t.reps == len(times), t


def test_time_fn_on_cuda_maps_do_bench_quantiles_to_median_p20_p80(monkeypatch):
    """On CUDA time_fn hands do_bench its quantiles and unpacks (median, p20, p80) from the answer.
    do_bench is faked to answer each quantile with a distinct value (0.5 -> 2, 0.2 -> 1, 0.8 -> 3),
    so swapped quantiles show as p20 3 / p80 1. The CUDA branch reads only ``device.type``, so a
    ``torch.device("cuda")`` object reaches it honestly without a GPU; nothing touches CUDA."""
    import triton.testing

    asked = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        asked.append(list(quantiles))
        return [{0.5: 2.0, 0.2: 1.0, 0.8: 3.0}[q] for q in quantiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = common.time_fn(lambda: None, torch.device("cuda"), quick=True)
    assert asked, "time_fn on a cuda device did not call triton.testing.do_bench"
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (2.0, 1.0, 3.0, None), \
        f"do_bench asked {asked[0]} -> Timing {t}; expected median 2, p20 1, p80 3"


def _fake_clock(monkeypatch, module, per_call_ms):
    """``module.time.perf_counter`` replaced by a clock that only the returned function advances, by
    ``per_call_ms[i]`` at its i-th call (the last value after that): timings exact on any host."""
    clock, calls = [0.0], []

    def fn():
        clock[0] += per_call_ms[min(len(calls), len(per_call_ms) - 1)] * 1e-3
        calls.append(1)

    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return fn, calls


def test_time_fn_on_cpu_reports_milliseconds(monkeypatch):
    """Calls taking 2 ms time at 2 ms on the CPU path (in µs it would read 2000, in s 0.002)."""
    fn, _ = _fake_clock(monkeypatch, common, [2.0])
    t = common.time_fn(fn, CPU, min_reps=3, warmup_ms=0, rep_ms=0)
    assert t.median_ms == pytest.approx(2.0, rel=1e-9), f"time_fn median {t.median_ms} ms for 2 ms calls"


def test_host_ms_divides_each_sample_by_its_calls(monkeypatch):
    """host_ms is per call, the median over samples: three samples of 20 calls taking 2, 5 and then
    3 ms each give 3 ms (not a sample's 60 ms, nor the mean)."""
    fn, calls = _fake_clock(monkeypatch, common, [2.0] * 20 + [5.0] * 20 + [3.0] * 20)
    ms = common.host_ms(fn, CPU, calls=20, samples=3)
    assert len(calls) == 60, f"expected 3 samples x 20 calls, got {len(calls)} calls"
    assert ms == pytest.approx(3.0, rel=1e-9), f"host_ms {ms} ms per call; samples of 2, 5 and 3 ms per call"


# ----------------------------------------------------------------------------- ceilings
def test_ceilings_count_copy_bytes_twice_and_matmul_flops_2n3(monkeypatch):
    """With every timing pinned to 1 ms: copy GB/s = 2 · x.nbytes (read + written) / 1e-3 s / 1e9 and
    matmul TFLOP/s = 2 · n³ / 1e-3 s / 1e12. The fake timer calls each timed function once to learn
    the copy's size and the matmul's n from what it returns, so the sizes are not read from the code."""
    seen = []

    def fake_time_fn(fn, device, **kw):
        seen.append(fn())
        return common.Timing(1.0, 1.0, 1.0, 3)

    monkeypatch.setattr(common, "time_fn", fake_time_fn)
    out = common.measure_ceilings(CPU, [torch.float32], quick=True)
    copied, product = seen
    assert product.dim() == 2 and product.shape[0] == product.shape[1], product.shape
    n = product.shape[0]
    assert out["copy_bytes"] == 2 * copied.nbytes, out
    assert out["copy_gbps"] == pytest.approx(2 * copied.nbytes / 1e-3 / 1e9, rel=REL), \
        f"copy ceiling {out['copy_gbps']} GB/s for {copied.nbytes} B copied in 1 ms (expected read + written)"
    assert out["matmul_n"] == n, out
    assert out["matmul_tflops"]["fp32"] == pytest.approx(2 * n**3 / 1e-3 / 1e12, rel=REL), \
        f"matmul ceiling {out['matmul_tflops']} TFLOP/s for n={n} in 1 ms (expected 2n³ flops)"


# ---------------------------------------------------------------------- speed-ups, best
def _row(backend, ms, status="ok", **kw):
    fields = dict(suite="ops", op="attention", case="c", dtype="fp16", backend=backend, status=status, median_ms=ms)
    return common.make_row({}, **{**fields, **kw})


def test_add_speedups_is_reference_time_over_row_time():
    """reference 2 ms, triton 1 ms: triton is 2.0x, reference 1.0x, a 4 ms row 0.5x; a row of
    another case (no reference in its group) and an error row get none."""
    rows = [_row("reference", 2.0), _row("triton", 1.0), _row("slow", 4.0), _row("triton", 1.0, case="other"),
            _row("broken", 0.5, status="error")]
    common.add_speedups(rows, ("op", "case", "dtype"))
    got = [r["speedup_vs_reference"] for r in rows]
    assert got == [1.0, 2.0, 0.5, None, None], f"speed-ups {got}, expected [1.0, 2.0, 0.5, None, None]"


def test_tune_speed_ups_are_against_the_default_config(tmp_path):
    """`bench tune` has no `reference` row: every ok candidate's speed-up is against `default`, which
    is 1.0 itself; with the reference as base every speed-up would be empty. One tiny GroupNorm case
    (odd.hw, quick grid) keeps the interpreted sweep to seconds."""
    from bench import tune

    with common.one_thread_on_cpu(CPU):
        rows = tune.run(["group_norm_silu"], [torch.float32], ["odd.hw"], CPU, {}, quick=True, progress=False)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 2, [(r["backend"], r["status"], r["note"]) for r in rows]
    (default,) = [r for r in rows if r["backend"] == common.DEFAULT_CONFIG]
    assert default["status"] == "ok" and default["speedup_vs_reference"] == 1.0, default
    for r in ok:
        assert r["speedup_vs_reference"] == pytest.approx(default["median_ms"] / r["median_ms"], rel=REL), \
            f"{r['backend']}: speed-up {r['speedup_vs_reference']} != default {default['median_ms']} / {r['median_ms']} ms"


def test_tune_times_each_launch_configuration_once(monkeypatch):
    """GroupNorm candidates whose labels differ but which launch_config clamps to one configuration
    (`c64` is `c16` at 4 channels per group; a tile or path the heuristic picks is the default's)
    are timed once: the later label is a skipped row naming the first, so a copy of the default can
    not be 'best' by noise, nor a `c64` that never ran. The timing is replaced by a recorder."""
    from bench import tune
    from kernels.group_norm_silu import launch_config

    timed = []
    monkeypatch.setattr(tune, "_run_candidate", lambda op, case, cand, *a: timed.append(cand.label)
                        or common.make_row({}, suite="tune", op=op, case=case.name, dtype="fp32", backend=cand.label,
                                           status="ok", median_ms=1.0))
    rows = tune.run(["group_norm_silu"], [torch.float32], ["unet15.down0.res"], CPU, {}, progress=False)
    case = next(c for c in tune.select_cases(["group_norm_silu"], ["unet15.down0.res"], False))
    args = tune._inputs("group_norm_silu", case, CPU, torch.float32)
    configs = {c.label: tune._resolved("group_norm_silu", c.config, args)
               for c in tune.group_norm_candidates(case, quick=False)}
    assert configs["default"] == launch_config((2, 320, 64, 64), 32, torch.float32, tune._gn_module()._sms(args[0]))
    assert len(timed) == len(set(configs.values())) < len(configs), (timed, len(configs))
    assert len({configs[label] for label in timed}) == len(timed), timed
    for r in rows:
        if r["backend"] not in timed:
            first = next(label for label in timed if configs[label] == configs[r["backend"]])
            assert r["status"] == "skipped" and f"same launch configuration as `{first}`" in r["note"], r


def test_best_configs_picks_the_fastest_ok_row():
    """Tune rows of 2, 1 and 3 ms (ok) and 0.5 ms (error: inaccurate) in one case: the 1 ms row wins;
    a second case has its own winner."""
    rows = [_row("a", 2.0, suite="tune"), _row("b", 1.0, suite="tune"), _row("c", 3.0, suite="tune"),
            _row("wrong", 0.5, status="error", suite="tune"), _row("d", 5.0, suite="tune", case="other")]
    best = {r["case"]: r["backend"] for r in common.best_configs(rows)}
    assert best == {"c": "b", "other": "d"}, f"best configs {best}, expected the 1 ms row 'b' for case c"


def test_a_candidate_within_the_defaults_spread_does_not_win():
    """Each candidate is timed once: the fastest of many equals reads a few percent under the
    default by noise. A candidate wins only under the default's p20; an inaccurate default leaves
    the fastest ok row."""
    rows = [_row("default", 1.0, suite="tune", p20_ms=0.95), _row("bm64", 0.97, suite="tune"),
            _row("default", 1.0, suite="tune", case="d", p20_ms=0.95), _row("bm128", 0.9, suite="tune", case="d"),
            _row("default", 0.5, suite="tune", case="e", status="error"), _row("bm32", 0.97, suite="tune", case="e")]
    best = {r["case"]: r["backend"] for r in common.best_configs(rows)}
    assert best == {"c": "default", "d": "bm128", "e": "bm32"}, best


def test_best_configs_are_per_run():
    """A results folder keeps an earlier run's rows: run A timed the default at 1.0 ms and a
    candidate at 1.2 ms; run B (another grid, a busier host) the default at 1.5 ms. The candidate
    that lost in its own run was named best, at 0.83x; each run now has its own best."""
    a, b = dict(date="2026-01-01", git_commit="a"), dict(date="2026-01-02", git_commit="b")
    rows = [_row("default", 1.0, suite="tune", **a), _row("bm128", 1.2, suite="tune", **a),
            _row("default", 1.5, suite="tune", **b)]
    best = sorted((r["date"], r["backend"]) for r in common.best_configs(rows))
    assert best == [("2026-01-01", "default"), ("2026-01-02", "default")], best


# ----------------------------------------------------------------------- accuracy rule
DOCUMENTED_ATOL = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}  # README: "(1e-3 fp16, 8e-3 bf16, 1e-5 fp32)"


def test_error_atol_is_the_documented_one():
    """The README states the atol per dtype; the table the rule reads must say the same."""
    assert common.ERROR_ATOL == DOCUMENTED_ATOL, f"ERROR_ATOL {common.ERROR_ATOL} != README's {DOCUMENTED_ATOL}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_within_error_is_twice_the_baseline_plus_the_dtypes_atol(dtype):
    """err <= 2 · base + atol: 10 % under the bound passes, 10 % of the atol over it fails, at a
    baseline error of 1e-3 (large enough that 3x the baseline would pass the over-bound error)."""
    atol, base = DOCUMENTED_ATOL[dtype], 1e-3
    under, over = 2 * base + 0.9 * atol, 2 * base + 1.1 * atol
    assert common.within_error(under, base, dtype), f"{dtype}: {under} should be within 2 x {base} + {atol}"
    assert not common.within_error(over, base, dtype), f"{dtype}: {over} should exceed 2 x {base} + {atol}"
    assert common.within_error(0.9 * atol, 0.0, dtype) and not common.within_error(1.1 * atol, 0.0, dtype), \
        f"{dtype}: with an exact baseline the bound is the atol {atol} alone"


# --------------------------------------------------------------------------------- rows
def test_skipped_rows_carry_no_timing_or_rates():
    """A skipped row measured nothing: median, quantiles, host time, GB/s, TFLOP/s and speed-up are
    all None (a 0.0 median would plot and average as a real, infinitely fast result)."""
    row = common.skipped_row({}, "needs a CUDA device", suite="ops", op="attention", case="c", dtype="fp16",
                             backend="sdpa-cudnn")
    empty = ("median_ms", "p20_ms", "p80_ms", "host_ms", "gbps", "tflops", "frac_of_peak", "speedup_vs_reference")
    assert row["status"] == "skipped" and row["note"] == "needs a CUDA device", row
    assert {k: row[k] for k in empty} == dict.fromkeys(empty), {k: row[k] for k in empty}
    common.add_speedups([_row("reference", 1.0), row], ("op", "case", "dtype"))
    assert row["speedup_vs_reference"] is None, row


def test_environment_names_the_software_and_every_row_carries_it():
    """environment() names python, torch, triton, CUDA (None on a CPU build of torch), the device
    and the git commit; each of those a row is documented to carry (device, versions, commit,
    date) is copied into make_row's rows unchanged, so rows stay comparable across runs."""
    env = common.environment(CPU)
    assert env["python"] == platform.python_version(), env.get("python")
    assert env["torch"] == torch.__version__ and env["torch"], env.get("torch")
    import triton

    assert env["triton"] == triton.__version__ and env["triton"], env.get("triton")
    assert env["cuda"] == torch.version.cuda, env.get("cuda")
    assert env["device"] == "cpu" and env["device_name"].startswith("CPU "), env
    commit = os.environ.get("SDLAB_GIT_COMMIT") or pipelines.common.git_commit()  # None outside a checkout
    assert env["sdlab"] == pipelines.common.sdlab_version(), env.get("sdlab")
    if commit is not None:
        assert env["git_commit"] == commit, (env["git_commit"], commit)
        assert re.fullmatch(r"[0-9a-f]{40}", commit) or os.environ.get("SDLAB_GIT_COMMIT"), commit
    assert env["date"], env
    row = common.make_row(env, status="ok", suite="ops", backend="reference")
    for key in ("device_name", "torch", "triton", "triton_launch", "cuda", "git_commit", "date"):
        assert key in env, f"environment() lacks {key}"
        assert row[key] == env[key], f"row[{key!r}] = {row[key]!r}, env[{key!r}] = {env[key]!r}"


def test_git_dirty_is_against_the_commit_sdlab_git_commit_names(tmp_path, monkeypatch):
    """SDLAB_GIT_COMMIT names a copied tree's commit: dirty is whether the tree differs from that
    commit, not from HEAD (a clean checkout of a later commit read as clean), and None (unknown)
    when this repository lacks the commit. Unset: git status against HEAD, as before."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "a")
    first = git("rev-parse", "HEAD")
    (tmp_path / "f.txt").write_text("b\n")
    git("commit", "-qam", "b")
    (tmp_path / "setup.py").write_text("")  # a checkout of this project (untracked: no change to judge)
    monkeypatch.setattr(pipelines.common, "ROOT", tmp_path)

    def env(named):
        if named is None:
            monkeypatch.delenv("SDLAB_GIT_COMMIT", raising=False)
        else:
            monkeypatch.setenv("SDLAB_GIT_COMMIT", named)
        e = common.environment(CPU)
        return e["git_commit"], e["git_dirty"]

    head = git("rev-parse", "HEAD")
    assert env(None) == (head, False) and env(head) == (head, False)
    assert env(first) == (first, True), "HEAD is clean, but the tree is not the named commit's"
    assert env("f" * 40) == ("f" * 40, None), "a commit git does not have: unknown, not clean"
    (tmp_path / "f.txt").write_text("a\n")  # the tree is now `first`'s, and HEAD's with a change
    assert env(first) == (first, False) and env(None) == (head, True)


def test_small_speed_ups_and_percentages_keep_two_significant_digits():
    """An interpreted kernel's speed-up (5.7e-04) and % of peak read "0.00x" and "0.0", as if nothing;
    a value under the column's last decimal is given in two significant digits, the others as before."""
    rows = [common.make_row({}, suite="ops", op="attention", backend=b, status="ok", speedup_vs_reference=up,
                            frac_of_peak=peak, frac_of_copy=copy, scheduler_share=share)
            for b, up, peak, copy, share in [("tiny", 5.7e-4, 2.64e-5, 7e-4, 3.5e-4),
                                             ("plain", 1.43, 0.211, 0.5, 0.004), ("zero", 0.0, 0.0, 0.0, 0.0)]]
    cols = [("b", "backend"), ("speed-up", "speedup_vs_reference"), ("% of peak", "frac_of_peak"),
            ("% of copy", "frac_of_copy"), ("share", "scheduler_share")]
    lines = common.markdown_table(rows, cols).splitlines()[2:]
    assert lines == ["| tiny | 5.7e-04x | 2.6e-03 | 7.0e-02 | 3.5e-02 % |",
                     "| plain | 1.43x | 21.1 | 50.0 | 0.4 % |",
                     "| zero | 0.00x | 0.0 | 0.0 | 0.0 % |"], lines


# ---------------------------------------------------------------------------- pipelines
def test_psnr_is_10_log10_of_one_over_mse_for_unit_range_images():
    """Images in [0, 1] off by 0.01 everywhere: MSE 1e-4, PSNR = 10·log10(1 / 1e-4) = 40 dB (peak 255,
    ln, or RMSE would read 88.1, 92.1 or 20 dB); identical images give inf."""
    from bench.pipelines import psnr

    a = torch.full((1, 3, 8, 8), 0.25, dtype=torch.float64)
    b = a + 0.01
    mse = 0.01**2
    assert psnr(a, b) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-9) == pytest.approx(40.0, rel=1e-9), \
        f"psnr {psnr(a, b)} dB for images 0.01 apart, expected 40"
    assert psnr(a, a.clone()) == math.inf


def test_each_variant_is_compared_with_the_all_reference_run(monkeypatch):
    """run_pipelines hands every variant the reference run's outputs as its baseline, not the previous
    variant's: latents 0 (reference), 1 (triton) and 3 (triton:attention) give triton:attention a
    max |Δ| of 3 (against reference), not 2 (against triton); its PSNR is likewise against the
    reference images (0.3 apart: 10·log10(1/0.09)), not triton's (0.2 apart)."""
    from bench import pipelines as bp

    outs = {"reference": 0.0, "triton": 1.0, "triton:attention": 3.0}
    seen = {}

    class FakeVariant:
        def __init__(self, spec, fn, model, opts, size, v, device, env, base):
            self.variant, self.env, self.base = v, env, base

        def start(self):
            pass

        def once(self):
            pass

        def row(self, baseline):
            v = self.variant
            seen[v] = baseline
            lat = torch.full((1, 4, 8, 8), outs[v])
            img = torch.full((1, 3, 64, 64), 0.1 * outs[v])
            row = common.make_row(self.env, status="ok", backend=v, median_ms=1.0, seconds_per_image=1e-3, **self.base)
            if baseline is not None:  # what PipelineVariant.row does with the baseline it is handed
                row["latent_max_abs_diff"] = (lat - baseline[0]).abs().max().item()
                row["psnr_db"] = bp.psnr(img, baseline[1])
            row["_outputs"] = (lat, img)
            return row

    monkeypatch.setattr(bp, "pipeline_setup", lambda spec, opts, device, base: (None, None, 64))
    monkeypatch.setattr(bp, "PipelineVariant", FakeVariant)
    opts = bp.Options(preset="tiny", ckpt=None, pipelines=["txt2img"], steps=2, batch=1, repeats=1, warmup=0,
                      dtype=torch.float32, unet_only=False, variants=list(outs), quick=True)
    rows = {r["backend"]: r for r in bp.run_pipelines(opts, CPU, {}, progress=False)}
    assert seen["reference"] is None, "the reference run has no baseline"
    for v in ("triton", "triton:attention"):
        assert seen[v] is not None and float(seen[v][0].max()) == 0.0, f"{v} compared with {seen[v]!r}"
        assert rows[v]["latent_max_abs_diff"] == pytest.approx(outs[v]), (v, rows[v]["latent_max_abs_diff"])
        expected_psnr = 10 * math.log10(1 / (0.1 * outs[v]) ** 2)
        assert rows[v]["psnr_db"] == pytest.approx(expected_psnr, rel=1e-6), (v, rows[v]["psnr_db"], expected_psnr)
    assert all("_outputs" not in r for r in rows.values()), "outputs must not stay in the rows"


@pytest.fixture(scope="module")
def batch2_rows():
    """txt2img and img2img on the tiny preset, batch 2, 4 steps, one warm-up run and one timed run
    (not --quick), reference kernels only; the UNet meter's total pinned to 12 ms per run."""
    from bench import pipelines as bp

    mp = pytest.MonkeyPatch()
    mp.setattr(bp.UNetMeter, "total_ms", lambda self: 12.0)
    try:
        opts = bp.Options(preset="tiny", ckpt=None, pipelines=["txt2img", "img2img"], steps=4, batch=2,
                          repeats=1, warmup=1, dtype=torch.float32, unet_only=False, variants=["reference"],
                          quick=False)
        with common.one_thread_on_cpu(CPU):  # as bench --quick: two threads on a shared 2-core host thrash
            rows = bp.run_pipelines(opts, CPU, {}, progress=False)
    finally:
        mp.undo()
        bp._MODELS.clear()
    return {r["op"]: r for r in rows}


def test_pipeline_rows_count_images_and_unet_calls_per_run(batch2_rows):
    """Batch 2: seconds_per_image · images_per_s == 1 (both per image, not per batch); UNet calls
    count calls per run, not per image: txt2img 4 steps -> 4, img2img at strength 0.75 -> 3.
    UNet ms/step = the meter's 12 ms per run / UNet calls: 3.0 and 4.0 (per step of the schedule
    would give 3.0 for both; the run's total 12)."""
    rows = batch2_rows
    expected = {"txt2img": (4, 3.0), "img2img": (3, 4.0)}
    for op, (calls, per_step) in expected.items():
        r = rows[op]
        assert r["status"] == "ok", f"{op}: {r['status']}: {r['note']}"
        assert r["batch"] == 2, r
        assert r["images_per_s"] * r["seconds_per_image"] == pytest.approx(1.0, rel=REL), \
            f"{op}: images/s {r['images_per_s']} x s/image {r['seconds_per_image']} != 1"
        assert r["seconds_per_image"] == pytest.approx(r["median_ms"] / 1e3 / 2, rel=REL), r
        assert r["unet_calls"] == calls, f"{op}: UNet calls {r['unet_calls']}, expected {calls} per run"
        assert r["unet_ms_per_step"] == pytest.approx(per_step, rel=REL), \
            f"{op}: UNet ms/step {r['unet_ms_per_step']}, expected 12 ms / {calls} calls = {per_step}"


def test_scheduler_calls_per_run_leave_the_warm_up_out(batch2_rows):
    """The dispatch counters span the warm-up run and the timed one; divided by both runs, the
    scheduler's calls per run equal one run's UNet calls (one update per step), not twice that."""
    rows = batch2_rows
    for op in ("txt2img", "img2img"):
        r = rows[op]
        assert r["scheduler_calls"] == r["unet_calls"], \
            f"{op}: scheduler calls {r['scheduler_calls']} per run != UNet calls {r['unet_calls']} (warm-up counted?)"


def test_unet_step_peak_adds_the_memory_resident_before_the_variant(monkeypatch):
    """unet_step_setup's peak = the allocator's peak + (resident before any variant - allocated
    before this one): a raw peak of 100 MiB with 10 MiB resident (and 0 allocated before, as on CPU)
    is 110 MiB. The variant and the peak reader are faked: no model is built."""
    from bench import pipelines as bp

    monkeypatch.setattr(bp, "_peak", lambda device: (100.0, "fake"))
    monkeypatch.setattr(bp, "_unet_variant", lambda *a, **k: (contextlib.nullcontext, lambda: torch.zeros(2, 4),
                                                              "", []))
    opts = bp.Options(preset="tiny", ckpt=None, pipelines=[], steps=2, batch=1, repeats=1, warmup=0,
                      dtype=torch.float32, unet_only=True, variants=["reference"], quick=True)
    s = bp.unet_step_setup("reference", None, None, None, None, None, opts, CPU, resident=10 * 2**20)
    assert s["peak"] == pytest.approx(110.0, rel=REL), f"peak {s['peak']} MiB, expected 100 + 10 resident"


# ---------------------------------------------------------------------------- breakdown
def test_op_breakdown_wall_ms_is_per_run(monkeypatch):
    """op_breakdown's wall_ms is one run's time: a 10 ms call profiled over 3 runs gives 10 ms (the 3
    runs together are 30)."""
    from bench import breakdown

    fn, calls = _fake_clock(monkeypatch, breakdown, [10.0])
    b = breakdown.op_breakdown(fn, CPU, runs=3)
    assert b.wall_ms == pytest.approx(10.0, rel=1e-9), f"wall_ms {b.wall_ms} for a 10 ms call profiled 3 times"


def test_pipeline_variants_are_timed_in_interleaved_rounds(monkeypatch):
    """Each variant warms up first, then the timed runs go round by round, every variant once per
    round in an order rotated by one (as the UNet step's): timed one variant after another, a host
    drifting within the run made one variant look faster. Each run's kernel calls are its own."""
    from bench import pipelines as bp

    order = []
    real_run = bp.PipelineVariant._run

    def run(self):
        order.append(self.variant)
        return real_run(self)

    monkeypatch.setattr(bp.PipelineVariant, "_run", run)
    opts = bp.Options(preset="tiny", ckpt=None, pipelines=["txt2img"], steps=2, batch=1, repeats=3, warmup=1,
                      dtype=torch.float32, unet_only=False, variants=["reference", "attention=sdpa"], quick=True)
    try:
        rows = {r["backend"]: r for r in bp.run_pipelines(opts, CPU, {}, progress=False)}
    finally:
        bp._MODELS.clear()
    ref, sdpa = "reference", "attention=sdpa"
    assert order == [ref, sdpa, ref, sdpa, sdpa, ref, ref, sdpa], order  # 2 warm-ups, then rounds rotated by one
    assert all(r["status"] == "ok" and r["reps"] == 3 for r in rows.values()), rows
    # counted as one variant's: calls of the other variant's attention backend would be named in the note
    assert "calls on" not in (rows[sdpa]["note"] or "") and "calls on" not in (rows[ref]["note"] or ""), rows
    assert rows[ref]["scheduler_calls"] == rows[sdpa]["scheduler_calls"] == 2, (rows[ref], rows[sdpa])
