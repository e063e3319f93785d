"""sdcore.schedulers against diffusers (the oracle): timesteps, every step, 50-step trajectories,
add_noise, RePaint's timestep sequence, and the error messages. All fp32 on the CPU, reference
backend of kernels.scheduler_step (the conftest default without CUDA)."""
import contextlib
import re
import sys
from unittest import mock

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdcore.config import SchedulerConfig  # noqa: E402
from sdcore.schedulers import make_scheduler, repaint_timesteps  # noqa: E402
from kernels.testing import assert_close, max_rel_err  # noqa: E402

SHAPE = (2, 4, 8, 8)  # small SD-like latent: 4 channels, batch 2
REL = 1e-6  # fp32: the same formulas with the same float32 coefficients
STEPS = 50


def diffusers_scheduler(name: str, cfg: SchedulerConfig):
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                  beta_schedule="squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing,
                  steps_offset=cfg.steps_offset)
    clip = dict(clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range)
    if name == "ddpm":
        return diffusers.DDPMScheduler(**common, **clip)
    if name == "ddim":
        return diffusers.DDIMScheduler(**common, **clip, set_alpha_to_one=cfg.set_alpha_to_one)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    return diffusers.DPMSolverMultistepScheduler(**common)  # SD defaults: dpmsolver++, solver_order 2


def fake_model(seed=0):
    """A fixed random 1x1 channel mix near the identity plus a t-dependent offset: deterministic,
    cheap, and output magnitudes like a UNet's on unit-variance input."""
    g = torch.Generator().manual_seed(seed)
    w = 0.8 * torch.eye(SHAPE[1]) + 0.1 * torch.randn(SHAPE[1], SHAPE[1], generator=g)

    def model(x, t):
        return torch.einsum("oc,bchw->bohw", w.to(x.dtype), x) + 0.05 * float(t) / 1000.0

    return model


@contextlib.contextmanager
def fp64_truth(name, cfg, steps):
    """diffusers' scheduler computing in float64: its float32 tables (ᾱ, σ, ...) widened after
    set_timesteps, so each coefficient is exact for them, and its step noise drawn in float32 and
    widened, so that it sees what the float32 runs draw from the same seed. Not all of it: euler_a and
    dpmpp_2m cast the sample to float32 inside step(), so their terms in the sample alone (x/(σ²+1) of
    a v-prediction's x0, (σ_t/σ_s)·x) stay fp32, and the free trajectory is rounded to fp32 each step:
    up to 2.7e-7 from a scheduler kept in float64 throughout (euler_a's v-prediction x0), a quarter of
    REL. ddpm and ddim are float64 throughout. Two float32 runs that round
    a coefficient apart drift apart over 50 steps by more than either is from this truth: by up to
    2.2e-6 where each was within 1.8e-6 of it, on an AVX2 CPU. diffusers takes √ᾱ as torch's
    pow(ᾱ, 0.5), which is not correctly rounded, and where depends on the CPU: it differs from sqrt
    at 182 of SD's 1000 ᾱ under AVX2 kernels, at 191 under the default ones."""
    ref = diffusers_scheduler(name, cfg)
    ref.set_timesteps(steps)
    for key, value in list(vars(ref).items()):
        if torch.is_tensor(value) and value.is_floating_point() and key != "timesteps":
            setattr(ref, key, value.double())

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return draw(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)

    module = sys.modules[type(ref).__module__]
    draw = getattr(module, "randn_tensor", None)
    with mock.patch.object(module, "randn_tensor", randn_tensor) if draw else contextlib.nullcontext():
        yield ref


def assert_near_truth(got, theirs, truth, name):
    """Ours within REL of the float64 truth, or no further from it than twice diffusers' float32."""
    err = max_rel_err(theirs, truth)
    assert_close(got, truth, rel=max(REL, 2 * err), name=f"{name} vs fp64 (diffusers' fp32: {err:.2e})")


