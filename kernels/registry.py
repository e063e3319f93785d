"""One switch for every op: which backend computes it.

Each op (``group_norm_silu``, ``attention``, ``scheduler_step``) is a plain function whose
implementations are registered per backend with :func:`register`. A call goes through
:func:`dispatch`, which picks the backend in this order:

1. the innermost ``kernels.use(op=backend)`` scope (a context manager; restores on exit),
2. :func:`set_backend` (process-wide),
3. the ``SDLAB_KERNELS`` env var: ``"triton"`` for every op, or
   ``"attention=triton,group_norm_silu=reference"`` per op,
4. the default: ``triton`` when the input is on a CUDA device and Triton imports, else
   ``reference``.

The choice is traceable by ``torch.compile``: a compiled model bakes in the backends chosen when
it was traced (dynamo guards on the scope and ``set_backend`` state, so changing them retraces).
Scopes are process-wide (a plain list that dynamo can read, shared by threads, not per thread):
each holds only its own choices and removes exactly those on exit, even when scopes opened in
different threads exit out of order.

A backend may refuse an input (dtype, head dim, device) through its ``check`` function. When
the backend was chosen explicitly (1-3) that raises :class:`BackendUnsupported` naming the limit;
under the default it falls back to ``reference`` and warns once per op and kind of reason: reasons
that differ only in their numbers (a scale, a shape, a count) are one kind, so a loop over sizes
that all exceed a limit warns once. While ``torch.compile`` traces, a fallback does not warn: dynamo
cannot trace ``warnings.warn`` and would break the graph there for good; :func:`resolve` and
:func:`describe` still say what runs.

A choice may be a *fallback chain*, ``"gluon_sm90/triton"`` (or a tuple of names): the first
backend of the chain whose check takes the input runs; a refused one warns once per op, backend
and kind of reason, naming the backend that ran instead; when every one refuses, the call raises
:class:`BackendUnsupported` with each one's reason. It lets a research backend that covers only
some shapes run a whole pipeline, its other calls on a backend of your choosing, counted apart.
Every member but the last must have a ``check`` (one without takes every input, so the rest would
never run).

``compile`` is available for every op without registration: ``torch.compile`` of the reference.
Every dispatch is counted per (op, backend), so tests and benchmarks can see which code ran.
Under ``torch.compile`` of a model, the built-in Triton backends trace as ``torch.ops.sdlab`` custom
ops (each kernel file defines its own), which count through :func:`counted` when the compiled graph
runs them.

Research backends. Besides the built-in names (:class:`Backend`), ``register`` takes any new name
(lower case, ``[a-z][a-z0-9_]*``), so a variant of a kernel plugs in next to the others and is
switched, counted, checked and benchmarked like them; the default never picks one.
:func:`load_plugin` imports a module or a ``.py`` file that registers some (the CLIs' ``--plugin``),
and :mod:`kernels.testing` holds each op's equivalence cases for its tests.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor

from . import _triton

ENV_VAR = "SDLAB_KERNELS"
# Triton fixes interpret mode when the @triton.jit kernels are defined, i.e. when kernels is imported;
# the checks read this, not the environment now, which may have changed since.
_INTERPRET = _triton.INTERPRET


class Backend(str, Enum):
    REFERENCE = "reference"  # plain torch, the ground truth
    TRITON = "triton"  # the fused hand-written kernel
    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention (attention only)
    COMPILE = "compile"  # torch.compile of the reference

    def __str__(self) -> str:
        return self.value


BackendName = Backend | str  # a built-in Backend, or a research backend's registered name
_NAME = re.compile(r"[a-z][a-z0-9_]*")  # research backends: no '-', ':' or '@', which the benchmarks' names use


class BackendUnsupported(RuntimeError):
    """An explicitly chosen backend cannot take this input."""


class LaunchUnsupported(BackendUnsupported):
    """A backend took the input, but the device could not launch its kernel (e.g. more shared
    memory per block than this GPU has). Under the default choice the op falls back to the
    reference with one warning; an explicit choice raises it."""


def refuse(op: str, backend: BackendName, reason: str | None) -> None:
    """For a backend's function called directly, past the switch (``attention_triton(...)``):
    raise what choosing it explicitly would, when its check gave a ``reason``."""
    if reason:
        raise BackendUnsupported(f"{op}: backend {str(backend)!r} (called directly) cannot run this input: {reason}")


CHAIN_SEP = "/"  # "gluon_sm90/triton": shell-safe, unlike "|" or ">"


class Chain(tuple):
    """One op's backends tried in order, as chosen (``"gluon_sm90/triton"``): the first whose
    check takes the input runs. Made by :func:`_validate`, so every member is a valid backend."""
    __slots__ = ()

    def __str__(self) -> str:
        return CHAIN_SEP.join(map(str, self))

    def __repr__(self) -> str:
        return repr(str(self))


@dataclass
class _Impl:
    fn: Callable
    check: Callable[..., str | None] | None  # None if the input is fine, else the reason
    compile_dynamic: bool | None = False  # the reference's torch.compile(dynamic=...) for ``compile``


PROFILER_RANGE = "sdlab.{op}[{backend}]"  # the torch.profiler range of one dispatched call
# A function-scope range, as Inductor opens around its Triton launches: torch's profiler links a
# kernel to the innermost function-scope event open at its launch (read in its source, not yet seen
# on a GPU here), so a Triton kernel launched with no aten op between should belong to its range;
# record_function's user-scope ranges get kernels only as device-side annotations.
_profiler_range = getattr(torch._C._profiler, "_RecordFunctionFast", None) or torch.profiler.record_function
_OPS: dict[str, dict[BackendName, _Impl]] = {}
_COUNTS: collections.Counter = collections.Counter()
_WARNED: set[tuple] = set()  # (op, reason with its numbers masked[, chain member refused]): see _reason_kind
_GLOBAL: dict[str, BackendName] = {}
_SCOPES: list[dict[str, BackendName]] = []  # each open kernels.use()'s own choices, innermost last
_ENV_CACHE: dict[str, dict[str, BackendName]] = {}
_FNS: dict[tuple[str, BackendName], Callable] = {}  # implementation() memo: dispatch is hot
# plugin module name -> {(op, backend): (what it replaced: None if new, _UNKNOWN if not seen; what it installed)}
_PLUGINS: dict[str, dict[tuple[str, BackendName], tuple[Any, Any]]] = {}
_UNKNOWN = object()  # a plugin imported before load_plugin saw it: what it replaced is not known
_PLUGIN_OPS: dict[str, set[str]] = {}  # plugin module name -> the torch.ops.sdlab ops it defined (define_op)


def register(op: str, backend: BackendName, *, check: Callable[..., str | None] | None = None,
             compile_dynamic: bool | None = False, replace: bool = False):
    """Decorator: make ``fn`` the ``backend`` implementation of ``op``.

    ``backend`` is a built-in :class:`Backend` or a new name for a research backend (lower case,
    ``[a-z][a-z0-9_]*``, e.g. ``"fa_poly_exp"``), which is chosen only explicitly (``use``,
    ``set_backend``, ``SDLAB_KERNELS``). ``check(*args, **kwargs)`` returns ``None`` when the
    backend can take the input, or a short reason ("head dim 12 is not a multiple of 8") when it
    cannot. ``compile_dynamic`` (reference only): ``torch.compile``'s ``dynamic`` for the ``compile``
    backend. False (one graph per shape and per value of every float argument) suits ops called with
    a few fixed floats; None lets a float that changes become a graph input after one recompile
    (e.g. per-step coefficients). Registering a pair that exists raises unless ``replace=True``
    (e.g. re-running a notebook cell). A new op's name follows the backends' rule
    (``[a-z][a-z0-9_]*``), so that ``SDLAB_KERNELS="op=backend"`` can name it.
    """
    if not isinstance(op, str) or not _NAME.fullmatch(op):
        raise ValueError(f"invalid op name {op!r}: names are [a-z][a-z0-9_]* (SDLAB_KERNELS could not name "
                         f"it otherwise), e.g. 'my_op'")
    backend = _canonical(backend, registering=True)

    def deco(fn: Callable) -> Callable:
        if backend is Backend.COMPILE:  # derived from the reference, so never stored: it could not be removed
            raise ValueError(f"op {op!r}: 'compile' is made by the registry (torch.compile of the op's reference); "
                             "register the op's reference, or a research backend under a name of its own")
        if (isinstance(backend, Backend) and backend not in _OPS.get(op, {}) and _builtin_op(op)
                and not fn.__module__.startswith("kernels.")):  # the package registering its own
            raise ValueError(f"op {op!r} is built in and has no {str(backend)!r} backend; a research backend takes a "
                             "name of its own (lower case, e.g. 'my_kernel')")
        if backend in _OPS.get(op, {}) and not replace:
            raise ValueError(f"op {op!r} already has a {str(backend)!r} backend "
                             f"({_OPS[op][backend].fn.__module__}.{_OPS[op][backend].fn.__qualname__}); "
                             f"pass replace=True to replace it")
        _OPS.setdefault(op, {})[backend] = _Impl(fn, check, compile_dynamic)
        _registry_changed()
        return fn

    return deco


def _builtin_op(op: str) -> bool:
    """Is ``op`` one of the kernels package's own (its built-in backends are not a plugin's to add)?"""
    return any(impl.fn.__module__.startswith("kernels.") and isinstance(b, Backend)
               for b, impl in _OPS.get(op, {}).items())


def unregister(op: str, backend: BackendName) -> None:
    """Remove a research backend of ``op`` (the built-in ones stay). A scope, ``set_backend`` or
    ``SDLAB_KERNELS`` still naming it then fails at the next call with the valid names."""
    b = _canonical(backend)
    if isinstance(b, Backend):
        raise ValueError(f"{str(b)!r} is a built-in backend; only research backends can be unregistered")
    if b not in _impls(op):
        raise ValueError(f"op {op!r} has no {b!r} backend; valid: {', '.join(backends(op))}")
    del _OPS[op][b]
    if not _OPS[op]:  # an op that research backends alone had (a plugin's own op) goes with the last
        del _OPS[op]
    _registry_changed()


def _registry_changed() -> None:
    _ENV_CACHE.clear()  # "triton" means "every op that has it": recompute
    _FNS.clear()


def _canonical(backend: BackendName, registering: bool = False) -> BackendName:
    """The Backend member for a built-in name (any case: "Triton" is triton, in code as in
    SDLAB_KERNELS), else the lower-case name; a name that no backend could have is a ValueError."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"a backend name is a str, not {type(backend).__name__} ({backend!r})")
    name = backend.strip().lower()
    if name in Backend._value2member_map_:
        return Backend(name)
    if not _NAME.fullmatch(name):
        kind = "research backend name" if registering else "backend"
        raise ValueError(f"invalid {kind} {backend!r}: names are [a-z][a-z0-9_]* (built-in: "
                         f"{', '.join(b.value for b in Backend)})")
    return name


