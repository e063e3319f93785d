"""sdcore.unet against diffusers' UNet2DConditionModel (random weights, built from our config),
and sdcore.convert.unet against diffusers' own single-file converter."""
from __future__ import annotations

import pytest
import torch

import kernels
from sdcore.config import SDConfig, UNetConfig
from sdcore.convert.unet import (config_from_diffusers, config_to_diffusers, diffusers_to_ldm, key_map,
                                 ldm_to_diffusers)
from sdcore.layers import GroupNorm
from sdcore.unet import BasicTransformerBlock, UNetModel
from kernels.testing import assert_close, assert_within_torch_error

try:  # the oracle; tests that do not compare against it run without it
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
except ImportError:
    UNet2DConditionModel = None
needs_diffusers = pytest.mark.skipif(UNet2DConditionModel is None, reason="diffusers is not installed (the oracle)")

TINY = ["tiny", "tiny-inpaint", "tiny-sd2"]
REL_FP32 = 1e-5  # max|ours - theirs| / max|theirs|, fp32 end to end


def _unet_cfg(preset: str) -> UNetConfig:
    return SDConfig.preset(preset).unet


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that keep activations O(1): W ~ N(0, 1/fan_in), norms' gains ~ 1 ± 0.2,
    biases ~ N(0, 0.2²) (the library inits would leave some paths near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _diffusers_unet(cfg: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    config = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    model = UNet2DConditionModel(**config).eval()
    _reinit_(model, seed)
    return model


def _ours_from(theirs: UNet2DConditionModel, cfg: UNetConfig, *, assign: bool = False) -> UNetModel:
    """Our UNet with their weights; ``assign`` shares the tensors (full-size models, half the memory)."""
    sd = diffusers_to_ldm(theirs.state_dict(), cfg)
    if assign:
        with torch.device("meta"):
            ours = UNetModel(cfg)
        ours.load_state_dict(sd, strict=True, assign=True)
    else:
        ours = UNetModel(cfg)
        ours.load_state_dict(sd, strict=True)
    return ours.eval()


def _inputs(cfg: UNetConfig, batch: int, h: int, w: int, tokens: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([999.0, 1.0, 500.0, 37.0][:batch])  # both ends of the schedule
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, context


def _check_against_diffusers(cfg: UNetConfig, batch: int, h: int, w: int, tokens: int, assign: bool = False):
    theirs = _diffusers_unet(cfg)
    ours = _ours_from(theirs, cfg, assign=assign)
    x, t, context = _inputs(cfg, batch, h, w, tokens)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert 0.1 < want.std().item() < 10, f"diffusers output std {want.std().item():.3g}: not O(1), test too weak"
    assert_close(got, want, rel=REL_FP32, name=f"UNet output vs diffusers, x{tuple(x.shape)}")


@needs_diffusers
@pytest.mark.parametrize("preset, batch, h, w, tokens", [
    ("tiny", 2, 16, 16, 7),  # SD 1.x structure: conv proj, 2 heads
    ("tiny", 1, 8, 24, 77),  # non-square latent, 77 text tokens
    ("tiny", 1, 9, 7, 77),  # sides not divisible by 4: stride-2 convs round up, upsamplers match the skips
    ("tiny-sd2", 1, 6, 10, 7),  # a 48x80 px image: a multiple of 8 px only, 6 -> 3 -> 2 and back up
    ("tiny-inpaint", 2, 16, 16, 7),  # 9 input channels
    ("tiny-sd2", 2, 16, 16, 7),  # SD 2.x structure: linear proj, head dim 8
])
def test_matches_diffusers(preset, batch, h, w, tokens):
    _check_against_diffusers(_unet_cfg(preset), batch, h, w, tokens)


@needs_diffusers
@pytest.mark.parametrize("preset", TINY)
def test_every_norm_eps_matches_diffusers(preset, norm_eps_mismatches):
    cfg = _unet_cfg(preset)
    n, bad = norm_eps_mismatches(UNetModel(cfg), _diffusers_unet(cfg), key_map(cfg))
    assert n >= 10 and not bad, f"{n} norms compared; {len(bad)} differ: " + "; ".join(bad[:5])


@needs_diffusers
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd15-inpaint", "sd21"])
def test_matches_diffusers_full_size(preset):
    _check_against_diffusers(_unet_cfg(preset), 1, 16, 16, 77, assign=True)  # 16x16: divisible by 8


@needs_diffusers
@pytest.mark.parametrize("preset", TINY)
def test_state_dict_round_trip(preset):
    cfg = _unet_cfg(preset)
    sd = _diffusers_unet(cfg).state_dict()
    back = ldm_to_diffusers(diffusers_to_ldm(sd, cfg), cfg)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


@needs_diffusers
@pytest.mark.parametrize("preset", TINY)
def test_ldm_keys_convert_like_diffusers_single_file(preset):
    """diffusers' own LDM->diffusers converter, fed our keys, must give their state dict exactly."""
    cfg = _unet_cfg(preset)
    theirs = _diffusers_unet(cfg).state_dict()
    ldm = diffusers_to_ldm(theirs, cfg)
    assert set(ldm) == set(UNetModel(cfg).state_dict())
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()},
                                            config_to_diffusers(cfg))
    assert sorted(converted) == sorted(theirs)
    for k, v in theirs.items():
        assert torch.equal(converted[k], v), k


@needs_diffusers
def test_full_size_key_maps_are_bijective_and_shaped():
    """The SD 1.5 / 2.1 key maps, checked on the meta device (no weights): one-to-one, and each
    of our parameters has the shape of the diffusers parameter it maps to."""
    for preset in ["sd15", "sd15-inpaint", "sd21"]:
        cfg = _unet_cfg(preset)
        mapping = key_map(cfg)
        assert len(set(mapping.values())) == len(mapping)
        with torch.device("meta"):
            ours = UNetModel(cfg).state_dict()
            theirs = UNet2DConditionModel(
                **{k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}).state_dict()
        assert sorted(mapping.values()) == sorted(theirs), preset
        bad = [k for k, d in mapping.items() if ours[k].shape != theirs[d].shape]
        assert not bad, f"{preset}: shape mismatch at {bad[:5]}"


def _ldm_yaml_params(cfg: UNetConfig) -> dict:
    """``unet_config.params`` as written in v1-inference.yaml / v2-inference(-v).yaml."""
    params = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                  attention_resolutions=list(cfg.attention_resolutions), num_res_blocks=cfg.num_res_blocks,
                  channel_mult=list(cfg.channel_mult), transformer_depth=cfg.transformer_depth,
                  context_dim=cfg.context_dim, use_linear_in_transformer=cfg.use_linear_in_transformer)
    if cfg.num_head_channels == -1:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    return params


