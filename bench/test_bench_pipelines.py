"""The pipeline cases of ``bench.pipelines`` under pytest-benchmark: ``pytest bench/ --benchmark-only``.

The same cases as ``python -m bench pipelines``: the UNet step (one CFG step, batch 2) for each
kernel variant and baseline (``compile``, ``diffusers-sdpa``, ``@graph`` replays,
``triton-dispatch``), and each pipeline (txt2img, img2img, repaint, unet9, blend) with every op on
``reference``, every op on ``triton``, and one op at a time on ``triton``. pytest-benchmark times
them; each case's ``extra_info`` holds the rest of its ``bench pipelines`` row (UNet calls and ms
per step, peak memory, the scheduler's share, the note, and the difference from the all-reference
run: max |Δ| of the latents, PSNR of the images).

Defaults: on CUDA the random-weight ``sd15`` preset, fp16, 50 steps, 1 warm-up and 3 timed runs
per pipeline; on CPU the ``tiny`` preset, fp32, 2 steps, 1 warm-up and 1 timed run, one thread,
and the triton variants skipped, as under ``bench --quick`` (interpreted, tens of seconds per UNet
call) unless ``--sd-interpreted`` is given. ``--sd-preset``, ``--sd-ckpt``, ``--sd-steps`` and ``--sd-dtype``
change them (bench/conftest.py). Equivalence within tight tolerances is tests/test_kernels_e2e.py's
job; here a variant fails when it errors, gives non-finite output, or strays from the all-reference
run by bench.pipelines.divergence: decoded images under MIN_PSNR_DB, a UNet step's output over
MAX_STEP_REL_DIFF (the rule that makes such a `bench pipelines` row an error).
"""
from bench import common

common.prepare_environment()  # before kernels is imported (TRITON_INTERPRET on CPU)

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import pipelines as bp  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

_REFERENCE: dict = {}  # (case kind, name) -> the all-reference run's outputs
_OPTIONS: dict = {}  # id(pytest config) -> Options


def options(config) -> bp.Options:
    """The run's Options from the --sd-* flags (bench/conftest.py); a UsageError names a bad one."""
    if id(config) in _OPTIONS:
        return _OPTIONS[id(config)]
    get = config.getoption
    try:
        dtype = common.parse_dtype(get("--sd-dtype") or ("fp16" if CUDA else "fp32"))
    except ValueError as e:
        raise pytest.UsageError(f"--sd-dtype: {e}") from None
    preset, ckpt, steps = get("--sd-preset"), get("--sd-ckpt"), get("--sd-steps")
    if preset is not None and preset not in bp.preset_names():
        raise pytest.UsageError(f"--sd-preset: unknown preset {preset!r}; valid: {', '.join(bp.preset_names())}")
    if ckpt is not None and preset is not None:
        raise pytest.UsageError(f"--sd-ckpt {ckpt} and --sd-preset {preset}: give one (the checkpoint is the model)")
    if ckpt is not None and not Path(ckpt).exists():
        raise pytest.UsageError(f"--sd-ckpt {ckpt}: no such file or directory")
    if steps is not None and steps < 1:
        raise pytest.UsageError(f"--sd-steps must be >= 1, got {steps}")
    if steps is not None and (why := bp.img2img_steps_problem(steps)):  # each img2img case failed instead
        raise pytest.UsageError(f"--sd-steps {steps}: {why} (or deselect img2img with -k)")
    variants = list(dict.fromkeys(get("--sd-variant"))) or bp.variant_names()
    for v in variants:
        try:
            bp.check_variant(v)
        except ValueError as e:
            raise pytest.UsageError(f"--sd-variant: {e}") from None
    _OPTIONS[id(config)] = bp.Options(
        preset=preset or ("sd15" if CUDA else "tiny"), ckpt=Path(ckpt) if ckpt else None,
        pipelines=list(bp.PIPELINES), steps=steps or (50 if CUDA else 2), batch=1, repeats=3 if CUDA else 1,
        warmup=1, dtype=dtype, unet_only=False, variants=variants, quick=not CUDA,
        explicit_variants=get("--sd-interpreted"), quick_name="on CPU (as under bench --quick)",
        run_anyway="pass --sd-interpreted to run it")
    return _OPTIONS[id(config)]


def pytest_generate_tests(metafunc):
    """Variants from --sd-variant (default: all); the pipelines take those that are not UNet-step only."""
    if "variant" not in metafunc.fixturenames:
        return
    variants = options(metafunc.config).variants
    if "name" in metafunc.fixturenames:  # a pipeline; those on the inpainting model last (one model switch)
        metafunc.parametrize("name", sorted(bp.PIPELINES, key=lambda n: bp.PIPELINES[n].inpaint_model))
        variants = [v for v in variants if v not in bp.UNET_BASELINES and not v.endswith(bp.GRAPH_SUFFIX)]
    metafunc.parametrize("variant", variants)


