"""Launch-configuration sweeps: each Triton kernel's tile / warp / stage choices at SD shapes.

``python -m bench tune`` times every candidate configuration of a kernel against the one its
launch table (``kernels.attention.CONFIGS``, ``kernels.group_norm_silu.launch_config``) picks now,
on the same inputs, in the same run. A candidate is only eligible if its output is as accurate as
the default's (max error against the fp64 oracle at most 2x the default's plus a small atol), so a
configuration that miscompiles cannot win; one that does not compile (shared memory, registers) is
a skipped row with the compiler's reason. The speed-up column is against the default
configuration, and the summary names the best eligible configuration per case: what to write into
the kernel's table after a GPU run.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from .common import (DEFAULT_CONFIG as DEFAULT, Skip, add_speedups, describe_exception, dtype_name, host_ms,
                     interpreting, make_row, max_errors, skipped_row, time_fn)
from .ops import Case, make_inputs, oracle, select_cases, work

TUNABLE = ("attention", "group_norm_silu")
ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


@dataclass(frozen=True)
class Candidate:
    label: str  # "default" or a short description, e.g. "bm128 bn64 w8 s3"
    config: object | None  # what the kernel's ``config=`` takes; None = its own choice


def attention_candidates(case: Case, quick: bool, masked_tail: bool = False) -> list[Candidate]:
    """Forward tiles: queries per program x keys per step x warps x pipeline stages. With
    ``masked_tail``, where the head dim has one (40 = 32 + 16), only the split candidates: the
    split crashed on an H100 before (Triton 3.6), so it is swept in a run of its own."""
    from kernels.attention import AttentionConfig, split_head_dim

    grid = ([16, 32], [16], [2], [2]) if quick else ([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])
    split = masked_tail and split_head_dim(case.params["d"], True) != split_head_dim(case.params["d"], False)
    out = [Candidate(DEFAULT, None)]
    for bm, bn, warps, stages in itertools.product(*grid):
        label = f"bm{bm} bn{bn} w{warps} s{stages}" + (" split" if split else "")
        out.append(Candidate(label, AttentionConfig(bm, bn, warps, stages, True if split else None)))
    return out


def _gn_module():
    """``kernels.group_norm_silu`` the module (the package exports the function of that name)."""
    return importlib.import_module("kernels.group_norm_silu")


def group_norm_candidates(case: Case, quick: bool, masked_tail: bool = False) -> list[Candidate]:
    """The single-launch and the two-pass paths, each with a few tile sizes."""
    gn = _gn_module()
    shape, groups = case.params["shape"], case.params["groups"]
    tiles, block_cs = ([1024], [16]) if quick else ([1024, 2048, 4096, 8192], [16, 64])
    out = [Candidate(DEFAULT, None)]
    for single, tile, block_c in itertools.product((True, False), tiles, block_cs):
        label = f"{'single' if single else 'two-pass'} tile{tile} c{block_c}"
        out.append(Candidate(label, lambda dtype, sms, s=single, t=tile, c=block_c: gn.launch_config(
            tuple(shape), groups, dtype, sms, max_tile=t, max_block_c=c, single_pass=s)))
    return out


CANDIDATES: dict[str, Callable[..., list[Candidate]]] = {  # (case, quick, masked_tail) -> candidates
    "attention": attention_candidates,
    "group_norm_silu": group_norm_candidates,
}


def _kernel_call(op: str, config, args: tuple) -> Callable[[], torch.Tensor]:
    """The Triton implementation with ``config`` (None: its own choice), called directly so that
    no registry choice can change what runs."""
    import kernels

    fn = kernels.implementation(op, "triton")
    if config is None:
        return lambda: fn(*args)
    if callable(config):  # group_norm_silu: built from the input's dtype and the device's SM count
        config = config(args[0].dtype, _gn_module()._sms(args[0]))
    return lambda: fn(*args, config=config)


def run(ops: list[str], dtypes: list[torch.dtype], shapes: list[str] | None, device: torch.device, env: dict,
        *, quick: bool = False, progress: bool = True, masked_tail: bool = False) -> list[dict]:
    """Rows of suite ``tune``: one per (case, dtype, candidate); speed-up against ``default``."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    cases = select_cases(ops, shapes, quick)
    jobs = [(case, dtype, CANDIDATES[case.op](case, quick, masked_tail)) for case in cases for dtype in dtypes]
    with tqdm(total=sum(len(c) for *_, c in jobs), desc="tune", disable=not progress, leave=False) as bar:
        for case, dtype, cands in jobs:
            base = dict(suite="tune", op=case.op, case=case.name, shape=case.shape, reason=case.reason,
                        dtype=dtype_name(dtype))
            try:
                args, kwargs = make_inputs(case, device, dtype)
                ref64 = oracle(case.op, args, kwargs)
            except Exception as e:
                rows += [make_row(env, status="error", note=f"inputs/oracle failed: {describe_exception(e)}",
                                  backend=c.label, **base) for c in cands]
                bar.update(len(cands))
                continue
            default_err = None
            for cand in cands:
                bar.set_postfix_str(f"{case.name} {cand.label}")
                rows.append(_run_candidate(case, cand, args, ref64, dtype, device, env, base, default_err, quick))
                if cand.label == DEFAULT and rows[-1]["status"] == "ok":
                    default_err = rows[-1]["max_abs_err"]
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows, ("op", "case", "dtype"), base=DEFAULT)
    return rows


def _run_candidate(case, cand, args, ref64, dtype, device, env, base, default_err, quick) -> dict:
    note = "the kernel's own choice" if cand.config is None else ""
    if interpreting() and device.type != "cuda":
        note = "; ".join(filter(None, [note, "interpreted (TRITON_INTERPRET=1): numerics only, not speed"]))
    try:
        fn = _kernel_call(case.op, cand.config, args)
        out = fn()
        abs_err, rel_err = max_errors(out, ref64)
        if default_err is not None and not abs_err <= 2 * default_err + ATOL[dtype]:
            return make_row(env, status="error", backend=cand.label, max_abs_err=abs_err, max_rel_err=rel_err,
                            note=f"wrong result: max error {abs_err:.3g} > 2 x default's {default_err:.3g} "
                                 f"+ {ATOL[dtype]:g}; not eligible", **base)
        slow = device.type != "cuda"
        timing = time_fn(fn, device, quick=quick, called=True, min_reps=1 if slow else 3,
                         warmup_ms=0 if slow else None, rep_ms=0 if slow else None)
        host = None if slow else host_ms(fn, device)
    except Skip as e:
        return skipped_row(env, str(e), backend=cand.label, **base)
    except torch.cuda.OutOfMemoryError as e:
        return skipped_row(env, f"out of memory: {str(e).splitlines()[0][:160]}", backend=cand.label, **base)
    except Exception as e:  # a configuration the compiler refuses (shared memory, registers, ...)
        return skipped_row(env, f"does not run: {describe_exception(e)}", backend=cand.label, **base)
    nbytes, flops = work(case, args, {}, out)
    sec = timing.median_ms * 1e-3
    return make_row(env, status="ok", note=note, backend=cand.label, median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps, host_ms=host, bytes=nbytes,
                    flops=flops, gbps=nbytes / sec / 1e9 if sec > 0 else None,
                    tflops=flops / sec / 1e12 if flops and sec > 0 else None, max_abs_err=abs_err,
                    max_rel_err=rel_err, error_vs="fp64 oracle", **base)
