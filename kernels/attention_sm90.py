"""Attention forward for Hopper (sm_90) in Gluon, with FlashAttention-3's intra-warpgroup overlap: a
research backend, ``attention="gluon_sm90"``, registered when this module is imported
(``import kernels.attention_sm90``, or ``--plugin kernels.attention_sm90`` on the CLIs).

Why it exists. At head dim 40 the exponentials cost a tile as much as its matmuls: per 64 x 64
tile of scores a warpgroup issues 4,096 ``exp2`` on the SFU (``MUFU``, 16 per cycle per SM) against
2 x 64³ padded multiply-adds on the tensor cores. kernels/attention.py's FlashAttention-2 loop is
written in Triton, whose ``tl.dot`` waits for each QK wgmma right after issuing it, so a warpgroup's
softmax never overlaps its own matmuls (offline sm_90 SASS, bench/results/2026-11-23-sm90-offline/).
Its D 40 forward measured 2.2-2.4x its issue bound on an H100: latency, not throughput (README,
"What the unmet targets ask"). Gluon, Triton's tile-level language
(``triton.experimental.gluon``), exposes wgmma's asynchrony: ``warpgroup_mma(..., is_async=True)``
issues and returns, ``warpgroup_mma_wait(n)`` waits until at most n groups are in flight (groups
complete in issue order). That is what this kernel uses.

Schedule (Shah et al. 2024, FlashAttention-3, sec. 3.2 and Alg. 2), with S_i = Q K_iᵀ over key block i:

    S_0 = Q K_0ᵀ (waited);  m, l, P_0 = softmax(S_0);  O = 0
    for i = 1 .. n - 1:
        issue S_i = Q K_iᵀ;  issue O += P_{i-1} V_{i-1}
        wait for S_i (O's group may stay in flight)
        m', P_i, alpha = softmax(S_i) against m     <- the tensor cores run P_{i-1} V_{i-1} meanwhile
        l = l · alpha + rowsum P_i;  m = m'
        wait for O;  O = O · alpha
    O += P_{n-1} V_{n-1};  o = O / l;  lse2 = m + log2 l

Before the rescale O holds sum_{j < i} P_j V_j against the previous max, so one multiply by
alpha = exp2(m - m') carries it to the new one, as in FlashAttention-2 (Dao 2023, Alg. 1) whose
online softmax this is; the scale and log2(e) ride in one FMA per score (kernels/attention.py).

P. The softmax of block i writes P_i to one of two shared-memory buffers (``stmatrix``), and the
P V of the next step reads it from there. Two things had to hold for the SASS to overlap (offline
sm_90 compiles, Triton 3.6 and 3.9): the softmax sits in a basic block of its own (a branch on
``qk_scale > 0``, always true), because within one block ptxas hoisted the wait for P V above the
exponentials; and P is not in registers, because the exponentials would then write registers the
in-flight wgmma reads. ``python -m bench.sm90`` counts the ``MUFU`` issued under an in-flight
wgmma: 34 of 34 per loop step here, 0 in kernels/attention.py's D 40 self-attention loop
(bench/results/2026-11-23-sm90-offline/gluon-sm90.md).

Loads. K and V blocks stream through STAGES shared-memory buffers by ``cp.async`` (16-byte, masked:
key rows past Lkv and columns past D arrive as zeros), one commit group per block, issued STAGES - 2
blocks ahead (in step i, block i + STAGES - 2 into block i - 2's buffer): block i - 1's buffer is
still read by the P V issued in step i. LATE_REFILL (the default) issues that copy after step i's
softmax, about STAGES - 3 steps before its first use (with 3 buffers, just before the step that
reads it); otherwise it goes before step i's QK wgmma, STAGES - 2 steps ahead, at the cost of a
barrier (below). Every warp waits for its own copies, meets the others at a barrier, and fences the
landed tiles (and its P stores) to the tensor cores' (async) proxy before a wgmma reads them; that
barrier is also what frees a buffer for reuse.

Barriers. Triton's barrier pass adds CTA barriers of its own where it sees a shared-memory hazard;
it cannot tell the buffers of one allocation apart, and it ignores that a wgmma is asynchronous.
With the fence after the barrier and the refill after the P store (LATE_REFILL), a step's loop body
has 2 ``BAR.SYNC`` under Triton 3.6 (the one asked for, and one before the P store, where the P V in
flight reads the other P buffer) and 3 under 3.9 (one after each wgmma wait, which 3.9 adds when a
program has more than one warpgroup); the first version had 4 and 5 (offline sm_90 SASS, 2026-11-23;
tests/test_sm90_compile.py holds the count). So the two warpgroups of a program also meet mid-step,
before the softmax; the overlap counted above is within each warpgroup. If the timing disappoints,
these barriers are the first suspect. Constant buffer indices (a loop unrolled by STAGES) did not
remove the 3.6 ones and took the registers to 184-194, one program per SM; distinct allocations for
the two P buffers are the remaining route.

Launches go through Triton's own dispatch (tens of microseconds of host time
per call), so calls shorter than that, such as 77-key cross-attention, time the host.
The head dim is padded to a power of two (40 -> 64) by the masks, as the Triton kernel pads it.
Full key blocks run unmasked; Lkv % BLOCK_N keys run as one masked step after them.

Backward: the Triton FlashAttention-2 backward of kernels/attention.py, from this forward's
log2-domain logsumexp (the same (B, H, Lq) fp32 layout).

Limits (``check`` names each): a CUDA device of compute capability 9.x, Triton with Gluon's Hopper
ops (3.6 and 3.9 compile this offline), fp16/bf16 (after autocast), head dim a multiple of 8 up
to 128, a unit stride along D and batch, head and row strides that keep 16-byte alignment (the row
stride even for one row), B·H·Lq and Lq·D under 2**31, a scale that stays positive and finite in
fp32 times log2(e), not causal.

Status (2026-11-23): compiled for sm_90 offline only (``python -m bench.sm90`` prints its SASS, and
tests/test_sm90_compile.py checks the overlap in its loop); it has not run on a GPU. Its numeric
tests (tests/test_attention_sm90.py) run under ``-m gpu``.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .attention import LOG2E, _AttentionFn, _check_args, _op_fake, _op_grad, _op_setup, launch_problem
from ._triton import next_power_of_2
from .registry import (autocast_dtypes, autocast_inputs, counted, define_op, refuse, register,
                       transform_problem)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    # cp.async from global to shared memory: async_load since Triton 3.7 (3.9 refuses the old name)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # a barrier across the program's warps (3.9 / 3.6)
    IMPORT_ERROR: str | None = None
except Exception as e:  # no Triton, or an older one without Gluon's Hopper ops
    IMPORT_ERROR = f"Gluon's Hopper ops do not import ({type(e).__name__}: {e})"

    class _NoGluon:
        @staticmethod
        def jit(fn):
            return fn

    gluon, gl = _NoGluon(), None

NAME = "gluon_sm90"
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # D 160 pads to 256: Q, K and V tiles would need 320 KB of shared memory (an SM has 228)
# (BLOCK_M, BLOCK_N, num_warps, STAGES, LATE_REFILL). 8 warps are two warpgroups of 64 query rows
# each, sharing K/V tiles. Offline at D 40 (Triton 3.6 / 3.9): 103 / 104 registers, no spills,
# 112 KB of shared memory (Q 16, K and V 4 x 8 each, P 2 x 16), so two programs fit an SM.
# LATE_REFILL: issue step i's K/V copy after its softmax (2 barriers per step under Triton 3.6, 3
# under 3.9) rather than before its QK wgmma (3 and 4, the copy a step further ahead); module
# docstring, Barriers. Untimed either way: `python -m bench tune --ops attention.gluon_sm90` sweeps it.
CONFIG = (128, 64, 8, 4, True)


@gluon.jit
def _issue_kv(k_bufs, v_bufs, stage, k_ptr, v_ptr, start_n, rows, cols, stride_kn, stride_vn, LKV,
              HEAD_DIM: gl.constexpr, ALIGN: gl.constexpr):
    """cp.async K and V rows [start_n, start_n + BLOCK_N) into buffer ``stage``, as one commit group.
    Rows past LKV and columns past HEAD_DIM are copied as zeros (a masked cp.async zero-fills)."""
    r = start_n + rows
    mask = (r < LKV)[:, None] & (cols < HEAD_DIM)[None, :]
    k_off = gl.multiple_of(r * stride_kn, ALIGN)
    v_off = gl.multiple_of(r * stride_vn, ALIGN)
    _async_load(k_bufs.index(stage), k_ptr + k_off[:, None] + cols[None, :], mask)
    _async_load(v_bufs.index(stage), v_ptr + v_off[:, None] + cols[None, :], mask)
    async_copy.commit_group()


@gluon.jit
def _landed(PENDING: gl.constexpr):
    """Wait until at most PENDING copy groups of this thread are in flight, then make every thread's
    landed tiles (and P stores) visible to the wgmma (async) proxy: a barrier across the program,
    then a fence. In this order because Triton's barrier pass puts a barrier right after a cp.async
    wait unless one follows it already: fence first, and the step had two (offline SASS, 3.6 and 3.9).
    Barrier, then fence before the wgmma, is also the order Triton's own passes emit."""
    async_copy.wait_group(PENDING)
    _barrier()
    fence_async_shared()


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, start_n, LKV, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             MASK: gl.constexpr, FIRST: gl.constexpr):
    """One online-softmax step on a block of raw scores: (p, alpha, m, l). FIRST: no running
    statistics yet (alpha unused). MASK: keys past LKV score -inf (the last, partial block)."""
    if MASK:
        keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((keys < LKV)[None, :], s, float("-inf"))
    if FIRST:  # the max floored at fp32's lowest: a block scoring -inf throughout gives p = 0, not NaN
        m_new = gl.maximum(gl.max(s, 1) * qk_scale, -3.4028234663852886e38)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = m_new  # placeholder: nothing to rescale yet
        l_i = gl.sum(p, 1)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _step(o, m_i, l_i, q_smem, k_bufs, v_bufs, p_bufs, i, k_ptr, v_ptr, rows_n, cols, stride_kn, stride_vn, LKV,
          qk_scale, s_zero, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
          ALIGN: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, MASK: gl.constexpr,
          LATE_REFILL: gl.constexpr):
    """Key block i: S_i = Q K_iᵀ issued, then O += P_{i-1} V_{i-1} issued; block i's softmax runs
    while the second is in flight, and writes P_i to the other P buffer (module docstring)."""
    # block i's copies have landed, and step i - 1's stores of P_{i-1} are visible to wgmma; every
    # warp is past step i - 1's waits, so the buffers its wgmma read are free
    _landed(STAGES - 3)
    if not LATE_REFILL:  # block i + STAGES - 2 issued two steps ahead; Triton's barrier pass adds a barrier
        _issue_kv(k_bufs, v_bufs, (i + STAGES - 2) % STAGES, k_ptr, v_ptr, (i + STAGES - 2) * BLOCK_N, rows_n,
                  cols, stride_kn, stride_vn, LKV, HEAD_DIM, ALIGN)
    s = warpgroup_mma(q_smem, k_bufs.index(i % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o = warpgroup_mma(p_bufs.index((i - 1) % 2), v_bufs.index((i - 1) % STAGES), o, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s,))  # groups complete in order: S_i is in, O may still run
    alpha = m_i
    # qk_scale > 0 always (host-checked: the late refill below sits in this branch too, and skipping it
    # would leave stale K/V buffers). The branch puts the softmax in a basic block of its own:
    # ptxas schedules within a block, and in one block it hoisted the wait for O (below) above the
    # exponentials, serialising them behind the P V they are meant to overlap (offline sm_90 SASS,
    # Triton 3.6). P goes through shared memory, so no register the in-flight wgmma reads is written.
    if qk_scale > 0:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, i * BLOCK_N, LKV, s_layout, BLOCK_N, MASK, False)
        p_bufs.index(i % 2).store(p.to(p_bufs.dtype))
        if LATE_REFILL:
            # refill the buffer of block i - 2 (step i - 1's P V read it; every warp has waited for
            # that since the barrier in _landed) with block i + STAGES - 2. Here, in this block, Triton's
            # barrier pass finds its barrier before the P store between this write and every wgmma
            # read of the buffers; before the QK wgmma it added one (Triton 3.6). The cost: the copy
            # starts a softmax later, about one step ahead of its use instead of two
            _issue_kv(k_bufs, v_bufs, (i + STAGES - 2) % STAGES, k_ptr, v_ptr, (i + STAGES - 2) * BLOCK_N, rows_n,
                      cols, stride_kn, stride_vn, LKV, HEAD_DIM, ALIGN)
    o = warpgroup_mma_wait(0, deps=(o,))
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return o, m_i, l_i


