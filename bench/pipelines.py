"""Pipeline benchmarks: each pipeline x kernel setting, and the UNet step on its own.

Kernel settings ("variants"): ``reference`` (every op on its torch reference), ``triton`` (every op
that has a Triton backend on it), ``triton:<op>`` (that op alone on Triton), ``op=backend[+...]``
(those ops on those backends, e.g. a research backend from ``--plugin``, the rest on reference;
with ``@graph`` appended, UNet step only, replayed from a CUDA graph). The UNet step section
adds baselines carrying the same weights: ``compile`` (torch.compile of the reference UNet),
``triton@compile`` (torch.compile of the UNet with every op on triton: Inductor compiles the rest
around the kernels, which run as ``torch.ops.sdlab`` ops),
``diffusers-sdpa`` (diffusers' UNet2DConditionModel with SDPA attention, converted with
``sdcore.convert.unet``), ``reference@graph`` / ``triton@graph`` (replayed from a CUDA graph) and
``triton-dispatch`` (all-triton with every launch through Triton's own dispatch, as with
SDLAB_FAST_LAUNCH=0: what kernels/_launch.py's direct launches save).

Per pipeline row: seconds per image and images/s (median over repeats, after one untimed warm-up
run; none for interpreted Triton variants), UNet ms per step (UNet forward time measured with hooks
/ number of UNet calls; one call = one step with classifier-free guidance batched), UNet calls, peak device memory,
and the difference from the all-reference run with the same seed: max |Δ| of the final latents,
PSNR of the decoded images.
Everything that does not exist yet (sdcore.StableDiffusion, pipelines.*, converters) or cannot run
becomes a "skipped" row with the reason.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (TRITON_DISPATCH, Skip, add_speedups, describe_exception, dtype_name, host_ms, interpreting,
                     make_row, skipped_row, summarize, synchronize, time_fn, tritons_dispatch)

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = ""
GUIDANCE = 7.5
STRENGTH = 0.75  # img2img


@dataclass(frozen=True)
class PipelineSpec:
    function: str  # in the pipelines package
    reason: str
    variant: str | None = None  # inpaint(variant=...)
    needs_image: bool = False
    needs_mask: bool = False
    inpaint_model: bool = False  # the 9-channel UNet


PIPELINES = {
    "txt2img": PipelineSpec("txt2img", "text to image: the UNet loop plus VAE decode"),
    "img2img": PipelineSpec("img2img", f"VAE encode, noise to strength {STRENGTH}, fewer UNet steps",
                            needs_image=True),
    "repaint": PipelineSpec("inpaint", "inpaint by RePaint-style blending of the known region each step",
                            variant="repaint", needs_image=True, needs_mask=True),
    "unet9": PipelineSpec("inpaint", "inpaint with the 9-channel inpainting UNet", variant="unet9",
                          needs_image=True, needs_mask=True, inpaint_model=True),
    "blend": PipelineSpec("inpaint", "inpaint by latent blending with the mask", variant="blend",
                          needs_image=True, needs_mask=True),
}

KERNEL_OPS = ("group_norm_silu", "attention", "scheduler_step")
# How far a variant may stray from the all-reference run before its row is an error, not a speed-up
# (and its pytest-benchmark case fails). Decoded images, PSNR: measured on an H100 in fp16
# (random-weight sd15, bench/results/2026-11-23-h100-2/), 58-61 dB after 20 steps, 51.7 dB after 250
# RePaint steps. On the tiny preset (CPU, 2 steps) a correct backend (sdpa) gets 35.7-43.9 dB in
# bf16, and one with keys and values swapped 18-22 dB in every dtype. The floors catch a kernel that
# diverges, not rounding. Their limit: on CPU img2img runs one UNet call (2 steps at strength 0.75),
# where a scheduler_step that drops CFG got 37.7 dB in bf16, over the floor; txt2img, repaint, blend
# and unet9 fail it.
MIN_PSNR_DB = {"fp32": 40.0, "fp16": 30.0, "bf16": 28.0}
# The UNet step's output: max |diff| / max |reference|. On the tiny preset (CPU) sdpa differs by 9e-7
# (fp32), 2.2e-3 (fp16), 2.1e-2 (bf16), and swapped keys and values by 0.25-0.27; on an H100 (sd15)
# all-triton differed by 2.7e-3 (fp16) and 0.022 (bf16) absolute.
MAX_STEP_REL_DIFF = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 0.1}
# UNet-step only: torch.compile and diffusers baselines, and reference / triton replayed from a
# CUDA graph (no host overhead: the GPU time of the kernels alone, for comparison with eager).
GRAPH_SUFFIX = "@graph"
# triton-dispatch: all-triton with every launch through Triton's own dispatch (kernels/_launch.py off)
# triton@compile: torch.compile of the UNet with every op on triton (Inductor around the torch.ops.sdlab ops)
COMPILE_TRITON = "triton@compile"
UNET_BASELINES = ("compile", COMPILE_TRITON, "diffusers-sdpa", "reference" + GRAPH_SUFFIX, "triton" + GRAPH_SUFFIX,
                  TRITON_DISPATCH)


def preset_names() -> list[str]:
    from sdcore.config import PRESETS

    return sorted(PRESETS)


def variant_names() -> list[str]:
    return ["reference", "triton", *(f"triton:{op}" for op in KERNEL_OPS), *UNET_BASELINES]


def pins(variant: str) -> dict[str, str] | None:
    """{op: backend} of an ``op=backend[+op=backend...]`` variant (a research backend against the
    rest on reference), or None for the named variants; a ValueError names a bad op or backend."""
    if "=" not in variant:
        return None
    import kernels

    out = {}
    for item in variant.split("+"):
        op, _, backend = (s.strip() for s in item.partition("="))
        if not op or not backend:
            raise ValueError(f"variant {variant!r}: expected op=backend items joined by '+', got {item!r}")
        if op in out:
            raise ValueError(f"variant {variant!r}: op {op!r} is named twice")
        try:
            out[op] = kernels.validate(op, backend)
        except ValueError as e:
            raise ValueError(f"variant {variant!r}: {e}") from None
    return out


def img2img_steps_problem(steps: int) -> str | None:
    """Why img2img cannot run ``steps`` steps at the suite's strength (int(steps x strength) = 0 of
    them would run), or None: a usage error up front, not an error row after the others ran."""
    from pipelines.common import strength_start  # the library's, not this module

    if strength_start(steps, STRENGTH) < steps:
        return None
    return (f"img2img at strength {STRENGTH} runs the last int(steps x strength) = 0 of them; use >= "
            f"{math.ceil(1 / STRENGTH)} steps")


def runs_triton(variant: str) -> bool:
    """Whether ``variant`` runs a Triton kernel (interpreted on a CPU: tens of seconds per UNet
    call): the triton variants, and a pin of an op to triton (``attention=triton``, or a chain
    through it), as :func:`kernel_scope`'s Triton ops say."""
    import kernels

    if variant.startswith("triton"):
        return True
    pinned = pins(variant)
    return bool(pinned) and any("triton" in str(b).split(kernels.CHAIN_SEP) for b in pinned.values())


