"""Direct launches (kernels/_launch.py) against Triton's real JITFunction.run, on a CPU.

Run by tests/test_launch.py in a process without TRITON_INTERPRET (so @triton.jit makes real
JITFunctions). Triton's active driver and compile step are bench.host's stubs (device 0, a fixed
stream; a compiled kernel whose ``run`` records its arguments here): nothing reaches a GPU.
Each call of every kernel family is made three times: with direct launches off (what Triton's
dispatch hands the compiled kernel), then on twice (the first fills the launch cache, the second
goes direct). The direct launch must pick the same compiled kernel and pass the same arguments
(tensors compared by dtype, shape, strides and 16-byte alignment; the launch metadata and hook
slots are None by design). Prints one JSON line: cases, mismatches (with details), direct launches.
"""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402

from bench.host import OPS, launchers, stub_triton  # noqa: E402

RUNS = []  # (compiled kernel, run() arguments) of every launch
stub_triton(on_run=lambda compiled, args: RUNS.append((compiled, args)))  # no GPU; CPU tensors pass the checks

from kernels import _launch  # noqa: E402

at = importlib.import_module("kernels.attention")
gn = importlib.import_module("kernels.group_norm_silu")
st = importlib.import_module("kernels.scheduler_step")
LAUNCHERS = tuple(launcher for op in OPS for launcher in launchers(op).values())
assert len(LAUNCHERS) >= 10, [launcher.name for launcher in LAUNCHERS]  # 4 attention, 5 GroupNorm, 1 step


def record(fn, enabled):
    _launch.ENABLED = enabled
    RUNS.clear()
    fn()
    return list(RUNS)


def same_arg(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a.dtype, a.shape, a.stride(), a.data_ptr() % 16) == (b.dtype, b.shape, b.stride(), b.data_ptr() % 16))
    return type(a) is type(b) and a == b


def differences(want, got):
    """What differs between Triton's launches and the direct ones, as strings (empty: none)."""
    if len(want) != len(got):
        return [f"{len(want)} launches through Triton, {len(got)} direct"]
    out = []
    for i, ((kw, aw), (kg, ag)) in enumerate(zip(want, got)):
        if kw is not kg:
            out.append(f"launch {i}: another compiled kernel ({kg.key[:60]} for {kw.key[:60]})")
        if ag[6:9] != (None, None, None):
            out.append(f"launch {i}: metadata/hooks {ag[6:9]!r}, not None")
        if len(aw) != len(ag):
            out.append(f"launch {i}: {len(ag)} arguments, Triton passed {len(aw)}")
        out += [f"launch {i} argument {j}: {b!r:.60} for {a!r:.60}"
                for j, (a, b) in enumerate(zip(aw, ag)) if j not in (6, 7, 8) and not same_arg(a, b)]
    return out


CASES, MISMATCHES = [], []


def compare(name, fn):
    for launcher in LAUNCHERS:
        launcher.clear()
    direct_before = sum(launcher.direct for launcher in LAUNCHERS)
    want = record(fn, False)
    record(fn, True)  # Triton's dispatch, filling the launch cache
    got = record(fn, True)
    diff = differences(want, got)
    if sum(launcher.direct for launcher in LAUNCHERS) - direct_before != len(got):
        diff.append("not every second launch went direct")
    CASES.append(name)
    if diff:
        MISMATCHES.append({"case": name, "differences": diff[:8]})


g = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=g).to(dtype)


for b, h, lq, lkv, d, dtype, causal in [(2, 8, 64, 77, 40, torch.float16, False),
                                        (1, 4, 33, 33, 80, torch.float32, True),
                                        (2, 2, 16, 16, 160, torch.bfloat16, False)]:
    q = rand(b, lq, h, d, dtype=dtype).transpose(1, 2)  # the UNet's layout
    k, v = rand(b, h, lkv, d, dtype=dtype), rand(b, h, lkv, d, dtype=dtype)
    o, lse, do = torch.empty_like(q), torch.zeros(b, h, lq), rand(b, h, lq, d, dtype=dtype)
    shape = f"B{b} H{h} {lq}x{lkv} D{d} {dtype} causal={causal}"
    compare(f"attention forward {shape}", lambda: at._forward(q, k, v, None, None, causal, None, True))
    compare(f"attention inference {shape}", lambda: at._forward(q, k, v, 0.3, None, causal, None, False))
    compare(f"attention backward {shape}", lambda: at._backward(do, q, k, v, o, lse, None, causal=causal))
    for q_blocks in (1, 3):  # the K/V-resident forward, whose Q_BLOCKS is a runtime integer
        resident = at.AttentionConfig(16, 16, 4, 2, q_blocks=q_blocks)
        compare(f"attention K/V-resident forward q_blocks={q_blocks} {shape}",
                lambda: at._forward(q, k, v, None, None, causal, resident, True))

for shape, groups, dtype in [((2, 320, 32, 32), 32, torch.float16), ((1, 64, 7, 5), 8, torch.float32),
                             ((2, 1280, 8, 8), 32, torch.bfloat16), ((2, 64, 50), 4, torch.float16)]:
    x, w, bias = rand(*shape, dtype=dtype), rand(shape[1], dtype=torch.float32), rand(shape[1], dtype=dtype)
    for single in (True, False):
        cfg = gn.launch_config(tuple(shape), groups, dtype, gn.H100_SMS, single_pass=single)
        for store in (False, True):
            compare(f"group_norm_silu forward {shape} single_pass={single} stats={store}",
                    lambda: gn._forward(x, w, bias, None, gn._plan(x, w, bias, groups, 1e-5, "silu", None, cfg, store)))
    plan = gn._plan(x, w, bias, groups, 1e-5, "silu", None, None, True)
    y, stats = gn._forward(x, w, bias, None, plan)

    class Ctx:
        saved_tensors, needs_input_grad = (x, w, bias, stats), (False, True, True, True)  # (out, x, weight, bias)

    Ctx.plan, Ctx.eps = plan, 1e-5
    dy = rand(*shape, dtype=dtype)

    def backward():
        with torch.no_grad():
            gn._GroupNormSiLU.backward(Ctx, dy)

    compare(f"group_norm_silu backward {shape}", backward)

