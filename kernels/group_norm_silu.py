"""GroupNorm with an optional fused SiLU: y = silu(groupnorm(x) * weight + bias).

Why: every ResBlock of the SD UNet and VAE runs GroupNorm(32) and then SiLU. In torch that is two
kernels and an intermediate tensor; and torch's GroupNorm launches one program per (sample, group),
so at batch 1-2 (2 x 32 = 64 programs) it leaves half of a 132-SM H100 idle.

Math (Wu & He 2018, "Group Normalization", eqs. 1-3 and 6): for sample n and group g, with
S_g = {channels of g} x {all H, W}, mu = mean over S_g, var = mean of (x - mu)^2 over S_g,
xhat = (x - mu) / sqrt(var + eps), z = xhat * weight[c] + bias[c]; then y = z * sigmoid(z)
(SiLU: Hendrycks & Gimpel 2016, "GELUs", sec. 2 / Elfwing et al. 2018, "SiLU", eq. 1), or
y = z when activation=None. Statistics are fp32 whatever the input dtype: each tile's (count, mean,
M2) is computed two-pass in registers and tiles/chunks are merged with Chan et al.'s parallel
combine (1979), never E[x^2] - E[x]^2, and of x less its group's first element (`_pivot`), so
a large common offset costs no digits (fp32 within 3e-7 of fp64 at |mean| / std ~ 3000).

Parallelism: the (N*G) x (C/G, HW) problem is cut into tiles of BLOCK_C channels x BLOCK_S spatial
positions, and each (n, g) row into chunks of tiles, one program per (row, chunk), so batch 1-2 at
SD shapes gives >= PROGRAMS_PER_SM x SMs programs rather than N*G. The forward has two paths, picked
by `launch_config` (`LaunchConfig.single_pass`); both run the same tile loops (`_block_stats`: tiles
merged with Chan's formula; `_normalize_block`).
  one launch `_fused_kernel`, for groups of at most SINGLE_PASS_MAX_GROUP elements (e.g. the SD
           UNet's 8x8 and 16x16 levels, where a call costs host time, not bandwidth) or when the N*G
           rows alone fill PROGRAMS_PER_SM x SMs: every program computes its whole group's
           statistics itself, redundantly, in its own wider tiles (STATS_BLOCK_C x STATS_BLOCK_S;
           after a group's first program these reads should hit L2); chunk 0 writes (mean, rstd)
           when autograd needs them; each program then normalises + affine + SiLU its chunk.
           Chunks (`_single_pass_chunk`): at most SINGLE_PASS_STATS_READS / group per row, each of
           >= MIN_CHUNK elements; the fewest reaching PROGRAMS_PER_SM x SMs programs, then the
           widest channel block. E.g. fp16 (2,1280,8,8): 640 programs of 8x32 (64 before);
           (1,1280,8,8): 320 (MIN_CHUNK bound). On an H100 (fp16, `bench tune`,
           bench/results/2026-11-23-h100/tune-group-norm-silu.md) the redundant statistics beat
           the two passes' best tiles at (2,1280,8,8) (0.0067 vs 0.0088 ms) and (2,1280,16,16)
           (0.0099 vs 0.0107), and lost at the 40960-element groups of (2,320,64,64) (0.0201 vs
           0.0164), which take two passes; SINGLE_PASS_STATS_READS and MIN_CHUNK were not swept.
  two passes, otherwise: whole channel blocks, H*W cut so each pass launches >= PROGRAMS_PER_SM x
           SMs programs. Pass 1 `_stats_kernel`: per (n, g, chunk) partial (count, mean, M2) -> fp32
           workspace; pass 2 `_apply_kernel`: combine the group's partials (a few hundred floats,
           from L2), then normalise + affine + SiLU its chunk. (Both passes in one cooperative
           launch, a grid barrier between them, lost 2-4 us to the two launches on an H100:
           bench/results/2026-11-23-h100-3/README.md.)
  backward, always two passes (after a heuristic single-pass forward, with the two-pass split):
           pass 1 `_bwd_reduce_kernel`: per (n, g, chunk) sum(dxhat), sum(dxhat * xhat) and per
           channel sum(dz * xhat), sum(dz) (dweight, dbias partials; torch sums those);
           pass 2 `_bwd_dx_kernel`: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
           Both recompute xhat = ((x - pivot) - mean) * rstd from the forward's (mean of x - pivot,
           rstd), as the forward normalised: x - mean with the mean rounded to fp32 lost dx digits
           in proportion to |mean| / std (1.9e-5 at 1000, 2.5e-4 at 10000; now <= 6e-7).
Host time: what depends only on shapes, strides, dtype and flags (grid, strides, constexprs) is a
cached `_Plan`; a no-grad call allocates y (and the two-pass workspace) and launches.
Bytes: the ideal forward reads x twice (stats, normalise) and writes y once: 3 x numel x itemsize
(the second read hits L2 when x fits in 50 MB; the one launch reads x chunks + 1 times, all but once
from L2); backward reads x, dy twice and writes dx: 5x.
Where it should win: fp16/bf16 at batch 1-8 on SD shapes, against torch's group_norm + silu
(one more full read and write for the SiLU, and a grid that does not fill the GPU).
Layouts: any strides (NCHW, channels_last, slices); the output keeps x's memory format.
Channels per group (C_PER_G) is a constexpr, one compile per value (a handful in SD: 4-80). In
channels_last the channels are the contiguous axis, and only a compile-time C_PER_G lets Triton
prove a group's channels start on a 16-byte boundary and its channel mask constant over 8 of them:
with C_PER_G a runtime int, channels_last compiled to 2-byte loads (offline sm_90 SASS); now 16-byte
at 40 channels per group, 8 at 20, 4 at 10 (20 bytes per group: 4-byte aligned at best).
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._autograd import reference_grads
from ._launch import Launcher
from ._triton import cdiv, next_power_of_2, tl, triton
from .registry import (Backend, autocast_dtype, check_floating, counted, define_op, dispatch, fits_int32,
                       max_offset, overlaps, overlaps_itself, refuse, register, transform_problem,
                       triton_device_problem)

# ---- Launch configuration: the one place to tune on a GPU (defaults chosen for an H100) ----
# Read when a call's launch plan is first made, then cached per input signature (launch_config,
# _PLANS): after editing them at run time, call clear_caches(). A sweep can instead pass
# config=launch_config(...) (or a LaunchConfig) per call, as `bench tune` does.
H100_SMS = 132  # used when the device cannot be asked (CPU tests of the grid)
INTERPRETER_SMS = 2  # the CPU interpreter runs programs one by one: keep grids small there
PROGRAMS_PER_SM = 4  # each pass launches at least this many programs per SM
MAX_TILE = 4096  # elements per tile (BLOCK_C x BLOCK_S): fp16 at 8 warps = 2 x 16-byte loads/thread
MAX_BLOCK_C = 64  # channels per tile; groups with more channels are cut into channel blocks
BYTES_PER_ACCESS = 16  # one vector load per thread
LOADS_PER_THREAD = 2  # vector loads in flight per thread per tile
MAX_WARPS = 8
SINGLE_PASS_MAX_GROUP = 16384  # elements per (n, group) taking the one-launch forward (H100 sweep, 2026-11-23:
# at SD 1.5's UNet shapes the default path and tiles were best or within 3%)
# one launch: every chunk re-reads its whole group for the statistics, so a group's chunks x its
# elements (what x it reads for statistics, mostly from L2) stays within this; to tune on a GPU
SINGLE_PASS_STATS_READS = 1 << 18
MIN_CHUNK = 256  # one launch: elements a program normalises, at least (unless whole channel blocks)
STATS_LOADS_PER_THREAD = 8  # one launch: vector loads per thread per statistics tile

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


@register("group_norm_silu", Backend.REFERENCE)
def group_norm_silu_reference(x, weight, bias, groups, eps=1e-5, activation="silu"):
    """Plain torch: ``F.group_norm`` then ``F.silu`` (torch accumulates the statistics in fp32 for
    16-bit x; weight / bias may be fp32 with 16-bit x, as under autocast; y has x's dtype, or fp32
    under CUDA autocast, which runs group_norm in fp32)."""
    if weight is None and bias is not None:  # torch's backward fails on bias alone ("tensor does not have
        weight = torch.ones_like(bias)  # a device", torch 2.13); x * 1 is exact, so y is unchanged
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


@dataclass(frozen=True)
class LaunchConfig:
    rows: int  # N * groups
    c_blocks: int  # channel blocks per group
    s_chunks: int  # spatial chunks per channel block
    s_chunk: int  # spatial positions per chunk (a multiple of block_s)
    block_c: int
    block_s: int  # tile width when normalising a chunk (and in the two-pass statistics)
    num_warps: int
    even_s: bool  # every tile is full along H * W
    stats_block_c: int  # one launch: its statistics' tiles over the whole group (the widest allowed)
    stats_block_s: int
    stats_even_s: bool  # H * W % stats_block_s == 0
    single_pass: bool = False  # forward: one launch with redundant statistics, else two launches

    @property
    def chunks(self) -> int:  # programs per (n, group), in every kernel
        return self.c_blocks * self.s_chunks

    @property
    def grid(self) -> tuple[int]:  # the programs of each forward (and backward) launch
        return (self.rows * self.chunks,)


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def _single_pass_chunk(rows, cg, spatial, block_c, sms):
    """(block_c, s_chunk) of the one-launch forward. Chunks of b channels x s positions (powers of
    two, b <= block_c) with at most SINGLE_PASS_STATS_READS / group of them per (n, group), each
    of at least MIN_CHUNK elements; of these, the fewest chunks giving PROGRAMS_PER_SM x sms
    programs (else the most), then the widest channel block. Whole channel blocks of block_c
    over all of H * W always qualify."""
    group = cg * spatial
    most = min(SINGLE_PASS_STATS_READS // group, group // MIN_CHUNK)
    want = cdiv(PROGRAMS_PER_SM * sms, rows)
    s_top = next_power_of_2(spatial)
    best, choice = None, (block_c, s_top)
    b = block_c
    while b >= 1:
        s = s_top
        while s >= 1 and min(b, cg) * min(s, spatial) >= MIN_CHUNK:
            chunks = cdiv(cg, b) * cdiv(spatial, s)
            key = (min(chunks, want), -chunks, b)
            if chunks <= most and (best is None or key > best):
                best, choice = key, (b, s)
            s //= 2
        b //= 2
    return choice


@functools.lru_cache(maxsize=1024)
def launch_config(shape, groups, dtype, sms=H100_SMS, max_tile=None, max_block_c=None, single_pass=None):
    """Tiling for x of ``shape`` (N, C, *spatial), tiles of at most ``max_tile`` elements
    (None: MAX_TILE; ``max_block_c`` None: MAX_BLOCK_C).

    ``single_pass`` None picks the path: one launch when a group has at most
    SINGLE_PASS_MAX_GROUP elements or the N * groups rows alone give PROGRAMS_PER_SM x sms programs;
    else two passes. Two passes: whole channel blocks, H * W cut into chunks so each pass has at
    least PROGRAMS_PER_SM x sms programs (unless there are fewer tiles). One launch: chunks as
    `_single_pass_chunk` picks them. Every config is also a valid two-pass one, for backward.
    """
    max_tile = MAX_TILE if max_tile is None else max_tile
    max_block_c = MAX_BLOCK_C if max_block_c is None else max_block_c
    n, c, spatial = shape[0], shape[1], math.prod(shape[2:])
    rows, cg = n * groups, c // groups
    if single_pass is None:
        single_pass = cg * spatial <= SINGLE_PASS_MAX_GROUP or rows >= PROGRAMS_PER_SM * sms
    block_c = stats_c = min(next_power_of_2(cg), _pow2_floor(max_block_c))
    if single_pass:
        block_c, s_chunk = _single_pass_chunk(rows, cg, spatial, block_c, sms)
        block_s = min(s_chunk, _pow2_floor(max_tile // block_c))
        s_chunk = block_s * cdiv(min(s_chunk, spatial), block_s)
    else:
        tile_s = _pow2_floor(max_tile // block_c)  # the widest tile allowed
        wanted = cdiv(PROGRAMS_PER_SM * sms, rows * cdiv(cg, block_c))  # spatial chunks
        per_chunk = max(1, spatial // wanted)
        block_s = max(1, min(_pow2_floor(per_chunk), tile_s))
        s_chunk = block_s * max(1, per_chunk // block_s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    warps = max(1, min(MAX_WARPS, _pow2_floor(
        block_c * block_s * itemsize // (BYTES_PER_ACCESS * LOADS_PER_THREAD * 32))))
    stats_tile = min(max_tile, warps * 32 * STATS_LOADS_PER_THREAD * BYTES_PER_ACCESS // itemsize)
    stats_s = min(next_power_of_2(spatial), _pow2_floor(stats_tile // stats_c))
    return LaunchConfig(rows, cdiv(cg, block_c), cdiv(spatial, s_chunk), s_chunk, block_c,
                        block_s, warps, spatial % block_s == 0, stats_c, stats_s, spatial % stats_s == 0,
                        single_pass)


@triton.jit
def _tile(pid, CHUNKS, S_CHUNKS, S_CHUNK, G, C_PER_G, S, BLOCK_C: tl.constexpr):
    """(n, row, channel indices, channel mask, first and end spatial position) of program pid."""
    row = pid // CHUNKS  # n * G + g
    k = pid % CHUNKS
    n = row // G
    c_local = (k // S_CHUNKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_start = (k % S_CHUNKS) * S_CHUNK
    s_end = tl.minimum(s_start + S_CHUNK, S)
    return n.to(tl.int64), row, (row % G) * C_PER_G + c_local, c_local < C_PER_G, s_start, s_end


@triton.jit
def _mask(c_mask, s, s_end, BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr):
    """(BLOCK_C, BLOCK_S) tile mask; constant along H * W when EVEN_S (16-byte loads stay whole)."""
    if EVEN_S:
        mask = tl.broadcast_to(c_mask[:, None], (c_mask.shape[0], BLOCK_S))
    else:
        mask = c_mask[:, None] & (s < s_end)[None, :]
    return mask


@triton.jit
def _offsets(c, s, W, stride_c, stride_h, stride_w, SPLIT_HW: tl.constexpr):
    """(BLOCK_C, BLOCK_S) element offsets; stride_w is the flat spatial stride unless SPLIT_HW."""
    if SPLIT_HW:
        s_off = (s // W) * stride_h + (s % W) * stride_w
    else:
        s_off = s * stride_w
    return c[:, None] * stride_c + s_off[None, :]


@triton.jit
def _chan_merge(count, mean, m2, b_count, b_mean, b_m2):
    """Chan et al. (1979): (count, mean, M2) of the union of two disjoint sets."""
    total = count + b_count
    delta = b_mean - mean
    return total, mean + delta * (b_count / total), m2 + b_m2 + delta * delta * (count * b_count / total)


@triton.jit
def _pivot(x_base, row, G, C_PER_G: tl.constexpr, stride_c):
    """The group's first element (channel g * C/G, position 0), in fp32: every program of the group
    takes its statistics of x - pivot, so the mean it carries is small where |mean| >> std."""
    return tl.load(x_base + ((row % G) * C_PER_G) * stride_c).to(tl.float32)


@triton.jit
def _block_stats(x_base, c, c_mask, n_c, s_start, s_end, W, stride_c, stride_h, stride_w, pivot,
                 BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr, SPLIT_HW: tl.constexpr):
    """(count, mean, M2) of x - pivot over channels c (n_c of them valid) and positions
    [s_start, s_end): each tile two-pass in registers, tiles merged with Chan's formula."""
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = _mask(c_mask, s, s_end, BLOCK_S, EVEN_S)
        # masked elements load the pivot (exact in x's dtype: it is one of x's), so they count 0
        v = tl.load(x_base + _offsets(c, s, W, stride_c, stride_h, stride_w, SPLIT_HW),
                    mask=mask, other=pivot).to(tl.float32) - pivot
        t_cnt = n_c * tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        t_mean = tl.sum(tl.sum(v, axis=1), axis=0) / t_cnt
        d = tl.where(mask, v - t_mean, 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, t_cnt, t_mean, tl.sum(tl.sum(d * d, axis=1), axis=0))
    return count, mean, m2


