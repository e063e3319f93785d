"""Stable Diffusion's KL autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.1 and App. G), written to be read.

An image x in [-1, 1] of shape (B, 3, H, W) is encoded to a diagonal Gaussian q(z|x) over latents
of shape (B, 4, H/8, W/8); sampling uses the reparameterisation z = mean + exp(logvar / 2) · eps,
eps ~ N(0, I) (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Sec. 2.4). The decoder
maps z back to an image. Both halves are ResNet stacks with one self-attention block in the
middle, at the lowest resolution.

Module names are the original LDM ``ldm/modules/diffusionmodules/model.py`` names, i.e. the keys
of a single-file checkpoint after its ``first_stage_model.`` prefix, so such a file loads with
``strict=True``. Every GroupNorm(+SiLU) and the attention go through :mod:`sdcore.layers`, hence
through :mod:`kernels`. The mid attention has ONE head over the h·w latent pixels with head dim =
the channel count (512 for SD), which is above what the Triton attention kernel takes (≤ 256), so
at SD size that op falls back to the reference under the default backend choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .layers import GroupNorm, autocast_note, multi_head_attention, randn, takes_dtype

# LDM places attention blocks (``attn_resolutions``) by the side length a level's feature maps
# have for ``ddconfig.resolution``-sized inputs. That is 256 in every SD config; VAEConfig has no
# field for it (SD uses mid-block attention only), so it is fixed here.
LDM_RESOLUTION = 256


def attention_levels(cfg: VAEConfig) -> list[bool]:
    """For each level i (feature maps 2^i times smaller than the image): has it attention blocks?"""
    return [LDM_RESOLUTION // 2**i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 ``nin_shortcut`` when C changes.

    GroupNorm and SiLU run fused (one kernel). LDM's dropout is 0 for SD and is left out.
    """

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_groups, in_channels, eps=cfg.norm_eps, act="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(cfg.norm_groups, out_channels, eps=cfg.norm_eps, act="silu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w pixels, q/k/v/proj_out as 1x1 convs, residual."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        tokens = lambda t: t.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C), a view  # noqa: E731
        out = multi_head_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)), heads=1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom by 1) then a stride-2 3x3 conv: H -> H/2 exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (maybe empty), then a resampler
    (``downsample`` in the encoder, ``upsample`` in the decoder) on all but the last level."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, n_blocks: int,
                 with_attn: bool):
        super().__init__()
        chans = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(cfg, a, b) for a, b in zip(chans, chans[1:]))
        self.attn = nn.ModuleList(AttnBlock(cfg, out_channels) for _ in range(n_blocks) if with_attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2·z_channels, H/f, W/f) moments (mean ‖ logvar), f = 2^(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in (1, *cfg.ch_mult)]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, with_attn in enumerate(attention_levels(cfg)):
            level = Level(cfg, chans[i], chans[i + 1], cfg.num_res_blocks, with_attn)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(chans[i + 1])
            self.down.append(level)
        self.mid = MidBlock(cfg, chans[-1])
        self.norm_out = GroupNorm(cfg.norm_groups, chans[-1], eps=cfg.norm_eps, act="silu")
        self.conv_out = nn.Conv2d(chans[-1], (2 if cfg.double_z else 1) * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(self.norm_out(self.mid(x)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h·f, w·f). ``up[i]`` is level i, run from last to first;
    each has num_res_blocks + 1 ResnetBlocks."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(cfg, chans[-1])
        levels = []
        for i, with_attn in enumerate(attention_levels(cfg)):
            # Level i takes what level i+1 produced (the mid block's channels for the last one).
            level = Level(cfg, chans[min(i + 1, len(chans) - 1)], chans[i], cfg.num_res_blocks + 1, with_attn)
            if i != 0:
                level.upsample = Upsample(chans[i])
            levels.append(level)
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm(cfg.norm_groups, chans[0], eps=cfg.norm_eps, act="silu")
        self.conv_out = nn.Conv2d(chans[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(self.norm_out(x))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), as LDM's ``DiagonalGaussianDistribution``: logvar is
    clamped to ``cfg.logvar_clamp`` ((-30, 20) in LDM and diffusers) before anything uses it."""

    def __init__(self, moments: torch.Tensor, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*logvar_clamp)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std · eps, eps = torch.randn(generator=generator) in the mean's dtype; a list of
        generators draws sample i's eps from generator i.

        eps is drawn on the generator's device and moved to the mean's (as diffusers'
        ``randn_tensor`` does), so seeded generators give diffusers' ``latent_dist.sample``.
        """
        shape, dtype = self.mean.shape, self.mean.dtype
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"DiagonalGaussian.sample: a list of generators needs one torch.Generator per "
                                 f"sample ({shape[0]}), got {[type(g).__name__ for g in generator]}")
            eps = torch.cat([randn((1, *shape[1:]), g, self.mean.device, dtype) for g in generator])
        elif generator is None or isinstance(generator, torch.Generator):
            eps = randn(shape, generator, self.mean.device, dtype)
        else:
            raise TypeError(f"DiagonalGaussian.sample: generator must be a torch.Generator, a list of them (one per "
                            f"sample) or None, got {type(generator).__name__}")
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per sample, summed over (C, H, W)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """SD's KL-regularised autoencoder: ``encode`` images to a :class:`DiagonalGaussian` over
    latents, ``decode`` latents to images.

    Latents are UNSCALED, as in diffusers' ``AutoencoderKL``: ``encode(x).sample()`` has a std of
    roughly 1/0.18215 for SD. Diffusion runs on ``z * cfg.scaling_factor`` (≈ unit variance), so a
    pipeline multiplies by ``cfg.scaling_factor`` after ``encode`` and divides by it before
    ``decode``; this module never applies it.

    Images are (B, in_channels, H, W) in [-1, 1] with H and W multiples of 2^(len(ch_mult)-1)
    (8 for SD); latents are (B, embed_dim, H/8, W/8). ``decode`` does not clamp its output.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z_out = (2 if cfg.double_z else 1) * cfg.z_channels
        self.quant_conv = nn.Conv2d(z_out, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def _check(self, what: str, x: torch.Tensor, channels: int, multiple: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AutoencoderKL.{what}: expected a (B, {channels}, H, W) float tensor, got "
                            f"{type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"AutoencoderKL.{what}: empty {'image' if what == 'encode' else 'latent'}: "
                             f"{tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"AutoencoderKL.{what}: H and W must be multiples of {multiple} "
                             f"(2^{len(self.cfg.ch_mult) - 1} downsamplings), got {tuple(x.shape[2:])}")
        dtype = self.quant_conv.weight.dtype
        if not takes_dtype(x, dtype):
            raise TypeError(f"AutoencoderKL.{what}: input dtype {x.dtype} != the model's {dtype}"
                            f"{autocast_note(x)}; convert one of them ("
                            + ("images as floats in [-1, 1])" if what == "encode" else "latents as floats)"))

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """(B, in_channels, H, W) in [-1, 1] -> q(z|x) over (B, embed_dim, H/f, W/f) unscaled latents."""
        self._check("encode", images, self.cfg.in_channels, self.downsampling_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)), self.cfg.logvar_clamp)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) unscaled latents -> (B, out_ch, h·f, w·f) images, ≈ [-1, 1], unclamped."""
        self._check("decode", z, self.cfg.embed_dim, 1)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, as LDM's ``AutoencoderKL.forward`` (mode unless sampling)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
