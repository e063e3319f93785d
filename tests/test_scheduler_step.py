"""kernels.scheduler_step: the Triton kernel against the torch reference (interpreter on CPU, the
real thing under `-m gpu`), its input checks, and its use by sdcore.schedulers."""
import dataclasses
import importlib
import os

import numpy as np
import pytest
import torch

import kernels
from kernels import BackendUnsupported, StepCoefficients
from sdcore.config import SchedulerConfig
from sdcore.schedulers import PREDICTION_TYPES, make_scheduler, x0_eps_coefficients
from kernels.testing import TOLERANCES, assert_close, assert_within_torch_error, describe_diff

scheduler_step_module = importlib.import_module("kernels.scheduler_step")  # kernels.scheduler_step is the op

SHAPES = [
    (1, 4, 7, 9),  # HW not a power of two, one partial block
    (3, 4, 5, 5),  # batch 3, 300 elements
    (1, 4, 23, 29),  # 2668 elements: several blocks plus a masked tail
]
TOL_HALF = TOLERANCES["scheduler_step"][torch.float16]["rel"]  # about one fp16 rounding, max-normalised
ALL_TERMS = StepCoefficients(a_x=0.9, a_o=-0.4, a_d=0.7, clip=None, b_x=0.3, b_o=0.8, b_0=-0.2, b_d=0.6,
                             c0=0.5, c1=0.4, c2=0.3, c3=0.2, sigma=0.1)


def inputs(shape, device="cpu", dtype=torch.float32, seed=0, mask="broadcast"):
    g = torch.Generator().manual_seed(seed)
    r = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(6)]
    d = dict(x=r[0], model_output=r[1], model_output_uncond=r[2], noise=r[3], prev_x0=r[4], known=r[5])
    if mask == "broadcast":  # (B, 1, h, w): the RePaint / inpainting mask
        d["mask"] = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.5).to(device, dtype)
    elif mask == "full":  # soft mask of x's shape
        d["mask"] = torch.rand(shape, generator=g).to(device, dtype)
    return d


def call(d, coeffs, *, cfg=True, mask=True, **kw):
    return kernels.scheduler_step(
        d["x"], d["model_output"], coeffs, model_output_uncond=d["model_output_uncond"] if cfg else None,
        guidance_scale=7.5 if cfg else 1.0, noise=d["noise"], prev_x0=d["prev_x0"],
        mask=d.get("mask") if mask else None, known=d["known"] if mask and "mask" in d else None, **kw)


def both(d, coeffs, **kw):
    ref = call(d, coeffs, **kw)
    with kernels.use(scheduler_step="triton"):
        tri = call(d, coeffs, **kw)
    return ref, tri


def prediction_coeffs(prediction, clip):
    """A DDIM-like step for each prediction type (x = 0.6 x0 + 0.8 eps), every term switched on."""
    return StepCoefficients(**x0_eps_coefficients(prediction, 0.6, 0.8), clip=clip,
                            c0=0.7, c1=0.05, c2=0.5, c3=0.1, sigma=0.3)


