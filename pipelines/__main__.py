"""``python -m pipelines txt2img|img2img|inpaint|replay ...``: run a pipeline, write PNGs and a JSON
sidecar per image with everything needed to reproduce it (every parameter and the seed, the model
source, the kernel backends, the sdlab/torch versions); ``replay SIDECAR`` re-runs one exactly.

    python -m pipelines txt2img --preset tiny --prompt "a red bicycle" --steps 20 --seed 1 --out out/
    python -m pipelines inpaint --ckpt sd15-inpaint.safetensors --image in.png --mask mask.png \\
        --variant unet9 --prompt "a cat" --kernels triton --out out/
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
import subprocess
import sys
from pathlib import Path

COMMANDS = ("txt2img", "img2img", "inpaint")
DTYPES = ("float32", "float16", "bfloat16")
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ provenance
def sdlab_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sdlab")
    except metadata.PackageNotFoundError:
        m = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()) if (ROOT / "setup.py").is_file() else None
        return f"{m.group(1)} (source tree)" if m else "unknown"


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------- kernels
def kernel_scope(spec: str | None):
    """``SDLAB_KERNELS`` syntax: ``"triton"`` for every op, or ``"attention=triton,group_norm_silu=reference"``.
    None: the default backends, whatever ``SDLAB_KERNELS`` says now (a job records None only when
    neither ``--kernels`` nor ``SDLAB_KERNELS`` chose any, so a replay must not take them from here)."""
    import kernels

    if not spec:
        return _without_env("SDLAB_KERNELS")
    if "=" not in spec:
        return kernels.use(spec.strip())
    per_op = {}
    for item in spec.split(","):
        op, sep, backend = item.strip().partition("=")
        if not sep or not op.strip():
            raise ValueError(f"--kernels {spec!r}: expected 'op=backend' items, got {item!r}; ops: {', '.join(kernels.ops())}")
        per_op[op.strip()] = backend.strip()
    return kernels.use(**per_op)


@contextlib.contextmanager
def _without_env(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


# ------------------------------------------------------------------------------------------ jobs
def job_from_args(args) -> dict:
    """The run as data: what a sidecar stores and ``replay`` reads back."""
    params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                  steps=args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed, height=args.height,
                  width=args.width, resize=args.resize, batch_size=args.batch_size, clip_skip=args.clip_skip)
    inputs = {}
    if args.command in ("img2img", "inpaint"):
        params["strength"] = args.strength
        inputs["image"] = args.image
    if args.command == "inpaint":
        params.update(variant=args.variant, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                      paste_back=args.paste_back)
        inputs["mask"] = args.mask
    return {"command": args.command,
            "model": {"ckpt": str(Path(args.ckpt).resolve()) if args.ckpt else None, "preset": args.preset,
                      "model_seed": args.model_seed, "dtype": args.dtype, "device": args.device},
            "kernels": args.kernels if args.kernels is not None else os.environ.get("SDLAB_KERNELS") or None,
            "inputs": {k: {"path": str(Path(v).resolve()), "sha256": sha256(_existing(k, Path(v)))}
                       for k, v in inputs.items()},
            "params": params}


SIDECAR_KEYS = {"command": str, "model": dict, "kernels": (str, type(None)), "inputs": dict, "params": dict}


def read_sidecar(path: Path) -> dict:
    """The job a sidecar records, or a ValueError saying why the file is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON sidecar ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a sidecar (a JSON {type(data).__name__}, not an object)")
    for key, kind in SIDECAR_KEYS.items():
        if key not in data:
            raise ValueError(f"{path}: not a sidecar (no {key!r} entry)")
        if not isinstance(data[key], kind):
            raise ValueError(f"{path}: not a sidecar ({key!r} is a {type(data[key]).__name__})")
    if data["params"].get("seed") is None:
        raise ValueError(f"{path}: no seed recorded; the run cannot be reproduced")
    return {k: data[k] for k in SIDECAR_KEYS}


def _existing(name: str, path: Path) -> Path:
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
    return name


