"""sdcore.convert and sdcore.detect: the cases the component tests (test_clip, test_unet, test_vae,
test_checkpoint) leave open, found by mutation testing. Each test names the rule it holds:
layers kept for SD 1.x at clip_skip 2, the hub's ``position_ids`` buffer, dtypes, diffusers'
``num_attention_heads`` and the middle block's head count, and the shape rules of detection on
architectures no preset has. Oracles are transformers/diffusers models with random weights."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel

from kernels.testing import assert_close
from sdcore import SDConfig, StableDiffusion
from sdcore.clip import LOGIT_SCALE_INIT, TextEncoder
from sdcore.convert import clip as conv
from sdcore.convert import unet as unet_conv
from sdcore.detect import CheckpointError, detect_config
from sdcore.unet import UNetModel
from test_clip import REL_FP32, hf_model, randomize_, text_cfg, token_ids
from test_unet import _check_against_diffusers, _diffusers_unet, _inputs, _reinit_


def _shapes(cfg: SDConfig) -> dict[str, tuple]:
    """A single file's keys and shapes for ``cfg`` (meta skeleton, no weights)."""
    return {k: tuple(v.shape) for k, v in StableDiffusion.skeleton(cfg).state_dict().items()}


# ------------------------------------------------------------------------------------ text encoder
def test_sd1_folder_at_clip_skip_2_is_cut_after_the_output_layer():
    """kind="clip" at clip_skip 2: the diffusers folder holds layers [0, L - 1) only, and
    transformers' last_hidden_state of that folder is our clip_skip-2 output."""
    cfg = text_cfg("tiny", clip_skip=2)  # 2 layers -> the folder has 1
    ours = randomize_(TextEncoder(cfg))
    diff = conv.ldm_to_diffusers(ours.state_dict(), cfg)
    layers = sorted({k.split(".")[3] for k in diff if k.startswith("text_model.encoder.layers.")})
    assert layers == ["0"], f"folder layers {layers}, want ['0'] (L=2, clip_skip=2)"
    theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(conv.config_to_diffusers(cfg))).eval()
    theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in diff.items()}, strict=True)
    ids = token_ids(cfg)
    with torch.no_grad():
        assert_close(theirs(ids).last_hidden_state, ours(ids), rel=REL_FP32, name="1-layer folder vs clip_skip 2")


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["hub-prefix", "no-prefix"])
def test_position_ids_buffer_of_hub_files_is_dropped(preset, prefixed):
    """Hub text_encoder files (saved by older transformers) also store ``embeddings.position_ids``; it is
    no parameter of ours, so it is dropped, with or without the ``text_model.`` prefix."""
    cfg = text_cfg(preset, clip_skip=1)
    sd = randomize_(TextEncoder(cfg)).state_dict()
    diff = conv.ldm_to_diffusers(sd, cfg, with_projection=cfg.kind == "openclip")
    if not prefixed:
        diff = {k.removeprefix("text_model."): v for k, v in diff.items()}
    diff[("text_model." if prefixed else "") + "embeddings.position_ids"] = torch.arange(cfg.max_length)[None]
    back = conv.diffusers_to_ldm(diff, cfg)
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_text_encoder_converts_in_its_dtype(dtype):
    """A half-precision CLIPTextModelWithProjection converts to tensors of that dtype only: the
    logit_scale placeholder (it has none) too, with OpenCLIP's initial value."""
    cfg = text_cfg("tiny-sd2", clip_skip=1)
    sd = conv.diffusers_to_ldm(hf_model(cfg, with_projection=True).to(dtype).state_dict(), cfg)
    wrong = {k: v.dtype for k, v in sd.items() if v.dtype != dtype}
    assert not wrong, f"not {dtype}: {wrong}"
    assert sd["model.logit_scale"].item() == torch.tensor(LOGIT_SCALE_INIT, dtype=dtype).item()


@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_incomplete_openclip_projections_are_named(part):
    """One of a layer's q/k/v projections missing: a ValueError naming the layer, the parameter
    and the parts present, not a bare KeyError from packing in_proj."""
    cfg = text_cfg("tiny-sd2", clip_skip=1)
    diff = conv.ldm_to_diffusers(randomize_(TextEncoder(cfg)).state_dict(), cfg, with_projection=True)
    del diff[f"text_model.encoder.layers.1.self_attn.{part}_proj.bias"]
    have = sorted(set("kqv") - {part})
    with pytest.raises(ValueError, match=re.escape(f"layer 1: bias of q/k/v incomplete, have only {have}")):
        conv.diffusers_to_ldm(diff, cfg)


# ---------------------------------------------------------------------------------------- UNet
def test_unet_num_attention_heads_wins_over_attention_head_dim():
    """diffusers reads ``num_attention_heads or attention_head_dim``: a config that sets both
    means the former (here the latter is a count that splits no level), and a bad one is named."""
    cfg = SDConfig.preset("tiny-sd2").unet
    raw = unet_conv.config_to_diffusers(cfg)
    both = {**raw, "num_attention_heads": raw["attention_head_dim"], "attention_head_dim": [3, 3, 3]}
    want = unet_conv.config_from_diffusers(raw)
    assert want.heads_at(64) == cfg.heads_at(64) == (8, 8), want
    assert unet_conv.config_from_diffusers(both) == want
    assert unet_conv.config_from_diffusers({**raw, "num_attention_heads": None}) == want  # null: the other
    with pytest.raises(ValueError, match=r"num_attention_heads=\[3, 3, 3\] does not split"):
        unet_conv.config_from_diffusers({**raw, "num_attention_heads": [3, 3, 3]})


