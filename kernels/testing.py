"""Equivalence checks for any backend of an op: the cases and tolerances the built-in Triton
kernels are held to, for a research backend's own tests (and the comparison helpers the project's
tests use).

    import pytest
    from kernels import testing

    @pytest.mark.parametrize("case", testing.cases("attention"), ids=str)
    def test_my_attention(case):
        testing.check(case, "my_attention")      # pytest.skip where the backend's check refuses

Each case is a shape with a reason (head dim 40 over 77 keys, 3 channels per group on 7 x 9 pixels,
a RePaint mask broadcast over channels...) and a dtype. :func:`check` runs the op through the
switch with that backend chosen explicitly, so the op's input checks and the backend's own
``check`` run as in a pipeline, on inputs of its own (copies: a backend that writes into one is
named, and cannot change what the reference sees), asserts that the backend ran, left its inputs
as they were, returned the ``out=`` it was given and no output sharing an input's memory, and
(group_norm_silu) kept x's memory format, and judges the output against an fp64 oracle, the op's
reference on fp64 copies of the inputs:
  fp32: max |got - oracle| / max |oracle| <= ``TOLERANCES[op][fp32]["rel"]`` (attention: with TF32
  off, torch's default: check() keeps the caller's TF32 settings);
  fp16 / bf16: |got - oracle| <= factor x |torch - oracle| + atol, elementwise maxima, where torch is
  the reference in the same dtype (flash-attention's rule: at most 2x torch's own rounding error).
``scheduler_step``'s contract is fp32 math whatever the dtype, so its oracle is the reference on the
same inputs, to about one rounding of the output dtype. ``backward=True`` cases compare dx, dweight,
dbias (dq, dk, dv) under one random upstream gradient: in fp32 as outputs are, in fp16 / bf16 by
``GRAD_REL_HALF``, a relative error against the gradient's largest magnitude. ``check(..., compiled=True)``
does all this with the op inside ``torch.compile`` (fullgraph), for a backend meant to run in
compiled models.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *HALF)
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# op -> dtype -> how a backend is judged: fp32 by max-normalised relative error against fp64,
# half precision by the 2x-torch rule (atol ~ 2 ulp at the outputs' scale)
TOLERANCES = {
    "attention": {torch.float32: dict(rel=2e-5), torch.float16: dict(factor=2.0, atol=5e-4),
                  torch.bfloat16: dict(factor=2.0, atol=4e-3)},
    "group_norm_silu": {torch.float32: dict(rel=1e-5), torch.float16: dict(factor=2.0, atol=1e-3),
                        torch.bfloat16: dict(factor=2.0, atol=1e-2)},
    # against the fp32-math reference on the same inputs: an FMA contraction or one rounding apart
    "scheduler_step": {torch.float32: dict(rel=1e-6), torch.float16: dict(rel=1e-3),
                       torch.bfloat16: dict(rel=8e-3)},
}
GRAD_REL_HALF = 1e-2  # backward in 16-bit: the gradients' max-normalised error against fp64


# ------------------------------------------------------------------------------ comparisons
def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def describe_diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (f"shape {tuple(a.shape)}: max abs err {diff.max().item():.3e} at {idx} "
            f"(got {a[idx].item():.6g}, want {e[idx].item():.6g}); max rel err {max_rel_err(a, e):.3e}; "
            f"nan in result: {bool(torch.isnan(a).any())}")


def assert_close(actual, expected, *, rtol: float = 0.0, atol: float = 0.0, rel: float | None = None,
                 name: str = "tensor") -> None:
    """Elementwise |a - e| <= atol + rtol |e|, or (with ``rel``) max-normalised relative error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{name}: NaN in result. " + describe_diff(a, e)
    if rel is not None:
        err = max_rel_err(a, e)
        assert err <= rel, f"{name}: max rel err {err:.3e} > {rel:.1e}. " + describe_diff(a, e)
    else:
        ok = (a - e).abs() <= atol + rtol * e.abs()
        assert bool(ok.all()), (f"{name}: {int((~ok).sum())} of {ok.numel()} elements outside "
                                f"atol={atol:.1e} rtol={rtol:.1e}. " + describe_diff(a, e))


