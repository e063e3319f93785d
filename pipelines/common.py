"""What every pipeline shares: option checks, seeds, prompt encoding with CFG batching, image and
mask conversion, the VAE round trip with the scaling factor, and THE denoising loop.

Conventions (the public API documents them once, here):

- **Images in**: a PIL image (any 8-bit mode, converted to RGB; 16-bit grayscale, "I;16", over its
  full range rather than clipped at 255; 32-bit "I" within 0..255; "F" and "I" beyond are refused,
  their full scale unknown), a list of them, or a float tensor in
  [0, 1] of shape (3, H, W) or (N, 3, H, W), channels first -- the layout and range torchvision
  uses. Tensors in [-1, 1] and channels-last (H, W, 3) tensors are refused (with the fix) rather
  than guessed.
- **Masks**: a PIL image of mode "L" or "1" (or 16-bit grayscale, over its full range), or a
  tensor (H, W), (1, H, W) or (N|1, 1, H, W) in [0, 1]; **1 (white) = the region to repaint**, as
  diffusers. A PIL mask of another size is resized with Lanczos (a tensor: nearest), masks are
  binarised at 0.5 and downsampled to the latent size by nearest interpolation, exactly as
  diffusers' ``StableDiffusionInpaintPipeline`` does; a repaint region that vanishes on the way
  is warned of.
- **Latents**: the UNet's (scaled) latents, ``z = vae.encode(x).sample() * scaling_factor``;
  ``latents=`` is unit-variance initial noise, multiplied by the sampler's ``init_noise_sigma``
  (as diffusers does with ``latents=``).
- **Guidance**: ``cfg_scale`` s gives ``uncond + s * (cond - uncond)`` for every s != 1 (0 = the
  negative prompt's prediction alone, s < 0 extrapolates away from the prompt); s = 1 runs the
  prompt alone, one UNet pass per step, and a ``negative_prompt`` then warns that it is unused.
  diffusers instead turns guidance off for every guidance_scale <= 1.
- **Randomness**: one ``torch.Generator`` per call (from ``seed``, on the model's device, or the
  caller's ``generator``), drawn in a fixed order: VAE posterior samples, initial noise, then the
  sampler's noise. No global RNG, so the same seed on the same device and backend gives
  bitwise-identical results.
"""
from __future__ import annotations

import math
import numbers
import re
import secrets
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

SAMPLERS = ("ddpm", "ddim", "euler_a", "dpmpp_2m")
PREV_T_SAMPLERS = ("ddpm", "ddim")  # samplers that step between arbitrary timesteps (RePaint)


# ------------------------------------------------------------------------------------- results
@dataclass
class PipelineResult:
    """``images``: PIL RGB images; ``latents``: final latents as the UNet sees them (scaled, before
    the VAE decode), (B, 4, H/8, W/8); ``unet_calls``: UNet forward passes (a CFG pair is one call,
    batched); ``params``: every parameter of the run, the seed included, JSON-serialisable."""

    images: list
    latents: torch.Tensor
    unet_calls: int
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- validation
def convert_hint(value, kind: str = "int") -> str:
    """For an error message: how to pass ``value``, a number of another type (numpy's np.int64,
    np.float32, a 0-d tensor) that the pipelines take as a Python ``kind`` only (their parameters
    are recorded in the sidecar JSON as given)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Number, torch.Tensor)) or type(value) in (int, float):
        return ""
    return f" ({type(value).__module__}.{type(value).__name__}: pass a Python {kind}, {kind}(value))"


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{convert_hint(value)}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):  # a truthy "no" or 0.0 would flip the option
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_model(model) -> None:
    """A StableDiffusion (any of sdcore's, or a subclass): None or a preset name failed later with an
    AttributeError on ``.config``."""
    from sdcore.model import StableDiffusion

    if not isinstance(model, StableDiffusion):
        hint = (f"; load {model!r} first: sdcore.load(path) or sdcore.StableDiffusion.from_preset(name)"
                if isinstance(model, str) else "")
        raise TypeError(f"model must be an sdcore.StableDiffusion (sdcore.load, StableDiffusion.from_preset), "
                        f"got {type(model).__name__}{hint}")


def check_strength(strength, steps) -> float:
    """strength in [0, 1]; above 0 it must leave at least one of ``steps`` to run (strength_start),
    or the pipeline would quietly return the VAE round trip of the image (diffusers raises too)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 = keep the image, 1 = pure noise), got {strength!r}"
                         + convert_hint(strength, "float"))
    if strength > 0 and isinstance(steps, int) and steps >= 1 and strength_start(steps, strength) == steps:
        advice = ""
        if 1 / strength < 1e9:  # a step count to suggest (1e-25 · ceil(1e25) cannot reach 1; 5e-324's is inf)
            least = math.ceil(1 / strength)
            while strength_start(least, strength) == least:  # float rounding of least · strength: a step or two
                least += 1
            advice = f"use steps >= {least} at this strength, or "
        raise ValueError(f"strength={strength} with steps={steps} runs no step (the last int(steps * strength) = 0 "
                         f"timesteps run); {advice}strength=0 for the VAE round trip of the image")
    return float(strength)


