"""What both suites share: timing, device ceilings, environment, result rows and their rendering.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events; median and the 20th/80th percentiles);
on CPU, ``time.perf_counter`` around each call, median and the same percentiles over repeats.

Ceilings, measured in the same run so a row can be read as a fraction of what the device does:
copy bandwidth (one large device-to-device copy; bytes = read + written) and matmul rate (one
large square matmul on random data, per dtype of the run).

Rows are plain dicts with the same keys (:data:`ROW_KEYS`); :func:`write_results` turns them into
``results.json``, ``results.md`` and PNG plots, keeping the rows an earlier run left in the same
folder that this run did not measure again (:data:`ROW_IDENTITY`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parent.parent  # the checkout, or site-packages where installed
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("kernels", "sdcore", "pipelines", "bench", "tests")  # this project's top-level folders

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
QUANTILES = (0.5, 0.2, 0.8)


class Skip(Exception):
    """A row that cannot run here; the message is the reason shown in the table."""


def prepare_environment() -> None:
    """Run Triton under its interpreter when there is no GPU (as the root conftest.py does for pytest).

    Must be called before ``kernels`` is imported: TRITON_INTERPRET is read when ``@triton.jit``
    functions are defined. Timings of interpreted kernels are flagged in their rows."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    """Whether Triton runs interpreted, as kernels read TRITON_INTERPRET when imported (the way
    Triton reads it: "false" is off)."""
    from kernels.registry import interpreting as kernels_interpreting

    return kernels_interpreting()


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


def usable_devices() -> list[str]:
    """The --device values the benchmarks can run on here: cpu, and cuda[:i] for each GPU torch sees."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(["cuda"] if n else []), *(f"cuda:{i}" for i in range(n))]


def pick_device(name: str | None) -> torch.device:
    """``name`` as a device the benchmarks can run on, else ValueError naming the usable ones
    (other torch devices, mps or meta, would turn every row into an error)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = f"usable here: {', '.join(usable_devices())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device name torch understands; {usable}") from None
    if device.type == "cpu":
        if device.index not in (None, 0):  # torch accepts "cpu:3" and runs on the one CPU device
            raise ValueError(f"the CPU is one device (cpu or cpu:0); {usable}")
        return device
    if device.type != "cuda":
        raise ValueError(f"the benchmarks run on cpu or cuda only; {usable}")
    if not torch.cuda.is_available():
        raise ValueError(f"torch sees no CUDA device; {usable}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"torch sees {torch.cuda.device_count()} CUDA device(s); {usable}")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None  # None: do_bench chose


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            warmup_ms: float | None = None, rep_ms: float | None = None, min_reps: int = 3,
            called: bool = False) -> Timing:
    """Median and 20/80 % quantiles of ``fn()`` in milliseconds.

    CPU: ``called`` = the caller has run ``fn`` once already (no extra first call); at least
    ``min_reps`` timed calls, more until ``rep_ms`` is spent."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup = warmup_ms if warmup_ms is not None else (10 if quick else 25)
        rep = rep_ms if rep_ms is not None else (30 if quick else 100)
        med, lo, hi = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return Timing(float(med), float(lo), float(hi), None)
    budget = (rep_ms if rep_ms is not None else (150 if quick else 1000)) / 1e3
    warm = (warmup_ms if warmup_ms is not None else (0 if quick else 100)) / 1e3
    if not called:
        fn()  # first call: allocation, lazy init
    t_end = time.perf_counter() + warm
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def summarize(times_ms: list[float]) -> Timing:
    """Median and 20/80 % quantiles (inclusive method) of host-timed samples."""
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return Timing(statistics.median(times_ms), q[1], q[7], len(times_ms))


def host_ms(fn: Callable[[], object], device: torch.device, *, calls: int = 10, samples: int = 5) -> float:
    """Host (CPU) milliseconds per call of ``fn``: the median over ``samples`` of the wall time of
    ``calls`` back-to-back calls, divided by ``calls``, synchronising before each sample and not
    inside it. On CUDA that is the cost of enqueueing the work (Python, argument binding, launches);
    when it exceeds the GPU time (``median_ms``) the op is host-bound and the GPU idles between
    launches. On CPU it is simply the time per call."""
    per_call = []
    for _ in range(samples):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) * 1e3 / calls)
    synchronize(device)
    return statistics.median(per_call)


