"""Every Triton kernel, forward and backward, at SD 1.5 shapes compiles for Hopper (sm_90) without
a GPU, via the ptxas that Triton's wheel ships (bench/sm90.py): no register spills, tensor-core
(HGMMA) attention, and 16-byte tile loads. The last guards the head-dim-40 alignment hints: without
them the D = 40 attention compiled to 2-byte loads with no cp.async pipeline. Speed needs a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sm90 import wide_load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit functions
    r = subprocess.run([sys.executable, "-m", "bench.sm90", "--json"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"offline sm_90 compiles unavailable here: {json.loads(r.stdout)['unavailable']}")
    assert r.returncode == 0, f"bench.sm90 failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


KERNELS = {  # every @triton.jit kernel of kernels/, each compiled at least once by bench.sm90
    "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
    "_attn_fwd_resident_kernel",  # the K/V-resident forward (AttentionConfig.q_blocks), a tune candidate
    "_fused_kernel", "_stats_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel",
    "_scheduler_step_kernel",
    "_attn_fwd_sm90_kernel",  # the Gluon research backend (kernels/attention_sm90.py)
}


def test_every_kernel_compiles_without_spills(compiled):
    kernels = {rec["kernel"] for rec in compiled}
    assert kernels == KERNELS, f"kernels compiled {sorted(kernels)}, expected {sorted(KERNELS)}"
    assert len({rec["case"] for rec in compiled}) == 23, sorted({rec["case"] for rec in compiled})
    for rec in compiled:
        assert rec["spill_bytes"] == 0, f"{rec['case']} {rec['kernel']}: {rec['spill_bytes']} bytes spilled: {rec}"
        assert rec["registers"] <= 255, rec
        assert rec["ctas_per_sm"] >= 1, f"{rec['case']} {rec['kernel']}: does not fit on an SM: {rec}"


def test_attention_uses_tensor_cores_and_16_byte_loads(compiled):
    """16-bit inputs run on tensor cores. Forward: every global load 16 bytes wide, in the UNet's
    (B, L, H, D) layout and in a contiguous (B, H, L, D) one (row stride 40), fp32 too. Backward: 16-byte tile loads too; only the fp32
    lse / delta vectors may load narrower, and no load is a 2-byte scalar (an unvectorised tile)."""
    attn = [rec for rec in compiled if rec["kernel"].startswith("_attn_") and "gluon" not in rec["case"]]
    # 10 forward cases, 5 backward ones of 3 kernels each
    assert len(attn) == 10 + 5 * 3, [(rec["case"], rec["kernel"]) for rec in attn]
    for rec in attn:
        where = f"{rec['case']} {rec['kernel']}"
        if "fp32" not in rec["case"]:  # fp32 dots are "ieee": FMA on CUDA cores by design
            assert rec["hgmma"] > 0, f"{where}: no wgmma (HGMMA) instructions: {rec}"
        assert not any(".U16" in op for op in rec["global_loads"]), f"{where}: 2-byte loads: {rec['global_loads']}"
        wide = sum(n for op, n in rec["global_loads"].items() if wide_load(op))
        assert wide >= 4, f"{where}: {wide} 16-byte loads: {rec['global_loads']}"
        if rec["kernel"] in ("_attn_fwd_kernel", "_attn_fwd_resident_kernel"):
            assert rec["narrow_loads"] == 0, f"{where}: loads narrower than 16 bytes: {rec['global_loads']}"


def test_group_norm_tile_loads_are_16_bytes(compiled):
    """x and dy tiles load as 16-byte vectors, in NCHW (along H * W) and in channels_last (along
    C: 40 channels per group, known at compile time); the only narrow loads are per-channel
    weight/bias (2 bytes each, at most 4 sites), the fp32 per-group statistics (at most 4) and the
    group's first element, the pivot its statistics are taken about (one scalar per program)."""
    gn = [rec for rec in compiled if rec["case"].startswith("group_norm_silu") and "(2,64,1,1)" not in rec["case"]]
    # (2,64,1,1): one element per channel, two per group, so nothing to vectorise
    assert {rec["kernel"] for rec in gn} == {"_fused_kernel", "_stats_kernel", "_apply_kernel",
                                            "_bwd_reduce_kernel", "_bwd_dx_kernel"}, gn
    for rec in gn:
        wide = sum(n for op, n in rec["global_loads"].items() if wide_load(op))
        assert wide >= 1, f"{rec['kernel']}: no 16-byte loads: {rec['global_loads']}"
        assert rec["narrow_loads"] <= 9, f"{rec['kernel']}: {rec['global_loads']}"


def test_attention_inner_loop_is_the_key_block_loop(compiled):
    """The per-tile cost that README's arithmetic uses: the D 40 forward's innermost loop is the
    key-block loop, with both wgmma matmuls and its 32 exp2 per thread (a 128 x 64 score tile over
    8 warps) plus the 2 of the rescale factor."""
    rec = next(r for r in compiled if r["case"] == "attention D40 self 4096" and r["kernel"] == "_attn_fwd_kernel")
    mix = rec["loop_mix"]
    assert rec["loop_instructions"] == sum(mix.values()) > 0, rec
    assert mix.get("HGMMA", 0) >= 2 and mix.get("MUFU", 0) == 34, f"inner loop of {rec['case']}: {mix}"


