"""Op benchmarks: each op x backend x the shapes Stable Diffusion calls x dtype.

The shape tables below are the single place where SD's op shapes are written down, each with the
reason it is there; :func:`make_inputs` builds an op's inputs from a case (shared with
``bench/test_bench_ops.py`` and usable by tests), :func:`oracle` computes the fp64 answer.

Backends: the registry's (``reference``, ``triton``, ``sdpa`` ...), ``compile`` (torch.compile
of the reference) and, for attention, SDPA pinned to one torch backend each (``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``) with ``torch.nn.attention.sdpa_kernel``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from .common import (ERROR_ATOL, TRITON_DISPATCH, Skip, add_speedups, copy_ms, describe_exception, dtype_name,
                     host_ms, interpreting, make_row, max_errors, skipped_row, time_fn, tritons_dispatch, within_error)


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    shape: str  # human-readable
    reason: str
    params: dict = field(default_factory=dict, compare=False, hash=False)
    quick: bool = False  # part of the --quick CPU smoke set


def _gn(name, shape, reason, *, eps=1e-5, act="silu", groups=32, quick=False):
    act_txt = "" if act == "silu" else " no act"
    return Case("group_norm_silu", name, f"({','.join(map(str, shape))}) g{groups}{act_txt}", reason,
                dict(shape=shape, groups=groups, eps=eps, activation=act), quick)


def _attn(name, b, h, lq, lkv, d, reason, *, quick=False):
    return Case("attention", name, f"B{b} H{h} Lq{lq} Lkv{lkv} D{d}", reason,
                dict(b=b, h=h, lq=lq, lkv=lkv, d=d), quick)


def _step(name, shape, reason, *, mask=False, renoise=False, noise=None, prev_x0=False, x0_out=False,
          quick=False):
    """A scheduler_step case. ``noise``: the update draws noise (default: with the mask, as RePaint's
    DDPM steps do; without, DDIM eta 0); ``prev_x0``: it reads the previous x0 (DPM++ 2M);
    ``x0_out``: it also writes x0 (``return_x0``, as DPM++ 2M keeps it for the next step)."""
    noise = mask if noise is None else noise
    kind = "renoise" if renoise else f"cfg{' +mask' if mask else ''}{' +noise' if noise and not mask else ''}" \
        f"{' -noise' if mask and not noise else ''}{' +prev_x0' if prev_x0 else ''}{' +x0 out' if x0_out else ''}"
    return Case("scheduler_step", name, f"({','.join(map(str, shape))}) {kind}", reason,
                dict(shape=shape, mask=mask, renoise=renoise, noise=noise, prev_x0=prev_x0, x0_out=x0_out), quick)


# SD 1.5 UNet at 512 px: latent 64x64, channels 320/640/1280/1280, 8 heads (head dims 40/80/160),
# context 77x768; batch 2 = classifier-free guidance (cond + uncond in one call). SD 2.x: head dim
# 64 (5/10/20 heads), 768 px -> 96x96 latent. VAE decoder at 512 px: 512/512/256/128 channels at
# 64/128/256/512 px; GroupNorm eps 1e-6 in the VAE and in the transformers' input norm.
CASES: dict[str, list[Case]] = {
    "group_norm_silu": [
        _gn("unet15.down0.res", (2, 320, 64, 64), "first ResBlock, CFG batch: the most frequent GN"),
        _gn("unet15.down0.res.b1", (1, 320, 64, 64), "same without CFG (guidance 1 / unconditional)"),
        _gn("unet15.down1.res", (2, 640, 32, 32), "level-1 ResBlock"),
        _gn("unet15.down2.res", (2, 1280, 16, 16), "level-2 ResBlock"),
        _gn("unet15.mid.res", (2, 1280, 8, 8), "mid block: few elements per group, launch-bound"),
        _gn("unet15.up3.res0", (2, 960, 64, 64), "skip-concat input: 30 channels/group, not a power of 2"),
        _gn("unet15.attn.norm0", (2, 320, 64, 64), "SpatialTransformer input norm (eps 1e-6, no SiLU)",
            eps=1e-6, act=None),
        _gn("unet15@768.down0.res", (2, 320, 96, 96), "SD 1.5/2.1 at 768 px: 96x96 latent"),
        _gn("vae.dec.mid", (1, 512, 64, 64), "VAE decoder mid block", eps=1e-6),
        _gn("vae.dec.up2", (1, 256, 256, 256), "VAE decoder at 256 px", eps=1e-6),
        _gn("vae.dec.up3", (1, 128, 512, 512), "VAE decoder last level / norm_out: 32M elements", eps=1e-6),
        _gn("vae.dec.up3@768", (1, 128, 768, 768), "VAE decoder at 768 px: 75M elements", eps=1e-6),
        _gn("tiny.res", (2, 64, 8, 8), "CPU smoke: tiny preset's ResBlock", quick=True),
        _gn("odd.hw", (1, 96, 7, 9), "HW not a power of two, 3 channels/group", quick=True),
    ],
    "attention": [
        _attn("unet15.attn.self0", 2, 8, 4096, 4096, 40, "level-0 self-attention: the UNet's hottest op"),
        _attn("unet15.attn.self0.b1", 1, 8, 4096, 4096, 40, "same without CFG"),
        _attn("unet15.attn.cross0", 2, 8, 4096, 77, 40, "level-0 cross-attention: Lkv 77 text tokens"),
        _attn("unet15.attn.self1", 2, 8, 1024, 1024, 80, "level-1 self-attention, head dim 80"),
        _attn("unet15.attn.cross1", 2, 8, 1024, 77, 80, "level-1 cross-attention"),
        _attn("unet15.attn.self2", 2, 8, 256, 256, 160, "level-2 self-attention, head dim 160"),
        _attn("unet15.attn.mid", 2, 8, 64, 64, 160, "mid block: 64 tokens, launch-bound"),
        _attn("unet15@640.attn.self0", 2, 8, 6400, 6400, 40,
              "SD 1.5 at 640 px: 80x80 latent, under LONG_KV (8192): places that cut"),
        _attn("unet15@768.attn.self0", 2, 8, 9216, 9216, 40, "SD 1.5 at 768 px: 96x96 latent"),
        _attn("sd21.attn.self0", 2, 5, 9216, 9216, 64, "SD 2.1 at 768 px: head dim 64, 5 heads"),
        _attn("sd21.attn.cross0", 2, 5, 9216, 77, 64, "SD 2.1 cross-attention (context 1024 -> 5x64)"),
        _attn("sd21-base.attn.self0", 2, 5, 4096, 4096, 64, "SD 2.1-base at 512 px"),
        _attn("vae.mid.attn", 1, 1, 4096, 4096, 512, "VAE mid attention: 1 head of 512 (beyond flash's 256)"),
        _attn("tiny.self", 1, 2, 64, 64, 16, "CPU smoke: tiny preset's self-attention", quick=True),
        _attn("tiny.cross", 2, 2, 64, 7, 8, "CPU smoke: cross-attention, Lkv not a multiple of 16",
              quick=True),
    ],
    "scheduler_step": [
        _step("sd15.latent", (2, 4, 64, 64), "SD 1.5 latent at 512 px, 2 images, eps cond + uncond (CFG)"),
        _step("sd15.latent.repaint", (2, 4, 64, 64), "RePaint: blend with the noised known latent",
              mask=True),
        _step("sd21.latent", (2, 4, 96, 96), "SD 2.1 latent at 768 px"),
        _step("sd21.latent.repaint", (2, 4, 96, 96), "RePaint at 768 px", mask=True),
        _step("tiny.latent", (2, 4, 8, 8), "CPU smoke: tiny preset's latent", quick=True),
        _step("tiny.latent.repaint", (2, 4, 8, 8), "CPU smoke with mask", mask=True, quick=True),
    ],
}

SDPA_VARIANTS = {  # bench backend name -> torch.nn.attention.SDPBackend member
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
_CUDA_ONLY_SDPA = {"sdpa-efficient", "sdpa-cudnn"}
BASE_BACKENDS = ("reference", "triton", "compile")


def known_ops() -> list[str]:
    return list(CASES)


def op_backends(op: str) -> list[str]:
    """Backends benchmarked for ``op``: reference, triton and compile always (a missing one is a
    skipped row, not an error), whatever else the registry has, SDPA variants for attention."""
    names = list(BASE_BACKENDS)
    try:
        import kernels

        if op in kernels.ops():
            names += [b for b in kernels.backends(op) if b not in names]
    except Exception:  # kernels failing to import is reported per row
        pass
    if "triton" in names:
        names.insert(names.index("triton") + 1, TRITON_DISPATCH)
    if op == "attention":
        names += [b for b in ("sdpa", *SDPA_VARIANTS) if b not in names]
    return names


def all_backends() -> list[str]:
    return list(dict.fromkeys(b for op in CASES for b in op_backends(op)))


def shape_selected(name: str, shapes: list[str]) -> bool:
    """Whether ``shapes`` (--shapes values) select the case ``name``: a value that is a case's full
    name selects that case alone (``tiny.latent``, not ``tiny.latent.repaint`` too); any other
    value, or one ending in ``*``, every case whose name it prefixes."""
    names = {c.name for cases in CASES.values() for c in cases}
    return any(name == s if s in names else name.startswith(s.rstrip("*")) for s in shapes)


def select_cases(ops: list[str], shapes: list[str] | None, quick: bool) -> list[Case]:
    """Cases of ``ops``: those ``shapes`` select (:func:`shape_selected`) when given, else the
    quick or full set."""
    pool = [c for op in ops for c in CASES[op]]
    if not shapes:
        return [c for c in pool if c.quick == quick]
    return [c for c in pool if shape_selected(c.name, shapes)]


# -------------------------------------------------------------------------------------- inputs
def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, g, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale + shift).to(dtype)


def make_inputs(case: Case, device, dtype: torch.dtype, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) for ``kernels.<op>(*args, **kwargs)`` at ``case``; fresh random, never zeros."""
    device = torch.device(device)
    g = _generator(device, seed)
    p = case.params
    if case.op == "group_norm_silu":
        c = p["shape"][1]
        x = _randn(p["shape"], g, device, dtype, scale=2.0, shift=0.5)  # non-zero mean, non-unit var
        w = _randn((c,), g, device, dtype, scale=0.2, shift=1.0)
        b = _randn((c,), g, device, dtype, scale=0.2)
        return (x, w, b, p["groups"], p["eps"], p["activation"]), {}
    if case.op == "attention":
        # The layout sdcore.layers.multi_head_attention hands over: (B, L, H*D) split into a
        # (B, H, L, D) view, i.e. not contiguous, as in the model.
        b, h, d = p["b"], p["h"], p["d"]
        split = lambda t: t.unflatten(-1, (h, d)).transpose(1, 2)  # noqa: E731
        q = split(_randn((b, p["lq"], h * d), g, device, dtype))
        k = split(_randn((b, p["lkv"], h * d), g, device, dtype))
        v = split(_randn((b, p["lkv"], h * d), g, device, dtype))
        return (q, k, v), {}
    if case.op == "scheduler_step":
        return _scheduler_step_inputs(case, g, device, dtype)
    raise ValueError(f"no inputs for op {case.op!r}")


