"""VAE state dicts and configs: ours (= LDM ``first_stage_model.*`` without the prefix) <-> diffusers'
``AutoencoderKL``.

The key map is not a table: our model is built on the meta device (no memory) for the config,
and each of its keys is renamed by the handful of rules in :data:`_RULES`. What differs:

- ``{encoder,decoder}.down|up.{i}.block.{j}`` <-> ``down_blocks|up_blocks.{i'}.resnets.{j}``, with
  ``nin_shortcut`` <-> ``conv_shortcut``; the decoder's levels are numbered the other way round in
  diffusers (``up_blocks.0`` is the lowest resolution, our ``up.{L-1}``);
- ``downsample.conv`` / ``upsample.conv`` <-> ``downsamplers.0.conv`` / ``upsamplers.0.conv``;
- ``mid.block_{1,2}`` <-> ``mid_block.resnets.{0,1}``; ``mid.attn_1`` <-> ``mid_block.attentions.0``,
  whose ``norm, q, k, v, proj_out`` are ``group_norm, to_q, to_k, to_v, to_out.0``, and whose 1x1
  conv weights (C, C, 1, 1) are Linear weights (C, C) there;
- ``norm_out`` <-> ``conv_norm_out``.

Folders saved by diffusers before 0.14 name the attention projections ``query, key, value,
proj_attn`` (e.g. stabilityai/stable-diffusion-2-1-base's ``vae/``); :func:`diffusers_to_ldm` reads
them as ``to_q, to_k, to_v, to_out.0``, as diffusers does on load.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Callable

import torch

from ..config import VAEConfig
from ..vae import LDM_RESOLUTION, AutoencoderKL, attention_levels
from . import check_groups, config_channels, config_float, config_int

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}


def _resnet(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut")


def _attn(rest: str) -> str:
    name, param = rest.rsplit(".", 1)
    return f"{_ATTN[name]}.{param}"


# (our key pattern, diffusers key builder from (match, number of levels)), first match wins.
_RULES: list[tuple[re.Pattern, Callable[[re.Match, int], str]]] = [
    (re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3])}"),
    (re.compile(r"encoder\.down\.(\d+)\.attn\.(\d+)\.(.+)"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.{_attn(m[3])}"),
    (re.compile(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3])}"),
    (re.compile(r"decoder\.up\.(\d+)\.attn\.(\d+)\.(.+)"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.attentions.{m[2]}.{_attn(m[3])}"),
    (re.compile(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (re.compile(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet(m[3])}"),
    (re.compile(r"(encoder|decoder)\.mid\.attn_1\.(.+)"),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_attn(m[2])}"),
    (re.compile(r"(encoder|decoder)\.norm_out\.(.+)"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(r"(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.(.+)"),
     lambda m, n: m[0]),
]
_ATTN_LINEAR = re.compile(r".*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight")
# diffusers' pre-0.14 AttentionBlock names, renamed like ModelMixin._fix_state_dict_keys_on_load does
# (diffusers 0.42 models/modeling_utils.py) for every VAE attention (mid block and Attn*Block2D).
_LEGACY_ATTN = re.compile(r"(.+\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _our_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _diffusers_name(key: str, levels: int) -> str:
    for pattern, build in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return build(m, levels)
    raise AssertionError(f"no rule for our VAE key {key!r}")  # a model change without a rule


def key_map(cfg: VAEConfig) -> dict[str, str]:
    """Our key -> diffusers key, for every parameter of the model ``cfg`` describes."""
    return {k: _diffusers_name(k, len(cfg.ch_mult)) for k in _our_shapes(cfg)}


def _check_keys(got, want, what: str) -> None:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first 10: {missing[:10]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first 10: {unexpected[:10]})")
        raise KeyError(f"{what} state dict does not match the VAE config: " + "; ".join(parts))


def _check_shape(key: str, t: torch.Tensor, shape: torch.Size, what: str) -> None:
    if t.shape != shape:
        raise ValueError(f"{what} {key!r}: shape {tuple(t.shape)}, the VAE config needs {tuple(shape)}")


def _current_names(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``sd`` with legacy attention keys under their current names, and current -> stored name."""
    out, stored = {}, {}
    for k, v in sd.items():
        m = _LEGACY_ATTN.fullmatch(k)
        new = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else k
        if m and new in sd:
            raise KeyError(f"diffusers VAE state dict holds both {k!r} (the pre-0.14 name) and {new!r}; "
                           "keep one of them")
        out[new], stored[new] = v, k
    return out, stored


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ours (LDM keys without ``first_stage_model.``).
    Attention keys may also have diffusers' pre-0.14 names (``query``, ..., ``proj_attn``)."""
    shapes = _our_shapes(cfg)
    names = {k: _diffusers_name(k, len(cfg.ch_mult)) for k in shapes}
    sd, stored = _current_names(sd)
    _check_keys(sd, set(names.values()), "diffusers VAE")
    out = {}
    for ours, theirs in names.items():
        t = sd[theirs]
        if _ATTN_LINEAR.fullmatch(theirs) and t.dim() == 2:
            t = t[:, :, None, None]
        _check_shape(stored[theirs], t, shapes[ours], "diffusers VAE")
        out[ours] = t
    return out


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Ours (LDM keys without ``first_stage_model.``) -> diffusers ``AutoencoderKL`` state dict."""
    shapes = _our_shapes(cfg)
    _check_keys(sd, shapes, "LDM VAE")
    out = {}
    for ours, shape in shapes.items():
        t = sd[ours]
        _check_shape(ours, t, shape, "LDM VAE")
        theirs = _diffusers_name(ours, len(cfg.ch_mult))
        out[theirs] = t.flatten(1) if _ATTN_LINEAR.fullmatch(theirs) else t
    return out


# diffusers hard-codes these in its Encoder/Decoder/DiagonalGaussianDistribution.
_DIFFUSERS_FIXED = {"norm_eps": 1e-6, "logvar_clamp": (-30.0, 20.0), "double_z": True}


def config_to_diffusers(cfg: VAEConfig) -> dict:
    """The ``config.json`` of a diffusers ``AutoencoderKL`` with our architecture."""
    for name, value in _DIFFUSERS_FIXED.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"diffusers' AutoencoderKL fixes {name}={value}; this config has {getattr(cfg, name)}")
    if cfg.ch_mult[0] != 1:  # LDM's first ResBlock widens ch to ch * ch_mult[0]; diffusers' conv_in is that wide
        mult = tuple(cfg.ch_mult)
        hint = (f"; the same widths as ch={cfg.ch * mult[0]}, ch_mult={tuple(m // mult[0] for m in mult)} have "
                f"other weights (conv_in is wider)" if all(m % mult[0] == 0 for m in mult) else "")
        raise ValueError(f"diffusers' AutoencoderKL has ch_mult[0] == 1 (conv_in is block_out_channels[0] wide); "
                         f"this config has ch_mult={mult}{hint}; save it as a single file")
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"diffusers' AutoencoderKL has z_channels == embed_dim (latent_channels); "
                         f"this config has {cfg.z_channels} != {cfg.embed_dim}")
    attn = attention_levels(cfg)
    down = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn]
    up = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


_UNSUPPORTED = {  # config key: (the value we need, why)
    "act_fn": ("silu", "LDM's VAE uses SiLU"),
    "use_quant_conv": (True, "LDM's VAE has quant_conv"),
    "use_post_quant_conv": (True, "LDM's VAE has post_quant_conv"),
    "mid_block_add_attention": (True, "LDM's VAE has mid-block attention"),
    "shift_factor": (None, "VAEConfig has no latent shift (SD3/Flux VAEs)"),
    "latents_mean": (None, "VAEConfig has no per-channel latent statistics"),
    "latents_std": (None, "VAEConfig has no per-channel latent statistics"),
}


def config_from_diffusers(config_json: Mapping | str | os.PathLike) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` config (dict, or path to ``config.json``) -> :class:`VAEConfig`.

    Unknown keys are ignored (``sample_size``, ``force_upcast`` only matter to diffusers' tiling and
    fp16 handling); features LDM's VAE lacks raise ValueError, and so do numbers of the wrong type
    (``scaling_factor`` must be a number > 0; null or a string is refused, not defaulted) and a
    ``norm_num_groups`` that does not divide every ``block_out_channels``.
    """
    if not isinstance(config_json, Mapping):
        with open(config_json) as f:
            config_json = json.load(f)
    c = dict(config_json)
    for key, (need, why) in _UNSUPPORTED.items():
        if key in c and c[key] != need:
            raise ValueError(f"diffusers VAE config {key}={c[key]!r} is not supported ({why})")
    channels = config_channels(c, "block_out_channels", (64,))
    ch = channels[0]
    if any(x % ch for x in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down = list(c.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(c.get("up_block_types", ("UpDecoderBlock2D",)))
    known = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True,
             "UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    for t in down + up:
        if t not in known:
            raise ValueError(f"unsupported VAE block type {t!r}; supported: {', '.join(known)}")
    attn = [known[t] for t in down]
    if len(down) != len(channels) or [known[t] for t in reversed(up)] != attn:
        raise ValueError(f"down_block_types {down} and up_block_types {up} must mirror each other, "
                         f"one per block_out_channels {channels}")
    latent = config_int(c, "latent_channels", 4)
    groups = config_int(c, "norm_num_groups", 32)
    check_groups(groups, channels)
    return VAEConfig(
        in_channels=config_int(c, "in_channels", 3),
        out_ch=config_int(c, "out_channels", 3),
        ch=ch,
        ch_mult=tuple(x // ch for x in channels),
        num_res_blocks=config_int(c, "layers_per_block", 1),
        z_channels=latent,
        embed_dim=latent,
        attn_resolutions=tuple(LDM_RESOLUTION // 2**i for i, a in enumerate(attn) if a),
        norm_groups=groups,
        scaling_factor=config_float(c, "scaling_factor", 0.18215),
    )