@gluon.jit
def _attn_fwd_sm90_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # (B, H, L, D), unit stride along D
    lse_ptr,  # (B, H, Lq) fp32 contiguous, log2-domain logsumexp of the scaled scores; unused unless STORE_LSE
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, LQ, LKV,
    qk_scale,  # scale · log2(e), > 0
    HEAD_DIM: gl.constexpr,  # D
    D_PAD: gl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,  # K/V buffers, >= 3 (block i - 1's is read while block i's is current)
    ALIGN: gl.constexpr,  # batch, head and row strides are multiples of this many elements (host-checked)
    STORE_LSE: gl.constexpr,
    LATE_REFILL: gl.constexpr,  # K/V refill after the softmax (fewer barriers) or before the QK wgmma (further ahead)
    FIRST_MASKED: gl.constexpr,  # LKV < BLOCK_N: block 0 is the partial one
    TAIL: gl.constexpr,  # LKV % BLOCK_N != 0 and LKV > BLOCK_N: a masked step after the full blocks
    s_layout: gl.constexpr,  # wgmma accumulator layouts of S (BLOCK_M x BLOCK_N) and O (BLOCK_M x D_PAD)
    o_layout: gl.constexpr,
    load_layout: gl.constexpr,  # 16-byte cp.async tiles
    q_smem_layout: gl.constexpr,  # NVMMA (swizzled) shared layouts wgmma reads: Q, K / V, P
    kv_smem_layout: gl.constexpr,
    p_smem_layout: gl.constexpr,
):
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = (pid_bh // H).to(gl.int64)
    h = (pid_bh % H).to(gl.int64)
    q_ptr += gl.multiple_of(b * stride_qb + h * stride_qh, ALIGN)
    k_ptr += gl.multiple_of(b * stride_kb + h * stride_kh, ALIGN)
    v_ptr += gl.multiple_of(b * stride_vb + h * stride_vh, ALIGN)
    o_ptr += gl.multiple_of(b * stride_ob + h * stride_oh, ALIGN)
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D_PAD], q_smem_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D_PAD], kv_smem_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D_PAD], kv_smem_layout)
    p_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], p_smem_layout)  # P_i in buffer i % 2

    cols = gl.arange(0, D_PAD, layout=gl.SliceLayout(0, load_layout))
    rows_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    rows_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout))
    q_off = gl.multiple_of(rows_m * stride_qm, ALIGN)
    _async_load(q_smem, q_ptr + q_off[:, None] + cols[None, :], (rows_m < LQ)[:, None] & (cols < HEAD_DIM)[None, :])
    async_copy.commit_group()
    for j in gl.static_range(STAGES - 1):  # blocks 0 .. STAGES - 2 (rows past LKV arrive as zeros)
        _issue_kv(k_bufs, v_bufs, j, k_ptr, v_ptr, j * BLOCK_N, rows_n, cols, stride_kn, stride_vn, LKV,
                  HEAD_DIM, ALIGN)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    o = gl.zeros([BLOCK_M, D_PAD], gl.float32, o_layout)
    _landed(STAGES - 2)  # q and block 0
    s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, 0, LKV, s_layout, BLOCK_N, FIRST_MASKED, True)
    p_bufs.index(0).store(p.to(dtype))

    n_full = LKV // BLOCK_N
    for i in range(1, n_full):
        o, m_i, l_i = _step(o, m_i, l_i, q_smem, k_bufs, v_bufs, p_bufs, i, k_ptr, v_ptr, rows_n, cols,
                            stride_kn, stride_vn, LKV, qk_scale, s_zero, HEAD_DIM, BLOCK_N, STAGES, ALIGN,
                            s_layout, o_layout, False, LATE_REFILL)
    last = 0
    if TAIL:
        o, m_i, l_i = _step(o, m_i, l_i, q_smem, k_bufs, v_bufs, p_bufs, n_full, k_ptr, v_ptr, rows_n, cols,
                            stride_kn, stride_vn, LKV, qk_scale, s_zero, HEAD_DIM, BLOCK_N, STAGES, ALIGN,
                            s_layout, o_layout, True, LATE_REFILL)
        last = n_full
    elif not FIRST_MASKED:
        last = n_full - 1
    fence_async_shared()  # the last P stores, before the wgmma reads them
    _barrier()
    o = warpgroup_mma(p_bufs.index(last % 2), v_bufs.index(last % STAGES), o, is_async=True)
    o = warpgroup_mma_wait(0, deps=(o,))
    async_copy.wait_group(0)  # no copy may still target shared memory when the program exits

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (o / l_o[:, None]).to(dtype)
    rows_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, D_PAD, layout=gl.SliceLayout(0, o_layout))
    o_off = gl.multiple_of(rows_o * stride_om, ALIGN)
    gl.store(o_ptr + o_off[:, None] + cols_o[None, :], out,
             mask=(rows_o < LQ)[:, None] & (cols_o < HEAD_DIM)[None, :])
    if STORE_LSE:
        rows_s = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(lse_ptr + pid_bh * LQ + rows_s, m_i + gl.log2(l_i), mask=rows_s < LQ)


