"""Triton attention vs an fp64 reference: SD head dims (40/80/160, split into a power-of-two head
plus tail), 77 text keys, ragged query/key lengths, the UNet's transposed (B, L, H, D) views,
forward and backward, key lengths around the peeled last key block, explicit launch configs, the
lse-free inference path. The default run uses tiny shapes under the Triton interpreter; `-m gpu`
runs the SD 1.5 / SD 2 shapes."""
import importlib
import math
import os
import re

import pytest
import torch

import kernels
from kernels.attention import (AttentionConfig, _backward, _forward, attention_reference, attention_triton,
                               split_head_dim)
from kernels import testing
from kernels.testing import TOLERANCES, assert_close, assert_within_torch_error

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is the function

# dtype -> how the kernel is judged against fp64: fp32 by max-normalised relative error (TF32 off),
# half precision by flash-attention's rule: at most 2x torch's own error in that dtype + atol
# (atol ~ 2 ulp at |x| = 0.3).
TOL = TOLERANCES["attention"]
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")  # interpreter's tl.dot: bf16 bits as uint16
SHAPES = [  # (B, H, Lq, Lkv, D)
    (1, 2, 37, 77, 40),  # SD1.5 cross-attn: D 40 (padded to 64), 77 text keys, ragged Lq
    (3, 2, 64, 64, 64),  # batch 3, D a power of two (no tail), Lq = Lkv = one block
    (1, 2, 150, 20, 80),  # two query blocks, fewer keys than one block, D 80 = 64 + 16
    (1, 1, 16, 40, 8),  # D 8 below the 16-wide tensor-core minimum (padded head)
    (1, 1, 20, 70, 72),  # D 72 (padded to 128), Lkv not a block multiple
    (1, 1, 24, 33, 160),  # SD1.5 deepest level, D 160 = 128 + 32, small L
]
SD_SHAPES = [  # (B, H, Lq, Lkv, D) at 512x512, batch 2 (CFG)
    (2, 8, 4096, 4096, 40),  # SD1.5 level 1 self-attn over the 64x64 latent
    (2, 8, 4096, 77, 40),  # SD1.5 level 1 cross-attn to 77 text tokens
    (2, 8, 1024, 1024, 80),  # SD1.5 level 2 self-attn
    (2, 8, 256, 256, 160),  # SD1.5 level 3 self-attn
    (2, 5, 4096, 4096, 64),  # SD2 level 1 self-attn (head dim 64)
]


def make_qkv(shape, dtype, device, layout="unet", seed=0):
    """Fresh random q, k, v (B, H, L, D) in the given memory layout, as leaves that can take grads.

    unet: (B, L, H, D) tensors transposed, as sdcore.layers makes them; contiguous: (B, H, L, D);
    kv_slice: q as unet, k and v halves of one fused (B, Lkv, 2, H, D) projection.
    """
    b, h, lq, lkv, d = shape
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "contiguous":
        q, k, v = rand(b, h, lq, d), rand(b, h, lkv, d), rand(b, h, lkv, d)
    elif layout == "unet":
        q, k, v = (rand(b, n, h, d).transpose(1, 2) for n in (lq, lkv, lkv))
    elif layout == "kv_slice":
        q, kv = rand(b, lq, h, d).transpose(1, 2), rand(b, lkv, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        raise ValueError(layout)
    return tuple(t.detach().requires_grad_() for t in (q, k, v))


def attention_fp64(q, k, v, scale=None, causal=False):
    """softmax(q kᵀ · scale) v entirely in fp64; ``causal`` masks keys j > i (top-left aligned)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def check(out, want64, torch_out, dtype, name):
    """Judge ``out`` against fp64 with the dtype's rule from TOL."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    if dtype == torch.float32:
        assert_close(out, want64, rel=TOL[dtype]["rel"], name=name)
    else:
        assert_within_torch_error(out, torch_out, want64, name=name, **TOL[dtype])


def run_forward(shape, dtype, device, layout="unet", config=None, causal=False):
    q, k, v = make_qkv(shape, dtype, device, layout)
    out = torch.full_like(q, float("nan"))  # poison: an element the kernel misses stays NaN
    with torch.no_grad():
        got = attention_triton(q, k, v, causal=causal, out=out, config=config)
        torch_out = attention_reference(q, k, v, causal=causal)
    assert got is out
    check(got, attention_fp64(q, k, v, causal=causal), torch_out, dtype, f"o {shape} {layout} {config} causal={causal}")


def run_backward(shape, dtype, device, poison=False, config=None, layout="unet", scale=None):
    q, k, v = make_qkv(shape, dtype, device, layout)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)  # shared dL/do
    o = attention_triton(q, k, v, scale, config=config)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(attention_fp64(q, k, v, scale), (q, k, v), do.double())
    torch_grads = torch.autograd.grad(attention_reference(q, k, v, scale), (q, k, v), do)
    for name, g, w, t in zip(("dq", "dk", "dv"), got, want, torch_grads):
        check(g, w, t, dtype, f"{name} {shape} scale={scale}")
    if poison:  # the launcher writes every element of caller-given, NaN-filled gradient buffers
        o, lse = _forward(q.detach(), k.detach(), v.detach(), scale)
        bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        _backward(do, q.detach(), k.detach(), v.detach(), o, lse, scale, *bufs)
        for name, g, w in zip(("dq", "dk", "dv"), bufs, want):
            assert_close(g, w, rel=TOL[torch.float32]["rel"] if dtype == torch.float32 else 1e-2, name=name)


@pytest.mark.parametrize("d, want, masked", [
    (80, (64, 16), (64, 16)),  # SD1.5 level 2: exact tail, 37.5% less than the 128 pad
    (160, (128, 32), (128, 32)),  # SD1.5 level 3: exact tail, 37.5% less than the 256 pad
    (40, (64, 0), (32, 16)),  # SD1.5 level 1: masked tail only with SPLIT_MASKED_TAIL
    (72, (128, 0), (64, 16)),
    (64, (64, 0), (64, 0)),
    (8, (16, 0), (16, 0)),  # below the 16-wide tensor-core minimum
    (256, (256, 0), (256, 0)),
])
def test_split_head_dim(d, want, masked, monkeypatch):
    """split_head_dim, and the memoised launch plan, which follows a flip of SPLIT_MASKED_TAIL
    made after it cached the unflipped split."""
    assert split_head_dim(d) == want
    assert attention_module._plan("fwd", d, torch.float32)[:2] == want
    monkeypatch.setattr(attention_module, "SPLIT_MASKED_TAIL", True)
    assert split_head_dim(d) == masked
    assert attention_module._plan("fwd", d, torch.float32)[:2] == masked


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=str)
def test_masked_tail_split(shape, device, monkeypatch):
    """The masked-tail path (40 = 32 + 16, 72 = 64 + 16), off by default, stays correct."""
    monkeypatch.setattr(attention_module, "SPLIT_MASKED_TAIL", True)
    run_forward(shape, torch.float32, device)
    run_backward(shape, torch.float32, device)


def test_masked_tail_split_per_call(device, monkeypatch):
    """AttentionConfig(split_masked_tail=True) takes the 32 + 16 split for one call, whatever the
    module default; the output matches fp64 as the padded path's does."""
    from kernels.attention import AttentionConfig

    real, asked = attention_module.split_head_dim, []
    monkeypatch.setattr(attention_module, "split_head_dim", lambda d, m=None: asked.append(m) or real(d, m))
    q, k, v = make_qkv(SHAPES[0], torch.float32, device)
    want = attention_reference(*(t.detach().double() for t in (q, k, v)))
    with torch.no_grad():
        for split in (True, False):
            got = attention_triton(q, k, v, config=AttentionConfig(32, 32, 4, 2, split_masked_tail=split))
            assert_close(got, want, name=f"split_masked_tail={split}", **TOL[torch.float32])
    assert [m for m in asked if m is not None] == [True, False], f"the config's split choice did not reach the launch: {asked}"
    for bad in ("yes", 1):  # 1 == True, but an int is not the flag
        with pytest.raises(ValueError, match="split_masked_tail"):
            AttentionConfig(32, 32, 4, 2, split_masked_tail=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SD_SHAPES[0], SD_SHAPES[1]], ids=str)
def test_masked_tail_split_sd_shapes_gpu(shape, dtype):
    """The 40 = 32 + 16 split at SD 1.5 level-0 shapes. It crashed on H100 (Triton 3.6) before the
    alignment hint, and a crash poisons the CUDA context: bench/gpu_checks.sh runs this test in its
    own process (stage `split`), and the main `tests` stage deselects it."""
    from kernels.attention import AttentionConfig

    q, k, v = make_qkv(shape, dtype, "cuda")
    want = attention_reference(*(t.detach().double() for t in (q, k, v)))
    torch_same = attention_reference(*(t.detach() for t in (q, k, v)))
    with torch.no_grad():
        for cfg in (AttentionConfig(64, 64, 4, 3, True), AttentionConfig(128, 64, 8, 3, True)):
            got = attention_triton(q, k, v, config=cfg)
            assert_within_torch_error(got, torch_same, want, name=f"{cfg}", **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fp32(shape, device):
    run_forward(shape, torch.float32, device)


@pytest.mark.parametrize("layout", ["contiguous", "kv_slice"])
def test_forward_layouts(layout, device):
    run_forward((2, 3, 37, 77, 40), torch.float32, device, layout)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]], ids=str)
