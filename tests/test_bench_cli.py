"""``python -m bench``'s plumbing, checked without timing anything: which suites a command line
runs, what each suite is handed (ops, dtypes, masked tail, quick), where results go and whether plots
are written; the tune sweep's candidate grids and accuracy bounds; and bench.sm90's host-side
arithmetic and patching, which need no GPU (and no ptxas).

The suites' ``run`` functions and the device ceilings are replaced by recorders (``suites``), so a
full ``main(argv)`` takes well under a second; tests/test_bench.py runs the real suites.
"""
from __future__ import annotations

import collections
import itertools
import json
import sys
import types

import pytest
import torch

from bench import common, ops, pipelines, sm90, tune
from bench.__main__ import main

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- CLI plumbing
@pytest.fixture
def suites(monkeypatch):
    """Replace ops.run / tune.run / pipelines.run / common.measure_ceilings with recorders: the
    returned dict maps each suite to the (args, kwargs) it was called with; each suite returns one
    ok row with a speed-up, so the results files and plots have something to show."""
    calls: dict[str, tuple] = {}

    def row(env, suite, **fields):
        return common.make_row(env, suite=suite, status="ok", dtype="fp32", median_ms=1.0, p20_ms=1.0, p80_ms=1.0,
                               speedup_vs_reference=1.0, backend="reference", **fields)

    def ops_run(*args, **kwargs):
        calls["ops"] = (args, kwargs)
        return [row(args[5], "ops", op="attention", case="tiny.self")]

    def tune_run(*args, **kwargs):
        calls["tune"] = (args, kwargs)
        return [row(args[4], "tune", op="attention", case="tiny.self")]

    def pipelines_run(opts, device, env, **kwargs):
        calls["pipelines"] = ((opts, device, env), kwargs)
        return [row(env, "unet_step", op="unet", case="tiny", preset="tiny")]

    def ceilings(device, dtypes, **kwargs):
        calls["ceilings"] = ((device, list(dtypes)), kwargs)
        return {"copy_gbps": 1.0, "copy_bytes": 1, "matmul_tflops": {}, "matmul_n": 1, "how": "test"}

    monkeypatch.setattr(ops, "run", ops_run)
    monkeypatch.setattr(tune, "run", tune_run)
    monkeypatch.setattr(pipelines, "run", pipelines_run)
    monkeypatch.setattr(common, "measure_ceilings", ceilings)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.setdefault("threads", []).append(n))
    return calls


def _main(argv, tmp_path, *, plot=False):
    rc = main([*argv, "--out", str(tmp_path), "--no-progress", *([] if plot else ["--no-plot"])])
    assert rc == 0, f"main({argv}) exited {rc}"
    return json.loads((tmp_path / "results.json").read_text())


@pytest.mark.parametrize("argv", [["--quick"], ["all", "--quick"]])
def test_no_subcommand_and_all_run_both_suites(argv, suites, tmp_path):
    """`python -m bench --quick` (README) and `bench all` run ops and pipelines, never tune."""
    data = _main(argv, tmp_path)
    ran = sorted(k for k in suites if k in ("ops", "tune", "pipelines"))
    assert ran == ["ops", "pipelines"], f"{argv}: suites run {ran}, expected ops and pipelines"
    assert sorted({r["suite"] for r in data["rows"]}) == ["ops", "unet_step"], data["rows"]


@pytest.mark.parametrize("suite", ["ops", "tune", "pipelines"])
def test_a_subcommand_runs_its_suite_alone(suite, suites, tmp_path):
    _main([suite, "--quick"], tmp_path)
    ran = sorted(k for k in suites if k in ("ops", "tune", "pipelines"))
    assert ran == [suite], f"`bench {suite}` ran {ran}"
    measured = "ceilings" in suites
    assert measured == (suite == "ops"), f"`bench {suite}`: device ceilings measured: {measured}"


def test_cpu_defaults_are_fp32_and_quick_is_forwarded(suites, tmp_path):
    """On CPU every suite defaults to fp32 (--help: "fp32 on CPU"), and --quick reaches each suite."""
    _main(["all", "--quick"], tmp_path)
    (names, _, dtypes, *_), ops_kw = suites["ops"]
    assert dtypes == [torch.float32] and ops_kw["quick"] is True, (dtypes, ops_kw)
    assert names == ops.known_ops(), names
    assert suites["ceilings"][0][1] == [torch.float32], suites["ceilings"]
    opts = suites["pipelines"][0][0]
    assert opts.dtype == torch.float32 and opts.quick is True and opts.preset == "tiny", opts
    _main(["tune", "--quick"], tmp_path / "tune")
    (tune_ops, tune_dtypes, *_), tune_kw = suites["tune"]
    assert tune_dtypes == [torch.float32] and tune_kw["quick"] is True, (tune_dtypes, tune_kw)