def ddim_coefficients(t: int = 501, prev_t: int = 481, eta: float = 0.0):
    """StepCoefficients of a DDIM step (Song et al. 2021, eq. 12) for eps-prediction on SD's
    scaled-linear schedule (beta 0.00085..0.012, 1000 steps), t=501 -> 481 as in a 50-step run.
    eta=0: SD's usual deterministic DDIM; eta=1: DDPM-like, with noise (RePaint)."""
    from kernels import StepCoefficients

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    a_t, a_p = ab[t].item(), ab[prev_t].item()
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
    return StepCoefficients(a_x=a_t**-0.5, a_o=-((1 - a_t) / a_t) ** 0.5, b_o=1.0,
                            c0=a_p**0.5, c2=(1 - a_p - sigma**2) ** 0.5, sigma=sigma)


def _scheduler_step_inputs(case: Case, g, device, dtype) -> tuple[tuple, dict]:
    """Positional, in the order kernels.scheduler_step dispatches: (x, eps_cond, coeffs,
    eps_uncond, guidance 7.5, noise, prev_x0, mask, known). DDIM coefficients, eta=1 with noise and
    eta=0 without (the case's ``noise``: plain cases have none, masked ones do, as RePaint's DDPM
    steps); a DPM++ 2M term on prev_x0 where the case reads it; RePaint: mask (B, 1, h, w) of 0/1
    and the noised known latent. Keywords: ``return_x0=True`` where the case writes x0."""
    try:
        import kernels

        kernels.StepCoefficients
    except (ImportError, AttributeError) as e:
        raise Skip(f"kernels.scheduler_step / StepCoefficients do not exist yet ({e})") from None
    shape, masked = case.params["shape"], case.params["mask"]
    x = _randn(shape, g, device, dtype)
    if case.params.get("renoise"):  # RePaint's jump back up, as Scheduler.undo_step launches it
        ratio = 0.97  # ᾱ_t / ᾱ_s of a 10-step jump mid-schedule; only the values differ between jumps
        coeffs = kernels.StepCoefficients(c1=ratio**0.5, sigma=(1 - ratio) ** 0.5)
        return (x, x, coeffs, None, 1.0, _randn(shape, g, device, dtype), None, None, None), {}
    cond = _randn(shape, g, device, dtype)
    uncond = _randn(shape, g, device, dtype)
    noisy = case.params.get("noise", masked)
    coeffs = ddim_coefficients(eta=1.0 if noisy else 0.0)
    noise = _randn(shape, g, device, dtype) if noisy else None
    prev_x0 = None
    if case.params.get("prev_x0"):
        coeffs = replace(coeffs, c3=-0.05)  # DPM++ 2M's second-order term: c3 (x0 - prev_x0)
        prev_x0 = _randn(shape, g, device, dtype)
    kwargs = {"return_x0": True} if case.params.get("x0_out") else {}
    if not masked:
        return (x, cond, coeffs, uncond, 7.5, noise, prev_x0, None, None), kwargs
    b, _, h, w = shape
    mask = (torch.rand((b, 1, h, w), generator=g, device=device) < 0.5).to(dtype)
    known = _randn(shape, g, device, dtype)
    return (x, cond, coeffs, uncond, 7.5, noise, prev_x0, mask, known), kwargs


