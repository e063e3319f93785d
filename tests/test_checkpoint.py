"""sdcore.load / StableDiffusion.save: both layouts, detection from shapes, exact round trips,
diffusers as the oracle, and every kind of bad input failing with a message that says why.

Everything runs on the tiny presets (CPU, seconds); the real-size presets are only built on the
meta device, to check the detection rules on their shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdcore
from sdcore import SDConfig, StableDiffusion, checkpoint
from sdcore.checkpoint import CheckpointError, detect_config
from kernels.testing import assert_close

REL = 1e-5  # fp32 outputs of the same weights through diffusers/transformers vs sdcore


def _tensors(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), f"keys differ: only in first {sorted(a.keys() - b.keys())[:5]}, " \
                                 f"only in second {sorted(b.keys() - a.keys())[:5]}"
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors not bitwise equal, e.g. {differ[:5]}"


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.from_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model in every layout: .safetensors, .ckpt, diffusers folder."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {"safetensors": root / "tiny.safetensors", "ckpt": root / "tiny.ckpt", "diffusers": root / "tiny-diffusers"}
    tiny.save(paths["safetensors"])
    tiny.save(paths["ckpt"], layout="ldm")
    tiny.save(paths["diffusers"], layout="diffusers")
    return paths


def sdcore_schedulers():
    import sdcore.schedulers

    return sdcore.schedulers


def _foreign(tmp_path, state: dict, name="foreign.safetensors"):
    """A single file as other tools write it: LDM keys, no sdcore metadata."""
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1234}, path)
    return path


# ------------------------------------------------------------------------------- presets, basics
def test_from_preset_is_deterministic_eval_and_frozen(tiny):
    again = StableDiffusion.from_preset("tiny", seed=0)
    other = StableDiffusion.from_preset("tiny", seed=1)
    assert_same_weights(tiny.state_dict(), again.state_dict())
    w = "model.diffusion_model.out.2.weight"
    assert not torch.equal(tiny.state_dict()[w], other.state_dict()[w]), "seed has no effect"
    assert not tiny.training and all(not m.training for m in tiny.modules())
    assert not any(p.requires_grad for p in tiny.parameters())
    assert tiny.config == SDConfig.preset("tiny")
    assert tiny.tokenizer.pad_token == "<|endoftext|>"
    assert StableDiffusion.from_preset("tiny-sd2").tokenizer.pad_token == "!"
    zero = [n for n, p in tiny.named_parameters() if p.numel() > 1 and not p.abs().gt(0).all()]
    assert not zero, f"random weights should have no zeros (they would hide blocks): {zero[:5]}"


def test_from_preset_dtype_device_and_unknown_name():
    half = StableDiffusion.from_preset("tiny", dtype=torch.bfloat16)
    ref = StableDiffusion.from_preset("tiny")
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(half.state_dict()[w], ref.state_dict()[w].bfloat16())
    with pytest.raises(KeyError, match=r"unknown preset 'sd99'.*known presets: .*sd15.*tiny"):
        StableDiffusion.from_preset("sd99")
    with pytest.raises(TypeError, match="float dtype"):
        StableDiffusion.from_preset("tiny", dtype=torch.int8)
    with pytest.raises(TypeError, match="seed must be an int, got str 'x'"):
        StableDiffusion.from_preset("tiny", seed="x")


def test_save_into_a_missing_folder_names_the_path(tiny, tmp_path):
    """safetensors' own error named its temporary file, not the path asked for."""
    target = tmp_path / "nope" / "x.safetensors"
    with pytest.raises(FileNotFoundError, match=f"cannot save {target}: {target.parent} is not an existing folder"):
        tiny.save(target)


def test_skeleton_holds_no_weights():
    """Loading builds on meta: a full-size SD 1.5 skeleton costs no parameter memory."""
    sk = StableDiffusion.skeleton(SDConfig.preset("sd15"))
    assert all(p.is_meta for p in sk.parameters())
    assert sum(p.numel() for p in sk.unet.parameters()) > 800e6  # the real architecture


