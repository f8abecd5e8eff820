"""Compile the nested decode attention for an H100 (sm_90) without a GPU, and count what a tile costs.

For each kernel and launch it prints the registers and local-memory stack a thread takes (ptxas, via
``cuobjdump -res-usage``), the shared memory a program takes, how many layout conversions and
shared-memory buffers the Triton GPU IR holds, and the SASS instructions of the main loop (the longest
backward branch) per coordinate a thread handles in one tile (keys and values: ``block_n · d · 2`` over
the program's threads) and the element types of its shared-memory buffers. The kernel is
:func:`lqlib.kernels._nested_triton.nested_attention_kernel` with the options
:func:`lqlib.kernels.nested.decode_attention` takes on CUDA by default (``library``: pairs of lanes,
inline-PTX word decoding, queries rotated in registers; d = 128, 4 query heads a KV head padded to 16),
and with ``lanes=True`` (``lib-lanes``: eight operands of depth d/8 a tile, each decoded from the words
in the dots' operand layout, so that the words, not decoded float16 values, cross shared memory).

Needs Triton with its NVIDIA backend (ptxas, cuobjdump); no GPU. The numbers depend on the Triton
version: the card ran Triton 3.6 (``results/gpu_nested_notes.md``).

    python tools/sm90_probe.py [--launches 128/4/3 64/4/3] [--library-lanes 64/2/2 64/1/2 64/4/2]
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


def library_kernel(block_n: int, warps: int, stages: int, lanes: bool = False):
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
        "KEYS_A": kn.KEYS_AS_A and not lanes,
        "LANES": lanes,
    }
    return compile_sm90(
        nt.nested_attention_kernel, constexprs, ATTENTION_POINTERS, {"num_warps": warps, "num_stages": stages}
    )


def report(name: str, launch: str, kernel, block_n: int, warps: int) -> None:
    res = resources(kernel)
    ops = loop_instructions(kernel)
    per_thread = block_n * D * 2 / (32 * warps)
    total = sum(ops.values())
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
    print(
        f"{name:9s} {launch:8s} regs {res['registers']:3d}  stack {res['stack bytes']:4d} B  shared "
        f"{res['shared bytes']:6d} B  convert_layout {res['convert_layout']:2d}  buffers {dict(res['buffers'])}  "
        f"loop {total:5d} instr = {total / per_thread:5.1f} a coordinate  ({top})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launches", nargs="*", default=["128/4/3", "64/4/3"], help="library: block_n/warps/stages")
    ap.add_argument("--library-lanes", nargs="*", default=["64/2/2", "64/1/2", "64/4/2"], help="lanes=True: b/w/s")
    args = ap.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90, d = {D}, 4 query heads a KV head (padded to {G_PAD})")
    for launch in args.launches:
        block_n, warps, stages = (int(v) for v in launch.split("/"))
        report("library", launch, library_kernel(block_n, warps, stages), block_n, warps)
    for launch in args.library_lanes:
        block_n, warps, stages = (int(v) for v in launch.split("/"))
        report("lib-lanes", launch, library_kernel(block_n, warps, stages, lanes=True), block_n, warps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
