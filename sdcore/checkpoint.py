"""Reading and writing Stable Diffusion weights: single-file LDM checkpoints and diffusers folders.

Both layouts end up as one *LDM state dict*: the original checkpoint keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), which are our
module names, so :class:`sdcore.StableDiffusion` loads it with ``strict=True``. Diffusers keys are
translated by the rules in :mod:`sdcore.convert`.

Architecture detection (single files) reads shapes, never a table of known checkpoints:

* UNet: ``input_blocks.0.0.weight`` gives in_channels (4, or 9 for inpainting) and
  model_channels; the ResBlocks/Downsamples of ``input_blocks`` give channel_mult and
  num_res_blocks; a ``proj_in`` after a ResBlock marks a level with attention (ds = 2**level);
  a 2-d ``proj_in`` means linear projections; ``attn2.to_k`` gives context_dim.
* VAE: ``encoder.conv_in`` gives ch, the ``encoder.down.{i}`` blocks ch_mult and num_res_blocks,
  ``decoder.conv_in`` z_channels, ``post_quant_conv`` embed_dim.
* Text encoder: ``cond_stage_model.transformer.*`` is OpenAI CLIP in HF layout (SD 1.x),
  ``cond_stage_model.model.*`` OpenCLIP (SD 2.x); widths, layer count and MLP width from shapes.
* Heads cannot be read from shapes. The rule: context_dim 768 (SD 1.x) -> 8 heads; 1024 (SD 2.x)
  -> 64 channels per head; text encoders use 64-wide heads. When a width does not fit that rule
  (the tiny test presets), the head settings come from the preset whose other fields match.
* Prediction type cannot be read from weights either: epsilon, unless ``prediction_type`` is
  given; an SD 2.x single file without it triggers a warning (768-v models need "v_prediction").
* Files written by sdcore also carry the full SDConfig as JSON (safetensors metadata / a
  ``"sdcore_config"`` entry in a .ckpt), which supplies what shapes cannot tell (heads, clip_skip,
  scaling factor, schedule), so round trips keep the config; it is used only when its
  architecture agrees with the detected one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import PRESETS, SchedulerConfig, SDConfig, TextEncoderConfig, UNetConfig, VAEConfig

COMPONENTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model."}
# Training bookkeeping found in original .ckpt files; not part of the inference model.
_LEFTOVER = re.compile(r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|logvar$|"
                       r"lvlb_weights$)")
# Keys some exporters write and others do not (HF's position_ids buffer, OpenCLIP's logit_scale).
OPTIONAL_KEYS = ("position_ids", "logit_scale")
_DIFFUSERS = {  # component -> (sub-folder, weight file stems, convert module)
    "unet": ("unet", "diffusion_pytorch_model", "unet"),
    "vae": ("vae", "diffusion_pytorch_model", "vae"),
    "text_encoder": ("text_encoder", "model", "clip"),
}
_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine"}  # diffusers name -> ours
# diffusers scheduler class <-> our sampler name (sdcore.schedulers.SCHEDULERS); other classes
# (e.g. SD 1.5's PNDMScheduler) keep the default sampler, the schedule itself is read all the same.
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerAncestralDiscreteScheduler": "euler_a",
             "DPMSolverMultistepScheduler": "dpmpp_2m"}
_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                     "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range",
                     "set_alpha_to_one")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CONFIG_KEY = "sdcore_config"  # safetensors metadata / .ckpt entry holding SDConfig as JSON
# Config fields that shapes cannot tell, per component (text: projection_dim too for kind "clip",
# whose single file has no projection).
_FREE = {"unet": ("num_heads", "num_head_channels", "norm_groups", "norm_eps"),
         "vae": ("norm_groups", "norm_eps", "scaling_factor", "logvar_clamp"),
         "text_encoder": ("heads", "act", "layer_norm_eps", "clip_skip", "pad_token")}


class CheckpointError(ValueError):
    """A file or folder that is not a loadable SD 1.x/2.x checkpoint; the message says why."""


def _convert(name: str):
    import importlib

    return importlib.import_module(f"sdcore.convert.{name}")


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _summary(keys, n: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


# ------------------------------------------------------------------------------------- tensor files
class _TensorFile:
    """One weight file opened lazily: ``shapes`` without reading data, ``read`` tensor by tensor.

    ``.safetensors`` is memory-mapped by ``safe_open``; ``.ckpt``/``.pt``/``.bin`` go through
    ``torch.load(weights_only=True, mmap=True)`` (a top-level ``"state_dict"`` is unwrapped).
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        with open(path, "rb") as f:
            head = f.read(9)
        self._st = None
        self._sd: dict[str, torch.Tensor] = {}
        self.config_json: str | None = None
        if head[:2] == b"PK" or path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_torch(mmap=head[:2] == b"PK")  # only zip-format files can be memory-mapped
        else:
            self._open_safetensors()

    def _open_safetensors(self):
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
            self.shapes = {k: tuple(self._st.get_slice(k).get_shape()) for k in self._st.keys()}
            self.config_json = (self._st.metadata() or {}).get(CONFIG_KEY)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from e

    def _open_torch(self, mmap: bool):
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found is None:
                why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
                raise CheckpointError(f"{self.path}: not a readable torch checkpoint (truncated or "
                                      f"corrupt?): {why.group(1) if why else e}") from e
            raise CheckpointError(f"{self.path}: holds Python objects besides tensors ({found.group(1)}), "
                                  "which are never unpickled (weights_only=True); keep the state dict "
                                  "only, or convert it to .safetensors") from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint "
                                  f"(truncated or corrupt?): {e}") from e
        if isinstance(obj, Mapping) and isinstance(obj.get(CONFIG_KEY), str):
            self.config_json = obj[CONFIG_KEY]
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a state dict")
        self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not self._sd:
            raise CheckpointError(f"{self.path}: holds no tensors (keys: {_summary(obj)})")
        self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        try:
            t = self._st.get_tensor(key) if self._st is not None else self._sd[key]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} (truncated?): {e}") from e
        return _cast(t, dtype, device)

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins, for running layout conversions without reading any data."""
        return {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}


def _weights_file(folder: Path, stem: str) -> Path:
    names = [f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors"]
    if stem == "model":  # transformers' name for .bin weights
        names[1] = "pytorch_model.bin"
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


# ------------------------------------------------------------------------------- family / detection
def identify(keys, where) -> None:
    """Raise a CheckpointError saying what the checkpoint looks like unless it is an SD 1.x/2.x
    single file with all three components."""
    keys = list(keys)
    sdxl = [k for k in keys if k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb."))]
    if sdxl:
        raise CheckpointError(f"{where} looks like an SDXL checkpoint ({sdxl[0]}); sdcore loads "
                              "SD 1.x/2.x only")
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
    cfg = UNetConfig(in_channels=in_channels, out_channels=s[p + "out.2.weight"][0],
                     model_channels=model_channels, channel_mult=tuple(mult),
                     num_res_blocks=res_counts[0], attention_resolutions=tuple(sorted(attn, reverse=True)))
    if first_attn is not None:
        tp = p + f"input_blocks.{first_attn}.1."
        depth = len(_indices(s, tp + "transformer_blocks."))
        cfg = cfg.replace(transformer_depth=depth, context_dim=s[tp + "transformer_blocks.0.attn2.to_k.weight"][1],
                          use_linear_in_transformer=len(s[tp + "proj_in.weight"]) == 2)
    temb = s[p + "time_embed.0.weight"][0]
    cfg = cfg.replace(time_embed_dim=None if temb == 4 * model_channels else temb)
    if cfg.context_dim == 768:  # SD 1.x: 8 heads
        return cfg.replace(num_heads=8, num_head_channels=-1)
    if cfg.context_dim == 1024:  # SD 2.x: 64 channels per head
        return cfg.replace(num_head_channels=64)
    known = _match(cfg, ("num_heads", "num_head_channels"), lambda c: c.unet)
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


def _detect_text(s: Mapping[str, tuple], where) -> TextEncoderConfig:
    p = COMPONENTS["text_encoder"]
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
    else:
        raise CheckpointError(f"{where}: text encoder of unknown kind: cond_stage_model.* keys are "
                              f"neither transformer.* (CLIP) nor model.* (OpenCLIP): {_summary(s, 3)}")
    if width % 64 == 0:  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 both use 64-wide heads
        return cfg.replace(heads=width // 64)
    known = _match(cfg, ("heads",), lambda c: c.text_encoder)
    return cfg.replace(heads=_UNKNOWN) if known is None else known


def config_to_json(config: SDConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> SDConfig:
    raw = json.loads(text)
    fix = lambda cls, d: cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # noqa: E731
    return SDConfig(raw["name"], unet=fix(UNetConfig, raw["unet"]), vae=fix(VAEConfig, raw["vae"]),
                    text_encoder=fix(TextEncoderConfig, raw["text_encoder"]),
                    scheduler=fix(SchedulerConfig, raw["scheduler"]), image_size=raw["image_size"])


def _agrees(hint: SDConfig, unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig) -> bool:
    """Does ``hint`` have the detected architecture, up to the fields shapes cannot tell?"""
    free = dict(_FREE, text_encoder=_FREE["text_encoder"] + (("projection_dim",) if text.kind == "clip" else ()))
    for comp, got in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        want = getattr(hint, comp)
        if got.replace(**{f: getattr(want, f) for f in free[comp]}) != want:
            return False
    return True


def detect_config(shapes: Mapping[str, tuple], *, prediction_type: str | None = None,
                  name: str = "custom", where="checkpoint", hint: str | None = None) -> SDConfig:
    """SDConfig of an LDM state dict from its keys and shapes (see the module docstring); ``hint``
    is the JSON config sdcore wrote into the file, if any."""
    try:
        text = _detect_text(shapes, where)
        unet = _detect_unet(shapes, text.kind, where)
        vae = _detect_vae(shapes, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: cannot detect the architecture, key {e} is missing") from e
    if hint is not None:
        try:
            config = config_from_json(hint)
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{where}: ignoring unreadable {CONFIG_KEY} metadata ({e!r})", stacklevel=4)
        else:
            if _agrees(config, unet, vae, text):
                return config if prediction_type is None else config.replace(
                    scheduler=config.scheduler.replace(prediction_type=prediction_type))
            warnings.warn(f"{where}: its {CONFIG_KEY} metadata does not match the weights; using the "
                          "architecture detected from the shapes", stacklevel=4)
    if unet.num_heads == _UNKNOWN or text.heads == _UNKNOWN:
        raise CheckpointError(f"{where}: cannot infer the attention heads (UNet channels "
                              f"{[m * unet.model_channels for m in unet.channel_mult]}, context_dim "
                              f"{unet.context_dim}, text width {text.width}): neither the 8-heads / 64-wide-heads "
                              "rules nor a preset fit; save the model with sdcore to record them")
    if prediction_type is None and text.kind == "openclip":
        warnings.warn(f"{where}: SD 2.x checkpoint loaded as epsilon-prediction; 768-v models (e.g. "
                      "SD 2.1 768) need prediction_type='v_prediction'", stacklevel=4)
    sched = SchedulerConfig(prediction_type=prediction_type or "epsilon")
    same = [c for c in PRESETS.values() if (c.unet, c.vae, c.text_encoder) == (unet, vae, text)]
    same.sort(key=lambda c: c.scheduler.prediction_type != sched.prediction_type)
    image_size = same[0].image_size if same else (768 if sched.prediction_type == "v_prediction" else 512)
    return SDConfig(same[0].name if same else name, unet=unet, vae=vae, text_encoder=text,
                    scheduler=sched, image_size=image_size)


# --------------------------------------------------------------------------------------- validation
def check_state_dict(expected: Mapping[str, tuple], got: Mapping[str, tuple], where) -> None:
    """Missing/unexpected keys per component and shape mismatches, all in one CheckpointError."""
    problems = []
    for comp, prefix in COMPONENTS.items():
        exp = {k for k in expected if k.startswith(prefix)}
        have = {k for k in got if k.startswith(prefix)}
        if exp - have:
            problems.append(f"{comp}: missing keys: {_summary(k[len(prefix):] for k in exp - have)}")
        if have - exp:
            problems.append(f"{comp}: unexpected keys: {_summary(k[len(prefix):] for k in have - exp)}")
    outside = [k for k in got if not k.startswith(tuple(COMPONENTS.values()))]
    if outside:
        problems.append(f"keys outside the three components: {_summary(outside)}")
    bad = [f"{k}: expected {tuple(expected[k])}, got {tuple(got[k])}" for k in sorted(got)
           if k in expected and tuple(expected[k]) != tuple(got[k])]
    if bad:
        problems.append(f"{len(bad)} shape mismatches: " + "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else ""))
    if problems:
        raise CheckpointError(f"{where} does not match the model:\n  " + "\n  ".join(problems))


def drop_extras(shapes: Mapping[str, tuple], expected: Mapping[str, tuple]) -> dict[str, tuple]:
    """Without training leftovers (EMA copies, schedule buffers) and optional keys the model lacks."""
    return {k: v for k, v in shapes.items() if not _LEFTOVER.match(k)
            and not (k.endswith(OPTIONAL_KEYS) and k not in expected)}


# ------------------------------------------------------------------------------------------ reading
class SingleFile:
    """An original (LDM) single-file checkpoint."""

    tokenizer_folder = None

    def __init__(self, path: Path):
        self.file = _TensorFile(path)
        identify(self.file.shapes, path)
        self.path = path

    def config(self, prediction_type: str | None) -> SDConfig:
        return detect_config(self.file.shapes, prediction_type=prediction_type, name=self.path.stem,
                             where=self.path, hint=self.file.config_json)

    def shapes(self) -> dict[str, tuple]:
        return dict(self.file.shapes)

    def read(self, keys, dtype, device) -> dict[str, torch.Tensor]:
        return {k: self.file.read(k, dtype, device) for k in keys}


class DiffusersFolder:
    """A diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""

    def __init__(self, path: Path):
        self.path = path
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise CheckpointError(f"{path}: a folder but not a diffusers pipeline (no model_index.json)")
        self.files, self.configs = {}, {}
        for comp, (sub, stem, conv) in _DIFFUSERS.items():
            cfg_path = path / sub / "config.json"
            if not cfg_path.is_file():
                raise CheckpointError(f"{path}: missing {sub}/config.json")
            try:
                self.configs[comp] = _convert(conv).config_from_diffusers(json.loads(cfg_path.read_text()))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{cfg_path}: cannot read this config: {e}") from e
            self.files[comp] = _TensorFile(_weights_file(path / sub, stem))
        tok = path / "tokenizer"
        self.tokenizer_folder = tok if tok.is_dir() else None

    def config(self, prediction_type: str | None) -> SDConfig:
        sched = scheduler_from_diffusers(self.path / "scheduler" / "scheduler_config.json")
        if prediction_type is not None:
            sched = sched.replace(prediction_type=prediction_type)
        unet, vae = self.configs["unet"], self.configs["vae"]
        sample = json.loads((self.path / "unet" / "config.json").read_text()).get("sample_size", 64)
        return SDConfig(self.path.name, unet=unet, vae=vae, text_encoder=self.configs["text_encoder"],
                        scheduler=sched, image_size=sample * 2 ** (len(vae.ch_mult) - 1))

    def _ldm(self, comp: str, sd: dict) -> dict:
        conv = _convert(_DIFFUSERS[comp][2])
        try:
            out = conv.diffusers_to_ldm(sd, self.configs[comp])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.files[comp].path}: cannot convert to LDM keys: {e!r}") from e
        return {COMPONENTS[comp] + k: v for k, v in out.items()}

    def shapes(self) -> dict[str, tuple]:
        out = {}
        for comp, f in self.files.items():
            out.update({k: tuple(v.shape) for k, v in self._ldm(comp, f.meta()).items()})
        return out

    def read(self, keys, dtype, device) -> dict[str, torch.Tensor]:
        out = {}
        for comp, f in self.files.items():
            out.update(self._ldm(comp, {k: f.read(k, dtype, device) for k in f.shapes}))
        return {k: v for k, v in out.items() if k in keys}