def test_a_model_on_meta_has_the_architecture_and_runs_shapes(tiny):
    """from_config(device="meta"): every parameter and buffer of the preset's shape and dtype, no
    values drawn, and a UNet forward on meta inputs gives the output's shape (it ended as an
    "internal error: tensors left on meta")."""
    meta = StableDiffusion.from_preset("tiny", dtype=torch.float16, device="meta")
    want = {k: (v.shape, torch.float16 if v.is_floating_point() else v.dtype) for k, v in tiny.state_dict().items()}
    got = {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
    assert got == want and all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    ctx = torch.empty(2, 77, tiny.config.unet.context_dim, device="meta", dtype=torch.float16)
    assert meta.unet(x, 500, ctx).shape == x.shape
    assert meta.vae.decode(x).shape == (2, 3, 8 * 8, 8 * 8)
    ids = torch.empty(2, 77, dtype=torch.long, device="meta")  # no values to range-check
    assert meta.text_encoder(ids).shape == ctx.shape


def test_buffers_rematerialised(saved, tiny, monkeypatch):
    """Buffers a file does not hold (non-persistent ones) of a loaded model equal those of a normally
    built one. sdcore's models register none today, so the UNet here gets one, as a researcher's
    module might; the loader builds on meta and must neither leave it there nor lose its values. (A
    persistent buffer is a key the file must hold, checked as every key is.)"""
    from sdcore import unet as unet_module
    from sdcore.clip import TextEncoder
    from sdcore.vae import AutoencoderKL

    class UNetWithBuffers(unet_module.UNetModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.register_buffer("probe", torch.linspace(0.5, 1.5, 5), persistent=False)

    monkeypatch.setattr(unet_module, "UNetModel", UNetWithBuffers)
    cfg = tiny.config
    built = StableDiffusion(cfg, UNetWithBuffers(cfg.unet), AutoencoderKL(cfg.vae), TextEncoder(cfg.text_encoder),
                            None)
    loaded = sdcore.load(saved["safetensors"])
    want, got = dict(built.named_buffers()), dict(loaded.named_buffers())
    assert want.keys() == got.keys() == {"model.diffusion_model.probe"}, got.keys()  # LDM names
    for k in want:
        assert not got[k].is_meta and torch.equal(got[k], want[k]), (k, got[k], want[k])
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers"])
def test_load_is_exact(saved, tiny, fmt):
    loaded = sdcore.load(saved[fmt])
    assert_same_weights(tiny.state_dict(), loaded.state_dict())
    assert loaded.config == tiny.config.replace(name=loaded.config.name)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_round_trip_ldm_diffusers_ldm(saved, tmp_path):
    """ldm file -> diffusers folder -> ldm file -> diffusers folder: every file bitwise equal."""
    sdcore.load(saved["safetensors"]).save(tmp_path / "d")
    sdcore.load(tmp_path / "d").save(tmp_path / "back.safetensors")
    assert_same_weights(_tensors(saved["safetensors"]), _tensors(tmp_path / "back.safetensors"))
    sdcore.load(tmp_path / "back.safetensors").save(tmp_path / "d2", layout="diffusers")
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        assert_same_weights(load_file(str(saved["diffusers"] / f"{part}.safetensors")),
                            load_file(str(tmp_path / "d2" / f"{part}.safetensors")))
    for part in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "model_index.json", "tokenizer/vocab.json"):
        assert (saved["diffusers"] / part).read_text() == (tmp_path / "d2" / part).read_text(), part


def test_round_trip_sd2_keeps_config(tmp_path):
    """tiny-sd2 through .ckpt keeps heads, clip_skip and v-prediction (sdcore's config metadata);
    through diffusers, the layers after the output layer go (see sdcore.convert.clip) and the
    rest round-trips exactly."""
    model = StableDiffusion.from_preset("tiny-sd2", seed=3)
    model.save(tmp_path / "m.ckpt")
    loaded = sdcore.load(tmp_path / "m.ckpt")
    assert loaded.config == model.config
    assert_same_weights(model.state_dict(), loaded.state_dict())
    model.save(tmp_path / "d")
    once = sdcore.load(tmp_path / "d")
    assert once.config.text_encoder.layers == 2 and once.config.text_encoder.clip_skip == 1
    assert once.config.scheduler.prediction_type == "v_prediction"
    once.save(tmp_path / "once.safetensors")
    twice = sdcore.load(tmp_path / "once.safetensors")
    assert twice.config == once.config
    assert_same_weights(once.state_dict(), twice.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers"])
def test_load_in_half_precision(saved, tiny, fmt, dtype):
    loaded = sdcore.load(saved[fmt], dtype=dtype)
    ref = tiny.state_dict()
    for k, v in loaded.state_dict().items():
        want = ref[k].to(dtype) if ref[k].is_floating_point() else ref[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k
    loaded.save(tmp := saved["safetensors"].parent / f"half-{fmt}-{dtype}.safetensors")
    assert_same_weights(loaded.state_dict(), sdcore.load(tmp, dtype=dtype).state_dict())


# -------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21-base", "tiny", "tiny-inpaint"])
def test_detect_from_shapes(name):
    """The shape rules give back the preset, at real size too (shapes from a meta skeleton)."""
    sk = StableDiffusion.skeleton(SDConfig.preset(name))
    shapes = {k: tuple(v.shape) for k, v in sk.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SD 2.x epsilon warning, tested below
        assert detect_config(shapes) == SDConfig.preset(name)


def test_detect_sd21_768_v():
    sk = StableDiffusion.skeleton(SDConfig.preset("sd21"))
    shapes = {k: tuple(v.shape) for k, v in sk.state_dict().items()}
    assert detect_config(shapes, prediction_type="v_prediction") == SDConfig.preset("sd21")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_foreign_file_detection(tmp_path, fmt):
    """Files without sdcore metadata: 9-channel UNet, OpenCLIP + linear projections + 64-wide
    heads rule (tiny: from the preset), the SD 2 prediction-type warning, leftovers ignored."""
    inpaint = StableDiffusion.from_preset("tiny-inpaint", seed=1)
    state = dict(inpaint.state_dict())
    from sdcore.schedulers import make_betas
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012).double()  # LDM's, in its fp64
    state.update({"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0),
                  "model_ema.decay": torch.tensor(0.9999),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    loaded = sdcore.load(_foreign(tmp_path, state, f"inpaint.{fmt}"))
    assert loaded.config.unet.in_channels == 9 and loaded.config == SDConfig.preset("tiny-inpaint")
    assert_same_weights(inpaint.state_dict(), loaded.state_dict())

    sd2 = StableDiffusion.from_preset("tiny-sd2", seed=2)
    path = _foreign(tmp_path, dict(sd2.state_dict()), f"sd2.{fmt}")
    with pytest.warns(UserWarning, match="768-v models .* need prediction_type='v_prediction'"):
        eps = sdcore.load(path)
    assert eps.config.scheduler.prediction_type == "epsilon"
    assert not eps.config.unet.upcast_attention  # set for 768-v files only, as their hub folders (tiny-sd2: below)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = sdcore.load(path, prediction_type="v_prediction")
    assert v.config == SDConfig.preset("tiny-sd2")
    c = v.config
    assert (c.text_encoder.kind, c.unet.use_linear_in_transformer, c.unet.num_head_channels) == ("openclip", True, 8)
    assert v.tokenizer.pad_token == "!"
    assert_same_weights(sd2.state_dict(), v.state_dict())


def _openclip_shapes(cfg: SDConfig, layers: int, projection: bool) -> dict[str, tuple]:
    """``cfg``'s single-file shapes with the first ``layers`` OpenCLIP layers, with or without
    text_projection."""
    shapes = {k: tuple(v.shape) for k, v in StableDiffusion.skeleton(cfg).state_dict().items()}
    drop = [f"cond_stage_model.model.transformer.resblocks.{i}." for i in range(layers, cfg.text_encoder.layers)]
    return {k: v for k, v in shapes.items() if not k.startswith(tuple(drop))
            and (projection or not k.endswith("model.text_projection"))}


def test_openclip_clip_skip_follows_the_layers_in_the_file():
    """SD 2 at real size: 24 layers (original) -> clip_skip 2, silently; 23 layers (written from a
    diffusers folder, cut after the penultimate layer) -> clip_skip 1, the same output layer, with a
    warning naming the rule, whether or not text_projection is there."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_config(_openclip_shapes(SDConfig.preset("sd21"), 24, True),
                             prediction_type="v_prediction") == SDConfig.preset("sd21")
    for projection in (False, True):
        with pytest.warns(UserWarning, match=r"f\.safetensors: OpenCLIP text encoder used with clip_skip 1 .*"
                                             r"23 layers, 1 fewer than sd21's 24"):
            got = detect_config(_openclip_shapes(SDConfig.preset("sd21"), 23, projection), where="f.safetensors",
                                prediction_type="v_prediction").text_encoder
        assert (got.layers, got.clip_skip, got.heads) == (23, 1, 16)


@pytest.mark.parametrize("projection, clip_skip", [(True, 2), (False, 1)])
def test_openclip_clip_skip_of_a_size_no_preset_has(projection, clip_skip):
    """Other sizes: text_projection present -> the original tower (clip_skip 2); absent -> a
    diffusers-converted one (clip_skip 1, with a warning)."""
    base = SDConfig.preset("tiny-sd2")
    cfg = base.replace(unet=base.unet.replace(model_channels=64, num_head_channels=64, context_dim=64),
                       text_encoder=base.text_encoder.replace(width=64, heads=1, intermediate=128, projection_dim=64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = detect_config(_openclip_shapes(cfg, 3, projection), prediction_type="v_prediction").text_encoder
    notes = [str(w.message) for w in caught if "clip_skip 1" in str(w.message)]
    assert got.clip_skip == clip_skip and got.layers == 3
    assert notes == ([] if projection else [notes[0]]) and (projection or "no model.text_projection" in notes[0])


def test_sd2_single_file_written_from_a_diffusers_folder(tmp_path):
    """What diffusers' convert_diffusers_to_original_stable_diffusion.py writes from an SD 2 folder:
    the folder's (cut) text encoder under OpenCLIP keys, no metadata. It conditions like the original."""
    orig = StableDiffusion.from_preset("tiny-sd2", seed=6)
    orig.save(tmp_path / "folder", layout="diffusers")
    folder = sdcore.load(tmp_path / "folder")
    path = _foreign(tmp_path, dict(folder.state_dict()), "from-folder.safetensors")
    with pytest.warns(UserWarning, match="clip_skip 1 .*2 layers, 1 fewer than tiny-sd2's 3"):
        single = sdcore.load(path, prediction_type="v_prediction")
    assert single.config.text_encoder == folder.config.text_encoder
    assert_same_weights(folder.state_dict(), single.state_dict())
    ids = orig.tokenizer(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        assert torch.equal(single.text_encoder(ids), orig.text_encoder(ids))


def test_tokenizer_argument(saved, tmp_path):
    from sdcore.tokenizer import CLIPTokenizer

    bang = CLIPTokenizer.default(pad_token="!")
    assert sdcore.load(saved["safetensors"], tokenizer=bang).tokenizer is bang
    bang.save(tmp_path / "tok")
    loaded = sdcore.load(saved["diffusers"], tokenizer=tmp_path / "tok")
    assert loaded.tokenizer.pad_token == "!" and loaded.config.text_encoder.pad_token == "!"


@pytest.mark.parametrize("layout", ["diffusers", "safetensors", "ckpt"])  # the files carry sdcore metadata
def test_prediction_type_argument_wins(saved, layout):
    assert sdcore.load(saved[layout], prediction_type="v_prediction").config.scheduler.prediction_type \
        == "v_prediction", f"the {layout} file's recorded prediction type won over the argument"
    with pytest.raises(ValueError, match="unknown prediction_type"):
        sdcore.load(saved["diffusers"], prediction_type="x0")


def test_scheduler_config_from_diffusers(saved, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(saved["diffusers"], folder)
    cfg = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2",
           "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction", "steps_offset": 0,
           "timestep_spacing": "trailing"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    loaded = sdcore.load(folder)
    s = loaded.config.scheduler
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.prediction_type, s.steps_offset, s.timestep_spacing,
            s.sampler) == ("cosine", 0.0001, 0.02, "v_prediction", 0, "trailing", "euler_a")
    assert type(loaded.scheduler()).__name__ == type(sdcore_schedulers().make_scheduler("euler_a")).__name__
    # SD 1.5's PNDMScheduler: no such sampler here, so the default one on the folder's schedule
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "PNDMScheduler"}))
    assert sdcore.load(folder).config.scheduler == s.replace(sampler=SDConfig.preset("tiny").scheduler.sampler)
    loaded.save(tmp_path / "again")
    assert sdcore.load(tmp_path / "again").config.scheduler == s


def _with_scheduler_config(saved, tmp_path, raw):
    """A copy of the tiny diffusers folder whose scheduler_config.json is ``raw`` (a str: as is; a dict:
    merged over the folder's own)."""
    folder = tmp_path / "d"
    shutil.copytree(saved["diffusers"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps({**json.loads(path.read_text()), **raw}))
    return folder


@pytest.mark.parametrize("cls", sorted(checkpoint._CLASS_DEFAULTS))
def test_scheduler_config_absent_fields_take_the_diffusers_class_defaults(tmp_path, cls):
    """Only ``_class_name`` given: every field is that class's default in diffusers, and the samplers'
    timesteps, ᾱ and initial σ are diffusers'. diffusers' own full save_config loads the same."""
    diffusers = pytest.importorskip("diffusers")
    try:
        ref = getattr(diffusers, cls).from_config({"_class_name": cls})
    except ImportError as e:  # LMSDiscreteScheduler needs scipy
        pytest.skip(f"diffusers.{cls}: {str(e).strip()}")
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": cls}))
    ours = checkpoint.scheduler_from_diffusers(path)
    for f in dataclasses.fields(ours):
        if f.name in ref.config:
            want = {"squaredcos_cap_v2": "cosine"}.get(ref.config[f.name], ref.config[f.name])
            assert getattr(ours, f.name) == want, f"{cls}.{f.name}: ours {getattr(ours, f.name)!r}, diffusers {want!r}"
    ref.save_config(tmp_path / "full")
    full = checkpoint.scheduler_from_diffusers(tmp_path / "full" / "scheduler_config.json")
    assert full == ours, f"{cls}: diffusers' full config {full} != its defaults {ours}"
    if cls in checkpoint._SAMPLERS:
        s = sdcore_schedulers().make_scheduler(None, ours)
        s.set_timesteps(7)
        ref.set_timesteps(7)
        assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod), f"{cls}: alphas_cumprod differ"
        assert torch.equal(s.timesteps, ref.timesteps.to(s.timesteps.dtype)), \
            f"{cls}: timesteps {s.timesteps.tolist()} != diffusers {ref.timesteps.tolist()}"
        assert s.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), f"{cls}: init_noise_sigma"


@pytest.mark.parametrize("raw, key", [
    ({"trained_betas": [0.01] * 1000}, "trained_betas"),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "rescale_betas_zero_snr"),
])
def test_noise_schedules_sdcore_does_not_implement_are_refused(saved, tmp_path, raw, key):
    """What the model was trained for: loading it with another schedule would be silently wrong."""
    with pytest.raises(CheckpointError, match=rf"scheduler_config\.json: {key}=.* noise schedule, which sdcore"):
        sdcore.load(_with_scheduler_config(saved, tmp_path, raw))


@pytest.mark.parametrize("raw, needle", [
    ({"thresholding": True}, "thresholding=True is a DDIMScheduler option"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas=True is a"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas=True is a Euler"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "variance_type='fixed_large' is a"),
    ({"_class_name": "LCMScheduler"}, "_class_name 'LCMScheduler' is not a scheduler class whose defaults"),
])
def test_sampler_options_sdcore_lacks_load_with_a_warning(saved, tmp_path, raw, needle):
    """How one samples, not what the model is: the weights load, and the warning names the key."""
    folder = _with_scheduler_config(saved, tmp_path, raw)
    with pytest.warns(UserWarning, match=needle) as caught:
        sd = sdcore.load(folder)
    assert sd.unet is not None
    assert str(folder / "scheduler" / "scheduler_config.json") in str(caught[0].message)


@pytest.mark.parametrize("raw, message", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ({"beta_schedule": "sigmoid"}, "unknown beta_schedule 'sigmoid'"),
    ({"prediction_type": "flow"}, "unknown prediction_type 'flow'"),
    ({"clip_sample": "yes"}, "clip_sample must be true or false, got 'yes'"),
    ({"num_train_timesteps": 1000.5}, "num_train_timesteps must be an integer >= 1, got 1000.5"),
    ({"steps_offset": -1}, "steps_offset must be an integer >= 0, got -1"),
    ({"beta_end": 2}, "beta_end must be a number in (0, 1), got 2"),
])
def test_bad_scheduler_config_fails_at_load(saved, tmp_path, raw, message):
    folder = _with_scheduler_config(saved, tmp_path, raw)
    with pytest.raises(CheckpointError) as err:
        sdcore.load(folder)
    want = f"{folder / 'scheduler' / 'scheduler_config.json'}: "
    assert str(err.value).startswith(want) and message in str(err.value), \
        f"message {str(err.value)!r} lacks {want!r} or {message!r}"


