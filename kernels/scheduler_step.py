"""One sampler step, fused: CFG + x0/eps prediction + optional x0 clipping + the update + noise +
RePaint blend, for DDPM (Ho et al. 2020, eq. 7), respaced DDPM, DDIM (Song et al. 2021, eq. 12),
Euler-ancestral (Karras et al. 2022, Alg. 2 with ancestral noise; k-diffusion) and DPM-Solver++(2M)
(Lu et al. 2022, Alg. 2) -- one launch per step.

Contract (every backend computes exactly this, elementwise, in fp32; ``out`` = model output)::

    out   = out_uncond + g * (out - out_uncond)            if out_uncond is given (Ho & Salimans 2022)
    x0    = (a_x * x + a_o * out) / a_d                    prediction type folded into (a_x, a_o, a_d)
    x0c   = clamp(x0, -clip, clip)                         if clip is not None
    eps   = (b_x * x + b_o * out + b_0 * x0c) / b_d        only when c2 != 0
    prev  = c0 * x0c + c1 * x + c2 * eps + c3 * (x0c - prev_x0) + sigma * noise
    prev  = mask * known + (1 - mask) * prev               if mask is given (mask = 1 on KNOWN pixels)

summed left to right in that order. The divisors and the D1 = x0c - prev_x0 form exist so the
reference evaluates the same fp32 operations as diffusers' schedulers (``(x - √(1-ᾱ) eps) / √ᾱ``,
DPM-Solver++'s ``(m0 - m1)``), which makes it bit-identical to diffusers for most steps.

The scheduler computes the 13 coefficients on the host (:class:`StepCoefficients`, python floats),
so the device loop never syncs. ``x0c`` is returned on request (``return_x0``): DPM++(2M) feeds it
back as ``prev_x0`` on the next step, diffusers returns it as ``pred_original_sample``.
The eps, D1 and noise terms are skipped when c2, c3, sigma are 0 (``noise`` may then be None,
``prev_x0`` too); the x0 and (c0, c1) terms are always evaluated.

Why fused: the eager torch sequence is ~8-12 elementwise kernels (CFG 2, x0 2, clamp, eps 2,
update 3, noise, blend 3), each re-reading a latent-sized tensor. The fused kernel reads x, out,
[out_uncond, noise, prev_x0, known, mask] once and writes prev [and x0] once: at (2, 4, 64, 64)
fp32 that is 32768 elements x 4 B x (2..7 reads + 1..2 writes) = 0.4-1.2 MB per step, a few
hundred ns of HBM time. At SD latent sizes the step is launch-bound (each eager launch costs
~5-10 us of host time), so the win is launch count: target >= 5x over the eager sequence.

Measured (H100, torch 2.11, triton 3.6, DDIM eta>0 step with CFG, wall time per call with the
host in the loop; a shared, noisy host): the Triton launch 35-47 us (Triton's launcher alone
costs 13-16 us for a 3-argument kernel, ~0.7 us per extra argument, hence one FLAGS constexpr),
the fp32 reference 190-280 us (4.8-7.4x), a minimal 6-op eager sequence in the latent dtype
90-125 us (2.6-3x). Device time at (8, 4, 128, 128) fp32: 9 us, ~1.1 TB/s over 5 tensors.
Since then the kernel goes through Triton's dispatch once per launch key and is launched directly
after that (kernels/_launch.py). bench ops on an H100, 2026-11-23 (bench/results/2026-11-23-h100):
31-51 us of host time per call (51-77 us through Triton's dispatch), 47.5x the fp32 eager reference at
(2, 4, 64, 64) with CFG, 68x with the RePaint blend; on a faster host the same day
(bench/results/2026-11-23-h100-2), 21-49 us per call and 21-32x (the reference's host cost drops more).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

from ._launch import Launcher
from ._triton import cdiv, tl, triton
from .registry import (Backend, check_floating, counted, define_op, dispatch, overlaps, refuse, register,
                       same_view, transform_problem, triton_device_problem)


@dataclass(frozen=True)
class StepCoefficients:
    """Host-side (python float) coefficients of one step; see the module docstring for the formula."""

    a_x: float = 0.0  # x0 = (a_x * x + a_o * out) / a_d
    a_o: float = 0.0
    a_d: float = 1.0
    clip: float | None = None  # clamp x0 to [-clip, clip]; None = no clipping
    b_x: float = 0.0  # eps = (b_x * x + b_o * out + b_0 * x0c) / b_d
    b_o: float = 0.0
    b_0: float = 0.0
    b_d: float = 1.0
    c0: float = 0.0  # prev = c0 * x0c + c1 * x + c2 * eps + c3 * (x0c - prev_x0) + sigma * noise
    c1: float = 0.0
    c2: float = 0.0
    c3: float = 0.0
    sigma: float = 0.0

    def __post_init__(self):
        """Real, finite numbers (clip may be None); a_d non-zero, and b_d where eps is used (c2 != 0):
        a string, a bool or a NaN would reach the backends as something else (the reference and
        Triton took "1" apart) or as NaN outputs."""
        for name in _COEFFICIENTS:
            v = getattr(self, name)
            if v is None and name == "clip":
                continue
            _check_real(f"StepCoefficients.{name}", v)
        if self.a_d == 0:
            raise ValueError(f"scheduler_step: StepCoefficients.a_d={self.a_d} divides x0; it may not be 0")
        if self.b_d == 0 and self.c2 != 0:
            raise ValueError(f"scheduler_step: StepCoefficients.b_d={self.b_d} divides eps, which c2={self.c2} "
                             "uses; it may be 0 only with c2 = 0")


def _check_real(name: str, v) -> None:
    """A finite real number (Python, numpy), not a bool: TypeError / ValueError naming ``name``."""
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"scheduler_step: {name} must be a real number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"scheduler_step: {name} must be finite, got {v!r}")


_COEFFICIENTS = tuple(f.name for f in fields(StepCoefficients))


def _check_args(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0, noise=None, prev_x0=None,
                mask=None, known=None, return_x0=False, out=None, out_x0=None):
    """What every backend needs (TypeError / ValueError naming the argument), made by the op and by
    scheduler_step_triton called directly."""
    _check_real("guidance_scale", guidance_scale)
    if not isinstance(return_x0, bool):  # a truthy "False" returned x0
        raise TypeError(f"scheduler_step: return_x0 must be a bool, got {type(return_x0).__name__} {return_x0!r}")
    if model_output_uncond is None and guidance_scale != 1.0:
        raise ValueError(f"scheduler_step: guidance_scale={guidance_scale} needs model_output_uncond "
                         "(without it there is nothing to guide)")
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"scheduler_step: coeffs must be StepCoefficients, got {type(coeffs).__name__}")
    check_floating("scheduler_step", ("mask",), x=x, model_output=model_output,
                   model_output_uncond=model_output_uncond, noise=noise, prev_x0=prev_x0, mask=mask, known=known,
                   out=out, out_x0=out_x0)
    for name, t in (("model_output", model_output), ("model_output_uncond", model_output_uncond),
                    ("noise", noise), ("prev_x0", prev_x0), ("out", out), ("out_x0", out_x0)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"scheduler_step: {name}{tuple(t.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("out", out), ("out_x0", out_x0)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"scheduler_step: {name} dtype {t.dtype} must be x's dtype {x.dtype}")
    if out is not None and out_x0 is not None and overlaps(out, out_x0):
        raise ValueError("scheduler_step: out and out_x0 overlap; each needs memory of its own")
    if coeffs.clip is not None and not coeffs.clip >= 0:  # tl.clamp is undefined for min > max
        raise ValueError(f"scheduler_step: clip={coeffs.clip} must be >= 0 (x0 is clipped to [-clip, clip])")
    if coeffs.sigma != 0.0 and noise is None:
        raise ValueError(f"scheduler_step: sigma={coeffs.sigma} needs noise")
    if coeffs.c3 != 0.0 and prev_x0 is None:
        raise ValueError(f"scheduler_step: c3={coeffs.c3} needs prev_x0")
    if (mask is None) != (known is None):
        raise ValueError("scheduler_step: mask and known go together (RePaint blend)")
    if mask is not None:
        for name, t in (("mask", mask), ("known", known)):
            if not _broadcasts_to(t.shape, x.shape):
                raise ValueError(f"scheduler_step: {name}{tuple(t.shape)} does not broadcast to x{tuple(x.shape)}")


@register("scheduler_step", Backend.REFERENCE, compile_dynamic=None)  # new coefficients every step: see register
def scheduler_step_reference(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0,
                             noise=None, prev_x0=None, mask=None, known=None, return_x0=False,
                             out=None, out_x0=None):
    """Plain torch, fp32 math, same term order as the kernel; returns (prev, x0 or None) in x's dtype."""
    k = coeffs
    xf, o = x.float(), model_output.float()
    if model_output_uncond is not None:
        u = model_output_uncond.float()
        o = u + guidance_scale * (o - u)
    x0 = (k.a_x * xf + k.a_o * o) / k.a_d
    if k.clip is not None:
        x0 = x0.clamp(-k.clip, k.clip)
    prev = k.c0 * x0 + k.c1 * xf
    if k.c2 != 0.0:
        prev = prev + k.c2 * ((k.b_x * xf + k.b_o * o + k.b_0 * x0) / k.b_d)
    if k.c3 != 0.0:
        prev = prev + k.c3 * (x0 - prev_x0.float())
    if k.sigma != 0.0:
        prev = prev + k.sigma * noise.float()
    if mask is not None:
        m = mask.float()
        prev = m * known.float() + (1.0 - m) * prev
    prev = prev.to(x.dtype) if out is None else out.copy_(prev)
    if not return_x0:
        return prev, None
    return prev, (x0.to(x.dtype) if out_x0 is None else out_x0.copy_(x0))


