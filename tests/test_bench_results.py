"""``python -m bench`` writing into a results folder that holds an earlier run's results
(bench.common.write_results): which rows stay, what results.md and results.json say about the
runs they come from, which plots stay, and a results.json the tool did not write.

Rows are built the way the suites build them (common.make_row, common.add_speedups) from
synthetic envs; the CLI tests replace the suites with recorders, so nothing here times anything.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from bench import common, ops, pipelines, tune
from bench.__main__ import main


def _env(date: str, commit: str, argv: str) -> dict:
    return {"date": date, "device": "cpu", "device_name": "CPU test (1 threads)", "torch": "2.x", "triton": "3.x",
            "cuda": None, "git_commit": commit, "git_dirty": False, "triton_interpret": False,
            "triton_launch": "direct", "argv": argv, "plugins": {}}


RUN_A = _env("2026-01-01T10:00:00+00:00", "a" * 40, "bench ops")
RUN_B = _env("2026-01-02T10:00:00+00:00", "b" * 40, "bench ops --ops attention --backends reference")
RUN_C = _env("2026-01-03T10:00:00+00:00", "c" * 40, "bench pipelines --unet-only")
CEILINGS = {"copy_gbps": 100.0, "copy_bytes": 1, "matmul_tflops": {"fp32": 1.0}, "matmul_n": 8, "how": "test"}


def _ops_rows(env: dict, times: dict[tuple[str, str], float], status: str = "ok") -> list[dict]:
    """Op rows as ops.run makes them: {(op, backend): median ms}, case c, fp32; speed-ups vs reference."""
    rows = [common.make_row(env, suite="ops", op=op, case="c", shape="s", dtype="fp32", backend=backend,
                            status=status, note="" if status == "ok" else "cannot run here",
                            **(dict(median_ms=ms, p20_ms=ms, p80_ms=ms) if status == "ok" else {}))
            for (op, backend), ms in times.items()]
    common.add_speedups(rows, ("op", "case", "dtype"))
    return rows


def _unet_rows(env: dict, times: dict[str, float]) -> list[dict]:
    rows = [common.make_row(env, suite="unet_step", op="unet_step", preset="tiny", dtype="fp32", batch=2,
                            backend=v, status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms) for v, ms in times.items()]
    common.add_speedups(rows, ("suite", "preset", "dtype"))
    return rows


def _read(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _keys(data) -> list[tuple]:
    return [(r["suite"], r["op"], r["backend"], r["git_commit"][0]) for r in data["rows"]]


# ------------------------------------------------------------------- 1: rows not measured again stay
def test_a_rerun_of_a_suite_keeps_the_rows_it_did_not_measure_again(tmp_path, capsys):
    """`bench ops --ops group_norm_silu` then `bench ops --ops attention` into one folder: both ops'
    rows are there (the second run dropped the first's before), the rows measured twice once, the
    second run's; stderr says how many rows were kept and from which commit and date."""
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {
        ("group_norm_silu", "reference"): 2.0, ("group_norm_silu", "triton"): 1.0,
        ("attention", "reference"): 4.0, ("attention", "sdpa"): 2.0}), plot=False)
    capsys.readouterr()
    common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {
        ("attention", "reference"): 3.0, ("attention", "triton"): 1.0}), plot=False)
    got = sorted(_keys(_read(tmp_path)))
    assert got == sorted([("ops", "group_norm_silu", "reference", "a"), ("ops", "group_norm_silu", "triton", "a"),
                          ("ops", "attention", "sdpa", "a"),
                          ("ops", "attention", "reference", "b"), ("ops", "attention", "triton", "b")]), got
    err = capsys.readouterr().err
    line, = [x for x in err.splitlines() if "kept" in x]
    assert "kept 3 earlier row(s)" in line and "a" * 12 in line and RUN_A["date"] in line, line
    assert "group_norm_silu" in line and "attention" in line, line


def test_nothing_kept_nothing_said(tmp_path, capsys):
    rows = _ops_rows(RUN_A, {("attention", "reference"): 4.0})
    common.write_results(tmp_path, RUN_A, CEILINGS, rows, plot=False)
    common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {("attention", "reference"): 4.0}), plot=False)
    assert "kept" not in capsys.readouterr().err
    assert _keys(_read(tmp_path)) == [("ops", "attention", "reference", "b")]


@pytest.mark.parametrize("field, first, second", [
    ("case", "c", "d"), ("dtype", "fp32", "fp16"), ("backend", "bm64 bn32 w4 s2", "bm128 bn64 w8 s3"),
    ("steps", 2, 20), ("batch", 1, 2), ("preset", "tiny", "sd15"), ("suite", "ops", "tune")])