def test_cuda_defaults_are_the_documented_half_precisions(suites, tmp_path, monkeypatch):
    """On a CUDA device (pretended: the suites are recorders), per --help: ops fp16 and bf16, tune
    fp16 only, pipelines fp16 with the sd15 preset; the ceilings are measured in the ops' dtypes."""
    env = {**common.environment(CPU), "device": "cuda", "device_name": "pretend GPU"}  # no GPU to ask
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(common, "environment", lambda device: dict(env))
    _main(["all"], tmp_path / "all")
    assert suites["ops"][0][2] == [torch.float16, torch.bfloat16], f"ops dtypes on CUDA: {suites['ops'][0][2]}"
    assert suites["ceilings"][0][1] == [torch.float16, torch.bfloat16], suites["ceilings"]
    opts = suites["pipelines"][0][0]
    assert opts.dtype == torch.float16 and opts.preset == "sd15", (opts.dtype, opts.preset)
    _main(["tune"], tmp_path / "tune")
    assert suites["tune"][0][1] == [torch.float16], f"tune dtypes on CUDA: {suites['tune'][0][1]}"
    assert "threads" not in suites, "set_num_threads called for a CUDA run"


def test_a_cuda_device_named_by_index_becomes_the_current_one(suites, tmp_path, monkeypatch):
    """--device cuda:1: the timers (CUDA events, do_bench's flush buffer) and CUDA-graph capture
    use the current device, so the run makes cuda:1 current (they timed device 0's idle stream)."""
    env = {**common.environment(CPU), "device": "cuda:1", "device_name": "pretend GPU"}
    made_current = []
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device("cuda:1"))
    monkeypatch.setattr(common, "environment", lambda device: dict(env))
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    _main(["ops", "--device", "cuda:1"], tmp_path / "ops")
    assert made_current == [torch.device("cuda:1")], made_current


def test_tune_defaults_to_the_inference_kernels_and_forwards_masked_tail(suites, tmp_path):
    """`bench tune` sweeps DEFAULT_OPS (the backward and the Gluon forward only when named), and
    --masked-tail reaches the sweep."""
    _main(["tune", "--quick"], tmp_path / "a")
    (ops_, dtypes, shapes, *_), kw = suites["tune"]
    assert ops_ == ["attention", "group_norm_silu"] and kw["masked_tail"] is False, (ops_, kw)
    _main(["tune", "--quick", "--masked-tail", "--dtypes", "fp16", "float32", "--shapes", "tiny.self"], tmp_path / "b")
    (ops_, dtypes, shapes, *_), kw = suites["tune"]
    assert kw["masked_tail"] is True, f"--masked-tail not forwarded to tune.run: {kw}"
    assert dtypes == [torch.float16, torch.float32] and shapes == ["tiny.self"], (dtypes, shapes)


def test_quick_runs_on_one_cpu_thread_unless_threads_is_given(suites, tmp_path):
    """--help: --threads defaults to torch's choice, 1 with --quick; --threads N wins; after the run
    torch has its earlier count back (tests calling main() ran the rest of the session on 1 thread)."""
    before = torch.get_num_threads()
    _main(["ops", "--quick"], tmp_path / "a")
    assert suites.get("threads") == [1, before], f"--quick set threads {suites.get('threads')}, expected 1, then back"
    del suites["threads"]
    _main(["ops", "--quick", "--threads", "3"], tmp_path / "b")
    assert suites["threads"] == [3, before], suites["threads"]
    del suites["threads"]
    _main(["ops"], tmp_path / "c")
    assert "threads" not in suites, f"without --quick or --threads torch's choice stays: set {suites['threads']}"


