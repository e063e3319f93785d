"""Smoke tests of ``python -m bench`` on CPU: output format, CLI errors, skipped rows.

The CLI runs in-process (``bench.__main__.main(argv)``) to keep this file fast.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from bench import common
from bench.__main__ import main


def _run(argv, tmp_path):
    rc = main([*argv, "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "results.json").read_text())
    return rc, data


def _rows(data, **where):
    return [r for r in data["rows"] if all(r[k] == v for k, v in where.items())]


@pytest.fixture(scope="module")
def ops_quick(tmp_path_factory):
    """One `bench ops --quick` run shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("ops_quick")
    rc = main(["ops", "--quick", "--out", str(out), "--no-progress"])
    return rc, json.loads((out / "results.json").read_text()), out


def test_ops_quick_writes_json_markdown_and_plots(ops_quick):
    rc, data, out = ops_quick
    assert set(data) == {"env", "ceilings", "rows"}
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "date"):
        assert key in data["env"], f"env lacks {key}: {sorted(data['env'])}"
    assert data["ceilings"]["copy_gbps"] and data["ceilings"]["copy_gbps"] > 0, data["ceilings"]
    assert data["rows"], "no rows"
    for r in data["rows"]:
        assert set(r) == set(common.ROW_KEYS), f"row keys differ: {set(r) ^ set(common.ROW_KEYS)}"
        assert r["status"] in ("ok", "skipped", "error"), r
        if r["status"] != "ok":
            assert r["note"], f"{r['status']} row without a reason: {r}"
    assert (out / "results.md").read_text().count("| group_norm_silu |") >= 2
    assert list(out.glob("speedup-*.png")), "no plots written"


def test_ops_quick_reference_rows_are_timed_and_checked(ops_quick):
    _, data, _ = ops_quick
    ops_run = {r["op"] for r in data["rows"]}
    assert {"group_norm_silu", "attention"} <= ops_run, ops_run
    for op in ops_run:
        refs = _rows(data, op=op, backend="reference")
        assert refs, f"no reference rows for {op}"
        for r in refs:
            assert r["status"] == "ok", f"{op} {r['case']}: reference row {r['status']}: {r['note']}"
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-4, r
            assert r["speedup_vs_reference"] == pytest.approx(1.0), r
            assert r["gbps"] and r["gbps"] > 0, r
            assert r["host_ms"] and r["host_ms"] > 0, r
    attn = _rows(data, op="attention", backend="reference")
    assert all(r["tflops"] and r["flops"] for r in attn), attn
    # memory-bound ops are also held against a copy of the same bytes; attention is not
    for op in ("group_norm_silu", "scheduler_step"):
        for r in _rows(data, op=op, backend="reference"):
            assert r["frac_of_copy"] is not None and 0 < r["frac_of_copy"] < 100, r
            assert r["frac_of_copy"] == pytest.approx(r["copy_ms"] / r["median_ms"]), r  # checkable from the JSON
    assert all(r["frac_of_copy"] is None for r in attn), attn


def test_triton_dispatch_rows_sit_beside_triton(ops_quick):
    """Each op with a triton row has a triton-dispatch row (the same kernel through Triton's own
    launch dispatch). Under the interpreter both are the same thing, so it is skipped, saying so."""
    from kernels import _launch

    _, data, _ = ops_quick
    for op in ("group_norm_silu", "attention", "scheduler_step"):
        rows = _rows(data, op=op, backend="triton-dispatch")
        assert rows and len(rows) == len(_rows(data, op=op, backend="triton")), op
        if not _launch.ENABLED:
            assert all(r["status"] == "skipped" and "Triton's dispatch" in r["note"] for r in rows), rows


def test_copy_ms_is_cached_per_size():
    cache = {}
    device = torch.device("cpu")
    t = common.copy_ms(1 << 20, device, cache, quick=True)
    assert t is not None and t > 0 and list(cache) == [1 << 19], cache
    assert common.copy_ms(1 << 20, device, cache, quick=True) == t  # the same measurement, not a new one


def test_ops_quick_compile_and_cuda_only_backends_are_skipped_with_a_reason(ops_quick):
    _, data, _ = ops_quick
    compiled = _rows(data, backend="compile")
    assert compiled and all(r["status"] == "skipped" and "--quick" in r["note"] for r in compiled), compiled
    if common.pick_device(None).type == "cpu":
        cudnn = _rows(data, backend="sdpa-cudnn")
        assert cudnn and all(r["status"] == "skipped" and "CUDA" in r["note"] for r in cudnn), cudnn


def test_backend_refusing_the_input_is_a_skipped_row(tmp_path, monkeypatch):
    """A backend whose check() refuses the input (BackendUnsupported) -> skipped, with its reason."""
    from kernels import registry

    impl = registry._OPS["attention"][registry.Backend.SDPA]
    monkeypatch.setitem(registry._OPS["attention"], registry.Backend.SDPA,
                        registry._Impl(impl.fn, lambda *a, **k: "pretend head-dim limit"))
    rc, data = _run(["ops", "--quick", "--ops", "attention", "--backends", "sdpa", "--no-plot"], tmp_path)
    rows = _rows(data, backend="sdpa")
    assert rows and all(r["status"] == "skipped" and "pretend head-dim limit" in r["note"] for r in rows), rows
    refs = _rows(data, backend="reference")  # --backends sdpa: the reference runs too, as the speed-ups' base
    assert refs and all(r["status"] == "ok" for r in refs), f"reference must still run: {refs}"
    assert rc == 0