# ------------------------------------------------------------------------------------- oracles
def _to64(x):
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _attention_fp64(q, k, v, scale=None):
    """softmax(q kᵀ s) v entirely in fp64, one batch entry at a time to bound memory."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for i in range(q.shape[0]):
        qi, ki, vi = (_to64(t[i]) for t in (q, k, v))
        outs.append(torch.softmax(qi @ ki.transpose(-1, -2) * scale, dim=-1) @ vi)
    return torch.stack(outs)


ORACLE = {"group_norm_silu": "fp64 oracle", "attention": "fp64 oracle",
          "scheduler_step": "reference on fp64 inputs (fp32 math, the op's contract)"}


def oracle(op: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The high-precision answer: the registered reference on fp64 inputs; attention in fp64
    throughout (the reference keeps its softmax in fp32); scheduler_step's reference computes in
    fp32 by contract, so its oracle is fp32 math on exact inputs."""
    if op == "attention":
        return _attention_fp64(*args, **kwargs)
    import kernels

    fn = kernels.implementation(op, "reference")
    return _first_tensor(fn(*map(_to64, args), **{k: _to64(v) for k, v in kwargs.items()}))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "__dataclass_fields__"):
        for name in out.__dataclass_fields__:
            if isinstance(getattr(out, name), torch.Tensor):
                return getattr(out, name)
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}")