# ------------------------------------------------------------------------------------ ceilings
def copy_ms(nbytes: int, device: torch.device, cache: dict, *, quick: bool = False) -> float | None:
    """Median ms of ``y.copy_(x)`` moving ``nbytes`` in all (``nbytes // 2`` read, as many
    written): the same-size copy a memory-bound op is held against. At SD sizes (a few MB) that is
    well below the 1 GiB copy's bandwidth, as every kernel there pays launch latency and ramp-up.
    Measured once per size and kept in ``cache`` for the run; None if it cannot be."""
    half = max(1, nbytes // 2)
    if half not in cache:
        try:
            x = torch.empty(half, dtype=torch.uint8, device=device)
            y = torch.empty_like(x)
            cache[half] = time_fn(lambda: y.copy_(x), device, quick=quick).median_ms
        except Exception:  # pragma: no cover - out of memory: the column stays empty
            cache[half] = None
    return cache[half]


def measure_ceilings(device: torch.device, dtypes: Iterable[torch.dtype], *, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read + written) and matmul rate (TFLOP/s per dtype) of ``device``."""
    cuda = device.type == "cuda"
    out: dict = {"copy_gbps": None, "copy_bytes": None, "matmul_tflops": {}, "matmul_n": None,
                 "how": ("copy: y.copy_(x), bytes = 2 * x.nbytes; matmul: a @ b square, "
                         "random normal inputs, flops = 2 n^3")}
    numel = (2**26 if quick else 2**28) if cuda else (2**21 if quick else 2**23)
    try:
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        t = time_fn(lambda: y.copy_(x), device, quick=quick)
        out["copy_gbps"] = 2 * x.nbytes / (t.median_ms * 1e-3) / 1e9
        out["copy_bytes"] = 2 * x.nbytes
        del x, y
    except Exception as e:  # pragma: no cover - out of memory on a small device
        out["copy_error"] = f"{type(e).__name__}: {e}"
    n = (4096 if quick else 8192) if cuda else (256 if quick else 1024)
    out["matmul_n"] = n
    for dtype in dict.fromkeys(dtypes):
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            t = time_fn(lambda: a @ b, device, quick=quick)
            out["matmul_tflops"][dtype_name(dtype)] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
        except Exception as e:  # pragma: no cover
            out["matmul_tflops"][dtype_name(dtype)] = None
            out.setdefault("matmul_error", {})[dtype_name(dtype)] = f"{type(e).__name__}: {e}"
    if cuda and torch.float32 in dtypes:
        out["fp32_matmul_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if cuda:
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    r = _git_run(*args)
    return r.stdout.strip() if r is not None and r.returncode == 0 else None


def _git_run(*args: str) -> subprocess.CompletedProcess | None:
    from pipelines.common import git  # None where the code runs installed, not from a checkout

    return git(*args)


def git_dirty(commit: str | None = None) -> bool | None:
    """Whether the working tree's tracked files differ from ``commit`` (default: HEAD, whose index
    counts too); None when git cannot tell: no git, or ``commit`` is not in this repository."""
    if commit is None:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return None if dirty is None else bool(dirty)
    if _git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    r = _git_run("diff", "--quiet", commit, "--")  # exit 0: same, 1: differs, else: git failed
    return {0: False, 1: True}.get(r.returncode) if r is not None else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def slug(text: str, maxlen: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:maxlen].rstrip("-") or "device"


# the triton backend with every launch through Triton's own dispatch (kernels/_launch.py off):
# side by side with `triton`, what the direct launches save in host time (ops and UNet step)
TRITON_DISPATCH = "triton-dispatch"


@contextlib.contextmanager
def tritons_dispatch():
    """Within the block, Triton kernels launch through JITFunction.run on every call."""
    from kernels import _launch

    saved, _launch.ENABLED = _launch.ENABLED, False
    try:
        yield
    finally:
        _launch.ENABLED = saved


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device):
    """torch on one thread while CPU timings run (as under ``bench --quick``: two threads on a
    two-core machine time the noise), restored afterwards; on a GPU device, nothing changes."""
    saved = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def command_line(argv: list[str]) -> str:
    """The command that made a run, as one could type it again: a module of this repository run
    with ``python -m`` (sys.argv[0] is then its file, ``/abs/path/bench/__main__.py``) as
    ``python -m bench ...``, with no path of the machine it ran on; anything else as given."""
    if argv:
        try:
            rel = Path(argv[0]).resolve().relative_to(REPO)
        except ValueError:
            rel = None
        if rel is not None and rel.suffix == ".py" and rel.parts[0] == "bench":
            module = ".".join(rel.with_suffix("").parts)
            return shlex.join(["python", "-m", module.removesuffix(".__main__"), *argv[1:]])
    return shlex.join(argv)


def environment(device: torch.device) -> dict:
    from kernels import _launch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover
        triton_version = f"unavailable ({type(e).__name__})"
    # a copied tree (a remote GPU machine, whose .git may be absent or stale) names its commit in
    # SDLAB_GIT_COMMIT, which wins over git; dirty is then against that commit, unknown (None) where
    # this repository lacks it
    named = os.environ.get("SDLAB_GIT_COMMIT") or None
    from pipelines.common import sdlab_version

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sdlab": sdlab_version(),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_commit": named or _git("rev-parse", "HEAD"),
        "git_dirty": git_dirty(named),
        "triton_interpret": interpreting(),
        "triton_launch": _launch.mode(),  # direct once compiled, or Triton's dispatch and why
        "torch_threads": torch.get_num_threads(),
        "argv": command_line(sys.argv),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["capability"] = f"{p.major}.{p.minor}"
        env["device_memory_gib"] = round(p.total_memory / 2**30, 1)
    return env


# ------------------------------------------------------------------------------------------ rows
ROW_KEYS = (
    "suite", "op", "case", "shape", "reason", "dtype", "backend", "status", "note",
    "median_ms", "p20_ms", "p80_ms", "reps", "rounds", "host_ms",
    "bytes", "flops", "gbps", "tflops", "frac_of_peak", "frac_of_copy", "copy_ms", "speedup_vs_reference",
    "max_abs_err", "max_rel_err", "error_vs",
    # pipelines
    "preset", "steps", "batch", "seconds_per_image", "images_per_s", "unet_ms_per_step", "unet_calls",
    "peak_mem_mib", "peak_mem_kind", "latent_max_abs_diff", "psnr_db", "diff_vs",
    "scheduler_calls", "scheduler_ms_est", "scheduler_gpu_ms_est", "scheduler_host_ms_est", "scheduler_share",
    "breakdown",  # UNet step with --breakdown: bench.breakdown.Breakdown.as_dict()
    # environment, copied into every row so rows can be concatenated across runs
    "device_name", "torch", "triton", "triton_launch", "cuda", "git_commit", "date",
)
_ENV_IN_ROW = ("device_name", "torch", "triton", "triton_launch", "cuda", "git_commit", "date")
# What a row measures: a run that has a row with the same values measured it again, and its row
# replaces the earlier one in a results folder (ops: op, case, dtype, backend; tune: op, case,
# dtype, configuration label in `backend`; pipelines and UNet step: pipeline, preset, dtype,
# variant, steps, batch). The commit is not part of it: it is the run's. Nor is the device: a folder
# holds one device's rows, and a run on another is refused (:func:`device_problem`).
ROW_IDENTITY = ("suite", "op", "case", "preset", "dtype", "backend", "steps", "batch")
# The run a row (or a run's env) belongs to: every row carries its run's start time, to the second,
# and commit.
RUN_KEY = ("date", "git_commit")


STATUSES = ("ok", "skipped", "error")  # a row's status
NOISY = 2.0  # a timed row whose p80 is over this many times its p20 says so in its note


def make_row(env: dict, **fields) -> dict:
    """One result row; a timing spread over :data:`NOISY` (a busy host, a GPU clocking down) is
    flagged in the note, so a speed-up read from it is not taken at face value."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    row = dict.fromkeys(ROW_KEYS)
    row.update({k: env.get(k) for k in _ENV_IN_ROW})
    row.update(fields)
    p20, p80 = row["p20_ms"], row["p80_ms"]
    if row["status"] == "ok" and p20 and p80 and p80 > NOISY * p20:
        row["note"] = "; ".join(filter(None, [row["note"], f"noisy timing: p80 is {p80 / p20:.1f}x p20"]))
    return row