def assert_within_torch_error(kernel_out, torch_out, reference, *, factor: float = 2.0,
                              atol: float = 1e-3, name: str = "tensor") -> None:
    """flash-attention's rule for half precision: the kernel's error against a high-precision
    reference is at most ``factor`` x the error of the plain torch op in the same dtype, + atol."""
    assert kernel_out.shape == reference.shape, f"{name}: shape {tuple(kernel_out.shape)} != {tuple(reference.shape)}"
    ref = reference.detach().double().cpu()
    k_err = (kernel_out.detach().double().cpu() - ref).abs().max().item()
    t_err = (torch_out.detach().double().cpu() - ref).abs().max().item()
    assert k_err <= factor * t_err + atol, (
        f"{name}: kernel max abs err {k_err:.3e} > {factor} x torch's {t_err:.3e} + {atol:.1e}. "
        + describe_diff(kernel_out, reference))


# ------------------------------------------------------------------------------- host reads
class HostReads(TorchDispatchMode):
    """Counts the calls that read a tensor's value on the host or make a tensor from Python data:
    aten ops (``.item()``, ``bool()``, ``nonzero``, indexing by a bool mask, ``unique``,
    ``torch.equal``, ``repeat_interleave`` by a tensor, ``lift_fresh`` (a tensor from Python data,
    a copy from the host for a GPU), ...) and the Tensor methods that leave the dispatcher
    (``tolist``, ``numpy``). On a GPU each waits for the stream, a host sync that stalls the queue
    of launches an eager model depends on. Works on the CPU, so a machine without a GPU can show a
    backend or a sampling loop free of them::

        with testing.HostReads() as reads:
            kernels.attention(q, k, v)
        assert not reads.seen, reads.seen

    Not seen: reads inside C++ kernels that do not go back through the dispatcher, and copies between
    devices (none on a CPU); on a GPU, ``torch.cuda.set_sync_debug_mode`` sees those."""

    OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal",
                     "lift_fresh", "lift_fresh_copy", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                     "bincount", "histc", "allclose"})
    METHODS = frozenset({"tolist", "numpy"})

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self._methods = _HostMethods(self.seen)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (name in self.OPS or (name in ("index", "index_put", "index_put_") and _bool_index(args))
                or (func is torch.ops.aten.repeat_interleave.Tensor
                    or func is torch.ops.aten.repeat_interleave.self_Tensor)):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


class _HostMethods(TorchFunctionMode):
    """HostReads' half for the Tensor methods that read values without an aten op."""

    def __init__(self, seen: collections.Counter):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HostReads.METHODS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    """Whether an aten index / index_put call takes a bool mask (its output's size is data)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


# ------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One input of ``op``: ``make(generator, dtype)`` builds (args, kwargs) on the CPU."""
    op: str
    name: str
    reason: str
    dtype: torch.dtype
    make: Callable = field(repr=False, compare=False)
    backward: bool = False
    grads: tuple[str, ...] = ()  # names of the inputs whose gradients are compared (backward cases)

    def __str__(self) -> str:
        return f"{self.op}-{self.name}-{_SHORT[self.dtype]}{'-bwd' if self.backward else ''}"


def _attention(b, h, lq, lkv, d, blhd=False, inf_keys=0, qk_mult=1.0, **kw):
    def make(g, dtype):
        def t(n, mult=1.0):
            if blhd:  # the UNet's (B, L, H, D) activations viewed as (B, H, L, D): strided heads
                return (mult * torch.randn(b, n, h, d, generator=g)).to(dtype).transpose(1, 2)
            return (mult * torch.randn(b, h, n, d, generator=g)).to(dtype)
        q, k, v = t(lq, qk_mult), t(lkv, qk_mult), t(lkv)
        if inf_keys:  # q > 0, so q . k_j = -inf for the first inf_keys keys
            q = q.abs() + 0.1
            k[..., :inf_keys, :] = float("-inf")
        return (q, k, v), dict(kw)
    return make


