"""Writes the optimized HLO of one attention layer's jitted forward+backward (the ``loss`` gradient that
``attention.py`` times), to read which fusions XLA made and what each one reads and writes.

    python benchmarks/hlo_dump.py --impl blossom-pallas --length 1024 --out hlo_pallas_1k.txt

Shapes as ``attention.py`` (D = 128, H = 8, Hk = 2, d = 16, bfloat16, ``--tokens`` per batch, right-padded rows).
Used for round 9 of ``benchmarks/NOTES.md`` (``results/gpu_call47_2026-11-27/hlo_pallas_1k.txt.gz``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention  # noqa: E402


def optimized_hlo(impl: str, length: int, tokens: int, seed: int = 0) -> str:
    """The compiled (post-optimisation) HLO text of ``impl``'s layer gradient at N = ``length``."""
    if length < 1 or tokens < length:
        raise ValueError(f"need 1 <= length <= tokens, got length={length}, tokens={tokens}")
    layer = attention.make_layer(impl)
    params = layer.init(jax.random.key(seed))
    x, valid, cotangent = attention._inputs(jax.random.key(seed + 1), tokens // length, length, padded=True)
    _, grad = attention.fwd_and_grad(layer)
    return grad.lower(params, x, valid, cotangent).compile().as_text()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="blossom-pallas",
                        help="dense-cudnn | dense-xla | blossom-xla | blossom-pallas | blossom-reference")
    parser.add_argument("--length", type=int, default=1024, help="sequence length N")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens / N)")
    parser.add_argument("--out", required=True, help="file for the HLO text")
    args = parser.parse_args(argv)
    text = optimized_hlo(args.impl, args.length, args.tokens)
    with open(args.out, "w") as f:
        f.write(text)
    fusions = sum(1 for line in text.splitlines() if " fusion(" in line)
    print(f"hlo {args.impl} N={args.length}: {len(text.splitlines())} lines, {fusions} fusion ops -> {args.out}")


if __name__ == "__main__":
    main()
