"""Host-side helpers of kernels/ that the op and launch tests reach only through their callers:
kernels._triton's stand-ins, kernels._autograd's double backward, kernels/__init__'s exports, and
plugin loading in kernels.registry. Each test here failed against a small plausible edit of that code
(found by mutation testing) that every other test let through. CPU only, a second or less each."""
import sys
import types

import pytest
import torch

import kernels
from kernels import _autograd, _triton, registry


# ------------------------------------------------------------------ kernels._triton
@pytest.mark.parametrize("value, on", [("1", True), ("TRUE", True), (" yes ", True), ("Y", True), ("on", True),
                                       ("0", False), ("false", False), ("", False), ("2", False), ("nope", False)])
def test_triton_interpret_without_knobs_is_read_with_tritons_words(monkeypatch, value, on):
    """Where Triton has no knobs module (the stand-in when it does not import; Triton before 3.4),
    TRITON_INTERPRET is read from the environment: 1 / true / on / yes / y in any case and with
    surrounding blanks is on, anything else off ("0" and "false" too, not just unset)."""
    monkeypatch.setattr(_triton, "triton", types.SimpleNamespace())  # no .knobs
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _triton._interpret_env() is on, (value, _triton._interpret_env())


# ------------------------------------------------------------------ kernels._autograd
def _reference(x, w, b):
    """Three inputs that each reach the output differently, with w optional as GroupNorm's weight."""
    y = x.sin() * (1.0 if w is None else w) + x * b.square()
    return y