@triton.jit
def _scale_shift(w_ptr, b_ptr, c, c_mask, rstd, BLOCK_C: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per channel (scale, shift) with weight * xhat + bias = ((x - pivot) - mean) * scale + shift,
    mean that of x - pivot (`_pivot`). Neither mean is folded into the shift (x * scale - mean *
    scale + bias): where |mean| >> std the folded terms are each ~|mean| / std times z and cancel,
    and fp32 rounding of the scale alone costs ~|mean| / std ulps of z; nor is a mean of ~|x| kept
    in fp32, whose half ulp is ~|mean| / std ulps of xhat (both 1e-5 relative at |mean| / std ~
    300, where torch's fp32 group_norm misses 1e-5 too)."""
    scale = tl.full((BLOCK_C,), 1.0, tl.float32) * rstd
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_BIAS:
        shift += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _normalize_block(x_base, y_base, c, c_mask, pivot, mean, scale, shift, s_start, s_end, W,
                     stride_xc, stride_xh, stride_xw, stride_yc, stride_yh, stride_yw,
                     BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr, SPLIT_HW: tl.constexpr,
                     SILU: tl.constexpr):
    """y = silu(((x - pivot) - mean) * scale + shift) (or without the SiLU) for channels c over
    [s_start, s_end)."""
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = _mask(c_mask, s, s_end, BLOCK_S, EVEN_S)
        v = tl.load(x_base + _offsets(c, s, W, stride_xc, stride_xh, stride_xw, SPLIT_HW),
                    mask=mask, other=0.0).to(tl.float32)
        z = ((v - pivot) - mean) * scale[:, None] + shift[:, None]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_base + _offsets(c, s, W, stride_yc, stride_yh, stride_yw, SPLIT_HW),
                 z.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def _fused_kernel(
    x_ptr,  # (N, C, H, W), any strides
    y_ptr,  # (N, C, H, W) out, any strides, x's dtype
    w_ptr,  # (C,) or unused when not HAS_WEIGHT
    b_ptr,  # (C,) or unused when not HAS_BIAS
    stats_ptr,  # (N * G, 2) fp32 out: (mean of x - pivot, rstd) for backward; unused when not STORE_STATS
    G, C_PER_G: tl.constexpr, S, W, eps,  # groups, channels per group (constexpr: see _tile), H * W, W
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    S_CHUNK,  # spatial positions per chunk
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STATS_BLOCK_C: tl.constexpr,  # the statistics' tiles, over the whole group
    STATS_BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr,  # H * W % BLOCK_S == H * W % STATS_BLOCK_S == 0: no spatial masks
    SPLIT_HW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    STORE_STATS: tl.constexpr,
):
    """One launch: program (n, g, chunk) reduces the whole group (as its other chunks do: the same
    tiles in the same order, so the same bits), then normalises its chunk only."""
    pid = tl.program_id(0)
    s_chunks = tl.cdiv(S, S_CHUNK)  # derived here rather than passed: fewer arguments to bind
    chunks = tl.cdiv(C_PER_G, BLOCK_C) * s_chunks
    n, row, c, c_mask, s_start, s_end = _tile(pid, chunks, s_chunks, S_CHUNK, G, C_PER_G, S, BLOCK_C)
    x_base = x_ptr + n * stride_xn
    c_first = (row % G) * C_PER_G
    pivot = _pivot(x_base, row, G, C_PER_G, stride_xc)
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for c0 in range(0, C_PER_G, STATS_BLOCK_C):
        c_local = c0 + tl.arange(0, STATS_BLOCK_C)
        n_c = tl.minimum(C_PER_G - c0, STATS_BLOCK_C).to(tl.float32)
        b_count, b_mean, b_m2 = _block_stats(x_base, c_first + c_local, c_local < C_PER_G, n_c, 0, S, W,
                                             stride_xc, stride_xh, stride_xw, pivot, STATS_BLOCK_S, EVEN_S,
                                             SPLIT_HW)
        count, mean, m2 = _chan_merge(count, mean, m2, b_count, b_mean, b_m2)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    if STORE_STATS:
        if pid % chunks == 0:
            tl.store(stats_ptr + row * 2, mean)  # of x - pivot: backward reads pivot again
            tl.store(stats_ptr + row * 2 + 1, rstd)
    scale, shift = _scale_shift(w_ptr, b_ptr, c, c_mask, rstd, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    _normalize_block(x_base, y_ptr + n * stride_yn, c, c_mask, pivot, mean, scale, shift, s_start, s_end, W,
                     stride_xc, stride_xh, stride_xw, stride_yc, stride_yh, stride_yw,
                     BLOCK_S, EVEN_S, SPLIT_HW, SILU)


@triton.jit
def _group_stats(part_ptr, row, CHUNKS, eps, CHUNKS_P2: tl.constexpr):
    """Chan's parallel combine of a group's per-chunk (count, mean, M2) -> (mean, rstd)."""
    k = tl.arange(0, CHUNKS_P2)
    p = part_ptr + (row * CHUNKS + k) * 3
    cnt = tl.load(p, mask=k < CHUNKS, other=0.0)
    mu = tl.load(p + 1, mask=k < CHUNKS, other=0.0)
    m2 = tl.load(p + 2, mask=k < CHUNKS, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mu, axis=0) / total
    d = mu - mean
    var = (tl.sum(m2, axis=0) + tl.sum(cnt * d * d, axis=0)) / total
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _stats_kernel(
    x_ptr,  # (N, C, H, W), any strides
    part_ptr,  # (N * G, CHUNKS, 3) fp32 out: per-chunk (count, mean, M2) of x - pivot
    G, C_PER_G: tl.constexpr, S, W,  # groups, channels per group (constexpr: see _tile), H * W, W
    stride_xn, stride_xc, stride_xh, stride_xw,
    CHUNKS, S_CHUNKS, S_CHUNK,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr,  # H * W % BLOCK_S == 0: no spatial mask, so loads vectorise
    SPLIT_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    n, row, c, c_mask, s_start, s_end = _tile(pid, CHUNKS, S_CHUNKS, S_CHUNK, G, C_PER_G, S, BLOCK_C)
    c0 = ((pid % CHUNKS) // S_CHUNKS) * BLOCK_C
    n_c = tl.minimum(C_PER_G - c0, BLOCK_C).to(tl.float32)  # valid channels in the tile
    x_base = x_ptr + n * stride_xn
    count, mean, m2 = _block_stats(x_base, c, c_mask, n_c, s_start, s_end, W, stride_xc, stride_xh, stride_xw,
                                   _pivot(x_base, row, G, C_PER_G, stride_xc), BLOCK_S, EVEN_S, SPLIT_HW)
    p = part_ptr + pid * 3
    tl.store(p, count)
    tl.store(p + 1, mean)
    tl.store(p + 2, m2)


@triton.jit
def _apply_kernel(
    x_ptr,  # (N, C, H, W), any strides
    y_ptr,  # (N, C, H, W) out, any strides, x's dtype
    w_ptr,  # (C,) or unused when not HAS_WEIGHT
    b_ptr,  # (C,) or unused when not HAS_BIAS
    part_ptr,  # (N * G, CHUNKS, 3) fp32 from _stats_kernel
    stats_ptr,  # (N * G, 2) fp32 out: (mean of x - pivot, rstd) for backward; unused when not STORE_STATS
    G, C_PER_G: tl.constexpr, S, W, eps,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    CHUNKS, S_CHUNKS, S_CHUNK,
    CHUNKS_P2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr,  # H * W % BLOCK_S == 0: no spatial mask, so loads vectorise
    SPLIT_HW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    STORE_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    n, row, c, c_mask, s_start, s_end = _tile(pid, CHUNKS, S_CHUNKS, S_CHUNK, G, C_PER_G, S, BLOCK_C)
    mean, rstd = _group_stats(part_ptr, row, CHUNKS, eps, CHUNKS_P2)  # of x - pivot
    pivot = _pivot(x_ptr + n * stride_xn, row, G, C_PER_G, stride_xc)
    if STORE_STATS:
        if pid % CHUNKS == 0:
            tl.store(stats_ptr + row * 2, mean)  # of x - pivot: backward reads pivot again
            tl.store(stats_ptr + row * 2 + 1, rstd)
    scale, shift = _scale_shift(w_ptr, b_ptr, c, c_mask, rstd, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    _normalize_block(x_ptr + n * stride_xn, y_ptr + n * stride_yn, c, c_mask, pivot, mean, scale, shift, s_start,
                     s_end, W, stride_xc, stride_xh, stride_xw, stride_yc, stride_yh, stride_yw,
                     BLOCK_S, EVEN_S, SPLIT_HW, SILU)


@triton.jit
def _dz_xhat(x_base, dy_base, c, s, mask, W, pivot, mean, rstd, w, b,
             stride_xc, stride_xh, stride_xw, stride_dyc, stride_dyh, stride_dyw,
             SPLIT_HW: tl.constexpr, SILU: tl.constexpr):
    """Recompute xhat = ((x - pivot) - mean) * rstd as the forward normalised (x - mean, with the
    group's mean rounded to fp32, lost 1.9e-5 of dx at |mean| / std ~ 1000) and dz = dL/dz (through
    the SiLU) for one tile."""
    x = tl.load(x_base + _offsets(c, s, W, stride_xc, stride_xh, stride_xw, SPLIT_HW),
                mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dy_base + _offsets(c, s, W, stride_dyc, stride_dyh, stride_dyw, SPLIT_HW),
                 mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, ((x - pivot) - mean) * rstd, 0.0)
    if SILU:
        z = xhat * w[:, None] + b[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return xhat, dz


@triton.jit
def _bwd_reduce_kernel(
    x_ptr,  # (N, C, H, W), any strides
    dy_ptr,  # (N, C, H, W), any strides
    w_ptr,  # (C,) or unused when not HAS_WEIGHT
    b_ptr,  # (C,) or unused when not HAS_BIAS
    stats_ptr,  # (N * G, 2) fp32: (mean of x - pivot, rstd)
    part_ptr,  # (N * G, CHUNKS, 2) fp32 out: per-chunk sum(dxhat), sum(dxhat * xhat)
    dwb_ptr,  # (2, N * S_CHUNKS, C) fp32 out: per-chunk sum(dz * xhat), sum(dz) per channel
    N, C, G, C_PER_G: tl.constexpr, S, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    CHUNKS, S_CHUNKS, S_CHUNK,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr,  # H * W % BLOCK_S == 0: no spatial mask, so loads vectorise
    SPLIT_HW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    pid = tl.program_id(0)
    n, row, c, c_mask, s_start, s_end = _tile(pid, CHUNKS, S_CHUNKS, S_CHUNK, G, C_PER_G, S, BLOCK_C)
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    pivot = _pivot(x_ptr + n * stride_xn, row, G, C_PER_G, stride_xc)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = _mask(c_mask, s, s_end, BLOCK_S, EVEN_S)
        xhat, dz = _dz_xhat(x_ptr + n * stride_xn, dy_ptr + n * stride_dyn, c, s, mask, W, pivot, mean,
                            rstd, w, b, stride_xc, stride_xh, stride_xw, stride_dyc, stride_dyh,
                            stride_dyw, SPLIT_HW, SILU)
        dw += tl.sum(dz * xhat, axis=1)
        db += tl.sum(dz, axis=1)
    tl.store(part_ptr + pid * 2, tl.sum(db * w, axis=0))  # sum(dxhat), dxhat = dz * w
    tl.store(part_ptr + pid * 2 + 1, tl.sum(dw * w, axis=0))  # sum(dxhat * xhat)
    slot = (n * S_CHUNKS + (pid % CHUNKS) % S_CHUNKS) * C + c
    tl.store(dwb_ptr + slot, dw, mask=c_mask)
    tl.store(dwb_ptr + N * S_CHUNKS * C + slot, db, mask=c_mask)


@triton.jit
def _bwd_dx_kernel(
    x_ptr,  # (N, C, H, W), any strides
    dy_ptr,  # (N, C, H, W), any strides
    dx_ptr,  # (N, C, H, W) out, any strides, x's dtype
    w_ptr,  # (C,) or unused when not HAS_WEIGHT
    b_ptr,  # (C,) or unused when not HAS_BIAS
    stats_ptr,  # (N * G, 2) fp32: (mean of x - pivot, rstd)
    part_ptr,  # (N * G, CHUNKS, 2) fp32 from _bwd_reduce_kernel
    G, C_PER_G: tl.constexpr, S, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    CHUNKS, S_CHUNKS, S_CHUNK,
    CHUNKS_P2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr,  # H * W % BLOCK_S == 0: no spatial mask, so loads vectorise
    SPLIT_HW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    pid = tl.program_id(0)
    n, row, c, c_mask, s_start, s_end = _tile(pid, CHUNKS, S_CHUNKS, S_CHUNK, G, C_PER_G, S, BLOCK_C)
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    pivot = _pivot(x_ptr + n * stride_xn, row, G, C_PER_G, stride_xc)
    k = tl.arange(0, CHUNKS_P2)
    p = part_ptr + (row * CHUNKS + k) * 2
    inv_count = 1.0 / tl.cast(C_PER_G * S, tl.float32)  # a Python int where the launch passes S = 1 (specialised)
    m1 = tl.sum(tl.load(p, mask=k < CHUNKS, other=0.0), axis=0) * inv_count  # mean(dxhat)
    m2 = tl.sum(tl.load(p + 1, mask=k < CHUNKS, other=0.0), axis=0) * inv_count  # mean(dxhat xhat)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = _mask(c_mask, s, s_end, BLOCK_S, EVEN_S)
        xhat, dz = _dz_xhat(x_ptr + n * stride_xn, dy_ptr + n * stride_dyn, c, s, mask, W, pivot, mean,
                            rstd, w, b, stride_xc, stride_xh, stride_xw, stride_dyc, stride_dyh,
                            stride_dyw, SPLIT_HW, SILU)
        dx = rstd * (dz * w[:, None] - m1 - xhat * m2)
        tl.store(dx_ptr + n * stride_dxn + _offsets(c, s, W, stride_dxc, stride_dxh, stride_dxw, SPLIT_HW),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _strides(tensors, h, w):
    """Per tensor (stride_n, stride_c, stride_h, stride_w) as 4-D, and whether H, W must be split:
    when every tensor's H, W collapse into one spatial stride, that stride is passed as stride_w."""
    full = []
    for t in tensors:
        st = t.stride()
        full.append((*st, 0, 0)[:4] if t.dim() < 4 else st)
    flat = [(sn, sc, 0, sh if w == 1 else sw) for sn, sc, sh, sw in full
            if w == 1 or h == 1 or sh == w * sw]
    return (full, True) if len(flat) < len(full) else (flat, False)


def _spatial_hw(x):
    return (x.shape[2] if x.dim() > 2 else 1), (x.shape[3] if x.dim() > 3 else 1)


class _Plan(NamedTuple):
    """A forward call's launches, fixed by shapes, strides, dtype and flags (see `_plan`)."""
    single_pass: bool
    grid: tuple[int]
    stats_shape: tuple | None  # (N * G, 2) when (mean, rstd) are written for backward, else None
    bwd_cfg: LaunchConfig  # the backward's tiling: always two passes
    groups: int
    silu: bool
    args: tuple  # scalar arguments of _fused_kernel / _apply_kernel after the pointers
    consts: dict  # their constexprs and num_warps
    stats_args: tuple  # two passes: _stats_kernel's scalar arguments
    stats_consts: dict
    part_shape: tuple  # two passes: the (N * G, CHUNKS, 3) workspace
    launch_key: tuple  # (args, consts): what the fused / apply launch passes besides tensors (_launch.py)
    stats_launch_key: tuple  # the same for _stats_kernel


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024  # distinct input signatures kept; the cache is emptied when it is full


def _config_problem(cfg: LaunchConfig, shape, groups: int) -> str | None:
    """Why ``cfg`` cannot tile x of ``shape`` into ``groups`` (programs left out, tiles past the
    group, full tiles promised where they are not), or None. launch_config's output always fits
    the shape it was made for; a config made for another shape may launch too few programs."""
    n, c, spatial = shape[0], shape[1], math.prod(shape[2:])
    cg = c // groups
    pow2 = ("block_c", "block_s", "stats_block_c", "stats_block_s", "num_warps")
    rules = [(f"{name} = {getattr(cfg, name)} is not a power of two", getattr(cfg, name) < 1
              or getattr(cfg, name) & (getattr(cfg, name) - 1)) for name in pow2]
    rules += [
        (f"rows = {cfg.rows}, not N * groups = {n * groups}", cfg.rows != n * groups),
        (f"c_blocks = {cfg.c_blocks} blocks of {cfg.block_c} do not tile C / groups = {cg} channels",
         cfg.c_blocks != cdiv(cg, cfg.block_c)),
        (f"s_chunk = {cfg.s_chunk} is not a positive multiple of block_s = {cfg.block_s}",
         cfg.s_chunk < cfg.block_s or cfg.s_chunk % cfg.block_s),
        (f"s_chunks = {cfg.s_chunks} chunks of {cfg.s_chunk} do not tile H * W = {spatial}",
         cfg.s_chunks != cdiv(spatial, cfg.s_chunk)),
        (f"even_s, but H * W = {spatial} is not a multiple of block_s = {cfg.block_s}",
         cfg.even_s and spatial % cfg.block_s),
        (f"stats_even_s, but H * W = {spatial} is not a multiple of stats_block_s = {cfg.stats_block_s}",
         cfg.stats_even_s and spatial % cfg.stats_block_s),
    ]
    bad = [what for what, broken in rules if broken]
    return f"config does not fit x{tuple(shape)} with {groups} groups: " + "; ".join(bad) if bad else None


def _make_plan(x, has_weight, has_bias, groups, eps, silu, out, config, store_stats):
    if config is not None and (why := _config_problem(config, x.shape, groups)):
        raise ValueError(f"{why} (launch_config(x.shape, groups, x.dtype) makes one that does)")
    cfg = config or launch_config(x.shape, groups, x.dtype, _sms(x))
    bwd_cfg = cfg
    if config is None and cfg.single_pass:
        bwd_cfg = launch_config(x.shape, groups, x.dtype, _sms(x), single_pass=False)
    y = torch.empty_like(x, device="meta") if out is None else out  # y's strides, as _forward makes it
    h, w = _spatial_hw(x)
    (sx, sy), split = _strides((x, y), h, w)
    sizes = (groups, x.shape[1] // groups, h * w, w)
    chunking = (cfg.chunks, cfg.s_chunks, cfg.s_chunk)
    tiles = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, EVEN_S=cfg.even_s, SPLIT_HW=split,
                 num_warps=cfg.num_warps)
    consts = dict(tiles, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, SILU=silu, STORE_STATS=store_stats)
    head = (cfg.single_pass, cfg.grid, (cfg.rows, 2) if store_stats else None, bwd_cfg, groups, silu)
    if cfg.single_pass:
        args = (*sizes, eps, *sx, *sy, cfg.s_chunk)
        consts = dict(consts, EVEN_S=cfg.even_s and cfg.stats_even_s, STATS_BLOCK_C=cfg.stats_block_c,
                      STATS_BLOCK_S=cfg.stats_block_s)
        stats_args, stats_consts, part_shape = (), {}, ()
    else:
        args = (*sizes, eps, *sx, *sy, *chunking)
        consts = dict(consts, CHUNKS_P2=next_power_of_2(cfg.chunks))
        stats_args, stats_consts, part_shape = (*sizes, *sx, *chunking), tiles, (cfg.rows, cfg.chunks, 3)
    # launch keys from the values launched, not from the inputs: a retuned launch_config gives new ones
    return _Plan(*head, args, consts, stats_args, stats_consts, part_shape, (args, tuple(consts.items())),
                 (stats_args, tuple(stats_consts.items())))


def _plan(x, weight, bias, groups, eps, activation, out, config, store_stats):
    """The cached `_Plan` of this call (torch.compile never traces this: it sees
    torch.ops.sdlab.group_norm_silu)."""
    key = (x.shape, x.stride(), x.dtype, x.get_device(), None if out is None else out.stride(),
           weight is None, bias is None, groups, eps, activation, config, store_stats)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(x, weight is not None, bias is not None, groups, float(eps), activation == "silu",
                          out, config, store_stats)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _forward(x, weight, bias, out, plan, y_dtype=None):
    """Launch the forward; returns y (of ``y_dtype``, default x's) and the (N * G, 2) fp32
    (mean, rstd) (None if not stored)."""
    y = torch.empty_like(x, dtype=y_dtype) if out is None else out
    stats = None
    if plan.stats_shape is not None:
        stats = torch.empty(plan.stats_shape, device=x.device, dtype=torch.float32)
    w_ptr, b_ptr = (x if weight is None else weight), (x if bias is None else bias)
    if plan.single_pass:
        tensors = (x, y, w_ptr, b_ptr, x if stats is None else stats)
        _FUSED(plan.grid, plan.launch_key, tensors, (*tensors, *plan.args), plan.consts)
    else:
        part = torch.empty(plan.part_shape, device=x.device, dtype=torch.float32)
        _STATS(plan.grid, plan.stats_launch_key, (x, part), (x, part, *plan.stats_args), plan.stats_consts)
        tensors = (x, y, w_ptr, b_ptr, part, part if stats is None else stats)
        _APPLY(plan.grid, plan.launch_key, tensors, (*tensors, *plan.args), plan.consts)
    return y, stats


class _GroupNormSiLU(torch.autograd.Function):
    """Triton forward (saves per-group mean, rstd) and Triton backward (dx, dweight, dbias); under
    create_graph=True the backward is recomputed through the reference (kernels._autograd).

    ``out`` comes first: when it is a view, autograd rebases the written tensor's history through
    CopySlices, which takes the Function's first input to be the tensor written in place (last,
    dx went to the base's history and x got none). Its old values do not reach y: gradient 0."""

    @staticmethod
    def forward(ctx, out, x, weight, bias, plan, eps, y_dtype):
        if out is not None:
            ctx.mark_dirty(out)
        y, stats = _forward(x, weight, bias, out, plan, y_dtype)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.plan, ctx.eps, ctx.fp32_out = plan, eps, y.dtype == torch.float32 != x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        if not any(ctx.needs_input_grad[1:4]):  # only out was in a graph (its old values get 0)
            return _out_grad(ctx, dy), None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, from the reference
            act = "silu" if ctx.plan.silu else None

            def reference(x, weight, bias):  # in the precision the kernel wrote y (fp32 for 16-bit x: out=, autocast)
                if ctx.fp32_out:
                    x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
                return group_norm_silu_reference(x, weight, bias, ctx.plan.groups, ctx.eps, act)

            grads = reference_grads(reference, (x, weight, bias), ctx.needs_input_grad[1:4], dy)
            return (_out_grad(ctx, dy), *grads, None, None, None)
        dx, dweight, dbias = _backward(dy, x, weight, bias, stats, ctx.plan, ctx.needs_input_grad[2],
                                       ctx.needs_input_grad[3])
        return _out_grad(ctx, dy), dx, dweight, dbias, None, None, None


def _backward(dy, x, weight, bias, stats, plan, need_dweight=True, need_dbias=True):
    """Launch the two backward passes; returns (dx, dweight, dbias), dweight / dbias None where
    the parameter is absent or not needed. ``stats``: the forward's (N * G, 2) (mean of x less its
    group's first element, rstd)."""
    cfg, groups = plan.bwd_cfg, plan.groups
    n, c = x.shape[:2]
    h, w = _spatial_hw(x)
    dx = torch.empty_like(x)
    dy = dy if fits_int32(dy, 1) else dy.contiguous()  # x passed the check; an upstream gradient need not
    part = torch.empty(cfg.rows, cfg.chunks, 2, device=x.device, dtype=torch.float32)
    dwb = torch.empty(2, n * cfg.s_chunks, c, device=x.device, dtype=torch.float32)
    (sx, sdy, sdx), split = _strides((x, dy, dx), h, w)
    w_ptr, b_ptr = (weight if weight is not None else x), (bias if bias is not None else x)
    flags = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, EVEN_S=cfg.even_s, SPLIT_HW=split,
                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=plan.silu,
                 num_warps=cfg.num_warps)
    chunking = (cfg.chunks, cfg.s_chunks, cfg.s_chunk)
    c_per_g, s, grid = c // groups, h * w, (cfg.rows * cfg.chunks,)
    ints = (n, c, groups, c_per_g, s, w, *sx, *sdy, *chunking)
    tensors = (x, dy, w_ptr, b_ptr, stats, part, dwb)
    _BWD_REDUCE(grid, (ints, *flags.values()), tensors, (*tensors, *ints), flags)
    ints = (groups, c_per_g, s, w, *sx, *sdy, *sdx, *chunking)
    flags["CHUNKS_P2"] = next_power_of_2(cfg.chunks)
    tensors = (x, dy, dx, w_ptr, b_ptr, stats, part)
    _BWD_DX(grid, (ints, *flags.values()), tensors, (*tensors, *ints), flags)
    dweight = dwb[0].sum(0).to(weight.dtype) if weight is not None and need_dweight else None
    dbias = dwb[1].sum(0).to(bias.dtype) if bias is not None and need_dbias else None
    return dx, dweight, dbias


def _out_grad(ctx, dy):
    """The gradient of what ``out`` held before it was overwritten: none of it reaches y."""
    return torch.zeros_like(dy) if ctx.needs_input_grad[0] else None


# ---- torch.compile: the Triton backend as two opaque ops, sdlab::group_norm_silu and its backward ----
# While torch.compile traces, the Triton backend calls these instead of launching: dynamo sees one
# op with a shape function (register_fake), not the plan cache, the direct launches and the
# autograd.Function, and the compiled graph calls the op, which runs the eager code above and counts
# as a triton call (kernels.counts) inside its profiler range. What that costs: the dispatcher's
# call into Python per op and run (host time: registry.define_op, python -m bench.host; none under
# CUDA graphs, i.e. torch.compile(mode="reduce-overhead")). Double backward under torch.compile is
# AOTAutograd's limit.

def _op_impl(x, weight, bias, groups, eps, silu, y_dtype, save_stats):
    """(y, stats): y of ``y_dtype`` in x's memory format; stats (N * G, 2) fp32 (mean of x - pivot, rstd) if
    ``save_stats``, else (0, 2)."""
    return counted("group_norm_silu", Backend.TRITON, _op_forward, x, weight, bias, groups, eps, silu, y_dtype,
                   save_stats)


def _op_forward(x, weight, bias, groups, eps, silu, y_dtype, save_stats):
    plan = _plan(x, weight, bias, groups, eps, "silu" if silu else None, None, None, save_stats)
    y, stats = _forward(x, weight, bias, None, plan, y_dtype)
    return y, x.new_empty((0, 2), dtype=torch.float32) if stats is None else stats


def _op_fake(x, weight, bias, groups, eps, silu, y_dtype, save_stats):
    rows = x.shape[0] * groups if save_stats else 0
    return torch.empty_like(x, dtype=y_dtype), x.new_empty((rows, 2), dtype=torch.float32)  # as _forward


def _op_backward(dy, x, weight, bias, stats, groups, eps, silu, need_dweight, need_dbias):
    """(dx, dweight, dbias), the last two empty where not needed."""
    plan = _plan(x, weight, bias, groups, eps, "silu" if silu else None, None, None, True)
    grads = _backward(dy, x, weight, bias, stats, plan, need_dweight, need_dbias)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _op_backward_fake(dy, x, weight, bias, stats, groups, eps, silu, need_dweight, need_dbias):
    def param(p, need):
        return p.new_empty(p.shape) if p is not None and need else x.new_empty(0)
    return torch.empty_like(x), param(weight, need_dweight), param(bias, need_dbias)


def _op_setup(ctx, inputs, output):
    x, weight, bias, groups, eps, silu, _, _ = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.args = (groups, eps, silu)


def _op_grad(ctx, dy, _):
    x, weight, bias, stats = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.sdlab.group_norm_silu_backward(dy, x, weight, bias, stats, *ctx.args, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None, None


define_op("group_norm_silu_backward",
          "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor stats, int groups, float eps, bool silu, "
          "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)", _op_backward, _op_backward_fake)
define_op("group_norm_silu",
          "(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu, ScalarType y_dtype, "
          "bool save_stats) -> (Tensor, Tensor)", _op_impl, _op_fake, _op_grad, _op_setup)


# Launches that skip Triton's per-call dispatch once a launch key has been through it (kernels/_launch.py)
_FUSED, _STATS, _APPLY = Launcher(_fused_kernel), Launcher(_stats_kernel), Launcher(_apply_kernel)
_BWD_REDUCE, _BWD_DX = Launcher(_bwd_reduce_kernel), Launcher(_bwd_dx_kernel)


def clear_caches() -> None:
    """Forget cached tilings and launch plans, so edits to the tuning constants above take effect."""
    launch_config.cache_clear()
    _PLANS.clear()


def _sms(x):
    return _device_sms(x.device.index or 0) if x.is_cuda else INTERPRETER_SMS


@functools.lru_cache(maxsize=None)
def _device_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_triton(x, weight, bias, groups, eps=1e-5, activation="silu", out=None, **_):
    """None when the triton backend can take the input, else why not."""
    if not isinstance(x, torch.Tensor):
        return f"x is a {type(x).__name__}, not a tensor"
    why = triton_device_problem(x.device) or transform_problem(x, weight, bias, out)
    if why:
        return why
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # here only under TRITON_INTERPRET=1
        return ("bfloat16 under the Triton interpreter: it truncates fp32 to bf16 where a GPU rounds to "
                "nearest, so outputs would be up to 1 ulp off the reference's; use fp16/fp32 or a GPU")
    if not 2 <= x.dim() <= 4:
        return f"x has {x.dim()} dims; triton takes (N, C), (N, C, L) or (N, C, H, W)"
    if x.shape[0] and x.numel() // x.shape[0] >= 2**31:  # offsets within a sample are 32-bit
        return f"{x.numel() // x.shape[0]} elements per sample (x{tuple(x.shape)}); the kernels index up to 2**31 - 1"
    if not fits_int32(x, 1):
        return (f"x{tuple(x.shape)} with strides {x.stride()} spans {max_offset(x, 1)} elements within a sample; "
                "the kernels index a sample in 32 bits (below 2**31): pass a contiguous copy")
    # under CUDA autocast any floating weight / bias is taken, cast to fp32 as autocast casts them
    return _params_problem(x, weight, bias, any_dtype=_autocast_casts(x))


def _params_problem(x, weight, bias, any_dtype: bool = False) -> str | None:
    """Why weight / bias do not fit x, or None: (C,) tensors on x's device, in x's dtype or, with
    16-bit x, float32 (as torch's group_norm takes them), one dtype for both; ``any_dtype``: under
    CUDA autocast, which casts every floating input of group_norm to fp32 but fp64, which it leaves:
    any dtypes that all cast to fp32, or all fp64."""
    if weight is not None and bias is not None and weight.dtype != bias.dtype and not any_dtype:
        return f"weight dtype {weight.dtype} and bias dtype {bias.dtype} differ; torch's group_norm takes one dtype"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != (x.shape[1],):
            return f"{name} shape {tuple(p.shape)} is not (C,) = ({x.shape[1]},)"
        if p.device != x.device:
            return f"{name} is on {p.device}, x on {x.device}"
        if any_dtype:
            if (p.dtype == torch.float64) != (x.dtype == torch.float64):
                return (f"{name} dtype {p.dtype} with x {x.dtype} under CUDA autocast, which casts floating inputs "
                        "to float32 but leaves float64: they would reach group_norm in two dtypes")
        elif p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in _HALF):
            return f"{name} dtype {p.dtype}: must be x's ({x.dtype}), or float32 with 16-bit x"
    return None


def group_norm_silu_triton(x, weight, bias, groups, eps=1e-5, activation="silu", *, out=None,
                           config: LaunchConfig | None = None):
    """The fused kernels; ``out`` (x's shape, x's dtype or float32) receives y, in place as torch's
    in-place ops do (autograd sees the write; what out held gets gradient 0); ``config``
    overrides tiling and path (``launch_config(..., single_pass=True/False)`` forces one).

    y has x's dtype, except under CUDA autocast, where it is float32 as torch's group_norm gives
    there (autocast runs it in fp32): the kernel then reads 16-bit x and writes fp32, which equals
    normalising x.float() (statistics are fp32 either way) without the cast's extra pass.

    Called directly, it checks what :func:`group_norm_silu` and the switch check: a bad argument is
    a TypeError / ValueError, an input the kernels cannot take (device, dtype, size)
    BackendUnsupported. The switch calls :func:`_group_norm_silu_triton`, having made both checks."""
    groups = _check_args(x, weight, bias, groups, eps, activation)
    refuse("group_norm_silu", Backend.TRITON, _check_triton(x, weight, bias, groups, eps, activation, out=out))
    return _group_norm_silu_triton(x, weight, bias, groups, eps, activation, out=out, config=config)


@register("group_norm_silu", Backend.TRITON, check=_check_triton)
def _group_norm_silu_triton(x, weight, bias, groups, eps=1e-5, activation="silu", *, out=None, config=None):
    """:func:`group_norm_silu_triton` past its argument checks (the switch has made them)."""
    if (out is not None or config is not None) and torch.compiler.is_compiling():
        # a write into the caller's memory (checked for overlaps) or a sweep's tiling: an eager call,
        # run outside the graph (disable() made here: importing dynamo with kernels would import Triton)
        eager = torch.compiler.disable(_group_norm_silu_triton)
        return eager(x, weight, bias, groups, eps, activation, out=out, config=config)
    if config is not None and not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig (launch_config(x.shape, groups, x.dtype, ...) makes one), "
                        f"not {type(config).__name__}")
    y_dtype = torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    if out is not None:
        if out.shape != x.shape or out.dtype not in (x.dtype, torch.float32) or out.device != x.device:
            raise ValueError(f"out is {out.dtype}{tuple(out.shape)} on {out.device}, x is {x.dtype}{tuple(x.shape)} "
                             f"on {x.device}: out must have x's shape and device, and x's dtype or float32")
        y_dtype = out.dtype
        for name, t in (("x", x), ("weight", weight), ("bias", bias)):
            if t is not None and overlaps(out, t):
                raise ValueError(f"out overlaps {name}: each program re-reads its whole group for "
                                 "the statistics (and autograd keeps x), so group_norm_silu cannot run in place")
        if overlaps_itself(out):
            raise ValueError(f"out{tuple(out.shape)} with strides {out.stride()} holds some elements at several "
                             "indices (an expanded view): programs writing them would race")
        if not fits_int32(out, 1):
            raise ValueError(f"out{tuple(out.shape)} with strides {out.stride()} spans {max_offset(out, 1)} elements "
                             "within a sample; the kernels index a sample in 32 bits (below 2**31): pass a contiguous out")
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))
    # out in a graph (a view of a tensor that requires grad): the write must be recorded too
    tracked = grad or (out is not None and out.requires_grad and torch.is_grad_enabled())
    if x.numel() == 0:  # nothing to launch; under autograd the reference keeps the graph (zero grads)
        if tracked:
            y = group_norm_silu_reference(x, weight, bias, groups, eps, activation)
            return y.to(y_dtype) if out is None else out.copy_(y)
        return torch.empty_like(x, dtype=y_dtype) if out is None else out
    # the kernels index weight[c] and bias[c] densely: a strided (C,) view is copied first
    weight = weight if weight is None or weight.stride(0) == 1 else weight.contiguous()
    bias = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    if _autocast_casts(x):  # as autocast hands torch's group_norm fp32 weight and bias (a bf16 weight with
        # fp16 x, or two dtypes, are taken there): cast where the kernels' rule (x's dtype or fp32) is not met
        if any(p is not None and p.dtype not in (x.dtype, torch.float32) for p in (weight, bias)) or (
                weight is not None and bias is not None and weight.dtype != bias.dtype):
            weight, bias = (None if p is None else p.float() for p in (weight, bias))
    if torch.compiler.is_compiling():  # dynamo traces one opaque op, not the launches (see _op_impl)
        return torch.ops.sdlab.group_norm_silu(x, weight, bias, groups, float(eps), activation == "silu", y_dtype,
                                               grad)[0]
    plan = _plan(x, weight, bias, groups, eps, activation, out, config, grad)
    if tracked:
        return _GroupNormSiLU.apply(out, x, weight, bias, plan, eps, y_dtype)
    y = _forward(x, weight, bias, out, plan, y_dtype)[0]  # no autograd overhead, no stats
    if out is not None:  # written through its pointer: autograd sees an in-place write
        torch.autograd.graph.increment_version(out)
    return y


def group_norm_silu(x, weight, bias, groups, eps=1e-5, activation="silu"):
    """GroupNorm over (C/groups, H, W) per sample, affine, then SiLU when ``activation="silu"``.

    x: (N, C, *spatial), NCHW or channels_last; weight, bias: (C,) or None.
    """
    groups = _check_args(x, weight, bias, groups, eps, activation)
    return dispatch("group_norm_silu", x, weight, bias, groups, eps, activation)


def _check_args(x, weight, bias, groups, eps, activation) -> int:
    """What every backend needs (TypeError / ValueError naming the argument), made by the op and by
    group_norm_silu_triton called directly; returns ``groups`` as an int (numpy integers too, as
    torch's group_norm takes them)."""
    if activation not in ("silu", None):
        raise ValueError(f"group_norm_silu: activation must be 'silu' or None, got {activation!r}")
    # type(v) is int / float first: an ABC isinstance costs ~0.45 µs, on every call
    if not (type(groups) is int or (isinstance(groups, numbers.Integral) and not isinstance(groups, bool))) \
            or groups <= 0:
        raise ValueError(f"group_norm_silu: groups must be a positive int, got {groups!r}")
    check_floating("group_norm_silu", x=x, weight=weight, bias=bias)
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x{tuple(x.shape)} needs (N, C, *spatial) dims")
    if x.shape[1] % groups:
        raise ValueError(f"group_norm_silu: {x.shape[1]} channels of x{tuple(x.shape)} "
                         f"not divisible by groups={groups}")
    if x.shape[0] == 1 and math.prod(x.shape[1:]) == groups:  # torch's group_norm raised, in its own words
        raise ValueError(f"group_norm_silu: x{tuple(x.shape)} with groups={groups} has one element per group at "
                         "batch 1, which torch's group_norm refuses (its variance is 0: the output would be the bias)")
    if why := _params_problem(x, weight, bias, any_dtype=_autocast_casts(x)):
        raise ValueError(f"group_norm_silu: {why}")
    # a negative eps gives NaN where a group is flat
    if not ((type(eps) is float or isinstance(eps, numbers.Real)) and eps >= 0):
        raise ValueError(f"group_norm_silu: eps must be a number >= 0, got {eps!r}")
    return int(groups)


def _autocast_casts(x) -> bool:
    """Whether autocast hands group_norm fp32 inputs here: CUDA's does (group_norm is on its fp32
    list), CPU's leaves its inputs as they are."""
    return x.device.type == "cuda" and autocast_dtype("cuda") is not None