@pytest.mark.parametrize("mask", ["none", "broadcast", "full"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, cfg, prediction, clip, mask, device):
    d = inputs(shape, device, mask=mask)
    coeffs = prediction_coeffs(prediction, clip)
    (p_ref, x0_ref), (p_tri, x0_tri) = both(d, coeffs, cfg=cfg, mask=mask != "none", return_x0=True)
    assert_close(p_tri, p_ref, rel=1e-6, name="prev")
    assert_close(x0_tri, x0_ref, rel=1e-6, name="x0")


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_model_output_stays_nan(clip, device):
    """A NaN from the model (say fp16 overflow) must reach prev and x0, also through the x0 clip:
    a clamp that drops NaN would hide it as ±clip."""
    d = inputs((1, 4, 2, 3), device, mask="none")
    d["model_output"][0, 1, 1, 2] = float("nan")
    for backend in ("reference", "triton"):
        with kernels.use(scheduler_step=backend):
            prev, x0 = call(d, prediction_coeffs("epsilon", clip), cfg=False, mask=False, return_x0=True)
        nan = torch.isnan(prev)
        assert nan[0, 1, 1, 2] and torch.isnan(x0[0, 1, 1, 2]) and nan.sum() == 1, (backend, clip, prev, x0)


def test_every_term_and_the_formula(device):
    """The reference is the documented formula (checked in fp64 by hand), the kernel matches it."""
    d = inputs((2, 4, 6, 10), device)
    k = ALL_TERMS
    (p_ref, x0_ref), (p_tri, x0_tri) = both(d, k, return_x0=True)
    x, u = d["x"].double(), d["model_output_uncond"].double()
    o = u + 7.5 * (d["model_output"].double() - u)
    x0 = (k.a_x * x + k.a_o * o) / k.a_d
    eps = (k.b_x * x + k.b_o * o + k.b_0 * x0) / k.b_d
    prev = k.c0 * x0 + k.c1 * x + k.c2 * eps + k.c3 * (x0 - d["prev_x0"].double()) + k.sigma * d["noise"].double()
    m = d["mask"].double()
    prev = m * d["known"].double() + (1 - m) * prev
    assert_close(p_ref, prev, rel=1e-6, name="reference vs fp64 formula")
    assert_close(x0_ref, x0, rel=1e-6, name="reference x0 vs fp64 formula")
    assert_close(p_tri, p_ref, rel=1e-6, name="prev")
    assert_close(x0_tri, x0_ref, rel=1e-6, name="x0")
    assert torch.equal(p_tri * d["mask"], d["known"] * d["mask"]), "known region must be copied exactly"


def test_optional_terms_may_be_absent(device):
    """sigma = 0 needs no noise, c3 = 0 no prev_x0, c2 = 0 skips eps; x0 is not written unless asked."""
    d = inputs((1, 4, 7, 9), device)
    k = StepCoefficients(a_x=1.0, a_o=-0.5, a_d=0.8, c0=0.9, c1=0.1)
    ref = kernels.scheduler_step(d["x"], d["model_output"], k)
    with kernels.use(scheduler_step="triton"):
        tri = kernels.scheduler_step(d["x"], d["model_output"], k)
    assert ref[1] is None and tri[1] is None
    assert_close(tri[0], ref[0], rel=1e-6, name="prev")


def test_terms_with_a_zero_coefficient_are_skipped(device):
    """The contract skips the eps, D1 and noise terms when c2, c3, sigma are 0, rather than adding
    0 x term: an inf noise and prev_x0, and b_d = 0 (eps = 0 / 0), must not reach prev (0 x inf is
    NaN) in either backend, whatever tensors are passed."""
    d = inputs((1, 4, 7, 9), device)
    inf = torch.full_like(d["x"], float("inf"))
    k = StepCoefficients(a_x=1.0, a_o=-0.5, a_d=0.8, b_d=0.0, c0=0.9, c1=0.1)
    ref, tri = both(dict(d, noise=inf, prev_x0=inf), k, cfg=False, mask=False)
    x0 = (d["x"].double() - 0.5 * d["model_output"].double()) / 0.8
    assert_close(ref[0], 0.9 * x0 + 0.1 * d["x"].double(), rel=1e-6, name="reference prev vs fp64 c0 x0 + c1 x")
    assert_close(tri[0], ref[0], rel=1e-6, name="prev, inf noise and prev_x0, eps 0 / 0")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_poisoned_outputs_are_fully_written(shape, device):
    d = inputs(shape, device)
    out = torch.full(shape, float("nan"), device=device)
    out_x0 = torch.full(shape, float("nan"), device=device)
    ref = call(d, ALL_TERMS, return_x0=True)
    with kernels.use(scheduler_step="triton"):
        prev, x0 = call(d, ALL_TERMS, return_x0=True, out=out, out_x0=out_x0)
    assert prev is out and x0 is out_x0
    assert_close(prev, ref[0], rel=1e-6, name="prev (NaN-poisoned)")
    assert_close(x0, ref[1], rel=1e-6, name="x0 (NaN-poisoned)")


def test_triton_check_reasons(monkeypatch, device):
    d = inputs((1, 4, 8, 8), device)
    k = ALL_TERMS
    with kernels.use(scheduler_step="triton"):
        with pytest.raises(BackendUnsupported, match="not contiguous"):
            kernels.scheduler_step(d["x"].transpose(2, 3), d["model_output"].transpose(2, 3), k, noise=d["noise"],
                                   prev_x0=d["prev_x0"])
        with pytest.raises(BackendUnsupported, match="float64"):
            kernels.scheduler_step(d["x"].double(), d["model_output"].double(), k, noise=d["noise"].double(),
                                   prev_x0=d["prev_x0"].double())
        monkeypatch.setattr(kernels.registry, "_INTERPRET", False)  # kernels imported without the interpreter
        d = inputs((1, 4, 8, 8), "cpu")
        with pytest.raises(BackendUnsupported, match="need CUDA"):
            kernels.scheduler_step(d["x"], d["model_output"], k, noise=d["noise"], prev_x0=d["prev_x0"])


def test_triton_refuses_inputs_that_require_grad(device):
    """The Triton step has no backward: with grad on and an input requiring it, an explicit choice
    raises and the reference keeps the graph (gradient-guided sampling), rather than losing it."""
    d = inputs((1, 4, 7, 9), device)
    eps = d["model_output"].requires_grad_()
    with kernels.use(scheduler_step="triton"), pytest.raises(BackendUnsupported, match="requires grad"):
        call(d, ALL_TERMS)
    prev, _ = call(d, ALL_TERMS)
    assert prev.requires_grad and prev.grad_fn is not None
    with torch.no_grad(), kernels.use(scheduler_step="triton"):  # no graph wanted: the kernel runs
        tri, _ = call(d, ALL_TERMS)
    assert_close(tri, prev.detach(), rel=1e-6, name="prev under no_grad")
    assert eps.requires_grad


def test_bool_mask_matches_reference(device):
    """A bool RePaint mask (True = known) is taken by both backends, with the same result."""
    d = inputs((2, 4, 7, 9), device)
    d["mask"] = d["mask"] > 0.5
    ref, tri = both(d, ALL_TERMS)
    assert_close(tri[0], ref[0], rel=1e-6, name="prev, bool mask")
    assert torch.equal(tri[0][d["mask"].expand_as(tri[0])], d["known"][d["mask"].expand_as(tri[0])])


@pytest.mark.parametrize("which", ["out", "out_x0"])
def test_out_must_match_x(which):
    """out / out_x0 of another shape or dtype is refused up front (copy_ would broadcast silently)."""
    d = inputs((1, 4, 6, 6))
    with pytest.raises(ValueError, match=rf"{which}\(2, 4, 6, 6\) must have x's shape \(1, 4, 6, 6\)"):
        call(d, ALL_TERMS, return_x0=True, **{which: torch.empty(2, 4, 6, 6)})
    with pytest.raises(ValueError, match=f"{which} dtype torch.float16 must be x's dtype torch.float32"):
        call(d, ALL_TERMS, return_x0=True, **{which: torch.empty(1, 4, 6, 6, dtype=torch.float16)})


def test_contract_errors():
    d = inputs((1, 4, 8, 8))
    x, o = d["x"], d["model_output"]
    with pytest.raises(ValueError, match="needs noise"):
        kernels.scheduler_step(x, o, StepCoefficients(c1=1.0, sigma=0.5))
    with pytest.raises(ValueError, match="needs prev_x0"):
        kernels.scheduler_step(x, o, StepCoefficients(c1=1.0, c3=0.5))
    with pytest.raises(ValueError, match="go together"):
        kernels.scheduler_step(x, o, StepCoefficients(c1=1.0), mask=d["mask"])
    with pytest.raises(ValueError, match="shape"):
        kernels.scheduler_step(x, o[:, :2], StepCoefficients(c1=1.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.scheduler_step(x, o, StepCoefficients(c1=1.0), mask=d["mask"][:, :, :3], known=d["known"])
    with pytest.raises(TypeError, match="StepCoefficients"):
        kernels.scheduler_step(x, o, {"c1": 1.0})


@pytest.mark.parametrize("call, error, message", [
    # each ran before: float(None) without the argument's name, "7.5" parsed, NaN output, "False" truthy
    (lambda x, k: kernels.scheduler_step(x, x, k, model_output_uncond=x, guidance_scale=None), TypeError,
     "guidance_scale must be a real number, got NoneType None"),
    (lambda x, k: kernels.scheduler_step(x, x, k, model_output_uncond=x, guidance_scale="7.5"), TypeError,
     "guidance_scale must be a real number, got str '7.5'"),
    (lambda x, k: kernels.scheduler_step(x, x, k, model_output_uncond=x, guidance_scale=float("nan")), ValueError,
     "guidance_scale must be finite, got nan"),
    (lambda x, k: kernels.scheduler_step(x, x, k, return_x0="False"), TypeError,
     "return_x0 must be a bool, got str 'False'"),
    # the reference failed with an indexing message, Triton ran "1"; a NaN or a zero divisor made NaNs
    (lambda x, k: StepCoefficients(a_x="1"), TypeError, "StepCoefficients.a_x must be a real number, got str '1'"),
    (lambda x, k: StepCoefficients(c1=True), TypeError, "StepCoefficients.c1 must be a real number, got bool True"),
    (lambda x, k: StepCoefficients(sigma=float("inf")), ValueError, "StepCoefficients.sigma must be finite, got inf"),
    (lambda x, k: StepCoefficients(clip=float("nan")), ValueError, "StepCoefficients.clip must be finite"),
    (lambda x, k: StepCoefficients(a_d=0.0), ValueError, "StepCoefficients.a_d=0.0 divides x0; it may not be 0"),
    (lambda x, k: StepCoefficients(b_d=0.0, c2=0.5), ValueError, "b_d=0.0 divides eps, which c2=0.5 uses"),
])
def test_scalar_arguments_are_checked_by_name(call, error, message):
    x = torch.zeros(1, 4, 3, 5)
    with pytest.raises(error) as e:
        call(x, StepCoefficients(c1=1.0))
    assert message in str(e.value), str(e.value)
    for ok in (StepCoefficients(a_x=np.float32(1.0), c0=1, clip=None), StepCoefficients(clip=np.float64(1.0))):
        kernels.scheduler_step(x, x, ok, model_output_uncond=x, guidance_scale=np.float32(7.5))  # numpy reals: fine


@pytest.mark.parametrize("shape, target", [
    ((2, 1, 8, 8), (2, 4, 8, 8)),  # RePaint's mask
    ((1, 8), (2, 4, 8, 8)),  # fewer dims: aligned from the right
    ((2, 4, 8, 8), (2, 4, 8, 8)),
    ((2, 4, 3, 8), (2, 4, 8, 8)),  # 3 against 8
    ((2, 4, 8, 8), (2, 1, 8, 8)),  # would widen x's channel dim
    ((1, 2, 4, 8, 8), (2, 4, 8, 8)),  # more dims than x
    ((0, 1, 8), (0, 4, 8)),  # empty
    ((1, 4, 8), (0, 4, 8)),
    ((), (2, 4)),
])
def test_mask_shape_check_is_torchs_broadcast_rule(shape, target):
    """The op's mask / known check (a plain loop, on every RePaint step) says what
    torch.broadcast_shapes(shape, x.shape) == x.shape says."""
    try:
        want = torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        want = False
    assert scheduler_step_module._broadcasts_to(torch.Size(shape), torch.Size(target)) == want, (shape, target)


# --- the schedulers use the op ---------------------------------------------------------------
SAMPLERS = [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_a", {}), ("dpmpp_2m", {})]


def trajectory(name, opts, device, steps=8, shape=(1, 4, 7, 9)):
    """A short CFG + RePaint-blend trajectory through ``name``; noise from a seeded CPU generator."""
    s = make_scheduler(name, SchedulerConfig(), **opts)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * s.init_noise_sigma).to(device)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.5).float().to(device)
    known = torch.randn(shape, generator=g).to(device)
    w = (torch.randn(shape[1], shape[1], generator=g) * 0.3).to(device)
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        cond = torch.einsum("oc,bchw->bohw", w, inp)
        x = s.step(cond, t, x, model_output_uncond=0.5 * inp, guidance_scale=3.0, generator=g,
                   mask=mask, known=known).prev_sample
    return x


@pytest.mark.parametrize("name,opts", SAMPLERS, ids=[n for n, _ in SAMPLERS])
def test_scheduler_dispatches_through_the_op(name, opts, device):
    kernels.reset_counts()
    with kernels.use(scheduler_step="reference"):
        ref = trajectory(name, opts, device)
    assert kernels.counts() == {("scheduler_step", "reference"): 8}, kernels.counts()
    kernels.reset_counts()
    with kernels.use(scheduler_step="triton"):
        tri = trajectory(name, opts, device)
    assert kernels.counts() == {("scheduler_step", "triton"): 8}, kernels.counts()
    assert_close(tri, ref, rel=1e-5, name=f"{name} trajectory, triton vs reference")


# --- GPU: SD latent shapes, half precision ----------------------------------------------------
GPU_CASES = [  # (shape, dtype): the tolerance rule is flash-attention's, see assert_within_torch_error
    ((2, 4, 64, 64), torch.float32),  # SD 1.5 at 512 px, CFG batch of 1
    ((2, 4, 64, 64), torch.float16),
    ((2, 4, 64, 64), torch.bfloat16),
    ((1, 4, 96, 96), torch.float32),  # SD 2.1 at 768 px
    ((1, 4, 96, 96), torch.float16),
    ((1, 4, 96, 96), torch.bfloat16),
]


def eager_in_dtype(d, k):
    """The same formula in plain torch without upcasting: what an eager fp16/bf16 sampler computes."""
    x, u = d["x"], d["model_output_uncond"]
    o = u + 7.5 * (d["model_output"] - u)
    x0 = (k.a_x * x + k.a_o * o) / k.a_d
    eps = (k.b_x * x + k.b_o * o + k.b_0 * x0) / k.b_d
    prev = k.c0 * x0 + k.c1 * x + k.c2 * eps + k.c3 * (x0 - d["prev_x0"]) + k.sigma * d["noise"]
    return d["mask"] * d["known"] + (1 - d["mask"]) * prev, x0


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_sd_shapes(shape, dtype):
    d = inputs(shape, device="cuda", dtype=dtype, seed=1)
    k = ALL_TERMS
    ref = call({n: t.float() for n, t in d.items()}, k, return_x0=True)  # fp32 math on the same values
    out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    with kernels.use(scheduler_step="triton"):
        prev, x0 = call(d, k, return_x0=True, out=out)
    assert prev.dtype == dtype and x0.dtype == dtype
    if dtype == torch.float32:
        assert_close(prev, ref[0], rel=1e-6, name="prev")
        assert_close(x0, ref[1], rel=1e-6, name="x0")
    else:
        eager_prev, eager_x0 = eager_in_dtype(d, k)
        assert_within_torch_error(prev, eager_prev, ref[0], name="prev")
        assert_within_torch_error(x0, eager_x0, ref[1], name="x0")


# ---- Layouts and limits the tests above leave out (found by mutation testing: each test below
# fails for a one-token bug in kernels/scheduler_step.py that every other test passed) ----

def test_no_write_past_the_end(device):
    """252 elements (one partial block): the kernel's store mask stops at N, so an out that is a
    view into a longer buffer leaves what follows it untouched."""
    shape = (1, 4, 7, 9)
    buf = torch.full((252 + 8,), 123.0, device=device)
    d = inputs(shape, device)
    with kernels.use(scheduler_step="triton"):
        call(d, ALL_TERMS, out=buf[:252].view(shape))
    assert torch.equal(buf[252:], torch.full((8,), 123.0, device=device)), buf[252:]


def test_out_may_be_an_input_itself_but_not_a_shifted_view_of_one(device):
    """Program i reads block i of every input and then writes block i of out: out=x in place is
    exact, but out one element into x's buffer would overwrite what the next program still reads.
    out and out_x0 overlapping is refused for every backend (which would win is undefined); two
    disjoint slices of one buffer are fine."""
    shape = (1, 4, 7, 9)
    d = inputs(shape, device)
    ref = call(d, ALL_TERMS)
    with kernels.use(scheduler_step="triton"):
        x = d["x"].clone()
        prev, _ = call(dict(d, x=x), ALL_TERMS, out=x)
        assert prev.data_ptr() == x.data_ptr()
        assert_close(prev, ref[0], rel=1e-6, name="prev, out=x")
        buf = torch.cat([d["x"].flatten(), d["x"].flatten()[:1]])
        with pytest.raises(ValueError, match="out overlaps x but is not x itself"):
            call(dict(d, x=buf[:-1].view(shape)), ALL_TERMS, out=buf[1:].view(shape))
    for backend in ("reference", "triton"):
        with kernels.use(scheduler_step=backend), pytest.raises(ValueError, match="out and out_x0 overlap"):
            out = torch.empty(shape, device=device)
            call(d, ALL_TERMS, return_x0=True, out=out, out_x0=out)
        with kernels.use(scheduler_step=backend):  # disjoint halves of one buffer are two outputs
            buf = torch.full((2, *shape), float("nan"), device=device)
            prev, x0 = call(d, ALL_TERMS, return_x0=True, out=buf[0], out_x0=buf[1])
            assert_close(prev, ref[0], rel=1e-6, name=f"prev into buf[0], {backend}")


@pytest.mark.parametrize("o_name, name", [
    ("out", "known"),  # the RePaint inputs, read after the step's own terms
    ("out", "mask"),
    ("out_x0", "x"),  # x0 is written after prev: a shifted out_x0 over x races too
])
def test_a_shifted_output_over_any_input_is_refused(o_name, name, device):
    """The rule above holds for every output and every input the kernel reads: out / out_x0 one
    element into an input's buffer is refused, naming both."""
    shape = (1, 4, 7, 9)
    d = inputs(shape, device, mask="full")
    buf = torch.cat([d[name].flatten(), d[name].flatten()[:1]])
    d[name] = buf[:-1].view(shape)
    with kernels.use(scheduler_step="triton"), pytest.raises(ValueError, match=f"{o_name} overlaps {name} but is not"):
        call(d, ALL_TERMS, return_x0=True, **{o_name: buf[1:].view(shape)})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's limit")
def test_interpreter_refuses_bf16():
    """The interpreter stores fp32 -> bf16 by truncation (a GPU rounds to nearest even), which put
    the bench's bf16 row 3x over the reference's error on CPU; refused by name there instead."""
    d = inputs((1, 4, 3, 5), "cpu", torch.bfloat16)
    with kernels.use(scheduler_step="triton"), pytest.raises(BackendUnsupported, match="bfloat16 under the Triton"):
        call(d, ALL_TERMS)


def test_negative_clip_is_refused(device):
    """x0 is clipped to [-clip, clip]: torch's clamp with min > max returns max, tl.clamp is
    undefined there, so a negative clip is an error for every backend rather than two answers."""
    d = inputs((1, 4, 3, 5), device)
    for backend in ("reference", "triton"):
        with kernels.use(scheduler_step=backend), pytest.raises(ValueError, match="clip=-1.0 must be >= 0"):
            call(d, dataclasses.replace(ALL_TERMS, clip=-1.0))


def test_strided_mask_and_non_contiguous_known(device):
    """A mask sliced with a spatial stride of 2 and a transposed known image: both are gathered
    densely before the launch (the kernel indexes them as flat (B, 1 | C, H, W) buffers)."""
    d = inputs((2, 4, 6, 6), device)
    d["mask"] = (torch.rand(2, 1, 6, 12, generator=torch.Generator().manual_seed(9)) > 0.5).float().to(device)[..., ::2]
    d["known"] = d["known"].transpose(2, 3)
    assert not d["mask"].is_contiguous() and not d["known"].is_contiguous()
    ref, tri = both(d, ALL_TERMS)
    assert_close(tri[0], ref[0], rel=1e-6, name="prev, strided mask and transposed known")


@pytest.mark.parametrize("which", ["noise", "prev_x0", "model_output_uncond", "out", "out_x0"])
def test_non_contiguous_side_inputs_are_refused(which, device):
    """Same values in another layout (for out and out_x0, NaN-poisoned buffers): the flat-indexing
    kernel refuses, naming the tensor."""
    d = inputs((1, 4, 6, 6), device)
    outs = {}
    if which in ("out", "out_x0"):
        outs[which] = torch.full_like(d["x"], float("nan")).transpose(2, 3).contiguous().transpose(2, 3)
    else:
        d[which] = d[which].transpose(2, 3).contiguous().transpose(2, 3)
    with kernels.use(scheduler_step="triton"), pytest.raises(BackendUnsupported, match=f"{which} is not contiguous"):
        call(d, ALL_TERMS, mask=False, return_x0=True, **outs)


def test_int32_bound_counts_the_last_block():
    """Offsets are int32 and the last block's lanes run up to BLOCK past N: refused from
    2**31 - 1 - BLOCK elements, not only from 2**31."""
    from kernels.scheduler_step import BLOCK, _triton_check

    x = torch.zeros(1).expand(2**31 - BLOCK // 2)
    assert "int32" in _triton_check(x, x, ALL_TERMS)


def test_clip_at_zero_is_a_clip(device):
    """clip=0.0 clamps x0 to 0 (a falsy value that is not None)."""
    d = inputs((1, 4, 6, 6), device)
    k = StepCoefficients(a_x=1.0, a_o=-0.5, clip=0.0, c0=0.9, c1=0.1)
    ref, tri = both(d, k, cfg=False, mask=False, return_x0=True)
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert_close(tri[1], ref[1], rel=1e-6, name="x0, clip 0")
    assert_close(tri[0], ref[0], rel=1e-6, name="prev, clip 0")


def test_half_inputs_are_computed_in_fp32(device):
    """The contract is fp32 math whatever the dtype: the reference on fp16 inputs is, bit for bit,
    the reference on their fp32 copies rounded once to fp16 (a term computed in fp16 first, such as
    c1 x, rounds twice), and the kernel is within about one fp16 rounding of that."""
    d = inputs((2, 4, 7, 9), device, torch.float16)
    want = call({n: t.float() for n, t in d.items()}, ALL_TERMS, return_x0=True)
    ref, tri = both(d, ALL_TERMS, return_x0=True)
    for name, r, t, w in zip(("prev", "x0"), ref, tri, want):
        assert r.dtype == t.dtype == torch.float16, (name, r.dtype, t.dtype)
        assert torch.equal(r, w.half()), f"reference {name}, fp16 inputs: " + describe_diff(r, w.half())
        assert_close(t, w, rel=TOL_HALF, name=f"triton {name}, fp16 inputs")