def check_variant(variant: str) -> None:
    """A ValueError naming what is wrong with ``variant`` (a name of variant_names(), or
    ``op=backend[+op=backend]`` with an optional @graph), for the CLI and the pytest cases alike."""
    if "=" in variant:
        pins(variant.removesuffix(GRAPH_SUFFIX))
    elif variant not in variant_names():
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(variant_names())}, "
                         "or op=backend[+op=backend]")


@dataclass
class Options:
    preset: str
    ckpt: Path | None
    pipelines: list[str]
    steps: int
    batch: int
    repeats: int
    warmup: int
    dtype: torch.dtype
    unet_only: bool
    variants: list[str]
    quick: bool
    rounds: int = 1
    explicit_variants: bool = False
    breakdown: bool = False
    prediction_type: str | None = None  # a --ckpt's, overriding its config
    # how skip reasons name the quick mode and the way to run a skipped triton variant anyway
    # (bench/test_bench_pipelines.py says "on CPU" and its --sd-interpreted)
    quick_name: str = "under --quick"
    run_anyway: str = "name it with --variants to run it"

    @classmethod
    def from_args(cls, args, dtype: torch.dtype) -> "Options":
        cuda = args.device.type == "cuda"
        quick = args.quick
        preset = args.preset or ("tiny" if quick or not cuda else "sd15")
        variants = args.variants or (["reference", "triton", *UNET_BASELINES] if quick else variant_names())
        # the baseline every row is compared with runs first, wherever it was listed
        variants = ["reference", *(v for v in variants if v != "reference")]
        return cls(preset=preset, ckpt=args.ckpt, pipelines=args.pipelines or list(PIPELINES),
                   steps=args.steps or (2 if quick else 50), batch=args.batch or 1,
                   repeats=args.repeats or (1 if quick else 3), warmup=1, dtype=dtype,
                   unet_only=args.unet_only, variants=variants, quick=quick,
                   rounds=args.rounds or (1 if quick else 5), explicit_variants=args.variants is not None,
                   breakdown=args.breakdown, prediction_type=getattr(args, "prediction_type", None))

    def interpreted_skip(self, variant: str) -> str | None:
        """Why a Triton variant is not run: under --quick with Triton interpreted (no GPU) one tiny
        UNet call takes tens of seconds. Naming the variant with --variants runs it anyway."""
        if self.quick and not self.explicit_variants and interpreting() and runs_triton(variant):
            return (f"not run {self.quick_name}: Triton is interpreted here (TRITON_INTERPRET=1, tens of "
                    f"seconds per tiny UNet call); {self.run_anyway}")
        return None


# ---------------------------------------------------------------------------------- kernel scopes
@contextlib.contextmanager
def _registry_default(ops: list[str]):
    """Let ``ops`` resolve by the registry's default: SDLAB_KERNELS is set aside meanwhile (the
    bench process itself never calls ``kernels.set_backend``)."""
    import kernels

    saved_env = os.environ.pop(kernels.ENV_VAR, None)
    try:
        yield
    finally:
        if saved_env is not None:
            os.environ[kernels.ENV_VAR] = saved_env


def kernel_scope(variant: str, device: torch.device):
    """(context manager, note, ops meant to run Triton) of a variant; Skip when it cannot be set up.

    Ops not meant to run Triton are pinned to ``reference``. On CUDA the Triton ops are left to the
    registry's default, which is Triton with a fall-back to the reference (warned once) for an
    input the kernel refuses (e.g. the VAE's 512-wide attention head), so a whole pipeline can run;
    :func:`fallback_note` reports how many calls fell back. Elsewhere (Triton interpreted on CPU)
    they are pinned to ``triton`` explicitly, and a refused input skips the row. The context manager
    changes nothing until entered."""
    import kernels

    ops = kernels.ops()
    if variant == "reference":
        return kernels.use(**{op: "reference" for op in ops}), "", []
    pinned = pins(variant)
    if pinned is not None:  # chosen explicitly: a refused input skips the row (no fallback but along a chain, a/b)
        return (kernels.use(**{**{op: "reference" for op in ops}, **pinned}), "",
                [op for op, b in pinned.items() if "triton" in b.split(kernels.CHAIN_SEP)])
    if variant == "triton":
        want = [op for op in ops if "triton" in kernels.backends(op)]
        if not want:
            raise Skip("no op has a triton backend registered yet")
        rest = [op for op in ops if op not in want]
        note = f"without a triton backend, on reference: {', '.join(rest)}" if rest else ""
    elif variant.startswith("triton:"):
        op = variant.split(":", 1)[1]
        if op not in ops:
            raise Skip(f"op {op!r} is not registered in kernels yet")
        if "triton" not in kernels.backends(op):
            raise Skip(f"op {op!r} has no triton backend registered yet")
        want, note = [op], ""
    else:
        raise ValueError(f"unknown kernel variant {variant!r}; valid: {', '.join(variant_names())}")
    pinned = {op: "reference" for op in ops if op not in want}
    if device.type == "cuda":
        return _on_default(want, pinned), note, want
    return kernels.use(**pinned, **{op: "triton" for op in want}), note, want


@contextlib.contextmanager
def _on_default(want: list[str], pinned: dict):
    """``want`` resolved by the registry's default, ``pinned`` as given; entered only by ``with``
    (a scope made just for its note and ops changes nothing)."""
    import kernels

    with _registry_default(want), kernels.use(**pinned):
        yield


def fallback_note(before: dict, after: dict, ops: list[str]) -> str:
    """'attention: 2 of 34 calls fell back to reference' for each op of ``ops`` (on Triton by the
    default) that did, and for any other op that ran on more than one backend (a fallback chain,
    ``attention=gluon_sm90/triton``): 'attention: 30 calls on gluon_sm90, 4 on triton'."""
    ran: dict[str, dict[str, int]] = {}
    for (op, backend), n in after.items():
        if n - before.get((op, backend), 0):
            ran.setdefault(op, {})[str(backend)] = n - before.get((op, backend), 0)
    parts = []
    for op in sorted(ran):
        calls = ran[op]
        if op in ops and set(calls) <= {"triton", "reference"}:
            if calls.get("reference"):
                parts.append(f"{op}: {calls['reference']} of {calls['reference'] + calls.get('triton', 0)} calls "
                             "fell back to reference (input the kernel refuses)")
        elif len(calls) > 1:
            ordered = sorted(calls.items(), key=lambda kv: -kv[1])
            parts.append(f"{op}: {ordered[0][1]} calls on {ordered[0][0]}, "
                         + ", ".join(f"{n} on {b}" for b, n in ordered[1:]))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------- models
