"""Issue 8: time of one training epoch including the input pipeline, measured in parts and extrapolated.

A whole ML-1M epoch at N = 200 with the prefix objective is 982,089 examples (480 steps of 2048): too long
to run on a small CPU, so the epoch is measured in parts, all with the CLI's own code:

(a) input pipeline, measured for a whole epoch: ``train.data.BatchIterator`` (shuffle, vectorised numpy
    gather of every batch; no device transfer), batches/s and s/epoch; also the file read + split time
    (once per run, not per epoch);
(b) the train step (``train.loop.build_program``: forward with dropout, CE over all items, backward, Adam),
    ``--steps`` timed steps after ``--warmup`` on real batches of the same pipeline, median; the
    host-to-device transfer of a batch timed separately. ``--step-batch-size`` times it at a smaller batch
    (when a batch of 2048 does not fit in memory, as for the XLA BlossomRec step on a 23 GB CPU host) and
    scales it linearly;
(c) one validation pass (the CLI validates after every epoch), timed after a one-batch warm-up.

Extrapolated (labelled as such in the JSON): ``steps_per_epoch x median step`` plus (a) and the transfers
when nothing overlaps (``serial``), and the larger of the two when the prefetch thread hides the pipeline
behind the step (``overlapped``; on a CPU both compete for the same cores, so expect a value in between);
``+ validation`` gives the CLI's epoch (train + validation).

Usage (the CPU figure of benchmarks/results/epoch_time_cpu_2026-11-27.json):
    python benchmarks/epoch_time.py --data ../shared/data/ml-1m/ml-1m_full.txt --max-len 200 \
        --dtypes float32,bfloat16 --step-batch-size 256 --eval-batch-size 256 \
        --out benchmarks/results/epoch_time_cpu_2026-11-27.json
GPU: the same without --step-batch-size / --eval-batch-size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Sequence


sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))


def cpu_info() -> dict[str, Any]:
    """CPU model name (from /proc/cpuinfo where present) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "usable_cpus": usable}


def load(path: str, max_len: int, batch_size: int, objective: str, seed: int):
    """(split, BatchIterator, seconds to read + split) exactly as ``train.loop.fit`` builds them."""
    from train.config import TrainConfig
    from train.data import BatchIterator
    from train.loop import load_split, train_examples

    cfg = TrainConfig(data=path, max_len=max_len, batch_size=batch_size, objective=objective, seed=seed)
    t = time.perf_counter()
    split = load_split(cfg)
    examples = train_examples(cfg, split)
    target = "shift" if objective == "all-positions" else "next"
    batches = BatchIterator(split.items, examples, cfg.batch_size, cfg.max_len, target, 1, shuffle=True,
                            seed=cfg.seed)
    return cfg, split, batches, time.perf_counter() - t


def time_pipeline(batches, epoch: int = 0) -> dict[str, Any]:
    """Produces every batch of one epoch (numpy only) and times it."""
    t = time.perf_counter()
    count = 0
    for _ in batches.epoch(epoch):
        count += 1
    seconds = time.perf_counter() - t
    return {"batches": count, "examples": len(batches.examples), "seconds_per_epoch": round(seconds, 3),
            "batches_per_s": round(count / seconds, 2), "examples_per_s": round(len(batches.examples) / seconds, 1)}


def time_step(cfg, split, batches, model: str, dtype: str, steps: int, warmup: int, validate: bool = True
              ) -> dict[str, Any]:
    """Median train-step time on real batches of ``batches`` (its batch size), the batch transfer time and
    one validation pass (after a one-batch warm-up that compiles the eval step)."""
    import itertools

    import jax

    from train.evaluation import build_eval_set, eval_batches, evaluate
    from train.loop import build_program
    from train.steps import model_rank_fn

    run_cfg = cfg.replace(attention=model, compute_dtype=dtype)
    model_cfg = run_cfg.model_config(split.num_items)
    program = build_program(run_cfg, model_cfg)
    state = program.init(run_cfg.seed)
    host = []
    for b in batches.epoch(1):
        b.pop("user")
        host.append(b)
        if len(host) == warmup + steps:
            break
    put_s = []
    for b in host:
        t = time.perf_counter()
        jax.block_until_ready(program.mesh.put(b))
        put_s.append(time.perf_counter() - t)
    device_batches = [program.mesh.put(b) for b in host]
    t = time.perf_counter()
    compiled = program.train_step.lower(state, device_batches[0]).compile()
    compile_s = time.perf_counter() - t
    step_s = []
    for i, batch in enumerate(device_batches):
        t = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        if i >= warmup:
            step_s.append(time.perf_counter() - t)
    row = {"model": model, "dtype": dtype, "attention_impl": run_cfg.attention_impl,
           "attention_dropout": run_cfg.attention_dropout if model == "dense" else None,
           "step_batch_size": batches.batch, "compile_s": round(compile_s, 2),
           "step_s": [round(s, 4) for s in step_s], "median_step_s": round(statistics.median(step_s), 4),
           "median_put_s": round(statistics.median(put_s), 5), "final_loss": float(out["loss"])}
    if not validate:
        return row
    valid_set = build_eval_set(split, "valid", run_cfg.eval_protocol, run_cfg.seed)
    rank_fn = model_rank_fn(program.eval_step, state.params, program.mesh)
    evaluate(rank_fn, itertools.islice(eval_batches(split, valid_set, run_cfg.eval_batch_size,
                                                    run_cfg.max_len), 1))  # compiles
    t = time.perf_counter()
    evaluate(rank_fn, eval_batches(split, valid_set, run_cfg.eval_batch_size, run_cfg.max_len))
    row.update(validation_pass_s=round(time.perf_counter() - t, 3), validation_protocol=run_cfg.eval_protocol,
               eval_batch_size=run_cfg.eval_batch_size)
    return row