@pytest.mark.parametrize("argv,needle", [
    (["pipelines", "--ckpt", "README.md", "--preset", "tiny"], "give one"),
    (["pipelines", "--prediction-type", "v_prediction"], "--prediction-type v_prediction overrides a --ckpt's"),
    (["pipelines", "--unet-only", "--pipelines", "txt2img"], "--pipelines applies to the pipeline rows"),
    (["pipelines", "--unet-only", "--batch", "4"], "--batch applies to the pipeline rows and would be ignored"),
    (["pipelines", "--unet-only", "--steps", "7"], "--steps applies to the pipeline rows"),
    (["pipelines", "--unet-only", "--repeats", "9"], "--repeats applies to the pipeline rows"),
    (["tune", "--masked-tail", "--ops", "group_norm_silu"], "has no attention"),
    (["tune", "--masked-tail", "--ops", "attention.backward"], "attention.backward and attention.gluon_sm90 have no"),
])
def test_flags_that_would_be_ignored_are_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle,valid", [
    (["ops", "--ops", "softmax"], "unknown op 'softmax'", "group_norm_silu"),
    (["ops", "--backends", "cutlass"], "unknown backend 'cutlass'", "sdpa-flash"),
    (["ops", "--dtypes", "fp8"], "unknown dtype 'fp8'", "bf16"),
    (["ops", "--shapes", "unet99.res"], "unknown shape case 'unet99.res'", "unet15.down0.res"),
    (["pipelines", "--preset", "sdxl"], "unknown preset 'sdxl'", "sd15-inpaint"),
    (["pipelines", "--pipelines", "outpaint"], "unknown pipeline 'outpaint'", "repaint"),
])
def test_unknown_names_error_with_the_valid_ones(argv, needle, valid, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and valid in err, err
    assert f"usage: python -m bench {argv[0]} " in err, f"not the subcommand's usage: {err}"


@pytest.mark.parametrize("argv,flag,valid", [
    (["ops", "--ops", ""], "--ops", "group_norm_silu"),
    (["ops", "--ops", ","], "--ops", "attention"),
    (["tune", "--ops", " , "], "--ops", "attention.backward"),
    (["ops", "--backends", ""], "--backends", "sdpa-flash"),
    (["ops", "--dtypes", ""], "--dtypes", "bf16"),
    (["ops", "--shapes", ""], "--shapes", "tiny.latent.repaint"),
    (["pipelines", "--pipelines", ""], "--pipelines", "repaint"),
    (["pipelines", "--quick", "--variants", ""], "--variants", "triton:attention"),
])
def test_empty_lists_are_errors_not_everything(argv, flag, valid, capsys):
    """`--ops ""` once ran every op, and `--variants ""` even ran interpreted Triton under --quick."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{flag}: no values given; valid: " in err and valid in err, err


@pytest.mark.parametrize("name", ["mps", "meta", "cuda", "cuda:7", "cpu:3", "nonsense"])
def test_unusable_devices_are_refused(name, capsys):
    """Only cpu and the GPUs torch sees: any other device made every row an error."""
    if name.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    with pytest.raises(SystemExit) as exc:
        main(["ops", "--quick", "--device", name])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and f"error: --device {name}: " in err and "usable here: cpu" in err, err
    assert err.count("--device") == 1, f"flag named twice: {err}"


def test_pick_device_takes_only_the_gpus_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.pick_device("cuda:0") == torch.device("cuda:0")
    assert common.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"torch sees 1 CUDA device\(s\); usable here: cpu, cuda, cuda:0$"):
        common.pick_device("cuda:1")
    with pytest.raises(ValueError, match="cpu or cuda only"):
        common.pick_device("mps")


def test_exact_shape_name_selects_that_case_alone(capsys):
    """A full case name is that case, not every name it prefixes; a prefix, or a name with a
    trailing *, still selects all it prefixes."""
    from bench import ops

    assert [c.name for c in ops.select_cases(ops.known_ops(), ["tiny.latent"], True)] == ["tiny.latent"]
    assert [c.name for c in ops.select_cases(["attention"], ["unet15.attn.self0"], False)] == ["unet15.attn.self0"]
    assert [c.name for c in ops.select_cases(["attention"], ["unet15.attn.self0*"], False)] == [
        "unet15.attn.self0", "unet15.attn.self0.b1"]
    assert [c.name for c in ops.select_cases(["scheduler_step"], ["tiny.lat"], True)] == [
        "tiny.latent", "tiny.latent.repaint"]
    assert main(["ops", "--list-shapes", "--shapes", "unet15.attn.self0", "tiny.latent"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["unet15.attn.self0", "tiny.latent"]


def test_repeated_values_run_once(tmp_path):
    """`--shapes tiny.latent tiny.latent --dtypes fp32 fp32 float`: one row, not one per repeat."""
    rc, data = _run(["ops", "--quick", "--no-plot", "--ops", "scheduler_step,scheduler_step", "--backends",
                     "reference", "--shapes", "tiny.latent", "tiny.latent", "--dtypes", "fp32", "fp32", "float"],
                    tmp_path)
    assert rc == 0 and [(r["case"], r["dtype"], r["backend"]) for r in data["rows"]] == [
        ("tiny.latent", "fp32", "reference")], data["rows"]


@pytest.mark.parametrize("argv,needle", [
    (["ops", "--list-shapes", "--ops", "softmax"], "unknown op 'softmax'"),  # validated before listing
    (["pipelines", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["pipelines", "--batch", "-1"], "--batch must be >= 1, got -1"),
    # img2img (0.75) would run no step: an error row, after the other pipelines had run
    (["pipelines", "--steps", "1"], "--steps 1: img2img at strength 0.75 runs the last int(steps x strength) = 0 "
                                    "of them; use >= 2 steps, or --pipelines without img2img"),
    (["all", "--quick", "--steps", "1", "--pipelines", "img2img", "repaint"], "--steps 1: img2img at strength"),
    (["ops", "--plugin", "no_such_pkg"], "no module 'no_such_pkg'"),
    (["ops", "--plugin", "{tmp}/empty_plugin.py"], "it registered no backend"),
    (["ops", "--backends", "plugin_attention"], "unknown backend 'plugin_attention'"),  # no --plugin
    (["pipelines", "--variants", "trition"], "unknown variant 'trition'; valid: reference, triton"),
    (["pipelines", "--variants", "attention=nope"], "op 'attention' has no 'nope' backend; valid: reference"),
    (["pipelines", "--variants", "attention=sdpa+attention=reference"], "op 'attention' is named twice"),
    (["pipelines", "--variants", "attention="], "expected op=backend items"),
    (["ops", "--out", ""], "argument --out: an empty path"),  # `--out "$UNSET"` wrote into the working directory
    (["pipelines", "--ckpt", " "], "argument --ckpt: an empty path"),
    # read before the run: a folder that is no model made every row an error, over the earlier results
    (["pipelines", "--ckpt", "{tmp}"], "--ckpt {tmp}: a folder but not a diffusers pipeline (no model_index.json)"),
    (["pipelines", "--ckpt", "README.md"], "--ckpt README.md: not a readable safetensors file"),
    (["pipelines", "--ckpt", "{tmp}/junk.ckpt"], "--ckpt {tmp}/junk.ckpt: not a readable torch checkpoint (truncated "
                                                "or corrupt?): KeyError"),  # was a bare KeyError from torch
    (["ops", "--plugin", "{tmp}/raising_plugin.py"],
     "--plugin {tmp}/raising_plugin.py: loading it raised RuntimeError: boom (at {tmp}/raising_plugin.py:2)"),
    (["ops", "--plugin", "{tmp}/gpu_plugin.py"],  # its own message begins as load_plugin's do
     "--plugin {tmp}/gpu_plugin.py: loading it raised RuntimeError: plugin needs sm_90 (at {tmp}/gpu_plugin.py:2)"),
])
def test_bad_values_are_parser_errors(argv, needle, capsys, tmp_path):
    (tmp_path / "empty_plugin.py").write_text("import kernels\n")
    (tmp_path / "raising_plugin.py").write_text("import kernels\nraise RuntimeError('boom')\n")
    (tmp_path / "junk.ckpt").write_bytes(b"junk\n")
    (tmp_path / "gpu_plugin.py").write_text("import kernels\nraise RuntimeError('plugin needs sm_90')\n")
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle.format(tmp=tmp_path) in err and "Traceback" not in err, err


def test_out_that_is_a_file_fails_before_running(tmp_path, capsys):
    """A run whose results could not be written is refused up front, not after the run."""
    target = tmp_path / "taken"
    target.write_text("")
    with pytest.raises(SystemExit):
        main(["ops", "--quick", "--out", str(target)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_out_that_cannot_be_written_fails_before_running(tmp_path, capsys, monkeypatch):
    """An --out under a plain file (or where the OS refuses) is a parser error naming the path and
    the OS's reason, before anything runs; so is a default directory that cannot be written."""
    from bench import ops

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(ops, "run", lambda *a, **k: pytest.fail("the suite ran"))
    for out in [tmp_path / "afile" / "x", *([Path("/proc/nope/x")] if Path("/proc/self").exists() else [])]:
        with pytest.raises(SystemExit) as exc:
            main(["ops", "--quick", "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--out {out}: cannot write there: " in err, err
        assert "usage: python -m bench ops" in err, err
    monkeypatch.setattr(common, "default_out_dir", lambda env, quick=False: tmp_path / "afile" / "y")
    assert main(["ops", "--quick", "--no-progress"]) == 2
    assert f"cannot write results to {tmp_path / 'afile' / 'y'}: Not a directory" in capsys.readouterr().err


def test_list_shapes_filters_by_shapes(capsys):
    assert main(["ops", "--list-shapes", "--ops", "attention", "--shapes", "unet15.attn.cross"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["unet15.attn.cross0", "unet15.attn.cross1"], lines


def test_summarize_takes_the_median_and_quantiles():
    """Pipeline repeats: the true median of an even count and the 20/80 % quantiles, not min/max."""
    t = common.summarize([4.0, 1.0, 3.0, 2.0, 100.0, 5.0])
    assert t.median_ms == 3.5 and t.reps == 6
    assert 1.0 < t.p20_ms < t.median_ms < t.p80_ms < 100.0, t


def test_inaccurate_rows_are_errors():
    """A backend whose error exceeds 2x the reference's + atol is an error row, whatever its speed."""
    from bench import ops

    def row(backend, err, dtype="fp16"):
        return dict(op="attention", case="c", dtype=dtype, backend=backend, status="ok", max_abs_err=err, note="")

    rows = [row("reference", 1e-3), row("triton", 2.9e-3), row("fast", 3.1e-3), row("fp32", 3e-3, "fp32")]
    ops.flag_inaccurate(rows)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"], rows  # fp32 has no reference row here
    assert rows[2]["note"].startswith("inaccurate: max abs error 0.0031 > 2 x reference's 0.001 + 0.001"), rows[2]


def test_noisy_timings_are_flagged_in_the_note():
    """A p20-p80 spread over 2x (a busy 2-core host gave sdpa rows of 0.017-7.4 ms and a '1050x'
    speed-up marked ok) is named in the row's note; a tight or untimed row is left alone."""
    noisy = common.make_row({}, status="ok", note="interpreted", median_ms=1.0, p20_ms=0.5, p80_ms=7.5)
    assert noisy["note"] == "interpreted; noisy timing: p80 is 15.0x p20", noisy["note"]
    assert common.make_row({}, status="ok", note="", median_ms=1.0, p20_ms=0.9, p80_ms=1.7)["note"] == ""
    assert common.make_row({}, status="skipped", note="no GPU")["note"] == "no GPU"


def test_unet_only_keeps_earlier_pipeline_rows(tmp_path):
    """`pipelines --unet-only` into a directory with pipeline rows replaces only the UNet-step rows."""
    main(["pipelines", "--quick", "--no-plot", "--pipelines", "txt2img", "--variants", "reference",
          "--out", str(tmp_path), "--no-progress"])
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference"], tmp_path)
    assert _rows(data, suite="pipelines", op="txt2img"), "the txt2img rows of the first run were dropped"
    assert len(_rows(data, suite="unet_step", backend="reference")) == 1, data["rows"]


def test_a_pipelines_run_keeps_the_ceilings_of_the_op_rows_it_keeps(tmp_path):
    """`bench ops` then `bench pipelines` into one directory: the file's ceilings stay those the op
    rows were divided by (the pipelines run measured and wrote its own, which its rows never use),
    so every kept row's % of peak still checks against the file."""
    _run(["ops", "--quick", "--no-plot", "--ops", "group_norm_silu", "--shapes", "tiny.res",
          "--backends", "reference"], tmp_path)
    first = json.loads((tmp_path / "results.json").read_text())["ceilings"]
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference"], tmp_path)
    assert rc == 0 and data["ceilings"] == first, (first, data["ceilings"])
    ops_rows = _rows(data, suite="ops")
    assert ops_rows and all(math.isclose(r["frac_of_peak"], r["gbps"] / data["ceilings"]["copy_gbps"])
                            for r in ops_rows), ops_rows
    # ceilings an earlier run left with no op rows (as pipelines runs wrote them) are not kept
    other = tmp_path / "other"
    _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference"], other)
    stale = json.loads((other / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**stale, "ceilings": first}))
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference"], other)
    assert rc == 0 and data["ceilings"] is None, data["ceilings"]
    assert "Device ceilings" not in (other / "results.md").read_text()


def test_diffusers_baseline_weights_are_not_in_its_peak(tmp_path, monkeypatch):
    """The diffusers-sdpa UNet-step row's peak window opens after its model (a second copy of the
    weights, standing in for the UNet's own that ``resident`` counts) is built: on an H100 its peak
    read 3862 MiB, one 1639 MiB weight copy above the triton row's. The order is what a CPU can see."""
    from bench import pipelines as bp

    events = []
    real_build, real_reset = bp._diffusers_unet, bp._peak_reset
    monkeypatch.setattr(bp, "_diffusers_unet", lambda *a: events.append("build") or real_build(*a))
    monkeypatch.setattr(bp, "_peak_reset", lambda device: events.append("peak window") or real_reset(device))
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--rounds", "1",
                     "--variants", "reference", "diffusers-sdpa"], tmp_path)
    row, = _rows(data, suite="unet_step", backend="diffusers-sdpa")
    assert rc == 0 and row["status"] == "ok", row
    assert events.count("build") == 1 and events[events.index("build") + 1] == "peak window", events


def test_unet_step_rounds_interleave_variants(tmp_path, monkeypatch):
    """`--rounds 3` times every variant once per round, in an order rotated by one each round (host
    drift lands on all variants alike); a row is the median of its round medians."""
    from bench import pipelines as bp

    visits = []
    real_time_fn = bp.time_fn

    def spy(fn, device, **kw):
        timing = real_time_fn(fn, device, **kw)
        visits.append(timing.median_ms)
        return timing

    monkeypatch.setattr(bp, "time_fn", spy)
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--rounds", "3",
                     "--variants", "reference", "diffusers-sdpa"], tmp_path)
    rows = {r["backend"]: r for r in _rows(data, suite="unet_step")}
    assert len(visits) == 6, visits
    for v, r in rows.items():
        assert r["status"] == "ok" and r["rounds"] == 3, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
    # rotation: round 0 visits reference then diffusers-sdpa, round 1 the other way round
    ref_medians = [visits[0], visits[3], visits[4]]
    assert rows["reference"]["median_ms"] == sorted(ref_medians)[1], (visits, rows["reference"])
    assert "Timed in 3 interleaved rounds" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["pipelines", "--quick", "--unet-only", "--rounds", "0", "--out", str(tmp_path)])


