"""The host time of a Triton kernel call, measured on a CPU: what an eager model pays per call
before the GPU runs anything.

An eager SD 1.5 UNet step with every op on Triton is host-bound on an H100: the GPU computes it in
11.7 ms, the host takes 20-35 ms to issue its ~850 calls (README, Performance). So an op's host time
is part of what the step costs. This tool times the host side of the Triton backends without a GPU:
Triton's driver is replaced by a stub (device 0, one stream) and its compiler by one whose kernels
launch nothing, so each call runs everything it runs on a GPU host up to Triton's C launcher, on CPU
tensors of the UNet's shapes and dtypes. Each call is split into layers, each timed on its own:

    call      kernels.<op>(...) under kernels.use(triton): the whole eager call
    checks    the op's argument checks, made before the switch (call - dispatch)
    switch    the switch resolving the backend: the choice, and the Triton backend's input check
    backend   the Triton backend called directly (what `bench ops` times): plan, outputs, launches
    launch    one direct launch (kernels/_launch.py): launch key, cache lookup, the stub's run
    compiled  the op in a torch.compile'd graph (Inductor), per call: the dispatcher calling the
              torch.ops.sdlab op, then the backend's eager launches (README, torch.compile); in
              brackets, what a one-op graph's call costs besides (guards, Inductor's wrapper)

The JSON's "dispatch_us" is kernels.registry.dispatch (the switch, the count, the backend). Call and
dispatch are timed in turns, and checks is the median of the turns' differences (call - dispatch):
timed apart, a host speeding up or slowing down between them moved the difference by more than the
checks cost, below zero too. A median under zero is reported as 0, marked * in the table
("checks_clamped" in the JSON): the checks cost less than this host's noise. Not included: Triton's C launcher, the driver's launch, and CUDA's caching
allocator (the CPU allocator runs here). The numbers are this CPU's: compare layers with each
other, and commits with each other on one machine; a GPU host's figures (`bench ops`' host µs)
compare with those of the same host.

    python -m bench.host                               # SD 1.5's UNet calls, fp16
    python -m bench.host --shapes unet15.attn --json   # one JSON object: the machine, the records

Run it without TRITON_INTERPRET=1 (the interpreter runs no launcher to stub). Do not import it into
a process that launches real kernels: it replaces Triton's active driver.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time

import torch

DEFAULT_SHAPES = ("unet15.down0.res", "unet15.down1.res", "unet15.mid.res", "unet15.attn.norm0",
                  "unet15.attn.self0", "unet15.attn.cross0", "unet15.attn.self2", "sd15.latent",
                  "sd15.latent.repaint")
OPS = ("attention", "group_norm_silu", "scheduler_step")  # the kernel families, one module each
MODULES = ("kernels.registry", *(f"kernels.{op}" for op in OPS))


def launchers(op: str) -> dict:
    """{global name: Launcher} of kernels.<op>'s module: every kernel it launches directly."""
    from kernels._launch import Launcher

    module = importlib.import_module(f"kernels.{op}")
    return {name: v for name, v in vars(module).items() if isinstance(v, Launcher)}