def open_checkpoint(path) -> SingleFile | DiffusersFolder:
    path = Path(path)
    if path.is_dir():
        return DiffusersFolder(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a .safetensors/.ckpt file or a "
                                "diffusers folder)")
    return SingleFile(path)


def scheduler_from_diffusers(path: Path) -> SchedulerConfig:
    """A diffusers ``scheduler_config.json`` as SchedulerConfig; absent fields keep our defaults, and
    ``sampler`` follows ``_class_name`` where sdcore has that sampler."""
    if not path.is_file():
        return SchedulerConfig()
    raw = json.loads(path.read_text())
    fields = {f: raw[f] for f in _SCHEDULER_FIELDS if raw.get(f) is not None}
    if "beta_schedule" in fields:
        fields["beta_schedule"] = _BETA_SCHEDULES.get(fields["beta_schedule"], fields["beta_schedule"])
    if raw.get("_class_name") in _SAMPLERS:
        fields["sampler"] = _SAMPLERS[raw["_class_name"]]
    return SchedulerConfig(**fields)


# ------------------------------------------------------------------------------------------ writing
def _detached(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing storage (safetensors refuses shared tensors)."""
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_single_file(path, state_dict: Mapping[str, torch.Tensor], config: SDConfig | None = None) -> None:
    """An original-layout checkpoint: ``.safetensors``, or ``.ckpt``/``.pt`` ({"state_dict": ...}),
    with ``config`` as JSON beside the tensors."""
    path = Path(path)
    meta = {CONFIG_KEY: config_to_json(config)} if config is not None else {}
    if path.suffix == ".safetensors":
        save_file(_detached(state_dict), str(path), metadata={"format": "pt", **meta})
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": {k: v.detach().to("cpu") for k, v in state_dict.items()}, **meta}, path)
    else:
        raise ValueError(f"{path}: single-file checkpoints end in .safetensors, .ckpt or .pt")


def save_diffusers(folder, config: SDConfig, state_dict: Mapping[str, torch.Tensor], tokenizer) -> None:
    """A folder ``StableDiffusionPipeline.from_pretrained`` reads (no safety checker)."""
    folder = Path(folder)
    classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel")}
    for comp, (sub, stem, conv) in _DIFFUSERS.items():
        prefix, cfg = COMPONENTS[comp], getattr(config, comp)
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        (folder / sub).mkdir(parents=True, exist_ok=True)
        cfg_json = dict(_convert(conv).config_to_diffusers(cfg))
        if comp == "unet":
            cfg_json["sample_size"] = config.image_size // 2 ** (len(config.vae.ch_mult) - 1)
        (folder / sub / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
        save_file(_detached(_convert(conv).ldm_to_diffusers(sd, cfg)), str(folder / sub / f"{stem}.safetensors"),
                  metadata={"format": "pt"})
    sched = config.scheduler
    cls = {v: k for k, v in _SAMPLERS.items()}.get(sched.sampler, "DDIMScheduler")
    raw = {f: getattr(sched, f) for f in _SCHEDULER_FIELDS}
    raw["beta_schedule"] = {v: k for k, v in _BETA_SCHEDULES.items()}.get(raw["beta_schedule"], raw["beta_schedule"])
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": cls, **raw}, indent=2))
    tokenizer.save(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             **{c: list(v) for c, v in classes.items()}, "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", cls], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