def test_a_row_differing_in_what_it_measures_is_not_measured_again(tmp_path, field, first, second):
    """The identity of a row (common.ROW_IDENTITY): a row that differs in one of its fields is a
    different measurement and stays; one equal in all of them is replaced, whatever its commit (the
    run's; a run on another device is refused: test_a_run_on_another_device_is_refused_before_running)."""
    def row(env, value):
        return common.make_row(env, **{"suite": "tune", "op": "attention", "case": "c", "dtype": "fp32",
                                       "backend": "default", "preset": None, "status": "ok", "median_ms": 1.0,
                                       field: value})

    common.write_results(tmp_path, RUN_A, None, [row(RUN_A, first)], plot=False)
    common.write_results(tmp_path, RUN_B, None, [row(RUN_B, second)], plot=False)
    assert sorted(r[field] for r in _read(tmp_path)["rows"]) == sorted([first, second])
    common.write_results(tmp_path, RUN_C, None, [row(RUN_C, first)], plot=False)
    assert sorted((r[field], r["git_commit"][0]) for r in _read(tmp_path)["rows"]) == sorted(
        [(first, "c"), (second, "b")])


# --------------------------------------------------- speed-ups and results.md / env: which run is whose
def test_kept_rows_keep_their_own_runs_speed_up_and_results_md_says_whose(tmp_path):
    """Run B measures the reference again but not sdpa: the sdpa row keeps run A's speed-up (4/2,
    against run A's reference, not B's 3 ms), and results.md lists both runs (commit, date,
    command, which rows) and numbers each row's run; env.runs in results.json has both."""
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {
        ("attention", "reference"): 4.0, ("attention", "sdpa"): 2.0}), plot=False)
    common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {("attention", "reference"): 3.0}),
                         plot=False)
    data = _read(tmp_path)
    sdpa, = [r for r in data["rows"] if r["backend"] == "sdpa"]
    assert sdpa["speedup_vs_reference"] == 2.0 and sdpa["git_commit"] == RUN_A["git_commit"], sdpa
    runs = data["env"]["runs"]
    assert [(e["date"], e["git_commit"], e["argv"]) for e in runs] == [
        (e["date"], e["git_commit"], e["argv"]) for e in (RUN_A, RUN_B)], runs
    assert data["env"]["git_commit"] == RUN_B["git_commit"]  # env: this run's, with the list of runs
    md = (tmp_path / "results.md").read_text()
    for i, e in enumerate((RUN_A, RUN_B), 1):
        line, = [x for x in md.splitlines() if x.startswith(f"{i}. ")]
        assert e["date"] in line and e["git_commit"][:12] in line and f"`{e['argv']}`" in line, line
        assert "ops: attention (1 row)" in line, line
    table = [x for x in md.splitlines() if x.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[-1] == "run", header
    run_of = {re.split(r"\s*\|\s*", x)[5]: re.split(r"\s*\|\s*", x)[-2] for x in table[1:]}
    assert run_of == {"sdpa": "1", "reference": "2"}, run_of
    assert "2.00x" in next(x for x in table if "| sdpa |" in x)


def test_one_run_keeps_the_one_line_header(tmp_path):
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {("attention", "reference"): 4.0}), plot=False)
    md = (tmp_path / "results.md").read_text()
    assert f"commit {RUN_A['git_commit'][:12]}" in md and "| run |" not in md and "runs into this folder" not in md
    assert [e["argv"] for e in _read(tmp_path)["env"]["runs"]] == [RUN_A["argv"]]


def test_a_file_written_before_runs_were_listed_gets_a_run_per_commit_and_date(tmp_path):
    """An older results.json: env describes its last run only, its rows come from two. Each run
    is listed: the last with its env, the other with what its rows carry (no command)."""
    old_rows = _ops_rows(RUN_A, {("attention", "reference"): 4.0}) + _unet_rows(RUN_B, {"reference": 9.0})
    (tmp_path / "results.json").write_text(json.dumps({"env": RUN_B, "ceilings": CEILINGS, "rows": old_rows}))
    common.write_results(tmp_path, RUN_C, None, _unet_rows(RUN_C, {"triton": 3.0}), plot=False)
    runs = _read(tmp_path)["env"]["runs"]
    assert [(e["git_commit"][0], e.get("argv")) for e in runs] == [
        ("a", None), ("b", RUN_B["argv"]), ("c", RUN_C["argv"])], runs
    assert "command not recorded" in (tmp_path / "results.md").read_text()


