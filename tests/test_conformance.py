"""Every backend of every op against the equivalence cases of kernels.testing: the built-in ones
(triton interpreted on CPU, sdpa) and any research backend a ``--sdlab-plugin`` registered, e.g.
``pytest tests/test_conformance.py --sdlab-plugin my_kernels.py``. Deliberately wrong research
backends show the cases catch what they should; the plugin loader and the registry's research
names are tested here too."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import testing

OPS = ("attention", "group_norm_silu", "scheduler_step")
SKIP = ("reference", "compile")  # the oracle itself; torch.compile of it (minutes of compiling on CPU)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _params(backward: bool):
    return [pytest.param(b, c, id=f"{b}-{c}") for op in OPS for b in kernels.backends(op) if b not in SKIP
            for c in testing.cases(op, backward=backward)]


_RAN: dict[str, list[int]] = {}  # backend -> [forward cases started, forward cases that ran]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", _params(False))
def test_forward(backend, case, device):
    tally = _RAN.setdefault(backend, [0, 0])
    tally[0] += 1
    testing.check(case, backend, device)
    tally[1] += 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", _params(True))
def test_backward(backend, case, device):
    testing.check(case, backend, device)


def _compiled_params(backward: bool):
    """fp32 on CPU (each case a fresh trace, and Triton interpreted); every dtype on CUDA."""
    devices = (("cpu", (torch.float32,), ()), ("cuda", testing.DTYPES, pytest.mark.gpu))
    return [pytest.param(b, c, d, id=f"{b}-{c}-{d}", marks=marks) for op in OPS for b in kernels.backends(op)
            if b not in SKIP for d, dtypes, marks in devices for c in testing.cases(op, dtypes, backward=backward)]


@pytest.mark.parametrize("backend,case,device", _compiled_params(False))
def test_forward_compiled(backend, case, device):
    """Every backend inside torch.compile (fullgraph, AOTAutograd): the Triton ones as their
    torch.ops.sdlab ops, sdpa and research backends traced into the graph."""
    testing.check(case, backend, device, compiled=True)


@pytest.mark.parametrize("backend,case,device", _compiled_params(True))
def test_backward_compiled(backend, case, device):
    testing.check(case, backend, device, compiled=True)


def _built_in_params():
    return [pytest.param(b, c, id=f"{b}-{c}") for op in OPS for b in kernels.backends(op)
            if b in ("reference", "triton", "sdpa") for bwd in (False, True)
            for c in testing.cases(op, torch.float32, backward=bwd)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", _built_in_params())
def test_built_in_backends_read_nothing_on_the_host(backend, case, device):
    """A call through the switch, forward and backward, reads no tensor's value on the host and
    makes no tensor from Python data (testing.HostReads; on CUDA, torch's sync debug mode too):
    each would be a host sync in every UNet layer or sampling step on a GPU."""
    args, kwargs = testing._to(case.make(torch.Generator().manual_seed(0), case.dtype), device=device)
    inputs = testing._named_inputs(case.op, args)
    for name in case.grads:
        inputs[name].requires_grad_(True)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with testing.HostReads() as reads, kernels.use(**{case.op: backend}), torch.enable_grad():
            out = getattr(kernels, case.op)(*args, **kwargs)
            if case.grads:
                torch.autograd.grad(out, [inputs[n] for n in case.grads], torch.ones_like(out))
    finally:  # every built-in backend takes these fp32 cases: a refusal fails here, not a skip
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert not reads.seen, f"{backend} on {case}: host reads {dict(reads.seen)}"


@pytest.mark.parametrize("backend", [b for op in OPS for b in kernels.backends(op) if b not in SKIP])
def test_a_backend_ran_some_of_its_cases(backend):
    """After this file's forward cases (run first, in file order): a backend whose check refused
    every one of them passed with "N skipped" and exit code 0, though nothing was tested."""
    started, ran = _RAN.get(backend, [0, 0])
    if not started:
        pytest.skip(f"no forward case of {backend!r} was selected in this run")
    assert ran, (f"{backend!r}: every one of its {started} forward cases was skipped (its check refused each "
                 "input: see the skip reasons); nothing of it was tested")


# ------------------------------------------------------------------ the cases can fail
@pytest.fixture
def research():
    """Register research backends for one test; removed afterwards."""
    added = []

    def add(op, name, fn, **kw):
        kernels.register(op, name, **kw)(fn)
        added.append((op, name))

    yield add
    for op, name in added:
        kernels.unregister(op, name)


def _case(op, name, dtype=torch.float32, backward=False):
    return next(c for c in testing.cases(op, (dtype,), backward) if c.name == name)


def test_a_graph_break_fails_compiled(research):
    """A backend that reads a value back to the host (a graph break) passes eager and fails compiled."""
    def host_read(q, k, v, scale=None, causal=False):
        s = q.abs().max().tolist() * 0 + (q.shape[-1] ** -0.5 if scale is None else scale)  # a host read
        return kernels.attention_reference(q, k, v, s, causal)

    research("attention", "host_read", host_read)
    case = _case("attention", "d64-64x64")
    testing.check(case, "host_read", "cpu")
    with pytest.raises(Exception, match="tolist"):  # dynamo's Unsupported, naming the call
        testing.check(case, "host_read", "cpu", compiled=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_refused_input_skips_with_the_reason(research, compiled):
    """A backend whose check refuses the case skips it, compiled as in eager (under dynamo the
    refusal would surface as a tracing error, so it is asked first)."""
    research("attention", "upto16", lambda q, k, v, scale=None, causal=False: kernels.attention_reference(q, k, v),
             check=lambda q, k, v, scale=None, causal=False: f"head dim {q.shape[-1]} over 16")
    with pytest.raises(pytest.skip.Exception, match="head dim 64 over 16"):
        testing.check(_case("attention", "d64-64x64"), "upto16", "cpu", compiled=compiled)


def test_a_wrong_scale_fails(research):
    """1% off the softmax scale is far outside fp32's 2e-5."""
    def off(q, k, v, scale=None, causal=False):
        return kernels.attention_reference(q, k, v, 1.01 / math.sqrt(q.shape[-1]), causal)

    research("attention", "wrong_scale", off)
    with pytest.raises(AssertionError, match=r"attention-d64-64x64-fp32 .*max rel err"):
        testing.check(_case("attention", "d64-64x64"), "wrong_scale", "cpu")


def test_an_unbiased_variance_fails(research):
    """var over n - 1 instead of n: 0.5% at a 189-element group."""
    def unbiased(x, weight, bias, groups, eps=1e-5, activation="silu"):
        n, c = x.shape[:2]
        xg = x.float().reshape(n, groups, -1)
        y = ((xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, keepdim=True) + eps).sqrt()).reshape(x.shape)
        y = y * weight.float()[:, None, None] + bias.float()[:, None, None]
        return (torch.nn.functional.silu(y) if activation == "silu" else y).to(x.dtype)

    research("group_norm_silu", "unbiased", unbiased)
    with pytest.raises(AssertionError, match="group_norm_silu-c96-g32-7x9-fp32"):
        testing.check(_case("group_norm_silu", "c96-g32-7x9"), "unbiased", "cpu")