def open_image(name: str, path: Path):
    """The image at ``path``, read now: not an image, or a truncated one, is a usage error."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--{name} {path}: not a readable image: {e}") from e
    if name == "mask" and image.mode in ("RGB", "RGBA", "LA", "P"):  # editors' exports: their luminance
        image = image.convert("L")
    return image


def load_model(spec: dict):
    import torch

    import sdcore

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    if spec.get("ckpt"):
        return sdcore.load(spec["ckpt"], dtype=dtype, device=device)
    return sdcore.StableDiffusion.from_preset(spec["preset"], seed=spec.get("model_seed", 0), dtype=dtype, device=device)


def _next_index(out: Path) -> int:
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{4,})-", p.name))]
    return max(taken, default=-1) + 1


def run_job(job: dict, out: Path, *, progress: bool = True) -> list[Path]:
    """Run ``job``, write ``NNNN-<command>-s<seed>.png`` + ``.json`` per image; return the PNG paths."""
    import torch

    import kernels
    import pipelines

    job["model"]["device"] = resolve_device(job["model"]["device"])
    images = {}
    for name, inp in job["inputs"].items():
        path = _existing(name, Path(inp["path"]))
        if inp.get("sha256") and sha256(path) != inp["sha256"]:
            raise ValueError(f"--{name} {path} changed since the sidecar was written (sha256 differs)")
        images[name] = open_image(name, path)
    model = load_model(job["model"])
    fn = getattr(pipelines, job["command"])
    accepted = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in job["params"].items() if k in accepted}
    positional = [images[k] for k in ("image", "mask") if k in images]
    with kernel_scope(job["kernels"]):
        describe = kernels.describe(model.device)
        before = kernels.counts()
        result = fn(model, *positional, progress=progress, **kwargs)
        after = kernels.counts()
    dispatches = {f"{op}/{b}": n - before.get((op, b), 0) for (op, b), n in sorted(after.items())
                  if n != before.get((op, b), 0)}
    out.mkdir(parents=True, exist_ok=True)
    index, written = _next_index(out), []
    replay_params = {**job["params"], **{k: v for k, v in result.params.items() if k in job["params"]}}
    for i, image in enumerate(result.images):
        stem = f"{index + i:04d}-{job['command']}-s{result.params['seed']}"
        image.save(out / f"{stem}.png")
        sidecar = {
            "image": f"{stem}.png", "batch_index": i, "command": job["command"], "model": job["model"],
            "kernels": job["kernels"], "inputs": job["inputs"], "params": replay_params,
            "result": {"params": result.params, "unet_calls": result.unet_calls},
            "kernel_backends": describe, "kernel_dispatches": dispatches,
            "versions": {"sdlab": sdlab_version(), "git_commit": git_commit(), "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "reproduce": f"python -m pipelines replay {stem}.json --out DIR",
        }
        (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, default=str))
        written.append(out / f"{stem}.png")
    return written


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from sdcore.config import PRESETS

    from .common import SAMPLERS
    from .inpaint import VARIANTS

    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{txt2img,img2img,inpaint,replay}")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder")
    src.add_argument("--preset", metavar="NAME", choices=sorted(PRESETS),
                     help=f"preset architecture with seeded random weights: {', '.join(sorted(PRESETS))}")
    g.add_argument("--model-seed", type=int, default=0, metavar="N", help="weight seed for --preset (default 0)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--kernels", metavar="SPEC", default=None,
                   help="kernel backends, SDLAB_KERNELS syntax: 'triton' (every op) or "
                        "'attention=triton,group_norm_silu=reference' (default: $SDLAB_KERNELS, else per-op default)")
    g = common.add_argument_group("generation")
    g.add_argument("--prompt", default="", help="text prompt (default empty)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt, the unconditional half of CFG (default empty)")
    g.add_argument("--steps", type=int, default=50, help="sampler steps (default 50); RePaint: levels of the walk")
    g.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance weight, on when > 1 (default 7.5)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the model's, usually ddim)")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic (default), 1 DDPM-like noise")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and recorded in the sidecar)")
    g.add_argument("--height", type=int, default=None, help="output height in pixels (default: the model's or the image's)")
    g.add_argument("--width", type=int, default=None, help="output width in pixels (default: the model's or the image's)")
    g.add_argument("--resize", action="store_true",
                   help="round height/width down to the model's size multiple and resize inputs to them instead of failing")
    g.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--clip-skip", type=int, default=None, help="text encoder layer from the end: 1 = last (default: model's)")
    g = common.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs and JSON sidecars")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    def image_args(p, strength: float):
        p.add_argument("--image", required=True, metavar="PATH", help="input image (PNG/JPEG)")
        p.add_argument("--strength", type=float, default=strength,
                       help=f"noise level to start from, 0 = keep the image, 1 = pure noise (default {strength})")

    sub.add_parser("txt2img", parents=[common], help="text to image", description="Text to image.")
    p = sub.add_parser("img2img", parents=[common], help="image to image (SDEdit)", description="Image to image.")
    image_args(p, 0.8)
    p = sub.add_parser("inpaint", parents=[common], help="repaint a masked region", description="Inpainting.")
    image_args(p, 1.0)
    p.add_argument("--mask", required=True, metavar="PATH",
                   help="mask image, white = repaint; a colour or palette image is read as its luminance")
    p.add_argument("--variant", choices=VARIANTS, default="repaint",
                   help="repaint: RePaint resampling with a 4-channel UNet; unet9: the 9-channel inpainting UNet; "
                        "blend: latent blending, no resampling (default repaint)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: levels per jump back (default 10)")
    p.add_argument("--jump-n-sample", type=int, default=10, help="RePaint: passes over each jump, 1 = no resampling (default 10)")
    p.add_argument("--paste-back", action="store_true", help="paste the original pixels outside the mask after decoding")

    p = sub.add_parser("replay", help="re-run the generation a JSON sidecar describes",
                       description="Re-run a sidecar's generation (same model, kernels, parameters, seed, device).")
    p.add_argument("sidecar", metavar="SIDECAR", help="a JSON sidecar written next to a PNG")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the re-generated PNGs and sidecars")
    p.add_argument("--device", default=None, help="override the recorded device (results may then differ)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    from kernels import BackendUnsupported

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
        if args.command == "replay":
            job = read_sidecar(Path(args.sidecar))
            if args.device:
                job["model"]["device"] = args.device
        else:
            job = job_from_args(args)
        written = run_job(job, out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:  # KeyError: an unknown preset in a sidecar
        parser.exit(2, f"{parser.prog} {args.command}: error: {e.args[0] if isinstance(e, KeyError) else e}\n")
    except BackendUnsupported as e:  # a backend chosen by --kernels / SDLAB_KERNELS / the sidecar refused an input
        default = ('with "kernels": null in the sidecar' if args.command == "replay"
                   else "without --kernels (and SDLAB_KERNELS unset)")
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}; {default} the default backends fall back "
                       "to the reference, call by call, where a kernel refuses an input\n")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
