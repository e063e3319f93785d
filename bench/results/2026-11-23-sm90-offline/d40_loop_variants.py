"""Head dim 40 attention: what each rewrite of the key-block loop costs in sm_90 instructions.

Offline (no GPU): each variant is a stripped-down copy of kernels/attention.py's forward loop
(D 40 padded to 64, BLOCK_M 128, BLOCK_N 64, 8 warps, 3 stages: the default "fwd" row), compiled
for sm_90 with the ptxas in Triton's wheel through bench.sm90.capture; the kernel itself is compiled
next to them. The table gives, per thread, the instructions of the innermost loop (one 128 x 64
tile of scores per program and iteration) and its mix. None of this is a timing.

    python bench/results/2026-11-23-sm90-offline/d40_loop_variants.py   # from the repo root, without TRITON_INTERPRET
"""
import os
import sys
import types

import torch

sys.path.insert(0, os.getcwd())
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bench.sm90 as sm90  # noqa: E402

VARIANTS = {  # MODE -> what the loop does differently from the kernel's
    0: "as the kernel: exp2 on MUFU, row sums with tl.sum",
    1: "half the exp2 as a cubic polynomial (floor, int cast, exponent shift)",
    2: "half the exp2 as a cubic polynomial, rounded by adding and subtracting 1.5 * 2^23",
    3: "the next block's QK issued before this block's softmax",
    4: "exp2 as ex2.approx.f16x2 (inline PTX) on the fp16-packed argument",
    5: "row sums from P @ V: V read from a 48-wide copy whose column 40 is 1",
    6: "row sums from P @ V: the 1 written into the loaded V tile",
}


@triton.jit
def _poly_exp2(x, MAGIC: tl.constexpr):
    x = tl.maximum(x, -127.0)
    if MAGIC:  # round to nearest by the float adder, read the integer from the mantissa bits
        j = x + 12582912.0
        f = x - (j - 12582912.0)
        e = j.to(tl.int32, bitcast=True)
    else:
        j = tl.floor(x)
        f = x - j
        e = j.to(tl.int32)
    p = 0.0555041086648216 * f + 0.2402264923172690  # 2^f on [-0.5, 1], cubic
    p = p * f + 0.6931471805599453
    p = p * f + 1.0
    return (p.to(tl.int32, bitcast=True) + (e << 23)).to(tl.float32, bitcast=True)


@triton.jit
def variant(q_ptr, k_ptr, v_ptr, v48_ptr, o_ptr, L, qk_scale, D: tl.constexpr, DP: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    pid = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * L * D
    rm = pid * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    c = tl.arange(0, DP)
    q = tl.load(q_ptr + base + rm[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
    acc = tl.zeros((BM, DP), tl.float32)
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    if MODE == 3:
        k = tl.load(k_ptr + base + rn[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
        s = tl.dot(q, tl.trans(k))
        for n in range(BN, L + BN, BN):
            k = tl.load(k_ptr + base + (n % L + rn)[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
            s_next = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + base + (n - BN + rn)[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m = m_new
            s = s_next
    else:
        for n in range(0, L, BN):
            k = tl.load(k_ptr + base + (n + rn)[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
            x = s * qk_scale - m_new[:, None]
            if MODE == 1 or MODE == 2:
                x0, x1 = tl.split(tl.reshape(x, (BM, BN // 2, 2)))
                p = tl.reshape(tl.join(tl.exp2(x0), _poly_exp2(x1, MODE == 2)), (BM, BN))
            elif MODE == 4:
                p = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                              dtype=tl.float16, is_pure=True, pack=2)
            else:
                p = tl.exp2(x)
            alpha = tl.exp2(m - m_new)
            if MODE == 5:  # row stride 48, columns 41-47 zero: 16-byte rows, no mask but the pad's
                v = tl.load(v48_ptr + base // D * 48 + (n + rn)[:, None] * 48 + c[None, :],
                            mask=c[None, :] < 48, other=0.0)
            elif MODE == 6:
                v = tl.load(v_ptr + base + (n + rn)[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
                v = tl.where(c[None, :] == D, 1.0, v).to(v.dtype)
            else:
                v = tl.load(v_ptr + base + (n + rn)[:, None] * D + c[None, :], mask=c[None, :] < D, other=0.0)
                l = l * alpha + tl.sum(p.to(tl.float32), 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m = m_new
    if MODE == 5 or MODE == 6:  # the row sums rode in column D of the accumulator
        l = tl.sum(tl.where(c[None, :] == D, acc, 0.0), 1)
    tl.store(o_ptr + base + rm[:, None] * D + c[None, :], (acc / l[:, None]).to(o_ptr.dtype.element_ty),
             mask=c[None, :] < D)


def main():
    mod = types.ModuleType("d40_variants")
    mod.variant = variant
    sys.modules[mod.__name__] = mod
    b, h, n, d = 2, 8, 4096, 40
    q = torch.empty(b * h, n, d, dtype=torch.float16)
    v48 = torch.empty(b * h, n, 48, dtype=torch.float16)
    rows = []
    for mode, what in VARIANTS.items():
        with sm90.capture(mod.__name__, "variant") as found:
            mod.variant[(n // 128, b * h)](q, q, q, v48, q, n, 0.2, D=d, DP=64, BM=128, BN=64, MODE=mode,
                                           num_warps=8, num_stages=3)
        rows.append((f"{mode}: {what}", found[0]))
    with sm90.capture("kernels.attention", "_attn_fwd_kernel") as found:
        x = torch.empty(b, n, h, d, dtype=torch.float16).transpose(1, 2)  # the UNet's (B, L, H, D) views
        sys.modules["kernels.attention"].attention_triton(x, x, x)
    rows.append(("kernels.attention._attn_fwd_kernel (SD 1.5 self-attention, 4096 tokens)", found[0]))
    cols = ("MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "SHFL", "F2FP", "HGMMA", "LDS", "STS", "MEMBAR", "BAR")
    print(f"Triton {triton.__version__}, sm_90 offline; (2, 8, 4096, 40) fp16; per thread, innermost loop\n")
    print("| variant | registers | programs/SM | loop instructions | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for name, c in rows:
        print(f"| {name} | {c.registers} | {c.ctas_per_sm} | {c.loop_instructions} | "
              + " | ".join(str(c.loop.get(k, 0)) for k in cols) + " |")


if __name__ == "__main__":
    main()