def ops() -> list[str]:
    return sorted(_OPS)


def backends(op: str) -> list[str]:
    """Backends ``op`` can be switched to (``compile`` is derived from ``reference``)."""
    impls = _impls(op)
    names = [str(b) for b in impls]
    if Backend.REFERENCE in impls and Backend.COMPILE not in impls:
        names.append(Backend.COMPILE.value)
    return names


def all_backends() -> list[str]:
    """Every backend name some op has: the built-in ones, then research backends as registered."""
    names = [b.value for b in Backend]
    for op in ops():
        names += [b for b in backends(op) if b not in names]
    return names


def _impls(op: str) -> dict[Backend, _Impl]:
    if op not in _OPS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {', '.join(ops())}")
    return _OPS[op]


def _backend(backend: BackendName) -> BackendName:
    """A backend for every op that has it (``use("triton")``), or an error listing the valid names."""
    if _chain_names(backend) is not None:
        text = _chain_text(backend)
        raise ValueError(f"fallback chain {text!r} for every op: a chain names one op's backends, "
                         f"e.g. use(attention={text!r}) or SDLAB_KERNELS='attention={text}'")
    try:
        b = _canonical(backend)
    except ValueError:
        b = None
    if b is None or str(b) not in all_backends():
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(all_backends())}") from None
    return b


