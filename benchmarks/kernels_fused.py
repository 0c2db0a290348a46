"""GPU benchmark of the fused short-sequence kernel (pallas_kernels/fused_gpu.py) against the split LTIS + STIS
gather kernels (ltis_gpu.py + stis_gpu.py): correctness, timings, a tile sweep; picks FUSED_MAX_LEN.

1. Correctness on fresh random inputs (compiled on the GPU): the fused kernel's (o_ltis, o_stis) and the
   gradients w.r.t. q, k, v for a random pair of cotangents against the pure-jnp references
   (ltis_reference + stis_reference), on the selection kernel's own output; float32 and bfloat16, causal
   and bidirectional, right padding with short rows. Outputs are compared everywhere (padded rows must be 0).
   float32 runs with IEEE products (jax.default_matmul_precision("highest"), 2e-5) and once with the GPU
   default, TF32 products (5e-3).
2. Timings at ~65,536 tokens (B = tokens // N), H = 8, Hk = 2, d = 16, bf16, causal: fused forward and
   forward + backward vs split (LTIS + STIS kernels) forward and forward + backward, on the same selection.
   Medians of --iters calls after --warmup, each ended by ``block_until_ready``; inputs rotate among 3 sets.
3. --sweep: one-at-a-time variations of the fused kernel's constants at --sweep-lengths (tiles, warps,
   pipeline stages, and MAX_BITMASK_BLOCKS=0: kept blocks tested by comparison instead of a bitmask).
4. --baseline-module FILE: another version of fused_gpu.py (e.g. ``git show HEAD~1:pallas_kernels/fused_gpu.py``)
   timed in the same process as "baseline", for before/after numbers on the same card.

Usage (GPU):  python benchmarks/kernels_fused.py [--sweep] [--lengths 50,100,200,...] [--baseline-module F]
Writes $OUT/kernels_fused.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import fused_gpu, ltis_gpu, ltis_reference, stis_gpu, stis_reference  # noqa: E402
import kernels_ltis as kl  # noqa: E402  (shared input maker / error metric)
import overrides  # noqa: E402  (benchmarks/overrides.py)

LENGTHS = (50, 100, 200, 256, 512, 1024, 2048)
INTERPRET = False
BASELINE = None  # module loaded from --baseline-module


def _load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_gpu_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fused(causal, mask_padded=False, module=None):
    kernel_module = module or fused_gpu

    def f(q, k, v, valid, sel, kept):
        return kernel_module.fused_attention_gpu(q, k, v, valid, sel, kept, causal=causal, block_size=kl.BLOCK,
                                             mask_padded_block_keys=mask_padded, interpret=INTERPRET)
    return f


def _split(causal, mask_padded=False):
    def f(q, k, v, valid, sel, kept):
        o_l = ltis_gpu.ltis_attention_gpu(q, k, v, valid, sel, kept, causal=causal, block_size=kl.BLOCK,
                                          mask_padded_block_keys=mask_padded, interpret=INTERPRET)
        o_s = stis_gpu.stis_attention_gpu(q, k, v, valid, causal=causal, interpret=INTERPRET)
        return o_l, o_s
    return f


def _reference(causal, mask_padded=False):
    def f(q, k, v, valid, sel, kept):
        o_l = ltis_reference.ltis_attention_reference(q, k, v, valid, sel, kept, causal=causal,
                                                      block_size=kl.BLOCK, mask_padded_block_keys=mask_padded)
        return o_l, stis_reference.stis_attention_reference(q, k, v, valid, causal=causal)
    return f


def _fwd_bwd(f):
    @jax.jit
    def g(q, k, v, valid, sel, kept, ct_l, ct_s):
        (o_l, o_s), vjp = jax.vjp(lambda a, b, c: f(a, b, c, valid, sel, kept), q, k, v)
        return (o_l, o_s, *vjp((ct_l.astype(o_l.dtype), ct_s.astype(o_s.dtype))))
    return g


def _inputs(seed, bsz, n, dtype, causal, lens=None):
    x = kl.make_inputs(jax.random.key(seed), bsz, n, kl.H, kl.HK, kl.D, dtype, lens)
    fns = kl.build_fns(causal)
    sel, kept = fns["select"](x["qm"], x["ck"], x["bv"])
    ct_s = jax.random.normal(jax.random.key(seed + 7), x["ct"].shape, jnp.float32).astype(dtype)
    return (x["q"], x["k"], x["v"], x["valid"], sel, kept), (x["ct"], ct_s)


def check(bsz, n, dtype, causal, mask_padded, lens, seed, tol, precision=None):
    """One correctness case; ``precision`` (e.g. "highest") is the jax_default_matmul_precision it runs
    under: float32 kernel dots are TF32 by default on GPU (gpu_common.float32_products_exact)."""
    with jax.default_matmul_precision(precision):
        rec = _check(bsz, n, dtype, causal, mask_padded, lens, seed, tol)
    rec["matmul_precision"] = precision or "default"
    return rec


def _check(bsz, n, dtype, causal, mask_padded, lens, seed, tol):
    attn, cts = _inputs(seed, bsz, n, dtype, causal, lens)
    got = _fwd_bwd(_fused(causal, mask_padded))(*attn, *cts)
    want = _fwd_bwd(_reference(causal, mask_padded))(*attn, *cts)
    errs, ok = {}, True
    for name, a, r in zip(("o_ltis", "o_stis", "dq", "dk", "dv"), got, want):
        e, finite = kl.rel_err(a, r)
        errs[name] = e
        ok = ok and finite and e <= tol
    valid = attn[3][:, :, None, None]
    pad_zero = all(bool(jnp.all(jnp.where(valid, 0.0, o.astype(jnp.float32)) == 0)) for o in got[:2])
    rec = dict(N=n, B=bsz, dtype=jnp.dtype(dtype).name, causal=causal, mask_padded=mask_padded, rel_err=errs,
               padded_output_zero=pad_zero, ok=bool(ok and pad_zero))
    print(json.dumps(rec), flush=True)
    return rec


def timeit(fn, arg_sets, warmup, iters):
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    ts = []
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 4)


def _random_lengths(seed, bsz, n):
    """Right-padded rows with lengths uniform in [1, N] (about half the tokens are padding)."""
    return jax.random.randint(jax.random.key(seed), (bsz,), 1, n + 1)


def time_length(n, tokens, causal, warmup, iters, variants=("fused", "split"), padded=False):
    bsz = max(1, tokens // n)
    sets = [_inputs(100 * n + i, bsz, n, jnp.bfloat16, causal,
                    _random_lengths(100 * n + i, bsz, n) if padded else None) for i in range(3)]
    rec = dict(N=n, B=bsz, padded=padded)
    for name in variants:
        if name == "baseline" and BASELINE is None:
            continue
        f = {"fused": lambda: _fused(causal), "baseline": lambda: _fused(causal, module=BASELINE),
             "split": lambda: _split(causal)}[name]()
        rec[f"{name}_fwd_ms"] = timeit(jax.jit(f), [a for a, _ in sets], warmup, iters)
        rec[f"{name}_fwd_bwd_ms"] = timeit(_fwd_bwd(f), [a + c for a, c in sets], warmup, iters)
    return rec


SWEEP = [dict(), dict(ROWS=32), dict(ROWS=128), dict(KEYS=32), dict(KEYS=128), dict(DKV_KEYS=16),
         dict(DKV_KEYS=64), dict(DKV_ROWS=32), dict(DKV_ROWS=128), dict(NUM_WARPS=2), dict(NUM_WARPS=8),
         dict(NUM_STAGES=1), dict(NUM_STAGES=3), dict(MAX_BITMASK_BLOCKS=0)]
TUNABLES = ("ROWS", "KEYS", "DKV_KEYS", "DKV_ROWS", "NUM_WARPS", "NUM_STAGES", "MAX_BITMASK_BLOCKS")


def main():
    global INTERPRET, BASELINE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep the fused tile constants")
    ap.add_argument("--sweep-lengths", default="200,512")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test, tiny sizes)")
    ap.add_argument("--bidirectional", action="store_true",
                    help="time causal=False (the sink's bidirectional mode) instead of causal")
    ap.add_argument("--padded", action="store_true",
                    help="also time right-padded batches (lengths uniform in [1, N], as benchmarks/train_step.py)")
    ap.add_argument("--baseline-module", default=None,
                    help="another fused_gpu.py to time beside this one (before/after on the same card)")
    ap.add_argument("--set", default=None, metavar="module.NAME=int,...",
                    help="override pallas_kernels constants for this run, e.g. ltis_gpu.ATTN_NUM_WARPS=1")
    args = ap.parse_args()
    kernel_overrides = overrides.apply(args.set)
    if args.baseline_module:
        BASELINE = _load_module(args.baseline_module)
    INTERPRET = kl.INTERPRET = args.interpret
    lengths = [int(s) for s in args.lengths.split(",") if s]
    defaults = {k: getattr(fused_gpu, k) for k in TUNABLES}
    result = dict(device=str(jax.devices()[0]), device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d"), tokens=args.tokens, H=kl.H, Hk=kl.HK, d=kl.D,
                  dtype="bfloat16", causal=not args.bidirectional, fused_tiles=defaults,
                  kernel_overrides=kernel_overrides,
                  checks=[], timings=[], sweep=[])

    if not args.skip_check:
        # float32 cases: IEEE products ("highest") at 2e-5, and the GPU default (TF32) at 5e-3.
        cases = [(2, 17, jnp.float32, True, False, [17, 1], 2e-5, "highest"),
                 (3, 50, jnp.float32, True, False, [50, 37, 1], 2e-5, "highest"),
                 (3, 50, jnp.float32, False, False, [50, 37, 1], 2e-5, "highest"),
                 (2, 130, jnp.float32, False, True, [130, 71], 2e-5, "highest"),
                 (3, 200, jnp.float32, True, False, [200, 113, 1], 5e-3, None),
                 (4, 200, jnp.bfloat16, True, False, [200, 150, 3, 1], 3e-2, None),
                 (2, 512, jnp.bfloat16, True, False, [512, 300], 3e-2, None),
                 (2, 512, jnp.bfloat16, False, False, [512, 300], 3e-2, None)]
        if args.interpret:
            cases = cases[:2]
        for seed, case in enumerate(cases):
            result["checks"].append(check(*case[:6], seed, case[6], precision=case[7]))
        result["all_checks_ok"] = all(r["ok"] for r in result["checks"])

    for n in lengths:
        for padded in (False, True) if args.padded else (False,):
            rec = time_length(n, args.tokens, not args.bidirectional, args.warmup, args.iters,
                              variants=("fused", "baseline", "split"), padded=padded)
            print(json.dumps(rec), flush=True)
            result["timings"].append(rec)

    if args.sweep:
        for n in [int(s) for s in args.sweep_lengths.split(",") if s]:
            for change in SWEEP:
                for k, val in {**defaults, **change}.items():
                    setattr(fused_gpu, k, val)
                try:
                    rec = dict(change=change, **time_length(n, args.tokens, True, 3, max(1, args.iters // 2),
                                                            variants=("fused",)))
                except Exception as e:  # noqa: BLE001 - a tile config that does not compile is a result
                    rec = dict(change=change, N=n, error=f"{type(e).__name__}: {str(e)[:200]}")
                print(json.dumps(rec), flush=True)
                result["sweep"].append(rec)
        for k, val in defaults.items():
            setattr(fused_gpu, k, val)

    print("\nN      padded  fused fwd  fused f+b  split fwd  split f+b  baseline fwd  baseline f+b")
    for r in result["timings"]:
        print(f"{r['N']:<6} {str(r['padded']):<7} {r['fused_fwd_ms']:>9} {r['fused_fwd_bwd_ms']:>10} "
              f"{r['split_fwd_ms']:>10} {r['split_fwd_bwd_ms']:>10} {r.get('baseline_fwd_ms', '-'):>13} "
              f"{r.get('baseline_fwd_bwd_ms', '-'):>13}")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "kernels_fused.json"), "w") as f:
            json.dump(result, f, indent=1)
    if not result.get("all_checks_ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
