"""``python -m bench.host``: the Triton backends' host time per call, measured on the CPU with
Triton's driver stubbed (bench/host.py). Run in subprocesses without TRITON_INTERPRET, as the tool
must be; what is checked is that every layer is measured, not how fast it is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_host(*args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "bench.host", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def measured():
    """One run: a GroupNorm that takes one launch on an H100 and one that takes two, a cross-attention,
    a RePaint step; the first also inside a compiled graph."""
    r = run_host("--shapes", "unet15.mid.res", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    compiled = json.loads(r.stdout)
    r = run_host("--shapes", "unet15.down0.res", "unet15.attn.cross0", "sd15.latent.repaint", "--no-compiled",
                 "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    eager = json.loads(r.stdout)
    return compiled, eager


def test_every_layer_is_measured(measured):
    compiled, eager = measured
    records = {r["case"]: r for r in compiled["records"] + eager["records"]}
    assert set(records) == {"unet15.mid.res", "unet15.down0.res", "unet15.attn.cross0", "sd15.latent.repaint"}
    # H100 grids: the 8x8 mid block's groups take the one-launch forward, the 64x64 ones two passes
    launches = {name: r["launches"] for name, r in records.items()}
    assert launches == {"unet15.mid.res": 1, "unet15.down0.res": 2, "unet15.attn.cross0": 1,
                        "sd15.latent.repaint": 1}, launches
    for name, r in records.items():
        assert len(r["launch_us"]) == r["launches"], r
        # timed apart, so only their presence is checked: how they compare depends on the machine's load
        parts = [r["call_us"], r["dispatch_us"], r["switch_us"], r["backend_us"], *r["launch_us"]]
        assert all(0 < p < 1e5 for p in parts), f"{name}: a layer measured nothing (or ran 0.1 s): {r}"
    mid = records["unet15.mid.res"]
    assert mid["compiled_us"] > 0 and mid["graph_us"] > 0, mid
    assert "compiled_us" not in records["unet15.down0.res"], "--no-compiled still compiled"
    assert compiled["one_torch_call_us"] > 0 and compiled["cpu"] and compiled["triton"]


def test_the_table_names_every_layer():
    r = run_host("--shapes", "sd15.latent", "--no-compiled")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| call µs | checks µs | switch µs | backend µs | launches µs |" in r.stdout, r.stdout
    assert "| sd15.latent | (2,4,64,64) cfg | float16 |" in r.stdout, r.stdout


@pytest.mark.parametrize("args, interpret, message", [
    (("--shapes", "sd15.latent"), True, "run without TRITON_INTERPRET=1"),
    (("--shapes", "no.such.case"), False, "unknown shape case 'no.such.case'; valid: unet15.down0.res, "),
    # a name that selects nothing beside one that does was dropped without a word: a shorter table
    (("--shapes", "sd15.latent", "unet15.atn"), False, "unknown shape case 'unet15.atn'; valid: "),
    (("--shapes", ""), False, "--shapes: no values given; valid: "),
    (("--dtype", "int8"), False, "int8"),
])
def test_usage_errors_name_the_problem(args, interpret, message):
    r = run_host(*args, interpret=interpret)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr[-2000:])


class DriftingHost:
    """A clock and two functions on a host slowing down as it runs (load rising, clocks dropping):
    each call costs its base µs times 1 + 1e-4 per call made so far. ``call`` is ``dispatch`` plus
    ``checks`` µs, as kernels.<op> is registry.dispatch plus the op's argument checks."""

    def __init__(self, dispatch_us: float, checks_us: float):
        self.now, self.n, self.base = 0.0, 0, dispatch_us
        self.call = lambda: self._run(dispatch_us + checks_us)
        self.dispatch = lambda: self._run(dispatch_us)

    def _run(self, us: float):
        self.n += 1
        self.now += us * (1 + 1e-4 * self.n) * 1e-6

    def perf_counter(self) -> float:
        return self.now


def test_checks_are_timed_in_turns_with_the_dispatch_and_never_negative(monkeypatch):
    """checks = call - dispatch, each timed apart, read -1.9 µs for checks of 1 µs on a host that
    slowed down between the two. Timed in turns, the median difference is the checks' 1 µs (scaled
    by the slow-down so far); a call timed faster than its dispatch (noise) gives 0, flagged, and
    the table marks it."""
    from bench import host

    clock = DriftingHost(dispatch_us=10.0, checks_us=1.0)
    monkeypatch.setattr(host, "time", clock)
    apart = host.per_call_us(clock.call) - host.per_call_us(clock.dispatch)
    assert apart < -1, f"the drift this test models: timed apart, checks read {apart:.2f} µs"

    clock = DriftingHost(dispatch_us=10.0, checks_us=1.0)
    monkeypatch.setattr(host, "time", clock)
    calls, dispatches = host.interleaved_us([clock.call, clock.dispatch])
    checks, clamped = host.checks_us(calls, dispatches)
    assert 1.0 <= checks < 1.5 and not clamped, (checks, calls, dispatches)

    clock = DriftingHost(dispatch_us=10.0, checks_us=-0.5)  # noise: the call timed faster than its dispatch
    monkeypatch.setattr(host, "time", clock)
    assert host.checks_us(*host.interleaved_us([clock.call, clock.dispatch])) == (0.0, True)
    record = dict(case="c", shape="s", dtype="float16", call_us=9.5, checks_us=0.0, checks_clamped=True,
                  switch_us=1.0, backend_us=5.0, launch_us=[3.0])
    table = host.render([record], 0.5)
    assert "| c | s | float16 | 9.5 | 0.0* | 1.0 | 5.0 | 3.0 |  |" in table, table
    assert "* The call timed below its dispatch" in table, table
