"""Stable Diffusion pipelines over :mod:`sdcore`, every op switchable through :mod:`kernels`.

    import sdcore, pipelines
    sd = sdcore.StableDiffusion.from_preset("tiny")           # or sdcore.load("model.safetensors")
    r = pipelines.txt2img(sd, "a red bicycle", steps=20, seed=0)
    r = pipelines.img2img(sd, image, "as a watercolour", strength=0.6, seed=0)
    r = pipelines.inpaint(sd, image, mask, "a cat", variant="repaint", seed=0)   # | "unet9" | "blend"
    r.images, r.latents, r.unet_calls, r.params

Images are PIL images or float tensors in [0, 1]; masks are 1 (white) where to repaint. See
:mod:`pipelines.common` for the conventions and ``python -m pipelines --help`` for the CLI.
"""
from .common import SAMPLERS, PipelineResult
from .img2img import img2img
from .inpaint import VARIANTS, inpaint, repaint_plan
from .txt2img import txt2img

__all__ = ["PipelineResult", "SAMPLERS", "VARIANTS", "img2img", "inpaint", "repaint_plan", "txt2img"]
