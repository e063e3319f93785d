"""Attention softmax(q kᵀ · scale) v, non-causal, (B, H, L, D).

Reference and SDPA only for now; the Triton kernel lands in this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Backend, dispatch, register


@register("attention", Backend.REFERENCE)
def attention_reference(q, k, v, scale=None):
    """Plain torch, materialising the (Lq, Lkv) score matrix; softmax in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)


@register("attention", Backend.SDPA)
def attention_sdpa(q, k, v, scale=None):
    """torch's fused ``scaled_dot_product_attention`` (it picks flash / mem-efficient / cuDNN / math)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q, k, v, scale=None):
    """softmax(q kᵀ · scale) v over the last two dims; q: (B, H, Lq, D), k, v: (B, H, Lkv, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    return dispatch("attention", q, k, v, scale)