class StubDriver:
    """Triton's active driver, minus the GPU: device 0, a fixed stream per device, an sm_90 target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0x5000 + device

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class StubCompiled:
    """A compiled kernel whose ``run`` (the C launcher's entry) hands its arguments to ``on_run``."""

    on_run = None  # set by stub_triton: called with (this kernel, run()'s arguments)

    def __init__(self, key):
        self.key, self.function, self.packed_metadata = key, ("function", key), ("metadata", key)

    def launch_metadata(self, grid, stream, *args):
        return {"grid": grid}

    def run(self, *args):
        if StubCompiled.on_run is not None:
            StubCompiled.on_run(self, args)


def stub_triton(on_run=None) -> None:
    """Replace Triton's driver and compile step for this process (nothing reaches a GPU), and let the
    Triton backends take CPU tensors as under the interpreter. Call before the first launch; the
    kernels must be real JITFunctions (TRITON_INTERPRET unset when kernels was imported)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    def compile_stub(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled = self.device_caches[device][0][key] = StubCompiled(key)
        return compiled

    StubCompiled.on_run = on_run
    driver.set_active(StubDriver())
    JITFunction._do_compile = compile_stub
    from kernels import _launch

    _launch._DRIVER = (StubDriver().get_current_device, StubDriver().get_current_stream)
    for name in MODULES:  # their input checks refuse CPU tensors unless interpreting
        importlib.import_module(name).interpreting = lambda: True


def per_call_us(fn, calls: int = 200, samples: int = 15) -> float:
    """Median over ``samples`` of the time of ``calls`` back-to-back calls, per call, in µs; the
    garbage collector off while timing (its pauses land on whichever call triggers them)."""
    return statistics.median(interleaved_us([fn], calls, samples)[0])


def interleaved_us(fns, calls: int = 200, samples: int = 15) -> list[list[float]]:
    """Per fn of ``fns``, ``samples`` timings as per_call_us takes them (µs per call, of ``calls``
    back-to-back calls), taken in turns: one of each per turn, in reverse order every other turn, so
    that a drift in the host's speed (load, clocks) falls on every fn alike."""
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    enabled = gc.isenabled()
    gc.disable()
    try:
        for turn in range(samples):
            order = range(len(fns)) if turn % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                fn = fns[i]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[i].append((time.perf_counter() - t0) * 1e6 / calls)
    finally:
        if enabled:
            gc.enable()
    return times


def checks_us(call_us: list[float], dispatch_us: list[float]) -> tuple[float, bool]:
    """(µs of the op's checks, clamped): the median of the turns' call - dispatch differences
    (:func:`interleaved_us`), or 0 and True where that is negative (under the host's noise)."""
    diff = statistics.median(c - d for c, d in zip(call_us, dispatch_us, strict=True))
    return max(diff, 0.0), diff < 0


def call_op(op: str, args: tuple):
    """``kernels.<op>`` on the positional arguments ``bench.ops.make_inputs`` builds (dispatch order);
    returns its output tensor (the step's x_{t-1})."""
    import kernels

    if op == "scheduler_step":
        x, out, coeffs, uncond, g, noise, prev_x0, mask, known = args
        return kernels.scheduler_step(x, out, coeffs, model_output_uncond=uncond, guidance_scale=g, noise=noise,
                                      prev_x0=prev_x0, mask=mask, known=known)[0]
    return getattr(kernels, op)(*args)


def _launches(op: str, backend) -> list[tuple]:
    """The (launcher, arguments) of each launch one call of ``backend`` makes."""
    module = importlib.import_module(f"kernels.{op}")
    seen = []
    originals = launchers(op)

    class Spy:
        def __init__(self, launcher):
            self.launcher = launcher

        def __call__(self, *args):
            seen.append((self.launcher, args))
            return self.launcher(*args)

    try:
        for name, launcher in originals.items():
            setattr(module, name, Spy(launcher))
        backend()
    finally:
        for name, launcher in originals.items():
            setattr(module, name, launcher)
    return seen


def _compiled(chained) -> tuple[float, float]:
    """(µs per op call in a compiled graph, µs the graph's own call costs): graphs of 1 and of 5
    calls of the op, each call taking the last one's output, timed whole (guards, Inductor's
    wrapper, then one torch.ops.sdlab call per op)."""
    times = []
    for n in (1, 5):
        graph = torch.compile(lambda: chained(n), fullgraph=True)
        graph()
        times.append(per_call_us(graph, calls=100))
    per_op = (times[1] - times[0]) / 4
    return per_op, times[0] - per_op


def _chained(op: str, args: tuple):
    """``n`` -> n calls of kernels.<op>, each on the last one's output (what a graph of n ops runs)."""
    def run(n):
        first = args[0]
        for _ in range(n):
            first = call_op(op, (first, *args[1:]))
        return first

    return run


def measure(case, dtype: torch.dtype, compiled: bool = True) -> dict:
    """One record: µs per call of each layer for ``case`` (a bench.ops Case) in ``dtype``."""
    import kernels
    from bench.ops import make_inputs
    from kernels import registry

    args, _ = make_inputs(case, "cpu", dtype)
    op = case.op
    backend = kernels.implementation(op, "triton")
    with torch.no_grad(), kernels.use(**{op: "triton"}):
        call = lambda: call_op(op, args)  # noqa: E731
        call()  # the first call compiles (the stub) and fills the plan and launch caches
        launches = _launches(op, lambda: backend(*args))
        calls, dispatches = interleaved_us([call, lambda: registry.dispatch(op, *args)])
        checks, clamped = checks_us(calls, dispatches)
        rec = dict(case=case.name, op=op, shape=case.shape, dtype=str(dtype).replace("torch.", ""),
                   launches=len(launches),
                   call_us=statistics.median(calls),
                   dispatch_us=statistics.median(dispatches),
                   checks_us=checks, checks_clamped=clamped,
                   switch_us=per_call_us(lambda: registry.resolve(op, *args)),
                   backend_us=per_call_us(lambda: backend(*args)),
                   launch_us=[per_call_us(lambda: launcher(*a)) for launcher, a in launches])
        if compiled:
            torch._dynamo.reset()
            rec["compiled_us"], rec["graph_us"] = _compiled(_chained(op, args))
    return rec


COLUMNS = ("case", "shape", "dtype", "call_us", "checks_us", "switch_us", "backend_us", "launch_us", "compiled_us")


def render(records: list[dict], baseline_us: float) -> str:
    head = ("| case | shape | dtype | call µs | checks µs | switch µs | backend µs | launches µs | "
            "compiled µs (graph µs) |")
    lines = [head, "|" + "---|" * 9]
    for r in records:
        launches = " + ".join(f"{t:.1f}" for t in r["launch_us"]) or "none"
        comp = f"{r['compiled_us']:.1f} ({r['graph_us']:.1f})" if "compiled_us" in r else ""
        checks = f"{r['checks_us']:.1f}" + ("*" if r.get("checks_clamped") else "")
        lines.append(f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['call_us']:.1f} | {checks} | "
                     f"{r['switch_us']:.1f} | {r['backend_us']:.1f} | {launches} | {comp} |")
    if any(r.get("checks_clamped") for r in records):
        lines.append("\n* The call timed below its dispatch (median of the turns' differences): the checks cost "
                     "less than this host's timing noise; shown as 0.")
    lines.append(f"\nOne torch call on this CPU for scale (torch.empty_like of a (2, 320, 64, 64) fp16 tensor): "
                 f"{baseline_us:.2f} µs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status: 0 measured, 2 a usage error (TRITON_INTERPRET set, an "
                                            "unknown shape).")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="NAME",
                        help="bench ops case names or prefixes, space or comma separated (python -m bench ops "
                             "--list-shapes); default: " + " ".join(DEFAULT_SHAPES))
    parser.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch.compile column (its compiles "
                                                                   "take a few seconds per case)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the CPU, versions, the records) "
                                                             "instead of a table")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no"):
        parser.error("run without TRITON_INTERPRET=1: under the interpreter Triton runs no launcher to stub "
                     "(env -u TRITON_INTERPRET python -m bench.host)")
    from bench.common import parse_dtype
    from bench.ops import CASES, select_cases, shape_selected

    try:
        dtype = parse_dtype(opts.dtype)
    except ValueError as e:
        parser.error(str(e))
    names = [c.name for cases in CASES.values() for c in cases]
    shapes = list(dict.fromkeys(v.strip() for item in opts.shapes for v in item.split(",") if v.strip()))
    if not shapes:  # "" would prefix every case
        parser.error(f"--shapes: no values given; valid: {', '.join(names)}")
    unknown = [s for s in shapes if not any(shape_selected(n, [s]) for n in names)]
    if unknown:  # as bench ops: a name that selects nothing is an error, not a shorter table
        parser.error(f"unknown shape case {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    cases = select_cases(list(CASES), shapes, quick=False)
    stub_triton()
    gn = importlib.import_module("kernels.group_norm_silu")
    gn._sms = lambda x: gn.H100_SMS  # GroupNorm's grid (and so one launch or two) as on an H100
    records = [measure(c, dtype, compiled=not opts.no_compiled) for c in cases]
    x = torch.empty((2, 320, 64, 64), dtype=torch.float16)
    baseline = per_call_us(lambda: torch.empty_like(x))
    if opts.json:
        print(json.dumps({"cpu": _cpu(), "torch": torch.__version__, "triton": _triton_version(),
                          "one_torch_call_us": baseline, "records": records}))
    else:
        print(f"CPU: {_cpu()}; torch {torch.__version__}, Triton {_triton_version()}\n")
        print(render(records, baseline))
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
