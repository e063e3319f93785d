"""Compile a kernel call for Hopper (sm_90) without a GPU, and read what the compiler made of it.

Triton's pip wheel ships NVIDIA's ``ptxas`` and ``cuobjdump``, so the exact specialisation a call
would launch on an H100 can be compiled on any machine: registers per thread, spilled bytes,
shared memory, the SASS instruction mix (e.g. whether tile loads became 16-byte ``LDGSTS``
cp.async copies or 2-byte ``LDG`` loads), and the instructions of the innermost loop (per thread
and tile; with the warps per SM, a bound on the issue rate). It catches what the interpreter
cannot: a kernel that does not compile for sm_90, register spills, or lost vectorisation. Speed
still needs a GPU.

    python -m bench.sm90                     # every kernel (forward and backward) at SD 1.5 shapes

The research backend kernels/attention_sm90.py (Gluon) is compiled too: it cannot run under the
interpreter, so this is the one place a machine without a GPU checks it.

Uses Triton internals (the JIT binder, ``ASTSource``); written against Triton 3.9, it raises
:class:`Unavailable` where they differ.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

TARGET = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size): the H100 / H200


class Unavailable(RuntimeError):
    """This Triton cannot compile for sm_90 offline (internals moved, or no ptxas)."""


def wide_load(op: str) -> bool:
    """A 16-byte global load: a .128 modifier anywhere in its name (LDG.E.128, LDG.E.128.CONSTANT)."""
    return "128" in op.split(".")[1:]


@dataclass
class Compiled:
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    num_stages: int
    sass: collections.Counter = field(repr=False)  # opcode (without modifiers) -> count
    global_loads: collections.Counter = field(repr=False)  # LDG / LDGSTS with modifiers, e.g. LDG.E.128
    loops: tuple = field(default=(), repr=False)  # innermost loops' bodies: one Counter (opcode -> count) each
    loop_mufu_in_flight: int = 0  # the longest inner loop's MUFU issued under an in-flight wgmma (mufu_in_flight)

    @property
    def loop(self) -> collections.Counter:
        """The longest innermost loop's body (opcode -> count), from its label to its back-branch:
        per thread, the cost of one tile of a streaming kernel. Empty if the kernel has no loop."""
        return max(self.loops, key=lambda body: sum(body.values()), default=collections.Counter())

    @property
    def loop_instructions(self) -> int:
        return sum(self.loop.values())

    @property
    def ctas_per_sm(self) -> int:
        """Resident programs per SM, as the occupancy rules for sm_90 give them: 64 warps, 65,536
        registers (allocated 256 per warp), 228 KB of shared memory (1 KB reserved per block) and
        32 blocks per SM. A static estimate: one program per SM hides latency only by its own
        pipelining (cp.async / wgmma stages)."""
        per_warp_regs = -(-self.registers * 32 // 256) * 256
        by_regs = (65536 // per_warp_regs) // self.num_warps if per_warp_regs else 32
        by_smem = (228 * 1024) // (self.shared_bytes + 1024)
        return max(0, min(32, 64 // self.num_warps, by_regs, by_smem))

    @property
    def narrow_loads(self) -> int:
        """Global loads narrower than 16 bytes (no .128 modifier): unvectorised tile loads."""
        return sum(n for op, n in self.global_loads.items() if not wide_load(op))

    def summary(self) -> str:
        ops = " ".join(f"{k}={self.sass.get(k, 0)}" for k in ("HGMMA", "LDGSTS", "LDG", "STG", "MUFU", "FFMA"))
        loads = " ".join(f"{k}={v}" for k, v in sorted(self.global_loads.items()))
        loop = ""
        if self.loops:
            mix = " ".join(f"{k}={v}" for k, v in self.loop.most_common(6))
            loop = (f"; inner loop {self.loop_instructions} instructions ({mix}), "
                    f"{self.loop_mufu_in_flight} MUFU under an in-flight wgmma")
        return (f"{self.kernel}: {self.registers} regs, {self.spill_bytes} B spilled, {self.shared_bytes} B shared, "
                f"{self.num_warps} warps, {self.num_stages} stages, {self.ctas_per_sm} programs/SM; {ops}; "
                f"loads: {loads}{loop}")


def _toolchain():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        from triton.runtime.jit import create_function_from_signature
        from triton.tools.disasm import get_sass
    except ImportError as e:
        raise Unavailable(f"Triton internals for offline compiles not found: {e}") from None
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        raise Unavailable(f"no cuobjdump in {bin_dir}")
    return GPUTarget, ASTSource, compile, make_backend, create_function_from_signature, get_sass, bin_dir


@contextlib.contextmanager
def capture(module_name: str, *kernel_names: str):
    """Within the block, launches of ``module.<kernel>[grid](...)`` compile for sm_90 instead of
    running; the results are appended to the yielded list. The module's launch checks see a
    CUDA-capable setup (``interpreting`` patched) so CPU tensors reach the launchers."""
    GPUTarget, ASTSource, compile_, make_backend, create_binder, get_sass, bin_dir = _toolchain()
    if importlib.import_module("kernels._triton").INTERPRET:  # TRITON_INTERPRET, read as Triton reads it
        raise Unavailable("TRITON_INTERPRET is set: @triton.jit made interpreter functions, which do not "
                          "compile; run in a process without it")
    module = importlib.import_module(module_name)
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    found: list[Compiled] = []
    saved = {name: getattr(module, name) for name in kernel_names}

    class _Launch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                fn = self.fn
                kwargs.setdefault("debug", False)
                try:
                    binder = create_binder(fn.signature, fn.params, backend)
                    bound, spec, options = binder(*args, **kwargs)
                    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
                except (AttributeError, TypeError) as e:
                    raise Unavailable(f"Triton's JIT internals differ from 3.9's: {e}") from None
                source = ASTSource
                if getattr(fn, "is_gluon", lambda: False)():  # a @gluon.jit kernel builds its IR its own way
                    from triton.experimental.gluon._runtime import GluonASTSource as source
                k = compile_(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
                found.append(_inspect(fn.__name__, k, get_sass, bin_dir))
            return launch

    for name, fn in saved.items():
        setattr(module, name, _Launch(fn))
    registry = importlib.import_module("kernels.registry")
    saved_interp = registry.interpreting
    patched = [m for m in (module, registry) if getattr(m, "interpreting", None) is saved_interp]
    for m in patched:
        m.interpreting = lambda: True
    try:
        yield found
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        for m in patched:
            m.interpreting = saved_interp


# get_sass lines: "<scheduling control, e.g. 02:-:1:Y:4>\t[@predicate ]OPCODE.MODIFIERS operands;"
_INSTRUCTION = re.compile(r"^[^\t\n]*\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*);", re.M)
_LABEL = re.compile(r"^\s*([.\w]+):\s*$")


def _inner_bodies(sass: str) -> list[list[tuple[str, list[str]]]]:
    """The innermost loops of a get_sass listing, each as its (opcode with modifiers, operands) in
    order: for each branch back to an earlier label, with no other such branch inside its span, the
    instructions from the label to the branch. Forward branches inside (an if) stay in the body."""
    ops, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = _INSTRUCTION.match(line)
        if ins:
            ops.append((ins.group(1), ins.group(2).split()))
    spans = [(labels[args[-1]], i) for i, (op, args) in enumerate(ops)
             if op.split(".")[0] == "BRA" and args and args[-1] in labels and labels[args[-1]] < i]
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [ops[a:b + 1] for a, b in inner]


def _opcode_counts(body: list[tuple[str, list[str]]]) -> collections.Counter:
    return collections.Counter(op.split(".")[0] for op, _ in body)


def inner_loops(sass: str) -> list[collections.Counter]:
    """The innermost loops' bodies (see _inner_bodies) as opcode (without modifiers) counts."""
    return [_opcode_counts(body) for body in _inner_bodies(sass)]