def scheduler_step(x, model_output, coeffs: StepCoefficients, *, model_output_uncond=None,
                   guidance_scale: float = 1.0, noise=None, prev_x0=None, mask=None, known=None,
                   return_x0: bool = False, out=None, out_x0=None):
    """One fused sampler step (formula in the module docstring) -> ``(prev, x0 or None)``.

    x, model_output, model_output_uncond, noise, prev_x0: same shape (any, typically (B, 4, h, w));
    mask, known: broadcastable to x (mask (B, 1, h, w) is the usual RePaint mask, 1 = keep ``known``);
    out / out_x0: optional preallocated outputs (x's shape and dtype), e.g. NaN-poisoned in tests.
    """
    _check_args(x, model_output, coeffs, model_output_uncond, guidance_scale, noise, prev_x0, mask, known,
                return_x0, out, out_x0)
    return dispatch("scheduler_step", x, model_output, coeffs, model_output_uncond, float(guidance_scale),
                    noise, prev_x0, mask, known, bool(return_x0), out, out_x0)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
# FLAGS bits (one constexpr instead of seven: Triton's launcher cost grows with the argument count,
# and at SD latent sizes the launch is the cost).
UNCOND, CLIP, EPS, NOISE, PREV_X0, MASK, WRITE_X0 = 1, 2, 4, 8, 16, 32, 64