def check_choice(name: str, value, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(valid)}")
    return value


def size_multiple(config) -> int:
    """Pixel sizes must be multiples of the VAE's downsampling, 8 for SD (the UNet takes any latent
    size: its upsamplers match the skip connections, as diffusers' do)."""
    return 2 ** (len(config.vae.ch_mult) - 1)


def fit_size(height: int, width: int, multiple: int, resize: bool) -> tuple[int, int]:
    """(height, width) if both are multiples of ``multiple``; else rounded down when ``resize``."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < multiple:
            raise ValueError(f"{name} must be an integer >= {multiple}, got {v!r}{convert_hint(v)}")
    if height % multiple or width % multiple:
        if not resize:
            raise ValueError(f"height and width must be multiples of {multiple} for this model (the VAE "
                             f"downsamples {multiple}x), got {height}x{width}; pass resize=True "
                             f"to round down to {height - height % multiple}x{width - width % multiple}")
        height, width = height - height % multiple, width - width % multiple
    return height, width


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.vae.parameters())
    return p.device, p.dtype


# ------------------------------------------------------------------------------------ randomness
def make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device):
    """(generator, seed or None). A fresh seed is drawn (and reported) when neither is given; a
    caller's generator is reported by its seed only while it is still in its freshly seeded state."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        fresh = torch.Generator(generator.device).manual_seed(generator.initial_seed())
        same = torch.equal(fresh.get_state(), generator.get_state())
        return generator, (generator.initial_seed() if same else None)
    if seed is None:
        seed = secrets.randbits(31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:  # Generator.initial_seed's range
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}{convert_hint(seed)}")
    return torch.Generator(device).manual_seed(seed), seed


def initial_noise(latents, shape, generator, device, dtype, *, used: bool = True) -> torch.Tensor:
    """The caller's ``latents`` (checked) or fresh N(0, I) noise of ``shape``. ``used=False``
    (strength 0, no step to run): given latents are still checked, and a warning says they are unused."""
    if latents is None:
        from sdcore.layers import randn  # sdcore (and kernels) load lazily: the CLIs report their errors

        return randn(shape, generator, device, dtype)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor of shape {tuple(shape)} (batch, latent channels, H/8, W/8), got {got}")
    if not latents.is_floating_point():  # unit-variance noise: integers would be cast to a lattice of values
        raise TypeError(f"latents must be a floating-point tensor (unit-variance noise), got {latents.dtype}")
    if not torch.isfinite(latents).all():  # one host sync per call; a NaN would decode to a black image
        raise ValueError(f"latents have {int((~torch.isfinite(latents)).sum())} NaN or infinite values")
    if not used:
        warnings.warn("latents are unused: strength=0 runs no step (the result is the VAE round trip of the image)",
                      UserWarning, stacklevel=4)
    return latents.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------- text