# -------------------------------------------------------------------------------- bytes, flops
def _tensor_bytes(args, kwargs) -> int:
    return sum(t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))


def attended_pairs(lq: int, lkv: int, causal: bool = False) -> int:
    """(query, key) pairs scored: Lq·Lkv, or under the top-left causal mask (query i sees keys j <= i)
    sum over i of min(i + 1, Lkv)."""
    if not causal:
        return lq * lkv
    n = min(lq, lkv)
    return n * (n + 1) // 2 + (lq - n) * lkv


def work(case: Case, args, kwargs, out: torch.Tensor) -> tuple[int, int | None]:
    """(bytes moved, flops): inputs read once + output written once (scheduler_step's x0 too where
    the case writes it); attention flops 4·D per attended (query, key) pair, 4·B·H·Lq·Lkv·D without
    a causal mask."""
    outputs = 2 if case.params.get("x0_out") else 1  # x0 has the shape and dtype of prev
    nbytes = _tensor_bytes(args, kwargs) + outputs * out.numel() * out.element_size()
    if case.op == "attention":
        p = case.params
        return nbytes, 4 * p["b"] * p["h"] * attended_pairs(p["lq"], p["lkv"], p.get("causal", False)) * p["d"]
    return nbytes, None


# ----------------------------------------------------------------------------------- backends
def backend_refusal(op: str, backend: str, args, kwargs=None) -> str | None:
    """Why ``backend``'s check refuses these inputs (asked through the registry: kernels.use +
    resolve, as a user's explicit choice would be), or None."""
    import kernels

    try:
        with kernels.use(**{op: backend}):
            kernels.resolve(op, *args, **(kwargs or {}))
    except kernels.BackendUnsupported as e:
        return str(e)
    return None


