"""The backend switch: precedence (scope > set_backend > SDLAB_KERNELS > default), parsing,
fallback under the default, errors for explicit choices, and counters that show what ran."""
import contextlib
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from kernels import registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_op():
    """A throwaway op with a reference and a picky 'triton' backend (refuses fp64, and fp16 for
    another reason), so the switch is tested without depending on any real kernel."""
    calls = []

    @registry.register("toy_op", "reference")
    def ref(x):
        calls.append("reference")
        return x + 1

    @registry.register("toy_op", "triton", check=lambda x: {torch.float64: "fp64 is not supported",
                                                             torch.float16: "fp16 is not supported"}.get(x.dtype))
    def tri(x):
        calls.append("triton")
        return x + 1

    yield calls
    registry._OPS.pop("toy_op")
    registry._ENV_CACHE.clear()
    registry._FNS.clear()
    registry._WARNED.clear()


def test_default_is_reference_for_cpu_inputs(toy_op):
    registry.dispatch("toy_op", torch.ones(2))
    assert toy_op == ["reference"]
    backend, why = registry.resolve("toy_op", torch.ones(2))
    assert backend == "reference" and "cpu" in why


def test_precedence_scope_over_set_backend_over_env(toy_op, monkeypatch):
    x = torch.ones(2)
    monkeypatch.setenv(kernels.ENV_VAR, "toy_op=triton")
    assert registry.resolve("toy_op", x)[0] == "triton"
    kernels.set_backend(toy_op="reference")
    assert registry.resolve("toy_op", x)[0] == "reference"
    with kernels.use(toy_op="triton"):
        assert registry.resolve("toy_op", x) == ("triton", "kernels.use() scope")
        with kernels.use(toy_op="reference"):
            assert registry.resolve("toy_op", x)[0] == "reference"
        assert registry.resolve("toy_op", x)[0] == "triton"  # inner scope restored
    assert registry.resolve("toy_op", x)[0] == "reference"  # scope gone, set_backend again
    kernels.set_backend(toy_op=None)
    assert registry.resolve("toy_op", x)[0] == "triton"  # back to the env var


def test_scope_restores_after_exception(toy_op):
    with pytest.raises(RuntimeError):
        with kernels.use(toy_op="triton"):
            raise RuntimeError("boom")
    assert registry.resolve("toy_op", torch.ones(1))[0] == "reference"


def test_scopes_exiting_out_of_order_keep_each_others_choices(toy_op):
    """Threads share the scope list; a scope that exits while a later one is still open (another
    thread's) removes only its own choice."""
    a, b = kernels.use(toy_op="triton"), kernels.use(attention="sdpa")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # out of order: b is still open
    assert registry.resolve("toy_op", torch.ones(1))[0] == "reference", "a's choice outlived a"
    assert registry._choice("attention")[0] == "sdpa", "b lost its choice when a exited"
    b.__exit__(None, None, None)
    assert registry._SCOPES == [], registry._SCOPES


@pytest.mark.parametrize("value, expected", [
    ("triton", "triton"),
    ("toy_op=triton,", "triton"),  # a trailing comma is harmless
    ("triton,", "triton"),  # for all ops too
    ("toy_op=triton", "triton"),
    (" toy_op = triton , attention=reference ", "triton"),
    ("attention=sdpa", "reference"),  # other ops only: toy_op keeps its default
    ("TRITON", "triton"),  # names are lower case; the variable's case does not matter
    ("Toy_Op=Triton", "triton"),
])
def test_env_var_forms(toy_op, monkeypatch, value, expected):
    monkeypatch.setenv(kernels.ENV_VAR, value)
    assert registry.resolve("toy_op", torch.ones(1))[0] == expected


@pytest.mark.parametrize("value, needle", [
    ("cuda", "unknown backend 'cuda'"),
    ("toy_op=fast", "valid: reference, triton, compile"),
    ("nosuchop=triton", "known ops"),
    ("toy_op", r"unknown backend 'toy_op' \('toy_op' is an op: write toy_op=<backend>\)"),
    # the two below said "unknown backend; valid: ..." without the item
    ("toy_op:triton", r"unknown backend 'toy_op:triton' \(an op's backend is written toy_op=<backend>\)"),
    (" , ", "names no backend; write one for every op"),
    ("toy_op=triton,toy_op=reference", "op 'toy_op' is named twice"),
    ("=triton", "expected 'op=backend'"),
    ("toy_op=sdpa", "has no 'sdpa' backend"),
])
def test_env_var_errors_name_the_problem(toy_op, monkeypatch, value, needle):
    monkeypatch.setenv(kernels.ENV_VAR, value)
    with pytest.raises(ValueError, match=needle):
        registry.resolve("toy_op", torch.ones(1))


@pytest.mark.parametrize("how", ["scope", "set_backend", "env"])
def test_explicit_backend_that_cannot_take_input_raises(toy_op, monkeypatch, how):
    """Whichever way triton was chosen, a refused input raises, naming the op, the backend, where
    the choice came from, and the limit; nothing runs."""
    source = {"scope": "kernels.use() scope", "set_backend": "kernels.set_backend()",
              "env": f"{kernels.ENV_VAR}='toy_op=triton'"}[how]
    if how == "env":
        monkeypatch.setenv(kernels.ENV_VAR, "toy_op=triton")
    elif how == "set_backend":
        kernels.set_backend(toy_op="triton")
    with kernels.use(toy_op="triton") if how == "scope" else contextlib.nullcontext():
        with pytest.raises(kernels.BackendUnsupported) as e:
            registry.dispatch("toy_op", torch.ones(1, dtype=torch.float64))
    assert str(e.value) == f"toy_op: backend 'triton' (from {source}) cannot run this input: fp64 is not supported"
    assert toy_op == []