def test_quick_results_go_to_the_git_ignored_directory(suites, tmp_path, monkeypatch):
    """Without --out: --quick writes under out/bench-quick/ (default_out_dir(quick=True)), a full
    run under bench/results/."""
    asked = []

    def out_dir(env, quick=False):
        asked.append(quick)
        return tmp_path / ("quick" if quick else "full")

    monkeypatch.setattr(common, "default_out_dir", out_dir)
    for argv in (["ops", "--quick"], ["ops"]):
        assert main([*argv, "--no-progress", "--no-plot"]) == 0
    assert asked == [True, False], f"default_out_dir asked with quick={asked}"
    assert (tmp_path / "quick" / "results.json").exists() and (tmp_path / "full" / "results.json").exists()


def test_no_plot_writes_no_png(suites, tmp_path):
    _main(["ops", "--quick"], tmp_path / "plain", plot=True)
    assert list((tmp_path / "plain").glob("speedup-*.png")), "no plot written without --no-plot"
    _main(["ops", "--quick"], tmp_path / "noplot")
    assert not list((tmp_path / "noplot").glob("*.png")), "--no-plot wrote plots"


def test_without_matplotlib_the_run_warns_and_writes_no_plots(suites, tmp_path, monkeypatch, capsys):
    """matplotlib is in the bench and test extras, not in a base install: the README's main job
    exited 1 with a traceback after the run (results written, plots not); it says why up front."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    rc = main(["ops", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "matplotlib does not import" in capsys.readouterr().err
    assert (tmp_path / "results.json").exists() and not list(tmp_path.glob("*.png"))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The code as a non-editable install sees itself: its packages in a site-packages folder with no
    setup.py and no .git of its own, here inside an unrelated git repository (a project's .venv)."""
    import subprocess

    from pipelines import common as pcommon

    outer = tmp_path / "project"
    site = outer / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(outer)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the user's project"], check=True)
    monkeypatch.setattr(pcommon, "ROOT", site)
    monkeypatch.setattr(common, "RESULTS_DIR", site / "bench" / "results")
    monkeypatch.chdir(tmp_path)
    return site


def test_installed_code_records_no_other_repositorys_commit(installed, monkeypatch):
    """git asked in site-packages answered for the enclosing repository: both CLIs recorded the
    user's project's commit as sdlab's. Installed, there is no commit (None) and no dirty flag."""
    from pipelines.common import git_commit, source_tree

    monkeypatch.delenv("SDLAB_GIT_COMMIT", raising=False)
    assert source_tree() is None and git_commit() is None
    env = common.environment(torch.device("cpu"))
    assert env["git_commit"] is None and env["git_dirty"] is None, (env["git_commit"], env["git_dirty"])
    assert env["sdlab"], "the bench env records sdlab's version"


def test_installed_code_writes_results_in_the_working_directory(installed, tmp_path):
    """Installed, the default folders were inside site-packages (read-only for a system install,
    left behind by pip uninstall): they are ./out/bench-quick/ and ./bench-results/ of the working
    directory. From a checkout they stay the checkout's."""
    env = {"device_name": "CPU test (1 threads)"}
    assert common.default_out_dir(env, quick=True).parent == tmp_path / "out" / "bench-quick"
    assert common.default_out_dir(env).parent == tmp_path / "bench-results"
    assert installed not in common.default_out_dir(env).parents


def test_a_source_tree_keeps_its_own_result_folders(monkeypatch, tmp_path):
    """A checkout, or a copy of one without .git (a GPU machine's): the tree's folders, and no
    commit from git there (SDLAB_GIT_COMMIT names it), though the copy sits in another repository."""
    import subprocess

    from pipelines import common as pcommon

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "an enclosing repository"], check=True)
    tree = tmp_path / "copy"
    tree.mkdir()
    (tree / "setup.py").write_text("")
    monkeypatch.setattr(pcommon, "ROOT", tree)
    monkeypatch.setattr(common, "RESULTS_DIR", tree / "bench" / "results")
    monkeypatch.chdir(tmp_path)
    env = {"device_name": "CPU test (1 threads)"}
    assert common.default_out_dir(env, quick=True).parent == tree / "out" / "bench-quick"
    assert common.default_out_dir(env).parent == tree / "bench" / "results"
    assert pcommon.git_commit() is None, "a copy without .git has no commit of its own"


def _raising_in(path, call=None):
    """A function defined in file ``path`` (as its frames name it) that calls ``call``, or raises."""
    ns = {"call": call}
    exec(compile("def f():\n    call() if call else 1 / 0\n", str(path), "exec"), ns)
    return ns["f"]


