"""torch.compile through the Triton backends: while dynamo traces, each Triton backend calls its
opaque ``torch.ops.sdlab`` op (a shape function for tracing, the eager launches when the graph
runs), so a compiled or exported UNet holds one op per GroupNorm and attention call, runs the
kernels, and agrees with the reference.

The ops are held to ``torch.library.opcheck`` (schema, the fake tensors' shapes and strides
against the real outputs', autograd registration, AOTAutograd), on the layouts the UNet passes
(channels_last, the (B, L, H, D) view of q) and on each optional input left out. The compiled
runs use the interpreter on CPU: every kernel runs for real, on small odd shapes."""
import collections
import itertools
import warnings

import pytest
import torch

import kernels
from kernels import StepCoefficients, registry
from kernels.testing import assert_close
from sdcore import SDConfig, StableDiffusion

OPS = torch.ops.sdlab
OPCHECK = {"test_schema": "SUCCESS", "test_autograd_registration": "SUCCESS", "test_faketensor": "SUCCESS",
           "test_aot_dispatch_dynamic": "SUCCESS"}


_SEEDS = itertools.count(1)  # a fresh seed per tensor: inputs differ from each other, runs repeat


def _randn(*shape, grad=False, dtype=torch.float32):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(next(_SEEDS))).to(dtype)
    return t.requires_grad_(grad)


def _gn_inputs(case):
    """(x, weight, bias) for group_norm_silu's op, 8 channels in 2 groups on 3x5 (odd, tiny: the
    interpreter runs one program at a time)."""
    grad = case != "no_grad"
    x = _randn(1, 8, 3, 5, grad=grad)
    w, b = _randn(8, grad=grad), _randn(8, grad=grad)
    if case == "channels_last":  # the fake output must keep x's memory format as empty_like does
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    if case == "no_weight":
        w = None
    if case == "2d":  # (N, C): no spatial dims
        x = _randn(3, 8, grad=True)
    if case == "fp16_to_fp32":  # CUDA autocast's case: 16-bit x, fp32 y
        x = _randn(1, 8, 3, 5, dtype=torch.float16, grad=True)
    return x, w, b


@pytest.mark.parametrize("case", ["nchw", "channels_last", "no_weight", "2d", "fp16_to_fp32", "no_grad"])
def test_group_norm_silu_op_passes_opcheck(case):
    x, w, b = _gn_inputs(case)
    y_dtype = torch.float32 if case == "fp16_to_fp32" else x.dtype
    save = case != "no_grad"
    got = torch.library.opcheck(OPS.group_norm_silu.default, (x, w, b, 2, 1e-5, case != "no_weight", y_dtype, save))
    assert got == OPCHECK, got


@pytest.mark.parametrize("need", [(True, True), (False, True), (True, False)], ids=["both", "dbias", "dweight"])
def test_group_norm_silu_backward_op_passes_opcheck(need):
    x, w, b = (t.detach() for t in _gn_inputs("channels_last"))
    stats = OPS.group_norm_silu(x, w, b, 2, 1e-5, True, x.dtype, True)[1]
    dy = _randn(1, 8, 3, 5)
    got = torch.library.opcheck(OPS.group_norm_silu_backward.default, (dy, x, w, b, stats, 2, 1e-5, True, *need))
    assert got == OPCHECK, got


def _qkv(grad=True):
    """q as the UNet's (B, L, H, D) projection viewed (B, H, L, D); 9 queries, 13 keys, head dim 16."""
    q = _randn(2, 9, 2, 16).transpose(1, 2).requires_grad_(grad)
    return q, _randn(2, 2, 13, 16, grad=grad), _randn(2, 2, 13, 16, grad=grad)


@pytest.mark.parametrize("scale, causal, save", [(None, False, True), (0.3, True, True), (None, False, False)])
def test_attention_ops_pass_opcheck(scale, causal, save):
    q, k, v = _qkv(grad=save)
    got = torch.library.opcheck(OPS.attention.default, (q, k, v, scale, causal, save))
    assert got == OPCHECK, got
    if save:
        o, lse = OPS.attention(*(t.detach() for t in (q, k, v)), scale, causal, True)
        args = (torch.randn_like(o), *(t.detach() for t in (q, k, v)), o, lse, scale, causal)
        got = torch.library.opcheck(OPS.attention_backward.default, args)
        assert got == OPCHECK, got