@needs_diffusers
@pytest.mark.parametrize("preset", ["sd15", "sd15-inpaint", "sd21", "sd21-base", *TINY])
def test_config_round_trip_and_diffusers_agrees(preset):
    cfg = _unet_cfg(preset)
    ours = config_to_diffusers(cfg)
    # num_heads is unused (not recoverable) when num_head_channels is set.
    expected = cfg if cfg.num_head_channels == -1 else cfg.replace(num_heads=UNetConfig.num_heads)
    assert config_from_diffusers(ours) == expected
    original = {"model": {"params": {"unet_config": {"params": _ldm_yaml_params(cfg)},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with pytest.warns(FutureWarning):  # image_size is deprecated there; passing it avoids a checkpoint probe
        theirs = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    for k, v in theirs.items():
        if k in ours:
            assert ours[k] == v, f"{k}: ours {ours[k]!r}, diffusers' {v!r}"


def test_config_from_published_sd21_json():
    """stabilityai/stable-diffusion-2-1 unet/config.json (the fields that matter)."""
    published = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "upcast_attention": True,
        "use_linear_projection": True,
    }
    assert config_from_diffusers(published) == _unet_cfg("sd21")
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        config_from_diffusers({**published, "resnet_time_scale_shift": "scale_shift"})
    # options that change the architecture, at values our LDM UNet does not build: refused by name
    for key, value in [("time_embedding_act_fn", "silu"), ("timestep_post_act", "silu"),
                       ("cross_attention_norm", "group_norm"), ("mid_block_only_cross_attention", True),
                       ("encoder_hid_dim_type", "text_proj"), ("addition_time_embed_dim", 256),
                       ("projection_class_embeddings_input_dim", 2816), ("class_embeddings_concat", True)]:
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            config_from_diffusers({**published, key: value})


@needs_diffusers
def test_diffusers_default_config_is_accepted():
    """Every UNet2DConditionModel argument at its default value (what a config.json that sets it
    explicitly holds) passes the supported-options check: the allowed values include diffusers'."""
    import inspect

    from diffusers import UNet2DConditionModel

    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if k != "self" and p.default is not inspect.Parameter.empty}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    assert config_from_diffusers(defaults).model_channels == 320


def test_conversion_reports_missing_and_unexpected_keys():
    cfg = _unet_cfg("tiny")
    sd = UNetModel(cfg).state_dict()
    broken = {k: v for k, v in sd.items() if not k.startswith("out.")}
    broken["input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"4 missing LDM keys .*'out\.0\.weight'.*1 unexpected LDM keys"):
        ldm_to_diffusers(broken, cfg)
    dsd = ldm_to_diffusers(sd, cfg)
    del dsd["conv_in.weight"]
    with pytest.raises(KeyError, match=r"1 missing diffusers keys .*conv_in\.weight"):
        diffusers_to_ldm(dsd, cfg)
    with pytest.raises(KeyError, match=r"\d+ missing diffusers keys"):  # weights of a shallower UNet
        diffusers_to_ldm(ldm_to_diffusers(sd, cfg), cfg.replace(num_res_blocks=2))


def test_input_errors():
    cfg = _unet_cfg("tiny")
    unet = UNetModel(cfg)
    x, t, context = _inputs(cfg, 2, 16, 16, 5)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\).*9 channels"):
        unet(torch.randn(2, 9, 16, 16), t, context)
    with pytest.raises(TypeError, match=r"x \(torch.float16\) and context \(torch.float32\) must have the "
                                        r"model's dtype torch.float32"):
        unet(x.half(), t, context)
    with pytest.raises(ValueError, match=r"context of shape \(B, L >= 1, 32\)"):
        unet(x, t, torch.randn(2, 5, 768))
    with pytest.raises(ValueError, match="batch mismatch"):
        unet(x, t, context[:1])
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, torch.tensor([1.0, 2.0, 3.0]), context)
    with pytest.raises(ValueError, match=r"empty batch: x\(0, 4, 16, 16\)"):
        unet(x[:0], t[:0], context[:0])
    with pytest.raises(ValueError, match=r"L >= 1.*got \(2, 0, 32\)"):
        unet(x, t, context[:, :0])
    with pytest.raises(ValueError, match=r"empty latent: x\(2, 4, 0, 16\)"):
        unet(x[:, :, :0], t, context)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(  # autocast leaves fp64 as it is
            TypeError, match=r"x \(torch.float64\).*torch.float32 \(or autocast's torch.bfloat16\)"):
        unet(x.double(), t, context)