def _chain_names(backend) -> list | None:
    """The members of a fallback chain (a tuple / list, or a str with CHAIN_SEP), else None."""
    if isinstance(backend, Backend):  # first: dynamo cannot trace `in` on a str enum (implementation())
        return None
    if isinstance(backend, (tuple, list)):
        return list(backend)
    if isinstance(backend, str) and CHAIN_SEP in backend:
        return backend.split(CHAIN_SEP)
    return None


def _chain_text(backend) -> str:
    return CHAIN_SEP.join(map(str, backend)) if isinstance(backend, (tuple, list)) else str(backend)


def _validate_chain(op: str, names: list) -> Chain:
    text = _chain_text(names)
    if len(names) < 2 or any(isinstance(n, str) and not n.strip() for n in names):
        raise ValueError(f"fallback chain {text!r} for op {op!r}: name two or more backends, "
                         f"e.g. 'gluon_sm90{CHAIN_SEP}triton'; valid: {', '.join(backends(op))}")
    nested = [n for n in names if not isinstance(n, str) or CHAIN_SEP in n]
    if nested:
        raise ValueError(f"fallback chain {text!r} for op {op!r}: each member is one backend name, "
                         f"not {nested[0]!r}")
    try:
        chain = Chain(_validate_one(op, n) for n in names)
    except ValueError as e:
        raise ValueError(f"fallback chain {text!r}: {e}") from None
    twice = sorted({str(b) for b in chain if chain.count(b) > 1})
    if twice:
        raise ValueError(f"fallback chain {text!r} for op {op!r} names {', '.join(map(repr, twice))} twice")
    impls = _impls(op)
    for i, b in enumerate(chain[:-1]):
        if b not in impls or impls[b].check is None:  # compile (of the reference) or a backend without check=
            raise ValueError(f"fallback chain {text!r} for op {op!r}: {str(b)!r} takes every input (it has no "
                             f"check), so {', '.join(repr(str(r)) for r in chain[i + 1:])} after it would never run")
    return chain


def _validate_one(op: str, backend: BackendName) -> BackendName:
    try:
        b = _canonical(backend)
    except ValueError:
        raise ValueError(
            f"unknown backend {backend!r} for op {op!r}; valid: {', '.join(backends(op))}"
        ) from None
    if str(b) not in backends(op):
        shipped = SHIPPED_PLUGINS.get((op, str(b)))
        hint = (f" (it is registered by the research plugin {shipped}: --plugin {shipped} on the command lines, "
                f"kernels.load_plugin({shipped!r}) in code)" if shipped else "")
        raise ValueError(f"op {op!r} has no {str(b)!r} backend{hint}; valid: {', '.join(backends(op))}")
    return b


# research backends this repository ships as plugins, not loaded with kernels: (op, backend) -> module
SHIPPED_PLUGINS = {("attention", "gluon_sm90"): "kernels.attention_sm90"}


def _validate(op: str, backend: BackendName) -> BackendName:
    """``op``'s backend ``backend`` as the registry keeps it (a :class:`Backend`, a research name, or
    a :class:`Chain`), or a ValueError naming the problem and the valid names."""
    names = _chain_names(backend)
    return _validate_one(op, backend) if names is None else _validate_chain(op, names)


def validate(op: str, backend: BackendName) -> str:
    """The name of ``op``'s backend ``backend`` ("Triton" -> "triton"), or a ValueError listing
    the valid ones: for tools that check a choice before using it."""
    return str(_validate(op, backend))


def _parse_env(value: str) -> dict[str, BackendName]:
    """``"triton"`` -> every op that has it; ``"a=x,b=y"`` -> per op. Cached per value (dispatch is
    hot); the result is shared between calls, treat it as read-only."""
    if value not in _ENV_CACHE:
        _ENV_CACHE[value] = _parse_env_uncached(value)
    return _ENV_CACHE[value]


