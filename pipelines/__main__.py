"""``python -m pipelines txt2img|img2img|inpaint|replay ...``: run a pipeline, write PNGs and a JSON
sidecar per image with everything needed to reproduce it (every parameter and the seed, the model
source, the kernel backends, the sdlab/torch/Triton versions); ``replay SIDECAR`` re-runs one exactly.

    python -m pipelines txt2img --preset tiny --prompt "a red bicycle" --steps 20 --seed 1 --out out/
    python -m pipelines inpaint --ckpt sd15-inpaint.safetensors --image in.png --mask mask.png \\
        --variant unet9 --prompt "a cat" --kernels group_norm_silu=triton,scheduler_step=triton --out out/
    python -m pipelines replay out/0000-txt2img-s1.json --out out/again/
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

COMMANDS = ("txt2img", "img2img", "inpaint")
INPUTS = {"txt2img": (), "img2img": ("image",), "inpaint": ("image", "mask")}  # the images each command reads
_KINDS = {"a string": (str,), "a string or null": (str, type(None)), "a number": (int, float),
          "a number or null": (int, float, type(None)), "an integer": (int,), "an integer or null": (int, type(None)),
          "true or false": (bool,)}
PARAM_KINDS = {  # what the CLI records in a sidecar's "params" (null: the option was left to its default)
    "prompt": "a string", "negative_prompt": "a string or null", "cfg_scale": "a number", "steps": "an integer",
    "sampler": "a string or null", "eta": "a number or null", "seed": "an integer", "height": "an integer or null",
    "width": "an integer or null", "resize": "true or false", "batch_size": "an integer",
    "clip_skip": "an integer or null", "strength": "a number", "variant": "a string",
    "jump_length": "an integer or null", "jump_n_sample": "an integer or null", "paste_back": "true or false"}
# the params each command's sidecar records, every one always (a sidecar without one is not the CLI's)
PARAMS = {"txt2img": ("prompt", "negative_prompt", "cfg_scale", "steps", "sampler", "eta", "seed", "height", "width",
                      "resize", "batch_size", "clip_skip")}
PARAMS["img2img"] = (*PARAMS["txt2img"], "strength")
PARAMS["inpaint"] = (*PARAMS["img2img"], "variant", "jump_length", "jump_n_sample", "paste_back")
DTYPES = ("float32", "float16", "bfloat16")  # torch's names: what a sidecar records
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
KERNELS_ENV = "SDLAB_KERNELS"
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory", re.IGNORECASE)


# ------------------------------------------------------------------------------------ provenance
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks: a checkpoint is gigabytes
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_digests(ckpt: str) -> dict[str, str]:
    """The sha256 of every file loading ``ckpt`` reads, by its path relative to the checkpoint (a
    single file: its name): one more read of the weights, about a second per GB."""
    from sdcore.checkpoint import open_checkpoint

    root = Path(ckpt).resolve()
    base = root if root.is_dir() else root.parent
    return {str(p.relative_to(base)): sha256(p) for p in open_checkpoint(root).paths()}


def check_checkpoint(model: dict) -> None:
    """A replay's checkpoint must hold what the sidecar's run loaded (sidecars before the digests
    were recorded are not checked)."""
    recorded = model.get("ckpt_sha256")
    if model.get("ckpt") and recorded:
        now = checkpoint_digests(model["ckpt"])
        changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
        if changed:
            raise ValueError(f"--ckpt {model['ckpt']} changed since the sidecar was written (sha256 differs, or the "
                             f"file is new or gone: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})")


# --------------------------------------------------------------------------------------- kernels
@contextlib.contextmanager
def kernel_scope(spec: str | None):
    """Run with ``spec`` (``SDLAB_KERNELS`` syntax: ``"triton"`` for every op that has it, or
    ``"attention=sdpa,group_norm_silu=triton"``, unnamed ops on their default) as ``SDLAB_KERNELS``,
    and restore the variable after. Through the variable, not a ``kernels.use()`` scope, so the
    registry attributes each choice to it (see :func:`attribute`), with the registry's own parsing
    and checks. None or "": the default backends, whatever ``SDLAB_KERNELS`` says now (a job
    records None only when neither ``--kernels`` nor ``SDLAB_KERNELS`` chose any, so a replay must
    not take them from here)."""
    saved = os.environ.pop(KERNELS_ENV, None)
    if spec:
        os.environ[KERNELS_ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(KERNELS_ENV, None)
        if saved is not None:
            os.environ[KERNELS_ENV] = saved


def attribute(text: str, spec: str | None, source: str) -> str:
    """``text`` (a kernels message or ``describe()``) with the registry's ``SDLAB_KERNELS='spec'``
    (how :func:`kernel_scope` passes the choice) named as where it really came from: ``source`` is
    "--kernels", "SDLAB_KERNELS" or "sidecar"."""
    if not spec or source == KERNELS_ENV:
        return text
    label = f"--kernels {spec!r}" if source == "--kernels" else f'the sidecar\'s "kernels": {spec!r}'
    return text.replace(f"{KERNELS_ENV}={spec!r}", label)


@contextlib.contextmanager
def attributed_warnings(spec: str | None, source: str):
    """Warnings shown meanwhile (a fallback chain's, which name where the choice came from) say
    ``source`` as :func:`attribute` does, not the ``SDLAB_KERNELS`` that :func:`kernel_scope` sets."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        shown(attribute(str(message), spec, source), category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


# ------------------------------------------------------------------------------------------ jobs
def job_from_args(args) -> dict:
    """The run as data: what a sidecar stores and ``replay`` reads back."""
    params = {name: getattr(args, name) for name in PARAMS[args.command]}  # jump_*: None unless given
    inputs = {}
    if args.command in ("img2img", "inpaint"):
        inputs["image"] = args.image
    if args.command == "inpaint":
        for opt, value in (("--jump-length", args.jump_length), ("--jump-n-sample", args.jump_n_sample)):
            if value is not None and args.variant != "repaint":  # refused before the model is built
                raise ValueError(f"{opt} {value} applies to --variant repaint only (RePaint's resampling); "
                                 f"--variant {args.variant} does not resample: leave {opt} out")
        inputs["mask"] = args.mask
    if args.ckpt and args.model_seed is not None:
        raise ValueError(f"--model-seed {args.model_seed} seeds a --preset's random weights; --ckpt {args.ckpt} has "
                         "its own: leave --model-seed out")
    if args.model_seed is not None and not 0 <= args.model_seed < 2**63:
        raise ValueError(f"--model-seed must be in [0, 2^63), got {args.model_seed}")
    if args.prediction_type is not None and not args.ckpt:
        raise ValueError(f"--prediction-type {args.prediction_type} overrides a --ckpt's; --preset {args.preset} "
                         "has its own (the -v presets are v_prediction): leave --prediction-type out")
    model_seed = None if args.ckpt else 0 if args.model_seed is None else args.model_seed
    return {"command": args.command,
            "model": {"ckpt": str(Path(args.ckpt).resolve()) if args.ckpt else None,
                      "ckpt_sha256": checkpoint_digests(args.ckpt) if args.ckpt else None, "preset": args.preset,
                      "model_seed": model_seed, "dtype": args.dtype, "device": args.device,
                      "prediction_type": args.prediction_type},
            "kernels": args.kernels if args.kernels is not None else os.environ.get(KERNELS_ENV) or None,
            "plugins": [str(Path(p).resolve()) if p.endswith(".py") else p for p in args.plugin],
            "plugin_sha256": {str(Path(p).resolve()): sha256(Path(p)) for p in args.plugin
                              if p.endswith(".py") and Path(p).is_file()},
            "inputs": {k: {"path": str(Path(v).resolve()), "sha256": sha256(_existing(k, Path(v)))}
                       for k, v in inputs.items()},
            "params": params}


SIDECAR_KEYS = {"command": str, "model": dict, "kernels": (str, type(None)), "inputs": dict, "params": dict}


def read_sidecar(path: Path) -> dict:
    """The job a sidecar records, or a ValueError saying why the file is not one."""
    if not path.exists():
        raise ValueError(f"no such sidecar: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a JSON sidecar (a {'directory' if path.is_dir() else 'special file'})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        image = path.with_suffix(".json") if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else None
        hint = f"; the sidecar of an image is the .json beside it: {image}" if image is not None else ""
        raise ValueError(f"{path}: not a JSON sidecar (binary, not UTF-8 text{hint})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON sidecar ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a JSON sidecar (nested too deeply)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the sidecar: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a sidecar (a JSON {type(data).__name__}, not an object)")
    for key, kind in SIDECAR_KEYS.items():
        if key not in data:
            raise ValueError(f"{path}: not a sidecar (no {key!r} entry)")
        if not isinstance(data[key], kind):
            raise ValueError(f"{path}: not a sidecar ({key!r} is a {type(data[key]).__name__})")
    _check_sidecar_model(path, data["model"])
    command = data["command"]
    if command not in COMMANDS:
        raise ValueError(f"{path}: not a sidecar (command {command!r}; known: {', '.join(COMMANDS)})")
    if sorted(data["inputs"]) != sorted(INPUTS[command]):
        raise ValueError(f"{path}: not a sidecar ({command} reads the inputs {list(INPUTS[command])}, the sidecar "
                         f"has {sorted(data['inputs'])})")
    for name, inp in data["inputs"].items():
        if not (isinstance(inp, dict) and isinstance(inp.get("path"), str)):
            raise ValueError(f"{path}: not a sidecar (input {name!r} has no 'path' string)")
    if data["params"].get("seed") is None:
        raise ValueError(f"{path}: no seed recorded; the run cannot be reproduced")
    for name, value in data["params"].items():  # the ranges are the pipeline's to check, with its messages
        if name not in PARAMS[command]:  # a typo, or another command's: the run would silently drop it
            raise ValueError(f"{path}: not a sidecar (unknown 'params' entry {name!r}; {command} records "
                             f"{', '.join(PARAMS[command])})")
        want = PARAM_KINDS[name]
        if not isinstance(value, _KINDS[want]) or (isinstance(value, bool) and want != "true or false"):
            raise ValueError(f"{path}: 'params' entry {name!r} must be {want}, got {type(value).__name__} {value!r}")
    missing = [name for name in PARAMS[command] if name not in data["params"]]
    if missing:  # the run would take today's defaults for them, not what ran (the CLI writes each, null too)
        raise ValueError(f"{path}: not a sidecar (no 'params' entr{'y' if len(missing) == 1 else 'ies'} "
                         f"{', '.join(map(repr, missing))}; a {command} sidecar records every parameter, null for "
                         "a default)")
    job = {k: data[k] for k in SIDECAR_KEYS}
    if job["model"].get("ckpt"):  # sidecars before 2026-11-24 record the CLI's default seed beside a checkpoint
        job["model"] = {**job["model"], "model_seed": None}
    job["plugins"] = data.get("plugins", [])  # sidecars before research backends have none
    if not (isinstance(job["plugins"], list) and all(isinstance(p, str) for p in job["plugins"])):
        raise ValueError(f"{path}: not a sidecar ('plugins' is not a list of module names and files)")
    job["plugin_sha256"] = data.get("plugin_sha256", {})  # sidecars before plugin digests have none
    if not (isinstance(job["plugin_sha256"], dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in job["plugin_sha256"].items())):
        raise ValueError(f"{path}: not a sidecar ('plugin_sha256' must map plugin files to digests: "
                         f"{type(job['plugin_sha256']).__name__} {job['plugin_sha256']!r})")
    result = data.get("result") if isinstance(data.get("result"), dict) else {}
    job["recorded"] = {"versions": data.get("versions") if isinstance(data.get("versions"), dict) else {},
                       "unet_calls": result.get("unet_calls")}  # what the run gave, to compare the replay with
    if job["command"] == "inpaint" and job["params"].get("variant") != "repaint":
        # older sidecars record the CLI's jump defaults for every variant; only repaint used them
        job["params"] = {**job["params"], "jump_length": None, "jump_n_sample": None}
    return job


def _check_sidecar_model(path: Path, model: dict) -> None:
    """The sidecar's "model" entry: a dtype, a device (or null) and a checkpoint or a known preset."""
    from sdcore.config import PRESETS
    from sdcore.schedulers import PREDICTION_TYPES

    for key, kinds, what in (("dtype", str, "a string"), ("device", (str, type(None)), "a string or null"),
                             ("ckpt", (str, type(None)), "a path or null"), ("preset", (str, type(None)),
                                                                             "a preset name or null")):
        if not isinstance(model.get(key), kinds):
            have = f"{type(model[key]).__name__} {model[key]!r}" if key in model else "missing"
            raise ValueError(f"{path}: not a sidecar ('model' entry {key!r} must be {what}: {have})")
    if model.get("prediction_type") not in (None, *PREDICTION_TYPES):
        raise ValueError(f"{path}: not a sidecar ('model' entry 'prediction_type' must be null or one of "
                         f"{', '.join(PREDICTION_TYPES)}: {model['prediction_type']!r})")
    digests = model.get("ckpt_sha256")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
        raise ValueError(f"{path}: not a sidecar ('model' entry 'ckpt_sha256' must map file names to digests)")
    if not model.get("ckpt"):
        if model.get("preset") not in PRESETS:
            raise ValueError(f"{path}: 'model' names neither a checkpoint nor a known preset (preset "
                             f"{model.get('preset')!r}; known presets: {', '.join(sorted(PRESETS))})")
        seed = model.get("model_seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"{path}: not a sidecar ('model' entry 'model_seed' must be an int in [0, 2^63): "
                             f"{seed!r})")


def check_code(recorded: dict) -> None:
    """Warn when the sidecar was written by another sdlab (version or git commit): a fix since may
    change the output, so the replay need not be bit-exact."""
    from .common import git_commit, sdlab_version

    now = {"sdlab": sdlab_version(), "git_commit": git_commit()}
    changed = [f"{k} {recorded[k]} -> {now[k]}" for k in now
               if recorded.get(k) is not None and now[k] is not None and recorded[k] != now[k]]
    if changed:
        warnings.warn(f"the sidecar was written by other code ({', '.join(changed)}): the output may differ from "
                      "the recorded run's")


def _existing(name: str, path: Path) -> Path:
    if path.is_dir():
        raise ValueError(f"--{name} {path}: a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"--{name} {path}: no such file")
    return path


def resolve_device(name: str | None) -> str:
    """``name`` if this machine has that device (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch asserts on "cuda"
        why = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # torch's first sentence
        raise ValueError(f"--device {name}: not available on this machine (torch {torch.__version__}): {why}") from e
    if torch.device(name).type == "cpu" and torch.device(name).index not in (None, 0):
        raise ValueError(f"--device {name}: the CPU is one device (cpu or cpu:0)")
    try:
        torch.Generator(device=name)  # the seed's generator lives there (meta has none)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: cannot draw random numbers there ({str(e).splitlines()[0]}); "
                         "use cpu or a GPU") from e
    return name


def open_image(name: str, path: Path):
    """The image at ``path``, read now: not an image, or a truncated one, is a usage error. Turned
    upright by its EXIF orientation, as a viewer shows it (a phone's photo is stored sideways with
    a tag; diffusers' load_image turns it too)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .common import sixteen_bit

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"--{name} {path}: not a readable image: {e}") from e
    image = ImageOps.exif_transpose(sixteen_bit(image))  # before the copy, which has no format
    if name == "mask" and image.mode in _COLOUR_MODES:  # editors' exports: their luminance
        image = image.convert("L")
    elif name == "mask" and image.mode in ("I", "F"):  # 32-bit: is 1 white, or 255, or 65535?
        raise ValueError(f"--mask {path}: a 32-bit {'integer' if image.mode == 'I' else 'float'} image (PIL mode "
                         f"{image.mode!r}) has no white to read 1 = repaint from; save the mask as 8- or 16-bit "
                         "grayscale, black and white, or colour")
    return image


# colour and palette modes (with alpha or not), whose luminance a mask is read as
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "P", "PA")


def parse_dtype(name: str) -> str:
    """torch's name for a dtype given as float32/float16/bfloat16 or fp32/fp16/bf16 (float, half)."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: fp32/float32, fp16/float16, bf16/bfloat16")
    return name


def _dtype_arg(name: str) -> str:
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def prepare_out(out: Path) -> Path | None:
    """Create the output directory and check that a file can be written in it, before any
    expensive work (a model build, a generation), with an error naming ``--out``. Returns the
    outermost directory created now (None if ``out`` existed), for :func:`remove_if_empty`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        blocker = next((p for p in out.parents if p.exists()), None)
        why = (f"{blocker} is a file, not a directory" if blocker is not None and not blocker.is_dir()
               else e.strerror or str(e))
        raise ValueError(f"--out {out}: cannot create or write the output directory: {why}") from None
    return missing[-1] if missing else None


def remove_if_empty(out: Path, top: Path | None) -> None:
    """Undo :func:`prepare_out` after a failed run: remove ``out`` and its parents up to ``top``
    while they are empty."""
    if top is None:
        return
    for p in (out, *out.parents):
        try:
            p.rmdir()
        except OSError:  # not empty (or gone): keep it and what holds it
            return
        if p == top:
            return


def load_model(spec: dict):
    import torch

    import sdcore

    dtype, device = getattr(torch, parse_dtype(spec["dtype"])), spec["device"]
    if spec.get("ckpt"):
        return sdcore.load(spec["ckpt"], dtype=dtype, device=device, prediction_type=spec.get("prediction_type"))
    return sdcore.StableDiffusion.from_preset(spec["preset"], seed=spec.get("model_seed", 0), dtype=dtype, device=device)


def _next_index(out: Path) -> int:
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{4,})-", p.name))]
    return max(taken, default=-1) + 1


def versions() -> dict:
    """What the numerics depend on: sdlab (and its git commit), torch, Triton (None when it does
    not import), Python."""
    import torch

    from .common import git_commit, sdlab_version

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: the kernels then fall back or refuse
        triton_version = None
    return {"sdlab": sdlab_version(), "git_commit": git_commit(), "torch": torch.__version__,
            "triton": triton_version, "python": sys.version.split()[0]}


def run_job(job: dict, out: Path, *, progress: bool = True, kernels_source: str = "--kernels") -> list[Path]:
    """Run ``job``, write ``NNNN-<command>-s<seed>.png`` + ``.json`` per image into ``out`` (made and
    checked by :func:`prepare_out` first); return the PNG paths.
    Everything that can be checked without the model is, before it is built; ``kernels_source``
    ("--kernels", "SDLAB_KERNELS" or "sidecar") is where ``job["kernels"]`` came from, for messages."""
    import torch

    import kernels
    import pipelines
    from sdcore.config import SDConfig

    from .common import check_backends

    spec = job["kernels"]
    named = "the sidecar's " if kernels_source == "sidecar" else "--"  # replay has no --plugin
    for plugin in job["plugins"]:  # before the spec is read: it may name their backends
        recorded = job.get("plugin_sha256", {}).get(plugin)
        if recorded and Path(plugin).is_file() and sha256(Path(plugin)) != recorded:
            warnings.warn(f"plugin {plugin} changed since the sidecar was written (sha256 differs): "
                          "its backends may give other results")
        try:
            loaded = kernels.load_plugin(plugin)
        except Exception as e:  # whatever its code raises: one line naming the plugin and where
            raise ValueError(f"{named}{kernels.registry.plugin_error(plugin, e)}") from e
        if not loaded:  # as bench and pytest's --sdlab-plugin: an error, not a no-op
            raise ValueError(f"{named}plugin {plugin}: it registered no backend (kernels.register(op, name))")
    job["model"]["device"] = resolve_device(job["model"]["device"])
    dtype = getattr(torch, parse_dtype(job["model"]["dtype"]))
    images = {}
    for name, inp in job["inputs"].items():
        path = _existing(name, Path(inp["path"]))
        if inp.get("sha256") and sha256(path) != inp["sha256"]:
            raise ValueError(f"--{name} {path} changed since the sidecar was written (sha256 differs)")
        images[name] = open_image(name, path)
    fn = getattr(pipelines, job["command"])
    accepted = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in job["params"].items() if k in accepted}
    positional = [images[k] for k in ("image", "mask") if k in images]
    try:
        with kernel_scope(spec), attributed_warnings(spec, kernels_source):
            kernels.describe(job["model"]["device"])  # a ValueError naming the item, for a bad spec
            preset = job["model"].get("preset") if not job["model"].get("ckpt") else None
            # the device and dtype now; a checkpoint's head dims once it is loaded (the pipeline's setup)
            check_backends(job["model"]["device"], dtype, SDConfig.preset(preset) if preset else None)
            model = load_model(job["model"])
            describe = kernels.describe(model.device)
            before = kernels.counts()
            result = fn(model, *positional, progress=progress, **kwargs)
            after = kernels.counts()
    except (ValueError, kernels.BackendUnsupported) as e:
        if type(e) in (ValueError, kernels.BackendUnsupported) and spec and f"{KERNELS_ENV}={spec!r}" in str(e):
            raise type(e)(attribute(str(e), spec, kernels_source)) from e
        raise
    describe = attribute(describe, spec, kernels_source)
    recorded_calls = job.get("recorded", {}).get("unet_calls")
    if recorded_calls is not None and recorded_calls != result.unet_calls:
        warnings.warn(f"this replay made {result.unet_calls} UNet calls where the recorded run made {recorded_calls}: "
                      "the schedule changed since, and the output with it")
    dispatches = {f"{op}/{b}": n - before.get((op, b), 0) for (op, b), n in sorted(after.items())
                  if n != before.get((op, b), 0)}
    index, written = _next_index(out), []
    replay_params = {**job["params"], **{k: v for k, v in result.params.items() if k in job["params"]}}
    for i, image in enumerate(result.images):
        stem = f"{index + i:04d}-{job['command']}-s{result.params['seed']}"
        image.save(out / f"{stem}.png")
        sidecar = {
            "image": f"{stem}.png", "batch_index": i, "command": job["command"], "model": job["model"],
            "kernels": job["kernels"], "plugins": job["plugins"], "plugin_sha256": job.get("plugin_sha256", {}),
            "inputs": job["inputs"], "params": replay_params,
            "result": {"params": result.params, "unet_calls": result.unet_calls},
            "kernel_backends": describe, "kernel_dispatches": dispatches, "versions": versions(),
            "reproduce": f"python -m pipelines replay {stem}.json --out DIR",
        }
        (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, default=str))
        written.append(out / f"{stem}.png")
    return written


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from sdcore.config import PRESETS
    from sdcore.schedulers import PREDICTION_TYPES

    import kernels

    from .common import SAMPLERS, path_arg
    from .inpaint import VARIANTS

    ops = "; ".join(f"{op} ({'|'.join(kernels.backends(op))})" for op in kernels.ops())

    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{txt2img,img2img,inpaint,replay}")

    def add_common(p, command: str) -> None:
        """The options every generating command takes, worded for ``command``."""
        from_image = command != "txt2img"
        g = p.add_argument_group("model")
        src = g.add_mutually_exclusive_group(required=True)
        src.add_argument("--ckpt", type=path_arg, metavar="PATH",
                         help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder")
        src.add_argument("--preset", metavar="NAME", choices=sorted(PRESETS),
                         help=f"preset architecture with seeded random weights: {', '.join(sorted(PRESETS))}")
        g.add_argument("--model-seed", type=int, default=None, metavar="N",
                       help="weight seed for --preset (default 0); a --ckpt has its own weights")
        g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                       help="what a --ckpt's UNet predicts, overriding its config: a single file is read as "
                            "epsilon unless sdcore wrote it, so SD 2.x 768-v files (v2-1_768-ema-pruned) need "
                            "v_prediction")
        g.add_argument("--dtype", type=_dtype_arg, default="float32", metavar="DTYPE",
                       help="model dtype: fp32/float32 (default), fp16/float16, bf16/bfloat16")
        g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        g.add_argument("--kernels", metavar="SPEC", default=None,
                       help="kernel backends, SDLAB_KERNELS syntax: 'triton' (every op that has a triton backend) "
                            "or per op, e.g. 'group_norm_silu=triton,scheduler_step=triton'; ops not named run on "
                            "their default: triton on CUDA when Triton imports, with a per-call fallback to "
                            f"reference for inputs it cannot take, else reference. Ops and backends: {ops}. An "
                            "explicit attention=triton cannot run SD's VAE (one 512-wide head, over the kernel's "
                            "256); a fallback chain, attention=triton/reference, runs the first backend that takes "
                            "each call (warning once per backend and kind of limit). Default: $SDLAB_KERNELS, "
                            "else every op's default")
        g.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                       help="import a module or .py file that registers research backends (kernels.register) "
                            "before the run, so --kernels can name them, e.g. --plugin my_attention.py --kernels "
                            "attention=my_attention (repeatable; the sidecar records it for replay)")
        g = p.add_argument_group("generation")
        g.add_argument("--prompt", default="", help="text prompt (default empty)")
        g.add_argument("--negative-prompt", default=None,
                       help="negative prompt, the unconditional half of CFG (default empty); unused, with a "
                            "warning, at --cfg-scale 1")
        if command == "inpaint":
            steps = "sampler steps (default 50); --variant repaint: levels of the walk (the UNet runs more often)"
        elif command == "img2img":
            steps = "sampler steps (default 50), of which the last int(steps * strength) run"
        else:
            steps = "sampler steps (default 50)"
        g.add_argument("--steps", type=int, default=50, help=steps)
        g.add_argument("--cfg-scale", type=float, default=7.5,
                       help="classifier-free guidance weight s: uncond + s * (cond - uncond) (default 7.5); "
                            "1 = off (one UNet pass per step), 0 = the unconditional prediction, "
                            "s < 0 pushes away from the prompt")
        g.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the model's, usually ddim)")
        g.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic (default), 1 DDPM-like noise")
        g.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and recorded in the sidecar)")
        size_from = "the input image's" if from_image else "the model's native size"
        g.add_argument("--height", type=int, default=None, help=f"output height in pixels (default: {size_from})")
        g.add_argument("--width", type=int, default=None, help=f"output width in pixels (default: {size_from})")
        resize = "round height/width down to the model's size multiple (8 for SD)"
        if from_image:
            resize += " and resize the image" + (" and mask" if command == "inpaint" else "") + " to them,"
        resize += " instead of failing"
        g.add_argument("--resize", action="store_true", help=resize)
        g.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
        g.add_argument("--clip-skip", type=int, default=None,
                       help="text encoder layer from the end: 1 = last, 2 = penultimate; diffusers' clip_skip k "
                            "is k + 1 here (default: the model's)")
        if from_image:
            strength = 0.8 if command == "img2img" else 1.0
            g = p.add_argument_group("input")
            g.add_argument("--image", type=path_arg, required=True, metavar="PATH", help="input image (PNG/JPEG)")
            g.add_argument("--strength", type=float, default=strength,
                           help=f"noise level to start from, 0 = keep the image, 1 = pure noise (default {strength})")
        if command == "inpaint":
            g.add_argument("--mask", type=path_arg, required=True, metavar="PATH",
                           help="mask image, white = repaint: 8- or 16-bit grayscale or black and white; a colour or "
                                "palette image (CMYK included) is read as its luminance")
            add_inpainting(p.add_argument_group("inpainting"))
        g = p.add_argument_group("output")
        g.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                       help="directory for the PNGs and JSON sidecars (created; checked before any work)")
        g.add_argument("--no-progress", action="store_true", help="no progress bar")

    def add_inpainting(g) -> None:
        g.add_argument("--variant", choices=VARIANTS, default="repaint",
                       help="repaint: RePaint resampling with a 4-channel UNet; unet9: the 9-channel inpainting UNet "
                            "(e.g. an sd15-inpaint checkpoint); blend: latent blending with a 4-channel UNet, no "
                            "resampling (default repaint)")
        g.add_argument("--jump-length", type=int, default=None,
                       help="--variant repaint only: levels per jump back (default 10; a walk of no more than "
                            "this many --steps has no jump)")
        g.add_argument("--jump-n-sample", type=int, default=None,
                       help="--variant repaint only: passes over each jump, 1 = no resampling (default 10)")
        g.add_argument("--paste-back", action="store_true",
                       help="paste the original pixels outside the mask after decoding")

    for command, short, description in (("txt2img", "text to image", "Text to image."),
                                         ("img2img", "image to image (SDEdit)", "Image to image."),
                                         ("inpaint", "repaint a masked region", "Inpainting.")):
        p = sub.add_parser(command, help=short, description=description)
        add_common(p, command)
        p.set_defaults(usage=p.format_usage())  # for _as_flags

    p = sub.add_parser("replay", help="re-run the generation a JSON sidecar describes",
                       description="Re-run a sidecar's generation (same model, kernels, parameters, seed, device).")
    p.add_argument("sidecar", type=path_arg, metavar="SIDECAR", help="a JSON sidecar written next to a PNG")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                   help="directory for the re-generated PNGs and sidecars (created; checked before any work)")
    p.add_argument("--device", default=None, help="override the recorded device (results may then differ)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# a keyword argument or a comparison that a message suggests, right after "pass", "use" or "or":
# resize=True, variant='unet9', cfg_scale != 1, steps >= 2
_SUGGESTED = re.compile(r"(?:(?<=\bpass )|(?<=\buse )|(?<=\bor ))([a-z][a-z_]*)(=| ?(?:!=|[<>]=?) ?)"
                        r"(True\b|'[^']*'|[\w.+-]+)")
_IN_WORDS = {"=": "", "!=": "other than ", "<": "below ", "<=": "at most ", ">": "above ", ">=": "at least "}


def _as_flags(message: str, usage: str) -> str:
    """A pipeline's error or warning in the CLI's words: each keyword argument it suggests ("pass
    resize=True", "use variant='unet9'", "or jump_n_sample=1") as the flag that sets it (``--resize``,
    ``--variant unet9``, ``--jump-n-sample 1``), and each comparison it suggests ("pass cfg_scale != 1",
    "use steps >= 2") as that flag with the comparison in words (``--cfg-scale other than 1``,
    ``--steps at least 2``), where the command has that flag (``usage``: its usage line). What a
    message reports (``got steps=2``) stays as the pipeline wrote it."""
    def flag(m: re.Match) -> str:
        name = "--" + m[1].replace("_", "-")
        if not re.search(re.escape(name) + r"(?![\w-])", usage):
            return m[0]
        op, value = m[2].strip(), m[3].strip("'")
        return name if op == "=" and value == "True" else f"{name} {_IN_WORDS[op]}{value}"

    return _SUGGESTED.sub(flag, message).replace("matching height/width", "matching --height/--width")


def _in_cli_words(args: argparse.Namespace, message: str) -> str:
    """``message`` with its keyword arguments as the command's flags; as it is for ``replay``, whose
    parameters come from the sidecar."""
    return _as_flags(message, args.usage) if args.command != "replay" else message


def main(argv: list[str] | None = None) -> int:
    from .common import import_kernels

    import_kernels("python -m pipelines")
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_, **__: print(  # one line each, no source excerpt
            f"{parser.prog} {args.command}: warning: {_in_cli_words(args, str(message))}", file=sys.stderr)
        return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from kernels import BackendUnsupported

    out, created, written = Path(args.out), None, []
    try:
        created = prepare_out(out)  # before anything else: a bad --out costs nothing
        if args.command == "replay":
            job = read_sidecar(Path(args.sidecar))
            check_checkpoint(job["model"])
            check_code(job["recorded"]["versions"])
            if args.device is not None:  # "" is the CLI's error, as for the other commands
                job["model"]["device"] = resolve_device(args.device)
            source = "sidecar"
        else:
            job = job_from_args(args)
            source = "--kernels" if args.kernels is not None else KERNELS_ENV
        written = run_job(job, out, progress=not args.no_progress, kernels_source=source)
    except (ValueError, ImportError, FileNotFoundError) as e:
        remove_if_empty(out, created)
        parser.exit(2, f"{parser.prog} {args.command}: error: {_in_cli_words(args, str(e))}\n")
    except OSError as e:  # a file that exists but cannot be read or written (permissions, I/O error, full disk)
        remove_if_empty(out, created)
        where = f"{e.filename}: " if e.filename else ""
        parser.exit(2, f"{parser.prog} {args.command}: error: {where}{e.strerror or e}\n")
    except BackendUnsupported as e:  # a backend chosen by --kernels / SDLAB_KERNELS / the sidecar refused an input
        remove_if_empty(out, created)
        default = ('with "kernels": null in the sidecar' if args.command == "replay"
                   else "without --kernels (and SDLAB_KERNELS unset)")
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}; {default} the default backends fall back "
                       "to the reference, call by call, where a kernel refuses an input\n")
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and not _OUT_OF_MEMORY.search(str(e)):
            raise
        remove_if_empty(out, created)
        parser.exit(2, f"{parser.prog} {args.command}: error: out of memory ({str(e).splitlines()[0]}); "
                       "use a smaller --height/--width or --batch-size\n")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
