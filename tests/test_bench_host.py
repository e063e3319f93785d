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
    (("--shapes", "no.such.case"), False, "selects no case"),
    (("--dtype", "int8"), False, "int8"),
])
def test_usage_errors_name_the_problem(args, interpret, message):
    r = run_host(*args, interpret=interpret)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr[-2000:])
