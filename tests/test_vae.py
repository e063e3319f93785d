"""sdcore.vae.AutoencoderKL against diffusers' AutoencoderKL on random weights (no downloads), and
the diffusers <-> LDM state-dict conversion both ways and against diffusers' single-file converter.

The oracle is diffusers' model built from ``config_to_diffusers(cfg)``; its weights reach ours only
through ``diffusers_to_ldm`` and a ``strict=True`` load, so a wrong rule fails loudly.
"""
import copy
import re

import pytest
import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

import kernels
from kernels.testing import assert_close, assert_within_torch_error
from sdcore.config import SDConfig, VAEConfig
from sdcore.convert.vae import (config_from_diffusers, config_to_diffusers, diffusers_to_ldm, key_map,
                                ldm_to_diffusers)
from sdcore.vae import AutoencoderKL, DiagonalGaussian

TINY = SDConfig.preset("tiny").vae
SD15 = SDConfig.preset("sd15").vae
TINY_ATTN = TINY.replace(attn_resolutions=(64,))  # attention blocks on level 2 (256 / 2^2), as LDM places them

# fp32 against diffusers' fp32: random-weight decoders amplify rounding; both models sit ~2e-6
# from an fp64 run of diffusers at tiny size.
FP32_REL = 1e-5


def _pair(cfg: VAEConfig, seed: int = 0):
    """(ours, diffusers') with the same random weights, carried by diffusers_to_ldm, strict load."""
    torch.manual_seed(seed)
    theirs = DiffusersAutoencoderKL.from_config(config_to_diffusers(cfg)).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), cfg), strict=True)
    return ours, theirs


def _images(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _outputs(ours, theirs, images) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (ours, diffusers')}: the posterior's mean, logvar and std, and the decoding of
    diffusers' mean (the same latents into both decoders)."""
    with torch.no_grad():
        post, ref = ours.encode(images), theirs.encode(images).latent_dist
        z = ref.mean
        return {"encode mean": (post.mean, ref.mean), "encode logvar": (post.logvar, ref.logvar),
                "encode std": (post.std, ref.std), "decode": (ours.decode(z), theirs.decode(z).sample)}


def _compare(ours, theirs, images):
    for name, (got, want) in _outputs(ours, theirs, images).items():
        assert_close(got, want, rel=FP32_REL, name=name)


@pytest.mark.parametrize("cfg, shape", [
    (TINY, (2, 3, 32, 32)),  # smallest tiny input: 4x4 latent, batch 2
    (TINY, (1, 3, 64, 40)),  # non-square, W/8 = 5 odd
    (TINY_ATTN, (1, 3, 32, 32)),  # attn_resolutions: diffusers' Attn{Down,Up}*Block2D
], ids=["tiny-32", "tiny-64x40", "tiny-attn"])
def test_matches_diffusers(cfg, shape):
    ours, theirs = _pair(cfg)
    _compare(ours, theirs, _images(shape))


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN], ids=["tiny", "tiny-attn"])
def test_every_norm_eps_matches_diffusers(cfg, norm_eps_mismatches):
    ours, theirs = _pair(cfg)
    n, bad = norm_eps_mismatches(ours, theirs, key_map(cfg))
    assert n >= 10 and not bad, f"{n} norms compared; {len(bad)} differ: " + "; ".join(bad[:5])


@pytest.mark.slow
def test_matches_diffusers_sd15():
    """The full SD VAE on a small image (8x8 latent). In fp64 the two models agree to rounding. In
    fp32 both sit ~1.2e-5 (of the largest value) from that fp64 run, since a 512-channel decoder of
    random weights amplifies rounding past FP32_REL, so ours may be at most 2x as far from it as
    diffusers' fp32 run, plus 1e-6 of the largest value."""
    ours, theirs = _pair(SD15)
    images = _images((1, 3, 64, 64))
    ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    oracle = _outputs(ours64, theirs64, images.double())
    for name, (got, want) in oracle.items():
        assert_close(got, want, rel=1e-10, name=f"{name} (fp64)")
    for name, (got, want) in _outputs(ours, theirs, images).items():
        fp64 = oracle[name][1]  # diffusers' fp64 run
        assert_within_torch_error(got, want, fp64, atol=1e-6 * fp64.abs().max().item(), name=f"{name} (fp32)")


