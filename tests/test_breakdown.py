"""bench.breakdown: a step's time split by op from the profiler, and the ranges the switch emits."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch.autograd import DeviceType

import kernels
import sdcore
from bench import pipelines as bench_pipelines
from bench.__main__ import main
from bench.breakdown import _RANGE, OTHER, SECTION, UNLINKED, attribute, op_breakdown, render
from kernels import registry


@dataclass(eq=False)
class Ev:
    """The FunctionEvent fields attribute() reads."""

    name: str
    cpu: float = 0.0  # self CPU µs
    dev: float = 0.0  # self device µs (kernels linked to this op)
    parent: "Ev | None" = None
    device_type: DeviceType = DeviceType.CPU
    is_user_annotation: bool = False
    children: list = field(default_factory=list)

    @property
    def cpu_parent(self):
        return self.parent

    @property
    def self_cpu_time_total(self):
        return self.cpu

    @property
    def self_device_time_total(self):
        return self.dev

    def add(self, *kids: "Ev") -> "Ev":
        for k in kids:
            k.parent = self
            self.children.append(k)
        return self


def _walk(*roots):
    for r in roots:
        yield r
        yield from _walk(*r.children)


def _events():
    """Two profiled steps' worth of one of each case (runs=2 halves every figure):
    - a switched op whose Triton kernel is linked to its range (no aten op between);
    - a switched op whose reference calls torch's group_norm, with another switched op inside it
      (the outermost range takes it all: one op, not two);
    - aten::linear over aten::addmm (one matmul call);
    - a user's range over aten::conv2d over the cudnn op (conv: the outermost categorised op);
    - aten::add (other); and kernels, 2 µs of which are linked to no CPU op, and the GPU-side span
      of a user's record_function range (gpu_user_annotation), which is no kernel."""
    roots = [
        Ev("sdlab.attention[triton]", cpu=10, dev=50).add(Ev("aten::empty", cpu=1)),
        Ev("sdlab.group_norm_silu[reference]", cpu=4).add(
            Ev("aten::group_norm", cpu=3).add(Ev("aten::native_group_norm", cpu=2, dev=30)),
            Ev("sdlab.attention[sdpa]", cpu=1, dev=7)),
        Ev("aten::linear", cpu=2).add(Ev("aten::addmm", cpu=3, dev=40)),
        # a user's range: the profiler may hang its GPU-side span on it as if it were a kernel
        Ev("my_block", dev=60, is_user_annotation=True).add(
            Ev("aten::conv2d", cpu=1).add(Ev("aten::cudnn_convolution", cpu=5, dev=60))),
        Ev("aten::add", cpu=1, dev=3),
    ]
    events = list(_walk(*roots))
    kernels_ = [Ev("kernel", dev=d, device_type=DeviceType.CUDA) for d in (50, 30, 7, 40, 60, 3, 2)]
    span = Ev("my_block", dev=60, device_type=DeviceType.CUDA, is_user_annotation=True)
    return events + kernels_ + [span]


def test_attribute_gives_each_event_to_its_outermost_op_on_the_device():
    b = attribute(_events(), "device", runs=2)
    want = {"attention": 25.0, "group_norm_silu": 18.5, "matmul": 20.0, "conv": 30.0, OTHER: 1.5,
            UNLINKED: 1.0}
    got = {k: v * 1e3 for k, v in b.ms.items()}  # ms -> µs
    assert got == pytest.approx(want), f"parts (µs per step) {got}, expected {want}"
    # one call each in two profiled steps is half a call per step; "other" is not counted
    assert b.calls == pytest.approx({"attention": 0.5, "group_norm_silu": 0.5, "matmul": 0.5, "conv": 0.5}), b.calls
    assert b.backends == {"attention": ["triton"], "group_norm_silu": ["reference"]}, b.backends
    assert b.total_ms == pytest.approx(192e-3 / 2)  # every kernel once: linked or not