@pytest.mark.parametrize("optional", [True, False], ids=["every_input", "none"])
def test_scheduler_step_op_passes_opcheck(optional):
    x, out, uncond, noise, prev_x0, known = (_randn(2, 4, 3, 5) for _ in range(6))
    mask = _randn(2, 1, 3, 5) > 0  # a bool mask, broadcast over channels
    rest = (uncond, noise, prev_x0, mask, known) if optional else (None,) * 5
    coeffs = [1.2, -0.4, 1.1, 1.0, 0.3, 0.2, 0.1, 1.0, 0.5, 0.6, 0.2, 0.1, 0.05] if optional else [0.5] * 13
    args = (x, out, *rest, 7.5 if optional else 1.0, coeffs, optional, optional)
    got = torch.library.opcheck(OPS.scheduler_step.default, args)
    assert got == OPCHECK, got


def _block(x, w, b, q, k, v, step_x, step_out, uncond, mask, known):
    """GroupNorm+SiLU, attention and a RePaint-blended CFG DDIM step, as the UNet and sampler call them."""
    y = kernels.group_norm_silu(x, w, b, 2)
    o = kernels.attention(q, k, v, scale=0.3)  # a caller's scale, which the backward must keep
    coeffs = StepCoefficients(a_x=1.25, a_o=-0.75, c0=0.8, c1=0.6)
    prev, x0 = kernels.scheduler_step(step_x, step_out, coeffs, model_output_uncond=uncond, guidance_scale=7.5,
                                      mask=mask, known=known, return_x0=True)
    plain, none = kernels.scheduler_step(step_x, step_out, coeffs)
    assert none is None  # no x0 asked for: None, as in eager
    return y, o, prev, x0, plain


def _block_inputs(grad):
    x, w, b = _gn_inputs("channels_last" if grad else "no_grad")
    q, k, v = _qkv(grad)
    step = [_randn(2, 4, 3, 5) for _ in range(4)]
    return (x, w, b, q, k, v, *step[:3], _randn(2, 1, 3, 5) > 0, step[3])


def test_compiled_triton_ops_run_the_kernels_and_match_the_reference():
    """Inductor (fullgraph: no graph break) around the three Triton ops: values and gradients as
    the reference's, and every run counted as a triton call of each op (tracing is not a call)."""
    inputs = _block_inputs(grad=True)
    with kernels.use("reference"):
        want = _block(*inputs)
        grads_want = torch.autograd.grad(want[0].sum() + (want[1] ** 2).sum(), inputs[:6])
    compiled = torch.compile(_block, fullgraph=True)
    with kernels.use("triton"):
        eager = _block(*inputs)
        kernels.reset_counts()
        for _ in range(2):
            got = compiled(*inputs)
    assert kernels.counts() == {("group_norm_silu", "triton"): 2, ("attention", "triton"): 2,
                                ("scheduler_step", "triton"): 4}, kernels.counts()
    for name, g, e, w in zip(("group_norm_silu", "attention", "prev", "x0", "prev without CFG"), got, eager, want):
        # the layouts eager triton gives (channels_last y, o in q's (B, L, H, D) layout), not the reference's
        assert g.stride() == e.stride(), f"{name}: strides {g.stride()} != eager triton's {e.stride()}"
        assert_close(g, w, rel=1e-5, name=f"compiled triton {name}")
    grads = torch.autograd.grad(got[0].sum() + (got[1] ** 2).sum(), inputs[:6])
    for name, g, w in zip(("dx", "dweight", "dbias", "dq", "dk", "dv"), grads, grads_want):
        assert_close(g, w, rel=1e-5, name=f"compiled triton {name}")