def test_sample_matches_diffusers_and_reparameterisation():
    ours, theirs = _pair(TINY)
    images = _images((2, 3, 32, 32))
    with torch.no_grad():
        post, ref = ours.encode(images), theirs.encode(images).latent_dist
    got = post.sample(torch.Generator().manual_seed(7))
    assert_close(got, ref.sample(torch.Generator().manual_seed(7)), rel=FP32_REL, name="sample vs diffusers")
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, post.mean + post.std * eps), "sample() is not mean + std * randn(generator)"
    assert torch.equal(post.mode(), post.mean)
    assert not torch.equal(got, post.sample(torch.Generator().manual_seed(8))), "generator ignored"
    # one generator per sample, as diffusers' randn_tensor takes them
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    got = post.sample(gens())
    assert_close(got, ref.sample(gens()), rel=FP32_REL, name="sample with a list of generators vs diffusers")
    assert torch.equal(got[1:], post.mean[1:] + post.std[1:] * torch.randn(
        post.mean[1:].shape, generator=torch.Generator().manual_seed(4))), "sample 1 not drawn from generator 1"
    with pytest.raises(ValueError, match=r"one torch.Generator per sample \(2\), got \['Generator'\]"):
        post.sample(gens()[:1])
    with pytest.raises(TypeError, match="generator must be a torch.Generator, a list of them .* got int"):
        post.sample(7)


def test_kl_matches_diffusers_and_the_closed_form():
    """KL(q(z|x) || N(0, I)) per sample: diffusers' ``DiagonalGaussianDistribution.kl`` and
    torch.distributions' Normal-to-Normal KL in fp64, summed over (C, H, W)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(3, 8, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = DiagonalGaussian(moments).kl()
    mean, logvar = moments.chunk(2, dim=1)
    q, p = torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert got.shape == (3,), f"one KL per sample, got shape {tuple(got.shape)}"
    assert_close(got, want, rel=1e-12, name="KL vs torch.distributions")
    assert_close(got, DiagonalGaussianDistribution(moments).kl(), rel=1e-12, name="KL vs diffusers")
    assert DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl().item() == 0.0, "KL(N(0, I) || N(0, I)) is 0"


def test_logvar_clamped_like_diffusers():
    ours, theirs = _pair(TINY)
    with torch.no_grad():  # huge moments, both signs: logvar far outside (-30, 20) before clamping
        for m in (ours, theirs):
            m.quant_conv.weight.mul_(1e4)
        images = _images((1, 3, 32, 32))
        post, ref = ours.encode(images), theirs.encode(images).latent_dist
        raw = ours.quant_conv(ours.encoder(images)).chunk(2, dim=1)[1]
    assert post.logvar.min().item() == -30.0 and post.logvar.max().item() == 20.0, (
        f"logvar range [{post.logvar.min().item()}, {post.logvar.max().item()}] not clamped to [-30, 20]")
    # A clamp never widens a difference: the bound is the unclamped one, relative to the raw logvar's
    # size (1e4 times the weights: the few values left in range are sums that cancel, whose fp32
    # rounding differs with the CPU's convolution kernels, by 7.6e-4 on an AVX2 CPU).
    scale = raw.abs().max().item()
    assert_close(post.logvar, ref.logvar, atol=FP32_REL * scale, name=f"clamped logvar (raw up to {scale:.3g})")
    assert torch.isfinite(post.std).all() and torch.isfinite(post.sample(torch.Generator().manual_seed(0))).all()


def test_logvar_clamp_follows_config():
    cfg = TINY.replace(logvar_clamp=(-0.1, 0.2))  # inside the raw range of this random model
    torch.manual_seed(0)
    model = AutoencoderKL(cfg).eval()
    images = _images((1, 3, 32, 32))
    with torch.no_grad():
        raw = model.quant_conv(model.encoder(images)).chunk(2, dim=1)[1]
        post = model.encode(images)
    assert raw.min() < -0.1 and raw.max() > 0.2, "test input does not reach the clamp"
    assert torch.equal(post.logvar, raw.clamp(-0.1, 0.2))


def _state(model_cls, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A fresh random state dict with ``model_cls(cfg)``'s keys and shapes; meta tensors (shapes
    only) at SD size, where 84M random numbers would buy nothing."""
    with torch.device("meta"):
        model = model_cls.from_config(config_to_diffusers(cfg)) if model_cls is DiffusersAutoencoderKL else model_cls(cfg)
    g = torch.Generator().manual_seed(0)
    real = cfg is not SD15
    return {k: torch.randn(v.shape, generator=g) if real else torch.empty(v.shape, device="meta")
            for k, v in model.state_dict().items()}