@functools.lru_cache(maxsize=None)
def _layouts(block_m: int, block_n: int, d_pad: int, num_warps: int, dtype: torch.dtype) -> tuple:
    """The kernel's layout constexprs: wgmma accumulators for S and O (m16 x n x k16 instructions,
    warps stacked along the query rows), a 16-byte-per-thread cp.async tile, and the swizzled
    shared layouts wgmma reads (Q, K and V, P)."""
    gl_dtype = gl.float16 if dtype == torch.float16 else gl.bfloat16
    s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_n, 16])
    o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, d_pad, 16])
    across = d_pad // 8  # threads along a row: 8 elements (16 bytes) each
    load_layout = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // across, across],
                                   warps_per_cta=[num_warps, 1], order=[1, 0])
    q_smem = gl.NVMMASharedLayout.get_default_for([block_m, d_pad], gl_dtype)
    kv_smem = gl.NVMMASharedLayout.get_default_for([block_n, d_pad], gl_dtype)
    p_smem = gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl_dtype)
    return s_layout, o_layout, load_layout, q_smem, kv_smem, p_smem


def _check(q, k, v, scale=None, causal=False):
    """None if the kernel can take these inputs, else the reason."""
    if why := IMPORT_ERROR or transform_problem(q, k, v):
        return why
    if not (q.device == k.device == v.device) or q.device.type != "cuda":
        return f"inputs on {q.device}, {k.device}, {v.device}; the kernel needs one CUDA device"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"compute capability {major}.{minor}; the kernel uses Hopper's wgmma (9.x)"
    return input_problem(q, k, v, scale, causal)


