"""``StableDiffusion``: the UNet, VAE and text encoder under their original checkpoint names.

The module tree mirrors LDM's ``LatentDiffusion`` (``model.diffusion_model`` = UNet,
``first_stage_model`` = VAE, ``cond_stage_model`` = text encoder), so ``state_dict()`` *is* a
single-file checkpoint and loading one needs no key table::

    sd = sdcore.load("v1-5-pruned-emaonly.safetensors", dtype=torch.float16, device="cuda")
    sd = sdcore.load("path/to/diffusers-folder")
    sd = sdcore.StableDiffusion.from_preset("tiny", seed=0)
    sd.save("out.safetensors")                     # layout inferred: file -> ldm, else diffusers
    sd.save("out-folder", layout="diffusers")

Loading never holds two copies of the weights: the modules are built with their parameters on
the ``meta`` device, each tensor is cast to dtype/device as it is read, and
``load_state_dict(strict=True, assign=True)`` adopts those tensors. Buffers are not put on meta, so
non-persistent ones (computed in ``__init__``) keep their real values; they are then moved and cast
as ``Module.to(device, dtype)`` would.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .checkpoint import FLOAT_DTYPES, CheckpointError
from .clip import LOGIT_SCALE_INIT
from .config import SDConfig
from .detect import check_hint


class _DiffusionWrapper(nn.Module):
    """LDM's ``DiffusionWrapper``: only there for the ``model.diffusion_model.`` key prefix."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside this scope is swapped for a meta tensor at once, so no
    weights are allocated (or initialised) for real; buffers stay real."""
    def hook(module, name, param):
        if param is not None and param.device.type != "meta":
            return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_dtype(dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a float dtype ({', '.join(str(d) for d in FLOAT_DTYPES)}), got {dtype}")


def _random_parameters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random values for every parameter, drawn in ``named_parameters`` order on the CPU in
    fp32 (so the same for every device and dtype). Nothing is zero, unlike LDM's zero-initialised
    output layers, so every block contributes to the outputs: weights ~ U(±1/sqrt(fan_in))
    (PyTorch's default), norm scales ~ 1 + U(±0.1), biases and other vectors ~ U(±0.1)."""
    g = torch.Generator().manual_seed(seed)
    norms = {f"{m_name}.{p_name}".lstrip(".") for m_name, m in model.named_modules()
             if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for p_name, _ in m.named_parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        u = torch.rand(p.shape, generator=g) * 2 - 1
        if name in norms and name.endswith("weight"):
            out[name] = 1 + 0.1 * u
        elif p.dim() >= 2:
            out[name] = u / math.sqrt(p[0].numel())
        else:
            out[name] = 0.1 * u
    return out


class StableDiffusion(nn.Module):
    """The three models of an SD 1.x/2.x checkpoint plus its tokenizer and :class:`SDConfig`."""

    def __init__(self, config: SDConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = _DiffusionWrapper(unet)
        self.first_stage_model = vae
        self.cond_stage_model = text_encoder
        self.tokenizer = tokenizer

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.cond_stage_model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def scheduler(self, name: str | None = None, **overrides):
        """A scheduler for this model's noise schedule (default sampler from the config)."""
        from .schedulers import make_scheduler

        return make_scheduler(name, self.config.scheduler, **overrides)

    @classmethod
    def skeleton(cls, config: SDConfig, tokenizer=None) -> "StableDiffusion":
        """The model with all parameters on ``meta`` (buffers real), ready for ``_adopt``."""
        from .clip import TextEncoder
        from .unet import UNetModel
        from .vae import AutoencoderKL

        with _parameters_on_meta():
            return cls(config, UNetModel(config.unet), AutoencoderKL(config.vae),
                       TextEncoder(config.text_encoder), tokenizer)

    def _adopt(self, state: dict[str, torch.Tensor], dtype, device) -> "StableDiffusion":
        """Take ``state`` (already in dtype on device) as the parameters; buffers the state lacks
        keep their constructed values, moved/cast like ``Module.to`` does."""
        buffers = {k: v for k, v in self.state_dict().items() if k not in state and v.device.type != "meta"}
        self.load_state_dict({**buffers, **state}, strict=True, assign=True)
        self.to(device=device, dtype=dtype)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.device.type == "meta"]
        if left and torch.device(device).type != "meta":
            raise RuntimeError(f"internal error: tensors left on meta after loading: {left[:10]}")
        return self.eval().requires_grad_(False)

    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device="cpu") -> "StableDiffusion":
        """A preset's architecture with seeded random weights (deterministic for a given seed)."""
        return cls.from_config(SDConfig.preset(name), seed=seed, dtype=dtype, device=device)

    @classmethod
    def from_config(cls, config: SDConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device="cpu") -> "StableDiffusion":
        """Any SD 1.x/2.x-family architecture (``SDConfig.preset(...).replace(...)``) with seeded
        random weights, e.g. to benchmark a UNet variant before any checkpoint exists.
        ``device="meta"``: the architecture without values (no weights drawn), for parameter
        counts and the shapes a forward on meta inputs gives."""
        from .tokenizer import MAX_LENGTH, CLIPTokenizer

        _check_dtype(dtype)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if not 0 <= seed < 2**63:  # torch.manual_seed wraps: -1 would be 2^64 - 1's weights
            raise ValueError(f"seed (the random weights' seed) must be in [0, 2^63), got {seed}")
        device = torch.device(device)
        text = config.text_encoder
        model = cls.skeleton(config, CLIPTokenizer.default_or_missing(
            pad_token=text.pad_token, max_length=min(MAX_LENGTH, text.max_length)))
        if device.type == "meta":
            state = {k: torch.empty(p.shape, device=device, dtype=dtype) for k, p in model.named_parameters()}
        else:
            state = {k: v.to(device=device, dtype=dtype) for k, v in _random_parameters(model, seed).items()}
        return model._adopt(state, dtype, device)

    @classmethod
    def load(cls, path, **kwargs) -> "StableDiffusion":
        """Same as :func:`sdcore.load`."""
        return load(path, **kwargs)

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-file checkpoint's contents: persistent parameters and buffers, LDM keys."""
        return dict(self.state_dict())

    def save(self, path, layout: str | None = None) -> None:
        """Write an original single file (``layout="ldm"``: .safetensors/.ckpt/.pt) or a diffusers
        folder (``layout="diffusers"``). Without ``layout``: ldm for those suffixes, else diffusers."""
        path = Path(path)
        if layout is None:
            layout = "ldm" if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth") else "diffusers"
        try:  # what load checks in the file's config, so that nothing is written that cannot be read back
            check_hint(self.config)
        except ValueError as e:
            raise ValueError(f"cannot save {path}: config {e} (sdcore.load would refuse the file)") from None
        if layout == "ldm":
            if not path.parent.is_dir():  # else safetensors names its own temporary file, not this path
                raise FileNotFoundError(f"cannot save {path}: {path.parent} is not an existing folder")
            checkpoint.save_single_file(path, self.ldm_state_dict(), self.config)
        elif layout == "diffusers":
            checkpoint.save_diffusers(path, self.config, self.ldm_state_dict(), self.tokenizer)
        else:
            raise ValueError(f"unknown layout {layout!r}; use 'ldm' or 'diffusers'")