@needs_diffusers
def test_autocast_matches_diffusers():
    """Under CPU bf16 autocast the UNet takes latents in autocast's dtype (as vae.encode returns them
    there) with an fp32 context, as diffusers' does; both against the fp32 output, ours at most 2x
    diffusers' error (+ 1e-2: bf16 keeps 8 bits)."""
    cfg = _unet_cfg("tiny")
    theirs = _diffusers_unet(cfg)
    ours = _ours_from(theirs, cfg)
    x, t, context = _inputs(cfg, 2, 8, 8, 7)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x.bfloat16(), t, context)
            torch_out = theirs(x.bfloat16(), t, encoder_hidden_states=context).sample
    assert got.dtype == torch_out.dtype, (got.dtype, torch_out.dtype)
    assert_within_torch_error(got, torch_out, want, atol=1e-2, name="tiny UNet under bf16 autocast")


def test_channel_mult_must_start_with_1():
    """LDM builds its output conv on model_channels (openaimodel.py), diffusers its conv_in and time
    embedding on the first level's width: neither has a first multiplier other than 1, so such a
    config is refused when built, not at the first forward."""
    import sdcore

    cfg = SDConfig.preset("tiny")
    bad = cfg.replace(unet=cfg.unet.replace(channel_mult=(2, 2, 4)))
    match = r"channel_mult=\(2, 2, 4\): must start with 1.*model_channels=64, channel_mult=\(1, 1, 2\)"
    with pytest.raises(ValueError, match=match):
        UNetModel(bad.unet)
    with pytest.raises(ValueError, match=match):
        sdcore.StableDiffusion.from_config(bad)
    with pytest.raises(ValueError, match=match):
        config_to_diffusers(bad.unet)
    with pytest.raises(ValueError, match=r"channel_mult=\(3, 4\): must start with 1, [^;]*$"):
        UNetModel(cfg.unet.replace(channel_mult=(3, 4)))  # no whole-number rescaling to suggest