def test_kernel_scope_changes_nothing_until_entered(monkeypatch):
    """The UNet-step setup makes scopes for their note and ops alone: on CUDA (the registry's
    default for the Triton ops, the rest pinned) making one must not pin ops or set aside
    SDLAB_KERNELS; entering it does both, and leaving undoes them."""
    import kernels
    from bench.pipelines import kernel_scope
    from kernels import registry

    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    scope, note, want = kernel_scope("triton:attention", torch.device("cuda"))
    assert want == ["attention"] and registry._SCOPES == [], registry._SCOPES
    assert os.environ[kernels.ENV_VAR] == "reference"
    with scope:
        assert kernels.ENV_VAR not in os.environ
        assert registry._choice("group_norm_silu")[0] == "reference"
        assert registry._choice("attention") == (None, "")  # left to the default: triton on CUDA
    assert registry._SCOPES == [] and os.environ[kernels.ENV_VAR] == "reference"


def test_reference_runs_first_wherever_it_is_listed(tmp_path):
    """Every row's difference from the all-reference run needs that run first: `--variants
    triton:scheduler_step reference` still fills the triton row's max |Δ| and PSNR."""
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--pipelines", "txt2img", "--variants",
                     "triton:scheduler_step", "reference"], tmp_path)
    rows = _rows(data, suite="pipelines", op="txt2img")
    assert [r["backend"] for r in rows] == ["reference", "triton:scheduler_step"], rows
    assert rows[1]["status"] == "ok" and rows[1]["latent_max_abs_diff"] is not None, rows[1]


def test_ckpt_of_the_other_unet_kind_gives_skipped_rows(tmp_path):
    """A 9-channel --ckpt: txt2img is skipped with the reason, unet9 runs (and a 4-channel one skips
    unet9 the same way), and the run exits 0."""
    import sdcore

    ckpt = tmp_path / "tiny9.safetensors"
    sdcore.StableDiffusion.from_preset("tiny-inpaint", seed=0).save(ckpt)
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--ckpt", str(ckpt), "--pipelines", "txt2img", "unet9",
                     "--variants", "reference"], tmp_path / "out")
    assert rc == 0
    (txt,), (unet9,) = _rows(data, suite="pipelines", op="txt2img"), _rows(data, suite="pipelines", op="unet9")
    assert txt["status"] == "skipped" and "9-channel inpainting UNet; this pipeline needs a 4-channel" in txt["note"]
    assert unet9["status"] == "ok", unet9


def test_ckpt_prediction_type_reaches_the_model(tmp_path):
    """A single file without sdcore's metadata reads as epsilon; --prediction-type v_prediction is
    how an SD 2.x 768-v file is benchmarked as what it is (the CLI had no way to say it)."""
    import sdcore
    from bench import pipelines as bench_pipelines
    from safetensors.torch import save_file

    ckpt = tmp_path / "sd2v.safetensors"
    save_file({k: v.contiguous() for k, v in sdcore.StableDiffusion.from_preset("tiny-sd2", seed=0).state_dict().items()},
              str(ckpt))  # no metadata: as the SD 2.1 768-v release is
    seen = []
    real = sdcore.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdcore, "load", lambda *a, **k: seen.append(k.get("prediction_type")) or real(*a, **k))
        bench_pipelines._MODELS.clear()
        rc, data = _run(["pipelines", "--quick", "--no-plot", "--ckpt", str(ckpt), "--prediction-type", "v_prediction",
                         "--pipelines", "txt2img", "--variants", "reference"], tmp_path / "out")
    assert rc == 0 and seen and set(seen) == {"v_prediction"}, (rc, seen)
    rows = _rows(data, suite="pipelines", op="txt2img")
    assert rows and all(r["status"] == "ok" for r in rows), rows


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["all", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--ops", "--backends", "--dtypes", "--shapes", "--quick", "--out", "--no-plot", "--preset",
                "--ckpt", "--prediction-type", "--pipelines", "--steps", "--unet-only"):
        assert opt in out, f"--help does not mention {opt}"
    assert "with --quick 1; interpreted Triton variants get no warm-up" in " ".join(out.split()), (
        "--repeats must say which runs get no warm-up")


