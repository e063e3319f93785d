"""UNet: our (= LDM) keys <-> diffusers' ``UNet2DConditionModel`` keys, and the two configs.

The key map is derived, not tabulated: :func:`_module_pairs` walks the levels of a config and
pairs each diffusers module prefix with its LDM prefix (``down_blocks.1.resnets.0`` <->
``input_blocks.4.0``, ``...norm1`` <-> ``...in_layers.0``); every parameter of the model built
on the meta device is then renamed by its longest matching prefix. Transformer internals
(``transformer_blocks.0.attn1.to_q`` ...) have the same names on both sides.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from ..config import UNetConfig
from ..unet import check_channel_mult
from . import check_groups, config_bool, config_channels, config_float, config_int

# ResBlock parameters: diffusers name -> LDM name (relative to the block).
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _has_attention(cfg: UNetConfig, level: int) -> bool:
    return 2 ** level in cfg.attention_resolutions  # ds = 2^level at level `level`


def _module_pairs(cfg: UNetConfig) -> Iterator[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every module that holds parameters."""

    def resnet(diff: str, ldm: str):
        yield from ((f"{diff}.{d}", f"{ldm}.{l}") for d, l in _RESNET.items())

    yield "conv_in", "input_blocks.0.0"
    yield "time_embedding.linear_1", "time_embed.0"
    yield "time_embedding.linear_2", "time_embed.2"
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j  # input block index: conv_in, then n ResBlocks + 1 Downsample per level
            yield from resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0")
            yield f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1"
        if level != levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * (n + 1)}.0.op"
    yield from resnet("mid_block.resnets.0", "middle_block.0")
    yield "mid_block.attentions.0", "middle_block.1"
    yield from resnet("mid_block.resnets.1", "middle_block.2")
    for up in range(levels):  # diffusers' up_blocks.0 is the deepest level
        for j in range(n + 1):
            i = up * (n + 1) + j
            yield from resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{i}.0")
            yield f"up_blocks.{up}.attentions.{j}", f"output_blocks.{i}.1"
        if up != levels - 1:
            slot = 2 if _has_attention(cfg, levels - 1 - up) else 1
            yield f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{(up + 1) * (n + 1) - 1}.{slot}.conv"
    yield "conv_norm_out", "out.0"
    yield "conv_out", "out.2"


def _rename(key: str, prefixes: Mapping[str, str]) -> str | None:
    """Rename ``key`` by its longest prefix (at a '.' boundary) found in ``prefixes``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        new = prefixes.get(".".join(parts[:cut]))
        if new is not None:
            return ".".join([new, *parts[cut:]])
    return None


def key_map(cfg: UNetConfig) -> dict[str, str]:
    """LDM key -> diffusers key for every parameter of ``UNetModel(cfg)``."""
    from ..unet import UNetModel

    with torch.device("meta"):
        ldm_keys = list(UNetModel(cfg).state_dict())
    to_diffusers = {ldm: diff for diff, ldm in _module_pairs(cfg)}
    out = {k: _rename(k, to_diffusers) for k in ldm_keys}
    unmapped = [k for k, v in out.items() if v is None]
    if unmapped:  # a bug in _module_pairs, not in the caller's input
        raise AssertionError(f"no diffusers name for {len(unmapped)} UNet keys: {unmapped[:10]}")
    return out


def _convert(sd: Mapping[str, torch.Tensor], mapping: dict[str, str], src: str) -> dict[str, torch.Tensor]:
    unexpected = [k for k in sd if k not in mapping]
    missing = [k for k in mapping if k not in sd]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing {src} keys (first 10: {missing[:10]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {src} keys (first 10: {unexpected[:10]})")
    if problems:
        raise KeyError(f"UNet state dict does not match the config: {'; '.join(problems)}")
    return {mapping[k]: v for k, v in sd.items()}


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ours (LDM keys, no ``model.diffusion_model.``)."""
    return _convert(sd, {d: l for l, d in key_map(cfg).items()}, "diffusers")


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Ours (LDM keys, no prefix) -> diffusers ``UNet2DConditionModel`` state dict."""
    return _convert(sd, key_map(cfg), "LDM")


def config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``UNet2DConditionModel``.

    diffusers' ``attention_head_dim`` holds head *counts* (a historical misnomer): an int for SD 1.x
    (8 heads everywhere), per-level counts for SD 2.x ([5, 10, 20, 20] at head dim 64).
    """
    check_channel_mult(cfg)  # block_out_channels[0] is both model_channels and the first level's width
    levels = range(len(cfg.channel_mult))
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [_has_attention(cfg, level) for level in levels]
    heads = cfg.num_heads if cfg.num_head_channels == -1 else [cfg.heads_at(c)[0] for c in channels]
    out = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "time_embedding_dim": cfg.time_embed_dim,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
        "upcast_attention": cfg.upcast_attention,
    }
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out


