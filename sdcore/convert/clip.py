"""CLIP text encoder: diffusers ``text_encoder/`` (transformers ``CLIPTextModel``) <-> our keys.

Our keys are the single-file ones without ``cond_stage_model.`` (see :mod:`sdcore.clip`).

* ``kind="clip"`` (SD 1.x): the single file already holds a transformers CLIPTextModel, so the
  rule is the prefix: ``transformer.<key>`` <-> ``<key>`` (``text_model.*``).
* ``kind="openclip"`` (SD 2.x): renames of name fragments (``resblocks`` <-> ``encoder.layers``,
  ``ln_1`` <-> ``layer_norm1``, ``c_fc`` <-> ``fc1``, ...), the packed ``attn.in_proj_weight``
  (3·width, width) <-> ``self_attn.{q,k,v}_proj`` (rows [0, w), [w, 2w), [2w, 3w)), and
  ``model.text_projection`` (width, proj), used as ``x @ P``, <-> ``text_projection.weight``
  (proj, width), an ``nn.Linear`` weight in ``CLIPTextModelWithProjection``: a transpose.

Layers and clip_skip. A diffusers folder stores the text encoder the way diffusers' pipelines run it
by default, i.e. its last layer is the output layer: SD 2's ``text_encoder/`` has 23 layers, the 24
OpenCLIP layers minus the last, which SD 2 never uses (clip_skip 2). So, for both kinds:

    diffusers layers = L - clip_skip + 1,   diffusers clip_skip = 1
    (ours: L = 24, clip_skip = 2  <->  diffusers: 23 layers, last one)  -- same hidden states.

:func:`ldm_to_diffusers` drops the layers after the output layer; :func:`config_to_diffusers` writes
``num_hidden_layers = L - clip_skip + 1``; :func:`config_from_diffusers` gives ``layers`` = the
stored count and ``clip_skip = 1``. Asking for a further skip then maps as
``clip_skip_ours_from_diffusers = clip_skip_ours_original - (original clip_skip - 1)``.
(diffusers' own pipeline argument ``clip_skip`` counts differently: its 1 is our 2.)

The SD 2 diffusers folder also has no ``text_projection`` / ``logit_scale`` (not used for SD); pass
``with_projection=True`` to write them (``CLIPTextModelWithProjection`` layout, ``logit_scale``
under that name as in transformers' ``CLIPModel``; reading a folder without it gives the placeholder
ln(1/0.07)). Without them :func:`config_from_diffusers` gives
``projection_dim=0``: a TextEncoder without a projection head.
"""
from __future__ import annotations

import re

import torch

from ..clip import LOGIT_SCALE_INIT
from ..config import TextEncoderConfig
from . import config_float, config_int

__all__ = ["diffusers_to_ldm", "ldm_to_diffusers", "config_from_diffusers", "config_to_diffusers",
           "diffusers_layers"]

BOS_ID, EOS_ID = 49406, 49407
_HF = "transformer."  # our prefix for kind="clip"
_OC = "model."  # our prefix for kind="openclip"
_TM = "text_model."  # diffusers / transformers (< 5.6 and hub files) prefix

# OpenCLIP name (after "model.") <-> transformers name (after "text_model."), outside the blocks
_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# name fragments inside one block: OpenCLIP -> transformers
_OPENCLIP_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                   "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
# every parameter name of transformers' CLIPTextModel, after "text_model."
_HF_NAME = re.compile(r"embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)|"
                      r"encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|"
                      r"mlp\.fc[12])\.(weight|bias)")


def diffusers_layers(cfg: TextEncoderConfig) -> int:
    """Layers a diffusers folder stores for ``cfg``: up to the output layer, L - clip_skip + 1."""
    if not 1 <= cfg.clip_skip <= cfg.layers:
        raise ValueError(f"clip_skip must be in [1, {cfg.layers}], got {cfg.clip_skip}")
    return cfg.layers - cfg.clip_skip + 1