def test_default_falls_back_with_one_warning(toy_op, monkeypatch):
    # Pretend the input is on CUDA so the default picks triton, which then refuses fp64.
    monkeypatch.setattr(registry, "_default", lambda op, device: (kernels.Backend.TRITON, "default (test)"))
    x = torch.ones(1, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            registry.dispatch("toy_op", x)
    assert toy_op == ["reference"] * 3
    msgs = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(msgs) == 1 and "fp64 is not supported" in msgs[0], msgs


def test_a_default_kernel_the_device_cannot_launch_falls_back_with_one_warning(toy_op, monkeypatch):
    """A backend whose check took the input but whose kernel the device cannot launch (Triton's
    OutOfResources, as LaunchUnsupported: an H100 table row on a 99 KB GPU): by default the
    reference runs, with one warning; chosen explicitly, the error names the limit."""
    monkeypatch.setattr(registry, "_default", lambda op, device: (kernels.Backend.TRITON, "default (test)"))

    def too_big(x):
        toy_op.append("triton")
        raise registry.LaunchUnsupported("_toy_kernel needs 102400 of shared memory per block, this GPU allows 101376")

    monkeypatch.setitem(registry._FNS, ("toy_op", kernels.Backend.TRITON), too_big)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.equal(registry.dispatch("toy_op", torch.ones(2)), torch.full((2,), 2.0))
    assert toy_op == ["triton", "reference"] * 2
    assert kernels.counts().get(("toy_op", "triton"), 0) == 0 and kernels.counts()[("toy_op", "reference")] == 2
    msgs = [str(w.message) for w in caught if "cannot launch here" in str(w.message)]
    assert len(msgs) == 1 and "101376" in msgs[0] and "falling back to 'reference'" in msgs[0], msgs
    with kernels.use(toy_op="triton"), pytest.raises(kernels.BackendUnsupported, match="allows 101376"):
        registry.dispatch("toy_op", torch.ones(2))


def test_each_fallback_reason_warns_once(toy_op, monkeypatch):
    """Once per op and kind of reason: a second, different limit is reported too, each only once
    (fp16 and fp64 are different reasons: digits inside a name are not masked as numbers)."""
    monkeypatch.setattr(registry, "_default", lambda op, device: (kernels.Backend.TRITON, "default (test)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float64, torch.float16, torch.float64, torch.float16):
            registry.dispatch("toy_op", torch.ones(1, dtype=dtype))
    msgs = sorted(str(w.message) for w in caught if "falling back" in str(w.message))
    assert len(msgs) == 2 and "fp16 is not" in msgs[0] and "fp64 is not" in msgs[1], msgs


@pytest.mark.skipif(not registry.interpreting(), reason="CPU tensors reach the attention checks only interpreted")
def test_a_limit_hit_at_many_values_warns_once(monkeypatch):
    """Reasons that differ only in their numbers are one kind: attention's scale check refuses
    0.0, -1.0 and -2.5 with three messages, and the default falls back from all three with one
    warning (the first value's); a different limit (head dim) still warns."""
    registry._WARNED.clear()
    monkeypatch.setattr(registry, "_default", lambda op, device: (kernels.Backend.TRITON, "default (test)"))
    q = torch.randn(1, 1, 3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (0.0, -1.0, -2.5):
            kernels.attention(q, q, q, scale)
        wide = torch.randn(1, 1, 3, 512)
        kernels.attention(wide, wide, wide)
    msgs = [str(w.message) for w in caught if "falling back" in str(w.message)]
    registry._WARNED.clear()
    assert len(msgs) == 2 and "scale 0.0 is not > 0" in msgs[0] and "head dim 512" in msgs[1], msgs


def test_env_backend_for_all_ops_leaves_ops_without_it(monkeypatch):
    """SDLAB_KERNELS=sdpa: attention runs on sdpa, and ops with no sdpa backend keep their
    default instead of failing."""
    monkeypatch.setenv(kernels.ENV_VAR, "sdpa")
    x = torch.randn(1, 32, 2, 2)
    assert registry.resolve("attention", x)[0] == "sdpa"
    assert registry.resolve("group_norm_silu", x)[0] == "reference"
    kernels.group_norm_silu(x, torch.ones(32), torch.zeros(32), 8)


def test_env_for_all_ops_covers_an_op_registered_later(toy_op, monkeypatch):
    """The parsed SDLAB_KERNELS value is cached; registering an op must not leave it stale."""
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    registry._choice("attention")  # parses and caches the value before late_op exists
    try:
        registry.register("late_op", "reference")(lambda x: x)
        registry.register("late_op", "triton")(lambda x: x)
        assert registry.resolve("late_op", torch.ones(1))[0] == "triton"
    finally:
        registry._OPS.pop("late_op", None)
        registry._ENV_CACHE.clear()
        registry._FNS.clear()


def test_resolve_is_a_query_that_leaves_the_warning_to_the_call(toy_op, monkeypatch):
    monkeypatch.setattr(registry, "_default", lambda op, device: (kernels.Backend.TRITON, "default (test)"))
    x = torch.ones(1, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend, why = registry.resolve("toy_op", x)
        assert backend == "reference" and "fell back: fp64 is not supported" in why
        assert not caught, [str(w.message) for w in caught]
        registry.dispatch("toy_op", x)
    assert [str(w.message) for w in caught if "falling back" in str(w.message)], "the call's warning was used up"



def test_unknown_names_list_valid_ones(toy_op):
    with pytest.raises(ValueError, match="known ops"):
        with kernels.use(nosuch="triton"):
            pass
    with pytest.raises(ValueError, match="valid: reference, triton, compile"):
        kernels.set_backend(toy_op="fast")
    with pytest.raises(ValueError, match="has no 'sdpa' backend"):
        kernels.set_backend(toy_op="sdpa")
    for fn in (kernels.set_backend, lambda b: kernels.use(b).__enter__()):
        with pytest.raises(ValueError, match="unknown backend 'fast'; valid: reference, triton, sdpa, compile"):
            fn("fast")
    with pytest.raises(ValueError, match=r"use\(toy_op=None\): name a backend"):
        kernels.use(toy_op=None).__enter__()


def test_backend_names_are_case_insensitive_in_code_too(toy_op):
    """As in SDLAB_KERNELS, "Triton" means triton in use() and set_backend()."""
    with kernels.use(toy_op="Triton"):
        assert registry.resolve("toy_op", torch.ones(1))[0] == "triton"
    with kernels.use("TRITON"):
        assert registry.resolve("toy_op", torch.ones(1))[0] == "triton"
    kernels.set_backend(toy_op="Triton")
    try:
        assert registry.resolve("toy_op", torch.ones(1))[0] == "triton"
    finally:
        kernels.set_backend()


def test_set_backend_is_all_or_nothing(toy_op):
    """An invalid name anywhere in the call changes no op (toy_op stays on its default)."""
    with pytest.raises(ValueError, match="has no 'sdpa' backend"):
        kernels.set_backend(toy_op="triton", group_norm_silu="sdpa")
    assert registry._choice("toy_op") == (None, ""), registry._GLOBAL


@pytest.mark.parametrize("how", ["default", "chain"])
def test_fallback_warning_points_at_the_callers_line(toy_op, monkeypatch, how):
    """The fallback warning names the line that called the op, not library code: the default's,
    and a fallback chain's (warned one frame deeper in the registry)."""
    if how == "default":
        monkeypatch.setattr(registry, "_default", lambda op, x: (kernels.Backend.TRITON, "default (test)"))
    else:
        kernels.set_backend(toy_op="triton/reference")

    def public_op(x):  # as kernels.attention / group_norm_silu wrap dispatch
        return registry.dispatch("toy_op", x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1  # the call below, not public_op's body
        public_op(torch.ones(1, dtype=torch.float64))
    (w,) = [w for w in caught if "cannot run this input" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line), f"{how} warning attributed to {w.filename}:{w.lineno}"


def test_kernels_import_and_run_without_triton():
    """Where Triton does not import, kernels still imports, every op runs on its reference, and an
    explicit triton choice names the import error."""
    code = """
import sys, warnings
sys.modules["triton"] = None  # `import triton` raises ImportError
import torch, kernels
x = torch.randn(1, 32, 5, 5)
y = kernels.group_norm_silu(x, torch.ones(32), torch.zeros(32), 8)
q = torch.randn(1, 2, 7, 16)
o = kernels.attention(q, q, q)
assert kernels.registry.triton_available().startswith("triton does not import"), kernels.registry.triton_available()
ops = [ln for ln in kernels.describe("cuda").splitlines() if ln.split()[0] in kernels.ops()]
assert len(ops) == 3 and all(" -> reference (default (triton does not import" in ln for ln in ops), ops  # CUDA too
with kernels.use(attention="triton"):
    try:
        kernels.attention(q, q, q)
    except kernels.BackendUnsupported as e:
        assert "triton does not import" in str(e), e
    else:
        raise AssertionError("the triton backend ran without triton")
print("ok", tuple(y.shape), tuple(o.shape))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_an_interpreter_that_cannot_run_the_kernels_is_named():
    """Triton 3.6's interpreter under NumPy >= 2.4 fails every kernel with a loop over a runtime
    bound (an InterpreterError from deep inside, per kernel). That defect, put back into this
    Triton's interpreter in a subprocess, makes the Triton backends unavailable with a reason
    naming the interpreter and NumPy: the default runs the reference, an explicit choice says why."""
    code = """
from triton.runtime import interpreter
set_attr = interpreter._LangPatchScope.set_attr
def int_numpy24(a):  # int() of an array as NumPy >= 2.4 does it, whatever NumPy is installed
    if a.ndim:
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
    return int(a)
def old_index(self, obj, name, value):  # Triton 3.6's __index__: int() of the handle's array, not squeezed
    return set_attr(self, obj, name, (lambda t: int_numpy24(t.handle.data)) if name == "__index__" else value)
interpreter._LangPatchScope.set_attr = old_index
import numpy, torch, kernels
why = kernels.registry.triton_available()
assert why.startswith("Triton ") and "interpreter cannot run these kernels with NumPy " + numpy.__version__ in why, why
assert "a probe kernel failed" in why, why
x = torch.randn(1, 32, 5, 5)
kernels.group_norm_silu(x, torch.ones(32), torch.zeros(32), 8)  # the default: the reference
with kernels.use(group_norm_silu="triton"):
    try:
        kernels.group_norm_silu(x, torch.ones(32), torch.zeros(32), 8)
    except kernels.BackendUnsupported as e:
        assert why in str(e), e
    else:
        raise AssertionError("the triton backend ran on an interpreter that fails the probe")
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    if registry.interpreting():  # and the interpreter of this process passes it
        assert registry.triton_available() is None, registry.triton_available()


@pytest.mark.parametrize("triton_version, numpy_version, fix", [
    ("3.6.0", "2.4.1", True),  # the known pair: the H100 machines' Triton with a current NumPy
    ("2.3.1", "2.4.0rc1", True),
    ("3.6.0+git1a2b", "2.4.0", True),
    ("3.7.0", "2.4.1", False),  # Triton 3.7 fixed it
    ("3.6.0", "2.3.5", False),  # NumPy < 2.4 still converts a 1-element array
    ("3.6.0", "1.26.4", False),
])
def test_the_interpreter_fix_is_offered_for_the_known_pair_only(triton_version, numpy_version, fix):
    from kernels import _triton

    got = _triton._known_fix(triton_version, numpy_version)
    assert got == ("; install numpy<2.4, or Triton >= 3.7" if fix else ""), (triton_version, numpy_version, got)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False),
                                       ("off", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, on):
    """TRITON_INTERPRET=false used to count as interpreting here while Triton compiled for a GPU,
    so CPU inputs passed the checks and crashed in Triton; both now read it alike."""
    code = "import kernels, triton; print(kernels.registry.interpreting(), triton.knobs.runtime.interpret)"
    env = dict(os.environ, TRITON_INTERPRET=value)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(on), str(on)], r.stdout


def test_view_helpers():
    """overlaps_itself, overlaps, same_view and max_offset, which guard out= and 32-bit indexing, and
    _reason_kind, which masks the numbers of a fallback reason but not the digits of a name."""
    x = torch.randn(2, 3, 4, 5)
    assert not any(registry.overlaps_itself(t) for t in (x, x.transpose(1, 2), x[:, :, ::2], x.permute(0, 2, 3, 1)))
    assert registry.overlaps_itself(x[:, :1].expand(2, 3, 4, 5))
    assert registry.overlaps_itself(torch.randn(10).as_strided((3, 4), (2, 1)))  # a sliding window
    assert registry.same_view(x, x.view(2, 3, 4, 5)) and not registry.same_view(x[:, :, 1:], x[:, :, :-1])
    assert not registry.same_view(x[0, 0, :, :4], x[0, 0, :, :4].t())  # one pointer and shape, other strides
    assert registry.max_offset(x) == x.numel() - 1 and registry.max_offset(x, 1) == 59
    assert registry.max_offset(x.transpose(2, 3)) == x.numel() - 1 and registry.fits_int32(x)
    assert registry.overlaps(x[0], x[0, 1:]) and not registry.overlaps(x[0], x[1])  # one storage, apart
    assert not registry.overlaps(x, x.clone())
    assert registry._reason_kind("scale -1.0 is not > 0") == registry._reason_kind("scale 2e-3 is not > 0")
    assert registry._reason_kind("dtype torch.float16") != registry._reason_kind("dtype torch.float64")


def test_fits_int32_boundary():
    """fits_int32 takes a largest offset of 2**31 - 1 and refuses 2**31, on views of a storage over
    2 GiB (its shortcut for smaller ones answers before counting). Meta tensors: nothing is allocated."""
    buf = torch.empty(2**31 + 64, dtype=torch.float16, device="meta")  # 4 GiB, on paper
    assert registry.fits_int32(buf.as_strided((2,), (2**31 - 1,)))
    assert not registry.fits_int32(buf.as_strided((2,), (2**31,)))


def _bad_op_calls():
    """(id, call, error type, message needle): inputs no backend can take, refused by the op itself
    before dispatch, so the reference (the CPU default) does not return zeros or garbage."""
    from kernels.scheduler_step import StepCoefficients
    q, w, x = torch.randn(1, 2, 3, 8), torch.ones(4), torch.randn(1, 4, 3, 3)
    k = StepCoefficients(c0=1.0)
    return [
        ("attention int", lambda: kernels.attention(q.int(), q.int(), q.int()), TypeError,
         "attention: q dtype torch.int32 is not floating point"),
        ("attention meta k", lambda: kernels.attention(q, q.to("meta"), q), ValueError, "attention: k is on meta, q on cpu"),
        ("attention fp32/fp64", lambda: kernels.attention(q, q.double(), q.double()), TypeError,
         "q, k, v dtypes torch.float32, torch.float64, torch.float64 differ"),
        ("attention scale str", lambda: kernels.attention(q, q, q, "a"), TypeError, "scale must be None, a number or a tensor"),
        ("attention list v", lambda: kernels.attention(q, q, [1.0]), TypeError, "attention: v is a list, not a tensor"),
        ("gn int x", lambda: kernels.group_norm_silu(x.int(), w, w, 2), TypeError,
         "group_norm_silu: x dtype torch.int32 is not floating point"),
        ("gn fp64 x fp32 weight", lambda: kernels.group_norm_silu(x.double(), w, w, 2), ValueError,
         r"weight dtype torch.float32: must be x's \(torch.float64\), or float32 with 16-bit x"),
        ("gn fp32 weight fp16 bias", lambda: kernels.group_norm_silu(x.half(), w, w.half(), 2), ValueError,
         "weight dtype torch.float32 and bias dtype torch.float16 differ; torch's group_norm takes one dtype"),
        ("gn weight shape", lambda: kernels.group_norm_silu(x, torch.ones(3), None, 2), ValueError,
         r"weight shape \(3,\) is not \(C,\) = \(4,\)"),
        ("gn meta bias", lambda: kernels.group_norm_silu(x, w, w.to("meta"), 2), ValueError, "bias is on meta, x on cpu"),
        ("gn eps < 0", lambda: kernels.group_norm_silu(x, w, w, 2, eps=-1), ValueError, "eps must be a number >= 0, got -1"),
        ("step int noise", lambda: kernels.scheduler_step(x, x, k, noise=x.int()), TypeError,
         "scheduler_step: noise dtype torch.int32 is not floating point"),
        ("step int mask", lambda: kernels.scheduler_step(x, x, k, mask=x.int(), known=x), TypeError,
         "mask dtype torch.int32 is not floating point or bool"),
        ("step guidance alone", lambda: kernels.scheduler_step(x, x, k, guidance_scale=7.5), ValueError,
         "guidance_scale=7.5 needs model_output_uncond"),
    ]


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "default"])
@pytest.mark.parametrize("case", range(len(_bad_op_calls())), ids=[c[0] for c in _bad_op_calls()])
def test_ops_refuse_inputs_no_backend_takes(case, backend):
    """Ints, mixed devices and dtypes, a str scale, a negative eps, guidance without an
    unconditional output: named errors, whichever backend is chosen."""
    _, call, err, needle = _bad_op_calls()[case]
    with kernels.use(backend) if backend else contextlib.nullcontext(), pytest.raises(err, match=needle):
        call()


def test_ops_still_take_what_torch_takes():
    """The checks above leave alone what torch's ops take: fp32 weights with 16-bit x, a bool RePaint
    mask, mixed dtypes in a step (it computes in fp32), mixed q/k/v dtypes under autocast."""
    from kernels.scheduler_step import StepCoefficients
    x16 = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    with kernels.use("reference"):
        assert kernels.group_norm_silu(x16, torch.ones(4), torch.zeros(4), 2).dtype == torch.bfloat16
        x = torch.randn(1, 4, 3, 3)
        prev, _ = kernels.scheduler_step(x, x.half(), StepCoefficients(c0=1.0), mask=x > 0, known=x)
        assert prev.isfinite().all()
        q = torch.randn(1, 2, 3, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.attention(q, q.bfloat16(), q).dtype == torch.bfloat16


def test_counts_record_what_ran(toy_op):
    kernels.reset_counts()
    registry.dispatch("toy_op", torch.ones(1))
    with kernels.use("triton"):
        registry.dispatch("toy_op", torch.ones(1))
        registry.dispatch("toy_op", torch.ones(1))
    assert kernels.counts()[("toy_op", "reference")] == 1
    assert kernels.counts()[("toy_op", "triton")] == 2


def test_compile_backend_is_derived_from_reference(toy_op):
    assert "compile" in kernels.backends("toy_op")
    assert kernels.backends("attention")[:1] == ["reference"]
    assert "sdpa" in kernels.backends("attention") and "sdpa" not in kernels.backends("group_norm_silu")


def test_describe_names_each_op_and_the_reason(toy_op, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "toy_op=triton")
    text = kernels.describe("cpu")
    line = next(l for l in text.splitlines() if l.startswith("toy_op"))
    assert "triton" in line and kernels.ENV_VAR in line
    for op in ("attention", "group_norm_silu", "scheduler_step"):
        assert op in text
    assert text.splitlines()[-1].startswith("triton launches: "), text  # direct, or why not
    # a device this torch cannot allocate on is still described (nothing is allocated)
    monkeypatch.delenv(kernels.ENV_VAR)
    cuda = next(l for l in kernels.describe("cuda").splitlines() if l.startswith("toy_op"))
    assert "default (CUDA input" in cuda or registry.triton_available(), cuda
    assert kernels.describe(0) == kernels.describe("cuda:0")  # an index is a CUDA device, not "none given"
    # a tensor is described on its device (its printout was the error message)
    assert kernels.describe(torch.zeros(2, device="meta")) == kernels.describe("meta")
    with pytest.raises(ValueError, match="describe: device 'gpu': .*cpu, cuda"):  # torch's bare RuntimeError
        kernels.describe("gpu")


@pytest.fixture
def upto16():
    """attention's research backend 'upto16': the reference, refusing head dims over 16."""
    @kernels.register("attention", "upto16",
                      check=lambda q, k, v, scale=None, causal=False: None if q.shape[-1] <= 16 else
                      f"head dim {q.shape[-1]} over 16")
    def upto16(q, k, v, scale=None, causal=False):
        return kernels.attention_reference(q, k, v, scale, causal)

    yield "upto16"
    kernels.unregister("attention", "upto16")
    registry._WARNED.clear()


@pytest.mark.parametrize("scope", [{}, {"attention": "sdpa"}, {"attention": "upto16/reference"}])
def test_torch_compile_traces_the_unet_without_graph_breaks(scope, upto16):
    """Dispatch is traceable: the switch costs no graph break (a break per op made the compiled
    SD 1.5 UNet 2x slower than eager on an H100), a fallback chain included, whose first backend
    refuses the tiny UNet's 32-wide heads (a warning there would break the graph)."""
    import torch._dynamo as dynamo

    from sdcore import StableDiffusion

    unet = StableDiffusion.from_preset("tiny").unet
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    dynamo.reset()
    kernels.reset_counts()
    with kernels.use(**scope):
        explained = dynamo.explain(unet)(x, torch.tensor([10, 10]), ctx)
    reasons = [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def test_compile_backend_runs_and_matches_reference():
    """`compile` = torch.compile of the reference (inductor, CPU here): same function, fp32."""
    from kernels.testing import assert_close

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 64, 5, 7, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)
    q, k, v = torch.randn(3, 1, 2, 9, 16, generator=g).unbind(0)
    with kernels.use(group_norm_silu="compile", attention="compile"):
        y = kernels.group_norm_silu(x, w, b, 32)
        o = kernels.attention(q, k, v, causal=True)
    assert kernels.counts() == {("group_norm_silu", "compile"): 1, ("attention", "compile"): 1}
    assert_close(y, kernels.group_norm_silu_reference(x, w, b, 32), rel=1e-5, name="group_norm_silu compile")
    assert_close(o, kernels.attention_reference(q, k, v, causal=True), rel=1e-5, name="attention compile")


def test_compile_backend_does_not_recompile_per_sampler_step():
    """A sampler passes new coefficients every step: scheduler_step's `compile` backend turns them
    into graph inputs after one recompile, instead of a graph per step until dynamo's recompile
    limit sends the rest of the run back to eager without a word."""
    from torch._dynamo.utils import counters

    from kernels import StepCoefficients

    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    counters.clear()
    with kernels.use(scheduler_step="compile"):
        for i in range(5):
            coeffs = StepCoefficients(a_x=1.0 + 0.1 * i, a_o=-0.5, c0=0.5, c1=0.5 - 0.01 * i)
            got, _ = kernels.scheduler_step(x, out, coeffs)
            want, _ = kernels.scheduler_step_reference(x, out, coeffs)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), i
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_autocast_inputs_casts_only_under_autocast():
    """What a Triton backend standing in for matmul / SDPA sees: the tensors themselves without
    autocast (no copy, no `.to` call), autocast's dtype under it, and fp64 and integer tensors left
    alone, as autocast leaves them."""
    q, k, i = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), torch.arange(3)
    out = registry.autocast_inputs(q, k, i)
    assert all(a is b for a, b in zip(out, (q, k, i))), "without autocast the inputs must pass through"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b, c = registry.autocast_inputs(q, k, i)
        same = registry.autocast_inputs(a)
    assert a.dtype == torch.bfloat16 and torch.equal(a, q.to(torch.bfloat16)), a
    assert b is k and c is i, (b.dtype, c.dtype)
    assert same[0] is a, "a tensor already in autocast's dtype must not be copied"


@pytest.mark.skipif(registry.triton_available() is not None, reason="needs triton")
def test_host_integer_helpers_match_triton():
    """kernels._triton.cdiv / next_power_of_2 (plain Python, on every launch's path) against
    Triton's own, which cost ~1.5 us per call through their ConstexprFunction wrapper."""
    from kernels._triton import cdiv, next_power_of_2, triton

    for n in range(1, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


# ------------------------------------------------------------------------------ fallback chains
@pytest.mark.parametrize("how", ["scope", "tuple", "set_backend", "env"])
def test_a_fallback_chain_runs_the_first_backend_that_takes_the_input(toy_op, monkeypatch, how):
    """'triton/reference': triton where it can, reference for what it refuses, each refusal kind
    warned once (naming both backends and the limit), every call counted on the backend that ran."""
    if how == "env":
        monkeypatch.setenv(kernels.ENV_VAR, "toy_op=triton/reference")
    elif how == "set_backend":
        kernels.set_backend(toy_op="triton/reference")
    choice = ("triton", "reference") if how == "tuple" else "triton/reference"
    source = {"env": f"{kernels.ENV_VAR}='toy_op=triton/reference'", "set_backend": "kernels.set_backend()"}.get(
        how, "kernels.use() scope")
    with kernels.use(toy_op=choice) if how in ("scope", "tuple") else contextlib.nullcontext():
        assert registry.resolve("toy_op", torch.ones(1)) == ("triton", source)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dtype in (torch.float32, torch.float64, torch.float64, torch.float16, torch.float32):
                registry.dispatch("toy_op", torch.ones(1, dtype=dtype))
        backend, why = registry.resolve("toy_op", torch.ones(1, dtype=torch.float64))
    assert toy_op == ["triton", "reference", "reference", "reference", "triton"], toy_op
    assert kernels.counts() == {("toy_op", "triton"): 2, ("toy_op", "reference"): 3}, kernels.counts()
    messages = [str(w.message) for w in caught]
    assert messages == [
        f"toy_op: backend 'triton' of the fallback chain 'triton/reference' (from {source}) cannot run this "
        f"input ({reason}); running 'reference'" for reason in ("fp64 is not supported", "fp16 is not supported")
    ], messages
    assert backend == "reference" and why == f"{source}, fell back along the chain: 'triton': fp64 is not supported"


def test_a_chain_that_no_backend_can_take_raises_with_every_reason(toy_op):
    @registry.register("toy_op", "picky", check=lambda x: "picky refuses everything")
    def picky(x):
        raise AssertionError("ran a backend that refused")

    with kernels.use(toy_op="picky/triton"), pytest.raises(kernels.BackendUnsupported) as e:
        registry.dispatch("toy_op", torch.ones(1, dtype=torch.float64))
    assert str(e.value) == ("toy_op: no backend of the fallback chain 'picky/triton' (from kernels.use() scope) can "
                            "run this input: 'picky': picky refuses everything; 'triton': fp64 is not supported")
    assert toy_op == [] and kernels.counts() == {}


def test_each_refusing_backend_of_a_chain_warns_once(toy_op):
    """Two backends of one chain refusing for the same reason are two warnings, one naming each:
    the warned-once key holds the backend as well as the kind of reason."""
    @registry.register("toy_op", "picky", check=lambda x: "fp64 is not supported" if x.dtype == torch.float64 else None)
    def picky(x):
        raise AssertionError("ran a backend that refused")

    with kernels.use(toy_op="picky/triton/reference"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            registry.dispatch("toy_op", torch.ones(1, dtype=torch.float64))
    refused = [re.search(r"backend '(\w+)' of the fallback chain", str(w.message)).group(1) for w in caught]
    assert refused == ["picky", "triton"], [str(w.message) for w in caught]
    assert toy_op == ["reference", "reference"]


def test_describe_shows_a_chain(toy_op):
    with kernels.use(toy_op="triton/reference"):
        line, = [ln for ln in kernels.describe("cpu").splitlines() if ln.startswith("toy_op")]
    assert line.startswith("toy_op           -> triton/reference (kernels.use() scope)"), line
    assert kernels.validate("toy_op", " Triton / reference") == "triton/reference"


@pytest.mark.parametrize("value, needle", [
    ("reference/triton", "'reference' takes every input (it has no check), so 'triton' after it would never run"),
    ("compile/triton", "'compile' takes every input (it has no check), so 'triton' after it would never run"),
    ((("triton", "reference"), "reference"), "each member is one backend name, not ('triton', 'reference')"),
    ("triton/triton", "fallback chain 'triton/triton' for op 'toy_op' names 'triton' twice"),
    ("triton/", "fallback chain 'triton/' for op 'toy_op': name two or more backends"),
    (("triton",), "fallback chain 'triton' for op 'toy_op': name two or more backends"),
    ("triton/fast", "fallback chain 'triton/fast': op 'toy_op' has no 'fast' backend; valid: reference, triton"),
    ("triton/sdpa", "op 'toy_op' has no 'sdpa' backend"),
])
def test_chain_errors_name_the_problem(toy_op, value, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        kernels.use(toy_op=value).__enter__()
    with pytest.raises(ValueError, match=re.escape(needle)):
        kernels.set_backend(toy_op=value)
    assert registry._SCOPES == [] and registry._GLOBAL == {}


@pytest.mark.parametrize("call", ["use", "env"])
def test_a_chain_for_every_op_is_refused(toy_op, monkeypatch, call):
    """A chain names one op's backends: 'triton/reference' for all ops says how to write it."""
    if call == "use":
        with pytest.raises(ValueError, match=re.escape("a chain names one op's backends, e.g. "
                                                       "use(attention='triton/reference')")):
            kernels.use("triton/reference").__enter__()
    else:
        monkeypatch.setenv(kernels.ENV_VAR, "triton/reference")
        with pytest.raises(ValueError, match=re.escape("a fallback chain names one op's backends, e.g. "
                                                       "'attention=triton/reference'")):
            registry.resolve("toy_op", torch.ones(1))


def test_a_chain_naming_an_unregistered_backend_says_so(toy_op, upto16):
    """A chain set before its research backend was unregistered fails at the next call (and in
    resolve, which the pipelines' preflight asks), naming the chain, the backend and the source."""
    x = torch.ones(1, 1, 4, 40)
    with kernels.use(attention="upto16/triton"):
        kernels.unregister("attention", "upto16")
        with pytest.raises(ValueError, match=re.escape(
                "attention: the fallback chain 'upto16/triton' (from kernels.use() scope) names 'upto16', which is "
                "no longer registered; valid: reference, sdpa, triton, compile")):
            registry.resolve("attention", x, x, x)
    kernels.register("attention", "upto16")(lambda *a, **k: None)  # for the fixture's unregister


def test_the_conformance_check_refuses_a_chain():
    """kernels.testing.check holds one backend to a case; a chain is refused, saying so."""
    from kernels import testing

    case = testing.cases("attention")[0]
    with pytest.raises(ValueError, match="is a fallback chain: check each of its backends"):
        testing.check(case, "triton/reference", "cpu")


# ------------------------------------------------------------------- a plugin's whole lifecycle
def test_a_builtin_name_a_plugin_could_not_remove_is_refused():
    """'compile' is derived from the reference (a registered one replaced it, for good), and a
    built-in op's missing built-in backend ('sdpa' for group_norm_silu) is no plugin's to add."""
    def mine(*args, **kwargs):
        return kernels.group_norm_silu_reference(*args, **kwargs)

    with pytest.raises(ValueError, match="'compile' is made by the registry"):
        kernels.register("attention", "compile")(mine)
    with pytest.raises(ValueError, match="op 'group_norm_silu' is built in and has no 'sdpa' backend"):
        kernels.register("group_norm_silu", "sdpa")(mine)
    assert "sdpa" not in kernels.backends("group_norm_silu")


PLUGIN_NEW_OP = """
import kernels

OFFSET = {offset}

@kernels.register("plugin_scale", "reference")
def reference(x):
    return x * 2

@kernels.register("plugin_scale", "fast")
def fast(x):
    return x * 2 + OFFSET
"""


def test_a_plugin_with_its_own_op_reloads_its_edited_code_and_unloads_whole(tmp_path):
    """A plugin's own op with a reference: reload=True runs the edited file (it raised, and a second
    try silently kept the old code), and unloading removes the op."""
    path = tmp_path / "own_op.py"
    path.write_text(PLUGIN_NEW_OP.format(offset=0.0))
    x = torch.ones(3)
    try:
        assert kernels.load_plugin(str(path)) == {"plugin_scale": ["reference", "fast"]}
        path.write_text(PLUGIN_NEW_OP.format(offset=100.0))
        kernels.load_plugin(str(path), reload=True)
        with kernels.use(plugin_scale="fast"):
            assert torch.equal(kernels.dispatch("plugin_scale", x), x * 2 + 100), "the edited file did not run"
    finally:
        kernels.unload_plugin(str(path))
    assert "plugin_scale" not in kernels.ops()


def test_a_plugin_whose_file_is_gone_still_unloads(tmp_path):
    """unload_plugin needs only the plugin's name: with its file deleted it raised FileNotFoundError
    and its backends stayed registered; loading it again says the file is gone."""
    path = tmp_path / "gone.py"
    path.write_text(PLUGIN_NEW_OP.format(offset=0.0))
    try:
        kernels.load_plugin(str(path))
        path.unlink()
        kernels.unload_plugin(str(path))
        assert "plugin_scale" not in kernels.ops()
        with pytest.raises(FileNotFoundError, match=f"plugin {re.escape(str(path))}: no such file"):
            kernels.load_plugin(str(path))
    finally:
        if "plugin_scale" in kernels.ops():
            path.write_text(PLUGIN_NEW_OP.format(offset=0.0))
            kernels.unload_plugin(str(path))


def test_unloading_a_plugin_gives_back_what_it_replaced(tmp_path):
    """replace=True of a built-in backend lasts while the plugin is loaded, not after."""
    path = tmp_path / "replacing.py"
    path.write_text("import kernels, torch\n\n"
                    "@kernels.register('group_norm_silu', 'reference', replace=True)\n"
                    "def zeros(x, weight, bias, groups, eps=1e-5, activation='silu'):\n"
                    "    return torch.zeros_like(x)\n")
    x = torch.randn(1, 8, 3, 3)
    want = kernels.group_norm_silu_reference(x, None, None, 4)
    try:
        assert kernels.load_plugin(str(path)) == {"group_norm_silu": ["reference"]}  # what it replaced, said
        with kernels.use(group_norm_silu="reference"):
            assert not kernels.group_norm_silu(x, None, None, 4).any()
    finally:
        kernels.unload_plugin(str(path))
    with kernels.use(group_norm_silu="reference"):
        assert torch.equal(kernels.group_norm_silu(x, None, None, 4), want), "the plugin's reference stayed"


def test_reload_of_a_module_imported_elsewhere_is_refused(tmp_path, monkeypatch):
    """What a plain `import` registered is not known: reload=True cannot undo it, and says so (it
    returned the old backends, and the old code kept running)."""
    (tmp_path / "imported_plug.py").write_text("import kernels\n\n"
                                              "@kernels.register('attention', 'imported_plug')\n"
                                              "def f(q, k, v, scale=None, causal=False):\n"
                                              "    return kernels.attention_reference(q, k, v, scale, causal)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import imported_plug  # noqa: F401
    try:
        with pytest.raises(ValueError, match="was imported before, not by load_plugin"):
            kernels.load_plugin("imported_plug", reload=True)
    finally:
        kernels.unregister("attention", "imported_plug")
        sys.modules.pop("imported_plug", None)


def test_a_plugin_that_raises_leaves_no_plugin_it_loaded_behind(tmp_path):
    """A plugin loading another, then raising: both go, so the helper loads afresh later (it
    returned {} before: registered nothing, said nothing)."""
    helper = tmp_path / "helper_plug.py"
    helper.write_text("import kernels\n\n"
                      "@kernels.register('attention', 'helper_plug')\n"
                      "def f(q, k, v, scale=None, causal=False):\n"
                      "    return kernels.attention_reference(q, k, v, scale, causal)\n")
    outer = tmp_path / "outer_plug.py"
    outer.write_text(f"import kernels\nkernels.load_plugin({str(helper)!r})\nraise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        kernels.load_plugin(str(outer))
    assert "helper_plug" not in kernels.backends("attention")
    try:
        assert kernels.load_plugin(str(helper)) == {"attention": ["helper_plug"]}
    finally:
        kernels.unload_plugin(str(helper))


PLUGIN_TORCH_OP = """
import torch, kernels
from kernels.registry import define_op

def _impl(x):
    return x * {factor}

define_op("plugin_times", "(Tensor x) -> Tensor", _impl, lambda x: torch.empty_like(x))

@kernels.register("attention", "plugin_times")
def times(q, k, v, scale=None, causal=False):
    return torch.ops.sdlab.plugin_times(kernels.attention_reference(q, k, v, scale, causal))
{tail}
"""


def test_a_plugin_defining_a_torch_op_reloads_and_unloads_it(tmp_path):
    """An op a plugin defines with define_op goes with the plugin: reload=True runs the edited
    definition (it raised 'already defined', and the plugin could not reload in the process),
    unload_plugin drops it from torch.ops.sdlab, and a plugin raising after define_op leaves no
    definition behind, so the fixed file loads."""
    path = tmp_path / "torch_op.py"
    q = torch.randn(1, 1, 3, 8)
    want = kernels.attention_reference(q, q, q)
    try:
        path.write_text(PLUGIN_TORCH_OP.format(factor=2.0, tail=""))
        assert kernels.load_plugin(str(path)) == {"attention": ["plugin_times"]}
        path.write_text(PLUGIN_TORCH_OP.format(factor=3.0, tail=""))
        kernels.load_plugin(str(path), reload=True)
        with kernels.use(attention="plugin_times"):
            assert torch.equal(kernels.attention(q, q, q), want * 3), "the edited definition did not run"
        kernels.unload_plugin(str(path))
        assert not hasattr(torch.ops.sdlab, "plugin_times"), "the plugin's torch op outlived it"
        path.write_text(PLUGIN_TORCH_OP.format(factor=4.0, tail="raise RuntimeError('boom')"))
        with pytest.raises(RuntimeError, match="boom"):
            kernels.load_plugin(str(path))
        assert not hasattr(torch.ops.sdlab, "plugin_times"), "a failed plugin's torch op stayed"
        path.write_text(PLUGIN_TORCH_OP.format(factor=5.0, tail=""))
        assert kernels.load_plugin(str(path)) == {"attention": ["plugin_times"]}
        assert torch.equal(torch.ops.sdlab.plugin_times(q), q * 5)
    finally:
        kernels.unload_plugin(str(path))
    assert "plugin_times" not in kernels.backends("attention") and not hasattr(torch.ops.sdlab, "plugin_times")


def test_defining_a_torch_op_twice_names_it():
    with pytest.raises(ValueError, match=r"torch\.ops\.sdlab\.attention is already defined"):
        registry.define_op("attention", "(Tensor x) -> Tensor", lambda x: x, lambda x: x)
    q = torch.randn(1, 1, 3, 8)  # the built-in op (the Triton forward's) is untouched
    torch.testing.assert_close(torch.ops.sdlab.attention(q, q, q, None, False, False)[0],
                               kernels.attention_reference(q, q, q), rtol=2e-5, atol=1e-6)


def test_define_op_replace_defines_it_afresh():
    """A module imported again (kernels.attention_sm90 after a test or bench tune dropped it from
    sys.modules) defines its op again with replace=True: the new implementation runs."""
    registry.define_op("plugin_again", "(Tensor x) -> Tensor", lambda x: x + 1, lambda x: torch.empty_like(x))
    try:
        registry.define_op("plugin_again", "(Tensor x) -> Tensor", lambda x: x + 2, lambda x: torch.empty_like(x),
                           replace=True)
        assert torch.equal(torch.ops.sdlab.plugin_again(torch.zeros(2)), torch.full((2,), 2.0))
    finally:
        registry._undefine(["plugin_again"])


def test_a_bad_schema_leaves_no_half_defined_op():
    with pytest.raises(RuntimeError):
        registry.define_op("plugin_bad", "(Tensor x -> Tensor", lambda x: x, lambda x: x)
    assert "plugin_bad" not in registry._DEFINED and not hasattr(torch.ops.sdlab, "plugin_bad")
    registry.define_op("plugin_bad", "(Tensor x) -> Tensor", lambda x: x + 1, lambda x: torch.empty_like(x))
    try:
        assert torch.equal(torch.ops.sdlab.plugin_bad(torch.zeros(2)), torch.ones(2))
    finally:
        registry._undefine(["plugin_bad"])


def _triton_cases():
    """One small fp32 input per built-in op that its Triton backend takes under the interpreter."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=g)
    x, w = torch.randn(2, 8, 3, 3, generator=g), torch.randn(8, generator=g)
    eps = torch.randn(2, 8, 3, 3, generator=g)
    coeffs = kernels.StepCoefficients(a_x=1.2, a_o=-0.5, b_o=1.0, c0=0.7, c1=0.3, c2=0.2)  # a DDIM-like step
    return {"attention": (lambda a: kernels.attention(a, q, q), q),
            "group_norm_silu": (lambda a: kernels.group_norm_silu(a, w, w, 4), x),
            "scheduler_step": (lambda a: kernels.scheduler_step(a, eps, coeffs)[0], x)}


TRITON_HERE = registry.triton_available() is None and registry.interpreting()


@pytest.mark.skipif(not TRITON_HERE, reason="needs the Triton interpreter (or run the op's cases on CUDA)")
@pytest.mark.parametrize("op", ["attention", "group_norm_silu", "scheduler_step"])
def test_forward_mode_ad_and_torch_func_are_not_dropped_by_a_triton_kernel(op):
    """A raw kernel has no jvp and no batching rule, and reads memory that a torch.func wrapper does
    not have: its check refuses them (the tangent used to be dropped silently, and vmap / grad
    crashed in the check), so a chain with the reference gives the reference's derivatives."""
    import torch.autograd.forward_ad as fwad
    f, a = _triton_cases()[op]
    tangent = torch.randn_like(a)
    with kernels.use(**{op: "reference"}):
        want_jvp = torch.func.jvp(f, (a,), (tangent,))[1]
        want_grad = torch.func.grad(lambda t: f(t).square().sum())(a)
        want_vmap = torch.func.vmap(f)(torch.stack([a, 2 * a]))
    with kernels.use(**{op: "triton"}), fwad.dual_level():
        with pytest.raises(kernels.BackendUnsupported, match="forward-mode tangent"):
            f(fwad.make_dual(a, tangent))
    with kernels.use(**{op: "triton"}):
        with pytest.raises(kernels.BackendUnsupported, match="torch.func transform"):
            torch.func.grad(lambda t: f(t).sum())(a)
    with kernels.use(**{op: "triton/reference"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the chain's fallback warning
        with fwad.dual_level():
            got_jvp = fwad.unpack_dual(f(fwad.make_dual(a, tangent))).tangent
        got_grad = torch.func.grad(lambda t: f(t).square().sum())(a)
        got_vmap = torch.func.vmap(f)(torch.stack([a, 2 * a]))
    assert got_jvp is not None, "the tangent was dropped"
    for name, got, want in (("jvp", got_jvp, want_jvp), ("grad", got_grad, want_grad), ("vmap", got_vmap, want_vmap)):
        torch.testing.assert_close(got, want, msg=lambda m: f"{op} {name}: {m}")


@pytest.mark.skipif(not TRITON_HERE, reason="needs the Triton interpreter")
def test_a_fake_tensor_is_refused_by_a_triton_kernel_by_name():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        cases = _triton_cases()
        for op, (f, a) in cases.items():
            with kernels.use(**{op: "triton"}), pytest.raises(kernels.BackendUnsupported, match="fake tensor"):
                f(a)
            with kernels.use(**{op: "reference"}):
                assert f(a).shape == a.shape


def test_a_fallback_warning_turned_into_an_error_raises_at_every_call(toy_op):
    """The once-only bookkeeping follows the warning: under -W error the first call raised it, so it
    was never given, and the next call must not run on the fallback silently."""
    with kernels.use(toy_op="triton/reference"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            with pytest.raises(RuntimeWarning, match="fp64 is not supported"):
                registry.dispatch("toy_op", torch.ones(2, dtype=torch.float64))
    assert toy_op == []


def test_an_op_name_the_env_var_could_not_name_is_refused():
    for name in ("MyOp", "my-op", "a=b", "x,y", ""):
        with pytest.raises(ValueError, match=r"invalid op name .*\[a-z\]\[a-z0-9_\]\*"):
            registry.register(name, "reference")(lambda x: x)
    assert not {"MyOp", "my-op", "a=b", "x,y", ""} & set(registry.ops())


def test_describe_says_an_explicit_triton_cannot_run_on_the_device():
    kernels.set_backend(attention="triton")
    try:
        text = kernels.describe("meta")
    finally:
        kernels.set_backend()
    line = next(l for l in text.splitlines() if l.startswith("attention"))
    assert "set_backend(); cannot run here:" in line and "need CUDA" in line, line


def test_a_use_object_is_checked_when_made_reusable_and_a_decorator(toy_op):
    with pytest.raises(ValueError, match="has no 'bogus' backend"):
        kernels.use(toy_op="bogus")
    scope = kernels.use(toy_op="triton")
    for _ in range(2):
        with scope:
            with scope:  # nested in itself: each exit removes its own entry
                assert registry.resolve("toy_op", torch.ones(2))[0] == "triton"
            assert registry.resolve("toy_op", torch.ones(2))[0] == "triton"
        assert registry.resolve("toy_op", torch.ones(2))[0] == "reference"

    @kernels.use(toy_op="triton")
    def run():
        return registry.resolve("toy_op", torch.ones(2))[0]

    assert run() == run() == "triton" and registry._SCOPES == []


def test_a_decorated_function_called_from_threads_keeps_each_calls_scope(toy_op):
    """Each call of a @kernels.use function enters a fresh copy: with one shared object, a thread's
    exit removed the scope another thread was still in (last-in first-out over both)."""
    import threading

    step = {name: threading.Event() for name in ("a_in", "c_in", "b_in", "a_go", "a_out", "b_go", "c_go")}
    seen = {}

    @kernels.use(toy_op="triton")
    def work(name, entered, go):
        step[entered].set()
        step[go].wait(10)
        seen[name] = registry.resolve("toy_op", torch.ones(2))[0]

    def a():
        work("a", "a_in", "a_go")
        step["a_out"].set()

    def c():
        with kernels.use(toy_op="reference"):
            step["c_in"].set()
            step["c_go"].wait(10)  # c's scope stays open while b resolves

    threads = [threading.Thread(target=a), threading.Thread(target=c), threading.Thread(target=work, args=("b", "b_in", "b_go"))]
    threads[0].start()
    step["a_in"].wait(10)
    threads[1].start()
    step["c_in"].wait(10)
    threads[2].start()
    step["b_in"].wait(10)
    step["a_go"].set()  # a leaves first: it must take its own scope, not b's, innermost
    step["a_out"].wait(10)
    step["b_go"].set()
    threads[2].join(10)
    step["c_go"].set()
    for t in threads:
        t.join(10)
    assert seen == {"a": "triton", "b": "triton"}, seen
    assert registry._SCOPES == []