def describe_exception(e: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message (at file:line)``, the innermost frame in this repository:
    in a source tree any file of it (a research plugin's too) but its virtual environment's;
    installed, where REPO is site-packages, only this project's packages (not torch's)."""
    import traceback

    from pipelines.common import source_tree

    tree = source_tree() is not None
    msg = str(e).splitlines()[0][:limit] if str(e) else ""
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        try:
            rel = Path(frame.filename).relative_to(REPO)
        except ValueError:
            continue
        if (not {".venv", "site-packages", "dist-packages"} & set(rel.parts)) if tree else rel.parts[0] in PACKAGES:
            where = f" (at {rel}:{frame.lineno})"
            break
    return f"{type(e).__name__}: {msg}{where}"


def skipped_row(env: dict, skip_reason: str, /, **fields) -> dict:
    return make_row(env, status="skipped", note=skip_reason, **fields)


def add_speedups(rows: list[dict], group: tuple[str, ...], base: str = "reference",
                 metric: str = "median_ms") -> None:
    """speedup_vs_reference = base row's metric / this row's, within each ``group`` of keys."""
    bases = {tuple(r[k] for k in group): r[metric] for r in rows
             if r["backend"] == base and r["status"] == "ok" and _finite(r[metric])}
    for r in rows:
        b = bases.get(tuple(r[k] for k in group))
        if r["status"] == "ok" and b and _finite(r[metric]) and r[metric] > 0:
            r["speedup_vs_reference"] = b / r[metric]


# Accuracy rule of tune candidates and ops rows: a result may be off the fp64 oracle by at most 2x
# the baseline's error (ops and tune's default: `reference`; tune's candidates: the default) plus this atol, the
# kernel issue's rule for half precision with its "small atol".
ERROR_ATOL = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}


def within_error(err: float, base_err: float, dtype: str) -> bool:
    return err <= 2 * base_err + ERROR_ATOL[dtype]


def max_errors(out: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    """(max |out - oracle|, max |out - oracle| / max |oracle|): the normwise relative error of
    kernels.testing, which stays meaningful where the oracle crosses zero."""
    a = out.detach().to(oracle.device, torch.float64)
    diff = (a - oracle).abs().max().item()
    return diff, diff / max(oracle.abs().max().item(), 1e-30)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------------------------ markdown
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def _fixed(x: float, decimals: int) -> str:
    """``x`` to ``decimals`` decimals; a non-zero ``x`` under one unit of the last (0.01 for 2) in two
    significant digits instead (5.7e-04), which the fixed form shows as 0 or one rounded digit (an
    interpreted kernel's speed-up, a tiny % of peak)."""
    if x != 0 and math.isfinite(x) and abs(x) < 10 ** -decimals:
        return f"{x:.1e}"
    return f"{x:.{decimals}f}"


OPS_COLUMNS = [
    ("op", "op"), ("case", "case"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"),
    ("median ms", "median_ms"), ("p20–p80 ms", None), ("host µs", "host_ms"), ("GB/s", "gbps"),
    ("TFLOP/s", "tflops"),
    ("% of peak", "frac_of_peak"), ("% of copy", "frac_of_copy"), ("speed-up", "speedup_vs_reference"),
    ("max abs err", "max_abs_err"), ("max rel err", "max_rel_err"), ("status / note", None),
]
PIPELINE_COLUMNS = [
    ("pipeline", "op"), ("preset", "preset"), ("shape", "shape"), ("dtype", "dtype"), ("kernels", "backend"),
    ("steps", "steps"), ("s/image", "seconds_per_image"), ("images/s", "images_per_s"),
    ("UNet ms/step", "unet_ms_per_step"), ("host ms/step", "host_ms"), ("UNet calls", "unet_calls"),
    ("scheduler ms (est.)", "scheduler_ms_est"), ("scheduler share", "scheduler_share"),
    ("peak MiB", "peak_mem_mib"),
    ("speed-up", "speedup_vs_reference"), ("max |Δ| latents", "latent_max_abs_diff"),
    ("PSNR dB", "psnr_db"), ("status / note", None),
]


def _cell(row: dict, key: str | None, title: str) -> str:
    if title.startswith("p20"):
        return "" if row["p20_ms"] is None else f"{_fmt(row['p20_ms'])}–{_fmt(row['p80_ms'])}"
    if title == "status / note":
        text = row["status"] if not row["note"] else f"{row['status']}: {row['note']}"
        return text.replace("|", "\\|").replace("\n", " ")
    if key in ("frac_of_peak", "frac_of_copy", "scheduler_share"):
        return "" if row[key] is None else _fixed(100 * row[key], 1) + (" %" if key == "scheduler_share" else "")
    if title == "host µs":
        return "" if row[key] is None else _fmt(1e3 * row[key])
    if key == "speedup_vs_reference":
        return "" if row[key] is None else f"{_fixed(row[key], 2)}x"
    return _fmt(row[key]).replace("|", "\\|")


DEFAULT_CONFIG = "default"  # tune rows: the backend label of the configuration a kernel picks itself


def best_configs(rows: list[dict]) -> list[dict]:
    """Tune rows: per (op, case, dtype) and run the fastest row that ran and was accurate (status
    ok), where it is faster than the default's own spread: a candidate wins over an ok default only
    with a median under the default's p20. Each candidate is timed once, so the minimum of a sweep
    of equals is a few percent under the default by noise alone (of 49 identical kernels at 3% noise,
    a non-default "won" 98% of the time, at 1.07x); a winner must beat that. Per run: rows a results
    folder kept from an earlier run were timed on another occasion (another host's load, another
    grid), and a candidate that lost to the default in its own run could beat a slower default of
    the next."""
    winners: dict[tuple, dict] = {}
    defaults: dict[tuple, dict] = {}
    for r in rows:
        if r["suite"] == "tune" and r["status"] == "ok":
            key = (r["op"], r["case"], r["dtype"], _run_of(r))
            if r["backend"] == DEFAULT_CONFIG:
                defaults[key] = r
            if key not in winners or r["median_ms"] < winners[key]["median_ms"]:
                winners[key] = r
    for key, default in defaults.items():
        bar = default.get("p20_ms") if default.get("p20_ms") is not None else default["median_ms"]
        if winners[key]["median_ms"] >= bar:  # within the default's spread: no evidence it is faster
            winners[key] = default
    return list(winners.values())


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(t.replace("|", "\\|") for t, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k, t) for t, k in columns) + " |" for r in rows]
    return "\n".join(lines)


def _run_of(d: dict) -> tuple:
    return tuple(d.get(k) for k in RUN_KEY)


def _run_line(env: dict) -> str:
    """A run's date, versions, commit and Triton mode on one line."""
    return (f"{env.get('date')} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda')} · "
            f"commit {(env.get('git_commit') or 'unknown')[:12]}{' (dirty)' if env.get('git_dirty') else ''}"
            + (" · TRITON_INTERPRET=1 (triton timings are interpreter timings)" if env.get("triton_interpret")
               else f" · Triton launches: {env.get('triton_launch')}"))


def _what(rows: list[dict]) -> str:
    """Which rows these are: ``ops: group_norm_silu, attention; unet_step (9 rows)``."""
    ops: dict[str, dict] = {}
    for r in rows:
        ops.setdefault(r["suite"], {})[r["op"]] = None
    return ("; ".join(s if names.keys() == {s} else f"{s}: {', '.join(map(str, names))}" for s, names in ops.items())
            + f" ({len(rows)} row{'s' * (len(rows) != 1)})")


def render_markdown(env: dict, ceilings: dict | None, rows: list[dict]) -> str:
    """``rows`` as markdown. When ``env["runs"]`` (written by :func:`write_results`) lists several
    runs, the header lists each (date, versions, commit, command, its rows) and every table has a
    ``run`` column numbering the row's run."""
    runs = env.get("runs") or [env]
    out = [f"# SD Kernel Lab benchmark — {env['device_name']}", ""]
    run_column = []
    if len(runs) == 1:
        out += [_run_line(runs[0]), ""]
    else:
        number = {_run_of(e): str(i) for i, e in enumerate(runs, 1)}
        rows = [{**r, "run": number.get(_run_of(r), "?")} for r in rows]
        out += [f"Rows of {len(runs)} runs into this folder, numbered in the `run` column. Each row is as its "
                "own run measured it: its speed-up is against that run's `reference` (the sweep's: `default`), "
                "its % of peak against that run's ceilings (results.json: env.runs).", ""]
        out += [f"{i}. {_run_line(e)} · {e.get('device_name')} · `{e.get('argv') or 'command not recorded'}`: "
                f"{_what([r for r in rows if r['run'] == str(i)])}" for i, e in enumerate(runs, 1)]
        out += [""]
        run_column = [("run", "run")]
    if ceilings:
        mm = ", ".join(f"{k} {_fmt(v)}" for k, v in ceilings.get("matmul_tflops", {}).items())
        whose = ("measured in the run of the ops rows" if len({_run_of(r) for r in rows if r["suite"] == "ops"}) <= 1
                 else "of the latest run with ops rows (a dtype's matmul rate it did not measure: an earlier run's, "
                      "as that run's rows use)")
        out += [f"Device ceilings, {whose}: copy {_fmt(ceilings.get('copy_gbps'))} GB/s "
                f"(read + written); matmul n={ceilings.get('matmul_n')} TFLOP/s: {mm or 'n/a'}.", ""]
    op_rows = [r for r in rows if r["suite"] == "ops"]
    if op_rows:
        out += ["## Ops", "",
                "GB/s counts inputs read once + outputs written once; attention TFLOP/s counts "
                "4·B·H·Lq·Lkv·D (forward). % of peak: of the copy bandwidth (GB/s rows) or of the "
                "matmul rate in the row's dtype (TFLOP/s rows). % of copy (GB/s rows): the time of "
                "a device copy moving the same bytes (half read, half written), measured in this run, "
                "over the op's: 100 is memcpy speed at that size, launch latency included, which a "
                "peak measured on 1 GiB leaves out. Errors (rel = max|Δ| / max|oracle|) against an fp64 "
                "oracle, except scheduler_step's: against its reference's fp32 math on fp64 inputs, the "
                "op's contract, so its reference row reads 0 (the JSON's error_vs names each row's). "
                "Speed-up: vs `reference` in the row's run. Host µs: CPU time to issue one call of the "
                "backend itself (Python + launches); the op's argument checks and the switch come on top "
                "(`python -m bench.host` splits them). Above the median, the op is host-bound and in eager "
                "mode costs its host time, not its GPU time.", "",
                markdown_table(op_rows, OPS_COLUMNS + run_column), ""]
    tune_rows = [r for r in rows if r["suite"] == "tune"]
    if tune_rows:
        best = best_configs(tune_rows)
        out += ["## Launch-configuration sweep", "",
                f"Each Triton kernel with candidate launch configurations (backend column) against the one it "
                f"picks itself (`{DEFAULT_CONFIG}`), same inputs, same run; speed-up vs `{DEFAULT_CONFIG}`. A "
                "candidate whose error exceeds 2x the default's (the default: 2x the reference's) plus the "
                "dtype's atol is an error row and cannot win; an input the triton backend refuses is skipped. "
                "`attention.backward` TFLOP/s count 2.5x the forward's 4·B·H·Lq·Lkv·D, the useful work "
                "(FlashAttention-2's convention; the kernels recompute q·kᵀ and do·vᵀ in both passes).", "",
                "Best per case (a candidate only where its median is under the default's p20: each is timed "
                "once, and the fastest of a sweep of equals beats the default by noise alone)"
                + (" (interpreter timings on CPU: they check that every candidate runs and is "
                   "accurate, and rank nothing about a GPU):" if env.get("triton_interpret") else ":"), "",
                markdown_table(best, [("op", "op"), ("case", "case"), ("dtype", "dtype"),
                                      ("best configuration", "backend"), ("median ms", "median_ms"),
                                      ("host µs", "host_ms"), ("speed-up", "speedup_vs_reference"), *run_column]), "",
                "All candidates:", "", markdown_table(tune_rows, OPS_COLUMNS + run_column), ""]
    for suite, title in (("unet_step", "UNet step"), ("pipelines", "Pipelines")):
        sel = [r for r in rows if r["suite"] == suite]
        if sel:
            rounds = max((r.get("rounds") or 1) for r in sel)
            out += [f"## {title}", "",
                    "Speed-up vs the all-`reference` row of the same run; max |Δ| latents and PSNR of the decoded "
                    "images against it (UNet step: max |Δ| of the UNet output). Host ms/step: CPU "
                    "time to issue one UNet call; near or above UNet ms/step, the step is host-bound."
                    + (f" Timed in {rounds} interleaved rounds, each visiting every variant once in a "
                       "rotated order: UNet ms/step is the median of a row's round medians." if rounds > 1 else ""),
                    "", markdown_table(sel, PIPELINE_COLUMNS + run_column), ""]
            split = {r["backend"]: r["breakdown"] for r in sel if r.get("breakdown")}
            if split:
                from .breakdown import SECTION, render

                out += [SECTION, "", render(split), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------- output
def unwritable(out_dir: Path) -> str | None:
    """None when results can be written into ``out_dir`` (created if missing, a scratch file
    written and removed), else the OS's reason: checked before a run, not after it."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".bench-write-test-"):
            pass
    except OSError as e:
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return None


def default_out_dir(env: dict, quick: bool = False) -> Path:
    """In a checkout, bench/results/<date>-<device>/ (GPU runs are committed there), and smoke runs
    in the git-ignored out/bench-quick/ so a README walk-through leaves the checkout clean. Where
    the package runs installed (no checkout), ./bench-results/ and ./out/bench-quick/ in the
    working directory, not inside site-packages."""
    from pipelines.common import source_tree

    tree = source_tree()
    if quick:
        root = (tree or Path.cwd()) / "out" / "bench-quick"
    else:
        root = RESULTS_DIR if tree is not None else Path.cwd() / "bench-results"
    return root / f"{datetime.date.today().isoformat()}-{slug(env['device_name'])}"


def merge_ceilings(old: dict | None, new: dict | None) -> dict | None:
    """Ceilings for a results file holding rows of an earlier run too: this run's values, and the
    earlier run's matmul rates for dtypes this run did not measure, which its kept rows refer to."""
    if not old or not new:
        return new or old
    rates = {**old.get("matmul_tflops", {}), **{k: v for k, v in new.get("matmul_tflops", {}).items() if v}}
    return {**old, **new, "matmul_tflops": rates}


def read_results(out_dir: Path) -> dict | None:
    """The results.json in ``out_dir``, None when there is none; ValueError, one line naming the file
    and what is wrong, when it is not one this tool writes (invalid JSON, another tool's JSON)."""
    path = out_dir / "results.json"
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO blocked the read for ever
        problem = "not a regular file"
    else:
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            problem = f"cannot read it: {e.strerror or e}"
        except ValueError as e:  # invalid JSON or UTF-8: a truncated write, another file
            problem = f"invalid JSON: {e}"
        except RecursionError:
            problem = "invalid JSON: nested too deeply"
        else:
            problem = _not_results(data)
    if problem:
        raise ValueError(f"not a results file of this tool: {path} ({problem}); use another --out or remove it")
    return data


def _not_results(data) -> str | None:
    """What keeps ``data`` from being a results.json this tool wrote, or None."""
    def scalars(d: dict, keys) -> bool:
        return all(isinstance(d.get(k), (str, int, float, type(None))) for k in keys)

    if not isinstance(data, dict):
        return f"a JSON {'array' if isinstance(data, list) else type(data).__name__}, not an object"
    if not isinstance(data.get("rows"), list):
        return f"no \"rows\" list; its keys: {', '.join(map(str, list(data)[:8])) or 'none'}"
    if not isinstance(data.get("env"), dict) or not isinstance(data.get("ceilings", 0), (dict, type(None))):
        return "no \"env\" object or \"ceilings\" object"
    if not isinstance((data.get("ceilings") or {}).get("matmul_tflops", {}), dict):
        return "\"ceilings\" has no \"matmul_tflops\" object"
    runs = data["env"].get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(e, dict) and scalars(e, RUN_KEY) for e in runs):
        return "\"env\".\"runs\" is not a list of runs"
    for i, r in enumerate(data["rows"]):
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("suite", "op", "backend"))
                and r.get("status") in STATUSES and scalars(r, ROW_IDENTITY + RUN_KEY)):
            return f"row {i} is not a result row: {json.dumps(r)[:60]}"
    return None