def test_error_location_names_only_this_projects_frames(monkeypatch, tmp_path):
    """Installed, REPO is site-packages, so torch's frames were 'in the repository': an error
    raised in torch read "(at torch/nn/functional.py:N)". Only this project's packages count."""
    from pipelines import common as pcommon

    site = tmp_path / "venv" / "site-packages"
    monkeypatch.setattr(common, "REPO", site)
    monkeypatch.setattr(pcommon, "ROOT", site)  # no setup.py: installed
    with pytest.raises(ZeroDivisionError) as e:
        _raising_in(site / "kernels/attention.py", _raising_in(site / "torch/nn/functional.py"))()
    where = common.describe_exception(e.value)
    assert where.endswith(" (at kernels/attention.py:2)"), where
    with pytest.raises(ZeroDivisionError) as e:
        _raising_in(site / "torch/nn/functional.py")()
    assert " (at " not in common.describe_exception(e.value), common.describe_exception(e.value)


def test_error_location_in_a_source_tree_names_a_plugin_file(monkeypatch, tmp_path):
    """In a checkout, a research plugin's file (``--plugin upcast_softmax.py`` from the root, as
    README shows) is where its error is, not the registry that called it; the virtual environment's
    files are not."""
    from pipelines import common as pcommon

    tree = tmp_path / "checkout"
    monkeypatch.setattr(common, "REPO", tree)
    monkeypatch.setattr(pcommon, "ROOT", tree)
    (tree).mkdir()
    (tree / "setup.py").write_text("")
    torch_file = tree / ".venv/lib/python3.11/site-packages/torch/nn/functional.py"
    with pytest.raises(ZeroDivisionError) as e:
        _raising_in(tree / "kernels/registry.py", _raising_in(tree / "my_plugin.py", _raising_in(torch_file)))()
    where = common.describe_exception(e.value)
    assert where.endswith(" (at my_plugin.py:2)"), where


def test_list_shapes_lists_only_the_ops_asked_for(capsys):
    assert main(["ops", "--list-shapes", "--ops", "scheduler_step"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == {"scheduler_step"}, f"--ops scheduler_step listed the shapes of {sorted(listed)}"


@pytest.mark.parametrize("argv,needle", [
    (["ops", "--ops", "group_norm_silu", "--backends", "sdpa"],
     "none of the backends ['sdpa'] applies to ops ['group_norm_silu']"),
    # tune sweeps attention and group_norm_silu by default: a scheduler_step case is no shape of theirs
    (["tune", "--shapes", "tiny.latent"], "unknown shape case 'tiny.latent'; valid: "),
])
def test_values_that_select_nothing_are_errors(argv, needle, capsys, suites):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, err
    assert not suites, f"a suite ran: {sorted(suites)}"


# ----------------------------------------------------------------------- tune: candidate grids
def _case(op, d=40, lkv=4096, **params):
    if op == "attention":
        params = dict(b=2, h=8, lq=4096, lkv=lkv, d=d)
    return ops.Case(op, "c", "test shape", "test", params)


def _tiles(cands):
    return [(c.config.block_m, c.config.block_n, c.config.num_warps, c.config.num_stages) for c in cands[1:]]


def test_attention_grid_is_every_tile_and_labels_say_which():
    """The full forward grid: queries per program {64, 128} x keys per step {32, 64, 128} x warps
    {4, 8} x stages {2, 3, 4}, each labelled with its own config; none K/V-resident over many keys."""
    cands = tune.attention_candidates(_case("attention", d=64), quick=False)
    assert cands[0] == tune.Candidate(common.DEFAULT_CONFIG, None), cands[0]
    want = set(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]))
    assert set(_tiles(cands)) == want and len(cands) == 1 + len(want), sorted(set(_tiles(cands)) ^ want)
    for c in cands[1:]:
        cfg = c.config
        assert c.label == f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}", (c.label, cfg)
        assert cfg.q_blocks is None and cfg.split_masked_tail is None, c


def test_attention_grid_leaves_out_the_tiles_that_faulted_with_a_head_dim_tail():
    """D = 160 (128 + 32 tail): bn 128 at 3 or more stages faulted the H100 and took the sweep's
    process down, so those 8 tiles are not candidates; bn 128 at 2 stages still is."""
    tiles = set(_tiles(tune.attention_candidates(_case("attention", d=160), quick=False)))
    bad = {t for t in tiles if t[1] >= 128 and t[3] >= 3}
    assert not bad, f"tiles that faulted at D 160: {sorted(bad)}"
    assert len(tiles) == 36 - 8 and (64, 128, 4, 2) in tiles, sorted(tiles)


