"""GroupNorm with an optional fused SiLU: y = silu(groupnorm(x) * weight + bias).

Reference only for now; the Triton kernel lands in this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Backend, dispatch, register


@register("group_norm_silu", Backend.REFERENCE)
def group_norm_silu_reference(x, weight, bias, groups, eps=1e-5, activation="silu"):
    """Plain torch: ``F.group_norm`` then ``F.silu`` (statistics in x's dtype, as torch does)."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def group_norm_silu(x, weight, bias, groups, eps=1e-5, activation="silu"):
    """GroupNorm over (C/groups, H, W) per sample, affine, then SiLU when ``activation="silu"``.

    x: (N, C, *spatial), NCHW or channels_last; weight, bias: (C,) or None.
    """
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"group_norm_silu: channels {tuple(x.shape)[1:2]} of x{tuple(x.shape)} not divisible by groups={groups}")
    return dispatch("group_norm_silu", x, weight, bias, groups, eps, activation)