def test_sm90_help_and_unknown_flags_compile_nothing(capsys, monkeypatch):
    """`python -m bench.sm90 --help` prints help; a misspelt flag is an error, not a full compile run."""
    from bench import sm90

    monkeypatch.setattr(sm90, "sd15_calls", lambda: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as exc:
        sm90.main(["--help"])
    assert exc.value.code == 0 and "--json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        sm90.main(["--jsn"])
    assert exc.value.code == 2 and "unrecognized arguments: --jsn" in capsys.readouterr().err


def test_failed_ckpt_rows_name_the_checkpoint(tmp_path, monkeypatch):
    """A --ckpt that is read before the run but then fails to load (a junk file is a usage error
    before it: see test_bad_values_are_parser_errors): every row (UNet step and pipeline) names it,
    not the preset."""
    import sdcore

    ckpt = tmp_path / "tiny.safetensors"
    sdcore.StableDiffusion.from_preset("tiny").save(ckpt)

    def fails(path, **_):
        raise sdcore.CheckpointError(f"{path}: pretend its tensor data is truncated")

    monkeypatch.setattr(sdcore, "load", fails)
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--ckpt", str(ckpt), "--pipelines", "txt2img",
                     "--variants", "reference"], tmp_path / "out")
    assert rc == 1 and {r["suite"] for r in data["rows"]} == {"unet_step", "pipelines"}, data["rows"]
    assert all(r["preset"] == str(ckpt) and r["status"] in ("error", "skipped") and "pretend" in r["note"]
               for r in data["rows"]), data["rows"]


def test_two_checkpoints_of_one_file_name_are_two_models(tmp_path):
    """ckA/model.safetensors then ckB/model.safetensors into one folder: both models' rows stay,
    each naming its path (the second replaced the first's as 'model.safetensors', silently)."""
    import sdcore

    for name, seed in (("ckA", 0), ("ckB", 5)):
        (tmp_path / name).mkdir()
        sdcore.StableDiffusion.from_preset("tiny", seed=seed).save(tmp_path / name / "model.safetensors")
        rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference",
                         "--ckpt", str(tmp_path / name / "model.safetensors")], tmp_path / "out")
        assert rc == 0
    presets = sorted(r["preset"] for r in data["rows"] if r["suite"] == "unet_step")
    assert presets == [str(tmp_path / n / "model.safetensors") for n in ("ckA", "ckB")], presets


def test_pipelines_quick(tmp_path):
    import pipelines

    assert all(hasattr(pipelines, f) for f in ("txt2img", "img2img", "inpaint"))
    rc, data = _run(["pipelines", "--quick", "--no-plot"], tmp_path)
    step = _rows(data, suite="unet_step", backend="reference")
    assert step and step[0]["status"] == "ok" and step[0]["median_ms"] > 0, step
    assert step[0]["host_ms"] and step[0]["host_ms"] > 0, step  # CPU: host time is the step time
    if common.pick_device(None).type == "cpu":
        graphed = _rows(data, suite="unet_step", backend="triton@graph")
        assert graphed and graphed[0]["status"] == "skipped" and "CUDA" in graphed[0]["note"], graphed
    pipes = _rows(data, suite="pipelines", backend="reference")
    assert {r["op"] for r in pipes} == {"txt2img", "img2img", "repaint", "unet9", "blend"}, pipes
    for r in pipes:
        assert r["status"] == "ok", f"{r['op']}: {r['status']}: {r['note']}"
        assert r["unet_calls"] and r["unet_calls"] > 0 and r["seconds_per_image"] > 0, r
        assert r["shape"] == "64x64 px, batch 1", r["shape"]  # the tiny preset's image size
        # one scheduler update per denoising step, plus for RePaint one renoise launch per jump back
        # (--quick's 2 steps get a 1-step walk resampled twice); its estimated share of the run in (0, 1)
        if r["op"] == "repaint":
            assert r["scheduler_calls"] > r["unet_calls"], r
        else:
            assert r["scheduler_calls"] == r["unet_calls"], r
        assert 0 < r["scheduler_share"] < 1 and r["scheduler_ms_est"] > 0, r


def test_a_pipeline_rows_peak_is_of_its_timed_runs_alone(tmp_path, monkeypatch):
    """The peak is read before scheduler_share times the op alone: on CUDA that allocates its own
    inputs and do_bench's 256 MB cache-flush buffer, which fell in the first row of a backend's
    window. The order is what a CPU can see."""
    from bench import pipelines as bp

    events = []
    real_share, real_peak = bp.scheduler_share, bp._peak
    monkeypatch.setattr(bp, "scheduler_share", lambda *a: events.append("share") or real_share(*a))
    monkeypatch.setattr(bp, "_peak", lambda device: events.append("peak") or real_peak(device))
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--pipelines", "blend", "--variants", "reference"],
                    tmp_path)
    row, = _rows(data, suite="pipelines", op="blend")
    assert rc == 0 and row["status"] == "ok" and row["scheduler_share"], row
    assert events[-2:] == ["peak", "share"], events


def test_scheduler_share_times_the_call_the_samplers_make(monkeypatch):
    """The op is timed as ``kernels.scheduler_step`` through the switch (its checks and dispatch
    are host time every sampler step pays), not as the bare backend `bench ops` times: the switch
    counts those calls, and a backend the switch is told to use is the one that runs."""
    import kernels
    from bench import pipelines as bp

    monkeypatch.setattr(bp, "_STEP_MS", {})
    shape = (1, 4, 8, 8)
    before = kernels.counts()
    with kernels.use(scheduler_step="triton"):  # the timing picks its backend itself
        got = bp.scheduler_share(before, {("scheduler_step", "reference"): 3}, 1, 100.0, shape, True, 3,
                                 torch.float32, torch.device("cpu"), True, {(False, False, False): 1})
    after = kernels.counts()
    timed = after.get(("scheduler_step", "reference"), 0) - before.get(("scheduler_step", "reference"), 0)
    assert timed > 0 and after.get(("scheduler_step", "triton"), 0) == before.get(("scheduler_step", "triton"), 0)
    assert got["scheduler_calls"] == 3 and got["scheduler_ms_est"] > 0, got


def test_scheduler_share_times_repaints_jumps_as_renoise(monkeypatch):
    """10 launches in a run with 7 UNet calls: 7 masked CFG updates and 3 re-noises (undo_step),
    each at its own measured cost, the larger of its GPU and host time (a host-bound eager loop pays
    the host's); and the re-noise case is the launch undo_step makes."""
    from bench import pipelines as bp
    from bench.ops import _step, make_inputs

    shape, cpu = (1, 4, 8, 8), torch.device("cpu")
    key = lambda renoise: ("reference", shape, True, renoise, False, False, False, torch.float32, "cpu")  # noqa: E731
    monkeypatch.setattr(bp, "_STEP_MS", {key(False): (2.0, 0.25), key(True): (0.5, 1.5)})  # (GPU, host) ms
    got = bp.scheduler_share({}, {("scheduler_step", "reference"): 20}, 2, 100.0, shape, True, 7,
                             torch.float32, cpu, True, {(False, False, False): 3})
    assert got == dict(scheduler_calls=10, scheduler_ms_est=7 * 2.0 + 3 * 1.5, scheduler_gpu_ms_est=7 * 2.0 + 3 * 0.5,
                       scheduler_host_ms_est=7 * 0.25 + 3 * 1.5, scheduler_share=0.185), got
    args, _ = make_inputs(_step("r", shape, "", renoise=True), cpu, torch.float32)
    x, eps, coeffs, uncond, _, noise, prev_x0, mask, known = args
    assert eps is x and noise is not None and uncond is prev_x0 is mask is known is None
    assert coeffs.c1 > 0 and coeffs.sigma > 0 and coeffs.c0 == coeffs.c2 == 0