def _group_norm(shape, groups, channels_last=False, affine=True, activation="silu", offset=0.0, std=1.0):
    def make(g, dtype):
        x = (std * torch.randn(shape, generator=g) + offset).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w = (1 + 0.1 * torch.randn(c, generator=g)).to(dtype) if affine else None
        bias = (0.1 * torch.randn(c, generator=g)).to(dtype) if affine else None
        return (x, w, bias, groups), dict(eps=1e-5, activation=activation)
    return make


def _step(shape, coeffs, *, cfg=False, noise=False, mask=False, prev_x0=False, return_x0=True, out=False):
    from .scheduler_step import StepCoefficients

    def make(g, dtype):
        def t(s=shape):
            return torch.randn(s, generator=g).to(dtype)
        kw = dict(return_x0=return_x0)
        if out:  # the caller's buffers, NaN until written (check() hands each run fresh ones)
            kw.update(out=torch.full(shape, math.nan, dtype=dtype), out_x0=torch.full(shape, math.nan, dtype=dtype))
        if cfg:
            kw.update(model_output_uncond=t(), guidance_scale=7.5)
        if noise:
            kw["noise"] = t()
        if prev_x0:
            kw["prev_x0"] = t()
        if mask:  # 1 = known pixels, one mask for the four latent channels
            kw["mask"] = (torch.rand((shape[0], 1, *shape[2:]), generator=g) > 0.5).to(dtype)
            kw["known"] = t()
        return (t(), t(), StepCoefficients(**coeffs)), kw
    return make


