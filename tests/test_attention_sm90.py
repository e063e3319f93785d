"""The Gluon sm_90 attention forward (kernels/attention_sm90.py), a research backend.

Gluon kernels do not run under Triton's interpreter, so on a machine without a GPU this file
checks the backend's registration and the limits it names; tests/test_sm90_compile.py compiles
it for sm_90 and checks the overlap in its loop. Its numerics need an H100/H200: ``-m gpu``, fp16
and bf16, against the fp64 oracle by the rule the built-in kernels are held to (at most 2x torch's
own error in the same dtype, plus a small atol), with a NaN-poisoned output where it applies."""
import re
import sys

import pytest
import torch

import kernels
from kernels import testing
from kernels.attention import attention_reference

NAME = "gluon_sm90"


@pytest.fixture(scope="module")
def sm90():
    """The module imported (which registers the backend), unregistered afterwards so that the
    rest of the session sees the built-in backends only."""
    import kernels.attention_sm90 as module
    yield module
    kernels.unregister("attention", NAME)
    sys.modules.pop("kernels.attention_sm90", None)


def _qkv(b, h, lq, lkv, d, dtype=torch.float16, device="cpu", layout="unet", seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(n):
        if layout == "unet":  # (B, L, H, D) activations viewed as (B, H, L, D)
            return torch.randn(b, n, h, d, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=g).to(device, dtype)
    return t(lq), t(lkv), t(lkv)


def test_named_before_loading_it_says_how_to_load_it():
    """`--kernels attention=gluon_sm90` (a README example) without the plugin said only "has no
    'gluon_sm90' backend"; it names the module to load, which registers that very name."""
    from kernels.registry import SHIPPED_PLUGINS

    assert SHIPPED_PLUGINS == {("attention", NAME): "kernels.attention_sm90"}
    if NAME in kernels.backends("attention"):
        pytest.skip("the plugin is loaded in this session")
    with pytest.raises(ValueError, match=re.escape(
            f"op 'attention' has no '{NAME}' backend (it is registered by the research plugin kernels.attention_sm90: "
            "--plugin kernels.attention_sm90 on the command lines, kernels.load_plugin('kernels.attention_sm90') in "
            "code)")):
        with kernels.use(attention=f"{NAME}/triton"):
            pass


def test_registered_as_a_research_backend(sm90):
    """Switched like any backend, never the default: a CPU input under the default runs the
    reference, and choosing it explicitly names what it needs."""
    assert NAME in kernels.backends("attention")
    q, k, v = _qkv(1, 2, 16, 16, 40)
    kernels.reset_counts()
    kernels.attention(q, k, v)
    assert kernels.counts()[("attention", "reference")] == 1
    why = re.escape(sm90.IMPORT_ERROR) if sm90.IMPORT_ERROR else "needs one CUDA device"
    with kernels.use(attention=NAME), pytest.raises(kernels.BackendUnsupported, match=why):
        kernels.attention(q, k, v)
    if sm90.IMPORT_ERROR is None:
        assert sm90._check(q, k, v) == "inputs on cpu, cpu, cpu; the kernel needs one CUDA device"
    with pytest.raises(kernels.BackendUnsupported, match=f"'{NAME}' \\(called directly\\).*{why}"):
        sm90.attention_gluon_sm90(q, k, v)  # called directly, past the switch
    with pytest.raises(ValueError, match="attention shape mismatch"):  # the op's checks too: k/v of another batch
        sm90.attention_gluon_sm90(q, k[:0], v[:0])


@pytest.mark.parametrize("why, make, expect", [
    ("the UNet's D 40 view", lambda: _qkv(2, 8, 77, 77, 40), None),
    ("a contiguous D 64", lambda: _qkv(1, 2, 50, 33, 64, torch.bfloat16, layout="bhld"), None),
    ("fp32 (no 16-bit wgmma operands)", lambda: _qkv(1, 2, 16, 16, 40, torch.float32), "float16 or all bfloat16"),
    ("mixed dtypes", lambda: (*_qkv(1, 2, 16, 16, 40)[:2], _qkv(1, 2, 16, 16, 40, torch.bfloat16)[2]),
     "float16 or all bfloat16"),
    ("D 12", lambda: _qkv(1, 2, 16, 16, 12), "head dim 12 is not a multiple of 8"),
    ("D 136, over the register budget", lambda: _qkv(1, 2, 16, 16, 136), "head dim 136 .* \\[8, 128\\]"),
    ("a strided head dim", lambda: tuple(t.transpose(2, 3) for t in _qkv(1, 2, 16, 16, 16)), "stride \\d+ along the head dim"),
    ("rows 136 bytes apart", lambda: tuple(t[..., :64] for t in _qkv(1, 2, 16, 16, 68, layout="bhld")),
     "strides .* multiples of 16 bytes"),
    ("q 8 bytes off alignment", lambda: (torch.empty(1 * 2 * 16 * 40 + 4, dtype=torch.float16)[4:].view(1, 2, 16, 40),
                                         *_qkv(1, 2, 16, 16, 40, layout="bhld")[1:]), "not 16-byte aligned"),
    ("no keys", lambda: _qkv(1, 2, 16, 0, 40), "no keys"),
    ("a single query row whose row stride is 88 bytes: masked rows still form addresses",
     lambda: (torch.empty(96, dtype=torch.float16).as_strided((1, 2, 1, 40), (96, 48, 44, 1)),
              *_qkv(1, 2, 1, 16, 40, layout="bhld")[1:]), "q strides .* multiples of 16 bytes"),
    ("B·H·Lq past 2**31 rows of lse (expanded, no memory)",
     lambda: tuple(torch.empty(1, 1, 1, 8, dtype=torch.float16).expand(8191, 8, 32800, 8) for _ in range(3)),
     "32 bits"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_input_limits_are_named(sm90, why, make, expect):
    q, k, v = make()
    got = sm90.input_problem(q, k, v)
    if expect is None:
        assert got is None, f"{why}: refused with {got!r}"
    else:
        assert got is not None, f"{why}: accepted"
        assert re.search(expect, got), f"{why}: {got!r} does not name {expect!r}"


def test_causal_and_bad_scales_are_refused(sm90):
    q, k, v = _qkv(1, 2, 16, 16, 40)
    assert "causal" in sm90.input_problem(q, k, v, causal=True)
    assert "not > 0" in sm90.input_problem(q, k, v, scale=0.0)
    assert "not > 0" in sm90.input_problem(q, k, v, scale=float("nan"))
    # positive, but 0 in fp32 once times log2(e): the softmax branch (on qk_scale > 0) would be skipped
    assert "below fp32's smallest normal" in sm90.input_problem(q, k, v, scale=1e-46)  # the Triton check's words
    assert "past fp32's largest value" in sm90.input_problem(q, k, v, scale=float("inf"))
    assert "requires grad" in sm90.input_problem(q, k, v, scale=torch.tensor(0.3, requires_grad=True))
    assert sm90.input_problem(q, k, v, scale=torch.tensor(0.3)) is None


def test_alignment_is_checked_in_the_dtype_autocast_hands_the_kernel(sm90):
    """fp32 q with fp16 k, v under fp16 autocast: the kernel sees fp16, where a row stride of 44
    elements is 88 bytes. Judged by q's fp32 (4 elements to 16 bytes) it looked aligned."""
    q = torch.randn(1, 2, 16, 40)
    k = torch.randn(1, 2, 16, 44, dtype=torch.float16)[..., :40]
    with torch.autocast("cpu", dtype=torch.float16):
        assert "multiples of 16 bytes (8 elements of torch.float16)" in sm90.input_problem(q, k, k)
        assert sm90.input_problem(q, k.contiguous(), k.contiguous()) is None


def test_config_needs_three_stages(sm90):
    q, k, v = _qkv(1, 2, 16, 16, 40)
    with pytest.raises(ValueError, match="STAGES must be >= 3"):
        sm90._forward(q, k, v, config=(128, 64, 8, 2, True))


# ---------------------------------------------------------------------------------------- GPU
def _hopper(device):
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip(f"{torch.cuda.get_device_name(device)} is not sm_90: the kernel uses Hopper's wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("case", testing.cases("attention", (torch.float16, torch.bfloat16))
                         + testing.cases("attention", (torch.float16, torch.bfloat16), backward=True), ids=str)
def test_equivalence_cases_gpu(sm90, case):
    """The cases every attention backend is held to (the causal one skips with its reason)."""
    _hopper("cuda")
    testing.check(case, NAME, "cuda")


SD_SHAPES = [  # (B, H, Lq, Lkv, D): why
    pytest.param((2, 8, 4096, 4096, 40), id="sd15-512px-self-d40"),
    pytest.param((2, 8, 4096, 77, 40), id="sd15-cross-77-keys"),  # one full block and a masked 13-key one
    pytest.param((2, 5, 4096, 4096, 64), id="sd21-base-self-d64"),
    pytest.param((2, 8, 1024, 1024, 80), id="sd15-level2-d80"),  # D padded to 128
    pytest.param((1, 8, 1000, 33, 40), id="ragged-q-fewer-keys-than-a-block"),  # FIRST_MASKED
    pytest.param((1, 2, 130, 64, 64), id="exactly-one-key-block"),
    pytest.param((1, 2, 200, 130, 64), id="two-blocks-and-a-2-key-tail"),
    pytest.param((3, 3, 77, 1000, 24), id="long-keys-d24"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES)
@pytest.mark.parametrize("layout", ["unet", "bhld"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_sd_shapes_gpu(sm90, shape, layout, dtype):
    """Against fp64, within 2x torch's error; the lse it saves for the backward matches the
    fp64 log2-domain logsumexp (a wrong lse would show only in the gradients)."""
    _hopper("cuda")
    b, h, lq, lkv, d = shape
    q, k, v = _qkv(b, h, lq, lkv, d, dtype, "cuda", layout)
    with torch.no_grad():
        got, lse = sm90._forward(q, k, v)
        torch_out = attention_reference(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    want = torch.softmax(s, -1) @ v.double()
    testing.assert_within_torch_error(got, torch_out, want, name=f"o {shape} {layout} {dtype}")
    lse_want = torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    testing.assert_close(lse, lse_want, atol=1e-3, name=f"lse2 {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES)
@pytest.mark.parametrize("config", [(128, 64, 8, 4, False), (128, 64, 8, 3, True), (128, 64, 8, 3, False)],
                         ids=["early-refill", "3-stages", "3-stages-early-refill"])
def test_forward_other_configs_gpu(sm90, shape, config):
    """The configurations `bench tune --ops attention.gluon_sm90` sweeps beside the default: the K/V
    copy before the QK wgmma instead of after the softmax, and 3 buffers (the fewest the ring allows)."""
    _hopper("cuda")
    b, h, lq, lkv, d = shape
    q, k, v = _qkv(b, h, lq, lkv, d, torch.float16, "cuda", "unet")
    with torch.no_grad():
        got, lse = sm90._forward(q, k, v, config=config)
        torch_out = attention_reference(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    testing.assert_within_torch_error(got, torch_out, torch.softmax(s, -1) @ v.double(), name=f"o {shape} {config}")
    lse_want = torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    testing.assert_close(lse, lse_want, atol=1e-3, name=f"lse2 {shape} {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_and_dispatch_gpu(sm90, dtype):
    """Through the switch, with autograd: the Triton backward from this forward's lse."""
    _hopper("cuda")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 333, 333, 40, dtype, "cuda"))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    kernels.reset_counts()
    with kernels.use(attention=NAME):
        o = kernels.attention(q, k, v)
    assert kernels.counts()[("attention", NAME)] == 1
    got = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(torch.softmax(qd @ kd.transpose(-1, -2) * 40 ** -0.5, -1) @ vd, (qd, kd, vd), do.double())
    ref = torch.autograd.grad(attention_reference(q, k, v), (q, k, v), do)
    for name, g, w, t in zip(("dq", "dk", "dv"), got, want, ref):
        testing.assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


def test_autograd_function_reuses_the_triton_backward(sm90, monkeypatch):
    """The Function's wiring on CPU: with the Triton forward (interpreted) standing in for the Gluon
    one, which saves the same (o, lse2), gradients through _AttentionSm90Fn match the reference's.
    A mismatch between what forward saves / apply passes and what _AttentionFn.backward returns
    fails here; the Gluon forward's own numbers need -m gpu."""
    attention = sys.modules["kernels.attention"]  # (kernels.attention, the attribute, is the op)
    monkeypatch.setattr(sm90, "_forward", lambda q, k, v, scale=None: attention._forward(q, k, v, scale))
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 20, 13, 16, layout="bhld"))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(sm90._AttentionSm90Fn.apply(q, k, v, 0.3, False, {}), (q, k, v), do)
    want = torch.autograd.grad(attention_reference(q, k, v, 0.3), (q, k, v), do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        testing.assert_close(g, w, rel=2e-5, name=name)


def test_compiled_as_one_opaque_op(sm90, monkeypatch):
    """Under torch.compile (fullgraph: no graph break) the backend is torch.ops.sdlab.
    attention_gluon_sm90, not the Gluon launch, which dynamo would take for a Triton kernel for
    Inductor to compile; its gradients come from sdlab::attention_backward; each run of the
    compiled graph counts as one gluon_sm90 call. On CPU the Triton forward (interpreted) stands in
    for the Gluon one, and the backend's check is waived; the wiring is what is tested."""
    from kernels import registry

    attention = sys.modules["kernels.attention"]
    monkeypatch.setattr(sm90, "_forward", lambda q, k, v, scale=None, store_lse=True, config=None:
                        attention._forward(q, k, v, scale, None, False, None, store_lse))
    impl = registry._OPS["attention"][NAME]
    monkeypatch.setitem(registry._OPS["attention"], NAME, registry._Impl(impl.fn, lambda *a, **k: None))
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 20, 13, 16, layout="bhld"))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: kernels.attention(q, k, v, 0.3), fullgraph=True)
    with kernels.use(attention=NAME):
        kernels.reset_counts()
        for _ in range(2):
            o = compiled(q, k, v)
    assert kernels.counts() == {("attention", NAME): 2}, kernels.counts()
    testing.assert_close(o, attention_reference(q, k, v, 0.3), rel=2e-5, name="o")
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(attention_reference(q, k, v, 0.3), (q, k, v), do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        testing.assert_close(g, w, rel=2e-5, name=name)


@pytest.mark.gpu
def test_compiled_gpu(sm90):
    """torch.compile(fullgraph) around the Gluon forward on a Hopper GPU: the same output as the
    eager backend's (one opaque op runs the same launch), and a gradient through it."""
    _hopper("cuda")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 8, 256, 77, 40, torch.float16, "cuda"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: kernels.attention(q, k, v), fullgraph=True)
    with kernels.use(attention=NAME):
        eager, got = kernels.attention(q, k, v), compiled(q, k, v)
    assert torch.equal(got, eager), (got - eager).abs().max()
    dq, = torch.autograd.grad(got.float().square().sum(), (q,))
    want, = torch.autograd.grad(attention_reference(q, k, v).float().square().sum(), (q,))
    testing.assert_close(dq, want, rel=testing.GRAD_REL_HALF, name="dq")