def input_problem(q, k, v, scale=None, causal=False) -> str | None:
    """The limits that do not depend on the device (dtype, head dim, strides, scale): None, or why."""
    if causal:
        return "causal attention (the kernel has no causal mask; the triton backend has one)"
    qd, kd, vd = autocast_dtypes(q, k, v)
    if qd not in DTYPES or not qd == kd == vd:
        return f"dtypes {qd}, {kd}, {vd}; the kernel takes q, k, v all float16 or all bfloat16"
    lq, d = q.shape[2:]
    if d % 8 or not 0 < d <= MAX_HEAD_DIM:
        return f"head dim {d} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]"
    if why := launch_problem(q, k, v, scale):
        return why
    if lq * d >= 2**31:  # o = empty_like(q) may be contiguous where q was expanded
        return f"q{tuple(q.shape)}: an output head of Lq·D elements, which the kernel indexes in 32 bits"
    vec = 16 // qd.itemsize  # elements per 16 bytes, in the dtype the kernel sees (after autocast)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name} has stride {t.stride(3)} along the head dim; its 16-byte cp.async needs 1"
        if t.data_ptr() % 16:
            return f"{name} starts at address {t.data_ptr():#x}, not 16-byte aligned"
        # batch and head strides of a size-1 dim are multiplied by 0; the row stride is not (masked
        # rows past L still form addresses), so it must be aligned even for a single row
        if any(st % vec for n, st in zip(t.shape[:2], t.stride()[:2]) if n > 1) or t.stride(2) % vec:
            return (f"{name} strides {t.stride()}: batch, head and row strides must be multiples of 16 bytes "
                    f"({vec} elements of {qd}) for its 16-byte cp.async")
    return None  # a scale 0 or infinite in fp32 once times log2(e) launch_problem refused

