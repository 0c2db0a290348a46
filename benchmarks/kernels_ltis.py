"""GPU benchmark of the LTIS Pallas kernels (pallas_kernels/ltis_gpu.py): correctness, then timings.

1. Correctness on fresh random inputs against the pure-jnp references (pallas_kernels/ltis_reference.py):
   small shapes (float32 and bfloat16, causal and bidirectional, right padding) and every benchmark shape
   (bfloat16). Selection is compared as kept *sets* per (batch, query, kv head) (the order of the slots is
   free); the attention is compared on the kernel's own selection, outputs and gradients w.r.t. q, k, v.
   float32 runs with IEEE products (jax.default_matmul_precision("highest"), 2e-5) and once with the GPU
   default, TF32 attention products (5e-3; the selection scores are TF32x3, IEEE under "highest").
2. Timings at B * N = 65,536 tokens, N in {256, 1024, 4096, 16384, 32768, 65536}, H = 8, Hk = 2, d = 16,
   bfloat16: selection (kernel only, q_mean precomputed), attention forward, attention forward + backward
   (gradients w.r.t. q, k, v), and select + forward + backward. Medians of --iters timed calls after
   --warmup calls, each call ended by ``block_until_ready``.

``--sweep "ATTN_ROWS=32,ATTN_NUM_WARPS=2" "DKV_ROWS=128" ...`` also times each set of tile-constant overrides
of ``pallas_kernels.ltis_gpu`` (selection, forward, forward + backward at every --lengths), after checking
it at N = 1000 (bfloat16, causal and bidirectional) against the references; the defaults are timed first.

``--select-only`` times the selection kernel alone (also in a sweep); ``--set module.NAME=int,...`` overrides
``pallas_kernels`` constants for the whole run (``benchmarks/overrides.py``), e.g.
``--set ltis_gpu.SEL_BLOCK_Q=64,ltis_gpu.SEL_NUM_WARPS=2`` for another selection tile.

Usage (on a GPU machine):  python benchmarks/kernels_ltis.py [--check-only] [--iters 20] [--warmup 5]
Writes JSON to $OUT/kernels_ltis.json when $OUT is set (and prints it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import overrides  # noqa: E402  (benchmarks/overrides.py)
from pallas_kernels import ltis_gpu, ltis_reference  # noqa: E402

TOKENS = 65536
LENGTHS = (256, 1024, 4096, 16384, 32768, 65536)
H, HK, D, BLOCK, N_SEL = 8, 2, 16, 16, 4
INTERPRET = False  # --interpret: Pallas interpreter (CPU smoke test of this script, tiny --lengths only)


def make_inputs(key, bsz, n, h, hk, d, dtype, lens=None):
    kq, kk, kv, kc, kt = jax.random.split(key, 5)
    q = jax.random.normal(kq, (bsz, n, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (bsz, n, hk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (bsz, n, hk, d), jnp.float32).astype(dtype)
    nc = n // BLOCK
    # compressed keys scaled so that some selected blocks fall under the keep threshold
    ck = (jax.random.normal(kc, (bsz, hk, nc, d), jnp.float32) * 4.0).astype(dtype)
    ct = jax.random.normal(kt, (bsz, n, h, d), jnp.float32).astype(dtype)
    if lens is None:
        lens = jnp.full((bsz,), n, jnp.int32)
    valid = jnp.arange(n)[None, :] < jnp.asarray(lens)[:, None]
    bv = valid[:, : nc * BLOCK].reshape(bsz, nc, BLOCK).any(-1) if nc else jnp.zeros((bsz, 0), bool)
    qm = q.astype(jnp.float32).reshape(bsz, n, hk, h // hk, d).mean(3)
    return dict(q=q, k=k, v=v, ck=ck, ct=ct, valid=valid, bv=bv, qm=qm)


def build_fns(causal, mask_padded=False):
    scale = 1.0 / math.sqrt(D)

    @jax.jit
    def select(qm, ck, bv):
        return ltis_gpu.select_blocks_gpu(qm, ck, bv, causal=causal, num_selected=N_SEL, block_size=BLOCK,
                                          scale=scale, interpret=INTERPRET)

    @jax.jit
    def select_ref(qm, ck, bv):
        return ltis_reference.select_blocks_reference(qm, ck, bv, causal=causal, num_selected=N_SEL,
                                                      block_size=BLOCK, scale=scale)

    def _attn(fn):
        def f(q, k, v, valid, sel, kept):
            return fn(q, k, v, valid, sel, kept, causal=causal, block_size=BLOCK,
                      mask_padded_block_keys=mask_padded)
        return f

    attn = _attn(lambda *a, **kw: ltis_gpu.ltis_attention_gpu(*a, interpret=INTERPRET, **kw))
    attn_ref = _attn(ltis_reference.ltis_attention_reference)

    def _fwd_bwd(f):
        @jax.jit
        def g(q, k, v, valid, sel, kept, ct):
            o, vjp = jax.vjp(lambda a, b, c: f(a, b, c, valid, sel, kept), q, k, v)
            return (o, *vjp(ct.astype(o.dtype)))
        return g

    @jax.jit
    def full(qm, ck, bv, q, k, v, valid, ct):
        sel, kept = select(qm, ck, bv)
        o, vjp = jax.vjp(lambda a, b, c: attn(a, b, c, valid, sel, kept), q, k, v)
        return (o, *vjp(ct.astype(o.dtype)))

    return dict(select=select, select_ref=select_ref, fwd=jax.jit(attn), fwd_bwd=_fwd_bwd(attn),
                fwd_bwd_ref=_fwd_bwd(attn_ref), full=full)


def kept_set_mismatch(sel, kept, sel_r, kept_r):
    """Fraction of (b, i, h) whose kept sets differ."""
    big = jnp.int32(2**30)
    a = jnp.sort(jnp.where(kept, sel, big), axis=-1)
    b = jnp.sort(jnp.where(kept_r, sel_r, big), axis=-1)
    return float(jnp.mean(jnp.any(a != b, axis=-1)))


def rel_err(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    finite = bool(jnp.all(jnp.isfinite(a)))
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(1.0, jnp.max(jnp.abs(b)))), finite


def check(name, bsz, n, dtype, causal, mask_padded, lens, seed, tol, precision=None):
    """One correctness case; ``precision`` (e.g. "highest") is the jax_default_matmul_precision it runs
    under: float32 kernel dots are TF32 by default on GPU (gpu_common.float32_products_exact)."""
    with jax.default_matmul_precision(precision):
        rec = _check(name, bsz, n, dtype, causal, mask_padded, lens, seed, tol)
    rec["matmul_precision"] = precision or "default"
    return rec


def _check(name, bsz, n, dtype, causal, mask_padded, lens, seed, tol):
    x = make_inputs(jax.random.key(seed), bsz, n, H, HK, D, dtype, lens)
    fns = build_fns(causal, mask_padded)
    sel, kept = fns["select"](x["qm"], x["ck"], x["bv"])
    sel_r, kept_r = fns["select_ref"](x["qm"], x["ck"], x["bv"])
    valid = x["valid"]
    mism = kept_set_mismatch(sel, kept, sel_r, kept_r)
    args = (x["q"], x["k"], x["v"], valid, sel, kept, x["ct"])
    out = fns["fwd_bwd"](*args)
    ref = fns["fwd_bwd_ref"](*args)
    errs = {}
    ok = mism <= 1e-4
    for nm, a, r in zip(("o", "dq", "dk", "dv"), out, ref):
        e, finite = rel_err(a, r)
        errs[nm] = e
        ok = ok and finite and e <= tol
    pad_zero = bool(jnp.all(jnp.where(valid[:, :, None, None], 0.0, out[0].astype(jnp.float32)) == 0))
    ok = ok and pad_zero
    rec = dict(name=name, B=bsz, N=n, dtype=jnp.dtype(dtype).name, causal=causal, mask_padded=mask_padded,
               kept_set_mismatch=mism, kept_fraction=float(jnp.mean(kept)), rel_err=errs,
               padded_output_zero=pad_zero, ok=bool(ok))
    print(json.dumps(rec), flush=True)
    return rec


def timeit(fn, args, warmup, iters):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def parse_overrides(text: str) -> dict[str, int]:
    """"NAME=int,NAME=int" -> {NAME: int}; every NAME must be an upper-case int constant of ltis_gpu."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not name.isupper() or not isinstance(getattr(ltis_gpu, name, None), int):
            raise ValueError(f"{name!r} is not an int tile constant of pallas_kernels.ltis_gpu")
        overrides[name] = int(value)
    return overrides