def run_against_diffusers(name, cfg, steps=STEPS, **opts):
    """Lockstep: our step, diffusers' float32 one and its float64 truth (fp64_truth) on diffusers'
    float32 sample. Free: our own trajectory against the truth's. Each within REL of the truth, or
    twice diffusers' float32 distance from it (assert_near_truth)."""
    ref, lock, free = diffusers_scheduler(name, cfg), make_scheduler(name, cfg, **opts), make_scheduler(name, cfg, **opts)
    for s in (ref, lock, free):
        s.set_timesteps(steps)
    assert torch.equal(lock.timesteps, ref.timesteps.to(lock.timesteps.dtype)), (lock.timesteps, ref.timesteps)
    assert lock.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    model = fake_model()
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * float(ref.init_noise_sigma)
    x_free, x_64 = x_ref.clone(), x_ref.double()
    g_ref, g_lock, g_free, g_lock64, g_free64 = (torch.Generator().manual_seed(2) for _ in range(5))
    step_kw = {"eta": opts["eta"]} if "eta" in opts else {}
    with fp64_truth(name, cfg, steps) as lock64, fp64_truth(name, cfg, steps) as free64:
        for i, t in enumerate(ref.timesteps):
            inp = ref.scale_model_input(x_ref, t)
            assert_close(lock.scale_model_input(x_ref, t), inp, rel=REL, name=f"scale_model_input step {i}")
            out_ref = ref.step(model(inp, t), t, x_ref, generator=g_ref, **step_kw)
            x64 = x_ref.double()
            out_64 = lock64.step(model(lock64.scale_model_input(x64, t), t), t, x64, generator=g_lock64, **step_kw)
            out = lock.step(model(lock.scale_model_input(x_ref, t), t), t, x_ref, generator=g_lock)
            what = f"{name} step {i} t={float(t)}"
            assert_near_truth(out.prev_sample, out_ref.prev_sample, out_64.prev_sample, f"{what} prev_sample")
            x0_ref = getattr(out_ref, "pred_original_sample", None)
            if x0_ref is not None:
                assert_near_truth(out.pred_original_sample, x0_ref, out_64.pred_original_sample, f"{what} x0")
            x_free = free.step(model(free.scale_model_input(x_free, t), t), t, x_free, generator=g_free).prev_sample
            x_64 = free64.step(model(free64.scale_model_input(x_64, t), t), t, x_64, generator=g_free64,
                               **step_kw).prev_sample
            x_ref = out_ref.prev_sample
    assert_near_truth(x_free, x_ref, x_64, f"{name} {steps}-step trajectory")


BETAS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 0.7}),
                                       ("euler_a", {}), ("dpmpp_2m", {})],
                         ids=["ddpm", "ddim-eta0", "ddim-eta0.7", "euler_a", "dpmpp_2m"])
def test_matches_diffusers(name, opts, beta, prediction, spacing):
    cfg = SchedulerConfig(beta_schedule=beta, prediction_type=prediction, timestep_spacing=spacing)
    run_against_diffusers(name, cfg, **opts)


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("dpmpp_2m", {})],
                         ids=["ddpm", "ddim-eta0", "ddim-eta1", "dpmpp_2m"])
def test_sample_prediction_and_clipping(name, opts):
    cfg = SchedulerConfig(prediction_type="sample", clip_sample=name != "dpmpp_2m", clip_sample_range=1.5)
    run_against_diffusers(name, cfg, steps=20, **opts)