def test_middle_block_head_count_is_the_deepest_levels():
    """diffusers' middle block takes the deepest level's entry of a per-level head list, attention
    there or not. Only the middle block attends here: its count is read from that entry (oracle:
    diffusers' output), and a list whose attention levels agree but whose middle entry does not
    (neither one count nor one head dim) is refused rather than read without it."""
    raw = {**unet_conv.config_to_diffusers(SDConfig.preset("tiny").unet),
           "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
           "attention_head_dim": [2, 2, 4]}  # channels (32, 64, 64): the middle block has 4 heads of 16
    cfg = unet_conv.config_from_diffusers(raw)
    assert (cfg.attention_resolutions, cfg.heads_at(64)) == ((), (4, 16)), cfg
    theirs = UNet2DConditionModel(**{k: v for k, v in raw.items() if not k.startswith("_")}).eval()
    _reinit_(theirs, seed=0)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_conv.diffusers_to_ldm(theirs.state_dict(), cfg), strict=True)
    x, t, context = _inputs(cfg, 1, 8, 8, 7)
    with torch.no_grad():
        assert_close(ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample, rel=1e-5,
                     name="middle-block-only UNet vs diffusers")
    tiny = unet_conv.config_to_diffusers(SDConfig.preset("tiny").unet)  # attention on levels 0 and 1
    with pytest.raises(ValueError, match="neither a constant head count"):
        unet_conv.config_from_diffusers({**tiny, "attention_head_dim": [4, 8, 4]})  # head dim 8, 8; middle 16


@pytest.mark.parametrize("changes", [dict(transformer_depth=2), dict(time_embed_dim=96), dict(num_res_blocks=2)],
                         ids=["transformer-depth-2", "time-embed-96", "2-resblocks-per-level"])
def test_diffusers_unet_of_a_size_no_preset_has(changes):
    """config_from_diffusers reads diffusers' own config of such a UNet (``transformer_layers_per_block``,
    ``time_embedding_dim``, two attentions per down level), and its weights then run like diffusers."""
    cfg = SDConfig.preset("tiny-sd2").unet.replace(**changes)
    read = unet_conv.config_from_diffusers(_diffusers_unet(cfg).config)
    assert read == cfg.replace(num_heads=read.num_heads), read  # num_heads is unused at num_head_channels 8
    _check_against_diffusers(read, 1, 8, 8, 7)


def test_head_count_that_does_not_split_the_middle_block_is_named():
    """The middle block attends at the deepest width even when that level does not: a head count
    that splits the attention levels but not the middle block is refused, naming that width."""
    raw = {**unet_conv.config_to_diffusers(SDConfig.preset("tiny").unet), "block_out_channels": [48, 96, 144],
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 16,
           "attention_head_dim": 32}  # 96 = 3 x 32, 144 = 4.5 x 32
    with pytest.raises(ValueError, match=r"attention_head_dim=32 does not split .*: 144 channels into 32$"):
        unet_conv.config_from_diffusers(raw)


# ------------------------------------------------------------------------------------ detection
def _variant(preset: str, part: str, **changes) -> SDConfig:
    cfg = SDConfig.preset(preset)
    return cfg.replace(**{part: getattr(cfg, part).replace(**changes)})


@pytest.mark.parametrize("cfg", [
    _variant("tiny", "vae", attn_resolutions=(64,)),  # attention blocks on VAE level 2 (256 / 2**2)
    _variant("tiny", "vae", attn_resolutions=(256, 32)),  # levels 0 and 3
    _variant("tiny", "vae", embed_dim=8),  # post_quant_conv (4, 8, 1, 1): latents wider than z
    _variant("tiny-sd2", "text_encoder", projection_dim=48),  # text_projection (width 32, 48)
    _variant("tiny", "unet", time_embed_dim=96, num_heads=8),  # not 4 * 32; 8 heads: the SD 1.x rule
], ids=["vae-attn-level-2", "vae-attn-levels-0-3", "vae-embed-dim-8", "openclip-projection-48", "unet-time-embed-96"])
def test_detection_reads_architectures_no_preset_has(cfg):
    """Shapes of a skeleton give back its components, where no preset could supply them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SD 2 epsilon warning
        got = detect_config(_shapes(cfg))
    want = cfg.replace(unet=cfg.unet.replace(upcast_attention=False))  # epsilon: no upcast
    for part in ("unet", "vae", "text_encoder"):
        assert getattr(got, part) == getattr(want, part), f"{part}: detected {getattr(got, part)}"


@pytest.mark.parametrize("preset, upcast", [("tiny", False), ("tiny-sd2", True)])
def test_detected_upcast_attention_is_for_sd2_v_prediction_only(preset, upcast):
    """A file that does not say gets diffusers' upcast_attention for SD 2.x 768-v (OpenCLIP and
    v-prediction), not for an SD 1.x UNet run with v-prediction."""
    got = detect_config(_shapes(SDConfig.preset(preset)), prediction_type="v_prediction")
    assert got.unet.upcast_attention is upcast, (preset, got.unet)


def test_unequal_resblocks_per_level_are_refused_at_detection():
    """LDM's UNet has num_res_blocks ResBlocks on every level: a file with 1 on the first level and
    2 on the others is named as unsupported, not read as num_res_blocks 1."""
    cfg = SDConfig.preset("tiny")
    shapes = _shapes(cfg.replace(unet=cfg.unet.replace(num_res_blocks=2)))
    shapes = {k: v for k, v in shapes.items() if not k.startswith("model.diffusion_model.input_blocks.2.")}
    with pytest.raises(CheckpointError, match=r"f\.safetensors: unsupported UNet, ResBlocks per level \[1, 2, 2\]"):
        detect_config(shapes, where="f.safetensors")
