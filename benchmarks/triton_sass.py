"""Machine code of the layer's Pallas-Triton kernels without a GPU: registers, shared memory and SASS instruction
counts per kernel, and per loop body.

The benchmark layer's forward + backward (``attention.py``'s ``blossom-pallas``) is lowered for CUDA on the host,
each ``pallas_call``'s Triton module is captured as it is lowered and written as ``NN_<kernel>.ttir``; with the
``triton`` package installed (``pip install triton``: its wheel carries ``ptxas`` and ``cuobjdump``) each module is
then compiled for sm_90 and disassembled, and the report lists per kernel the registers per thread, spills, shared
memory, the static SASS instruction count with its most frequent opcodes, and the length of every loop body (a
backward branch), which is what an issue-bound kernel pays per iteration. Triton's version here need not match the
one inside jaxlib: registers came out within a few of what ``ncu`` read on the GPU (e.g. the LTIS forward 152 here
against 146 there, benchmarks/results/gpu_call56_2026-11-28).

Usage:  python benchmarks/triton_sass.py --length 1024 [--kernels stis,ltis_select] [--set module.NAME=int,...]
        [--out DIR] [--lower-only]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention  # noqa: E402  (benchmarks/attention.py)
import overrides  # noqa: E402  (benchmarks/overrides.py)

def _launch(kernel: str) -> tuple[int, int]:
    """(num_warps, num_stages) a kernel is launched with (its module does not record them): the module constants
    behind each ``pallas_call`` name."""
    from pallas_kernels import gated_gpu, gpu_common, ltis_gpu, stis_gpu

    stages = gpu_common.NUM_STAGES
    table = {"ltis_select": (ltis_gpu.SEL_NUM_WARPS, ltis_gpu.SEL_NUM_STAGES),
             "ltis_attention_fwd": (ltis_gpu.ATTN_NUM_WARPS, stages),
             "ltis_attention_dq": (ltis_gpu.DQ_NUM_WARPS, stages),
             "ltis_attention_dkv": (ltis_gpu.DKV_NUM_WARPS, ltis_gpu.DKV_NUM_STAGES),
             "gated_attention_fwd": (gated_gpu.FWD_NUM_WARPS, stages),
             "gated_attention_dq": (gated_gpu.DQ_NUM_WARPS, stages),
             "gated_attention_dkv": (gated_gpu.DKV_NUM_WARPS, gated_gpu.DKV_NUM_STAGES)}
    if kernel.startswith("stis_"):
        return stis_gpu.NUM_WARPS, stis_gpu.NUM_STAGES
    if kernel not in table:
        raise ValueError(f"no warp count / pipeline depth known for kernel {kernel!r}")
    return table[kernel]


@contextlib.contextmanager
def _capturing_triton_modules():
    """Yields a list that receives (kernel name, Triton module text) for every pallas_call lowered meanwhile."""
    from jax._src.pallas.triton import pallas_call_registration

    captured = []
    original = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        module = result.module
        name = next((op.attributes["sym_name"].value for op in module.body.operations
                     if "sym_name" in op.attributes), f"kernel{len(captured)}")
        captured.append((name, module.operation.get_asm(enable_debug_info=False)))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield captured
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original


def lower_layer_kernels(seq_len: int, tokens: int = 65536) -> list[tuple[str, str]]:
    """[(kernel name, Triton module text)] of the benchmark layer's jitted forward + backward at N = seq_len,
    lowered for CUDA on any host (parameters are initialised through the xla impl, which runs anywhere)."""
    from blossom_jax.ops import pallas as pallas_ops

    params = attention.make_layer("blossom-xla").init(jax.random.key(0))
    batch = max(1, tokens // seq_len)
    x = jax.ShapeDtypeStruct((batch, seq_len, attention.D), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    cotangent = jax.ShapeDtypeStruct((batch, seq_len, attention.D), jnp.float32)
    _, grad = attention.fwd_and_grad(attention.make_layer("blossom-pallas"))
    with _capturing_triton_modules() as captured, pallas_ops.target_backend("gpu"):
        grad.trace(params, x, valid, cotangent).lower(lowering_platforms=("cuda",))
    return captured


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_report(sass: str) -> dict:
    """Opcode counts and loop-body lengths (instructions between a predicated backward branch, a loop's latch, and
    its target) of a ``cuobjdump -sass`` listing."""
    opcodes = collections.Counter()
    loops = []
    for match in _SASS_LINE.finditer(sass):
        address, predicate, opcode, operands = int(match.group(1), 16), match.group(2), match.group(3), match.group(4)
        opcodes[opcode.split(".")[0]] += 1
        target = re.search(r"0x([0-9a-f]+)", operands) if predicate and opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((address - int(target.group(1), 16)) // 16 + 1)
    return {"instructions": sum(opcodes.values()), "opcodes": opcodes, "loop_bodies": loops}


def compile_for_sm90(ttir_path: str, num_warps: int, num_stages: int) -> dict:
    """Compiles a .ttir file with the installed Triton for sm_90; writes .ptx / .cubin / .sass beside it."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(ttir_path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    stem = ttir_path.removesuffix(".ttir")
    with open(stem + ".cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    with open(stem + ".ptx", "w") as f:
        f.write(kernel.asm["ptx"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", stem + ".cubin"], capture_output=True, text=True, check=True).stdout
    with open(stem + ".sass", "w") as f:
        f.write(sass)
    usage = subprocess.run([cuobjdump, "-res-usage", stem + ".cubin"], capture_output=True, text=True,
                           check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(registers.group(1)) if registers else None,
            "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_bytes": kernel.metadata.shared, **sass_report(sass)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024, help="sequence length N")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens / N)")
    parser.add_argument("--kernels", default=None, help="comma-separated substrings of the kernels to report")
    parser.add_argument("--out", default="/tmp/blossom_triton_sass", help="folder for the .ttir / .sass files")
    parser.add_argument("--lower-only", action="store_true", help="write the Triton modules, compile nothing")
    parser.add_argument("--set", default=None, metavar="module.NAME=int,...",
                        help="override pallas_kernels constants first (benchmarks/overrides.py), e.g. "
                             "ltis_gpu.DKV_NUM_STAGES=3")
    args = parser.parse_args(argv)
    overrides.apply(args.set)
    os.makedirs(args.out, exist_ok=True)
    wanted = [w for w in (args.kernels or "").split(",") if w]
    for index, (name, text) in enumerate(lower_layer_kernels(args.length, args.tokens)):
        if wanted and not any(w in name for w in wanted):
            continue
        path = os.path.join(args.out, f"{index:02d}_{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        if args.lower_only:
            print(f"{name}: {path}")
            continue
        report = compile_for_sm90(path, *_launch(name))
        top = ", ".join(f"{op} {count}" for op, count in report["opcodes"].most_common(12))
        print(f"{name}: {report['registers']} registers, stack {report['stack_bytes']} B, shared "
              f"{report['shared_bytes']} B, {report['instructions']} SASS instructions, loop bodies "
              f"{report['loop_bodies']}\n    {top}")


if __name__ == "__main__":
    main()