def test_attribute_on_cpu_counts_self_cpu_time_and_no_kernels():
    b = attribute(_events(), "cpu")
    got = {k: v * 1e3 for k, v in b.ms.items()}
    want = {"attention": 11.0, "group_norm_silu": 10.0, "matmul": 5.0, "conv": 6.0, OTHER: 1.0}
    assert got == pytest.approx(want), f"parts (µs) {got}, expected {want}"


def test_attribute_refuses_an_unknown_basis():
    with pytest.raises(ValueError, match="basis must be 'device' or 'cpu', not 'gpu'"):
        attribute([], "gpu")


def test_range_pattern_reads_the_registrys_range_names():
    m = _RANGE.match(kernels.PROFILER_RANGE.format(op="attention", backend="my_attention"))
    assert m and m["op"] == "attention" and m["backend"] == "my_attention", _RANGE.pattern


def test_dispatch_opens_a_range_only_under_the_profiler(monkeypatch):
    opened = []
    real = registry._profiler_range

    def spy(name, *a, **k):
        opened.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(registry, "_profiler_range", spy)
    x, w = torch.randn(1, 8, 3, 5), torch.ones(8)
    kernels.group_norm_silu(x, w, w, 4)
    assert opened == [], f"a range was opened with no profiler running: {opened}"
    with torch.profiler.profile() as prof, kernels.use(group_norm_silu="triton"):
        kernels.group_norm_silu(x, w, w, 4)
    assert opened == ["sdlab.group_norm_silu[triton]"], opened
    (rng,) = [e for e in prof.events() if e.name == "sdlab.group_norm_silu[triton]"]
    # a function-scope event, which the profiler links kernels to (a user annotation gets none)
    assert not rng.is_user_annotation, "the range is a record_function user annotation"


@pytest.fixture(scope="module")
def tiny_unet():
    sd = sdcore.StableDiffusion.from_preset("tiny", seed=0)
    cfg = sd.config.unet
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.full((2,), 500),
            torch.randn(2, 77, cfg.context_dim, generator=g))
    return sd.unet, args


def test_op_breakdown_of_the_tiny_unet_counts_every_dispatch(tiny_unet):
    unet, args = tiny_unet
    with torch.inference_mode(), kernels.use("reference"):
        unet(*args)
        before = kernels.counts()
        b = op_breakdown(lambda: unet(*args), "cpu", runs=2)  # a device's name, as torch takes it
        after = kernels.counts()
    for op in ("group_norm_silu", "attention"):
        dispatched = (after[(op, "reference")] - before.get((op, "reference"), 0)) / 2
        assert dispatched > 0 and b.calls.get(op) == dispatched, \
            f"{op}: {b.calls.get(op)} ranges per step, {dispatched} dispatches per step"
        assert b.ms[op] > 0, b.ms
    assert {"conv", "matmul"} <= set(b.ms), f"the UNet's convolutions and projections are missing: {b.ms}"
    assert b.basis == "cpu" and b.runs == 2
    assert 0 < b.total_ms <= b.wall_ms * 1.05, f"ops' CPU time {b.total_ms} ms over the wall time {b.wall_ms} ms"


def test_render_shows_each_part_with_its_share():
    b = attribute(_events(), "device", runs=2)
    table = render({"triton": b, "again": b.as_dict()})
    lines = table.splitlines()
    assert lines[0].split(" | ")[2:5] == ["attention", "group_norm_silu", "conv"], lines[0]
    assert "| triton | device | 0.025 (26%) | 0.0185 (19%) |" in table, table
    assert lines[2].split(" | ")[1:] == lines[3].split(" | ")[1:], "a row read back from JSON renders alike"


