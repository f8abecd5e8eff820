"""Compile the nested decode attention for an H100 (sm_90) without a GPU, and count what a tile costs.

For each kernel and launch it prints the registers and local-memory stack a thread takes (ptxas, via
``cuobjdump -res-usage``), the shared memory a program takes, how many layout conversions and
shared-memory buffers the Triton GPU IR holds, and the SASS instructions of the main loop (the longest
backward branch) per coordinate a thread handles in one tile (keys and values: ``block_n · d · 2`` over
the program's threads). Two kernels:

* ``library``: :func:`lqlib.kernels._nested_triton.nested_attention_kernel` with the options
  :func:`lqlib.kernels.nested.decode_attention` takes on CUDA by default (pairs of lanes, inline-PTX word
  decoding, queries rotated in registers; d = 128, 4 query heads a KV head padded to 16);
* ``lanes``: a probe tile (not the library's): the eight lanes of the words as eight dot operands of depth
  d/8, keys as the first operand of the score dots and values as the second of the output dots, each
  lane decoded elementwise from the (N, d/8) words (the library's ``_lanes``) and the flags from one
  per-token load shifted by a broadcast table. Triton then moves the words, not decoded float16 values,
  through shared memory and decodes them in the tensor cores' operand layout (the layout conversion is
  hoisted above the elementwise decoding). No rotation, no step factors, no masking: a lower bound on a
  full kernel's cost. The library carried this layout, complete, as ``decode_attention(lanes=True)`` at
  commit e79eb89 (``results/sm90_probe_lanes_e79eb89_triton3.6_2026-12-06.txt``: 255 registers and
  424–792 bytes of spills a thread); on an H200 it ran at a third to a half of the default's speed
  (``results/gpu_nested_variants_nvidia-h200_2026-12-06_lanes.json``) and was removed.

Needs Triton with its NVIDIA backend (ptxas, cuobjdump); no GPU. The numbers depend on the Triton
version: the card ran Triton 3.6 (``results/gpu_nested_notes.md``).

    python tools/sm90_probe.py [--launches 128/4/3 64/4/3] [--lanes 64/2 64/4 128/2]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lqlib.kernels import _nested_triton as nt  # noqa: E402
from lqlib.kernels import nested as kn  # noqa: E402

D, C, G_PAD = 128, 16, 16
ATTENTION_POINTERS = {
    "q_ptr": "*fp16",
    "kw_ptr": "*i32",
    "ks_ptr": "*i16",
    "kf_ptr": "*u8",
    "vw_ptr": "*i32",
    "vs_ptr": "*i16",
    "vf_ptr": "*u8",
    "scales_ptr": "*fp32",
    "k_signs_ptr": "*fp32",
    "v_signs_ptr": "*fp32",
    "had_ptr": "*fp16",
    "tables_ptr": "*fp32",
    "shifts_ptr": "*i32",
    "acc_ptr": "*fp32",
    "ml_ptr": "*fp32",
    "lengths_ptr": "*fp32",
}
LANES_POINTERS = {
    "kw_ptr": "*i32",
    "vw_ptr": "*i32",
    "kf_ptr": "*i16",
    "vf_ptr": "*i16",
    "sh_ptr": "*i32",
    "q_ptr": "*fp16",
    "out_ptr": "*fp32",
}


def compile_sm90(fn, constexprs: dict, pointers: dict, options: dict):
    """Compile a @triton.jit function for sm_90: constexprs by name, pointer types by name, the rest i32
    (``qk_scale`` float32)."""
    names = list(inspect.signature(fn.fn).parameters)
    signature = {
        n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "qk_scale" else "i32") for n in names
    }
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def resources(kernel) -> dict:
    """Registers and stack a thread (ptxas), shared memory a program, conversions and buffers in the IR."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ir = kernel.asm["ttgir"]
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "stack bytes": int(stack.group(1)) if stack else -1,
        "shared bytes": int(kernel.metadata.shared),
        "convert_layout": len(re.findall(r"ttg\.convert_layout", ir)),
        "local_alloc": len(re.findall(r"ttg\.local_alloc", ir)),
        "buffers": collections.Counter(
            m.group(1) for m in re.finditer(r"ttg\.local_alloc[^\n]*?-> !ttg\.memdesc<(?:\d+x)+(\w+)", ir)
        ),
    }