def time_lengths(lengths, causal, warmup, iters, with_full=True, select_only=False):
    """Timings of selection, forward, forward+backward (and select+fwd+bwd) per length, bfloat16."""
    rows = []
    for n in lengths:
        bsz = TOKENS // n
        x = make_inputs(jax.random.key(1000 + n), bsz, n, H, HK, D, jnp.bfloat16)
        fns = build_fns(causal)
        sel, kept = jax.block_until_ready(fns["select"](x["qm"], x["ck"], x["bv"]))
        attn_args = (x["q"], x["k"], x["v"], x["valid"], sel, kept)
        rec = dict(N=n, B=bsz)
        cases = [("select_ms", fns["select"], (x["qm"], x["ck"], x["bv"]))]
        if not select_only:
            cases += [("fwd_ms", fns["fwd"], attn_args), ("fwd_bwd_ms", fns["fwd_bwd"], attn_args + (x["ct"],))]
        if with_full and not select_only:
            cases.append(("select_fwd_bwd_ms", fns["full"], (x["qm"], x["ck"], x["bv"], x["q"], x["k"], x["v"],
                                                             x["valid"], x["ct"])))
        for nm, fn, a in cases:
            med, mn = timeit(fn, a, warmup, iters)
            rec[nm] = round(med, 4)
            rec[nm.replace("_ms", "_min_ms")] = round(mn, 4)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    return rows