def mufu_in_flight(body: list[tuple[str, list[str]]]) -> int:
    """``MUFU`` instructions (exp2 and friends) issued while a wgmma group is in flight: after an
    ``HGMMA`` and before the ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` that waits for every group. This is
    the softmax work a warpgroup overlaps with its own matmuls (FlashAttention-3's intra-warpgroup
    overlap); 0 where each matmul is waited for before the exponentials."""
    count, in_flight = 0, False
    for op, args in body:
        if op.startswith("HGMMA"):
            in_flight = True
        elif op.startswith("WARPGROUP.DEPBAR") and args and args[-1].rstrip(",;") in ("0x0", "0"):
            in_flight = False
        elif op.startswith("MUFU") and in_flight:
            count += 1
    return count


def _inspect(name, kernel, get_sass, bin_dir) -> Compiled:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    sass = get_sass(kernel.asm["cubin"])
    full = [m.group(1) for m in _INSTRUCTION.finditer(sass)]
    bodies = _inner_bodies(sass)
    longest = max(bodies, key=len, default=[])
    if not full:
        raise RuntimeError("bench.sm90: no SASS instructions recognised; has get_sass changed its format?")
    md = kernel.metadata
    return Compiled(name, regs, stack, md.shared, md.num_warps, md.num_stages,
                    collections.Counter(op.split(".")[0] for op in full),
                    collections.Counter(op for op in full if op.split(".")[0] in ("LDG", "LDGSTS")),
                    tuple(_opcode_counts(body) for body in bodies),
                    mufu_in_flight(longest))


