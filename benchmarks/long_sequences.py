"""Issue 7 part 2: training-step throughput at long sequence lengths, BlossomRec vs dense.

The step is the CLI's own (``train.loop.build_program``: forward with dropout, softmax CE over all item ids,
backward, Adam; parameters float32, compute ``--dtype``), on batches that are already on the device, so the
input pipeline is not timed (see ``benchmarks/epoch_time.py`` for that). Sizes (``--sizes``, ``DATA:N:B``):

* ``ml1m:N:B``  real ML-1M batches from the data pipeline (``train.data.BatchIterator``, shuffled, seed 0) with
  the CLI's default training objective, ``prefix`` (every prefix of a user's training part, truncated to
  its last N items, predicts the next item: one target per row). At N >= 1024 most rows are short, so most
  of the B x N tokens are padding; ``real_token_fraction`` says how many are items. ``--objective
  all-positions`` uses end-aligned windows of N items with a target at every position instead.
* ``synth:N:B`` random item ids, every row full (N real items), random targets: the long-history case.

Defaults: ML-1M at N = 1024 (B = 128) and 2048 (B = 64), synthetic at N = 8192 (B = 16), 32768 (B = 4) and
65536 (B = 2): 131,072 tokens per step everywhere. Models (``--models``, ``KIND[:IMPL]``): ``blossom``
(attention_impl auto: Pallas kernels on GPU, XLA on CPU) and ``dense`` (auto: cuDNN flash attention on
GPU in bfloat16, XLA otherwise), both with the default shapes (D = 128, H = 8, L = 2; BlossomRec Hk = 2) and
no attention dropout (``--attention-dropout``; the dense model's dropout path materialises [B, H, N, N]).

Each (size, model) runs in its own subprocess, so ``peak_bytes_in_use`` (device memory_stats, GPU/TPU) is
that configuration's own peak and an out-of-memory error or crash is recorded ("OOM" / "error") instead of
ending the sweep. Per configuration: compile time, XLA's compiled estimate (arguments + outputs +
temporaries), median step time after warm-up (block_until_ready), steps/s, tokens/s (B x N) and real
tokens/s.

Usage (GPU; ~5-8 minutes for the default sweep):
    python benchmarks/long_sequences.py --data .devdata/ml-1m_full.txt --out $OUT/long_sequences.json
CPU smoke test:
    python benchmarks/long_sequences.py --sizes synth:256:4,synth:512:2 --num-items 50 --steps 2 --warmup 1 \\
        --out /tmp/long.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, REPO)

DEFAULT_SIZES = "ml1m:1024:128,ml1m:2048:64,synth:8192:16,synth:32768:4,synth:65536:2"
DEFAULT_MODELS = "blossom,dense"
ML1M_ITEMS = 3706
TARGET_KIND = {"prefix": "next", "all-positions": "shift"}
RESULT_PREFIX = "RESULT "
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


# ----------------------------------------------------------------------------------------------------
# Batches (parent process, numpy only: the parent never initialises a jax backend)
# ----------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """``"ml1m:1024:128,synth:8192:16"`` -> [("ml1m", 1024, 128), ("synth", 8192, 16)]."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in ("ml1m", "synth") or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--sizes entries are DATA:N:B with DATA ml1m or synth, got {item!r}")
        sizes.append((parts[0], int(parts[1]), int(parts[2])))
    return sizes


def parse_models(text: str) -> list[tuple[str, str]]:
    """``"blossom,dense:xla"`` -> [("blossom", "auto"), ("dense", "xla")]."""
    models = []
    for item in text.split(","):
        kind, _, impl = item.strip().partition(":")
        if kind not in ("blossom", "dense"):
            raise ValueError(f"--models entries are blossom|dense[:impl], got {item!r}")
        models.append((kind, impl or "auto"))
    return models


def load_split(path: str):
    """ML-1M (or any per-user file) read and split leave-one-out as the CLI does."""
    from train.data import encode, leave_one_out, read_interactions

    return leave_one_out(encode(read_interactions(path)), "train")


def real_batches(split, objective: str, seq_len: int, batch: int, count: int, seed: int
                 ) -> dict[str, np.ndarray]:
    """``count`` shuffled training batches of the data pipeline, stacked: seq [K, B, N], len, target, weight."""
    from train.data import BatchIterator, prefix_examples, window_examples

    examples = (window_examples(split, seq_len) if objective == "all-positions" else prefix_examples(split))
    iterator = BatchIterator(split.items, examples, batch, seq_len, TARGET_KIND[objective], 1,
                             shuffle=True, seed=seed)
    taken = []
    for b in iterator.epoch(0):
        b.pop("user")
        taken.append(b)
        if len(taken) == count:
            break
    return {k: np.stack([b[k] for b in taken]) for k in taken[0]}


