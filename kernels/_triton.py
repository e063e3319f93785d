"""Triton, or a stand-in where it does not import (no CUDA build, macOS, Windows), so that
``import kernels`` and every non-Triton backend still work there. The stand-in's ``@triton.jit``
kernels raise the import error if launched; the registry never gets that far, because
:func:`kernels.registry.triton_available` reports the error and each Triton backend's check
refuses the input with it (an error when chosen explicitly, the reference by default). Under
TRITON_INTERPRET=1 the interpreter must also run a probe kernel (:func:`_interpreter_problem`);
where it cannot, that is reported the same way.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources  # a launch asking more than the device has

    IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - exercised in a subprocess by tests/test_registry.py
    IMPORT_ERROR = f"triton does not import ({type(e).__name__}: {e})"
    OutOfResources = None  # nothing launches, so nothing runs out

    class _UnavailableKernel:
        """What ``@triton.jit`` makes without Triton: a kernel that cannot be launched."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__}: {IMPORT_ERROR}")

        __call__ = __getitem__

    class _Triton:
        """``@triton.jit`` without Triton (host code uses this module's cdiv / next_power_of_2)."""

        @staticmethod
        def jit(fn=None, **_):
            return _UnavailableKernel(fn) if fn is not None else _UnavailableKernel

    triton = _Triton()
    tl = None  # only read inside kernel bodies and (unevaluated) annotations


def _interpret_env() -> bool:
    """TRITON_INTERPRET read as Triton reads it when ``@triton.jit`` runs (1 / true / on / yes / y, any
    case, is on; anything else, "false" too, is off): its own knob where there is one."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


INTERPRET = _interpret_env()


def _interpreter_problem() -> str | None:
    """Under TRITON_INTERPRET=1, why the interpreter cannot run these kernels here, else None:
    found by running a probe with what every kernel here has, a loop over a runtime bound.
    Known case: Triton 3.6 and older turn a scalar argument into a 1-element array that
    ``range()`` converts with ``int()``, which NumPy 2.4 refuses (Triton 3.7 fixed it)."""
    import numpy as np
    import torch

    @triton.jit
    def _probe(out_ptr, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out, 3)
        if out.item() == 3:
            return None
        problem = f"a probe kernel counted {out.item()} loop steps, not 3"
    except Exception as e:
        problem = f"a probe kernel failed ({type(e).__name__}: {e})"
    return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with NumPy {np.__version__}: "
            f"{problem}" + _known_fix(triton.__version__, np.__version__))


def _known_fix(triton_version: str, numpy_version: str) -> str:
    """The fix, as a clause to append, when these releases are the known failing pair, else ""."""
    major_minor = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())  # noqa: E731
    known = major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4)
    return "; install numpy<2.4, or Triton >= 3.7" if known else ""


# Why the Triton backends cannot run here (None: they can): Triton does not import, or its
# interpreter, when it is on, fails the probe.
UNAVAILABLE = IMPORT_ERROR or (_interpreter_problem() if INTERPRET else None)


# Host-side integer helpers for launch plans. Triton's own (triton.cdiv, triton.next_power_of_2) are
# ConstexprFunction wrappers that cost ~1.5 us per call on a fast CPU (Triton 3.6 and 3.9): more
# than the rest of a cached launch plan, on the path every eager call takes.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


__all__ = ["IMPORT_ERROR", "INTERPRET", "UNAVAILABLE", "cdiv", "next_power_of_2", "tl", "triton"]
