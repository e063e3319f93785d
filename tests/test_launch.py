"""kernels/_launch.py: launches that skip Triton's per-call dispatch once a launch key has been
through it. On the CPU a fake kernel stands in for Triton's JITFunction (the direct path needs a
CUDA driver), so these tests pin the contract: when a launch goes direct, with exactly the
arguments Triton's own dispatch would pass to the compiled kernel, and when it must not. A
differential run (launch_differential.py) holds every kernel family's direct launches against
Triton's real dispatch, with a fake driver. The GPU test compares both paths' outputs bit for bit."""
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import _launch

STREAM = 0xABC


def fake_kernel(x_ptr, y_ptr, n, scale, BLOCK, EVEN=True):
    """Stands for a @triton.jit function: two pointers, an int, a float, and two constexprs
    (BLOCK passed in meta, EVEN left to its default)."""


class _Param:
    def __init__(self, p: inspect.Parameter):
        self.name, self.default = p.name, p.default


class FakeCompiled:
    function = "cu-function"
    packed_metadata = ("packed",)

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeJIT:
    """Triton's JITFunction as the launcher sees it: fn, params, pre_run_hooks, kernel[grid](...)
    returning the compiled kernel of the call's specialisation."""

    def __init__(self, fn):
        self.fn = fn
        self.params = [_Param(p) for p in inspect.signature(fn).parameters.values()]
        self.pre_run_hooks = []
        self.dispatched = []  # (grid, args, meta) of every launch through "Triton's dispatch"
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.dispatched.append((grid, args, meta))
            return self.compiled
        return launch


@pytest.fixture
def fake(monkeypatch):
    """A Launcher over a FakeJIT installed under fake_kernel's name, direct launches enabled, and a
    driver whose current device the test can change."""
    jit = FakeJIT(fake_kernel)
    monkeypatch.setitem(fake_kernel.__globals__, "fake_kernel", jit)  # where the launcher looks it up
    monkeypatch.setattr(_launch, "ENABLED", True)
    device = [0]
    monkeypatch.setattr(_launch, "_DRIVER", (lambda: device[0], lambda dev: STREAM + dev))
    return _launch.Launcher(jit), jit, device


def call(launcher, x, y, n=7, scale=0.5, grid=(3, 2), block=16):
    meta = {"BLOCK": block, "num_warps": 4}
    launcher(grid, (n, block), (x, y), (x, y, n, scale), meta)


def test_second_launch_goes_direct_with_tritons_arguments(fake):
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    assert len(jit.dispatched) == 1 and jit.compiled.runs == [] and launcher.direct == 0
    assert jit.dispatched[0] == ((3, 2), (x, y, 7, 0.5), {"BLOCK": 16, "num_warps": 4})
    x2, y2 = torch.ones(64), torch.ones(64)  # new tensors, same dtype and alignment; a new float
    call(launcher, x2, y2, scale=0.25)
    assert len(jit.dispatched) == 1, "the second launch went through Triton's dispatch again"
    # what JITFunction.run passes: grid padded to 3, stream, function, metadata, no launch metadata
    # or hooks, then every parameter in signature order (meta's constexprs, then defaults)
    assert jit.compiled.runs == [(3, 2, 1, STREAM, "cu-function", ("packed",), None, None, None,
                                  x2, y2, 7, 0.25, 16, True)], jit.compiled.runs
    assert launcher.direct == 1


@pytest.mark.parametrize("change", ["alignment", "dtype", "key", "device", "none"])
def test_a_different_specialisation_is_dispatched(fake, change):
    """Whatever Triton specialises on (a pointer's dtype and 16-byte alignment, the ints behind
    the caller's key) or the kernel was loaded for (the device) sends the launch to Triton again."""
    launcher, jit, device = fake
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.float16)
    call(launcher, x, y)
    if change == "alignment":
        x = torch.zeros(65, dtype=torch.float16)[1:]  # 2 bytes past a 16-byte boundary
        assert x.data_ptr() % 16 != 0
    elif change == "dtype":
        x = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "device":
        device[0] = 1
    if change == "key":
        call(launcher, x, y, n=8)
    elif change == "none":
        launcher((3, 2), (7, 16), (x, None), (x, None, 7, 0.5), {"BLOCK": 16, "num_warps": 4})
    else:
        call(launcher, x, y)
    assert len(jit.dispatched) == 2 and launcher.direct == 0, change
    if change != "none":  # and that specialisation is kept from then on
        call(launcher, x, y, n=8 if change == "key" else 7)
        assert launcher.direct == 1, change