def backend_callable(op: str, backend: str, args, kwargs, device: torch.device):
    """(fn, context manager to time it under, note); raises Skip with the reason it cannot run."""
    import kernels

    if op not in kernels.ops():
        raise Skip(f"op {op!r} is not registered in kernels yet (registered: {', '.join(kernels.ops())})")
    if backend == TRITON_DISPATCH:
        from kernels import _launch

        if not _launch.ENABLED:
            raise Skip(f"the triton row already launches through Triton's dispatch here: {_launch.mode()}")
        fn, _, note = backend_callable(op, "triton", args, kwargs, device)
        return fn, tritons_dispatch, note
    if backend in SDPA_VARIANTS:
        if device.type != "cuda" and backend in _CUDA_ONLY_SDPA:
            raise Skip(f"{backend} needs a CUDA device")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        member = getattr(SDPBackend, SDPA_VARIANTS[backend], None)
        if member is None:
            raise Skip(f"torch {torch.__version__} has no SDPBackend.{SDPA_VARIANTS[backend]}")
        import torch.nn.functional as F

        fn = lambda: F.scaled_dot_product_attention(*args, **kwargs)  # noqa: E731
        return fn, (lambda: sdpa_kernel([member])), ""
    if backend not in kernels.backends(op):
        raise Skip(f"op {op!r} has no {backend!r} backend registered yet (has: {', '.join(kernels.backends(op))})")
    if backend != "compile" and (why := backend_refusal(op, backend, args, kwargs)):
        raise Skip(why)
    impl = kernels.implementation(op, backend)
    note = "interpreted (TRITON_INTERPRET=1)" if backend == "triton" and interpreting() else ""
    return (lambda: impl(*args, **kwargs)), contextlib.nullcontext, note


# the note of a row over 100% of its ceiling: the ceiling measured is no peak of this device there
OVER_PEAK = "over 100% of peak: this run's {what} rate in {dtype} is not the device's peak for this op{why}"
MATMUL_WHY = " (on a CPU, a small {dtype} matmul can run slower than the backend's own kernels)"