def test_resident_candidates_up_to_and_including_short_kv():
    """'Over at most SHORT_KV keys': exactly SHORT_KV keys gets the K/V-resident candidates."""
    from kernels.attention import SHORT_KV

    for lkv, want in ((SHORT_KV, 16), (SHORT_KV + 1, 0)):
        resident = [c for c in tune.attention_candidates(_case("attention", lkv=lkv), quick=False)[1:]
                    if c.config.q_blocks is not None]
        assert len(resident) == want, f"Lkv {lkv}: {len(resident)} K/V-resident candidates, expected {want}"


def test_backward_candidates_set_the_kernel_their_label_names():
    """Each backward candidate changes one kernel, the one its label names ("dkdv ..." or "dq ...")."""
    cands = tune.attention_backward_candidates(_case("attention"), quick=False)
    kinds = collections.Counter()
    for c in cands[1:]:
        kind = c.label.split()[0]
        assert list(c.config) == [kind], f"{c.label}: config for {list(c.config)}"
        cfg = c.config[kind]
        assert c.label == f"{kind} bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}", c
        kinds[kind] += 1
    assert kinds == {"dkdv": 3 * 2 * 2 * 2, "dq": 2 * 3 * 2}, kinds


def test_group_norm_candidates_build_the_path_and_tile_their_label_names():
    """Each candidate's config, built for an input, takes its label's path (single / two-pass)
    with tiles of at most its label's size and channel block."""
    shape, groups = (2, 1280, 16, 16), 32  # 40 channels per group: more than the c16 candidates' block
    cands = tune.group_norm_candidates(_case("group_norm_silu", shape=shape, groups=groups), quick=False)
    paths = collections.Counter()
    for c in cands[1:]:
        path, tile, block_c = c.label.split()
        cfg = c.config(torch.float16, 132)
        assert cfg.single_pass == (path == "single"), f"{c.label}: single_pass={cfg.single_pass}"
        assert cfg.block_c <= int(block_c.removeprefix("c")), f"{c.label}: block_c {cfg.block_c}"
        assert cfg.block_c * cfg.block_s <= int(tile.removeprefix("tile")), f"{c.label}: {cfg}"
        paths[path] += 1
    assert paths == {"single": 8, "two-pass": 8}, paths


def test_gluon_candidates_keep_two_warpgroups_of_128_rows():
    """The Gluon forward's docstring: 128 query rows in 8 warps (two warpgroups) throughout."""
    for quick in (True, False):
        cands = tune.gluon_sm90_candidates(None, quick=quick)
        assert {c.config[:1] + c.config[2:3] for c in cands[1:]} == {(128, 8)}, [c.config for c in cands]


# ---------------------------------------------------------------------- tune: accuracy bounds
def test_backward_errors_are_the_worst_of_each_gradient():
    """(max abs, max rel) over (dq, dk, dv): each the worst of the three, whichever holds it."""
    ref = (torch.ones(4), torch.full((4,), 10.0), torch.ones(4))
    out = (ref[0], ref[1] + 1.0, ref[2] + 0.5)  # dk: abs 1.0, rel 0.1; dv: abs 0.5, rel 0.5
    abs_err, rel_err = tune._errors(out, ref)
    assert (abs_err, rel_err) == pytest.approx((1.0, 0.5)), f"errors {(abs_err, rel_err)}, expected (1.0, 0.5)"


def test_backward_bytes_count_q_k_v_o_do_read_and_dq_dk_dv_written():
    case = ops.Case("attention", "c", "B1 H2 Lq8 Lkv4 D16", "test", dict(b=1, h=2, lq=8, lkv=4, d=16))
    q, k, v, do = (torch.zeros(1, 2, n, 16) for n in (8, 4, 4, 8))
    nbytes, flops = tune._work("attention.backward", case, (q, k, v, do), (q, k, v))
    # read q, k, v, o, do and write dq, dk, dv: q, o, do, dq shaped as q (Lq 8); k, v, dk, dv as k (Lkv 4)
    want = 4 * (4 * 8 * 2 * 16 + 4 * 4 * 2 * 16)
    assert nbytes == want, f"backward bytes {nbytes}, expected {want} (o, shaped as q, counted once)"
    assert flops == 5 * (4 * 1 * 2 * 8 * 4 * 16) // 2, flops


