"""Reading and writing Stable Diffusion weights: single-file LDM checkpoints and diffusers folders.

Both layouts end up as one *LDM state dict*: the original checkpoint keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), which are our
module names, so :class:`sdcore.StableDiffusion` loads it with ``strict=True``. Diffusers keys are
translated by the rules in :mod:`sdcore.convert`.

Architecture detection from weight shapes lives in :mod:`sdcore.detect`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import reprlib
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.torch_version import TorchVersion
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SchedulerConfig, SDConfig
from .detect import (COMPONENTS, CONFIG_KEY, CheckpointError, _summary, config_to_json,
                     detect_config, identify)
from .tokenizer import MissingTokenizer, read_json_object


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
_TEXT_MODEL = "text_model."  # transformers' CLIPTextModel key prefix in hub files (not in >= 5.6's own)
_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine"}  # diffusers name -> ours
# diffusers scheduler class <-> our sampler name (sdcore.schedulers.SCHEDULERS); other classes
# (e.g. SD 1.5's PNDMScheduler) keep the default sampler, the schedule itself is read all the same.
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerAncestralDiscreteScheduler": "euler_a",
             "DPMSolverMultistepScheduler": "dpmpp_2m"}
_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                     "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range",
                     "set_alpha_to_one")
# A field a scheduler_config.json leaves out takes its class's __init__ default, as in diffusers'
# from_config (diffusers 0.42 sources). Fields a class lacks (clip_sample for the sigma samplers, ...)
# do not change its schedule and keep SchedulerConfig's (SD's) values.
_DIFFUSERS_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                           prediction_type="epsilon", steps_offset=0)
_LEADING = dict(timestep_spacing="leading")
_LINSPACE = dict(timestep_spacing="linspace")
_CLASS_DEFAULTS = {
    "DDIMScheduler": dict(_LEADING, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True),
    "DDPMScheduler": dict(_LEADING, clip_sample=True, clip_sample_range=1.0),
    "PNDMScheduler": dict(_LEADING, set_alpha_to_one=False),
    "EulerAncestralDiscreteScheduler": _LINSPACE, "EulerDiscreteScheduler": _LINSPACE,
    "DPMSolverMultistepScheduler": _LINSPACE, "LMSDiscreteScheduler": _LINSPACE,
    "UniPCMultistepScheduler": _LINSPACE, "DEISMultistepScheduler": _LINSPACE,
    "HeunDiscreteScheduler": dict(_LINSPACE, beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  clip_sample_range=1.0),
    "KDPM2DiscreteScheduler": dict(_LINSPACE, beta_start=0.00085, beta_end=0.012),
    "KDPM2AncestralDiscreteScheduler": dict(_LINSPACE, beta_start=0.00085, beta_end=0.012),
}
# Keys beyond what sdcore implements, at the one value it does implement. The noise schedule's
# (every class) define what the model was trained for: another value is an error. The samplers'
# options (how one samples; a pipeline may pick another sampler anyway) are ignored with a warning.
_SCHEDULE_IMPLEMENTED = {"trained_betas": None, "rescale_betas_zero_snr": False}
_SAMPLER_IMPLEMENTED = {
    # every class (a class without the option has no such key); the sigma spacings are Euler's,
    # Heun's, LMS's and DPM++'s options alike
    "*": {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
          "use_beta_sigmas": False},
    "DDPMScheduler": {"variance_type": "fixed_small"},
    "DPMSolverMultistepScheduler": {
        "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero",
        "euler_at_final": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None,
        "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False},
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)





def _convert(name: str):
    import importlib

    return importlib.import_module(f"sdcore.convert.{name}")


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, floating point as ``dtype`` (None: as stored)."""
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def _floating(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` if every tensor is floating point, as every SD weight is: an integer one (a quantised
    or broken export) would otherwise be adopted as is and fail, or mislead, at sampling time."""
    bad = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{path}: non-floating tensors where the model has floating-point weights: "
                              f"{_summary(bad)}")
    return state


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
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(9)
        self._st = None
        self._sd: dict[str, torch.Tensor] = {}
        self.config_json: str | None = None
        # by content first: safetensors opens with its header's length (8 bytes, little-endian), then
        # "{" (a zip has its compression method there, never "{"); torch's zip format with "PK", its
        # legacy format with a pickle's PROTO opcode (0x80, protocol 2-5). The suffix decides only
        # for files that look like none of these.
        safetensors = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8
        torch_kind = (None if safetensors else "zip" if head[:2] == b"PK" else "legacy pickle"
                      if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") else None)
        if torch_kind and path.suffix == ".safetensors":  # the name promises no pickle: do not unpickle it
            raise CheckpointError(f"{path}: looks like a torch checkpoint ({torch_kind} format, as torch.save "
                                  "writes), not safetensors; a .safetensors name promises a file that runs no "
                                  "code when loaded, and a torch checkpoint is a pickle, so it is not loaded "
                                  "as one: rename it to .ckpt if you trust where it came from")
        if torch_kind or (not safetensors and path.suffix in (".ckpt", ".pt", ".pth", ".bin")):
            self._open_torch(mmap=torch_kind == "zip")  # only zip-format files can be memory-mapped
        else:
            self._open_safetensors()

    def paths(self) -> list[Path]:
        return [self.path]

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
            with _allowing(_inert_globals()):
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = (re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                     or re.search(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", str(e))  # os, sys, ...
                     or re.search(r"allowlisted via `add_safe_globals`, but got <class '(\S+)'>", str(e)))
            # a truncated or corrupt pickle can name a global that is no Python name ("torch._.")
            if found is None or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", found.group(1)):
                why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
                why = why.group(1).split(" Please use")[0] if why else e
                raise CheckpointError(f"{self.path}: not a readable torch checkpoint (truncated or "
                                      f"corrupt?): {why}") from e
            raise CheckpointError(f"{self.path}: holds Python objects besides tensors ({found.group(1)}), "
                                  "which are never unpickled (weights_only=True); keep the state dict "
                                  "only, or convert it to .safetensors") from e
        except MemoryError:  # the machine's limit, not the file's fault
            raise
        except Exception as e:  # torch's unpickler on garbage: KeyError, IndexError, EOFError, RuntimeError, ...
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint "
                                  f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
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

    def read(self, key: str, dtype: torch.dtype, device: torch.device, keep: bool = False) -> torch.Tensor:
        """Tensor ``key`` as ``dtype`` on ``device``. A torch file's tensor is handed over (dropped
        here unless ``keep``): a legacy, pre-zip file is not memory-mapped, and its tensors kept
        beside their casts would hold a second copy of the model until loading ends."""
        try:
            t = self._st.get_tensor(key) if self._st is not None else self._sd[key] if keep else self._sd.pop(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} (truncated?): {e}") from e
        return _cast(t, dtype, device)

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins, for running layout conversions without reading any data."""
        return {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}

    def holder(self, key: str) -> str:
        """Where ``key`` is stored, for messages that name the weight file: nothing to add here."""
        return ""


class _ShardedFile:
    """Sharded weights: an index (``*.safetensors.index.json`` / ``*.bin.index.json``, as
    diffusers' and transformers' ``save_pretrained`` write past ``max_shard_size``) whose
    ``weight_map`` names the shard holding each key. The same interface as :class:`_TensorFile`;
    each key is read from the shard the index names, and a shard must hold exactly the keys the
    index gives it (a key in two shards, or in none, would otherwise be loaded by chance)."""

    config_json = None

    def __init__(self, index: Path):
        self.path = index
        weight_map = _json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and v for v in weight_map.values()):
            raise CheckpointError(f"{index}: no weight_map of key -> shard file name")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (index.parent / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file{'s' if len(missing) > 1 else ''} not found in "
                                  f"{index.parent}: {', '.join(missing)}")
        self._shards = {n: _TensorFile(index.parent / n) for n in names}
        problems = []
        for name, shard in self._shards.items():
            listed = {k for k, v in weight_map.items() if v == name}
            if listed - shard.shapes.keys():
                problems.append(f"{name} lacks {_summary(listed - shard.shapes.keys())}, which the index puts there")
            stray = [f"{k} (index: {weight_map[k]})" if k in weight_map else k
                     for k in shard.shapes.keys() - listed]
            if stray:
                problems.append(f"{name} holds keys the index puts elsewhere or nowhere: {_summary(stray)}")
        if problems:
            raise CheckpointError(f"{index} does not match its shards: " + "; ".join(problems))
        self._where = {k: self._shards[v] for k, v in weight_map.items()}
        self.shapes = {k: f.shapes[k] for k, f in self._where.items()}

    def paths(self) -> list[Path]:  # the index, then its shards
        return [self.path] + [shard.path for shard in self._shards.values()]

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._where[key].read(key, dtype, device)

    meta = _TensorFile.meta

    def holder(self, key: str) -> str:
        return f" (in {self._where[key].path.name})" if key in self._where else ""


def _json_object(path: Path, what: str = "") -> dict:
    """A JSON file's top-level object (a config, a shard index); else a CheckpointError naming it."""
    return read_json_object(path, CheckpointError, what)


def _weights_file(folder: Path, stem: str) -> _TensorFile | _ShardedFile:
    """The component's weights, in the order ``from_pretrained`` without a variant looks for them:
    transformers' (the text encoder, ``stem`` "model") takes one ``model.safetensors``, then its
    shard index, then ``pytorch_model.bin``, then its index; diffusers' (the UNet and VAE) the
    safetensors shard index, then one ``.safetensors``, then one ``.bin`` (its index last, which
    diffusers reads only when told not to use safetensors). Only when none is there, the fp16 variant
    in the same order (diffusers' ``variant="fp16"`` names), so a folder holding both loads the
    full-precision weights."""
    bin_stem = "pytorch_model" if stem == "model" else stem  # transformers' name for .bin weights
    sf, sf_idx, pt, pt_idx = ("{}.safetensors", "{}.safetensors.index{}.json", "{}.bin", "{}.bin.index{}.json")
    order = (sf, sf_idx, pt, pt_idx) if stem == "model" else (sf_idx, sf, pt, pt_idx)
    names = []
    for variant in ("", ".fp16"):
        for form in order:
            base = bin_stem if form in (pt, pt_idx) else stem
            names.append(form.format(base, variant) if form.endswith(".json") else
                         form.format(base + variant))
    for name in names:
        if (folder / name).is_file():
            return (_ShardedFile if name.endswith(".json") else _TensorFile)(folder / name)
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


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
# Two variants of the LDM layout that single files in circulation use, read as the keys and shapes
# they stand for:
# - SD 1.x CLIP weights without transformers' ``text_model.`` level
#   (``cond_stage_model.transformer.encoder.*``), as some exporters wrote them;
# - VAE attention projections stored as linear (C, C) weights where LDM has 1x1 convs (C, C, 1, 1),
#   as diffusers' linear attention layers hold them.
_CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^cond_stage_model\.transformer\.(?=(?:embeddings|encoder|final_layer_norm)\.)")
_VAE_ATTN_PROJECTION = re.compile(r"^first_stage_model\.(?:encoder|decoder)\.(?:mid\.attn_1|(?:down|up)\.\d+\.attn\.\d+)"
                                  r"\.(?:q|k|v|proj_out)\.weight$")


def _ldm_names(keys, where) -> dict[str, str]:
    """LDM key -> the file's key, for files whose CLIP keys lack ``text_model.`` (the rest as is).
    A file holding one weight under both names is refused: which one the model would get is a guess."""
    names: dict[str, str] = {}
    for key in keys:
        ldm = _CLIP_WITHOUT_TEXT_MODEL.sub("cond_stage_model.transformer.text_model.", key)
        if ldm in names:
            first, second = sorted((names[ldm], key))
            raise CheckpointError(f"{where}: holds {first!r} and {second!r}, two names for one text "
                                  "encoder weight; keep one")
        names[ldm] = key
    return names


class _LightningCallback:
    """Stands in for a PyTorch Lightning callback class that a training checkpoint names (the SD
    1.x releases key their ``callbacks`` by ``ModelCheckpoint``): nothing of it is used or run."""

    def __setstate__(self, state):
        pass


def _numpy_scalar(dtype, data=None):
    """numpy's pickled-scalar constructor (``global_step`` as an np.int64), for plain dtypes only:
    an object dtype would read ``data`` as a pointer."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} refused (only plain numeric dtypes load)")
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / 1 (np.core warns in 2)
    return multiarray.multiarray.scalar(dtype, data)


def _allowing(globals_: list):
    """``torch.serialization.safe_globals(globals_)``, which names a stand-in's global as a
    ``(callable, name)`` pair from torch 2.6 on; before that, nothing more is allowed (the files
    these stand in for are refused, naming what they hold, as plain weights_only loads refuse them)."""
    if TorchVersion(torch.__version__) < "2.6":
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(globals_)


def _inert_globals() -> list:
    """What ``torch.load(weights_only=True)`` may build besides tensors, for the training leftovers
    of single files in circulation (A1111's loader allows the same): Lightning's callback classes as
    keys, and numpy scalars and dtypes (``global_step``). Nothing here runs code from the file."""
    import numpy as np

    callbacks = [(_LightningCallback, f"{pkg}.callbacks.model_checkpoint.ModelCheckpoint")
                 for pkg in ("pytorch_lightning", "lightning.pytorch")]
    numpy = [(_numpy_scalar, f"{mod}.multiarray.scalar") for mod in ("numpy.core", "numpy._core")]
    dtypes = [np.dtype, *(type(np.dtype(c)) for c in "?bhilqpBHILQPefdgFDG")]  # numpy 2 builds each by class
    return [*callbacks, *numpy, *dtypes]


class SingleFile:
    """An original (LDM) single-file checkpoint, in either variant above."""

    tokenizer_folder = None

    def __init__(self, path: Path):
        self.file = _TensorFile(path)
        self.path = path
        self._names = _ldm_names(self.file.shapes, path)
        # linear attention projections, read as 1x1 convs
        self._as_conv = {k for k, f in self._names.items()
                         if _VAE_ATTN_PROJECTION.match(k) and len(self.file.shapes[f]) == 2}
        self._shapes = {k: self.file.shapes[f] + ((1, 1) if k in self._as_conv else ())
                        for k, f in self._names.items()}
        identify(self._shapes, path)

    def paths(self) -> list[Path]:
        return [self.path]

    def config(self, prediction_type: str | None) -> SDConfig:
        config = detect_config(self._shapes, prediction_type=prediction_type, name=self.path.stem,
                               where=self.path, hint=self.file.config_json)
        return config.replace(scheduler=self._stored_schedule(config.scheduler))

    def _stored_schedule(self, sched: SchedulerConfig) -> SchedulerConfig:
        """``sched`` with the noise schedule the file's training buffers hold (LDM's ``betas``, or
        ``alphas_cumprod``; LDM samples with them), where they are one sdcore implements; a warning
        naming them where they are not (sampling then uses ``sched``'s)."""
        from .schedulers import make_betas

        key = next((k for k in ("betas", "alphas_cumprod") if k in self._names and len(self._shapes[k]) == 1), None)
        if key is None:
            return sched
        raw = self.file.read(self._names[key], None, torch.device("cpu"), keep=True)
        if not raw.is_floating_point() or len(raw) < 2 or not bool(torch.isfinite(raw).all()):
            return sched
        stored, T = raw.double(), len(raw)

        def as_stored(betas: torch.Tensor) -> torch.Tensor:  # a candidate as the file would hold it
            v = betas.double() if key == "betas" else torch.cumprod(1 - betas.double(), 0)
            return v.to(raw.dtype).double()

        # the ends of β (from ᾱ: β_t = 1 - ᾱ_t / ᾱ_{t-1}), as few digits as the dtype holds: 0.0001, not
        # fp32's 9.99999975e-05, and 0.00085, not fp16's 0.000850201
        betas = stored if key == "betas" else 1 - stored / torch.cat([stored.new_ones(1), stored[:-1]])
        digits = {torch.float16: 3, torch.bfloat16: 2}.get(raw.dtype, 6)
        start, end = (float(f"{float(b):.{digits}g}") for b in (betas[0], betas[-1]))
        tol = max(1e-4, 4 * torch.finfo(raw.dtype).eps)  # LDM's fp64 schedule against make_betas' fp32; 16-bit rounding
        candidates = [sched, *(sched.replace(beta_schedule=s, beta_start=start, beta_end=end, num_train_timesteps=T)
                               for s in ("scaled_linear", "linear")),
                      sched.replace(beta_schedule="cosine", num_train_timesteps=T)]
        for c in candidates:
            if c.num_train_timesteps == T and torch.allclose(
                    as_stored(make_betas(c.beta_schedule, T, c.beta_start, c.beta_end)), stored, rtol=tol, atol=1e-7):
                return c
        warnings.warn(f"{self.path}: its {key} ({T} steps, beta {start:.6g} .. {end:.6g}) are none of the noise "
                      f"schedules sdcore implements (linear, scaled_linear, cosine); sampling uses "
                      f"{sched.beta_schedule} {sched.beta_start}..{sched.beta_end} over {sched.num_train_timesteps}",
                      stacklevel=4)
        return sched

    def shapes(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def check_shapes(self, expected: Mapping[str, tuple]) -> None:
        """Nothing to do before :func:`check_state_dict`: the file's keys are the model's."""

    def read(self, keys, dtype, device) -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            t = self.file.read(self._names[k], dtype, device)
            out[k] = t[:, :, None, None] if k in self._as_conv else t
        return _floating(out, self.path)


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
            raw = _json_object(cfg_path)
            try:
                self.configs[comp] = _convert(conv).config_from_diffusers(raw)
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{cfg_path}: cannot read this config: {e}") from e
            self.files[comp] = _weights_file(path / sub, stem)
        tok = path / "tokenizer"
        self.tokenizer_folder = tok if tok.is_dir() else None

    def paths(self) -> list[Path]:
        """What loading reads: the configs, the weights chosen (an index and its shards), the
        scheduler's config and the tokenizer's files."""
        out = [self.path / name for name in ("model_index.json", "scheduler/scheduler_config.json")]
        for comp, (sub, _, _) in _DIFFUSERS.items():
            out += [self.path / sub / "config.json", *self.files[comp].paths()]
        if self.tokenizer_folder is not None:
            out += sorted(p for p in self.tokenizer_folder.iterdir() if p.is_file())
        return [p for p in out if p.is_file()]

    def config(self, prediction_type: str | None) -> SDConfig:
        sched = scheduler_from_diffusers(self.path / "scheduler" / "scheduler_config.json")
        if prediction_type is not None:
            sched = sched.replace(prediction_type=prediction_type)
        unet, vae = self.configs["unet"], self.configs["vae"]
        cfg_path = self.path / "unet" / "config.json"
        sample = _json_object(cfg_path).get("sample_size", 64)
        if isinstance(sample, list) and len(sample) == 2 and sample[0] == sample[1]:
            sample = sample[0]  # diffusers also takes (height, width); sdcore's image_size is square
        if isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0:
            raise CheckpointError(f"{cfg_path}: sample_size must be a positive integer (or [n, n]), got {sample!r}")
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

    def check_shapes(self, expected: Mapping[str, tuple]) -> None:
        """Shape mismatches (and the text encoder's missing keys) named as they are on disk (weight
        file, key as stored), before the converted keys reach :func:`check_state_dict` (which names
        keys in the LDM layout). The UNet's and VAE's converters name missing keys themselves."""
        for comp, f in self.files.items():
            prefix = COMPONENTS[comp]
            ours = {k[len(prefix):]: torch.empty(v, device="meta") for k, v in expected.items() if k.startswith(prefix)}
            try:
                want = _convert(_DIFFUSERS[comp][2]).ldm_to_diffusers(ours, self.configs[comp])
            except (KeyError, RuntimeError, ValueError):  # the model's own keys convert; leave it to the LDM check
                continue
            want = {k: tuple(v.shape) for k, v in want.items()}
            if comp == "text_encoder":  # transformers >= 5.6 stores text_model.* without the prefix
                prefixed = any(k.startswith(_TEXT_MODEL) for k in f.shapes)
                want = {k if prefixed else k.removeprefix(_TEXT_MODEL): v for k, v in want.items()}
                gone = [k for k in want if k not in f.shapes and not k.endswith(OPTIONAL_KEYS)]
                if gone:
                    raise CheckpointError(f"{f.path} does not match the model's {comp}: missing keys: "
                                          f"{_summary(gone)}")
            bad = [f"{k}{f.holder(k)}: expected {want[k]}, got {tuple(f.shapes[k])}" for k in sorted(f.shapes)
                   if k in want and not _same_weight_shape(want[k], tuple(f.shapes[k]))]
            if bad:
                raise CheckpointError(f"{f.path} does not match the model's {comp}: {len(bad)} shape mismatches: "
                                      + "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else ""))

    def read(self, keys, dtype, device) -> dict[str, torch.Tensor]:
        out = {}
        for comp, f in self.files.items():  # transformers' int64 position_ids are read, then dropped
            ldm = self._ldm(comp, {k: f.read(k, dtype, device) for k in f.shapes})
            out.update(_floating({k: v for k, v in ldm.items() if k in keys}, f.path))
        return out


def _same_weight_shape(a: tuple, b: tuple) -> bool:
    """Equal, or a linear (out, in) against a 1x1 conv (out, in, 1, 1), which the converters take
    for each other (older diffusers VAEs store their attention projections as 1x1 convs)."""
    return a == b or (a[:2] == b[:2] and {len(a), len(b)} == {2, 4} and all(d == 1 for d in a[2:] + b[2:]))


def open_checkpoint(path) -> SingleFile | DiffusersFolder:
    path = Path(path)
    if path.is_dir():
        return DiffusersFolder(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a .safetensors/.ckpt file or a "
                                "diffusers folder)")
    return SingleFile(path)


def scheduler_from_diffusers(path: Path) -> SchedulerConfig:
    """A diffusers ``scheduler_config.json`` as SchedulerConfig, the schedule diffusers builds from it
    (SchedulerConfig's SD defaults, with a warning, where the file is missing):
    absent fields take the ``_class_name`` class's defaults, and ``sampler`` follows the class where
    sdcore has that sampler. CheckpointError for unreadable JSON, invalid values or a noise schedule
    sdcore does not implement (``trained_betas``, ``rescale_betas_zero_snr``); a warning for an
    unknown class or a sampler option it does not implement (``use_karras_sigmas``, ...)."""
    from .schedulers import check_config

    if not path.is_file():
        default = SchedulerConfig()
        warnings.warn(f"{path.parent.parent}: no {path.parent.name}/{path.name}; using sdcore's default (SD's) "
                      f"schedule: {default.beta_schedule} betas {default.beta_start}..{default.beta_end} over "
                      f"{default.num_train_timesteps} steps, {default.prediction_type} prediction, "
                      f"{default.timestep_spacing} spacing, sampler {default.sampler}", stacklevel=4)
        return default
    raw = _json_object(path, "of scheduler fields")
    cls = raw.get("_class_name")
    if not isinstance(cls, str) or cls not in _CLASS_DEFAULTS:
        warnings.warn(f"{path}: _class_name {cls!r} is not a scheduler class whose defaults sdcore knows "
                      f"({', '.join(_CLASS_DEFAULTS)}); absent fields take diffusers' common defaults",
                      stacklevel=4)
    for key, value in _SCHEDULE_IMPLEMENTED.items():
        if raw.get(key, value) != value:
            raise CheckpointError(f"{path}: {key}={reprlib.repr(raw[key])} changes the noise schedule, which "
                                  f"sdcore does not implement; remove the key or set it to {json.dumps(value)}")
    cls = cls if isinstance(cls, str) else None  # warned of above; a list or object is no class name
    for key, value in {**_SAMPLER_IMPLEMENTED["*"], **_SAMPLER_IMPLEMENTED.get(cls, {})}.items():
        if raw.get(key, value) != value:
            warnings.warn(f"{path}: {key}={reprlib.repr(raw[key])} is a {cls} option sdcore's samplers do not "
                          f"implement; ignored (sampling uses {json.dumps(value)})", stacklevel=4)
    given = {f: raw[f] for f in _SCHEDULER_FIELDS if raw.get(f) is not None}
    fields = {**_DIFFUSERS_DEFAULTS, **_CLASS_DEFAULTS.get(cls, {}), **given}
    if isinstance(fields["beta_schedule"], str):
        fields["beta_schedule"] = _BETA_SCHEDULES.get(fields["beta_schedule"], fields["beta_schedule"])
    config = SchedulerConfig(**fields, **({"sampler": _SAMPLERS[cls]} if cls in _SAMPLERS else {}))
    try:
        check_config(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return config


# ------------------------------------------------------------------------------------------ writing
def _detached(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing storage (safetensors refuses shared tensors)."""
    seen, out = set(), {}
    for k, v in sd.items():
        if v.is_meta:
            raise ValueError(f"cannot save {k}: it is on the meta device (a shape without values); load or "
                             "initialise the weights first")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _write_then_rename(path: Path, write) -> None:
    """``write(tmp)`` beside ``path``, then rename it over ``path``. A model loaded from a zip ``.ckpt``
    or a ``.safetensors`` reads its weights from the file's memory map: writing the same path in
    place truncated the file under it (a bus error, and a checkpoint lost). A failed write leaves the
    old file as it was. A symlink's target is what is replaced, and an old file's mode is kept."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_single_file(path, state_dict: Mapping[str, torch.Tensor], config: SDConfig | None = None) -> None:
    """An original-layout checkpoint: ``.safetensors``, or ``.ckpt``/``.pt`` ({"state_dict": ...}),
    with ``config`` as JSON beside the tensors; written whole to a temporary file, then renamed."""
    path = Path(path)
    meta = {CONFIG_KEY: config_to_json(config)} if config is not None else {}
    if path.suffix == ".safetensors":
        tensors = _detached(state_dict)
        _write_then_rename(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", **meta}))
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        obj = {"state_dict": _detached(state_dict), **meta}
        _write_then_rename(path, lambda tmp: torch.save(obj, tmp))
    else:
        raise ValueError(f"{path}: single-file checkpoints end in .safetensors, .ckpt or .pt")


def _remove_stale_index(folder: Path, stem: str) -> None:
    """Before one ``<stem>.safetensors`` is written into ``folder``: a safetensors shard index there
    (an earlier save of bigger or other weights) outranks it for diffusers' loaders and ours
    (:func:`_weights_file`), so the old weights would load. The index goes, with the shards it lists."""
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (ValueError, AttributeError, OSError):
        shards = set()
    for name in shards:
        shard = folder / str(name)
        if shard.parent == folder and shard.is_file():  # only a shard beside the index
            shard.unlink()
    index.unlink()


def save_diffusers(folder, config: SDConfig, state_dict: Mapping[str, torch.Tensor], tokenizer) -> None:
    """A folder ``StableDiffusionPipeline.from_pretrained`` reads (no safety checker). Saving over
    a folder removes a component's safetensors shard index and its shards, which would outrank
    the single weights file written (:func:`_remove_stale_index`)."""
    folder = Path(folder)
    classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel")}
    # Every component's config first, and the tokenizer: what cannot be saved is refused before a file is written.
    if isinstance(tokenizer, MissingTokenizer):
        raise FileNotFoundError(f"{folder}: not written, the model has no tokenizer to save: {tokenizer.reason}")
    cfg_jsons = {comp: dict(_convert(conv).config_to_diffusers(getattr(config, comp)))
                 for comp, (_, _, conv) in _DIFFUSERS.items()}
    cfg_jsons["unet"]["sample_size"] = config.image_size // 2 ** (len(config.vae.ch_mult) - 1)
    weights = {}  # every component converted before a file is written: a model on meta writes nothing
    for comp, (sub, stem, conv) in _DIFFUSERS.items():
        prefix, cfg = COMPONENTS[comp], getattr(config, comp)
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        weights[comp] = _detached(_convert(conv).ldm_to_diffusers(sd, cfg))
    for comp, (sub, stem, conv) in _DIFFUSERS.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg_jsons[comp], indent=2, sort_keys=True))
        _remove_stale_index(folder / sub, stem)
        _write_then_rename(folder / sub / f"{stem}.safetensors",
                           lambda tmp: save_file(weights[comp], str(tmp), metadata={"format": "pt"}))
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