def synthetic_batches(objective: str, seq_len: int, batch: int, count: int, num_items: int, seed: int
                      ) -> dict[str, np.ndarray]:
    """``count`` batches of full-length rows of uniformly random item ids (1..num_items)."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, num_items + 1, size=(count, batch, seq_len), dtype=np.int32)
    out = {"seq": seq, "len": np.full((count, batch), seq_len, np.int32),
           "weight": np.ones((count, batch), np.float32)}
    if objective == "all-positions":
        out["target"] = np.concatenate(
            [seq[:, :, 1:], rng.integers(1, num_items + 1, size=(count, batch, 1), dtype=np.int32)], axis=2)
    else:
        out["target"] = rng.integers(1, num_items + 1, size=(count, batch), dtype=np.int32)
    return out


# ----------------------------------------------------------------------------------------------------
# Worker (one configuration, own process)
# ----------------------------------------------------------------------------------------------------


def is_oom(text: str) -> bool:
    return any(marker in text for marker in OOM_MARKERS)


def device_peak_bytes(device) -> int | None:
    """``peak_bytes_in_use`` of the device allocator (None where the backend keeps no stats, e.g. CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Compiles and times the train step of one (size, model) configuration; returns its row."""
    import jax

    from train.config import TrainConfig
    from train.loop import build_program

    row: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind}
    data = np.load(spec["batches"])
    batches_host = [{k: data[k][i] for k in data.files} for i in range(data["seq"].shape[0])]
    cfg = TrainConfig(max_len=spec["N"], attention=spec["model"], attention_impl=spec["impl"],
                      compute_dtype=spec["dtype"], batch_size=spec["B"], objective=spec["objective"],
                      attention_dropout=spec["attention_dropout"], seed=spec["seed"])
    model_cfg = cfg.model_config(spec["num_items"])
    program = build_program(cfg, model_cfg)
    state = program.init(cfg.seed)
    batches = [program.mesh.put(b) for b in batches_host]
    t = time.perf_counter()
    compiled = program.train_step.lower(state, batches[0]).compile()
    row["compile_s"] = round(time.perf_counter() - t, 2)
    analysis = compiled.memory_analysis()
    if analysis is not None:
        row["compiled_peak_bytes"] = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                         + analysis.temp_size_in_bytes)
    if spec["model"] == "blossom":
        from blossom_jax.attention import resolve_impl

        row["resolved_impl"] = resolve_impl(spec["impl"], spec["N"], model_cfg.attn)
    else:
        import jax.numpy as jnp

        from blossom_jax.models import dense_impl

        dtype = jnp.bfloat16 if spec["dtype"] == "bfloat16" else jnp.float32
        row["resolved_impl"] = dense_impl(spec["impl"], dtype, model_cfg.hidden_size // model_cfg.attn.num_heads)
        row["compiled_has_cudnn_call"] = "cudnn" in compiled.as_text().lower()
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        state, out = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, out))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
            losses.append(float(out["loss"]))
    step_s = statistics.median(times)
    tokens = spec["B"] * spec["N"]
    real = float(np.mean([b["len"].sum() for b in batches_host]))
    row.update(status="ok", step_ms=round(step_s * 1e3, 3), step_ms_min=round(min(times) * 1e3, 3),
               steps_per_s=round(1.0 / step_s, 3), tokens_per_s=round(tokens / step_s, 1),
               real_tokens_per_s=round(real / step_s, 1), real_token_fraction=round(real / tokens, 4),
               peak_bytes_in_use=device_peak_bytes(jax.devices()[0]), final_loss=losses[-1],
               loss_finite=bool(np.all(np.isfinite(losses))))
    return row


def worker_main(spec_json: str) -> int:
    """Runs one configuration and prints ``RESULT {json}``; errors are classified, never raised."""
    spec = json.loads(spec_json)
    try:
        row = run_worker(spec)
    except Exception as error:  # noqa: BLE001 - OOM or other failure, reported to the parent
        text = f"{type(error).__name__}: {error}"
        row = {"status": "OOM" if is_oom(text) else "error", "error": text.splitlines()[0][:500]}
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------


def run_config(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs one configuration in a subprocess; a crash or timeout becomes a row with that status."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or "")[-2000:]
    return {"status": "OOM" if is_oom(tail) else "error", "returncode": proc.returncode,
            "error": tail.strip().splitlines()[-1][:500] if tail.strip() else "no output"}


def describe(row: dict[str, Any]) -> str:
    """One console line of a result row."""
    head = f"{row['data']:<6}{row['N']:>7}{row['B']:>5} {row['model']:<8}{row.get('resolved_impl', ''):<7}"
    if row["status"] != "ok":
        return f"{head}{row['status']}: {row.get('error', '')[:100]}"
    peak = row.get("peak_bytes_in_use") or row.get("compiled_peak_bytes") or 0
    return (f"{head}{row['step_ms']:>10.2f} ms{row['steps_per_s']:>8.2f}/s{row['tokens_per_s'] / 1e3:>10.1f}k tok/s"
            f"{peak / 2**30:>8.2f} GiB  compile {row['compile_s']:.0f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"comma-separated DATA:N:B, DATA ml1m or synth (default {DEFAULT_SIZES})")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated blossom|dense[:auto|xla|pallas|reference] (default blossom,dense)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--objective", choices=tuple(TARGET_KIND), default="prefix",
                   help="training objective (default prefix, the CLI's default)")
    p.add_argument("--attention-dropout", type=float, default=0.0,
                   help="dense attention dropout (default 0: > 0 materialises the probabilities)")
    p.add_argument("--data", default=".devdata/ml-1m_full.txt", help="ML-1M file for the ml1m sizes")
    p.add_argument("--num-items", type=int, default=ML1M_ITEMS,
                   help="vocabulary of the synthetic sizes (default 3706, as ML-1M)")
    p.add_argument("--pool", type=int, default=3, help="distinct batches cycled through (default 3)")
    p.add_argument("--seed", type=int, default=0, help="data order / synthetic data / parameter seed")
    p.add_argument("--config-timeout-s", type=float, default=300.0,
                   help="give up on one configuration after this many seconds (default 300)")
    p.add_argument("--out", default=None,
                   help="JSON file written after every configuration (default $OUT/long_sequences.json "
                        "if $OUT is set, else print only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    sizes, models = parse_sizes(args.sizes), parse_models(args.models)
    out = args.out or (os.path.join(os.environ["OUT"], "long_sequences.json") if os.environ.get("OUT") else None)
    meta: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                            "argv": sys.argv[1:], "objective": args.objective, "dtype": args.dtype,
                            "steps": args.steps, "warmup": args.warmup,
                            "attention_dropout": args.attention_dropout,
                            "step": "train.loop.build_program train step: forward (dropout 0.2), CE over all "
                                    "item ids, backward, Adam; batches already on device"}
    rows: list[dict[str, Any]] = []
    scratch = tempfile.mkdtemp(prefix="blossom_long_")
    split = None
    print(f"{'data':<6}{'N':>7}{'B':>5} {'model':<8}{'impl':<7}", flush=True)
    for data, seq_len, batch in sizes:
        if data == "ml1m":
            if split is None:
                split = load_split(args.data)
            host = real_batches(split, args.objective, seq_len, batch, args.pool, args.seed)
            num_items = split.num_items
        else:
            host = synthetic_batches(args.objective, seq_len, batch, args.pool, args.num_items, args.seed)
            num_items = args.num_items
        path = os.path.join(scratch, f"{data}_{seq_len}_{batch}.npz")
        np.savez(path, **host)
        for model, impl in models:
            spec = {"data": data, "N": seq_len, "B": batch, "model": model, "impl": impl, "dtype": args.dtype,
                    "objective": args.objective, "attention_dropout": args.attention_dropout,
                    "num_items": num_items, "seed": args.seed, "steps": args.steps, "warmup": args.warmup,
                    "batches": path}
            t = time.time()
            result = run_config(spec, args.config_timeout_s)
            row = {k: v for k, v in spec.items() if k != "batches"}
            row.update(tokens_per_step=seq_len * batch, wall_s=round(time.time() - t, 1), **result)
            for key in ("jax", "backend", "device"):
                if key in result and key not in meta:
                    meta[key] = result[key]
            rows.append(row)
            print(describe(row), flush=True)
            if out:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                with open(out, "w", encoding="utf-8") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
        os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
