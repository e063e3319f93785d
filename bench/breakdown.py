"""Where a call's time goes, op by op: the switch's ops against the torch work around them.

Under ``torch.profiler`` every call dispatched through :mod:`kernels` is a range named
``sdlab.<op>[<backend>]`` (:data:`kernels.PROFILER_RANGE`). :func:`op_breakdown` profiles a callable
and gives each event's self time to the outermost such range above it, or, outside every range, to
the category of the outermost torch op above it that has one (convolutions, matmuls, torch's own
attention and norms), else to ``other``. On a CUDA device the time is the kernels' device time (a range holds the
Triton kernels it launched and the aten ops' kernels under it); on a CPU, the ops' self CPU time.

    from bench.breakdown import op_breakdown, render
    b = op_breakdown(lambda: unet(x, t, ctx), torch.device("cuda"), runs=3)
    print(render({"triton": b}))

The parts sum to the kernels' durations (the CPU ops' time), which is a step's time only when nothing
waits for the host and no two kernels overlap (streams): in a host-bound eager step the gaps between
kernels are in no part, and ``wall_ms`` (the profiled call's own time, profiler overhead included)
shows how large they are. The ranges are function-scope events, as Inductor's around its Triton
launches, so the profiler links a Triton kernel launched directly inside one to it; a kernel linked
to no CPU event still counts, as ``unlinked kernels``.
Calls the switch does not see are not ranges: a ``torch.compile``d graph (its fused kernels land in
``other``) or a CUDA graph replay (one launch).
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType

import kernels

from .common import synchronize

_RANGE = re.compile(r"sdlab\.(?P<op>[^][]+)\[(?P<backend>[^][]+)\]$")  # kernels.PROFILER_RANGE

# Time outside the switch's ranges: the outermost torch op above it that one of these prefixes names.
TORCH_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conv", ("aten::conv", "aten::_conv", "aten::cudnn_conv", "aten::mkldnn_conv", "aten::slow_conv",
              "aten::thnn_conv", "aten::_convolution")),
    ("matmul", ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                "aten::einsum", "aten::_addmm")),
    ("torch attention", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product",
                         "aten::_flash_attention", "aten::_efficient_attention")),
    ("torch norm", ("aten::group_norm", "aten::native_group_norm", "aten::layer_norm",
                    "aten::native_layer_norm")),
)
OTHER = "other"
UNLINKED = "unlinked kernels"


@dataclass
class Breakdown:
    """One call's time per part, averaged over ``runs`` profiled calls."""

    basis: str  # "device" (kernel time on a CUDA device) or "cpu" (self CPU time of the ops)
    runs: int
    ms: dict[str, float] = field(default_factory=dict)  # part -> ms per call
    calls: dict[str, float] = field(default_factory=dict)  # part (but other) -> its outermost calls per call
    backends: dict[str, list[str]] = field(default_factory=dict)  # switched op -> backends seen
    wall_ms: float | None = None

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())

    def as_dict(self) -> dict:
        return dict(basis=self.basis, runs=self.runs, ms=self.ms, calls=self.calls, backends=self.backends,
                    total_ms=self.total_ms, wall_ms=self.wall_ms)

    @classmethod
    def from_dict(cls, d: dict) -> "Breakdown":
        return cls(**{k: d[k] for k in ("basis", "runs", "ms", "calls", "backends", "wall_ms")})


def torch_category(name: str) -> str:
    """The part a torch op's time goes to when no switched op encloses it."""
    for category, prefixes in TORCH_CATEGORIES:
        if name.startswith(prefixes):
            return category
    return OTHER


