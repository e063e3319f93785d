"""Fused Triton kernels for Stable Diffusion, each switchable against its torch reference.

    import kernels
    y = kernels.group_norm_silu(x, weight, bias, groups=32)
    with kernels.use(attention="triton"):
        o = kernels.attention(q, k, v)
    print(kernels.describe())

See :mod:`kernels.registry` for how a backend is chosen.
"""
from .registry import (
    ENV_VAR,
    Backend,
    BackendUnsupported,
    backends,
    counts,
    describe,
    dispatch,
    implementation,
    ops,
    register,
    reset_counts,
    resolve,
    set_backend,
    use,
)
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .attention import attention, attention_reference
from .scheduler_step import StepCoefficients, scheduler_step, scheduler_step_reference

__all__ = [
    "ENV_VAR", "Backend", "BackendUnsupported", "attention", "attention_reference", "backends",
    "counts", "describe", "dispatch", "group_norm_silu", "group_norm_silu_reference",
    "implementation", "ops", "register", "reset_counts", "resolve", "set_backend", "use",
    "StepCoefficients", "scheduler_step", "scheduler_step_reference",
]