def test_dynamic_shapes_trace_once_for_every_size():
    """torch.compile(dynamic=True): the ops' shape functions take symbolic sizes, so new latent
    sizes and token counts reuse one graph (the input checks guard on ranges, not on values)."""
    from torch._dynamo.utils import counters

    def f(x, w, b, q, k, v):
        return kernels.group_norm_silu(x, w, b, 2), kernels.attention(q, k, v)

    w, b = _randn(8), _randn(8)
    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    counters.clear()
    with kernels.use("triton"):
        for hw, lq in ((3, 9), (5, 11), (4, 6)):  # odd and even sides and query counts
            x, q, k = _randn(1, 8, hw, hw + 1), _randn(1, 2, lq, 16), _randn(1, 2, 7, 16)
            y, o = compiled(x, w, b, q, k, k)
            assert_close(y, kernels.group_norm_silu_reference(x, w, b, 2), rel=1e-5, name=f"group_norm_silu {hw}")
            assert_close(o, kernels.attention_reference(q, k, k), rel=1e-5, name=f"attention Lq={lq}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_inductor_compiles_the_spatial_transformer_with_dynamic_shapes():
    """torch.compile(dynamic=True) with Inductor of a strided conv into sdcore's SpatialTransformer
    (the tiny UNet's 64 channels, batch 2, 7 context tokens, a 7x5 latent): the residual sums took
    the layout of the conv output's token view, and Inductor failed lowering proj_out on it
    (ValueRangeError: Invalid ranges [0:-1]); so did a whole compiled UNet at its second latent
    size, where diffusers' compiled. One compile, about 25 s on a CPU."""
    from sdcore.unet import SpatialTransformer

    torch.manual_seed(0)
    conv, st = torch.nn.Conv2d(4, 64, 3, stride=2, padding=1), SpatialTransformer(64, SDConfig.preset("tiny").unet)

    def f(x, ctx):
        return st(conv(x), ctx)

    x, ctx = _randn(2, 4, 7, 5), _randn(2, 7, 32)
    with torch.no_grad(), kernels.use("reference"):
        assert_close(torch.compile(f, dynamic=True)(x, ctx), f(x, ctx), rel=1e-5, name="compiled vs eager")


def test_export_holds_one_op_per_call_and_runs_nothing():
    """torch.export (strict: dynamo, any graph break fails) of a UNet with every op on triton: one
    sdlab op per GroupNorm and attention call the eager reference makes, and no kernel runs while
    tracing."""
    unet = StableDiffusion.from_config(SDConfig.preset("tiny"), seed=0).unet
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 32))
    with torch.no_grad(), kernels.use("reference"):
        unet(*args)
    calls = {op: n for (op, _), n in kernels.counts().items()}
    kernels.reset_counts()
    registry._FNS.clear()  # the backends' memo, first filled while tracing: no side effect for dynamo to replay
    with torch.no_grad(), kernels.use("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = torch.export.export(unet, args, strict=True).graph
    assert not [str(w.message) for w in caught if "side effect" in str(w.message)], "tracing mutated module state"
    nodes = collections.Counter(n.target for n in graph.nodes if n.op == "call_function")
    assert calls == {"group_norm_silu": 30, "attention": 14}, calls  # the tiny UNet's, as it is built
    assert nodes[OPS.group_norm_silu.default] == calls["group_norm_silu"], nodes
    assert nodes[OPS.attention.default] == calls["attention"], nodes
    assert not any(n for n in nodes if "group_norm" in str(n) and n is not OPS.group_norm_silu.default), nodes
    assert kernels.counts() == {}, "a kernel ran while tracing"


def test_out_and_config_calls_run_eagerly_under_compile():
    """out= (a write into the caller's memory, with its overlap checks) and config= (a sweep's
    tiling) are eager calls: under torch.compile each runs outside the graph (no sdlab op runs
    them), and gives what it gives in eager (the overlap error included)."""
    from kernels.attention import AttentionConfig, attention_triton
    from kernels.group_norm_silu import group_norm_silu_triton, launch_config

    x, w, b = (t.detach() for t in _gn_inputs("nchw"))
    q, k, v = (t.detach() for t in _qkv(False))
    xs, out = _randn(2, 4, 3, 5), _randn(2, 4, 3, 5)
    gn_config, attn_config = launch_config(x.shape, 2, x.dtype, single_pass=False), AttentionConfig(16, 16, 4, 1)

    def f(y, o, p):
        group_norm_silu_triton(x, w, b, 2, out=y)
        attention_triton(q, k, v, out=o)
        kernels.implementation("scheduler_step", "triton")(xs, out, StepCoefficients(a_x=1.0, c0=1.0), out=p)
        y2 = group_norm_silu_triton(x, w, b, 2, config=gn_config)
        o2 = attention_triton(q, k, v, config=attn_config)
        return y2, o2

    bufs = [torch.full_like(t, float("nan")) for t in (x, q, xs)]
    kernels.reset_counts()
    y2, o2 = torch.compile(f, backend="aot_eager")(*bufs)
    assert kernels.counts() == {}, f"an sdlab op ran (direct calls are not counted): {kernels.counts()}"
    want_y, want_o = kernels.group_norm_silu_reference(x, w, b, 2), kernels.attention_reference(q, k, v)
    for name, got, want in (("out=", bufs[0], want_y), ("config=", y2, want_y)):
        assert_close(got, want, rel=1e-5, name=f"group_norm_silu {name}")
    for name, got, want in (("out=", bufs[1], want_o), ("config=", o2, want_o)):
        assert_close(got, want, rel=1e-5, name=f"attention {name}")
    assert torch.equal(bufs[2], xs), "scheduler_step out=: prev = 1 * x0 = x"
    with pytest.raises(ValueError, match="out overlaps x"):
        torch.compile(lambda: group_norm_silu_triton(x, w, b, 2, out=x), backend="aot_eager")()


@pytest.mark.parametrize("variant, backend", [("triton@compile", "triton"), ("compile", "reference")])
def test_bench_compile_variants_compile_the_unet_under_their_backends(variant, backend, monkeypatch):
    """`bench pipelines`' UNet-step baselines `compile` and `triton@compile`: torch.compile of the
    UNet, run inside an all-reference or all-triton scope (dynamo guards on it, so the scope at the
    first call is what gets compiled). torch.compile is a recorder here and the UNet a stand-in
    that makes one attention call: no minutes of Inductor on CPU."""
    from bench import pipelines as bp

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    q, k, v = (t.detach() for t in _qkv(False))
    unet = lambda x, t, ctx: kernels.attention(q, k, v)  # noqa: E731
    opts = bp.Options(preset="tiny", ckpt=None, pipelines=[], steps=2, batch=1, repeats=1, warmup=0,
                      dtype=torch.float32, unet_only=True, variants=[variant], quick=False)
    scope, fn, note, triton_ops = bp._unet_variant(variant, unet, None, None, None, None, opts, torch.device("cpu"))
    assert compiled == [unet], compiled
    with scope():
        fn()
    assert kernels.counts() == {("attention", backend): 1}, kernels.counts()
    assert ("torch.ops.sdlab" in note) == (variant == "triton@compile"), note
    assert set(triton_ops) == ({"group_norm_silu", "attention", "scheduler_step"} if backend == "triton" else set())
    quick = bp.Options(**{**opts.__dict__, "quick": True})
    with pytest.raises(bp.Skip, match="compiling the UNet takes minutes"):
        bp._unet_variant(variant, unet, None, None, None, None, quick, torch.device("cpu"))


@pytest.mark.gpu
def test_compiled_sd15_unet_with_triton_matches_eager_triton():
    """The SD 1.5 UNet compiled (Inductor around the Triton ops) against the same UNet eager with
    the Triton kernels, fp16 (one compile: about a minute): the kernels are the same launches, so
    only Inductor's fusions of the rest differ; their fp16 rounding keeps the step within 1e-2 of
    its largest value."""
    dtype = torch.float16
    unet = StableDiffusion.from_config(SDConfig.preset("sd15"), seed=0, device="cuda", dtype=dtype).unet
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=dtype, generator=g)
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=dtype, generator=g)
    t = torch.tensor([500, 500], device="cuda")
    with torch.no_grad(), kernels.use("triton"):
        eager = unet(x, t, ctx).float()
        calls = kernels.counts()
        kernels.reset_counts()
        compiled = torch.compile(unet)(x, t, ctx).float()
    assert calls == {("group_norm_silu", "triton"): 61, ("attention", "triton"): 32}, calls  # SD 1.5's
    assert kernels.counts() == calls, f"compiled {kernels.counts()} != eager {calls}"
    err = ((compiled - eager).abs().max() / eager.abs().max()).item()
    assert err < 1e-2, f"compiled vs eager triton UNet step: {err:.2e} of the largest value"