def sweep(configs, lengths, causal, warmup, iters, select_only=False):
    """Times every set of tile overrides (after a correctness check); the module is restored after each."""
    rows = []
    parsed = [("", {})] + [(text, parse_overrides(text)) for text in configs]  # fail before any timing
    for text, settings in parsed:
        saved = {name: getattr(ltis_gpu, name) for name in settings}
        try:
            for name, value in settings.items():
                setattr(ltis_gpu, name, value)
            checks = [check(f"sweep_{text or 'defaults'}_{'causal' if c else 'bidir'}", 2, 1000, jnp.bfloat16, c,
                            False, [1000, 513], seed, 3e-2) for seed, c in ((71, True), (72, False))]
            ok = all(r["ok"] for r in checks)
            timings = time_lengths(lengths, causal, warmup, iters, with_full=False,
                                   select_only=select_only) if ok else []
            row = dict(overrides=text or "defaults", checks_ok=ok, timings=timings)
        except Exception as error:  # noqa: BLE001 - a config that does not compile is a result too
            row = dict(overrides=text or "defaults", error=f"{type(error).__name__}: {str(error)[:300]}")
        finally:
            for name, value in saved.items():
                setattr(ltis_gpu, name, value)
        print("sweep", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    global INTERPRET, TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-only", action="store_true", help="correctness only, no timings")
    ap.add_argument("--skip-check", action="store_true", help="timings only")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lengths", type=str, default=",".join(map(str, LENGTHS)))
    ap.add_argument("--bidirectional", action="store_true", help="time causal=False instead")
    ap.add_argument("--reference-timings", action="store_true",
                    help="also time the plain-XLA reference fwd+bwd (slow: gather transposes)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--sweep", nargs="*", default=None, metavar="OVERRIDES",
                    help='tile-constant overrides to time, e.g. "ATTN_ROWS=32,ATTN_NUM_WARPS=2" (see docstring)')
    ap.add_argument("--select-only", action="store_true", help="time the selection kernel only")
    ap.add_argument("--set", default=None, metavar="module.NAME=int,...",
                    help="override pallas_kernels constants for the whole run (benchmarks/overrides.py), e.g. "
                         "ltis_gpu.SEL_BLOCK_Q=64,ltis_gpu.SEL_NUM_WARPS=2")
    args = ap.parse_args()
    kernel_overrides = overrides.apply(args.set)
    INTERPRET = args.interpret
    TOKENS = args.tokens
    lengths = [int(s) for s in args.lengths.split(",") if s]
    causal = not args.bidirectional

    result = dict(
        device=str(jax.devices()[0]), device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
        shape=dict(tokens=TOKENS, H=H, Hk=HK, d=D, block=BLOCK, n_sel=N_SEL, dtype="bfloat16", causal=causal),
        tiles=dict(SEL_BLOCK_Q=ltis_gpu.SEL_BLOCK_Q, SEL_CHUNK=ltis_gpu.SEL_CHUNK,
                   SEL_LONGEST_FIRST=ltis_gpu.SEL_LONGEST_FIRST,
                   ATTN_ROWS=ltis_gpu.ATTN_ROWS, ATTN_MAX_KEYS=ltis_gpu.ATTN_MAX_KEYS,
                   DKV_ROWS=ltis_gpu.DKV_ROWS, warps=[ltis_gpu.SEL_NUM_WARPS, ltis_gpu.ATTN_NUM_WARPS,
                                                      ltis_gpu.DKV_NUM_WARPS], stages=ltis_gpu.NUM_STAGES),
        kernel_overrides=kernel_overrides, checks=[], timings=[],
    )

    if not args.skip_check:
        seed = 0
        # float32 cases: IEEE products ("highest") at 2e-5, and the GPU default (TF32) at 5e-3.
        small = [] if args.interpret else [
            (3, 50, jnp.float32, True, False, [50, 37, 1], 2e-5, "highest"),
            (3, 50, jnp.float32, False, False, [50, 37, 1], 2e-5, "highest"),
            (2, 130, jnp.float32, False, True, [130, 71], 2e-5, "highest"),
            (2, 1000, jnp.float32, True, False, [1000, 513], 2e-5, "highest"),
            (2, 1000, jnp.float32, True, False, [1000, 513], 5e-3, None),
            (2, 1000, jnp.bfloat16, True, False, [1000, 513], 3e-2, None),
            (2, 1000, jnp.bfloat16, False, False, [1000, 513], 3e-2, None),
        ]
        for bsz, n, dtype, c, mp, lens, tol, precision in small:
            seed += 1
            result["checks"].append(check(f"small_N{n}", bsz, n, dtype, c, mp, lens, seed, tol, precision))
        for n in lengths:
            seed += 1
            bsz = TOKENS // n
            lens = [n] * (bsz - 1) + [max(1, n // 3)] if bsz > 1 else [n]
            result["checks"].append(check(f"bench_N{n}", bsz, n, jnp.bfloat16, causal, False, lens, seed, 3e-2))
        result["all_checks_ok"] = all(r["ok"] for r in result["checks"])

    if not args.check_only:
        result["timings"] = time_lengths(lengths, causal, args.warmup, args.iters, select_only=args.select_only)
        if args.reference_timings:
            for rec in result["timings"]:
                n = rec["N"]
                x = make_inputs(jax.random.key(1000 + n), TOKENS // n, n, H, HK, D, jnp.bfloat16)
                fns = build_fns(causal)
                sel, kept = fns["select"](x["qm"], x["ck"], x["bv"])
                med, _ = timeit(fns["fwd_bwd_ref"], (x["q"], x["k"], x["v"], x["valid"], sel, kept, x["ct"]), 2,
                                max(3, args.iters // 4))
                rec["reference_fwd_bwd_ms"] = round(med, 4)
    if args.sweep is not None:
        result["sweep"] = sweep(args.sweep, lengths, causal, args.warmup, args.iters, select_only=args.select_only)

    text = json.dumps(result, indent=1)
    print(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "kernels_ltis.json"), "w") as f:
            f.write(text)
    if not args.skip_check and not result.get("all_checks_ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
