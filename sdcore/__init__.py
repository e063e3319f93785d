"""sdcore: Stable Diffusion 1.x/2.x from scratch, module names = original checkpoint keys.

    import sdcore
    sd = sdcore.load("model.safetensors")              # or a diffusers folder
    sd = sdcore.StableDiffusion.from_preset("tiny")    # seeded random weights
    sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.config

The model classes are imported on first use (PEP 562), so ``import sdcore.config`` stays light and
free of import cycles with the submodules.
"""
from .config import PRESETS, SchedulerConfig, SDConfig, TextEncoderConfig, UNetConfig, VAEConfig

_LAZY = {"load": "model", "StableDiffusion": "model", "CheckpointError": "checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckpointError", "PRESETS", "SDConfig", "SchedulerConfig", "StableDiffusion",
           "TextEncoderConfig", "UNetConfig", "VAEConfig", "load"]
