"""Test setup: the `gpu` marker skips cleanly without a CUDA device, a test taking ``device`` runs
on the CPU and (marked gpu) on CUDA, and every test starts from the default backend choice.
TRITON_INTERPRET (no GPU) and --sdlab-plugin are set up by the repository's root conftest.py,
which pytest loads first."""
import os
import sys

import pytest
import torch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _parametrizes(definition, name: str) -> bool:
    for mark in definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs["argnames"]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


def pytest_generate_tests(metafunc):
    """A test taking ``device`` runs on each: the CPU (Triton interpreted) and CUDA, marked gpu, so
    that `pytest -m gpu` compiles its cases for real too. A test marked gpu runs on CUDA only; one
    that parametrises ``device`` itself keeps its own values."""
    if "device" not in metafunc.fixturenames or _parametrizes(metafunc.definition, "device"):
        return
    cuda = pytest.param(CUDA, id="cuda", marks=pytest.mark.gpu)
    gpu_only = metafunc.definition.get_closest_marker("gpu") is not None
    metafunc.parametrize("device", [cuda] if gpu_only else [pytest.param(CPU, id="cpu"), cuda])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():  # Triton compiles here, for CUDA tensors only: the CUDA cases stand in
        if os.environ.get("TRITON_INTERPRET") != "1":
            skip = pytest.mark.skip(reason="Triton runs compiled here, on CUDA tensors: the case's cuda variant "
                                           "runs it (set TRITON_INTERPRET=1 to run the cpu one)")
            for item in items:
                if getattr(item, "callspec", None) is not None and item.callspec.params.get("device") == CPU:
                    item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_kernel_choice(monkeypatch):
    """Every test starts from the default backend choice (whatever SDLAB_KERNELS the shell set),
    zeroed dispatch counters, and no fallback warned of yet (each is warned of once per process: a
    test expecting one failed after another test had triggered it), with torch's global generator
    seeded (a test drawing from it gets the same inputs alone as in any order of the suite); and
    leaves no kernels.use() scope open."""
    import kernels
    from kernels import registry

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    kernels.set_backend()
    kernels.reset_counts()
    registry._WARNED.clear()
    torch.manual_seed(0)
    yield
    kernels.set_backend()
    assert not registry._SCOPES, f"the test left kernels.use() scopes open: {registry._SCOPES}"


@pytest.fixture(scope="session")
def image():
    """A smooth 64 x 64 RGB test image (no flat regions, so the VAE sees structure), for the
    pipeline tests (test_pipelines.py, test_inpaint.py)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6.28 * (xx + yy))], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


PLUGIN = """
import kernels

@kernels.register("attention", "plugin_attention")
def plugin_attention(q, k, v, scale=None, causal=False):
    return kernels.attention_reference(q, k, v, scale, causal)
"""


@pytest.fixture
def gluon_sweep():
    """A bench command with ``--plugin kernels.attention_sm90`` or ``--ops attention.gluon_sm90``
    imports the plugin, which registers its backend: it is unregistered afterwards (where this test
    imported it), so that the rest of the session sees the built-in backends only."""
    import kernels

    imported = "kernels.attention_sm90" in sys.modules
    yield
    if not imported:
        kernels.unload_plugin("kernels.attention_sm90")  # loaded through load_plugin: its record goes too
        if "gluon_sm90" in kernels.backends("attention"):  # imported otherwise (bench tune imports it)
            kernels.unregister("attention", "gluon_sm90")
        sys.modules.pop("kernels.attention_sm90", None)
        # a record left behind made a later load_plugin of it register nothing ("registered no backend")
        assert "kernels.attention_sm90" not in kernels.registry._PLUGINS


@pytest.fixture
def plugin_file(tmp_path):
    """A research-backend plugin file registering attention's 'plugin_attention' (the reference
    under another name); unregistered and forgotten afterwards, so each test loads it afresh."""
    import kernels

    path = tmp_path / "plugin_kernels.py"
    path.write_text(PLUGIN)
    yield path
    kernels.unload_plugin(str(path))


@pytest.fixture
def norm_eps_mismatches():
    """``check(ours, theirs, key_map)`` -> (norms compared, mismatches): every GroupNorm and
    LayerNorm of our model against the diffusers module its weight converts to (``key_map``: our
    key -> diffusers key). An eps is invisible to oracle tests at O(1) activations (1e-6 against
    1e-5 moves them ~1e-6), so it is compared as what it is: a constant of each norm."""
    def check(ours: torch.nn.Module, theirs: torch.nn.Module, key_map: dict) -> tuple[int, list[str]]:
        pairs = [(name, m, key_map[f"{name}.weight"].removesuffix(".weight")) for name, m in ours.named_modules()
                 if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        bad = [f"{name} eps {m.eps:g} != diffusers' {path} eps {theirs.get_submodule(path).eps:g}"
               for name, m, path in pairs if m.eps != theirs.get_submodule(path).eps]
        return len(pairs), bad
    return check