# ------------------------------------------------------------------------------------------ plots
def test_plots_are_of_all_rows_and_stale_ones_go(tmp_path):
    """Plots come from every row in the file; a speedup-*.png of the tool's naming that no row
    backs any more goes, other files stay."""
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {
        ("group_norm_silu", "reference"): 2.0, ("group_norm_silu", "triton"): 1.0,
        ("attention", "reference"): 4.0, ("attention", "sdpa"): 2.0}))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["speedup-attention.png", "speedup-group-norm-silu.png"]
    foreign = [tmp_path / "speedup-Mine.png", tmp_path / "my-speedup-x.png", tmp_path / "speedup-notes.txt"]
    for p in foreign:
        p.write_bytes(b"x")
    (tmp_path / "speedup-scheduler-step.png").write_bytes(b"x")  # no scheduler_step rows
    # group_norm_silu measured again, skipped this time: no row of it has a speed-up left
    paths = common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {
        ("group_norm_silu", "reference"): 0, ("group_norm_silu", "triton"): 0}, status="skipped"))
    assert sorted(p.name for p in tmp_path.glob("speedup-*.png")) == ["speedup-Mine.png", "speedup-attention.png"]
    assert all(p.exists() for p in foreign)
    assert paths["plot:attention"] == tmp_path / "speedup-attention.png"  # kept rows: still plotted


def test_a_plot_of_several_runs_labels_each_bar_with_its_run(tmp_path, monkeypatch):
    """Attention's plot mixes run A's sdpa bar (kept) with run B's triton bar: each bar is labelled
    with its run's number in results.md (r1, r2) and the title says so; group_norm_silu's plot,
    all of run A, has no labels."""
    import matplotlib.axes

    labelled: dict[str, list[str]] = {}
    titles: list[str] = []
    real_label, real_title = matplotlib.axes.Axes.bar_label, matplotlib.axes.Axes.set_title

    def bar_label(ax, bars, labels=None, **kw):
        labelled.setdefault(bars.get_label(), []).extend(labels)
        return real_label(ax, bars, labels, **kw)

    def set_title(ax, text, *a, **kw):
        titles.append(text)
        return real_title(ax, text, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", bar_label)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", set_title)
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {
        ("group_norm_silu", "reference"): 2.0, ("group_norm_silu", "triton"): 1.0,
        ("attention", "reference"): 4.0, ("attention", "sdpa"): 2.0}), plot=False)
    common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {
        ("attention", "reference"): 3.0, ("attention", "triton"): 1.0}))
    assert labelled == {"sdpa": ["r1"], "reference": ["r2"], "triton": ["r2"]}, labelled
    attention, = [t for t in titles if t.startswith("attention")]
    gn, = [t for t in titles if t.startswith("group_norm_silu")]
    assert "rN is run N of results.md" in attention and "run" not in gn, titles


def _pipeline_rows(env: dict, steps: int, batch: int, times: dict[str, float]) -> list[dict]:
    """RePaint rows as pipelines.run makes them: {backend: s/image}, speed-ups vs reference."""
    rows = [common.make_row(env, suite="pipelines", op="repaint", preset="tiny", dtype="fp32", backend=b,
                            steps=steps, batch=batch, shape=f"64x64 px, batch {batch}", status="ok",
                            median_ms=s * 1e3 * batch, p20_ms=s * 1e3 * batch, p80_ms=s * 1e3 * batch,
                            seconds_per_image=s) for b, s in times.items()]
    common.add_speedups(rows, ("suite", "op", "preset", "dtype"), metric="seconds_per_image")
    return rows