def as_prompts(prompt, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")


def encode_prompt(model, prompts: list[str], negative_prompt, batch_size: int, guided: bool,
                  clip_skip: int | None) -> torch.Tensor:
    """Context for the UNet, (B, 77, D) or with CFG (2B, 77, D) = [negatives; prompts], each prompt
    repeated ``batch_size`` times in place (diffusers' ``num_images_per_prompt`` order). One text
    encoder call for both halves. ``clip_skip``: 1 = last layer, diffusers' ``clip_skip`` + 1 (None: the
    model's default)."""
    negatives = None
    if guided:
        negatives = [""] * len(prompts) if negative_prompt is None else as_prompts(negative_prompt, "negative_prompt")
        if len(negatives) not in (1, len(prompts)):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    elif negative_prompt is not None:
        as_prompts(negative_prompt, "negative_prompt")  # type-check even when CFG is off (setup warns)
    device, _ = model_device_dtype(model)
    # each list on its own, so a truncation warning's index is the one in the caller's list
    ids = model.tokenizer(prompts)
    if negatives is not None:
        ids = torch.cat([model.tokenizer(negatives, name="negative_prompt").expand(len(prompts), -1), ids])
    context = model.text_encoder(ids.to(device), clip_skip=clip_skip)
    return context.repeat_interleave(batch_size, dim=0)


# ------------------------------------------------------------------------------- images & masks
def _pil():
    from PIL import Image

    return Image


IMAGE_LAYOUTS = "(3, H, W) or (N, 3, H, W), channels first"
MASK_LAYOUTS = "(H, W), (1, H, W) or (N, 1, H, W)"


def _hwc_hint(shape: tuple, channels: int) -> str:
    """A hint for a channels-last array passed where channels come first."""
    if len(shape) in (3, 4) and shape[-1] == channels and shape[-3] != channels:
        fix = "x.permute(2, 0, 1)" if len(shape) == 3 else "x.permute(0, 3, 1, 2)"
        return f" (channels last, as numpy/PIL arrays: pass {fix})" if channels == 3 else " (pass mask[..., 0])"
    return ""


def image_size(image) -> tuple[int, int]:
    """(H, W) of a PIL image, list of them, or tensor, without converting; a tensor's layout is
    checked here, so an HWC tensor is named as such and not read as a 3-pixel-wide image."""
    Image = _pil()
    if isinstance(image, (list, tuple)) and not image:
        raise ValueError("image is an empty list")
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, torch.Tensor) and first.dim() == 4 and first.shape[0] == 0:
        raise ValueError(f"image tensor of shape {tuple(first.shape)} holds no image (batch 0)")
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, torch.Tensor):
        shape = tuple(first.shape)
        if first.dim() not in (3, 4) or shape[-3] != 3:
            raise ValueError(f"image tensors must be {IMAGE_LAYOUTS}, float in [0, 1]; got shape "
                             f"{shape}{_hwc_hint(shape, 3)}")
        return shape[-2:]
    raise TypeError(f"images are PIL images or float tensors in [0, 1] of shape {IMAGE_LAYOUTS}, "
                    f"got {type(first).__name__}")


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale (a 16-bit PNG opens as "I;16")


def sixteen_bit(im):
    """``im``, with a 16-bit PGM (Netpbm) as mode "I;16": Pillow opens one as 32-bit "I", scaled to
    0..65535 whatever its maxval, which _pil_samples would read over 255 (257x too bright) or
    refuse. Other images as they are (a copy has no ``format``: call this on what Image.open gave)."""
    return im.convert("I;16") if im.mode == "I" and getattr(im, "format", None) == "PPM" else im


def _pil_samples(im, convert: str = "RGB"):
    """(image, full scale): ``convert`` (RGB; L for a mask) over 255, or 16-bit grayscale as mode "F"
    over 65535, whose samples convert("RGB") would clip at 255 (a black-to-white ramp came out 98%
    white). Modes "I" (32-bit integers) beyond 255 and "F" have no known full scale: an error, with
    the way out."""
    im = sixteen_bit(im)
    if im.mode in _SIXTEEN_BIT:
        return im.convert("F"), 65535.0
    if im.mode in ("I", "F"):
        lo, hi = im.getextrema()
        if im.mode == "F" or lo < 0 or hi > 255:
            raise ValueError(f"image of PIL mode {im.mode!r} with values in [{lo:.6g}, {hi:.6g}]: its full scale is "
                             "unknown; pass a float tensor in [0, 1] (16-bit samples / 65535, say), or an 8- or "
                             "16-bit image")
    return im.convert(convert), 255.0