def results_file_problem(out_dir: Path) -> str | None:
    """None when results can be merged into ``out_dir``'s results.json (or there is none), else why
    not, as :func:`read_results` says it: checked before a run, so that no run's rows are lost."""
    try:
        read_results(out_dir)
    except ValueError as e:
        return str(e)
    return None


def folder_devices(data: dict) -> list[str]:
    """The device names whose rows a results.json (as :func:`read_results` returns it) holds: its
    runs' (``env.runs``) and its rows' own."""
    names = [e.get("device_name") for e in data["env"].get("runs", [])] + [r.get("device_name") for r in data["rows"]]
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def device_problem(out_dir: Path, device_name: str) -> str | None:
    """None when ``out_dir``'s results (if any) were measured on ``device_name``, else why this run
    cannot write there: merged, its rows would sit beside another device's, and the file's ceilings
    and title would become this device's. ValueError as :func:`read_results` for a file not ours."""
    data = read_results(out_dir)
    return _other_device(out_dir, data, device_name) if data else None


def _other_device(out_dir: Path, data: dict, device_name: str) -> str | None:
    others = [n for n in folder_devices(data) if n != device_name]
    if not others:
        return None
    return (f"{out_dir / 'results.json'} holds rows measured on {' and '.join(map(repr, others))}; this run is on "
            f"{device_name!r}: a results folder holds one device's rows; use another --out")