def test_a_dropped_noise_term_fails(research):
    def no_noise(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0, noise=None, *rest):
        return kernels.scheduler_step_reference(x, model_output, dataclasses.replace(coeffs, sigma=0.0),
                                                model_output_uncond, guidance_scale, None, *rest)

    research("scheduler_step", "no_noise", no_noise)
    with pytest.raises(AssertionError, match="prev"):
        testing.check(_case("scheduler_step", "ddpm-clip-noise"), "no_noise", "cpu")


@pytest.mark.parametrize("op, case", [("attention", "d40-77x77"), ("group_norm_silu", "c96-g32-7x9")])
def test_a_half_precision_backend_in_bf16_fails_at_fp16(research, op, case):
    """fp16 in, computed in bf16 (3 mantissa bits fewer), fp16 out: about 8x torch's fp16 error."""
    reference = getattr(kernels, f"{op}_reference")

    def in_bf16(*args, **kwargs):
        bf = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a for a in args]
        return reference(*bf, **kwargs).to(args[0].dtype)

    research(op, "in_bf16", in_bf16)
    testing.check(_case(op, case, torch.bfloat16), "in_bf16", "cpu")  # right for bf16
    with pytest.raises(AssertionError, match="torch's"):
        testing.check(_case(op, case, torch.float16), "in_bf16", "cpu")


