"""``python -m bench [ops|pipelines|tune] [options]``; with no subcommand ops and pipelines run.

    python -m bench --quick                      # CPU smoke run of both suites (~15 s on 2 cores)
    python -m bench ops --ops attention --dtypes fp16 --shapes unet15.attn
    python -m bench pipelines --unet-only        # headline: all-triton vs all-reference UNet step
    python -m bench ops --list-shapes            # the SD shape table, with a reason per case
    python -m bench tune --ops attention         # sweep launch configurations (GPU), best per shape

Every option of both suites: ``python -m bench all --help``; of one: ``python -m bench ops --help``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import common

EPILOG = """\
Results go to --out (default bench/results/<date>-<device-slug>/ of the checkout, where GPU runs are
committed; with --quick, out/bench-quick/<date>-<device-slug>/, which git ignores; where sdlab runs
installed rather than from a checkout, ./bench-results/ and ./out/bench-quick/ of the working
directory): results.json (rows with device,
versions, git commit, date, dtype, shape, backend, median and 20/80 % quantiles in ms, derived
GB/s or TFLOP/s and their fraction of the device ceilings measured in the same run, error against
an fp64 oracle, speed-up vs `reference`), results.md (the markdown table also printed on stdout)
and speedup-*.png plots. Into a directory holding an earlier run's results, the rows this run
measures again (same suite, op or pipeline, case or preset, dtype, backend or variant, steps,
batch) are replaced and the others kept as their run wrote them (speed-ups against that run's
`reference`), said on stderr; results.md then lists each run (commit, date, command) and numbers
every row's. A folder holds one device's rows: a run on another device (another GPU, or the CPU
with another thread count) is refused before anything runs, as is a results.json this tool did not
write. A backend that cannot run here becomes a "skipped" row with the reason.
"""


def _split(parser: argparse.ArgumentParser, flag: str, values: list[str], valid: list[str]) -> list[str]:
    """Space- or comma-separated values, repeats dropped (first kept); none at all (``--ops ""``)
    is an error, not "everything"."""
    out = list(dict.fromkeys(v.strip() for item in values for v in item.split(",") if v.strip()))
    if not out:
        parser.error(f"--{flag}: no values given; valid: {', '.join(valid)}")
    return out


def _path(value: str) -> Path:
    from pipelines.common import path_arg

    return Path(path_arg(value))


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny shapes, tiny preset, few steps, short timing; "
                        "torch.compile rows are skipped")
    g.add_argument("--out", type=_path, default=None,
                   help="output directory (default: bench/results/<date>-<device-slug>/; with --quick "
                        "out/bench-quick/<date>-<device-slug>/, ignored by git; both in the checkout, or in "
                        "the working directory where sdlab is installed: ./bench-results/, ./out/bench-quick/)")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    g.add_argument("--device", default=None,
                   help="torch device to benchmark on: cpu, cuda or cuda:<index> of a GPU torch sees "
                        "(default: cuda if available, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (my_kernels.attention) or a .py file that registers research backends "
                        "with kernels.register, before anything else (repeatable): ops rows then time them "
                        "next to the built-in ones, and pipelines take them as op=backend variants")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch.set_num_threads (default: torch's choice; 1 with --quick, "
                        "which keeps CPU timings stable on a shared machine)")


def _add_ops(p: argparse.ArgumentParser) -> None:
    from . import ops

    g = p.add_argument_group("ops suite")
    g.add_argument("--ops", nargs="+", metavar="OP",
                   help=f"ops to benchmark, space or comma separated (default: all: {', '.join(ops.known_ops())})")
    g.add_argument("--backends", nargs="+", metavar="BACKEND",
                   help="backends to run (default: all; `reference` always runs for the speed-ups). "
                        "reference = plain torch; triton = the fused kernel; triton-dispatch = the same "
                        "kernel launched through Triton's own dispatch every call (host cost side by side); "
                        "compile = torch.compile "
                        "of the reference; sdpa = torch's SDPA choice; sdpa-flash / sdpa-efficient / "
                        "sdpa-cudnn / sdpa-math = SDPA pinned with torch.nn.attention.sdpa_kernel; any research "
                        "backend a --plugin registered, by its name")
    g.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help=f"dtypes ({', '.join(common.DTYPES)}; default: fp16 bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--shapes", nargs="+", metavar="CASE",
                   help="shape cases: a case's full name selects that case alone, anything else (or a "
                        "name ending in *) every case it prefixes, e.g. unet15.attn (default: the SD "
                        "shapes, or the tiny ones with --quick); `python -m bench ops --list-shapes` lists them")
    g.add_argument("--list-shapes", action="store_true", help="print the shape table and exit")


def _add_tune(p: argparse.ArgumentParser) -> None:
    from . import tune

    g = p.add_argument_group("tune suite")
    g.add_argument("--ops", nargs="+", metavar="OP",
                   help=f"kernels to sweep, of {', '.join(tune.TUNABLE)} (default: {' '.join(tune.DEFAULT_OPS)})")
    g.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help=f"dtypes ({', '.join(common.DTYPES)}; default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--shapes", nargs="+", metavar="CASE",
                   help="shape cases by full name (that case alone) or name prefix, as for `bench ops` "
                        "(default: the SD shapes, or the tiny ones with --quick)")
    g.add_argument("--masked-tail", action="store_true",
                   help="attention: sweep the 40 = 32 + 16 head-dim split (AttentionConfig.split_masked_tail) "
                        "instead of the 64 pad; it crashed on an H100 with Triton 3.6 before, so run it apart")


def _add_pipelines(p: argparse.ArgumentParser) -> None:
    from sdcore.schedulers import PREDICTION_TYPES

    from . import pipelines

    g = p.add_argument_group("pipelines suite")
    g.add_argument("--preset", default=None,
                   help=f"random-weight model preset (default: sd15 on CUDA, tiny on CPU); one of "
                        f"{', '.join(pipelines.preset_names())}")
    g.add_argument("--ckpt", type=_path, default=None, help="a checkpoint to load with sdcore.load instead")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the --ckpt's UNet predicts, overriding its config (a single file reads as epsilon "
                        "unless sdcore wrote it: SD 2.x 768-v files need v_prediction)")
    g.add_argument("--pipelines", nargs="+", metavar="NAME",
                   help=f"pipelines to run (default: all: {', '.join(pipelines.PIPELINES)}); "
                        "repaint / unet9 / blend are the inpaint variants; unet9 uses the preset's "
                        "-inpaint model")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; 2 with --quick)")
    g.add_argument("--batch", type=int, default=None, help="images per prompt (default 1)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed runs per pipeline and variant, after one untimed warm-up run (default 3; "
                        "with --quick 1; interpreted Triton variants get no warm-up), in interleaved rounds: "
                        "each round runs every variant once, in an order rotated by one")
    g.add_argument("--rounds", type=int, default=None,
                   help="UNet step: timing rounds, each visiting every variant once in a rotated order "
                        "(host drift then lands on all alike); a row is the median of its rounds' "
                        "medians, p20-p80 across rounds (default 5; 1 with --quick)")
    g.add_argument("--dtype", default=None,
                   help="model dtype (fp16 | bf16 | fp32; default fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--unet-only", action="store_true",
                   help="only the UNet step benchmark (batch 2 = CFG, at the preset's resolution and --dtype; "
                        "sd15 on CUDA: 512x512, latent 64x64): "
                        "all-triton vs all-reference, each op alone, torch.compile (of the reference, and "
                        "triton@compile: of all-triton), diffusers+SDPA, and "
                        "reference@graph / triton@graph (replayed from a CUDA graph: GPU time without "
                        "host overhead), triton-dispatch (all-triton, Triton's own launch dispatch)")
    g.add_argument("--breakdown", action="store_true",
                   help="UNet step: also split one step of each variant by op with torch.profiler (3 profiled "
                        "calls after the timing; 1 with --quick or interpreted Triton): the switched ops "
                        "(group_norm_silu, attention, ...), convolutions, matmuls, torch's own attention and "
                        "norms, other; kernel time on CUDA, "
                        "op CPU time on CPU (bench/breakdown.py). compile and @graph rows are not split")
    g.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="kernel settings to run (default: all of reference, triton, triton:<op> for each "
                        "op, and the UNet-step-only compile, triton@compile, diffusers-sdpa, reference@graph, "
                        "triton@graph, triton-dispatch: all-triton with every launch through Triton's own "
                        "dispatch; with --quick, no triton:<op>); also "
                        "OP=BACKEND[+OP=BACKEND...]: those ops on those backends (e.g. a --plugin's), every "
                        "other op on reference, e.g. attention=my_attention or "
                        "attention=my_attention+group_norm_silu=triton; a backend may be a fallback chain, "
                        "attention=my_attention/triton: the first that takes each call runs it, and the row's "
                        "note counts the calls per backend")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, epilog=EPILOG,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="suite", metavar="{ops,pipelines,tune,all}")
    p_ops = sub.add_parser("ops", help="each op x backend x SD shape x dtype", description=
                           "Op benchmarks: each op x backend x the shapes SD calls x dtype.",
                           epilog=EPILOG, formatter_class=fmt)
    _add_ops(p_ops)
    _add_common(p_ops)
    p_pipe = sub.add_parser("pipelines", help="each pipeline x kernel setting; UNet step",
                            description="Pipeline and UNet-step benchmarks, each kernel setting against "
                                        "all-reference.", epilog=EPILOG, formatter_class=fmt)
    _add_pipelines(p_pipe)
    _add_common(p_pipe)
    p_tune = sub.add_parser("tune", help="sweep each Triton kernel's launch configurations",
                            description=__import__("bench.tune", fromlist=["tune"]).__doc__,
                            epilog=EPILOG, formatter_class=fmt)
    _add_tune(p_tune)
    _add_common(p_tune)
    p_all = sub.add_parser("all", help="both suites (the default with no subcommand)", epilog=EPILOG,
                           formatter_class=fmt)
    _add_ops(p_all)
    _add_pipelines(p_all)
    _add_common(p_all)
    for p in (p_ops, p_pipe, p_tune, p_all):  # _validate reports errors with the subcommand's usage
        p.set_defaults(suite_parser=p)
    return parser


def _validate(parser: argparse.ArgumentParser, args) -> None:
    """Check and normalise ``args`` in place; ``parser``: the subcommand's, whose usage errors show."""
    from . import ops, pipelines, tune

    def bad(kind: str, values, valid):
        unknown = [v for v in values if v not in valid]
        if unknown:
            parser.error(f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")

    dtypes = list(common.DTYPES) + list(common._DTYPE_ALIASES)
    if getattr(args, "ops", None) is not None:
        valid = list(tune.TUNABLE) if args.suite == "tune" else ops.known_ops()
        args.ops = _split(parser, "ops", args.ops, valid)
        bad("op", args.ops, valid)
    if getattr(args, "backends", None) is not None:
        args.backends = _split(parser, "backends", args.backends, ops.all_backends())
        bad("backend", args.backends, ops.all_backends())
        chosen = args.ops or ops.known_ops()
        if not any(b in ops.op_backends(o) for b in args.backends for o in chosen):
            parser.error(f"none of the backends {args.backends} applies to ops {chosen}")
    if getattr(args, "dtypes", None) is not None:
        args.dtypes = _split(parser, "dtypes", args.dtypes, list(common.DTYPES))
        bad("dtype", args.dtypes, dtypes)
        # aliases to their names, so `fp16 half` is one dtype, not two of the same rows
        args.dtypes = list(dict.fromkeys(common._DTYPE_ALIASES.get(d, d) for d in args.dtypes))
    if getattr(args, "dtype", None) is not None:
        bad("dtype", [args.dtype], dtypes)
    if getattr(args, "shapes", None) is not None:
        default_ops = list(tune.DEFAULT_OPS) if args.suite == "tune" else ops.known_ops()
        case_ops = dict.fromkeys(tune.CASE_OP.get(op, op) for op in (args.ops or default_ops))  # tune: whose shapes
        names = [c.name for op in case_ops for c in ops.CASES[op]]
        args.shapes = _split(parser, "shapes", args.shapes, names)
        unknown = [s for s in args.shapes if not any(ops.shape_selected(n, [s]) for n in names)]
        if unknown:
            parser.error(f"unknown shape case {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    if getattr(args, "pipelines", None) is not None:
        args.pipelines = _split(parser, "pipelines", args.pipelines, list(pipelines.PIPELINES))
        bad("pipeline", args.pipelines, list(pipelines.PIPELINES))
    if getattr(args, "preset", None) is not None:
        bad("preset", [args.preset], pipelines.preset_names())
    if getattr(args, "variants", None) is not None:
        args.variants = _split(parser, "variants", args.variants, pipelines.variant_names())
        for v in args.variants:
            try:
                pipelines.check_variant(v)
            except ValueError as e:
                parser.error(str(e))
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    cpus = os.cpu_count() or 1
    if args.threads is not None and args.threads > 4 * cpus:  # 10**5 threads crashed the process (and forks)
        parser.error(f"--threads {args.threads}: this machine has {cpus} CPUs (at most {4 * cpus} threads)")
    if (named := os.environ.get("SDLAB_GIT_COMMIT")) and not re.fullmatch(r"[0-9a-f]{7,64}", named):
        parser.error(f"SDLAB_GIT_COMMIT={named!r}: not a git commit hash (7 to 64 hex digits, as "
                     "`git rev-parse HEAD` prints)")
    for name in ("steps", "repeats", "batch", "rounds"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    steps = getattr(args, "steps", None)
    if steps is not None and "img2img" in (getattr(args, "pipelines", None) or pipelines.PIPELINES):
        if why := pipelines.img2img_steps_problem(steps):  # an error row after the others ran, else
            parser.error(f"--steps {steps}: {why}, or --pipelines without img2img")
    # flags that would be silently ignored: say so instead
    if getattr(args, "ckpt", None) is not None and getattr(args, "preset", None) is not None:
        parser.error(f"--ckpt {args.ckpt} and --preset {args.preset}: give one (the checkpoint is the model)")
    if getattr(args, "prediction_type", None) is not None and getattr(args, "ckpt", None) is None:
        parser.error(f"--prediction-type {args.prediction_type} overrides a --ckpt's; a preset has its own")
    if getattr(args, "ckpt", None) is not None:  # read now (headers, configs): a bad one is not N error rows
        if not args.ckpt.exists():
            parser.error(f"--ckpt {args.ckpt}: no such file or directory")
        from sdcore import checkpoint
        from sdcore.detect import CheckpointError

        try:
            checkpoint.open_checkpoint(args.ckpt).config(args.prediction_type)
        except (CheckpointError, OSError) as e:
            parser.error(f"--ckpt {e}" if str(e).startswith(str(args.ckpt)) else f"--ckpt {args.ckpt}: {e}")
    if getattr(args, "unet_only", False):  # one CFG step (batch 2), timed in --rounds
        for flag, value in (("--pipelines", args.pipelines), ("--steps", args.steps), ("--batch", args.batch),
                            ("--repeats", args.repeats)):
            if value is not None:
                parser.error(f"--unet-only runs the UNet step alone (batch 2, timed in --rounds); {flag} applies to "
                             "the pipeline rows and would be ignored (drop one)")
    tuned = getattr(args, "ops", None)
    if getattr(args, "masked_tail", False) and tuned is not None and "attention" not in tuned:
        parser.error(f"--masked-tail sweeps the attention forward's head-dim split; --ops {' '.join(tuned)} has "
                     "no attention (attention.backward and attention.gluon_sm90 have no split to sweep)")
    try:
        args.device = common.pick_device(args.device)
    except ValueError as e:
        parser.error(f"--device {args.device}: {e}")
    if args.out is not None and not getattr(args, "list_shapes", False):  # refused now, not after the run
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out}: exists and is not a directory")
        why = common.unwritable(args.out)
        if why:
            parser.error(f"--out {args.out}: cannot write there: {why}")
        why = common.results_file_problem(args.out)  # its rows are merged with this run's
        if why:
            parser.error(why)


def _load_plugins(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, dict[str, list[str]]]:
    """{spec: {op: [backends it registered]}}; a plugin that fails to import or registers nothing is
    a usage error."""
    import kernels

    loaded = {}
    for spec in specs:
        try:
            loaded[spec] = kernels.load_plugin(spec)
        except Exception as e:  # whatever its code raises: one line naming the plugin and where
            parser.error(f"--{kernels.registry.plugin_error(spec, e)}")
        if not loaded[spec]:
            parser.error(f"--plugin {spec}: it registered no backend (kernels.register(op, name))")
    return loaded


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]
    common.prepare_environment()  # before anything imports kernels
    from pipelines.common import import_kernels

    import_kernels("python -m bench")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite is None:
        parser.print_help()
        return 0
    args.plugins = _load_plugins(args.suite_parser, args.plugin)  # before _validate: their backends are valid names
    _validate(args.suite_parser, args)
    if getattr(args, "list_shapes", False):
        from . import ops

        for op in args.ops or ops.known_ops():
            for c in ops.CASES[op]:
                if not args.shapes or ops.shape_selected(c.name, args.shapes):
                    print(f"{op:16s} {c.name:24s} {c.shape:28s} {'[quick] ' if c.quick else ''}{c.reason}")
        return 0
    return run(args)


def run(args) -> int:
    """Run the suites ``args`` name; on the CPU with --threads N (1 under --quick), torch runs on N
    threads until the run ends, then on as many as before (a caller in this process keeps its own)."""
    import torch

    threads = args.threads or (1 if args.quick else None)
    if args.device.type != "cpu" or not threads:
        return _run(args)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(saved)


def _run(args) -> int:
    import torch

    device = args.device
    progress = not args.no_progress
    if device.type == "cuda" and device.index is not None:
        # the timers (CUDA events, do_bench's flush buffer, synchronize) and CUDA-graph capture use the
        # current device: with another one current they timed an idle GPU's stream
        torch.cuda.set_device(device)
    if not args.no_plot and (why := common.plotting_problem()):
        print(f"[bench] {why}: no PNG plots this run (pass --no-plot to say so)", file=sys.stderr)
        args.no_plot = True
    env = common.environment(device)
    env["plugins"] = args.plugins  # {spec: {op: [backends]}}: research backends in these rows
    out_dir = args.out or common.default_out_dir(env, quick=args.quick)
    why = None if args.out is not None else common.unwritable(out_dir)  # an explicit --out: checked in _validate
    if why:
        print(f"[bench] cannot write results to {out_dir}: {why}; pass --out", file=sys.stderr)
        return 2
    why = None if args.out is not None else common.results_file_problem(out_dir)
    if why:
        print(f"[bench] {why}", file=sys.stderr)
        return 2
    why = common.device_problem(out_dir, env["device_name"])  # the name needs the threads set above
    if why:
        print(f"[bench] {why}", file=sys.stderr)
        return 2
    suites = ["ops", "pipelines"] if args.suite == "all" else [args.suite]
    rows: list[dict] = []

    op_dtypes = None
    if "ops" in suites or "tune" in suites:
        cuda_default = [torch.float16, torch.bfloat16] if "ops" in suites else [torch.float16]
        op_dtypes = [common.parse_dtype(d) for d in args.dtypes] if args.dtypes else (
            cuda_default if device.type == "cuda" else [torch.float32])
    pipe_dtype = None
    if "pipelines" in suites:
        pipe_dtype = common.parse_dtype(args.dtype) if args.dtype else (
            torch.float16 if device.type == "cuda" else torch.float32)
    print(f"[bench] {env['device_name']} · torch {env['torch']} · triton {env['triton']}"
          f"{' · TRITON_INTERPRET=1' if env['triton_interpret'] else ''}", file=sys.stderr)
    # Only op rows are divided by the ceilings; a pipelines-only run into a directory holding op rows
    # keeps the ceilings those rows were divided by.
    ceilings = common.measure_ceilings(device, op_dtypes, quick=args.quick) if "ops" in suites else None

    if "ops" in suites:
        from . import ops

        rows += ops.run(args.ops or ops.known_ops(), args.backends, op_dtypes, args.shapes, device, env,
                        ceilings, quick=args.quick, progress=progress)
    if "tune" in suites:
        from . import tune

        rows += tune.run(args.ops or list(tune.DEFAULT_OPS), op_dtypes, args.shapes, device, env, quick=args.quick,
                         progress=progress, masked_tail=args.masked_tail)
    if "pipelines" in suites:
        from . import pipelines

        rows += pipelines.run(pipelines.Options.from_args(args, pipe_dtype), device, env, progress=progress)

    print(common.render_markdown(env, ceilings, rows))  # before writing: a failed write loses no table
    try:
        paths = common.write_results(out_dir, env, ceilings, rows, plot=not args.no_plot)
    except OSError as e:  # checked writable at the start; a full disk or a removed directory since
        print(f"[bench] could not write results to {out_dir}: {e}", file=sys.stderr)
        return 1
    print("\n" + "\n".join(f"[bench] wrote {p}" for p in paths.values()), file=sys.stderr)
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"[bench] {len(errors)} row(s) errored; see the status column", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