PLOT_NAME = re.compile(r"speedup-[a-z0-9-]+\.png")  # plot_speedups' file names: speedup-<slug>.png


def write_results(out_dir: Path, env: dict, ceilings: dict | None, rows: list[dict], *,
                  plot: bool = True) -> dict[str, Path]:
    """Write results.json / results.md / plots of ``rows`` and of the rows an earlier run left in
    ``out_dir`` that this run did not measure again (no row of this run has their
    :data:`ROW_IDENTITY`), so ``bench ops`` then ``bench pipelines``, or ``bench ops`` then
    ``bench ops --ops attention``, add up; a row measured again is replaced. Kept rows are as their
    run wrote them: a speed-up stays against its own run's reference, even where this run measured
    that reference again. ``env["runs"]`` in the file lists the env (and ceilings) of every run
    with rows there, results.md numbers them, and a line on stderr says how many rows were kept and
    from which runs. Plots are drawn from all rows; a speedup-*.png none of them backs is removed
    (with ``plot=False`` the PNGs are left alone). A results.json this tool did not write, or one
    of another device's rows, raises OSError (the CLI refuses both before running:
    :func:`results_file_problem`, :func:`device_problem`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        old = read_results(out_dir) or {"env": {}, "ceilings": None, "rows": []}
    except ValueError as e:  # it changed since the check before the run
        raise OSError(str(e)) from None
    if why := _other_device(out_dir, old, env.get("device_name")):  # the CLI refuses it before running
        raise OSError(why)
    measured = {tuple(r.get(k) for k in ROW_IDENTITY) for r in rows}
    kept = [{**dict.fromkeys(ROW_KEYS), **r} for r in old["rows"]
            if tuple(r.get(k) for k in ROW_IDENTITY) not in measured]
    all_rows = kept + rows
    # runs with rows in the file, oldest first: each its env as recorded (files written before
    # env.runs existed recorded only their last run's: other runs get what their rows carry)
    recorded = {_run_of(e): e for e in [*old["env"].get("runs", [old["env"]]), {**env, "ceilings": ceilings}]}
    runs = {_run_of(r): recorded.get(_run_of(r)) or {k: r[k] for k in _ENV_IN_ROW} for r in all_rows}
    env = {**env, "runs": sorted(({k: v for k, v in e.items() if k != "runs"} for e in runs.values()),
                                 key=lambda e: str(e.get("date") or ""))}
    if kept:
        print(f"[bench] {out_dir / 'results.json'}: kept {len(kept)} earlier row(s) this run did not measure again: "
              + "; ".join(f"{_what([r for r in kept if _run_of(r) == key])} from commit {(key[1] or 'unknown')[:12]} "
                          f"of {key[0]}" for key in dict.fromkeys(map(_run_of, kept)))
              + ": the folder mixes runs (results.md says which row is whose)", file=sys.stderr)
    # ceilings belong to op rows: an earlier run's stay only beside the op rows kept with them
    earlier = old.get("ceilings") if any(r["suite"] == "ops" for r in kept) else None
    ceilings = merge_ceilings(earlier, ceilings)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(_jsonable({"env": env, "ceilings": ceilings, "rows": all_rows}),
                                    indent=1, allow_nan=False) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(render_markdown(env, ceilings, all_rows) + "\n")
    paths = {"json": json_path, "markdown": md_path}
    if plot:  # of every row in the file; a plot of the tool's naming that none of them backs goes
        plots = plot_speedups(out_dir, all_rows, env["runs"])
        for stale in set(out_dir.glob("speedup-*.png")) - set(plots.values()):
            if PLOT_NAME.fullmatch(stale.name):
                stale.unlink()
        paths.update(plots)
    return paths


def plotting_problem() -> str | None:
    """Why :func:`plot_speedups` cannot run here (matplotlib is in the bench and test extras, not
    in a base install), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib does not import ({e}; pip install 'sdlab[bench]', or matplotlib)"
    return None


