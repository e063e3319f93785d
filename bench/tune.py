"""Launch-configuration sweeps: each Triton kernel's tile / warp / stage choices at SD shapes.

``python -m bench tune`` times every candidate configuration of a kernel against the one its
launch table (``kernels.attention.CONFIGS``, ``kernels.group_norm_silu.launch_config``) picks now,
on the same inputs, in the same run. The default is held to ``bench ops``' accuracy rule (max
error against the fp64 oracle at most 2x the registered reference's plus a small atol) and a
candidate to the default's error the same way (to the reference's when the default is not
accurate), so a configuration that miscompiles cannot win: it is an error row. One that does not
compile (shared memory, registers) is a skipped row with the compiler's reason, and so is every
row of an input the triton backend's check refuses (e.g. bf16 under the interpreter, whose results
would be garbage): the candidates call the kernel directly, past the registry's check. The
speed-up column is against the default configuration, and the summary names the best eligible
configuration per case: what to write into the kernel's table after a GPU run.

``attention.gluon_sm90`` sweeps the Gluon research forward (kernels/attention_sm90.py, Hopper
only): its key block, K/V buffers and where each step issues its K/V copy, against its CONFIG.
Elsewhere every row is skipped with that backend's reason.

``attention.backward`` sweeps the two backward kernels (dK/dV, then dQ), one at a time with the
other on its table row, over the attention shape cases. Each candidate times one backward pass
(both kernels and the row sums before them) from a forward computed once, and its error is the
worst of dq, dk, dv against fp64 autograd gradients under one shared upstream gradient.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from .common import (DEFAULT_CONFIG as DEFAULT, ERROR_ATOL, Skip, add_speedups, describe_exception, dtype_name,
                     host_ms, interpreting, make_row, max_errors, skipped_row, time_fn, within_error)
from .ops import Case, backend_refusal, make_inputs, oracle, select_cases, work

CASE_OP = {"attention": "attention", "attention.backward": "attention", "group_norm_silu": "group_norm_silu",
           "attention.gluon_sm90": "attention"}
BACKEND = {"attention.gluon_sm90": "gluon_sm90"}  # the backend a sweep's candidates run; else triton
TUNABLE = tuple(CASE_OP)  # what --ops takes; CASE_OP names the op whose shape table each sweeps
DEFAULT_OPS = ("attention", "group_norm_silu")  # inference kernels; the backward sweep is asked for by name


@dataclass(frozen=True)
class Candidate:
    label: str  # "default" or a short description, e.g. "bm128 bn64 w8 s3"
    config: object | None  # what the kernel's ``config=`` takes; None = its own choice


def attention_candidates(case: Case, quick: bool, masked_tail: bool = False) -> list[Candidate]:
    """Forward tiles: queries per program x keys per step x warps x pipeline stages. With
    ``masked_tail``, where the head dim has one (40 = 32 + 16), only the split candidates: the
    split crashed on an H100 before (Triton 3.6), so it is swept in a run of its own. Over at most
    SHORT_KV keys, also the K/V-resident forward: query block (4 warps at 64, 8 at 128) x query
    blocks per program x stages of the query loop."""
    from kernels.attention import SHORT_KV, AttentionConfig, split_head_dim

    grid = ([16, 32], [16], [2], [2]) if quick else ([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])
    d = case.params["d"]
    split = masked_tail and split_head_dim(d, True) != split_head_dim(d, False)
    tail = split_head_dim(d, masked_tail)[1]
    out = [Candidate(DEFAULT, None)]
    for bm, bn, warps, stages in itertools.product(*grid):
        if tail and bn >= 128 and stages >= 3:  # faulted the H100 (Triton 3.6) at D = 160, taking the
            continue  # whole sweep's process down (bench/results/2026-11-23-h100/sanitizer-attention.txt)
        label = f"bm{bm} bn{bn} w{warps} s{stages}" + (" split" if split else "")
        out.append(Candidate(label, AttentionConfig(bm, bn, warps, stages, True if split else None)))
    if case.params["lkv"] <= SHORT_KV and not split:
        resident = ([(16, 1)], [1, 2], [2]) if quick else ([(64, 4), (128, 8)], [1, 2, 4, 8], [2, 3])
        for (bm, warps), q_blocks, stages in itertools.product(*resident):
            out.append(Candidate(f"resident bm{bm} w{warps} s{stages} q{q_blocks}",
                                 AttentionConfig(bm, 64, warps, stages, q_blocks=q_blocks)))
    return out


def attention_backward_candidates(case: Case, quick: bool, masked_tail: bool = False) -> list[Candidate]:
    """dK/dV tiles (key block per program x query block streamed), then dQ tiles (query block per
    program x key block streamed), each x warps x stages; offline sm_90 compiles showed 4 warps
    spilling at head dims 80 and 160 (the table now has 8 there, untimed against 4)."""
    from kernels.attention import AttentionConfig

    grids = {  # kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "dkdv": ([16], [16], [2], [2]) if quick else ([16, 32, 64], [64, 128], [4, 8], [2, 3]),
        "dq": ([16], [16], [2], [2]) if quick else ([64, 128], [16, 32, 64], [4, 8], [2]),
    }
    out = [Candidate(DEFAULT, None)]
    for kind, grid in grids.items():
        for bm, bn, warps, stages in itertools.product(*grid):
            out.append(Candidate(f"{kind} bm{bm} bn{bn} w{warps} s{stages}",
                                 {kind: AttentionConfig(bm, bn, warps, stages)}))
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


def _gluon_sm90():
    """kernels/attention_sm90.py, imported (which registers its backend, gluon_sm90)."""
    return importlib.import_module("kernels.attention_sm90")


def gluon_sm90_candidates(case: Case, quick: bool, masked_tail: bool = False) -> list[Candidate]:
    """The Gluon research forward's (BLOCK_M, BLOCK_N, warps, STAGES, LATE_REFILL): key block and
    K/V buffers, and where each step issues its K/V copy (after the softmax: fewer barriers; before
    the QK wgmma: further ahead). 128 query rows in 8 warps (two warpgroups) throughout."""
    grid = ([64], [3], [True]) if quick else ([64, 128], [3, 4], [True, False])
    out = [Candidate(DEFAULT, None)]
    for bn, stages, late in itertools.product(*grid):
        out.append(Candidate(f"bn{bn} s{stages} {'late' if late else 'early'} refill", (128, bn, 8, stages, late)))
    return out


CANDIDATES: dict[str, Callable[..., list[Candidate]]] = {  # (case, quick, masked_tail) -> candidates
    "attention": attention_candidates,
    "attention.backward": attention_backward_candidates,
    "group_norm_silu": group_norm_candidates,
    "attention.gluon_sm90": gluon_sm90_candidates,
}


def _kernel_call(op: str, config, args: tuple) -> Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]:
    """The Triton implementation with ``config`` (None: its own choice), called directly so that
    no registry choice can change what runs. ``attention.backward``: ``args`` are (q, k, v, do);
    the forward runs once here and the call returns (dq, dk, dv) of one backward pass."""
    import kernels

    if op == "attention.backward":
        q, k, v, do = args
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # detach keeps the (B, L, H, D) strides
        with torch.enable_grad():
            o = kernels.implementation("attention", "triton")(*leaves, config=config)
        return lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
    if op == "attention.gluon_sm90":  # the launcher, past the backend's autocast and check (asked before)
        sm90 = _gluon_sm90()
        return lambda: sm90._forward(*args, store_lse=False, config=config or sm90.CONFIG)[0]
    fn = kernels.implementation(op, "triton")
    if config is None:
        return lambda: fn(*args)
    if callable(config):  # group_norm_silu: built from the input's dtype and the device's SM count
        config = config(args[0].dtype, _gn_module()._sms(args[0]))
    return lambda: fn(*args, config=config)


def _resolved(op: str, config, args: tuple):
    """What a candidate's ``config`` launches, to tell labels apart that run one configuration:
    group_norm_silu's are resolved to the LaunchConfig the kernel gets (``launch_config`` clamps
    the channel block to C/groups and the tile to the shape, so at many shapes `c64` runs `c16`,
    and a candidate can equal the kernel's own choice); other ops' configs are taken as given."""
    if op != "group_norm_silu":
        return ("given", id(config)) if config is not None else None
    gn, x = _gn_module(), args[0]
    sms = gn._sms(x)
    return config(x.dtype, sms) if callable(config) else gn.launch_config(x.shape, args[3], x.dtype, sms)


def _reference_call(op: str, args: tuple) -> Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]:
    """The registered reference on ``args``, as _kernel_call calls the kernel: its error against
    the oracle is what the default is held to, as ``bench ops`` holds the triton row to the
    reference row's."""
    import kernels

    fn = kernels.implementation(CASE_OP[op], "reference")
    if op == "attention.backward":
        q, k, v, do = args
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            o = fn(*leaves)
        return lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
    return lambda: fn(*args)


