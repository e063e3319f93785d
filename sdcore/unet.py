"""The Stable Diffusion denoiser: LDM's ``openaimodel.UNetModel`` (Rombach et al. 2022, §3.3).

A UNet (Ronneberger et al. 2015) in the form of Ho et al. 2020 (ResBlocks with a timestep
embedding added after the first conv) and Nichol & Dhariwal 2021 (several ResBlocks per level,
learned up/down convs), with Rombach et al.'s SpatialTransformer at the levels listed in
``attention_resolutions``: self-attention over the latent pixels, then cross-attention to the
text ``context`` (§3.3: Q = W_Q φ(z_t), K = W_K τ(y), V = W_V τ(y)).

    x (B, 4|9, h, w) ─ input_blocks.0 (conv) ─► [ResBlock (+Transformer)] x num_res_blocks ─►
        Downsample ─► ... ─► middle_block (Res, Transformer, Res) ─►
        [ResBlock(h ⊕ skip) (+Transformer)] x (num_res_blocks + 1) ─► Upsample ─► ... ─► out

Module names are the original LDM keys (``model.diffusion_model.`` stripped), so a single-file
checkpoint loads with ``strict=True``. Every GroupNorm(+SiLU) goes through
:class:`sdcore.layers.GroupNorm` and every attention through :func:`multi_head_attention`, so
:mod:`kernels` decides what runs. Where LDM has ``GroupNorm, SiLU`` in a ``Sequential``, the
SiLU is fused into the norm and an ``nn.Identity`` keeps its index; dropout (inference: off)
keeps its index the same way. LDM zero-initialises the last conv of each block for training;
this module is for inference and takes its weights from a checkpoint.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import GroupNorm, autocast_note, multi_head_attention, takes_dtype


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal embedding (Vaswani et al. 2017), LDM's order: [cos | sin].

    Frequencies ω_i = max_period^(-i / (dim/2)), i = 0 .. dim/2 - 1; computed in fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """h = conv(silu(GN(x))) + W·silu(emb);  out = skip(x) + conv(silu(GN(h))).

    Takes silu(emb), not emb: every ResBlock of a UNet starts its embedding branch with the same
    SiLU of the same emb, so :class:`UNetModel` applies it once per call (one launch instead of one
    per ResBlock, 22 in SD 1.5) and ``emb_layers.0`` is an ``nn.Identity`` keeping LDM's index.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels, eps, act="silu"), nn.Identity(),  # SiLU fused into the norm
            nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.Identity(), nn.Linear(emb_channels, out_channels))  # SiLU: UNetModel
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels, eps, act="silu"), nn.Identity(),
            nn.Identity(),  # dropout slot
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(silu_emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head softmax(Q Kᵀ/√d) V; keys and values from ``context`` (or from x: self-attention)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # dropout slot

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GEGLU (Shazeer 2020): x W ⊙ gelu(x V), the two projections stacked in one Linear."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # branch + x, as diffusers: with x first the sums kept the layout of the token view
        # (B, h·w, C) of a conv output, which Inductor's dynamic shapes failed to lower at proj_out
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GN, project to tokens (B, h·w, C), transformer blocks, project back, residual.

    SD 1.x projects with 1x1 convs (before flattening), SD 2.x with Linears (after).
    """

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        heads, dim_head = cfg.heads_at(channels)
        inner = heads * dim_head
        self.use_linear = cfg.use_linear_in_transformer
        self.norm = GroupNorm(cfg.norm_groups, channels, eps=1e-6, act=None)  # LDM's Normalize()
        proj = (lambda i, o: nn.Linear(i, o)) if self.use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cfg.context_dim) for _ in range(cfg.transformer_depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h·w, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # a channels_last view when use_linear
        if not self.use_linear:  # a copy first, as diffusers: torch.compile(dynamic=True) failed on the view
            x = self.proj_out(x.contiguous())
        # x_in first: the sum takes the block input's memory format (diffusers copies to contiguous
        # here); a channels_last sum sent the next GroupNorm down torch's CPU channels_last path,
        # 6e-5 from fp64 at batch 3 against 2.5e-6
        return x_in + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Nearest 2x, or to ``size`` (the skip connection's), so latents whose sides do not
        divide by 2^(levels - 1) work: the stride-2 convs round up, this matches them back."""
        up = F.interpolate(x, scale_factor=2, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(up)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands silu(timestep embedding) to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, silu_emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def check_channel_mult(cfg: UNetConfig) -> None:
    """ValueError unless ``channel_mult`` starts with 1. LDM's UNetModel (openaimodel.py) builds its
    output conv on ``model_channels`` after a last level of ``channel_mult[0] * model_channels``, so
    no LDM checkpoint has another first multiplier; diffusers' UNet2DConditionModel has no equivalent
    either (its conv_in and time embedding are on ``block_out_channels[0]``, the first level's width)."""
    mult = tuple(cfg.channel_mult)
    if mult[:1] == (1,):
        return
    hint = ""
    if mult and all(m % mult[0] == 0 for m in mult):
        hint = (f"; for a first level {mult[0]}x wider use model_channels={cfg.model_channels * mult[0]}, "
                f"channel_mult={tuple(m // mult[0] for m in mult)}")
    raise ValueError(f"UNetConfig channel_mult={mult}: must start with 1, as in LDM's and diffusers' UNets "
                     f"(the first level has model_channels channels){hint}")


class UNetModel(nn.Module):
    """eps_θ(x_t, t, c) (or v_θ for SD 2.x-v): (B, in_ch, h, w), (B,), (B, L, context_dim) -> (B, out_ch, h, w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_channel_mult(cfg)
        self.cfg = cfg
        mc, groups, eps = cfg.model_channels, cfg.norm_groups, cfg.norm_eps
        emb_dim = cfg.time_embed_dim or 4 * mc
        res = lambda ch_in, ch_out: ResBlock(ch_in, emb_dim, ch_out, groups, eps)  # noqa: E731

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Encoder: remember each block's output width; the decoder concatenates them in reverse.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), SpatialTransformer(ch, cfg), res(ch, ch))

        # Decoder: num_res_blocks + 1 ResBlocks per level, each taking one skip; Upsample at the end.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm(groups, ch, eps, act="silu"), nn.Identity(),  # ch == mc: check_channel_mult
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        t = self._check_inputs(x, t, context)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        silu_emb = F.silu(emb)  # the SiLU that starts every ResBlock's emb_layers, applied once
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, silu_emb, context)
            hs.append(h)
        h = self.middle_block(h, silu_emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, silu_emb, context, size=hs[-1].shape[-2:] if hs else None)  # upsample to the next skip
        return self.out(h)

    def _check_inputs(self, x, t, context) -> torch.Tensor:
        """Raise a clear error for inputs the UNet cannot take; return t as a (B,) tensor."""
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}"
                             + (" (the inpainting UNet takes 9 channels: latent 4 + mask 1 + masked latent 4)"
                                if x.dim() == 4 and 9 in (x.shape[1], cfg.in_channels) else ""))
        b = x.shape[0]
        if b == 0:
            raise ValueError(f"UNet got an empty batch: x{tuple(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"UNet got an empty latent: x{tuple(x.shape)}")
        if context.dim() != 3 or context.shape[-1] != cfg.context_dim or context.shape[1] == 0:
            raise ValueError(f"UNet expects context of shape (B, L >= 1, {cfg.context_dim}), got {tuple(context.shape)}")
        if context.shape[0] != b:
            raise ValueError(f"batch mismatch: x has {b} samples, context {context.shape[0]}")
        dtype = self.out[-1].weight.dtype
        if not (takes_dtype(x, dtype) and takes_dtype(context, dtype)):
            raise TypeError(f"UNet: x ({x.dtype}) and context ({context.dtype}) must have the model's dtype "
                            f"{dtype}{autocast_note(x)}; convert them (or the model) first")
        if isinstance(t, numbers.Number):  # the pipelines' timestep: filled on the device, where
            t = torch.full((b,), t, device=x.device)  # as_tensor would copy it from the host (a GPU sync a step)
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(b)
        elif t.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or of shape ({b},), got {tuple(t.shape)}")
        return t
