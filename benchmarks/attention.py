"""Attention-layer benchmark: BlossomRec (xla, pallas) vs a dense cuDNN layer of the same shape.

Layer = projections + RoPE + attention + gate + output projection, bf16, D = 128, H = 8, Hk = 2, d = 16,
TOKENS tokens per batch (B = TOKENS / N). Before any timing, every implementation is checked against the
dense-mask reference (or the xla path where the reference is too large) on fresh random inputs, outputs and
gradients. Timings: medians of --iters calls after --warmup calls, each call on a fresh input from a small
rotating pool, synchronised with block_until_ready (per-call latency); with --pipelined also the throughput
per call of --iters calls dispatched back to back (median of 5 rounds), which is what a training loop sees, and
the host's dispatch time per call within it (how long the calls took to return to Python).
Peak memory: XLA's compiled memory analysis (arguments + outputs + temporaries) of the jitted function.
``--profile`` also traces a few forward+backward calls per row and splits their device time by kernel (each
Pallas kernel by name, cuDNN, XLA's sort, the other XLA ops of the forward and of the backward), with XLA's
command buffers off (for the whole process). ``--command-buffers default off`` compiles and times each layer
both ways in one process instead.

Usage (GPU):  python benchmarks/attention.py --out $OUT/attention.json
CPU smoke run: python benchmarks/attention.py --lengths 64 --tokens 1024 --impls xla --iters 2
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from blossom_jax import AttentionConfig
from blossom_jax.models import BlossomAttention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overrides  # noqa: E402  (benchmarks/overrides.py)
import profiling  # noqa: E402  (benchmarks/profiling.py)

D, H, HK, HEAD_DIM = 128, 8, 2, 16


class DenseLayer:
    """The dense bar: same projections and GQA shape, cuDNN flash attention (causal)."""

    def __init__(self, implementation: str | None):
        self.implementation = implementation

    def init(self, key):
        k1, k2 = jax.random.split(key)
        return {"qkv": jax.random.normal(k1, (D, H * HEAD_DIM + 2 * HK * HEAD_DIM), jnp.float32) * 0.02,
                "out": jax.random.normal(k2, (H * HEAD_DIM, D), jnp.float32) * 0.02}

    def apply(self, params, x, valid):
        batch, seq_len, _ = x.shape
        qkv = x @ params["qkv"].astype(x.dtype)
        q, k, v = jnp.split(qkv, [H * HEAD_DIM, (H + HK) * HEAD_DIM], axis=-1)
        q = q.reshape(batch, seq_len, H, HEAD_DIM)
        k = k.reshape(batch, seq_len, HK, HEAD_DIM)
        v = v.reshape(batch, seq_len, HK, HEAD_DIM)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        return out.reshape(batch, seq_len, H * HEAD_DIM) @ params["out"].astype(x.dtype)


class BlossomLayer:
    def __init__(self, impl: str):
        self.module = BlossomAttention(AttentionConfig(num_heads=H, num_kv_heads=HK, head_dim=HEAD_DIM),
                                       impl=impl, dtype=jnp.bfloat16)

    def init(self, key):
        x = jnp.zeros((1, 32, D), jnp.bfloat16)
        params = jax.jit(self.module.init)(key, x, jnp.ones((1, 32), jnp.bool_))["params"]  # one compilation
        # Random (not zero) intra-block positions so the selection is not degenerate.
        params["k_intrablock_positions"] = jax.random.normal(key, params["k_intrablock_positions"].shape) * 0.5
        return params

    def apply(self, params, x, valid):
        return self.module.apply({"params": params}, x, valid)


def make_layer(name: str):
    if name == "dense-cudnn":
        return DenseLayer("cudnn")
    if name == "dense-xla":
        return DenseLayer("xla")
    return BlossomLayer(name.removeprefix("blossom-"))


def fwd_and_grad(layer):
    def forward(params, x, valid):
        return layer.apply(params, x, valid)

    def loss(params, x, valid, cotangent):
        return jnp.sum(forward(params, x, valid).astype(jnp.float32) * cotangent)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _inputs(key, batch, seq_len, padded: bool):
    kx, kc, kl = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch, seq_len, D), jnp.float32).astype(jnp.bfloat16)
    cot = jax.random.normal(kc, (batch, seq_len, D), jnp.float32)
    if padded:
        lengths = jax.random.randint(kl, (batch,), 1, seq_len + 1).at[0].set(seq_len)
    else:
        lengths = jnp.full((batch,), seq_len)
    valid = jnp.arange(seq_len)[None, :] < lengths[:, None]
    return x, valid, cot


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _override_text(variant: str) -> str | None:
    return None if variant == "default" else variant


def _variant_key(variant: str, variants) -> dict:
    """{"variant": ...} in result rows when several variants are timed, else nothing."""
    return {"variant": variant} if tuple(variants) != ("default",) else {}


def runs(impls, variants):
    """(impl, variant) pairs in timing order: every blossom impl under each of ``variants`` (``--set``-style
    override strings, or "default"), every dense impl once (unaffected by the kernels' constants)."""
    return [(name, variant) for name in impls
            for variant in (("default",) if name.startswith("dense-") else variants)]


def check(impls, seq_lens, seed, variants=("default",)):
    """Each blossom impl (under each of ``variants``) against the reference (N <= 1024) or xla, outputs and
    gradients, fresh inputs."""
    rows = []
    for seq_len in seq_lens:
        batch = max(1, 2048 // seq_len)
        oracle_name = "blossom-reference" if seq_len <= 1024 else "blossom-xla"
        oracle = make_layer(oracle_name)
        params = oracle.init(jax.random.key(seed))
        x, valid, cot = _inputs(jax.random.key(seed + seq_len), batch, seq_len, padded=True)
        f_ref, g_ref = fwd_and_grad(oracle)
        want_out, want_grads = f_ref(params, x, valid), g_ref(params, x, valid, cot)
        for name, variant in runs(impls, variants):
            if not name.startswith("blossom-") or name == oracle_name:
                continue
            f, g = fwd_and_grad(make_layer(name))
            with overrides.applied(_override_text(variant)):
                out, grads = f(params, x, valid), g(params, x, valid, cot)
            finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            grad_errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))]
            row = dict(impl=name, **_variant_key(variant, variants), oracle=oracle_name, N=seq_len, B=batch,
                       finite=finite,
                       out_rel_err=rel_err(out.astype(jnp.float32) * valid[..., None],
                                           want_out.astype(jnp.float32) * valid[..., None]),
                       max_grad_rel_err=max(grad_errs))
            row["ok"] = finite and row["out_rel_err"] < 2e-2 and row["max_grad_rel_err"] < 5e-2
            rows.append(row)
            print("check", json.dumps(row), flush=True)
    return rows