@pytest.mark.parametrize("steps", [1, 7, 999, 1000])  # 1 step; T % n != 0; every training step (plain DDPM)
@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a", "dpmpp_2m"])
def test_timesteps_match_diffusers(name, steps):
    """Where diffusers' timesteps leave [0, T) (leading, steps_offset=1: t = 1000, which its DDIM/DDPM
    cannot index) or repeat (DPM-Solver's n + 1 points), ours refuse with a ValueError instead."""
    for spacing in SPACINGS:
        cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref, ours = diffusers_scheduler(name, cfg), make_scheduler(name, cfg)
        ref.set_timesteps(steps)
        ts = ref.timesteps.tolist()
        if max(ts) >= cfg.num_train_timesteps or len(set(ts)) < len(ts):
            with pytest.raises(ValueError, match=rf"steps={steps} with timestep_spacing='{spacing}' and steps_offset="
                                                 rf"{cfg.steps_offset} gives .*num_train_timesteps=1000.*trailing"):
                ours.set_timesteps(steps)
            continue
        ours.set_timesteps(steps)
        assert ours.timesteps.device.type == "cpu"
        assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype)), (spacing, ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("spacing, offset, steps", [("leading", 2, 500), ("leading", 1, 999), ("linspace", 0, 997)])
def test_timesteps_of_other_offsets_match_diffusers_or_are_refused_whole(name, spacing, offset, steps):
    """Each sampler checks the grid it runs: DPM++(2M)'s n + 1 points less the last at leading
    spacing, steps_offset 2 and 500 steps run 502 ... 3 as diffusers' (refused for the t = 1000 of
    the n-point grid it never uses). A schedule that is refused leaves the one set before whole:
    DPM++ and Euler-a had taken the new timesteps or sigmas and kept the other from the old."""
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    ref, ours = diffusers_scheduler(name, cfg), make_scheduler(name, cfg)
    ours.set_timesteps(10)
    kept = {k: getattr(ours, k, None) for k in ("timesteps", "sigmas", "num_inference_steps", "init_noise_sigma")}
    ref.set_timesteps(steps)
    ts = ref.timesteps.tolist()
    if max(ts) >= cfg.num_train_timesteps or len(set(ts)) < len(ts):
        with pytest.raises(ValueError, match=rf"{name}: steps={steps} with timestep_spacing='{spacing}'"):
            ours.set_timesteps(steps)
        for k, v in kept.items():
            now = getattr(ours, k, None)
            same = now is v or (isinstance(v, (torch.Tensor, np.ndarray)) and np.array_equal(np.asarray(now), np.asarray(v)))
            assert same, f"{name}: {k} changed by a refused set_timesteps({steps})"
        return
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype)), (name, ours.timesteps[:3], ts[:3])


def test_trailing_spacing_every_step_count():
    """diffusers' np.arange(T, 0, -T/n) yields an (n+1)-th value, -1, for some n (61, 103, ... at
    T = 1000); ours gives n timesteps for every n, equal to diffusers' wherever it gives n."""
    from sdcore.schedulers import spaced_timesteps
    for T in (1000, 1001, 257):
        extra = 0
        for n in range(1, T + 1):
            ts = spaced_timesteps(n, T, "trailing")
            assert len(ts) == n and ts[0] == T - 1 and ts[-1] >= 0 and np.all(np.diff(ts) < 0), (T, n, ts[-3:])
            theirs = np.round(np.arange(T, 0, -T / n)) - 1
            if len(theirs) == n:
                assert np.array_equal(ts, theirs), (T, n)
            else:
                extra += 1
                assert np.array_equal(ts, theirs[:n]) and theirs[n:].tolist() == [-1.0], (T, n)
        assert extra > 0 or T == 257, f"T={T}: no step count hit diffusers' extra value; the test lost its point"
    s = make_scheduler("ddim", SchedulerConfig(timestep_spacing="trailing"))
    s.set_timesteps(61)
    assert len(s.timesteps) == 61 and s.timesteps[-1] == 15


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_timesteps_out_of_range_are_errors(name):
    """A negative t would wrap around the ᾱ table, a prev_t >= t step up in noise: both refused."""
    s = make_scheduler(name, SchedulerConfig())
    x = torch.zeros(SHAPE)
    for t in (-1, 1000, torch.tensor([3, -1]), torch.tensor([1000, 5])):
        with pytest.raises(ValueError, match=r"outside the training range \[0, 1000\)"):
            s.add_noise(x, x, t)
    with pytest.raises(ValueError, match=r"prev_t=500 must be in \[-1, t=100\)"):
        s.step(x, 100, x, prev_t=500)
    with pytest.raises(ValueError, match=r"prev_t=-2 must be in \[-1, t=100\)"):
        s.step(x, 100, x, prev_t=-2)
    with pytest.raises(ValueError, match="outside the training range"):
        s.step(x, 1000, x, prev_t=3)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m"])
def test_sigma_samplers_add_noise_per_sample(name):
    s = make_scheduler(name, SchedulerConfig())
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(8)
    z0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ts = s.timesteps[[0, 7]]
    got = s.add_noise(z0[:2], eps[:2], ts)
    for i, t in enumerate(ts):
        assert torch.equal(got[i], s.add_noise(z0[i:i + 1], eps[i:i + 1], t)[0]), (name, i)


