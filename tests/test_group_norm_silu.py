"""The triton group_norm_silu backend against an fp64 torch reference, forward and backward.

Default run: tiny shapes under the Triton interpreter on CPU, each forward path (one launch whose
chunks each recompute their group's statistics, or the two-pass split) forced through `config=`.
`pytest -m gpu`: SD 1.5 shapes.
fp32 must match fp64 to 1e-5 max relative error; fp16/bf16 may err at most 2x as much as torch's
own op in that dtype, plus a small atol (flash-attention's rule).
"""
import contextlib
import dataclasses
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from kernels.group_norm_silu import (H100_SMS, INTERPRETER_SMS, MAX_BLOCK_C, MAX_TILE, MAX_WARPS, MIN_CHUNK,
                                     PROGRAMS_PER_SM, SINGLE_PASS_MAX_GROUP, SINGLE_PASS_STATS_READS,
                                     launch_config)
# the switch's entry, past group_norm_silu_triton's checks: its bf16 code paths run under the interpreter
# here (the checks refuse that: see test_interpreter_refuses_bf16_through_the_switch)
from kernels.group_norm_silu import _group_norm_silu_triton as triton_gn
from kernels import registry
from kernels.testing import TOLERANCES, assert_close, assert_within_torch_error

# dtype -> tolerance: fp32 by max relative error vs fp64; half precision by the 2x-torch rule
TOL = TOLERANCES["group_norm_silu"]

CPU_CASES = [  # (shape, groups, channels_last, affine, activation)
    ((1, 96, 7, 9), 32, False, True, "silu"),  # 3 channels per group, HW = 63 not a power of two
    ((3, 64, 1, 1), 8, False, True, "silu"),  # HW = 1, batch 3
    ((2, 32, 5, 3), 8, True, True, "silu"),  # channels_last
    ((1, 40, 6, 5), 4, False, False, "silu"),  # weight and bias None, batch 1
    ((2, 20, 4, 6), 5, False, True, None),  # plain GroupNorm (SD's norms without SiLU)
    ((2, 12, 10), 3, False, True, "silu"),  # 3-D (N, C, L), as in 1-D convs / attention blocks
    ((4, 32), 8, False, True, "silu"),  # 2-D (N, C): one position per channel, 4 per group
]

PATHS = {"single-pass": True, "two-pass": False}  # LaunchConfig.single_pass, forced via config=
gn = importlib.import_module("kernels.group_norm_silu")  # the module (kernels.group_norm_silu is the op)
_PATH_KERNELS = {True: ("_fused_kernel",), False: ("_stats_kernel", "_apply_kernel")}

GPU_SHAPES = [  # (shape, groups)
    ((2, 320, 64, 64), 32),  # SD1.5 UNet, first ResBlocks at 512x512 (batch 2 = CFG)
    ((2, 640, 32, 32), 32),  # SD1.5 UNet, second level
    ((2, 1280, 16, 16), 32),  # SD1.5 UNet, third level
    ((2, 1280, 8, 8), 32),  # SD1.5 UNet, mid block: 64 (n, group) pairs, small groups
    ((1, 512, 64, 64), 32),  # VAE decoder mid/first up block
    ((1, 128, 256, 256), 32),  # VAE decoder last up block: 4 channels per group, 262k per group
]