def _cases() -> dict[str, list[tuple[str, str, Callable, tuple[str, ...]]]]:
    """op -> (name, reason, make, the inputs that take gradients; () for forward only)."""
    ab = math.sqrt(0.5)  # a DDIM step at alpha_bar = 0.5 to 0.6, epsilon prediction
    ddim = dict(a_x=1.0, a_o=-ab, a_d=ab, b_x=1.0, b_o=0.0, b_0=-ab, b_d=ab, c0=math.sqrt(0.6),
                c2=math.sqrt(0.4))
    qkv, xwb = ("q", "k", "v"), ("x", "weight", "bias")
    return {
        "attention": [
            ("d40-77x77", "SD 1.5's head dim 40 over CLIP's 77 tokens: neither a power of two", _attention(1, 2, 77, 77, 40), qkv),
            ("d40-37x77", "cross-attention: ragged queries over 77 text keys, batch 2 (CFG)", _attention(2, 2, 37, 77, 40), qkv),
            ("d64-64x64", "SD 2's head dim 64 at power-of-two lengths", _attention(1, 3, 64, 64, 64), qkv),
            ("d80-33x45", "head dim 80 (SD 1.5's second level), odd lengths", _attention(1, 2, 33, 45, 80), qkv),
            ("d160-16x21", "head dim 160 (SD 1.5's deepest level)", _attention(1, 1, 16, 21, 160), ()),
            ("d40-blhd", "the UNet's (B, L, H, D) activations as a strided (B, H, L, D) view", _attention(2, 2, 24, 30, 40, blhd=True), qkv),
            ("d64-scale", "a caller's scale, not 1/sqrt(D)", _attention(1, 2, 20, 20, 64, scale=0.3), qkv),
            ("d64-causal", "the CLIP text encoder's causal mask", _attention(1, 2, 77, 77, 64, causal=True), ()),
            ("d40-inf-keys", "128 keys scoring -inf ahead of 22 finite ones: whole key blocks with no finite score, "
             "where an online softmax's running max is still -inf", _attention(1, 2, 128, 150, 40, inf_keys=128), ()),
            ("d64-big-logits", "q and k 5x larger: scores near 100, where a softmax without its running max "
             "overflows exp", _attention(1, 2, 77, 77, 64, qk_mult=5.0), ()),
        ],
        "group_norm_silu": [
            ("c96-g32-7x9", "3 channels per group, H x W = 63 not a power of two", _group_norm((1, 96, 7, 9), 32), xwb),
            ("c64-g8-1x1", "H x W = 1, batch 3", _group_norm((3, 64, 1, 1), 8), ()),
            ("c64-g32-nhwc", "channels_last, batch 2", _group_norm((2, 64, 8, 8), 32, channels_last=True), xwb),
            ("c40-g4-plain", "no SiLU (the transformer blocks' GroupNorm), 10 channels per group", _group_norm((2, 40, 5, 5), 4, activation=None), xwb),
            ("c32-g32-noaffine", "no weight or bias", _group_norm((1, 32, 6, 6), 32, affine=False), ("x",)),
            ("c64-g32-offset", "mean 3, std 1: E[x^2] - E[x]^2 in low precision loses the variance", _group_norm((2, 64, 5, 7), 32, offset=3.0), ()),
            ("c64-g32-lowvar", "std 0.01 (variance 1e-4): the eps given, 1e-5, is a tenth of it", _group_norm((2, 64, 6, 6), 32, std=0.01), ()),
        ],
        "scheduler_step": [
            ("ddim-cfg", "DDIM (eta 0) with classifier-free guidance 7.5", _step((2, 4, 9, 7), ddim, cfg=True), ()),
            ("ddpm-clip-noise", "DDPM: clipped x0 and the noise term",
             _step((1, 4, 9, 7), dict(a_x=1.0, a_o=-0.6, a_d=0.8, clip=1.0, c0=0.3, c1=0.7, sigma=0.2), noise=True), ()),
            ("repaint", "RePaint: a (B, 1, h, w) mask broadcast over the 4 channels, with CFG and noise",
             _step((2, 4, 9, 7), dict(ddim, sigma=0.1), cfg=True, noise=True, mask=True), ()),
            ("dpmpp-2m", "DPM-Solver++(2M): the previous step's x0 (the D1 term)",
             _step((1, 4, 9, 7), dict(a_x=1.0, a_o=-0.5, a_d=0.9, c0=0.4, c1=0.6, c3=0.2), prev_x0=True), ()),
            ("renoise-no-x0", "RePaint's re-noising (undo_step): no x0 asked for, none returned",
             _step((1, 4, 9, 7), dict(c1=0.8, sigma=0.6), noise=True, return_x0=False), ()),
            ("ddim-out", "the caller's out and out_x0, written in place and returned",
             _step((2, 4, 9, 7), ddim, cfg=True, out=True), ()),
        ],
    }


def cases(op: str, dtypes=DTYPES, backward: bool = False) -> list[Case]:
    """``op``'s equivalence cases in each of ``dtypes`` (an iterable of fp32/fp16/bf16);
    ``backward=True``: those comparing gradients (none for ``scheduler_step``, which has no backward)."""
    table = _cases()
    if op not in table:
        raise ValueError(f"no equivalence cases for op {op!r}; ops with cases: {', '.join(table)}")
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    bad = [dt for dt in dtypes if dt not in _SHORT]
    if bad:
        raise ValueError(f"equivalence cases come in {', '.join(map(str, DTYPES))}; got {', '.join(map(str, bad))}"
                         " (the fp64 oracle is what the cases are judged against)")
    return [Case(op, name, reason, dt, make, backward, grads) for name, reason, make, grads in table[op]
            for dt in dtypes if not backward or grads]


# ------------------------------------------------------------------------------------ check
def _to(obj, **kw):
    """``obj`` with every floating tensor ``.to(**kw)`` (bool masks and other values as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(**kw) if obj.is_floating_point() else obj.to(device=kw.get("device", obj.device))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, **kw) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, **kw) for k, v in obj.items()}
    return obj


def _fresh(obj):
    """``obj`` with every tensor cloned (strides kept): each run gets inputs of its own, so a backend
    that writes into one cannot change what the reference and the oracle see (on CPU, ``.to()`` of
    a tensor already there is the tensor itself)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    return obj


