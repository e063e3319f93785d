"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", sec. 2.4): token + learned position embeddings, pre-LayerNorm blocks with
causal self-attention and an MLP, a final LayerNorm; the pooled text feature is the final-LN
hidden state at the EOS token, times ``text_projection`` where the model has one (OpenCLIP's).

    x_0 = E_tok[ids] + E_pos
    x_l = x_{l-1} + Attn_causal(LN1(x_{l-1}));  x_l = x_l + W2 act(W1 LN2(x_l))   (l = 1..L)
    hidden(clip_skip) = LN_final(x_{L - clip_skip + 1})       # SD 1.x: clip_skip 1, SD 2.x: 2

One transformer, two checkpoint namings (``cfg.kind``), so single files load with ``strict=True``
after stripping ``cond_stage_model.``:

* ``"clip"`` (SD 1.x, OpenAI ViT-L/14 as transformers' ``CLIPTextModel``):
  ``transformer.text_model.embeddings.{token,position}_embedding``,
  ``transformer.text_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
  mlp.fc1, mlp.fc2}``, ``transformer.text_model.final_layer_norm``. No projection head.
* ``"openclip"`` (SD 2.x, OpenCLIP ViT-H/14): ``model.token_embedding``, ``model.positional_embedding``,
  ``model.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight/in_proj_bias, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``model.ln_final``, ``model.text_projection`` (width, projection_dim),
  used as ``x @ P``) and ``model.logit_scale``. ``projection_dim=0`` means no projection head (and
  no logit_scale), as in a diffusers ``text_encoder/`` folder, which stores neither.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig
from .layers import multi_head_attention

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021 §2.5), OpenCLIP's too

__all__ = ["TextEncoder", "TextEncoderOutput", "causal_self_attention", "activation"]


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """``quick_gelu``: x·σ(1.702x) (OpenAI CLIP); ``gelu``: exact x·Φ(x) (OpenCLIP ViT-H)."""
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown activation {act!r}; expected 'quick_gelu' or 'gelu'")


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·D) x3 -> (B, L, H·D): softmax(q kᵀ / √D + M) v per head, M_ij = -inf for j > i
    (CLIP's causal mask, Radford et al. 2021), through :func:`kernels.attention`."""
    return multi_head_attention(q, k, v, heads, causal=True)


# --- one block, two namings -------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-LN residual block; subclasses only name the parameters (``ln1``/``ln2``/``qkv``/
    ``attn_out``/``fc_in``/``fc_out`` say which module is which)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads, self.act = cfg.heads, cfg.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x))
        x = x + self.attn_out(causal_self_attention(q, k, v, self.heads))
        return x + self.fc_out(activation(self.fc_in(self.ln2(x)), self.act))


class _HFAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))


class _HFMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)


class HFCLIPBlock(_Block):
    """transformers' ``CLIPEncoderLayer`` naming (SD 1.x)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg)
        self.self_attn = _HFAttention(cfg.width)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _HFMLP(cfg.width, cfg.intermediate)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def ln1(self, x): return self.layer_norm1(x)  # noqa: E704
    def ln2(self, x): return self.layer_norm2(x)  # noqa: E704
    def attn_out(self, x): return self.self_attn.out_proj(x)  # noqa: E704
    def fc_in(self, x): return self.mlp.fc1(x)  # noqa: E704
    def fc_out(self, x): return self.mlp.fc2(x)  # noqa: E704

    def qkv(self, x):
        a = self.self_attn
        return a.q_proj(x), a.k_proj(x), a.v_proj(x)


class _OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter names: packed (3·width, width) q/k/v projection."""

    def __init__(self, width: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)


