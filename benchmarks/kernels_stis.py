"""GPU benchmark of the STIS Pallas kernels (pallas_kernels/stis_gpu.py): correctness, then timings.

1. Correctness on fresh random inputs against the pure-jnp offset-shift reference
   (pallas_kernels/stis_reference.py): small shapes in float32 (tight tolerance) and bfloat16, causal and
   bidirectional, sink on/off, GQA G in {1, 2, 4, 8}, right padding incl. a row with one valid item and
   NaN at every padded position of q/k/v; then every benchmark shape in bfloat16. Outputs and gradients
   w.r.t. q, k, v (random cotangent) must be finite, padded query outputs exactly 0, errors within
   tolerance (max abs error relative to max(1, max |reference|)).
2. Timings at B * N = 65,536 tokens, N in {256, 1024, 4096, 16384, 32768, 65536}, H = 8, Hk = 2, d = 16,
   bfloat16, for each mode (causal, bidirectional with sink): forward, and forward + backward (gradients
   w.r.t. q, k, v). Medians (and minima) of --iters timed calls after --warmup calls, each call ended by
   ``block_until_ready``. --reference-timings also times the plain-XLA reference; --sweep times the
   kernel over tile sizes and offset loops vs unrolled offsets.

Usage (on a GPU machine):  python benchmarks/kernels_stis.py [--check-only] [--sweep] [--iters 20]
CPU smoke test of the script:  python benchmarks/kernels_stis.py --interpret --lengths 64 --tokens 128
Writes JSON to $OUT/kernels_stis.json when $OUT is set (and prints it). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import stis_gpu  # noqa: E402
from pallas_kernels.stis_reference import stis_attention_reference  # noqa: E402

TOKENS = 65536
LENGTHS = (256, 1024, 4096, 16384, 32768, 65536)
H, HK, D = 8, 2, 16
INTERPRET = False  # --interpret: Pallas interpreter (CPU smoke test of this script, tiny shapes only)


def make_inputs(key, bsz, n, h, hk, d, dtype, lens, poison=True):
    kq, kk, kv, kc = jax.random.split(key, 4)
    valid = jnp.arange(n)[None, :] < jnp.asarray(lens)[:, None]
    vm = valid[:, :, None, None]

    def rnd(k, heads):
        x = jax.random.normal(k, (bsz, n, heads, d), jnp.float32)
        if poison:
            x = jnp.where(vm, x, jnp.nan)
        return x.astype(dtype)

    return dict(q=rnd(kq, h), k=rnd(kk, hk), v=rnd(kv, hk), ct=rnd(kc, h), valid=valid)


@functools.lru_cache(maxsize=None)
def build_fns(causal, sink, **knobs):
    knobs = dict(knobs)

    def kern(q, k, v, valid):
        return stis_gpu.stis_attention_gpu(q, k, v, valid, causal=causal, sink=sink,
                                           interpret=INTERPRET, **knobs)

    def ref(q, k, v, valid):
        return stis_attention_reference(q, k, v, valid, causal=causal, sink=sink)

    def fwd_bwd(f):
        @jax.jit
        def g(q, k, v, valid, ct):
            o, vjp = jax.vjp(lambda a, b, c: f(a, b, c, valid), q, k, v)
            return (o, *vjp(ct.astype(o.dtype)))
        return g

    return dict(fwd=jax.jit(kern), fwd_bwd=fwd_bwd(kern), ref_fwd=jax.jit(ref), ref_fwd_bwd=fwd_bwd(ref))


def rel_err(a, b, valid):
    vm = np.asarray(valid)[:, :, None, None]
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    finite = bool(np.isfinite(a).all())
    a = np.where(vm, a, 0.0)  # padded rows are checked separately (must be exactly 0)
    b = np.where(vm, b, 0.0)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))), finite


def check(name, bsz, n, h, hk, dtype, causal, sink, lens, seed, tol):
    x = make_inputs(jax.random.key(seed), bsz, n, h, hk, D, dtype, lens)
    fns = build_fns(causal, sink)
    args = (x["q"], x["k"], x["v"], x["valid"], x["ct"])
    out = fns["fwd_bwd"](*args)
    ref = fns["ref_fwd_bwd"](*args)
    errs, ok = {}, True
    for nm, a, r in zip(("o", "dq", "dk", "dv"), out, ref):
        e, finite = rel_err(a, r, x["valid"])
        errs[nm] = e
        ok = ok and finite and e <= tol
    vm = np.asarray(x["valid"])[:, :, None, None]
    pad_zero = all(bool(np.all(np.where(vm, 0.0, np.asarray(jnp.asarray(t, jnp.float32))) == 0))
                   for t in (out[0], out[1]))          # o and dq at padded queries
    pad_zero = pad_zero and all(
        bool(np.all(np.where(vm, 0.0, np.asarray(jnp.asarray(t, jnp.float32))) == 0))
        for t in (out[2], out[3]))                    # dk and dv at padded keys
    ok = bool(ok and pad_zero)
    rec = dict(name=name, B=bsz, N=n, H=h, Hk=hk, dtype=jnp.dtype(dtype).name, causal=causal, sink=sink,
               rel_err=errs, padded_exact_zero=pad_zero, ok=ok)
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
    return round(statistics.median(ts), 4), round(min(ts), 4)


def main():
    global INTERPRET, TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-only", action="store_true", help="correctness only, no timings")
    ap.add_argument("--skip-check", action="store_true", help="timings only")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lengths", type=str, default=",".join(map(str, LENGTHS)))
    ap.add_argument("--modes", type=str, default="causal,bidirectional",
                    help="comma list of causal / bidirectional (bidirectional uses the sink)")
    ap.add_argument("--reference-timings", action="store_true",
                    help="also time the plain-XLA offset-shift reference (fwd, fwd+bwd)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time fwd+bwd over block_q = block_k in {16,32,64,128} x num_warps in {1,2,4}")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    args = ap.parse_args()
    INTERPRET = args.interpret
    TOKENS = args.tokens
    lengths = [int(s) for s in args.lengths.split(",") if s]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    dev = jax.devices()[0]
    result = dict(
        device=str(dev), device_kind=dev.device_kind, jax=jax.__version__,
        shape=dict(tokens=TOKENS, H=H, Hk=HK, d=D, dtype="bfloat16", window=8),
        defaults=dict(DEFAULT_ROWS_PER_PROGRAM=stis_gpu.DEFAULT_ROWS_PER_PROGRAM,
                      DEFAULT_ROWS_PER_PROGRAM_DQ=stis_gpu.DEFAULT_ROWS_PER_PROGRAM_DQ,
                      DEFAULT_ROWS_PER_PROGRAM_DKV=stis_gpu.DEFAULT_ROWS_PER_PROGRAM_DKV,
                      NUM_WARPS=stis_gpu.NUM_WARPS, NUM_STAGES=stis_gpu.NUM_STAGES,
                      UNROLL=stis_gpu.UNROLL),
        checks=[], timings=[], sweep=[],
    )

    if not args.skip_check:
        seed = 0
        f32, bf16 = jnp.float32, jnp.bfloat16
        small = [] if args.interpret else [
            # (B, N, H, Hk, dtype, causal, sink, lens, tol)
            (3, 50, 8, 2, f32, True, True, [50, 37, 1], 2e-5),
            (3, 50, 8, 2, f32, False, True, [50, 37, 1], 2e-5),
            (3, 50, 8, 8, f32, False, False, [50, 37, 1], 2e-5),
            (2, 130, 4, 2, f32, False, True, [130, 71], 2e-5),
            (2, 17, 8, 1, f32, True, True, [17, 1], 2e-5),
            (2, 1000, 8, 2, f32, True, True, [1000, 513], 2e-5),
            (2, 1000, 8, 2, f32, False, True, [1000, 513], 2e-5),
            (2, 1000, 8, 2, bf16, True, True, [1000, 513], 3e-2),
            (2, 1000, 8, 2, bf16, False, True, [1000, 513], 3e-2),
        ]
        for bsz, n, h, hk, dtype, c, s, lens, tol in small:
            seed += 1
            result["checks"].append(check(f"small_N{n}", bsz, n, h, hk, dtype, c, s, lens, seed, tol))
        for mode in modes:
            for n in lengths:
                seed += 1
                bsz = max(1, TOKENS // n)
                lens = [n] * (bsz - 1) + [max(1, n // 3)] if bsz > 1 else [n]
                result["checks"].append(check(f"bench_N{n}_{mode}", bsz, n, H, HK, jnp.bfloat16,
                                              mode == "causal", True, lens, seed, 3e-2))
        result["all_checks_ok"] = all(r["ok"] for r in result["checks"])

    if not args.check_only:
        for mode in modes:
            causal = mode == "causal"
            for n in lengths:
                bsz = max(1, TOKENS // n)
                x = make_inputs(jax.random.key(1000 + n), bsz, n, H, HK, D, jnp.bfloat16, [n] * bsz,
                                poison=False)
                fns = build_fns(causal, True)
                fa = (x["q"], x["k"], x["v"], x["valid"])
                rec = dict(mode=mode, N=n, B=bsz)
                rec["fwd_ms"], rec["fwd_min_ms"] = timeit(fns["fwd"], fa, args.warmup, args.iters)
                rec["fwd_bwd_ms"], rec["fwd_bwd_min_ms"] = timeit(fns["fwd_bwd"], fa + (x["ct"],),
                                                                  args.warmup, args.iters)
                if args.reference_timings:
                    it = max(3, args.iters // 4)
                    rec["reference_fwd_ms"], _ = timeit(fns["ref_fwd"], fa, 2, it)
                    rec["reference_fwd_bwd_ms"], _ = timeit(fns["ref_fwd_bwd"], fa + (x["ct"],), 2, it)
                print(json.dumps(rec), flush=True)
                result["timings"].append(rec)
                if args.sweep:
                    for warps, blk in [(w, b) for w in (1, 2, 4) for b in (16, 32, 64, 128)]:
                        sf = build_fns(causal, True, block_q=blk, block_k=blk, num_warps=warps)
                        try:
                            med, mn = timeit(sf["fwd_bwd"], fa + (x["ct"],), 2, max(5, args.iters // 2))
                            fmed, _ = timeit(sf["fwd"], fa, 2, max(5, args.iters // 2))
                            srec = dict(mode=mode, N=n, block=blk, warps=warps, fwd_ms=fmed, fwd_bwd_ms=med,
                                        fwd_bwd_min_ms=mn)
                        except Exception as e:  # noqa: BLE001  (report, keep sweeping)
                            srec = dict(mode=mode, N=n, block=blk, warps=warps,
                                        error=f"{type(e).__name__}: {str(e)[:300]}")
                        print(json.dumps(srec), flush=True)
                        result["sweep"].append(srec)

    text = json.dumps(result, indent=1)
    print(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "kernels_stis.json"), "w") as f:
            f.write(text)
    if not args.skip_check and not result.get("all_checks_ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
