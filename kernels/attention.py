"""Attention softmax(q kᵀ · scale) v, optionally causal, (B, H, L, D): a torch reference, SDPA, and a
FlashAttention-2 Triton kernel whose head dim can be split so Stable Diffusion's 80/160 do not pay
for a power-of-two pad.

Why it exists. Every UNet transformer block runs self-attention over the latent tokens (4096 at
512x512) and cross-attention over 77 text keys. SD 1.5 has 8 heads of width 40/80/160; generic
fused kernels round D up to 64/128/256 and so spend 37-60% of their tensor-core work and of their
q/k/v loads on zeros. Here D = D_HEAD + D_TAIL, a power of two plus a power-of-two tail (>= 16,
the tensor-core minimum for 16-bit operands): 80 = 64 + 16, 160 = 128 + 32. Scores are the sum of
two dot products, the output has two accumulators. 40 = 32 + 16 (8 masked) works too, but lost
on H100 to the 64 pad (see SPLIT_MASKED_TAIL), so by default 40 pads like everyone else.

Math. Vaswani et al. 2017, eq. 1: Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d_k)) V.
FlashAttention-2 (Dao 2023, Alg. 1) never forms the Lq x Lkv matrix: per block of queries it keeps
an fp32 running max m and sum l over blocks j of keys, with log2(e) folded into the scale so the
exponentials are exp2. With c = scale · log2(e) > 0, rowmax(s) · c = rowmax(s · c), so the scale
rides in one FMA per score (as in Triton's fused-attention tutorial):
    s_j = q k_jᵀ;  m' = max(m, c · rowmax s_j);  p_j = exp2(c · s_j - m')
    l <- l · exp2(m - m') + rowsum p_j;  acc <- acc · exp2(m - m') + p_j v_j;  m <- m'
    o = acc / l;  lse2 = m + log2 l   (the log2-domain logsumexp, written only for the backward)
m starts at fp32's lowest finite value, not -inf, so a key block whose every score is -inf (a key
of -infs) adds p = 0 and leaves the row finite; a row is NaN only if every key scores -inf, as in
torch. Starting at -inf, exp2(-inf - -inf) made the row NaN whenever one whole block did.
The key loop runs over full BLOCK_N blocks with no key masks; the Lkv % BLOCK_N remainder is one
peeled, masked step, only as wide as it needs (TAIL_N: 16 for the 13 keys of 77 = 64 + 13). Causal
attention (only the 77-token CLIP encoder) masks every block.
Over at most SHORT_KV keys, a second forward (AttentionConfig.q_blocks; not the default until
timed on a GPU) holds the head's keys and values, loaded once per program, while it walks several
query blocks: with every key in hand the softmax is exact in one pass (m = rowmax, no rescaling),
and the loop the compiler pipelines is the one over query blocks, prefetching q.
Backward (Dao 2023, Alg. 2) in Triton, recomputing p = exp2(s · scale · log2(e) - lse2):
    delta = rowsum(dO ∘ O) (torch, fp32);  dV = pᵀ dO;  dP = dO Vᵀ;  dS = p ∘ (dP - delta)
    dK = scale · dSᵀ Q  (one program per key block, looping over query blocks)
    dQ = scale · dS K   (one program per query block, looping over key blocks)
delta is taken from the output as returned, in 16 bits for 16-bit inputs, as FlashAttention-2 and
torch's SDPA take it: its rounding, about sqrt(D)·|dO|·|O|·2^-11, does not cancel in dP - delta.
Where the true dQ and dK are small next to |dO|·|O| (a row's softmax peaked on one of a few keys)
their fp16 error is that rounding's, up to the size of the gradient itself, and equals SDPA's
(tests/test_attention.py); the fp32-math reference, which takes delta from fp32 probabilities,
stays closer there. At SD's shapes it is below the reference's. An fp32 O kept for the backward
would remove it, at 4 more bytes per output element saved under grad.

Cost. Forward 4·B·H·Lq·Lkv·D FLOPs (two matmuls); backward 10·B·H·Lq·Lkv·D useful (14 done, the
scores and dP are recomputed in both backward kernels). Bytes: q, o once, k, v once per query
block (from L2 after the first): ideally 2·B·H·(Lq + Lkv)·D elements plus an fp32 lse per query.
At D = 40 the kernel is compute-bound from a few hundred keys on; at 77 keys it is memory-bound.

Regime where it should win against SDPA: SD head dims 80/160 (no pad waste) and 77-key
cross-attention (at an unsplit head dim, one 64-key block, then the other 13 keys in a masked 16-key block:
80 key columns, not 128; split head dims mask every block, see _attn_fwd_kernel).
For D = 64 / 128 it is a plain FA2 and should roughly match torch's flash backend. At D = 40 the
UNet's (B, L, H, D) layout has head stride 40, not a multiple of 16, so Triton could not prove
16-byte aligned rows and emitted 2-byte loads with no cp.async pipeline. Host-checked alignment
hints (_head_ptr, _row_offsets) make D = 40 compile like D = 64 (16-byte cp.async, 3 stages), for
the batch, head and row strides, so a contiguous (B, H, L, 40) layout and the backward's dO get
them too (`python -m bench.sm90` shows each kernel's loads).
H100 (Triton 3.6, B=2, H=8, 2026-11-23, bench/results/2026-11-23-h100-2, D=40 4096² from -h100-3),
kernel vs the fastest SDPA backend (cuDNN unless noted), fp16 / bf16: D=40 4096² 0.176 vs 0.157 ms
(0.89x; 0.39x before the alignment hints) / 0.89x; 4096x77 1.02x / 1.02x (was 0.25x); D=80 1024x77
1.25x / 1.12x; D=160 256² 1.14x / 1.18x; D=80 1024² 0.91x / 0.93x; D=64 4096² (H=5) 1.01x / 1.04x,
9216² 0.95x / 1.04x.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._autograd import reference_grads
from ._launch import Launcher
from ._triton import next_power_of_2, tl, triton
from .registry import (Backend, LaunchUnsupported, _choice, autocast_dtypes, autocast_inputs, check_floating,
                       counted, define_op, dispatch, fits_int32, max_offset, overlaps, overlaps_itself, refuse,
                       register, same_view, transform_problem, triton_device_problem, warn_launch_fallback)

LOG2E = math.log2(math.e)
_FP32_MAX, _FP32_TINY = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which holds B·H
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configurations for H100 (sm_90: 228 KB shared memory and 132 SMs), the one place to tune.
# Key: the head dim D is <= key (the first such row; D = 40, padded to 64, has a row of its own).
# Value: (BLOCK_M, BLOCK_N, num_warps, num_stages). "fwd" and "dq" stream key blocks of BLOCK_N,
# "dkdv" streams query blocks of BLOCK_M. fp32 inputs have a table of their own (CONFIGS_FP32).
# Picked from fp16 sweeps on H100s (Triton 3.6) at SD 1.5 shapes (`bench tune`, in
# bench/results/2026-11-23-h100*/): BLOCK_M 128 ran D = 40 self-attention 6-10% faster and D = 64 at
# 0.67x the speed, hence the 40 row; at 8 warps it ran 1.03x the 4-warp row at 4096 tokens (batch 1:
# equal) and 1.04x at 9216, in one sweep (2026-11-23-h100-3/tune-attention-d40-lengths.md);
# elsewhere (D 40, 64, 80, 160; self and 77-key cross) the rows were best or within 2%, but for the
# 64-token mid block at D 160 (BLOCK_M 64, 2 stages: 1.08x of a 7.7 us launch-bound call, kept).
# num_stages=1 gave wrong results with a split head dim, so keep stages >= 2. The default for every
# call: sweeps pass an AttentionConfig to attention_triton instead of editing this (read once per
# kernel, head dim and dtype: see _plan). "fwd_short_kv" serves forwards over at most SHORT_KV keys
# (cross-attention to 77 text tokens: memory-bound, one or two key blocks), which a sweep may tune
# apart; its rows are the default ones, as swept. A fifth value there, Q_BLOCKS, would run the
# K/V-resident forward (_attn_fwd_resident_kernel, AttentionConfig.q_blocks) instead, for 16-bit
# inputs (fp32 reads CONFIGS_FP32, whose rows have four values). No row has one until a GPU sweep
# shows it faster (`bench tune` sweeps it at every case over <= SHORT_KV keys). "fwd_long_kv" serves
# forwards over at least LONG_KV keys (SD 1.5 at 768 px: 9216 tokens). Its D 40 row pipelines 4 key
# blocks deep: against the 8-warp 3-stage "fwd" row, 1.05x and 1.06x at 9216 tokens in two sweeps
# (0.854 vs 0.898 ms, 0.845 vs 0.899), but 0.96x at 4096 tokens and 0.95x at batch 1
# (2026-11-23-h100-3/tune-attention-d40-9216.md, -lengths.md). No length between 4096 and 9216 was
# timed: 8192 is where the cut sits, not a measured crossover.
SHORT_KV = 128
LONG_KV = 8192
CONFIGS = {
    "fwd": {32: (64, 64, 4, 3), 40: (128, 64, 8, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 64, 4, 3)},
    "fwd_long_kv": {32: (64, 64, 4, 3), 40: (128, 64, 8, 4), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3),
                    256: (64, 64, 4, 3)},
    "fwd_short_kv": {32: (64, 64, 4, 3), 40: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3),
                     256: (64, 64, 4, 3)},
    "dkdv": {64: (32, 128, 4, 2), 128: (32, 128, 8, 2), 256: (32, 64, 8, 2)},
    "dq": {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (128, 16, 8, 2)},
}
# fp32 inputs (DOT_PRECISION "ieee": FMA dots on CUDA cores, no wgmma) hold the score tile, q and the
# accumulator in fp32 registers, so they get smaller tiles, one table for every forward length. Each
# row is one of the largest candidate tiles that compiled for sm_90 without spills at every head dim
# it covers (40, 64, 80, 128, 160, 256 checked; offline compiles through bench.sm90.capture, Triton
# 3.9, then the chosen rows under 3.6 too). The rule they replace (the 16-bit row with its streamed
# block halved) spilled in the forward at every head dim (80 B at D 64 to 16 KB per thread at D 256),
# and its D 256 dq kernel asked for 296 KB of shared memory, more than an SM has, so it could not
# launch. Correct under the interpreter; not yet timed on a GPU.
CONFIGS_FP32 = {
    "fwd": {128: (64, 32, 8, 2), 256: (32, 32, 8, 2)},
    "dkdv": {128: (16, 64, 8, 2), 256: (16, 32, 8, 2)},
    "dq": {256: (64, 16, 8, 2)},
}
# The backward rows: from the backward sweeps on H100s (`bench tune --ops attention.backward`, one
# kernel varied at a time, fp16 self-attention, bench/results/2026-11-23-h100-3/tune-bwd*.md). For
# head dims <= 64, dq at BLOCK_N 64: D 40 x 4096 tokens, batch 2, 0.651 -> 0.600 ms (batch 1: 0.322 ->
# 0.315). dkdv at 3 stages was 1.07x too, but under Triton 3.6 (the H100's) it compiles to 255
# registers and 8 spilled bytes (tests/test_sm90_compile.py forbids spills), so it stays at 2.
# D 80 x 1024 tokens is host-noisy (p20-p80 spans up to 2x): rows that read 1.6-1.7x faster in the
# first sweep were no faster as the default in the second, so the 128 rows stay; at D 160 nothing
# beat the old rows by more than their spread. Rows at 8 warps hold 134-200 registers without spills in offline sm_90
# compiles (`python -m bench.sm90`), where 4 warps spilled.
# Split off a tail only when it is exact (80 = 64 + 16, 160 = 128 + 32). A masked tail (40 = 32 + 16
# with 8 columns of padding) miscompiled at BLOCK_N = 64 on H100 with Triton 3.6 and ran at a third
# of the padded kernel's speed at BLOCK_N = 32 (16-wide wgmma), so such head dims pad to a power of two.
# That was before the alignment hint (_head_ptr), when D = 40 loads were 2-byte scalars. Since then
# (H100, Triton 3.6, bench/results/2026-11-23-h100-2/tune-attention-d40-split.md) the split is as
# accurate as the pad but no faster at 4096 tokens: 0.179 ms at its best tiles, against 0.177-0.178 for
# the padded kernel's best in the earlier sweep. At 9216 tokens (SD 1.5 at 768 px; one call, both
# sweeps, bench/results/2026-11-23-h100-3/tune-attention-d40-9216*.md) its best tiles ran 0.836 ms,
# the padded kernel's best (128, 64, 8, 4) 0.854 and the then default row (128, 64, 4, 3) 0.921: 2%
# for the split, kept padded (that 4-stage row is now "fwd_long_kv"'s). To retry the split:
# AttentionConfig(split_masked_tail=True), `bench tune --masked-tail`.
SPLIT_MASKED_TAIL = False


@register("attention", Backend.REFERENCE)
def attention_reference(q, k, v, scale=None, causal=False):
    """Plain torch, materialising the (Lq, Lkv) score matrix, as diffusers' ``AttnProcessor``:
    scores from one ``baddbmm`` with ``alpha=scale`` in the input dtype, softmax in fp32 (fp64
    stays fp64). The scale is applied to the GEMM's accumulator before rounding, so a raw q·k
    beyond fp16's 65504 whose scaled score fits does not overflow (it did when the scale came
    after an fp16 matmul). A tensor ``scale`` (one that wants a gradient, or one per head,
    shaped (B|1, H|1, 1, 1)) is applied after, in fp32.

    ``causal``: query i sees keys j <= i (top-left aligned, as SDPA's ``is_causal``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tensor_scale = isinstance(scale, torch.Tensor)
    (b, h, lq, d), lkv = q.shape, k.shape[-2]
    q3, k3 = q.reshape(b * h, lq, d), k.reshape(b * h, lkv, d)
    s = torch.baddbmm(q3.new_empty(b * h, lq, lkv), q3, k3.transpose(1, 2), beta=0,
                      alpha=1 if tensor_scale else scale)
    s = s.view(b, h, lq, lkv).to(torch.promote_types(s.dtype, torch.float32))
    if tensor_scale:
        s = s * scale
    if causal:
        future = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)


