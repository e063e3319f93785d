"""Noise schedules and samplers: a small stateful API (diffusers' ``set_timesteps`` / ``step`` /
``add_noise``) over pure functions that compute each step's coefficients on the host.

    sched = make_scheduler("ddim", SchedulerConfig(), eta=0.0)
    sched.set_timesteps(50)
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps.tolist():
        out = unet(sched.scale_model_input(x, t), t, context)
        x = sched.step(out, t, x, generator=g).prev_sample

Every step is one call of :func:`kernels.scheduler_step` (CFG + x0 + update + noise + RePaint
blend in one pass); this module only computes its :class:`kernels.StepCoefficients`. The
coefficients are python floats computed in float32 with the same operation order as diffusers
(numpy float32 scalars), so the sampling loop never syncs the device and the trajectories match
diffusers' DDPM/DDIM/EulerAncestral/DPMSolverMultistep schedulers to fp32 rounding.

Notation: ᾱ_t = ∏_{i<=t} (1 - β_i) (``alphas_cumprod``); x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε; in sigma
space (Karras et al. 2022) σ_t = √((1-ᾱ_t)/ᾱ_t) and x = x0 + σ ε.
RePaint masks: ``mask = 1`` marks the KNOWN region, whose values come from ``known`` (the known
latent noised to the step's target level, e.g. ``sched.add_noise(z_known, noise, prev_t)``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from kernels import StepCoefficients

from .config import SchedulerConfig
from .layers import randn

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
_BETA_ALIASES = {"squaredcos_cap_v2": "cosine"}  # diffusers' name for the cosine schedule
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
F32 = np.float32


def _check_choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def check_config(c: SchedulerConfig) -> None:
    """Every field of ``c`` valid, or a ValueError naming the field and its value."""
    _check_choice("beta_schedule", c.beta_schedule, BETA_SCHEDULES + tuple(_BETA_ALIASES))
    _check_choice("prediction_type", c.prediction_type, PREDICTION_TYPES)
    _check_choice("timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
    _check_choice("sampler", c.sampler, tuple(SCHEDULERS))
    for name, lo in (("num_train_timesteps", 1), ("steps_offset", 0)):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    for name, hi in (("beta_start", 1), ("beta_end", 1), ("clip_sample_range", math.inf)):  # β in (0, 1): ᾱ_t > 0
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < hi:
            raise ValueError(f"{name} must be a number in (0, {hi}), got {v!r}")
    # ... in exact arithmetic: in float32, as the samplers hold it, the product can underflow to 0
    # (linear 1e-4 .. 0.5 over 1000 steps: from t = 609), and every step's coefficients become NaN
    alpha_bar = torch.cumprod(1.0 - make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end), 0)
    if not alpha_bar[-1] > 0:
        first = int((alpha_bar == 0).nonzero()[0])
        raise ValueError(f"the noise schedule ({c.beta_schedule}, beta {c.beta_start} .. {c.beta_end} over "
                         f"{c.num_train_timesteps} steps) drives alpha_bar to 0 in float32 from t = {first}: "
                         "no image is left to denoise there; use a smaller beta_end or fewer num_train_timesteps")
    for name in ("clip_sample", "set_alpha_to_one"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------
def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> torch.Tensor:
    """β_1..β_T as float32, as diffusers computes them.

    ``linear``: evenly spaced (Ho et al. 2020). ``scaled_linear``: evenly spaced in √β, squared
    (the LDM / SD schedule). ``cosine``: Nichol & Dhariwal 2021 eq. 17, ᾱ(t) = f(t)/f(0) with
    f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β_t = min(1 - ᾱ(t+1)/ᾱ(t), 0.999).
    """
    schedule = _BETA_ALIASES.get(schedule, schedule)
    _check_choice("beta schedule", schedule, BETA_SCHEDULES)
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2

    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)


def noise_coefficients(alpha_bar: float) -> tuple[float, float]:
    """(√ᾱ_t, √(1-ᾱ_t)) in float32: the closed-form forward process q(x_t | x_0) (Ho et al. 2020
    eq. 4) is x_t = √ᾱ_t z0 + √(1-ᾱ_t) ε."""
    return float(np.sqrt(F32(alpha_bar))), float(np.sqrt(F32(1) - F32(alpha_bar)))


def spaced_timesteps(n: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0,
                     *, round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps (float64 values) for ``n`` steps; Lin et al. 2024, Table 2, as diffusers.

    leading: k·(T//n) + offset; trailing: round(T - k·T/n) - 1; linspace: linspace(0, T-1, n), rounded.
    Trailing is computed for k < n exactly: diffusers' ``np.arange(T, 0, -T/n)`` yields an (n+1)-th
    value, -1, for some n (e.g. 61 at T = 1000); its other values are these, bit for bit.
    """
    _check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    delta = (T + -T / n) - T  # numpy's arange fills start + k·delta with delta = (start + step) - start
    return np.round(T + np.arange(n) * delta) - 1