_MODELS: dict = {}


def load_model(opts: Options, device: torch.device, *, inpaint: bool | None = None):
    """The model of ``opts`` (the preset's -inpaint sibling when ``inpaint``), cached; Skip when
    ``inpaint`` is True or False and the model's UNet is not the 9- or 4-channel one it asks for."""
    try:
        import sdcore
    except ImportError as e:
        raise Skip(f"sdcore does not import: {e}") from None
    if opts.ckpt is not None:
        key = ("ckpt", str(opts.ckpt), opts.dtype, str(device), opts.prediction_type)
        if key not in _MODELS:
            if not hasattr(sdcore, "load"):
                raise Skip("sdcore.load does not exist yet")
            _MODELS[key] = sdcore.load(opts.ckpt, dtype=opts.dtype, device=device, prediction_type=opts.prediction_type)
        return _fitting(_MODELS[key], opts.ckpt.name, inpaint)
    preset = opts.preset
    if inpaint and not preset.endswith("-inpaint"):
        from sdcore.config import PRESETS

        preset = f"{preset}-inpaint"
        if preset not in PRESETS:
            raise Skip(f"no inpainting preset for {opts.preset!r} (valid: "
                       f"{', '.join(p for p in PRESETS if p.endswith('-inpaint'))})")
    key = (preset, opts.dtype, str(device))
    if key not in _MODELS:
        if not hasattr(sdcore, "StableDiffusion"):
            raise Skip("sdcore.StableDiffusion does not exist yet")
        _MODELS.clear()  # one model resident at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _MODELS[key] = sdcore.StableDiffusion.from_preset(preset, seed=0, dtype=opts.dtype, device=device)
    return _fitting(_MODELS[key], preset, inpaint)


def _fitting(model, name: str, inpaint: bool):
    """``model``, or Skip when its UNet is not the kind the pipeline needs (9 input channels for
    unet9, 4 for every other pipeline; None: any, as the UNet step takes)."""
    if inpaint is None:
        return model
    channels = _in_channels(model)
    if inpaint and channels != 9:
        raise Skip(f"{name} has a {channels}-channel UNet; unet9 needs an inpainting checkpoint")
    if not inpaint and channels == 9:
        raise Skip(f"{name} has the 9-channel inpainting UNet; this pipeline needs a 4-channel one")
    return model


def _unet(model):
    unet = getattr(model, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise Skip(f"{type(model).__name__} has no .unet module")
    return unet


def _unet_config(model):
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "unet", None) or getattr(_unet(model), "config", None)
    if cfg is None:
        raise Skip("cannot find the UNet config (model.config.unet or model.unet.config)")
    return cfg


def _image_size(model, opts: Options) -> int:
    size = getattr(getattr(model, "config", None), "image_size", None)
    if size is None:
        from sdcore.config import PRESETS

        size = PRESETS[opts.preset].image_size if opts.preset in PRESETS else 512
    return int(size)


def _in_channels(model) -> int:
    return int(getattr(_unet_config(model), "in_channels", 4))


# ------------------------------------------------------------------------------------ meters
class UNetMeter:
    """Counts UNet forward calls and their device time (CUDA events, no sync inside the loop)."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self._open = None
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, *_):
        self._open = self._now()

    def _post(self, *_):
        self.spans.append((self._open, self._now()))

    @property
    def calls(self) -> int:
        return len(self.spans)

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum((b - a) * 1e3 for a, b in self.spans)

    def close(self):
        for h in self._handles:
            h.remove()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    # the CPU allocator keeps no resettable peak; the process high-water mark (ru_maxrss) only grows
    # from row to row, so comparing rows with it would mislead: the column stays empty
    return None, "not measured on CPU (no per-run peak; CUDA rows use torch.cuda.max_memory_allocated)"


# ------------------------------------------------------------------------------- pipeline calls
_ALIASES = {
    "prompt": ("prompt", "prompts"),
    "steps": ("steps", "num_inference_steps", "num_steps"),
    "seed": ("seed",),
    "guidance_scale": ("guidance_scale", "cfg_scale", "guidance"),
    "height": ("height",),
    "width": ("width",),
    "batch": ("batch_size", "num_images", "num_images_per_prompt", "n"),
    "image": ("image", "init_image"),
    "mask": ("mask", "mask_image"),
    "strength": ("strength",),
    "variant": ("variant",),
    "progress": ("progress", "progress_bar"),
}


def _fit_kwargs(fn, wanted: dict) -> tuple[dict, list[str]]:
    """Map canonical option names onto ``fn``'s parameter names; report what it does not take."""
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out, dropped = {}, []
    for key, value in wanted.items():
        name = next((a for a in _ALIASES.get(key, (key,)) if a in params), None)
        if name is None and key == "seed" and "generator" in params:
            out["generator"] = torch.Generator().manual_seed(value)
            continue
        if name is None and var_kw:
            name = _ALIASES.get(key, (key,))[0]
        if name is None:
            dropped.append(key)
        else:
            out[name] = value
    return out, dropped