@pytest.mark.parametrize("why", ["disabled", "pre_run_hook", "launch_hook", "launch_exit_hook", "stages_hook",
                                 "compiling", "swapped", "options"])
def test_tritons_dispatch_whenever_direct_is_unsafe(fake, monkeypatch, why):
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    spy = FakeJIT(jit.fn)
    if why == "options":  # e.g. TRITON_DEBUG set after the first launch: Triton compiles another kernel
        options = _launch._options()
        monkeypatch.setattr(_launch, "_options", lambda: (not options[0], *options[1:]))
    elif why == "disabled":
        monkeypatch.setattr(_launch, "ENABLED", False)
    elif why == "pre_run_hook":
        jit.pre_run_hooks.append(lambda *a, **k: None)
    elif why == "launch_hook":  # a profiler's hook in Triton's chain
        monkeypatch.setattr(_launch._knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
    elif why == "launch_exit_hook":  # the direct call passes no exit hook either
        monkeypatch.setattr(_launch._knobs.runtime.launch_exit_hook, "calls", [lambda metadata: None])
    elif why == "stages_hook":  # Triton 3.9's custom compile stages, part of its own cache key
        monkeypatch.setattr(_launch._knobs.runtime, "add_stages_inspection_hook", lambda *a: None, raising=False)
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:  # a test spy or bench.sm90's offline compile in the kernel's place
        monkeypatch.setitem(jit.fn.__globals__, "fake_kernel", spy)
    call(launcher, x, y)
    assert launcher.direct == 0 and jit.compiled.runs == [], why
    assert len((spy if why == "swapped" else jit).dispatched) == (1 if why == "swapped" else 2), why


def test_nothing_is_kept_from_a_hooked_or_keyless_launch(fake, monkeypatch):
    """A launch made while a profiler hook is set, or with key None (a caller asking for Triton's
    dispatch), goes through Triton and leaves nothing in the cache."""
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    with monkeypatch.context() as m:
        m.setattr(_launch._knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
        call(launcher, x, y)
    launcher((3, 2), None, (x, y), (x, y, 7, 0.5), {"BLOCK": 16, "num_warps": 4})
    launcher((3, 2), None, (x, y), (x, y, 7, 0.5), {"BLOCK": 16, "num_warps": 4})
    assert launcher.cache == {} and launcher.direct == 0 and len(jit.dispatched) == 3


def test_cache_is_bounded(fake, monkeypatch):
    """At most MAX_KEYS launch keys after every launch, not only after the one that empties it."""
    launcher, jit, _ = fake
    monkeypatch.setattr(_launch, "MAX_KEYS", 3)
    x, y = torch.zeros(64), torch.zeros(64)
    for n in range(5):
        call(launcher, x, y, n=n)
        assert len(launcher.cache) <= 3, (n, len(launcher.cache))


def test_tritons_launch_convention_is_the_one_read():
    """The direct call copies the one at the end of JITFunction.run; if a Triton release changes
    it, this fails (and CHECKED must not name that release until _launch.py follows)."""
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if not _launch.CHECKED[0] <= version <= _launch.CHECKED[1]:
        pytest.skip(f"Triton {triton.__version__} is outside {_launch.CHECKED}: direct launches are off")
    src = re.sub(r"\s+", " ", inspect.getsource(JITFunction.run))
    want = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())")
    assert want in src, f"JITFunction.run no longer ends in {want!r}:\n{src[-1500:]}"
    assert "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())" in src
    assert "return kernel" in src


def test_direct_launches_match_tritons_real_dispatch_on_cpu():
    """tests/launch_differential.py: every kernel family's launches, direct and through Triton's
    real JITFunction.run (fake driver and compile step, no GPU), pass the same compiled kernel the
    same arguments; and neither retuning GroupNorm at run time nor switching scheduler_step's terms
    at one latent shape (its FLAGS bitmask) is answered from a stale cache."""
    pytest.importorskip("triton")
    if _launch.IMPORT_ERROR:
        pytest.skip(_launch.IMPORT_ERROR)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _launch.ENV_VAR)}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("launch_differential.py"))], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"launch_differential.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["cases"] >= 30 and result["direct"] >= result["cases"], result
    assert not result["mismatches"], json.dumps(result["mismatches"], indent=1)