def test_forward_half(shape, dtype, device):
    run_forward(shape, dtype, device)


@pytest.mark.parametrize("shape, scale", [
    (SHAPES[0], None),
    ((3, 1, 150, 20, 80), None),
    (SHAPES[5], None),
    ((1, 2, 19, 21, 80), 0.3),  # a caller's scale, 2.7x D**-0.5: p is recomputed with it, dK and dQ carry it
], ids=str)
def test_backward_fp32(shape, scale, device):
    run_backward(shape, torch.float32, device, poison=shape == SHAPES[0] or scale is not None, scale=scale)


def test_backward_fp16(device):
    run_backward(SHAPES[0], torch.float16, device)


def test_backward_fp16_delta_in_fp32(device):
    """delta = rowsum(dO ∘ O) is summed from fp32 products. Rows of v sharing a large common part
    (64 + N(0, 1)) make dP_ij - delta_i = dO_i · (v_j - o_i) a small difference of two ~500-size
    numbers; the kernel forms dP in fp32 (tl.dot), and fp16 products in delta (ulp 1/16 at 64)
    would put ~2% errors into dS. Held to fp64 math on the kernel's own fp16 o (o's rounding is
    the forward's error, not the backward's): dq, dk, dv are fp16, 2**-11 ≈ 5e-4 relative."""
    q, k, v = (t.detach() for t in make_qkv((1, 2, 16, 16, 64), torch.float16, device, "contiguous"))
    v = v + 64
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, torch.float16)
    o, lse = _forward(q, k, v)
    got = _backward(do, q, k, v, o, lse)
    for name, g, w in zip(("dq", "dk", "dv"), got, _fp64_grads(q, k, v, o, do)):
        assert_close(g, w, rel=2e-3, name=f"{name}, v = 64 + N(0, 1), fp16")


def _fp64_grads(q, k, v, o, do):
    """(dq, dk, dv) in fp64 from the kernel's own o: the backward's error alone (o's rounding is
    the forward's)."""
    q64, k64, v64, do64, o64 = (t.double() for t in (q, k, v, do, o))
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(q64 @ k64.transpose(-1, -2) * scale, -1)
    ds = p * (do64 @ v64.transpose(-1, -2) - (do64 * o64).sum(-1, keepdim=True))
    return scale * ds @ k64, scale * ds.transpose(-1, -2) @ q64, p.transpose(-1, -2) @ do64


def test_backward_fp16_scales_ds_after_its_16_bit_cast(device):
    """dS = P ∘ (dP - delta) is cast to fp16 for the dK and dQ matmuls unscaled, the softmax scale
    applied to their fp32 results. Over 2048 keys with a small upstream gradient dS is ~1e-5: scaled
    by D**-0.5 first, it fell into fp16's subnormals (dk 3.3e-3 from fp64 against 5.8e-4), which
    a rule relative to torch's own fp16 error cannot see (torch scales first too)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *s, c=1.0: (c * torch.randn(*s, generator=g)).to(device, torch.float16)  # noqa: E731
    q, k, v, do = rand(1, 1, 256, 64, c=0.3), rand(1, 1, 2048, 64), rand(1, 1, 2048, 64), rand(1, 1, 256, 64, c=0.01)
    o, lse = _forward(q, k, v)
    got = _backward(do, q, k, v, o, lse)
    for name, g_, w in zip(("dq", "dk", "dv"), got, _fp64_grads(q, k, v, o, do)):
        assert_close(g_, w, rel=1.5e-3, name=f"{name}, 2048 keys, dO ~ 0.01, fp16")


def test_backward_fp16_delta_from_the_16_bit_output_errs_as_sdpa_does():
    """delta = rowsum(dO ∘ O) is taken from the fp16 output, as FlashAttention-2 and SDPA take it.
    One query over two keys with a peaked softmax: the true dq, dk are small next to |dO|·|O|, so
    O's rounding dominates them (up to 3x the gradient itself at some seeds). The kernel's errors
    there are SDPA's (CPU, fp16), seed by seed: no worse than the algorithm both implement."""
    def rel(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 1, n, 72, generator=g).half() for n in (1, 2, 2))
        do = torch.randn(1, 1, 1, 72, generator=g).half()
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(attention_reference(*exact, 0.6), exact, do.double())
        errs = {}
        for name, fn in (("triton", lambda *a: attention_triton(*a, 0.6)),
                         ("sdpa", lambda *a: torch.nn.functional.scaled_dot_product_attention(*a, scale=0.6))):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            errs[name] = [rel(a, e) for a, e in zip(torch.autograd.grad(fn(*leaves), leaves, do), want)]
        for i, grad in enumerate(("dq", "dk", "dv")):
            assert errs["triton"][i] <= 1.05 * errs["sdpa"][i] + 1e-4, (
                f"seed {seed}, {grad}: max-normalised error {errs['triton'][i]:.3e} against SDPA's {errs['sdpa'][i]:.3e}")


def test_writes_stay_inside_their_outputs(device):
    """o, dq, dk and dv written into views of NaN-filled buffers with guard rows past L and guard
    columns past D (40, padded to 64 in the kernels): no store reaches the guard. A store without
    its row or column mask corrupted neighbouring memory, which the CPU tests saw only when the
    allocator happened to crash."""
    b, h, lq, lkv, d = 1, 2, 37, 77, 40
    q, k, v = (t.detach() for t in make_qkv((b, h, lq, lkv, d), torch.float32, device))

    def guarded(n):
        buf = torch.full((b, n + 16, h, 64), float("nan"), device=device)
        return buf, buf[:, :n, :, :d].transpose(1, 2)

    def intact(buf, n, name):
        assert buf[:, n:].isnan().all() and buf[:, :n, :, d:].isnan().all(), f"{name} wrote past its rows or columns"

    buf, out = guarded(lq)
    with torch.no_grad():
        attention_triton(q, k, v, out=out)
    intact(buf, lq, "o")
    o, lse = _forward(q, k, v)
    grads = [guarded(n) for n in (lq, lkv, lkv)]
    _backward(torch.randn_like(q), q, k, v, o, lse, None, *(view for _, view in grads))
    for (gbuf, view), n, name in zip(grads, (lq, lkv, lkv), ("dq", "dk", "dv")):
        intact(gbuf, n, name)
        assert not view.isnan().any(), f"{name} left NaN in its own elements"


def test_dispatch_and_scale(device):
    """kernels.use(attention="triton") routes the public API here, and scale reaches the kernel."""
    q, k, v = make_qkv((1, 2, 37, 77, 40), torch.float32, device)
    with torch.no_grad(), kernels.use(attention="triton"):
        got = kernels.attention(q, k, v, scale=0.3)
    assert kernels.counts().get(("attention", "triton")) == 1, kernels.counts()
    assert_close(got, attention_fp64(q, k, v, scale=0.3), rel=TOL[torch.float32]["rel"], name="o scale=0.3")


@pytest.mark.parametrize("q_shape, q_dtype, k_dtype, match", [
    ((1, 2, 8, 12), torch.float32, torch.float32, "head dim 12 is not a multiple of 8"),
    ((1, 2, 8, 264), torch.float32, torch.float32, "head dim 264 is over the kernel's limit of 256"),
    ((1, 2, 8, 16), torch.float64, torch.float64, "dtype torch.float64"),
])
def test_explicit_backend_refuses(q_shape, q_dtype, k_dtype, match, device):
    q = torch.randn(q_shape, device=device, dtype=q_dtype)
    k = torch.randn(q_shape, device=device, dtype=k_dtype)
    with kernels.use(attention="triton"), pytest.raises(kernels.BackendUnsupported, match=match):
        kernels.attention(q, k, k)


def test_mixed_dtypes_are_refused_by_the_op_and_named_by_the_check(device):
    """q fp16 with k, v fp32 outside autocast: the op refuses it for every backend (TypeError),
    and the triton check, which resolve() and bench read, names it too."""
    q = torch.randn(1, 2, 8, 16, device=device, dtype=torch.float16)
    k = torch.randn(1, 2, 8, 16, device=device)
    with kernels.use(attention="triton"), pytest.raises(TypeError, match="dtypes torch.float16, torch.float32"):
        kernels.attention(q, k, k)
    if device.type == "cuda" or kernels.registry.interpreting():
        assert "dtypes differ" in attention_module._triton_check(q, k, k)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_float64_among_q_k_v_under_autocast_is_refused_by_the_op(device, backend):
    """Autocast casts fp32 and fp16 to its dtype but leaves fp64: q fp32 with k fp64 still differ
    there, and the op says so (the backends failed deep inside matmul or SDPA)."""
    q = torch.randn(1, 2, 5, 8, device=device)
    k = torch.randn(1, 2, 5, 8, device=device, dtype=torch.float64)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=dtype), kernels.use(attention=backend):
        with pytest.raises(TypeError, match="dtypes torch.float32, torch.float64, torch.float32 differ"):
            kernels.attention(q, k, q)
        assert kernels.attention(q, q.double().float(), q).dtype == dtype  # fp32 with fp32: autocast's


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's limit")
def test_interpreter_refuses_bf16():
    """The interpreter's tl.dot multiplies bf16 bit patterns as integers (errors ~1e9 were seen),
    so on CPU the Triton backend refuses bf16 by name rather than return garbage; the default
    backend there is the reference, which stays right."""
    q = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)
    with kernels.use(attention="triton"), pytest.raises(kernels.BackendUnsupported, match="bfloat16 under the Triton interpreter"):
        kernels.attention(q, q, q)
    assert_close(kernels.attention(q, q, q).double(), attention_fp64(q, q, q), rel=1e-2, name="bf16 default on CPU")