def test_pipeline_rows_of_other_steps_or_batch_are_bars_and_columns_of_their_own(tmp_path, monkeypatch):
    """The README's sequence: a default `bench pipelines`, then RePaint at 250 steps into the same
    folder, then at batch 2: each row is kept, and each is its own bar (the labels named neither the
    steps nor the batch, so the last row drew over the others) and its own line of results.md."""
    import matplotlib.axes

    heights: dict[str, dict[str, float]] = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(ax, x, height, *a, label=None, **kw):
        ticks = heights.setdefault(label, {})
        ticks.update({i: h for i, h in enumerate(height)})
        return real_bar(ax, x, height, *a, label=label, **kw)

    xticks: list[list[str]] = []
    real_ticks = matplotlib.axes.Axes.set_xticklabels
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticklabels",
                        lambda ax, labels, *a, **kw: (xticks.append(list(labels)), real_ticks(ax, labels, *a, **kw))[1])
    common.write_results(tmp_path, RUN_A, None, _pipeline_rows(RUN_A, 50, 1, {"reference": 2.6, "triton": 2.0}),
                         plot=False)
    common.write_results(tmp_path, RUN_B, None, _pipeline_rows(RUN_B, 250, 1, {"reference": 13.8, "triton": 10.0}),
                         plot=False)
    common.write_results(tmp_path, RUN_C, None, _pipeline_rows(RUN_C, 250, 2, {"reference": 12.0, "triton": 6.0}))
    labels, = xticks
    assert len(labels) == 3 and any("50 steps" in x for x in labels), labels
    assert sum("batch 2" in x for x in labels) == 1, labels
    assert sorted(round(h, 2) for h in heights["triton"].values()) == [1.3, 1.38, 2.0], heights
    md = (tmp_path / "results.md").read_text()
    assert md.count("| 64x64 px, batch 1 |") == 4 and md.count("| 64x64 px, batch 2 |") == 2, md


# ------------------------------------------------------ 3: a results.json the tool did not write
NOT_OURS = {
    "truncated": '{"env": {"date": "2026-01-01"}, "ceilings": null, "rows": [{"suite": "ops", ',
    "empty": "",
    "pytest-benchmark": json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": "x",
                                    "version": "5.1.0"}),
    "a list": "[]",
    "rows of numbers": json.dumps({"rows": [1, 2]}),
    "rows of numbers, with env": json.dumps({"env": {}, "ceilings": None, "rows": [1, 2]}),
    "env not an object": json.dumps({"env": [], "ceilings": None, "rows": []}),
    "no ceilings": json.dumps({"env": {}, "rows": []}),  # a KeyError traceback before
    "a row without a status": json.dumps({"env": {"runs": []}, "ceilings": {}, "rows": [{"suite": "ops"}]}),
    "a row of another status": json.dumps({"env": {}, "ceilings": None, "rows": [
        {"suite": "ops", "op": "attention", "backend": "triton", "status": "fast"}]}),
}


@pytest.fixture
def suites(monkeypatch):
    """ops.run / tune.run / pipelines.run / the ceilings replaced by recorders of their calls, each
    suite returning one ok row."""
    calls: dict[str, int] = {}

    def recorder(name, make):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return make(*args, **kwargs)
        return run

    monkeypatch.setattr(ops, "run", recorder("ops", lambda *a, **k: _ops_rows(a[5], {("attention", "reference"): 1.0})))
    monkeypatch.setattr(tune, "run", recorder("tune", lambda *a, **k: []))
    monkeypatch.setattr(pipelines, "run",
                        recorder("pipelines", lambda opts, device, env, **k: _unet_rows(env, {"reference": 1.0})))
    monkeypatch.setattr(common, "measure_ceilings", recorder("ceilings", lambda *a, **k: CEILINGS))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return calls