def load(path, *, dtype: torch.dtype = torch.float32, device="cpu", prediction_type: str | None = None,
         tokenizer=None) -> StableDiffusion:
    """Load an SD 1.x/2.x model from a single-file LDM checkpoint (.safetensors, .ckpt, .pt) or a
    diffusers folder, detecting the architecture (see :mod:`sdcore.checkpoint`).

    ``prediction_type`` ("epsilon" | "v_prediction" | "sample") overrides the folder's scheduler
    config; ``tokenizer`` (a CLIPTokenizer or a tokenizer folder) overrides the folder's tokenizer,
    or the default CLIP tokenizer for single files. Raises FileNotFoundError, or CheckpointError
    naming the file and the problem, before any model is built. The tokenizer must fit the text
    encoder: its ids below the encoder's vocab_size, its max_length at most the encoder's positions
    (a tokenizer folder without a model_max_length pads to min(77, positions)).
    """
    from .tokenizer import MAX_LENGTH, CLIPTokenizer

    _check_dtype(dtype)
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")
    device = torch.device(device)
    if device.type == "meta":  # it read every weight, then failed: "tensors left on meta"
        raise ValueError("device='meta' holds no weights, and load reads them; for a model without weights use "
                         "StableDiffusion.skeleton(config) (config: sdcore.SDConfig.preset(...) or detect_config)")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)) and not callable(tokenizer):
        raise TypeError(f"tokenizer must be a CLIPTokenizer (a callable from prompts to ids) or a tokenizer folder "
                        f"path, got {type(tokenizer).__name__} {tokenizer!r:.60}")
    source = checkpoint.open_checkpoint(path)
    config = source.config(prediction_type)
    length = min(MAX_LENGTH, config.text_encoder.max_length)  # when the tokenizer does not say
    tok_source = (tokenizer if isinstance(tokenizer, (str, Path)) else "the tokenizer argument" if tokenizer is not None
                  else source.tokenizer_folder or "the default CLIP tokenizer")
    if tokenizer is None and source.tokenizer_folder:
        tokenizer = _tokenizer_folder(source.tokenizer_folder, length)
    elif tokenizer is None:
        pad = config.text_encoder.pad_token  # the kind's ("!" or "<|endoftext|>"), unless sdcore's metadata says
        try:
            tokenizer = CLIPTokenizer.default_or_missing(pad_token=pad, max_length=length)
        except ValueError as e:  # a pad token the vocabulary lacks: only the metadata can give one
            raise CheckpointError(f"{source.path}: bad {checkpoint.CONFIG_KEY} metadata: text_encoder: pad_token "
                                  f"{pad!r} does not fit the default CLIP tokenizer ({e}); pass tokenizer= a "
                                  "tokenizer that has it") from e
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = _tokenizer_folder(Path(tokenizer), length)
    _check_tokenizer(tokenizer, config, tok_source, source.path)
    if getattr(tokenizer, "pad_token", config.text_encoder.pad_token) != config.text_encoder.pad_token:
        # The tokenizer is what pads; keep the config consistent with it.
        config = config.replace(text_encoder=config.text_encoder.replace(pad_token=tokenizer.pad_token))
    model = StableDiffusion.skeleton(config, tokenizer)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source.check_shapes(expected)
    shapes = checkpoint.drop_extras(source.shapes(), expected)
    # Optional keys some exporters leave out: buffers (e.g. position_ids) keep their built values; a
    # missing logit_scale (image-text logits only, unused by SD) takes CLIP's initial value.
    optional = {k for k in expected if k.endswith(checkpoint.OPTIONAL_KEYS) and k not in shapes}
    checkpoint.check_state_dict({k: v for k, v in expected.items() if k not in optional}, shapes, source.path)
    state = source.read(shapes.keys(), dtype, device)
    state.update({k: torch.tensor(LOGIT_SCALE_INIT, dtype=dtype, device=device) for k in optional
                  if k.endswith("logit_scale")})
    return model._adopt(state, dtype, device)