def time_fn(fn, arg_sets, warmup, iters):
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples = []
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def time_pipelined(fn, arg_sets, iters, rounds=5):
    """Throughput per call: the median over ``rounds`` of (time of ``iters`` calls dispatched back to back with
    one ``block_until_ready`` at the end, as a training loop runs them) / ``iters``.

    Returns (throughput ms, host dispatch ms) per call, the second the median time until the ``iters`` calls had
    returned to Python (XLA's GPU runtime launches a call's kernels on the calling thread): where it is close to
    the throughput, the host's launches and not the device bound the rate."""
    jax.block_until_ready(fn(*arg_sets[0]))
    per_call, dispatch = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(iters)]
        dispatch.append((time.perf_counter() - start) * 1e3 / iters)
        jax.block_until_ready(outs)
        per_call.append((time.perf_counter() - start) * 1e3 / iters)
        del outs
    return statistics.median(per_call), statistics.median(dispatch)


#: ``--command-buffers``: XLA compiler options per mode. "off" compiles without XLA's GPU command buffers (CUDA
#: graphs), which the default XLA flags use for runs of fusions and library calls.
COMMAND_BUFFER_MODES = {"default": None, "off": {"xla_gpu_enable_command_buffer": ""}}


def peak_bytes(compiled):
    analysis = compiled.memory_analysis()
    if analysis is None:
        return float("nan")
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def kernel_group(op: str, name_stack: str) -> str:
    """What an HLO op of the layer belongs to: a Pallas kernel (by its name), cuDNN, XLA's sort, or the
    other XLA ops of the forward / backward."""
    if "/pallas_call" in name_stack:
        return name_stack.split("/pallas_call")[0].rsplit("/", 1)[-1]
    if "cudnn" in op or "dot_product_attention" in name_stack:
        return "cudnn"
    if op.startswith("sort"):
        return "xla_sort"
    return "xla_bwd" if "transpose(" in name_stack else "xla_fwd"