@pytest.mark.parametrize("what", list(NOT_OURS))
def test_a_results_json_the_tool_did_not_write_is_refused_before_running(what, tmp_path, suites, capsys):
    (tmp_path / "results.json").write_text(NOT_OURS[what])
    with pytest.raises(SystemExit) as e:
        main(["ops", "--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not suites, (e.value.code, suites)
    assert f"not a results file of this tool: {tmp_path / 'results.json'} (" in err, err
    assert "use another --out or remove it" in err and len(err.strip().splitlines()[-1]) < 400, err
    assert (tmp_path / "results.json").read_text() == NOT_OURS[what], "the file was overwritten"


def test_the_default_folder_is_checked_too(tmp_path, suites, capsys, monkeypatch):
    monkeypatch.setattr(common, "default_out_dir", lambda env, quick=False: tmp_path)
    (tmp_path / "results.json").write_text(NOT_OURS["pytest-benchmark"])
    assert main(["pipelines", "--quick", "--unet-only", "--no-progress", "--no-plot"]) == 2
    assert not suites and "not a results file of this tool" in capsys.readouterr().err


def test_a_file_spoiled_during_the_run_is_an_error_message_not_a_crash(tmp_path, suites, capsys, monkeypatch):
    """write_results never raises anything but OSError on a bad results.json, which the CLI reports
    (exit 1, the table already printed on stdout) instead of a traceback after the whole run."""
    for what, text in NOT_OURS.items():
        (tmp_path / "results.json").write_text(text)
        with pytest.raises(OSError, match="not a results file of this tool"):
            common.write_results(tmp_path, RUN_A, None, _unet_rows(RUN_A, {"reference": 1.0}), plot=False)
    real = pipelines.run
    monkeypatch.setattr(pipelines, "run", lambda *a, **k: (
        (tmp_path / "results.json").write_text("[]"), real(*a, **k))[1])
    (tmp_path / "results.json").unlink()
    assert main(["pipelines", "--quick", "--unet-only", "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 1
    out, err = capsys.readouterr()
    assert "| unet_step |" in out and "could not write results" in err and "not a results file" in err, err
    assert (tmp_path / "results.json").read_text() == "[]"


def test_a_results_json_the_tool_wrote_is_merged_through_the_cli(tmp_path, suites, capsys):
    """`bench ops` then `bench pipelines --unet-only`, then `bench ops` again, into one --out."""
    main(["ops", "--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    assert main(["pipelines", "--quick", "--unet-only", "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 0
    assert main(["ops", "--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 0
    assert sorted(r["suite"] for r in _read(tmp_path)["rows"]) == ["ops", "unet_step"]
    assert suites["ops"] == 2 and "kept 1 earlier row(s)" in capsys.readouterr().err


# ------------------------------------------------------------------ 4: one device's rows per folder
H100_FILE = common.RESULTS_DIR / "2026-11-23-h100-2" / "ops-scheduler-step-fp16.json"


def test_a_run_on_another_device_is_refused_before_running(tmp_path, suites, capsys):
    """A CPU run into a folder of H100 rows replaced the H100's reference row, kept its other rows
    beside it, and made the file's ceilings and results.md's title the CPU's. It is refused before
    anything runs (no suite, no ceilings), naming the folder's device and this run's."""
    (tmp_path / "results.json").write_bytes(H100_FILE.read_bytes())
    assert main(["ops", "--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert not suites, suites
    here = common.device_name(torch.device("cpu"))
    assert (f"{tmp_path / 'results.json'} holds rows measured on 'NVIDIA H100 80GB HBM3'; this run is on {here!r}"
            in err and err.rstrip().endswith("use another --out")), err
    assert (tmp_path / "results.json").read_bytes() == H100_FILE.read_bytes(), "the file was rewritten"
    # the folder's devices are its runs' (env.runs) as well as its rows'
    folder = tmp_path / "b"
    common.write_results(folder, RUN_A, None, _unet_rows(RUN_A, {"reference": 1.0}), plot=False)
    data = _read(folder)
    data["rows"] = [{**r, "device_name": None} for r in data["rows"]]
    (folder / "results.json").write_text(json.dumps(data))
    assert "holds rows measured on 'CPU test (1 threads)'; this run is on 'GPU'" in common.device_problem(folder, "GPU")
    assert common.device_problem(folder, RUN_A["device_name"]) is None


def test_write_results_refuses_another_devices_folder(tmp_path):
    """Called directly (not through the CLI), write_results raises OSError, as for a file not its own,
    and leaves the file as it was; the same device merges as before."""
    common.write_results(tmp_path, RUN_A, CEILINGS, _ops_rows(RUN_A, {("attention", "reference"): 4.0}), plot=False)
    before = (tmp_path / "results.json").read_text()
    gpu = {**RUN_B, "device_name": "NVIDIA H100 80GB HBM3"}
    with pytest.raises(OSError, match=r"holds rows measured on 'CPU test \(1 threads\)'; this run is on "
                                      r"'NVIDIA H100 80GB HBM3'"):
        common.write_results(tmp_path, gpu, CEILINGS, _ops_rows(gpu, {("attention", "reference"): 1.0}), plot=False)
    assert (tmp_path / "results.json").read_text() == before
    common.write_results(tmp_path, RUN_B, CEILINGS, _ops_rows(RUN_B, {("attention", "sdpa"): 1.0}), plot=False)
    assert len(_read(tmp_path)["rows"]) == 2


def test_the_recorded_command_can_be_typed_again():
    """`python -m bench ...` has sys.argv[0] = the absolute path of bench/__main__.py: recorded as
    such, the command failed when re-run (`python bench/__main__.py`: relative imports) and put the
    machine's paths into committed results. It is recorded as the module, its arguments quoted."""
    main, host = str(common.REPO / "bench" / "__main__.py"), str(common.REPO / "bench" / "host.py")
    assert common.command_line([main, "ops", "--out", "/tmp/a b"]) == "python -m bench ops --out '/tmp/a b'"
    assert common.command_line([host, "--json"]) == "python -m bench.host --json"
    assert common.command_line(["/usr/bin/pytest", "-q", "bench/"]) == "/usr/bin/pytest -q bench/"
    assert common.command_line([]) == ""
