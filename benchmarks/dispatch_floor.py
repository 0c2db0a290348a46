"""Per-call overhead floor of a jitted call on this machine: what a synchronised call costs beyond its kernels.

Times chains of K dependent small matmuls (each its own kernel: a [M, M] x [M, M] product followed by tanh,
which XLA cannot merge across the chain), K in --kernels, two ways:
  latency     median of calls each ended by ``block_until_ready`` (what attention.py reports as fwd+bwd ms);
  throughput  calls dispatched back to back, one sync at the end, per call (what a training loop sees).
The difference (latency - throughput) at K kernels is the per-call cost of dispatch + synchronisation that
a layer of K kernels pays in latency but not in throughput; K = 1 gives the floor of any jitted call.

Usage (GPU): python benchmarks/dispatch_floor.py --out $OUT/dispatch_floor.json
CPU smoke run: python benchmarks/dispatch_floor.py --kernels 1 4 --iters 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp


def chain(num_kernels: int):
    """jitted x -> tanh(...tanh(x @ w) @ w ...) with ``num_kernels`` dependent matmuls."""

    def run(x, w):
        for _ in range(num_kernels):
            x = jnp.tanh(x @ w)
        return x

    return jax.jit(run)


def measure(num_kernels: int, size: int, iters: int, rounds: int = 5) -> dict:
    """Latency and throughput per call (ms) of :func:`chain` on [size, size] float32 operands."""
    fn = chain(num_kernels)
    keys = jax.random.split(jax.random.key(num_kernels), 2)
    x = jax.random.normal(keys[0], (size, size), jnp.float32)
    w = jax.random.normal(keys[1], (size, size), jnp.float32) / size ** 0.5
    for _ in range(3):
        jax.block_until_ready(fn(x, w))
    latency = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        latency.append((time.perf_counter() - start) * 1e3)
    throughput = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready([fn(x, w) for _ in range(iters)])
        throughput.append((time.perf_counter() - start) * 1e3 / iters)
    latency_ms, throughput_ms = statistics.median(latency), statistics.median(throughput)
    return dict(kernels=num_kernels, size=size, latency_ms=round(latency_ms, 4),
                throughput_ms=round(throughput_ms, 4), overhead_ms=round(latency_ms - throughput_ms, 4))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 10, 25, 50, 100],
                        help="chain lengths K (kernels per call)")
    parser.add_argument("--size", type=int, default=256, help="matrix size M (small: launch-bound kernels)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if min(args.kernels) < 1 or args.size < 1 or args.iters < 1:
        raise ValueError(f"--kernels, --size and --iters must be >= 1, got {args.kernels}, {args.size}, {args.iters}")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
                device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
    print("meta", json.dumps(meta), flush=True)
    rows = []
    for num_kernels in args.kernels:
        rows.append(measure(num_kernels, args.size, args.iters))
        print("floor", json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(meta=meta, rows=rows), handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