def test_dpmpp_2m_state_does_not_leak_between_runs():
    """The multistep x0 of a finished run must not feed the next one (an img2img run started at
    index 3 without set_timesteps): it matches a fresh scheduler's."""
    def run(s, start):
        model, x = fake_model(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
        for t in s.timesteps[start:].tolist():
            x = s.step(model(x, t), t, x).prev_sample
        return x

    reused = make_scheduler("dpmpp_2m", SchedulerConfig())
    reused.set_timesteps(8)
    run(reused, 0)
    fresh = make_scheduler("dpmpp_2m", SchedulerConfig())
    fresh.set_timesteps(8)
    assert torch.equal(run(reused, 3), run(fresh, 3))
    assert torch.equal(run(reused, 0), run(fresh, 0))


def test_ddpm_full_chain_matches_diffusers():
    """Plain ancestral DDPM over all 1000 training steps, short check on the last 30 (t -> t-1)."""
    cfg = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, steps_offset=0)
    ref, ours = diffusers_scheduler("ddpm", cfg), make_scheduler("ddpm", cfg)
    ref.set_timesteps(1000)
    ours.set_timesteps(1000)
    model, x = fake_model(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in ref.timesteps[-30:]:
        want = ref.step(model(x, t), t, x, generator=g1).prev_sample
        got = ours.step(model(x, t), t, x, generator=g2).prev_sample
        assert_close(got, want, rel=REL, name=f"ddpm t={int(t)}")
        x = want


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a", "dpmpp_2m"])
def test_add_noise_matches_diffusers(name, beta):
    cfg = SchedulerConfig(beta_schedule=beta)
    ref, ours = diffusers_scheduler(name, cfg), make_scheduler(name, cfg)
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    g = torch.Generator().manual_seed(5)
    z0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in ref.timesteps[[0, 11, -1]]:
        want = ref.add_noise(z0, eps, t.reshape(1))
        assert_close(ours.add_noise(z0, eps, t), want, rel=REL, name=f"add_noise t={t}")
    if name in ("ddpm", "ddim"):  # one timestep per sample
        ts = torch.tensor([999, 3])
        assert_close(ours.add_noise(z0, eps, ts), ref.add_noise(z0, eps, ts), rel=REL, name="per-sample add_noise")


@pytest.mark.parametrize("n,jump_length,jump_n_sample", [
    (250, 10, 10),  # the RePaint paper's setting
    (50, 5, 3),
    (100, 10, 1),  # no resampling: a plain descending walk
    (27, 4, 2),  # 1000 % 27 != 0
])
def test_repaint_timesteps_match_diffusers(n, jump_length, jump_n_sample):
    ref = diffusers.RePaintScheduler()
    ref.set_timesteps(n, jump_length=jump_length, jump_n_sample=jump_n_sample)
    assert repaint_timesteps(n, jump_length, jump_n_sample) == ref.timesteps.tolist()


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_repaint_loop_with_explicit_prev_t(name):
    """DDPM/DDIM step on RePaint's (t, t') pairs; undo_step re-noises x_s to x_t in closed form."""
    cfg = SchedulerConfig()
    s = make_scheduler(name, cfg)
    s.set_timesteps(20)
    ts = repaint_timesteps(20, 5, 2)
    model, g = fake_model(), torch.Generator().manual_seed(6)
    x = torch.randn(SHAPE, generator=g)
    z_known = torch.randn(SHAPE, generator=g)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()
    for t_last, t in zip(ts[:-1], ts[1:]):
        if t < t_last:
            known = s.add_noise(z_known, torch.randn(SHAPE, generator=g), t)
            x = s.step(model(x, t_last), t_last, x, prev_t=t, mask=mask, known=known, generator=g).prev_sample
            assert_close(x * mask, known * mask, rel=0, name="known region")
        else:
            noise = torch.randn(SHAPE, generator=g)
            ratio = s.alphas_cumprod[t] / s.alphas_cumprod[t_last]
            want = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
            x = s.undo_step(x, t_last, t, noise)
            assert_close(x, want, rel=REL, name=f"undo_step {t_last}->{t}")
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_explicit_prev_t_needs_no_set_timesteps(name):
    """RePaint steps between its own levels: set_timesteps (which refuses 1000 leading steps) is not needed."""
    fresh, spaced = make_scheduler(name, SchedulerConfig()), make_scheduler(name, SchedulerConfig())
    spaced.set_timesteps(10)
    x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    a = fresh.step(out, 999, x, prev_t=998, noise=noise).prev_sample
    b = spaced.step(out, 999, x, prev_t=998, noise=noise).prev_sample
    assert torch.equal(a, b), f"{name}: max |a - b| = {(a - b).abs().max()}"


def test_respaced_ddpm_explicit_prev_t_matches_default():
    s = make_scheduler("ddpm", SchedulerConfig())
    s.set_timesteps(10)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    noise = torch.randn(SHAPE)
    t, t_prev = s.timesteps[:2].tolist()
    a = s.step(out, t, x, noise=noise).prev_sample
    b = s.step(out, t, x, prev_t=t_prev, noise=noise).prev_sample
    assert torch.equal(a, b)


def test_cfg_inside_step_equals_combined_output():
    s = make_scheduler("ddim", SchedulerConfig())
    s.set_timesteps(10)
    x, cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(s.timesteps[3])
    got = s.step(cond, t, x, model_output_uncond=uncond, guidance_scale=7.5).prev_sample
    want = s.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
    assert_close(got, want, rel=1e-6, name="CFG in step")


def test_ddim_eta_checked_before_sampling():
    """DDIM's direction weight sqrt(1 - ᾱ' - s²) is real for every step at eta <= 1 (s² <= 1 - ᾱ'
    there), rounding aside; above 1 a step can leave it none, which used to give NaN images. Such an
    eta is refused by set_timesteps, naming the step and its bound; eta = 1 on the cosine schedule's
    one trailing step (ᾱ_999 ≈ 0, where the fp32 difference rounded below 0) now samples."""
    cfg = SchedulerConfig()
    for bad in (-0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=rf"ddim: eta must be a finite number >= 0 .*got {re.escape(repr(bad))}"):
            make_scheduler("ddim", cfg, eta=bad)
    s = make_scheduler("ddim", cfg, eta=1.5)
    with pytest.raises(ValueError, match=r"ddim: eta=1.5 is too large for the step t=\d+ -> \d+: .*this step "
                                         r"takes eta <= 1\.\d+, and eta <= 1 suits every step"):
        s.set_timesteps(50)
    s = make_scheduler("ddim", cfg, eta=1.5)
    with pytest.raises(ValueError, match=r"eta=1.5 is too large for the step t=41 -> 21"):
        s.step(torch.zeros(SHAPE), 41, torch.zeros(SHAPE), prev_t=21)
    s = make_scheduler("ddim", cfg, eta=1.05)  # the bound is per step: 55 steps take it, 50 do not
    s.set_timesteps(55)
    with pytest.raises(ValueError, match=r"eta=1.05 is too large for the step t=21 -> 1"):
        s.set_timesteps(50)
    assert (s.num_inference_steps, len(s.timesteps)) == (55, 55), "the 55-step schedule stays after the error"
    s.set_timesteps(50, first_step=49)  # img2img's strength skips t = 21 -> 1: only the steps that run count
    assert s.num_inference_steps == 50
    with pytest.raises(ValueError, match=r"eta=1.05 is too large for the step t=21 -> 1"):
        s.set_timesteps(50, first_step=48)
    s = make_scheduler("ddim", SchedulerConfig(beta_schedule="cosine", timestep_spacing="trailing",
                                               set_alpha_to_one=False), eta=1)
    assert s.options["eta"] == 1.0 and isinstance(s.options["eta"], float)
    s.set_timesteps(1)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = s.step(torch.zeros(SHAPE), int(s.timesteps[0]), x, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.prev_sample).all(), out.prev_sample


def test_undo_step_refused_in_sigma_space():
    """undo_step re-noises x = √ᾱ z0 + √(1-ᾱ) ε; Euler-a's x = z0 + σε would get the wrong scale."""
    s = make_scheduler("euler_a", SchedulerConfig())
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"euler_a: undo_step .* σ space .* use ddpm or ddim"):
        s.undo_step(torch.zeros(SHAPE), 401, 701)