# ------------------------------------------------------------------------- diffusers as the oracle
def _compare_outputs(ours: StableDiffusion, unet, vae, text_encoder):
    g = torch.Generator().manual_seed(0)
    cfg = ours.config
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([10, 700])
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    ids = ours.tokenizer(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        assert_close(ours.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample, rel=REL, name="unet")
        assert_close(ours.vae.decode(z), vae.decode(z).sample, rel=REL, name="vae.decode")
        assert_close(ours.vae.encode(img).mean, vae.encode(img).latent_dist.mean, rel=REL, name="vae.encode")
        assert_close(ours.text_encoder(ids), text_encoder(ids).last_hidden_state, rel=REL, name="text_encoder")


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_diffusers_reads_our_folder(preset, tmp_path):
    """StableDiffusionPipeline.from_pretrained on our folder: same outputs, same token ids."""
    diffusers = pytest.importorskip("diffusers")
    ours = StableDiffusion.from_preset(preset, seed=4)
    ours.save(tmp_path / "d", layout="diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == ours.config.scheduler.prediction_type
    prompts = ["a photograph of an astronaut riding a horse", ""]
    want = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.tokenizer(prompts), want.input_ids)
    _compare_outputs(ours, pipe.unet, pipe.vae, pipe.text_encoder)  # diffusers' 2 layers = our 3, skip 2


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A pipeline folder written by diffusers' own save_pretrained, from seeded random components."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from sdcore.convert import clip, unet, vae

    root = tmp_path_factory.mktemp("from-diffusers")
    cfg = SDConfig.preset("tiny")
    StableDiffusion.from_preset("tiny").tokenizer.save(root / "tok")
    components = {
        "unet": diffusers.UNet2DConditionModel(**{k: v for k, v in unet.config_to_diffusers(cfg.unet, 8).items()
                                                  if not k.startswith("_")}),
        "vae": diffusers.AutoencoderKL(**{k: v for k, v in vae.config_to_diffusers(cfg.vae).items()
                                          if not k.startswith("_")}),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip.config_to_diffusers(cfg.text_encoder))),
    }
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in components.values():
            for p in m.parameters():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1
                        else 1 + 0.1 * (torch.rand(p.shape, generator=g) * 2 - 1))
    pipe = diffusers.StableDiffusionPipeline(
        **components, tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tok"),
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


def test_load_diffusers_save_pretrained(diffusers_folder, tmp_path):
    """diffusers' folder -> sdcore (same outputs) -> ldm file -> sdcore (bitwise the same)."""
    folder, pipe = diffusers_folder
    ours = sdcore.load(folder)
    assert ours.config.unet == SDConfig.preset("tiny").unet
    assert ours.config.scheduler == SDConfig.preset("tiny").scheduler
    prompts = ["a photograph of an astronaut riding a horse", ""]  # tokenizer.json-only folder
    want = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.tokenizer(prompts), want.input_ids)
    _compare_outputs(ours, pipe.unet, pipe.vae, pipe.text_encoder)
    ours.save(tmp_path / "from-diffusers.ckpt")
    again = sdcore.load(tmp_path / "from-diffusers.ckpt")
    assert_same_weights(ours.state_dict(), again.state_dict())
    _compare_outputs(again, pipe.unet, pipe.vae, pipe.text_encoder)


def test_load_vae_with_pre_014_attention_names(diffusers_folder, tmp_path):
    """A folder whose VAE attention keys have diffusers' pre-0.14 names (query, key, value, proj_attn;
    e.g. stable-diffusion-2-1-base's vae/) loads as diffusers loads it: same weights, same outputs."""
    diffusers = pytest.importorskip("diffusers")
    folder, pipe = diffusers_folder
    d = tmp_path / "old-vae"
    shutil.copytree(folder, d)
    path = d / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in load_file(str(path)).items():
        for new, name in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        old[k] = v
    assert sum(".proj_attn." in k for k in old) == 4  # encoder and decoder mid-block, weight and bias
    save_file(old, str(path))
    theirs = diffusers.AutoencoderKL.from_pretrained(d / "vae")  # the oracle renames them on load
    assert_same_weights(theirs.state_dict(), pipe.vae.state_dict())
    ours = sdcore.load(d)
    assert_same_weights(ours.state_dict(), sdcore.load(folder).state_dict())
    _compare_outputs(ours, pipe.unet, theirs, pipe.text_encoder)


# ----------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing-here.safetensors"):
        sdcore.load(tmp_path / "nothing-here.safetensors")


@pytest.mark.parametrize("fmt, damage, message", [
    ("safetensors", "truncate", r"bad\.safetensors: not a readable safetensors file.*incomplete metadata"),
    ("safetensors", "garbage", r"bad\.safetensors: not a readable safetensors file.*header"),
    ("ckpt", "truncate", r"bad\.ckpt: not a readable torch checkpoint.*zip archive"),
    ("ckpt", "garbage", r"bad\.ckpt: not a readable torch checkpoint"),
])
def test_corrupt_file(saved, tmp_path, fmt, damage, message):
    data = saved[fmt].read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x20" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=message):
        sdcore.load(bad)


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_empty_file(tmp_path, suffix):
    (tmp_path / f"empty.{suffix}").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"empty\.{suffix}: empty file \(0 bytes\)"):
        sdcore.load(tmp_path / f"empty.{suffix}")


def test_format_is_read_from_the_content_not_the_suffix(saved, tiny, tmp_path):
    """A safetensors file named .ckpt loads as safetensors (it used to go to torch.load)."""
    shutil.copy(saved["safetensors"], tmp_path / "renamed.ckpt")
    assert_same_weights(sdcore.load(tmp_path / "renamed.ckpt").state_dict(), tiny.state_dict())


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_checkpoint_named_safetensors(tiny, tmp_path, zipped):
    """torch.load hands every *.safetensors path to safetensors, whose error names neither file
    nor problem: a torch file under that name is refused, saying so, before torch.load."""
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": dict(tiny.state_dict())}, path, _use_new_zipfile_serialization=zipped)
    kind = "zip" if zipped else "legacy pickle"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: looks like a torch checkpoint \({kind} format.*"
                                              r"rename it to \.ckpt"):
        sdcore.load(path)
    path.rename(tmp_path / "model.ckpt")
    assert_same_weights(sdcore.load(tmp_path / "model.ckpt").state_dict(), tiny.state_dict())


def test_truncated_legacy_torch_file_is_called_corrupt(tiny, tmp_path):
    """A cut pickle can stop in a GLOBAL name ("torch._."): corrupt, not "holds Python objects"."""
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": dict(tiny.state_dict())}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable torch checkpoint \(truncated or corrupt\?\)"):
        sdcore.load(path)


def test_unreadable_torch_files_are_checkpoint_errors_but_memory_is_not(tmp_path, monkeypatch):
    """Whatever torch's unpickler raises on garbage (a KeyError for these bytes) names the file as
    unreadable; it was a bare KeyError. Running out of memory is the machine's limit, not the file's."""
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"junk\n")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: not a readable torch checkpoint .*: KeyError"):
        sdcore.load(junk)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(MemoryError):
        sdcore.load(junk)


def test_safetensors_header_length_starting_with_pk(tmp_path):
    """A safetensors file whose 8-byte header length happens to begin with the bytes "PK" (a zip's
    signature) is still read as safetensors."""
    path = tmp_path / "pk.ckpt"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"pad": ""})
    base = int.from_bytes(path.read_bytes()[:8], "little")  # header length, "PK" = 0x4B50 little-endian
    for n in range(0x4B50 - base - 8, 0x4B50 - base + 8):  # the header is space-padded to 8 bytes
        save_file({"a": torch.zeros(2)}, str(path), metadata={"pad": "x" * n})
        if path.read_bytes()[:2] == b"PK":
            break
    assert path.read_bytes()[:2] == b"PK"
    assert checkpoint._TensorFile(path).shapes == {"a": (2,)}


def test_detection_key_of_the_wrong_rank_is_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors: cannot detect the architecture from key "
                                              r"'model\.diffusion_model\.input_blocks\.0\.0\.weight': its shape "
                                              r"\(32,\) is not one an SD checkpoint has there"):
        sdcore.load(_foreign(tmp_path, state))


def test_ckpt_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callbacks": Exception("x")}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.ckpt: holds Python objects besides tensors"):
        sdcore.load(path)