@pytest.mark.parametrize("needs", [(True, False, True), (False, True, False), (True, True, True), (False, False, True)])
def test_reference_grads_gives_each_needed_input_its_own_gradient(needs):
    """Every input requires grad here, so only ``needs`` says which gradients to return: each in its
    input's position, None elsewhere, with a graph (create_graph). fp64 on a (5, 3) tensor: autograd
    of the same expression is the oracle, equal to rounding (rel 1e-12)."""
    g = torch.Generator().manual_seed(len(needs) + 2 * needs.index(True))
    x, w, b = (torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    grad_out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = _autograd.reference_grads(_reference, (x, w, b), needs, grad_out)
    want = torch.autograd.grad(_reference(x, w, b), (x, w, b), grad_out)
    assert len(got) == 3, f"{len(got)} gradients for 3 inputs, needs {needs}"
    for name, need, a, e in zip("xwb", needs, got, want):
        if not need:
            assert a is None, f"d{name}: not needed ({needs}) but returned"
            continue
        assert a is not None and a.requires_grad, f"d{name}: missing or without a graph ({needs})"
        err = ((a - e).abs().max() / e.abs().max()).item()
        assert err <= 1e-12, f"d{name} ({needs}): max rel err {err:.2e} against autograd"


def test_reference_grads_with_a_none_input_and_grad_mode_off():
    """GroupNorm without weight passes None (never needed); called under no_grad the reference is
    still recorded (it enables grad itself), so the gradient exists and has a graph."""
    g = torch.Generator().manual_seed(7)
    x, b = (torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    grad_out = torch.randn(4, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        dx, dw, db = _autograd.reference_grads(_reference, (x, None, b), (True, False, True), grad_out)
    want = torch.autograd.grad(_reference(x, None, b), (x, b), grad_out)
    assert dw is None and dx.requires_grad and db.requires_grad, (dw, dx.requires_grad, db.requires_grad)
    for name, a, e in (("dx", dx, want[0]), ("db", db, want[1])):
        assert torch.allclose(a, e, rtol=1e-12, atol=0), f"{name}: {a} != {e}"


# ------------------------------------------------------------------ kernels/__init__
def test_all_is_every_public_name():
    """`from kernels import *` gives exactly the public functions and classes kernels re-exports."""
    public = {n for n in dir(kernels) if not n.startswith("_") and not isinstance(getattr(kernels, n), types.ModuleType)}
    assert set(kernels.__all__) == public, (f"in __all__ only: {sorted(set(kernels.__all__) - public)}; "
                                            f"public but not in __all__: {sorted(public - set(kernels.__all__))}")
    namespace = {}
    exec("from kernels import *", namespace)
    assert {"load_plugin", "unload_plugin", "describe", "use"} <= set(namespace), sorted(namespace)


# ------------------------------------------------------------------ plugin loading (kernels.registry)
_BACKEND = ("@kernels.register('attention', '{name}')\n"
            "def {name}(q, k, v, scale=None, causal=False):\n"
            "    return kernels.attention_reference(q, k, v, scale, causal)\n")


def _forget(module: str, backend: str) -> None:
    """Cleanup that holds whatever state a failed assertion left: the plugin, its backend, its module."""
    kernels.unload_plugin(module)
    if backend in kernels.backends("attention"):
        kernels.unregister("attention", backend)
    sys.modules.pop(module, None)


def test_a_plugin_that_failed_after_using_its_backend_leaves_no_memo_of_it(tmp_path):
    """The registry goes back to what it was, and so do the memos dispatch reads (implementation()'s
    functions): a backend the plugin resolved before it raised is not runnable afterwards."""
    path = tmp_path / "smoke.py"
    path.write_text("import kernels\n" + _BACKEND.format(name="smoke_attention")
                    + "kernels.implementation('attention', 'smoke_attention')  # a smoke check\n"
                    + "raise RuntimeError('fails after its smoke check')\n")
    with pytest.raises(RuntimeError, match="fails after its smoke check"):
        kernels.load_plugin(str(path))
    assert "smoke_attention" not in kernels.backends("attention"), kernels.backends("attention")
    with pytest.raises(ValueError, match="op 'attention' has no 'smoke_attention' backend"):
        fn = kernels.implementation("attention", "smoke_attention")
        raise AssertionError(f"implementation() still returns the failed plugin's {fn}")


def test_a_plugin_that_exits_on_import_can_be_loaded_once_fixed(tmp_path):
    """A plugin raising SystemExit (an argparse error at import, say) is forgotten like one raising
    an Exception: once fixed it imports afresh and registers its backend (it was left in
    sys.modules, and loading the fixed file returned {})."""
    path = tmp_path / "exits.py"
    body = "import kernels\n" + _BACKEND.format(name="exits_attention")
    path.write_text(body + "raise SystemExit(2)\n")
    module = registry._plugin_module(str(path))[0]
    try:
        with pytest.raises(SystemExit):
            kernels.load_plugin(str(path))
        assert "exits_attention" not in kernels.backends("attention") and module not in sys.modules
        path.write_text(body)
        got = kernels.load_plugin(str(path))
        assert got == {"attention": ["exits_attention"]}, got
    finally:
        kernels.unload_plugin(str(path))
        _forget(module, "exits_attention")


def test_a_module_imported_before_loading_reports_its_backends(tmp_path, monkeypatch):
    """A plugin module already imported (by the user's own `import`) registered its backends then;
    load_plugin names them all the same, and unload_plugin removes them."""
    (tmp_path / "early_kernels.py").write_text("import kernels\n" + _BACKEND.format(name="early_attention"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        __import__("early_kernels")
        got = kernels.load_plugin("early_kernels")
        assert got == {"attention": ["early_attention"]}, got
        kernels.unload_plugin("early_kernels")
        assert "early_attention" not in kernels.backends("attention") and "early_kernels" not in sys.modules
    finally:
        _forget("early_kernels", "early_attention")


def test_a_plugin_module_missing_a_dependency_names_the_dependency(tmp_path, monkeypatch):
    """A plugin that imports but lacks a module it needs raises that module's own error (not "no
    plugin module on sys.path"), and plugin_error says so with the plugin's line."""
    plugin = tmp_path / "needs_dep.py"
    plugin.write_text("import kernels\nimport no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            kernels.load_plugin("needs_dep")
    finally:
        sys.modules.pop("needs_dep", None)
    e = info.value
    assert e.name == "no_such_dependency_xyz" and str(e) == "No module named 'no_such_dependency_xyz'", (e.name, str(e))
    line = registry.plugin_error("needs_dep", e)
    want = ("plugin needs_dep: loading it raised ModuleNotFoundError: No module named 'no_such_dependency_xyz' "
            f"(at {plugin}:2)")
    assert line == want, line


def test_loading_again_reports_only_backends_still_registered(plugin_file):
    """load_plugin returns what the plugin registered *and is still registered*: after one of its
    backends was unregistered by hand, loading it again (imported once) does not name it."""
    assert kernels.load_plugin(str(plugin_file)) == {"attention": ["plugin_attention"]}
    kernels.unregister("attention", "plugin_attention")
    got = kernels.load_plugin(str(plugin_file))
    assert got == {}, got
