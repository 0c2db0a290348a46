"""One training step of the recommender (forward, CE over all items, backward, Adam) and where its time goes.

Shapes of the reference measurements (PERF_NOTES.md): ML-1M's 3,707 item ids; N = 50 and 200 at batch
2048, N = 1024 at batch 256; BlossomRec and dense SASRec; float32 and bfloat16 compute (params float32).
Per configuration: median step time (fresh random right-padded batches from a rotating pool, warm-up
first, block_until_ready), XLA's compiled peak (arguments + outputs + temporaries, state donated), and a
breakdown: encoder forward+backward alone (loss = sum of user vectors), the CE head alone (logits over all
items + softmax CE, forward+backward), and the Adam update alone.

``--profile`` also traces a few steps with ``jax.profiler`` and reads the device timeline back
(``jax.profiler.ProfileData``): per step, the device time of each HLO op, grouped by model component (from
the op's jax name stack in the compiled HLO: embeddings, attention core, the rest of each layer, CE head,
optimizer) and forward/backward, plus the top kernels. That is where the time goes inside the one fused step.

Usage (GPU): python benchmarks/train_step.py --out $OUT/train_step.json [--profile]
CPU smoke:   python benchmarks/train_step.py --shapes 20:8 --iters 2 --warmup 1
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blossom_jax import AttentionConfig, ModelConfig
from blossom_jax.models import SequentialRecommender

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profiling  # noqa: E402  (benchmarks/profiling.py)

NUM_ITEMS = 3706  # + padding id = 3,707 ids, as ML-1M in the reference measurements


def make_batch(rng, batch, seq_len):
    lengths = rng.integers(1, seq_len + 1, size=batch)
    items = rng.integers(1, NUM_ITEMS + 1, size=(batch, seq_len))
    items = np.where(np.arange(seq_len)[None] < lengths[:, None], items, 0)
    targets = rng.integers(1, NUM_ITEMS + 1, size=batch)
    return (jnp.asarray(items, jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(targets, jnp.int32))


def build(model_cfg):
    model = SequentialRecommender(model_cfg)
    optimizer = optax.adam(1e-3)

    def loss_fn(params, seq, lengths, targets, key):
        users = model.apply({"params": params}, seq, lengths, deterministic=False, rngs={"dropout": key})
        logits = model.apply({"params": params}, users, method="item_logits")
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(params, opt_state, seq, lengths, targets, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, seq, lengths, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def encoder_only(params, seq, lengths, key):
        def f(p):
            return model.apply({"params": p}, seq, lengths, deterministic=False, rngs={"dropout": key}).sum()
        return jax.grad(f)(params)

    def head_only(params, users, targets):
        def f(p, u):
            logits = model.apply({"params": p}, u, method="item_logits")
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return jax.grad(f, argnums=(0, 1))(params, users)

    def adam_only(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return model, optimizer, step, encoder_only, head_only, adam_only


def timed(fn, arg_list, warmup, iters):
    out = None
    for i in range(warmup):
        out = jax.block_until_ready(fn(*arg_list[i % len(arg_list)]))
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*arg_list[i % len(arg_list)]))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), out


def peak_mb(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


COMPONENTS = (  # (component, substrings of the jax name stack), first match wins
    ("ce_head", ("item_logits", "softmax_cross_entropy", "log_softmax")),
    ("embeddings", ("item_embedding", "position_embedding", "embedding_norm")),
    ("attention_kernels", ("pallas_call", "dot_product_attention", "cudnn")),  # Pallas or cuDNN attention
    ("attention_core", ("blossom_attention", "dense_attention")),  # the rest of the attention function
    ("layer_rest", ("layer_",)),
)


def component_of(op_name: str | None) -> str:
    if not op_name:
        return "unattributed"
    for component, keys in COMPONENTS:
        if any(key in op_name for key in keys):
            return component
    return "model_other" if "jvp(" in op_name or "transpose(" in op_name else "optimizer_other"


def profile_steps(run_step, pool, hlo_text: str, steps: int = 5, top: int = 15) -> dict:
    """Traces ``steps`` training steps and splits their device time by component and direction."""
    trace = profiling.traced_op_times(run_step, pool, hlo_text, steps)
    by_op, n_events, lines_seen = trace.by_op, trace.n_events, trace.lines_seen
    by_component = collections.Counter()
    for (op, op_name), duration_ns in by_op.items():
        direction = "bwd" if "transpose(" in op_name else "fwd"
        component = component_of(op_name)
        if component in ("optimizer_other", "unattributed"):
            direction = "-"
        by_component[f"{component}/{direction}"] += duration_ns
    per_step = lambda ns: round(ns / steps / 1e6, 4)  # noqa: E731
    total = sum(by_component.values())
    return {"steps": steps, "device_ms_per_step": per_step(total), "events": n_events,
            "span_ms_per_step": trace.median_ms(trace.span_ns), "wall_ms_per_step": trace.median_ms(trace.wall_ns),
            "trace_lines": lines_seen[:30],
            "by_component_ms": {k: per_step(v) for k, v in by_component.most_common()},
            "top_ops_ms": [{"op": op, "name_stack": stack[-90:], "ms": per_step(ns)}
                           for (op, stack), ns in by_op.most_common(top)]}


def run_config(attention, impl, dtype, seq_len, batch, warmup, iters, seed, profile=False,
               rng_impl="threefry2x32", top=15, last_layer="rows", breakdown=True):
    cfg = ModelConfig(num_items=NUM_ITEMS, max_len=seq_len, attention=attention, attention_impl=impl,
                      compute_dtype=dtype, attn=AttentionConfig(), attention_dropout=0.0,
                      last_layer_rows=last_layer == "rows")
    model, optimizer, step, encoder_only, head_only, adam_only = build(cfg)
    rng = np.random.default_rng(seed)
    pool = [make_batch(rng, batch, seq_len) for _ in range(3)]
    params = jax.jit(model.init)(jax.random.key(seed), pool[0][0][:2], pool[0][1][:2])["params"]  # one compile
    opt_state = jax.jit(optimizer.init)(params)
    key = jax.random.key(seed + 1, impl=rng_impl)  # dropout key: its impl sets the RNG of every dropout mask
    row = dict(attention=attention, impl=impl, dtype=dtype, N=seq_len, B=batch, rng_impl=rng_impl,
               last_layer=last_layer)
    step_jit = jax.jit(step, donate_argnums=(0, 1))
    compiled = step_jit.lower(params, opt_state, *pool[0], key).compile()
    row["step_peak_mb"] = peak_mb(compiled)
    state = [params, opt_state]

    def run_step(seq, lengths, targets):
        state[0], state[1], loss = compiled(state[0], state[1], seq, lengths, targets, key)
        return loss

    row["step_ms"], loss = timed(run_step, pool, warmup, iters)
    row["loss"] = float(loss)
    if profile:
        row["profile"] = profile_steps(run_step, pool, compiled.as_text(), top=top)
    if not breakdown:
        return row
    params = state[0]
    enc = jax.jit(encoder_only)
    row["encoder_fwdbwd_ms"], _ = timed(enc, [(params, s, l, key) for s, l, _ in pool], warmup, iters)
    users = jnp.zeros((batch, cfg.hidden_size), jnp.float32) + 0.01
    head = jax.jit(head_only)
    row["ce_head_fwdbwd_ms"], _ = timed(head, [(params, users, t) for _, _, t in pool], warmup, iters)
    grads = jax.tree.map(jnp.ones_like, params)
    adam = jax.jit(adam_only)
    row["adam_ms"], _ = timed(adam, [(params, state[1], grads)], warmup, iters)
    return row


def _impl_label(row: dict) -> str:
    return row["impl"] + ("/full" if row.get("last_layer") == "full" else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["50:2048", "200:2048", "1024:256"], help="N:B pairs")
    parser.add_argument("--variants", nargs="+",
                        default=["blossom:auto", "blossom:xla", "dense:auto", "dense:xla"],
                        help="attention:impl[:full] (dense:auto = cuDNN on GPU in bfloat16, dense:xla = XLA; "
                             ":full = the last layer at every position, ModelConfig.last_layer_rows=False)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="trace a few steps and split their device time by component (see the docstring); "
                             "turns XLA's GPU command buffers off for this process, so that each kernel is "
                             "its own trace event (step_ms is then measured without them too)")
    parser.add_argument("--rng-impl", default="threefry2x32", choices=("threefry2x32", "rbg", "unsafe_rbg"),
                        help="PRNG implementation of the dropout key (default threefry2x32, the CLI's)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="time the whole step only (skip the encoder / CE head / Adam sub-timings)")
    parser.add_argument("--top", type=int, default=15, help="number of ops listed in the profile (top_ops_ms)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.profile:  # read when the backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), argv=sys.argv[1:])
    print("meta", json.dumps(meta), flush=True)
    rows = []
    for shape in args.shapes:
        seq_len, batch = (int(x) for x in shape.split(":"))
        for variant in args.variants:
            attention, impl, last_layer = (variant.split(":") + ["rows"])[:3]
            for dtype in args.dtypes:
                try:
                    row = run_config(attention, impl, dtype, seq_len, batch, args.warmup, args.iters, args.seed,
                                     args.profile, args.rng_impl, args.top, last_layer,
                                     not args.no_breakdown)
                except Exception as error:  # noqa: BLE001 - record and continue (e.g. OOM)
                    row = dict(attention=attention, impl=impl, dtype=dtype, N=seq_len, B=batch, last_layer=last_layer,
                               error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
                rows.append(row)
                print("row", json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "w") as handle:
                        json.dump(dict(meta=meta, rows=rows), handle, indent=1)
    print(f"\n{'attention':<9}{'impl':<10}{'dtype':<9}{'N':>6}{'B':>6}{'step ms':>9}{'peak MB':>9}"
          f"{'enc ms':>8}{'CE ms':>7}{'adam':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:<9}{_impl_label(r):<10}{r['dtype']:<9}{r['N']:>6}{r['B']:>6}  {r['error'][:70]}")
            continue
        parts = "".join(f"{r[k]:>{w}.2f}" if k in r else f"{'-':>{w}}"
                        for k, w in (("encoder_fwdbwd_ms", 8), ("ce_head_fwdbwd_ms", 7), ("adam_ms", 6)))
        print(f"{r['attention']:<9}{_impl_label(r):<10}{r['dtype']:<9}{r['N']:>6}{r['B']:>6}{r['step_ms']:>9.2f}"
              f"{r['step_peak_mb']:>9.0f}{parts}")
    for r in rows:
        if "profile" in r:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r["profile"]["by_component_ms"].items())
            print(f"profile {r['attention']}:{_impl_label(r)} {r['dtype']} N={r['N']} B={r['B']}: "
                  f"{r['profile']['device_ms_per_step']:.2f} ms device/step = {parts}")


if __name__ == "__main__":
    main()