@pytest.fixture
def tune_one_case(monkeypatch):
    """``sweep(default_off, {label: off})`` -> rows: the quick attention sweep of tiny.self in fp32
    with candidates ``label`` whose output is the kernel's own times (1 + off), the default's times
    (1 + default_off); ``ref_off`` (keyword) perturbs the registered reference the same way."""
    real_call, real_ref = tune._kernel_call, tune._reference_call

    def sweep(default_off, offs, ref_off=0.0):
        def call(op, config, args):
            fn = real_call(op, None, args)
            off = default_off if config is None else offs[config]
            return lambda: fn() * (1 + off)

        def reference(op, args):
            fn = real_ref(op, args)
            return lambda: fn() * (1 + ref_off)

        monkeypatch.setattr(tune, "_kernel_call", call)
        monkeypatch.setattr(tune, "_reference_call", reference)
        monkeypatch.setitem(tune.CANDIDATES, "attention", lambda case, quick, masked_tail: [
            tune.Candidate(common.DEFAULT_CONFIG, None), *(tune.Candidate(label, label) for label in offs)])
        rows = tune.run(["attention"], [torch.float32], ["tiny.self"], CPU, {}, quick=True, progress=False)
        return {r["backend"]: r for r in rows}

    return sweep


def test_candidates_are_held_to_the_defaults_error_not_the_references(tune_one_case):
    """A reference 1e-3 off, an exact default: a candidate 1e-4 off is within 2x the reference's
    error but not 2x the default's + atol, so it is an error row."""
    rows = tune_one_case(0.0, {"off1e-4": 1e-4, "exact": 0.0}, ref_off=1e-3)
    assert rows["default"]["status"] == "ok" and rows["exact"]["status"] == "ok", rows
    bad = rows["off1e-4"]
    assert bad["status"] == "error" and "> 2 x default's" in bad["note"], (bad["status"], bad["note"])


def test_after_an_inaccurate_default_candidates_are_held_to_the_reference(tune_one_case):
    """A default 1% off is an error row; a candidate as wrong is one too (held to the reference's
    error, not the failed default's), and an exact one is ok."""
    rows = tune_one_case(1e-2, {"as wrong": 1e-2, "exact": 0.0})
    assert rows["default"]["status"] == "error", rows["default"]
    wrong = rows["as wrong"]
    assert wrong["status"] == "error" and "> 2 x reference's" in wrong["note"], (wrong["status"], wrong["note"])
    assert rows["exact"]["status"] == "ok", rows["exact"]


# --------------------------------------------------------------------------- sm90: host side
def _compiled(registers=32, shared_bytes=0, num_warps=4, loops=(), global_loads=None):
    return sm90.Compiled("k", registers, 0, shared_bytes, num_warps, 3, collections.Counter(),
                         collections.Counter(global_loads or {}), tuple(loops))


@pytest.mark.parametrize("kw,want,why", [
    (dict(registers=100, num_warps=1), 19, "100 regs x 32 = 3200 per warp, allocated 3328 (13 x 256): 65536 // 3328"),
    (dict(registers=16, num_warps=8), 8, "registers allow 16 programs; 64 warps per SM allow 8"),
    (dict(registers=16, num_warps=1), 32, "at most 32 programs per SM"),
    (dict(registers=32, num_warps=4, shared_bytes=100 * 1024), 2, "228 KB // (100 KB + 1 KB reserved)"),
    (dict(registers=32, num_warps=4, shared_bytes=113 * 1024 + 512), 1, "228 KB // (113.5 KB + 1 KB reserved)"),
    (dict(registers=255, num_warps=8), 1, "255 regs: 8192 per warp, 8 warps, 65536 registers"),
])
def test_ctas_per_sm_follows_the_sm90_occupancy_rules(kw, want, why):
    got = _compiled(**kw).ctas_per_sm
    assert got == want, f"{kw}: {got} programs/SM, expected {want} ({why})"