def _parse_env_uncached(value: str) -> dict[str, BackendName]:
    value = value.strip().lower()  # op and backend names are lower case: "TRITON" means triton
    if not value:
        return {}
    if "=" not in value:
        name = value.strip(" ,")  # "triton," as "a=x," is fine
        if not name:
            raise ValueError(f"{ENV_VAR}={value!r} names no backend; write one for every op ('triton') or "
                             "'op=backend' items ('attention=triton,group_norm_silu=reference')")
        if CHAIN_SEP in name:
            raise ValueError(f"{ENV_VAR}={value!r}: a fallback chain names one op's backends, "
                             f"e.g. 'attention={name}'")
        if name not in all_backends():
            op = name.partition(":")[0].strip()
            hint = (f" ({name!r} is an op: write {name}=<backend>)" if name in _OPS else
                    f" (an op's backend is written {op}=<backend>)" if op in _OPS else "")
            raise ValueError(f"{ENV_VAR}={value!r}: unknown backend {name!r}{hint}; valid: "
                             f"{', '.join(all_backends())}")
        b = _canonical(name)
        return {op: b for op in ops() if name in backends(op)}
    out = {}
    for item in filter(str.strip, value.split(",")):  # "a=x," and "a=x, b=y" are fine
        op, sep, backend = item.strip().partition("=")
        if not sep or not op.strip():
            raise ValueError(f"{ENV_VAR}={value!r}: expected 'op=backend' items, got {item!r}")
        if op.strip() in out:
            raise ValueError(f"{ENV_VAR}={value!r}: op {op.strip()!r} is named twice")
        try:
            out[op.strip()] = _validate(op.strip(), backend.strip())
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}={value!r}: {e}") from None
    return out


