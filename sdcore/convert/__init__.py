"""Layout conversions between our (= original LDM) module names and diffusers', derived by rules.

One module per model: :mod:`.unet`, :mod:`.vae`, :mod:`.clip`. Each provides
``diffusers_to_ldm(state_dict, config)``, ``ldm_to_diffusers(state_dict, config)`` (keys without
the single-file prefix), ``config_from_diffusers(config_json)`` and ``config_to_diffusers(config)``.
The ``config_*`` readers here check a config.json's numbers, so a bad value (a string, null, unequal
per-block values) is a ValueError naming the option, which the folder loader prefixes with the file.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MISSING = object()


def config_int(config: Mapping[str, Any], key: str, default: Any = _MISSING, *, minimum: int = 1,
               blocks: int | None = None) -> int:
    """``config[key]`` (or ``default``) as an int >= ``minimum``; ValueError naming the option
    otherwise (a string, null, a float, a bool). ``blocks``: diffusers also takes one value per
    block (a list of that length); sdcore's models have one value for all, so a list of equal values
    stands for it and unequal ones are refused."""
    value = config.get(key, default)
    if value is _MISSING:
        raise ValueError(f"{key} is missing")
    per_block = blocks is not None
    if per_block and isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise ValueError(f"{key}={value!r} must have one value per block ({blocks}), as in diffusers")
        if len(set(map(repr, value))) != 1:
            raise ValueError(f"{key}={value!r}: one value per block is not supported by sdcore's models; "
                             "all blocks must have the same value")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}{' (or a list of equal ones)' if per_block else ''}, "
                         f"got {value!r}")
    return value


def config_bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """``config[key]`` as a bool, ``default`` when absent or null (diffusers' own checkpoint converter
    writes ``"upcast_attention": null``, which its models read as false); ValueError naming the
    option for anything else (a string "false" would read as true)."""
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def config_float(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> float:
    """``config[key]`` (or ``default``) as a finite float > 0; ValueError naming the option otherwise."""
    value = config.get(key, default)
    if value is _MISSING:
        raise ValueError(f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def config_channels(config: Mapping[str, Any], key: str, default: Any) -> list[int]:
    """A non-empty list of positive ints (``block_out_channels``)."""
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in value):
        raise ValueError(f"{key} must be a non-empty list of positive integers, got {value!r}")
    return list(value)


def check_groups(groups: int, channels, key: str = "norm_num_groups") -> None:
    """GroupNorm needs every channel count to be a multiple of its groups."""
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{key}={groups} does not divide the channel count {bad[0]} (block_out_channels "
                         f"{list(channels)}); GroupNorm needs channels divisible by its groups")