# the tensors that lead each op's signature, by name (attention's and GroupNorm's take gradients)
_POSITIONAL = {"attention": ("q", "k", "v"), "group_norm_silu": ("x", "weight", "bias"),
               "scheduler_step": ("x", "model_output")}


def _tensors(op: str, args, kwargs) -> dict[str, torch.Tensor]:
    """The tensor arguments of a call by name."""
    named = {**_named_inputs(op, args), **kwargs}
    return {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}


def _check_io(case, got, args, kwargs, before, same) -> None:
    """What a backend's outputs and inputs must be besides their values: the inputs as they were
    (``before``: copies taken ahead of the run), an ``out=`` given is the output returned, no output
    shares memory with an input otherwise, and group_norm_silu's output keeps x's memory format."""
    tensors = _tensors(case.op, args, kwargs)
    for name, t in tensors.items():
        if name in ("out", "out_x0"):
            continue
        assert torch.equal(t.detach(), before[name]), \
            f"{case}: the backend modified its input {name} (outputs must go to memory of their own)"
    given = {"prev": kwargs.get("out"), "x0": kwargs.get("out_x0")}
    inputs = {t.untyped_storage().data_ptr(): n for n, t in tensors.items() if n not in ("out", "out_x0")}
    for name, t in got:
        if given.get(name) is not None:
            assert t.data_ptr() == given[name].data_ptr() and t.shape == given[name].shape, \
                f"{case}: {name} is not the out= tensor given for it (it must be written in place and returned)"
            continue
        shared = inputs.get(t.untyped_storage().data_ptr())
        assert shared is None, f"{case}: output {name} shares memory with the input {shared}"
    if case.op == "group_norm_silu":
        x, (_, y), (_, ref) = args[0], got[0], same[0]
        for fmt in (torch.contiguous_format, torch.channels_last):
            lost = x.dim() == 4 and ref.is_contiguous(memory_format=fmt) and not y.is_contiguous(memory_format=fmt)
            assert not lost, (f"{case}: output strides {tuple(y.stride())} for x of strides {tuple(x.stride())}: "
                              f"it must keep x's memory format ({fmt}), as the reference does")


def _outputs(out) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, tuple):  # scheduler_step: (prev, x0)
        return [(n, t) for n, t in zip(("prev", "x0"), out) if t is not None]
    return [("out", out)]


def _run(op: str, backend, args, kwargs, grads: tuple[str, ...], upstream_seed: int, compiled: bool = False):
    """(outputs, gradients by name) of ``op`` on ``backend`` chosen explicitly; ``compiled``: the op
    inside ``torch.compile(fullgraph=True, backend="aot_eager")``, traced afresh."""
    import kernels

    fn = getattr(kernels, op)
    if compiled:  # fresh caches: no graph from another case, no recompile limit to fall back to eager at
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with kernels.use(**{op: backend}), torch.enable_grad():
        out = fn(*args, **kwargs)
    if not grads:
        return _outputs(out), {}
    if not out.requires_grad:
        raise AssertionError(f"{op}: backend {str(backend)!r} returned an output without a graph; it has no backward")
    g = torch.Generator().manual_seed(upstream_seed)
    dout = torch.randn(out.shape, generator=g).to(out)
    inputs = _named_inputs(op, args)
    got = torch.autograd.grad(out, [inputs[n] for n in grads], dout)
    return _outputs(out), dict(zip(grads, got))


def _named_inputs(op: str, args) -> dict:
    """The positional tensors that lead ``op``'s signature, by name (the differentiable ones of
    attention and GroupNorm)."""
    return dict(zip(_POSITIONAL[op], args))


