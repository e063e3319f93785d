"""The Triton functions called directly, past the switch (``attention_triton(..., config=)``, the
way README shows to pass ``out=`` and ``config=``), and what their ``out=`` writes tell autograd.

Called directly they make the op's argument checks and the backend's own check, as an explicit
choice of the backend through the switch does. They made neither: a k/v of another batch size read
past the end of k and v, C not divisible by groups left the last channels unwritten (uninitialised
memory), no keys gave NaN, fp64 ran where the check refuses it. And a write into ``out=`` through
the kernel's pointer is an in-place write to autograd: a tensor saved for backward that is then
overwritten raises at backward, as torch's own in-place ops make it raise, instead of computing a
gradient from the new values."""
import sys

import pytest
import torch

import kernels
from kernels.testing import TOLERANCES, assert_close

attention_module = sys.modules["kernels.attention"]  # kernels.attention is the op
gn_module = sys.modules["kernels.group_norm_silu"]
step_module = sys.modules["kernels.scheduler_step"]
STEP = kernels.StepCoefficients(a_x=1.0, a_o=-0.5, c0=0.7, c1=0.3)
STEP_REL = TOLERANCES["scheduler_step"][torch.float32]["rel"]  # the reference's formula, one rounding apart


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=dtype).to(device)


BAD_CALLS = {  # id: (the call on a device, the error, what it must say)
    "attention k/v of another batch": (
        lambda d: attention_module.attention_triton(_t(2, 2, 5, 16, device=d), _t(1, 2, 5, 16, device=d),
                                                    _t(1, 2, 5, 16, device=d)),
        ValueError, r"attention shape mismatch: q\(2, 2, 5, 16\) k\(1, 2, 5, 16\)"),
    "attention no keys": (
        lambda d: attention_module.attention_triton(_t(1, 2, 5, 16, device=d), _t(1, 2, 0, 16, device=d),
                                                    _t(1, 2, 0, 16, device=d)),
        kernels.BackendUnsupported, r"'triton' \(called directly\).*no keys \(Lkv = 0\)"),
    "attention head dim 12": (
        lambda d: attention_module.attention_triton(*(_t(1, 2, 5, 12, device=d) for _ in range(3))),
        kernels.BackendUnsupported, "head dim 12 is not a multiple of 8"),
    "group_norm_silu groups not dividing C": (
        lambda d: gn_module.group_norm_silu_triton(_t(2, 8, 3, 3, device=d), None, None, 3),
        ValueError, r"8 channels of x\(2, 8, 3, 3\) not divisible by groups=3"),
    "group_norm_silu one element per group at batch 1": (  # the reference raised torch's words, triton gave the bias
        lambda d: gn_module.group_norm_silu_triton(_t(1, 8, device=d), None, None, 8),
        ValueError, r"x\(1, 8\) with groups=8 has one element per group at batch 1"),
    "group_norm_silu float64": (
        lambda d: gn_module.group_norm_silu_triton(_t(2, 8, 3, 3, dtype=torch.float64, device=d), None, None, 4),
        kernels.BackendUnsupported, r"'triton' \(called directly\).*dtype torch.float64"),
    "scheduler_step guidance without uncond": (
        lambda d: step_module.scheduler_step_triton(_t(1, 4, 3, 5, device=d), _t(1, 4, 3, 5, device=d), STEP,
                                                    guidance_scale=7.5),
        ValueError, "guidance_scale=7.5 needs model_output_uncond"),
    "scheduler_step model output of another shape": (
        lambda d: step_module.scheduler_step_triton(_t(1, 4, 3, 5, device=d), _t(1, 4, 3, 4, device=d), STEP),
        ValueError, r"model_output\(1, 4, 3, 4\) must have x's shape"),
    "scheduler_step float64": (
        lambda d: step_module.scheduler_step_triton(_t(1, 4, 3, 5, dtype=torch.float64, device=d),
                                                    _t(1, 4, 3, 5, dtype=torch.float64, device=d), STEP),
        kernels.BackendUnsupported, r"'triton' \(called directly\).*x dtype torch.float64"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_direct_call_refuses_what_the_switch_refuses(case, device):
    call, error, match = BAD_CALLS[case]
    with pytest.raises(error, match=match):
        call(device)


def _writes_into_out(op, device):
    """A function writing op's Triton result into ``out`` (a (2, 2, 9, 16) tensor) in place."""
    x = _t(2, 2, 9, 16, device=device)
    if op == "attention":
        return lambda out: attention_module.attention_triton(x, x * 0.5, x * 2.0, out=out)
    if op == "group_norm_silu":
        return lambda out: gn_module.group_norm_silu_triton(x, None, None, 2, out=out)
    return lambda out: step_module.scheduler_step_triton(x, x * 0.5, STEP, out=out)


@pytest.mark.parametrize("op", ["attention", "group_norm_silu", "scheduler_step"])
def test_out_written_after_it_was_saved_for_backward_raises_at_backward(op, device):
    a = torch.randn(2, 2, 9, 16, device=device, requires_grad=True)
    buf = torch.randn(2, 2, 9, 16, device=device)
    y = a * buf  # autograd saves buf for a's gradient
    _writes_into_out(op, device)(buf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("op", ["attention", "scheduler_step"])
def test_out_in_a_graph_is_refused_where_the_write_cannot_be_recorded(op, device):
    """attention_triton(out=) and the Triton step record no autograd: an out that requires grad (a
    view of a tensor with history) would keep passing its overwritten values' old gradient. It is
    refused under grad mode (group_norm_silu records the write: see its tests) and taken under
    no_grad, where torch's own in-place ops take it too."""
    z = torch.randn(2, 2, 9, 16, device=device, requires_grad=True)
    error, match = ((ValueError, "does not record autograd") if op == "attention"
                    else (kernels.BackendUnsupported, "out or out_x0 requires grad"))
    with pytest.raises(error, match=match):
        _writes_into_out(op, device)(z * 1.0)
    with torch.no_grad():
        buf = z * 1.0
        _writes_into_out(op, device)(buf)
    assert buf._version > 0


def test_out_x0_that_is_not_written_is_not_refused(device):
    """out_x0 is written only when return_x0: unwritten, it may be in a graph or non-contiguous (the
    reference ignores it; the Triton check refused a non-contiguous one)."""
    x = _t(1, 4, 3, 5, device=device)
    z = torch.randn(1, 4, 3, 5, device=device, requires_grad=True)
    strided = torch.empty(1, 4, 5, 3, device=device).transpose(2, 3)
    want, _ = kernels.scheduler_step_reference(x, x * 0.5, STEP)
    for out_x0 in (z * 1.0, strided):
        prev, x0 = step_module.scheduler_step_triton(x, x * 0.5, STEP, out_x0=out_x0)
        assert x0 is None
        assert_close(prev, want, rel=STEP_REL, name="prev")  # one rounding apart on a GPU (FMA contraction)


def test_direct_calls_with_out_and_config_give_the_references_values(device):
    """The public functions, past their checks, with the arguments only they take (out=, config=)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 40, generator=g).to(device) for n in (19, 77, 77))
    out = torch.full_like(q, float("nan"))
    got = attention_module.attention_triton(q, k, v, out=out, config=attention_module.AttentionConfig(16, 16, 1, 2))
    assert got is out
    assert_close(got, kernels.attention_reference(*(t.double() for t in (q, k, v))), rel=2e-5, name="attention")
    x = torch.randn(2, 12, 5, 3, generator=g).to(device)
    w, b = torch.randn(12, generator=g).to(device), torch.randn(12, generator=g).to(device)
    out = torch.full_like(x, float("nan"))
    config = gn_module.launch_config(tuple(x.shape), 4, x.dtype, gn_module.INTERPRETER_SMS, single_pass=False)
    got = gn_module.group_norm_silu_triton(x, w, b, 4, out=out, config=config)
    assert got is out
    assert_close(got, kernels.group_norm_silu_reference(x.double(), w.double(), b.double(), 4), rel=1e-5,
                 name="group_norm_silu")
    out = torch.full_like(x, float("nan"))
    prev, _ = step_module.scheduler_step_triton(x, x * 0.5, STEP, out=out)
    assert prev is out
    assert_close(prev, kernels.scheduler_step_reference(x, x * 0.5, STEP)[0], rel=STEP_REL, name="scheduler_step")
