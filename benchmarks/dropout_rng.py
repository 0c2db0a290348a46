"""Cost of one dropout mask on a train-step activation, by PRNG implementation and random-bit width.

Each train step of the default model draws five dropout masks the size of the hidden states (embedding, and
two per layer): [B, N, D] = [2048, 200, 128] at the N = 200 benchmark shape. This times ``dropout(x)`` alone
(draw the bits, compare, scale) for every (PRNG impl, bits per element) pair, medians after warm-up, a fresh
key per call.

* ``flax``: ``flax.linen.Dropout``'s own draw (``jax.random.bernoulli``: 32 bits and a float compare).
* ``bits32`` / ``bits16`` / ``bits8``: ``jax.random.bits`` of that width compared with an integer
  threshold. Fewer bits mean fewer PRNG words (threefry makes 32 bits per word); the drop probability is
  then rounded to a multiple of 2^-bits (0.2 -> 0.199997 with 16 bits, 0.1992 with 8).

Usage: python benchmarks/dropout_rng.py [--shape 2048,200,128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp

RATE = 0.2
IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
DRAWS = ("flax", "bits32", "bits16", "bits8")


def dropout_fn(draw: str):
    """jit(x, key) -> x with a fraction RATE of its elements zeroed and the rest scaled to keep the mean."""
    if draw == "flax":
        def apply(x, key):
            keep = jax.random.bernoulli(key, 1.0 - RATE, x.shape)
            return jnp.where(keep, x / (1.0 - RATE), 0).astype(x.dtype)
    else:
        width = int(draw[4:])
        dtype = {32: jnp.uint32, 16: jnp.uint16, 8: jnp.uint8}[width]
        threshold = round(RATE * 2**width)
        keep_fraction = 1.0 - threshold / 2**width

        def apply(x, key):
            keep = jax.random.bits(key, x.shape, dtype) >= threshold
            return jnp.where(keep, x / keep_fraction, 0).astype(x.dtype)
    return jax.jit(apply)


def time_one(fn, x, impl: str, warmup: int, iters: int) -> float:
    keys = [jax.random.key(i, impl=impl) for i in range(warmup + iters)]
    for key in keys[:warmup]:
        jax.block_until_ready(fn(x, key))
    samples = []
    for key in keys[warmup:]:
        start = time.perf_counter()
        jax.block_until_ready(fn(x, key))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,200,128", help="activation shape, comma-separated")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = jax.random.normal(jax.random.key(0), shape, args.dtype)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
                device=str(jax.devices()[0].device_kind), shape=shape, dtype=args.dtype, rate=RATE)
    rows = []
    for impl in IMPLS:
        for draw in DRAWS:
            fn = dropout_fn(draw)
            kept = float(jnp.mean(fn(x, jax.random.key(1, impl=impl)) != 0))
            ms = time_one(fn, x, impl, args.warmup, args.iters)
            rows.append(dict(impl=impl, draw=draw, ms=round(ms, 4), kept_fraction=round(kept, 5)))
            print(f"{impl:<14}{draw:<8}{ms:8.3f} ms  kept {kept:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(meta=meta, rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