def test_bad_arguments(device):
    q, k, v = make_qkv((1, 2, 8, 8, 16), torch.float32, device)
    with pytest.raises(ValueError, match="shape mismatch"):
        kernels.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="does not match"):
        attention_triton(q, k, v, out=torch.empty(1, 2, 8, 8, device=device))
    with pytest.raises(ValueError, match="autograd"):
        attention_triton(q, k, v, out=torch.empty_like(q))
    with torch.no_grad():
        for name, t in (("k", k), ("v", v)):  # every program reads all keys: o written there would race
            with pytest.raises(ValueError, match=f"out overlaps {name}"):
                attention_triton(q, k, v, out=t)
        qc = q.clone()
        assert_close(attention_triton(qc, k, v, out=qc), attention_fp64(q, k, v), rel=2e-5, name="out=q")
        # each program reads its own q rows before writing them: only q itself is safe, not a
        # view of q's storage shifted by a row (programs would overwrite rows others still read)
        buf = torch.randn(1, 2, 9, 16, device=device)
        with pytest.raises(ValueError, match="out overlaps q but is not q itself"):
            attention_triton(buf[:, :, :-1], k, v, out=buf[:, :, 1:])
        pair = torch.randn(2, *q.shape, device=device)  # q in one half of a buffer, out in the other
        assert_close(attention_triton(pair[0], k, v, out=pair[1]), attention_fp64(pair[0], k, v), rel=2e-5,
                     name="out beside q in one buffer")
        with pytest.raises(ValueError, match="several indices"):  # out expanded over heads
            attention_triton(q, k, v, out=torch.empty(1, 1, 8, 16, device=device).expand(1, 2, 8, 16))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal="False"), TypeError, "causal must be a bool, got str 'False'"),  # truthy: the reference masked
    (dict(causal=1), TypeError, "causal must be a bool, got int 1"),
    (dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),  # reference NaN, sdpa its default
    (dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
    # past fp32: torch's "value cannot be converted to type float without overflow" (reference), NaN (triton)
    (dict(scale=1e39), ValueError, "scale 1e+39 is past fp32's range (largest 3.403e+38)"),
], ids=["causal-str", "causal-int", "scale-nan", "scale-inf", "scale-past-fp32"])
def test_arguments_no_backend_reads_alike_are_refused_by_the_op(backend, kwargs, error, match, device):
    """Before dispatch, whichever backend is chosen: backends read these differently (any truthy
    causal was causal to the reference, a TypeError to SDPA)."""
    q, k, v = (t.detach() for t in make_qkv((1, 2, 8, 8, 16), torch.float32, device))
    with kernels.use(attention=backend), pytest.raises(error, match=re.escape(match)):
        kernels.attention(q, k, v, **kwargs)
    with pytest.raises(error, match=re.escape(match)):
        attention_triton(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_head_dim_0_and_a_scale_elsewhere_are_refused_by_the_op(backend):
    """D = 0: the reference raised ZeroDivisionError (0.0 ** -0.5), Triton named a false limit
    ("not a multiple of 8"), SDPA returned an empty tensor. A per-head scale on another device than
    q: torch's "Tensor on device cpu is not on the expected device" from inside the reference."""
    q = torch.zeros(1, 2, 8, 0)
    with kernels.use(attention=backend), pytest.raises(ValueError, match=re.escape("head dim D must be >= 1, "
                                                                                   "got q(1, 2, 8, 0)")):
        kernels.attention(q, q, q)
    q = torch.zeros(1, 2, 8, 16, device="meta")
    with kernels.use(attention=backend), pytest.raises(ValueError, match=re.escape(
            "scale(1, 2, 1, 1) is on cpu, q on meta (a tensor scale goes on q's device, or is a 0-dim CPU tensor)")):
        kernels.attention(q, q, q, scale=torch.full((1, 2, 1, 1), 0.25))


def test_a_head_spanning_2_31_elements_is_refused(device):
    """The kernels index within a head in 32 bits: a (1, 1, 3, 16) view with a row stride of 2**30
    (a 4 GiB storage, allocated but never touched) spans 2**31 elements and is refused by name,
    where it used to read out of bounds; the same view at stride 2**29 is fine and checked."""
    if device.type != "cpu":
        pytest.skip("4 GiB of lazily committed host memory; on a GPU it would be real")
    buf = torch.empty(2**31 + 64, dtype=torch.float16)
    small = torch.randn(1, 1, 3, 16, dtype=torch.float16)
    for stride, ok in ((2**30, False), (2**29, True)):
        q = buf.as_strided((1, 1, 3, 16), (0, 0, stride, 1))
        for row in range(3):
            q[0, 0, row] = small[0, 0, row]  # touches 3 pages
        k = v = small
        with kernels.use(attention="triton"), torch.no_grad():
            if ok:  # the same kernel on the same values: bit-equal to the contiguous call
                assert torch.equal(kernels.attention(q, k, v), kernels.attention(small, k, v)), "stride 2**29"
            else:
                with pytest.raises(kernels.BackendUnsupported, match=r"spans 2147483663 elements within a head"):
                    kernels.attention(q, k, v)


def test_an_out_spanning_2_31_elements_in_a_head_is_refused():
    """out is indexed within a head in 32 bits like q: a (1, 1, 9, 16) fp16 out with a row stride
    of 2**28 spans 2**31 + 15 elements and is refused by name before any launch. Its storage is
    4 GiB of host memory, allocated and never touched: nothing may write to it (with the check
    gone the kernel's 32-bit offsets would wrap, a segfault)."""
    q = torch.randn(1, 1, 9, 16, dtype=torch.float16)
    out = torch.empty(2**31 + 64, dtype=torch.float16).as_strided(q.shape, (0, 0, 2**28, 1))
    with pytest.raises(ValueError, match=r"out\(1, 1, 9, 16\) .* spans 2147483663 elements within a head"):
        attention_triton(q, q, q, out=out)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_tensor_scale_of_several_elements_is_refused_by_name(device, backend):
    """One scale per head, (1, H, 1, 1): the reference takes it; the kernels and SDPA take one number."""
    q, k, v = make_qkv((1, 2, 8, 8, 16), torch.float32, device)
    per_head = torch.tensor([0.5, 0.25], device=device).view(1, 2, 1, 1)
    with kernels.use(attention=backend), pytest.raises(kernels.BackendUnsupported, match="tensor of 2 elements"):
        kernels.attention(q, k, v, per_head)
    with kernels.use(attention="reference"):
        got = kernels.attention(q, k, v, per_head)
    for i, s in enumerate((0.5, 0.25)):
        assert_close(got[:, i], attention_reference(q, k, v, s)[:, i], rel=1e-6, name=f"head {i} at scale {s}")


@pytest.mark.parametrize("shape", [(2,), (2, 1), (1, 2, 1), (1, 2, 1, 7), (3, 2, 1, 1), (1, 1, 1, 1, 1)])
def test_tensor_scale_that_does_not_broadcast_per_head_is_refused(device, shape):
    """A (H,) scale would broadcast over the key axis, silently wrong where Lkv == H (Lkv = 2 here):
    a tensor scale is one number or (B|1, H|1, 1, 1), else a ValueError naming the shape."""
    q, k, v = make_qkv((1, 2, 8, 2, 16), torch.float32, device)
    scale = torch.full(shape, 0.5, device=device)
    with kernels.use(attention="reference"), pytest.raises(ValueError, match=re.escape(
            f"(B|1, H|1, 1, 1) = (1|1, 2|1, 1, 1) to scale the (B, H, Lq, Lkv) scores; got shape {shape}")):
        kernels.attention(q, k, v, scale)


@pytest.mark.parametrize("shape", [(2, 1, 1), (1, 2, 1, 1), (3, 2, 1, 1), (3, 1, 1, 1)])
def test_per_head_and_per_batch_tensor_scales_are_taken(device, shape):
    """Any shape that broadcasts as (B|1, H|1, 1, 1), (H, 1, 1) too, scales each entry's scores."""
    q, k, v = make_qkv((3, 2, 8, 7, 16), torch.float32, device)
    scale = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device) + 0.1
    with kernels.use(attention="reference"):
        got = kernels.attention(q, k, v, scale)
    full = scale.expand(3, 2, 1, 1)
    for i in range(3):
        for j in range(2):
            want = attention_reference(q[i:i + 1, j:j + 1], k[i:i + 1, j:j + 1], v[i:i + 1, j:j + 1], full[i, j].item())
            assert_close(got[i:i + 1, j:j + 1], want, rel=1e-6, name=f"entry {i}, head {j}, scale shaped {shape}")