def test_narrow_loads_are_those_without_a_128_modifier():
    """A .128 modifier anywhere (LDG.E.128.CONSTANT: a 16-byte read-only load) is a 16-byte load;
    LTC128B (an L2 prefetch hint) is no width."""
    loads = {"LDG.E.128": 4, "LDG.E.128.CONSTANT": 1, "LDGSTS.E.BYPASS.LTC128B.128": 2, "LDG.E": 2, "LDG.E.U16": 1,
             "LDG.E.64": 1, "LDGSTS.E.LTC128B": 3}
    got = _compiled(global_loads=loads).narrow_loads
    assert got == 2 + 1 + 1 + 3, f"narrow loads {got} of {loads}, expected 7 (LDG.E, .U16, .64, LDGSTS.E.LTC128B)"


def test_loop_is_the_innermost_loop_with_most_instructions():
    """Not the one with most distinct opcodes: 10 FFMA beat 3 single instructions."""
    long_, varied = collections.Counter(FFMA=10), collections.Counter(MUFU=1, FADD=1, BRA=1)
    c = _compiled(loops=(varied, long_))
    assert c.loop == long_ and c.loop_instructions == 10, c.loop
    assert _compiled().loop == collections.Counter() and _compiled().loop_instructions == 0


@pytest.fixture
def fake_kernel_module(monkeypatch):
    """A module ``fake_sm90_kernels`` with a kernel ``k`` and the registry's ``interpreting``, and a
    toolchain of placeholders: bench.sm90.capture then runs with neither a GPU nor ptxas."""
    from kernels import _triton, registry

    mod = types.ModuleType("fake_sm90_kernels")
    mod.k = object()
    mod.interpreting = registry.interpreting
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(_triton, "INTERPRET", False)
    noop = lambda *a, **k: None  # noqa: E731
    monkeypatch.setattr(sm90, "_toolchain", lambda: (noop, noop, noop, noop, noop, noop, "/nowhere"))
    return mod


def test_capture_patches_launches_and_the_checks_and_restores_them(fake_kernel_module):
    from kernels import registry

    mod, kernel, interp = fake_kernel_module, fake_kernel_module.k, registry.interpreting
    with pytest.raises(KeyError, match="inside"):
        with sm90.capture(mod.__name__, "k") as found:
            assert found == [] and mod.k is not kernel, "the kernel is not wrapped inside capture"
            assert mod.interpreting() is True and registry.interpreting() is True, "launch checks not patched"
            raise KeyError("inside")  # an error in the block restores all the same
    assert mod.k is kernel, "the kernel was not restored"
    assert registry.interpreting is interp and mod.interpreting is interp, "interpreting() was not restored"


def test_capture_refuses_interpreter_functions(fake_kernel_module, monkeypatch):
    from kernels import _triton

    monkeypatch.setattr(_triton, "INTERPRET", True)
    with pytest.raises(sm90.Unavailable, match="TRITON_INTERPRET is set"):
        with sm90.capture(fake_kernel_module.__name__, "k"):
            pytest.fail("capture ran under the interpreter")