def _test_image(size: int, kind: str):
    """A smooth RGB test image and a centre-square mask (white = repaint), as PIL or tensor."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6.28 * (xx + yy))]).clamp(0, 1)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    if kind == "tensor":
        return img[None], mask[None]
    from PIL import Image

    to_pil = lambda t, mode: Image.fromarray((t.permute(1, 2, 0).squeeze(-1) * 255).round().byte().numpy(), mode)  # noqa: E731
    return to_pil(img, "RGB"), to_pil(mask, "L")


def _pipeline_fn(spec: PipelineSpec):
    try:
        mod = importlib.import_module("pipelines")
    except ImportError as e:
        raise Skip(f"the pipelines package does not import: {e}") from None
    fn = getattr(mod, spec.function, None)
    if fn is None:
        raise Skip(f"pipelines.{spec.function} does not exist yet")
    return fn


def _call(spec: PipelineSpec, fn, model, opts: Options, size: int):
    """Run one pipeline; image inputs as PIL first, then as tensors in [0, 1] if PIL is refused."""
    wanted = dict(prompt=PROMPT, steps=opts.steps, seed=0, guidance_scale=GUIDANCE, height=size, width=size)
    if opts.batch != 1:
        wanted["batch"] = opts.batch
    if spec.function == "img2img":
        wanted["strength"] = STRENGTH
    if spec.variant:
        wanted["variant"] = spec.variant
    if spec.variant == "repaint" and opts.steps <= 10:  # RePaint's 10 x 10 jumps need > 10 steps (--quick: 2)
        wanted.update(jump_length=max(1, opts.steps // 2), jump_n_sample=2)
    if "progress" in inspect.signature(fn).parameters:
        wanted["progress"] = False
    errors = []
    for kind in (("pil", "tensor") if spec.needs_image else ("none",)):
        w = dict(wanted)
        if spec.needs_image:
            w["image"], mask = _test_image(size, kind)
            if spec.needs_mask:
                w["mask"] = mask
        kwargs, dropped = _fit_kwargs(fn, w)
        try:
            return fn(model, **kwargs), dropped
        except (TypeError, AttributeError, ValueError) as e:
            import kernels

            if isinstance(e, kernels.BackendUnsupported):
                raise
            errors.append(f"{kind} inputs: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    raise RuntimeError("; ".join(errors))


def _images_float(images) -> torch.Tensor:
    """Images (PIL list, numpy, tensor) as float in [0, 1], (N, C, H, W)."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if images.dtype == torch.uint8:
            return x / 255
        return (x + 1) / 2 if x.min() < 0 else x
    if isinstance(images, (list, tuple)):
        import numpy as np

        arrs = [np.asarray(im) for im in images]
        x = torch.from_numpy(np.stack(arrs)).float()
        x = x / 255 if arrs[0].dtype == np.uint8 else x
        return x.permute(0, 3, 1, 2) if x.dim() == 4 and x.shape[-1] in (1, 3, 4) else x
    import numpy as np

    return _images_float(torch.from_numpy(np.asarray(images)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _result_parts(res):
    latents = getattr(res, "latents", None)
    images = getattr(res, "images", None)
    if latents is None or images is None:
        raise RuntimeError(f"pipeline result {type(res).__name__} lacks .latents / .images")
    return latents.detach().float().cpu(), _images_float(images)


def ckpt_label(ckpt: Path) -> str:
    """A --ckpt model in the rows' ``preset``: its path as given, not its file name alone, so two
    checkpoints named model.safetensors in one results folder are two models, not one measured
    again."""
    return str(ckpt)


def pipeline_base(name: str, opts: Options) -> dict:
    """The fields every row of pipeline ``name`` shares (``shape`` is added by pipeline_setup)."""
    spec = PIPELINES[name]
    preset = ckpt_label(opts.ckpt) if opts.ckpt else (opts.preset + ("-inpaint" if spec.inpaint_model
                                                                       and not opts.preset.endswith("-inpaint") else ""))
    return dict(suite="pipelines", op=name, reason=spec.reason, dtype=dtype_name(opts.dtype),
                steps=opts.steps, batch=opts.batch, preset=preset)


def pipeline_setup(spec: PipelineSpec, opts: Options, device: torch.device, base: dict):
    """(pipeline function, model, image size) of ``spec``; sets ``base["shape"]``. Skip when the
    pipeline or a fitting model does not exist; other errors propagate."""
    fn = _pipeline_fn(spec)
    model = load_model(opts, device, inpaint=spec.inpaint_model)
    size = _image_size(model, opts)
    base["shape"] = f"{size}x{size} px, batch {opts.batch}"
    return fn, model, size


def run_pipelines(opts: Options, device: torch.device, env: dict, *, progress: bool = True) -> list[dict]:
    """Rows of suite ``pipelines``. Per pipeline, every variant is made ready first (its scope and
    warm-up), then its ``opts.repeats`` timed runs go in interleaved rounds, each visiting every
    variant once in an order rotated by one per round, as the UNet step's rounds (a host that
    drifts within a run lands on every variant alike); each row is finished last, against the
    all-reference run's outputs."""
    from tqdm.auto import tqdm

    variants = [v for v in opts.variants if v not in UNET_BASELINES and not v.endswith(GRAPH_SUFFIX)]
    rows: list[dict] = []
    bar = tqdm(total=len(opts.pipelines) * len(variants) * (1 + opts.repeats), desc="pipelines",
               disable=not progress, leave=False)
    # pipelines on the inpainting model last, so each model is built once
    for name in sorted(opts.pipelines, key=lambda n: PIPELINES[n].inpaint_model):
        spec, base = PIPELINES[name], pipeline_base(name, opts)
        try:
            fn, model, size = pipeline_setup(spec, opts, device, base)
        except Skip as e:
            rows += [skipped_row(env, str(e), backend=v, **base) for v in variants]
            bar.update(len(variants) * (1 + opts.repeats))
            continue
        except Exception as e:
            rows += [make_row(env, status="error", note=f"model: {describe_exception(e)}", backend=v, **base)
                     for v in variants]
            bar.update(len(variants) * (1 + opts.repeats))
            continue
        runs = []
        for v in variants:
            bar.set_postfix_str(f"{name} {v} warm-up")
            runs.append(PipelineVariant(spec, fn, model, opts, size, v, device, env, base))
            runs[-1].start()
            bar.update(1)
        for r in range(opts.repeats):
            for i in range(len(runs)):
                run = runs[(i + r) % len(runs)]
                bar.set_postfix_str(f"{name} {run.variant} round {r + 1}")
                run.once()
                bar.update(1)
        baseline = None
        for run in runs:  # the reference first (opts.variants starts with it): the others' baseline
            rows.append(run.row(baseline))
            if run.variant == "reference" and rows[-1]["status"] == "ok":
                baseline = rows[-1].pop("_outputs")
            rows[-1].pop("_outputs", None)
    bar.close()
    flag_diverged(rows)  # first: a row turned into an error carries no speed-up
    add_speedups(rows, ("suite", "op", "preset", "dtype"), metric="seconds_per_image")
    return rows


def divergence(row: dict) -> str | None:
    """Why an ``ok`` row strays too far from the all-reference run (:data:`MIN_PSNR_DB` for a
    pipeline's images, :data:`MAX_STEP_REL_DIFF` for a UNet step's output), or None."""
    dtype = row["dtype"]
    if row.get("psnr_db") is not None and row["psnr_db"] < MIN_PSNR_DB[dtype]:
        return (f"images at {row['psnr_db']:.1f} dB PSNR from the all-reference run, under {MIN_PSNR_DB[dtype]} dB "
                f"(latents differ by up to {row.get('latent_max_abs_diff', float('nan')):.3g})")
    if row.get("max_abs_reference_output") and row.get("latent_max_abs_diff") is not None:
        rel = row["latent_max_abs_diff"] / row["max_abs_reference_output"]
        if rel > MAX_STEP_REL_DIFF[dtype]:
            return (f"output differs from the all-reference one by {row['latent_max_abs_diff']:.3g}, {rel:.3g} of "
                    f"its largest value {row['max_abs_reference_output']:.3g}, over {MAX_STEP_REL_DIFF[dtype]:g}")
    return None


def flag_diverged(rows: list[dict]) -> None:
    """Turn each ``ok`` row that :func:`divergence` faults into an error row (as ``bench ops`` flags
    an inaccurate kernel): a fast wrong result cannot pass as a speed-up."""
    for r in rows:
        why = divergence(r) if r["status"] == "ok" else None
        if why:
            r["status"] = "error"
            r["note"] = "; ".join(filter(None, [f"inaccurate: {why}", r["note"]]))


def repeat_calls(n: int):
    """The default timer of run_pipeline_variant: call ``once`` ``n`` times."""
    def repeat(once):
        for _ in range(n):
            once()
    return repeat


def run_pipeline_variant(spec, fn, model, opts, size, variant, device, env, base, baseline, repeat=None) -> dict:
    """One pipeline row on its own: ``opts.warmup`` untimed runs, then ``repeat(once)`` (default:
    ``once`` called ``opts.repeats`` times; bench/test_bench_pipelines.py passes pytest-benchmark's),
    where each ``once()`` runs the pipeline and records its time, UNet time and UNet calls. The row
    keeps the outputs under ``_outputs`` (the caller pops them); ``baseline`` is the all-reference
    run's. :func:`run_pipelines` runs the same steps of several variants in interleaved rounds."""
    run = PipelineVariant(spec, fn, model, opts, size, variant, device, env, base)
    run.start()
    if run.done is None:
        (repeat or repeat_calls(opts.repeats))(run.once)
    return run.row(baseline)


class PipelineVariant:
    """One variant of one pipeline, run in steps: :meth:`start` (the scope, ``opts.warmup``
    untimed runs), :meth:`once` (one timed run), :meth:`row`. Each step enters the variant's kernel
    scope afresh and keeps to itself what it measures (kernel calls, peak memory, UNet time), so
    the steps of several variants may interleave. A step that fails ends the variant: ``done`` is
    then its skipped or error row, and later steps do nothing."""

    def __init__(self, spec, fn, model, opts, size, variant, device, env, base):
        self.spec, self.fn, self.model, self.opts, self.size = spec, fn, model, opts, size
        self.variant, self.device, self.env, self.base = variant, device, env, base
        self.done: dict | None = None
        self.note, self.triton_ops, self.warmup = "", [], 0
        self.counts: collections.Counter = collections.Counter()  # (op, backend) -> calls in this variant's runs
        self.times, self.unet_ms, self.calls, self.peak = [], [], [], None
        self.outputs = self.last = self.dropped = None

    def _guard(self, step) -> None:
        """Run ``step``; an exception ends the variant as the row it stands for."""
        import kernels

        if self.done is not None:
            return
        try:
            step()
        except Skip as e:
            self.done = skipped_row(self.env, str(e), backend=self.variant, **self.base)
        except kernels.BackendUnsupported as e:
            self.done = skipped_row(self.env, str(e), backend=self.variant, **self.base)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            self.done = skipped_row(self.env, f"out of memory: {str(e).splitlines()[0][:160]}", backend=self.variant,
                                    **self.base)
        except Exception as e:
            self.done = make_row(self.env, status="error", note=describe_exception(e), backend=self.variant,
                                 **self.base)

    def _run(self):
        """One pipeline call in the variant's scope, its kernel calls counted as this variant's."""
        import kernels

        scope = kernel_scope(self.variant, self.device)[0]
        before = kernels.counts()
        with scope:
            res = _call(self.spec, self.fn, self.model, self.opts, self.size)
        after = kernels.counts()
        self.counts.update({k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)})
        return res

    def start(self) -> None:
        if (why := self.opts.interpreted_skip(self.variant)) is not None:
            self.done = skipped_row(self.env, why, backend=self.variant, **self.base)
            return

        def start():
            _, self.note, self.triton_ops = kernel_scope(self.variant, self.device)
            if self.triton_ops and interpreting():
                self.note = "; ".join(filter(None, [self.note, "triton interpreted (TRITON_INTERPRET=1)"]))
            # a warm-up keeps first-call costs (lazy imports, allocator, caches) out of the first timed
            # run: without one, --quick's first reference row ran ~1.4x slower than the same work in the
            # next row. Not for interpreted Triton (tens of seconds a call, and no speed to read)
            self.warmup = 0 if self.triton_ops and interpreting() else self.opts.warmup
            for _ in range(self.warmup):
                self.outputs = _result_parts(self._run()[0])
            synchronize(self.device)

        self._guard(start)

    def once(self) -> None:
        def once():
            meter = UNetMeter(_unet(self.model), self.device)
            try:
                synchronize(self.device)
                _peak_reset(self.device)
                t0 = time.perf_counter()
                self.last, self.dropped = self._run()
                synchronize(self.device)
                self.times.append(time.perf_counter() - t0)
                peak = _peak(self.device)[0]
                self.peak = peak if self.peak is None or peak is None else max(self.peak, peak)
                self.unet_ms.append(meter.total_ms())
                self.calls.append(meter.calls)
            finally:
                meter.close()

        self._guard(once)

    def row(self, baseline) -> dict:
        """The variant's row (its ``_outputs`` kept for the caller), or the row that ended it."""
        if self.done is None and not self.times:
            self.done = make_row(self.env, status="error", backend=self.variant, **self.base,
                                 note=describe_exception(RuntimeError("the timer ran the pipeline no times")))
        if self.done is not None:
            return self.done
        opts, device, spec, size = self.opts, self.device, self.spec, self.size
        outputs = self.outputs if self.outputs is not None else _result_parts(self.last)
        note = self.note
        if self.dropped:
            note = "; ".join(filter(None, [note, f"pipeline takes no {', '.join(self.dropped)}"]))
        note = "; ".join(filter(None, [note, fallback_note({}, dict(self.counts), self.triton_ops)]))
        # the peak of the timed runs, each its own (read before scheduler_share allocates its own
        # inputs and, on CUDA, do_bench's 256 MB cache-flush buffer)
        peak_kind = _peak(device)[1]
        timing = summarize([t * 1e3 for t in self.times])
        sec = timing.median_ms / 1e3
        from pipelines.common import make_sampler, strength_start  # the sampler the pipeline ran (the default)

        sched, why = {}, None
        try:
            first = strength_start(opts.steps, STRENGTH) if spec.function == "img2img" else 0
            traffic = sampler_traffic(make_sampler(self.model, None, None)[0], opts.steps, first)
        except ValueError as e:  # a step count its schedule refuses (RePaint walks its own levels, up to T)
            why = f"its sampler's {opts.steps}-step schedule: {e}"
        else:
            try:
                sched = scheduler_share({}, dict(self.counts), self.warmup + len(self.times), sec * 1e3,
                                        (opts.batch, 4, size // 8, size // 8),
                                        spec.needs_mask and spec.variant != "unet9", self.calls[-1], opts.dtype,
                                        device, opts.quick, traffic)
            except Skip as e:
                why = str(e)
        if why:
            note = "; ".join(filter(None, [note, f"scheduler share not estimated: {why}"]))
        calls = self.calls[-1]
        row = make_row(self.env, status="ok", note=note, backend=self.variant, median_ms=timing.median_ms,
                       p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                       seconds_per_image=sec / opts.batch, images_per_s=opts.batch / sec,
                       unet_calls=calls, unet_ms_per_step=(statistics.median(self.unet_ms) / calls) if calls else None,
                       peak_mem_mib=self.peak, peak_mem_kind=peak_kind, **sched, **self.base)
        if baseline is not None:
            (lat, img), (lat0, img0) = outputs, baseline
            if lat.shape == lat0.shape:
                row["latent_max_abs_diff"] = (lat - lat0).abs().max().item()
            if img.shape == img0.shape:
                row["psnr_db"] = psnr(img, img0)
            row["diff_vs"] = "all-reference run, same seed"
        row["_outputs"] = outputs
        return row


_STEP_MS: dict[tuple, tuple[float, float]] = {}  # launch kind -> (GPU ms, host ms)


def sampler_traffic(sched, steps: int, first_step: int = 0) -> dict[tuple[bool, bool, bool], int]:
    """How many of the denoising updates scheduler ``sched`` runs (``steps`` from ``first_step``, as
    img2img's strength starts) read a noise tensor (DDPM, Euler a, DDIM with eta > 0; not where σ is
    0), read the previous x0 (DPM++ 2M past its first-order steps) and write x0 (DPM++ 2M, every
    step: the pipelines ask for none, the sampler keeps it), per kind (noise, prev_x0, x0 out): so
    that scheduler_share times launches that move what the pipeline's move. The pipelines run the
    model's default sampler; a ValueError where that schedule cannot take ``steps``."""
    sched.set_timesteps(steps, first_step=first_step)
    kinds: dict[tuple[bool, bool, bool], int] = {}
    for t in sched.timesteps.tolist()[first_step:]:
        coeffs, draws_noise, prev_x0 = sched._coefficients(t, None)
        kind = (bool(draws_noise and coeffs.sigma != 0.0), prev_x0 is not None, bool(sched._keeps_x0))
        kinds[kind] = kinds.get(kind, 0) + 1
        sched._after_step(torch.zeros(()))  # the state a step leaves (DPM++ 2M keeps its x0)
    return kinds


def scheduler_share(counts_before: dict, counts_after: dict, runs: int, run_ms: float, latent_shape: tuple,
                    masked: bool, steps: int, dtype: torch.dtype, device: torch.device, quick: bool,
                    traffic: dict[tuple[bool, bool, bool], int]) -> dict:
    """How much of one pipeline run the scheduler update takes, estimated without syncing inside
    the loop: scheduler_step launches per run (per backend) x that launch's cost, the op timed in
    isolation in this same run at the run's latent shape. Before fusion (`reference`) vs after
    (`triton`) is the comparison the RePaint benchmark asks for. ``steps`` of the launches are
    denoising updates (one per UNet call), timed with CFG, with what the sampler's updates read and write
    (``traffic``: :func:`sampler_traffic`'s kinds, shared out over the ``steps`` in proportion)
    and, for RePaint/blend, the mask blend; the rest are RePaint's jumps back up (``undo_step``,
    re-noising x_{t'} to x_t: one launch each), timed as that re-noise. The per-step noising of the
    known region is plain torch outside scheduler_step: in the run's time, not in this share.

    A launch costs its GPU time where the GPU is the bottleneck and its host time (enqueueing it)
    where the host is, as in an eager loop of small launches: on CUDA each launch is priced at the
    larger of the two, and both sums are kept (``scheduler_gpu_ms_est``, ``scheduler_host_ms_est``).
    What is timed is the call the samplers make, ``kernels.scheduler_step`` with the backend chosen
    through the switch (argument checks and dispatch included), not the bare backend `bench ops` times."""
    import kernels

    from .ops import _step, backend_callable, make_inputs

    def launch_ms(backend: str, renoise: bool, noise: bool, prev_x0: bool, x0_out: bool) -> tuple[float, float]:
        key = (backend, latent_shape, masked, renoise, noise, prev_x0, x0_out, dtype, device.type)
        if key not in _STEP_MS:
            case = _step("pipeline.latent", latent_shape, "the pipeline's own latent", mask=masked and not renoise,
                         renoise=renoise, noise=noise, prev_x0=prev_x0, x0_out=x0_out)
            args, kwargs = make_inputs(case, device, dtype)
            backend_callable("scheduler_step", backend, args, kwargs, device)  # Skip: why it cannot run
            # the backend's positional arguments, past (x, model_output, coeffs), are the op's keywords
            names = list(inspect.signature(kernels.scheduler_step_reference).parameters)
            op_kwargs = {**dict(zip(names[3:], args[3:])), **kwargs}
            fn = lambda: kernels.scheduler_step(*args[:3], **op_kwargs)  # noqa: E731
            with kernels.use(scheduler_step=backend):
                gpu = time_fn(fn, device, quick=quick).median_ms
                _STEP_MS[key] = (gpu, host_ms(fn, device) if device.type == "cuda" else gpu)
        return _STEP_MS[key]

    per_backend = {b: (counts_after.get(("scheduler_step", b), 0) - counts_before.get(("scheduler_step", b), 0))
                   / runs for (op, b) in counts_after if op == "scheduler_step"}
    per_backend = {b: n for b, n in per_backend.items() if n > 0}
    total = sum(traffic.values())
    est = {"gpu": 0.0, "host": 0.0, "max": 0.0}
    for backend, calls in per_backend.items():  # one backend per run: all its launches go one way
        denoise = min(calls, steps)
        launches = [(denoise * n / total, (False, *kind)) for kind, n in traffic.items()]
        launches.append((calls - denoise, (True, False, False, False)))
        for n, kind in launches:
            if n > 0:
                gpu, host = launch_ms(backend, *kind)
                est["gpu"] += n * gpu
                est["host"] += n * host
                est["max"] += n * max(gpu, host)
    calls = sum(per_backend.values())
    if not calls:
        return dict(scheduler_calls=0, scheduler_ms_est=None, scheduler_gpu_ms_est=None,
                    scheduler_host_ms_est=None, scheduler_share=None)
    return dict(scheduler_calls=calls, scheduler_ms_est=est["max"], scheduler_gpu_ms_est=est["gpu"],
                scheduler_host_ms_est=est["host"], scheduler_share=est["max"] / run_ms if run_ms > 0 else None)


# -------------------------------------------------------------------------------- UNet step
def _diffusers_unet(unet, cfg, device, dtype):
    """diffusers' UNet2DConditionModel with SDPA attention (AttnProcessor2_0) and ``unet``'s weights."""
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.utils import logging as diffusers_logging
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e})") from None
    from sdcore.convert import unet as conv

    d = UNet2DConditionModel.from_config(conv.config_to_diffusers(cfg))
    d.load_state_dict(conv.ldm_to_diffusers(unet.state_dict(), cfg), strict=True)
    # diffusers warns at any .to(dtype) that modules "should be kept in float32", even when it lists none
    # (SD's UNet has none); the cast is the one the other variants' models get
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        d = d.to(device=device, dtype=dtype).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    d.set_attn_processor(AttnProcessor2_0())
    return d