def _per_block_default(value, ok) -> bool:
    """A per-block list of a supported bool (``only_cross_attention=[False, False, False]``, as
    diffusers writes the option per down block), each entry the same supported value."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, bool) and v in ok for v in value) and any(isinstance(o, bool) for o in ok))


# diffusers options whose non-default values our LDM UNet does not implement: name -> allowed values.
_SUPPORTED = {
    "flip_sin_to_cos": (True,), "freq_shift": (0,), "act_fn": ("silu",), "center_input_sample": (False,),
    "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "dual_cross_attention": (False,), "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "encoder_hid_dim": (None,), "time_embedding_type": ("positional",), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "time_cond_proj_dim": (None,), "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None, False), "encoder_hid_dim_type": (None,),
    "addition_time_embed_dim": (None,), "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
}
# Kept, not acted on: ``upcast_attention`` (SD 2.1: q·kᵀ in fp32; UNetConfig.upcast_attention). The
# triton backend and SDPA's fused kernels (flash, memory-efficient, cuDNN) keep scores in fp32
# registers anyway; the reference rounds scaled scores to the input dtype, as diffusers' AttnProcessor
# without upcast.


def config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """``UNetConfig`` from a diffusers ``UNet2DConditionModel`` ``config.json`` (as a dict).

    ``layers_per_block`` and ``cross_attention_dim`` may be per-block lists in diffusers; the LDM
    UNet has one value for all levels, so a list of equal values is read as that value and unequal
    ones are refused. Numbers of the wrong type and a ``norm_num_groups`` that does not divide
    every ``block_out_channels`` raise ValueError naming the option.
    """
    bad = [f"{k}={config[k]!r}" for k, ok in _SUPPORTED.items()
           if k in config and config[k] not in ok and not _per_block_default(config[k], ok)]
    channels = config_channels(config, "block_out_channels", (320, 640, 1280, 1280))
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or len(down) != len(channels):
        bad.append(f"down_block_types={down!r}")
    if up != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        bad.append(f"up_block_types={up!r} (must mirror down_block_types)")
    if any(c % channels[0] for c in channels):
        bad.append(f"block_out_channels={channels!r} (must be multiples of the first)")
    if bad:
        raise ValueError(f"UNet config not supported by sdcore's LDM UNet: {', '.join(bad)}")
    groups = config_int(config, "norm_num_groups", 32)
    check_groups(groups, channels)
    time_embed_dim = config.get("time_embedding_dim")

    key = "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"
    heads = config.get(key, 8)
    counts = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    if len(counts) != len(channels) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in counts):
        raise ValueError(f"{key} must be a head count >= 1, or one per block ({len(channels)}), got {heads!r}")
    used = [(c, h) for c, h, a in zip(channels, counts, attn) if a] + [(channels[-1], counts[-1])]  # + the middle
    split = list(dict.fromkeys(f"{c} channels into {h}" for c, h in used if c % h))
    if split:
        raise ValueError(f"{key}={heads!r} does not split block_out_channels={channels!r} into equal heads: "
                         f"{', '.join(split)}")
    num_heads, num_head_channels = _heads_from_diffusers(heads, channels, attn)
    return UNetConfig(
        in_channels=config_int(config, "in_channels", 4),
        out_channels=config_int(config, "out_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=config_int(config, "layers_per_block", 2, blocks=len(down)),
        attention_resolutions=tuple(2 ** level for level in reversed(range(len(attn))) if attn[level]),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=config_int(config, "transformer_layers_per_block", 1, blocks=len(down)),
        context_dim=config_int(config, "cross_attention_dim", 1280, blocks=len(down)),
        use_linear_in_transformer=config_bool(config, "use_linear_projection", False),
        norm_groups=groups,
        norm_eps=config_float(config, "norm_eps", 1e-5),
        time_embed_dim=None if time_embed_dim is None else config_int(config, "time_embedding_dim"),
        upcast_attention=config_bool(config, "upcast_attention", False),
    )


def _heads_from_diffusers(heads, channels: list[int], attn: list[bool]) -> tuple[int, int]:
    """(num_heads, num_head_channels) in LDM's terms from diffusers' per-level head counts.

    The middle block uses the deepest level's count in diffusers, so it counts as a level here.
    """
    if isinstance(heads, int):
        return heads, -1
    heads = list(heads)
    used = [(h, c) for h, c, a in zip(heads, channels, attn) if a] + [(heads[-1], channels[-1])]
    if len({h for h, _ in used}) == 1:
        return used[0][0], -1
    dims = {c // h for h, c in used}
    if len(dims) == 1 and all(c % h == 0 for h, c in used):
        return UNetConfig.num_heads, dims.pop()  # num_heads is unused when num_head_channels is set
    raise ValueError(f"attention_head_dim={heads!r} over block_out_channels={channels!r} is neither a "
                     f"constant head count (SD 1.x) nor a constant head dim (SD 2.x)")