@pytest.fixture(scope="module")
def opts(request) -> bp.Options:
    return options(request.config)


@pytest.fixture(scope="module")
def env():
    with common.one_thread_on_cpu(DEVICE):
        yield common.environment(DEVICE)
    bp._MODELS.clear()


def _skip_or_fail(row: dict) -> None:
    if row["status"] == "skipped":
        pytest.skip(row.get("skip_reason") or row.get("note") or "skipped")
    if row["status"] != "ok":
        pytest.fail(f"{row['op']} {row['backend']}: {row.get('note')}", pytrace=False)


def _record(benchmark, row: dict) -> None:
    benchmark.extra_info.update({k: common._jsonable(v) for k, v in row.items()
                                 if not k.startswith("_") and v is not None})


def _pipeline_reference(name, spec, fn, model, size, opts, env, base):
    key = ("pipeline", name)
    if key not in _REFERENCE:  # the reference case was deselected (-k): run it once, untimed
        row = bp.run_pipeline_variant(spec, fn, model, dataclasses.replace(opts, warmup=0), size, "reference",
                                      DEVICE, env, dict(base), None, repeat=lambda once: once())
        _skip_or_fail(row)
        _REFERENCE[key] = row["_outputs"]
    return _REFERENCE[key]


def test_pipeline(benchmark, opts, env, name, variant):
    spec, base = bp.PIPELINES[name], bp.pipeline_base(name, opts)
    try:
        fn, model, size = bp.pipeline_setup(spec, opts, DEVICE, base)
    except common.Skip as e:
        pytest.skip(str(e))
    baseline = None if variant == "reference" else _pipeline_reference(name, spec, fn, model, size, opts, env, base)
    row = bp.run_pipeline_variant(spec, fn, model, opts, size, variant, DEVICE, env, base, baseline,
                                  repeat=lambda once: benchmark.pedantic(once, rounds=opts.repeats, iterations=1))
    _skip_or_fail(row)
    latents, images = row.pop("_outputs")
    _record(benchmark, row)
    assert torch.isfinite(latents).all() and torch.isfinite(images).all(), (
        f"{name} {variant}: non-finite latents or images")
    if variant == "reference":
        _REFERENCE[("pipeline", name)] = (latents, images)
        return
    assert "psnr_db" in row, f"{name} {variant}: images of another shape than the all-reference run's"
    why = bp.divergence(row)  # bench pipelines' rule (bp.MIN_PSNR_DB), which makes such a row an error
    assert why is None, f"{name} {variant} ({row['dtype']}, {opts.steps} steps, {row['preset']}): {why}; " \
                        f"note: {row.get('note')}"


def test_unet_step(benchmark, opts, env, variant):
    base = bp.unet_step_base(opts)
    try:
        unet, cfg, x, t, ctx = bp.unet_step_inputs(opts, DEVICE, base)
        resident = torch.cuda.memory_allocated(DEVICE) if CUDA else 0  # model + inputs, as bench pipelines
        ready = bp.unet_step_setup(variant, unet, x, t, ctx, cfg, opts, DEVICE, resident)
    except Exception as e:
        _skip_or_fail(bp._variant_error(env, variant, e, base))
        raise
    out = ready["out"]
    assert torch.isfinite(out).all(), f"unet step {variant}: non-finite output"
    key = ("unet_step", base["preset"])
    if variant == "reference":
        _REFERENCE[key] = out
    elif key not in _REFERENCE:  # the reference case was deselected (-k): run it once
        _REFERENCE[key] = bp.unet_step_setup("reference", unet, x, t, ctx, cfg, opts, DEVICE, resident)["out"]

    def run():
        res = ready["fn"]()
        common.synchronize(DEVICE)
        return res

    with torch.inference_mode(), ready["scope"]():
        if not CUDA and bp.runs_triton(variant):  # interpreted: tens of seconds per call
            benchmark.pedantic(run, rounds=1, iterations=1)
        else:
            benchmark(run)
    row = common.make_row(env, status="ok", note=ready["note"], backend=variant, unet_calls=1,
                          peak_mem_mib=ready["peak"], peak_mem_kind=ready["peak_kind"], **base)
    if variant == "reference":
        _record(benchmark, row)
        return
    ref = _REFERENCE[key]
    row["latent_max_abs_diff"] = (out - ref).abs().max().item()
    row["max_abs_reference_output"] = ref.abs().max().item()
    row["diff_vs"] = "all-reference UNet output, same dtype"
    _record(benchmark, row)
    why = bp.divergence(row)  # bp.MAX_STEP_REL_DIFF
    assert why is None, f"unet step {variant} ({row['dtype']}, {row['preset']}): {why}; note: {row.get('note')}"