def test_errors_name_the_valid_values():
    cfg = SchedulerConfig()
    with pytest.raises(ValueError, match="ddpm, ddim, euler_a, dpmpp_2m"):
        make_scheduler("heun", cfg)
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        make_scheduler("ddim", cfg, beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        make_scheduler("ddim", cfg, prediction_type="flow")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        make_scheduler("ddim", cfg, timestep_spacing="karras")
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("ddim", cfg, etta=0.5)
    with pytest.raises(TypeError, match="ddim: use_clipped_model_output must be a bool, got str 'no'"):
        make_scheduler("ddim", cfg, use_clipped_model_output="no")
    for name in ("ddpm", "ddim", "euler_a", "dpmpp_2m"):
        s = make_scheduler(name, cfg)
        with pytest.raises(RuntimeError, match="set_timesteps"):
            s.step(torch.zeros(SHAPE), 1, torch.zeros(SHAPE))
        for bad in (0, -3):
            with pytest.raises(ValueError, match=">= 1"):
                s.set_timesteps(bad)
    for field, value, message in [("clip_sample", "yes", "clip_sample must be true or false, got 'yes'"),
                                  ("set_alpha_to_one", 1, "set_alpha_to_one must be true or false"),
                                  ("steps_offset", -1, "steps_offset must be an integer >= 0, got -1"),
                                  ("num_train_timesteps", 1000.0, "num_train_timesteps must be an integer >= 1"),
                                  ("beta_start", float("nan"), "beta_start must be a number in (0, 1), got nan"),
                                  ("beta_end", 1.0, "beta_end must be a number in (0, 1), got 1.0"),
                                  ("clip_sample_range", 0, "clip_sample_range must be a number in (0, inf)")]:
        with pytest.raises(ValueError) as e:
            make_scheduler("ddim", cfg, **{field: value})
        assert message in str(e.value), f"{field}={value!r}: message {str(e.value)!r} lacks {message!r}"
    with pytest.raises(ValueError, match="prev_t"):
        s = make_scheduler("euler_a", cfg)
        s.set_timesteps(5)
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE), prev_t=3)