def test_a_backend_that_raises_fails_rather_than_skips(research):
    """Only the backend's own refusal (BackendUnsupported) skips a case; any other error is a failure."""
    def broken(q, k, v, scale=None, causal=False):
        raise RuntimeError("illegal memory access")

    research("attention", "broken", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        try:
            testing.check(_case("attention", "d64-64x64"), "broken", "cpu")
        except pytest.skip.Exception as e:  # a skip would report this test as skipped, not failed
            pytest.fail(f"a backend's error was turned into a skip: {e}")


def test_a_forward_only_backend_fails_the_backward_cases(research):
    research("attention", "no_grad", lambda q, k, v, scale=None, causal=False:
             kernels.attention_reference(q, k, v, scale, causal).detach())
    with pytest.raises(AssertionError, match="no backward"):
        testing.check(_case("attention", "d64-64x64", backward=True), "no_grad", "cpu")


def _grad_off(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` unchanged in the forward; its gradient multiplied by ``factor`` in the backward."""
    class Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return factor * g

    return Off.apply(t)


def test_a_wrong_gradient_fails(research):
    def fn(x, weight, bias, groups, eps=1e-5, activation="silu"):
        return kernels.group_norm_silu_reference(_grad_off(x, 1.01), weight, bias, groups, eps, activation)

    research("group_norm_silu", "bad_grad", fn)
    testing.check(_case("group_norm_silu", "c40-g4-plain"), "bad_grad", "cpu")  # the forward is right
    with pytest.raises(AssertionError, match="dx"):
        testing.check(_case("group_norm_silu", "c40-g4-plain", backward=True), "bad_grad", "cpu")


def test_a_refusing_backend_is_skipped_with_its_reason(research):
    research("attention", "fp32_only", kernels.attention_reference,
             check=lambda q, *a, **kw: None if q.dtype == torch.float32 else f"{q.dtype} is not supported")
    with pytest.raises(pytest.skip.Exception, match="float16 is not supported"):
        testing.check(_case("attention", "d64-64x64", torch.float16), "fp32_only", "cpu")


def test_unknown_op_has_no_cases():
    with pytest.raises(ValueError, match="ops with cases: attention"):
        testing.cases("conv2d")


def test_cases_take_the_three_dtypes_only():
    """An fp64 case would be judged against itself; a single dtype is taken as one."""
    with pytest.raises(ValueError, match="got torch.float64"):
        testing.cases("attention", dtypes=(torch.float64,))
    assert {c.dtype for c in testing.cases("attention", dtypes=torch.float16)} == {torch.float16}


def test_every_backward_case_compares_gradients():
    """A ``-bwd`` case without gradient inputs would re-run the forward check under a backward name."""
    for op in OPS:
        bwd = testing.cases(op, backward=True)
        assert all(c.backward and c.grads for c in bwd), [str(c) for c in bwd if not c.grads]
        assert {c.name for c in bwd} == {c.name for c in testing.cases(op) if c.grads}, op
    assert testing.cases("scheduler_step", backward=True) == [], "the step has no backward"


def test_the_cases_build_what_their_reasons_say():
    """A case whose input lost its point (the offset, the layout, the strided view, the broadcast
    mask) would still pass every backend, testing nothing it claims."""
    def inputs(op, name):
        case = _case(op, name)
        return case.make(torch.Generator().manual_seed(0), torch.float32)

    (x, *_), _ = inputs("group_norm_silu", "c64-g32-offset")
    assert abs(x.mean().item() - 3.0) < 0.2 and abs(x.std().item() - 1.0) < 0.2, (x.mean(), x.std())
    (x, *_), _ = inputs("group_norm_silu", "c64-g32-nhwc")
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(), x.stride()
    (x, w, b, _), kw = inputs("group_norm_silu", "c32-g32-noaffine")
    assert w is None and b is None, (w, b)
    assert inputs("group_norm_silu", "c40-g4-plain")[1]["activation"] is None
    (q, k, v), _ = inputs("attention", "d40-blhd")
    b_, h, lq, d = q.shape  # a (B, L, H, D) buffer viewed as (B, H, L, D): heads D apart, tokens H * D
    assert q.stride() == (lq * h * d, d, h * d, 1) and k.stride()[1:] == (d, h * d, 1), (q.stride(), k.stride())
    assert inputs("attention", "d64-causal")[1] == dict(causal=True)
    assert inputs("attention", "d64-scale")[1] == dict(scale=0.3)
    (x, _, _), kw = inputs("scheduler_step", "repaint")
    assert kw["mask"].shape == (x.shape[0], 1, *x.shape[2:]) and set(kw["mask"].unique().tolist()) == {0.0, 1.0}, \
        kw["mask"].shape
    assert {"model_output_uncond", "noise", "known"} <= set(kw), sorted(kw)
    (q, k, _), _ = inputs("attention", "d64-big-logits")
    assert (q @ k.transpose(-1, -2)).abs().max() * q.shape[-1] ** -0.5 > 60, "no logit near 100"
    (x, *_), _ = inputs("group_norm_silu", "c64-g32-lowvar")
    assert abs(x.std().item() - 0.01) < 2e-3, x.std()
    assert inputs("scheduler_step", "renoise-no-x0")[1]["return_x0"] is False
    (x, _, _), kw = inputs("scheduler_step", "ddim-out")
    assert kw["out"].shape == kw["out_x0"].shape == x.shape and kw["out"].isnan().all(), sorted(kw)


def test_the_oracle_runs_in_fp64(monkeypatch):
    """fp32 cases are judged against the reference on fp64 copies: against an fp32 reference, an fp32
    kernel's error would be measured against another fp32 rounding."""
    seen = []
    run = testing._run

    def spy(op, backend, args, kwargs, *rest):
        seen.append((str(backend), args[0].dtype))
        return run(op, backend, args, kwargs, *rest)

    monkeypatch.setattr(testing, "_run", spy)
    testing.check(_case("group_norm_silu", "c96-g32-7x9"), "reference", "cpu")
    assert ("reference", torch.float64) in seen, seen


def test_a_backend_dtype_other_than_the_references_fails(research):
    """fp16 in, fp32 out (exact values): the output dtype is part of an op's contract."""
    def fp32_out(x, weight, bias, groups, eps=1e-5, activation="silu"):
        return kernels.group_norm_silu_reference(x.float(), weight.float(), bias.float(), groups, eps, activation)

    research("group_norm_silu", "fp32_out", fp32_out)
    with pytest.raises(AssertionError, match="out dtype torch.float32, the reference returns torch.float16"):
        testing.check(_case("group_norm_silu", "c96-g32-7x9", torch.float16), "fp32_out", "cpu")


def test_a_missing_output_fails(research):
    """The step asked for x0 (return_x0=True) returns (prev, None): a right prev must not hide it."""
    def no_x0(*args, **kwargs):
        return kernels.scheduler_step_reference(*args, **kwargs)[0], None

    research("scheduler_step", "no_x0", no_x0)
    with pytest.raises(AssertionError, match=r"outputs \['prev'\], the reference returns \['prev', 'x0'\]"):
        testing.check(_case("scheduler_step", "ddim-cfg"), "no_x0", "cpu")


def _no_max_softmax(q, k, v, scale=None, causal=False):
    s = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    p = s.exp()  # no running max subtracted: exp overflows near 89 in fp32
    return ((p / p.sum(-1, keepdim=True)) @ v.float()).to(q.dtype)


def _into_q(q, k, v, scale=None, causal=False):
    return q.copy_(kernels.attention_reference(q, k, v, scale, causal))  # right values, in the caller's q


def _returns_q(q, k, v, scale=None, causal=False):
    return q  # q's own memory, left as it was: an output the caller's next write to q would change


def _gn_nchw(x, *args, **kwargs):
    return kernels.group_norm_silu_reference(x, *args, **kwargs).contiguous()  # channels_last dropped


def _gn_eps(x, weight, bias, groups, eps=1e-5, activation="silu"):
    return kernels.group_norm_silu_reference(x, weight, bias, groups, 1e-6, activation)  # not the eps given


def _step_always_x0(x, model_output, coeffs, uncond=None, scale=1.0, noise=None, prev_x0=None, mask=None, known=None,
                    return_x0=False, out=None, out_x0=None):
    return kernels.scheduler_step_reference(x, model_output, coeffs, uncond, scale, noise, prev_x0, mask, known,
                                            True, out, out_x0)  # x0 whether asked for or not


def _step_ignores_out(x, model_output, coeffs, uncond=None, scale=1.0, noise=None, prev_x0=None, mask=None,
                      known=None, return_x0=False, out=None, out_x0=None):
    return kernels.scheduler_step_reference(x, model_output, coeffs, uncond, scale, noise, prev_x0, mask, known,
                                            return_x0)  # fresh tensors; the caller's out stays NaN


@pytest.mark.parametrize("op, fn, case, dtype, message", [
    ("attention", _no_max_softmax, "d64-big-logits", torch.float32, "NaN in result"),
    ("attention", _into_q, "d40-77x77", torch.float32, "the backend modified its input q"),
    ("attention", _returns_q, "d40-77x77", torch.float32, "shares memory with the input q"),
    ("group_norm_silu", _gn_nchw, "c64-g32-nhwc", torch.float32, "it must keep x's memory format"),
    ("group_norm_silu", _gn_eps, "c64-g32-lowvar", torch.float32, "max rel err"),
    ("scheduler_step", _step_always_x0, "renoise-no-x0", torch.float32,
     "outputs ['prev', 'x0'], the reference returns ['prev']"),
    ("scheduler_step", _step_ignores_out, "ddim-out", torch.float32, "prev is not the out= tensor given for it"),
], ids=["softmax-without-max", "writes-into-q", "returns-q", "gn-drops-channels-last", "gn-own-eps",
        "step-always-x0", "step-ignores-out"])
def test_wrong_research_backends_fail_naming_the_fault(research, op, fn, case, dtype, message):
    """Wrong backends a conformance run passed (a plugin probe of kernels.testing): each fails with
    the message that names its fault. Writing into q was caught only on CPU, where the reference
    shared the overwritten q, and blamed the backend's right output."""
    research(op, "wrong", fn)
    with pytest.raises(AssertionError) as e:
        testing.check(_case(op, case, dtype), "wrong", "cpu")
    assert message in str(e.value), str(e.value)[:500]


def test_a_backend_refusing_every_case_fails_its_run(tmp_path):
    """A plugin whose check refuses every input: 'all skipped' was exit code 0."""
    path = tmp_path / "refuses.py"
    path.write_text("import kernels\n\n@kernels.register('attention', 'refuses_all', check=lambda *a, **k: 'no')\n"
                    "def refuses_all(q, k, v, scale=None, causal=False):\n    return kernels.attention_reference(q, k, v)\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "--sdlab-plugin", str(path), "-k", "refuses_all and (test_forward or ran_some)",
                          "-m", "not gpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "every one of its" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_check_fails_when_the_backend_did_not_run(research, monkeypatch):
    """If the switch ignored the choice, the reference would be judged against itself and pass."""
    import contextlib

    research("group_norm_silu", "never_runs", kernels.group_norm_silu_reference)
    monkeypatch.setattr(kernels, "use", lambda **kw: contextlib.nullcontext())
    with pytest.raises(AssertionError, match="expected one dispatch to 'never_runs', counted 0"):
        testing.check(_case("group_norm_silu", "c96-g32-7x9"), "never_runs", "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_gradient_3_percent_off_fails(research, dtype):
    """16-bit gradients are held to GRAD_REL_HALF = 1e-2 of the fp64 ones: 3% off must fail, exact
    (the reference's) must pass."""
    research("attention", "exact_grad", kernels.attention_reference)
    research("attention", "dq_off", lambda q, *a, **kw: kernels.attention_reference(_grad_off(q, 1.03), *a, **kw))
    case = _case("attention", "d64-64x64", dtype, backward=True)
    testing.check(case, "exact_grad", "cpu")
    with pytest.raises(AssertionError, match=f"{case} .*: dq: max rel err"):
        testing.check(case, "dq_off", "cpu")


@pytest.mark.parametrize("read, counted_as", [
    (lambda x: x[0].item(), "_local_scalar_dense"), (lambda x: bool(x[0] > 0), "_local_scalar_dense"),
    (lambda x: x.tolist(), "tolist"), (lambda x: x.numpy(), "numpy"), (lambda x: x[x > 0], "index"),
    (lambda x: torch.unique(x), "_unique2"), (lambda x: x.repeat_interleave(x.abs().long() + 1), "repeat_interleave"),
    (lambda x: torch.allclose(x, x), "allclose"), (lambda x: torch.equal(x, x), "equal"),
    (lambda x: x.nonzero(), "nonzero"), (lambda x: x + torch.tensor(1.0), "lift_fresh"),
], ids=["item", "bool", "tolist", "numpy", "mask-index", "unique", "repeat_interleave", "allclose", "equal",
        "nonzero", "python-data"])
def test_host_reads_sees_each_kind_of_read(read, counted_as):
    """testing.HostReads counts what would be a host sync on a GPU (a planted .tolist() or mask
    index in a reference passed the host-read tests before the method half and the index rule)."""
    x = torch.randn(16)
    with testing.HostReads() as reads:
        read(x)
    assert reads.seen.get(counted_as, 0) >= 1, dict(reads.seen)
    with testing.HostReads() as reads:  # arithmetic, views, repeat_interleave by an int: none
        (x * 2 + x[1:3].sum()).view(2, 8).transpose(0, 1).repeat_interleave(2, dim=0)
    assert not reads.seen, dict(reads.seen)


def test_assert_close_rtol_is_per_element():
    """rtol scales each element's own |expected|: a tiny element 100% off fails beside a large one."""
    want = torch.tensor([1000.0, 1e-3])
    testing.assert_close(want * (1 + 5e-3), want, rtol=1e-2)
    with pytest.raises(AssertionError, match="1 of 2 elements outside atol=0.0e\\+00 rtol=1.0e-02"):
        testing.assert_close(torch.tensor([1000.0, 2e-3]), want, rtol=1e-2)


def test_within_torch_error_adds_atol_once():
    """|kernel - ref| <= factor x |torch - ref| + atol, at its boundary: torch 1e-3 off, factor 2,
    atol 1e-3 allow 3e-3; 3.5e-3 fails (it would pass as factor x (torch error + atol) = 4e-3)."""
    ref = torch.zeros(3, dtype=torch.float64)
    torch_out = torch.tensor([1e-3, 0.0, 0.0])
    testing.assert_within_torch_error(torch.tensor([0.0, 2.9e-3, 0.0]), torch_out, ref, factor=2.0, atol=1e-3)
    with pytest.raises(AssertionError, match="kernel max abs err 3.500e-03 > 2.0 x torch's 1.000e-03"):
        testing.assert_within_torch_error(torch.tensor([0.0, 3.5e-3, 0.0]), torch_out, ref, factor=2.0, atol=1e-3)


# ------------------------------------------------------------------ research backends in the switch
def test_research_backend_is_switched_counted_and_described(research, monkeypatch):
    calls = []

    def mine(q, k, v, scale=None, causal=False):
        calls.append(q.shape)
        return kernels.attention_reference(q, k, v, scale, causal)

    research("attention", "my_attention", mine)
    q = torch.randn(1, 2, 5, 8)
    kernels.attention(q, q, q)
    assert calls == [], "the default never picks a research backend"
    with kernels.use(attention="My_Attention"):  # names are case-insensitive, as the built-in ones
        kernels.attention(q, q, q)
    monkeypatch.setenv(kernels.ENV_VAR, "attention=my_attention")
    kernels.attention(q, q, q)
    monkeypatch.setenv(kernels.ENV_VAR, "my_attention")  # every op that has it
    assert kernels.resolve("attention", q)[0] == "my_attention"
    assert kernels.resolve("group_norm_silu", torch.randn(1, 4, 2, 2))[0] == "reference"
    assert len(calls) == 2 and kernels.counts()[("attention", "my_attention")] == 2
    assert "my_attention" in kernels.describe() and "my_attention" in kernels.all_backends()


@pytest.mark.parametrize("name", ["my-attention", "1st", "a b", "sdpa-flash", "triton@graph", ""])
def test_research_backend_names_are_checked(name):
    with pytest.raises(ValueError, match=r"names are \[a-z\]"):
        kernels.register("attention", name)


def test_registering_twice_needs_replace(research):
    research("attention", "twice", kernels.attention_reference)
    with pytest.raises(ValueError, match="already has a 'twice' backend.*replace=True"):
        kernels.register("attention", "twice")(kernels.attention_reference)
    with pytest.raises(ValueError, match="already has a 'triton' backend"):
        kernels.register("attention", "triton")(kernels.attention_reference)
    kernels.register("attention", "twice", replace=True)(kernels.attention_reference)


def test_unregister_refuses_built_ins_and_unknown_names(research):
    with pytest.raises(ValueError, match="built-in"):
        kernels.unregister("attention", "triton")
    with pytest.raises(ValueError, match="has no 'nope' backend"):
        kernels.unregister("attention", "nope")
    research("attention", "gone", kernels.attention_reference)
    kernels.unregister("attention", "gone")
    with pytest.raises(ValueError, match="has no 'gone' backend; valid: reference"):
        kernels.set_backend(attention="gone")
    kernels.register("attention", "gone")(kernels.attention_reference)  # so the fixture's unregister finds it


# ------------------------------------------------------------------ plugins
def test_a_plugin_file_registers_once_and_reloads(plugin_file):
    assert kernels.load_plugin(str(plugin_file)) == {"attention": ["plugin_attention"]}
    assert kernels.load_plugin(str(plugin_file)) == {"attention": ["plugin_attention"]}  # imported once
    testing.check(_case("attention", "d40-37x77"), "plugin_attention", "cpu")
    plugin_file.write_text(plugin_file.read_text().replace("plugin_attention", "plugin_attention_v2"))
    assert kernels.load_plugin(str(plugin_file), reload=True) == {"attention": ["plugin_attention_v2"]}
    assert "plugin_attention" not in kernels.backends("attention")
    kernels.unload_plugin(str(plugin_file))
    assert "plugin_attention_v2" not in kernels.backends("attention")
    module, _ = kernels.registry._plugin_module(str(plugin_file))
    assert module not in kernels.registry._PLUGINS and module not in sys.modules


def test_plugin_errors_name_the_plugin(tmp_path):
    with pytest.raises(FileNotFoundError, match="plugin .*nope.py: no such file"):
        kernels.load_plugin(str(tmp_path / "nope.py"))
    with pytest.raises(ModuleNotFoundError, match="plugin 'no_such_pkg.kernels': no module 'no_such_pkg'.*\\.py"):
        kernels.load_plugin("no_such_pkg.kernels")
    broken = tmp_path / "broken.py"
    broken.write_text("import kernels\nraise RuntimeError('half-written plugin')\n")
    with pytest.raises(RuntimeError, match="half-written plugin"):
        kernels.load_plugin(str(broken))
    twin = tmp_path / "twin"  # the same file name in another folder is another plugin
    twin.mkdir()
    (twin / "broken.py").write_text("import kernels\n")
    assert kernels.load_plugin(str(twin / "broken.py")) == {}
    assert kernels.registry._plugin_module(str(broken))[0] not in sys.modules  # a fixed file can load again


def test_a_plugin_that_fails_leaves_nothing_registered(tmp_path):
    """A plugin that raises after registering: its backends (and an op of its own) go with it, so
    the fixed file loads, with or without reload=True. unload_plugin of a module never loaded as
    a plugin leaves sys.modules alone."""
    path = tmp_path / "half.py"
    body = ("import kernels\n"
            "@kernels.register('attention', 'half_attention')\n"
            "def a(q, k, v, scale=None, causal=False):\n    return kernels.attention_reference(q, k, v, scale, causal)\n"
            "@kernels.register('half_op', 'half_only')\n"
            "def b(x):\n    return x\n")
    path.write_text(body + "raise RuntimeError('fails after registering')\n")
    with pytest.raises(RuntimeError, match="fails after registering"):
        kernels.load_plugin(str(path))
    assert "half_attention" not in kernels.backends("attention") and "half_op" not in kernels.ops()
    path.write_text(body)
    try:
        assert kernels.load_plugin(str(path), reload=True) == {"attention": ["half_attention"],
                                                                "half_op": ["half_only"]}
        # an op with research backends alone has no default: its calls say which to choose
        with pytest.raises(ValueError, match=r"half_op: no default: 'half_op' has no reference backend; choose one "
                                             r"of half_only"):
            kernels.dispatch("half_op", torch.ones(2))
        assert "half_op          -> none" in kernels.describe("cpu")
        with kernels.use(half_op="half_only"):
            assert torch.equal(kernels.dispatch("half_op", torch.ones(2)), torch.ones(2))
    finally:
        kernels.unload_plugin(str(path))
    assert "half_op" not in kernels.ops(), "an op left without backends stays listed"
    import json  # noqa: F401  (a module imported otherwise)
    kernels.unload_plugin("json")
    assert "json" in sys.modules, "unload_plugin dropped a module it never loaded"


def test_pytest_option_runs_the_plugins_backends_through_the_cases(plugin_file):
    """``--sdlab-plugin`` adds the plugin's backend to this file's parametrisation."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "--sdlab-plugin", str(plugin_file), "-k", "plugin_attention and d40-37x77 and fp32",
                          "-m", "not gpu"], capture_output=True, text=True, timeout=300)
    # fwd, bwd, and each under torch.compile
    assert out.returncode == 0 and "4 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_the_readme_example_plugin_passes_the_attention_cases(tmp_path):
    """README's research-backend example, run as its docs say: every attention case, fwd and bwd,
    and the fp32 ones under torch.compile."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- research-backend-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "upcast_softmax.py"
    path.write_text(block)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "--sdlab-plugin", str(path), "-k", "upcast_softmax", "-m", "not gpu"],
                         capture_output=True, text=True, timeout=300)
    n = len(testing.cases("attention")) + len(testing.cases("attention", backward=True)) + 1  # + ran some
    n += len(testing.cases("attention", (torch.float32,))) + len(testing.cases("attention", (torch.float32,), True))
    assert out.returncode == 0 and f"{n} passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
