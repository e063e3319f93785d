"""Comparison helpers whose failures explain themselves (max abs/rel error and where)."""
from __future__ import annotations

import torch


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def describe_diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (f"shape {tuple(a.shape)}: max abs err {diff.max().item():.3e} at {idx} "
            f"(got {a[idx].item():.6g}, want {e[idx].item():.6g}); max rel err {max_rel_err(a, e):.3e}; "
            f"nan in result: {bool(torch.isnan(a).any())}")


def assert_close(actual, expected, *, rtol: float = 0.0, atol: float = 0.0, rel: float | None = None,
                 name: str = "tensor") -> None:
    """Elementwise |a - e| <= atol + rtol |e|, or (with ``rel``) max-normalised relative error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{name}: NaN in result. " + describe_diff(a, e)
    if rel is not None:
        err = max_rel_err(a, e)
        assert err <= rel, f"{name}: max rel err {err:.3e} > {rel:.1e}. " + describe_diff(a, e)
    else:
        ok = (a - e).abs() <= atol + rtol * e.abs()
        assert bool(ok.all()), (f"{name}: {int((~ok).sum())} of {ok.numel()} elements outside "
                                f"atol={atol:.1e} rtol={rtol:.1e}. " + describe_diff(a, e))


def assert_within_torch_error(kernel_out, torch_out, reference, *, factor: float = 2.0,
                              atol: float = 1e-3, name: str = "tensor") -> None:
    """flash-attention's rule for half precision: the kernel's error against a high-precision
    reference is at most ``factor`` x the error of the plain torch op in the same dtype, + atol."""
    ref = reference.detach().double().cpu()
    k_err = (kernel_out.detach().double().cpu() - ref).abs().max().item()
    t_err = (torch_out.detach().double().cpu() - ref).abs().max().item()
    assert k_err <= factor * t_err + atol, (
        f"{name}: kernel max abs err {k_err:.3e} > {factor} x torch's {t_err:.3e} + {atol:.1e}. "
        + describe_diff(kernel_out, reference))