@pytest.mark.parametrize("sampler, eta, first, traffic", [
    ("ddim", 0.0, 0, {(False, False, False): 4}), ("ddim", 0.5, 0, {(True, False, False): 4}),
    ("ddpm", None, 0, {(True, False, False): 4}),  # leading spacing ends at t = 1, which draws (t = 0 would not)
    ("euler_a", None, 0, {(True, False, False): 3, (False, False, False): 1}),  # nor the last step (sigma_up 0)
    ("dpmpp_2m", None, 0, {(False, False, True): 2, (False, True, True): 2}),  # first, last steps first order
    ("euler_a", None, 3, {(False, False, False): 1}),  # img2img running only the last step
    ("dpmpp_2m", None, 2, {(False, False, True): 2}),  # a run's first step and the last are first order
])
def test_scheduler_share_times_the_launches_the_sampler_makes(sampler, eta, first, traffic):
    """The stand-in denoising updates move what the pipeline's sampler hands scheduler_step over the
    steps that run (4 here, from ``first`` as img2img's strength starts): noise only where it draws
    some (the default DDIM eta 0 draws none), prev_x0 for DPM++ 2M past its first-order steps, and
    x0 written at every DPM++ 2M step (the sampler keeps it; the share timed none before)."""
    from bench import pipelines as bp
    from bench.ops import _step, backend_callable, make_inputs, work
    from sdcore import SDConfig
    from sdcore.schedulers import make_scheduler

    sched = make_scheduler(sampler, SDConfig.preset("tiny").scheduler, **({} if eta is None else {"eta": eta}))
    got = bp.sampler_traffic(sched, 4, first)
    assert got == traffic, (sampler, eta, first, got)
    for noise, prev_x0, x0_out in got:
        case = _step("s", (1, 4, 8, 8), "", mask=True, noise=noise, prev_x0=prev_x0, x0_out=x0_out)
        args, kwargs = make_inputs(case, "cpu", torch.float32)
        _, _, coeffs, _, _, n, p, mask, known = args
        assert (n is not None, p is not None, mask is not None) == (noise, prev_x0, True)
        assert (coeffs.sigma != 0) == noise and (coeffs.c3 != 0) == prev_x0, coeffs
        assert kwargs == ({"return_x0": True} if x0_out else {}), kwargs
        fn, ctx, _ = backend_callable("scheduler_step", "reference", args, kwargs, torch.device("cpu"))
        with ctx():
            prev, x0 = fn()  # a launch the op takes
        assert (x0 is not None) == x0_out
        # x, both model outputs, known, a 1-channel mask of 4, then what the kind adds; prev written
        assert work(case, args, kwargs, prev)[0] == (5.25 + noise + prev_x0 + x0_out) * prev.nbytes
    default, _ = make_inputs(_step("m", (1, 4, 8, 8), "", mask=True), "cpu", torch.float32)
    assert default[5] is not None and default[6] is None  # bench ops' RePaint case: DDPM noise


def test_scheduler_share_not_estimated_where_the_sampler_refuses_the_steps(tmp_path, monkeypatch):
    """RePaint takes up to T steps over its own levels; the default sampler's schedule refuses T
    leading steps. The row says the share was not estimated and why; the run goes on (it aborted
    with a ValueError, writing nothing). The refusal is real; the run fakes it (1000 steps take long)."""
    from bench import pipelines as bp
    from sdcore import SDConfig
    from sdcore.schedulers import make_scheduler

    with pytest.raises(ValueError, match="timesteps outside") as refused:
        bp.sampler_traffic(make_scheduler("ddim", SDConfig.preset("tiny").scheduler), 1000)
    monkeypatch.setattr(bp, "sampler_traffic", lambda *a: (_ for _ in ()).throw(refused.value))
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--pipelines", "repaint", "--variants", "reference"],
                    tmp_path)
    row, = _rows(data, suite="pipelines", op="repaint")
    assert rc == 0 and row["status"] == "ok" and row["scheduler_share"] is None, row
    assert "scheduler share not estimated: its sampler's 2-step schedule: ddim: steps=1000" in row["note"], row


def test_tune_quick_sweeps_configs_and_rejects_wrong_ones(tmp_path, monkeypatch):
    """`bench tune`: one row per candidate with the default first; a candidate whose output is
    wrong is an error row and cannot be named best."""
    from bench import tune

    real_call = tune._kernel_call
    bad = object()

    def call(op, config, args):
        if config is bad:
            fn = real_call(op, None, args)
            return lambda: fn() * 1.01  # 1% off: far outside the default's error
        return real_call(op, config, args)

    monkeypatch.setattr(tune, "_kernel_call", call)
    real_cands = dict(tune.CANDIDATES)
    monkeypatch.setitem(tune.CANDIDATES, "attention", lambda case, quick, masked_tail: [
        *real_cands["attention"](case, quick, masked_tail), tune.Candidate("bad", bad)])
    rc, data = _run(["tune", "--quick", "--no-plot", "--shapes", "tiny.cross", "odd.hw"], tmp_path)
    assert rc == 1, "a wrong candidate is an error row, so the run exits 1"
    rows = _rows(data, suite="tune")
    for case, op in (("tiny.cross", "attention"), ("odd.hw", "group_norm_silu")):
        sel = [r for r in rows if r["case"] == case]
        assert sel[0]["backend"] == "default" and sel[0]["status"] == "ok", sel[0]
        assert len(sel) >= 3 and sum(r["status"] != "skipped" for r in sel) >= 2, [r["backend"] for r in sel]
        assert all(r["op"] == op for r in sel), sel
        for r in sel:  # a label that runs another's configuration at this shape is not timed twice
            assert r["max_abs_err"] is not None or "same launch configuration" in r["note"], r
    (wrong,) = _rows(data, suite="tune", backend="bad")
    assert wrong["status"] == "error" and "wrong result" in wrong["note"], wrong
    best = {r["case"]: r["backend"] for r in common.best_configs(rows)}
    assert set(best) == {"tiny.cross", "odd.hw"} and best["tiny.cross"] != "bad", best
    assert "Best per case" in (tmp_path / "results.md").read_text()


def test_tune_default_that_fails_is_an_error_not_a_skip(tmp_path, monkeypatch):
    """A candidate config the compiler refuses is skipped; the kernel's own choice failing is a bug."""
    from bench import tune

    real_call = tune._kernel_call

    def call(op, config, args):
        if config is None:
            raise RuntimeError("launcher bug")
        return real_call(op, config, args)

    monkeypatch.setattr(tune, "_kernel_call", call)
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention", "--shapes", "tiny.cross"], tmp_path)
    (default,) = _rows(data, suite="tune", backend="default")
    assert rc == 1 and default["status"] == "error" and "launcher bug" in default["note"], default


def test_tune_skips_inputs_the_triton_check_refuses(tmp_path, monkeypatch):
    """The candidates call the kernel past the registry: an input the triton backend's check
    refuses gives skipped rows with its reason, not garbage marked ok."""
    from kernels import registry

    impl = registry._OPS["attention"][registry.Backend.TRITON]
    monkeypatch.setitem(registry._OPS["attention"], registry.Backend.TRITON,
                        registry._Impl(impl.fn, lambda *a, **k: "pretend dtype limit"))
    for op in ("attention", "attention.backward"):
        rc, data = _run(["tune", "--quick", "--no-plot", "--ops", op, "--shapes", "tiny.self"], tmp_path / op)
        rows = _rows(data, suite="tune")
        assert rc == 0 and len(rows) >= 3, rows
        assert all(r["status"] == "skipped" and "pretend dtype limit" in r["note"] for r in rows), rows


def test_tune_gluon_sm90_sweeps_its_configs_and_skips_off_hopper(tmp_path, gluon_sweep):
    """`bench tune --ops attention.gluon_sm90`: the Gluon forward's grid (key block x buffers x where
    the K/V copy is issued) beside its default, each row skipped with the gluon_sm90 check's reason
    on a machine without a Hopper GPU (a GPU run times them: bench/gpu_checks.sh, stage gluon)."""
    from bench import tune

    cands = tune.gluon_sm90_candidates(None, quick=False)
    assert cands[0].config is None and len(cands) == 9
    assert {c.config[4] for c in cands[1:]} == {True, False} and {c.config[3] for c in cands[1:]} == {3, 4}
    rc, data = _run(["tune", "--no-plot", "--ops", "attention.gluon_sm90", "--shapes", "tiny.cross"], tmp_path)
    rows = _rows(data, suite="tune")
    dtypes = {r["dtype"] for r in rows}
    default = {"fp16"} if torch.cuda.is_available() else {"fp32"}  # tune's default dtype on the device
    assert rc == 0 and dtypes == default and len(rows) == 9, rows  # each candidate once
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        assert all(r["status"] == "skipped" and "gluon_sm90" in r["note"] for r in rows), rows