def _unet_variant(v: str, unet, x, t, ctx, cfg, opts: Options, device: torch.device, dunet=None):
    """(scope factory, fn, note, ops meant to run Triton) of one UNet-step variant, or Skip. The
    factory makes a fresh context manager per timing round; ``fn`` runs one step inside it.
    ``dunet``: the diffusers baseline's model, when the caller built it already."""
    step = lambda: unet(x, t, ctx)  # noqa: E731
    if v in ("compile", COMPILE_TRITON):
        if opts.quick:
            raise Skip(f"not run {opts.quick_name}: compiling the UNet takes minutes")
        base = "reference" if v == "compile" else "triton"
        _, note, triton_ops = kernel_scope(base, device)
        if triton_ops and interpreting():
            note = "; ".join(filter(None, [note, "triton interpreted (TRITON_INTERPRET=1)"]))
        compiled = torch.compile(unet)  # traced on its first call, inside the scope (dynamo guards on it)
        what = ("torch.compile(reference UNet), default mode" if v == "compile" else
                "torch.compile(UNet), default mode, the Triton kernels as torch.ops.sdlab ops")
        return ((lambda: kernel_scope(base, device)[0]), lambda: compiled(x, t, ctx),
                "; ".join(filter(None, [what, note])), triton_ops)
    if v.endswith(GRAPH_SUFFIX):
        if device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        scope, note, triton_ops = kernel_scope(v.removesuffix(GRAPH_SUFFIX), device)
        with torch.inference_mode(), scope:
            fn = cuda_graph(step, device)
        # the graph replays the kernels captured under scope
        return (contextlib.nullcontext, fn,
                "; ".join(filter(None, [note, "replayed from a CUDA graph (no host overhead)"])), triton_ops)
    if v == TRITON_DISPATCH:
        if opts.interpreted_skip(v):
            raise Skip(opts.interpreted_skip(v))
        from kernels import _launch

        if not _launch.ENABLED:
            raise Skip(f"the triton row already launches through Triton's dispatch here: {_launch.mode()}")
        _, note, triton_ops = kernel_scope("triton", device)

        @contextlib.contextmanager
        def scope():
            with kernel_scope("triton", device)[0], tritons_dispatch():
                yield

        return (scope, step, "; ".join(filter(None, [note, "every launch through Triton's dispatch, as "
                                                     "SDLAB_FAST_LAUNCH=0"])), triton_ops)
    if v == "diffusers-sdpa":
        dunet = dunet if dunet is not None else _diffusers_unet(unet, cfg, device, opts.dtype)
        return (contextlib.nullcontext, lambda: dunet(x, t, encoder_hidden_states=ctx, return_dict=False)[0],
                "diffusers UNet2DConditionModel, AttnProcessor2_0 (SDPA), same weights", [])
    if opts.interpreted_skip(v):
        raise Skip(opts.interpreted_skip(v))
    _, note, triton_ops = kernel_scope(v, device)  # raises Skip for an unknown op
    triton_ops = [op for op in triton_ops if op != "scheduler_step"]  # a UNet call runs no sampler step
    if triton_ops and interpreting():
        note = "; ".join(filter(None, [note, "triton interpreted (TRITON_INTERPRET=1)"]))
    return (lambda: kernel_scope(v, device)[0]), step, note, triton_ops