def _unknown(keys: list[str], layout: str) -> ValueError:
    return ValueError(f"{len(keys)} keys not part of a {layout} CLIP text encoder: {sorted(keys)[:8]}")


# --- ours -> diffusers --------------------------------------------------------------------------
def ldm_to_diffusers(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig, *,
                     with_projection: bool = False) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers ``text_encoder/`` keys (``text_model.*``), layers after the output
    layer dropped; ``with_projection`` also writes ``text_projection.weight`` and ``logit_scale``."""
    keep = diffusers_layers(cfg)
    out, unknown = {}, []
    if cfg.kind == "clip":
        if with_projection:
            raise ValueError("kind='clip' (SD 1.x) text encoders have no text_projection")
        for key, value in sd.items():
            name = key[len(_HF):]
            if name == _TM + "embeddings.position_ids":
                continue
            if not (key.startswith(_HF + _TM) and _HF_NAME.fullmatch(name[len(_TM):])):
                unknown.append(key)
                continue
            m = _HF_BLOCK.match(name[len(_TM):])
            if not (m and int(m.group(1)) >= keep):
                out[name] = value
    elif cfg.kind == "openclip":
        top = {_OC + k: _TM + v for k, v in _OPENCLIP_TOP.items()}
        for key, value in sd.items():
            m = _OC_BLOCK.match(key[len(_OC):]) if key.startswith(_OC) else None
            if key in top:
                out[top[key]] = value
            elif key == _OC + "text_projection":
                if with_projection:
                    out["text_projection.weight"] = value.t().contiguous()
            elif key == _OC + "logit_scale":
                if with_projection:
                    out["logit_scale"] = value
            elif m is None:
                unknown.append(key)
            elif int(m.group(1)) < keep:
                prefix, name = f"{_TM}encoder.layers.{m.group(1)}.", m.group(2)
                if name.startswith("attn.in_proj_"):  # packed q/k/v -> three projections
                    kind = name.rsplit("_", 1)[1]  # "weight" | "bias"
                    for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                        out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.clone()
                else:
                    out[prefix + _rename(name, _OPENCLIP_BLOCK, key)] = value
    else:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
    if unknown:
        raise _unknown(unknown, f"kind={cfg.kind!r} (ours)")
    return out


def _rename(name: str, fragments: dict[str, str], key: str) -> str:
    for old, new in fragments.items():
        if name.startswith(old):
            return new + name[len(old):]
    raise _unknown([key], "known")


# --- diffusers -> ours --------------------------------------------------------------------------
def diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """diffusers / transformers CLIPTextModel(WithProjection) keys -> ours. Keys may come with the
    ``text_model.`` prefix (hub files) or without it (transformers >= 5.6 ``CLIPTextModel``);
    transformers' ``position_ids`` buffer is dropped."""
    out, unknown = {}, []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    back_top = {v: k for k, v in _OPENCLIP_TOP.items()}
    back_block = {v: k for k, v in _OPENCLIP_BLOCK.items()}
    for key, value in sd.items():
        name = key[len(_TM):] if key.startswith(_TM) else key
        if name == "embeddings.position_ids":
            continue
        if cfg.kind == "clip":
            if _HF_NAME.fullmatch(name):
                out[_HF + _TM + name] = value
            else:
                unknown.append(key)
            continue
        if cfg.kind != "openclip":
            raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
        m = _HF_BLOCK.match(name)
        if name in back_top:
            out[_OC + back_top[name]] = value
        elif name == "text_projection.weight":
            out[_OC + "text_projection"] = value.t().contiguous()
        elif name == "logit_scale":
            out[_OC + "logit_scale"] = value
        elif m is None:
            unknown.append(key)
        elif q := _QKV.match(m.group(2)):
            qkv.setdefault((m.group(1), q.group(2)), {})[q.group(1)] = value
        else:
            out[f"{_OC}transformer.resblocks.{m.group(1)}.{_rename(m.group(2), back_block, key)}"] = value
    for (layer, kind), parts in qkv.items():  # three projections -> packed in_proj
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"layer {layer}: {kind} of q/k/v incomplete, have only {sorted(parts)}")
        out[f"{_OC}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    if unknown:
        raise _unknown(unknown, f"kind={cfg.kind!r} diffusers")
    if _OC + "text_projection" in out and _OC + "logit_scale" not in out:
        # CLIPTextModelWithProjection has no logit_scale (it scales image-text logits only, nothing
        # in SD reads it): a placeholder, OpenCLIP's initial value ln(1/0.07), keeps strict loading.
        out[_OC + "logit_scale"] = torch.tensor(LOGIT_SCALE_INIT, dtype=out[_OC + "text_projection"].dtype)
    return out


# --- configs ------------------------------------------------------------------------------------
def config_to_diffusers(cfg: TextEncoderConfig, *, with_projection: bool = False) -> dict:
    """``TextEncoderConfig`` -> transformers ``CLIPTextConfig`` dict (a text_encoder/config.json)."""
    if with_projection and (cfg.kind != "openclip" or cfg.projection_dim <= 0):
        raise ValueError("with_projection needs kind='openclip' and projection_dim > 0")
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "num_hidden_layers": diffusers_layers(cfg),
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim if cfg.projection_dim > 0 else cfg.width,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 0 if cfg.pad_token == "!" else EOS_ID,
    }