def _choice(op: str) -> tuple[BackendName | None, str]:
    """The explicit backend for ``op`` and where it came from, or (None, '')."""
    for scope in reversed(_SCOPES):
        if op in scope:
            return scope[op], "kernels.use() scope"
    if op in _GLOBAL:
        return _GLOBAL[op], "kernels.set_backend()"
    env = _parse_env(os.environ.get(ENV_VAR, ""))
    if op in env:
        return env[op], f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    return None, ""


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def check_floating(op: str, allow_bool: tuple[str, ...] = (), **tensors: torch.Tensor | None) -> None:
    """The checks every backend needs, made by each op before dispatch: every named argument that
    is not None is a floating-point tensor (a bool one where named in ``allow_bool``) on the first
    one's device. Raises TypeError / ValueError naming the argument (the reference would otherwise
    return zeros for int inputs, or garbage for a meta tensor)."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} is a {type(t).__name__}, not a tensor")
        if not (t.is_floating_point() or (t.dtype == torch.bool and name in allow_bool)):
            raise TypeError(f"{op}: {name} dtype {t.dtype} is not floating point"
                            + (" or bool" if name in allow_bool else ""))
        if first is None:
            first = name, t.device
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} is on {t.device}, {first[0]} on {first[1]}")


def triton_available() -> str | None:
    """None when the Triton backends can run here, else why not: Triton does not import, or, under
    TRITON_INTERPRET=1, its interpreter fails a probe kernel (tried once, when kernels was imported)."""
    return _triton.UNAVAILABLE


def interpreting() -> bool:
    """Whether the Triton kernels run under the interpreter: TRITON_INTERPRET as it was when
    kernels was imported (setting it later changes nothing in Triton, so nothing here either)."""
    return _INTERPRET


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are non-empty views of one storage (conservative: any two views count). The
    Triton backends refuse an ``out=`` that shares memory with an input their programs re-read."""
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a's and b's elements may share bytes: one storage and intersecting address ranges
    (conservative for interleaved views such as x[::2] and x[1::2]). Unlike :func:`shares_memory`,
    two disjoint slices of one buffer do not count."""
    if not shares_memory(a, b):
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + (max_offset(b) + 1) * b.element_size() and b0 < a0 + (max_offset(a) + 1) * a.element_size()


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements in the same order (one pointer, shape and strides):
    an elementwise kernel can read and write such an out= in place, a shifted view it cannot."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two of t's indices may name one element (a stride-0 expand, an as_strided window):
    conservative, the dims sorted by stride must each step past all the smaller dims' span."""
    span = 0
    for stride, size in sorted((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def max_offset(t: torch.Tensor, start_dim: int = 0) -> int:
    """The largest element offset t's dims from ``start_dim`` on reach from its first element: a
    kernel that indexes them in 32-bit integers needs it below 2**31 (see :func:`fits_int32`)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[start_dim:], t.stride()[start_dim:]) if n > 0)


def fits_int32(t: torch.Tensor, start_dim: int = 0) -> bool:
    """Whether :func:`max_offset` of t is below 2**31. Fast for the usual case, a storage under
    2 GiB, whose elements no view can span 2**31 of (this runs on every dispatch; dynamo cannot
    trace the storage, so under torch.compile the offset is computed)."""
    if not torch.compiler.is_compiling() and t.untyped_storage().nbytes() < 2**31:
        return True
    return max_offset(t, start_dim) < 2**31


def transform_problem(*tensors: torch.Tensor | None) -> str | None:
    """Why a hand-launched kernel cannot take ``tensors``, or None. It reads and writes their memory
    through raw pointers, which a torch.func transform's wrappers (``grad``, ``vmap``, ``jvp``) and
    a fake tensor (``FakeTensorMode``) do not have, and it records no forward-mode derivative: a
    dual tensor's tangent (``torch.autograd.forward_ad``) would be dropped without a word. The
    built-in Triton checks start here (their reference runs instead under the default). While
    ``torch.compile`` traces, nothing is refused: Dynamo traces the kernels as ``torch.ops.sdlab``
    ops, which serve ``grad(compile(f))``; ``compile(grad(f))`` fails there (README)."""
    if torch.compiler.is_compiling():
        return None
    duals = _forward_ad._current_level >= 0  # inside a forward_ad.dual_level(): ~free to ask otherwise
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return ("an input is wrapped by a torch.func transform (grad, vmap, jvp, functionalize); the kernel "
                    "reads raw memory and has no batching or forward-mode rule (the reference has)")
        if isinstance(t, _FakeTensor):
            return "an input is a fake tensor (FakeTensorMode): it has no memory for the kernel to read"
        if duals and _forward_ad.unpack_dual(t).tangent is not None:
            return ("an input carries a forward-mode tangent (torch.autograd.forward_ad); the kernel has no jvp, "
                    "so the tangent would be dropped")
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch autocast runs its lower-precision ops (matmul, SDPA) in on ``device_type``
    ("cuda", "cpu"), or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_dtypes(*tensors: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes a lower-precision op sees ``tensors`` in: autocast (when on for their device)
    casts each floating tensor other than fp64 to its dtype and leaves the rest."""
    dt = autocast_dtype(tensors[0].device.type)
    return tuple(dt if dt is not None and t.is_floating_point() and t.dtype != torch.float64 else t.dtype
                 for t in tensors)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast as autocast hands them to a lower-precision op (:func:`autocast_dtypes`). A
    Triton backend standing in for such ops (attention for matmul / SDPA) applies it, so that under
    autocast its output dtype and rounding are its reference's. Without autocast, or where a dtype
    already matches, the tensor itself (no ``.to`` call: this is on every eager call's path)."""
    if autocast_dtype(tensors[0].device.type) is None:
        return tensors
    return tuple(t if t.dtype == dt else t.to(dt) for t, dt in zip(tensors, autocast_dtypes(*tensors)))


def triton_device_problem(device: torch.device) -> str | None:
    """Why no built-in Triton backend can run on ``device`` whatever the input, or None (each
    backend's check starts here; :func:`describe` says it of an explicit choice)."""
    if why := triton_available():
        return why
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return (f"input on {device.type}; the Triton kernels need CUDA (or CPU with TRITON_INTERPRET=1 set "
                "before importing kernels)")
    return None


def _default(op: str, device: torch.device | None) -> tuple[Backend | None, str]:
    """Never a research backend: those run only when chosen. None for an op registered with
    research backends alone (no reference to fall back to)."""
    impls = _impls(op)
    if Backend.REFERENCE not in impls:
        return None, (f"no default: {op!r} has no reference backend; choose one of {', '.join(backends(op))} "
                      f"(kernels.use({op}=...), set_backend or SDLAB_KERNELS)")
    if Backend.TRITON not in impls:
        return Backend.REFERENCE, "default (no triton backend)"
    if device is None or device.type != "cuda":
        return Backend.REFERENCE, f"default (input on {'no device' if device is None else device.type})"
    why = triton_available()
    if why:
        return Backend.REFERENCE, f"default ({why})"
    return Backend.TRITON, "default (CUDA input, triton imports)"


def resolve(op: str, *args, **kwargs) -> tuple[BackendName, str]:
    """The backend that would run ``op(*args, **kwargs)`` now, and why (a query: it warns of no
    fallback, and leaves the one-time warning to the call that falls back)."""
    return _resolve(op, args, kwargs, None)


def _resolve(op: str, args: tuple, kwargs: dict, stacklevel: int | None) -> tuple[BackendName, str]:
    """:func:`resolve`; a fallback warning points ``stacklevel`` frames up (at the user's call),
    or is not given when ``stacklevel`` is None."""
    impls = _impls(op)
    chosen, source = _choice(op)
    if type(chosen) is Chain:
        return _first_taker(op, impls, chosen, source, args, kwargs, stacklevel)
    if chosen is not None:
        impl = impls.get(chosen)
        reason = impl.check(*args, **kwargs) if impl is not None and impl.check else None
        if reason:
            raise BackendUnsupported(f"{op}: backend {str(chosen)!r} (from {source}) cannot run this input: {reason}")
        return chosen, source
    x = _first_tensor(args, kwargs)
    backend, source = _default(op, None if x is None else x.device)
    if backend is None:
        raise ValueError(f"{op}: {source}")
    impl = impls[backend]
    reason = impl.check(*args, **kwargs) if impl.check else None
    if reason:
        kind = (op, _reason_kind(reason))
        if stacklevel is not None and kind not in _WARNED and not torch.compiler.is_compiling():
            warnings.warn(f"{op}: default backend {backend.value!r} cannot run this input ({reason}); "
                          f"falling back to 'reference'", RuntimeWarning, stacklevel=stacklevel)
            _WARNED.add(kind)  # once given: under -W error it raised, and the next call must raise too
        return Backend.REFERENCE, f"{source}, fell back: {reason}"
    return backend, source


def _first_taker(op: str, impls: dict, chain: Chain, source: str, args: tuple, kwargs: dict,
                 stacklevel: int | None) -> tuple[BackendName, str]:
    """The first backend of ``chain`` whose check takes the input; each one refused before it warns
    once per (op, that backend, kind of reason). Every one refusing raises BackendUnsupported."""
    refused = []
    for b in chain:
        impl = impls.get(b)  # None: compile (of the reference, which takes every input), or unregistered since
        if impl is None and b is not Backend.COMPILE:
            raise ValueError(f"{op}: the fallback chain {str(chain)!r} (from {source}) names {str(b)!r}, which is no "
                             f"longer registered; valid: {', '.join(backends(op))}")
        reason = impl.check(*args, **kwargs) if impl is not None and impl.check else None
        if not reason:
            break
        refused.append((b, reason))
    else:
        raise BackendUnsupported(f"{op}: no backend of the fallback chain {str(chain)!r} (from {source}) can run "
                                 "this input: " + "; ".join(f"{str(b)!r}: {r}" for b, r in refused))
    if not refused:
        return b, source
    for r, reason in refused:
        kind = (op, _reason_kind(reason), str(r))
        if stacklevel is not None and kind not in _WARNED and not torch.compiler.is_compiling():
            warnings.warn(f"{op}: backend {str(r)!r} of the fallback chain {str(chain)!r} (from {source}) cannot "
                          f"run this input ({reason}); running {str(b)!r}", RuntimeWarning, stacklevel=stacklevel + 1)
            _WARNED.add(kind)
    return b, f"{source}, fell back along the chain: " + "; ".join(f"{str(r)!r}: {why}" for r, why in refused)


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?")  # not the digits of a name (float16)


def _reason_kind(reason: str) -> str:
    """A fallback reason with its numbers masked ("scale -1.0 is not > 0" -> "scale # is not > #"):
    the key that keeps one limit hit at many values to one warning."""
    return _NUMBER.sub("#", reason)


def implementation(op: str, backend: BackendName) -> Callable:
    """The function registered for (op, backend); ``compile`` is built lazily from the reference."""
    fn = _FNS.get((op, backend))
    if fn is not None:
        return fn
    backend = _validate(op, backend)
    impls = _impls(op)
    if backend in impls:
        fn = impls[backend].fn
    elif backend is Backend.COMPILE:
        ref = impls[Backend.REFERENCE]
        fn = torch.compile(ref.fn, dynamic=ref.compile_dynamic)
    else:
        raise ValueError(f"op {op!r} has no {str(backend)!r} backend")
    if not torch.compiler.is_compiling():  # a memo write while tracing is a side effect dynamo replays
        _FNS[(op, backend)] = fn
    return fn


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on the backend :func:`resolve` picks (a few microseconds of host time). Under
    ``torch.profiler`` each eager call is a range named ``sdlab.<op>[<backend>]`` (PROFILER_RANGE),
    which holds the kernels it launched: ``bench.breakdown`` reads them."""
    backend, _ = _resolve(op, args, kwargs, 4)  # _resolve < dispatch < kernels.<op> < the caller
    fn = implementation(op, backend)
    if torch.compiler.is_compiling():  # counts and ranges are of calls that run, not of tracing
        return fn(*args, **kwargs)
    try:
        return counted(op, backend, fn, *args, **kwargs)
    except LaunchUnsupported as e:  # the default's kernel does not fit this device: the reference runs
        if _choice(op)[0] is not None or backend == Backend.REFERENCE:
            raise
        _COUNTS[(op, backend)] -= 1  # counted before it ran: the call is the reference's
        warn_launch_fallback(op, backend, e, stacklevel=4)
        return counted(op, Backend.REFERENCE, implementation(op, Backend.REFERENCE), *args, **kwargs)


def warn_launch_fallback(op: str, backend: BackendName, e: LaunchUnsupported, stacklevel: int, what: str = "") -> None:
    """The one warning for a default backend's kernel that cannot launch on this device, once per
    op and limit (``what``: the part that falls back, e.g. "backward")."""
    key = (op, "launch", str(e))
    if key not in _WARNED:
        warnings.warn(f"{op}: default backend {str(backend)!r} cannot launch here ({e}); falling back to "
                      f"'reference'{what}", RuntimeWarning, stacklevel=stacklevel)
        _WARNED.add(key)


def counted(op: str, backend: BackendName, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` counted as a call of ``op`` on ``backend`` and, under the profiler,
    inside its ``sdlab.<op>[<backend>]`` range: what :func:`dispatch` does for an eager call, and
    what the Triton backends' ops do when a compiled graph runs them (``torch.ops.sdlab.*``)."""
    _COUNTS[(op, backend)] += 1  # Backend is a str enum: the key equals (op, "triton")
    if torch.autograd._profiler_enabled():  # ~35 ns when off
        with _profiler_range(PROFILER_RANGE.format(op=op, backend=str(backend))):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


# torch.ops.sdlab.<name> -> the Library fragment holding its definition and kernels: one per op,
# so that unloading the plugin that defined an op drops it from torch (Library._destroy)
_DEFINED: dict[str, torch.library.Library] = {}


def define_op(name: str, schema: str, impl: Callable, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None, *, replace: bool = False) -> None:
    """Define ``torch.ops.sdlab.<name>``, an op a Triton backend calls while torch.compile traces it:
    ``schema`` (what follows the name), ``impl`` for CPU and CUDA tensors, ``fake`` (its shape
    function) and, optionally, its autograd formula (``torch.library.register_autograd``'s). Made
    with torch.library's ``Library`` rather than ``custom_op``, whose wrappers around each call (a
    check that no output aliases an input, a frame that turns dynamo off) cost more host time than
    the launches they wrap (``python -m bench.host``); a compiled graph calls the op on every run.
    An op a plugin defines goes with it (:func:`unload_plugin`, ``load_plugin(reload=True)``).
    ``replace=True`` drops an earlier definition of ``name`` first, for a module imported again
    (as ``register(..., replace=True)`` replaces its backend)."""
    if name in _DEFINED and replace:
        _undefine([name])
    if name in _DEFINED:
        raise ValueError(f"define_op: torch.ops.sdlab.{name} is already defined; a plugin that defines it "
                         "reloads with load_plugin(path, reload=True), which drops the old definition first")
    lib = torch.library.Library("sdlab", "FRAGMENT")
    try:
        lib.define(name + schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, impl, key)
        torch.library.register_fake(f"sdlab::{name}", fake, lib=lib)
        if backward is not None:
            torch.library.register_autograd(f"sdlab::{name}", backward, setup_context=setup_context, lib=lib)
    except BaseException:  # a bad schema or formula leaves no half-defined op behind
        lib._destroy()
        raise
    _DEFINED[name] = lib


def _undefine(names) -> None:
    """Drop the torch.ops.sdlab ops ``names`` that :func:`define_op` made (a compiled function
    that called one should be compiled again: ``torch._dynamo.reset()``)."""
    for name in names:
        _DEFINED.pop(name)._destroy()


class use(contextlib.ContextDecorator):
    """Scope a backend choice: ``with use("triton"):`` for all ops, ``use(attention="sdpa")`` per op;
    also a function decorator. The names are checked when the object is made; it may be entered
    again (and nested in itself), as torch's ``no_grad()`` can. The scope is process-wide, not per
    thread or asyncio task (module docstring). One object's exits undo its entries last-in first-out:
    threads that share one ``with`` object should make their own (a decorated function does, per call)."""

    def __init__(self, backend: BackendName | None = None, /, **per_op: BackendName):
        cleared = [op for op, b in per_op.items() if b is None]
        if cleared:
            raise ValueError(f"kernels.use({cleared[0]}=None): name a backend (set_backend({cleared[0]}=None) clears)")
        self.choice = _choices(backend, per_op)
        self._entered: list[dict] = []  # one entry per open `with`, innermost last

    def _recreate_cm(self) -> "use":  # ContextDecorator: each decorated call enters a fresh copy
        fresh = object.__new__(use)
        fresh.choice, fresh._entered = self.choice, []
        return fresh

    def __enter__(self) -> None:
        scope = dict(self.choice)  # a fresh object per entry: __exit__ removes exactly its own
        self._entered.append(scope)
        _SCOPES.append(scope)

    def __exit__(self, *exc) -> None:
        scope = self._entered.pop()
        for i in range(len(_SCOPES) - 1, -1, -1):  # wherever it is now (threads may interleave scopes)
            if _SCOPES[i] is scope:
                del _SCOPES[i]
                break


def _choices(backend: BackendName | None, per_op: dict) -> dict[str, BackendName | None]:
    """Validate a use() / set_backend() request whole before anything changes: {op: backend}
    (None: clear, for set_backend)."""
    choice: dict[str, BackendName | None] = {}
    if backend is not None:
        b = _backend(backend)
        choice.update({op: b for op in ops() if str(b) in backends(op)})
        if not choice:
            raise ValueError(f"no op has a {str(b)!r} backend")
    for op, b in per_op.items():
        _impls(op)
        choice[op] = None if b is None else _validate(op, b)
    return choice


def set_backend(backend: BackendName | None = None, /, **per_op: BackendName | None) -> None:
    """Process-wide choice; ``None`` clears (back to env var / default). All or nothing: an
    invalid name changes no op."""
    if backend is None and not per_op:
        _GLOBAL.clear()
        return
    for op, b in _choices(backend, per_op).items():
        if b is None:
            _GLOBAL.pop(op, None)
        else:
            _GLOBAL[op] = b


def describe(device: str | int | torch.device | torch.Tensor | None = None) -> str:
    """What each op resolves to for an input on ``device`` (default: cuda if present; an int: that
    CUDA device; a tensor: its device) and why."""
    try:
        if isinstance(device, torch.Tensor):  # its printout in the error below said nothing of use
            device = device.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(device, int) and not isinstance(device, bool):  # an index, as torch.device(0)
            device = f"cuda:{device}"  # named, so it is described on a machine without CUDA too
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"describe: device {device!r}: {e} (devices: cpu, cuda, cuda:1, ...)") from None
    lines = []
    for op in ops():
        chosen, source = _choice(op)
        if chosen is None:
            chosen, source = _default(op, device)
            chosen = "none" if chosen is None else chosen
        elif chosen == Backend.TRITON and (why := triton_device_problem(device)):
            source += f"; cannot run here: {why}"  # every call there raises BackendUnsupported
        lines.append(f"{op:16s} -> {str(chosen):9s} ({source}); backends: {', '.join(backends(op))}")
    from . import _launch  # (imports this module)

    lines.append(f"triton launches: {_launch.mode()} (kernels/_launch.py)")
    return "\n".join(lines)


def load_plugin(spec: str, reload: bool = False) -> dict[str, list[str]]:
    """Import ``spec``, a module name (``my_kernels.attention``) or a ``.py`` file, for the research
    backends it registers; returns {op: [backends]} that it registered or replaced (and that are
    still as it left them).
    It is imported once per module name or file path (a file as module ``sdlab_plugin_<stem>_<hash>``):
    naming it again returns the same backends and re-registers nothing; ``reload=True`` unloads it
    first (:func:`unload_plugin`) and imports it afresh, e.g. after editing the file."""
    name, path = _plugin_module(spec)
    if reload:
        if name in sys.modules and name not in _PLUGINS:
            raise ValueError(f"plugin {spec}: its module {name!r} was imported before, not by load_plugin, so what it "
                             "registered and replaced is not known and reload=True cannot undo it; load it with "
                             "load_plugin from the start, or restart the process")
        unload_plugin(spec)
    if name not in _PLUGINS:
        imported_here = name not in sys.modules
        registry = {op: dict(impls) for op, impls in _OPS.items()}
        plugins, defined = set(_PLUGINS), set(_DEFINED)
        try:
            _import_plugin(spec, name, path)
        except BaseException:  # keep no half of a plugin, nor the plugins it loaded: all goes back as it was
            _OPS.clear()
            _OPS.update(registry)
            for nested in set(_PLUGINS) - plugins:
                del _PLUGINS[nested]
                _PLUGIN_OPS.pop(nested, None)
                sys.modules.pop(nested, None)
            _undefine(set(_DEFINED) - defined)
            _registry_changed()
            raise
        # torch ops it defined (those of plugins it loaded are theirs)
        _PLUGIN_OPS[name] = set(_DEFINED) - defined - {n for p in set(_PLUGINS) - plugins
                                                         for n in _PLUGIN_OPS.get(p, ())}
        if imported_here:  # what the import added or replaced, and what it replaced
            _PLUGINS[name] = {(op, b): (registry.get(op, {}).get(b), impl) for op, impls in _OPS.items()
                              for b, impl in impls.items() if registry.get(op, {}).get(b) is not impl}
        else:  # imported before, elsewhere: its backends are the functions it defines
            _PLUGINS[name] = {(op, b): (_UNKNOWN, impl) for op, impls in _OPS.items() for b, impl in impls.items()
                              if impl.fn.__module__ == name}
    found: dict[str, list[str]] = {}
    for (op, b), (_, installed) in _PLUGINS[name].items():
        if _OPS.get(op, {}).get(b) is installed:  # still registered as the plugin left it
            found.setdefault(op, []).append(str(b))
    return found


def plugin_error(spec: str, e: BaseException) -> str:
    """One line for a command line: plugin ``spec``, what loading it raised, and the line that
    raised it (its own file's, where it is one), in place of a traceback through importlib."""
    text = str(e)
    own = text.startswith((f"plugin {spec}:", f"plugin {spec!r}:"))  # load_plugin's: no such file, no such module
    if own and isinstance(e, (FileNotFoundError, ModuleNotFoundError)):
        return text
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}:{e.lineno}"
    else:
        path = Path(spec).resolve() if spec.endswith(".py") else None
        frames = traceback.extract_tb(e.__traceback__)
        frame = ([f for f in frames if path is not None and Path(f.filename) == path] or frames or [None])[-1]
        where = f"{frame.filename}:{frame.lineno}" if frame is not None else "?"
    return f"plugin {spec}: loading it raised {type(e).__name__}: {text} (at {where})"


def unload_plugin(spec: str) -> None:
    """Undo what ``spec`` registered and forget its module, so loading it again imports it afresh:
    a backend it added goes, one it replaced (``replace=True``, a built-in's included) gets its
    earlier implementation back, unless something replaced it again since; torch ops it defined
    with :func:`define_op` are dropped. Nothing happens for a plugin that was never loaded (its
    module, if imported otherwise, stays)."""
    name, _ = _plugin_module(spec, must_exist=False)  # a file deleted since: its backends still go
    if name not in _PLUGINS:
        return
    _undefine(_PLUGIN_OPS.pop(name, ()))
    for (op, b), (previous, installed) in _PLUGINS.pop(name).items():
        if _OPS.get(op, {}).get(b) is not installed:
            continue
        if previous is None or (previous is _UNKNOWN and not isinstance(b, Backend)):
            del _OPS[op][b]
            if not _OPS[op]:  # an op that the plugin's backends alone had goes with the last
                del _OPS[op]
        elif previous is not _UNKNOWN:
            _OPS[op][b] = previous
        else:
            warnings.warn(f"unload_plugin({spec!r}): {op}'s {str(b)!r} backend is the plugin's, registered before "
                          "load_plugin saw the module, and what it replaced is unknown: it stays", stacklevel=2)
    _registry_changed()
    sys.modules.pop(name, None)


def _plugin_module(spec: str, must_exist: bool = True) -> tuple[str, Path | None]:
    """(module name, file path or None) of a plugin spec; a file that is gone is an error unless
    ``must_exist`` is False (unloading what it registered needs only its name)."""
    if not spec.endswith(".py"):
        return spec, None
    path = Path(spec).resolve()
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"plugin {spec}: no such file")
    # the path's hash keeps two plugins of one file name in different folders apart
    return f"sdlab_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}", path


def _import_plugin(spec: str, name: str, path: Path | None) -> None:
    if path is not None:
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is None or not spec.startswith(e.name):  # a module the plugin imports is missing
            raise
        raise ModuleNotFoundError(f"plugin {spec!r}: no module {e.name!r} on sys.path (a file? give its "
                                  f"path, ending in .py)", name=e.name) from None


def counts() -> dict[tuple[str, str], int]:
    """Calls so far per (op, backend): eager dispatches, and the Triton backends' runs inside
    compiled graphs (their ``torch.ops.sdlab`` ops count when they run, not when traced)."""
    return {(op, str(b)): n for (op, b), n in _COUNTS.items()}


def reset_counts() -> None:
    _COUNTS.clear()