def _peak_key(case: Case) -> str:
    return "tflops" if case.op == "attention" else "gbps"


def run_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, env: dict,
             ceilings: dict | None, *, inputs=None, ref64=None, quick: bool = False,
             skip_compile_reason: str | None = None, copies: dict | None = None) -> dict:
    """One row: time ``backend`` on ``case`` and compare its output with the fp64 oracle.
    ``copies``: the run's same-size copy timings (common.copy_ms), for memory-bound ops' % of copy."""
    base = dict(suite="ops", op=case.op, case=case.name, shape=case.shape, reason=case.reason,
                dtype=dtype_name(dtype), backend=backend)
    if backend == "compile" and skip_compile_reason:
        return skipped_row(env, skip_compile_reason, **base)
    if backend == "compile":  # a graph for this case alone: after the cases before it, an op compiled with
        torch._dynamo.reset()  # dynamic=None (scheduler_step) got symbolic sizes, another row than run alone
    try:
        args, kwargs = inputs if inputs is not None else make_inputs(case, device, dtype)
        fn, ctx, note = backend_callable(case.op, backend, args, kwargs, device)
        with ctx():
            try:
                out = _first_tensor(fn())
            except Skip:
                raise
            except Exception as e:
                if backend == "compile":
                    raise Skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
                if backend.startswith("sdpa-"):
                    raise Skip(f"{backend} cannot run this input: {str(e).splitlines()[0][:200]}") from None
                import kernels

                if isinstance(e, kernels.BackendUnsupported):
                    raise Skip(str(e)) from None
                raise
            slow = bool(note) and device.type != "cuda"  # interpreted Triton: seconds per call
            timing = time_fn(fn, device, quick=quick, called=True, min_reps=1 if slow else 3,
                             warmup_ms=0 if slow else None, rep_ms=0 if slow else None)
            host = None if slow else host_ms(fn, device, calls=3 if quick else 10, samples=3 if quick else 5)
    except Skip as e:
        return skipped_row(env, str(e), **base)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return skipped_row(env, f"out of memory: {str(e).splitlines()[0][:160]}", **base)
    except Exception as e:
        return make_row(env, status="error", note=describe_exception(e), **base)
    nbytes, flops = work(case, args, kwargs, out)
    sec = timing.median_ms * 1e-3
    row = make_row(env, status="ok", note=note, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                   p80_ms=timing.p80_ms, reps=timing.reps, host_ms=host, bytes=nbytes, flops=flops,
                   gbps=nbytes / sec / 1e9 if sec > 0 else None,
                   tflops=flops / sec / 1e12 if flops and sec > 0 else None, **base)
    if ceilings:
        peak = (ceilings.get("matmul_tflops", {}).get(dtype_name(dtype)) if _peak_key(case) == "tflops"
                else ceilings.get("copy_gbps"))
        val = row[_peak_key(case)]
        row["frac_of_peak"] = val / peak if val and peak else None
        if row["frac_of_peak"] and row["frac_of_peak"] > 1:  # e.g. a CPU's bf16 matmul, slower than its SDPA
            matmul = _peak_key(case) == "tflops"
            row["note"] = "; ".join(filter(None, [row["note"], OVER_PEAK.format(
                what="matmul" if matmul else "copy", dtype=dtype_name(dtype),
                why=MATMUL_WHY.format(dtype=dtype_name(dtype)) if matmul else "")]))
    if copies is not None and _peak_key(case) == "gbps" and nbytes and sec > 0:
        same = copy_ms(nbytes, device, copies, quick=quick)
        row["copy_ms"] = same  # the same-size copy's median, in the JSON so % of copy can be checked
        row["frac_of_copy"] = same / timing.median_ms if same else None
    if ref64 is not None:
        if out.shape != ref64.shape:
            row.update(status="error", note=f"output shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
        else:
            row["max_abs_err"], row["max_rel_err"] = max_errors(out, ref64)
            row["error_vs"] = ORACLE.get(case.op, "fp64 oracle")
    return row


def run(ops: list[str], backends: list[str] | None, dtypes: list[torch.dtype], shapes: list[str] | None,
        device: torch.device, env: dict, ceilings: dict | None, *, quick: bool = False,
        progress: bool = True) -> list[dict]:
    """All rows of the op suite; speed-ups filled in against ``reference`` of the same case/dtype."""
    from tqdm.auto import tqdm

    if quick:
        skip_compile = "not run under --quick: torch.compile warm-up takes tens of seconds per shape"
    else:
        skip_compile = None
        _raise_recompile_limit()
    cases = select_cases(ops, shapes, quick)
    jobs = []
    for case in cases:
        names = [b for b in op_backends(case.op) if backends is None or b in backends]
        if backends is not None and "reference" not in names:
            names = ["reference", *names]  # speed-ups need the reference in the same run
        for dtype in dtypes:
            jobs.append((case, dtype, names))
    rows: list[dict] = []
    copies: dict = {}  # same-size copy timings, shared by the rows of one size
    total = sum(len(n) for _, _, n in jobs)
    with tqdm(total=total, desc="ops", disable=not progress, leave=False) as bar:
        for case, dtype, names in jobs:
            bar.set_postfix_str(f"{case.name} {dtype_name(dtype)}")
            try:
                inputs = make_inputs(case, device, dtype)
                ref64 = oracle(case.op, *inputs)
            except Skip as e:
                rows += [skipped_row(env, str(e), suite="ops", op=case.op, case=case.name, shape=case.shape,
                                     reason=case.reason, dtype=dtype_name(dtype), backend=b) for b in names]
                bar.update(len(names))
                continue
            except Exception as e:
                msg = f"inputs/oracle failed: {describe_exception(e)}"
                rows += [make_row(env, status="error", note=msg, suite="ops", op=case.op, case=case.name,
                                  shape=case.shape, reason=case.reason, dtype=dtype_name(dtype), backend=b)
                         for b in names]
                bar.update(len(names))
                continue
            for b in names:
                rows.append(run_case(case, b, dtype, device, env, ceilings, inputs=inputs, ref64=ref64,
                                     quick=quick, skip_compile_reason=skip_compile, copies=copies))
                bar.update(1)
            del inputs, ref64
            if device.type == "cuda":
                torch.cuda.empty_cache()
    flag_inaccurate(rows)  # first: a row turned into an error carries no speed-up
    add_speedups(rows, ("op", "case", "dtype"))
    return rows


def flag_inaccurate(rows: list[dict]) -> None:
    """Turn an ``ok`` row whose error against the oracle exceeds the accuracy rule (2x the
    ``reference`` row's error in the same case and dtype, plus :data:`common.ERROR_ATOL`) into an
    error row, so a fast wrong result cannot pass as a speed-up."""
    refs = {(r["op"], r["case"], r["dtype"]): r["max_abs_err"] for r in rows
            if r["backend"] == "reference" and r["status"] == "ok" and r["max_abs_err"] is not None}
    for r in rows:
        ref = refs.get((r["op"], r["case"], r["dtype"]))
        if r["status"] == "ok" and ref is not None and r["max_abs_err"] is not None \
                and not within_error(r["max_abs_err"], ref, r["dtype"]):
            r["status"] = "error"
            r["note"] = "; ".join(filter(None, [
                f"inaccurate: max abs error {r['max_abs_err']:.3g} > 2 x reference's {ref:.3g} "
                f"+ {ERROR_ATOL[r['dtype']]:g}", r["note"]]))


def _raise_recompile_limit(limit: int = 256) -> None:
    """torch.compile(dynamic=False) recompiles per shape; past the default limit of 8 it silently
    runs eager, which would make the ``compile`` rows lie."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