def test_cosine_alias_and_config_sampler():
    a = make_scheduler(None, SchedulerConfig(sampler="dpmpp_2m", beta_schedule="squaredcos_cap_v2"))
    b = make_scheduler("dpmpp_2m", SchedulerConfig(), beta_schedule="cosine")
    assert type(a) is type(b) and torch.equal(a.alphas_cumprod, b.alphas_cumprod)
    assert np.all(np.diff(a.alphas_cumprod.numpy()) < 0)


# ---- Options and paths the step-by-step comparisons above leave out (found by mutation testing:
# each test below fails for a one-token bug in sdcore.schedulers that every other test passed) ----

@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_set_alpha_to_one_matches_diffusers(eta):
    """The last step's alpha_bar_prev: 1 with set_alpha_to_one (how SD's DDIM checkpoints come),
    else alpha_bar[0]. The comparisons above all run the default (False)."""
    run_against_diffusers("ddim", SchedulerConfig(set_alpha_to_one=True), steps=20, eta=eta)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_count_not_dividing_T_matches_diffusers(spacing):
    """prev_t = t - T // n: 1000 // 7 = 142, where rounding 142.9 would give 143."""
    run_against_diffusers("ddim", SchedulerConfig(timestep_spacing=spacing), steps=7, eta=0.7)


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_use_clipped_model_output_matches_diffusers(prediction, eta, clip):
    """use_clipped_model_output: eps recomputed from the (clipped) x0, step by step in lockstep
    with diffusers' DDIMScheduler given the same option."""
    cfg = SchedulerConfig(prediction_type=prediction, clip_sample=clip, clip_sample_range=1.0)
    ref, ours = diffusers_scheduler("ddim", cfg), make_scheduler("ddim", cfg, eta=eta, use_clipped_model_output=True)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    model = fake_model()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    g_ref, g_ours = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for i, t in enumerate(ref.timesteps):
        out = model(x, t)
        want = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=g_ref).prev_sample
        got = ours.step(out, t, x, generator=g_ours).prev_sample
        assert_close(got, want, rel=REL, name=f"ddim {prediction} eta={eta} clip={clip} step {i} t={int(t)}")
        x = want


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.7}), ("euler_a", {})])
def test_generator_left_where_diffusers_leaves_it(name, opts):
    """Noise is drawn on the same steps as diffusers' (Euler-a every step, the last one's zero
    sigma_up included), so a generator shared with later calls goes on identically."""
    cfg = SchedulerConfig()
    ref, ours = diffusers_scheduler(name, cfg), make_scheduler(name, cfg, **opts)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    model = fake_model()
    x_ref = x_ours = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * float(ref.init_noise_sigma)
    g_ref, g_ours = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for t in ref.timesteps:
        x_ref = ref.step(model(ref.scale_model_input(x_ref, t), t), t, x_ref, generator=g_ref, **opts).prev_sample
        x_ours = ours.step(model(ours.scale_model_input(x_ours, t), t), t, x_ours, generator=g_ours).prev_sample
    assert torch.equal(g_ours.get_state(), g_ref.get_state()), f"{name}: generator states differ after 10 steps"


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("t", [0, 500, 999])
def test_undo_step_from_the_clean_sample_is_add_noise(name, t):
    """q(x_t | x_{-1}) with x_{-1} = x0 (alpha_bar_{-1} = 1: DDPM's, DDIM's with set_alpha_to_one)
    is q(x_t | x0): RePaint's re-noising from the clean sample equals the closed-form noising."""
    s = make_scheduler(name, SchedulerConfig(set_alpha_to_one=True))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    assert_close(s.undo_step(x0, -1, t, eps), s.add_noise(x0, eps, t), rel=REL, name=f"{name} undo_step -1 -> {t}")


