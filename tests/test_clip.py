"""sdcore.clip.TextEncoder and sdcore.convert.clip against transformers (oracle, random weights)
and diffusers' single-file conversion."""
from __future__ import annotations

import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as dsf

from kernels.testing import assert_close
from sdcore.clip import TextEncoder
from sdcore.config import SDConfig, TextEncoderConfig
from sdcore.convert import clip as conv

REL_FP32 = 1e-5  # max|ours - theirs| / max|theirs|, fp32 on CPU

# The text_encoder/config.json of the diffusers SD 1.5 and SD 2.1 folders on the hub.
SD15_HUB = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
            "vocab_size": 49408}
SD21_HUB = {**SD15_HUB, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}


def text_cfg(preset: str, **changes) -> TextEncoderConfig:
    return SDConfig.preset(preset).text_encoder.replace(**changes)


def token_ids(cfg: TextEncoderConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokenizer-shaped ids: BOS, random tokens of varied lengths (0, mid, full 75), EOS, padding."""
    g = torch.Generator().manual_seed(seed)
    pad = 0 if cfg.pad_token == "!" else 49407
    ids = torch.full((batch, cfg.max_length), pad, dtype=torch.long)
    for b, n in enumerate([0, 11, cfg.max_length - 2][:batch]):
        ids[b, 0], ids[b, n + 1] = 49406, 49407
        ids[b, 1:n + 1] = torch.randint(1, 49406, (n,), generator=g)
    return ids


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, LayerNorm scales and all biases included, so a mixed-up name fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            base = 1.0 if p.dim() == 1 and torch.all(p == 1) else 0.0  # LayerNorm weight
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.1 if p.dim() <= 1 else 0.02))
    return module.eval()


def hf_model(cfg: TextEncoderConfig, with_projection: bool):
    config = transformers.CLIPTextConfig.from_dict(conv.config_to_diffusers(cfg, with_projection=with_projection))
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return randomize_(cls(config))


def with_hub_prefix(sd: dict) -> dict:
    """transformers >= 5.6 CLIPTextModel keys have no ``text_model.``; hub files do."""
    top = ("text_model.", "text_projection.", "logit_scale")
    return {k if k.startswith(top) else "text_model." + k: v for k, v in sd.items()}


def check_against_transformers(preset: str, batch: int) -> None:
    cfg = text_cfg(preset, clip_skip=1)  # all L layers in the transformers model
    with_projection = cfg.kind == "openclip"
    theirs = hf_model(cfg, with_projection)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(conv.diffusers_to_ldm(theirs.state_dict(), cfg), strict=True)
    ids = token_ids(cfg, batch)
    text_model = theirs.text_model if with_projection else theirs
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        assert len(out.hidden_states) == cfg.layers + 1  # embeddings, then each layer
        for clip_skip in (1, 2):
            # diffusers' clip_skip path: final_layer_norm(hidden_states[-(clip_skip_diffusers + 1)]),
            # with its clip_skip = ours - 1
            want = text_model.final_layer_norm(out.hidden_states[-clip_skip])
            assert_close(ours(ids, clip_skip=clip_skip), want, rel=REL_FP32, name=f"{preset} hidden clip_skip={clip_skip}")
            assert_close(ours.encode(ids, clip_skip=clip_skip).hidden_states, want, rel=REL_FP32,
                         name=f"{preset} encode clip_skip={clip_skip}")
        pooled = ours.encode(ids).pooled
        assert_close(pooled, out.text_embeds if with_projection else out.pooler_output, rel=REL_FP32,
                     name=f"{preset} pooled")


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_matches_transformers_tiny(preset):
    check_against_transformers(preset, batch=3)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_matches_transformers_full_size(preset):
    check_against_transformers(preset, batch=2)


def test_sd2_23_diffusers_layers_equal_24_with_clip_skip_2():
    """Our L layers at clip_skip 2 == the diffusers folder's L - 1 layers at its last layer, both in
    transformers and in our own model built from config_from_diffusers."""
    cfg = text_cfg("tiny-sd2")  # 3 layers, clip_skip 2, as SD 2's 24 / 2
    ours = randomize_(TextEncoder(cfg))
    diff = conv.ldm_to_diffusers(ours.state_dict(), cfg)
    assert not any(".layers.2." in k or "projection" in k or "logit" in k for k in diff), sorted(diff)
    hf_cfg = conv.config_to_diffusers(cfg)
    assert hf_cfg["num_hidden_layers"] == 2 and hf_cfg["architectures"] == ["CLIPTextModel"]
    theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(hf_cfg)).eval()
    theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in diff.items()}, strict=True)

    cfg2 = conv.config_from_diffusers(hf_cfg)
    assert (cfg2.layers, cfg2.clip_skip, cfg2.projection_dim, cfg2.pad_token) == (2, 1, 0, "!")
    ours2 = TextEncoder(cfg2).eval()
    ours2.load_state_dict(conv.diffusers_to_ldm(diff, cfg2), strict=True)
    ids = token_ids(cfg)
    with torch.no_grad():
        want = ours(ids)
        assert_close(theirs(ids).last_hidden_state, want, rel=REL_FP32, name="transformers, 2 layers")
        assert_close(ours2(ids), want, atol=0.0, name="ours from the diffusers layout")


def test_hub_configs():
    assert conv.config_from_diffusers(SD15_HUB) == text_cfg("sd15")
    assert conv.config_from_diffusers(SD21_HUB) == text_cfg("sd21", layers=23, clip_skip=1, projection_dim=0)
    for preset, with_projection in [("tiny", False), ("sd15", False), ("tiny-sd2", True), ("sd21", True)]:
        cfg = text_cfg(preset, clip_skip=1)
        assert conv.config_from_diffusers(conv.config_to_diffusers(cfg, with_projection=with_projection)) == cfg
    assert conv.config_to_diffusers(text_cfg("sd21"))["num_hidden_layers"] == 23


@pytest.mark.parametrize("architecture", ["CLIPTextModelWithProjection", "CLIPTextModel"])
def test_config_without_projection_dim_reads_as_transformers(architecture):
    """A config.json that leaves projection_dim out gets transformers' CLIPTextConfig default (512,
    whatever hidden_size is) where the model has a projection; a plain CLIPTextModel has none."""
    hf_cfg = conv.config_to_diffusers(text_cfg("tiny-sd2", clip_skip=1), with_projection=True)
    hf_cfg = {**hf_cfg, "architectures": [architecture]}
    hf_cfg.pop("projection_dim")
    theirs = transformers.CLIPTextConfig.from_dict(hf_cfg)
    ours = conv.config_from_diffusers(hf_cfg)
    if architecture == "CLIPTextModelWithProjection":
        projection = transformers.CLIPTextModelWithProjection(theirs).text_projection.weight
        assert ours.projection_dim == projection.shape[0] == theirs.projection_dim == 512, (ours, projection.shape)
    else:
        assert ours.projection_dim == 0, ours


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_round_trips_exact(preset):
    cfg = text_cfg(preset, clip_skip=1)
    with_projection = cfg.kind == "openclip"
    sd = randomize_(TextEncoder(cfg)).state_dict()
    diff = conv.ldm_to_diffusers(sd, cfg, with_projection=with_projection)
    back = conv.diffusers_to_ldm(diff, cfg)
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))
    bad = [k for k in sd if not torch.equal(back[k], sd[k])]
    assert not bad, f"ldm -> diffusers -> ldm changed {bad}"
    again = conv.ldm_to_diffusers(back, cfg, with_projection=with_projection)
    assert again.keys() == diff.keys() and all(torch.equal(again[k], diff[k]) for k in diff)
    # the transformers model takes the diffusers dict as is (hub prefix included)
    theirs = hf_model(cfg, with_projection)
    diff.pop("logit_scale", None)  # CLIPTextModelWithProjection has none
    assert with_hub_prefix(theirs.state_dict()).keys() == diff.keys()


def test_single_file_sd15_matches_diffusers_conversion():
    cfg = text_cfg("tiny")
    sd = randomize_(TextEncoder(cfg)).state_dict()
    single_file = {"cond_stage_model." + k: v for k, v in sd.items()}
    single_file["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    model = TextEncoder(cfg)
    model.load_state_dict({k.removeprefix("cond_stage_model."): v for k, v in single_file.items()}, strict=True)
    theirs = dsf.convert_ldm_clip_checkpoint(single_file)
    theirs.pop("text_model.embeddings.position_ids")
    ours = conv.ldm_to_diffusers(sd, cfg)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_single_file_sd2_matches_diffusers_conversion():
    # 24 layers because diffusers hard-codes dropping resblocks.23 (SD 2's last layer); width 32
    cfg = text_cfg("tiny-sd2", layers=24)
    sd = randomize_(TextEncoder(cfg)).state_dict()
    single_file = {"cond_stage_model." + k: v for k, v in sd.items()}
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(conv.config_to_diffusers(cfg)))
    theirs = dsf.convert_open_clip_checkpoint(text_model, single_file, prefix="cond_stage_model.model.")
    ours = conv.ldm_to_diffusers(sd, cfg)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not bad, bad
    assert len([k for k in ours if k.endswith("q_proj.weight")]) == 23


@pytest.mark.parametrize("preset, key, shape", [
    ("sd15", "transformer.text_model.embeddings.token_embedding.weight", (49408, 768)),
    ("sd15", "transformer.text_model.embeddings.position_embedding.weight", (77, 768)),
    ("sd15", "transformer.text_model.encoder.layers.11.self_attn.q_proj.weight", (768, 768)),
    ("sd15", "transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
    ("sd15", "transformer.text_model.final_layer_norm.bias", (768,)),
    ("sd21", "model.token_embedding.weight", (49408, 1024)),
    ("sd21", "model.positional_embedding", (77, 1024)),
    ("sd21", "model.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
    ("sd21", "model.transformer.resblocks.23.attn.in_proj_bias", (3072,)),
    ("sd21", "model.transformer.resblocks.23.mlp.c_fc.weight", (4096, 1024)),
    ("sd21", "model.ln_final.weight", (1024,)),
    ("sd21", "model.text_projection", (1024, 1024)),
    ("sd21", "model.logit_scale", ()),
])
def test_single_file_key_names(preset, key, shape):
    with torch.device("meta"):  # names and shapes only, no memory
        sd = TextEncoder(text_cfg(preset)).state_dict()
    assert key in sd and tuple(sd[key].shape) == shape
    per_layer = 16 if preset == "sd15" else 12
    assert len(sd) == per_layer * text_cfg(preset).layers + (4 if preset == "sd15" else 6)


def test_attention_is_causal():
    cfg = text_cfg("tiny")
    model = randomize_(TextEncoder(cfg))
    ids = token_ids(cfg, batch=3)
    changed = ids.clone()
    changed[:, 40:] = 1234  # tokens after position 39 must not affect positions <= 39
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert_close(b[:, :40], a[:, :40], atol=0.0, name="prefix")
    assert not torch.equal(a[2, 40:], b[2, 40:])


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_activations(act):
    from sdcore.clip import activation
    x = torch.randn(1000, dtype=torch.float64)
    want = x * torch.sigmoid(1.702 * x) if act == "quick_gelu" else 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    assert_close(activation(x, act), want, atol=1e-15, name=act)


def test_bad_inputs():
    cfg = text_cfg("tiny")
    model = TextEncoder(cfg)
    ids = token_ids(cfg)
    with pytest.raises(TypeError, match="integer tensor"):
        model(ids.float())
    too_long = torch.cat([ids, ids[:, -1:]], dim=1)  # 78 > the 77 positions
    for bad in (too_long, ids[0], ids[:, :0]):
        with pytest.raises(ValueError, match=r"shape \(batch, T\) with 1 <= T <= 77 .* got \(.*\); a tokenizer "
                                             r"must pad to at most 77") as e:
            model(bad)
        assert "use sdcore.tokenizer.CLIPTokenizer" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"ids\(0, 77\) hold no prompt"):
        model(ids[:0])
    for bad_id in (49408, -1):
        wrong = ids.clone()
        wrong[1, 3] = bad_id
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\)"):
            model(wrong)
    for clip_skip in (0, cfg.layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            model(ids, clip_skip=clip_skip)
    for clip_skip in (1.5, 2.0, True):  # 1.5 matched no layer: encode returned hidden_states=None
        for call in (model, model.encode):
            with pytest.raises(TypeError, match=rf"clip_skip must be an int .*got \w+ {clip_skip!r}"):
                call(ids, clip_skip=clip_skip)
    with pytest.raises(ValueError, match="kind"):
        TextEncoder(cfg.replace(kind="t5"))
    with pytest.raises(ValueError, match="activation"):
        TextEncoder(cfg.replace(act="relu"))
    sd = conv.ldm_to_diffusers(model.state_dict(), cfg)
    with pytest.raises(ValueError, match="not part of"):
        conv.diffusers_to_ldm({**sd, "text_model.encoder.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="not part of"):
        conv.ldm_to_diffusers({**model.state_dict(), "model.stray": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="hidden_act"):
        conv.config_from_diffusers({**SD15_HUB, "hidden_act": "relu"})


def test_pooling_of_a_row_without_eos_is_per_row():
    """The pooled token is each row's own highest id (EOS, 49407, where present), not the batch's."""
    cfg = text_cfg("tiny")
    model = randomize_(TextEncoder(cfg)).eval()
    ids = token_ids(cfg, batch=2)
    ids[1] = 7
    ids[1, 0], ids[1, 5] = 49406, 49000  # row 1 has no EOS: its highest id is BOS at position 0
    with torch.no_grad():
        h = model(ids)
        pooled = model.pool(h, ids)
    assert torch.equal(pooled[0], h[0, (ids[0] == 49407).nonzero()[0, 0]]) and torch.equal(pooled[1], h[1, 0])
    ids[1, 0] = 1  # now 49000 at position 5 is row 1's highest
    with torch.no_grad():
        h = model(ids)
        assert torch.equal(model.pool(h, ids)[1], h[1, 5])


def test_sd2_pooled_output_comes_from_the_last_layer_at_clip_skip_2():
    """SD 2 conditions on the penultimate layer (clip_skip 2), but its pooled text embedding is
    still the final layer's, as transformers' CLIPTextModelWithProjection gives it."""
    cfg = text_cfg("tiny-sd2", clip_skip=1)
    theirs = hf_model(cfg, with_projection=True)
    ours = TextEncoder(cfg.replace(clip_skip=2)).eval()
    ours.load_state_dict(conv.diffusers_to_ldm(theirs.state_dict(), cfg), strict=True)
    ids = token_ids(cfg, 3)
    with torch.no_grad():
        out = ours.encode(ids)
        want = theirs(ids, output_hidden_states=True)
    assert_close(out.pooled, want.text_embeds, rel=1e-5, name="pooled at clip_skip 2")
    assert_close(out.hidden_states, theirs.text_model.final_layer_norm(want.hidden_states[-2]), rel=1e-5,
                 name="hidden states at clip_skip 2")


@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_pooling_follows_eos_token_id_like_transformers(eos_token_id):
    """transformers' CLIPTextTransformer pools at argmax(ids) only for legacy configs (eos_token_id 2);
    otherwise at the first ids == eos_token_id. With an added token (id 49409 > EOS, textual inversion)
    before EOS, the two differ, and ours must follow the config as transformers does."""
    cfg = text_cfg("tiny", vocab_size=49410)
    hf_cfg = {**conv.config_to_diffusers(cfg), "eos_token_id": eos_token_id}
    ours_cfg = conv.config_from_diffusers(hf_cfg)
    assert ours_cfg.eos_token_id == eos_token_id
    theirs = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(hf_cfg)))
    ours = TextEncoder(ours_cfg).eval()
    ours.load_state_dict(conv.diffusers_to_ldm(theirs.state_dict(), ours_cfg), strict=True)
    ids = token_ids(cfg, batch=3)
    ids[1, 3] = ids[2, 40] = 49409  # the added token, before EOS (rows 1 and 2)
    with torch.no_grad():
        got, want = ours.encode(ids).pooled, theirs(ids).pooler_output
    assert_close(got, want, rel=REL_FP32, name=f"pooled, eos_token_id={eos_token_id}")
    first_eos = (ids[1] == 49407).nonzero()[0, 0]
    with torch.no_grad():
        h = ours(ids)
    where = 3 if eos_token_id == 2 else first_eos  # legacy argmax lands on the added token
    assert torch.equal(got[1], h[1, where]), f"row 1 pooled at the wrong position (want {int(where)})"


def test_eos_token_id_from_a_config_json():
    assert conv.config_from_diffusers(SD15_HUB).eos_token_id == 2  # hub folders: legacy value
    assert conv.config_from_diffusers({k: v for k, v in SD15_HUB.items() if k != "eos_token_id"}).eos_token_id \
        == 49407  # transformers' CLIPTextConfig default
    for bad in ([49407], None, "49407"):
        with pytest.raises(ValueError, match=r"eos_token_id must be an integer >= 0, got"):
            conv.config_from_diffusers({**SD15_HUB, "eos_token_id": bad})


def test_shorter_prompts_than_the_positions_run_like_transformers():
    """A tokenizer with model_max_length 64 under 77 positions: (B, 64) ids are valid, as in transformers."""
    cfg = text_cfg("tiny", clip_skip=1)
    theirs = hf_model(cfg, with_projection=False)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(conv.diffusers_to_ldm(theirs.state_dict(), cfg), strict=True)
    ids = token_ids(cfg, batch=2)[:, :64]
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).last_hidden_state, rel=REL_FP32, name="64 of 77 positions")


def test_heads_must_divide_the_width():
    """transformers refuses hidden_size 32 with 5 heads at construction; so do we, and the config reader."""
    hf_cfg = {**conv.config_to_diffusers(text_cfg("tiny")), "num_attention_heads": 5}
    with pytest.raises(Exception, match="divisible|not a multiple"):  # 5.x: at the config, 4.x: in CLIPAttention
        transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(hf_cfg))
    with pytest.raises(ValueError, match=r"hidden_size=32 is not divisible by num_attention_heads=5"):
        conv.config_from_diffusers(hf_cfg)
    with pytest.raises(ValueError, match=r"width \(hidden_size\) 32 is not divisible by its 5 attention heads"):
        TextEncoder(text_cfg("tiny", heads=5))


@pytest.mark.parametrize("key, value", [("hidden_size", "32"), ("num_hidden_layers", None), ("vocab_size", 0),
                                        ("layer_norm_eps", "1e-5"), ("max_position_embeddings", 77.0)])
def test_bad_numbers_in_a_config_json_name_the_option(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be a"):
        conv.config_from_diffusers({**SD15_HUB, key: value})