def _inputs(op: str, case: Case, device: torch.device, dtype: torch.dtype) -> tuple:
    """Args for _kernel_call: the op's, or (q, k, v, do) for the backward."""
    args, _ = make_inputs(case, device, dtype)
    if op != "attention.backward":
        return args
    g = torch.Generator(device=device).manual_seed(1)
    do = torch.randn(args[0].shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # shared dL/do
    return (*args, do)


def _oracle(op: str, args: tuple):
    """The fp64 answer: the op's output, or (dq, dk, dv) for the backward."""
    if op != "attention.backward":
        return oracle(CASE_OP[op], args, {})  # the op whose output it is: attention.gluon_sm90's is attention's
    q, k, v, do = args
    grads = []
    for i in range(q.shape[0]):  # one batch entry at a time bounds the fp64 score matrices
        qi, ki, vi = (t[i].detach().double().requires_grad_() for t in (q, k, v))
        oi = torch.softmax(qi @ ki.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ vi
        grads.append(torch.autograd.grad(oi, (qi, ki, vi), do[i].double()))
    return tuple(torch.stack(g) for g in zip(*grads))


def _errors(out, ref64) -> tuple[float, float]:
    """(max abs, max rel) error; for several outputs, the worst of each over them."""
    if isinstance(out, torch.Tensor):
        return max_errors(out, ref64)
    errs = [max_errors(o, r) for o, r in zip(out, ref64, strict=True)]
    return max(e[0] for e in errs), max(e[1] for e in errs)


def _work(op: str, case: Case, args: tuple, out) -> tuple[int, int | None]:
    """(bytes, flops) as ``bench ops`` counts them; the backward reads q, k, v, o, do and writes
    dq, dk, dv, and counts 2.5x the forward's flops, the useful work (5 matmuls to 2: Dao 2023); the
    kernels run 7, recomputing q.k^T and do.v^T in both the dK/dV and the dQ pass."""
    if op != "attention.backward":
        return work(case, args, {}, out)
    nbytes = sum(t.numel() * t.element_size() for t in (*args, args[0], *out))  # args[0]: o, shaped as q
    return nbytes, 5 * work(case, args[:3], {}, args[0])[1] // 2


def run(ops: list[str], dtypes: list[torch.dtype], shapes: list[str] | None, device: torch.device, env: dict,
        *, quick: bool = False, progress: bool = True, masked_tail: bool = False) -> list[dict]:
    """Rows of suite ``tune``: one per (case, dtype, candidate); speed-up against ``default``."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    jobs = [(op, case, dtype, CANDIDATES[op](case, quick, masked_tail))
            for op in ops for case in select_cases([CASE_OP[op]], shapes, quick) for dtype in dtypes]
    with tqdm(total=sum(len(c) for *_, c in jobs), desc="tune", disable=not progress, leave=False) as bar:
        for op, case, dtype, cands in jobs:
            base = dict(suite="tune", op=op, case=case.name, shape=case.shape, reason=case.reason,
                        dtype=dtype_name(dtype))
            try:
                args = _inputs(op, case, device, dtype)
                # the triton check, which _kernel_call goes past: without it an input the kernel cannot
                # take (bf16 under the interpreter) would give garbage rows marked ok
                if op == "attention.gluon_sm90":
                    _gluon_sm90()
                refused = backend_refusal(CASE_OP[op], BACKEND.get(op, "triton"),
                                          args[:3] if op == "attention.backward" else args)
                if refused is None:
                    ref64 = _oracle(op, args)
                    ref_err = _errors(_reference_call(op, args)(), ref64)[0]
            except Exception as e:
                rows += [make_row(env, status="error", note=f"inputs/oracle/reference failed: {describe_exception(e)}",
                                  backend=c.label, **base) for c in cands]
                bar.update(len(cands))
                continue
            if refused is not None:
                rows += [skipped_row(env, refused, backend=c.label, **base) for c in cands]
                bar.update(len(cands))
                continue
            bound = (ref_err, "reference's")  # the default's: the same rule as `bench ops`
            seen: dict = {}  # launch configuration -> the first label that ran it
            for cand in cands:
                bar.set_postfix_str(f"{case.name} {cand.label}")
                same = seen.setdefault(_resolved(op, cand.config, args), cand.label)
                if same != cand.label:  # a label the shape clamps to another's configuration: not a rival
                    rows.append(skipped_row(env, f"runs the same launch configuration as `{same}` at this shape; "
                                                 "not timed twice", backend=cand.label, **base))
                    bar.update(1)
                    continue
                rows.append(_run_candidate(op, case, cand, args, ref64, dtype, device, env, base, bound, quick))
                if cand.label == DEFAULT and rows[-1]["status"] == "ok":  # else candidates keep the reference's
                    bound = (rows[-1]["max_abs_err"], "default's")
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows, ("op", "case", "dtype"), base=DEFAULT)
    return rows


def _run_candidate(op, case, cand, args, ref64, dtype, device, env, base, bound, quick) -> dict:
    """One row; ``bound``: (error, whose) the output's error may be at most 2x of, plus the atol."""
    note = "the kernel's own choice" if cand.config is None else ""
    if interpreting() and device.type != "cuda":
        note = "; ".join(filter(None, [note, "interpreted (TRITON_INTERPRET=1): numerics only, not speed"]))
    try:
        fn = _kernel_call(op, cand.config, args)
        out = fn()
        abs_err, rel_err = _errors(out, ref64)
        if not within_error(abs_err, bound[0], dtype_name(dtype)):
            return make_row(env, status="error", backend=cand.label, max_abs_err=abs_err, max_rel_err=rel_err,
                            note=f"wrong result: max error {abs_err:.3g} > 2 x {bound[1]} {bound[0]:.3g} "
                                 f"+ {ERROR_ATOL[dtype_name(dtype)]:g}; not eligible", error_vs="fp64 oracle",
                            **base)
        slow = device.type != "cuda"
        timing = time_fn(fn, device, quick=quick, called=True, min_reps=1 if slow else 3,
                         warmup_ms=0 if slow else None, rep_ms=0 if slow else None)
        host = None if slow else host_ms(fn, device)
    except Skip as e:
        return skipped_row(env, str(e), backend=cand.label, **base)
    except torch.cuda.OutOfMemoryError as e:
        return skipped_row(env, f"out of memory: {str(e).splitlines()[0][:160]}", backend=cand.label, **base)
    except Exception as e:
        if cand.config is None:  # the kernel's own choice must run: a failure here is a bug, not a skip
            return make_row(env, status="error", note=describe_exception(e), backend=cand.label, **base)
        # a configuration the compiler refuses (shared memory, registers, ...)
        return skipped_row(env, f"does not run: {describe_exception(e)}", backend=cand.label, **base)
    nbytes, flops = _work(op, case, args, out)
    sec = timing.median_ms * 1e-3
    return make_row(env, status="ok", note=note, backend=cand.label, median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps, host_ms=host, bytes=nbytes,
                    flops=flops, gbps=nbytes / sec / 1e9 if sec > 0 else None,
                    tflops=flops / sec / 1e12 if flops and sec > 0 else None, max_abs_err=abs_err,
                    max_rel_err=rel_err, error_vs="fp64 oracle", **base)