def test_scalar_timestep_broadcasts():
    cfg = _unet_cfg("tiny")
    unet = UNetModel(cfg).eval()
    _reinit_(unet, 3)
    x, _, context = _inputs(cfg, 2, 8, 8, 3)
    with torch.no_grad():
        want = unet(x, torch.tensor([250, 250]), context)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0])):
            assert_close(unet(x, t, context), want, atol=0, name=f"t={t!r}")


def test_routes_through_kernels():
    """Every GroupNorm (fused SiLU where LDM has GN -> SiLU) and every attention dispatches."""
    cfg = _unet_cfg("tiny")
    unet = UNetModel(cfg).eval()
    norms = [m for m in unet.modules() if isinstance(m, GroupNorm)]
    assert not any(isinstance(m, torch.nn.GroupNorm) and not isinstance(m, GroupNorm) for m in unet.modules())
    resblocks = sum(1 for name, _ in unet.named_modules() if name.endswith("in_layers"))
    assert sum(m.act == "silu" for m in norms) == 2 * resblocks + 1  # in/out layers of each, and `out`
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    x, t, context = _inputs(cfg, 1, 8, 8, 3)
    kernels.reset_counts()
    with torch.no_grad(), kernels.use(group_norm_silu="reference", attention="reference"):
        unet(x, t, context)
    assert kernels.counts() == {("group_norm_silu", "reference"): len(norms),
                                ("attention", "reference"): 2 * blocks}



def test_embedding_silu_runs_once_per_call():
    """Every ResBlock's emb_layers start with SiLU(emb) of the same emb: the UNet applies it once
    (the time embedding's own SiLU is the other), not once per ResBlock (22 launches in SD 1.5)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSilu(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSilu.n += func.overloadpacket is torch.ops.aten.silu
            return func(*args, **(kwargs or {}))

    cfg = _unet_cfg("tiny")
    unet = UNetModel(cfg).eval()
    fused = sum(isinstance(m, GroupNorm) and m.act == "silu" for m in unet.modules())
    x, t, context = _inputs(cfg, 1, 8, 8, 3)
    with torch.no_grad(), kernels.use(group_norm_silu="reference"), CountSilu():
        unet(x, t, context)
    assert CountSilu.n == fused + 2, f"{CountSilu.n} SiLUs, expected {fused} fused into norms + 2 on the embedding"


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_half_precision_on_gpu(preset):
    """fp16 on CUDA with the default kernels (triton where registered) vs an fp64 CPU run: at most
    2x the error of the same UNet on plain-torch ops in fp16 (flash-attention's rule)."""
    cfg = _unet_cfg(preset)
    unet = UNetModel(cfg).eval()
    _reinit_(unet, 0)
    x, t, context = _inputs(cfg, 2, 16, 16, 7)
    with torch.no_grad():
        want = unet.double()(x.double(), t, context.double())
        unet.to("cuda", torch.float16)
        args = (x.cuda().half(), t.cuda(), context.cuda().half())
        with kernels.use(group_norm_silu="reference", attention="reference"):
            torch_out = unet(*args)
        got = unet(*args)
    assert_close(torch_out, want, rel=1e-2, name="fp16 UNet on torch ops vs fp64")
    assert_within_torch_error(got, torch_out, want, name="fp16 UNet on default kernels")


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])  # conv and linear projections
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_transformer_keeps_its_input_layout(preset, channels_last):
    """The residual sum takes the block input's memory format: SD 2's linear projection back is a
    channels_last view, and a channels_last sum sent the next GroupNorm down torch's CPU
    channels_last path (6e-5 from fp64 at batch 3, where diffusers, which copies to contiguous,
    was 2.6e-6)."""
    from sdcore.unet import SpatialTransformer

    cfg = _unet_cfg(preset)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    block = SpatialTransformer(ch, cfg).eval()
    _, _, context = _inputs(cfg, 3, 5, 7, 7)
    x = torch.randn(3, ch, 5, 7, generator=torch.Generator().manual_seed(0))  # the block's width, not the UNet's input
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        y = block(x, context)
    assert y.is_contiguous(memory_format=fmt), f"{preset}: output strides {y.stride()} for input strides {x.stride()}"
