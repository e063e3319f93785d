"""Fused Triton kernels for Stable Diffusion, each switchable against its torch reference.

    import kernels
    y = kernels.group_norm_silu(x, weight, bias, groups=32)
    with kernels.use(attention="triton"):
        o = kernels.attention(q, k, v)
    print(kernels.describe())

A variant of your own registers next to the built-in backends and is switched the same way:

    @kernels.register("attention", "my_attention")
    def my_attention(q, k, v, scale=None, causal=False): ...

See :mod:`kernels.registry` for how a backend is chosen, :func:`load_plugin` for loading such
variants from a file, and :mod:`kernels.testing` for the equivalence cases every backend is held to.
"""
from .registry import (
    CHAIN_SEP,
    ENV_VAR,
    PROFILER_RANGE,
    Backend,
    BackendUnsupported,
    all_backends,
    backends,
    counts,
    describe,
    dispatch,
    implementation,
    load_plugin,
    ops,
    register,
    reset_counts,
    resolve,
    set_backend,
    unload_plugin,
    unregister,
    use,
    validate,
)
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .attention import attention, attention_reference
from .scheduler_step import StepCoefficients, scheduler_step, scheduler_step_reference

__all__ = [
    "CHAIN_SEP", "ENV_VAR", "PROFILER_RANGE", "Backend", "BackendUnsupported", "all_backends", "attention",
    "attention_reference",
    "backends", "counts", "describe", "dispatch", "group_norm_silu", "group_norm_silu_reference",
    "implementation", "load_plugin", "ops", "register", "reset_counts", "resolve", "set_backend", "unload_plugin",
    "unregister", "use", "validate",
    "StepCoefficients", "scheduler_step", "scheduler_step_reference",
]
