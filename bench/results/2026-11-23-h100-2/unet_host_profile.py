"""Host cost of the SD 1.5 UNet step per kernel setting: plain loop vs do_bench, gc on/off,
explicit vs default resolution, and cProfile of the all-triton step."""
import cProfile, gc, io, pstats, sys, time, collections, contextlib
import torch
import kernels, sdcore
from bench.pipelines import kernel_scope
from bench.common import time_fn, host_ms
from triton.testing import do_bench

dev = torch.device("cuda")
model = sdcore.StableDiffusion.from_preset("sd15", seed=0, dtype=torch.float16, device="cuda")
unet = model.unet
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.full((2,), 500, device="cuda", dtype=torch.long)
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
f = lambda: unet(x, t, ctx)

def plain(fn, n=10):
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    return (t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3

settings = {
    "reference": lambda: kernels.use("reference"),
    "gn=triton(explicit)": lambda: kernels.use(group_norm_silu="triton", attention="reference"),
    "gn=triton(bench scope)": lambda: kernel_scope("triton:group_norm_silu", dev)[0],
    "attn=triton(explicit)": lambda: kernels.use(group_norm_silu="reference", attention="triton"),
    "triton(explicit)": lambda: kernels.use("triton"),
    "triton(bench scope)": lambda: kernel_scope("triton", dev)[0],
}
order = list(settings)
for rnd, names in enumerate((order, order[::-1])):
    print(f"--- round {rnd}")
    for name in names:
        with torch.inference_mode(), settings[name]():
            for _ in range(3): f()
            torch.cuda.synchronize()
            h, w = plain(f)
            gc.disable(); hg, wg = plain(f); gc.enable()
            db = do_bench(f, warmup=25, rep=300)
            tf = time_fn(f, dev, rep_ms=1000).median_ms
            hm = host_ms(f, dev, calls=1, samples=5)
        print(f"{name:24s} plain host {h:6.1f} wall {w:6.1f} | gc off host {hg:6.1f} wall {wg:6.1f} | do_bench {db:6.1f} | bench time_fn {tf:6.1f} host_ms {hm:6.1f}", flush=True)

# every distinct call the UNet makes to each op, and its host cost alone on each backend
calls = collections.OrderedDict()
orig = kernels.registry.dispatch
def spy(op, *a, **k):
    key = (op,) + tuple((tuple(v.shape), tuple(v.stride()), str(v.dtype)) if isinstance(v, torch.Tensor) else v for v in a) + tuple(sorted((kk, vv) for kk, vv in k.items() if not isinstance(vv, torch.Tensor)))
    if key not in calls: calls[key] = [0, a, k]
    calls[key][0] += 1
    return orig(op, *a, **k)
mods = [sys.modules["kernels.attention"], sys.modules["kernels.group_norm_silu"]]
for m in mods: m.dispatch = spy
with torch.inference_mode(), kernels.use("reference"):
    f()
for m in mods: m.dispatch = orig
print(f"--- {len(calls)} distinct op calls per step, {sum(c[0] for c in calls.values())} calls")
tot = collections.Counter()
for key, (n, a, k) in calls.items():
    op = key[0]
    res = {}
    for b in ("reference", "triton") + (("sdpa",) if op == "attention" else ()):
        with torch.inference_mode(), kernels.use(**{op: b}):
            g = lambda: getattr(kernels, op)(*a, **k)
            res[b] = plain(g, 200)
            tot[b] += n * res[b][0]
            if op == "attention" and b != "sdpa": pass
    print(op, n, "x", [s[0] for s in key[1:4] if isinstance(s, tuple)], {b: f"host {r[0]*1e3:.1f} wall {r[1]*1e3:.1f} us" for b, r in res.items()}, flush=True)
print("sum of host ms per step by backend (ops alone):", {b: round(v, 2) for b, v in tot.items()})

for name in ("reference", "triton(explicit)"):
    with torch.inference_mode(), settings[name]():
        for _ in range(3): f()
        torch.cuda.synchronize()
        pr = cProfile.Profile(); pr.enable()
        for _ in range(5): f()
        torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("tottime").print_stats(30)
    print(f"=== cProfile {name}, 5 steps, tottime"); print(s.getvalue()[-7000:])
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("cumulative").print_stats("kernels|sdcore", 40)
    print(f"=== cProfile {name}, cumulative, kernels|sdcore"); print(s.getvalue()[-8000:])