def test_tune_gluon_sm90_rows_past_the_check_are_judged_against_attention(tmp_path, monkeypatch, gluon_sweep):
    """Where the Gluon backend takes the input (a Hopper GPU), each candidate is timed and held to
    attention's fp64 oracle. Driven on CPU with the check passed and the launcher replaced by the
    reference: every row was an error before ("unknown kernel op 'attention.gluon_sm90'")."""
    from bench import tune

    monkeypatch.setattr(tune, "backend_refusal", lambda *a, **k: None)
    monkeypatch.setattr(tune, "_kernel_call", lambda op, config, args: lambda: kernels.attention_reference(*args))
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention.gluon_sm90", "--shapes", "tiny.cross",
                     "--dtypes", "fp32"], tmp_path)
    rows = _rows(data, suite="tune")
    assert rc == 0 and rows and all(r["status"] == "ok" and r["max_rel_err"] < 1e-5 for r in rows), rows


def test_tune_bf16_attention_under_the_interpreter_is_skipped(tmp_path):
    """The interpreter's tl.dot cannot do bf16 (errors of 1e8 passed as ok before)."""
    if not common.interpreting():
        pytest.skip("Triton is not interpreted here")
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention", "--shapes", "tiny.self", "--dtypes",
                     "bf16"], tmp_path)
    rows = _rows(data, suite="tune")
    assert rc == 0 and rows and all(r["status"] == "skipped" and "bfloat16" in r["note"] for r in rows), rows


def test_tune_default_is_held_to_the_reference(tmp_path, monkeypatch):
    """The default is held to `bench ops`' rule (2x the reference's error + atol): an inaccurate
    default is an error row, and the candidates are then held to the reference's error instead."""
    from bench import tune

    real_call = tune._kernel_call

    def call(op, config, args):
        fn = real_call(op, config, args)
        return (lambda: fn() * 1.01) if config is None else fn  # the kernel's own choice 1% off

    monkeypatch.setattr(tune, "_kernel_call", call)
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention", "--shapes", "tiny.self"], tmp_path)
    rows = _rows(data, suite="tune")
    assert rc == 1 and rows[0]["backend"] == "default", rows
    assert rows[0]["status"] == "error" and "wrong result" in rows[0]["note"] and "reference's" in rows[0]["note"]
    assert len(rows) >= 3 and all(r["status"] == "ok" for r in rows[1:]), rows
    assert common.best_configs(rows)[0]["backend"] != "default"


def test_tune_rejects_ops_without_configs(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--ops", "scheduler_step"])
    assert "valid: attention, attention.backward, group_norm_silu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the backward sweeps attention's shape table, not GroupNorm's
        main(["tune", "--ops", "attention.backward", "--shapes", "odd.hw"])
    assert "unknown shape case 'odd.hw'; valid: unet15.attn.self0" in capsys.readouterr().err


def test_tune_backward_sweeps_each_kernel_against_fp64_gradients(tmp_path, monkeypatch):
    """`bench tune --ops attention.backward`: candidates for the dK/dV and the dQ kernel, each
    checked (dq, dk, dv) against fp64 autograd; a candidate with one wrong gradient is an error row."""
    from bench import tune

    real_call, bad = tune._kernel_call, object()

    def call(op, config, args):
        if config is bad:
            fn = real_call(op, None, args)
            return lambda: (lambda dq, dk, dv: (dq, dk * 1.01, dv))(*fn())  # dk 1% off
        return real_call(op, config, args)

    monkeypatch.setattr(tune, "_kernel_call", call)
    real_cands = tune.CANDIDATES["attention.backward"]
    monkeypatch.setitem(tune.CANDIDATES, "attention.backward", lambda case, quick, masked_tail: [
        *real_cands(case, quick, masked_tail), tune.Candidate("bad", bad)])
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention.backward", "--shapes", "tiny.cross"],
                    tmp_path)
    assert rc == 1, "the wrong candidate is an error row, so the run exits 1"
    rows = {r["backend"]: r for r in _rows(data, suite="tune")}
    assert list(rows) == ["default", "dkdv bm16 bn16 w2 s2", "dq bm16 bn16 w2 s2", "bad"], list(rows)
    for name in ("default", "dkdv bm16 bn16 w2 s2", "dq bm16 bn16 w2 s2"):
        r = rows[name]
        assert r["status"] == "ok" and r["op"] == "attention.backward", r
        assert r["max_rel_err"] < 1e-5, f"{name}: fp32 gradients off by {r['max_rel_err']:.3g}"
        assert r["flops"] == 10 * 2 * 2 * 64 * 7 * 8, r  # 2.5 x 4·B·H·Lq·Lkv·D
    assert rows["bad"]["status"] == "error" and "wrong result" in rows["bad"]["note"], rows["bad"]


@pytest.mark.gpu
def test_unet_step_cuda_graph_matches_eager(tmp_path):
    """On a GPU: the UNet step replayed from a CUDA graph gives the eager output (same kernels),
    and reports host time per step next to the GPU median."""
    rc, data = _run(["pipelines", "--unet-only", "--preset", "tiny", "--no-plot", "--variants", "reference",
                     "triton", "reference@graph", "triton@graph"], tmp_path)
    rows = {r["backend"]: r for r in _rows(data, suite="unet_step")}
    for name in ("reference", "triton", "reference@graph", "triton@graph"):
        r = rows[name]
        assert r["status"] == "ok", f"{name}: {r['status']}: {r['note']}"
        assert r["median_ms"] > 0 and r["host_ms"] > 0, r
    # same kernels, replayed: equal up to cuBLAS picking other algorithms under capture (fp16 ulps)
    assert rows["reference@graph"]["latent_max_abs_diff"] <= 1e-2, rows["reference@graph"]
    assert rows["triton@graph"]["latent_max_abs_diff"] <= rows["triton"]["latent_max_abs_diff"] + 1e-2, rows


def test_tune_masked_tail_sweeps_the_split(tmp_path):
    """--masked-tail: at head dim 40 every candidate takes the 32 + 16 split; at head dims without a
    masked tail (16) nothing changes."""
    from bench import ops, tune

    case40 = ops.Case("attention", "d40", "B1 H1 Lq16 Lkv16 D40", "test", dict(b=1, h=1, lq=16, lkv=16, d=40))
    case16 = ops.Case("attention", "d16", "B1 H1 Lq16 Lkv16 D16", "test", dict(b=1, h=1, lq=16, lkv=16, d=16))
    split = tune.attention_candidates(case40, quick=True, masked_tail=True)[1:]
    assert split and all(c.config.split_masked_tail is True and c.label.endswith("split") for c in split), split
    plain = tune.attention_candidates(case16, quick=True, masked_tail=True)[1:]
    assert all(c.config.split_masked_tail is None for c in plain), plain
    rc, data = _run(["tune", "--quick", "--no-plot", "--ops", "attention", "--shapes", "tiny.self", "--masked-tail"],
                    tmp_path)
    assert rc == 0 and all(r["status"] == "ok" for r in _rows(data, suite="tune")), data["rows"]


def test_tune_sweeps_the_resident_forward_over_few_keys():
    """Over at most SHORT_KV keys the forward sweep adds K/V-resident candidates (q_blocks set), with
    4 warps at 64 query rows and 8 at 128; over more keys, and in a --masked-tail run, none."""
    from bench import ops, tune
    from kernels.attention import SHORT_KV

    def case(lkv, d=40):
        return ops.Case("attention", "c", f"B2 H8 Lq4096 Lkv{lkv} D{d}", "test", dict(b=2, h=8, lq=4096, lkv=lkv, d=d))

    resident = [c for c in tune.attention_candidates(case(77), quick=False)[1:] if c.config.q_blocks is not None]
    assert len(resident) == 16 and all(c.label.startswith("resident") for c in resident), resident
    assert {(c.config.block_m, c.config.num_warps) for c in resident} == {(64, 4), (128, 8)}, resident
    assert {c.config.q_blocks for c in resident} == {1, 2, 4, 8}, resident
    for lkv, masked in ((SHORT_KV + 1, False), (77, True)):
        candidates = tune.attention_candidates(case(lkv), False, masked)[1:]
        assert not any(c.config.q_blocks for c in candidates), (lkv, masked)