@triton.jit
def _scheduler_step_kernel(
    x_ptr,  # (N,) contiguous, the current sample x_t
    out_ptr,  # (N,) contiguous, model output (cond)
    unc_ptr,  # (N,) contiguous, model output (uncond); read if FLAGS & UNCOND
    noise_ptr,  # (N,) contiguous; read if FLAGS & NOISE
    px0_ptr,  # (N,) contiguous, previous step's x0 (DPM++ 2M); read if FLAGS & PREV_X0
    known_ptr,  # (N,) contiguous, RePaint's known latent at the target level; read if FLAGS & MASK
    mask_ptr,  # (B, C, S) with strides (m_sb, m_sc, 1), 0 on broadcast dims; read if FLAGS & MASK
    prev_ptr,  # (N,) contiguous, output x_{t-1}
    x0_ptr,  # (N,) contiguous, output x0; written if FLAGS & WRITE_X0
    N, S, CS,  # elements; spatial elements per channel; C * S (N = B * C * S)
    m_sb, m_sc,  # mask strides over batch and channel (0 where it broadcasts)
    g,  # guidance scale
    a_x, a_o, a_d, clip, b_x, b_o, b_0, b_d, c0, c1, c2, c3, sigma,  # StepCoefficients
    FLAGS: tl.constexpr,  # UNCOND | CLIP | EPS | NOISE | PREV_X0 | MASK | WRITE_X0
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if FLAGS & 1:  # UNCOND: classifier-free guidance
        u = tl.load(unc_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        o = u + g * (o - u)
    x0 = (a_x * x + a_o * o) / a_d
    if FLAGS & 2:  # CLIP
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN, as torch.clamp
    prev = c0 * x0 + c1 * x
    if FLAGS & 4:  # EPS
        eps = (b_x * x + b_o * o + b_0 * x0) / b_d
        prev += c2 * eps
    if FLAGS & 16:  # PREV_X0: DPM-Solver++(2M)'s D1 term
        prev += c3 * (x0 - tl.load(px0_ptr + offs, mask=valid, other=0.0).to(tl.float32))
    if FLAGS & 8:  # NOISE
        prev += sigma * tl.load(noise_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if FLAGS & 32:  # MASK: RePaint blend, mask = 1 keeps known
        b = offs // CS
        c = (offs - b * CS) // S
        m = tl.load(mask_ptr + b * m_sb + c * m_sc + (offs % S), mask=valid, other=0.0).to(tl.float32)
        kn = tl.load(known_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        prev = m * kn + (1.0 - m) * prev
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=valid)
    if FLAGS & 64:  # WRITE_X0
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=valid)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per program


def _broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` unchanged (each trailing dim 1 or
    equal): torch.broadcast_shapes(shape, target) == target, without its ~28 µs of symbolic-shape
    machinery (torch 2.13, bench.host; twice on every RePaint step)."""
    return len(shape) <= len(target) and all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _mask_view(mask, x):
    """``mask`` broadcast to x and viewed as (B, C, S) with unit stride over S (copied if not)."""
    B, C = x.shape[0], x.shape[1]
    m = mask.expand(x.shape).reshape(B, C, -1)
    return m if m.stride(2) == 1 or m.shape[2] == 1 else m.contiguous()


def _triton_check(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0, noise=None,
                  prev_x0=None, mask=None, known=None, return_x0=False, out=None, out_x0=None):
    why = triton_device_problem(x.device) or transform_problem(x, model_output, model_output_uncond, noise, prev_x0,
                                                                 mask, known, out, out_x0)
    if why:
        return why
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # here only under TRITON_INTERPRET=1
        return ("bfloat16 under the Triton interpreter: it truncates fp32 to bf16 where a GPU rounds to "
                "nearest, so every output would be up to 1 ulp off the reference's; use fp16/fp32 or a GPU")
    tensors = (x, model_output, model_output_uncond, noise, prev_x0, mask, known)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "an input requires grad and the Triton step has no backward (the reference has autograd)"
    written = (out, out_x0 if return_x0 else None)  # out_x0 is written only when x0 is returned
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in written):
        return "out or out_x0 requires grad (it is in a graph) and the Triton step records no autograd"
    if x.numel() > 2**31 - 1 - BLOCK:  # pid * BLOCK + arange(BLOCK) is 32-bit
        return f"{x.numel()} elements exceed the kernel's int32 indexing (at most {2**31 - 1 - BLOCK})"
    if mask is not None and x.dim() < 2:
        return f"a mask needs x with a (batch, channel, ...) layout, got x{tuple(x.shape)}"
    for name, t in (("x", x), ("model_output", model_output), ("model_output_uncond", model_output_uncond),
                    ("noise", noise), ("prev_x0", prev_x0), ("known", known), *zip(("out", "out_x0"), written),
                    ("mask", mask)):  # an out_x0 left unwritten is ignored, as the reference ignores it
        if t is None:
            continue
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
        if t.dtype not in _DTYPES and not (name == "mask" and t.dtype == torch.bool):
            return f"{name} dtype {t.dtype} (supported: float32, float16, bfloat16; mask also bool)"
        if name != "mask" and name != "known" and not t.is_contiguous():
            return f"{name} is not contiguous"
        if name in ("out", "out_x0") and t.shape != x.shape:
            return f"{name}{tuple(t.shape)} is not x's shape {tuple(x.shape)}"
    return None


def scheduler_step_triton(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0,
                          noise=None, prev_x0=None, mask=None, known=None, return_x0=False,
                          out=None, out_x0=None):
    """One launch, flat over the elements of x; returns (prev, x0 or None) in x's dtype. A bool
    mask, or a mask / known that is neither contiguous nor a plain broadcast, is first copied into
    a layout the kernel reads (one more small launch); the pipelines pass the canonical layouts.

    Called directly, it checks what :func:`scheduler_step` and the switch check: a bad argument is
    a TypeError / ValueError, an input the kernel cannot take BackendUnsupported. The switch calls
    :func:`_scheduler_step_triton`, having made both checks."""
    args = (x, model_output, coeffs, model_output_uncond, guidance_scale, noise, prev_x0, mask, known,
            return_x0, out, out_x0)
    _check_args(*args)
    refuse("scheduler_step", Backend.TRITON, _triton_check(*args))
    return _scheduler_step_triton(*args)


def _scalars(k: StepCoefficients) -> list[float]:
    """The coefficients in StepCoefficients' field order, as the kernel takes them: floats (an int would
    make Triton compile, and the direct launch expect, an int), clip 0.0 when there is none (FLAGS says)."""
    return [float(v) for v in (k.a_x, k.a_o, k.a_d, 0.0 if k.clip is None else k.clip, k.b_x, k.b_o, k.b_0, k.b_d,
                               k.c0, k.c1, k.c2, k.c3, k.sigma)]


@register("scheduler_step", Backend.TRITON, check=_triton_check)
def _scheduler_step_triton(x, model_output, coeffs, model_output_uncond=None, guidance_scale=1.0,
                           noise=None, prev_x0=None, mask=None, known=None, return_x0=False,
                           out=None, out_x0=None):
    """:func:`scheduler_step_triton` past its argument checks (the switch has made them)."""
    if torch.compiler.is_compiling():  # dynamo traces one opaque op, not the launch (see _op_impl)
        if out is not None or out_x0 is not None:  # writes into the caller's memory: an eager call, outside the graph
            eager = torch.compiler.disable(_scheduler_step_triton)
            return eager(x, model_output, coeffs, model_output_uncond, guidance_scale, noise, prev_x0, mask, known,
                         return_x0, out, out_x0)
        prev, x0 = torch.ops.sdlab.scheduler_step(x, model_output, model_output_uncond, noise, prev_x0, mask, known,
                                                  float(guidance_scale), _scalars(coeffs), coeffs.clip is not None,
                                                  return_x0)
        return prev, x0 if return_x0 else None
    for o_name, o in (("out", out), ("out_x0", out_x0)) if out is not None or out_x0 is not None else ():
        # program i reads block i of each input, then writes it: in place is safe, shifted is not
        for name, t in (("x", x), ("model_output", model_output), ("model_output_uncond", model_output_uncond),
                        ("noise", noise), ("prev_x0", prev_x0), ("mask", mask), ("known", known)):
            if o is not None and t is not None and overlaps(o, t) and not same_view(o, t):
                raise ValueError(f"scheduler_step: {o_name} overlaps {name} but is not {name} itself (pointer, "
                                 f"shape and strides); only {o_name}={name} (or memory no input uses) is safe")
    k = coeffs
    prev = torch.empty_like(x) if out is None else out
    x0 = (torch.empty_like(x) if out_x0 is None else out_x0) if return_x0 else None
    N = x.numel()
    if N == 0:
        return prev, x0
    flags = ((UNCOND if model_output_uncond is not None else 0) | (CLIP if k.clip is not None else 0)
             | (EPS if k.c2 != 0.0 else 0) | (NOISE if k.sigma != 0.0 else 0) | (PREV_X0 if k.c3 != 0.0 else 0)
             | (MASK if mask is not None else 0) | (WRITE_X0 if x0 is not None else 0))
    S = CS = N
    m_sb = m_sc = 0
    m, kn = x, x
    if mask is not None:
        S, CS = N // (x.shape[0] * x.shape[1]), N // x.shape[0]
        m = _mask_view(mask.to(x.dtype) if mask.dtype == torch.bool else mask, x)  # bool: 1 = known
        m_sb, m_sc = m.stride(0), m.stride(1)
        kn = known if known.shape == x.shape and known.is_contiguous() else known.expand(x.shape).contiguous()
    tensors = (x, model_output, x if model_output_uncond is None else model_output_uncond, x if noise is None else noise,
               x if prev_x0 is None else prev_x0, kn, m, prev, prev if x0 is None else x0)
    ints = (N, S, CS, m_sb, m_sc)
    # floats as floats (see _scalars)
    scalars = (float(guidance_scale), *_scalars(k))
    _STEP((cdiv(N, BLOCK),), (ints, flags, BLOCK), tensors, (*tensors, *ints, *scalars),
          {"FLAGS": flags, "BLOCK": BLOCK})
    if out is not None or out_x0 is not None:  # written through their pointers: autograd sees in-place writes
        torch.autograd.graph.increment_version([t for t in (out, out_x0 if return_x0 else None) if t is not None])
    return prev, x0


# Launches that skip Triton's per-call dispatch once a launch key has been through it (kernels/_launch.py)
_STEP = Launcher(_scheduler_step_kernel)


# ---- torch.compile: the Triton backend as one opaque op, sdlab::scheduler_step ----
# As for group_norm_silu (see its _op_impl): while torch.compile traces, the Triton backend calls this,
# so dynamo sees one op with a shape function, and the compiled graph runs the launch above, counted as
# a triton call. The 13 coefficients travel as _scalars' list (clip: a flag and its value).

def _op_impl(x, model_output, model_output_uncond, noise, prev_x0, mask, known, guidance_scale, coeffs, clip,
             return_x0):
    """(prev, x0): x0 empty unless ``return_x0``; ``coeffs`` in StepCoefficients' field order."""
    a_x, a_o, a_d, clip_value, *rest = coeffs
    k = StepCoefficients(a_x, a_o, a_d, clip_value if clip else None, *rest)
    prev, x0 = counted("scheduler_step", Backend.TRITON, _scheduler_step_triton, x, model_output, k,
                       model_output_uncond, guidance_scale, noise, prev_x0, mask, known, return_x0)
    return prev, x.new_empty(0) if x0 is None else x0


def _op_fake(x, model_output, model_output_uncond, noise, prev_x0, mask, known, guidance_scale, coeffs, clip,
             return_x0):
    return torch.empty_like(x), torch.empty_like(x) if return_x0 else x.new_empty(0)  # as _scheduler_step_triton


define_op("scheduler_step", "(Tensor x, Tensor model_output, Tensor? model_output_uncond, Tensor? noise, "
          "Tensor? prev_x0, Tensor? mask, Tensor? known, float guidance_scale, float[] coeffs, bool clip, "
          "bool return_x0) -> (Tensor, Tensor)", _op_impl, _op_fake)