def config_from_diffusers(config_json: dict) -> TextEncoderConfig:
    """transformers ``CLIPTextConfig`` dict -> ``TextEncoderConfig``.

    ``hidden_act`` tells the kind ("quick_gelu": OpenAI CLIP, SD 1.x; "gelu": OpenCLIP, SD 2.x);
    ``clip_skip`` is 1 because the folder's last layer is its output layer (see module doc). The
    pad token is read from ``pad_token_id`` when it is 0 ("!") or 49407, else the kind's default
    (hub configs say 1, which means nothing: the tokenizer folder is what pads). ``eos_token_id``
    (default 49407, transformers' since PR #24773) says where the pooled feature is read
    (:meth:`sdcore.clip.TextEncoder.pool`). Numbers that are not positive integers, and
    ``num_attention_heads`` not dividing ``hidden_size``, raise ValueError naming the option.
    """
    c = dict(config_json)
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported hidden_act {act!r} for a CLIP text encoder")
    kind = "clip" if act == "quick_gelu" else "openclip"
    pad_id = c.get("pad_token_id")
    pad = {0: "!", EOS_ID: "<|endoftext|>"}.get(pad_id, "!" if kind == "openclip" else "<|endoftext|>")
    with_projection = any("WithProjection" in a for a in c.get("architectures") or [])
    width, heads = config_int(c, "hidden_size", 512), config_int(c, "num_attention_heads", 8)
    if width % heads:  # transformers' CLIPAttention refuses it at construction
        raise ValueError(f"hidden_size={width} is not divisible by num_attention_heads={heads}")
    # transformers' CLIPTextConfig default is 512 whatever the width; a plain CLIPTextModel has no
    # projection, and then the value only sizes the LDM-layout head sdcore keeps for OpenAI CLIP.
    projection = (config_int(c, "projection_dim", 512) if with_projection
                  else config_int(c, "projection_dim", width) if kind == "clip" else 0)
    return TextEncoderConfig(
        kind=kind, vocab_size=config_int(c, "vocab_size", 49408),
        max_length=config_int(c, "max_position_embeddings", 77), width=width,
        layers=config_int(c, "num_hidden_layers", 12), heads=heads,
        intermediate=config_int(c, "intermediate_size", 2048), act=act,
        layer_norm_eps=config_float(c, "layer_norm_eps", 1e-5), projection_dim=projection, clip_skip=1,
        pad_token=pad, eos_token_id=config_int(c, "eos_token_id", EOS_ID, minimum=0))