def test_pipelines_breakdown_writes_the_split_and_its_section(tmp_path):
    rc = main(["pipelines", "--quick", "--no-plot", "--no-progress", "--unet-only", "--variants", "reference",
               "--breakdown", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    (row,) = [r for r in rows if r["backend"] == "reference"]
    split = row["breakdown"]
    assert split and split["basis"] == "cpu" and split["ms"]["group_norm_silu"] > 0, split
    md = (tmp_path / "results.md").read_text()
    assert SECTION.splitlines()[0] in md and "| reference | cpu |" in md, md[-1500:]


def test_without_breakdown_rows_have_none(tmp_path):
    main(["pipelines", "--quick", "--no-plot", "--no-progress", "--unet-only", "--variants", "reference",
          "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(r["breakdown"] is None for r in rows)
    assert SECTION.splitlines()[0] not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("variant", ["compile", "triton@compile", "triton@graph"])
def test_graphs_are_not_split_and_say_why(variant):
    s = {"note": "", "scope": None, "fn": None}
    bench_pipelines._split_step(s, variant, torch.device("cpu"), runs=1)
    assert "breakdown" not in s and "no breakdown: the profiler sees" in s["note"], s


def test_torch_attention_keeps_the_matmuls_and_softmax_under_it():
    """Outside every switched op the outermost categorised torch op takes the time: SDPA's math path
    (its bmm and softmax) is torch attention, not matmul; one call of it."""
    sdpa = Ev("aten::scaled_dot_product_attention", cpu=1).add(
        Ev("aten::_scaled_dot_product_attention_math", cpu=1).add(Ev("aten::bmm", cpu=4), Ev("aten::_softmax", cpu=2),
                                                                 Ev("aten::bmm", cpu=4)))
    b = attribute(list(_walk(sdpa)), "cpu")
    got = {k: v * 1e3 for k, v in b.ms.items()}
    assert got == pytest.approx({"torch attention": 12.0}), f"parts (µs) {got}: the bmm went to another part"
    assert b.calls == pytest.approx({"torch attention": 1.0}), b.calls


def test_kernels_all_linked_leave_no_unlinked_part():
    """Every kernel linked to a CPU op: no `unlinked kernels` part (nor column), not even a 0 one."""
    op = Ev("aten::addmm", cpu=3, dev=40)
    b = attribute([op, Ev("kernel", dev=40, device_type=DeviceType.CUDA)], "device")
    assert b.ms == pytest.approx({"matmul": 40e-3}), b.ms


def test_render_columns_ops_then_other_switched_ops_then_torch_categories_then_the_rest():
    """Columns: the registry's ops in its order, then other ranges (a plugin's op), torch's
    categories in TORCH_CATEGORIES' order, other, unlinked kernels; each once. The wall column is
    the profiled call's own time, and a row read back from JSON keeps it."""
    b = attribute(_events(), "device", runs=2)
    b.ms["my_op"] = 0.004  # a range of an op the registry does not know
    b.wall_ms = 0.5
    table = render({"triton": b, "from json": json.loads(json.dumps(b.as_dict()))})
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    want = ["variant", "time", "attention", "group_norm_silu", "my_op", "conv", "matmul", OTHER, UNLINKED,
            "attributed ms", "wall ms"]
    assert head == want, f"columns {head}, expected {want}"
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-2:] == ["0.1", "0.5"], f"attributed / wall ms {cells[-2:]}, expected 0.1 (sum), 0.5: {line}"


def test_op_breakdown_refuses_fewer_than_one_run():
    with pytest.raises(ValueError, match="runs must be >= 1, got 0"):
        op_breakdown(lambda: None, "cpu", runs=0)


def test_op_breakdown_warns_nothing_about_its_one_profiling_cycle(monkeypatch):
    """torch 2.11 (the H100 machines' release) warns on every first profiling cycle that events are
    cleared at the end of each cycle; op_breakdown profiles one cycle and keeps every event, so a
    --breakdown run prints no such warning. (torch's warn-once set is emptied so that an earlier
    profile in this process cannot hide it.) Only a torch that warns on a first cycle (2.11) can fail
    the first call without the filter; torch 2.13, on CI, warns from a second cycle only, so the
    second call raises that warning itself, in torch 2.11's words, inside the profiled function."""
    import warnings

    from torch.profiler import profiler as torch_profiler

    monkeypatch.setattr(torch_profiler, "_WARNINGS_SHOWN", set(), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = op_breakdown(lambda: torch.ones(8).add_(1), "cpu", runs=1)
        assert b.runs == 1
        op_breakdown(lambda: warnings.warn("Warning: Profiler clears events at the end of each cycle. Only events "
                                           "from the current cycle will be reported.", UserWarning), "cpu", runs=1)