def test_resident_forward_loads_keys_once_and_prefetches_queries(compiled):
    """The K/V-resident forward's reason to exist, in its SASS: the innermost loop is the walk over
    query blocks, whose q tiles load as cp.async copies (pipelined ahead, LDGSTS) and whose keys and
    values were loaded before it (no other global load in the loop), with the QK and PV wgmma in it."""
    rec = next(r for r in compiled if r["kernel"] == "_attn_fwd_resident_kernel")
    mix = rec["loop_mix"]
    assert mix.get("LDGSTS", 0) > 0 and mix.get("LDG", 0) == 0, f"{rec['case']}: inner loop {mix}"
    assert mix.get("HGMMA", 0) >= 4 and mix.get("STG", 0) > 0, f"{rec['case']}: inner loop {mix}"


def test_gluon_sm90_overlaps_the_softmax_with_its_own_matmul(compiled):
    """The research kernel's reason to exist, checked in its sm_90 SASS: every exp2 of the key-block
    loop (32 per thread, plus the 2 of the rescale factor) issues while the P V wgmma is in flight,
    where the Triton kernel waits for each wgmma before its softmax (0). Also: two programs per SM
    (two warpgroups each), no spills, every tile load a 16-byte cp.async, at most 3 barriers per step."""
    recs = {r["case"]: r for r in compiled if r["kernel"] == "_attn_fwd_sm90_kernel"}
    assert set(recs) == {"attention D40 self 4096, gluon_sm90", "attention D40 cross 77, gluon_sm90"}, recs
    for case, rec in recs.items():
        assert rec["loop_mufu_in_flight"] == rec["loop_mix"].get("MUFU") == 34, f"{case}: {rec}"
        assert rec["loop_mix"].get("HGMMA", 0) == 8, f"{case}: QK and PV, 4 k-steps each: {rec['loop_mix']}"
        assert rec["ctas_per_sm"] >= 2 and rec["spill_bytes"] == 0, rec
        # CTA barriers per step: the one the kernel asks for, plus what Triton's barrier pass adds
        # (one under 3.6, two under 3.9); 4 and 5 before the fence and the refill were moved
        assert rec["loop_mix"].get("BAR", 0) <= 3, f"{case}: {rec['loop_mix'].get('BAR')} barriers per step"
        assert rec["narrow_loads"] == 0 and rec["global_loads"], f"{case}: {rec['global_loads']}"
    triton = next(r for r in compiled if r["case"] == "attention D40 self 4096" and r["kernel"] == "_attn_fwd_kernel")
    assert triton["loop_mufu_in_flight"] < 34, triton


OVERLAP = """\
LBB0:
--:-:-:-:1\tHGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
--:-:-:-:2\tWARPGROUP.DEPBAR.LE gsb0, 0x0 ;
--:-:-:-:1\tMUFU.EX2 R1, R1 ;
--:-:-:-:1\tHGMMA.64x64x16.F32 R56, gdesc[UR12], R56, gsb0 ;
--:-:-:-:1\tMUFU.EX2 R2, R2 ;
--:-:-:-:1\tMUFU.EX2 R3, R3 ;
--:-:-:-:2\tWARPGROUP.DEPBAR.LE gsb0, 0x1 ;
--:-:-:-:1\tMUFU.EX2 R4, R4 ;
--:-:-:-:2\tWARPGROUP.DEPBAR.LE gsb0, 0x0 ;
--:-:-:-:1\tMUFU.EX2 R5, R5 ;
--:-:-:-:5\t@P1 BRA LBB0 ;
"""


def test_mufu_in_flight_counts_between_an_hgmma_and_the_full_wait():
    """Offline, no compile: a MUFU after a full wait (0x0) is not overlapped; one after an HGMMA
    is, through a partial wait (0x1), until the full one."""
    from bench.sm90 import _inner_bodies, mufu_in_flight

    (body,) = _inner_bodies(OVERLAP)
    assert mufu_in_flight(body) == 3


SASS = """\
--:-:-:-:1\tIMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28];
LBB0:
--:-:-:Y:4\tFADD R2, R2, 1;
LBB1:
02:-:1:-:2\tMUFU.EX2 R3, R2;
--:-:-:Y:1\t@!P0 BRA LBB1;
--:-:-:-:1\tFMUL R4, R3, R3;
--:-:-:-:5\t@P1 BRA LBB0;
--:-:-:-:1\tBRA LBB2;
LBB2:
--:-:-:-:1\tEXIT;
LBB3:
--:-:-:Y:0\tBRA LBB3;
"""


def test_inner_loops_reads_only_innermost_back_branches():
    """Offline, no compile: of two nested loops only the inner one (2 instructions, one of them on a
    yield-flagged line); a forward branch and the trailing branch-to-itself are no loops."""
    from bench.sm90 import inner_loops

    loops = inner_loops(SASS)
    assert loops == [{"MUFU": 1, "BRA": 1}], loops