def attribute(events: Iterable, basis: str, runs: int = 1) -> Breakdown:
    """Split profiler ``events`` (``prof.events()``) into parts; see the module doc. A CPU event's
    self device time holds the kernels linked to it; a kernel linked to no CPU event (launched
    outside every profiled op) goes to ``UNLINKED`` rather than vanish."""
    if basis not in ("device", "cpu"):
        raise ValueError(f"basis must be 'device' or 'cpu', not {basis!r}")
    attr = "self_device_time_total" if basis == "device" else "self_cpu_time_total"
    out = Breakdown(basis=basis, runs=runs)
    device_us = linked_us = 0.0
    for e in events:
        if e.device_type != DeviceType.CPU:  # a kernel itself, counted where it is linked; or a
            if basis == "device" and not e.is_user_annotation:  # record_function's span on the GPU
                device_us += e.self_device_time_total
            continue
        top, outer, torch_op, node = e, None, None, e
        while node is not None:  # the outermost wins: a switched op calling another is one op
            if _RANGE.match(node.name):
                outer = node
            elif torch_category(node.name) != OTHER:
                torch_op = node
            top, node = node, node.cpu_parent
        if outer is not None:
            m = _RANGE.match(outer.name)
            part = m["op"]
            seen = out.backends.setdefault(part, [])
            if m["backend"] not in seen:
                seen.append(m["backend"])
        else:  # the outermost categorised torch op (aten::linear over aten::mm), else "other"
            outer = torch_op or top
            part = torch_category(outer.name)
        # a user's record_function range holds only its own GPU-side span, if anything: no kernel
        us = 0.0 if basis == "device" and e.is_user_annotation else getattr(e, attr) or 0.0
        linked_us += us
        out.ms[part] = out.ms.get(part, 0.0) + us / 1e3 / runs
        # "other" is many small things, no count worth reading; a switched op called by another
        # (none is today) would count as part of its caller, not as a call of its own
        if e is outer and part != OTHER:
            out.calls[part] = out.calls.get(part, 0.0) + 1 / runs
    if device_us - linked_us > 1e-6 * device_us:
        out.ms[UNLINKED] = (device_us - linked_us) / 1e3 / runs
    return out


def op_breakdown(fn: Callable[[], object], device: torch.device | str, *, runs: int = 3) -> Breakdown:
    """Profile ``runs`` calls of ``fn`` (warm it up first: compiles and first-call work would
    count) on ``device`` ("cuda", torch.device) and split their time into parts, per call."""
    from torch.profiler import ProfilerActivity, profile

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with warnings.catch_warnings():
        # torch 2.11's profiler warns on its first cycle that it "clears events at the end of each
        # cycle"; this is one cycle, so every event is kept (torch 2.13 warns only from a second one)
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                fn()
            synchronize(device)
            wall = (time.perf_counter() - start) * 1e3 / runs
    out = attribute(prof.events(), "device" if cuda else "cpu", runs)
    if cuda and not out.total_ms:
        raise RuntimeError("the profiler recorded no kernel time on the GPU (is CUPTI available to this "
                           "process?); the split would be empty")
    out.wall_ms = wall
    return out


def parts_order(breakdowns: Iterable[Breakdown]) -> list[str]:
    """Columns for a table: the switched ops (as the registry lists them), torch's categories,
    then ``other``; only parts some breakdown has."""
    seen: set[str] = set().union(*(b.ms for b in breakdowns))
    ordered = [op for op in kernels.ops() if op in seen]
    ordered += sorted(seen - set(ordered) - set(dict(TORCH_CATEGORIES)) - {OTHER, UNLINKED})
    ordered += [c for c, _ in TORCH_CATEGORIES if c in seen]
    return ordered + [p for p in (OTHER, UNLINKED) if p in seen]


SECTION = """### Where one step's time goes (--breakdown)

Each variant's step split by the profiler (`bench/breakdown.py`): a switched op's part holds every
kernel launched inside its `sdlab.<op>[<backend>]` range, and the rest goes to the outermost torch
op above it (conv, matmul, torch's own attention and norms, other). `device`: kernel time, ms per
step (share of the attributed sum), which leaves out the gaps where the GPU waits for the host;
`cpu`: the ops' CPU time. Wall ms: a profiled step's own time, profiler overhead included."""


def render(breakdowns: dict[str, Breakdown | dict]) -> str:
    """A markdown table: one row per label (e.g. a UNet-step variant), each part as
    ``ms (share of the attributed total)``; values may be :meth:`Breakdown.as_dict` dicts."""
    breakdowns = {k: b if isinstance(b, Breakdown) else Breakdown.from_dict(b) for k, b in breakdowns.items()}
    if not breakdowns:
        return ""
    parts = parts_order(breakdowns.values())
    head = ["variant", "time", *parts, "attributed ms", "wall ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, b in breakdowns.items():
        total = b.total_ms
        cells = [f"{b.ms[p]:.3g} ({100 * b.ms[p] / total:.0f}%)" if p in b.ms and total else "" for p in parts]
        wall = "" if b.wall_ms is None else f"{b.wall_ms:.3g}"
        lines.append("| " + " | ".join([label, b.basis, *cells, f"{total:.3g}", wall]) + " |")
    return "\n".join(lines)