latent, eps = rand(2, 4, 16, 16, dtype=torch.float32), rand(2, 4, 16, 16, dtype=torch.float32)
coeffs = st.StepCoefficients(a_x=1, a_o=-0.5, b_x=1.0, b_0=-1.0, b_d=0.5, c0=0.4, c1=0.6, c2=0.1, clip=1)  # ints too
mask = torch.rand(2, 1, 16, 16, generator=g) > 0.5
compare("scheduler_step CFG + RePaint, bool mask",
        lambda: st.scheduler_step_triton(latent, eps, coeffs, eps * 0.5, 7.5, None, None, mask, latent, True))
compare("scheduler_step plain, int guidance", lambda: st.scheduler_step_triton(latent, eps, coeffs, None, 1))

# the K/V-resident forward at two q_blocks on the same inputs, the cache kept between them: Q_BLOCKS
# is a runtime integer (3 and 16 specialise apart: 16 is divisible by 16), so the key must hold it
q, k = rand(1, 512, 2, 40).transpose(1, 2), rand(1, 2, 77, 40)  # 512 queries: 32 blocks of 16
_launch.ENABLED = True
for launcher in LAUNCHERS:
    launcher.clear()
for q_blocks in (3, 16):
    resident = at.AttentionConfig(16, 16, 4, 2, q_blocks=q_blocks)
    want = record(lambda: at._forward(q, k, k, None, None, False, resident, False), False)
    record(lambda: at._forward(q, k, k, None, None, False, resident, False), True)
    got = record(lambda: at._forward(q, k, k, None, None, False, resident, False), True)
    CASES.append(f"attention K/V-resident forward, q_blocks {q_blocks} after 3, cache kept")
    if differences(want, got):
        MISMATCHES.append({"case": CASES[-1], "differences": differences(want, got)[:8]})

# scheduler_step at one latent shape with its terms switched on one by one, the cache kept between
# them: every flavour has the same element count, so only FLAGS (a constexpr bitmask) tells their
# compiled kernels apart, and the launch key must hold it
plain = st.StepCoefficients(a_x=1, a_o=-0.5, c0=0.4, c1=0.6)
clipped = st.StepCoefficients(a_x=1, a_o=-0.5, b_o=1.0, c0=0.4, c1=0.6, c2=0.1, clip=1.0)
flavours = [("plain", lambda: st.scheduler_step_triton(latent, eps, plain)),
            ("CFG", lambda: st.scheduler_step_triton(latent, eps, plain, eps * 0.5, 7.5)),
            ("CFG + clip + eps", lambda: st.scheduler_step_triton(latent, eps, clipped, eps * 0.5, 7.5)),
            ("+ noise", lambda: st.scheduler_step_triton(latent, eps, clipped, eps * 0.5, 7.5, eps)),
            ("+ mask", lambda: st.scheduler_step_triton(latent, eps, clipped, eps * 0.5, 7.5, eps, None, mask, latent))]
_launch.ENABLED = True
for launcher in LAUNCHERS:
    launcher.clear()
for name, fn in flavours:
    want = record(fn, False)
    got = record(fn, True)  # first met with the cache holding the flavours before it
    CASES.append(f"scheduler_step {name} after the others, cache kept")
    if [k for k, _ in want] != [k for k, _ in got]:
        MISMATCHES.append({"case": CASES[-1], "differences": ["the launch cache returned another flavour's kernel"]})

# retuning GroupNorm at run time: the same inputs now launch other tiles; the launch cache must not
# hand back the kernel compiled for the old ones
x = rand(2, 320, 32, 32)
_launch.ENABLED = True
for launcher in LAUNCHERS:
    launcher.clear()
for _ in range(2):
    gn.group_norm_silu_triton(x, None, None, 32)  # warm: the second call goes direct
before = gn._plan(x, None, None, 32, 1e-5, "silu", None, None, False)
saved = gn.MAX_WARPS  # read by launch_config at each (uncached) call
gn.MAX_WARPS = 1
gn.clear_caches()
try:
    after = gn._plan(x, None, None, 32, 1e-5, "silu", None, None, False)
    assert before.consts["num_warps"] != after.consts["num_warps"], "the retune changed nothing"
    want = record(lambda: gn.group_norm_silu_triton(x, None, None, 32), False)
    got = record(lambda: gn.group_norm_silu_triton(x, None, None, 32), True)
    CASES.append("group_norm_silu retuned at run time")
    if [k for k, _ in want] != [k for k, _ in got]:
        MISMATCHES.append({"case": "group_norm_silu retuned at run time",
                           "differences": ["the launch cache returned the kernel of the old tiles"]})
finally:
    gn.MAX_WARPS = saved
    gn.clear_caches()

print(json.dumps({"cases": len(CASES), "mismatches": MISMATCHES,
                  "direct": sum(launcher.direct for launcher in LAUNCHERS)}))
