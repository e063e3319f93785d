"""RePaint's internals, against an oracle written from the paper and diffusers' ``RePaintScheduler``.

``pipelines.inpaint(variant="repaint")`` runs a stand-in UNet (a fixed, cheap function of its
inputs) so the whole walk costs milliseconds, and its final latents are compared with the same walk
re-derived here: each descent is ``diffusers.RePaintScheduler.step`` (DDIM, eta 0: the unknown
region's update, and the known region as the image latent forward-noised to the step's target level
with fresh noise, Lugmayr et al. 2022 eq. 8, blended in with the mask), and each jump back is
q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I) in closed form, written out here. (diffusers'
``undo_step`` walks the training timesteps one by one, each with its own draw, so only its
``step`` is the oracle.) The random stream follows the documented order: the image's posterior
sample, the initial noise, then one draw per known-region noising and per jump; the known region at
the clean level (-1) is the image latent itself and takes no draw.

Batching is part of the check: two images with two different masks, two prompts with two images
each (``[a, a, b, b]``, diffusers' ``num_images_per_prompt`` order), and classifier-free guidance
with a negative prompt, the stand-in UNet's output depending on the text context.
"""
import pytest
import torch

import pipelines
import sdcore
from kernels.testing import describe_diff
from pipelines.common import encode_image, image_to_tensor
from test_pipelines import _assert_latents, _oracle

SIZE = 32  # pixels; 4x4 latents
SEED = 7
PROMPTS, NEGATIVE, PER_PROMPT, CFG = ["a cat", "a dog"], "blurry", 2, 2.5


class _StandInUNet(torch.nn.Module):
    """A deterministic, nonlinear function of the sample, the timestep and the text context; it mixes
    neighbouring latent pixels, so the known region steers the repainted one, as a UNet's does."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append(int(t))
        ctx = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        x = x[:, :4]
        return 0.6 * torch.tanh(x) + 0.3 * x.roll(shifts=(1, 1), dims=(-2, -1)) + 4.0 * ctx + 1e-4 * float(t)


@pytest.fixture(scope="module")
def model():
    """The tiny preset with DDIM's ᾱ_{-1} = 1 (``set_alpha_to_one``), RePaintScheduler's final level."""
    base = sdcore.SDConfig.preset("tiny")
    config = base.replace(scheduler=base.scheduler.replace(set_alpha_to_one=True))
    m = sdcore.StableDiffusion.from_config(config, seed=0)
    m.model.diffusion_model = _StandInUNet()
    return m


@pytest.fixture(scope="module")
def images(image):
    """Two different [0, 1] images, (2, 3, SIZE, SIZE)."""
    a = image_to_tensor(image.resize((SIZE, SIZE)), (SIZE, SIZE), False)[0]
    return torch.stack([a, a.flip(-1)])


@pytest.fixture(scope="module")
def masks():
    """Two different repaint masks (1 = repaint), off the 8-px latent grid on some sides."""
    m = torch.zeros(2, 1, SIZE, SIZE)
    m[0, :, 4:20, 9:27] = 1.0
    m[1, :, 13:30, 0:12] = 1.0
    return m


def _known_latent_mask(masks: torch.Tensor) -> torch.Tensor:
    """1 = KNOWN at latent size: nearest downsampling by 8 takes pixel (8i, 8j) (diffusers' F.interpolate)."""
    return 1.0 - (masks[..., ::8, ::8] >= 0.5).float()


def _per_prompt(x: torch.Tensor) -> torch.Tensor:
    """(2, ...) per image/prompt -> (4, ...): each repeated PER_PROMPT times in place."""
    return x[torch.tensor([0, 0, 1, 1])]


def _oracle_repaint(model, images, masks, steps, jump_length, jump_n_sample, strength):
    """The RePaint walk of the module docstring; returns the final latents."""
    RePaintScheduler = _oracle("RePaintScheduler")
    c = model.config.scheduler
    T = c.num_train_timesteps
    ref = RePaintScheduler(num_train_timesteps=T, beta_start=c.beta_start, beta_end=c.beta_end,
                           beta_schedule=c.beta_schedule, eta=0.0, clip_sample=False)
    ref.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)  # steps' level spacing
    ratio = T // steps
    levels = int(steps * strength)  # strength < 1: the walk over the lowest levels, as img2img's last steps
    walk = RePaintScheduler(num_train_timesteps=levels * ratio)
    walk.set_timesteps(levels, jump_length=jump_length, jump_n_sample=jump_n_sample)
    walk = walk.timesteps.tolist()

    g = torch.Generator().manual_seed(SEED)
    z0 = _per_prompt(encode_image(model, images, g))  # the image's posterior sample comes first
    noise = torch.randn(z0.shape, generator=g)  # then the initial noise
    known = _per_prompt(_known_latent_mask(masks))
    tok = model.tokenizer
    context = model.text_encoder(torch.cat([tok([NEGATIVE] * 4), tok([p for p in PROMPTS for _ in range(2)])]))

    def alpha_bar(level: int) -> float:
        return 1.0 if level < 0 else float(ref.alphas_cumprod[level])

    t0 = walk[0]
    # RePaint Alg. 1 starts from x_T ~ N(0, I); below strength 1, from the image latent noised to t0
    x = noise if strength == 1 else alpha_bar(t0) ** 0.5 * z0 + (1 - alpha_bar(t0)) ** 0.5 * noise
    t_last = t0 + 1
    for t in walk:
        if t < t_last:  # a descent t -> t - ratio (RePaintPipeline's rule)
            uncond, cond = model.unet(torch.cat([x, x]), t, context).chunk(2)
            eps = uncond + CFG * (cond - uncond)
            draws = g if t - ratio >= 0 else torch.Generator()  # at the clean level the draw is multiplied by 0
            x = ref.step(eps, t, x, z0, known, generator=draws).prev_sample
        else:  # a jump back: q(x_t | x_s) from level t_last - ratio to t - ratio
            r = alpha_bar(t - ratio) / alpha_bar(t_last - ratio)
            x = r ** 0.5 * x + (1 - r) ** 0.5 * torch.randn(x.shape, generator=g)
        t_last = t
    return x