def _inputs(shape, dtype, device, affine=True, channels_last=False, seed=0):
    """Fresh random x with non-zero mean and scale (so the statistics matter), weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0 + 1.5
    w = torch.randn(shape[1], generator=g) * 0.5 + 1.0 if affine else None
    b = torch.randn(shape[1], generator=g) * 0.5 if affine else None
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, *(None if t is None else t.to(device=device, dtype=dtype) for t in (w, b))


def _torch(x, w, b, groups, activation, dtype=None, eps=1e-5):
    """Plain torch in ``dtype`` (None: x's), upcast inputs for the fp64 reference. A bias without
    weight goes in with a weight of ones (exact), as torch 2.13's group_norm backward fails on a
    bias alone ("tensor does not have a device")."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    if w is None and b is not None:
        w = torch.ones_like(b)
    y = F.group_norm(cast(x), groups, cast(w), cast(b), eps)
    return F.silu(y) if activation == "silu" else y


def _config(x, groups, single_pass=None):
    """The heuristic's tiling for x, with the forward path forced unless ``single_pass`` is None."""
    return launch_config(x.shape, groups, x.dtype, H100_SMS if x.is_cuda else INTERPRETER_SMS,
                         single_pass=single_pass)


class _Forbidden:
    """Stands in for a kernel of the forward path the config did not ask for."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched, but the config asked for the other forward path")


@contextlib.contextmanager
def _only_path(config):
    """The forward kernels of the path ``config`` does not take fail when launched."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _PATH_KERNELS[not config.single_pass] if config is not None else ():
            mp.setattr(gn, name, _Forbidden(name))
        yield


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _check(got, torch_same_dtype, want_fp64, dtype, name):
    if dtype == torch.float32:
        assert_close(got, want_fp64, name=name, **TOL[dtype])
    else:
        assert_within_torch_error(got, torch_same_dtype, want_fp64, name=name, **TOL[dtype])


def _check_forward(x, w, b, groups, activation, config=None):
    out = torch.full_like(x, float("nan"))  # poisoned: an unwritten element fails
    with _only_path(config):
        y = triton_gn(x, w, b, groups, 1e-5, activation, out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    _check(y, _torch(x, w, b, groups, activation), _torch(x, w, b, groups, activation, torch.float64),
           x.dtype, f"y {x.dtype}")


def _check_backward(x, w, b, groups, activation, config=None, wrt="xwb"):
    """dx, dweight, dbias each against fp64 autograd under one shared random upstream gradient;
    ``wrt``: which of x, w, b require grad in the kernel's call (the others are constants)."""
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    given = [n for n, t in zip("xwb", (x, w, b)) if t is not None and n in wrt]
    ins = [None if t is None else t.detach().clone().requires_grad_(n in wrt) for n, t in zip("xwb", (x, w, b))]
    with _only_path(config):
        y = triton_gn(*ins, groups, 1e-5, activation, config=config)
    got = torch.autograd.grad(y, [t for n, t in zip("xwb", ins) if n in given], dy)
    same = _leaves(x, w, b)
    torch_grads = torch.autograd.grad(_torch(*same, groups, activation),
                                      [t for n, t in zip("xwb", same) if n in given], dy)
    ref = _leaves(*(None if t is None else t.double() for t in (x, w, b)))
    ref_grads = torch.autograd.grad(_torch(*ref, groups, activation), [t for n, t in zip("xwb", ref) if n in given],
                                    dy.double())
    names = [{"x": "dx", "w": "dweight", "b": "dbias"}[n] for n in given]
    for name, g, t, r in zip(names, got, torch_grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == r.shape, f"{name}: {g.dtype}{tuple(g.shape)}"
        _check(g, t, r, x.dtype, f"{name} {x.dtype}")


# ---- default run: tiny shapes under the interpreter (or on the GPU when there is one) ----

@pytest.mark.parametrize("single_pass", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("shape, groups, channels_last, affine, activation", CPU_CASES)
def test_forward_fp32(device, shape, groups, channels_last, affine, activation, single_pass):
    x, w, b = _inputs(shape, torch.float32, device, affine, channels_last)
    _check_forward(x, w, b, groups, activation, _config(x, groups, single_pass))


def test_heuristic_single_pass_forward_backward(device):
    """Small groups take the one-launch forward by default, here in several chunks per group; its
    backward then runs the two-pass split of the same shape (a different tiling from the
    forward's), from the stats the forward's first chunks wrote."""
    x, w, b = _inputs((1, 24, 11, 13), torch.float32, device)  # 2 rows: chunked to fill the grid
    cfg, split = _config(x, 2), _config(x, 2, single_pass=False)
    assert cfg.single_pass and cfg.chunks > 1 and split.s_chunks > 1, (cfg, split)
    assert (cfg.block_c, cfg.s_chunk) != (split.block_c, split.s_chunk), (cfg, split)
    with _only_path(cfg):  # config=None below: the heuristic must pick the same path
        _check_forward(x, w, b, 2, "silu")
        _check_backward(x, w, b, 2, "silu")


def test_output_keeps_memory_format(device):
    x, w, b = _inputs((2, 32, 5, 3), torch.float32, device, channels_last=True)
    y = triton_gn(x, w, b, 8)
    assert y.stride() == x.stride() and y.is_contiguous(memory_format=torch.channels_last), y.stride()


def test_forward_non_contiguous(device):
    """A spatial slice: H and W cannot be merged into one stride, so the kernel splits them."""
    x, w, b = _inputs((2, 24, 7, 9), torch.float32, device)
    x = x[:, 4:20, 1:6, ::2]  # (2, 16, 5, 5), strides (1512, 63, 9, 2)
    for single_pass in PATHS.values():
        cfg = _config(x, 4, single_pass)
        _check_forward(x, w[4:20], b[4:20], 4, "silu", cfg)
        _check_backward(x, w[4:20], b[4:20], 4, "silu", cfg)


def test_strided_weight_and_bias(device):
    """weight and bias as every other element of a longer tensor (stride 2), forward and backward:
    the kernels index them densely, so the wrapper must not pass the view through as it is."""
    x, w, b = _inputs((1, 96, 7, 9), torch.float32, device)
    w2, b2 = (torch.stack([t, torch.full_like(t, 1e3)], 1).flatten() for t in (w, b))
    ws, bs = w2[::2], b2[::2]
    assert ws.stride() == (2,) and torch.equal(ws, w), ws.stride()
    for single_pass in PATHS.values():
        _check_forward(x, ws, bs, 32, "silu", _config(x, 32, single_pass))
        _check_backward(x, ws, bs, 32, "silu", _config(x, 32, single_pass))


@pytest.mark.parametrize("single_pass", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_backward_half(device, dtype, single_pass):
    x, w, b = _inputs((2, 32, 5, 3), dtype, device)
    cfg = _config(x, 8, single_pass)
    _check_forward(x, w, b, 8, "silu", cfg)
    _check_backward(x, w, b, 8, "silu", cfg)


@pytest.mark.parametrize("single_pass", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("shape, groups, channels_last, affine, activation",
                         [CPU_CASES[i] for i in (0, 2, 3, 4, 6)])
def test_backward_fp32(device, shape, groups, channels_last, affine, activation, single_pass):
    """After either forward path (a forced config's tiles are the backward's too)."""
    x, w, b = _inputs(shape, torch.float32, device, affine, channels_last)
    _check_backward(x, w, b, groups, activation, _config(x, groups, single_pass))


CHUNKED = [  # (dtype, channels_last, affine, activation): the one launch, several chunks per group
    (torch.float32, False, True, "silu"),
    (torch.float32, True, True, "silu"),  # channels_last
    (torch.float32, False, False, "silu"),  # weight and bias None
    (torch.float32, False, True, None),  # plain GroupNorm
    (torch.float16, False, True, "silu"),
    (torch.bfloat16, True, True, "silu"),
]


@pytest.mark.parametrize("dtype, channels_last, affine, activation", CHUNKED)
def test_single_pass_chunks(device, dtype, channels_last, affine, activation):
    """The one-launch forward chunked by its own rule (H100 grid, small tiles): each group in 6
    channel blocks of 4 x 2 spatial chunks (128 + 15 positions of 143, the last a partial tile),
    and in every chunk a statistics loop over the whole group in other tiles (16 + 8 channels x
    5 tiles of 32 positions, the last partial). Forward, and the backward that reuses its tiling
    and the (mean, rstd) each group's chunk 0 wrote."""
    shape, groups = (1, 48, 11, 13), 2  # 24 channels per group, H * W = 143 not a power of two
    cfg = launch_config(shape, groups, dtype, sms=H100_SMS, max_tile=512, max_block_c=16, single_pass=True)
    assert (cfg.c_blocks, cfg.block_c, cfg.s_chunks, cfg.s_chunk, cfg.block_s) == (6, 4, 2, 128, 128), cfg
    assert (cfg.stats_block_c, cfg.stats_block_s) == (16, 32) and not cfg.even_s and not cfg.stats_even_s, cfg
    x, w, b = _inputs(shape, dtype, device, affine, channels_last)
    _check_forward(x, w, b, groups, activation, config=cfg)
    _check_backward(x, w, b, groups, activation, config=cfg)


@pytest.mark.parametrize("single_pass", PATHS.values(), ids=PATHS.keys())
def test_forced_small_tiles(device, single_pass):
    """Several channel blocks per group, several tiles per chunk and several chunks per group:
    the Chan combine across tiles, chunks and (single pass) channel blocks, and the per-channel
    dweight partials. The single pass takes the two-pass split's chunking as it is, its statistics
    in 4x8 tiles (5 per channel block, the last partial) rather than 4x2 (interpreter time)."""
    shape, groups = (1, 24, 5, 7), 2  # 12 channels per group -> 3 blocks of 4, H * W = 35 uneven
    cfg = launch_config(shape, groups, torch.float32, sms=2, max_tile=8, max_block_c=4, single_pass=False)
    assert cfg.c_blocks == 3 and cfg.s_chunks > 1 and cfg.s_chunk > cfg.block_s and not cfg.even_s, cfg
    cfg = dataclasses.replace(cfg, single_pass=single_pass, stats_block_s=8, stats_even_s=False)
    x, w, b = _inputs(shape, torch.float32, device)
    _check_forward(x, w, b, groups, "silu", config=cfg)
    _check_backward(x, w, b, groups, "silu", config=cfg)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [1e3, 1e4, 3e4])
@pytest.mark.parametrize("seed", range(3))
def test_stable_statistics_with_large_mean(device, path, offset, seed):
    """|mean| / std ~ 300 and 3000: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance;
    a mean folded into the shift (x * scale - mean * scale) or kept in fp32 costs ~|mean| / std
    ulps (1e-5 at 300, where torch's fp32 group_norm misses it on some seeds: the kernel takes its
    statistics of x less the group's first element); each path, over several seeds. The backward
    after each path: it recomputes xhat as ((x - pivot) - mean) * rstd too (x - mean, its mean
    rounded to fp32, cost dx 1.9e-5 at |mean| / std ~ 1000 and 2.5e-4 at 10000)."""
    x, w, b = _inputs((1, 16, 8, 8), torch.float32, device, seed=seed)
    x = x + offset
    cfg = _config(x, 4, single_pass=PATHS[path])
    _check_forward(x, w, b, 4, "silu", cfg)
    _check_backward(x, w, b, 4, "silu", cfg)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stable_statistics_with_a_large_mean_per_group(device, path, offset, channels_last):
    """Each group's statistics are taken of x less that group's own first element: groups whose
    means differ by 1e3-1e4 (a pivot shared by the sample, its first element, left the gap between
    group means in x - pivot: 1.6e-4 from fp64 against 1.1e-7, and the one-mean test above could not
    see it). channels_last too, where a group's first channel is a small offset from the sample's."""
    x, w, b = _inputs((1, 16, 8, 8), torch.float32, device, channels_last=channels_last)
    x = x + offset * (1 + torch.arange(16, device=device) // 4).to(x.dtype)[None, :, None, None]
    cfg = _config(x, 4, single_pass=PATHS[path])
    _check_forward(x, w, b, 4, "silu", cfg)
    _check_backward(x, w, b, 4, "silu", cfg)


@pytest.mark.parametrize("path", PATHS)
def test_dx_keeps_the_memory_format_of_x(device, path):
    """A channels_last x gets a channels_last dx, as torch's group_norm backward gives: an NCHW one
    costs the next layer a layout conversion (dx was made contiguous and no value check saw it)."""
    x, w, b = _inputs((2, 32, 5, 3), torch.float32, device, channels_last=True)
    x.requires_grad_()
    y = triton_gn(x, w, b, 8, 1e-5, "silu", config=_config(x, 8, single_pass=PATHS[path]))
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.stride() == x.stride(), f"dx strides {dx.stride()}, x's {x.stride()}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_default_eps_is_torchs(backend):
    """eps defaults to torch's 1e-5 (GroupNorm's, SD's): at std 1e-3 (variance 1e-6) the eps is
    most of the denominator, so another default would show in y. Both backends, against fp64."""
    import inspect

    assert inspect.signature(kernels.group_norm_silu).parameters["eps"].default == 1e-5
    x, w, b = _inputs((1, 16, 5, 7), torch.float32, "cpu")
    x = x * 1e-3 / 3.0  # _inputs' std is 3
    with kernels.use(group_norm_silu=backend):
        y = kernels.group_norm_silu(x, w, b, 4)
    assert_close(y, F.silu(F.group_norm(x.double(), 4, w.double(), b.double())), rel=1e-5, name=f"{backend}, default eps")


FULL_H100 = PROGRAMS_PER_SM * H100_SMS  # programs a launch should have at batch 1-2


def _check_single_pass_bounds(cfg, shape, groups):
    """The one launch's chunks: each at least MIN_CHUNK elements and a group's chunks re-reading at
    most SINGLE_PASS_STATS_READS elements, unless they are its whole channel blocks over all of H * W."""
    cg, spatial = shape[1] // groups, math.prod(shape[2:])
    assert cfg.single_pass and cfg.grid == (cfg.rows * cfg.chunks,), cfg
    if cfg.s_chunks > 1 or cfg.block_c < min(triton.next_power_of_2(cg), MAX_BLOCK_C):
        chunk = min(cfg.block_c, cg) * min(cfg.s_chunk, spatial)
        assert chunk >= MIN_CHUNK, f"{shape}: chunks of {chunk} elements; {cfg}"
        assert cfg.chunks * cg * spatial <= SINGLE_PASS_STATS_READS, f"{shape}: {cfg}"
    assert cfg.stats_block_c * cfg.stats_block_s <= MAX_TILE, cfg


@pytest.mark.parametrize("shape, groups", [((1, 320, 64, 64), 32), ((2, 1280, 8, 8), 32)] + GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grid_fills_h100(shape, groups, dtype):
    """Batch 1-2 at SD shapes: every launch of either forward path (and of the backward, which runs
    the two-pass split) has >= 4 programs per SM of a 132-SM H100; one launch for small groups."""
    spatial, group = math.prod(shape[2:]), shape[1] // groups * math.prod(shape[2:])
    split = launch_config(shape, groups, dtype, sms=H100_SMS, single_pass=False)
    cfg = launch_config(shape, groups, dtype, sms=H100_SMS)
    assert cfg.single_pass == (group <= SINGLE_PASS_MAX_GROUP), f"{shape}: group of {group}; {cfg}"
    for c in (split, cfg):
        assert c.grid[0] >= FULL_H100, f"{shape}: {c.grid[0]} programs < {FULL_H100}; {c}"
        assert c.block_c * c.block_s <= MAX_TILE and 1 <= c.num_warps <= MAX_WARPS, c
        assert c.s_chunks * c.s_chunk >= spatial > (c.s_chunks - 1) * c.s_chunk, c
        assert c.c_blocks * c.block_c >= shape[1] // groups, c


@pytest.mark.parametrize("shape, least", [  # (shape with 32 groups, programs at least)
    ((2, 1280, 8, 8), FULL_H100),  # SD1.5 UNet mid block, batch 2: 64 groups of 2560
    ((2, 2560, 8, 8), FULL_H100),  # SD1.5 UNet lowest up block (skip concat), batch 2
    ((2, 1280, 16, 16), FULL_H100),  # SD1.5 UNet third level, batch 2: groups of 10240
    ((2, 1920, 16, 16), FULL_H100),  # SD1.5 UNet up block, batch 2: groups of 15360
    ((2, 640, 16, 16), FULL_H100),  # SD1.5 UNet third level, first ResBlock's input
    ((2, 320, 32, 32), FULL_H100),  # SD1.5 UNet second level, first ResBlock's input
    ((1, 1280, 16, 16), FULL_H100),  # batch 1 (no CFG): 32 groups of 10240
    ((1, 2560, 8, 8), FULL_H100),
    ((1, 320, 32, 32), FULL_H100),
    ((1, 1280, 8, 8), 81920 // MIN_CHUNK),  # batch 1 mid block: only 320 chunks of MIN_CHUNK
    ((1, 1920, 16, 16), 512),  # 17 chunks of 15360 would fit the read budget; no power-of-two cut makes 17
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_single_pass_fills_h100(shape, least, dtype):
    """The one-launch forward at the SD 1.5 UNet's small-group shapes at batch 1-2 launches
    PROGRAMS_PER_SM x 132 programs (not one per (sample, group): 32 or 64), within its bounds."""
    cfg = launch_config(shape, 32, dtype, sms=H100_SMS)
    assert cfg.grid[0] >= least, f"{shape}: {cfg.grid[0]} programs < {least}; {cfg}"
    _check_single_pass_bounds(cfg, shape, 32)


_FULL_BATCH = -(-PROGRAMS_PER_SM * H100_SMS // 32)  # samples whose 32 groups fill an H100 alone


@pytest.mark.parametrize("shape, single_pass", [
    ((1, 1280, 8, 8), True),  # SD1.5 mid block at batch 1: 2560 per group, 10 chunks each
    ((1, 320, 64, 64), False),  # SD1.5 first level at batch 1: 40960 per group
    ((1, 32, SINGLE_PASS_MAX_GROUP), True),  # the largest group that takes one launch: 16 chunks
    ((1, 32, SINGLE_PASS_MAX_GROUP + 1), False),
    ((_FULL_BATCH, 320, 64, 64), True),  # large groups, but N * G rows >= 4 programs x 132 SMs
    ((_FULL_BATCH - 1, 320, 64, 64), False),
])
def test_launch_config_picks_path(shape, single_pass):
    cfg = launch_config(shape, 32, torch.float16, sms=H100_SMS)
    assert cfg.single_pass is single_pass, f"{shape}: {cfg}"
    if single_pass:
        _check_single_pass_bounds(cfg, shape, 32)
        if cfg.rows >= FULL_H100:  # rows alone fill the GPU: one program per row, all of H * W
            assert cfg.grid == (cfg.rows,) and cfg.s_chunk >= math.prod(shape[2:]), cfg
        else:
            assert cfg.grid[0] >= FULL_H100 // 2, f"{shape}: {cfg}"


def test_dispatch_runs_triton(device):
    x, w, b = _inputs((1, 32, 3, 5), torch.float32, device)
    with kernels.use(group_norm_silu="triton"):
        y = kernels.group_norm_silu(x, w, b, 8)
    assert kernels.counts().get(("group_norm_silu", "triton")) == 1, kernels.counts()
    assert_close(y, _torch(x, w, b, 8, "silu", torch.float64), rel=1e-5, name="y")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, id="bf16")])
def test_mixed_precision_fp32_weights(device, dtype):
    """16-bit x with fp32 weight and bias (autocast, fp32 master weights), as torch's group_norm
    takes them: y and dx in x's dtype, dweight and dbias in fp32, each within the torch op's error."""
    x, w, b = _inputs((2, 32, 5, 3), torch.float32, device)
    x = x.to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ins = _leaves(x, w, b)
    y = triton_gn(*ins, 8, 1e-5, "silu")  # past the checks, which refuse bf16 in the interpreter
    got = torch.autograd.grad(y, ins, dy)
    same = _leaves(x, w, b)
    y_torch = _torch(*same, 8, "silu")
    torch_grads = torch.autograd.grad(y_torch, same, dy)
    ref = _leaves(*(t.double() for t in (x, w, b)))
    y_ref = _torch(*ref, 8, "silu")
    ref_grads = torch.autograd.grad(y_ref, ref, dy.double())
    assert y.dtype == dtype and y_torch.dtype == dtype
    assert_within_torch_error(y, y_torch, y_ref, name=f"y {dtype} w fp32", **TOL[dtype])
    for name, g, t, r, want in zip(("dx", "dweight", "dbias"), got, torch_grads, ref_grads,
                                   (dtype, torch.float32, torch.float32)):
        assert g.dtype == want == t.dtype, f"{name}: {g.dtype}, torch gives {t.dtype}"
        assert_within_torch_error(g, t, r, name=f"{name} {dtype} w fp32", **TOL[dtype])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's limit")
def test_interpreter_refuses_bf16_through_the_switch():
    """The interpreter stores fp32 -> bf16 by truncation where a GPU rounds to nearest: every output
    up to 1 ulp off, twice the rounding error (1008 of 1008 elements truncated, max error 0.0139
    against 0.0078 rounded). Refused by name, as attention and scheduler_step refuse it; the kernels'
    bf16 code paths still run here through the switch's entry (triton_gn), held to a tolerance that
    allows it."""
    x, w, b = _inputs((1, 32, 3, 5), torch.bfloat16, torch.device("cpu"))
    with kernels.use(group_norm_silu="triton"), pytest.raises(kernels.BackendUnsupported,
                                                              match="bfloat16 under the Triton interpreter"):
        kernels.group_norm_silu(x, w, b, 8)


@pytest.mark.parametrize("eps, activation", [(1e-5, "silu"), (0.5, None)])  # the recomputation takes both
def test_double_backward_matches_reference(device, eps, activation):
    """create_graph=True: gradients recomputed through the reference, differentiable again."""
    x, w, b = _leaves(*_inputs((2, 32, 5, 3), torch.float32, device))
    dxs, dws = [], []
    for fn in (triton_gn, kernels.group_norm_silu_reference):
        (dx,) = torch.autograd.grad(fn(x, w, b, 8, eps, activation).square().sum(), (x,), create_graph=True)
        dxs.append(dx)
        dws.append(torch.autograd.grad(dx.square().sum(), (w,))[0])
    assert dws[1].abs().max() > 0.1, "the test needs a non-trivial second derivative"
    assert_close(dxs[0], dxs[1].double(), rel=1e-5, name=f"dx, eps {eps}, activation {activation}")
    assert_close(dws[0], dws[1].double(), rel=1e-5, name=f"d|dx|^2/dweight, eps {eps}, activation {activation}")


@pytest.mark.parametrize("eps, shape", [
    (0.5, (2, 32, 5, 3)),  # ~5% of the groups' variance (9): an eps dropped or misplaced shows at once
    (0.0, (4, 32)),  # torch takes eps = 0; 2-D (N, C), which the triton check takes too
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_any_eps_through_the_switch(device, backend, eps, shape):
    """Forward and backward at an eps other than torch's default, which every other test uses,
    through the switch (the op's and the backend's checks), against fp64 F.group_norm at that eps."""
    x, w, b = _leaves(*_inputs(shape, torch.float32, device))
    with kernels.use(group_norm_silu=backend):
        y = kernels.group_norm_silu(x, w, b, 8, eps, "silu")
    assert kernels.counts() == {("group_norm_silu", backend): 1}, kernels.counts()
    ref = _leaves(*(t.double() for t in (x, w, b)))
    want = _torch(*ref, 8, "silu", eps=eps)
    assert_close(y, want, name=f"y, eps {eps}", **TOL[torch.float32])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    for name, g, r in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, (x, w, b), dy.float()),
                          torch.autograd.grad(want, ref, dy)):
        assert_close(g, r, name=f"{name}, eps {eps}", **TOL[torch.float32])


def test_double_backward_keeps_an_fp32_out_in_fp32(device):
    """16-bit x written to an fp32 out (what CUDA autocast asks for): under create_graph=True the
    gradients are recomputed through the reference, which must run in fp32 as the kernel did. It ran
    in x's dtype, and the first-order dweight came out ~1800x less accurate (0.011 against 6e-6)."""
    x, w, b = _inputs((2, 8, 5, 5), torch.float32, device)
    x = x.half()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    x64, w64, b64 = _leaves(x.double(), w.double(), b.double())
    y64 = _torch(x64, w64, b64, 4, "silu")
    want = torch.autograd.grad((y64 * y64 * g.double()).sum(), (x64, w64, b64))
    for create_graph in (False, True):
        xx, ww, bb = _leaves(x, w, b)
        y = triton_gn(xx, ww, bb, 4, out=torch.empty(x.shape, device=device))
        got = torch.autograd.grad((y * y * g).sum(), (xx, ww, bb), create_graph=create_graph)
        assert [t.dtype for t in got] == [torch.float16, torch.float32, torch.float32], [t.dtype for t in got]
        # dx is fp16 (x's dtype): one fp16 rounding of an fp32-accurate gradient; dweight and dbias
        # fp32-accurate (a dbias rounded through fp16 on the way was 2.6e-4 off)
        assert_close(got[0], want[0], rel=1e-3, name=f"dx, create_graph={create_graph}")
        assert_close(got[1], want[1], rel=1e-5, name=f"dweight, create_graph={create_graph}")
        assert_close(got[2], want[2], rel=1e-5, name=f"dbias, create_graph={create_graph}")


def test_out_in_a_graph_is_written_as_torch_writes_in_place(device):
    """out= a slice of a buffer with history while x, weight, bias need no gradient: the write is
    recorded all the same (CopySlices, a version bump), so the overwritten values get gradient 0.
    It went unrecorded: they kept passing their old gradient (6.8 where torch gives 0)."""
    x, w, b = _inputs((2, 8, 3, 5), torch.float32, device)
    z = torch.randn(2, 16, 3, 5, device=device, requires_grad=True)
    buf = z * 2.0
    version = buf._version
    triton_gn(x, w, b, 4, out=buf[:, 4:12])
    assert buf._version > version and buf.grad_fn.name().endswith("CopySlices"), buf.grad_fn
    assert_close(buf[:, 4:12], _torch(x, w, b, 4, "silu", torch.float64), rel=1e-5, name="y in out")
    (buf * 3.0).sum().backward()
    want = torch.full_like(z, 6.0)
    want[:, 4:12] = 0.0
    assert torch.equal(z.grad, want), f"gradient of the buffer behind out: {z.grad[:, ::4, 0, 0]}"


def test_cpu_autocast_does_not_excuse_mismatched_weights():
    """CPU autocast, unlike CUDA's, leaves group_norm's inputs as they are: a weight of another dtype
    is the op's ValueError naming it there, not torch's "mixed dtype (CPU)" from inside the reference."""
    x, w, b = _inputs((2, 8, 5, 5), torch.float32, torch.device("cpu"))
    for backend in ("reference", "triton"):
        with torch.autocast("cpu", dtype=torch.float16), kernels.use(group_norm_silu=backend):
            with pytest.raises(ValueError, match=r"weight dtype torch.float16: must be x's \(torch.float32\)"):
                kernels.group_norm_silu(x, w.half(), b.half(), 4)


def test_weights_autocast_would_cast_are_taken_by_triton(monkeypatch):
    """CUDA autocast hands torch's group_norm fp32 weight and bias whatever their dtype, so the op
    takes a bf16 weight with fp16 x there, or weight and bias of two dtypes. The Triton backend took
    only x's dtype or fp32: an explicit choice raised, the default fell back with a warning. It casts
    them to fp32 as autocast does; their gradients come back in their own dtypes, and a double
    backward (recomputed through the reference) sees one dtype. fp64, which autocast leaves as it
    is, is refused beside fp32 x, as torch's group_norm refuses it. CUDA autocast is stood in for on
    the CPU (the interpreter), by the one predicate both checks ask."""
    monkeypatch.setattr(gn, "_autocast_casts", lambda x: True)
    x, w, b = _leaves(*_inputs((2, 12, 3, 5), torch.float32, "cpu"))
    for wd, bd in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        w_, b_ = (t.detach().to(d).requires_grad_() for t, d in ((w, wd), (b, bd)))
        with kernels.use(group_norm_silu="triton"):
            y = kernels.group_norm_silu(x, w_, b_, 4)
        want = _torch(x, w_.double(), b_.double(), 4, "silu", torch.float64)
        assert_close(y, want, name=f"y, weight {wd}, bias {bd}", **TOL[torch.float32])
        dx, dw, db = torch.autograd.grad(y.sum(), (x, w_, b_), create_graph=True)
        assert (dw.dtype, db.dtype) == (wd, bd), f"gradients {dw.dtype}, {db.dtype} for params {wd}, {bd}"
        ref = torch.autograd.grad(want.sum(), (x, w_, b_), create_graph=True)
        assert_close(dx, ref[0], name=f"dx, weight {wd}", **TOL[torch.float32])
        (ddw,) = torch.autograd.grad((dx * dx).sum(), (w_,))  # the double backward
        (want_ddw,) = torch.autograd.grad((ref[0] * ref[0]).sum(), (w_,))
        assert_close(ddw.float(), want_ddw.float(), name=f"d(|dx|^2)/dweight, weight {wd}", rel=1e-2)
    for backend in ("reference", "triton"):
        with kernels.use(group_norm_silu=backend), pytest.raises(ValueError, match="leaves float64"):
            kernels.group_norm_silu(x, w.double(), b, 4)


def test_backward_into_a_view_out(device):
    """out= a channel slice of a buffer with history (a concat target): autograd rebases the buffer
    through CopySlices, which reads the Function's first input as the tensor written. x's gradient
    (and weight's) must equal the reference's; the overwritten slice's old values get 0, the rest of
    the buffer 1. With out= passed last, x got no gradient and the slice got dx."""
    x, w, b = _leaves(*_inputs((2, 8, 3, 5), torch.float32, device))
    z = torch.randn(2, 16, 3, 5, device=device, requires_grad=True)
    buf = z * 1.0
    y = triton_gn(x, w, b, 4, out=buf[:, :8])
    assert y.data_ptr() == buf.data_ptr()
    (buf * torch.arange(1.0, 3.0, device=device).view(2, 1, 1, 1)).sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    (kernels.group_norm_silu_reference(xr, wr, br, 4) * torch.arange(1.0, 3.0, device=device).double().view(2, 1, 1, 1)
     ).sum().backward()
    assert x.grad is not None, "x got no gradient through a view out="
    for name, got, want in (("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad), ("dbias", b.grad, br.grad)):
        assert_close(got, want, rel=1e-5, name=f"{name} through out=buf[:, :8]")
    assert torch.equal(z.grad[:, :8], torch.zeros_like(z.grad[:, :8])), "the overwritten slice's gradient is not 0"
    assert torch.equal(z.grad[:, 8:], torch.arange(1.0, 3.0, device=device).view(2, 1, 1, 1).expand(2, 8, 3, 5))


def test_invalid_inputs_raise():
    x = torch.randn(1, 30, 4, 4)
    with pytest.raises(ValueError, match=r"30.*groups=32"):
        kernels.group_norm_silu(x, None, None, 32)
    with pytest.raises(ValueError, match="groups must be a positive int, got True"):
        kernels.group_norm_silu(x, None, None, True)
    with pytest.raises(ValueError, match="groups must be a positive int, got 6.0"):
        kernels.group_norm_silu(x, None, None, 6.0)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got '1e-5'"):
        kernels.group_norm_silu(x, None, None, 6, eps="1e-5")
    with pytest.raises(ValueError, match=r"x\(30,\) needs \(N, C, \*spatial\) dims"):
        kernels.group_norm_silu(torch.randn(30), None, None, 6)
    with pytest.raises(ValueError, match="group_norm_silu: activation must be 'silu' or None, got 'gelu'"):
        kernels.group_norm_silu(x, None, None, 6, activation="gelu")
    np = pytest.importorskip("numpy")
    assert torch.equal(kernels.group_norm_silu(x, None, None, np.int64(6)), kernels.group_norm_silu(x, None, None, 6))


def test_out_must_not_share_memory_with_the_inputs(device):
    """Each program of the one-launch path re-reads its whole group, and autograd keeps x: in place
    would read the output back as input. Refused by name; out of another device or shape too."""
    x = torch.randn(2, 64, 3, 4, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    for name, out in (("x", x), ("x", x.view(-1).view(2, 64, 3, 4)), ("weight", w.expand(3, 4, 2, 64).permute(2, 3, 0, 1)),
                      ("bias", b.expand(3, 4, 2, 64).permute(2, 3, 0, 1))):
        with pytest.raises(ValueError, match=f"out overlaps {name}"):
            triton_gn(x, w, b, 32, out=out)
    with pytest.raises(ValueError, match=r"on meta, x is torch.float32\(2, 64, 3, 4\) on cpu"):
        triton_gn(x.cpu(), None, None, 32, out=torch.empty(2, 64, 3, 4, device="meta"))


def test_out_that_repeats_elements_is_refused(device):
    """An expanded out (stride 0 over the batch) would have two programs write one element."""
    x = torch.randn(2, 64, 3, 4, device=device)
    with pytest.raises(ValueError, match="several indices"):
        triton_gn(x, None, None, 32, out=torch.empty(1, 64, 3, 4, device=device).expand(2, 64, 3, 4))


@pytest.mark.parametrize("shape, groups", [
    ((1, 96, 7, 9), 32), ((3, 64, 1, 1), 8), ((2, 2560, 32, 32), 32), ((2, 320, 64, 64), 32),
    ((1, 12, 10), 3), ((2, 1280, 16, 16), 32), ((5, 30, 13, 1), 5), ((2, 512, 128, 128), 32),
])
@pytest.mark.parametrize("single_pass", [None, True, False])
def test_launch_config_fits_the_shape_it_was_made_for(shape, groups, single_pass):
    """Every tiling the heuristic makes passes the check that guards config= (SD shapes, odd ones,
    each path, two SM counts), so the check refuses only foreign configs."""
    for sms in (H100_SMS, INTERPRETER_SMS):
        cfg = launch_config(shape, groups, torch.float16, sms, single_pass=single_pass)
        assert gn._config_problem(cfg, shape, groups) is None, (shape, groups, sms, cfg)


def test_config_made_for_another_shape_is_refused():
    """A config from launch_config of batch 1 launches half the programs batch 2 needs (the second
    sample's y stayed uninitialised); each broken invariant is named."""
    x, w, b = _inputs((2, 32, 5, 3), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"rows = 8, not N \* groups = 16"):
        triton_gn(x, w, b, 8, config=launch_config((1, 32, 5, 3), 8, x.dtype, INTERPRETER_SMS))
    cfg = launch_config(x.shape, 8, x.dtype, INTERPRETER_SMS, single_pass=False)
    for change, needle in ((dict(s_chunks=cfg.s_chunks + 1), "s_chunks"), (dict(block_s=3), "block_s = 3 is not a power"),
                           (dict(even_s=True, block_s=2, s_chunk=2, s_chunks=8), "even_s, but H \\* W = 15"),
                           (dict(c_blocks=cfg.c_blocks + 1), "c_blocks")):
        with pytest.raises(ValueError, match=needle):
            triton_gn(x, w, b, 8, config=dataclasses.replace(cfg, **change))
    for bad in ("foo", {"block_c": 16}):  # an AttributeError, and a bare "unhashable type", before
        with pytest.raises(TypeError, match=f"config must be a LaunchConfig .*, not {type(bad).__name__}"):
            triton_gn(x, w, b, 8, config=bad)


@pytest.mark.skipif(not kernels.registry.interpreting(), reason="CPU tensors reach the kernel check only interpreted")
def test_a_sample_spanning_2_31_elements_is_refused():
    """The kernels index within a sample in 32 bits: a (1, 9, 1, 2) fp16 view with a channel
    stride of 2**28 (of a 4 GiB storage, allocated, never touched) spans 2**31 + 1 elements and is
    refused by name; it used to be launched, and read out of bounds (a segfault here)."""
    buf = torch.empty(2**31 + 64, dtype=torch.float16)
    x = buf.as_strided((1, 9, 1, 2), (0, 2**28, 2, 1))
    with kernels.use(group_norm_silu="triton"), pytest.raises(kernels.BackendUnsupported,
                                                              match="spans 2147483649 elements within a sample"):
        kernels.group_norm_silu(x, None, None, 3)


def test_an_out_spanning_2_31_elements_in_a_sample_is_refused():
    """out is indexed within a sample in 32 bits like x: a (1, 9, 1, 2) fp16 out with a channel
    stride of 2**28 spans 2**31 + 1 elements and is refused by name before any launch. Its storage
    is 4 GiB of host memory, allocated and never touched: nothing may write to it (with the check
    gone the kernels' 32-bit offsets would wrap, a segfault)."""
    x = torch.randn(1, 9, 1, 2, dtype=torch.float16)
    out = torch.empty(2**31 + 64, dtype=torch.float16).as_strided(x.shape, (0, 2**28, 2, 1))
    with pytest.raises(ValueError, match=r"out\(1, 9, 1, 2\) .* spans 2147483649 elements within a sample"):
        triton_gn(x, None, None, 3, out=out)


def test_edited_tuning_constants_take_effect_after_clear_caches(monkeypatch):
    gn = importlib.import_module("kernels.group_norm_silu")
    before = launch_config((2, 320, 64, 64), 32, torch.float16)
    monkeypatch.setattr(gn, "MAX_TILE", 1024)
    assert launch_config((2, 320, 64, 64), 32, torch.float16) == before  # cached
    gn.clear_caches()
    after = launch_config((2, 320, 64, 64), 32, torch.float16)
    assert after.block_c * after.block_s <= 1024 < before.block_c * before.block_s, (before, after)
    monkeypatch.undo()
    gn.clear_caches()


def test_empty_input_keeps_autograd(device):
    x = torch.randn(0, 64, 3, 3, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    y = triton_gn(x, w, w, 32)
    assert y.shape == x.shape and y.requires_grad
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


def test_samples_over_2_31_elements_are_refused(device):
    """Offsets inside a sample are 32-bit: a larger sample is refused by name (checked on a view
    that allocates nothing)."""
    x = torch.zeros(1, 1, 1, 1, device=device).expand(2, 128, 4096, 4096)  # 2**31 elements per sample
    with kernels.use(group_norm_silu="triton"), pytest.raises(kernels.BackendUnsupported, match="2147483648 elements per sample"):
        kernels.group_norm_silu(x, None, None, 32)


def test_triton_check_names_what_it_refuses():
    """The backend's own check (what resolve(), describe() and bench read) names each limit; the op
    refuses the same inputs before dispatch, for every backend (tests/test_registry.py)."""
    x = torch.randint(0, 10, (1, 32, 4, 4))
    xf, w = torch.randn(1, 32, 4, 4), torch.randn(32, dtype=torch.float64)
    check = importlib.import_module("kernels.group_norm_silu")._check_triton
    assert "int64" in check(x, None, None, 8)
    if registry.interpreting() and registry.triton_available() is None:  # else the device is refused first
        assert "weight dtype torch.float64: must be x's (torch.float32)" in check(xf, w, None, 8)
        assert "bias dtype torch.float16: must be x's (torch.float32)" in check(xf, None, torch.randn(32).half(), 8)
        assert "weight shape (16,) is not (C,) = (32,)" in check(xf, torch.randn(16), None, 8)
    with kernels.use(group_norm_silu="triton"), pytest.raises(ValueError, match=r"weight shape \(16,\)"):
        kernels.group_norm_silu(xf, torch.randn(16), None, 8)


# ---- GPU: SD 1.5 shapes ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, groups", GPU_SHAPES)
def test_sd_shapes_forward_gpu(shape, groups, dtype):
    x, w, b = _inputs(shape, dtype, "cuda")
    _check_forward(x, w, b, groups, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, groups", GPU_SHAPES)
def test_sd_shapes_backward_gpu(shape, groups, dtype):
    x, w, b = _inputs(shape, dtype, "cuda")
    _check_backward(x, w, b, groups, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, groups", [GPU_SHAPES[0], GPU_SHAPES[3], GPU_SHAPES[5]])
def test_sd_shapes_channels_last_gpu(shape, groups, dtype):
    x, w, b = _inputs(shape, dtype, "cuda", channels_last=True)
    _check_forward(x, w, b, groups, "silu")
    _check_forward(x, w, b, groups, None)
    _check_backward(x, w, b, groups, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("single_pass", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("shape, groups", GPU_SHAPES)
def test_sd_shapes_forced_path_gpu(shape, groups, single_pass):
    """Each forward path at every SD shape, not only where the heuristic sends it (e.g. the single
    pass walking a VAE group of 262k elements, the two-pass split on the 8x8 mid block)."""
    x, w, b = _inputs(shape, torch.float16, "cuda")
    cfg = _config(x, groups, single_pass)
    _check_forward(x, w, b, groups, "silu", cfg)
    _check_backward(x, w, b, groups, "silu", cfg)


@pytest.mark.parametrize("single_pass", [True, False], ids=["one-launch", "two-pass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_out_from_16bit_x(single_pass, dtype, device):
    """out=float32 with 16-bit x (what CUDA autocast asks for): the kernel reads 16-bit x and writes
    fp32, which must equal fp32 GroupNorm of x.float() to fp32 accuracy, not to 16-bit rounding."""
    x, w, b = _inputs((2, 96, 7, 9), dtype, device)
    config = _config(x, 32, single_pass)
    out = torch.full(x.shape, float("nan"), device=device)  # fp32, poisoned
    with _only_path(config):
        y = triton_gn(x, w, b, 32, 1e-5, "silu", out=out, config=config)
    assert y is out and y.dtype == torch.float32
    assert_close(y, _torch(x, w, b, 32, "silu", torch.float64), name=f"fp32 y from {dtype} x", **TOL[torch.float32])


def test_out_dtype_must_be_x_or_fp32(device):
    x, w, b = _inputs((1, 32, 3, 5), torch.float16, device)
    with pytest.raises(ValueError, match=r"x's dtype or float32"):
        triton_gn(x, w, b, 8, out=torch.empty(x.shape, dtype=torch.bfloat16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_output_dtype_matches_reference(dtype, device):
    """CUDA autocast runs torch's group_norm in fp32 (so the reference returns fp32 from 16-bit x);
    the Triton backend returns fp32 too, with fp32-accurate values and x-dtype dx."""
    x, w, b = _leaves(*_inputs((2, 320, 16, 16), dtype, device))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    res = {}
    for backend in ("reference", "triton"):
        with torch.autocast("cuda", dtype=dtype), kernels.use(group_norm_silu=backend):
            y = kernels.group_norm_silu(x, w, b, 32)
        res[backend] = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for name, got, ref in zip(("y", "dx", "dweight", "dbias"), res["triton"], res["reference"]):
        assert got.dtype == ref.dtype, f"{name}: triton {got.dtype}, reference {ref.dtype} under autocast"
    assert res["triton"][0].dtype == torch.float32 and res["triton"][1].dtype == dtype
    assert_close(res["triton"][0], _torch(x, w, b, 32, "silu", torch.float64), name="y", **TOL[torch.float32])


@pytest.mark.gpu
def test_cuda_autocast_takes_weights_of_another_dtype(device):
    """fp16 x with a bf16 weight and an fp32 bias under CUDA autocast: torch's group_norm takes them
    (cast to fp32), and so does the Triton backend chosen explicitly, with the reference's dtypes."""
    x, w, b = _leaves(*_inputs((2, 320, 16, 16), torch.float16, device))
    w, b = w.detach().bfloat16().requires_grad_(), b.detach().float().requires_grad_()
    res = {}
    for backend in ("reference", "triton"):
        with torch.autocast("cuda", dtype=torch.float16), kernels.use(group_norm_silu=backend):
            y = kernels.group_norm_silu(x, w, b, 32)
        res[backend] = (y, *torch.autograd.grad(y.sum(), (x, w, b)))
    for name, got, ref in zip(("y", "dx", "dweight", "dbias"), res["triton"], res["reference"]):
        assert got.dtype == ref.dtype, f"{name}: triton {got.dtype}, reference {ref.dtype} under autocast"
    assert_close(res["triton"][0], _torch(x, w, b, 32, "silu", torch.float64), name="y", **TOL[torch.float32])


# ---- Paths and limits the tests above leave out (found by mutation testing: each test below
# fails for a one-token bug in kernels/group_norm_silu.py that every other test passed) ----

def test_eps_and_activation_are_part_of_the_cached_plan():
    """Same shape, other eps or activation: the cached launch plan must not replay the first's."""
    x, w, b = _inputs((1, 32, 4, 4), torch.float32, "cpu")
    for eps, act in ((1e-5, "silu"), (0.5, "silu"), (0.5, None)):
        assert_close(triton_gn(x, w, b, 8, eps, act), _torch(x, w, b, 8, act, torch.float64, eps),
                     name=f"eps {eps} activation {act}", **TOL[torch.float32])


def test_out_strides_are_part_of_the_cached_plan():
    """Same x, a channels_last out after a call that made its own (contiguous) y: the cached plan
    must not replay the first call's y strides."""
    x, w, b = _inputs((2, 32, 5, 3), torch.float32, "cpu")
    want = _torch(x, w, b, 8, "silu", torch.float64)
    assert_close(triton_gn(x, w, b, 8), want, name="y, no out", **TOL[torch.float32])
    out = torch.full_like(x, float("nan")).to(memory_format=torch.channels_last)
    triton_gn(x, w, b, 8, out=out)
    assert_close(out, want, name="y in a channels_last out", **TOL[torch.float32])


def test_weight_or_bias_alone():
    """weight without bias and bias without weight (each loaded only when given), in turn on one
    shape, so a cached plan of one combination must not serve another."""
    x, w, b = _inputs((1, 32, 4, 5), torch.float32, "cpu")
    for ww, bb in ((w, b), (w, None), (None, b), (None, None)):
        name = f"y, weight {'given' if ww is not None else 'None'}, bias {'given' if bb is not None else 'None'}"
        assert_close(triton_gn(x, ww, bb, 8), _torch(x, ww, bb, 8, "silu", torch.float64),
                     name=name, **TOL[torch.float32])


@pytest.mark.parametrize("affine, wrt", [
    ("weight", "xw"),  # no bias: the backward must not load one
    ("bias", "xb"),  # no weight: bias still shifts SiLU's input, so it enters dx
    ("both", "w"),  # only weight requires grad: dweight is computed, and only it
    ("both", "b"),  # only bias requires grad: autograd is recorded for it alone
])
def test_backward_with_one_affine_param(affine, wrt, device):
    """Gradients when only one affine parameter is given, or only one requires grad: each is
    loaded only when given, and its gradient computed (and autograd recorded) when it is wanted."""
    x, w, b = _inputs((1, 32, 4, 5), torch.float32, device)
    _check_backward(x, None if affine == "bias" else w, None if affine == "weight" else b, 8, "silu", wrt=wrt)


def test_reference_backward_with_bias_alone(device):
    """The reference backend takes a bias without weight, forward and backward (torch 2.13's own
    group_norm backward fails on it; the reference passes a weight of ones), against GroupNorm
    written out in fp64."""
    x, _, b = _inputs((2, 32, 5, 3), torch.float32, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ins = _leaves(x, b)
    y = kernels.group_norm_silu_reference(ins[0], None, ins[1], 8)
    got = torch.autograd.grad(y, ins, dy)
    x64, b64 = _leaves(x.double(), b.double())
    g = x64.reshape(2, 8, -1)
    xhat = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(x.shape)
    y64 = F.silu(xhat + b64[:, None, None])
    assert_close(y, y64, name="reference y, bias alone", **TOL[torch.float32])
    for name, g_, w_ in zip(("dx", "dbias"), got, torch.autograd.grad(y64, (x64, b64), dy.double())):
        assert_close(g_, w_, name=f"reference {name}, bias alone", **TOL[torch.float32])


@pytest.mark.parametrize("path", PATHS)
def test_eps_inside_the_square_root(path):
    """Variance 1e-5, as large as eps: rstd = 1/sqrt(var + eps), not 1/(sqrt(var) + eps)."""
    x, w, b = _inputs((1, 96, 7, 9), torch.float32, "cpu")
    x = (x - 1.5) * 1e-3  # std 3e-3, mean ~0
    config = _config(x, 32, PATHS[path])
    assert_close(triton_gn(x, w, b, 32, config=config), _torch(x, w, b, 32, "silu", torch.float64),
                 name=f"low-variance x, {path}", **TOL[torch.float32])


def test_even_tiles_with_uneven_statistics_tiles():
    """12 x 16 = 192 positions (SD 2.1's 24x24 and 12x12 levels are alike): the normalising tiles
    divide H*W but the wider statistics tiles do not, so only the statistics loads need the mask."""
    x, w, b = _inputs((1, 8, 12, 16), torch.float32, "cpu")
    cfg = _config(x, 2)
    assert cfg.single_pass and cfg.even_s and not cfg.stats_even_s, cfg
    assert_close(triton_gn(x, w, b, 2, config=cfg), _torch(x, w, b, 2, "silu", torch.float64), name="y", **TOL[torch.float32])


def test_two_pass_partial_last_channel_block():
    """12 channels per group in blocks of 8 + 4 (SD's 2560 channels / 32 = 80 = 64 + 16 is alike):
    the last block's statistics count its 4 valid channels only."""
    x, w, b = _inputs((1, 24, 5, 7), torch.float32, "cpu")
    cfg = launch_config(x.shape, 2, x.dtype, INTERPRETER_SMS, max_block_c=8, single_pass=False)
    assert cfg.c_blocks == 2, cfg
    assert_close(triton_gn(x, w, b, 2, config=cfg), _torch(x, w, b, 2, "silu", torch.float64), name="y", **TOL[torch.float32])


@pytest.mark.parametrize("path", PATHS)
def test_width_slice_keeps_h_and_w_apart(path):
    """x[..., :3] of a 5x5 map: H and W cannot be flattened into one axis (stride_h = 5 != 3 * 1),
    though stride_h happens to equal H * stride_w."""
    x, w, b = _inputs((2, 16, 5, 5), torch.float32, "cpu")
    x = x[..., :3]
    out = torch.full((2, 16, 5, 5), float("nan"))[..., :3]
    config = _config(x, 4, PATHS[path])
    y = triton_gn(x, w, b, 4, config=config, out=out)
    assert_close(y, _torch(x, w, b, 4, "silu", torch.float64), name=f"sliced x and out, {path}", **TOL[torch.float32])


def test_backward_takes_the_two_pass_split(monkeypatch):
    """After a one-launch forward, the backward runs on the two-pass tiling of the same input."""
    x, w, b = _inputs((1, 24, 11, 13), torch.float32, "cpu")
    assert _config(x, 2).single_pass
    grids = []
    real = gn._BWD_REDUCE
    monkeypatch.setattr(gn, "_BWD_REDUCE", lambda grid, *a: (grids.append(grid), real(grid, *a)))
    triton_gn(x.requires_grad_(), w, b, 2).sum().backward()
    assert grids == [_config(x, 2, single_pass=False).grid], grids


def test_path_choice_boundaries():
    """Rows exactly PROGRAMS_PER_SM x SMs take one launch (one program per row when rows fill the
    GPU, H*W a non-power of two included); a two-pass split of a 2-block group does not over-split."""
    shape = (1, 320, 64, 64)  # 32 rows, groups of 40960 > SINGLE_PASS_MAX_GROUP
    assert 10 * 64 * 64 > SINGLE_PASS_MAX_GROUP and 32 % PROGRAMS_PER_SM == 0
    assert launch_config(shape, 32, torch.float16, sms=32 // PROGRAMS_PER_SM).single_pass
    for shape in ((17, 320, 60, 60), (64, 320, 64, 64)):
        cfg = launch_config(shape, 32, torch.float16, sms=H100_SMS)
        assert cfg.single_pass and cfg.grid == (cfg.rows,), (shape, cfg)
    cfg = launch_config((2, 2560, 32, 32), 32, torch.float16, sms=H100_SMS)  # 80 channels per group
    assert not cfg.single_pass and cfg.c_blocks == 2, cfg
    assert PROGRAMS_PER_SM * H100_SMS <= cfg.grid[0] < 2 * PROGRAMS_PER_SM * H100_SMS, cfg


def test_int32_bound_is_per_sample():
    """Offsets within a sample are 32-bit (the batch offset is 64-bit): 2 x 2**30 elements is fine."""
    x = torch.zeros(1, 1, 1, 1).expand(2, 128, 4096, 2048)
    assert gn._check_triton(x, None, None, 32) is None
    assert "2**31" in gn._check_triton(torch.zeros(1, 1, 1, 1).expand(1, 256, 4096, 2048), None, None, 32)


@pytest.mark.gpu
def test_batch_offsets_past_2_31_elements(device):
    """5 x 2**29 fp16 elements (2.7e9 in all, 5.4 GB): samples past the 2**31st element are reached
    through the kernels' 64-bit batch offset; the last sample is checked against torch."""
    x = torch.randn(1, 128, 2048, 2048, device=device, dtype=torch.float16).expand(5, -1, -1, -1).contiguous()
    w, b = (torch.randn(128, device=device, dtype=torch.float16) for _ in range(2))
    with kernels.use(group_norm_silu="triton"):
        y = kernels.group_norm_silu(x, w, b, 32)
    assert x.numel() > 2**31
    last = x[-1:]
    _check(y[-1:], _torch(last, w, b, 32, "silu"), _torch(last, w, b, 32, "silu", torch.float64), x.dtype,
           "last sample, past 2**31 elements")