def _variant_error(env: dict, v: str, e: Exception, base: dict) -> dict:
    import kernels

    if isinstance(e, Skip) or isinstance(e, kernels.BackendUnsupported):
        return skipped_row(env, str(e), backend=v, **base)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return skipped_row(env, f"out of memory: {str(e).splitlines()[0][:160]}", backend=v, **base)
    return make_row(env, status="error", note=describe_exception(e), backend=v, **base)


def unet_step_base(opts: Options) -> dict:
    """The fields every UNet-step row shares (``shape`` is added by unet_step_inputs)."""
    return dict(suite="unet_step", op="unet_step", dtype=dtype_name(opts.dtype), batch=2,
                preset=ckpt_label(opts.ckpt) if opts.ckpt else opts.preset,  # also on rows of a model that fails
                reason="one denoising step: the UNet on cond + uncond in one batch")


def unet_step_inputs(opts: Options, device: torch.device, base: dict):
    """(unet, its config, x, t, context) of one CFG step at the preset's resolution, seeded; sets
    ``base["shape"]``. Skip when there is no model."""
    model = load_model(opts, device)
    unet, cfg = _unet(model), _unet_config(model)
    size = _image_size(model, opts) // 8
    base["shape"] = f"x(2,{cfg.in_channels},{size},{size}) ctx(2,77,{cfg.context_dim})"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g, device=device).to(opts.dtype)
    t = torch.full((2,), 500, device=device, dtype=torch.long)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g, device=device).to(opts.dtype)
    return unet, cfg, x, t, ctx