def _forward(q, k, v, scale=None, store_lse=True, config=CONFIG):
    """Launch the kernel; returns (o, lse2), lse2 (B, H, Lq) fp32, or None unless store_lse."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    block_m, block_n, num_warps, stages, late_refill = config
    if stages < 3:
        raise ValueError(f"config {config}: STAGES must be >= 3 (block i - 1's buffer is read during step i)")
    d_pad = max(16, next_power_of_2(d))
    # keeps a dense q's layout (the UNet's (B, L, H, D)), else contiguous: 16-byte strides either way (D % 8 == 0)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32) if store_lse else None
    if o.numel() == 0:
        return o, lse
    qk_scale = (d ** -0.5 if scale is None else float(scale)) * LOG2E
    align = 16 // q.element_size()
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    s_layout, o_layout, load_layout, q_smem, kv_smem, p_smem = _layouts(block_m, block_n, d_pad, num_warps, q.dtype)
    # Triton launches on the current device; q's may be another GPU (bench.sm90 passes CPU tensors)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attn_fwd_sm90_kernel[(-(-lq // block_m), b * h)](
            q, k, v, o, lse if store_lse else q, *strides, h, lq, lkv, qk_scale,
            HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, ALIGN=align,
            STORE_LSE=store_lse, LATE_REFILL=bool(late_refill), FIRST_MASKED=lkv < block_n,
            TAIL=lkv > block_n and lkv % block_n != 0,
            s_layout=s_layout, o_layout=o_layout, load_layout=load_layout, q_smem_layout=q_smem,
            kv_smem_layout=kv_smem, p_smem_layout=p_smem, num_warps=num_warps)
    return o, lse


class _AttentionSm90Fn(_AttentionFn):
    """kernels/attention.py's Function with this forward: it saves the same tensors (lse2 included),
    so that Function's backward applies unchanged: Triton's FlashAttention-2 kernels, or the
    reference under create_graph=True."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, configs):
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.configs = scale, causal, configs
        return o


