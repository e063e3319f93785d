"""The switch reaches through sdcore and pipelines: whole pipelines with every op on `reference`
and with every op on `triton` (the interpreter on CPU) agree, and SDLAB_KERNELS / kernels.use change
which code runs, shown by the registry's dispatch counters.

The model is the `tiny` preset's structure with 4 GroupNorm groups instead of 32: the Triton
GroupNorm grid has at least one program per (sample, group) and the interpreter runs programs one
by one, so this keeps the triton runs to seconds while every kernel still runs for real."""
import pytest
import torch

import kernels
import pipelines
from kernels.testing import assert_close
from sdcore import SDConfig, StableDiffusion
from sdcore.schedulers import make_scheduler

OPS = ("attention", "group_norm_silu", "scheduler_step")
# fp32 through a whole pipeline: each op agrees with its reference to ~1e-6 relative, and the final
# latents differ by 0.8-1.3e-6 of their largest value (CFG x7.5, two steps); held to 1e-5.
LATENT_REL = 1e-5


def _config(in_channels: int) -> SDConfig:
    base = SDConfig.preset("tiny")
    return base.replace(name=f"tiny-g4-{in_channels}ch",
                        unet=base.unet.replace(norm_groups=4, in_channels=in_channels),
                        vae=base.vae.replace(norm_groups=4))


@pytest.fixture(scope="module")
def models():
    return {c: StableDiffusion.from_config(_config(c), seed=3) for c in (4, 9)}


@pytest.fixture(scope="module")
def image_and_mask():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 32, 32, generator=g)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 12:28] = 1.0  # repaint a rectangle off the centre
    return image, mask


CASES = {
    "txt2img": lambda m, img, mask: pipelines.txt2img(m[4], "a red bicycle", steps=2, seed=11, height=32,
                                                      width=32, progress=False),
    "repaint": lambda m, img, mask: pipelines.inpaint(m[4], img, mask, "a cat", variant="repaint", steps=2,
                                                      jump_length=1, jump_n_sample=2, seed=11,
                                                      progress=False),
    "unet9": lambda m, img, mask: pipelines.inpaint(m[9], img, mask, "a cat", variant="unet9", steps=2,
                                                    seed=11, progress=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_all_triton_matches_all_reference(case, models, image_and_mask):
    run = CASES[case]
    results = {}
    for backend in ("reference", "triton"):
        kernels.reset_counts()
        with kernels.use(backend):
            results[backend] = run(models, *image_and_mask)
        ran = kernels.counts()
        for op in OPS:  # every op ran, and only on the chosen backend
            assert ran.get((op, backend), 0) > 0, f"{case}: {op} never ran on {backend}: {ran}"
        assert all(b == backend for (_, b) in ran), f"{case} under use({backend!r}) ran {ran}"
    assert results["triton"].unet_calls == results["reference"].unet_calls
    assert_close(results["triton"].latents, results["reference"].latents, rel=LATENT_REL,
                 name=f"{case} latents, all-triton vs all-reference")


def test_env_var_switches_ops_in_the_unet(models, monkeypatch):
    m = models[4]
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, m.config.unet.context_dim, generator=torch.Generator().manual_seed(1))
    outs = {}
    for spec in ("attention=triton,group_norm_silu=reference", "attention=reference"):
        monkeypatch.setenv(kernels.ENV_VAR, spec)
        kernels.reset_counts()
        outs[spec] = m.unet(x, 500, ctx)
        ran = kernels.counts()
        want_attention = "triton" if "attention=triton" in spec else "reference"
        assert set(ran) == {("attention", want_attention), ("group_norm_silu", "reference")}, (spec, ran)
    assert_close(outs["attention=reference"], outs["attention=triton,group_norm_silu=reference"],
                 rel=1e-5, name="UNet output, attention triton vs reference")


def test_env_var_reaches_the_scheduler(monkeypatch):
    sched = make_scheduler("ddim", SDConfig.preset("tiny").scheduler)
    sched.set_timesteps(4)
    x, eps = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(2)).unbind(0)
    t = int(sched.timesteps[0])
    outs = {}
    for spec in ("triton", "scheduler_step=reference"):
        monkeypatch.setenv(kernels.ENV_VAR, spec)
        kernels.reset_counts()
        outs[spec] = sched.step(eps, t, x).prev_sample
        assert kernels.counts() == {("scheduler_step", spec.split("=")[-1]): 1}, (spec, kernels.counts())
    assert_close(outs["triton"], outs["scheduler_step=reference"], rel=1e-6, name="DDIM step")