def test_sm90_main_reports_records_and_exits_3_when_unavailable(monkeypatch, capsys):
    compiled = _compiled(registers=64, num_warps=4, loops=(collections.Counter(HGMMA=2, MUFU=3),),
                         global_loads={"LDG.E.128": 4, "LDG.E": 2})
    compiled.sass.update(HGMMA=5)
    compiled.loop_mufu_in_flight = 3

    def capture_one(module, *names):
        import contextlib

        @contextlib.contextmanager
        def cm():
            yield [compiled]
        return cm()

    monkeypatch.setattr(sm90, "sd15_calls", lambda: [("case A", "m", ("k",), lambda: None)])
    monkeypatch.setattr(sm90, "capture", capture_one)
    assert sm90.main(["--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    want = dict(case="case A", kernel="k", registers=64, spill_bytes=0, shared_bytes=0, ctas_per_sm=8,
                narrow_loads=2, global_loads={"LDG.E.128": 4, "LDG.E": 2}, hgmma=5, loop_instructions=5,
                loop_mix={"HGMMA": 2, "MUFU": 3}, loop_mufu_in_flight=3)
    assert rec == want, f"record {rec}, expected {want}"

    def unavailable(module, *names):
        raise sm90.Unavailable("no ptxas here")

    monkeypatch.setattr(sm90, "capture", unavailable)
    assert sm90.main(["--json"]) == 3, "unavailable must exit 3 (tests/test_sm90_compile.py skips on it)"
    assert json.loads(capsys.readouterr().out) == {"unavailable": "no ptxas here"}
    assert sm90.main([]) == 3 and capsys.readouterr().out.strip() == "unavailable: no ptxas here"


def _gpu_check_commands() -> list[tuple[str, list[str]]]:
    """(stage, argv) of every `python -m bench ...` that bench/gpu_checks.sh runs, as the shell would
    split it, with its redirections dropped."""
    import re
    import shlex

    text = (common.REPO / "bench" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    body = text[text.index('for stage in $stages; do'):]
    commands = []
    for stage, block in re.findall(r"^\s*([a-z0-9-]+)\) (.*?);;", body, flags=re.M | re.S):
        for part in block.split("&&"):
            if m := re.search(r'"\$py" -m bench (.*)', part):
                argv = shlex.split(m.group(1).split(">")[0])
                commands.append((stage, [a.replace("$out", "OUT") for a in argv]))
    return commands


def test_gpu_checks_bench_commands_parse_and_validate(tmp_path, monkeypatch, gluon_sweep):
    """Each bench command the GPU session's script runs is taken by the bench CLI as written: its
    subcommand, options, --shapes selectors (each selects a case), --variants and --plugin. A GPU
    session is lent for 30 minutes; a stage refused for a renamed case or option costs one. Checked
    here as far as the CLI checks before it runs (the device is this machine's)."""
    from bench.__main__ import _load_plugins, _validate, build_parser

    commands = _gpu_check_commands()
    stages = {stage for stage, _ in commands}
    assert stages >= {"gluon", "ops", "tune", "tune-bwd", "unet", "pipelines", "repaint250", "split"}, stages
    monkeypatch.chdir(tmp_path)
    for stage, argv in commands:
        argv = [a.replace("OUT", str(tmp_path / "out"), 1) if a.startswith("OUT") else a for a in argv]
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
            args.plugins = _load_plugins(args.suite_parser, args.plugin)
            _validate(args.suite_parser, args)
        except SystemExit as e:
            pytest.fail(f"gpu_checks.sh stage {stage}: `python -m bench {' '.join(argv)}` is refused (exit {e.code})")
        if getattr(args, "shapes", None):
            assert all(any(ops.shape_selected(c.name, [s]) for op in ops.CASES for c in ops.CASES[op])
                       for s in args.shapes), (stage, args.shapes)


def test_gpu_checks_pytest_selections_exist():
    """The script's pytest stages name files and -k selections that exist (a renamed test would
    make `split` select nothing and pass)."""
    text = (common.REPO / "bench" / "gpu_checks.sh").read_text()
    assert (common.REPO / "tests" / "test_attention_sm90.py").is_file()
    assert "def test_masked_tail_split" in (common.REPO / "tests" / "test_attention.py").read_text()
    assert "-k masked_tail_split" in text and '--ignore tests/test_attention_sm90.py' in text


def test_threads_commit_and_odd_results_files_are_refused_up_front(tmp_path, monkeypatch, capsys):
    """From a fuzz of the CLI (2026-11-25): --threads 100000 crashed the process (10**12 an
    OverflowError traceback); a SDLAB_GIT_COMMIT of non-UTF-8 bytes failed after the run, leaving
    results.md empty (any string was recorded as the commit); a FIFO named results.json blocked for
    ever; one nested 10^5 deep was a RecursionError. Each is refused before anything runs."""
    import os

    def refused(argv):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--no-progress", "--no-plot"])
        return e.value.code, capsys.readouterr().err

    base = ["ops", "--quick", "--ops", "scheduler_step", "--backends", "reference", "--out"]
    code, err = refused([*base, str(tmp_path / "a"), "--threads", str(10**5)])
    assert code == 2 and f"--threads 100000: this machine has {os.cpu_count()} CPUs" in err, err
    monkeypatch.setenv("SDLAB_GIT_COMMIT", "abc\ndef")
    code, err = refused([*base, str(tmp_path / "b")])
    assert code == 2 and "SDLAB_GIT_COMMIT='abc\\ndef': not a git commit hash" in err, err
    monkeypatch.delenv("SDLAB_GIT_COMMIT")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "results.json")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "results.json").write_text("[" * 100000 + "]" * 100000)
    for folder, why in ((fifo, "not a regular file"), (deep, "nested too deeply")):
        code, err = refused([*base, str(folder)])
        assert code == 2 and f"{folder / 'results.json'} ({'invalid JSON: ' if folder is deep else ''}{why})" in err, err