def attention_gluon_sm90(q, k, v, scale=None, causal=False):
    """Forward in Gluon with wgmma/softmax overlap (module docstring), backward in Triton. Called
    directly, it checks what kernels.attention and the switch check, as attention_triton does."""
    _check_args(q, k, v, scale, causal)
    refuse("attention", NAME, _check(q, k, v, scale, causal))
    return _attention_gluon_sm90(q, k, v, scale, causal)


# ---- torch.compile: the Gluon forward as an opaque op, sdlab::attention_gluon_sm90 ----
# As kernels/attention.py does for the Triton backend: while torch.compile traces, dynamo sees one op
# with a shape function, not the Gluon launch (which it would take for a Triton kernel of its own to
# compile). Its schema is sdlab::attention's (causal is always False here), so attention.py's shape
# function and gradient (sdlab::attention_backward, the Triton backward kernels) serve it unchanged.

def _op_impl(q, k, v, scale, causal, save_lse):
    return counted("attention", NAME, _op_forward, q, k, v, scale, save_lse)


def _op_forward(q, k, v, scale, save_lse):
    o, lse = _forward(q, k, v, scale, store_lse=save_lse)
    return o, q.new_empty(0, dtype=torch.float32) if lse is None else lse


define_op("attention_gluon_sm90", "(Tensor q, Tensor k, Tensor v, float? scale, bool causal, bool save_lse) -> "
          "(Tensor, Tensor)", _op_impl, _op_fake, _op_grad, _op_setup,
          replace=True)  # importing the module again (tests, bench tune) defines it afresh


@register("attention", NAME, check=_check, replace=True)
def _attention_gluon_sm90(q, k, v, scale=None, causal=False):
    """:func:`attention_gluon_sm90` past its argument checks (the switch has made them)."""
    q, k, v = autocast_inputs(q, k, v)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling():  # one opaque op (above), not the Gluon launch
        return torch.ops.sdlab.attention_gluon_sm90(q, k, v, None if scale is None else float(scale), False, grad)[0]
    if grad:
        return _AttentionSm90Fn.apply(q, k, v, scale, False, {})  # not causal; the Triton backward's own tiles
    return _forward(q, k, v, scale, store_lse=False)[0]