def test_plugin_backends_get_op_rows_and_pipeline_variants(tmp_path, plugin_file):
    """A research backend from --plugin is timed and checked like the built-in ones (ops), and runs
    as an op=backend variant, the other ops on reference (UNet step)."""
    rc, data = _run(["ops", "--quick", "--no-plot", "--ops", "attention", "--backends", "reference",
                     "plugin_attention", "--plugin", str(plugin_file)], tmp_path / "ops")
    rows = _rows(data, backend="plugin_attention")
    assert rc == 0 and rows and all(r["status"] == "ok" and r["max_abs_err"] is not None for r in rows), rows
    assert data["env"]["plugins"] == {str(plugin_file): {"attention": ["plugin_attention"]}}
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference",
                     "attention=plugin_attention", "--plugin", str(plugin_file)], tmp_path / "pipe")
    row, = _rows(data, backend="attention=plugin_attention")
    assert rc == 0 and row["status"] == "ok" and row["latent_max_abs_diff"] == 0, row


WRONG_PLUGIN = """
import kernels

@kernels.register("attention", "swapped_kv")
def swapped_kv(q, k, v, scale=None, causal=False):
    # wrong on purpose: keys and values swapped (k and v have one shape in every SD attention)
    return kernels.attention_reference(q, v, k, scale, causal)
"""


def test_an_inaccurate_op_row_is_an_error_without_a_speed_up(tmp_path):
    """`bench ops` with a wrong research backend: its row is an error naming its error, and carries no
    speed-up in the JSON or the table (it was flagged after the speed-ups were added, and kept one)."""
    wrong = tmp_path / "wrong_attention.py"
    wrong.write_text(WRONG_PLUGIN)
    try:
        rc, data = _run(["ops", "--quick", "--no-plot", "--ops", "attention", "--shapes", "tiny.self",
                         "--backends", "reference", "swapped_kv", "--plugin", str(wrong)], tmp_path / "ops")
    finally:
        kernels.unload_plugin(str(wrong))
    row, = _rows(data, backend="swapped_kv")
    assert row["status"] == "error" and row["note"].startswith("inaccurate: max abs error"), row
    assert row["speedup_vs_reference"] is None, row
    line, = [ln for ln in (tmp_path / "ops" / "results.md").read_text().splitlines() if "| swapped_kv |" in ln]
    assert "x |" not in line.split("| error")[0], line  # no speed-up cell


def test_a_diverging_pipeline_or_unet_step_row_is_an_error_without_a_speed_up(tmp_path):
    """`bench pipelines` with a wrong research backend: its UNet-step and pipeline rows are errors
    naming how far they strayed (they read `ok` with a speed-up before, and the run exited 0), by the
    rule its pytest-benchmark cases fail by (bench.pipelines.divergence)."""
    wrong = tmp_path / "wrong_attention.py"
    wrong.write_text(WRONG_PLUGIN)
    try:
        rc_step, step = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference",
                              "attention=swapped_kv", "--plugin", str(wrong)], tmp_path / "step")
        rc_pipe, pipe = _run(["pipelines", "--quick", "--no-plot", "--pipelines", "txt2img", "--variants",
                              "reference", "attention=swapped_kv", "--plugin", str(wrong)], tmp_path / "pipe")
    finally:
        kernels.unload_plugin(str(wrong))
    row, = _rows(step, backend="attention=swapped_kv")
    assert rc_step == 1 and row["status"] == "error" and row["speedup_vs_reference"] is None, row
    assert row["note"].startswith("inaccurate: output differs from the all-reference one by "), row
    row, = _rows(pipe, backend="attention=swapped_kv", suite="pipelines")
    assert rc_pipe == 1 and row["status"] == "error" and row["speedup_vs_reference"] is None, row
    assert re.match(r"inaccurate: images at [\d.]+ dB PSNR from the all-reference run, under 40.0 dB", row["note"]), row
    assert _rows(pipe, backend="reference", suite="pipelines")[0]["status"] == "ok"


def test_quick_pipeline_rows_are_timed_after_a_warm_up(tmp_path, monkeypatch):
    """--quick times one run per variant after one untimed run: without it, the first (reference) row
    carried the process's first-call costs and identical variants read 1.4x faster than it."""
    from bench import pipelines as bp

    calls = []
    real = bp._call
    monkeypatch.setattr(bp, "_call", lambda spec, *a, **k: calls.append(spec.function) or real(spec, *a, **k))
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--pipelines", "txt2img", "--variants", "reference",
                     "attention=reference"], tmp_path)
    assert rc == 0 and len(_rows(data, suite="pipelines", status="ok")) == 2, data["rows"]
    assert calls == ["txt2img"] * 4, calls  # per variant: a warm-up, then the timed run


def test_unet_step_with_only_the_scheduler_on_triton_runs_no_triton(tmp_path):
    """A UNet call runs no scheduler_step: `triton:scheduler_step`'s UNet step is the reference one,
    timed as such (it was labelled "triton interpreted" and got no host time)."""
    rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference",
                     "triton:scheduler_step"], tmp_path)
    row, = _rows(data, backend="triton:scheduler_step")
    assert rc == 0 and row["status"] == "ok" and "interpreted" not in (row["note"] or ""), row
    assert row["host_ms"] is not None and row["latent_max_abs_diff"] == 0, row


def test_pytest_benchmark_cases_time_ops_and_pipelines_and_catch_a_diverging_backend(tmp_path, plugin_file):
    """``pytest bench/ --benchmark-only``: op and pipeline cases are timed, each pipeline case's
    bench row lands in extra_info, a research backend runs as --sd-variant op=backend, and one that
    diverges (keys and values swapped) fails its pipeline case by the PSNR floor and its UNet-step
    case by the relative bound."""
    wrong = tmp_path / "wrong_attention.py"
    wrong.write_text(WRONG_PLUGIN)
    bench_dir = Path(__file__).parent.parent / "bench"
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(bench_dir),
                          "--benchmark-only", "--benchmark-json", str(out_json),
                          "--sdlab-plugin", str(plugin_file), "--sdlab-plugin", str(wrong),
                          "--sd-variant", "reference", "--sd-variant", "attention=plugin_attention",
                          "--sd-variant", "attention=swapped_kv", "--sd-variant", "triton",
                          "-k", "txt2img or unet_step or scheduler_step-tiny.latent-"],
                         capture_output=True, text=True, timeout=600)
    log = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 1 and "2 failed" in out.stdout, log
    assert "FAILED bench/test_bench_pipelines.py::test_pipeline[txt2img-attention=swapped_kv]" in out.stdout, log
    assert "dB PSNR from the all-reference run, under 40.0 dB" in out.stdout, log
    assert "FAILED bench/test_bench_pipelines.py::test_unet_step[attention=swapped_kv]" in out.stdout, log
    assert "of its largest value" in out.stdout and "over 0.001" in out.stdout, log
    cases = {b["name"]: b for b in json.loads(out_json.read_text())["benchmarks"]}
    assert {"test_pipeline[txt2img-reference]", "test_pipeline[txt2img-attention=plugin_attention]",
            "test_unet_step[reference]", "test_unet_step[attention=plugin_attention]",
            "test_op[scheduler_step-tiny.latent-reference-fp32]", "test_op[scheduler_step-tiny.latent-triton-fp32]"} <= set(cases), sorted(cases)
    same = cases["test_pipeline[txt2img-attention=plugin_attention]"]["extra_info"]
    assert same["status"] == "ok" and same["unet_calls"] == 2 and same["latent_max_abs_diff"] == 0, same
    assert cases["test_unet_step[attention=plugin_attention]"]["extra_info"]["latent_max_abs_diff"] == 0
    assert "pass --sd-interpreted" in out.stdout, log  # the skipped triton variants say how to run them


