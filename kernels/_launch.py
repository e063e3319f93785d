"""Launching a compiled ``@triton.jit`` kernel without Triton's per-call dispatch.

``kernel[grid](*args, **meta)`` runs ``JITFunction.run`` on every call: it binds and specialises
every argument (a pointer's dtype and 16-byte alignment, an integer's divisibility by 16), turns
that into a string cache key, looks the compiled kernel up and only then calls its C launcher. On
the H100 host we measured (Triton 3.6) that dispatch cost 13-16 us for a 3-argument kernel and
~0.7 us per further argument (see scheduler_step.py); the attention forward has 35 arguments. At
SD's batch 1-2 many of these kernels run for less time than that on the device, so eager
pipelines are bound by host time, and a fused kernel can lose to torch's ops on host cost alone.

:class:`Launcher` runs Triton's dispatch once per *launch key* and keeps the compiled kernel it
returns; later launches with the same key call that kernel's launcher directly. The key is

    (the caller's key, the current CUDA device, Triton's option knobs,
     each tensor's (dtype, 16-byte aligned) or None)

The caller's key must determine every argument that is not a tensor or a float (integers,
constexprs) and ``meta`` (``num_warps``, ...), from the values launched, not from what they were
derived from (a table edited at run time would change them under the same inputs): then the key
determines Triton's specialisation (Triton does not specialise on float values), so the kept
kernel is the one Triton would pick. Call sites pass floats as Python floats (an int would
specialise as an integer). A key of None launches through Triton's dispatch, uncached. The option
knobs are those Triton reads into compile options on each call (debug, instrumentation).

Triton's own dispatch runs instead (always correct, just slower) when: the interpreter runs,
torch.compile is tracing a launch (the built-in ops hide theirs behind ``torch.ops.sdlab`` ops;
dynamo wraps a research backend's launch it traces itself), a launch or pre-run hook is set (e.g.
profilers), ``SDLAB_FAST_LAUNCH=0`` was set before import (or :data:`ENABLED` is set False), or
the Triton version is not one whose launch convention was read for this (:data:`CHECKED`).
Not re-checked on direct launches: edits to module globals a kernel reads (Triton raises on
those; here they need ``clear()``).
"""
from __future__ import annotations

import os

import torch

from ._triton import IMPORT_ERROR, OutOfResources, triton
from .registry import LaunchUnsupported, interpreting

try:
    from triton import knobs as _knobs
except Exception:  # no Triton (any import error, as _triton.py takes it), or one without knobs: stay off
    _knobs = None

ENV_VAR = "SDLAB_FAST_LAUNCH"
# Triton releases whose JITFunction.run and CompiledKernel.run were read for this convention:
# compiled.run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
#              enter_hook, exit_hook, *every_argument_in_signature_order)
CHECKED = ((3, 6), (3, 9))
MAX_KEYS = 4096  # launch keys kept per kernel; the cache is emptied when full


# SDLAB_FAST_LAUNCH's values: TRITON_INTERPRET's words; set but empty (a shell's `VAR= cmd`) is off
OFF, ON = ("0", "false", "off", "no", "n", ""), ("1", "true", "on", "yes", "y")