@pytest.mark.parametrize("value, off", [("0", True), ("", True), (" 0 ", True), ("false", True), ("OFF", True),
                                        ("no", True), ("1", False), ("true", False), ("Yes", False)])
def test_env_var_turns_direct_launches_off(monkeypatch, value, off):
    """SDLAB_FAST_LAUNCH=0 (false, off, no: TRITON_INTERPRET's words), or set but empty (as a shell's
    `VAR= cmd` leaves it), turns direct launches off by name; 1 leaves the other reasons to decide.
    "false" used to leave them on."""
    monkeypatch.setenv(_launch.ENV_VAR, value)
    # the reason quotes the value as set (an empty one read "=0")
    assert (_launch._unsupported() == f"{_launch.ENV_VAR}={value!r}") is off, _launch._unsupported()


def test_env_var_of_another_value_is_an_error(monkeypatch):
    monkeypatch.setenv(_launch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SDLAB_FAST_LAUNCH='fast': use 0 .* 1 "):
        _launch._unsupported()


@pytest.mark.parametrize("cli", ["pipelines", "bench"])
def test_env_var_of_another_value_is_one_line_from_the_command_lines(cli):
    """Read when kernels is imported, before a parser exists: one error line and exit 2, as a bad
    option gives (it was a 21-line traceback)."""
    env = {**os.environ, _launch.ENV_VAR: "maybe"}
    r = subprocess.run([sys.executable, "-m", cli, "--help"], capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"python -m {cli}: error: SDLAB_FAST_LAUNCH='maybe': use 0 (or false, off, no) to launch every kernel "
        "through Triton's dispatch, 1 (true, on, yes; the default) for direct launches"), (r.returncode, r.stderr)


def test_off_under_the_interpreter():
    """CPU test runs use the interpreter, where there is nothing to launch directly."""
    from kernels.registry import interpreting

    if interpreting():  # or off by the caller's SDLAB_FAST_LAUNCH=0, which names itself first
        off_by_env = os.environ.get(_launch.ENV_VAR, "1").strip().lower() in _launch.OFF
        assert not _launch.ENABLED and _launch.WHY_OFF == (
            f"{_launch.ENV_VAR}={os.environ[_launch.ENV_VAR]!r}" if off_by_env else "TRITON_INTERPRET=1"), _launch.WHY_OFF


@pytest.mark.gpu
def test_direct_launches_match_tritons_dispatch_gpu(monkeypatch):
    """Every op's Triton kernels, direct and through Triton's dispatch: bitwise the same outputs
    (forward, backward), and the second call of each really went direct."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import importlib

    import kernels

    # the modules: `from kernels import attention` would be the op function kernels re-exports
    at, gn, st = (importlib.import_module(f"kernels.{m}") for m in ("attention", "group_norm_silu", "scheduler_step"))

    assert _launch.ENABLED, _launch.WHY_OFF
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float16)  # noqa: E731
    q, k, v = (rand(2, n, 8, 40).transpose(1, 2).requires_grad_() for n in (1024, 77, 77))
    x = rand(2, 320, 32, 32).requires_grad_()
    w, b = rand(320), rand(320)
    x2 = rand(2, 320, 64, 64)  # forced to the two-pass forward (_stats_kernel, _apply_kernel)
    two_pass = gn.launch_config(tuple(x2.shape), 32, x2.dtype, torch.cuda.get_device_properties(0).multi_processor_count,
                                single_pass=False)
    lat, eps = rand(2, 4, 64, 64), rand(2, 4, 64, 64)
    coeffs = st.StepCoefficients(a_x=1.0, a_o=-0.5, b_x=1.0, b_0=-1.0, b_d=0.5, c0=0.4, c1=0.6, c2=0.1)

    def run_all():
        with kernels.use("triton"):
            o = kernels.attention(q, k, v)
            y = kernels.group_norm_silu(x, w, b, 32)
            grads = torch.autograd.grad((o.float().sum() + y.float().sum()), (q, k, v, x))
            step = kernels.scheduler_step(lat, eps, coeffs, model_output_uncond=eps * 0.5, guidance_scale=7.5)
        y2 = gn.group_norm_silu_triton(x2, w, b, 32, config=two_pass)
        with torch.no_grad():
            o2 = at.attention_triton(q, k, v, config=at.AttentionConfig(64, 64, 4, 3, q_blocks=4))  # K/V-resident
        torch.cuda.synchronize()
        return (o, y, *grads, step[0], y2, o2)

    monkeypatch.setattr(_launch, "ENABLED", False)
    want = run_all()
    monkeypatch.setattr(_launch, "ENABLED", True)
    # (2, 320, 32, 32): groups of 10 x 1024 elements take the one-launch forward
    launchers = [at._FWD, at._FWD_RESIDENT, at._DKDV, at._DQ, gn._FUSED, gn._STATS, gn._APPLY, gn._BWD_REDUCE,
                 gn._BWD_DX, st._STEP]
    for launcher in launchers:
        launcher.clear()
    run_all()  # through Triton's dispatch, which fills the caches
    before = [launcher.direct for launcher in launchers]
    got = run_all()
    for launcher, n in zip(launchers, before):
        assert launcher.direct > n, f"{launcher.name} did not launch directly"
    for name, a, b_ in zip(("o", "y", "dq", "dk", "dv", "dx", "prev", "y two-pass", "o resident"), want, got):
        assert torch.equal(a, b_), f"{name}: direct launch differs from Triton's dispatch by {(a - b_).abs().max()}"


# ------------------------------------------------------------------ found by mutation testing
# Each test below failed against a small plausible edit of kernels/_launch.py that every test above
# let through (see the docstrings); they run on the CPU in well under a second each (one subprocess).
def test_mode_reports_how_kernels_launch(monkeypatch):
    """bench rows and describe() print mode(): it follows ENABLED (bench sets it False to time
    Triton's own dispatch), not only why direct launches were off at import."""
    monkeypatch.setattr(_launch, "WHY_OFF", None)
    monkeypatch.setattr(_launch, "ENABLED", True)
    assert _launch.mode() == "direct once compiled", _launch.mode()
    monkeypatch.setattr(_launch, "ENABLED", False)  # off by hand, with nothing against it
    assert _launch.mode() == "Triton's dispatch (ENABLED set False)", _launch.mode()
    monkeypatch.setattr(_launch, "WHY_OFF", "TRITON_INTERPRET=1")
    assert _launch.mode() == "Triton's dispatch (TRITON_INTERPRET=1)", _launch.mode()


@pytest.mark.parametrize("version, has_knobs, on", [
    ("3.6.0", True, True), ("3.9.1", True, True), ("3.6.0+git8a1b2c3", True, True),  # a source build
    ("3.7.0", True, False), ("3.10.0", True, False), ("4.6.0", True, False), ("3.5.1", True, False),
    ("3.6rc1", True, False),  # unparsable (minor "6rc1"): off, not an error importing kernels
    ("3.9.0", False, False),  # no knobs module: direct launches stay off
])
def test_direct_launches_only_on_the_triton_releases_read(monkeypatch, version, has_knobs, on):
    """CHECKED names the releases whose launch convention _launch.py copies (3.6 and 3.9, not the
    range between); the major and minor both count. The other reasons are taken out of the way:
    no env var, no interpreter, Triton imports."""
    monkeypatch.delenv(_launch.ENV_VAR, raising=False)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "IMPORT_ERROR", None)
    monkeypatch.setattr(_launch, "triton", type("FakeTriton", (), {"__version__": version})())
    monkeypatch.setattr(_launch, "_knobs", object() if has_knobs else None)
    why = _launch._unsupported()
    want = None if on else f"Triton {version}: direct launches are checked for 3.6, 3.9 only"
    assert why == want, (version, has_knobs, why)


def test_kernels_import_when_importing_triton_raises_something_else(tmp_path):
    """A broken Triton install can raise other than ImportError on import (a RuntimeError for a
    missing CUDA library): _triton.py takes any exception as "Triton does not import", and so must
    everything after it. _launch.py's own `from triton import knobs` caught ImportError only, so
    `import kernels` raised there. Run without TRITON_INTERPRET, so that the version check would be
    reached if the import error were not taken first."""
    code = """
import sys
class BrokenTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise RuntimeError("libcuda.so.1: cannot open shared object file")
sys.meta_path.insert(0, BrokenTriton())
import torch, kernels
from kernels import _launch, registry
why = registry.triton_available()
assert why == "triton does not import (RuntimeError: libcuda.so.1: cannot open shared object file)", why
assert _launch.WHY_OFF == why and not _launch.ENABLED and not registry.interpreting(), (_launch.WHY_OFF, _launch.ENABLED)
last = kernels.describe("cuda").splitlines()[-1]
assert last == f"triton launches: Triton's dispatch ({why}) (kernels/_launch.py)", last
q = torch.randn(1, 2, 7, 16)
assert torch.equal(kernels.attention(q, q, q), kernels.attention_reference(q, q, q))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _launch.ENV_VAR)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("offset", [2, 4, 8])
def test_a_pointer_any_bytes_off_16_is_another_specialisation(fake, offset):
    """Triton specialises a pointer on 16-byte alignment: one 8 bytes past a 16-byte boundary is
    aligned to 8, but must not be answered with the kernel compiled for an aligned one (it may use
    16-byte vector loads). fp16 views shifted by offset / 2 elements of an aligned buffer."""
    launcher, jit, _ = fake
    base = torch.zeros(64 + 8, dtype=torch.float16)
    y = torch.zeros(64, dtype=torch.float16)
    assert base.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0, "torch's allocations are 16-byte aligned"
    x = base[offset // 2:][:64]
    assert x.data_ptr() % 16 == offset, (x.data_ptr() % 16, offset)
    call(launcher, base[:64], y)
    call(launcher, x, y)
    assert len(jit.dispatched) == 2 and launcher.direct == 0, (offset, len(jit.dispatched), launcher.direct)


@pytest.mark.parametrize("grid, padded", [((5,), (5, 1, 1)), ((3, 2), (3, 2, 1)), ((3, 2, 4), (3, 2, 4))])
def test_a_grid_of_one_to_three_dims_is_launched_whole(fake, grid, padded):
    """JITFunction.run pads a grid to 3 dims with 1s; a 3-D grid's last dim must reach the kernel
    (no kernel here launches one yet: a 1-D and a 2-D one do)."""
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y, grid=grid)
    call(launcher, x, y, grid=grid)
    assert launcher.direct == 1 and jit.compiled.runs[0][:3] == padded, (grid, jit.compiled.runs)


def test_a_direct_launch_uses_the_current_devices_stream(fake):
    """On a second GPU the launch goes to that device's current stream, not device 0's."""
    launcher, jit, device = fake
    device[0] = 1
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    call(launcher, x, y)
    assert launcher.direct == 1 and jit.compiled.runs[0][3] == STREAM + 1, (hex(STREAM + 1), jit.compiled.runs)


class _OnSecondGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (the only part of a tensor the guard reads)."""

    def get_device(self):
        return 1


def test_a_launch_on_another_gpus_tensors_runs_on_that_gpu(fake, monkeypatch):
    """Triton launches on the current device, where torch's ops follow their tensors: with device 0
    current and the data on cuda:1, both Triton's dispatch and the direct launch run under
    torch.cuda.device(1), on device 1's stream (device 0's kernel would read another GPU's memory)."""
    launcher, jit, device = fake
    seen = []

    class Guard:  # torch.cuda.device, on a machine without CUDA
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.before, device[0] = device[0], self.index
            seen.append(self.index)

        def __exit__(self, *exc):
            device[0] = self.before

    monkeypatch.setattr(torch.cuda, "device", Guard)
    x, y = (torch.zeros(64).as_subclass(_OnSecondGPU) for _ in range(2))
    call(launcher, x, y)
    call(launcher, x, y)
    assert seen == [1, 1] and device[0] == 0, seen
    assert launcher.direct == 1 and jit.compiled.runs[0][3] == STREAM + 1, jit.compiled.runs
    call(launcher, torch.zeros(64), torch.zeros(64))  # CPU tensors (-1): no guard
    assert seen == [1, 1]
    launcher((3, 2), (7, 16), (None, y), (x, y, 7, 0.5), {"BLOCK": 16, "num_warps": 4})  # an optional one first
    assert seen == [1, 1, 1]


def test_a_kernel_too_big_for_the_device_is_a_launch_unsupported_error(fake):
    """Triton's OutOfResources at a first launch (a table row tuned for the H100's 227 KB of shared
    memory, on a GPU with 99 KB) becomes LaunchUnsupported, naming the kernel, its launch meta, the
    need and the limit, and what to do: the switch then falls back under the default choice."""
    from triton.runtime.errors import OutOfResources

    from kernels.registry import LaunchUnsupported

    launcher, jit, _ = fake

    def no_room(grid):
        def launch(*args, **meta):
            raise OutOfResources(102400, 101376, "shared memory")
        return launch

    jit.__class__ = type("TooBig", (FakeJIT,), {"__getitem__": lambda self, grid: no_room(grid)})
    with pytest.raises(LaunchUnsupported, match=r"fake_kernel with \{'BLOCK': 16, 'num_warps': 4\} needs 102400 of "
                                                r"shared memory per block, and this GPU allows 101376.*sdpa"):
        call(launcher, torch.zeros(64), torch.zeros(64))


class _Future:
    """Triton 3.9's AsyncCompileMode: kernel[grid](...) returns a future of the compiled kernel."""

    def __init__(self, compiled):
        self.compiled = compiled

    def result(self):
        return self.compiled


def test_an_async_compile_future_is_kept_as_its_compiled_kernel(fake):
    launcher, jit, _ = fake
    compiled = FakeCompiled()
    jit.compiled = _Future(compiled)
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    call(launcher, x, y)
    assert launcher.direct == 1 and len(jit.dispatched) == 1, (launcher.direct, len(jit.dispatched))
    assert len(compiled.runs) == 1 and compiled.runs[0][4] == "cu-function", compiled.runs


def test_a_launch_that_returns_no_compiled_kernel_is_not_kept(fake):
    """Where Triton's dispatch returns no compiled kernel (None, or one without packed metadata),
    there is nothing to launch directly: every launch goes through Triton, none raises."""
    launcher, jit, _ = fake
    jit.compiled = None
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        call(launcher, x, y)
    assert launcher.cache == {} and launcher.direct == 0 and len(jit.dispatched) == 3, launcher.cache


@pytest.mark.parametrize("hook", ["launch_enter_hook", "launch_exit_hook"])
def test_a_plain_function_as_launch_hook_takes_tritons_path(fake, monkeypatch, hook):
    """A hook set as a plain function (not appended to Triton's HookChain) counts as set too."""
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    monkeypatch.setattr(_launch._knobs.runtime, hook, lambda metadata: None)
    call(launcher, x, y)
    assert launcher.direct == 0 and jit.compiled.runs == [] and len(jit.dispatched) == 2, hook


@pytest.fixture
def triton_environ():
    """Triton's knob setters write os.environ, so undoing a monkeypatched knob left its variable set
    (TRITON_FPSAN_HOMOMORPHIC_CASTS=0 for the rest of the session, and in every subprocess): the
    TRITON_* variables are put back as they were after the test's monkeypatch is undone."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}
    yield
    for k in [k for k in os.environ if k.startswith("TRITON_") and k not in saved]:
        del os.environ[k]
    os.environ.update(saved)


@pytest.mark.parametrize("knob, value", [("instrumentation_mode", "consan"), ("fpsan_homomorphic_casts", True)])
def test_a_compile_option_knob_set_after_the_first_launch_compiles_another_kernel(triton_environ, fake, monkeypatch,
                                                                                   knob, value):
    """Every knob JITFunction.run reads into the compile options is part of the launch key, not only
    TRITON_DEBUG: a launch after it changed goes through Triton (which compiles another kernel)."""
    launcher, jit, _ = fake
    x, y = torch.zeros(64), torch.zeros(64)
    call(launcher, x, y)
    assert getattr(_launch._knobs.compilation, knob, None) != value, (knob, value)
    # raising=False: a Triton without the fpsan knob (before 3.9) reads as None there
    monkeypatch.setattr(_launch._knobs.compilation, knob, value, raising=False)
    call(launcher, x, y)
    assert launcher.direct == 0 and len(jit.dispatched) == 2, (knob, launcher.direct, len(jit.dispatched))


def test_the_driver_is_bound_on_first_use(monkeypatch):
    """_DRIVER is Triton's active driver's (current device, current stream) getters, looked up on
    first use (a CPU process never initialises CUDA) and then kept in their place."""
    import triton.runtime

    class Active:
        def get_current_device(self):
            return 3

        def get_current_stream(self, device):
            return 0x7000 + device

    monkeypatch.setattr(triton.runtime, "driver", type("Driver", (), {"active": Active()})())
    monkeypatch.setattr(_launch, "_DRIVER", _launch._LazyDriver())
    assert (_launch._device(), _launch._stream(2)) == (3, 0x7002), (_launch._device(), _launch._stream(2))
    assert isinstance(_launch._DRIVER, tuple) and len(_launch._DRIVER) == 2, _launch._DRIVER
