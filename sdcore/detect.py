"""Architecture detection: an SDConfig read from a checkpoint's tensor shapes.

Architecture detection (single files) reads shapes, never a table of known checkpoints:

* UNet: ``input_blocks.0.0.weight`` gives in_channels (4, or 9 for inpainting) and
  model_channels; the ResBlocks/Downsamples of ``input_blocks`` give channel_mult and
  num_res_blocks; a ``proj_in`` after a ResBlock marks a level with attention (ds = 2**level);
  a 2-d ``proj_in`` means linear projections; ``attn2.to_k`` gives context_dim.
* VAE: ``encoder.conv_in`` gives ch, the ``encoder.down.{i}`` blocks ch_mult and num_res_blocks,
  ``decoder.conv_in`` z_channels, ``post_quant_conv`` embed_dim.
* Text encoder: ``cond_stage_model.transformer.*`` is OpenAI CLIP in HF layout (SD 1.x),
  ``cond_stage_model.model.*`` OpenCLIP (SD 2.x); widths, layer count and MLP width from shapes.
* clip_skip (OpenCLIP): SD 2 conditions on the penultimate of OpenCLIP's 24 layers (clip_skip 2),
  and original files hold all 24 and ``model.text_projection``. Files written from a diffusers
  folder (diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``) hold the folder's
  text encoder, already cut after that layer (23 layers) and without ``text_projection``; their last
  layer is the one SD 2 uses, as diffusers' ``from_single_file`` runs them (it uses 23 layers of
  either file). So: the layer count of an SD 2 preset gives its clip_skip, one layer fewer gives
  clip_skip 1; for other sizes, ``text_projection`` present gives 2, absent gives 1. clip_skip 1
  comes with a warning naming the rule.
* Heads cannot be read from shapes. The rule: context_dim 768 (SD 1.x) -> 8 heads; 1024 (SD 2.x)
  -> 64 channels per head; text encoders use 64-wide heads. When a width does not fit that rule
  (the tiny test presets), the head settings come from the preset whose other fields match.
* Prediction type cannot be read from weights either: epsilon, unless ``prediction_type`` is
  given; an SD 2.x single file without it triggers a warning (768-v models need "v_prediction").
* Files written by sdcore also carry the full SDConfig as JSON (safetensors metadata / a
  ``"sdcore_config"`` entry in a .ckpt), which supplies what shapes cannot tell (heads, clip_skip,
  scaling factor, schedule), so round trips keep the config; it is used only when its
  architecture agrees with the detected one. Its other values are checked as a diffusers folder's
  are (the schedule by :func:`sdcore.schedulers.check_config`, the numbers by the readers in
  :mod:`sdcore.convert`): a bad one is a CheckpointError naming the file, the entry and the value,
  not a failure at sampling time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping

from .config import PRESETS, SchedulerConfig, SDConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .convert import check_groups, config_bool, config_float, config_int

COMPONENTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model."}
CONFIG_KEY = "sdcore_config"  # safetensors metadata / .ckpt entry holding SDConfig as JSON
# Config fields that shapes cannot tell, per component (text: projection_dim too for kind "clip",
# whose single file has no projection).
_FREE = {"unet": ("num_heads", "num_head_channels", "norm_groups", "norm_eps", "upcast_attention"),
         "vae": ("norm_groups", "norm_eps", "scaling_factor", "logvar_clamp"),
         "text_encoder": ("heads", "act", "layer_norm_eps", "clip_skip", "pad_token", "eos_token_id")}


class CheckpointError(ValueError):
    """A file or folder that is not a loadable SD 1.x/2.x checkpoint; the message says why."""


def _summary(keys, n: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


# ------------------------------------------------------------------------------- family / detection
def identify(keys, where) -> None:
    """Raise a CheckpointError saying what the checkpoint looks like unless it is an SD 1.x/2.x
    single file with all three components."""
    keys = list(keys)
    sdxl = [k for k in keys if k.startswith("conditioner.embedders.")]
    if sdxl:
        raise CheckpointError(f"{where} looks like an SDXL checkpoint ({sdxl[0]}); sdcore loads "
                              "SD 1.x/2.x only")
    label = [k for k in keys if k.startswith("model.diffusion_model.label_emb.")]
    if label:  # SDXL's has its conditioner too, caught above
        raise CheckpointError(f"{where} has a class-conditioned UNet ({label[0]}: e.g. SD 2.x unCLIP's image "
                              "embedding); sdcore's UNet is conditioned on text only (SD 1.x/2.x)")
    lora = [k for k in keys if k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k
            or ".lora_up." in k or "lora_A" in k or "lora_B" in k]
    if lora:
        raise CheckpointError(f"{where} looks like a LoRA ({lora[0]}), not a full model; merge it "
                              "into a base checkpoint first")
    present = {c for c, p in COMPONENTS.items() if any(k.startswith(p) for k in keys)}
    if not present:
        if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
                        for k in keys):
            raise CheckpointError(f"{where} looks like a standalone VAE (only encoder.*/decoder.*/"
                                  "quant_conv keys), not a full Stable Diffusion checkpoint")
        if any(k.startswith(("down_blocks.", "time_embedding.", "text_model.")) for k in keys):
            raise CheckpointError(f"{where} looks like one diffusers/transformers component; load "
                                  "the whole pipeline folder instead")
        raise CheckpointError(f"{where} is not a Stable Diffusion checkpoint: no keys start with "
                              f"{', '.join(COMPONENTS.values())} (keys: {_summary(keys, 5)})")
    if present != set(COMPONENTS):
        gone = [f"{c} ({COMPONENTS[c]}*)" for c in COMPONENTS if c not in present]
        raise CheckpointError(f"{where} has no weights for: {', '.join(gone)}")


_UNKNOWN = -2  # head settings that neither a rule nor a preset gives


def _indices(s: Mapping[str, tuple], prefix: str) -> list[int]:
    """The numbers n of the keys ``prefix + "n." ...``, sorted."""
    return sorted({int(k[len(prefix):].split(".")[0]) for k in s if k.startswith(prefix)})


def _match(detected, free: tuple[str, ...], pick):
    """Head settings from the first preset equal to ``detected`` up to the ``free`` fields."""
    for preset in PRESETS.values():
        cand = pick(preset)
        if detected.replace(**{f: getattr(cand, f) for f in free}) == cand:
            return cand
    return None


def _detect_unet(s: Mapping[str, tuple], te_kind: str, where) -> UNetConfig:
    p = COMPONENTS["unet"]
    model_channels, in_channels = s[p + "input_blocks.0.0.weight"][:2]
    ids = _indices(s, p + "input_blocks.")
    mult, attn, res_counts, count, level, first_attn = [], set(), [], 0, 0, None
    for i in ids[1:]:
        if p + f"input_blocks.{i}.0.op.weight" in s:  # Downsample closes a level
            res_counts.append(count)
            count, level = 0, level + 1
            continue
        count += 1
        if count == 1:
            mult.append(s[p + f"input_blocks.{i}.0.out_layers.3.weight"][0] // model_channels)
        if p + f"input_blocks.{i}.1.proj_in.weight" in s:
            attn.add(2 ** level)
            first_attn = i if first_attn is None else first_attn
    res_counts.append(count)
    if len(set(res_counts)) != 1:
        raise CheckpointError(f"{where}: unsupported UNet, ResBlocks per level {res_counts}")
    if mult[:1] != [1]:
        raise CheckpointError(f"{where}: unsupported UNet, channel multipliers {mult} (input_blocks.1 has "
                              f"{mult[0] if mult else 0}x the {model_channels} channels of input_blocks.0; "
                              "LDM's and diffusers' UNets start with 1x)")
    cfg = UNetConfig(in_channels=in_channels, out_channels=s[p + "out.2.weight"][0],
                     model_channels=model_channels, channel_mult=tuple(mult),
                     num_res_blocks=res_counts[0], attention_resolutions=tuple(sorted(attn, reverse=True)))
    # the first transformer: a down level's, else the middle block's (attention there alone)
    tp = p + (f"input_blocks.{first_attn}.1." if first_attn is not None else "middle_block.1.")
    if tp + "proj_in.weight" in s:
        depth = len(_indices(s, tp + "transformer_blocks."))
        cfg = cfg.replace(transformer_depth=depth, context_dim=s[tp + "transformer_blocks.0.attn2.to_k.weight"][1],
                          use_linear_in_transformer=len(s[tp + "proj_in.weight"]) == 2)
    temb = s[p + "time_embed.0.weight"][0]
    cfg = cfg.replace(time_embed_dim=None if temb == 4 * model_channels else temb)
    if cfg.context_dim == 768:  # SD 1.x: 8 heads
        return cfg.replace(num_heads=8, num_head_channels=-1)
    if cfg.context_dim == 1024:  # SD 2.x: 64 channels per head
        return cfg.replace(num_head_channels=64)
    known = _match(cfg, ("num_heads", "num_head_channels", "upcast_attention"), lambda c: c.unet)
    if known is not None:
        return known
    guess = cfg.replace(num_heads=8, num_head_channels=-1) if te_kind == "clip" else cfg.replace(num_head_channels=64)
    fits = all(math.prod(guess.heads_at(m * model_channels)) == m * model_channels for m in cfg.channel_mult)
    return guess if fits else cfg.replace(num_heads=_UNKNOWN, num_head_channels=_UNKNOWN)


def _detect_vae(s: Mapping[str, tuple], where) -> VAEConfig:
    from .vae import LDM_RESOLUTION

    p = COMPONENTS["vae"]
    ch, in_channels = s[p + "encoder.conv_in.weight"][:2]
    levels = _indices(s, p + "encoder.down.")
    z = s[p + "decoder.conv_in.weight"][1]
    return VAEConfig(in_channels=in_channels, out_ch=s[p + "decoder.conv_out.weight"][0], ch=ch,
                     ch_mult=tuple(s[p + f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in levels),
                     num_res_blocks=len(_indices(s, p + "encoder.down.0.block.")),
                     z_channels=z, embed_dim=s[p + "post_quant_conv.weight"][1],
                     attn_resolutions=tuple(LDM_RESOLUTION // 2**i for i in levels
                                            if p + f"encoder.down.{i}.attn.0.q.weight" in s),
                     double_z=s[p + "encoder.conv_out.weight"][0] == 2 * z)


def _detect_text(s: Mapping[str, tuple], where) -> tuple[TextEncoderConfig, str | None]:
    p = COMPONENTS["text_encoder"]
    note = None  # why clip_skip is 1 (OpenCLIP only)
    if any(k.startswith(p + "transformer.") for k in s):  # OpenAI CLIP, HF names (SD 1.x)
        t = p + "transformer.text_model."
        vocab, width = s[t + "embeddings.token_embedding.weight"]
        proj = s.get(p + "transformer.text_projection.weight", (width,))[0]
        cfg = TextEncoderConfig(kind="clip", vocab_size=vocab, width=width, projection_dim=proj,
                                max_length=s[t + "embeddings.position_embedding.weight"][0],
                                layers=len(_indices(s, t + "encoder.layers.")),
                                intermediate=s[t + "encoder.layers.0.mlp.fc1.weight"][0])
    elif any(k.startswith(p + "model.") for k in s):  # OpenCLIP (SD 2.x)
        t = p + "model."
        vocab, width = s[t + "token_embedding.weight"]
        cfg = TextEncoderConfig(kind="openclip", vocab_size=vocab, width=width, act="gelu", clip_skip=2,
                                pad_token="!", max_length=s[t + "positional_embedding"][0],
                                projection_dim=s.get(t + "text_projection", (width, 0))[1],
                                layers=len(_indices(s, t + "transformer.resblocks.")),
                                intermediate=s[t + "transformer.resblocks.0.mlp.c_fc.weight"][0])
        cfg, note = _openclip_clip_skip(cfg, t + "text_projection" in s)
    else:
        raise CheckpointError(f"{where}: text encoder of unknown kind: cond_stage_model.* keys are "
                              f"neither transformer.* (CLIP) nor model.* (OpenCLIP): {_summary(s, 3)}")
    if width % 64 == 0:  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 both use 64-wide heads
        return cfg.replace(heads=width // 64), note
    known = _match(cfg, _TEXT_TOWER_FREE, lambda c: c.text_encoder)  # heads do not depend on the depth
    return cfg.replace(heads=_UNKNOWN if known is None else known.heads), note


# Text encoder fields that do not change the layers' shapes (kept or cut layers, projection head).
_TEXT_TOWER_FREE = ("heads", "layers", "projection_dim", "clip_skip")


def _openclip_clip_skip(cfg: TextEncoderConfig, has_projection: bool) -> tuple[TextEncoderConfig, str | None]:
    """``cfg`` with the clip_skip its file needs (module docstring), and the rule, when it is 1."""
    for preset in PRESETS.values():
        full = preset.text_encoder
        if full.kind != "openclip" or cfg.replace(**{f: getattr(full, f) for f in _TEXT_TOWER_FREE}) != full:
            continue
        if cfg.layers == full.layers:
            return cfg.replace(clip_skip=full.clip_skip), None
        if cfg.layers == full.layers - full.clip_skip + 1:
            return cfg.replace(clip_skip=1), (
                f"it has {cfg.layers} layers, {full.clip_skip - 1} fewer than {preset.name}'s {full.layers} "
                f"(a text encoder from a diffusers folder, cut after the layer {preset.name} conditions on), "
                "so its last layer is the one to use")
    if has_projection:
        return cfg.replace(clip_skip=2), None
    return cfg.replace(clip_skip=1), (
        "it has no model.text_projection, as files converted from a diffusers folder (whose text encoder "
        "is cut after SD 2's penultimate layer) lack it, so its last layer is the one to use")


def _upcast(text: TextEncoderConfig, sched: SchedulerConfig) -> bool:
    """diffusers' upcast_attention for a file that does not say: set for an SD 2.x v-prediction
    model, as in SD 2.1 768-v's hub folder, whose config diffusers' single-file loader takes for it."""
    return text.kind == "openclip" and sched.prediction_type == "v_prediction"


def config_to_json(config: SDConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> SDConfig:
    raw = json.loads(text)
    fix = lambda cls, d: cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # noqa: E731
    return SDConfig(raw["name"], unet=fix(UNetConfig, raw["unet"]), vae=fix(VAEConfig, raw["vae"]),
                    text_encoder=fix(TextEncoderConfig, raw["text_encoder"]),
                    scheduler=fix(SchedulerConfig, raw["scheduler"]), image_size=raw["image_size"])


def _canonical(comp: str, cfg):
    """``cfg`` in the one spelling detection gives its architecture: attention levels in descending
    order and only those the model has, the UNet's time embedding None where it is the default
    4 * model_channels (a config saying (1, 2), (8, 2, 1) on three levels, or 128 for 32 channels
    builds the same model)."""
    from .vae import LDM_RESOLUTION

    try:
        if comp == "unet":
            have = {2**level for level in range(len(cfg.channel_mult))}
            return cfg.replace(
                attention_resolutions=tuple(sorted(set(cfg.attention_resolutions) & have, reverse=True)),
                time_embed_dim=None if cfg.time_embed_dim == 4 * cfg.model_channels else cfg.time_embed_dim)
        if comp == "vae":
            have = {LDM_RESOLUTION // 2**i for i in range(len(cfg.ch_mult))}
            return cfg.replace(attn_resolutions=tuple(sorted(set(cfg.attn_resolutions) & have, reverse=True)))
    except TypeError:  # metadata of the wrong types (nested lists, strings): it will not agree as it is
        pass
    return cfg


def _agrees(hint: SDConfig, unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig) -> SDConfig | None:
    """``hint`` if it has the detected architecture, up to the fields shapes cannot tell, else None.
    Its architecture fields are then the detected values (equal, but ints where JSON may say 4.0 or
    true, and in :func:`_canonical`'s spelling), and only the fields shapes cannot tell come from
    ``hint``."""
    free = dict(_FREE, text_encoder=_FREE["text_encoder"] + (("projection_dim",) if text.kind == "clip" else ()))
    merged = {}
    for comp, got in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        want = _canonical(comp, getattr(hint, comp))
        merged[comp] = got.replace(**{f: getattr(want, f) for f in free[comp]})
        if merged[comp] != want:
            return None
    return hint.replace(**merged)


def check_hint(config: SDConfig) -> None:
    """ValueError naming the field and its value (``"scheduler: unknown prediction_type 'v'; ..."``,
    ``"image_size must be an integer >= 8, got -64"``) for a value of sdcore's config metadata that the
    shapes did not check: the name, the fields of :data:`_FREE` (and a CLIP projection_dim), the
    schedule and the image size. The same checks as a diffusers folder's configs: the readers of
    :mod:`sdcore.convert` for the numbers, :func:`sdcore.schedulers.check_config` for the schedule."""
    from .convert.clip import diffusers_layers
    from .schedulers import check_config

    def part(name: str | None, check) -> None:
        try:
            check()
        except ValueError as e:
            if name is None:
                raise
            raise ValueError(f"{name}: {e}") from e

    def check_name():
        if not isinstance(config.name, str):
            raise ValueError(f"name must be a string, got {config.name!r}")

    def check_unet():
        u, raw = config.unet, dataclasses.asdict(config.unet)
        channels = [m * u.model_channels for m in u.channel_mult]
        check_groups(config_int(raw, "norm_groups"), channels, "norm_groups")
        config_float(raw, "norm_eps")
        config_bool(raw, "upcast_attention", None)
        if u.num_head_channels != -1:
            config_int(raw, "num_head_channels")  # -1: num_heads heads
        else:
            config_int(raw, "num_heads")
        # the levels with attention, and the middle block (the last level's width)
        used = [c for level, c in enumerate(channels) if 2 ** level in u.attention_resolutions] + channels[-1:]
        split = list(dict.fromkeys(f"{c} channels into {u.heads_at(c)[0]}" for c in used
                                   if math.prod(u.heads_at(c)) != c))
        if split:
            heads = (f"num_heads={u.num_heads}" if u.num_head_channels == -1
                     else f"num_head_channels={u.num_head_channels}")
            raise ValueError(f"{heads} does not split the attention widths into equal heads: {', '.join(split)}")

    def check_vae():
        v, raw = config.vae, dataclasses.asdict(config.vae)
        check_groups(config_int(raw, "norm_groups"), [m * v.ch for m in v.ch_mult], "norm_groups")
        config_float(raw, "norm_eps")
        config_float(raw, "scaling_factor")
        clamp = v.logvar_clamp
        if (not isinstance(clamp, tuple) or len(clamp) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in clamp)
                or not clamp[0] < clamp[1]):
            raise ValueError(f"logvar_clamp must be two finite numbers [low, high], low < high, got "
                             f"{list(clamp) if isinstance(clamp, tuple) else clamp!r}")

    def check_text():
        t, raw = config.text_encoder, dataclasses.asdict(config.text_encoder)
        heads = config_int(raw, "heads")
        if t.width % heads:
            raise ValueError(f"width={t.width} is not divisible by heads={heads}")
        if t.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown act {t.act!r}; valid: quick_gelu, gelu")
        config_float(raw, "layer_norm_eps")
        config_int(raw, "clip_skip")
        diffusers_layers(t)  # clip_skip at most the layer count
        if not isinstance(t.pad_token, str) or not t.pad_token:
            raise ValueError(f"pad_token must be a token (a non-empty string), got {t.pad_token!r}")
        config_int(raw, "eos_token_id", minimum=0)
        config_int(raw, "projection_dim", minimum=0)  # 0: no projection head

    def check_scheduler():
        check_config(config.scheduler)

    def check_image_size():
        multiple = 2 ** (len(config.vae.ch_mult) - 1)  # the VAE's downsampling
        size = config_int({"image_size": config.image_size}, "image_size", minimum=multiple)
        if size % multiple:
            raise ValueError(f"image_size must be a multiple of {multiple} (the VAE downsamples {multiple}x), "
                             f"got {size}")

    for name, check in ((None, check_name), ("unet", check_unet), ("vae", check_vae),
                        ("text_encoder", check_text), ("scheduler", check_scheduler), (None, check_image_size)):
        part(name, check)


class _Reading(Mapping):
    """The shapes, remembering the last key read, for an error that names it."""

    def __init__(self, shapes: Mapping[str, tuple]):
        self._shapes, self.last = shapes, None

    def __getitem__(self, key):
        self.last = key
        return self._shapes[key]

    def __contains__(self, key):
        return key in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)


def detect_config(shapes: Mapping[str, tuple], *, prediction_type: str | None = None,
                  name: str = "custom", where="checkpoint", hint: str | None = None) -> SDConfig:
    """SDConfig of an LDM state dict from its keys and shapes (see the module docstring); ``hint``
    is the JSON config sdcore wrote into the file, if any."""
    reading = _Reading(shapes)
    try:
        text, clip_skip_note = _detect_text(reading, where)
        unet = _detect_unet(reading, text.kind, where)
        vae = _detect_vae(reading, where)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{where}: cannot detect the architecture, key {e} is missing") from e
    except (ValueError, IndexError, TypeError, ZeroDivisionError) as e:  # a shape of the wrong rank or size
        key = reading.last
        what = f"key {key!r}: its shape {tuple(shapes[key])} is not one" if key is not None else "the shapes: not what"
        raise CheckpointError(f"{where}: cannot detect the architecture from {what} an SD checkpoint has "
                              f"there ({e})") from e
    if hint is not None:
        try:
            config = config_from_json(hint)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # a section not an object
            warnings.warn(f"{where}: ignoring unreadable {CONFIG_KEY} metadata ({e!r})", stacklevel=4)
        else:
            agreed = _agrees(config, unet, vae, text)
            if agreed is not None:
                config = agreed
                try:
                    check_hint(config)
                except ValueError as e:
                    raise CheckpointError(f"{where}: bad {CONFIG_KEY} metadata: {e}") from e
                if prediction_type is not None:
                    config = config.replace(scheduler=config.scheduler.replace(prediction_type=prediction_type))
                if "upcast_attention" not in json.loads(hint)["unet"]:  # written before sdcore kept the flag
                    config = config.replace(unet=config.unet.replace(
                        upcast_attention=_upcast(config.text_encoder, config.scheduler)))
                return config
            warnings.warn(f"{where}: its {CONFIG_KEY} metadata does not match the weights; using the "
                          "architecture detected from the shapes", stacklevel=4)
    if unet.num_heads == _UNKNOWN or text.heads == _UNKNOWN:
        raise CheckpointError(f"{where}: cannot infer the attention heads (UNet channels "
                              f"{[m * unet.model_channels for m in unet.channel_mult]}, context_dim "
                              f"{unet.context_dim}, text width {text.width}): neither the 8-heads / 64-wide-heads "
                              "rules nor a preset fit; save the model with sdcore to record them")
    if clip_skip_note is not None:
        warnings.warn(f"{where}: OpenCLIP text encoder used with clip_skip 1 (its last layer), not SD 2's 2: "
                      f"{clip_skip_note}", stacklevel=4)
    if prediction_type is None and text.kind == "openclip":
        warnings.warn(f"{where}: SD 2.x checkpoint loaded as epsilon-prediction; 768-v models (e.g. "
                      "SD 2.1 768) need prediction_type='v_prediction'", stacklevel=4)
    sched = SchedulerConfig(prediction_type=prediction_type or "epsilon")
    unet = unet.replace(upcast_attention=_upcast(text, sched))
    same = [c for c in PRESETS.values()  # the flag is no part of the architecture
            if (c.unet, c.vae, c.text_encoder) == (unet.replace(upcast_attention=c.unet.upcast_attention), vae, text)]
    same.sort(key=lambda c: c.scheduler.prediction_type != sched.prediction_type)
    image_size = same[0].image_size if same else (768 if sched.prediction_type == "v_prediction" else 512)
    return SDConfig(same[0].name if same else name, unet=unet, vae=vae, text_encoder=text,
                    scheduler=sched, image_size=image_size)
