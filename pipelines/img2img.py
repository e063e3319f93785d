"""Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to the level that
``strength`` picks, and run the remaining sampler steps. Same computation as diffusers'
``StableDiffusionImg2ImgPipeline``: the last ``int(steps * strength)`` timesteps run, from the
image latent noised to the first of them. Strength 1 runs every step from the noisiest level, which
is noise up to the schedule's √ᾱ_T (≈ 0.07 of the image remains with SD's schedule, as in
diffusers); strength 0 runs no step and returns the VAE round trip of the image."""
from __future__ import annotations

import torch

from .common import (PipelineResult, check_strength, denoise, encode_image, expand_batch, initial_noise, load_image,
                     plain_plan, setup)


@torch.inference_mode()
def img2img(model, image, prompt, strength: float = 0.8, *, negative_prompt=None, cfg_scale: float = 7.5,
            steps: int = 50, sampler: str | None = None, seed: int | None = None,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            height: int | None = None, width: int | None = None, resize: bool = False, batch_size: int = 1,
            clip_skip: int | None = None, eta: float | None = None, progress: bool = False) -> PipelineResult:
    """Transform ``image`` following ``prompt``.

    image: a PIL image (or list, one per prompt) or a float tensor in [0, 1] of shape (3, H, W) or
    (N, 3, H, W), channels first (an HWC array is refused, not guessed); the output size is the
    image's unless height/width are given (then the image must have that size, or ``resize=True``).
    strength in [0, 1]: how much noise is added (the fraction of ``steps`` run).
    latents: the (B, 4, H/8, W/8) unit-variance noise added to the image latents, instead of drawing it.
    Other options as :func:`pipelines.txt2img`. Randomness order: VAE posterior sample, then noise.
    """
    strength = check_strength(strength, steps)
    s = setup(model, prompt, pipeline="img2img", negative_prompt=negative_prompt, cfg_scale=cfg_scale, steps=steps,
              sampler=sampler, seed=seed, generator=generator, batch_size=batch_size, clip_skip=clip_skip, eta=eta,
              latents=latents, strength=strength, resize=resize,
              progress=progress)
    pixels, (height, width) = load_image(model, image, height, width, resize)
    timesteps = s.timesteps
    z0 = expand_batch(encode_image(model, pixels, s.generator), len(s.prompts), s.batch_size)
    x = z0
    if timesteps:
        noise = initial_noise(latents, z0.shape, s.generator, s.device, s.dtype)
        x = s.sched.add_noise(z0, noise, timesteps[0])
    elif latents is not None:  # strength 0 uses no noise, but a wrong shape is still the caller's error
        initial_noise(latents, z0.shape, None, s.device, s.dtype, used=False)
    x, calls = denoise(model, s.sched, x, s.context, plain_plan(timesteps), cfg_scale=s.cfg_scale,
                       generator=s.generator, progress=progress, desc="img2img")
    return s.result(x, calls, strength=strength, height=height, width=width, resize=resize)