def profile_layer(compiled, arg_sets, calls=5, top=None, keep_trace=None) -> dict:
    """Device time of one call of ``compiled`` split by :func:`kernel_group`, its ops (the ``top`` longest, or
    all), and where a synchronised call's wall time goes: ``span_ms`` from its first kernel's start to its
    last one's end (``idle_in_span_ms`` of it without a kernel running) and ``wall_ms`` on the host (profiler
    on). ``keep_trace``: a folder to keep the raw trace in."""
    trace = profiling.traced_op_times(compiled, arg_sets, compiled.as_text(), calls, keep_trace=keep_trace)
    groups = collections.Counter()
    for (op, stack), ns in trace.by_op.items():
        groups[kernel_group(op, stack)] += ns
    per_call = lambda ns: round(ns / calls / 1e6, 4)  # noqa: E731
    device_ms = per_call(sum(groups.values()))
    span_ms = trace.median_ms(trace.span_ns)
    return {"device_ms": device_ms, "events_per_call": trace.n_events / calls,
            "span_ms": span_ms, "idle_in_span_ms": round(span_ms - device_ms, 4),
            "wall_ms": trace.median_ms(trace.wall_ns),
            "by_kernel_ms": {k: per_call(v) for k, v in groups.most_common()},
            "top_ops_ms": [{"op": op, "name_stack": stack[-80:], "ms": per_call(ns)}
                           for (op, stack), ns in trace.by_op.most_common(top)]}


