"""Command-line entry points ``blossom-train`` and ``blossom-eval``.

    blossom-train --out runs/demo                         # bundled synthetic data, about a minute on CPU
    blossom-train --data ml-1m_5core.txt --out runs/ml1m  # the reference run's settings
    blossom-train --data ratings.dat --out runs/x --eval-protocol uni100 --attention dense
    blossom-train --print-config                          # resolved config as commented YAML
    blossom-train --out runs/ml1m --resume                # continue a killed run
    blossom-eval --checkpoint runs/ml1m --eval-protocol uni100
    blossom-train --distributed --coordinator-address host0:1234 --num-processes 2 --process-id $I \
        --data ... --out /shared/run                     # on every host of a multi-host job

Configuration precedence: defaults < bundled-data preset (no --data) < --config FILE.yaml < flags
(``--set key=value`` reaches every field of train.config.TrainConfig). With --resume the run's saved
config.yaml is the base and only a few fields may change (train.loop.RESUME_MUTABLE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import yaml

from train.config import BUNDLED_PRESET, LOSSES, OBJECTIVES, TrainConfig
from train.data import FORMATS
from train.metrics import PROTOCOLS, TIE_MODES

log = logging.getLogger("train")

# flag dest -> TrainConfig field, for flags whose name differs from the field.
_FIELD_OF = {"lr": "learning_rate", "dtype": "compute_dtype"}


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blossom-train", description="Train a BlossomRec / SASRec / BERT4Rec "
                                "sequential recommender, evaluate it and save checkpoints.")
    p.add_argument("--data", help="interaction file (default: the bundled synthetic dataset)")
    p.add_argument("--out", help="run directory (checkpoints, logs, results.json)")
    p.add_argument("--format", choices=("auto", *FORMATS), help="data format (default: auto-detect)")
    p.add_argument("--max-len", type=int, help="maximum sequence length N")
    p.add_argument("--epochs", type=int, help="maximum number of epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (0 = no limit)")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch size")
    p.add_argument("--eval-protocol", choices=PROTOCOLS, help="full ranking or 100 sampled negatives")
    p.add_argument("--exclude-history", action="store_const", const=True,
                   help="full ranking: exclude the user's earlier items")
    p.add_argument("--ties", choices=TIE_MODES, help="rank tie handling (default: expected)")
    p.add_argument("--attention", choices=("blossom", "dense"), help="attention kind")
    p.add_argument("--attention-impl", choices=("auto", "reference", "xla", "pallas"),
                   help="attention implementation (dense: auto = cuDNN on GPU in bfloat16, else XLA)")
    p.add_argument("--bidirectional", action="store_const", const=True,
                   help="BERT4Rec-style masked-item model")
    p.add_argument("--objective", choices=OBJECTIVES, help="prefix examples or all positions")
    p.add_argument("--loss", choices=LOSSES, help="cross-entropy over all items or BPR")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--inner-size", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (params stay float32)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip-norm", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--patience", type=int, help="early-stopping patience (evaluations)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field (YAML value), repeatable")
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (run on every host); "
                        "auto-detected on Cloud TPU / SLURM / Open MPI, else give the three flags below")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id, 0..num_processes-1")
    p.add_argument("--max-epochs-this-run", type=int, help=argparse.SUPPRESS)
    return p


_NOT_FIELDS = {"out", "set", "config", "print_config", "resume", "max_epochs_this_run", "distributed",
               "coordinator_address", "num_processes", "process_id"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields given on the command line (flags + --set)."""
    values = {_FIELD_OF.get(k, k): v for k, v in vars(args).items() if k not in _NOT_FIELDS and v is not None}
    if values.get("data"):
        values["data"] = os.path.abspath(values["data"])  # a resumed run may start from another directory
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < bundled preset < --config < flags; with --resume the saved config is the base."""
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "r", encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: a config file must hold a mapping")
        values.update(loaded)
    values.update(_overrides(args))
    if args.resume:
        from train.checkpoint import load_train_config

        return TrainConfig.from_dict(values, load_train_config(args.out))
    if values.get("data") is None:
        values = {**{k: v for k, v in BUNDLED_PRESET.items() if k not in values}, **values}
    return TrainConfig.from_dict(values)


_HANDLERS: list[logging.Handler] = []  # installed by _setup_logging; replaced on the next call


def _setup_logging(out: str | None) -> None:
    """INFO logs to stderr and (process 0 only) to OUT/train.log."""
    import jax

    root = logging.getLogger()
    for h in _HANDLERS:
        root.removeHandler(h)
        h.close()
    _HANDLERS.clear()
    _HANDLERS.append(logging.StreamHandler(sys.stderr))
    if out and jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        _HANDLERS.append(logging.FileHandler(os.path.join(out, "train.log")))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in _HANDLERS:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``blossom-train``; returns the exit status (0 ok, 2 usage/data error, 3 interrupted on purpose)."""
    parser = _train_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume and not args.out:
            raise ValueError("--resume needs --out (the run directory to continue)")
        cfg = resolve_config(args)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        if not args.out:
            parser.error("--out is required (or use --print-config)")
        if args.distributed:
            import jax

            jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        _setup_logging(args.out)
        from train.loop import RunInterrupted, fit

        try:
            results = fit(cfg, args.out, resume=args.resume, max_epochs_this_run=args.max_epochs_this_run)
        except RunInterrupted as e:
            log.warning("%s", e)
            return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"blossom-train: error: {e}", file=sys.stderr)
        return 2
    summary = {"protocol": results["protocol"], "best_epoch": results["best_epoch"],
               "valid": results["valid"], "test": results["test"]}
    print(json.dumps(summary, indent=2))
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blossom-eval", description="Evaluate the best parameters of a "
                                "blossom-train run; prints metrics JSON.")
    p.add_argument("--checkpoint", required=True, help="run directory written by blossom-train --out")
    p.add_argument("--data", help="evaluate on this file instead of the run's data (item ids mapped "
                   "with the run's item map; unknown items dropped and counted)")
    p.add_argument("--format", choices=("auto", *FORMATS))
    p.add_argument("--eval-protocol", choices=PROTOCOLS)
    p.add_argument("--exclude-history", action="store_const", const=True)
    p.add_argument("--ties", choices=TIE_MODES)
    p.add_argument("--split", choices=("valid", "test", "both"), default="both")
    return p


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``blossom-eval``; prints {"protocol", "valid", "test", ...} as JSON on stdout."""
    args = _eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from train.loop import evaluate_run

    splits = ("valid", "test") if args.split == "both" else (args.split,)
    try:
        out = evaluate_run(args.checkpoint, data=args.data, fmt=args.format, protocol=args.eval_protocol,
                           exclude_history=args.exclude_history, ties=args.ties, splits=splits)
    except (ValueError, FileNotFoundError) as e:
        print(f"blossom-eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