def _tokenizer_folder(folder: Path, length: int):
    from .tokenizer import CLIPTokenizer

    try:
        return CLIPTokenizer.from_folder(folder, default_max_length=length)
    except ValueError as e:  # the message names the folder or file
        raise CheckpointError(str(e)) from e


def _check_tokenizer(tokenizer, config: SDConfig, where, model_path) -> None:
    """The tokenizer's ids and length fit the text encoder, so a prompt cannot fail (or index
    out of range) at sampling time; and it has the token the text encoder pools at."""
    text = config.text_encoder
    max_id, max_length = getattr(tokenizer, "max_id", None), getattr(tokenizer, "max_length", None)
    if max_id is not None and max_id >= text.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has ids up to {max_id} ({max_id + 1} tokens, added ones included) but the "
            f"text encoder of {model_path} has a vocabulary of {text.vocab_size} (vocab_size); resize the text "
            "encoder's token embeddings to the tokenizer (e.g. after adding textual-inversion tokens)")
    if max_length is not None and max_length > text.max_length:
        raise CheckpointError(
            f"{where}: the tokenizer pads prompts to {max_length} tokens (max_length, a tokenizer folder's "
            f"model_max_length) but the text encoder of {model_path} has {text.max_length} positions "
            "(max_position_embeddings); the tokenizer's length must not exceed them")
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and text.eos_token_id != 2 and text.eos_token_id != eos:
        raise CheckpointError(
            f"{where}: the text encoder of {model_path} pools at token id {text.eos_token_id} (eos_token_id), "
            f"but the tokenizer's <|endoftext|> is id {eos}, so no prompt would have that token")


__all__ = ["CheckpointError", "StableDiffusion", "load"]