@pytest.mark.parametrize("backend", ["reference", "triton", "sdpa"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
def test_one_element_tensor_scale_is_taken_by_every_backend(device, backend, shape):
    q, k, v = make_qkv((1, 2, 8, 7, 16), torch.float32, device)
    with kernels.use(attention=backend):
        got = kernels.attention(q, k, v, torch.full(shape, 0.3, device=device))
    assert_close(got, attention_reference(q, k, v, 0.3), rel=2e-5, name=f"{backend}, scale shaped {shape}")


@pytest.mark.parametrize("backend, reads", [("reference", 0), ("triton", 2), ("sdpa", 1)])
def test_a_tensor_scale_is_read_on_the_host_as_few_times_as_the_backend_needs(backend, reads):
    """Each read of a GPU tensor's value is a host sync. The Triton kernel takes the scale as a
    float: the switch's check reads it (> 0) and the launch once more; it was read a third time
    by a second check after the switch's. SDPA's float is one read, the reference none."""
    q, k, v = make_qkv((1, 2, 8, 7, 16), torch.float32, "cpu")
    scale = torch.tensor(0.3)
    with testing.HostReads() as seen, kernels.use(attention=backend):
        kernels.attention(q, k, v, scale)
    assert sum(seen.seen.values()) == reads, f"{backend}: {dict(seen.seen)}"


def test_tensor_scale_that_requires_grad_is_not_taken(device):
    """The kernel reads scale as a float: a scale that wants a gradient is refused by name when
    triton is chosen, and by default falls back to the reference, which gives it one."""
    q, k, v = make_qkv((1, 2, 8, 8, 16), torch.float32, device)
    scale = torch.tensor(0.3, requires_grad=True)
    with kernels.use(attention="triton"), pytest.raises(kernels.BackendUnsupported, match="scale is a tensor"):
        kernels.attention(q, k, v, scale=scale)
    assert attention_module._triton_check(q, k, v, scale=torch.tensor(0.3)) is None  # no grad: a float will do


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_learnable_scale_is_taken_where_no_gradient_flows(device, backend, mode):
    """A scale that requires grad (an nn.Parameter) is a float to the kernel when grad mode is off:
    it was refused under no_grad / inference_mode too, so a model with a learnable temperature
    fell back to the reference (default) or raised (explicit) at inference."""
    q, k, v = make_qkv((1, 2, 8, 8, 16), torch.float32, device)
    scale = torch.nn.Parameter(torch.tensor(0.3, device=device))
    with mode(), kernels.use(attention=backend):
        got = kernels.attention(q, k, v, scale=scale)
    assert_close(got, attention_fp64(q, k, v, 0.3), rel=2e-5, name=f"{backend} under {mode.__name__}")


def test_grid_limit_on_batch_times_heads(device):
    q = torch.zeros(1, 1, 8, 16, device=device).expand(4097, 16, 8, 16)  # B·H = 65552 > 65535
    assert "B·H = 65552 programs on the grid's second axis, over CUDA's 65535" in attention_module._triton_check(q, q, q)
    assert attention_module._triton_check(q[:4095], q[:4095], q[:4095]) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=str)
def test_forward_sd_shapes(shape, dtype, device):
    run_forward(shape, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [80, 160])
@pytest.mark.parametrize("lkv", [20, 33, 64, 77, 200])
def test_split_head_key_counts_gpu(lkv, d, dtype, device):
    """Split head dims (80 = 64 + 16, 160 = 128 + 32) at key counts below one block (a key loop
    that runs zero times), at one block and ragged: on the H100 (Triton 3.6) a peeled last key
    block after such a loop read out-of-range shared memory at 33 keys (compute-sanitizer), and
    faulted every later test in the process."""
    run_forward((1, 2, 24, lkv, d), dtype, device)
    run_backward((1, 2, 24, lkv, d), dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_backward_sd_shape(dtype, device):
    run_backward((2, 8, 1024, 1024, 80), dtype, device, poison=dtype == torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["unet", "contiguous", "kv_slice"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_head_dim_40_layouts_gpu(layout, dtype, device):
    """D = 40 in every layout, forward and backward: each takes the 16-byte alignment hints
    (head stride 40 in the UNet's, row stride 40 in the contiguous one), which are only true
    because _align checked the strides; a wrong hint would read misaligned rows."""
    run_forward((2, 8, 1024, 77, 40), dtype, device, layout)
    run_backward((2, 8, 333, 333, 40), dtype, device, layout=layout)


def test_alignment_hint_needs_every_stride_aligned():
    """_align hints 16-byte rows only when the batch, head and row strides of every tensor are
    multiples of 16 bytes (size-1 dims aside, whose stride is never used)."""
    from kernels.attention import _align

    f16 = torch.float16
    contiguous = torch.empty(2, 8, 77, 40, dtype=f16)  # row stride 40 = 80 bytes
    unet = torch.empty(2, 77, 8 * 40, dtype=f16).unflatten(-1, (8, 40)).transpose(1, 2)  # head stride 40
    assert _align(contiguous) == _align(unet) == _align(contiguous, unet) == 8
    assert _align(torch.empty(2, 8, 77, 40)) == 4  # fp32: 4 elements to 16 bytes
    rows_44 = torch.empty(2, 8, 77, 44, dtype=f16)[..., :40]  # row stride 44 = 88 bytes
    rows_only = torch.empty(2, 8, 80, 44, dtype=f16)[:, :, :77, :40]  # row 44; head 3520 and batch aligned
    heads_44 = torch.empty(2, 77, 8, 44, dtype=f16)[..., :40].transpose(1, 2)  # head stride 44, row 352
    batch_odd = torch.empty(2 * 8 * 77 * 40 + 4, dtype=f16)[:-4].as_strided((2, 8, 77, 40), (8 * 77 * 40 + 4, 77 * 40, 40, 1))
    for bad in (rows_44, rows_only, heads_44, batch_odd):
        assert _align(contiguous, bad) == 1, bad.stride()
    one_batch = torch.empty(8 * 77 * 40, dtype=f16).as_strided((1, 8, 77, 40), (3, 77 * 40, 40, 1))
    assert _align(one_batch) == 8


CAUSAL_SHAPES = [  # (B, H, Lq, Lkv, D)
    (2, 2, 77, 77, 64),  # the CLIP text encoder: 77 tokens, causal, D 64 (ViT-L/14 and ViT-H/14)
    (1, 3, 77, 77, 40),  # several query blocks, padded head dim
    (1, 1, 20, 70, 16),  # Lq < Lkv: top-left aligned like SDPA's is_causal (query i sees keys <= i)
]


@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_causal_forward_backward_fp32(shape, device):
    q, k, v = make_qkv(shape, torch.float32, device, "unet")
    want = attention_fp64(q, k, v, causal=True)
    out = torch.full_like(q, float("nan"))
    with torch.no_grad():
        assert_close(attention_triton(q, k, v, causal=True, out=out), want, rel=2e-5, name=f"causal o {shape}")
        assert_close(attention_module.attention_reference(q, k, v, causal=True), want, rel=2e-5,
                     name=f"causal reference {shape}")
        assert_close(attention_module.attention_sdpa(q, k, v, causal=True), want, rel=2e-5,
                     name=f"causal sdpa {shape}")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    got = torch.autograd.grad(attention_triton(q, k, v, causal=True), (q, k, v), do)
    ref = torch.autograd.grad(attention_fp64(q, k, v, causal=True), (q, k, v), do.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, ref):
        assert_close(g, w, rel=2e-5, name=f"causal {name} {shape}")


def test_causal_really_masks(device):
    """Changing a future key must not change an earlier query's output (and must change a later one)."""
    q, k, v = (t.detach() for t in make_qkv((1, 1, 10, 10, 16), torch.float32, device, "contiguous"))
    with kernels.use(attention="triton"):
        before = kernels.attention(q, k, v, causal=True)
        k2, v2 = k.clone(), v.clone()
        k2[..., 7, :] += 3.0
        v2[..., 7, :] -= 3.0
        after = kernels.attention(q, k2, v2, causal=True)
    assert torch.equal(before[..., :7, :], after[..., :7, :]), "a query saw a future key"
    assert not torch.allclose(before[..., 7:, :], after[..., 7:, :]), "queries >= 7 ignored key 7"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_causal_clip_shape_gpu(dtype, device):
    q, k, v = make_qkv((2, 12, 77, 77, 64), dtype, device, "unet")
    with torch.no_grad():
        out = attention_triton(q, k, v, causal=True)
        torch_out = attention_module.attention_reference(q, k, v, causal=True)
    check(out, attention_fp64(q, k, v, causal=True), torch_out, dtype, "causal clip")


# The forward runs full key blocks without masks and peels the LKV % BLOCK_N remainder into one
# masked step of TAIL_N keys (tail_block); these lengths put that boundary everywhere, at BLOCK_N = 32
# (given explicitly).
KEY_LENGTHS = [
    64,  # a multiple of BLOCK_N: two unmasked blocks, no peeled step
    50,  # one full block, then an 18-key remainder in a full-width (32) masked block
    20,  # fewer keys than one block: only the masked step runs
    1,  # a single key: the softmax is exactly 1, o = v (a 16-key tail block)
    77,  # SD text context: two full blocks, then 13 keys in a 16-key tail block
]
BLOCK_N_32 = AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize("lkv", KEY_LENGTHS)
def test_key_lengths(lkv, device):
    run_forward((1, 2, 19, lkv, 40), torch.float32, device, config=BLOCK_N_32)
    run_forward((1, 1, 19, lkv, 80), torch.float32, device, config=BLOCK_N_32)  # head + tail


def test_tail_block():
    # (Lkv, BLOCK_N) -> width of the peeled block: the remainder padded to a power of two in [16, BLOCK_N]
    cases = {(77, 64): 16, (84, 64): 32, (100, 64): 64, (128, 64): 0, (1, 64): 16, (13, 16): 16,
             (50, 32): 32, (4096, 64): 0, (4097, 128): 16}
    got = {case: attention_module.tail_block(*case) for case in cases}
    assert got == cases


@pytest.mark.parametrize("lkv", [1, 77, 84])  # tail blocks of 16, 16 and 32 keys after 64-key blocks
def test_key_lengths_default_config(lkv, device):
    run_forward((1, 2, 19, lkv, 40), torch.float32, device)
    run_forward((1, 2, 19, lkv, 40), torch.float16, device)


def _spy_launches(monkeypatch, names):
    """Record (kernel, grid[0], BLOCK_M, BLOCK_N, num_warps, num_stages) of each launch of ``names``
    (Q_BLOCKS in BLOCK_N's place for the K/V-resident forward, which has no key block)."""
    launches = []
    for name in names:
        real = getattr(attention_module, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                def launch(*args, **kwargs):
                    named = {**dict(zip(real.arg_names, args)), **kwargs}
                    block = "BLOCK_N" if "BLOCK_N" in named else "Q_BLOCKS"
                    launches.append((name, grid[0], *(named[n] for n in ("BLOCK_M", block, "num_warps", "num_stages"))))
                    return real[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(attention_module, name, Spy())
    return launches


SWEEP = [  # AttentionConfig(BLOCK_M, BLOCK_N, num_warps, num_stages), as a benchmark sweep passes them
    AttentionConfig(16, 16, 1, 2),  # smallest tiles: 77 keys = 4 full blocks + 13 (stages 1: see CONFIGS)
    AttentionConfig(32, 32, 2, 2),
    AttentionConfig(64, 64, 4, 3),  # the table's 16-bit choice, used as given in fp32 (no halving)
    AttentionConfig(16, 64, 4, 2),  # BLOCK_N > BLOCK_M
    AttentionConfig(64, 16, 8, 2),  # BLOCK_M > BLOCK_N
]


@pytest.mark.parametrize("config", SWEEP, ids=str)
def test_explicit_config(config, device, monkeypatch):
    launches = _spy_launches(monkeypatch, ["_attn_fwd_kernel"])
    run_forward((1, 2, 37, 77, 40), torch.float32, device, config=config)  # padded head dim, ragged Lq
    run_forward((1, 1, 20, 48, 80), torch.float32, device, config=config)  # split head dim 64 + 16
    c = config
    assert launches == [("_attn_fwd_kernel", -(-lq // c.block_m), c.block_m, c.block_n, c.num_warps, c.num_stages)
                        for lq in (37, 20)]


@pytest.mark.parametrize("config", [SWEEP[0], SWEEP[3], SWEEP[4]], ids=str)
@pytest.mark.parametrize("shape", [
    (1, 2, 37, 37, 40),  # CLIP-like self-attention, several query and key blocks
    (1, 1, 40, 21, 16),  # Lq > Lkv: queries i >= 21 see every key
], ids=str)
def test_explicit_config_causal(config, shape, device):
    run_forward(shape, torch.float32, device, config=config, causal=True)


def test_explicit_config_backward(device):
    """A bare AttentionConfig sets the autograd forward's launch (the backward keeps the table)."""
    run_backward((1, 2, 37, 77, 40), torch.float32, device, config=SWEEP[3])


@pytest.mark.parametrize("d", [40, 80], ids=lambda d: f"D{d}")  # padded; split head + tail
def test_per_kernel_config_backward(d, device, monkeypatch):
    """config={"fwd": .., "dkdv": .., "dq": ..} reaches each of the three launches, as `bench tune`
    sweeps the backward, and the gradients stay right with tiles unlike the table's."""
    lq, lkv = 37, 21  # ragged against every block size below
    configs = {"fwd": AttentionConfig(16, 32, 2, 2), "dkdv": AttentionConfig(16, 32, 2, 2),
               "dq": AttentionConfig(32, 16, 4, 3)}
    launches = _spy_launches(monkeypatch, ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"])
    run_backward((1, 2, lq, lkv, d), torch.float32, device, config=configs)
    f, kv, dq = configs["fwd"], configs["dkdv"], configs["dq"]
    assert launches == [
        ("_attn_fwd_kernel", -(-lq // f.block_m), f.block_m, f.block_n, f.num_warps, f.num_stages),
        ("_attn_bwd_dkdv_kernel", -(-lkv // kv.block_n), kv.block_m, kv.block_n, kv.num_warps, kv.num_stages),
        ("_attn_bwd_dq_kernel", -(-lq // dq.block_m), dq.block_m, dq.block_n, dq.num_warps, dq.num_stages),
    ], launches
    launches.clear()  # a kernel left out of the mapping keeps its CONFIGS row
    run_backward((1, 2, lq, lkv, d), torch.float32, device, config={"dq": configs["dq"]})
    table = attention_module._plan("dkdv", d, torch.float32)[3:]
    assert launches[1] == ("_attn_bwd_dkdv_kernel", -(-lkv // table[1]), *table), launches
    assert launches[2][2:] == (dq.block_m, dq.block_n, dq.num_warps, dq.num_stages), launches


def test_inference_writes_no_lse(device, monkeypatch):
    """Grad disabled, no input requiring grad, or out=: no lse; the autograd forward still writes
    it, equal to log2 sum_j exp(scale q_i . k_j), and the same o."""
    shape = (1, 2, 37, 77, 40)
    q, k, v = make_qkv(shape, torch.float32, device)
    lses = []
    real = attention_module._forward

    def spy(*args, **kwargs):
        o, lse = real(*args, **kwargs)
        lses.append(lse)
        return o, lse

    monkeypatch.setattr(attention_module, "_forward", spy)
    with torch.no_grad():
        o_no_grad = attention_triton(q, k, v)
    o_no_leaf = attention_triton(q.detach(), k.detach(), v.detach())
    o_out = attention_triton(q.detach(), k.detach(), v.detach(), out=torch.full_like(q, float("nan")))
    o_grad = attention_triton(q, k, v)
    assert [lse is None for lse in lses] == [True, True, True, False], lses
    assert o_grad.requires_grad and not o_no_grad.requires_grad
    want = attention_fp64(q, k, v)
    for name, o in (("no_grad", o_no_grad), ("no leaf", o_no_leaf), ("out=", o_out), ("autograd", o_grad)):
        assert_close(o, want, rel=TOL[torch.float32]["rel"], name=f"o {name}")
    assert_close(o_no_grad, o_grad, rel=1e-6, name="o inference vs autograd")
    s = q.double() @ k.double().transpose(-1, -2) * shape[-1] ** -0.5
    assert_close(lses[-1], torch.logsumexp(s, -1) / math.log(2), rel=1e-6, name="lse2 of the autograd forward")


# The K/V-resident forward (AttentionConfig.q_blocks): each program holds every key of its head in
# two blocks (split_keys) and walks q_blocks query blocks. These key counts put that split everywhere.
RESIDENT_KEYS = [
    1,  # one key, in a 16-key block: the softmax is exactly 1, o = v
    13,  # fewer keys than one 16-key block
    64,  # a power of two: one block, no tail block
    77,  # SD's text context: 64 + 13 keys held as 64 + 16
    100,  # 64 + 36, held as 64 + 64
    128,  # SHORT_KV, the most it takes: one 128-key block
]
RESIDENT = AttentionConfig(16, 16, 1, 2, q_blocks=2)


def test_split_keys():
    cases = {1: (16, 0), 13: (16, 0), 16: (16, 0), 17: (16, 16), 64: (64, 0), 77: (64, 16), 100: (64, 64),
             128: (128, 0)}
    assert {n: attention_module.split_keys(n) for n in cases} == cases


@pytest.mark.parametrize("lkv", RESIDENT_KEYS)
def test_resident_key_lengths(lkv, device):
    """37 queries in 16-query blocks: 3 blocks, so at q_blocks = 2 the second program walks one,
    ragged; and 20 queries at D 80 (head + tail columns)."""
    run_forward((1, 2, 37, lkv, 40), torch.float32, device, config=RESIDENT)
    run_forward((1, 1, 20, lkv, 80), torch.float32, device, config=RESIDENT)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_resident_forward_shapes(shape, device):
    """The forward cases above, fp32 and fp16, in the UNet's layout and a contiguous one (the key
    counts over SHORT_KV are not this kernel's)."""
    config = AttentionConfig(32, 16, 2, 3, q_blocks=3)
    run_forward(shape, torch.float32, device, config=config)
    run_forward(shape, torch.float16, device, layout="contiguous", config=config)


@pytest.mark.parametrize("shape", [(1, 2, 37, 37, 40), (1, 1, 40, 21, 16)], ids=str)  # CLIP-like; Lq > Lkv
def test_resident_causal(shape, device):
    run_forward(shape, torch.float32, device, config=RESIDENT, causal=True)


# numpy's warnings from the interpreter on rows that are NaN by construction: padded query rows
# (q = 0, and 0 · -inf) and, causal, queries < 32, which see no finite score (as in torch)
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:.* encountered in:RuntimeWarning")
@pytest.mark.parametrize("config, d, causal", [
    (None, 40, False),  # the table's tiles (fp32: 32-key blocks), padded head dim
    (SWEEP[0], 40, False),  # 16-key blocks: two wholly -inf blocks before the first finite score
    (SWEEP[0], 80, False),  # split head dim 64 + 16
    (SWEEP[0], 16, True),  # causal: the -inf blocks come before the diagonal
    (RESIDENT, 40, False),  # K/V-resident: the row max over every key first
], ids=["table-D40", "16x16-D40", "16x16-D80-split", "16x16-D16-causal", "resident-D40"])
def test_key_blocks_scoring_minus_inf(config, d, causal, device):
    """Keys whose every score is -inf (k = -inf against positive q) over whole key blocks, before
    any finite score: the online softmax's running max stays -inf through them, and exp2(-inf - -inf)
    would be NaN. torch and SDPA give the softmax over the finite keys; so must the kernel."""
    b, h, lq, lkv = 1, 2, 37, 50
    g = torch.Generator().manual_seed(3)
    q = (torch.rand(b, h, lq, d, generator=g) + 0.1).to(device)  # every q · k_j = -inf where k_j = -inf
    k, v = (torch.randn(b, h, lkv, d, generator=g).to(device) for _ in range(2))
    k[..., :32, :] = float("-inf")  # two 16-key blocks, one 32-key block
    want = attention_fp64(q, k, v, causal=causal)[..., 32:, :] if causal else attention_fp64(q, k, v)
    out = torch.full_like(q, float("nan"))
    with torch.no_grad():
        got = attention_triton(q, k, v, causal=causal, out=out, config=config)
    got = got[..., 32:, :] if causal else got  # causal: queries < 32 see only -inf keys (NaN, as in torch)
    assert_close(got, want, rel=TOL[torch.float32]["rel"], name=f"o, 32 keys at -inf, {config} D{d} causal={causal}")


def test_resident_backward(device):
    """The autograd forward's lse, written by the K/V-resident kernel, drives the backward kernels."""
    run_backward((1, 2, 37, 77, 40), torch.float32, device, config=RESIDENT)
    run_backward((1, 1, 20, 21, 80), torch.float32, device, config={"fwd": RESIDENT})


@pytest.mark.parametrize("q_blocks", [1, 2, 5])  # 5 is more than the 3 query blocks there are
def test_resident_grid(q_blocks, device, monkeypatch):
    """One program per q_blocks query blocks, on the resident kernel only, q_blocks clamped to the
    blocks there are (one launch key for all such values, no start offset past Lq); without
    q_blocks the streaming kernel runs."""
    launches = _spy_launches(monkeypatch, ["_attn_fwd_kernel", "_attn_fwd_resident_kernel"])
    config = AttentionConfig(16, 16, 1, 2, q_blocks=q_blocks)
    run_forward((1, 2, 37, 77, 40), torch.float32, device, config=config)
    run_forward((1, 2, 37, 77, 40), torch.float32, device, config=BLOCK_N_32)
    assert launches == [("_attn_fwd_resident_kernel", -(-3 // q_blocks), 16, min(q_blocks, 3), 1, 2),
                        ("_attn_fwd_kernel", 2, 32, 32, 4, 2)], launches


def test_resident_row_in_the_table(device, monkeypatch):
    """A fifth value in a CONFIGS["fwd_short_kv"] row, Q_BLOCKS, makes the K/V-resident forward the
    default there (how a GPU sweep's winner gets written in); forwards over more keys keep theirs."""
    rows = {**attention_module.CONFIGS["fwd_short_kv"], 40: (16, 16, 1, 2, 2)}  # the D 40 row
    monkeypatch.setitem(attention_module.CONFIGS, "fwd_short_kv", rows)
    monkeypatch.setattr(attention_module, "_PLANS", {})
    launches = _spy_launches(monkeypatch, ["_attn_fwd_kernel", "_attn_fwd_resident_kernel"])
    run_forward((1, 2, 37, 77, 40), torch.float16, device)
    run_forward((1, 2, 37, 130, 40), torch.float16, device)
    assert launches[0] == ("_attn_fwd_resident_kernel", 2, 16, 2, 1, 2), launches
    assert [launch[0] for launch in launches[1:]] == ["_attn_fwd_kernel"], launches


def test_resident_row_max_spans_both_key_blocks(device):
    """The row max is taken over both resident blocks: with key 70 of 77 (second block) scoring
    about 230 in log2 units for every query, a max over the first block alone would overflow exp2
    (inf, then NaN). The lse must name that key's score too."""
    q, k, v = (t.detach().clone() for t in make_qkv((1, 2, 37, 77, 40), torch.float32, device))
    q[..., 0] = 4.0
    k[:, :, 70, 0] = 250.0
    o, lse = attention_module._forward(q, k, v, None, None, False, RESIDENT, True)
    assert_close(o, attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name="o, a dominant key in block 2")
    s = q.double() @ k.double().transpose(-1, -2) * 40 ** -0.5
    assert_close(lse, torch.logsumexp(s, -1) / math.log(2), rel=1e-6, name="lse2, a dominant key in block 2")


@pytest.mark.parametrize("causal", [False, True])
def test_resident_masked_tail_split(causal, device):
    """The K/V-resident forward with the 40 = 32 + 16 head split (8 masked tail columns)."""
    config = AttentionConfig(16, 16, 1, 2, split_masked_tail=True, q_blocks=2)
    run_forward((1, 2, 37, 77 if not causal else 37, 40), torch.float32, device, config=config, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [AttentionConfig(64, 64, 4, 3, q_blocks=4),
                                    AttentionConfig(128, 64, 8, 2, q_blocks=2)], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160),
                                   (2, 5, 9216, 77, 64)], ids=str)  # SD 1.5's cross-attention levels; SD 2.1 at 768 px
def test_resident_sd_shapes_gpu(shape, config, dtype, device):
    run_forward(shape, dtype, device, config=config)


def test_resident_limits(device):
    q, k, v = (t.detach() for t in make_qkv((1, 1, 8, 129, 16), torch.float32, device))
    with pytest.raises(ValueError, match="q_blocks = 2 asks for the K/V-resident forward, which holds every key: "
                                         "it takes at most SHORT_KV = 128 keys, got Lkv = 129"):
        attention_triton(q, k, v, config=RESIDENT)
    with pytest.raises(ValueError, match=re.escape("config['dq'].q_blocks = 2: only the forward has a K/V-resident")):
        attention_triton(q, k, v, config={"dq": RESIDENT})


@pytest.mark.parametrize("field, value", [
    ("block_m", 8),  # below the 16-wide tl.dot minimum
    ("block_n", 48),  # not a power of two
    ("block_n", 0),
    ("block_m", 32.0),  # not an int
    ("num_warps", 32),
    ("num_warps", 3),
    ("num_warps", 0),
    ("num_stages", 0),
    ("num_stages", True),  # a bool is not a stage count
    ("q_blocks", 0),
    ("q_blocks", 2.0),
    ("q_blocks", True),
])
def test_bad_config_names_the_field(field, value):
    good = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match=re.escape(f"AttentionConfig.{field} = {value!r}: must be")):
        AttentionConfig(**{**good, field: value})


def test_config_and_scale_arguments(device):
    q, k, v = (t.detach() for t in make_qkv((1, 2, 8, 8, 16), torch.float32, device))
    with pytest.raises(TypeError, match="AttentionConfig"):
        attention_triton(q, k, v, config=(64, 64, 4, 2))
    with pytest.raises(ValueError, match="config key 'bwd': the kernels are 'fwd', 'dkdv', 'dq'"):
        attention_triton(q, k, v, config={"bwd": AttentionConfig(16, 16, 1, 2)})
    with pytest.raises(TypeError, match=r"config\['dq'\] must be an AttentionConfig, not tuple"):
        attention_triton(q, k, v, config={"dq": (16, 16, 1, 2)})
    for bad in (-0.5, 0.0):  # scale 0 would make masked scores -inf * 0 = NaN
        with pytest.raises(kernels.BackendUnsupported, match=f"scale {bad} is not > 0"):  # the reference takes it
            attention_triton(q, k, v, scale=bad)
    for bad in (-0.5, 0.0, float("nan")):  # NaN: refused by the op's own checks first, for every backend
        assert f"scale {bad} is not > 0" in attention_module._triton_check(q, k, v, bad)
    # within fp32, but not once the kernel multiplies it by log2(e): inf there, every output NaN
    assert "scale 3e+38 times log2(e) is past fp32's largest" in attention_module._triton_check(q, k, v, 3e38)
    assert attention_module._triton_check(q, k, v, 2e38) is None
    # positive, but 0 (or subnormal) in fp32 once times log2(e): masked scores -inf * 0 gave NaN rows
    assert "scale 1e-46 times log2(e) is below fp32's smallest normal" in attention_module._triton_check(q, k, v, 1e-46)
    assert "smallest normal" in attention_module._triton_check(q, k, v, 1e-39)
    assert attention_module._triton_check(q, k, v, 1e-37) is None


@pytest.mark.parametrize("causal, lq", [(False, 9), (True, 11)])  # causal: square, as CLIP's
def test_double_backward_matches_reference(device, causal, lq):
    """create_graph=True (a gradient penalty): the Triton backward is recomputed differentiably
    through the reference, with the call's scale and mask, so dq and d(|dq|^2)/dv equal the
    reference's, not a silent zero."""
    q, k, v = make_qkv((1, 2, lq, 11, 16), torch.float32, device)
    dqs, dvs = [], []
    for fn in (attention_triton, attention_reference):
        (dq,) = torch.autograd.grad(fn(q, k, v, 0.3, causal).sum(), (q,), create_graph=True)
        dqs.append(dq)
        dvs.append(torch.autograd.grad(dq.square().sum(), (v,))[0])
    assert dvs[1].abs().max() > 0.1, "the test needs a non-trivial second derivative"
    assert_close(dqs[0], dqs[1].double(), rel=1e-5, name=f"dq, causal={causal}")
    assert_close(dvs[0], dvs[1].double(), rel=1e-5, name=f"d|dq|^2/dv, causal={causal}")


def test_fp16_raw_scores_beyond_fp16_range(device):
    """q·k of ~102 400 overflows fp16 (max 65 504) but the scaled score, ~12 800, fits: both
    backends scale before rounding (the reference used to round q·k to fp16 first: inf, then NaN).
    The kernel keeps scores in fp32, so it is held to fp64. The reference rounds scaled scores to
    fp16 (ulp 8 at 12 800), as diffusers' attention without upcast does, so it is held to fp64
    math on those rounded scores."""
    g = torch.Generator().manual_seed(0)
    q = (40 + 0.1 * torch.randn(1, 2, 5, 64, generator=g)).to(device, torch.float16)
    k = (40 + 0.1 * torch.randn(1, 2, 7, 64, generator=g)).to(device, torch.float16)
    v = torch.randn(1, 2, 7, 64, generator=g).to(device, torch.float16)
    raw = q.double() @ k.double().transpose(-1, -2)
    assert raw.min() > 65504, "the test needs raw scores beyond fp16"
    rounded_scores = (raw * 64 ** -0.5).half().double()
    with torch.no_grad():
        for name, got, want in (("triton", attention_triton(q, k, v), attention_fp64(q, k, v)),
                                ("reference", attention_reference(q, k, v),
                                 rounded_scores.softmax(-1) @ v.double())):
            assert got.isfinite().all(), f"{name}: {(~got.isfinite()).sum().item()} non-finite outputs"
            assert_close(got, want, rel=2e-3, name=f"{name} fp16 with raw scores > 65504")


def test_forwards_read_the_table_for_their_key_count(device, monkeypatch):
    """Forwards over <= SHORT_KV keys (cross-attention) read CONFIGS["fwd_short_kv"], over >= LONG_KV
    keys (768 px self-attention) CONFIGS["fwd_long_kv"], others CONFIGS["fwd"], so a sweep can tune
    each apart. Checked at both sides of each cut; the long calls use tiny Lq and D to stay fast."""
    kinds = []
    real = attention_module._plan
    monkeypatch.setattr(attention_module, "_plan", lambda kind, d, dtype: kinds.append(kind) or real(kind, d, dtype))
    sk, lk = attention_module.SHORT_KV, attention_module.LONG_KV
    for lkv in (77, sk, sk + 1, lk - 1, lk):
        q, k, v = make_qkv((1, 1, 3, lkv, 16), torch.float32, device)
        with torch.no_grad():
            attention_triton(q, k, v)
    assert kinds == ["fwd_short_kv", "fwd_short_kv", "fwd", "fwd", "fwd_long_kv"], kinds
    for kind in ("fwd_short_kv", "fwd_long_kv"):
        assert set(attention_module.CONFIGS[kind]) == set(attention_module.CONFIGS["fwd"]), kind


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_casts_inputs_as_matmul_does(in_dtype, device):
    """Under autocast the reference's matmuls (and SDPA) run in autocast's dtype; the Triton backend
    casts q, k, v the same way, so switching backends keeps the output dtype and its rounding.
    fp32 and bf16 inputs under fp16 autocast: both come out fp16, within fp16's error."""
    q, k, v = (t.detach().to(in_dtype) for t in make_qkv((1, 2, 37, 77, 40), torch.float32, device))
    want64 = attention_fp64(q, k, v)
    with torch.autocast(device.type, dtype=torch.float16), torch.no_grad():
        outs = {}
        for backend in ("reference", "triton"):
            with kernels.use(attention=backend):
                outs[backend] = kernels.attention(q, k, v)
    assert outs["reference"].dtype == torch.float16, "torch's own autocast rule changed"
    check(outs["triton"], want64, outs["reference"], torch.float16, f"autocast fp16 from {in_dtype}")


def test_autocast_backward_reaches_fp32_leaves(device):
    """The autocast cast is part of the graph: fp32 leaves get fp32 gradients, as from the reference,
    each within the fp16 rule (2x the reference's own error against fp64, plus atol)."""
    q, k, v = make_qkv((1, 2, 20, 24, 16), torch.float32, device)
    grads = {}
    for backend in ("reference", "triton"):
        with torch.autocast(device.type, dtype=torch.float16), kernels.use(attention=backend):
            o = kernels.attention(q, k, v)
        grads[backend] = torch.autograd.grad(o.float().square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want64 = torch.autograd.grad(attention_fp64(q64, k64, v64).square().sum(), (q64, k64, v64))
    for name, g, r, w in zip("qkv", grads["triton"], grads["reference"], want64):
        assert g.dtype == r.dtype == torch.float32, f"d{name}: {g.dtype} vs reference {r.dtype}"
        assert_within_torch_error(g, r, w, name=f"d{name} under autocast (fp16 compute)", **TOL[torch.float16])


# ---- Boundaries and layouts the tests above leave out (found by mutation testing: each test below
# fails for a one-token bug in the kernel or its launcher that every other test passed) ----

def _mixed_layouts(shape, seed=0):
    """q in the UNet's (B, L, H, D) view, k contiguous, v (B, L, H, D) again: k and v of different
    strides, so a kernel that reads v (or writes dv) with k's strides is caught."""
    b, h, lq, lkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, h, lkv, d, generator=g)
    v = torch.randn(b, lkv, h, d, generator=g).transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("d", [40, 80], ids=["D40-padded", "D80-head+tail"])
def test_k_and_v_of_different_strides(d):
    q, k, v = _mixed_layouts((1, 2, 37, 77, d))
    assert k.stride() != v.stride()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    o = attention_triton(q, k, v)
    assert_close(o, attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name=f"o D{d}")
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(attention_fp64(q, k, v), (q, k, v), do.double())
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, rel=TOL[torch.float32]["rel"], name=f"d{name} D{d}, k and v of different strides")


def test_out_of_other_strides_than_q():
    """q in the UNet view, out contiguous: o is stored with out's strides, not q's."""
    q, k, v = (t.detach() for t in make_qkv((1, 2, 37, 77, 40), torch.float32, "cpu"))
    out = torch.full((1, 2, 37, 40), float("nan"))
    assert out.stride() != q.stride()
    with torch.no_grad():
        attention_triton(q, k, v, out=out)
    assert_close(out, attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name="contiguous out, unet q")


def test_large_score_range_keeps_the_running_max():
    """Scores 128 apart in log2 units across key blocks: without the running max (rescaling
    earlier blocks when a later one is larger, or the reverse) exp2 over/underflows."""
    d = 16
    q = torch.full((1, 1, 8, d), 4.0)
    k = torch.cat([torch.full((1, 1, 32, d), 4.0), torch.full((1, 1, 45, d), -4.0)], 2)
    v = torch.randn(1, 1, 77, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = attention_triton(q, k, v, config=AttentionConfig(16, 32, 4, 2))
    assert_close(got, attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name="score range 256")


def test_head_dim_256_is_the_limit():
    """256, the largest head dim taken, runs (its table row is the last); 264 is refused."""
    q, k, v = (t.detach() for t in make_qkv((1, 1, 16, 20, 256), torch.float32, "cpu"))
    assert attention_module._triton_check(q, k, v) is None
    with torch.no_grad():
        assert_close(attention_triton(q, k, v), attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name="D256")
    big = torch.zeros(1, 1, 4, 264)
    assert "256" in attention_module._triton_check(big, big, big)


def test_grid_limit_is_inclusive():
    """B·H = 65535 programs on the grid's second axis is CUDA's limit, allowed; 65536 is refused."""
    q = torch.zeros(1, 1, 8, 16).expand(4369, 15, 8, 16)  # 4369 * 15 = 65535
    assert attention_module._triton_check(q, q, q) is None
    q = torch.zeros(1, 1, 8, 16).expand(4096, 16, 8, 16)
    assert "65536" in attention_module._triton_check(q, q, q)


def test_lse_row_limit_is_exclusive():
    """lse rows (B·H·Lq) are indexed in 32 bits: 2**31 - 1 are taken, 2**31 refused (expanded
    views: nothing is allocated)."""
    q = torch.zeros(1, 1, 1, 8).expand(1, 1, 2**31 - 1, 8)
    assert attention_module._triton_check(q, q[:, :, :4], q[:, :, :4]) is None
    q = torch.zeros(1, 1, 1, 8).expand(1, 1, 2**31, 8)
    assert "B·H·Lq = 2147483648 rows of lse" in (attention_module._triton_check(q, q[:, :, :4], q[:, :, :4]) or "")


def test_no_keys_is_refused():
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 0, 16)
    with kernels.use(attention="triton"), pytest.raises(kernels.BackendUnsupported, match="no keys"):
        kernels.attention(q, k, k)


@pytest.mark.parametrize("which", range(3), ids=["q", "k", "v"])
def test_one_input_requires_grad(which):
    """Autograd is recorded when any one of q, k, v requires grad, and that gradient is right."""
    qkv = [t.detach() for t in make_qkv((1, 2, 19, 21, 16), torch.float32, "cpu")]
    qkv[which].requires_grad_()
    o = attention_triton(*qkv)
    assert o.requires_grad, f"no graph with only {'qkv'[which]} requiring grad"
    (got,) = torch.autograd.grad(o.sum(), (qkv[which],))
    leaf = qkv[which].detach().double().requires_grad_()
    (want,) = torch.autograd.grad(attention_fp64(*[leaf if i == which else t for i, t in enumerate(qkv)]).sum(),
                                  (leaf,))
    assert_close(got, want, rel=TOL[torch.float32]["rel"], name=f"d{'qkv'[which]}, only it requiring grad")


def test_backward_without_queries_zeroes_dk_dv():
    """Lq = 0: no key gets any gradient, so dk and dv are zeros (not the buffers' old contents)."""
    q, k = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 5, 16)
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, k)]
    _, dk, dv = _backward(torch.zeros_like(q), q, k, k, q.clone(), torch.empty(1, 2, 0), None, *bufs)
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(k))


@pytest.mark.parametrize("kind", sorted(attention_module.CONFIGS))
def test_table_lookup(kind):
    """Each head dim takes the first row at least as wide: of CONFIGS for 16-bit inputs, of
    CONFIGS_FP32 for fp32 (whose "fwd" serves the short- and long-key forwards too)."""
    for element_size, table in ((2, attention_module.CONFIGS[kind]),
                                (4, attention_module.CONFIGS_FP32["fwd" if kind.startswith("fwd") else kind])):
        rows = sorted(table.items())
        for i, (width, row) in enumerate(rows):
            for w in (width, rows[i - 1][0] + 1 if i else 8):
                assert attention_module._config(kind, w, element_size) == row, (kind, w, element_size)


@pytest.mark.parametrize("kind", sorted(attention_module.CONFIGS))
def test_plan_reads_the_row_of_the_real_head_dim(kind):
    """A launch plan reads the row of D itself, not of its padded width: D = 40 (padded to 64) and
    D = 64 take different rows where the table has both (the H100 sweep wants them apart)."""
    table = sorted(attention_module.CONFIGS[kind].items())
    for d in (8, 32, 33, 40, 41, 64, 72, 80, 160, 256):
        want = next(row for w, row in table if d <= w)
        assert attention_module._plan(kind, d, torch.float16)[3:] == want, (kind, d)


def _spy_align(monkeypatch, *names):
    """Record the ALIGN of each launch through the Launchers ``names`` (_FWD passes it as its last
    argument, _DKDV and _DQ in meta)."""
    seen = []
    for name in names:
        real = getattr(attention_module, name)
        monkeypatch.setattr(attention_module, name, lambda grid, key, ptrs, args, meta, real=real: (
            seen.append(meta.get("ALIGN", args[-1])), real(grid, key, ptrs, args, meta)))
    return seen


def test_fp32_dots_are_ieee():
    """fp32 inputs take IEEE fp32 dots, not TF32 (a 10-bit mantissa: ~1e-3 relative error against
    TOL's 2e-5). The interpreter's dot ignores the precision, so only the plan shows it."""
    for kind in sorted(attention_module.CONFIGS):
        for d in (16, 40, 80):
            assert attention_module._plan(kind, d, torch.float32)[2] == "ieee", (kind, d)


def test_align_hint_sees_out(monkeypatch):
    """ALIGN (a load/store alignment hint; the interpreter ignores it, so no numeric test sees it)
    is the largest power of two dividing every row stride and base of q, k, v *and* out."""
    seen = _spy_align(monkeypatch, "_FWD")
    attention_module._ALIGNS.clear()
    q, k, v = (t.detach() for t in make_qkv((1, 2, 9, 9, 40), torch.float32, "cpu", "contiguous"))
    out = torch.empty(1, 2, 9, 42)[..., :40]  # row stride 42 fp32 = 168 bytes: 8-byte aligned only
    with torch.no_grad():
        attention_triton(q, k, v, out=out)
    assert_close(out, attention_fp64(q, k, v), rel=TOL[torch.float32]["rel"], name="o in a strided out")
    assert seen == [attention_module._align(q, k, v, out)] and seen[0] < attention_module._align(q, k, v), seen


def test_align_cache_keys_on_the_batch(monkeypatch):
    """The forward caches ALIGN by strides, sizes *and batch*: a batch stride of 3 fp32 (12 bytes)
    is never used at batch 1 (hint 4) but is at batch 2 (hint 1). Same strides, head count and
    lengths both times, so a cache keyed without the batch would replay the first hint."""
    seen = _spy_align(monkeypatch, "_FWD")
    attention_module._ALIGNS.clear()
    h, lq, d = 8, 9, 40
    buf = torch.randn(h * lq * d + 3, generator=torch.Generator().manual_seed(0))
    for b in (1, 2):
        q = buf.as_strided((b, h, lq, d), (3, lq * d, d, 1))  # batch 2: the samples overlap, read-only
        out = torch.full((b, h, lq, d), float("nan"))
        with torch.no_grad():
            attention_triton(q, q, q, out=out)
        assert_close(out, attention_fp64(q, q, q), rel=TOL[torch.float32]["rel"], name=f"o, batch {b}")
    assert seen == [4, 1], seen


def test_backward_align_hint_sees_do(monkeypatch):
    """The backward's ALIGN covers dO (the upstream gradient, in whatever layout the caller made
    it) as well as q, k, v: a dO with rows of 42 fp32 (8-byte aligned only) drops it to 1 in
    both backward kernels, where contiguous q, k, v alone would give 4."""
    seen = _spy_align(monkeypatch, "_DKDV", "_DQ")
    q, k, v = make_qkv((1, 2, 9, 9, 40), torch.float32, "cpu", "contiguous")
    do = torch.randn(1, 2, 9, 42, generator=torch.Generator().manual_seed(1))[..., :40]
    got = torch.autograd.grad(attention_triton(q, k, v), (q, k, v), do)
    want = torch.autograd.grad(attention_fp64(q, k, v), (q, k, v), do.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, rel=TOL[torch.float32]["rel"], name=f"{name}, dO rows of 42")
    assert attention_module._align(q, k, v) == 4 and seen == [1, 1], seen


def test_bare_config_is_the_forwards_only(monkeypatch):
    """config=AttentionConfig(...) sets the forward; the backward kernels keep their table rows."""
    launches = _spy_launches(monkeypatch, ["_attn_bwd_dq_kernel"])
    q, k, v = make_qkv((1, 2, 37, 21, 40), torch.float32, "cpu")
    torch.autograd.grad(attention_triton(q, k, v, config=AttentionConfig(16, 16, 1, 2)).sum(), (q,))
    assert launches and launches[0][2:] == attention_module._plan("dq", 40, torch.float32)[3:], launches


@pytest.mark.skipif(not (kernels.registry.triton_available() is None and kernels.registry.interpreting()),
                    reason="runs the Triton forward under the interpreter")
def test_a_backward_kernel_that_cannot_launch_falls_back_like_the_forward(monkeypatch):
    """On a 99 KB-shared-memory GPU the fp32 head-dim-160 forward fits and the dQ kernel does not
    (offline sm_86 compile: 106,496 B): a default-chosen op's backward raised LaunchUnsupported out
    of loss.backward(). It recomputes through the reference with one warning; under an explicit
    choice it raises, as the forward does."""
    from kernels.registry import LaunchUnsupported

    def cannot_launch(*args, **kwargs):
        raise LaunchUnsupported("_attn_bwd_dq_kernel needs 106496 of shared memory per block, and this GPU allows 101376")

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    do = torch.randn(1, 2, 9, 16, generator=g)
    want = torch.autograd.grad(attention_reference(q.requires_grad_(), k.requires_grad_(), v.requires_grad_()),
                               (q, k, v), do)
    monkeypatch.setattr(attention_module, "_backward", cannot_launch)
    kernels.registry._WARNED.clear()
    out = attention_module._attention_triton(q, k, v)  # as dispatch runs it for the default choice
    with pytest.warns(RuntimeWarning, match=r"default backend 'triton' cannot launch here \(_attn_bwd_dq_kernel.*"
                                            r"falling back to 'reference' for the backward"):
        got = torch.autograd.grad(out, (q, k, v), do)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rtol=2e-5, atol=1e-6, name=f"d{name} from the reference after the fallback")
    with kernels.use(attention="triton"):
        out = attention_module._attention_triton(q, k, v)
    with pytest.raises(LaunchUnsupported, match="_attn_bwd_dq_kernel"):
        torch.autograd.grad(out, (q, k, v), do)