def image_to_tensor(image, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """PIL / list of PIL / float tensor in [0, 1] -> float32 (N, 3, H, W) in [0, 1] on the CPU,
    resized to ``size`` (H, W) only when ``resize`` (PIL: Lanczos as diffusers; tensors: bilinear
    with antialiasing); otherwise a size mismatch is an error."""
    import numpy as np

    Image = _pil()
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("image is an empty list")
    if all(isinstance(im, Image.Image) for im in items):
        arrays = []
        for im in items:
            im, full = _pil_samples(im)
            if (im.height, im.width) != size:
                if not resize:
                    raise ValueError(f"image is {im.height}x{im.width} (HxW) but the output is {size[0]}x{size[1]}; "
                                     "pass matching height/width or resize=True")
                im = im.resize((size[1], size[0]), resample=Image.LANCZOS)
            a = np.asarray(im, dtype=np.float32) / full
            if a.ndim == 2:  # 16-bit grayscale, as convert("RGB") repeats L: Lanczos may overshoot, as 8 bits clip
                a = np.repeat(a.clip(0.0, 1.0)[..., None], 3, axis=2)
            arrays.append(a)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if len(items) == 1 and isinstance(items[0], torch.Tensor):
        x = items[0]
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(items[0].shape)
            raise ValueError(f"image tensors must be {IMAGE_LAYOUTS}, float in [0, 1]; got {x.dtype} "
                             f"{shape}{_hwc_hint(shape, 3)}")
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            raise ValueError(f"image tensor has {int((~torch.isfinite(x)).sum())} NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image tensors must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
                             + ("; for a [-1, 1] tensor pass (x + 1) / 2" if lo >= -1.0 else ""))
        if tuple(x.shape[-2:]) != size:
            if not resize:
                raise ValueError(f"image is {x.shape[2]}x{x.shape[3]} (HxW) but the output is {size[0]}x{size[1]}; "
                                 "pass matching height/width or resize=True")
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x
    raise TypeError("image must be a PIL image, a list of PIL images, or a float tensor in [0, 1] of shape "
                    f"{IMAGE_LAYOUTS}; got {[type(im).__name__ for im in items]}")


def load_image(model, image, height: int | None, width: int | None, resize: bool):
    """The input image as float32 (N, 3, H, W) in [0, 1] on the CPU, and the output (H, W): the
    image's size unless height/width are given, checked against the model's size multiple."""
    ih, iw = image_size(image)
    size = fit_size(ih if height is None else height, iw if width is None else width,
                    size_multiple(model.config), resize)
    return image_to_tensor(image, size, resize), size


def mask_to_tensor(mask, size: tuple[int, int], n_images: int, resize: bool) -> torch.Tensor:
    """PIL "L"/"1" or tensor in [0, 1] (1 = repaint) -> binarised float32 (N|1, 1, H, W) on the CPU."""
    import numpy as np

    Image = _pil()
    if isinstance(mask, Image.Image):
        mask = sixteen_bit(mask)
        if mask.mode not in ("L", "1", *_SIXTEEN_BIT):  # not "I"/"F": a 0/1 int mask over 255 would be empty
            raise ValueError(f"mask must be a single-channel 8- or 16-bit image (PIL mode 'L', '1' or 'I;16'), got "
                             f"mode {mask.mode!r}; convert it with mask.convert('L')")
        m, full = _pil_samples(mask, convert="L")  # 16-bit: over 65535, as images are read
        if (m.height, m.width) != size:
            if not resize:
                raise ValueError(f"mask is {m.height}x{m.width} (HxW) but the image is {size[0]}x{size[1]}; "
                                 "pass a mask of the image's size or resize=True")
            before = int((np.asarray(m, dtype=np.float32) / full >= 0.5).sum())
            m = m.resize((size[1], size[0]), resample=Image.LANCZOS)  # as diffusers' mask processor, then binarised
            warn_if_emptied(before, np.asarray(m, dtype=np.float32) / full >= 0.5, f"resized to {size[0]}x{size[1]}")
        t = torch.from_numpy(np.asarray(m, dtype=np.float32) / full)[None, None]
    elif isinstance(mask, torch.Tensor):
        t = mask.detach()
        shape = tuple(t.shape)
        t = t[None, None] if t.dim() == 2 else t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"mask must be single-channel: {MASK_LAYOUTS}, got shape {shape}{_hwc_hint(shape, 1)}")
        if t.numel() == 0:
            raise ValueError(f"mask tensor of shape {shape} is empty")
        t = t.float().cpu()
        if not torch.isfinite(t).all():
            raise ValueError(f"mask tensor has {int((~torch.isfinite(t)).sum())} NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"mask values must be in [0, 1] (1 = repaint), got min {lo:.3g}, max {hi:.3g}")
        if tuple(t.shape[-2:]) != size:
            if not resize:
                raise ValueError(f"mask is {t.shape[2]}x{t.shape[3]} (HxW) but the image is {size[0]}x{size[1]}; "
                                 "pass a mask of the image's size or resize=True")
            before = int((t >= 0.5).sum())
            t = F.interpolate(t, size=size, mode="nearest")  # as diffusers resizes a tensor mask
            warn_if_emptied(before, t >= 0.5, f"resized to {size[0]}x{size[1]}")
    else:
        raise TypeError(f"mask must be a PIL image (mode 'L') or a tensor in [0, 1] of shape {MASK_LAYOUTS}, "
                        f"got {type(mask).__name__}")
    if t.shape[0] not in (1, n_images):
        raise ValueError(f"{t.shape[0]} masks for {n_images} images; pass one mask or one per image")
    return (t >= 0.5).float()  # diffusers' binarisation


def warn_if_emptied(before: int, after, how: str, stacklevel: int = 5) -> None:
    """Warn when a mask that marked ``before`` pixels to repaint marks none once ``how`` (resized,
    downsampled to the latents): nothing would be repainted, silently."""
    if before and not after.any():
        warnings.warn(f"the mask's repaint region ({before} pixels) vanished when {how}: nothing will be "
                      "repainted; enlarge the region (or dilate the mask) to cover it", UserWarning, stacklevel=stacklevel)


def expand_batch(x: torch.Tensor, n_prompts: int, batch_size: int) -> torch.Tensor:
    """(1 or n_prompts, ...) -> (n_prompts * batch_size, ...), in the prompt order of encode_prompt."""
    if x.shape[0] not in (1, n_prompts):
        raise ValueError(f"{x.shape[0]} images for {n_prompts} prompts; pass one image or one per prompt")
    if x.shape[0] == 1:
        return x.expand(n_prompts * batch_size, *x.shape[1:]).contiguous()
    return x.repeat_interleave(batch_size, dim=0)


def to_pil(images01: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images (x * 255, rounded, as diffusers)."""
    Image = _pil()
    arr = (images01.detach().float().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------- VAE
def encode_image(model, pixels01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[0, 1] pixels (N, 3, H, W) -> scaled latents: ``vae.encode(2x - 1).sample(g) * scaling_factor``."""
    device, dtype = model_device_dtype(model)
    x = (pixels01.to(device=device, dtype=dtype) * 2 - 1)
    return model.vae.encode(x).sample(generator) * model.config.vae.scaling_factor


def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1]: ``(vae.decode(z / scaling_factor) / 2 + 0.5).clamp(0, 1)``."""
    images = model.vae.decode(latents / model.config.vae.scaling_factor)
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------- kernels
def attention_head_dims(config) -> dict[int, list[str]]:
    """{head dim: where} for every attention a model of ``config`` runs: the text encoder's, the
    UNet's transformers (per channel width) and the VAE's single-head blocks (mid block, and the
    levels ``attn_resolutions`` picks)."""
    from sdcore.vae import attention_levels

    dims: dict[int, list[str]] = {}
    te = config.text_encoder
    dims.setdefault(te.width // te.heads, []).append("the text encoder")
    u = config.unet
    widths = {u.model_channels * m for i, m in enumerate(u.channel_mult) if 2**i in u.attention_resolutions}
    widths.add(u.model_channels * u.channel_mult[-1])  # the middle block's transformer
    for w in sorted(widths):
        dims.setdefault(u.heads_at(w)[1], []).append(f"the UNet's transformers at {w} channels")
    v = config.vae
    widths = {v.ch * m for m, attn in zip(v.ch_mult, attention_levels(v)) if attn} | {v.ch * v.ch_mult[-1]}
    for w in sorted(widths):
        dims.setdefault(w, []).append(f"the VAE's single-head attention at {w} channels")
    return dims


def check_backends(device, dtype: torch.dtype, config=None) -> None:
    """Raise :class:`kernels.BackendUnsupported` now, before any model work, where an explicitly
    chosen backend (``kernels.use``, ``set_backend``, ``SDLAB_KERNELS``) will refuse what the model
    gives it: a device or dtype it cannot run (Triton on CPU without ``TRITON_INTERPRET=1``), and,
    with ``config``, an attention head dim over its limit (SD's VAE: one 512-wide head). It asks
    ``kernels.resolve`` with small tensors of that device, dtype and head dim; limits that depend
    on the run's sizes (grid, 32-bit offsets) are left to the run. Default choices never raise."""
    import kernels

    device = torch.device(device)
    problems: list[str] = []

    def refused(op: str, *args, **kwargs) -> str | None:
        try:
            kernels.resolve(op, *args, **kwargs)
        except kernels.BackendUnsupported as e:
            return str(e)
        return None

    # zeros: the checks read shapes, devices and dtypes, not values (and the global RNG stays untouched)
    t = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
    groups = config.unet.norm_groups if config is not None else 32
    width = config.unet.model_channels if config is not None else 64
    generic = refused("attention", t(1, 1, 16, 64), t(1, 1, 16, 64), t(1, 1, 16, 64))
    problems.append(generic)
    if config is not None and generic is None:  # else one device-wide reason is enough
        for d, where in sorted(attention_head_dims(config).items()):
            why = refused("attention", t(1, 1, 16, d), t(1, 1, 16, d), t(1, 1, 16, d))
            problems.append(why and f"{why} (in {'; '.join(where)})")
    problems.append(refused("group_norm_silu", t(1, width, 8, 8), t(width), t(width), groups, 1e-5, "silu"))
    problems.append(refused("scheduler_step", t(1, 4, 8, 8), t(1, 4, 8, 8), kernels.StepCoefficients(c1=1.0),
                            model_output_uncond=t(1, 4, 8, 8), guidance_scale=2.0, mask=t(1, 1, 8, 8),
                            known=t(1, 4, 8, 8)))
    problems = [p for p in problems if p]
    if problems:
        raise kernels.BackendUnsupported(" | ".join(problems))


# ------------------------------------------------------------------------------------ sampling
def make_sampler(model, sampler: str | None, eta: float | None):
    """The model's scheduler by name (default: ``model.config.scheduler.sampler``); ``eta`` for ddim."""
    from sdcore.schedulers import make_scheduler

    name = model.config.scheduler.sampler if sampler is None else sampler
    check_choice("sampler", name, SAMPLERS)
    if eta is not None and name != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only (sampler is {name!r})")
    overrides = {"eta": eta} if eta is not None else {}  # the scheduler checks it
    sched = make_scheduler(name, model.config.scheduler, **overrides)
    return sched, name, (sched.options.get("eta") if name == "ddim" else None)


def strength_start(steps: int, strength: float) -> int:
    """Index of the first timestep used at ``strength``, as diffusers' img2img ``get_timesteps``:
    the last ``int(steps * strength)`` timesteps run (0 of them at strength 0)."""
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class Step:
    """One UNet call and sampler step at timestep ``t``. ``prev_t``: explicit target level (ddpm /
    ddim, RePaint's schedule); None = the sampler's own next level. ``known_t``: the level the
    known region is noised to for the inpainting blend; None = the clean latent."""

    t: float
    prev_t: int | None = None
    known_t: float | None = None


@dataclass(frozen=True)
class Renoise:
    """RePaint's jump back: re-noise the sample from level ``t_from`` up to ``t_to`` (no UNet call)."""

    t_from: int
    t_to: int


def plain_plan(timesteps: Sequence) -> list[Step]:
    """One step per timestep; the known region (if any) is noised to the next timestep, and is
    clean after the last, as diffusers' 4-channel inpainting does."""
    ts = list(timesteps)
    return [Step(t, None, ts[i + 1] if i + 1 < len(ts) else None) for i, t in enumerate(ts)]


@dataclass
class KnownRegion:
    """The inpainting blend: after each step, ``prev = mask * known + (1 - mask) * prev``, fused
    into the sampler step. ``mask``: (B, 1, h, w), 1 = KNOWN; ``z0``: the image's clean latents;
    ``noise``: fixed noise for every step (diffusers' blend) or None for fresh noise each step
    (RePaint, Lugmayr et al. 2022 eq. 8)."""

    mask: torch.Tensor
    z0: torch.Tensor
    noise: torch.Tensor | None = None

    def at(self, sched, t, generator) -> torch.Tensor:
        if t is None or t < 0:
            return self.z0
        from sdcore.layers import randn

        noise = self.noise if self.noise is not None else randn(self.z0.shape, generator, self.z0.device, self.z0.dtype)
        return sched.add_noise(self.z0, noise, t)


def denoise(model, sched, x: torch.Tensor, context: torch.Tensor, plan: Sequence[Step | Renoise], *,
            cfg_scale: float, generator: torch.Generator, extra: torch.Tensor | None = None,
            known: KnownRegion | None = None, progress: bool = False, desc: str = "denoise"):
    """The denoising loop every pipeline runs -> (final latents, UNet calls).

    Per :class:`Step`: the UNet sees ``scale_model_input(x)`` (with CFG, i.e. ``cfg_scale != 1``, [x; x] against
    [uncond; cond] context in ONE call), concatenated with ``extra`` channels (the 9-channel
    inpainting UNet's mask and masked-image latents); the sampler step applies CFG, the update,
    noise and the ``known`` blend in one fused kernel. Per :class:`Renoise`: ``undo_step``.
    """
    from tqdm.auto import tqdm

    guided = cfg_scale != 1.0
    if extra is not None and guided:
        extra = torch.cat([extra, extra])
    calls = 0
    for op in tqdm(plan, desc=desc, disable=not progress, leave=False):
        if isinstance(op, Renoise):
            x = sched.undo_step(x, op.t_from, op.t_to, generator=generator)
            continue
        inp = sched.scale_model_input(x, op.t)
        if guided:
            inp = torch.cat([inp, inp])
        if extra is not None:
            inp = torch.cat([inp, extra], dim=1)
        out = model.unet(inp, op.t, context)
        calls += 1
        uncond, cond = out.chunk(2) if guided else (None, out)
        mask = target = None
        if known is not None:
            mask, target = known.mask, known.at(sched, op.known_t, generator)
        x = sched.step(cond, op.t, x, prev_t=op.prev_t, model_output_uncond=uncond,
                       guidance_scale=cfg_scale, generator=generator,
                       mask=mask, known=target, return_x0=False).prev_sample
    return x, calls


# ------------------------------------------------------------------------------ shared set-up
@dataclass
class Setup:
    """What every pipeline resolves first: checked common options, generator, sampler, context."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    prompts: list[str]
    batch_size: int
    cfg_scale: float
    steps: int
    strength: float
    generator: torch.Generator
    sched: Any
    context: torch.Tensor
    params: dict[str, Any]

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.batch_size

    @property
    def timesteps(self) -> list:
        """The sampler's timesteps that run: the last ``int(steps * strength)`` (diffusers' ``get_timesteps``)."""
        if self.sched.timesteps is None:
            raise RuntimeError("setup(..., own_levels=True) sets no timesteps: the caller steps between its own levels")
        return self.sched.timesteps.tolist()[strength_start(self.steps, self.strength):]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        f = size_multiple(self.model.config)  # the VAE's downsampling
        return (self.batch, self.model.config.vae.embed_dim, height // f, width // f)

    def result(self, latents: torch.Tensor, unet_calls: int, *, paste: tuple[torch.Tensor, torch.Tensor] | None = None,
               **params) -> PipelineResult:
        """Decode, optionally paste ``paste = (original [0, 1] pixels, repaint mask)`` back outside
        the mask, and package the result with every parameter."""
        images = decode_latents(self.model, latents)
        if paste is not None:
            original, mask = (t.to(images.device) for t in paste)
            images = original * (1 - mask) + images * mask
        warn_non_finite(latents, images)
        return PipelineResult(to_pil(images), latents, unet_calls, {**self.params, **params})


def warn_non_finite(latents: torch.Tensor, images: torch.Tensor) -> None:
    """Warn when the sampled latents or the decoded pixels hold NaN or inf (saved, they would be
    black pixels that look like an image): a research backend, an fp16 overflow or a guidance scale
    out of range. One host read per call, none per step."""
    bad = torch.stack([(~torch.isfinite(latents)).sum(), (~torch.isfinite(images)).sum()]).tolist()
    if any(bad):
        import kernels

        used = sorted({f"{op}={b}" for (op, b), n in kernels.counts().items() if n})
        warnings.warn(f"the result is not finite: {bad[0]} of {latents.numel()} latent values and {bad[1]} of "
                      f"{images.numel()} pixel values are NaN or infinite (saved as black); kernel backends that "
                      f"ran in this process: {', '.join(used) or 'none counted'}", RuntimeWarning,
                      stacklevel=5)  # < result < the pipeline < its inference_mode wrapper < the caller


def check_sample_range(sched, t, dtype: torch.dtype) -> None:
    """ValueError when the sampler's first sample, noise of its scale at ``t``, would overflow
    ``dtype``: Euler's samples live in σ space, and the cosine schedule's σ_max ≈ 2e4 times a
    noise value past 3.2 is past fp16's 65504 (infinities, then a black image). Six standard
    deviations of room: an overflow left is rarer than 1 in 10^4 fp16 images of 64x64 latents."""
    if t is None:
        return
    scale, top = sched.sample_scale(t), torch.finfo(dtype).max
    if 6 * scale > top:
        raise ValueError(f"sampler {sched.name} starts at a sample scale of {scale:.6g} on this schedule "
                         f"({sched.config.beta_schedule}, t = {float(t):g}): noise past {top / scale:.3g} standard "
                         f"deviations overflows {str(dtype).removeprefix('torch.')} (largest {top:g}); run the model "
                         "in float32 or bfloat16, or use ddim, ddpm or dpmpp_2m, whose samples stay at unit scale")


def setup(model, prompt, *, pipeline: str, negative_prompt=None, cfg_scale: float = 7.5, steps: int = 50,
          sampler: str | None = None, seed: int | None = None, generator: torch.Generator | None = None,
          batch_size: int = 1, clip_skip: int | None = None, eta: float | None = None,
          latents: torch.Tensor | None = None, unet_channels: int | None = 4, own_levels: bool = False,
          strength: float = 1.0, resize: bool = False, progress: bool = False) -> Setup:
    """Check the options every pipeline takes, make the generator and the sampler with its ``steps``
    timesteps set (``own_levels``: not set, the caller steps between its own levels with ``prev_t``,
    as RePaint; ``strength``: the last ``int(steps * strength)`` of them run, :attr:`Setup.timesteps`),
    encode the prompt."""
    check_model(model)
    prompts = as_prompts(prompt)
    check_bool("resize", resize)
    check_bool("progress", progress)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number (1 = no guidance), got {cfg_scale!r}"
                         + convert_hint(cfg_scale, "float"))
    guided = cfg_scale != 1.0
    if cfg_scale == 0 and any(p.strip() for p in prompts):
        warnings.warn(f"cfg_scale=0 samples the unconditional prediction alone: the prompt {prompt!r} is unused "
                      "(here 1 means no guidance; diffusers' guidance_scale=0 and 1 both do); pass cfg_scale=1 for "
                      "the prompt without guidance", UserWarning, stacklevel=4)
    if negative_prompt is not None and not guided:
        as_prompts(negative_prompt, "negative_prompt")  # a wrong type is still an error
        warnings.warn(f"negative_prompt {negative_prompt!r} is unused: cfg_scale=1 runs no guidance (the negative "
                      "prompt is the unconditional half of CFG); pass cfg_scale != 1 to use it",
                      UserWarning, stacklevel=4)
    if clip_skip is not None:
        check_int("clip_skip", clip_skip, 1)
    in_ch = model.config.unet.in_channels
    if unet_channels is not None and in_ch != unet_channels:
        hint = ("; use pipelines.inpaint(..., variant='unet9') with it" if in_ch == 9 else "")
        raise ValueError(f"{pipeline} needs a {unet_channels}-channel UNet, but this model's UNet takes "
                         f"{in_ch} channels ({model.config.name}){hint}")
    device, dtype = model_device_dtype(model)
    check_backends(device, dtype, model.config)
    sched, sampler, eta = make_sampler(model, sampler, eta)
    if steps > sched.config.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the {sched.config.num_train_timesteps} training timesteps")
    if not own_levels:
        # a ValueError for schedules that leave [0, T) (e.g. 1000 leading steps), or a DDIM eta a step that
        # runs cannot take
        first = strength_start(steps, strength)
        sched.set_timesteps(steps, first_step=first)
        check_sample_range(sched, sched.timesteps[first] if first < len(sched.timesteps) else None, dtype)
    generator, seed = make_generator(seed, generator, device)
    context = encode_prompt(model, prompts, negative_prompt, batch_size, guided, clip_skip)
    params = dict(pipeline=pipeline, model=model.config.name, prompt=prompt if isinstance(prompt, str) else prompts,
                  negative_prompt=negative_prompt, cfg_scale=float(cfg_scale), steps=steps, sampler=sampler,
                  eta=eta, seed=seed, batch_size=batch_size, clip_skip=clip_skip,
                  latents="given" if latents is not None else None, dtype=str(dtype).removeprefix("torch."),
                  device=str(device))
    return Setup(model, device, dtype, prompts, batch_size, float(cfg_scale), steps, strength, generator, sched,
                 context, params)


# ------------------------------------------------------------ command lines (python -m pipelines / bench)
def path_arg(value: str) -> str:
    """argparse type of a path option: an empty string (``--out "$UNSET"``) is refused, not read as "."."""
    if not value.strip():
        import argparse

        raise argparse.ArgumentTypeError("an empty path")
    return value


def import_kernels(prog: str) -> None:
    """``import kernels`` for a command line, before its parser is built: a bad setting read at
    import (SDLAB_FAST_LAUNCH) is one error line and exit 2, as a bad option is, not a traceback."""
    try:
        import kernels  # noqa: F401
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------ provenance
ROOT = Path(__file__).resolve().parent.parent


def source_tree() -> Path | None:
    """The source tree this code runs from (a checkout, or a copy of one), or None where it runs
    installed, from site-packages."""
    return ROOT if (ROOT / "setup.py").is_file() else None


def git(*args: str) -> subprocess.CompletedProcess | None:
    """``git args`` in a checkout of this project; None elsewhere (git asked in site-packages, or
    in a copy without .git, answers for whichever repository encloses it: a project's .venv, whose
    commit is not this code's), or where git cannot run."""
    if (tree := source_tree()) is None or not (tree / ".git").exists():
        return None
    try:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=10)
    except Exception:
        return None


def git_commit() -> str | None:
    r = git("rev-parse", "HEAD")
    return r.stdout.strip() if r is not None and r.returncode == 0 else None


def sdlab_version() -> str:
    """The installed distribution's version, or setup.py's in a source tree that is not installed."""
    from importlib import metadata

    try:
        return metadata.version("sdlab")
    except metadata.PackageNotFoundError:
        tree = source_tree()
        m = re.search(r'version="([^"]+)"', (tree / "setup.py").read_text()) if tree is not None else None
        return f"{m.group(1)} (source tree)" if m else "unknown"