class OpenCLIPBlock(_Block):
    """OpenCLIP's ``ResidualAttentionBlock`` naming (SD 2.x)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = _OpenCLIPAttention(cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _OpenCLIPMLP(cfg.width, cfg.intermediate)

    def ln1(self, x): return self.ln_1(x)  # noqa: E704
    def ln2(self, x): return self.ln_2(x)  # noqa: E704
    def attn_out(self, x): return self.attn.out_proj(x)  # noqa: E704
    def fc_in(self, x): return self.mlp.c_fc(x)  # noqa: E704
    def fc_out(self, x): return self.mlp.c_proj(x)  # noqa: E704

    def qkv(self, x):
        return F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)


# --- the two module trees: names only, the math lives in TextEncoder -----------------------------
class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        # Some SD 1.x files carry transformers' old `position_ids` buffer (just arange(77)): ignore it.
        self.register_load_state_dict_pre_hook(_drop_position_ids)


def _drop_position_ids(module, state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "position_ids", None)


class _HFEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(HFCLIPBlock(cfg) for _ in range(cfg.layers))


class _HFTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg)
        self.encoder = _HFEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class HFCLIPText(nn.Module):
    """``transformer.text_model.*`` (transformers' CLIPTextModel inside LDM's FrozenCLIPEmbedder)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = _HFTextModel(cfg)

    def embed(self, ids):
        e = self.text_model.embeddings
        return e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]

    @property
    def blocks(self): return self.text_model.encoder.layers  # noqa: E704
    @property
    def final_norm(self): return self.text_model.final_layer_norm  # noqa: E704
    @property
    def projection(self): return None  # noqa: E704


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenCLIPBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPText(nn.Module):
    """``model.*`` (open_clip's text tower inside LDM's FrozenOpenCLIPEmbedder, visual deleted)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.01)
        self.transformer = _OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim > 0:
            self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.projection_dim) * cfg.width ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))  # image-text logits only

    def embed(self, ids):
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    @property
    def blocks(self): return self.transformer.resblocks  # noqa: E704
    @property
    def final_norm(self): return self.ln_final  # noqa: E704
    @property
    def projection(self): return getattr(self, "text_projection", None)  # noqa: E704


class TextEncoderOutput(NamedTuple):
    hidden_states: torch.Tensor  # (B, T, width), T tokens (77): final LN of layer L - clip_skip + 1
    pooled: torch.Tensor  # (B, projection_dim or width): final LN of layer L at EOS, @ text_projection (openclip)


class TextEncoder(nn.Module):
    """CLIP text encoder: ``TextEncoder(cfg)(ids)`` -> (B, T = 77, width) context for the UNet."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "clip":
            self.transformer = HFCLIPText(cfg)
        elif cfg.kind == "openclip":
            self.model = OpenCLIPText(cfg)
        else:
            raise ValueError(f"unknown text encoder kind {cfg.kind!r}; expected 'clip' or 'openclip'")
        if cfg.heads <= 0 or cfg.width % cfg.heads:  # as transformers' CLIPAttention refuses it
            raise ValueError(f"text encoder width (hidden_size) {cfg.width} is not divisible by its "
                             f"{cfg.heads} attention heads (num_attention_heads)")
        activation(torch.zeros(()), cfg.act)  # fail at construction on an unknown activation

    @property
    def tower(self) -> HFCLIPText | OpenCLIPText:
        return self.transformer if self.cfg.kind == "clip" else self.model

    def _check(self, ids: torch.Tensor, clip_skip: int | None) -> int:
        cfg = self.cfg
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"ids must be an integer tensor (torch.long) of token ids, got {got}")
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= cfg.max_length:
            # Any length up to the position table, as in transformers; the tokenizer pads to its max_length.
            raise ValueError(f"ids must have shape (batch, T) with 1 <= T <= {cfg.max_length} (the text "
                             f"encoder's position embeddings), got {tuple(ids.shape)}; a tokenizer must pad "
                             f"to at most {cfg.max_length} (CLIPTokenizer's max_length, a tokenizer folder's "
                             "model_max_length)")
        if ids.shape[0] == 0:
            raise ValueError(f"ids{tuple(ids.shape)} hold no prompt (batch 0)")
        lo, hi = (0, 0) if ids.is_meta else (int(ids.min()), int(ids.max()))  # one host sync per prompt batch
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
        clip_skip = cfg.clip_skip if clip_skip is None else clip_skip
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral):
            raise TypeError(f"clip_skip must be an int (a layer count: 1 = last layer), got "
                            f"{type(clip_skip).__name__} {clip_skip!r}")
        clip_skip = int(clip_skip)
        if not 1 <= clip_skip <= cfg.layers:
            raise ValueError(f"clip_skip must be in [1, {cfg.layers}] (1 = last layer), got {clip_skip}")
        return clip_skip

    def _run(self, ids: torch.Tensor, n_layers: int) -> torch.Tensor:
        x = self.tower.embed(ids)
        for block in self.tower.blocks[:n_layers]:
            x = block(x)
        return x

    def forward(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, width), T <= max_length (77): final LN of the output of layer
        L - (clip_skip - 1).

        ``clip_skip`` (default ``cfg.clip_skip``): 1 = last layer (SD 1.x), 2 = penultimate (SD 2.x).
        Layers after the output layer are not run.
        """
        clip_skip = self._check(ids, clip_skip)
        return self.tower.final_norm(self._run(ids, self.cfg.layers - clip_skip + 1))

    def pool(self, last_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pooled text feature: ``last_hidden`` (final LN of the LAST layer) at the EOS position,
        @ text_projection where the model has one.

        The position is transformers' CLIPTextTransformer's: with ``cfg.eos_token_id == 2`` (legacy
        configs, and our presets: OpenAI CLIP and OpenCLIP pool so) ``ids.argmax(-1)``, the first
        highest id, which is the first <|endoftext|> = 49407 unless an added token (id > 49407,
        e.g. textual inversion) precedes it; otherwise the first position where ids == eos_token_id,
        which added tokens do not move. A row without that token pools at its highest id (argmax)
        or at position 0 (no match), as transformers does.
        """
        eos = self.cfg.eos_token_id
        where = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
        pooled = last_hidden[torch.arange(ids.shape[0], device=ids.device), where]
        proj = self.tower.projection
        return pooled if proj is None else pooled @ proj

    def encode(self, ids: torch.Tensor, clip_skip: int | None = None) -> TextEncoderOutput:
        """Hidden states at ``clip_skip`` and the pooled feature (from the last layer), in one pass."""
        clip_skip = self._check(ids, clip_skip)
        norm, out_layer = self.tower.final_norm, self.cfg.layers - clip_skip + 1
        x = self.tower.embed(ids)
        hidden = None
        for i, block in enumerate(self.tower.blocks, start=1):
            x = block(x)
            if i == out_layer:
                hidden = norm(x)
        last = norm(x) if out_layer != self.cfg.layers else hidden
        return TextEncoderOutput(hidden, self.pool(last, ids))