def _assert_same_state(got, want, what):
    assert set(got) == set(want), (f"{what}: only got: {sorted(set(got) - set(want))[:10]}, "
                                   f"only want: {sorted(set(want) - set(got))[:10]}")
    for k in want:
        assert got[k].shape == want[k].shape, f"{what} {k}: {tuple(got[k].shape)} != {tuple(want[k].shape)}"
        if want[k].device.type != "meta":
            assert torch.equal(got[k], want[k]), f"{what} {k}: values differ"


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN, SD15], ids=["tiny", "tiny-attn", "sd15"])
def test_conversion_round_trip_exact(cfg):
    theirs = _state(DiffusersAutoencoderKL, cfg)
    _assert_same_state(ldm_to_diffusers(diffusers_to_ldm(theirs, cfg), cfg), theirs, "diffusers -> ldm -> diffusers")
    ours = _state(AutoencoderKL, cfg)
    _assert_same_state(diffusers_to_ldm(ldm_to_diffusers(ours, cfg), cfg), ours, "ldm -> diffusers -> ldm")


@pytest.mark.parametrize("cfg", [TINY, SD15], ids=["tiny", "sd15"])
def test_matches_diffusers_single_file_converter(cfg):
    """Our ldm_to_diffusers agrees, key for key and bit for bit, with diffusers' own
    ``convert_ldm_vae_checkpoint(checkpoint, config)`` on a prefixed single-file state dict."""
    ours = _state(AutoencoderKL, cfg)
    single_file = {f"first_stage_model.{k}": v for k, v in ours.items()}
    single_file["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the UNet's keys: ignored
    _assert_same_state(ldm_to_diffusers(ours, cfg), convert_ldm_vae_checkpoint(single_file, config_to_diffusers(cfg)),
                       "ours vs convert_ldm_vae_checkpoint")


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN, SD15], ids=["tiny", "tiny-attn", "sd15"])
def test_config_round_trip(cfg):
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    with torch.device("meta"):  # diffusers' own (FrozenDict) config, with its added defaults
        theirs = DiffusersAutoencoderKL.from_config(config_to_diffusers(cfg))
    assert config_from_diffusers(theirs.config) == cfg


def test_config_from_diffusers_json_file(tmp_path):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config_to_diffusers(SD15), "sample_size": 512, "force_upcast": True}))
    assert config_from_diffusers(path) == SD15
    assert config_from_diffusers(str(path)).scaling_factor == 0.18215


