"""Model configs as dataclasses with named presets.

Field names follow the original LDM configs (``v1-inference.yaml``, ``v2-inference-v.yaml``),
whose module names our models keep, so a single-file checkpoint loads with ``strict=True``.
Presets: ``sd15``, ``sd15-inpaint``, ``sd21`` (768 px, v-prediction), ``sd21-base``, and tiny
presets of the same structure for tests (``tiny``, ``tiny-inpaint``, ``tiny-sd2``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


@dataclass(frozen=True)
class UNetConfig:
    """LDM ``UNetModel`` hyper-parameters (openaimodel.py)."""

    in_channels: int = 4  # 9 for the inpainting UNet: latent 4 + mask 1 + masked-image latent 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors ds with attention
    num_heads: int = 8  # used when num_head_channels == -1 (SD 1.x: 8 heads -> head dims 40/80/160)
    num_head_channels: int = -1  # SD 2.x: 64 (heads = channels // 64)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: nn.Linear proj_in/proj_out instead of 1x1 conv
    norm_groups: int = 32
    norm_eps: float = 1e-5  # GroupNorm eps of the ResBlocks and the final out.0 (transformers use 1e-6, as LDM)
    time_embed_dim: int | None = None  # default 4 * model_channels
    # diffusers' flag for q·kᵀ in fp32 (SD 2.1's folder sets it), kept for the round trip to a folder.
    # Not acted on: the triton and SDPA backends keep scores in fp32 whatever it says; the reference
    # rounds them to the input dtype, as diffusers' attention without it
    upcast_attention: bool = False

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer with ``channels`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def replace(self, **changes) -> "UNetConfig":
        return _replace(self, **changes)


@dataclass(frozen=True)
class VAEConfig:
    """LDM ``AutoencoderKL`` (ddconfig + embed_dim)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len - 1 downsamplings: 8x for SD
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    attn_resolutions: tuple[int, ...] = ()  # SD uses mid-block attention only
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)  # DiagonalGaussianDistribution

    def replace(self, **changes) -> "VAEConfig":
        return _replace(self, **changes)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer: OpenAI CLIP ViT-L/14 (SD 1.x) or OpenCLIP ViT-H/14 (SD 2.x)."""

    kind: str = "clip"  # "clip" (SD 1.x, HF CLIPTextModel keys) or "openclip" (SD 2.x)
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    act: str = "quick_gelu"  # "gelu" for OpenCLIP ViT-H
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # openclip's text_projection (pooled output); 0 = none (diffusers SD 2 folders);
    # kind "clip" (SD 1.x) has no projection head and ignores it
    clip_skip: int = 1  # 1 = last layer; 2 = penultimate (SD 2.x's choice)
    pad_token: str = "<|endoftext|>"  # SD 2.x tokenizers pad with "!"
    # Where the pooled feature is read, as transformers' CLIPTextTransformer decides it: 2 (the value
    # of configs written before transformers PR #24773, the SD 1.5/2.1 hub folders') = at the highest
    # id (argmax), as OpenAI CLIP and OpenCLIP pool; any other value = the first position of that id.
    eos_token_id: int = 2

    def replace(self, **changes) -> "TextEncoderConfig":
        return _replace(self, **changes)


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and sampler defaults (a diffusers ``scheduler_config.json``)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "cosine"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    sampler: str = "ddim"  # default sampler of the pipelines

    def replace(self, **changes) -> "SchedulerConfig":
        return _replace(self, **changes)


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    image_size: int = 512  # native resolution in pixels

    def replace(self, **changes) -> "SDConfig":
        return _replace(self, **changes)

    @staticmethod
    def preset(name: str) -> "SDConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


_SD1 = SDConfig("sd15")
_SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
_SD2_TEXT = TextEncoderConfig(kind="openclip", width=1024, layers=24, heads=16, intermediate=4096,
                              act="gelu", projection_dim=1024, clip_skip=2, pad_token="!")

_TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(2, 1), num_heads=2, context_dim=32)
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
_TINY_TEXT = TextEncoderConfig(width=32, layers=2, heads=4, intermediate=64, projection_dim=32)

PRESETS: dict[str, SDConfig] = {
    "sd15": _SD1,
    "sd15-inpaint": _SD1.replace(name="sd15-inpaint", unet=UNetConfig(in_channels=9)),
    "sd21": SDConfig("sd21", unet=_SD2_UNET.replace(upcast_attention=True), text_encoder=_SD2_TEXT,  # as its hub folder
                     scheduler=SchedulerConfig(prediction_type="v_prediction"), image_size=768),
    "sd21-base": SDConfig("sd21-base", unet=_SD2_UNET, text_encoder=_SD2_TEXT),
    # Same structure, small enough for CPU tests: 3 UNet levels (attention on the first two,
    # as SD has none on its last), 8x VAE, 2-layer text encoder with the real vocabulary.
    "tiny": SDConfig("tiny", unet=_TINY_UNET, vae=_TINY_VAE, text_encoder=_TINY_TEXT, image_size=64),
    "tiny-inpaint": SDConfig("tiny-inpaint", unet=_TINY_UNET.replace(in_channels=9), vae=_TINY_VAE,
                             text_encoder=_TINY_TEXT, image_size=64),
    "tiny-sd2": SDConfig("tiny-sd2",
                         unet=_TINY_UNET.replace(num_head_channels=8, use_linear_in_transformer=True,
                                                 upcast_attention=True),  # as sd21, whose stand-in it is
                         vae=_TINY_VAE,
                         text_encoder=_SD2_TEXT.replace(width=32, layers=3, heads=4, intermediate=64,
                                                        projection_dim=32),
                         scheduler=SchedulerConfig(prediction_type="v_prediction"), image_size=64),
}
