"""Where the tile-wise selection kernel's time goes: source-level variants of ``pallas_kernels/ltis_gpu.py``'s
``select_blocks_gpu``, each built from the module's source by one text substitution and timed in the same
process (bfloat16 compressed keys, 65,536 tokens, H = 8, Hk = 2, d = 16, causal). Every variant runs the
tile-wise kernel at every N (``SEL_ROWS_MAX_BLOCKS = -1``; by default N < 16,384 uses the row-wise kernel).

Variants (``VARIANTS``): the kernel as it is (TF32x3 scoring products); IEEE and single-pass TF32 scoring
products; the top-n insertion as a fixed ``n``-round loop instead of the data-dependent ``while`` (always,
or only in tiles with a candidate); and, for attribution only (its output is wrong), no top-n at all
(log-sum-exp only). In the interpreter the scores are IEEE whatever the variant says. Each variant's
selection is compared with the unmodified kernel's (fraction of (query, kv head) rows whose kept sets differ).

Usage (GPU): python benchmarks/select_variants.py [--lengths 1024,32768] [--iters 20]
Writes $OUT/select_variants.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels_ltis as kl  # noqa: E402  (inputs, timing and the kept-set comparison)
from pallas_kernels import ltis_gpu  # noqa: E402

WHILE = "_, vals, idxs = lax.while_loop(more, insert, (cand, vals, idxs))"
FIXED = "_, vals, idxs = lax.fori_loop(0, n_sel, lambda _, c: insert(c), (cand, vals, idxs))"
IF_ANY = ("_, vals, idxs = lax.cond(jnp.max(cand.astype(jnp.int32)) > 0, "
          "lambda c: lax.fori_loop(0, n_sel, lambda _, c2: insert(c2), c), lambda c: c, (cand, vals, idxs))")
SCORES = "precision=score_precision) * scale"
VARIANTS = {
    "as_is": [],
    "ieee_scores": [(SCORES, "precision=lax.Precision.HIGHEST) * scale")],
    "tf32_scores": [(SCORES, "precision=None) * scale")],
    "fixed_rounds": [(WHILE, FIXED)],
    "fixed_rounds_if_any": [(WHILE, IF_ANY)],
    "no_topn(attribution)": [(WHILE, "pass")],
}


def load_variant(name: str, substitutions, interpret: bool):
    source = open(ltis_gpu.__file__).read()
    for old, new in substitutions:
        if old not in source:
            raise ValueError(f"variant {name}: {old!r} not found in ltis_gpu.py")
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(f"ltis_variant_{len(name)}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = ltis_gpu.__file__
    exec(compile(source, f"<ltis_gpu:{name}>", "exec"), module.__dict__)  # noqa: S102 - our own source
    module.SEL_ROWS_MAX_BLOCKS = -1  # the variants are of the tile-wise kernel
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,32768")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    args = parser.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        bsz = max(1, args.tokens // n)
        x = kl.make_inputs(jax.random.key(n), bsz, n, kl.H, kl.HK, kl.D, jnp.bfloat16)
        base = None
        for name, subs in VARIANTS.items():
            try:
                module = load_variant(name, subs, args.interpret)
            except ValueError as error:
                print(json.dumps(dict(N=n, variant=name, error=str(error))), flush=True)
                continue
            select = jax.jit(lambda qm, ck, bv, m=module: m.select_blocks_gpu(
                qm, ck, bv, causal=True, num_selected=kl.N_SEL, block_size=kl.BLOCK, scale=1 / math.sqrt(kl.D),
                interpret=args.interpret))
            try:
                sel, kept = select(x["qm"], x["ck"], x["bv"])
            except Exception as error:  # noqa: BLE001 - a variant that does not lower is a result too
                rows.append(dict(N=n, variant=name, error=f"{type(error).__name__}: {str(error)[:200]}"))
                print(json.dumps(rows[-1]), flush=True)
                continue
            if base is None:
                base = (sel, kept)
            select_ms, _ = kl.timeit(select, (x["qm"], x["ck"], x["bv"]), args.warmup, args.iters)
            row = dict(N=n, B=bsz, variant=name, select_ms=round(select_ms, 4),
                       kept_set_mismatch_vs_as_is=kl.kept_set_mismatch(sel, kept, *base))
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                  rows=rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "select_variants.json"), "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