@pytest.mark.parametrize("change, match", [
    ({"shift_factor": 0.1159}, "shift_factor"),  # SD3/Flux VAE
    ({"use_quant_conv": False}, "quant_conv"),
    ({"down_block_types": ["DownBlock2D"] * 4}, "unsupported VAE block type"),
    ({"block_out_channels": [128, 256, 512]}, "mirror"),
])
def test_config_from_diffusers_rejects(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_diffusers({**config_to_diffusers(SD15), **change})


@pytest.mark.parametrize("change, match", [
    ({"norm_eps": 1e-5}, "norm_eps"),
    ({"embed_dim": 8}, "embed_dim"),
    ({"double_z": False}, "double_z"),
    ({"ch_mult": (2, 2, 4)}, r"ch_mult\[0\] == 1.*ch=64, ch_mult=\(1, 1, 2\)"),  # LDM builds it; diffusers cannot
])
def test_config_to_diffusers_rejects(change, match):
    with pytest.raises(ValueError, match=match):
        config_to_diffusers(TINY.replace(**change))


def _tiny_diffusers_state():
    with torch.device("meta"):
        return DiffusersAutoencoderKL.from_config(config_to_diffusers(TINY)).state_dict()


def test_conversion_key_errors():
    sd = dict(_tiny_diffusers_state())
    removed = sorted(sd)[:12]
    for k in removed:
        del sd[k]
    sd["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"12 missing \(first 10: .*; 1 unexpected .*encoder\.extra\.weight"):
        diffusers_to_ldm(sd, TINY)
    with pytest.raises(KeyError, match="missing"):
        diffusers_to_ldm(_tiny_diffusers_state(), SD15)  # weights of another config
    ldm = diffusers_to_ldm(_tiny_diffusers_state(), TINY)
    ldm["decoder.up.9.upsample.conv.weight"] = ldm.pop("decoder.up.3.upsample.conv.weight")
    with pytest.raises(KeyError, match="1 missing .*1 unexpected"):
        ldm_to_diffusers(ldm, TINY)


def _legacy_names(sd: dict) -> dict:
    """``sd`` with the attention keys diffusers wrote before 0.14 (``AttentionBlock``)."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in legacy.items():
            k = re.sub(rf"(\.attentions\.\d+)\.{re.escape(new)}\.", rf"\1.{old}.", k)
        out[k] = v
    return out


def test_pre_014_attention_names_convert_like_diffusers_loads_them(tmp_path):
    """Mid-block and Attn{Down,Up}*Block2D attentions under their old names: diffusers'
    from_pretrained renames them on load; diffusers_to_ldm must give the same model."""
    torch.manual_seed(0)
    theirs = DiffusersAutoencoderKL.from_config(config_to_diffusers(TINY_ATTN)).eval()
    old = _legacy_names({k: v.contiguous() for k, v in theirs.state_dict().items()})
    assert sum(k.endswith(".query.weight") for k in old) == 2 + 1 + 2  # mid blocks, encoder level, decoder level
    assert not any(".to_q." in k for k in old)
    theirs.save_pretrained(tmp_path)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = DiffusersAutoencoderKL.from_pretrained(tmp_path).eval()
    ours = AutoencoderKL(TINY_ATTN).eval()
    ours.load_state_dict(diffusers_to_ldm(old, TINY_ATTN), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                  diffusers_to_ldm(loaded.state_dict(), TINY_ATTN).values()))
    _compare(ours, loaded, _images((1, 3, 32, 32)))


def test_pre_014_attention_name_errors():
    sd = dict(_tiny_diffusers_state())
    sd["decoder.mid_block.attentions.0.query.weight"] = sd["decoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(KeyError, match=r"both 'decoder\.mid_block\.attentions\.0\.query\.weight' .* and "
                                       r"'decoder\.mid_block\.attentions\.0\.to_q\.weight'"):
        diffusers_to_ldm(sd, TINY)
    sd = _legacy_names(_tiny_diffusers_state())
    sd["encoder.mid_block.attentions.0.proj_attn.weight"] = torch.empty(64, 32, device="meta")
    with pytest.raises(ValueError, match=r"'encoder\.mid_block\.attentions\.0\.proj_attn\.weight': shape \(64, 32, 1, 1\)"):
        diffusers_to_ldm(sd, TINY)  # a shape error names the key as stored


def test_conversion_shape_error():
    sd = dict(_tiny_diffusers_state())
    sd["encoder.conv_in.weight"] = torch.empty(32, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight.*\(32, 4, 3, 3\).*\(32, 3, 3, 3\)"):
        diffusers_to_ldm(sd, TINY)


@pytest.mark.parametrize("method, x, error, match", [
    ("encode", torch.zeros(1, 4, 32, 32), ValueError, r"\(B, 3, H, W\)"),  # RGBA
    ("encode", torch.zeros(3, 32, 32), ValueError, r"\(B, 3, H, W\)"),  # no batch dim
    ("encode", torch.zeros(1, 3, 36, 32), ValueError, "multiples of 8"),  # 36 % 8
    ("encode", torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "dtype"),  # raw pixels
    ("encode", torch.zeros(1, 3, 32, 32, dtype=torch.float64), TypeError, "dtype"),
    ("decode", torch.zeros(1, 3, 4, 4), ValueError, r"\(B, 4, H, W\)"),
    ("decode", torch.zeros(1, 4, 4, 4, dtype=torch.float16), TypeError, "dtype"),
    ("encode", torch.zeros(1, 3, 0, 32), ValueError, r"empty image: \(1, 3, 0, 32\)"),
    ("decode", torch.zeros(1, 4, 4, 0), ValueError, r"empty latent: \(1, 4, 4, 0\)"),
    ("encode", [[0.0]], TypeError, r"encode: expected a \(B, 3, H, W\) float tensor, got list"),  # was AttributeError
])
def test_input_errors(method, x, error, match):
    model = AutoencoderKL(TINY)
    with pytest.raises(error, match=match):
        getattr(model, method)(x)


def test_autocast_matches_diffusers():
    """Under CPU bf16 autocast, forward (encode, then decode of the bf16 latents encode returns
    there) runs as diffusers' does; both against the fp32 output, ours at most 2x diffusers' error
    (+ 1e-2: bf16 keeps 8 bits). Outside autocast a bf16 input stays an error (test_input_errors)."""
    ours, theirs = _pair(TINY_ATTN)
    images = _images((1, 3, 32, 32))
    with torch.no_grad():
        want = theirs(images).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, posterior = ours(images)
            torch_out = theirs(images).sample
        assert posterior.mean.dtype == torch.bfloat16, posterior.mean.dtype
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(  # autocast leaves fp64 as it is
                TypeError, match=r"torch.float64 != the model's torch.float32 \(or autocast's torch.bfloat16\); "
                                 r"convert one of them \(latents as floats\)"):
            ours.decode(posterior.mean.double())
    assert got.dtype == torch_out.dtype, (got.dtype, torch_out.dtype)
    assert_within_torch_error(got, torch_out, want, atol=1e-2, name="tiny VAE forward under bf16 autocast")


def _expected_dispatches(cfg: VAEConfig) -> tuple[int, int]:
    """(group norms, attentions) in one encode + one decode: 2 per ResnetBlock, 1 per AttnBlock,
    1 norm_out per half; mid = 2 ResnetBlocks + 1 AttnBlock per half."""
    levels, n = len(cfg.ch_mult), cfg.num_res_blocks
    attn_levels = sum(256 // 2**i in cfg.attn_resolutions for i in range(levels))
    resnets = levels * n + levels * (n + 1) + 4
    attns = 2 + attn_levels * (n + (n + 1))
    return 2 * resnets + attns + 2, attns


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN], ids=["tiny", "tiny-attn"])
def test_routes_through_kernels(cfg):
    torch.manual_seed(0)
    model = AutoencoderKL(cfg).eval()
    images = _images((1, 3, 32, 32))
    gn, attn = _expected_dispatches(cfg)
    with torch.no_grad(), kernels.use(group_norm_silu="reference", attention="reference"):
        ref = model.decode(model.encode(images).mean)
    assert kernels.counts() == {("group_norm_silu", "reference"): gn, ("attention", "reference"): attn}
    kernels.reset_counts()
    with torch.no_grad(), kernels.use(attention="sdpa", group_norm_silu="reference"):
        out = model.decode(model.encode(images).mean)
    assert kernels.counts() == {("group_norm_silu", "reference"): gn, ("attention", "sdpa"): attn}
    assert_close(out, ref, rel=FP32_REL, name="sdpa vs reference attention")


def test_a_16_bit_model_under_its_autocast_takes_fp32_inputs():
    """Autocast casts an fp32 input at the model's first convolution, and diffusers' AutoencoderKL
    takes it: a bf16 VAE under bf16 autocast refused fp32 images and latents, with a message naming
    bf16 twice. The UNet the same for fp32 latents and context."""
    from sdcore.config import SDConfig
    from sdcore.unet import UNetModel

    vae = AutoencoderKL(TINY).to(torch.bfloat16).eval()
    images = _images((1, 3, 32, 32))
    cfg = SDConfig.preset("tiny").unet
    unet = UNetModel(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        want_mean = vae.encode(images.bfloat16()).mean
        want_eps = unet(torch.ones(1, 4, 8, 8, dtype=torch.bfloat16), 10, torch.ones(1, 3, cfg.context_dim, dtype=torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean = vae.encode(images).mean
            assert vae.decode(mean.float()).dtype == torch.bfloat16
            eps = unet(torch.ones(1, 4, 8, 8), 10, torch.ones(1, 3, cfg.context_dim))
    assert torch.equal(mean, want_mean) and torch.equal(eps, want_eps)  # the cast is the first op's, exactly