def extrapolate(pipeline: dict, step: dict, steps_per_epoch: int, batch_size: int) -> dict[str, Any]:
    """Epoch-time estimates from the measured parts (see the module docstring).

    A step measured at a smaller batch (``step["step_batch_size"]`` < ``batch_size``, for memory) is scaled
    linearly to ``batch_size`` (compute-bound: the step's work is proportional to the batch).
    """
    scale = batch_size / step["step_batch_size"]
    compute = steps_per_epoch * step["median_step_s"] * scale
    transfer = steps_per_epoch * step["median_put_s"] * scale
    serial = compute + transfer + pipeline["seconds_per_epoch"]
    overlapped = max(compute, transfer + pipeline["seconds_per_epoch"])
    label = "EXTRAPOLATED from measured parts, not a measured epoch"
    if scale != 1:
        label += f"; step time scaled linearly from batch {step['step_batch_size']} to {batch_size}"
    return {"label": label, "steps_per_epoch": steps_per_epoch, "step_scale": scale,
            "step_s_at_batch_size": round(step["median_step_s"] * scale, 3), "train_steps_s": round(compute, 1),
            "transfers_s": round(transfer, 1), "pipeline_s": pipeline["seconds_per_epoch"],
            "train_epoch_serial_s": round(serial, 1), "train_epoch_overlapped_s": round(overlapped, 1),
            "epoch_with_validation_serial_s": round(serial + step["validation_pass_s"], 1),
            "epoch_with_validation_overlapped_s": round(overlapped + step["validation_pass_s"], 1)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/ml-1m/ml-1m_full.txt", help="interaction file")
    p.add_argument("--max-len", type=int, default=200, help="sequence length N (default 200)")
    p.add_argument("--batch-size", type=int, default=2048, help="training batch size (default 2048)")
    p.add_argument("--objective", choices=("prefix", "all-positions"), default="prefix",
                   help="training examples (default prefix, the CLI's default)")
    p.add_argument("--models", default="blossom", help="comma-separated blossom,dense (default blossom)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--seed", type=int, default=2020, help="run seed (data order, parameters)")
    p.add_argument("--step-batch-size", type=int, default=None,
                   help="time the train step at this smaller batch and scale it linearly to --batch-size "
                        "(when a full batch does not fit in memory; default: --batch-size)")
    p.add_argument("--scaling-batch-sizes", default="",
                   help="comma-separated extra batch sizes at which the first model/dtype's step is also timed "
                        "(3 steps), to check the linear scaling of --step-batch-size")
    p.add_argument("--eval-batch-size", type=int, default=2048, help="validation batch size (default 2048)")
    p.add_argument("--eval-protocol", choices=("full", "uni100"), default="full",
                   help="validation protocol of (c) (default full, the CLI's default)")
    p.add_argument("--skip-step", action="store_true", help="measure the input pipeline only")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    cfg, split, batches, load_s = load(args.data, args.max_len, args.batch_size, args.objective, args.seed)
    cfg = cfg.replace(eval_protocol=args.eval_protocol, eval_batch_size=args.eval_batch_size)
    step_batches = batches
    if args.step_batch_size and args.step_batch_size != args.batch_size:
        step_batches = load(args.data, args.max_len, args.step_batch_size, args.objective, args.seed)[2]
    result: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "jax": jax.__version__,
                 "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **cpu_info(),
                 "argv": sys.argv[1:], "data": os.path.abspath(args.data), "max_len": args.max_len,
                 "batch_size": args.batch_size, "objective": args.objective},
        "data_load_and_split_s": round(load_s, 2),
        "pipeline": time_pipeline(batches),
        "steps": [],
    }
    print(json.dumps({k: result[k] for k in ("data_load_and_split_s", "pipeline")}), flush=True)
    if not args.skip_step:
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                step = time_step(cfg, split, step_batches, model.strip(), dtype.strip(), args.steps,
                                 args.warmup)
                step["extrapolated"] = extrapolate(result["pipeline"], step, batches.num_batches, batches.batch)
                result["steps"].append(step)
                print(json.dumps(step), flush=True)
                if args.out:
                    _write(args.out, result)
    scaling = [int(b) for b in args.scaling_batch_sizes.split(",") if b.strip()]
    if scaling and not args.skip_step:
        model, dtype = args.models.split(",")[0].strip(), args.dtypes.split(",")[0].strip()
        points = {}
        for size in scaling:
            sized = load(args.data, args.max_len, size, args.objective, args.seed)[2]
            points[size] = time_step(cfg, split, sized, model, dtype, 3, 1, validate=False)["median_step_s"]
        reference = result["steps"][0]
        points[reference["step_batch_size"]] = reference["median_step_s"]
        result["scaling_check"] = {"model": model, "dtype": dtype, "median_step_s_by_batch": {
            str(b): points[b] for b in sorted(points)}, "seconds_per_example_by_batch": {
            str(b): round(points[b] / b, 5) for b in sorted(points)}}
        print(json.dumps(result["scaling_check"]), flush=True)
    if args.out:
        _write(args.out, result)
    return 0


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