def _unsupported() -> str | None:
    """Why direct launches are off in this process, or None. A value of SDLAB_FAST_LAUNCH that is
    neither on nor off is a ValueError naming it (importing kernels reads it)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in OFF:
        return f"{ENV_VAR}={os.environ[ENV_VAR]!r}"  # as set: an empty one is off too
    if value not in ON:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 0 (or false, off, no) to launch every kernel "
                         "through Triton's dispatch, 1 (true, on, yes; the default) for direct launches")
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if interpreting():
        return "TRITON_INTERPRET=1"
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        version = None
    if _knobs is None or version not in CHECKED:
        return (f"Triton {triton.__version__}: direct launches are checked for "
                f"{', '.join('.'.join(map(str, v)) for v in CHECKED)} only")
    return None


WHY_OFF = _unsupported()
ENABLED = WHY_OFF is None  # set False to time Triton's own dispatch (bench) or to rule this out


def mode() -> str:
    """How Triton kernels are launched in this process, for reports (kernels.describe, bench rows)."""
    return "direct once compiled" if ENABLED else f"Triton's dispatch ({WHY_OFF or 'ENABLED set False'})"


class Launcher:
    """One kernel's launches, directly once its launch key has been through Triton's dispatch.

    ``launcher(grid, key, tensors, args, meta)`` is ``kernel[grid](*args, **meta)``. ``args``:
    every positional argument; ``tensors``: the tensor (or None) arguments among them, in any
    order; ``key``: hashable, determining every argument that is neither a tensor nor a float,
    and ``meta``. ``direct`` counts the launches that skipped Triton's dispatch.

    Triton launches on the current CUDA device, where torch's own ops follow their tensors: a
    launch whose first tensor is on another GPU (a model on cuda:1, device 0 current) runs under
    ``torch.cuda.device`` of that tensor, so its kernel and stream are that GPU's.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.name = kernel.fn.__name__
        self._module = kernel.fn.__globals__  # where tests and bench.sm90 may swap the kernel by name
        self.cache: dict[tuple, tuple] = {}  # launch key -> (compiled kernel, trailing arguments)
        self.direct = 0

    def clear(self) -> None:
        self.cache.clear()

    def __call__(self, grid, key, tensors, args, meta) -> None:
        first = tensors[0] if tensors[0] is not None else next(t for t in tensors if t is not None)
        on = first.get_device()  # -1 on the CPU (the interpreter, offline compiles)
        if on < 0:
            return self._launch(grid, key, tensors, args, meta, None)
        device = _device()
        if on != device:
            with torch.cuda.device(on):
                return self._launch(grid, key, tensors, args, meta, on)
        return self._launch(grid, key, tensors, args, meta, device)

    def _launch(self, grid, key, tensors, args, meta, device) -> None:
        """The launch on ``device`` (current; None: not read yet)."""
        kernel = self._module[self.name]
        if kernel is not self.kernel:  # swapped for a spy or an offline compile: launch what is there
            kernel[grid](*args, **meta)
            return
        fast = ENABLED and key is not None and not torch.compiler.is_compiling()
        if fast:
            device = _device() if device is None else device
            full = (key, device, _options(),
                    *[None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors])
            hit = self.cache.get(full)
            if hit is not None and not _hooked(self.kernel):
                compiled, tail = hit
                n = len(grid)
                compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _stream(device),
                             compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
                self.direct += 1
                return
        try:
            compiled = self.kernel[grid](*args, **meta)
        except Exception as e:
            if OutOfResources is None or not isinstance(e, OutOfResources):
                raise
            raise LaunchUnsupported(
                f"{self.name} with {meta} needs {e.required} of {e.name} per block, and this GPU allows {e.limit}: "
                "the launch tables are tuned for an H100 (sm_90); choose another backend for this op (attention: "
                "sdpa), or pass config= with fewer stages or smaller blocks") from e
        if hasattr(compiled, "result"):  # an async-compile future (Triton 3.9's AsyncCompileMode)
            compiled = compiled.result()
        if fast and getattr(compiled, "packed_metadata", None) is not None and not _hooked(self.kernel):
            if len(self.cache) >= MAX_KEYS:
                self.cache.clear()
            self.cache[full] = (compiled, self._tail(len(args), meta))

    def _tail(self, n_args: int, meta: dict) -> tuple:
        """The arguments after the positional ones, in signature order: ``meta``'s or defaults."""
        tail = []
        for p in self.kernel.params[n_args:]:
            if p.name in meta:
                tail.append(meta[p.name])
            else:  # Triton's binder raised already if a parameter without a default was missing
                tail.append(p.default)
        return tuple(tail)


def _device() -> int:
    return _DRIVER[0]()


def _stream(device: int) -> int:
    return _DRIVER[1](device)


def _hooked(kernel) -> bool:
    """A profiler or user hook wants Triton's launch path (launch metadata, pre-run hooks, or 3.9's
    custom compile stages, which enter Triton's own cache key)."""
    runtime = _knobs.runtime
    return (bool(kernel.pre_run_hooks) or _set(runtime.launch_enter_hook) or _set(runtime.launch_exit_hook)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def _options() -> tuple:
    """The Triton knobs that JITFunction.run reads into the compile options on every call; a kernel
    compiled under other values is another kernel (e.g. TRITON_DEBUG set after the first launch)."""
    return (_knobs.runtime.debug, _knobs.compilation.instrumentation_mode,
            getattr(_knobs.compilation, "fpsan_homomorphic_casts", None))


def _set(hook) -> bool:
    """Triton 3.6-3.9 keep launch hooks in an always-present HookChain, empty unless a profiler
    adds one; its launcher skips a None hook, which is what an empty chain amounts to."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _LazyDriver:
    """Triton's active driver's current-device and current-stream getters, bound on first use
    (the driver needs CUDA, which a CPU process never initialises)."""

    def __getitem__(self, i):
        from triton.runtime import driver

        getters = (driver.active.get_current_device, driver.active.get_current_stream)
        globals()["_DRIVER"] = getters
        return getters[i]


_DRIVER = _LazyDriver()