def check(case: Case, backend: str, device: str | torch.device | None = None, seed: int = 0,
          compiled: bool = False) -> None:
    """Run ``case`` on ``backend`` (chosen explicitly) and assert it matches the fp64 oracle within
    ``TOLERANCES`` (module docstring). A backend whose ``check`` refuses the input skips the test
    (``pytest.skip``, with the reason). Raises AssertionError naming the output and the error.

    ``compiled=True`` runs the backend's op inside ``torch.compile(fullgraph=True,
    backend="aot_eager")``, held to the same tolerances: a graph break is an error there, and
    AOTAutograd runs the graph (and its backward) as traced on fake tensors, so a shape function
    that disagrees with the kernel shows. It resets dynamo's caches first (every compiled function
    in the process retraces)."""
    import kernels

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(seed)
    args, kwargs = case.make(g, case.dtype)
    grads = case.grads if case.backward else ()

    def inputs(dtype=None):
        a, kw = _fresh(_to((args, kwargs), device=device, **({"dtype": dtype} if dtype else {})))
        if grads:  # leaves of their own, so each run's gradients are its own
            named = _named_inputs(case.op, a)
            a = tuple(t.detach().requires_grad_(n in grads) if isinstance(t, torch.Tensor) else t
                      for t, n in zip(a, [*named, *[None] * (len(a) - len(named))]))
        return a, kw

    if compiled and any(kwargs.get(k) is not None for k in ("out", "out_x0")):
        import pytest

        pytest.skip(f"{case}: an out= call runs eagerly under torch.compile (the write into the caller's memory "
                    "is a graph break by design), so it has no compiled case")
    chosen = kernels.validate(case.op, backend)  # a ValueError listing the valid names
    if kernels.CHAIN_SEP in chosen:
        raise ValueError(f"{case}: check() holds one backend to the case; {chosen!r} is a fallback chain: "
                         "check each of its backends")
    dispatched = kernels.counts().get((case.op, chosen), 0)
    try:
        if compiled:  # resolved eagerly first: a refusal raised while dynamo traces would not be a skip
            a, kw = inputs()
            with kernels.use(**{case.op: backend}):
                resolved = kernels.resolve(case.op, *a, **kw)[0]
        run_args, run_kw = inputs()
        before = {n: t.detach().clone() for n, t in _tensors(case.op, run_args, run_kw).items()}
        got, got_g = _run(case.op, backend, run_args, run_kw, grads, seed + 1, compiled)
    except kernels.BackendUnsupported as e:
        import pytest

        pytest.skip(str(e))
    ran = kernels.counts().get((case.op, chosen), 0) - dispatched
    if compiled:  # a backend traced into the graph is not a dispatch: the switch must resolve to it
        assert resolved == chosen and ran in (0, 1), f"{case}: compiled, resolved to {resolved!r}, counted {ran}"
    else:
        assert ran == 1, f"{case}: expected one dispatch to {chosen!r}, counted {ran}"

    exact = case.op == "scheduler_step"  # its contract is fp32 math on the inputs as given
    same, same_g = _run(case.op, "reference", *inputs(), grads, seed + 1)
    want, want_g = (same, same_g) if exact else _run(case.op, "reference", *inputs(torch.float64), grads, seed + 1)
    tol = TOLERANCES[case.op][case.dtype]
    assert [n for n, _ in got] == [n for n, _ in want], (
        f"{case}: outputs {[n for n, _ in got]}, the reference returns {[n for n, _ in want]}")
    _check_io(case, got, run_args, run_kw, before, same)
    for (name, a), (_, e), (_, t) in zip(got, want, same):
        assert a.dtype == t.dtype, f"{case}: {name} dtype {a.dtype}, the reference returns {t.dtype}"
        assert a.device == t.device, f"{case}: {name} on {a.device}, the reference's on {t.device}"
        _judge(a, t, e, tol, f"{case} ({case.reason}): {name}")
    for name in grads:
        grad_tol = tol if case.dtype == torch.float32 else dict(rel=GRAD_REL_HALF)
        _judge(got_g[name], same_g[name], want_g[name], grad_tol, f"{case} ({case.reason}): d{name}")


def _judge(got, torch_same, want, tol, name):
    if "rel" in tol:
        assert_close(got, want, rel=tol["rel"], name=name)
    else:
        assert_within_torch_error(got, torch_same, want, name=name, **tol)