@pytest.mark.parametrize("name, set_alpha_to_one", [("ddpm", False), ("ddim", False), ("ddim", True)])
@pytest.mark.parametrize("t", [0, 20])
def test_undo_step_from_minus_one_starts_where_the_step_to_it_ended(name, set_alpha_to_one, t):
    """RePaint's lowest jump: a step from level 0 to -1, then a re-noise from -1 up to t. With an exact
    model the result must have level t's noise, sqrt(1 - alpha_bar_t), whatever alpha_bar_{-1} the
    scheduler uses. DDIM without set_alpha_to_one (SD's config) lands at alpha_bar_0, not at the
    clean sample; undo_step took -1 for clean and gave level 0 0.041 against 0.029 (1.4x)."""
    s = make_scheduler(name, SchedulerConfig(set_alpha_to_one=set_alpha_to_one))
    a0, at = float(s.alphas_cumprod[0]), float(s.alphas_cumprod[t])
    g = torch.Generator().manual_seed(0)
    n = 400_000
    eps, z = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x_level0 = (1 - a0) ** 0.5 * eps  # x0 = 0 at level 0; the model predicts eps exactly
    x_minus1 = s.step(eps, 0, x_level0, prev_t=-1, noise=torch.zeros(n)).prev_sample
    std = s.undo_step(x_minus1, -1, t, z).std().item()
    want = (1 - at) ** 0.5
    assert abs(std / want - 1) < 0.01, f"{name} set_alpha_to_one={set_alpha_to_one}: -1 -> {t} std {std:.5f}, want {want:.5f}"


@pytest.mark.parametrize("t_from, t_to, message", [
    (500, 1000, r"ddim: undo_step t_to=1000 is outside the training range \[0, 1000\)"),
    (-5, 10, r"ddim: undo_step t_from=-5 is outside \[-1, 1000\) .*-1 = the clean sample"),
    (-1, -1, r"t_to=-1 is outside the training range"),
    (1000, 1001, r"t_from=1000 is outside \[-1, 1000\)"),
    (10, 10, r"goes up in noise: t_to=10 must be > t_from=10"),
])
def test_undo_step_checks_its_timesteps(t_from, t_to, message):
    """Out-of-range levels are refused by name, not indexed past the schedule (IndexError) or
    taken for the clean sample (anything below -1)."""
    s = make_scheduler("ddim", SchedulerConfig())
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=message):
        s.undo_step(x, t_from, t_to, torch.zeros(SHAPE))


def test_a_schedule_whose_alpha_bar_underflows_is_refused():
    """β in (0, 1) keeps ᾱ_t > 0 in exact arithmetic, not in float32: linear 1e-4 .. 0.5 reaches 0
    from t = 609, and then DDIM's set_timesteps raised about a NaN coefficient, DDPM's first step
    after a UNet call, and Euler started from inf. The config is refused, naming the schedule."""
    from sdcore.config import SchedulerConfig
    from sdcore.schedulers import check_config, make_scheduler

    bad = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.5)
    for sampler in ("ddim", "ddpm", "euler_a", "dpmpp_2m"):
        with pytest.raises(ValueError, match=r"\(linear, beta 0.0001 \.\. 0.5 over 1000 steps\) drives alpha_bar to 0 "
                                             r"in float32 from t = 609"):
            make_scheduler(sampler, bad)
    check_config(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))  # DDPM's: fine
    check_config(SchedulerConfig(beta_schedule="cosine"))  # β capped at 0.999: ᾱ_T is small, not 0