def _sdpa_check(q, k=None, v=None, scale=None, causal=False):
    """SDPA takes its scale as a Python float: no gradient for it, and one number."""
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        return "scale is a tensor that requires grad; SDPA takes it as a float (no gradient for it)"
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        return f"scale is a tensor of {scale.numel()} elements; SDPA takes one number"
    return None


@register("attention", Backend.SDPA, check=_sdpa_check)
def attention_sdpa(q, k, v, scale=None, causal=False):
    """torch's fused ``scaled_dot_product_attention`` (it picks flash / mem-efficient / cuDNN / math)."""
    scale = float(scale) if isinstance(scale, torch.Tensor) else scale  # one element (_sdpa_check)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


@triton.jit
def _load_tile(
    ptr,  # base of one (rows, D) matrix
    rows,  # (R,) row indices
    cols,  # (C,) column indices
    stride_r,
    stride_c,
    n_rows,  # rows >= n_rows read as 0 when MASK_ROWS
    HEAD_DIM: tl.constexpr,  # cols >= HEAD_DIM read as 0 when MASK_COLS
    MASK_COLS: tl.constexpr,
    MASK_ROWS: tl.constexpr = True,  # False: every row is known to be < n_rows
    ALIGN: tl.constexpr = 1,  # stride_r is a multiple of ALIGN elements (host-checked; see _head_ptr)
):
    ptrs = ptr + _row_offsets(rows, stride_r, ALIGN)[:, None] + cols[None, :] * stride_c
    if MASK_ROWS:
        mask = rows[:, None] < n_rows
        if MASK_COLS:
            mask = mask & (cols[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(
    ptr,  # base of one (rows, D) matrix
    rows,  # (R,) row indices
    cols,  # (C,) column indices
    stride_r,
    stride_c,
    n_rows,
    value,  # (R, C) fp32, cast to ptr's dtype here
    HEAD_DIM: tl.constexpr,
    MASK_COLS: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # stride_r is a multiple of ALIGN elements (host-checked; see _head_ptr)
):
    mask = rows[:, None] < n_rows
    if MASK_COLS:
        mask = mask & (cols[None, :] < HEAD_DIM)
    tl.store(ptr + _row_offsets(rows, stride_r, ALIGN)[:, None] + cols[None, :] * stride_c,
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_offsets(rows, stride_r, ALIGN: tl.constexpr):
    """rows · stride_r, declared multiples of ALIGN elements (see _head_ptr)."""
    offsets = rows * stride_r
    if ALIGN > 1:
        offsets = tl.multiple_of(offsets, ALIGN)
    return offsets


@triton.jit
def _head_ptr(ptr, b, h, stride_b, stride_h, ALIGN: tl.constexpr):
    """ptr + b·stride_b + h·stride_h, with the offset declared a multiple of ALIGN elements.

    Triton proves 16-byte alignment only from integers divisible by 16. At D = 40 the UNet's
    (B, L, H, D) layout has head stride 40, and a contiguous (B, H, L, D) one row stride 40, so
    without hints every tile load compiles to 2-byte scalar loads with no cp.async pipeline (sm_90
    SASS); with them, to 16-byte cp.async as at D = 64. This hint covers the batch and head strides,
    _row_offsets's the row stride. The host passes ALIGN = 16 bytes' worth of
    elements only after checking the strides (_align); ALIGN = 1 adds no hint (a hint of 1 would
    hide what Triton proved itself). A hint must sit in the function that computes the value: on
    a parameter (of a kernel or of a @triton.jit helper such as this) it is silently lost."""
    offset = b * stride_b + h * stride_h
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return ptr + offset


@triton.jit
def _fwd_heads(q_ptr, k_ptr, v_ptr, o_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
               stride_ob, stride_oh, H, ALIGN: tl.constexpr):
    """A forward program's (b, h) from grid axis 1: pid_bh and that head's bases of q, k, v and o."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return (pid_bh, _head_ptr(q_ptr, b, h, stride_qb, stride_qh, ALIGN),
            _head_ptr(k_ptr, b, h, stride_kb, stride_kh, ALIGN), _head_ptr(v_ptr, b, h, stride_vb, stride_vh, ALIGN),
            _head_ptr(o_ptr, b, h, stride_ob, stride_oh, ALIGN))


@triton.jit
def _tail_cols(D_HEAD: tl.constexpr, D_TAIL: tl.constexpr):
    """The tail's column indices D_HEAD .. D_HEAD + D_TAIL - 1; without a tail, the head's, as a
    placeholder the caller never uses."""
    if D_TAIL > 0:
        cols = D_HEAD + tl.arange(0, D_TAIL)
    else:
        cols = tl.arange(0, D_HEAD)
    return cols


@triton.jit
def _load_split(ptr, rows, cols_h, cols_t, stride_r, stride_c, n_rows, HEAD_DIM: tl.constexpr, D_TAIL: tl.constexpr,
                MASK_H: tl.constexpr, MASK_T: tl.constexpr, ALIGN: tl.constexpr):
    """A (rows, D) tile as its head columns and its tail columns; without a tail (D_TAIL = 0) the
    head tile twice, a placeholder the caller never uses."""
    head = _load_tile(ptr, rows, cols_h, stride_r, stride_c, n_rows, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    if D_TAIL > 0:
        tail = _load_tile(ptr, rows, cols_t, stride_r, stride_c, n_rows, HEAD_DIM, MASK_T, ALIGN=ALIGN)
    else:
        tail = head
    return head, tail


@triton.jit
def _fwd_store(o_ptr, lse_ptr, rows_m, cols_h, cols_t, acc_h, acc_t, m_i, l_i, stride_om, stride_od, LQ, pid_bh,
               HEAD_DIM: tl.constexpr, D_TAIL: tl.constexpr, MASK_H: tl.constexpr, MASK_T: tl.constexpr,
               STORE_LSE: tl.constexpr, ALIGN: tl.constexpr):
    """o = acc / l over the head and tail columns and, for the backward, lse2 = m + log2 l."""
    l_inv = 1.0 / l_i
    _store_tile(o_ptr, rows_m, cols_h, stride_om, stride_od, LQ, acc_h * l_inv[:, None], HEAD_DIM, MASK_H,
                ALIGN=ALIGN)
    if D_TAIL > 0:
        _store_tile(o_ptr, rows_m, cols_t, stride_om, stride_od, LQ, acc_t * l_inv[:, None], HEAD_DIM, MASK_T,
                    ALIGN=ALIGN)
    if STORE_LSE:
        tl.store(lse_ptr + pid_bh * LQ + rows_m, m_i + tl.log2(l_i), mask=rows_m < LQ)


@triton.jit
def _attn_fwd_step(
    acc_h,  # (BLOCK_M, D_HEAD) fp32 running output, columns [0, D_HEAD)
    acc_t,  # (BLOCK_M, D_TAIL) fp32 running output of the tail; a placeholder passed through if no tail
    m_i,  # (BLOCK_M,) fp32 running max of the scores · qk_scale
    l_i,  # (BLOCK_M,) fp32 running sum of exp2(scores · qk_scale - m_i)
    q_h,  # (BLOCK_M, D_HEAD) queries
    q_t,  # (BLOCK_M, D_TAIL) queries' tail (placeholder if no tail)
    k_ptr,  # this (b, h)'s (Lkv, D) keys
    v_ptr,  # this (b, h)'s (Lkv, D) values
    start_n,  # first key of the block
    rows_m,  # (BLOCK_M,) query indices, for the causal mask
    offs_n,  # (BLOCK_N,) 0 .. BLOCK_N - 1
    cols_h,  # (D_HEAD,) head column indices
    cols_t,  # (D_TAIL,) tail column indices (placeholder if no tail)
    stride_kn, stride_kd, stride_vn, stride_vd,
    LKV,  # keys
    qk_scale,  # scale · log2(e), > 0
    HEAD_DIM: tl.constexpr,
    D_TAIL: tl.constexpr,
    MASK_H: tl.constexpr,  # padded columns in the head part
    MASK_T: tl.constexpr,  # padded columns in the tail
    DOT_PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # the block may run past LKV: mask K/V rows and their scores
    CAUSAL: tl.constexpr,
    ALIGN: tl.constexpr,  # row strides are multiples of this (host-checked)
):
    """One FA2 step (Dao 2023, Alg. 1, lines 8-10) over keys [start_n, start_n + BLOCK_N)."""
    rows_n = start_n + offs_n
    k_h = _load_tile(k_ptr, rows_n, cols_h, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_H, MASK_KEYS, ALIGN=ALIGN)
    s = tl.dot(q_h, tl.trans(k_h), input_precision=DOT_PRECISION)
    if D_TAIL > 0:
        k_t = _load_tile(k_ptr, rows_n, cols_t, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_T, MASK_KEYS, ALIGN=ALIGN)
        s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
    if MASK_KEYS:
        s = tl.where(rows_n[None, :] < LKV, s, float("-inf"))
    if CAUSAL:
        s = tl.where(rows_n[None, :] <= rows_m[:, None], s, float("-inf"))
    # qk_scale > 0, so rowmax(s) · c = rowmax(s · c): the scale rides in one FMA per score
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = fp32's lowest) unless it is all -inf
    l_i = l_i * alpha + tl.sum(p, 1)
    v_h = _load_tile(v_ptr, rows_n, cols_h, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_H, MASK_KEYS, ALIGN=ALIGN)
    acc_h = tl.dot(p.to(v_h.dtype), v_h, acc_h * alpha[:, None], input_precision=DOT_PRECISION)
    if D_TAIL > 0:
        v_t = _load_tile(v_ptr, rows_n, cols_t, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_T, MASK_KEYS, ALIGN=ALIGN)
        acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t * alpha[:, None], input_precision=DOT_PRECISION)
    return acc_h, acc_t, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, H, Lq, D), any strides
    k_ptr,  # (B, H, Lkv, D), any strides
    v_ptr,  # (B, H, Lkv, D), any strides
    o_ptr,  # (B, H, Lq, D), any strides; written
    lse_ptr,  # (B, H, Lq) fp32 contiguous: log2-domain logsumexp of the scaled scores; None unless STORE_LSE
    stride_qb, stride_qh, stride_qm, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_ob, stride_oh, stride_om, stride_od,  # o strides
    H,  # heads
    LQ,  # queries
    LKV,  # keys
    qk_scale,  # scale · log2(e), > 0
    HEAD_DIM: tl.constexpr,  # D
    D_HEAD: tl.constexpr,  # power-of-two width of the first D columns (>= 16)
    D_TAIL: tl.constexpr,  # power-of-two width (>= 16) covering D - D_HEAD, or 0
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    TAIL_N: tl.constexpr,  # keys in the peeled last block: LKV % BLOCK_N padded (tail_block), 0 if none;
    # a split head dim (D_TAIL > 0) peels nothing and reads only whether TAIL_N > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); ignored for 16-bit inputs
    CAUSAL: tl.constexpr,  # query i sees keys j <= i (the CLIP text encoder)
    STORE_LSE: tl.constexpr,  # write lse for the backward (autograd); inference skips it
    ALIGN: tl.constexpr,  # batch, head and row strides of every tensor are multiples of this (host-checked)
):
    pid_m = tl.program_id(0)
    pid_bh, q_ptr, k_ptr, v_ptr, o_ptr = _fwd_heads(q_ptr, k_ptr, v_ptr, o_ptr, stride_qb, stride_qh, stride_kb,
                                                    stride_kh, stride_vb, stride_vh, stride_ob, stride_oh, H, ALIGN)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols_h = tl.arange(0, D_HEAD)
    cols_t = _tail_cols(D_HEAD, D_TAIL)
    MASK_H: tl.constexpr = D_HEAD > HEAD_DIM  # padded columns in the head part (D < 16)
    MASK_T: tl.constexpr = D_HEAD + D_TAIL > HEAD_DIM  # padded columns in the tail (40 = 32 + 16)
    MASK_N: tl.constexpr = TAIL_N > 0  # LKV % BLOCK_N != 0

    q_h, q_t = _load_split(q_ptr, rows_m, cols_h, cols_t, stride_qm, stride_qd, LQ, HEAD_DIM, D_TAIL, MASK_H, MASK_T,
                           ALIGN)
    acc_h = tl.zeros((BLOCK_M, D_HEAD), dtype=tl.float32)
    if D_TAIL > 0:
        acc_t = tl.zeros((BLOCK_M, D_TAIL), dtype=tl.float32)
    else:  # a placeholder the step passes through untouched (dead code once compiled)
        acc_t = acc_h
    # fp32's lowest, not -inf: a block of keys all scoring -inf adds p = 0, not NaN (module docstring)
    m_i = tl.full((BLOCK_M,), -3.4028234663852886e38, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if CAUSAL or D_TAIL > 0:  # every block masked where needed, no peeled last block
        # causal: key blocks wholly after this query block are skipped. A split head dim does not
        # peel: on the H100 (Triton 3.6) the peeled block after a split-head loop read out-of-range
        # shared memory when the loop ran zero times, e.g. 33 keys at BLOCK_N = 64 (compute-sanitizer,
        # 2026-11-23)
        hi = LKV
        if CAUSAL:
            hi = tl.minimum(LKV, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            acc_h, acc_t, m_i, l_i = _attn_fwd_step(
                acc_h, acc_t, m_i, l_i, q_h, q_t, k_ptr, v_ptr, start_n, rows_m, offs_n, cols_h, cols_t,
                stride_kn, stride_kd, stride_vn, stride_vd, LKV, qk_scale,
                HEAD_DIM, D_TAIL, MASK_H, MASK_T, DOT_PRECISION, MASK_N, CAUSAL, ALIGN)
    else:  # full key blocks without masks, then the LKV % BLOCK_N remainder peeled off
        n_full = LKV // BLOCK_N * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc_h, acc_t, m_i, l_i = _attn_fwd_step(
                acc_h, acc_t, m_i, l_i, q_h, q_t, k_ptr, v_ptr, start_n, rows_m, offs_n, cols_h, cols_t,
                stride_kn, stride_kd, stride_vn, stride_vd, LKV, qk_scale,
                HEAD_DIM, D_TAIL, MASK_H, MASK_T, DOT_PRECISION, False, False, ALIGN)
        if MASK_N:  # a block of TAIL_N <= BLOCK_N keys: 77 = 64 + 13 runs 64 + 16 columns, not 128
            acc_h, acc_t, m_i, l_i = _attn_fwd_step(
                acc_h, acc_t, m_i, l_i, q_h, q_t, k_ptr, v_ptr, n_full, rows_m, tl.arange(0, TAIL_N), cols_h, cols_t,
                stride_kn, stride_kd, stride_vn, stride_vd, LKV, qk_scale,
                HEAD_DIM, D_TAIL, MASK_H, MASK_T, DOT_PRECISION, True, False, ALIGN)

    _fwd_store(o_ptr, lse_ptr, rows_m, cols_h, cols_t, acc_h, acc_t, m_i, l_i, stride_om, stride_od, LQ, pid_bh,
               HEAD_DIM, D_TAIL, MASK_H, MASK_T, STORE_LSE, ALIGN)


@triton.jit
def _load_kv(k_ptr, v_ptr, rows, cols_h, cols_t, stride_kn, stride_kd, stride_vn, stride_vd, LKV,
             HEAD_DIM: tl.constexpr, D_TAIL: tl.constexpr, MASK_H: tl.constexpr, MASK_T: tl.constexpr,
             ALIGN: tl.constexpr):
    """One resident key block: k and v rows ``rows``, each as head and tail columns (_load_split)."""
    k_h, k_t = _load_split(k_ptr, rows, cols_h, cols_t, stride_kn, stride_kd, LKV, HEAD_DIM, D_TAIL, MASK_H, MASK_T,
                           ALIGN)
    v_h, v_t = _load_split(v_ptr, rows, cols_h, cols_t, stride_vn, stride_vd, LKV, HEAD_DIM, D_TAIL, MASK_H, MASK_T,
                           ALIGN)
    return k_h, k_t, v_h, v_t


@triton.jit
def _resident_scores(q_h, q_t, k_h, k_t, rows_n, rows_m, LKV, D_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr):
    """q kᵀ over one resident key block (rows_n); keys past LKV (MASK_KEYS: the block has such
    rows) and, causal, keys after the query at -inf."""
    s = tl.dot(q_h, tl.trans(k_h), input_precision=DOT_PRECISION)
    if D_TAIL > 0:
        s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
    if MASK_KEYS:
        s = tl.where(rows_n[None, :] < LKV, s, float("-inf"))
    if CAUSAL:
        s = tl.where(rows_n[None, :] <= rows_m[:, None], s, float("-inf"))
    return s


@triton.jit
def _resident_block(s, m_i, l_i, acc_h, acc_t, v_h, v_t, qk_scale, D_TAIL: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One resident key block's share of the exact softmax, m_i being the row max over every block:
    p = exp2(s · c - m), added to l = Σ p and to acc = Σ p v (head and tail columns)."""
    p = tl.exp2(s * qk_scale - m_i[:, None])
    l_i += tl.sum(p, 1)
    acc_h = tl.dot(p.to(v_h.dtype), v_h, acc_h, input_precision=DOT_PRECISION)
    if D_TAIL > 0:
        acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t, input_precision=DOT_PRECISION)
    return l_i, acc_h, acc_t


@triton.jit
def _attn_fwd_resident_kernel(
    q_ptr,  # (B, H, Lq, D), any strides
    k_ptr,  # (B, H, Lkv, D), any strides
    v_ptr,  # (B, H, Lkv, D), any strides
    o_ptr,  # (B, H, Lq, D), any strides; written
    lse_ptr,  # (B, H, Lq) fp32 contiguous; None unless STORE_LSE
    stride_qb, stride_qh, stride_qm, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_ob, stride_oh, stride_om, stride_od,  # o strides
    H,  # heads
    LQ,  # queries
    LKV,  # keys, <= KV_HEAD + KV_TAIL
    qk_scale,  # scale · log2(e), > 0
    Q_BLOCKS,  # query blocks each program walks (at most as many as there are)
    HEAD_DIM: tl.constexpr,  # D
    D_HEAD: tl.constexpr,  # power-of-two width of the first D columns (>= 16)
    D_TAIL: tl.constexpr,  # power-of-two width (>= 16) covering D - D_HEAD, or 0
    BLOCK_M: tl.constexpr,  # queries per loop step
    KV_HEAD: tl.constexpr,  # keys of the first resident block: a power of two >= 16 (split_keys)
    KV_TAIL: tl.constexpr,  # keys of the second, a power of two >= 16, or 0
    MASK_KV_HEAD: tl.constexpr,  # LKV < KV_HEAD: the first block has rows past the last key (LKV < 16)
    MASK_KV_TAIL: tl.constexpr,  # LKV < KV_HEAD + KV_TAIL: the second block does (77 = 64 + 13 in 64 + 16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); ignored for 16-bit inputs
    CAUSAL: tl.constexpr,  # query i sees keys j <= i (the CLIP text encoder)
    STORE_LSE: tl.constexpr,  # write lse for the backward (autograd); inference skips it
    ALIGN: tl.constexpr,  # batch, head and row strides of every tensor are multiples of this (host-checked)
):
    """The forward over few keys (cross-attention to 77 text tokens): every key and value of the
    head is loaded once per program and held, in two blocks (77 = 64 + 13 as 64 + 16 rows), while
    the program walks Q_BLOCKS blocks of queries. With every key in hand the softmax is exact in
    one step (no running max to rescale), and the loop over query blocks is what the compiler
    pipelines (num_stages): the next blocks' queries load while this one computes. The op is
    memory-bound (q in, o out; k and v are a few KB), which is where that prefetch should pay."""
    pid_s = tl.program_id(0)
    pid_bh, q_ptr, k_ptr, v_ptr, o_ptr = _fwd_heads(q_ptr, k_ptr, v_ptr, o_ptr, stride_qb, stride_qh, stride_kb,
                                                    stride_kh, stride_vb, stride_vh, stride_ob, stride_oh, H, ALIGN)
    offs_m = tl.arange(0, BLOCK_M)
    cols_h = tl.arange(0, D_HEAD)
    cols_t = _tail_cols(D_HEAD, D_TAIL)
    MASK_H: tl.constexpr = D_HEAD > HEAD_DIM
    MASK_T: tl.constexpr = D_HEAD + D_TAIL > HEAD_DIM
    rows_a = tl.arange(0, KV_HEAD)
    k_ah, k_at, v_ah, v_at = _load_kv(k_ptr, v_ptr, rows_a, cols_h, cols_t, stride_kn, stride_kd, stride_vn,
                                      stride_vd, LKV, HEAD_DIM, D_TAIL, MASK_H, MASK_T, ALIGN)
    if KV_TAIL > 0:
        rows_b = KV_HEAD + tl.arange(0, KV_TAIL)
        k_bh, k_bt, v_bh, v_bt = _load_kv(k_ptr, v_ptr, rows_b, cols_h, cols_t, stride_kn, stride_kd, stride_vn,
                                          stride_vd, LKV, HEAD_DIM, D_TAIL, MASK_H, MASK_T, ALIGN)
    else:  # placeholders (dead code once compiled)
        rows_b, k_bh, k_bt, v_bh, v_bt = rows_a, k_ah, k_at, v_ah, v_at

    start = pid_s * Q_BLOCKS * BLOCK_M  # < LQ + BLOCK_M: the host clamps Q_BLOCKS to the blocks there are
    for start_m in range(start, tl.minimum(LQ, start + Q_BLOCKS * BLOCK_M), BLOCK_M):
        rows_m = start_m + offs_m
        q_h, q_t = _load_split(q_ptr, rows_m, cols_h, cols_t, stride_qm, stride_qd, LQ, HEAD_DIM, D_TAIL, MASK_H,
                               MASK_T, ALIGN)
        s_a = _resident_scores(q_h, q_t, k_ah, k_at, rows_a, rows_m, LKV, D_TAIL, DOT_PRECISION, MASK_KV_HEAD, CAUSAL)
        m_i = tl.max(s_a, 1)
        if KV_TAIL > 0:
            s_b = _resident_scores(q_h, q_t, k_bh, k_bt, rows_b, rows_m, LKV, D_TAIL, DOT_PRECISION, MASK_KV_TAIL,
                                   CAUSAL)
            m_i = tl.maximum(m_i, tl.max(s_b, 1))
        m_i = m_i * qk_scale  # qk_scale > 0: rowmax(s) · c = rowmax(s · c); key 0 is never masked, so finite
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_h = tl.zeros((BLOCK_M, D_HEAD), dtype=tl.float32)
        if D_TAIL > 0:
            acc_t = tl.zeros((BLOCK_M, D_TAIL), dtype=tl.float32)
        else:  # a placeholder, passed through untouched
            acc_t = acc_h
        l_i, acc_h, acc_t = _resident_block(s_a, m_i, l_i, acc_h, acc_t, v_ah, v_at, qk_scale, D_TAIL, DOT_PRECISION)
        if KV_TAIL > 0:
            l_i, acc_h, acc_t = _resident_block(s_b, m_i, l_i, acc_h, acc_t, v_bh, v_bt, qk_scale, D_TAIL,
                                                DOT_PRECISION)
        _fwd_store(o_ptr, lse_ptr, rows_m, cols_h, cols_t, acc_h, acc_t, m_i, l_i, stride_om, stride_od, LQ, pid_bh,
                   HEAD_DIM, D_TAIL, MASK_H, MASK_T, STORE_LSE, ALIGN)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, H, Lq, D), any strides
    k_ptr,  # (B, H, Lkv, D), any strides
    v_ptr,  # (B, H, Lkv, D), any strides
    do_ptr,  # (B, H, Lq, D), any strides: upstream gradient dL/do
    dk_ptr,  # (B, H, Lkv, D), any strides; written
    dv_ptr,  # (B, H, Lkv, D), any strides; written
    lse_ptr,  # (B, H, Lq) fp32 contiguous, from the forward
    delta_ptr,  # (B, H, Lq) fp32 contiguous, rowsum(dO ∘ O)
    stride_qb, stride_qh, stride_qm, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_dob, stride_doh, stride_dom, stride_dod,  # do strides
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # dk strides
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # dv strides
    H,  # heads
    LQ,  # queries
    LKV,  # keys
    qk_scale,  # scale · log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,  # D
    D_HEAD: tl.constexpr,  # power-of-two width of the first D columns (>= 16)
    D_TAIL: tl.constexpr,  # power-of-two width (>= 16) covering D - D_HEAD, or 0
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); ignored for 16-bit inputs
    CAUSAL: tl.constexpr,  # query i sees keys j <= i
    ALIGN: tl.constexpr,  # batch, head and row strides of every tensor are multiples of this (host-checked)
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_ptr = _head_ptr(q_ptr, b, h, stride_qb, stride_qh, ALIGN)
    k_ptr = _head_ptr(k_ptr, b, h, stride_kb, stride_kh, ALIGN)
    v_ptr = _head_ptr(v_ptr, b, h, stride_vb, stride_vh, ALIGN)
    do_ptr = _head_ptr(do_ptr, b, h, stride_dob, stride_doh, ALIGN)
    dk_ptr = _head_ptr(dk_ptr, b, h, stride_dkb, stride_dkh, ALIGN)
    dv_ptr = _head_ptr(dv_ptr, b, h, stride_dvb, stride_dvh, ALIGN)
    lse_ptr += pid_bh * LQ
    delta_ptr += pid_bh * LQ
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols_h = tl.arange(0, D_HEAD)
    MASK_H: tl.constexpr = D_HEAD > HEAD_DIM
    MASK_T: tl.constexpr = D_HEAD + D_TAIL > HEAD_DIM

    k_h = _load_tile(k_ptr, rows_n, cols_h, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    v_h = _load_tile(v_ptr, rows_n, cols_h, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    dk_h = tl.zeros((BLOCK_N, D_HEAD), dtype=tl.float32)
    dv_h = tl.zeros((BLOCK_N, D_HEAD), dtype=tl.float32)
    if D_TAIL > 0:
        cols_t = D_HEAD + tl.arange(0, D_TAIL)
        k_t = _load_tile(k_ptr, rows_n, cols_t, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_T, ALIGN=ALIGN)
        v_t = _load_tile(v_ptr, rows_n, cols_t, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_T, ALIGN=ALIGN)
        dk_t = tl.zeros((BLOCK_N, D_TAIL), dtype=tl.float32)
        dv_t = tl.zeros((BLOCK_N, D_TAIL), dtype=tl.float32)

    for start_m in range(0, LQ, BLOCK_M):
        rows_m = start_m + offs_m
        q_h = _load_tile(q_ptr, rows_m, cols_h, stride_qm, stride_qd, LQ, HEAD_DIM, MASK_H, ALIGN=ALIGN)
        do_h = _load_tile(do_ptr, rows_m, cols_h, stride_dom, stride_dod, LQ, HEAD_DIM, MASK_H, ALIGN=ALIGN)
        s_t = tl.dot(k_h, tl.trans(q_h), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = sᵀ
        dp_t = tl.dot(v_h, tl.trans(do_h), input_precision=DOT_PRECISION)  # dPᵀ
        if D_TAIL > 0:
            q_t = _load_tile(q_ptr, rows_m, cols_t, stride_qm, stride_qd, LQ, HEAD_DIM, MASK_T, ALIGN=ALIGN)
            do_t = _load_tile(do_ptr, rows_m, cols_t, stride_dom, stride_dod, LQ, HEAD_DIM, MASK_T, ALIGN=ALIGN)
            s_t = tl.dot(k_t, tl.trans(q_t), s_t, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v_t, tl.trans(do_t), dp_t, input_precision=DOT_PRECISION)
        # padded queries: lse = +inf makes their p exactly 0 (and do = 0 makes their dP 0)
        lse = tl.load(lse_ptr + rows_m, mask=rows_m < LQ, other=float("inf"))
        delta = tl.load(delta_ptr + rows_m, mask=rows_m < LQ, other=0.0)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if CAUSAL:
            p_t = tl.where(rows_n[:, None] <= rows_m[None, :], p_t, 0.0)
        # dS is cast to 16 bits before the softmax scale is applied (at the end, to dK): scaled first,
        # as torch's math path does, it falls into fp16's subnormal range at thousands of keys
        ds_t = p_t * (dp_t - delta[None, :])
        dv_h = tl.dot(p_t.to(do_h.dtype), do_h, dv_h, input_precision=DOT_PRECISION)
        dk_h = tl.dot(ds_t.to(q_h.dtype), q_h, dk_h, input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            dv_t = tl.dot(p_t.to(do_t.dtype), do_t, dv_t, input_precision=DOT_PRECISION)
            dk_t = tl.dot(ds_t.to(q_t.dtype), q_t, dk_t, input_precision=DOT_PRECISION)

    _store_tile(dk_ptr, rows_n, cols_h, stride_dkn, stride_dkd, LKV, dk_h * scale, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    _store_tile(dv_ptr, rows_n, cols_h, stride_dvn, stride_dvd, LKV, dv_h, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    if D_TAIL > 0:
        _store_tile(dk_ptr, rows_n, cols_t, stride_dkn, stride_dkd, LKV, dk_t * scale, HEAD_DIM, MASK_T, ALIGN=ALIGN)
        _store_tile(dv_ptr, rows_n, cols_t, stride_dvn, stride_dvd, LKV, dv_t, HEAD_DIM, MASK_T, ALIGN=ALIGN)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, H, Lq, D), any strides
    k_ptr,  # (B, H, Lkv, D), any strides
    v_ptr,  # (B, H, Lkv, D), any strides
    do_ptr,  # (B, H, Lq, D), any strides: upstream gradient dL/do
    dq_ptr,  # (B, H, Lq, D), any strides; written
    lse_ptr,  # (B, H, Lq) fp32 contiguous, from the forward
    delta_ptr,  # (B, H, Lq) fp32 contiguous, rowsum(dO ∘ O)
    stride_qb, stride_qh, stride_qm, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_dob, stride_doh, stride_dom, stride_dod,  # do strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # dq strides
    H,  # heads
    LQ,  # queries
    LKV,  # keys
    qk_scale,  # scale · log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,  # D
    D_HEAD: tl.constexpr,  # power-of-two width of the first D columns (>= 16)
    D_TAIL: tl.constexpr,  # power-of-two width (>= 16) covering D - D_HEAD, or 0
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    MASK_N: tl.constexpr,  # LKV % BLOCK_N != 0: the last key block has padding
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); ignored for 16-bit inputs
    CAUSAL: tl.constexpr,  # query i sees keys j <= i (the CLIP text encoder)
    ALIGN: tl.constexpr,  # batch, head and row strides of every tensor are multiples of this (host-checked)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_ptr = _head_ptr(q_ptr, b, h, stride_qb, stride_qh, ALIGN)
    k_ptr = _head_ptr(k_ptr, b, h, stride_kb, stride_kh, ALIGN)
    v_ptr = _head_ptr(v_ptr, b, h, stride_vb, stride_vh, ALIGN)
    do_ptr = _head_ptr(do_ptr, b, h, stride_dob, stride_doh, ALIGN)
    dq_ptr = _head_ptr(dq_ptr, b, h, stride_dqb, stride_dqh, ALIGN)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols_h = tl.arange(0, D_HEAD)
    MASK_H: tl.constexpr = D_HEAD > HEAD_DIM
    MASK_T: tl.constexpr = D_HEAD + D_TAIL > HEAD_DIM

    q_h = _load_tile(q_ptr, rows_m, cols_h, stride_qm, stride_qd, LQ, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    do_h = _load_tile(do_ptr, rows_m, cols_h, stride_dom, stride_dod, LQ, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    dq_h = tl.zeros((BLOCK_M, D_HEAD), dtype=tl.float32)
    if D_TAIL > 0:
        cols_t = D_HEAD + tl.arange(0, D_TAIL)
        q_t = _load_tile(q_ptr, rows_m, cols_t, stride_qm, stride_qd, LQ, HEAD_DIM, MASK_T, ALIGN=ALIGN)
        do_t = _load_tile(do_ptr, rows_m, cols_t, stride_dom, stride_dod, LQ, HEAD_DIM, MASK_T, ALIGN=ALIGN)
        dq_t = tl.zeros((BLOCK_M, D_TAIL), dtype=tl.float32)
    lse = tl.load(lse_ptr + pid_bh * LQ + rows_m, mask=rows_m < LQ, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * LQ + rows_m, mask=rows_m < LQ, other=0.0)

    for start_n in range(0, LKV, BLOCK_N):
        rows_n = start_n + offs_n
        k_h = _load_tile(k_ptr, rows_n, cols_h, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_H, ALIGN=ALIGN)
        v_h = _load_tile(v_ptr, rows_n, cols_h, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_H, ALIGN=ALIGN)
        s = tl.dot(q_h, tl.trans(k_h), input_precision=DOT_PRECISION)
        dp = tl.dot(do_h, tl.trans(v_h), input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            k_t = _load_tile(k_ptr, rows_n, cols_t, stride_kn, stride_kd, LKV, HEAD_DIM, MASK_T, ALIGN=ALIGN)
            v_t = _load_tile(v_ptr, rows_n, cols_t, stride_vn, stride_vd, LKV, HEAD_DIM, MASK_T, ALIGN=ALIGN)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK_N:
            p = tl.where(rows_n[None, :] < LKV, p, 0.0)
        if CAUSAL:
            p = tl.where(rows_n[None, :] <= rows_m[:, None], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq_h = tl.dot(ds.to(k_h.dtype), k_h, dq_h, input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            dq_t = tl.dot(ds.to(k_t.dtype), k_t, dq_t, input_precision=DOT_PRECISION)

    _store_tile(dq_ptr, rows_m, cols_h, stride_dqm, stride_dqd, LQ, dq_h * scale, HEAD_DIM, MASK_H, ALIGN=ALIGN)
    if D_TAIL > 0:
        _store_tile(dq_ptr, rows_m, cols_t, stride_dqm, stride_dqd, LQ, dq_t * scale, HEAD_DIM, MASK_T, ALIGN=ALIGN)


# Launches that skip Triton's per-call dispatch once a launch key has been through it (kernels/_launch.py)
_FWD, _DKDV, _DQ = Launcher(_attn_fwd_kernel), Launcher(_attn_bwd_dkdv_kernel), Launcher(_attn_bwd_dq_kernel)
_FWD_RESIDENT = Launcher(_attn_fwd_resident_kernel)


def tail_block(lkv: int, block_n: int) -> int:
    """The forward's peeled last key block: the LKV % BLOCK_N remaining keys padded to a power of two
    >= 16 (tl.dot's smallest tile), at most BLOCK_N; 0 when BLOCK_N divides LKV. A narrow block pays
    for 3 padded keys at 77 = 64 + 13, where a full one would pay for 51."""
    rest = lkv % block_n
    return min(block_n, max(16, next_power_of_2(rest))) if rest else 0


def split_keys(lkv: int) -> tuple[int, int]:
    """Lkv -> (KV_HEAD, KV_TAIL), the K/V-resident forward's two key blocks: a power of two plus a
    power-of-two tail, each >= 16 (0 = no tail), split as head dims are: 77 -> (64, 16), 64 -> (64, 0),
    100 -> (64, 64), 8 -> (16, 0)."""
    return split_head_dim(lkv, masked_tail=True)


def split_head_dim(d: int, masked_tail: bool | None = None) -> tuple[int, int]:
    """D -> (D_HEAD, D_TAIL): a power of two plus a power-of-two tail, each >= 16 (0 = no tail).

    80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0), 8 -> (16, 0); 40 -> (64, 0), or (32, 16) when
    ``masked_tail`` (None: :data:`SPLIT_MASKED_TAIL`).
    """
    masked_tail = SPLIT_MASKED_TAIL if masked_tail is None else masked_tail
    head = max(16, 1 << (d.bit_length() - 1))
    rest = d - head
    if rest <= 0:
        return head, 0
    tail = max(16, next_power_of_2(rest))
    return (head, tail) if tail == rest or masked_tail else (2 * head, 0)


def _config(kind: str, d: int, element_size: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, Q_BLOCKS]) from :data:`CONFIGS` for head dim ``d``,
    or for fp32 from :data:`CONFIGS_FP32` (whose "fwd" serves every forward length)."""
    table = CONFIGS_FP32["fwd" if kind.startswith("fwd") else kind] if element_size == 4 else CONFIGS[kind]
    row = next(c for w, c in sorted(table.items()) if d <= w)
    if len(row) != 4 and not (len(row) == 5 and kind == "fwd_short_kv" and element_size == 2):
        raise ValueError(f"attention launch table row {row} for {kind!r}, head dim {d}: rows are (BLOCK_M, BLOCK_N, "
                         "num_warps, num_stages); only CONFIGS['fwd_short_kv'] rows may add Q_BLOCKS")
    return row


_PLANS: dict[tuple, tuple] = {}  # _plan() memo; clear it after editing CONFIGS at run time


def _plan(kind: str, d: int, dtype: torch.dtype) -> tuple:
    """(D_HEAD, D_TAIL, DOT_PRECISION, BLOCK_M, BLOCK_N, num_warps, num_stages[, Q_BLOCKS]) of one kernel,
    memoised so a launch pays a dict lookup, not the table sort. Keyed on :data:`SPLIT_MASKED_TAIL`
    too, so flipping it takes effect."""
    key = (kind, d, dtype, SPLIT_MASKED_TAIL)
    plan = _PLANS.get(key)
    if plan is None:
        d_head, d_tail = split_head_dim(d)
        precision = "ieee" if dtype == torch.float32 else "tf32"
        plan = _PLANS[key] = (d_head, d_tail, precision, *_config(kind, d, dtype.itemsize))
    return plan


@dataclass(frozen=True)
class AttentionConfig:
    """One kernel's launch parameters for one call in place of its :data:`CONFIGS` row (which
    stays the default), used as given, fp32 too. ``attention_triton(config=c)`` sets the
    forward's; ``config={"fwd": c1, "dkdv": c2, "dq": c3}`` (any subset) sets each kernel's, and
    a kernel left out keeps the table. For "dkdv", block_m is the query block streamed past a
    program's block_n keys. num_stages=1 is accepted but gave wrong results on H100 (Triton 3.6)
    with a split head dim (80, 160), and block_n=128 at 3 stages faulted there at 160.
    ``split_masked_tail`` overrides :data:`SPLIT_MASKED_TAIL` for that kernel (40 = 32 + 16
    instead of the 64 pad); it crashed on H100 with Triton 3.6 before the alignment hint, so time
    it apart. ``q_blocks`` (forward only, at most :data:`SHORT_KV` keys) runs the K/V-resident
    forward instead (_attn_fwd_resident_kernel): each program loads every key once and walks
    q_blocks query blocks of block_m, num_stages pipelining that walk; block_n plays no part there
    (the keys are split by :func:`split_keys`). Correct under the interpreter and compiled for
    sm_90 offline; not yet timed on a GPU, so no table row uses it."""

    block_m: int  # queries per program (BLOCK_M); per loop step of the K/V-resident forward
    block_n: int  # keys per loop step (BLOCK_N)
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop (of the query loop, K/V-resident)
    split_masked_tail: bool | None = None  # None: SPLIT_MASKED_TAIL
    q_blocks: int | None = None  # None: the streaming kernels; n >= 1: the K/V-resident forward

    def __post_init__(self):
        def pow2(x):  # a bool is an int, but not a tile size
            return type(x) is int and x > 0 and x & (x - 1) == 0

        tile = "a power of two >= 16 (tl.dot's smallest tile)"
        for name, ok, rule in (
            ("block_m", pow2(self.block_m) and self.block_m >= 16, tile),
            ("block_n", pow2(self.block_n) and self.block_n >= 16, tile),
            ("num_warps", pow2(self.num_warps) and self.num_warps <= 16, "a power of two in 1..16"),
            ("num_stages", type(self.num_stages) is int and self.num_stages >= 1, "an int >= 1"),
            ("split_masked_tail", self.split_masked_tail is None or type(self.split_masked_tail) is bool,
             "None, True or False"),
            ("q_blocks", self.q_blocks is None or (type(self.q_blocks) is int and self.q_blocks >= 1),
             "None or an int >= 1"),
        ):
            if not ok:
                raise ValueError(f"AttentionConfig.{name} = {getattr(self, name)!r}: must be {rule}")


KERNELS = ("fwd", "dkdv", "dq")  # the keys of a per-kernel config= mapping


def _launch(kind: str, d: int, dtype: torch.dtype, config: AttentionConfig | None) -> tuple:
    """(D_HEAD, D_TAIL, DOT_PRECISION, BLOCK_M, BLOCK_N, num_warps, num_stages, Q_BLOCKS) of one
    launch: the table's plan, with ``config``'s tiles (and head split, if it names one) in its
    place. Q_BLOCKS is None but for a K/V-resident forward."""
    plan = _plan(kind, d, dtype)
    if config is None:
        return (*plan, None)[:8]
    d_head, d_tail = plan[:2] if config.split_masked_tail is None else split_head_dim(d, config.split_masked_tail)
    return (d_head, d_tail, plan[2], config.block_m, config.block_n, config.num_warps, config.num_stages,
            config.q_blocks)


def _per_kernel(config) -> dict:
    """``config=`` as {kernel: AttentionConfig}: a bare AttentionConfig is the forward's."""
    if config is None:
        return {}
    if isinstance(config, AttentionConfig):
        return {"fwd": config}
    if isinstance(config, dict):
        for kind, c in config.items():
            if kind not in KERNELS:
                raise ValueError(f"config key {kind!r}: the kernels are {', '.join(map(repr, KERNELS))}")
            if not isinstance(c, AttentionConfig):
                raise TypeError(f"config[{kind!r}] must be an AttentionConfig, not {type(c).__name__}")
            if kind != "fwd" and c.q_blocks is not None:
                raise ValueError(f"config[{kind!r}].q_blocks = {c.q_blocks}: only the forward has a K/V-resident "
                                 "kernel; leave it None")
        return config
    raise TypeError(f"config must be an AttentionConfig, a dict of them keyed by {KERNELS}, or None, "
                    f"not {type(config).__name__}")


def _align(*tensors: torch.Tensor) -> int:
    """ALIGN: 16 bytes' worth of elements when every tensor's batch, head and row strides are
    multiples of it (per-head bases and row starts then keep 16-byte alignment), else 1."""
    vec = 16 // tensors[0].element_size()
    aligned = all(s % vec == 0 or n == 1 for t in tensors for n, s in zip(t.shape[:3], t.stride()[:3]))
    return vec if aligned else 1  # (a size-1 dim's stride is never multiplied by more than 0)


_ALIGNS: dict[tuple, int] = {}  # the forward's _align results, by (strides and sizes, batch, dtype)


def _forward(q, k, v, scale=None, out=None, causal=False, config=None, store_lse=True):
    """Launch the forward kernel; returns (o, lse2), lse2 (B, H, Lq) fp32, or None unless store_lse."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    kind = "fwd_short_kv" if lkv <= SHORT_KV else "fwd_long_kv" if lkv >= LONG_KV else "fwd"
    d_head, d_tail, precision, block_m, block_n, warps, stages, q_blocks = _launch(kind, d, q.dtype, config)
    if q_blocks is not None and lkv > SHORT_KV:
        raise ValueError(f"q_blocks = {q_blocks} asks for the K/V-resident forward, which holds every key: it takes "
                         f"at most SHORT_KV = {SHORT_KV} keys, got Lkv = {lkv}")
    o = torch.empty_like(q) if out is None else out  # empty_like keeps the UNet's (B, L, H, D) layout
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32) if store_lse else None
    if o.numel() == 0:
        return o, lse
    qk_scale = (d ** -0.5 if scale is None else float(scale)) * LOG2E
    ints = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), h, lq, lkv)
    align = _ALIGNS.get((ints, b, q.dtype))  # _align walks 12 strides: 3 of this call's ~7 us of host time
    if align is None:
        if len(_ALIGNS) >= 4096:
            _ALIGNS.clear()
        align = _ALIGNS[ints, b, q.dtype] = _align(q, k, v, o)  # (ints, b) hold every stride and shape it reads
    meta = {"num_warps": warps, "num_stages": stages}
    if q_blocks is not None:
        q_blocks = min(q_blocks, -(-lq // block_m))  # no program walks past the last block (int32 starts)
        kv_head, kv_tail = split_keys(lkv)
        # HEAD_DIM, D_HEAD, D_TAIL, BLOCK_M, KV_HEAD, KV_TAIL, MASK_KV_HEAD, MASK_KV_TAIL, DOT_PRECISION,
        # CAUSAL, STORE_LSE, ALIGN
        consts = (d, d_head, d_tail, block_m, kv_head, kv_tail, lkv < kv_head, lkv < kv_head + kv_tail, precision,
                  causal, store_lse, align)
        grid = (-(-lq // (block_m * q_blocks)), b * h)
        _FWD_RESIDENT(grid, (ints, q_blocks, consts, warps, stages), (q, k, v, o, lse),
                      (q, k, v, o, lse, *ints, qk_scale, q_blocks, *consts), meta)
        return o, lse
    # HEAD_DIM, D_HEAD, D_TAIL, BLOCK_M, BLOCK_N, TAIL_N, DOT_PRECISION, CAUSAL, STORE_LSE, ALIGN
    consts = (d, d_head, d_tail, block_m, block_n, tail_block(lkv, block_n), precision, causal, store_lse, align)
    _FWD((-(-lq // block_m), b * h), (ints, consts, warps, stages), (q, k, v, o, lse),
         (q, k, v, o, lse, *ints, qk_scale, *consts), meta)
    return o, lse


def _backward(do, q, k, v, o, lse, scale=None, dq=None, dk=None, dv=None, causal=False, configs=None):
    """Launch the two backward kernels; returns (dq, dk, dv), written into the given tensors if any.
    ``configs``: {"dkdv": AttentionConfig, "dq": ...} overrides, as :func:`_per_kernel` makes."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    scale = d ** -0.5 if scale is None else float(scale)
    if not fits_int32(do, 2):  # q passed _offsets_problem; an upstream gradient need not
        do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # Dao 2023 Alg. 2: D_i = rowsum(dO_i ∘ O_i)
    align = _align(q, k, v, do, dq, dk, dv)
    configs = configs or {}
    d_head, d_tail, precision, block_m, block_n, warps, stages, _ = _launch("dkdv", d, q.dtype, configs.get("dkdv"))
    ints = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), h, lq, lkv)
    meta = dict(HEAD_DIM=d, D_HEAD=d_head, D_TAIL=d_tail, BLOCK_M=block_m, BLOCK_N=block_n,
                DOT_PRECISION=precision, CAUSAL=causal, ALIGN=align, num_warps=warps, num_stages=stages)
    tensors = (q, k, v, do, dk, dv, lse, delta)
    _DKDV((-(-lkv // block_n), b * h), (ints, *meta.values()), tensors,
          (*tensors, *ints, scale * LOG2E, scale), meta)
    d_head, d_tail, precision, block_m, block_n, warps, stages, _ = _launch("dq", d, q.dtype, configs.get("dq"))
    ints = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), h, lq, lkv)
    meta = dict(HEAD_DIM=d, D_HEAD=d_head, D_TAIL=d_tail, BLOCK_M=block_m, BLOCK_N=block_n,
                MASK_N=lkv % block_n != 0, DOT_PRECISION=precision, CAUSAL=causal, ALIGN=align,
                num_warps=warps, num_stages=stages)
    tensors = (q, k, v, do, dq, lse, delta)
    _DQ((-(-lq // block_m), b * h), (ints, *meta.values()), tensors, (*tensors, *ints, scale * LOG2E, scale), meta)
    return dq, dk, dv


def _reference_grads(ctx, q, k, v, do):
    """(dq, dk, dv) of the reference at the saved inputs (None where not needed), with a graph."""
    return reference_grads(lambda *qkv: attention_reference(*qkv, ctx.scale, ctx.causal), (q, k, v),
                           ctx.needs_input_grad[:3], do)


class _AttentionFn(torch.autograd.Function):
    """Triton forward (saves lse2) and Triton backward (FA2: dK/dV kernel, then dQ kernel); under
    create_graph=True the backward is recomputed through the reference (kernels._autograd). A
    backward kernel that cannot launch on this GPU (LaunchUnsupported: fp32 at head dims over 128
    on a 99 KB-shared-memory GPU, whose forward fits) recomputes through the reference with one
    warning, as the forward would fall back, unless a backend was chosen explicitly when the forward
    ran (then it raises)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, configs):
        o, lse = _forward(q, k, v, scale, None, causal, configs.get("fwd"))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.configs = scale, causal, configs
        ctx.default = _choice("attention")[0] is None and not configs  # a sweep's tiles are a choice too
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, from the reference
            return (*_reference_grads(ctx, q, k, v, do), None, None, None)
        try:
            grads = _backward(do, q, k, v, o, lse, ctx.scale, causal=ctx.causal, configs=ctx.configs)
        except LaunchUnsupported as e:
            if not ctx.default:
                raise
            warn_launch_fallback("attention", Backend.TRITON, e, stacklevel=2, what=" for the backward")
            with torch.no_grad():
                grads = tuple(g if g is None else g.detach() for g in _reference_grads(ctx, q, k, v, do))
        return (*grads, None, None, None)


# ---- torch.compile: the Triton backend as two opaque ops, sdlab::attention and its backward ----
# As for group_norm_silu (see its _op_impl): while torch.compile traces, the Triton backend calls
# these, so dynamo sees one op with a shape function, and the compiled graph runs the eager launches
# above, counted as triton calls. A tensor scale becomes a float there (a graph break, as .item() is).

def _op_impl(q, k, v, scale, causal, save_lse):
    """(o, lse2): o in q's layout; lse2 (B, H, Lq) fp32 if ``save_lse``, else empty."""
    return counted("attention", Backend.TRITON, _op_forward, q, k, v, scale, causal, save_lse)


def _op_forward(q, k, v, scale, causal, save_lse):
    o, lse = _forward(q, k, v, scale, None, causal, None, save_lse)
    return o, q.new_empty(0, dtype=torch.float32) if lse is None else lse


def _op_fake(q, k, v, scale, causal, save_lse):
    lse = q.new_empty(q.shape[:3] if save_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse  # as _forward


def _op_backward(do, q, k, v, o, lse, scale, causal):
    return _backward(do, q, k, v, o, lse, scale, causal=causal)


def _op_backward_fake(do, q, k, v, o, lse, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # as _backward


def _op_setup(ctx, inputs, output):
    q, k, v, scale, causal, _ = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.causal = scale, causal


def _op_grad(ctx, do, _):
    grads = torch.ops.sdlab.attention_backward(do, *ctx.saved_tensors, ctx.scale, ctx.causal)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None)


define_op("attention_backward", "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float? scale, "
          "bool causal) -> (Tensor, Tensor, Tensor)", _op_backward, _op_backward_fake)
define_op("attention", "(Tensor q, Tensor k, Tensor v, float? scale, bool causal, bool save_lse) -> (Tensor, Tensor)",
          _op_impl, _op_fake, _op_grad, _op_setup)


def _triton_check(q, k, v, scale=None, causal=False, out=None, config=None):
    """None if the Triton kernel can take these inputs, else the reason."""
    if not (q.device == k.device == v.device):
        return f"q, k, v on different devices ({q.device}, {k.device}, {v.device})"
    why = triton_device_problem(q.device) or transform_problem(q, k, v, out)
    if why:
        return why
    qd, kd, vd = autocast_dtypes(q, k, v)  # the dtypes the kernel will see (attention_triton casts)
    if qd not in DTYPES:
        return f"dtype {qd} is not float32/float16/bfloat16"
    if not (qd == kd == vd):
        return f"q, k, v dtypes differ ({qd}, {kd}, {vd})"
    if qd == torch.bfloat16 and q.device.type == "cpu":  # here only under TRITON_INTERPRET=1
        return ("bfloat16 under the Triton interpreter: its tl.dot multiplies bf16 bit patterns as "
                "integers (numpy has no bf16), so results would be garbage; use fp16/fp32 or a GPU")
    d = q.shape[-1]
    if d == 0 or d % 8:
        return f"head dim {d} is not a multiple of 8"
    if d > 256:
        return f"head dim {d} is over the kernel's limit of 256"
    return launch_problem(q, k, v, scale)


def launch_problem(q, k, v, scale=None) -> str | None:
    """The limits every attention kernel here shares, whatever its tiles: keys to attend to, B·H on
    the grid's second axis, 32-bit lse rows and per-head offsets, and a scale taken as a positive
    float. None, or why not (the Triton backend's check and kernels/attention_sm90.py's call it)."""
    b, h, lq, _ = q.shape
    if k.shape[-2] == 0:
        return "no keys (Lkv = 0)"
    if b * h > MAX_GRID_Y:
        return f"B·H = {b * h} programs on the grid's second axis, over CUDA's {MAX_GRID_Y}"
    if b * h * lq >= 2**31:
        return f"B·H·Lq = {b * h * lq} rows of lse, which the kernels index in 32 bits"
    if why := _offsets_problem("q", q) or _offsets_problem("k", k) or _offsets_problem("v", v):
        return why
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        return "scale is a tensor that requires grad; the kernel takes it as a float (no gradient for it)"
    return _scale_problem(scale)


def _offsets_problem(name: str, t: torch.Tensor, fix: str = "pass a contiguous copy") -> str | None:
    """Why the kernels cannot index t, or None: they add batch and head offsets in 64 bits but a
    head's rows and columns in 32, so one head must span less than 2**31 elements."""
    if fits_int32(t, 2):
        return None
    return (f"{name}{tuple(t.shape)} with strides {t.stride()} spans {max_offset(t, 2)} elements within a head; "
            f"the kernels index a head in 32 bits (below 2**31): {fix}")


def _scale_problem(scale) -> str | None:
    """Why the kernel cannot take ``scale``, or None: it takes the row max before scaling (so the
    scale must be positive) and masks scores with -inf (-inf * 0 is NaN)."""
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        return f"scale is a tensor of {scale.numel()} elements; the kernel takes one number"
    if scale is None:
        return None
    value = float(scale)  # one read of a tensor (a host sync on a GPU)
    if not value > 0:
        return f"scale {value} is not > 0 (the kernel takes the row max of unscaled scores, and -inf * 0 is NaN)"
    if value * LOG2E > _FP32_MAX:  # inf in the kernel: every output NaN
        return f"scale {value:g} times log2(e) is past fp32's largest value {_FP32_MAX:.4g}, in which the kernel scales"
    if value * LOG2E < _FP32_TINY:  # 0 in the kernel (or subnormal, which a flush makes 0): -inf * 0 = NaN
        return (f"scale {value:g} times log2(e) is below fp32's smallest normal {_FP32_TINY:.4g}, in which the "
                "kernel scales (at 0 its masked scores, -inf, would become NaN)")
    return None


def attention_triton(q, k, v, scale=None, causal=False, out=None,
                     config: AttentionConfig | dict[str, AttentionConfig] | None = None):
    """FlashAttention-2 in Triton, forward and backward; ``out=`` (shape and dtype of q) is written
    in place and is forward-only (no autograd: under grad mode, out must not require grad). ``config``
    overrides :data:`CONFIGS`: an AttentionConfig for the forward, or {"fwd" / "dkdv" / "dq":
    AttentionConfig} per kernel; a forward's ``q_blocks`` picks the K/V-resident forward (at most
    SHORT_KV keys). Without autograd (grad disabled, no input requiring grad, or ``out=``) no lse is
    allocated. Under autocast, q, k, v are cast to its dtype first, as torch's matmul and SDPA take them.

    Called directly, it checks what :func:`attention` and the switch check: a bad argument is a
    TypeError / ValueError, an input past the kernel's limits (head dim, device, no keys, ...)
    BackendUnsupported. The switch calls :func:`_attention_triton`, having made both checks."""
    _check_args(q, k, v, scale, causal)
    refuse("attention", Backend.TRITON, _triton_check(q, k, v, scale, causal))
    return _attention_triton(q, k, v, scale, causal, out, config)


@register("attention", Backend.TRITON, check=_triton_check)
def _attention_triton(q, k, v, scale=None, causal=False, out=None, config=None):
    """:func:`attention_triton` past its argument checks (the switch has made them)."""
    if (out is not None or config is not None) and torch.compiler.is_compiling():
        # a write into the caller's memory (checked for overlaps) or a sweep's tiles: an eager call,
        # run outside the graph (as in group_norm_silu)
        return torch.compiler.disable(_attention_triton)(q, k, v, scale, causal, out, config)
    q, k, v = autocast_inputs(q, k, v)
    configs = _per_kernel(config)
    if isinstance(scale, torch.Tensor):  # read once (each read of a GPU tensor is a host sync)
        scale = float(scale)
    if why := _scale_problem(scale):
        raise ValueError(why)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if out is None:
        if torch.compiler.is_compiling():  # dynamo traces one opaque op, not the launches (see _op_impl)
            return torch.ops.sdlab.attention(q, k, v, scale, causal, grad)[0]
        if grad:
            return _AttentionFn.apply(q, k, v, scale, causal, configs)
        return _forward(q, k, v, scale, None, causal, configs.get("fwd"), False)[0]  # inference: no lse
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out{tuple(out.shape)} {out.dtype} on {out.device} does not match "
                         f"q{tuple(q.shape)} {q.dtype} on {q.device}")
    if overlaps_itself(out):
        raise ValueError(f"out{tuple(out.shape)} with strides {out.stride()} holds some elements at several "
                         "indices (an expanded view): programs writing them would race")
    if (why := _offsets_problem("out", out, "pass a contiguous out")) is not None:
        raise ValueError(why)
    for name, t in (("k", k), ("v", v)):  # every program reads all of k and v: writing o there races
        if overlaps(out, t):
            raise ValueError(f"out overlaps {name}; only out=q (or memory q, k, v do not use) is safe")
    if overlaps(out, q) and not same_view(out, q):  # each program reads its q rows, then writes them
        raise ValueError(f"out overlaps q but is not q itself (out at {out.data_ptr()} strides {out.stride()}, "
                         f"q at {q.data_ptr()} strides {q.stride()}); only out=q (or memory q, k, v do not use) is safe")
    if grad or (torch.is_grad_enabled() and out.requires_grad):  # its old values would keep their history
        raise ValueError("attention_triton(out=...) does not record autograd (an input or out requires grad); "
                         "call it without out=, or under torch.no_grad()")
    _forward(q, k, v, scale, out, causal, configs.get("fwd"), False)
    torch.autograd.graph.increment_version(out)  # written through its pointer: autograd sees an in-place write
    return out


def attention(q, k, v, scale=None, causal=False):
    """softmax(q kᵀ · scale) v over the last two dims; q: (B, H, Lq, D), k, v: (B, H, Lkv, D).

    ``causal=True`` lets query i see keys j <= i only (top-left aligned; the CLIP text encoder)."""
    _check_args(q, k, v, scale, causal)
    return dispatch("attention", q, k, v, scale, causal)


def _check_args(q, k, v, scale, causal):
    """What every backend needs (TypeError / ValueError naming the argument): the op's checks, and
    attention_triton's when called directly."""
    check_floating("attention", q=q, k=k, v=v)
    if not isinstance(causal, bool):  # the reference would take any truthy value ("False" included) as True
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__} {causal!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[-1] == 0:  # the default scale D**-0.5 has no value; an explicit one scores nothing
        raise ValueError(f"attention: head dim D must be >= 1, got q{tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype and len(set(autocast_dtypes(q, k, v))) > 1:  # autocast casts them
        raise TypeError(f"attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ (they must match, as "
                        "for torch's matmul and SDPA; autocast casts all but float64 to its dtype)")
    if not (scale is None or isinstance(scale, torch.Tensor)
            or (isinstance(scale, numbers.Real) and not isinstance(scale, bool))):
        raise TypeError(f"attention: scale must be None, a number or a tensor, got {type(scale).__name__} {scale!r}")
    if isinstance(scale, numbers.Real) and not math.isfinite(scale):  # a tensor's values stay on the device
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if isinstance(scale, numbers.Real) and abs(scale) > _FP32_MAX and q.dtype != torch.float64:
        raise ValueError(f"attention: scale {scale:g} is past fp32's range (largest {_FP32_MAX:.4g}), in which "
                         f"{q.dtype} scores are scaled")
    if isinstance(scale, torch.Tensor):  # it multiplies the (B, H, Lq, Lkv) scores
        if scale.device != q.device and scale.dim() > 0:  # torch mixes devices for a 0-dim CPU tensor only
            raise ValueError(f"attention: scale{tuple(scale.shape)} is on {scale.device}, q on {q.device} (a "
                             "tensor scale goes on q's device, or is a 0-dim CPU tensor)")
        (b, h), shape = q.shape[:2], tuple(scale.shape)
        full = (1,) * (4 - len(shape)) + shape  # as broadcasting aligns it: (H, 1, 1) is per head too
        if not (len(shape) <= 4 and full[2:] == (1, 1) and full[0] in (1, b) and full[1] in (1, h)):
            raise ValueError(f"attention: a tensor scale is one number or one per batch entry and head, shaped "
                             f"(B|1, H|1, 1, 1) = ({b}|1, {h}|1, 1, 1) to scale the (B, H, Lq, Lkv) scores; got "
                             f"shape {shape}")