def bench(impls, seq_lens, tokens, warmup, iters, seed, out_path=None, profile=False,
          command_buffers=("default",), pipelined=False, variants=("default",), keep_trace=None):
    """Times every impl (each blossom impl under each of ``variants``, see :func:`runs`) at every length.
    ``command_buffers``: modes of COMMAND_BUFFER_MODES, each compiled and timed in turn (keys of modes other
    than "default" carry the suffix ``_cb_<mode>``); ``pipelined``: also the back-to-back throughput per call
    (``*_pipelined_ms``) and the host's dispatch time per call (``*_dispatch_ms``); ``keep_trace``: with
    ``profile``, a folder for the raw traces (one per row)."""
    rows = []
    for seq_len in seq_lens:
        batch = max(1, tokens // seq_len)
        pool = [_inputs(jax.random.key(seed + 100 * i + seq_len), batch, seq_len, padded=False)
                for i in range(3)]
        for run_index, (name, variant) in enumerate(runs(impls, variants)):
            layer = make_layer(name)
            params = layer.init(jax.random.key(seed))
            f, g = fwd_and_grad(layer)
            row = dict(impl=name, **_variant_key(variant, variants), N=seq_len, B=batch, tokens=batch * seq_len)
            try:
                with overrides.applied(_override_text(variant)):
                    g_compiled = _time_row(row, f, g, params, pool, warmup, iters, command_buffers, pipelined)
                    if profile:
                        trace_dir = os.path.join(keep_trace, f"{name}_N{seq_len}_{run_index}") if keep_trace else None
                        row["fwdbwd_profile"] = profile_layer(g_compiled, [(params, x, v, c) for x, v, c in pool],
                                                              keep_trace=trace_dir)
            except Exception as error:  # noqa: BLE001 - record OOMs / unsupported configs and go on
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            rows.append(row)
            print("time", json.dumps(row), flush=True)
            if out_path:
                with open(out_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return rows


def _time_row(row, f, g, params, pool, warmup, iters, command_buffers, pipelined):
    """Fills ``row`` with the forward and forward+backward timings and peak memory of one layer; returns the
    compiled forward+backward of the last mode."""
    for mode in command_buffers:
        suffix = "" if mode == "default" else f"_cb_{mode}"
        options = COMMAND_BUFFER_MODES[mode]
        f_compiled = f.lower(params, *pool[0][:2]).compile(options)
        g_compiled = g.lower(params, *pool[0]).compile(options)
        fwd_args = [(params, x, v) for x, v, _ in pool]
        fwdbwd_args = [(params, x, v, c) for x, v, c in pool]
        row["fwd_peak_mb"] = peak_bytes(f_compiled) / 2**20
        row["fwdbwd_peak_mb"] = peak_bytes(g_compiled) / 2**20
        row[f"fwd_ms{suffix}"], row[f"fwd_min_ms{suffix}"] = time_fn(f_compiled, fwd_args, warmup, iters)
        row[f"fwdbwd_ms{suffix}"], row[f"fwdbwd_min_ms{suffix}"] = time_fn(g_compiled, fwdbwd_args, warmup, iters)
        if pipelined:
            row[f"fwdbwd_pipelined_ms{suffix}"], row[f"fwdbwd_dispatch_ms{suffix}"] = time_pipelined(
                g_compiled, fwdbwd_args, iters)
    return g_compiled


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens / N)")
    parser.add_argument("--impls", nargs="+",
                        default=["dense-cudnn", "blossom-xla", "blossom-pallas"],
                        help="dense-cudnn | dense-xla | blossom-xla | blossom-pallas | blossom-reference")
    parser.add_argument("--check-lengths", type=int, nargs="*", default=[1, 15, 17, 200, 1024, 4096])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-check", action="store_true", help="timings only")
    parser.add_argument("--profile", action="store_true",
                        help="also split each forward+backward's device time by kernel (turns XLA's GPU "
                             "command buffers off for this process, timings included)")
    parser.add_argument("--set", default=None, metavar="module.NAME=int,...",
                        help="override pallas_kernels tile / launch constants for this run (benchmarks/overrides.py)")
    parser.add_argument("--command-buffers", nargs="+", default=["default"], choices=sorted(COMMAND_BUFFER_MODES),
                        help="compile and time each layer with XLA's GPU command buffers as by default and / or off "
                             "(one process; keys of the off mode end in _cb_off)")
    parser.add_argument("--variants", nargs="+", default=["default"], metavar="SETTINGS",
                        help="time (and check) each blossom impl under each of these --set-style override strings "
                             "in turn, in this process ('default' = none); rows then carry a 'variant' key")
    parser.add_argument("--keep-trace", default=None, metavar="DIR",
                        help="with --profile: keep each row's raw jax.profiler trace under DIR")
    parser.add_argument("--pipelined", action="store_true",
                        help="also time forward+backward calls dispatched back to back (throughput and host "
                             "dispatch time per call)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    kernel_overrides = overrides.apply(args.set)
    for variant in args.variants:
        overrides.parse(_override_text(variant))  # fail before any work on a bad variant
    if args.profile:  # read when the backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
                jaxlib=__import__("jaxlib").__version__, device=str(jax.devices()[0].device_kind),
                backend=jax.default_backend(), python=platform.python_version(), argv=sys.argv[1:],
                xla_flags=os.environ.get("XLA_FLAGS", ""), kernel_overrides=kernel_overrides)
    print("meta", json.dumps(meta), flush=True)
    checks = [] if args.skip_check else check(args.impls, args.check_lengths, args.seed, args.variants)
    if not all(row["ok"] for row in checks):
        print("CORRECTNESS CHECK FAILED: timings below are for information only", flush=True)
    timings = bench(args.impls, args.lengths, args.tokens, args.warmup, args.iters, args.seed,
                    args.out + ".rows.jsonl" if args.out else None, args.profile, args.command_buffers,
                    args.pipelined, args.variants, args.keep_trace)
    result = dict(meta=meta, checks=checks, timings=timings)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    print(f"\n{'impl':<18}{'N':>7}{'B':>6}{'fwd ms':>9}{'f+b ms':>9}{'peak MB':>9}")
    for row in timings:
        print(f"{row['impl']:<18}{row['N']:>7}{row['B']:>6}{row.get('fwd_ms', float('nan')):>9.3f}"
              f"{row.get('fwdbwd_ms', float('nan')):>9.3f}{row.get('fwdbwd_peak_mb', float('nan')):>9.0f}"
              f"  {row.get('variant', '')} {row.get('error', '')[:60]}")
    extra = [key for key in ("fwdbwd_ms_cb_off", "fwdbwd_pipelined_ms", "fwdbwd_dispatch_ms",
                             "fwdbwd_pipelined_ms_cb_off", "fwdbwd_dispatch_ms_cb_off")
             if any(key in row for row in timings)]
    if extra:
        print(f"\n{'impl':<18}{'N':>7}" + "".join(f"{key:>28}" for key in extra))
        for row in timings:
            print(f"{row['impl']:<18}{row['N']:>7}" + "".join(f"{row.get(key, float('nan')):>28.3f}" for key in extra)
                  + f"  {row.get('variant', '')}")
    for row in timings:
        if "fwdbwd_profile" in row:
            prof = row["fwdbwd_profile"]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in prof["by_kernel_ms"].items())
            print(f"profile {row['impl']} {row.get('variant', '')} N={row['N']}: {prof['device_ms']:.3f} ms = {parts}; "
                  f"span {prof['span_ms']:.3f} (idle {prof['idle_in_span_ms']:.3f}), wall {prof['wall_ms']:.3f}")


if __name__ == "__main__":
    main()
