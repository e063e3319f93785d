"""Layers shared by the VAE, UNet and text encoder, routed through ``kernels``.

Every GroupNorm(+SiLU) and every softmax attention in sdcore goes through these, so switching a
backend in :mod:`kernels` changes the code that runs in every model without touching them.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.registry import autocast_dtype


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same state-dict keys) with an optional fused SiLU.

    ``GroupNorm(32, C, act="silu")`` computes silu(groupnorm(x)) in one kernel. Where the LDM
    module had ``nn.Sequential(GroupNorm, SiLU, ...)``, keep an ``nn.Identity()`` in the SiLU slot
    so the indices, and thus the checkpoint keys, stay the same.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: str | None = None):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act}" if self.act else "")


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         causal: bool = False) -> torch.Tensor:
    """(B, Lq, H·D), (B, Lkv, H·D) x2 -> (B, Lq, H·D): softmax(q kᵀ / √D) v per head
    (``causal``: query i sees keys j <= i, as in the CLIP text encoder).

    The (B, L, H, D) -> (B, H, L, D) split is a view (no copy); the kernel takes any strides.
    """
    b, lq, c = q.shape
    d = c // heads
    split = lambda t: t.unflatten(-1, (heads, d)).transpose(1, 2)  # noqa: E731
    out = kernels.attention(split(q), split(k), split(v), causal=causal)
    return out.transpose(1, 2).reshape(b, lq, c)


def takes_dtype(t: torch.Tensor, model_dtype: torch.dtype) -> bool:
    """Whether a model with ``model_dtype`` weights takes ``t``: the same dtype, or, under
    ``torch.autocast`` on t's device, any floating dtype but fp64: the model's first convolution or
    matmul casts it to autocast's dtype (as diffusers' models take fp32 images under autocast).
    Autocast leaves fp64 alone, so an fp64 model takes fp64 only, and takes no fp64 input."""
    if t.dtype == model_dtype:
        return True
    return (autocast_dtype(t.device.type) is not None and model_dtype != torch.float64
            and t.is_floating_point() and t.dtype != torch.float64)


def autocast_note(t: torch.Tensor) -> str:
    """For an error message: " (or autocast's <dtype>)" when autocast is on for t's device."""
    dt = autocast_dtype(t.device.type)
    return f" (or autocast's {dt})" if dt is not None else ""


def randn(shape, generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) of ``shape`` on ``device``, drawn on the generator's device (``device`` if None) and
    moved, as diffusers' ``randn_tensor``: a CPU generator gives the same numbers for any device.
    A CPU draw bound for a GPU goes through pinned memory without blocking: a copy from pageable
    memory waits for the stream to drain, which would be a host sync in every sampling step. (Not
    while a CUDA graph is captured: a replay would copy whatever the reused pinned buffer holds.)"""
    device = torch.device(device)
    eps = torch.randn(shape, generator=generator, device=device if generator is None else generator.device,
                      dtype=dtype)
    if eps.device.type == "cpu" and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return eps.pin_memory().to(device, non_blocking=True)
    return eps.to(device)