@pytest.mark.parametrize("keys, message", [
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "model.diffusion_model.input_blocks.0.0.weight"], "looks like an SDXL checkpoint"),
    (["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"],
     "looks like an SDXL checkpoint"),
    # SD 2.x unCLIP: an SD 2 file whose UNet also takes an image embedding (it was called SDXL)
    (["model.diffusion_model.label_emb.0.0.weight", "cond_stage_model.model.ln_final.weight",
      "first_stage_model.encoder.conv_in.weight"], r"has a class-conditioned UNet \(model\.diffusion_model\."
                                                   r"label_emb\.0\.0\.weight: e\.g\. SD 2\.x unCLIP"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"],
     "looks like a standalone VAE"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "looks like a LoRA"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "looks like a LoRA"),
    (["model.diffusion_model.input_blocks.1.1.proj_in.lora_up.weight"], "looks like a LoRA"),
    (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "looks like one diffusers/transformers component"),
    (["foo.weight"], r"not a Stable Diffusion checkpoint: no keys start with model\.diffusion_model\."),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
     r"has no weights for: text_encoder \(cond_stage_model\.\*\)"),
])
def test_other_families(tmp_path, keys, message):
    path = _foreign(tmp_path, {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(CheckpointError, match=message):
        sdcore.load(path)


def test_missing_unexpected_and_misshapen_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    gone = sorted(k for k in state if ".attn1.to_" in k and k.startswith("model.diffusion_model.output_blocks"))
    assert len(gone) > 10
    for k in gone:
        del state[k]
    state["first_stage_model.decoder.extra.weight"] = torch.zeros(3)
    state["model.diffusion_model.middle_block.0.in_layers.2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        sdcore.load(_foreign(tmp_path, state))
    msg = str(err.value)
    assert "foreign.safetensors does not match the model" in msg
    assert f"unet: missing keys: {gone[0][len('model.diffusion_model.'):]}" in msg
    assert f"... ({len(gone)} in all)" in msg
    assert "vae: unexpected keys: decoder.extra.weight (1)" in msg
    assert "model.diffusion_model.middle_block.0.in_layers.2.bias: expected (64,), got (7,)" in msg


def test_diffusers_folder_shape_mismatch_names_the_file_and_its_key(saved, tiny, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(saved["diffusers"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["down_blocks.0.resnets.0.conv1.bias"] = torch.zeros(7)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model\.safetensors does not match the "
                                              r"model's unet: 1 shape mismatches: down_blocks\.0\.resnets\.0\."
                                              r"conv1\.bias: expected \(32,\), got \(7,\)"):
        sdcore.load(folder)
    # older diffusers VAEs keep attention projections as 1x1 convs: the same weights, and they load
    shutil.copytree(saved["diffusers"], folder, dirs_exist_ok=True)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = "encoder.mid_block.attentions.0.to_q.weight"
    state[key] = state[key][:, :, None, None].contiguous()
    save_file(state, str(weights))
    assert_same_weights(sdcore.load(folder).state_dict(), tiny.state_dict())


def test_missing_logit_scale_takes_clips_initial_value(tmp_path):
    """OPTIONAL_KEYS: a single file without OpenCLIP's logit_scale (unused by SD) loads."""
    sd2 = StableDiffusion.from_preset("tiny-sd2", seed=0)
    key = "cond_stage_model.model.logit_scale"
    state = {k: v for k, v in sd2.state_dict().items() if k != key}
    assert len(state) == len(sd2.state_dict()) - 1, f"{key} not in the tiny-sd2 state dict"
    loaded = sdcore.load(_foreign(tmp_path, state), prediction_type="v_prediction")
    got = loaded.state_dict()
    assert got[key].item() == pytest.approx(math.log(1 / 0.07)), f"{key} = {got[key].item()}, want ln(1/0.07)"
    assert_same_weights({k: got[k] for k in state}, state)


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_integer_weights_are_refused(tiny, saved, tmp_path, fmt):
    """An integer tensor where the model has a float weight: an error naming file, key and dtype."""
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # diffusers: down_blocks.0.resnets.0.conv1
    if fmt == "safetensors":
        path = file = _foreign(tmp_path, {**tiny.state_dict(), key: (tiny.state_dict()[key] * 100).to(torch.int8)})
        dtype = "torch.int8"
    else:
        path = tmp_path / "d"
        shutil.copytree(saved["diffusers"], path)
        file = path / "unet" / "diffusion_pytorch_model.safetensors"
        unet = load_file(str(file))
        unet["down_blocks.0.resnets.0.conv1.weight"] = unet["down_blocks.0.resnets.0.conv1.weight"].to(torch.int32)
        save_file(unet, str(file))
        dtype = "torch.int32"
    with pytest.raises(CheckpointError) as err:
        sdcore.load(path, dtype=torch.float16)
    want = (f"{file}: non-floating tensors", f"{key} ({dtype})")
    assert all(w in str(err.value) for w in want), f"message {str(err.value)!r} lacks {want}"


def test_broken_diffusers_folder(saved, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(saved["diffusers"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae: no weights file \(looked for diffusion_pytorch_model"):
        sdcore.load(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers pipeline"):
        sdcore.load(tmp_path / "empty")


def test_bad_arguments(tiny, saved, tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        tiny.save(tmp_path / "x", layout="onnx")
    with pytest.raises(ValueError, match=r"\.safetensors, \.ckpt or \.pt"):
        tiny.save(tmp_path / "x.bin", layout="ldm")
    with pytest.raises(TypeError, match=r"dtype must be a float dtype .* got torch.int32"):
        sdcore.load(saved["safetensors"], dtype=torch.int32)
    # each loaded: meta read every weight, then "internal error: tensors left on meta"; an int was
    # kept as the tokenizer, and a pipeline failed on it later ("'int' object is not callable")
    with pytest.raises(ValueError, match="device='meta' holds no weights"):
        sdcore.load(saved["safetensors"], device="meta")
    with pytest.raises(TypeError, match="tokenizer must be a CLIPTokenizer .* or a tokenizer folder path, got int 5"):
        sdcore.load(saved["safetensors"], tokenizer=5)


def test_only_cross_attention_per_block_all_false_is_the_standard_unet(saved, tmp_path):
    """diffusers writes only_cross_attention per down block too: [False, False, False] is the
    standard SD UNet (it was refused as unsupported); a True in it still is refused."""
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(saved["diffusers"], folder)
    path = folder / "unet" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "only_cross_attention": [False] * len(raw["block_out_channels"])}))
    assert sdcore.load(folder).config.unet == sdcore.load(saved["diffusers"]).config.unet
    path.write_text(json.dumps({**raw, "only_cross_attention": [False, True][:len(raw["block_out_channels"])]}))
    with pytest.raises(sdcore.CheckpointError, match="only_cross_attention"):
        sdcore.load(folder)


def test_metadata_contains_config(saved, tiny):
    with safe_open(str(saved["safetensors"]), "pt") as f:
        meta = json.loads(f.metadata()["sdcore_config"])
    assert meta["name"] == "tiny" and meta["unet"]["num_heads"] == tiny.config.unet.num_heads


def _with_metadata(saved, tmp_path, fmt="safetensors", edit=None, **top):
    """A copy of the tiny single file whose sdcore_config has ``edit`` ({"scheduler": {...}, ...},
    merged into those parts) and ``top`` (top-level fields) changed."""
    from sdcore.detect import CONFIG_KEY

    src, path = saved[fmt], tmp_path / f"meta.{fmt}"
    if fmt == "safetensors":
        with safe_open(str(src), "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta[CONFIG_KEY])
    else:
        obj = torch.load(src, weights_only=True)
        config = json.loads(obj[CONFIG_KEY])
    for part, changes in (edit or {}).items():
        config[part].update(changes)
    config.update(top)
    if fmt == "safetensors":
        save_file(state, str(path), metadata={**meta, CONFIG_KEY: json.dumps(config)})
    else:
        torch.save({**obj, CONFIG_KEY: json.dumps(config)}, path)
    return path


# Each value fails at sampling time (or builds a model that computes something else) when the
# metadata is trusted; a diffusers folder's configs refuse the same values at load.
_BAD_METADATA = [
    # the schedule: sdcore.schedulers.check_config, as for a scheduler_config.json
    ({"scheduler": {"prediction_type": "v"}}, {}, "scheduler: unknown prediction_type 'v'; valid: epsilon"),
    ({"scheduler": {"sampler": "euler"}}, {}, "scheduler: unknown sampler 'euler'; valid: ddpm"),
    ({"scheduler": {"beta_schedule": "quadratic"}}, {}, "scheduler: unknown beta_schedule 'quadratic'"),
    ({"scheduler": {"timestep_spacing": "even"}}, {}, "scheduler: unknown timestep_spacing 'even'"),
    ({"scheduler": {"num_train_timesteps": 0}}, {}, "scheduler: num_train_timesteps must be an integer >= 1, got 0"),
    ({"scheduler": {"num_train_timesteps": 1000.5}}, {}, "num_train_timesteps must be an integer >= 1, got 1000.5"),
    ({"scheduler": {"steps_offset": -1}}, {}, "scheduler: steps_offset must be an integer >= 0, got -1"),
    ({"scheduler": {"beta_start": 0}}, {}, "scheduler: beta_start must be a number in (0, 1), got 0"),
    ({"scheduler": {"beta_end": 2}}, {}, "scheduler: beta_end must be a number in (0, 1), got 2"),
    ({"scheduler": {"clip_sample": "yes"}}, {}, "scheduler: clip_sample must be true or false, got 'yes'"),
    ({"scheduler": {"clip_sample_range": -1.0}}, {}, "scheduler: clip_sample_range must be a number in (0, inf)"),
    ({"scheduler": {"set_alpha_to_one": 1}}, {}, "scheduler: set_alpha_to_one must be true or false, got 1"),
    # the image size: what a folder's sample_size gives, a positive multiple of the VAE's 8x
    ({}, {"image_size": -64}, "image_size must be an integer >= 8, got -64"),
    ({}, {"image_size": "64"}, "image_size must be an integer >= 8, got '64'"),
    ({}, {"image_size": 60}, "image_size must be a multiple of 8 (the VAE downsamples 8x), got 60"),
    ({}, {"name": None}, "name must be a string, got None"),
    # the fields shapes cannot tell: sdcore.convert's readers, as for a folder's config.json
    ({"unet": {"norm_groups": 5}}, {}, "unet: norm_groups=5 does not divide the channel count 32"),
    ({"unet": {"norm_eps": 0}}, {}, "unet: norm_eps must be a finite number > 0, got 0"),
    ({"unet": {"upcast_attention": "false"}}, {}, "unet: upcast_attention must be true or false, got 'false'"),
    ({"unet": {"num_heads": 0}}, {}, "unet: num_heads must be an integer >= 1, got 0"),
    ({"unet": {"num_heads": 3}}, {}, "unet: num_heads=3 does not split the attention widths into equal heads: "
                                     "32 channels into 3, 64 channels into 3"),
    ({"unet": {"num_head_channels": 0}}, {}, "unet: num_head_channels must be an integer >= 1, got 0"),
    ({"vae": {"scaling_factor": "0.18215"}}, {}, "vae: scaling_factor must be a finite number > 0, got '0.18215'"),
    ({"vae": {"norm_groups": 12}}, {}, "vae: norm_groups=12 does not divide the channel count 32"),
    ({"vae": {"norm_eps": None}}, {}, "vae: norm_eps must be a finite number > 0, got None"),
    ({"vae": {"logvar_clamp": [20.0, -30.0]}}, {}, "vae: logvar_clamp must be two finite numbers [low, high], "
                                                   "low < high, got [20.0, -30.0]"),
    ({"text_encoder": {"heads": 3}}, {}, "text_encoder: width=32 is not divisible by heads=3"),
    ({"text_encoder": {"act": "relu"}}, {}, "text_encoder: unknown act 'relu'; valid: quick_gelu, gelu"),
    ({"text_encoder": {"layer_norm_eps": "1e-5"}}, {}, "text_encoder: layer_norm_eps must be a finite number > 0"),
    ({"text_encoder": {"clip_skip": 0}}, {}, "text_encoder: clip_skip must be an integer >= 1, got 0"),
    ({"text_encoder": {"clip_skip": 3}}, {}, "text_encoder: clip_skip must be in [1, 2], got 3"),
    ({"text_encoder": {"pad_token": 0}}, {}, "text_encoder: pad_token must be a token (a non-empty string), got 0"),
    ({"text_encoder": {"eos_token_id": -1}}, {}, "text_encoder: eos_token_id must be an integer >= 0, got -1"),
    ({"text_encoder": {"projection_dim": -1}}, {}, "text_encoder: projection_dim must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("edit, top, message", _BAD_METADATA, ids=[
    ",".join([f"{part}.{k}={v!r}" for part, d in edit.items() for k, v in d.items()] +
             [f"{k}={v!r}" for k, v in top.items()]) for edit, top, _ in _BAD_METADATA])
def test_bad_config_metadata_fails_at_load(saved, tmp_path, edit, top, message):
    """sdcore's config metadata is checked as a diffusers folder's configs are: a bad value is a
    CheckpointError at load naming the file, the metadata entry and the value, not an error from a
    pipeline later that names neither (the metadata was trusted whenever its architecture agreed)."""
    path = _with_metadata(saved, tmp_path, edit=edit, **top)
    with pytest.raises(CheckpointError) as err:
        sdcore.load(path)
    want = f"{path}: bad sdcore_config metadata: "
    assert str(err.value).startswith(want) and message in str(err.value), \
        f"message {str(err.value)!r} lacks {want!r} or {message!r}"


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_bad_config_metadata_is_refused_in_either_file_format_and_before_any_override(saved, tmp_path, fmt):
    """A .ckpt's sdcore_config entry is checked as a .safetensors' metadata; prediction_type= does not
    hide a bad recorded one, as it does not hide a folder's bad scheduler_config.json."""
    path = _with_metadata(saved, tmp_path, fmt, edit={"scheduler": {"prediction_type": "v"}})
    for kwargs in ({}, {"prediction_type": "epsilon"}):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: bad sdcore_config metadata: "
                                                  r"scheduler: unknown prediction_type 'v'"):
            sdcore.load(path, **kwargs)


def test_config_metadata_pad_token_outside_the_vocabulary_is_named(saved, tmp_path):
    """The default tokenizer pads with the metadata's pad_token: one it lacks names the file."""
    from sdcore.tokenizer import CLIPTokenizer

    try:
        CLIPTokenizer.default()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path = _with_metadata(saved, tmp_path, edit={"text_encoder": {"pad_token": "<|nosuchtoken|>"}})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: bad sdcore_config metadata: text_encoder: "
                                              r"pad_token '<\|nosuchtoken\|>' does not fit the default CLIP tokenizer"):
        sdcore.load(path)
    assert sdcore.load(path, tokenizer=sdcore.load(saved["safetensors"]).tokenizer).config.text_encoder.pad_token \
        == "<|endoftext|>", "a tokenizer argument pads, so the metadata's pad token no longer matters"


def test_config_metadata_architecture_fields_are_the_detected_values(saved, tmp_path, tiny):
    """JSON numbers equal to the detected ones but of another type (4.0, true) agree with the shapes;
    the config then holds the detected ints and bools, not the metadata's floats."""
    path = _with_metadata(saved, tmp_path, edit={"unet": {"in_channels": 4.0, "num_res_blocks": True},
                                                 "vae": {"double_z": 1}, "text_encoder": {"layers": 2.0}})
    config = sdcore.load(path).config
    assert config == tiny.config
    got = (config.unet.in_channels, config.unet.num_res_blocks, config.vae.double_z, config.text_encoder.layers)
    assert [type(v) for v in got] == [int, int, bool, int], f"types of the metadata's values kept: {got!r}"


@pytest.mark.parametrize("name", sorted(sdcore.PRESETS))
def test_every_preset_config_passes_the_metadata_checks(name):
    """What sdcore writes loads back: each preset's metadata, on its own (meta) shapes, gives the preset."""
    from sdcore.detect import config_to_json

    config = SDConfig.preset(name)
    sk = StableDiffusion.skeleton(config)
    shapes = {k: tuple(v.shape) for k, v in sk.state_dict().items()}
    assert detect_config(shapes, hint=config_to_json(config)) == config


@pytest.mark.parametrize("config", [
    SDConfig.preset("tiny-sd2"), SDConfig.preset("tiny-inpaint"),
    SDConfig.preset("tiny").replace(name="x", image_size=8, scheduler=SDConfig.preset("tiny").scheduler.replace(
        sampler="euler_a", beta_schedule="cosine", timestep_spacing="trailing", clip_sample=True, steps_offset=0,
        prediction_type="sample", num_train_timesteps=1)),
    SDConfig.preset("tiny").replace(unet=SDConfig.preset("tiny").unet.replace(num_head_channels=16, norm_groups=16),
                                    vae=SDConfig.preset("tiny").vae.replace(scaling_factor=1, logvar_clamp=(-1, 1.5)),
                                    text_encoder=SDConfig.preset("tiny").text_encoder.replace(
                                        clip_skip=2, projection_dim=0, pad_token="!", eos_token_id=49407)),
], ids=["tiny-sd2", "tiny-inpaint", "schedule", "free-fields"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_config_metadata_round_trip(tmp_path, config, fmt):
    """Save then load keeps every config the toolkit writes, at the edges of the checks too."""
    path = tmp_path / f"m.{fmt}"
    StableDiffusion.from_config(config, seed=0).save(path)
    assert sdcore.load(path).config == config


_TINY = SDConfig.preset("tiny")


@pytest.mark.parametrize("unet, vae", [
    (dict(attention_resolutions=(1, 2)), {}),  # ascending
    (dict(attention_resolutions=(8, 2, 1)), {}),  # 8: a level the 3-level UNet does not have
    (dict(time_embed_dim=4 * _TINY.unet.model_channels), {}),  # the default, written out
    ({}, dict(attn_resolutions=tuple(reversed(_TINY.vae.attn_resolutions)) or (256, 128))),
], ids=["ascending", "missing-level", "default-temb", "vae-attention"])
def test_metadata_spelling_an_architecture_otherwise_still_counts(tmp_path, unet, vae):
    """A config spelling the detected architecture another way (same model) keeps its fields that
    shapes cannot tell (4 heads, a VAE's scaling factor and 16 groups): it was judged 'not matching
    the weights', dropped with a warning, and the preset's 2 heads / 0.18215 / 32 groups loaded."""
    config = _TINY.replace(name="mine", unet=_TINY.unet.replace(num_heads=4, **unet),
                           vae=_TINY.vae.replace(scaling_factor=0.13025, norm_groups=16, **vae))
    path = tmp_path / "m.safetensors"
    StableDiffusion.from_config(config, seed=0).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = sdcore.load(path).config
    assert (back.name, back.unet.num_heads, back.vae.scaling_factor, back.vae.norm_groups) == (
        "mine", 4, 0.13025, 16), back


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_attention_in_the_middle_block_alone_round_trips(tmp_path, fmt):
    """attention_resolutions=(): the middle block's transformer is the UNet's only one, and its
    context width and projection come from it (the defaults, 768 and conv, failed the reload)."""
    config = SDConfig.preset("tiny-sd2").replace(name="mid-only", unet=SDConfig.preset("tiny-sd2").unet.replace(
        attention_resolutions=()))
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "folder")
    StableDiffusion.from_config(config, seed=0).save(path, **({"layout": "diffusers"} if fmt == "diffusers" else {}))
    back, want = sdcore.load(path).config.unet, config.unet
    if fmt == "diffusers":  # its config has heads per block: the middle block's count, not 8 channels per head
        mid = want.model_channels * want.channel_mult[-1]
        assert back.heads_at(mid) == want.heads_at(mid), (back.heads_at(mid), want.heads_at(mid))
        back = back.replace(num_heads=want.num_heads, num_head_channels=want.num_head_channels)
    assert back == want


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_save_refuses_a_config_load_would_refuse(tiny, tmp_path, fmt):
    """Nothing is written that cannot be read back: an image size off the VAE's 8x grid (a diffusers
    folder's sample_size would round it down to 56, silently)."""
    model = StableDiffusion.from_config(tiny.config.replace(image_size=60), seed=0)
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m")
    with pytest.raises(ValueError, match=r"cannot save .*: config image_size must be a multiple of 8 .*got 60 "
                                         r"\(sdcore.load would refuse the file\)"):
        model.save(path)
    assert not path.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers"])
def test_load_onto_cuda(saved, tiny, fmt, dtype):
    """Straight onto the GPU in half precision, tensor by tensor: the peak GPU memory of loading is
    the model itself (no second copy), and the weights are the CPU ones cast."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loaded = sdcore.load(saved[fmt], dtype=dtype, device="cuda")
    size = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 1.1 * size + 2**20, f"loading peaked at {peak / size:.2f}x the model's {size} bytes"
    ref = tiny.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.device.type == "cuda", k
        assert torch.equal(v.cpu(), ref[k].to(dtype) if ref[k].is_floating_point() else ref[k]), k
    x, ctx = torch.randn(1, 4, 8, 8, device="cuda", dtype=dtype), torch.randn(1, 77, 32, device="cuda", dtype=dtype)
    import kernels

    with torch.no_grad(), kernels.use("reference"):  # this test is about loading, not the kernels
        out = loaded.unet(x, torch.tensor([500], device="cuda"), ctx)
        want = tiny.unet(x.float().cpu(), torch.tensor([500]), ctx.float().cpu())
    assert_close(out.float().cpu(), want, rel=5e-2, name="unet on cuda")


# ---- Paths the tests above leave out (found by mutation testing: each test below fails for a
# one-token bug in sdcore/checkpoint.py or sdcore/detect.py that every other test passed) ----

def test_fp16_variant_weight_files_load(tiny, saved, tmp_path):
    """A folder whose weights exist only as `*.fp16.safetensors` (diffusers' fp16 variant) loads."""
    d = tmp_path / "d"
    shutil.copytree(saved["diffusers"], d)
    for sub, stem in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model")):
        (d / sub / f"{stem}.safetensors").rename(d / sub / f"{stem}.fp16.safetensors")
    assert_same_weights(dict(sdcore.load(d).state_dict()), dict(tiny.state_dict()))


def test_full_precision_weights_win_over_the_fp16_variant(tiny, saved, tmp_path):
    """A hub folder holding both: the fp32 shards load, not the lone fp16 file beside them (it won
    before, rounding every weight quietly), as diffusers' from_pretrained without a variant picks;
    an fp16 `.bin` variant alone loads too (diffusers' save_pretrained(variant="fp16",
    safe_serialization=False))."""
    d = tmp_path / "d"
    shutil.copytree(saved["diffusers"], d)
    unet = d / "unet"
    sd = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    _shard(unet / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"])
    save_file({k: v.half() for k, v in sd.items()}, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    assert_same_weights(dict(sdcore.load(d).state_dict()), dict(tiny.state_dict()))

    v = tmp_path / "v"
    shutil.copytree(saved["diffusers"], v)
    path = v / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(path)), v / "unet" / "diffusion_pytorch_model.fp16.bin")
    path.unlink()
    assert_same_weights(dict(sdcore.load(v).state_dict()), dict(tiny.state_dict()))


def test_folder_files_that_are_not_what_they_claim_are_named(saved, tmp_path):
    """A config.json holding a list, a tokenizer_config.json holding a list and a merges.txt whose
    last line names a token the vocabulary lacks (as a cut download leaves): each error names the file (an AttributeError or the
    tokenizers library's bare Exception before). Saving a tokenizer over a folder removes a
    stale tokenizer.json, which transformers 5 reads first."""
    from sdcore.tokenizer import CLIPTokenizer

    for rel, text, match in (("unet/config.json", "[]", r"d/unet/config\.json: holds a JSON list, not an object$"),
                             ("tokenizer/tokenizer_config.json", "[]",
                              r"tokenizer_config\.json: holds a JSON list, not an object")):
        d = tmp_path / rel.split("/")[0] / "d"
        shutil.copytree(saved["diffusers"], d)
        (d / rel).write_text(text)
        with pytest.raises((CheckpointError, ValueError), match=match):
            sdcore.load(d)
    tok = tmp_path / "tok"
    shutil.copytree(saved["diffusers"] / "tokenizer", tok)
    merges = (tok / "merges.txt").read_text(encoding="utf-8").split("\n")
    (tok / "merges.txt").write_text("\n".join(merges[:50] + [merges[50][:2] + "x< y"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tok: cannot build a BPE tokenizer from its vocabulary and merges"):
        CLIPTokenizer.from_folder(tok)
    fresh = tmp_path / "fresh"
    shutil.copytree(saved["diffusers"] / "tokenizer", fresh)
    (fresh / "tokenizer.json").write_text("{}")
    CLIPTokenizer.from_folder(fresh).save(fresh)
    assert not (fresh / "tokenizer.json").exists(), "a stale tokenizer.json survived the save"


def test_read_error_names_the_file_and_key(saved):
    """A tensor that cannot be read (truncated file, I/O error) is named, with its file."""
    from safetensors import SafetensorError

    src = checkpoint.open_checkpoint(saved["safetensors"])

    class Broken:
        def get_tensor(self, key):
            raise SafetensorError("simulated short read")

    src.file._st = Broken()
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: cannot read tensor 'model\.diffusion_model\.out\.2\.weight'"):
        src.read(["model.diffusion_model.out.2.weight"], torch.float32, torch.device("cpu"))


def test_only_a_1x1_conv_stands_for_a_linear_weight(saved, tmp_path):
    """Old VAE attention weights as 1x1 convs load as linear; a 3x3 kernel is a shape mismatch,
    named with the diffusers file, key and both shapes."""
    assert checkpoint._same_weight_shape((4, 4), (4, 4, 1, 1))
    assert not checkpoint._same_weight_shape((4, 4), (4, 4, 3, 3))
    d = tmp_path / "d"
    shutil.copytree(saved["diffusers"], d)
    path = d / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    key = "encoder.mid_block.attentions.0.to_q.weight"
    sd[key] = sd[key][:, :, None, None].repeat(1, 1, 3, 3).contiguous()
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model\.safetensors does not match the model's vae: "
                                              r"1 shape mismatches: encoder\.mid_block\.attentions\.0\.to_q\.weight: "
                                              r"expected \(64, 64\), got \(64, 64, 3, 3\)"):
        sdcore.load(d)


def _attention_projection(key: str) -> bool:
    """A VAE attention block's q, k, v or proj_out weight (LDM names)."""
    return (key.startswith("first_stage_model.") and ".attn" in key
            and key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")))


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_variants_load_as_the_ldm_layout(tiny, tmp_path, fmt):
    """CLIP keys without transformers' text_model. level, and VAE attention projections stored as
    linear (C, C) weights, load bitwise into the same model as the LDM layout."""
    sd = tiny.state_dict()
    clip = "cond_stage_model.transformer.text_model."
    variant = {k.replace(clip, "cond_stage_model.transformer."): v[:, :, 0, 0] if _attention_projection(k) else v
               for k, v in sd.items()}
    assert sum(map(_attention_projection, sd)) >= 8 and sum(k.startswith(clip) for k in sd) > 10  # the test tests something
    loaded = sdcore.load(_foreign(tmp_path, variant, f"variant.{fmt}"))
    assert_same_weights(sd, loaded.state_dict())
    assert loaded.config == tiny.config.replace(name=loaded.config.name)


def test_single_file_variant_errors_name_the_keys(tiny, tmp_path):
    """One CLIP weight under both names is refused, naming both; a linear weight is accepted for a
    1x1 conv only at an attention projection."""
    sd = tiny.state_dict()
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    both = dict(sd, **{"cond_stage_model.transformer.final_layer_norm.weight": sd[key].clone()})
    with pytest.raises(CheckpointError, match=r"both\.safetensors: holds 'cond_stage_model\.transformer\.final_layer_"
                                              r"norm\.weight' and 'cond_stage_model\.transformer\.text_model\."
                                              r"final_layer_norm\.weight', two names for one"):
        sdcore.load(_foreign(tmp_path, both, "both.safetensors"))
    conv = next(k for k, v in sd.items() if k.startswith("first_stage_model.") and v.shape[2:] == (1, 1)
                and not _attention_projection(k))
    flat = dict(sd, **{conv: sd[conv][:, :, 0, 0]})
    shape = tuple(sd[conv].shape)
    with pytest.raises(CheckpointError, match=re.escape(f"{conv}: expected {shape}, got {shape[:2]}")):
        sdcore.load(_foreign(tmp_path, flat, "flat.safetensors"))


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_save_tensors_sharing_storage(tmp_path, suffix):
    """Views of one storage (tied or sliced weights) save, each as its own tensor."""
    w = torch.randn(6, 4)
    sd = {"a": w[:3], "b": w[3:], "c": w}
    path = tmp_path / f"s.{suffix}"
    checkpoint.save_single_file(path, sd)
    got = load_file(str(path)) if suffix == "safetensors" else torch.load(path, weights_only=True)["state_dict"]
    assert_same_weights(got, sd)


@pytest.mark.parametrize("prediction, size", [("v_prediction", 768), ("epsilon", 512)])
def test_non_preset_sd2_image_size_follows_prediction_type(prediction, size):
    """An SD 2 architecture no preset matches: 768 px for v-prediction (SD 2's 768-v), else 512."""
    cfg = SDConfig.preset("sd21")
    cfg = cfg.replace(unet=cfg.unet.replace(in_channels=9))
    shapes = {k: tuple(v.shape) for k, v in StableDiffusion.skeleton(cfg).state_dict().items()}
    got = detect_config(shapes, prediction_type=prediction)
    assert got.name == "custom" and got.unet.in_channels == 9 and got.image_size == size, got


def test_unet_whose_first_level_is_wider_than_model_channels_is_refused(tiny):
    """channel_mult[0] != 1 (read from input_blocks.1) is no LDM or diffusers UNet: named at detection."""
    shapes = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    shapes["model.diffusion_model.input_blocks.1.0.out_layers.3.weight"] = (64, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"f\.safetensors: unsupported UNet, channel multipliers \[2, 2, 2\]"):
        detect_config(shapes, where="f.safetensors")


def test_vae_diffusers_cannot_express_is_refused_before_anything_is_written(tmp_path):
    """A VAE whose first level widens its conv_in (LDM builds ch_mult (2, 2, 4), and a single file
    round-trips it) has no diffusers AutoencoderKL: save(layout="diffusers") refuses it by name, and
    leaves no half-written folder (the UNet was saved before the VAE was refused)."""
    cfg = SDConfig.preset("tiny")
    cfg = cfg.replace(vae=cfg.vae.replace(ch_mult=(2, 2, 4, 4)))
    model = StableDiffusion.from_config(cfg, seed=0)
    with pytest.raises(ValueError, match=r"ch_mult\[0\] == 1.*ch_mult=\(2, 2, 4, 4\).*ch=64, ch_mult=\(1, 1, 2, 2\)"):
        model.save(tmp_path / "folder", layout="diffusers")
    assert not (tmp_path / "folder").exists() or not any((tmp_path / "folder").iterdir())
    model.save(tmp_path / "one.safetensors")
    again = sdcore.load(tmp_path / "one.safetensors")
    assert again.config.vae == cfg.vae


def test_missing_detection_key_is_named(tiny):
    shapes = {k: tuple(v.shape) for k, v in tiny.state_dict().items() if k != "model.diffusion_model.out.2.weight"}
    with pytest.raises(CheckpointError, match=r"key 'model\.diffusion_model\.out\.2\.weight' is missing"):
        detect_config(shapes, where="f.safetensors")


def test_mixed_keys_are_not_called_a_standalone_vae(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2), "foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        sdcore.load(path)


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_stale_config_metadata_yields_to_the_weights(tmp_path, part):
    """A file whose sdcore_config metadata names another architecture than its weights (a UNet
    with 4 input channels for a 9-channel one; a VAE twice as wide): the weights win, with a
    warning, whichever model the metadata gets wrong."""
    from sdcore.detect import config_to_json

    model = StableDiffusion.from_preset("tiny-inpaint" if part == "unet" else "tiny", seed=1)
    stale = SDConfig.preset("tiny")
    if part == "vae":
        stale = stale.replace(vae=stale.vae.replace(ch=2 * stale.vae.ch))
    path = tmp_path / "stale.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "sdcore_config": config_to_json(stale)})
    with pytest.warns(UserWarning, match="metadata does not match the weights"):
        loaded = sdcore.load(path)
    assert loaded.config == model.config


def test_a_vae_without_double_z_is_detected():
    """double_z=False (the encoder's conv_out gives z channels, no log-variance half), which no
    preset has, is read from the weights' shapes."""
    cfg = SDConfig.preset("tiny")
    cfg = cfg.replace(vae=cfg.vae.replace(double_z=False))
    shapes = {k: tuple(v.shape) for k, v in StableDiffusion.skeleton(cfg).state_dict().items()}
    assert detect_config(shapes).vae.double_z is False


@pytest.mark.parametrize("cls, sampler", list(checkpoint._SAMPLERS.items()))
def test_every_mapped_diffusers_scheduler_class_names_its_sampler(tmp_path, cls, sampler):
    """scheduler_config.json's class picks our sampler, and every sampler of sdcore.schedulers has
    a diffusers class (one without would load as the default, ddim, unsaid)."""
    from sdcore.checkpoint import scheduler_from_diffusers

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": cls}))
    assert scheduler_from_diffusers(path).sampler == sampler
    from sdcore.schedulers import SCHEDULERS

    assert set(checkpoint._SAMPLERS.values()) == set(SCHEDULERS), "a sampler without its diffusers class"


# ------------------------------------------------------- folders written by other tools, and their errors
def _copy(saved, tmp_path, name="d"):
    folder = tmp_path / name
    shutil.copytree(saved["diffusers"], folder)
    return folder


def _edit_config(folder, sub, **changes):
    path = folder / sub / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def _hf_text_encoder(folder, seed=3, **changes):
    """Replace text_encoder/ with a transformers CLIPTextModel (random weights) saved by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from sdcore.convert import clip

    raw = {**clip.config_to_diffusers(SDConfig.preset("tiny").text_encoder), **changes}
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(raw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05) + (p.dim() == 1) * p)
    shutil.rmtree(folder / "text_encoder")
    model.save_pretrained(folder / "text_encoder")
    return model


def _hf_tokenizer(folder, added=(), **kwargs):
    """Replace tokenizer/ with transformers' save_pretrained of it (tokens added, kwargs such as model_max_length)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", **kwargs)
    if added:
        tok.add_tokens(list(added))
    shutil.rmtree(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    return tok


def test_folder_with_textual_inversion_tokens_matches_transformers(saved, tmp_path):
    """Added tokens get their own ids (49408, not BPE pieces) and embedding rows, as diffusers encodes them."""
    folder = _copy(saved, tmp_path)
    te = _hf_text_encoder(folder, vocab_size=49409)
    tok = _hf_tokenizer(folder, added=["<cat-toy>"])
    ours = sdcore.load(folder)
    prompts = ["a photo of <cat-toy>", "a <CAT-TOY> on the beach", ""]
    want = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids
    got = ours.tokenizer(prompts)
    assert torch.equal(got, want), f"\n ours   {got[:, :8].tolist()}\n theirs {want[:, :8].tolist()}"
    assert got[0, :6].tolist() == [49406, 320, 1125, 539, 49408, 49407]
    with torch.no_grad():
        assert_close(ours.text_encoder(got), te(want).last_hidden_state, rel=REL, name="prompt embeddings")


def test_tokenizer_beyond_the_text_encoder_vocabulary_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _hf_tokenizer(folder, added=["<cat-toy>"])  # id 49408; the text encoder keeps 49408 rows
    with pytest.raises(CheckpointError, match=r"tokenizer: the tokenizer has ids up to 49408 \(49409 tokens, added "
                                              r"ones included\) but the text encoder of .* has a vocabulary of 49408"):
        sdcore.load(folder)


def test_tokenizer_model_max_length_follows_the_folder(saved, tmp_path):
    """A text encoder with 64 positions and a tokenizer with model_max_length 64: prompts are (B, 64),
    as diffusers' encode_prompt gives them; a tokenizer longer than the positions is refused."""
    folder = _copy(saved, tmp_path)
    te = _hf_text_encoder(folder, max_position_embeddings=64)
    tok = _hf_tokenizer(folder, model_max_length=64)
    ours = sdcore.load(folder)
    assert ours.tokenizer.max_length == 64 and ours.config.text_encoder.max_length == 64
    want = tok(["a cat"], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids
    ids = ours.tokenizer(["a cat"])
    assert torch.equal(ids, want), f"{ids.tolist()} != {want.tolist()}"
    with torch.no_grad():
        assert_close(ours.text_encoder(ids), te(want).last_hidden_state, rel=REL, name="64-position prompt")
    # transformers' "no limit" placeholder: the text encoder's 64 positions, not 77
    _hf_tokenizer(folder, model_max_length=int(1e30))
    assert sdcore.load(folder).tokenizer.max_length == 64
    _hf_tokenizer(folder, model_max_length=77)
    with pytest.raises(CheckpointError, match=r"tokenizer: the tokenizer pads prompts to 77 tokens .* has 64 "
                                              r"positions \(max_position_embeddings\)"):
        sdcore.load(folder)


def test_folder_without_a_scheduler_warns(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    shutil.rmtree(folder / "scheduler")
    with pytest.warns(UserWarning, match=rf"{folder.name}: no scheduler/scheduler_config\.json; using sdcore's "
                                         r"default \(SD's\) schedule: scaled_linear betas 0\.00085\.\.0\.012"):
        loaded = sdcore.load(folder)
    assert loaded.config.scheduler == SDConfig.preset("tiny").scheduler


@pytest.mark.parametrize("key", ["cross_attention_dim", "layers_per_block"])
def test_unet_per_block_lists(saved, tiny, tmp_path, key):
    """diffusers takes an int or one value per block: equal values load as the int, unequal ones are refused."""
    folder = _copy(saved, tmp_path)
    value = json.loads((folder / "unet" / "config.json").read_text())[key]
    _edit_config(folder, "unet", **{key: [value] * 3})
    assert_same_weights(sdcore.load(folder).state_dict(), tiny.state_dict())
    path = _edit_config(folder, "unet", **{key: [value, value, value + 1]})
    with pytest.raises(CheckpointError, match=rf"{path}: cannot read this config: {key}=\[.*\]: one value per "
                                              r"block is not supported"):
        sdcore.load(folder)
    _edit_config(folder, "unet", **{key: [value] * 2})
    with pytest.raises(CheckpointError, match=rf"{key}=.* must have one value per block \(3\)"):
        sdcore.load(folder)


@pytest.mark.parametrize("sub, changes, message", [
    ("unet", {"norm_num_groups": 24}, r"norm_num_groups=24 does not divide the channel count 32"),
    ("unet", {"in_channels": "4"}, r"in_channels must be an integer >= 1, got '4'"),
    ("unet", {"norm_eps": None}, r"norm_eps must be a finite number > 0, got None"),
    ("vae", {"norm_num_groups": 12}, r"norm_num_groups=12 does not divide the channel count 32"),
    ("vae", {"scaling_factor": "0.18215"}, r"scaling_factor must be a finite number > 0, got '0\.18215'"),
    ("vae", {"scaling_factor": None}, r"scaling_factor must be a finite number > 0, got None"),
    ("vae", {"shift_factor": 0.1}, r"shift_factor=0\.1 is not supported"),
    ("vae", {"latent_channels": 4.0}, r"latent_channels must be an integer >= 1, got 4\.0"),
    ("text_encoder", {"num_attention_heads": 5}, r"hidden_size=32 is not divisible by num_attention_heads=5"),
    # a bare TypeError or ZeroDivisionError while the model was built, or (-2) a load that failed in attention
    ("unet", {"attention_head_dim": "2"}, r"attention_head_dim must be a head count >= 1, or one per block \(3\), "
                                          r"got '2'"),
    ("unet", {"attention_head_dim": 0}, r"attention_head_dim must be a head count >= 1, .*got 0"),
    ("unet", {"attention_head_dim": -2}, r"attention_head_dim must be a head count >= 1, .*got -2"),
    ("unet", {"attention_head_dim": [2, 2]}, r"or one per block \(3\), got \[2, 2\]"),
    ("unet", {"attention_head_dim": 3}, r"attention_head_dim=3 does not split block_out_channels=\[32, 64, 64\] "
                                        r"into equal heads: 32 channels into 3, 64 channels into 3"),
    # the string "false" read as true, then 14 proj_in/proj_out shape mismatches
    ("unet", {"use_linear_projection": "false"}, r"use_linear_projection must be true or false, got 'false'"),
    ("unet", {"upcast_attention": 1}, r"upcast_attention must be true or false, got 1"),
])
def test_bad_config_values_name_the_file_and_option(saved, tmp_path, sub, changes, message):
    folder = _copy(saved, tmp_path)
    path = _edit_config(folder, sub, **changes)
    with pytest.raises(CheckpointError, match=rf"{path}: cannot read this config: .*{message}"):
        sdcore.load(folder)


def test_upcast_attention_null_reads_as_false(saved, tmp_path):
    """diffusers' checkpoint converter writes "upcast_attention": null unless told; its models read it
    as false, and such folders loaded until the flag was checked as a bool."""
    folder = _copy(saved, tmp_path)
    _edit_config(folder, "unet", upcast_attention=None, use_linear_projection=None)
    assert sdcore.load(folder).config.unet.upcast_attention is False


def test_upcast_attention_of_files_that_do_not_say(tmp_path):
    """An SD 2 v-prediction single file sets it as the 768-v hub folder, also one sdcore wrote before
    it kept the flag (its config metadata lacks the field); an epsilon one does not, and still reads
    as the tiny-sd2 preset whose shapes it has."""
    from sdcore.detect import CONFIG_KEY

    sd2 = StableDiffusion.from_preset("tiny-sd2", seed=2)
    path = tmp_path / "sd2.safetensors"
    sd2.save(path)
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[CONFIG_KEY])
    del config["unet"]["upcast_attention"]
    save_file(state, str(path), metadata={**meta, CONFIG_KEY: json.dumps(config)})
    assert sdcore.load(path).config.unet.upcast_attention is True
    foreign = _foreign(tmp_path, dict(sd2.state_dict()), "foreign.safetensors")
    with pytest.warns(UserWarning, match="768-v models"):
        eps = sdcore.load(foreign)
    assert (eps.config.name, eps.config.image_size, eps.config.unet.upcast_attention) == ("tiny-sd2", 64, False)


def test_upcast_attention_survives_a_folder_round_trip(saved, tmp_path):
    """SD 2.1's folder sets upcast_attention (diffusers then takes q·kᵀ in fp32, against NaN in fp16);
    a folder sdcore wrote back dropped it, so diffusers ran that UNet without."""
    folder = _copy(saved, tmp_path)
    _edit_config(folder, "unet", upcast_attention=True)
    sd = sdcore.load(folder)
    assert sd.config.unet.upcast_attention is True
    sd.save(tmp_path / "again", layout="diffusers")
    assert json.loads((tmp_path / "again" / "unet" / "config.json").read_text())["upcast_attention"] is True
    assert sdcore.load(saved["diffusers"]).config.unet.upcast_attention is False


def _shard(path, index_name, shard_names, fmt="safetensors"):
    """Split one weight file into shards + an index the way save_pretrained does; the original is removed."""
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    keys = sorted(state)
    parts = [keys[i::len(shard_names)] for i in range(len(shard_names))]
    weight_map = {}
    for name, part in zip(shard_names, parts):
        chunk = {k: state[k].contiguous() for k in part}
        save_file(chunk, str(path.parent / name)) if fmt == "safetensors" else torch.save(chunk, path.parent / name)
        weight_map.update({k: name for k in part})
    (path.parent / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    path.unlink()
    return weight_map


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_weights_load(saved, tiny, tmp_path, fmt):
    """diffusers' / transformers' sharded save_pretrained: *.{safetensors,bin}.index.json + shards."""
    folder = _copy(saved, tmp_path)
    names = {"unet": ("unet", "diffusion_pytorch_model"), "text_encoder": ("text_encoder", "model")}
    for sub, stem in names.values():
        path = folder / sub / f"{stem}.safetensors"
        shard_stem = stem if fmt == "safetensors" else ("pytorch_model" if stem == "model" else stem)
        _shard(path, f"{shard_stem}.{fmt}.index.json",
               [f"{shard_stem}-0000{i}-of-00002.{fmt}" for i in (1, 2)], fmt)
    assert_same_weights(sdcore.load(folder).state_dict(), tiny.state_dict())


def test_weight_file_precedence_is_the_libraries_own(saved, tiny, tmp_path):
    """Where a component's folder holds two forms of its weights, the one its library loads wins:
    transformers takes model.safetensors shards before pytorch_model.bin, diffusers takes the
    safetensors shards before one .safetensors (sdcore took the .bin and the single file)."""
    folder = _copy(saved, tmp_path)
    for sub, stem, other in (("text_encoder", "model", "pytorch_model.bin"),
                             ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors")):
        path = folder / sub / f"{stem}.safetensors"
        decoy = {k: v + 1 for k, v in load_file(str(path)).items()}
        _shard(path, f"{stem}.safetensors.index.json", [f"{stem}-0000{i}-of-00002.safetensors" for i in (1, 2)])
        save_file(decoy, str(folder / sub / other)) if other.endswith(".safetensors") else \
            torch.save(decoy, folder / sub / other)
    assert_same_weights(sdcore.load(folder).state_dict(), tiny.state_dict())


def test_sharded_weights_errors_name_the_index_and_shard(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    unet = folder / "unet"
    weight_map = _shard(unet / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                        ["s-1.safetensors", "s-2.safetensors"])
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    (unet / "s-2.safetensors").rename(unet / "gone.safetensors")
    with pytest.raises(CheckpointError, match=rf"{index}: shard file not found in .*unet: s-2\.safetensors"):
        sdcore.load(folder)
    (unet / "gone.safetensors").rename(unet / "s-2.safetensors")
    key = "conv_in.bias"  # sorted first: in s-1
    assert weight_map[key] == "s-1.safetensors", weight_map[key]
    index.write_text(json.dumps({"weight_map": {**weight_map, key: "s-2.safetensors"}}))  # the wrong shard
    with pytest.raises(CheckpointError) as e:
        sdcore.load(folder)
    msg = str(e.value)
    assert f"{index} does not match its shards" in msg and f"s-2.safetensors lacks {key}" in msg \
        and f"s-1.safetensors holds keys the index puts elsewhere or nowhere: {key} (index: s-2.safetensors)" \
        in msg, msg
    index.write_text(json.dumps({"weight_map": weight_map}))
    state = load_file(str(unet / "s-1.safetensors"))
    state[key] = torch.zeros(7)
    save_file(state, str(unet / "s-1.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{index} does not match the model's unet: 1 shape mismatches: "
                                              rf"{re.escape(key)} \(in s-1\.safetensors\): expected \(32,\), "
                                              r"got \(7,\)"):
        sdcore.load(folder)


@pytest.mark.parametrize("prefixed", [True, False])
def test_text_encoder_errors_name_the_file_and_the_key_as_stored(saved, tmp_path, prefixed):
    """Hub files store text_model.*, transformers >= 5.6 the same keys without the prefix: either way a
    wrong shape or a missing key is named as stored, in text_encoder/model.safetensors."""
    folder = _copy(saved, tmp_path)
    path = folder / "text_encoder" / "model.safetensors"
    state = {k if prefixed else k.removeprefix("text_model."): v for k, v in load_file(str(path)).items()}
    key = ("text_model." if prefixed else "") + "final_layer_norm.weight"
    assert key in state, sorted(state)[:5]
    save_file({**state, key: torch.zeros(7)}, str(path))
    with pytest.raises(CheckpointError, match=rf"{path} does not match the model's text_encoder: 1 shape "
                                              rf"mismatches: {key}: expected \(32,\), got \(7,\)$"):
        sdcore.load(folder)
    save_file({k: v for k, v in state.items() if k != key}, str(path))
    with pytest.raises(CheckpointError, match=rf"{path} does not match the model's text_encoder: missing keys: "
                                              rf"{key} \(1\)$"):
        sdcore.load(folder)


def test_text_encoder_pooling_at_a_token_the_tokenizer_lacks_is_refused(saved, tmp_path):
    """eos_token_id (not the legacy 2) is where the pooled feature is read: it must be the tokenizer's EOS."""
    folder = _copy(saved, tmp_path)
    _edit_config(folder, "text_encoder", eos_token_id=49407)
    assert sdcore.load(folder).config.text_encoder.eos_token_id == 49407
    _edit_config(folder, "text_encoder", eos_token_id=5)
    with pytest.raises(CheckpointError, match=r"pools at token id 5 \(eos_token_id\), but the tokenizer's "
                                              r"<\|endoftext\|> is id 49407"):
        sdcore.load(folder)


def test_saving_over_a_sharded_folder_removes_the_index_that_would_outrank_it(tmp_path):
    """An earlier save left the UNet as shards and an index: a save over it wrote one
    .safetensors beside them, and the index (first in diffusers' order and ours) loaded the old
    weights, silently. The index and its shards go; a file the index does not list stays."""
    from safetensors.torch import load_file

    old, new = StableDiffusion.from_preset("tiny", seed=0), StableDiffusion.from_preset("tiny", seed=7)
    old.save(tmp_path, layout="diffusers")
    unet = tmp_path / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    shard = unet / "diffusion_pytorch_model-00001-of-00001.safetensors"
    weights.rename(shard)
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: shard.name for k in load_file(shard)}}))
    (unet / "notes.txt").write_text("mine")
    assert torch.equal(sdcore.load(tmp_path).unet.out[2].weight, old.unet.out[2].weight)  # the shards load
    new.save(tmp_path, layout="diffusers")
    assert not index.exists() and not shard.exists() and (unet / "notes.txt").exists()
    assert torch.equal(sdcore.load(tmp_path).unet.out[2].weight, new.unet.out[2].weight), "the old shards loaded"


@pytest.mark.parametrize("value", [[[1], 2], "ab"])
def test_metadata_architecture_of_the_wrong_types_loses_to_the_weights(saved, tmp_path, value):
    """Attention levels that are no list of ints cannot be put in detection's spelling (a
    TypeError from sorting them, unguarded): the metadata disagrees, the weights win, with the warning."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(saved["safetensors"]), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["sdcore_config"])
    config["unet"]["attention_resolutions"] = value
    path = tmp_path / "m.safetensors"
    save_file(load_file(saved["safetensors"]), str(path), metadata={**meta, "sdcore_config": json.dumps(config)})
    with pytest.warns(UserWarning, match="metadata does not match the weights"):
        assert sdcore.load(path).config.unet.attention_resolutions == SDConfig.preset("tiny").unet.attention_resolutions


# ------------------------------------------------------------------------- files in circulation
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_saving_over_the_file_the_model_was_loaded_from(tmp_path, fmt):
    """A model loaded from a zip .ckpt or a .safetensors reads its weights from the file's memory
    map; torch.save into that path truncated it under the model (a bus error, the checkpoint lost).
    Saves go to a temporary file and are renamed over the old one. In a subprocess: a regression
    kills the interpreter."""
    script = f"""
import torch, sdcore
from pathlib import Path
path = Path({str(tmp_path / ("m." + fmt))!r})
sdcore.StableDiffusion.from_preset("tiny", seed=4).save(path)
model = sdcore.load(path)
want = {{k: v.clone() for k, v in model.state_dict().items()}}
model.save(path)
again = sdcore.load(path).state_dict()
assert all(torch.equal(again[k], v) for k, v in want.items()), "the rewritten file differs"
assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items()), "the model's weights changed"
assert sorted(p.name for p in path.parent.iterdir()) == [path.name], list(path.parent.iterdir())
print("ok")
"""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stdout, done.stderr[-2000:])


def test_a_model_on_meta_saves_nothing(tmp_path):
    model = StableDiffusion.from_preset("tiny", device="meta")
    for path in (tmp_path / "folder", tmp_path / "m.safetensors", tmp_path / "m.ckpt"):
        with pytest.raises(ValueError, match="is on the meta device"):
            model.save(path)
    assert list(tmp_path.iterdir()) == []  # the folder layout wrote its first config.json before


@pytest.mark.skipif(torch.__version__ < "2.6", reason="stand-ins for a named global need torch >= 2.6")
def test_a_lightning_training_checkpoint_loads(tmp_path, tiny, monkeypatch):
    """The SD 1.x releases are PyTorch Lightning checkpoints: ``callbacks`` keyed by the
    ModelCheckpoint class, a numpy ``global_step``. weights_only refused them; the class is read as
    an inert stand-in (Lightning need not be installed) and numpy scalars of plain dtypes load."""
    import sys
    import types

    import numpy as np

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod.__name__})
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    path = tmp_path / "sd-v1-x.ckpt"
    torch.save({"epoch": 6, "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
                "state_dict": dict(tiny.state_dict()),
                "callbacks": {ModelCheckpoint: {"best_model_path": "x", "monitor": None}}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    assert_same_weights(tiny.state_dict(), sdcore.load(path).state_dict())


class _CallsSystem:
    def __reduce__(self):
        import os
        return os.system, ("echo never",)


class _ObjectScalar:
    def __reduce__(self):  # numpy's scalar constructor with an object dtype reads its bytes as a pointer
        import numpy as np
        return np._core.multiarray.scalar, (np.dtype("O"), b"\0" * 8)


@pytest.mark.parametrize("payload, named", [(_CallsSystem, r"(posix|nt)\.system"),
                                             (_ObjectScalar, r"numpy\.(dtypes\.ObjectDType|_?core\.multiarray\.scalar)")])
def test_a_pickle_that_would_run_code_is_named_not_called_corrupt(tmp_path, tiny, payload, named):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(tiny.state_dict()), "x": payload()}, path)
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt: holds Python objects besides tensors \({named}\)"):
        sdcore.load(path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_a_single_files_noise_schedule_is_read_from_its_buffers(tmp_path, tiny, dtype):
    """LDM samples with the ``betas`` its file holds: a schedule sdcore implements is taken from
    them (it was dropped for SD's default without a word); one it does not is named in a warning.
    In the buffers' own precision: an "fp16 pruned" file casts them too (it warned on every load)."""
    from sdcore.schedulers import make_betas

    state = dict(tiny.state_dict())
    sd15 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # LDM's, in fp64
    for buffers in ({"betas": sd15}, {"alphas_cumprod": torch.cumprod(1 - sd15, 0)}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = sdcore.load(_foreign(tmp_path, {**state, **{k: v.to(dtype) for k, v in buffers.items()}}, "sd.ckpt"))
        assert loaded.config == SDConfig.preset("tiny"), (list(buffers), loaded.config.scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDPM's, over 500 steps
        sched = sdcore.load(_foreign(tmp_path, {**state, "betas": torch.linspace(1e-4, 2e-2, 500).to(dtype)},
                                     "ddpm.ckpt")).config.scheduler
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.num_train_timesteps) == \
        ("linear", 1e-4, 2e-2, 500), sched
    ac = torch.cumprod(1 - make_betas("cosine", 1000).double(), 0).to(dtype)
    assert sdcore.load(_foreign(tmp_path, {**state, "alphas_cumprod": ac}, "cos.ckpt")).config.scheduler.beta_schedule \
        == "cosine"
    state["betas"] = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    with pytest.warns(UserWarning, match=r"rand\.ckpt: its betas \(1000 steps, .*none of the noise schedules"):
        sched = sdcore.load(_foreign(tmp_path, state, "rand.ckpt")).config.scheduler
    assert sched == SDConfig.preset("tiny").scheduler


def test_a_legacy_torch_file_hands_each_tensor_over_as_it_is_cast(tmp_path, tiny):
    """A pre-zip torch file is not memory-mapped: its tensors were all kept until loading ended,
    beside their fp16 casts (2551 MiB peak for an 813 MiB model, against 921 for the zip file).
    Each is dropped once read, and the loaded weights are still the file's."""
    import gc
    import weakref

    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": dict(tiny.state_dict())}, path, _use_new_zipfile_serialization=False)
    f = checkpoint._TensorFile(path)
    key = next(iter(f.shapes))
    original = weakref.ref(f._sd[key])
    half = f.read(key, torch.float16, torch.device("cpu"))
    gc.collect()
    assert original() is None, "the file's fp32 tensor outlived its cast"
    assert torch.equal(half, tiny.state_dict()[key].half())
    loaded = sdcore.load(path, dtype=torch.float16)
    assert all(torch.equal(v, tiny.state_dict()[k].half()) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_a_save_keeps_the_files_mode_and_writes_through_a_symlink(tmp_path, tiny, fmt):
    """The rename that makes a save safe replaced a symlink by a file (its target left stale) and a
    0600 checkpoint by a 0644 one. The target is written, and its mode kept."""
    import os
    import stat

    real, link = tmp_path / f"real.{fmt}", tmp_path / f"link.{fmt}"
    StableDiffusion.from_preset("tiny", seed=9).save(real)
    os.chmod(real, 0o600)
    link.symlink_to(real)
    tiny.save(link)
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert_same_weights(tiny.state_dict(), sdcore.load(real).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([real.name, link.name])


# ---- from a fuzz of the loaders (2026-11-25): raw internal errors where a file's JSON is odd ----
def test_odd_json_in_metadata_and_configs_is_named(saved, tmp_path):
    """A sdcore_config section that is a list, or metadata nested 10^5 deep, was an AttributeError /
    RecursionError: both are ignored with the warning an unreadable hint gets; a config.json nested
    that deep is the CheckpointError naming it; a list as scheduler _class_name was a TypeError
    (unhashable) after its own warning."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdcore.detect import CheckpointError

    state = load_file(saved["safetensors"])
    with safe_open(saved["safetensors"], "pt") as f:
        meta = f.metadata()
    section_list = json.loads(meta["sdcore_config"])
    section_list["unet"] = []
    for name, hint in (("list", json.dumps(section_list)), ("deep", "[" * 100000 + "]" * 100000)):
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata={**meta, "sdcore_config": hint})
        with pytest.warns(UserWarning, match="ignoring unreadable sdcore_config metadata"):
            sdcore.load(path)
    folder = tmp_path / "deep"
    shutil.copytree(saved["diffusers"], folder)
    (folder / "unet" / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match=r"unet/config\.json: not a readable JSON file: nested too deeply"):
        sdcore.load(folder)
    folder = _with_scheduler_config(saved, tmp_path / "cls", {"_class_name": []})
    with pytest.warns(UserWarning, match=r"_class_name \[\] is not a scheduler class"):
        sdcore.load(folder)