def unet_step_setup(v: str, unet, x, t, ctx, cfg, opts: Options, device: torch.device, resident: int = 0) -> dict:
    """Variant ``v`` of the UNet step made ready and run once: {scope (a context-manager factory),
    fn, note, out (fp32), peak, peak_kind, and empty timing lists}. Raises Skip (or the error) when
    it cannot run. ``resident``: bytes allocated before any variant (model and inputs), so the
    peak counts what this variant holds and uses, not what earlier variants keep alive."""
    import kernels

    counts_before = kernels.counts()
    # The diffusers baseline's copy of the weights stands in for the UNet's own, which ``resident``
    # counts already: built before the window opens, so its peak holds one copy of the weights, as
    # every other variant's (a CUDA graph's pool, by contrast, is that variant's own memory).
    dunet = _diffusers_unet(unet, cfg, device, opts.dtype) if v == "diffusers-sdpa" else None
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    _peak_reset(device)
    scope, fn, note, triton_ops = _unet_variant(v, unet, x, t, ctx, cfg, opts, device, dunet)
    with torch.inference_mode(), scope():
        out = fn()
    out = (out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)).float()
    peak, peak_kind = _peak(device)
    if peak is not None:
        peak += (resident - before) / 2**20
        peak_kind += " (minus the memory earlier variants keep)"
    note = "; ".join(filter(None, [note, fallback_note(counts_before, kernels.counts(), triton_ops)]))
    return dict(scope=scope, fn=fn, note=note, out=out, peak=peak, peak_kind=peak_kind, triton_ops=triton_ops,
                medians=[], lows=[], highs=[], reps=0, hosts=[])