@pytest.mark.parametrize("steps, jump_length, jump_n_sample, strength", [
    (5, 10, 1, 1.0),  # no resampling: RePaintScheduler.step at every level
    (6, 2, 3, 1.0),  # jumps of 2 levels, each revisited twice
    (8, 2, 2, 0.5),  # the walk over the lowest 4 of 8 levels, from the image noised to t = 300
])
def test_repaint_matches_the_oracle_walk(model, images, masks, steps, jump_length, jump_n_sample, strength):
    unet = model.unet
    unet.calls.clear()
    ours = pipelines.inpaint(model, images, masks, PROMPTS, variant="repaint", negative_prompt=NEGATIVE,
                             cfg_scale=CFG, batch_size=PER_PROMPT, steps=steps, sampler="ddim", seed=SEED,
                             strength=strength, jump_length=jump_length, jump_n_sample=jump_n_sample)
    ran = len(unet.calls)
    with torch.inference_mode():
        want = _oracle_repaint(model, images, masks, steps, jump_length, jump_n_sample, strength)
    what = f"repaint steps={steps} jumps {jump_length}x{jump_n_sample} strength={strength}"
    assert ours.unet_calls == ran, f"{what}: {ours.unet_calls} UNet calls reported, {ran} ran"
    _assert_latents(ours.latents, want, what)


def test_repaint_refuses_a_ddim_eta_before_any_unet_call(model, images, masks):
    """RePaint steps between its own levels, so set_timesteps checks none of them: the plan's steps
    are checked before sampling, and an eta one of them cannot take (1.2 at t = 100 -> 0) is refused
    before the first UNet call, not after nine of them."""
    unet = model.unet
    unet.calls.clear()
    with pytest.raises(ValueError, match=r"ddim: eta=1.2 is too large for the step t=100 -> 0"):
        pipelines.inpaint(model, images[:1], masks[:1], "a", variant="repaint", steps=10, jump_n_sample=1,
                          sampler="ddim", eta=1.2, cfg_scale=1.0, seed=0)
    assert unet.calls == [], f"the UNet ran at {unet.calls} before the refused step"


RUNS = {  # stochastic samplers: every step draws noise
    "txt2img euler_a": lambda m, im, mk: pipelines.txt2img(m, "a", sampler="euler_a", steps=3, seed=SEED,
                                                           height=SIZE, width=SIZE),
    "img2img ddpm": lambda m, im, mk: pipelines.img2img(m, im, "a", strength=0.7, sampler="ddpm", steps=3, seed=SEED),
    "img2img ddim eta 1": lambda m, im, mk: pipelines.img2img(m, im, "a", strength=1.0, sampler="ddim", eta=1.0,
                                                              steps=3, seed=SEED),
    "repaint ddpm": lambda m, im, mk: pipelines.inpaint(m, im, mk, "a", variant="repaint", sampler="ddpm", steps=4,
                                                        jump_length=1, jump_n_sample=2, seed=SEED),
    "blend euler_a": lambda m, im, mk: pipelines.inpaint(m, im, mk, "a", variant="blend", sampler="euler_a", steps=3,
                                                         seed=SEED),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_randomness_is_the_seed_alone(model, images, masks, run):
    """No global RNG (pipelines.common's randomness convention): the seed's generator draws every
    sample of noise, the sampler's included, so torch's global state neither changes the result nor
    is changed by the run."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        results.append(RUNS[run](model, images[:1], masks[:1]).latents)
        assert torch.equal(torch.get_rng_state(), state), f"{run}: the run drew from torch's global RNG"
    assert torch.equal(results[0], results[1]), f"{run}: the global seed changed the result. " + describe_diff(
        results[0], results[1])