@pytest.mark.parametrize("flags, message", [
    (["--sd-variant", "attention=nope"], "op 'attention' has no 'nope' backend; valid:"),
    (["--sd-variant", "trition"], "unknown variant 'trition'; valid: reference, triton"),
    (["--sd-dtype", "fp8"], "--sd-dtype: unknown dtype 'fp8'"),
    (["--sd-preset", "sd16"], "--sd-preset: unknown preset 'sd16'; valid:"),
    (["--sd-steps", "0"], "--sd-steps must be >= 1, got 0"),
    # img2img at 0.75 runs none of 1 step: each of its cases failed with a long RuntimeError instead
    (["--sd-steps", "1"], "--sd-steps 1: img2img at strength 0.75 runs the last int(steps x strength) = 0 of them"),
    (["--sd-ckpt", "/no/such.safetensors"], "--sd-ckpt /no/such.safetensors: no such file or directory"),
])
def test_pytest_benchmark_pipeline_options_are_checked(flags, message):
    from bench import test_bench_pipelines as tbp

    class Config:
        def getoption(self, name):
            given = dict(zip(flags[::2], flags[1::2]))
            value = given.get(name)
            if name == "--sd-variant":
                return [value] if value else []
            if name == "--sd-steps" and value is not None:
                return int(value)
            return False if name == "--sd-interpreted" else value

    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        tbp.options(Config())


def test_pytest_benchmark_pipeline_options_are_checked_before_collection(plugin_file):
    """`pytest bench/test_bench_pipelines.py --sd-preset nope` printed a collection traceback ("ERROR
    collecting", the UsageError raised inside pytest_generate_tests): bench/conftest.py checks the
    --sd-* options in pytest_configure, so it is pytest's one-line usage error (exit 4). It checks them
    after --sdlab-plugin has loaded, so a plugin's backend is a valid --sd-variant."""
    def pytest_bench(*flags):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "bench/test_bench_pipelines.py", "--benchmark-only", "--collect-only", *flags],
                              cwd=common.REPO, capture_output=True, text=True, timeout=300)

    r = pytest_bench("--sd-preset", "nope")
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 4 and "ERROR: --sd-preset: unknown preset 'nope'; valid: sd15" in r.stderr, log
    assert "Traceback" not in log and "ERROR collecting" not in log and "pytest.UsageError" not in log, log
    r = pytest_bench("--sdlab-plugin", str(plugin_file), "--sd-variant", "attention=plugin_attention")
    assert r.returncode == 0 and "test_unet_step[attention=plugin_attention]" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("variant, runs", [
    ("reference", False), ("triton", True), ("triton:attention", True), ("triton@graph", True),
    ("attention=triton", True), ("attention=sdpa+group_norm_silu=triton", True), ("attention=sdpa", False),
    ("diffusers-sdpa", False), ("compile", False),
])
def test_a_variant_that_pins_an_op_to_triton_runs_triton(variant, runs):
    """`attention=triton` runs the interpreted kernel as `triton:attention` does: it is skipped
    under --quick / pytest-benchmark on a CPU unless asked for, and timed in one round (it was
    neither: only names starting with 'triton' were)."""
    from bench import pipelines as bp

    assert bp.runs_triton(variant) is runs, variant
    opts = bp.Options(preset="tiny", ckpt=None, pipelines=[], steps=2, batch=1, repeats=1, warmup=0,
                      dtype=torch.float32, unet_only=True, variants=[variant], quick=True)
    assert (opts.interpreted_skip(variant) is not None) == (runs and bp.interpreting()), variant


CHAIN_PLUGIN = """
import kernels

def _upto16(q, k, v, scale=None, causal=False):
    return None if q.shape[-1] <= 16 else f"head dim {q.shape[-1]} over 16"

@kernels.register("attention", "upto16", check=_upto16)
def upto16(q, k, v, scale=None, causal=False):
    return kernels.attention_reference(q, k, v, scale, causal)
"""


def test_a_fallback_chain_variant_counts_each_backends_calls(tmp_path):
    """A research backend covering some head dims runs a whole UNet step as attention=upto16/sdpa:
    the row's note counts the calls each backend of the chain took."""
    path = tmp_path / "upto16.py"
    path.write_text(CHAIN_PLUGIN)
    try:
        with pytest.warns(RuntimeWarning, match="backend 'upto16' of the fallback chain 'upto16/sdpa'"):
            rc, data = _run(["pipelines", "--quick", "--no-plot", "--unet-only", "--variants", "reference",
                             "attention=upto16/sdpa", "--plugin", str(path)], tmp_path / "pipe")
    finally:
        kernels.unload_plugin(str(path))
    row, = _rows(data, backend="attention=upto16/sdpa")
    assert rc == 0 and row["status"] == "ok", row
    # the tiny UNet: heads of 16 at 32 channels, of 32 at 64 channels (see attention_head_dims)
    assert re.fullmatch(r"attention: \d+ calls on (upto16|sdpa), \d+ on (upto16|sdpa)", row["note"]), row["note"]
    assert row["latent_max_abs_diff"] < 1e-5, row


def _md_cells(line: str) -> list[str]:
    """The cells of one GitHub-flavoured markdown table row: split on unescaped pipes."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


@pytest.mark.parametrize("columns", ["OPS_COLUMNS", "PIPELINE_COLUMNS"])
def test_markdown_cells_sit_under_their_headers(columns):
    """One row of known values rendered and read back as GitHub reads it: header, delimiter and
    row have one cell per column (the title 'max |Δ| latents' was unescaped: 19 header cells for
    17 columns, so the committed tables did not render), and each value is under its title in
    that column's unit (% x 100, host ms shown in µs, speed-up with an x)."""
    env = common.environment(torch.device("cpu"))
    row = common.make_row(env, suite="ops", op="attention", case="c", shape="(1|2)", dtype="fp16", backend="triton",
                          status="ok", note="a | b", median_ms=1.5, p20_ms=1.25, p80_ms=1.75, host_ms=0.02,
                          gbps=321.0, tflops=45.6, frac_of_peak=0.4, frac_of_copy=0.55, speedup_vs_reference=1.23,
                          max_abs_err=3e-3, max_rel_err=4e-4, steps=7, seconds_per_image=2.5, images_per_s=0.4,
                          unet_ms_per_step=33.0, unet_calls=14, scheduler_ms_est=0.75, scheduler_share=0.125,
                          peak_mem_mib=2048.0, latent_max_abs_diff=6e-3, psnr_db=41.5, preset="tiny")
    header, delimiter, line = common.markdown_table([row], getattr(common, columns)).splitlines()
    titles, cells = _md_cells(header), _md_cells(line)
    n = len(getattr(common, columns))
    assert len(titles) == len(cells) == n and delimiter.count("---") == n, (titles, cells)
    got = dict(zip(titles, cells))
    want = {"op": "attention", "pipeline": "attention", "shape": "(1|2)", "median ms": "1.5", "p20–p80 ms": "1.25–1.75",
            "host µs": "20", "GB/s": "321", "TFLOP/s": "45.6", "% of peak": "40.0", "% of copy": "55.0",
            "speed-up": "1.23x", "max abs err": "3.00e-03", "max rel err": "4.00e-04", "steps": "7",
            "s/image": "2.5", "images/s": "0.4", "UNet ms/step": "33", "host ms/step": "0.02", "UNet calls": "14",
            "scheduler ms (est.)": "0.75", "scheduler share": "12.5 %", "peak MiB": "2048",
            "max |Δ| latents": "6.00e-03", "PSNR dB": "41.5", "status / note": "ok: a | b"}
    wrong = {t: (got[t], want[t]) for t in titles if t in want and got[t] != want[t]}
    assert not wrong, f"{columns}: title -> (cell, expected): {wrong}"
    assert set(titles) - set(want) <= {"case", "dtype", "backend", "kernels", "preset"}, set(titles) - set(want)


def test_a_row_over_its_ceiling_says_the_ceiling_is_no_peak(tmp_path, monkeypatch):
    """A CPU's small bf16 matmul ran slower than its SDPA: rows read 1100% of peak, unexplained.
    A row over 100% now says that this run's ceiling is no peak of the device; one under it does not."""
    real = common.measure_ceilings

    def slow_matmul(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "matmul_tflops": {k: 1e-9 for k in out["matmul_tflops"]}, "copy_gbps": 1e9}

    monkeypatch.setattr(common, "measure_ceilings", slow_matmul)
    rc, data = _run(["ops", "--quick", "--no-plot", "--ops", "attention", "group_norm_silu", "--dtypes", "fp32",
                     "--backends", "reference"], tmp_path)
    assert rc == 0
    attn = _rows(data, op="attention", status="ok")
    gn = _rows(data, op="group_norm_silu", status="ok")
    assert attn and all(r["frac_of_peak"] > 1 and "over 100% of peak" in r["note"] for r in attn), attn
    assert gn and all(r["frac_of_peak"] < 1 and "over 100%" not in r["note"] for r in gn), gn