def loop_instructions(kernel) -> collections.Counter:
    """Opcodes of the longest loop in the SASS (the instructions between a backward branch and its target)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    best = (0, 0, -1)
    for address, text in code:
        branch = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address and address - int(branch.group(1), 16) > best[0]:
            best = (address - int(branch.group(1), 16), int(branch.group(1), 16), address)
    _, low, high = best
    ops = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for a, text in code if low <= a <= high]
    return collections.Counter(ops)


def library_kernel(block_n: int, warps: int, stages: int):
    constexprs = {
        "HKV": 8,
        "G": 4,
        "BLOCK_G": G_PAD,
        "D": D,
        "FB": 2,
        "BLOCK_N": block_n,
        "K_SHIFT": 7,
        "V_SHIFT": 7,
        "K_RHT": True,
        "V_RHT": not kn.UNROTATE_IN_COMBINE,
        "HAS_SCALES": False,
        "HAS_LENGTHS": False,
        "FAST_CVT": True,
        "PAIRS": True,
        "LEAN": kn.LEAN_PAIRS,
        "Q_FWHT": kn.ROTATE_QUERIES_IN_REGISTERS,
        "LOG2C": 4,
        "KEYS_A": kn.KEYS_AS_A,
    }
    return compile_sm90(
        nt.nested_attention_kernel, constexprs, ATTENTION_POINTERS, {"num_warps": warps, "num_stages": stages}
    )


@triton.jit
def _lane_dot_scores(kw, kb, q_ptr, c, g, C: tl.constexpr, G: tl.constexpr):
    """Scores (N, G) of the words kw (N, C) with flag bits kb (N, C): eight dots of depth C, keys first."""
    k0, k1, k2, k3, k4, k5, k6, k7 = nt._lanes(kw, kb, True)
    lanes = (k0, k1, k2, k3, k4, k5, k6, k7)
    st = tl.zeros((kw.shape[0], G), tl.float32)
    for i in tl.static_range(8):
        st = tl.dot(lanes[i], tl.load(q_ptr + i * C * G + c[:, None] * G + g[None, :]), st)
    return st


@triton.jit
def lanes_tile_kernel(
    kw_ptr,
    vw_ptr,
    kf_ptr,
    vf_ptr,
    sh_ptr,
    q_ptr,
    out_ptr,
    N_TOK,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G: tl.constexpr,
):
    """The probe tile loop (see the module docstring); writes the eight lanes' sums (G, 8C)."""
    g = tl.arange(0, G)
    c = tl.arange(0, C)
    sh = tl.load(sh_ptr + c)[None, :]
    m = tl.full((G,), -float("inf"), tl.float32)
    l = tl.zeros((G,), tl.float32)
    a0 = tl.zeros((G, C), tl.float32)
    a1 = tl.zeros((G, C), tl.float32)
    a2 = tl.zeros((G, C), tl.float32)
    a3 = tl.zeros((G, C), tl.float32)
    a4 = tl.zeros((G, C), tl.float32)
    a5 = tl.zeros((G, C), tl.float32)
    a6 = tl.zeros((G, C), tl.float32)
    a7 = tl.zeros((G, C), tl.float32)
    for t in range(0, N_TOK, BLOCK_N):
        tok = t + tl.arange(0, BLOCK_N)
        kw = tl.load(kw_ptr + tok[:, None] * C + c[None, :])
        vw = tl.load(vw_ptr + tok[:, None] * C + c[None, :])
        kb = (tl.load(kf_ptr + tok).to(tl.int32)[:, None] >> sh) & 1
        vb = (tl.load(vf_ptr + tok).to(tl.int32)[:, None] >> sh) & 1
        st = _lane_dot_scores(kw, kb, q_ptr, c, g, C, G)
        m_new = tl.maximum(m, tl.max(st, axis=0))
        alpha = tl.exp2(m - m_new)
        pt = tl.exp2(st - m_new[None, :])
        l = l * alpha + tl.sum(pt, axis=0)
        m = m_new
        p = tl.trans(pt.to(tl.float16))  # (G, N)
        v0, v1, v2, v3, v4, v5, v6, v7 = nt._lanes(vw, vb, True)
        a0 = a0 * alpha[:, None] + tl.dot(p, v0)
        a1 = a1 * alpha[:, None] + tl.dot(p, v1)
        a2 = a2 * alpha[:, None] + tl.dot(p, v2)
        a3 = a3 * alpha[:, None] + tl.dot(p, v3)
        a4 = a4 * alpha[:, None] + tl.dot(p, v4)
        a5 = a5 * alpha[:, None] + tl.dot(p, v5)
        a6 = a6 * alpha[:, None] + tl.dot(p, v6)
        a7 = a7 * alpha[:, None] + tl.dot(p, v7)
    o = out_ptr + g[:, None] * 8 * C + c[None, :]
    acc = (a0, a1, a2, a3, a4, a5, a6, a7)
    for i in tl.static_range(8):
        tl.store(o + i * C, acc[i] / l[:, None])


def lanes_kernel(block_n: int, warps: int):
    return compile_sm90(
        lanes_tile_kernel,
        {"C": C, "BLOCK_N": block_n, "G": G_PAD},
        LANES_POINTERS,
        {"num_warps": warps, "num_stages": 2},
    )


def report(name: str, launch: str, kernel, block_n: int, warps: int) -> None:
    res = resources(kernel)
    ops = loop_instructions(kernel)
    per_thread = block_n * D * 2 / (32 * warps)
    total = sum(ops.values())
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
    print(
        f"{name:8s} {launch:8s} regs {res['registers']:3d}  stack {res['stack bytes']:4d} B  shared "
        f"{res['shared bytes']:6d} B  convert_layout {res['convert_layout']:2d}  buffers {dict(res['buffers'])}  "
        f"loop {total:5d} instr = {total / per_thread:5.1f} a coordinate  ({top})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launches", nargs="+", default=["128/4/3", "64/4/3"], help="library: block_n/warps/stages")
    ap.add_argument("--lanes", nargs="+", default=["64/2", "64/4", "128/2"], help="probe: block_n/warps")
    args = ap.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90, d = {D}, 4 query heads a KV head (padded to {G_PAD})")
    for launch in args.launches:
        block_n, warps, stages = (int(v) for v in launch.split("/"))
        report("library", launch, library_kernel(block_n, warps, stages), block_n, warps)
    for launch in args.lanes:
        block_n, warps = (int(v) for v in launch.split("/"))
        report("lanes", launch, lanes_kernel(block_n, warps), block_n, warps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