def run_unet_step(opts: Options, device: torch.device, env: dict, *, progress: bool = True) -> list[dict]:
    """UNet forward at the preset's resolution, batch 2 (CFG), for each variant and baseline.

    Every variant is set up first (first call, output, peak memory), then timed in ``opts.rounds``
    interleaved rounds, each visiting every variant once in an order rotated by one per round, so
    that drift of the host (an eager step is host-bound on a slow CPU) lands on every variant
    alike. A row's median is the median of its rounds' medians; p20/p80 are across rounds."""
    from tqdm.auto import tqdm

    base = unet_step_base(opts)
    try:
        unet, cfg, x, t, ctx = unet_step_inputs(opts, device, base)
    except Skip as e:
        return [skipped_row(env, str(e), backend=v, **base) for v in opts.variants]
    except Exception as e:
        return [make_row(env, status="error", note=f"model: {describe_exception(e)}", backend=v, **base)
                for v in opts.variants]
    if device.type == "cuda":  # one-time allocations that stay (cuBLAS's workspace) go in `resident`, else the
        import kernels  # first variant's peak alone would hold them, and the reference runs first

        with torch.inference_mode(), kernels.use("reference"):
            unet(x, t, ctx)
        synchronize(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # model + inputs
    done: dict[str, dict] = {}  # variant -> its finished row (skipped / error)
    ready: dict[str, dict] = {}  # variant -> {scope, fn, note, out, peak, ...}
    for v in tqdm(opts.variants, desc="unet step setup", disable=not progress, leave=False):
        try:
            ready[v] = unet_step_setup(v, unet, x, t, ctx, cfg, opts, device, resident)
        except Exception as e:
            done[v] = _variant_error(env, v, e, base)
    rounds = opts.rounds
    slow = interpreting() and device.type != "cuda"
    rep_ms = None if opts.quick else max(100, 1000 // rounds)
    order = list(ready)
    bar = tqdm(total=rounds * len(order), desc="unet step", disable=not progress, leave=False)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)] if order else []:
            if v in done:
                continue
            s = ready[v]
            slow_v = slow and bool(s["triton_ops"])  # interpreted Triton runs in the step
            try:
                with torch.inference_mode(), s["scope"]():
                    timing = time_fn(s["fn"], device, quick=opts.quick, rep_ms=0 if slow_v else rep_ms,
                                     called=True, min_reps=1 if slow_v else 3, warmup_ms=0 if slow_v else None)
                    if not slow_v:
                        s["hosts"].append(host_ms(s["fn"], device, calls=1, samples=3 if opts.quick else 5))
            except Exception as e:
                done[v] = _variant_error(env, v, e, base)
                continue
            s["medians"].append(timing.median_ms)
            s["lows"].append(timing.p20_ms)
            s["highs"].append(timing.p80_ms)
            s["reps"] += timing.reps or 0
            bar.update()
    bar.close()
    if opts.breakdown:
        for v in tqdm([v for v in order if v not in done], desc="unet step breakdown", disable=not progress,
                      leave=False):
            _split_step(ready[v], v, device, runs=1 if opts.quick or (slow and ready[v]["triton_ops"]) else 3)
    rows: list[dict] = []
    ref_out = ready["reference"]["out"] if "reference" in ready and "reference" not in done else None
    for v in opts.variants:
        if v in done:
            rows.append(done[v])
            continue
        s = ready[v]
        if len(s["medians"]) > 1:
            spread = summarize(s["medians"])
            median, p20, p80 = spread.median_ms, spread.p20_ms, spread.p80_ms
        else:
            median, p20, p80 = s["medians"][0], s["lows"][0], s["highs"][0]
        row = make_row(env, status="ok", note=s["note"], backend=v, median_ms=median, p20_ms=p20, p80_ms=p80,
                       reps=s["reps"] or None, rounds=len(s["medians"]),
                       host_ms=statistics.median(s["hosts"]) if s["hosts"] else None,
                       unet_ms_per_step=median, unet_calls=1, peak_mem_mib=s["peak"],
                       peak_mem_kind=s["peak_kind"], breakdown=s.get("breakdown"), **base)
        if v != "reference" and ref_out is not None:
            row["latent_max_abs_diff"] = (s["out"] - ref_out).abs().max().item()
            row["max_abs_reference_output"] = ref_out.abs().max().item()
            row["diff_vs"] = "all-reference UNet output, same dtype"
        rows.append(row)
    flag_diverged(rows)
    add_speedups(rows, ("suite", "preset", "dtype"))
    return rows


def _split_step(s: dict, v: str, device: torch.device, runs: int) -> None:
    """--breakdown: one variant's step split per op by the profiler (bench.breakdown), into
    ``s["breakdown"]``, or why not into its note. Run after the timing, so it times nothing."""
    from .breakdown import op_breakdown

    if v in ("compile", COMPILE_TRITON) or v.endswith(GRAPH_SUFFIX):
        why = "one CUDA graph launch" if v.endswith(GRAPH_SUFFIX) else "a compiled graph"
        s["note"] = "; ".join(filter(None, [s["note"], f"no breakdown: the profiler sees {why}, not the ops"]))
        return
    try:
        with torch.inference_mode(), s["scope"]():
            s["breakdown"] = op_breakdown(s["fn"], device, runs=runs).as_dict()
    except Exception as e:  # the timing stands; say why its split is missing
        s["note"] = "; ".join(filter(None, [s["note"], f"no breakdown: {describe_exception(e)}"]))


def cuda_graph(fn, device: torch.device, warmup: int = 3):
    """Capture ``fn()`` (fixed input tensors) into a CUDA graph; returns a function that replays it
    and returns the captured output tensor. Warm-up runs on a side stream first, as torch's docs
    ask, so lazy initialisation (Triton compiles, cuBLAS handles) stays out of the graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def run(opts: Options, device: torch.device, env: dict, *, progress: bool = True) -> list[dict]:
    rows = run_unet_step(opts, device, env, progress=progress)
    if not opts.unet_only:
        rows += run_pipelines(opts, device, env, progress=progress)
    _MODELS.clear()
    return rows
