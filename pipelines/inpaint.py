"""Inpainting: repaint the masked region of an image, three ways on one API.

- ``repaint`` (Lugmayr et al. 2022, "RePaint"): an ordinary 4-channel UNet. After every step the
  known region is replaced by the image latent forward-noised to the step's target level with
  fresh noise (eq. 8), fused into the sampler step; and the schedule resamples: it walks down,
  every ``jump_length`` steps jumps back up ``jump_length`` levels (re-noising with q(x_t | x_s),
  ``undo_step``) and denoises again, ``jump_n_sample - 1`` times (Alg. 1, §4.2), following
  :func:`sdcore.schedulers.repaint_timesteps` (diffusers' ``RePaintScheduler`` sequence). The
  denoising steps use the chosen sampler between arbitrary levels, so it must be ddpm or ddim.
- ``unet9``: the SD inpainting UNet, whose input is concat(noisy latent (4), mask at latent size
  (1), latent of the masked image (4)), as diffusers' ``StableDiffusionInpaintPipeline``
  (masked image = image · (mask < 0.5)).
- ``blend``: latent blending after every step with one fixed noise, no resampling (the baseline;
  what diffusers' inpainting pipeline does with a 4-channel UNet). diffusers also encodes the
  masked image there, unused with 4 channels; its posterior sample still draws from the
  generator, so blend draws that many normals too (without the encode) to keep the random stream,
  and with it stochastic samplers (ddpm, euler_a, ddim with eta > 0), in step with diffusers'.

Mask convention: 1 (white) = repaint, binarised at 0.5, downsampled by nearest interpolation.
``strength`` < 1 starts from the image noised to that level instead of pure noise (all variants).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .common import (PREV_T_SAMPLERS, KnownRegion, PipelineResult, Renoise, Step, check_bool, check_choice, check_int,
                     check_model, check_strength, denoise, encode_image, expand_batch, initial_noise, load_image,
                     mask_to_tensor, model_device_dtype, plain_plan, setup, strength_start, warn_if_emptied)

VARIANTS = ("repaint", "unet9", "blend")


def repaint_plan(steps: int, jump_length: int, jump_n_sample: int, num_train_timesteps: int = 1000,
                 strength: float = 1.0) -> list[Step | Renoise]:
    """RePaint's schedule as loop operations. The sample's level after an entry t is t - T//steps:
    a descent t -> a :class:`Step` at t to t - T//steps; a rise p -> t a :class:`Renoise` from
    p - T//steps to t - T//steps (level -1: where the sampler's step to -1 lands, the clean sample but
    for DDIM without ``set_alpha_to_one``, at ᾱ_0; the known region is blended clean there, so the
    output keeps it exactly). ``strength`` < 1 runs the walk over the lowest
    ``int(steps * strength)`` levels of the same grid: it starts at the level the strength picks,
    and no jump re-noises above it, as strength caps the noise in SDEdit and img2img."""
    from sdcore.schedulers import repaint_timesteps

    if steps > num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the {num_train_timesteps} training timesteps")
    ratio = num_train_timesteps // steps
    levels = steps - strength_start(steps, strength)
    if levels == 0:
        return []
    seq = repaint_timesteps(levels, jump_length, jump_n_sample, levels * ratio)
    plan: list[Step | Renoise] = []
    for i, t in enumerate(seq):
        level = max(t - ratio, -1)
        if i == 0 or t < seq[i - 1]:
            plan.append(Step(t, prev_t=level, known_t=level))
        else:
            plan.append(Renoise(max(seq[i - 1] - ratio, -1), level))
    return plan


def _check_variant(model, variant: str, sampler) -> None:
    check_model(model)
    check_choice("inpaint variant", variant, VARIANTS)
    in_ch = model.config.unet.in_channels
    if variant == "unet9" and in_ch != 9:
        raise ValueError(f"variant='unet9' needs the 9-channel SD inpainting UNet (e.g. preset 'sd15-inpaint'); "
                         f"this model's UNet ({model.config.name}) takes {in_ch} channels: use 'repaint' or 'blend'")
    if variant != "unet9" and in_ch != 4:
        raise ValueError(f"variant={variant!r} runs an ordinary 4-channel UNet; this model's UNet "
                         f"({model.config.name}) takes {in_ch} channels: use variant='unet9'")
    name = model.config.scheduler.sampler if sampler is None else sampler
    if variant == "repaint" and name not in PREV_T_SAMPLERS:
        raise ValueError(f"variant='repaint' steps between arbitrary timesteps, which needs sampler "
                         f"{' or '.join(PREV_T_SAMPLERS)}; got sampler {name!r}")


@torch.inference_mode()
def inpaint(model, image, mask, prompt, variant: str = "repaint", *, strength: float = 1.0,
            jump_length: int | None = None, jump_n_sample: int | None = None, paste_back: bool = False,
            negative_prompt=None,
            cfg_scale: float = 7.5, steps: int = 50, sampler: str | None = None, seed: int | None = None,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            height: int | None = None, width: int | None = None, resize: bool = False, batch_size: int = 1,
            clip_skip: int | None = None, eta: float | None = None, progress: bool = False) -> PipelineResult:
    """Repaint the region where ``mask`` is 1 (white) following ``prompt``.

    image: as :func:`pipelines.img2img`: PIL, or a float tensor in [0, 1] of shape (3, H, W) or
    (N, 3, H, W) (channels first). mask: PIL "L"/"1", or a tensor in [0, 1] of shape (H, W),
    (1, H, W) or (N|1, 1, H, W), the image's size. variant: "repaint" | "unet9" | "blend" (module
    docstring). strength: 1 = start from pure noise. jump_length, jump_n_sample: RePaint's
    resampling, default 10 and 10 (repaint only: an error with the other variants;
    jump_n_sample=1 turns resampling off, and ``steps <= jump_length`` leaves no jump, which
    warns; ``steps`` counts the levels of the walk, the UNet runs ``.unet_calls``
    times). paste_back: paste the original pixels outside the mask after
    decoding (exact preservation). latents: (B, 4, H/8, W/8) unit-variance initial noise.
    Other options as :func:`pipelines.txt2img`. Randomness order: image posterior sample (repaint,
    blend, or strength < 1), noise, masked-image posterior sample (unet9), then the sampler's.
    """
    _check_variant(model, variant, sampler)
    strength = check_strength(strength, steps)
    if variant == "repaint":
        jump_length = check_int("jump_length", 10 if jump_length is None else jump_length, 1)
        jump_n_sample = check_int("jump_n_sample", 10 if jump_n_sample is None else jump_n_sample, 1)
    else:
        for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if value is not None:
                raise ValueError(f"{name}={value!r} applies to variant='repaint' only (RePaint's resampling); "
                                 f"variant={variant!r} does not resample: leave {name} unset")
    check_bool("paste_back", paste_back)
    s = setup(model, prompt, pipeline="inpaint", negative_prompt=negative_prompt, cfg_scale=cfg_scale, steps=steps,
              sampler=sampler, seed=seed, generator=generator, batch_size=batch_size, clip_skip=clip_skip, eta=eta,
              latents=latents, unet_channels=None, own_levels=variant == "repaint", strength=strength, resize=resize,
              progress=progress)
    pixels, (height, width) = load_image(model, image, height, width, resize)
    mask_px = mask_to_tensor(mask, (height, width), pixels.shape[0], resize)
    n = max(pixels.shape[0], mask_px.shape[0])
    pixels, mask_px = pixels.expand(n, -1, -1, -1), mask_px.expand(n, -1, -1, -1)

    def batched(t: torch.Tensor) -> torch.Tensor:
        return expand_batch(t.to(device=s.device, dtype=s.dtype), len(s.prompts), s.batch_size)

    T = s.sched.config.num_train_timesteps
    if variant == "repaint":
        plan = repaint_plan(steps, jump_length, jump_n_sample, T, strength)
        for op in plan:  # an error a step would raise (a DDIM eta too large for it) before any step runs
            if isinstance(op, Step):
                s.sched.check_levels(op.t, op.prev_t)
        first_t = plan[0].t if plan else None
        levels = steps - strength_start(steps, strength)  # the walk's levels (repaint_plan)
        if jump_n_sample > 1 and levels and not any(isinstance(op, Renoise) for op in plan):
            walked = (f"steps > {jump_length}, got steps={steps}" if levels == steps else
                      f"int(steps * strength) > {jump_length}, got {levels} (steps={steps}, strength={strength})")
            warnings.warn(f"RePaint does no resampling: jump_length={jump_length} needs {walked}, so "
                          f"jump_n_sample={jump_n_sample} has no effect; use jump_length < {levels} (or more steps), "
                          "or jump_n_sample=1 to turn resampling off", UserWarning, stacklevel=3)
    else:
        timesteps = s.timesteps
        plan, first_t = plain_plan(timesteps), (timesteps[0] if timesteps else None)

    z0 = batched(encode_image(model, pixels, s.generator)) if variant != "unet9" or strength < 1 else None
    shape = s.latent_shape(height, width)
    # strength 0 (no plan) uses no noise, but given latents of a wrong shape are still an error
    noise = (initial_noise(latents, shape, s.generator, s.device, s.dtype, used=bool(plan))
             if plan or latents is not None else None)
    mask_lat = F.interpolate(mask_px, size=shape[-2:])  # nearest, as diffusers (on the CPU: no host sync)
    warn_if_emptied(int(mask_px.sum()), mask_lat, f"downsampled to the {shape[-2]}x{shape[-1]} latents (one cell "
                    f"per {height // shape[-2]}x{width // shape[-1]} pixels)", stacklevel=4)
    mask_lat = batched(mask_lat)
    extra = known = None
    if variant == "unet9":
        masked = torch.where(mask_px < 0.5, pixels, 0.5)  # image * (mask < 0.5) in [-1, 1] terms
        extra = torch.cat([mask_lat, batched(encode_image(model, masked, s.generator))], dim=1)
    else:
        known = KnownRegion(1 - mask_lat, z0, noise if variant == "blend" else None)
    if variant == "blend":  # the draw of diffusers' unused masked-image latent (see the module docstring)
        torch.randn((pixels.shape[0], *shape[1:]), generator=s.generator, device=s.generator.device,
                    dtype=model_device_dtype(model)[1])

    if not plan:  # strength 0: the VAE round trip
        x = z0 if z0 is not None else batched(encode_image(model, pixels, s.generator))
    elif strength == 1.0:
        x = noise * s.sched.init_noise_sigma
    else:
        x = s.sched.add_noise(z0, noise, first_t)
    x, calls = denoise(model, s.sched, x, s.context, plan, cfg_scale=s.cfg_scale, generator=s.generator,
                       extra=extra, known=known, progress=progress, desc=f"inpaint ({variant})")
    extra_params = dict(jump_length=jump_length, jump_n_sample=jump_n_sample) if variant == "repaint" else {}
    return s.result(x, calls, paste=(expand_batch(pixels, len(s.prompts), s.batch_size),
                                         expand_batch(mask_px, len(s.prompts), s.batch_size)) if paste_back else None, variant=variant,
                    strength=strength, paste_back=paste_back, height=height, width=width, resize=resize,
                    **extra_params)