def sd15_calls():
    """(label, module, kernel names, thunk) for SD 1.5 shapes at 512 px, batch 2, fp16. The thunks
    call the switch's entries (_attention_triton, ...), past the checks: CPU tensors stand in for
    CUDA ones here, which the public functions would refuse."""
    import torch

    def attn(b, h, lq, lkv, d, dtype=torch.float16, layout="BLHD", config=None):
        def call():
            at = importlib.import_module("kernels.attention")
            if layout == "BLHD":  # the UNet's: heads split off the channels of (B, L, H·D)
                q = torch.empty(b, lq, h, d, dtype=dtype).transpose(1, 2)
                k = torch.empty(b, lkv, h, d, dtype=dtype).transpose(1, 2)
            else:
                q, k = torch.empty(b, h, lq, d, dtype=dtype), torch.empty(b, h, lkv, d, dtype=dtype)
            with torch.no_grad():
                at._attention_triton(q, k, k, config=config)
        return call

    def gn(shape, single, fmt=torch.contiguous_format):
        def call():
            gn = importlib.import_module("kernels.group_norm_silu")
            x = torch.empty(shape, dtype=torch.float16).to(memory_format=fmt)
            w = torch.empty(shape[1], dtype=torch.float16)
            cfg = gn.launch_config(tuple(shape), 32, torch.float16, gn.H100_SMS, single_pass=single)
            with torch.no_grad():
                gn._group_norm_silu_triton(x, w, w, 32, config=cfg)
        return call

    def attn_bwd(b, h, lq, lkv, d, dtype=torch.float16):
        def call():
            at = importlib.import_module("kernels.attention")
            q, k, v = (torch.empty(b, n, h, d, dtype=dtype).transpose(1, 2).requires_grad_() for n in (lq, lkv, lkv))
            at._attention_triton(q, k, v).backward(torch.empty(b, h, lq, d, dtype=dtype))  # dO: row stride d
        return call

    def causal(b, h, n, d):
        def call():
            at = importlib.import_module("kernels.attention")
            q = torch.empty(b, n, h, d, dtype=torch.float16).transpose(1, 2)
            with torch.no_grad():
                at._attention_triton(q, q, q, causal=True)
        return call

    def gn_bwd(shape):
        def call():
            gn = importlib.import_module("kernels.group_norm_silu")
            x = torch.empty(shape, dtype=torch.float16, requires_grad=True)
            w = torch.empty(shape[1], dtype=torch.float16, requires_grad=True)
            cfg = gn.launch_config(tuple(shape), 32, torch.float16, gn.H100_SMS)  # the tiling an H100 gets
            gn._group_norm_silu_triton(x, w, w, 32, config=cfg).backward(torch.empty(shape, dtype=torch.float16))
        return call

    def step():
        st = importlib.import_module("kernels.scheduler_step")
        x = torch.empty(2, 4, 64, 64, dtype=torch.float16)
        mask = torch.empty(1, 1, 64, 64, dtype=torch.float16)
        coeffs = st.StepCoefficients(a_x=1.0, a_o=-0.5, clip=1.0, b_x=1.0, b_0=-1.0, b_d=0.5, c0=0.4, c1=0.6,
                                     c2=0.1, sigma=0.05)  # DDIM, eta > 0, x0 clipped: every term on
        st._scheduler_step_triton(x, x, coeffs, model_output_uncond=x, guidance_scale=7.5, noise=x, mask=mask,
                                 known=x, return_x0=True)

    def gluon(b, h, lq, lkv, d, dtype=torch.float16):
        def call():  # the research backend's launch, past its check (which asks for a CUDA device)
            g = importlib.import_module("kernels.attention_sm90")
            if g.IMPORT_ERROR:
                raise Unavailable(g.IMPORT_ERROR)
            q = torch.empty(b, lq, h, d, dtype=dtype).transpose(1, 2)
            k = torch.empty(b, lkv, h, d, dtype=dtype).transpose(1, 2)
            g._forward(q, k, k, store_lse=False)
        return call

    # the K/V-resident forward at one of its tune candidates
    resident = importlib.import_module("kernels.attention").AttentionConfig(64, 64, 4, 3, q_blocks=4)
    gn_kernels = ("_fused_kernel", "_stats_kernel", "_apply_kernel")
    attn_kernels = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    gn_bwd_kernels = (*gn_kernels, "_bwd_reduce_kernel", "_bwd_dx_kernel")
    return [
        ("attention D40 self 4096", "kernels.attention", ("_attn_fwd_kernel",), attn(2, 8, 4096, 4096, 40)),
        ("attention D40 cross 77", "kernels.attention", ("_attn_fwd_kernel",), attn(2, 8, 4096, 77, 40)),
        ("attention D40 cross 77, K/V-resident", "kernels.attention", ("_attn_fwd_resident_kernel",),
         attn(2, 8, 4096, 77, 40, config=resident)),
        ("attention D80 self 1024", "kernels.attention", ("_attn_fwd_kernel",), attn(2, 8, 1024, 1024, 80)),
        ("attention D160 self 256", "kernels.attention", ("_attn_fwd_kernel",), attn(2, 8, 256, 256, 160)),
        ("group_norm_silu single (2,1280,16,16)", "kernels.group_norm_silu", gn_kernels, gn((2, 1280, 16, 16), True)),
        ("group_norm_silu two-pass (2,320,64,64)", "kernels.group_norm_silu", gn_kernels, gn((2, 320, 64, 64), False)),
        ("group_norm_silu single channels_last (2,1280,16,16)", "kernels.group_norm_silu", gn_kernels,
         gn((2, 1280, 16, 16), True, torch.channels_last)),  # 40 channels per group: 16-byte runs along C
        ("attention D40 self 4096 contiguous (B,H,L,D)", "kernels.attention", ("_attn_fwd_kernel",),
         attn(2, 8, 4096, 4096, 40, layout="BHLD")),
        ("attention D40 self 4096 bf16", "kernels.attention", ("_attn_fwd_kernel",),
         attn(2, 8, 4096, 4096, 40, torch.bfloat16)),
        ("attention D40 self 9216 (768 px)", "kernels.attention", ("_attn_fwd_kernel",), attn(2, 8, 9216, 9216, 40)),
        ("attention D40 self 4096 fp32", "kernels.attention", ("_attn_fwd_kernel",),
         attn(2, 8, 4096, 4096, 40, torch.float32)),
        ("attention D160 backward 256 fp32", "kernels.attention", attn_kernels,
         attn_bwd(2, 8, 256, 256, 160, torch.float32)),
        ("attention D64 causal 77 (CLIP)", "kernels.attention", ("_attn_fwd_kernel",), causal(2, 12, 77, 64)),
        ("attention D40 backward 4096", "kernels.attention", attn_kernels, attn_bwd(2, 8, 4096, 4096, 40)),
        ("attention D40 backward cross 77", "kernels.attention", attn_kernels, attn_bwd(2, 8, 4096, 77, 40)),
        ("attention D80 backward 1024", "kernels.attention", attn_kernels, attn_bwd(2, 8, 1024, 1024, 80)),
        ("attention D160 backward 256", "kernels.attention", attn_kernels, attn_bwd(2, 8, 256, 256, 160)),
        ("group_norm_silu backward (2,320,64,64)", "kernels.group_norm_silu", gn_bwd_kernels, gn_bwd((2, 320, 64, 64))),
        # H·W = 1: a GPU launch makes an int argument equal to 1 a constant (the interpreter does not),
        # so S = 1 once turned an expression of the dx kernel into a Python int and failed to compile
        ("group_norm_silu backward (2,64,1,1)", "kernels.group_norm_silu", gn_bwd_kernels,
         gn_bwd((2, 64, 1, 1))),
        ("scheduler_step CFG+DDIM+RePaint (2,4,64,64)", "kernels.scheduler_step", ("_scheduler_step_kernel",), step),
        ("attention D40 self 4096, gluon_sm90", "kernels.attention_sm90", ("_attn_fwd_sm90_kernel",),
         gluon(2, 8, 4096, 4096, 40)),
        ("attention D40 cross 77, gluon_sm90", "kernels.attention_sm90", ("_attn_fwd_sm90_kernel",),
         gluon(2, 8, 4096, 77, 40)),
    ]


