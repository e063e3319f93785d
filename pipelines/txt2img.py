"""Text to image (Rombach et al. 2022): noise -> the sampler loop with classifier-free guidance
(Ho & Salimans 2022) -> VAE decode. Same computation as diffusers' ``StableDiffusionPipeline``."""
from __future__ import annotations

import torch

from .common import PipelineResult, denoise, fit_size, initial_noise, plain_plan, setup, size_multiple


@torch.inference_mode()
def txt2img(model, prompt, *, negative_prompt=None, cfg_scale: float = 7.5, steps: int = 50,
            sampler: str | None = None, seed: int | None = None, generator: torch.Generator | None = None,
            latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
            resize: bool = False, batch_size: int = 1, clip_skip: int | None = None, eta: float | None = None,
            progress: bool = False) -> PipelineResult:
    """Generate ``len(prompts) * batch_size`` images from text.

    model: what ``sdcore.load`` / ``StableDiffusion.from_preset`` returns (4-channel UNet).
    prompt: a str or a list of str; ``negative_prompt`` likewise (default "" under CFG; warns,
    unused, when ``cfg_scale`` is 1).
    cfg_scale: classifier-free guidance weight s, ``uncond + s * (cond - uncond)`` (Ho & Salimans
    2022) for every s != 1, uncond and cond batched in one UNet call: 0 = the unconditional
    (negative-prompt) prediction, 0 < s < 1 interpolates, s < 0 pushes away from the prompt.
    s = 1 is the conditional prediction alone, one UNet pass per step. (diffusers turns CFG off
    for every guidance_scale <= 1; here only 1 does.)
    steps, sampler ("ddpm", "ddim", "euler_a", "dpmpp_2m"; default ``model.config.scheduler.sampler``),
    eta (ddim only).
    seed or generator: the only randomness; latents: (B, 4, H/8, W/8) unit-variance initial noise
    (scaled by the sampler's ``init_noise_sigma``) instead of drawing it.
    height, width: default ``model.config.image_size``; multiples of the model's size multiple
    (the VAE downsampling: 8 for SD), else an error, or rounded down with ``resize=True``.
    clip_skip: 1 = the text encoder's last layer, 2 = the one before (None = the model's default). This
    counts layers as A1111's "Clip skip" does; diffusers' ``clip_skip`` counts the layers skipped, so
    its ``clip_skip=k`` is ``k + 1`` here.
    progress: show a tqdm bar.
    """
    s = setup(model, prompt, pipeline="txt2img", negative_prompt=negative_prompt, cfg_scale=cfg_scale, steps=steps,
              sampler=sampler, seed=seed, generator=generator, batch_size=batch_size, clip_skip=clip_skip, eta=eta,
              latents=latents, resize=resize,
              progress=progress)
    size = model.config.image_size
    height, width = fit_size(size if height is None else height, size if width is None else width,
                             size_multiple(model.config), resize)
    x = initial_noise(latents, s.latent_shape(height, width), s.generator, s.device, s.dtype)
    x = x * s.sched.init_noise_sigma
    x, calls = denoise(model, s.sched, x, s.context, plain_plan(s.sched.timesteps.tolist()), cfg_scale=s.cfg_scale,
                       generator=s.generator, progress=progress, desc="txt2img")
    return s.result(x, calls, height=height, width=width, resize=resize)