def x0_eps_coefficients(prediction_type: str, sa, sb) -> dict[str, float]:
    """x0 = (a_x x + a_o out)/a_d and ε = (b_x x + b_o out)/b_d for x = sa·x0 + sb·ε.

    epsilon: x0 = (x - sb·out)/sa (Ho et al. 2020 eq. 15); v_prediction (Salimans & Ho 2022,
    v = sa·ε - sb·x0): x0 = sa·x - sb·v, ε = sa·v + sb·x; sample: ε = (x - sa·out)/sb.
    """
    _check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    sa, sb = float(sa), float(sb)
    if prediction_type == "epsilon":
        return dict(a_x=1.0, a_o=-sb, a_d=sa, b_x=0.0, b_o=1.0, b_d=1.0)
    if prediction_type == "v_prediction":
        return dict(a_x=sa, a_o=-sb, a_d=1.0, b_x=sb, b_o=sa, b_d=1.0)
    return dict(a_x=0.0, a_o=1.0, a_d=1.0, b_x=1.0, b_o=-sa, b_d=sb)


def repaint_timesteps(num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10,
                      num_train_timesteps: int = 1000) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Alg. 1 + §4.2), as diffusers'
    ``RePaintScheduler.set_timesteps``: walk down; every ``jump_length`` steps jump back up
    ``jump_length`` steps, ``jump_n_sample - 1`` times. A pair (t, t') with t' < t is a denoising
    step ``step(..., t, x, prev_t=t')``; with t' > t an :meth:`undo_step` from t to t'.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    n = min(num_train_timesteps, num_inference_steps)
    jumps = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
    out, t = [], n
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    ratio = num_train_timesteps // n
    return [int(v) * ratio for v in out]


def _host(t):
    """A timestep as a python number; tensors must live on the CPU (reading them then never syncs)."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"pass host timesteps (from .timesteps), not a {t.device} tensor")
        return t.item()
    return t


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Stateful samplers
# ---------------------------------------------------------------------------------------------
class Scheduler:
    """Shared state and ``step``; subclasses supply ``_coefficients`` and their timesteps."""

    name = ""
    OPTIONS: dict[str, object] = {}  # sampler options beyond SchedulerConfig, with defaults
    init_noise_sigma = 1.0
    _keeps_x0 = False  # DPM++(2M) needs each step's x0 for the next one

    def __init__(self, config: SchedulerConfig, **options):
        for key in options:
            if key not in self.OPTIONS:
                raise ValueError(f"{self.name}: unknown option {key!r}; valid: {', '.join(self.OPTIONS) or 'none'}")
        self.options = {**self.OPTIONS, **options}
        self.config = config
        check_config(config)
        self.betas = make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._ac = self.alphas_cumprod.numpy()  # float32, host
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    # --- timesteps
    def set_timesteps(self, num_inference_steps: int, first_step: int = 0) -> None:
        """The sampling schedule of ``num_inference_steps`` steps. ``first_step``: the index of the
        first step the caller runs (img2img's strength skips those before it); only the steps from
        there on are checked for an option a step cannot take (a DDIM eta above 1). A schedule
        refused leaves the one set before in place, whole (timesteps, sigmas, multistep state)."""
        before = dict(self.__dict__)
        try:
            self._set_timesteps(num_inference_steps, first_step)
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _set_timesteps(self, num_inference_steps: int, first_step: int) -> None:
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} > num_train_timesteps={T}")
        self._set(self._grid(num_inference_steps))
        self.num_inference_steps = num_inference_steps

    def _grid(self, n: int) -> torch.Tensor:
        """The timesteps of an ``n``-step schedule (checked by :meth:`_set`)."""
        c = self.config
        return torch.from_numpy(spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing,
                                                 c.steps_offset).astype(np.int64))

    def _set(self, timesteps: torch.Tensor) -> None:
        """Adopt ``timesteps`` if they strictly decrease within [0, T): leading spacing can leave the
        range (steps_offset=1, n = T gives t = T) and DPM++'s n + 1 points can repeat (n >= T/2)."""
        c, T = self.config, self.config.num_train_timesteps
        ts = timesteps.tolist()
        bad = [t for t in ts if not 0 <= t < T]
        why = (f"timesteps outside [0, {T}): {bad[:3]}" if bad else
               "repeated timesteps" if any(a <= b for a, b in zip(ts, ts[1:])) else None)
        if why:
            advice = "fewer steps" + ("" if c.timestep_spacing == "trailing" else " or timestep_spacing='trailing'")
            raise ValueError(f"{self.name}: steps={len(ts)} with timestep_spacing={c.timestep_spacing!r} "
                             f"and steps_offset={c.steps_offset} gives {why} (num_train_timesteps={T}); use "
                             f"{advice}")
        self.timesteps, self._ts = timesteps, ts
        self._index = {t: i for i, t in enumerate(self._ts)}  # 999 and 999.0 hash alike

    def _alpha_bar(self, t: int):
        """ᾱ_t; at -1, the clean sample's 1 (DDPM's, as diffusers')."""
        return self._ac[t] if t >= 0 else F32(1.0)

    def _check_t(self, t, prev_t=None) -> None:
        """A training timestep 0 <= t < T, and a target -1 <= prev_t < t (-1: the clean sample)."""
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"{self.name}: timestep {t} is outside the training range [0, {T})")
        if prev_t is not None and not -1 <= prev_t < t:
            raise ValueError(f"{self.name}: prev_t={prev_t} must be in [-1, t={t}): a step goes down in noise "
                             "(-1 = the clean sample); undo_step() goes up")

    def _require_timesteps(self):
        if self.timesteps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps(n) before step()")

    # --- API
    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """a·z0 + b·ε at timestep ``t``: a host value (no device traffic), or a 1-D CPU tensor with
        one timestep per sample (their coefficients are copied to z0's device)."""
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel() > 1:
            ab = torch.tensor([self._noise_coefficients(v) for v in t.cpu().tolist()], dtype=torch.float32)
            shape = (-1,) + (1,) * (z0.dim() - 1)
            a, b = (c.reshape(shape).to(z0.device, z0.dtype) for c in ab.unbind(1))
            return a * z0 + b * noise
        a, b = self._noise_coefficients(_host(t))
        return a * z0 + b * noise

    def sample_scale(self, t) -> float:
        """max(|a|, |b|) of x_t = a·z0 + b·ε at timestep ``t``: how large the sample is against
        unit-scale latents (at most 1 for DDPM / DDIM / DPM++; max(1, σ) for Euler's σ-space samples)."""
        return max(map(abs, self._noise_coefficients(_host(t))))

    def _noise_coefficients(self, t) -> tuple[float, float]:
        """(a, b) of x_t = a·z0 + b·ε; here q(x_t | x_0) at training timestep t."""
        self._check_t(t)
        return noise_coefficients(self._ac[int(t)])

    def undo_step(self, sample: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-noise from level ``t_from`` up to ``t_to > t_from`` (RePaint's jump back):
        q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I). One ``scheduler_step`` launch. Level -1 is
        where this scheduler's step to -1 lands: the clean sample (ᾱ = 1), except DDIM without
        ``set_alpha_to_one`` (ᾱ_0, so -1 -> 0 re-noises nothing)."""
        t_from, t_to = int(t_from), int(t_to)
        T = self.config.num_train_timesteps
        if not -1 <= t_from < T:
            raise ValueError(f"{self.name}: undo_step t_from={t_from} is outside [-1, {T}) "
                             "(the training timesteps; -1 = the clean sample)")
        if not 0 <= t_to < T:
            raise ValueError(f"{self.name}: undo_step t_to={t_to} is outside the training range [0, {T})")
        if t_to <= t_from:
            raise ValueError(f"undo_step goes up in noise: t_to={t_to} must be > t_from={t_from}")
        ratio = self._alpha_bar(t_to) / self._alpha_bar(t_from)
        noise = randn(sample.shape, generator, sample.device, sample.dtype) if noise is None else noise
        k = StepCoefficients(c1=float(np.sqrt(ratio)), sigma=float(np.sqrt(F32(1) - ratio)))
        return kernels.scheduler_step(sample, sample, k, noise=noise)[0]

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, *, prev_t: int | None = None,
             model_output_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
             return_x0: bool = True) -> SchedulerOutput:
        """x_t -> x_{prev_t}. ``t`` is a host value from ``self.timesteps`` (int / float / CPU tensor);
        with an explicit ``prev_t`` (ddpm / ddim) any training timestep, no ``set_timesteps`` needed.

        CFG: with ``model_output_uncond``, out = uncond + guidance_scale·(cond - uncond).
        Noise: ``noise`` if given, else drawn from ``generator`` (only on steps that use noise, the
        same steps diffusers draws on). RePaint blend: prev = mask·known + (1-mask)·prev, mask = 1 on
        the KNOWN region. ``return_x0=False`` skips writing x0 (one tensor less of traffic).
        """
        if prev_t is None:
            self._require_timesteps()
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        t = _host(t)
        coeffs, draws_noise, prev_x0 = self._coefficients(t, prev_t)
        if draws_noise and noise is None:
            noise = randn(sample.shape, generator, sample.device, sample.dtype)
        need_x0 = return_x0 or self._keeps_x0
        prev, x0 = kernels.scheduler_step(
            sample, model_output, coeffs, model_output_uncond=model_output_uncond,
            guidance_scale=guidance_scale, noise=noise if coeffs.sigma != 0.0 else None,
            prev_x0=prev_x0, mask=mask, known=known, return_x0=need_x0)
        self._after_step(x0)
        return SchedulerOutput(prev, x0 if return_x0 else None)

    def _after_step(self, x0) -> None:
        pass

    def check_levels(self, t, prev_t: int) -> None:
        """Raise now the ValueError that ``step(..., t, ..., prev_t=prev_t)`` would raise, running
        nothing: a caller stepping between its own levels (RePaint) checks its plan before sampling,
        e.g. for a DDIM eta too large for one of its steps. ddpm / ddim, whose steps take any levels."""
        self._coefficients(t, prev_t)

    def _coefficients(self, t, prev_t) -> tuple[StepCoefficients, bool, torch.Tensor | None]:
        raise NotImplementedError


class DDPMScheduler(Scheduler):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) with the posterior q(x_{t'} | x_t, x0) of eq. 6-7
    on any pair t' < t of training timesteps (respacing, Nichol & Dhariwal 2021 §4): β' = 1 - ᾱ_t/ᾱ_{t'},
    mean = √ᾱ_{t'} β'/(1-ᾱ_t) x0 + √(1-β')(1-ᾱ_{t'})/(1-ᾱ_t) x_t, "fixed small" variance
    β'(1-ᾱ_{t'})/(1-ᾱ_t). Default t' is the next entry of ``timesteps`` (-1 after the last)."""

    name = "ddpm"

    def _coefficients(self, t, prev_t):
        t = int(t)
        if prev_t is None:
            i = self._index.get(t)
            if i is None:
                raise ValueError(f"ddpm: timestep {t} is not in timesteps; pass prev_t= explicitly")
            prev_t = self._ts[i + 1] if i + 1 < len(self._ts) else -1
        self._check_t(t, int(prev_t))
        a, ap = self._ac[t], self._alpha_bar(int(prev_t))
        bt, bp = F32(1) - a, F32(1) - ap
        cur_a = a / ap
        cur_b = F32(1) - cur_a
        pred = x0_eps_coefficients(self.config.prediction_type, np.sqrt(a), np.sqrt(bt))
        var = max(bp / bt * cur_b, F32(1e-20))
        k = StepCoefficients(
            a_x=pred["a_x"], a_o=pred["a_o"], a_d=pred["a_d"],
            clip=self.config.clip_sample_range if self.config.clip_sample else None,
            c0=float(np.sqrt(ap) * cur_b / bt), c1=float(np.sqrt(cur_a) * bp / bt),
            sigma=float(np.sqrt(var)) if t > 0 else 0.0)
        return k, t > 0, None


class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021 eq. 12): x_{t'} = √ᾱ_{t'} x0 + √(1-ᾱ_{t'}-s²) ε + s z, with
    s = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'}) (eq. 16); η = 0 is deterministic, η = 1 is DDPM.
    Default t' = t - T//n as diffusers (any t' via ``prev_t``); ᾱ_{-1} = 1 if ``set_alpha_to_one``
    else ᾱ_0. ``use_clipped_model_output`` recomputes ε from the clipped x0."""

    name = "ddim"
    OPTIONS = {"eta": 0.0, "use_clipped_model_output": False}

    def __init__(self, config: SchedulerConfig, **options):
        super().__init__(config, **options)
        eta = self.options["eta"]
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta < math.inf:
            raise ValueError(f"ddim: eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), "
                             f"got {eta!r}")
        self.options["eta"] = float(eta)
        clipped = self.options["use_clipped_model_output"]
        if not isinstance(clipped, bool):  # a truthy "no" would switch it on
            raise TypeError(f"ddim: use_clipped_model_output must be a bool, got {type(clipped).__name__} {clipped!r}")

    def _set_timesteps(self, num_inference_steps: int, first_step: int) -> None:
        """As the base; then the coefficients of every step that runs (from ``first_step``), so that
        an eta too large for one of them (eta > 1 can be) is refused before the first step runs, not
        in the middle of sampling."""
        super()._set_timesteps(num_inference_steps, first_step)
        for t in self._ts[first_step:]:
            self.check_levels(t, None)

    def _alpha_bar(self, t: int):
        """ᾱ_t, and at -1 the level a step to -1 lands on (diffusers' final_alpha_cumprod): 1 with
        ``set_alpha_to_one``, else ᾱ_0. undo_step from -1 (RePaint's lowest jump) starts there too:
        with ᾱ_{-1} = 1 it re-noised a sample still at level 0 as if clean, to 1.4x level 0's noise."""
        if t >= 0:
            return self._ac[t]
        return F32(1) if self.config.set_alpha_to_one else self._ac[0]

    def _coefficients(self, t, prev_t):
        t = int(t)
        c = self.config
        if prev_t is None:  # diffusers' t - T//n, which may fall below -1: that is ᾱ_{-1} too
            prev_t = max(t - c.num_train_timesteps // self.num_inference_steps, -1)
        prev_t = int(prev_t)
        self._check_t(t, prev_t)
        a = self._ac[t]
        ap = self._alpha_bar(prev_t)
        bt, bp = F32(1) - a, F32(1) - ap
        sa, sb = np.sqrt(a), np.sqrt(bt)
        pred = x0_eps_coefficients(c.prediction_type, sa, sb)
        if c.clip_sample and self.options["use_clipped_model_output"]:  # ε = (x - √ᾱ x0c)/√(1-ᾱ)
            pred.update(b_x=1.0, b_o=0.0, b_0=float(-sa), b_d=float(sb))
        eta = self.options["eta"]
        unit = (bp / bt) * (F32(1) - a / ap)  # s² at η = 1
        std = F32(eta) * np.sqrt(unit)
        direction = F32(1) - ap - std**2  # the weight of ε, squared: 1 - ᾱ_{t'} - s²
        if direction < 0:  # s² > 1 - ᾱ_{t'} at η = √((1 - ᾱ_t) / (1 - ᾱ_t/ᾱ_{t'})) >= 1, or rounding
            eta_max = math.sqrt(float(bp) / float(unit))
            if eta > eta_max * (1 + 1e-5):
                raise ValueError(f"ddim: eta={eta} is too large for the step t={t} -> {prev_t}: the noise s "
                                 f"exceeds sqrt(1 - alpha_bar_prev), leaving sqrt(1 - alpha_bar_prev - s^2) "
                                 f"(the direction to x_t) no real value; this step takes eta <= {eta_max:.6g}, "
                                 "and eta <= 1 suits every step")
            direction = F32(0)  # rounding at η ≈ its bound: e.g. η = 1 on the cosine schedule's first step
        k = StepCoefficients(
            **pred, clip=c.clip_sample_range if c.clip_sample else None,
            c0=float(np.sqrt(ap)), c2=float(np.sqrt(direction)),
            sigma=float(std) if eta > 0 else 0.0)
        return k, eta > 0, None


class _SigmaScheduler(Scheduler):
    """Samplers that walk a per-step σ table (diffusers' ``sigmas``: σ(t) interpolated in t)."""

    def _sigma_table(self, timesteps: np.ndarray) -> None:
        sig = ((1 - self._ac) / self._ac) ** 0.5
        sig = np.interp(timesteps, np.arange(0, len(sig)), sig)
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)

    def _step_index(self, t) -> int:
        i = self._index.get(_host(t))
        if i is None:
            raise ValueError(f"{self.name}: timestep {t} is not in timesteps")
        return i

    def step(self, *args, prev_t=None, **kwargs):
        if prev_t is not None:
            raise ValueError(f"{self.name} walks its own sigma table; prev_t= is only for ddpm / ddim")
        return super().step(*args, **kwargs)

    def check_levels(self, t, prev_t):
        raise ValueError(f"{self.name} walks its own sigma table; steps between chosen levels are for ddpm / ddim")

    def _noise_coefficients(self, t) -> tuple[float, float]:  # t: one of self.timesteps
        return self._sigma_noise(self._step_index(t))

    def _sigma_noise(self, i: int) -> tuple[float, float]:
        """(a, b) of x = a·z0 + b·ε at step index i."""
        raise NotImplementedError


class EulerAncestralScheduler(_SigmaScheduler):
    """Euler-ancestral (Karras et al. 2022 Alg. 2 with ancestral noise; k-diffusion
    ``sample_euler_ancestral``): in σ space with d = (x - x0)/σ, σ_up = √(σ'²(σ²-σ'²)/σ²),
    σ_down = √(σ'² - σ_up²), x' = x + d (σ_down - σ) + σ_up z. The model sees x/√(σ²+1).

    Evaluated as x' = (σ_down/σ) x + (1 - σ_down/σ) x0 + σ_up z with σ_down = σ'²/σ in float64:
    the same step without the cancellations of x + d·dt and √(σ'² - σ_up²), which cost diffusers'
    fp32 form ~1e-4 relative when σ is large (the cosine schedule's σ_max ≈ 2e4)."""

    name = "euler_a"

    def _grid(self, n: int) -> torch.Tensor:  # linspace unrounded, as diffusers' Euler schedulers
        c = self.config
        return torch.from_numpy(spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                                 round_linspace=False).astype(np.float32))

    def _set_timesteps(self, num_inference_steps: int, first_step: int) -> None:
        super()._set_timesteps(num_inference_steps, first_step)
        c = self.config
        self._sigma_table(self.timesteps.numpy())
        smax = self.sigmas.max()
        spacing_max = c.timestep_spacing in ("linspace", "trailing")
        self.init_noise_sigma = float(smax if spacing_max else np.sqrt(smax**2 + F32(1)))

    def scale_model_input(self, sample, t):
        s = self.sigmas[self._step_index(t)]
        return sample / float(np.sqrt(s**2 + F32(1)))

    def _sigma_noise(self, i):
        """x = z0 + σ_t ε (σ space: the sampler's x is not scaled by √ᾱ)."""
        return 1.0, float(self.sigmas[i])

    def undo_step(self, *args, **kwargs):
        raise ValueError(f"{self.name}: undo_step (RePaint's jump back) re-noises a variance-preserving sample, "
                         f"x = √ᾱ z0 + √(1 - ᾱ) ε, and {self.name}'s is in σ space (x = z0 + σε); use ddpm or "
                         "ddim, RePaint's samplers")

    def _coefficients(self, t, prev_t):
        i = self._step_index(t)
        s, s_to = self.sigmas[i], self.sigmas[i + 1]
        pt = self.config.prediction_type
        s, s_to = float(s), float(s_to)  # float64 from here, each coefficient rounded to fp32 once, by the step:
        # σ_down = √(σ'² - σ_up²) cancels in fp32, and x0 of a v-prediction cancels as σ nears 1
        if pt == "epsilon":  # x0 = x - σ out
            a_x, a_o = 1.0, -s
        elif pt == "v_prediction":  # x0 = x/(σ²+1) - σ/√(σ²+1) out
            a_x, a_o = 1 / (s**2 + 1), -s / math.sqrt(s**2 + 1)
        else:
            a_x, a_o = 0.0, 1.0
        up = math.sqrt(s_to**2 * (s**2 - s_to**2) / s**2)
        ratio = (s_to / s) ** 2  # σ_down/σ, as σ_down = σ'²/σ exactly
        k = StepCoefficients(a_x=a_x, a_o=a_o, c0=1.0 - ratio, c1=ratio, sigma=up)
        return k, True, None


class DPMSolverPP2MScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, midpoint form, as diffusers'
    ``DPMSolverMultistepScheduler`` defaults (solver_order 2, final σ = 0, first-order last step):
    with λ = log(α/σ), h = λ_t - λ_s0, r0 = (λ_s0 - λ_s1)/h, D1 = (x0_0 - x0_1)/r0,
    x_t = (σ_t/σ_s0) x - α_t (e^{-h} - 1)(x0_0 + D1/2); the first and last steps are first order."""

    name = "dpmpp_2m"
    _keeps_x0 = True

    def _grid(self, n: int) -> torch.Tensor:
        if self.config.timestep_spacing == "trailing":
            return super()._grid(n)
        return super()._grid(n + 1)[:-1]  # diffusers spaces n + 1 points and drops the last

    def _set_timesteps(self, num_inference_steps: int, first_step: int) -> None:
        super()._set_timesteps(num_inference_steps, first_step)
        self._sigma_table(self.timesteps.numpy())
        self._x0_prev, self._lower_order_nums, self._last_index = None, 0, None

    def _alpha_sigma(self, i):
        s = self.sigmas[i]
        alpha = F32(1) / np.sqrt(s**2 + F32(1))
        return alpha, s * alpha

    def _sigma_noise(self, i):
        alpha, sigma = self._alpha_sigma(i)
        return float(alpha), float(sigma)

    def _coefficients(self, t, prev_t):
        i = self._step_index(t)
        if self._last_index is None or i != self._last_index + 1:  # a new run (or a jump): the kept
            self._x0_prev, self._lower_order_nums = None, 0  # x0 is not step i - 1's, so first order
        self._last_index = i
        (alpha_s, sigma_s), (alpha_t, sigma_t) = self._alpha_sigma(i), self._alpha_sigma(i + 1)
        with np.errstate(divide="ignore"):
            lam_t = np.log(alpha_t) - np.log(sigma_t)  # +inf at the final σ = 0
        lam_s = np.log(alpha_s) - np.log(sigma_s)
        h = lam_t - lam_s
        pred = x0_eps_coefficients(self.config.prediction_type, alpha_s, sigma_s)
        x0 = dict(a_x=pred["a_x"], a_o=pred["a_o"], a_d=pred["a_d"])
        A = alpha_t * (np.exp(-h) - F32(1))
        k = StepCoefficients(**x0, c0=float(-A), c1=float(sigma_t / sigma_s))
        if self._lower_order_nums < 1 or i == len(self._ts) - 1:  # first order (= DDIM)
            return k, False, None
        alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
        r0 = (lam_s - (np.log(alpha_s1) - np.log(sigma_s1))) / h
        k = dataclasses.replace(k, c3=float(-(F32(0.5) * A) * (F32(1) / r0)))  # -A/2 · D1, D1 = (x0 - x0_prev)/r0
        return k, False, self._x0_prev

    def _after_step(self, x0):
        self._x0_prev = x0
        self._lower_order_nums = min(self._lower_order_nums + 1, 2)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler_a": EulerAncestralScheduler,
    "dpmpp_2m": DPMSolverPP2MScheduler,
}


def make_scheduler(name: str | None, config: SchedulerConfig | None = None, **overrides) -> Scheduler:
    """A sampler by name ("ddpm", "ddim", "euler_a", "dpmpp_2m"; None = ``config.sampler``).

    ``overrides`` may be SchedulerConfig fields (``beta_schedule="cosine"``) or sampler options
    (ddim: ``eta``, ``use_clipped_model_output``).
    """
    config = config or SchedulerConfig()
    name = config.sampler if name is None else name
    _check_choice("sampler", name, tuple(SCHEDULERS))
    fields = set(SchedulerConfig.__dataclass_fields__)
    config = config.replace(**{k: v for k, v in overrides.items() if k in fields})
    return SCHEDULERS[name](config, **{k: v for k, v in overrides.items() if k not in fields})