def main(argv: list[str] | None = None) -> int:
    """One line per compiled kernel; ``--json``: a list of records instead. Exit 3 if unavailable."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.sm90", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status: 0 compiled, 3 offline sm_90 compiles unavailable here.")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list of records (case, kernel, registers, spills, ...) instead of "
                             "a line per kernel ({\"unavailable\": reason} where offline compiles are unavailable)")
    as_json = parser.parse_args(argv).json
    records = []
    for label, module, names, call in sd15_calls():
        try:
            with capture(module, *names) as found:
                call()
        except Unavailable as e:
            print(json.dumps({"unavailable": str(e)}) if as_json else f"unavailable: {e}")
            return 3
        for c in found:
            records.append(dict(case=label, kernel=c.kernel, registers=c.registers, spill_bytes=c.spill_bytes,
                                shared_bytes=c.shared_bytes, ctas_per_sm=c.ctas_per_sm, narrow_loads=c.narrow_loads,
                                global_loads=dict(c.global_loads), hgmma=c.sass.get("HGMMA", 0),
                                loop_instructions=c.loop_instructions,
                                loop_mix=dict(c.loop), loop_mufu_in_flight=c.loop_mufu_in_flight))
            if not as_json:
                print(f"{label}: {c.summary()}")
    if as_json:
        print(json.dumps(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