def plot_speedups(out_dir: Path, rows: list[dict], runs: list[dict] | None = None) -> dict[str, Path]:
    """One PNG per op (speed-up of each backend per case) and one per pipeline suite, named
    :data:`PLOT_NAME`. ``runs`` is ``env["runs"]`` of :func:`write_results`: where one plot's bars
    come from more than one of them, each bar is labelled ``rN``, run N of results.md (a speed-up
    is against its own run's reference, so bars of different runs compare less closely); without
    ``runs``, the rows' runs are numbered by date, as write_results numbers them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r["speedup_vs_reference"] is not None:
            name = r["op"] if r["suite"] in ("ops", "tune") else r["suite"]
            groups.setdefault((r["suite"], name), []).append(r)

    def label(r: dict) -> str:  # one bar per row: what tells a suite's rows apart, bar the backend
        if r["suite"] in ("ops", "tune"):
            return f"{r['case']}\n{r['dtype']}"
        tail = ", ".join(str(v) for v in (r.get("shape"), r["dtype"]) if v)
        if r["suite"] == "unet_step":
            return f"{r['preset']}\n{tail}"
        steps = f", {r['steps']} steps" if r.get("steps") is not None else ""
        return f"{r['op']} ({r['preset']}){steps}\n{tail}"

    if runs is None:  # rows alone (a plot drawn afterwards from a results.json's rows): runs by date
        runs = sorted(({k: r.get(k) for k in RUN_KEY} for r in rows), key=lambda e: str(e.get("date") or ""))
    number = {key: i for i, key in enumerate(dict.fromkeys(map(_run_of, runs)), 1)}
    for (suite, name), sel in sorted(groups.items()):
        xs = list(dict.fromkeys(label(r) for r in sel))
        backends = list(dict.fromkeys(r["backend"] for r in sel))
        mixed = len({_run_of(r) for r in sel}) > 1
        width = 0.8 / max(len(backends), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(xs) * max(1, len(backends)) * 0.35 + 3), 4.5))
        for i, b in enumerate(backends):
            mine = {label(r): r for r in sel if r["backend"] == b}
            pos = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(xs))]
            bars = ax.bar(pos, [mine[x]["speedup_vs_reference"] if x in mine else math.nan for x in xs],
                          width, label=b)  # missing: no bar
            if mixed:
                ax.bar_label(bars, [f"r{number.get(_run_of(mine[x]), '?')}" if x in mine else "" for x in xs],
                             fontsize=5)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ups = [r["speedup_vs_reference"] for r in sel if r["speedup_vs_reference"] > 0]
        if ups and max(ups) / min(ups) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=45, ha="right", fontsize=7)
        tune = suite == "tune"
        ax.set_ylabel(f"speed-up vs {DEFAULT_CONFIG if tune else 'reference'} (higher is better)")
        what = "launch configuration" if tune else "backend"
        devices = ", ".join(dict.fromkeys(str(r["device_name"]) for r in sel))
        ax.set_title(f"{name}: speed-up per {what} ({devices})"
                     + ("\nbars of several runs: rN is run N of results.md" if mixed else ""), fontsize=9)
        ax.legend(fontsize=7 if len(backends) <= 12 else 5, ncol=2 if len(backends) <= 12 else 4)
        fig.tight_layout()
        key = f"tune-{name}" if tune else name
        path = out_dir / f"speedup-{slug(key)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[f"plot:{key}"] = path
    return written
