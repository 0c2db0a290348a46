"""Issue 7: reproduction runs of the training CLI (BlossomRec vs dense SASRec, several seeds), one process.

Every experiment is one ``blossom-train`` run, built from the same flags the CLI takes (parsed by
``train.cli``'s own parser, so ``command`` in the summary reproduces it) and run in this process, so runs of
the same shape share their compiled programs (``train.loop.build_program`` is cached; seeds 2020/2021/2022
compile once). After each run the best parameters are also evaluated on the test split with full ranking.

Experiments are named ``<data>-n<max_len>-<model>[-allpos]-s<seed>``:

    ml1m-n200-{blossom,dense}-s{2020,2021,2022}         ML-1M (ml-1m_full.txt), N = 200
    ml1m-n200-{blossom,dense}-allpos-s{2020,2021,2022}  the same with the all-positions objective (issue 8)
    ml1m-n50-{blossom,dense}-s{2020,2021,2022}          ML-1M, N = 50
    beauty-n50-{blossom,dense}-s{2020,2021,2022}        Amazon Beauty (Beauty.txt), N = 50
    bundled-n20-{blossom,dense}[-allpos]-s2020          the bundled synthetic data (CPU smoke test)

Defaults: bfloat16 compute, uni100 validation (early stopping on NDCG@10, patience 15) and test, plus
full-ranking test.
* prefix objective (the reference's training examples): batch 2048; epoch cap 12 for ML-1M (a time cap, not
  convergence: in 9 of the 12 capped runs of 2026-11-27 the best epoch was the last), 200 for Beauty (early
  stopping ends it sooner), 3 for bundled.
* all-positions objective (one window per user, loss at every position): batch 256, since an ML-1M epoch
  at N = 200 is only 34 steps of 256; epoch cap 200 (early stopping ends it sooner), 3 for bundled.

Several GPUs: ``--devices K`` runs the experiments in K child processes of this script, one GPU each
(``CUDA_VISIBLE_DEVICES``), longest expected runs first, and merges their rows into one summary.json and
one runs.tar.gz.

Output (``--out``, e.g. $OUT; the device tool returns at most 8 files, so by default only two):
    summary.json   meta (device, jax, date, argv) and one row per run: model, data, max_len, seed,
                   epochs run, best epoch, stop reason, uni100 and full test metrics, best valid metrics,
                   wall time, epoch times, the blossom-train command; rewritten after every run
    runs.tar.gz    per run: results.json, metrics.jsonl, train.log, config.yaml, data_stats.json
``--per-run-files`` also writes ``<out>/<name>/results.json``. Checkpoints stay in ``--work-dir``.

Time budget: no run starts once ``--time-budget-s`` seconds have passed, or when less than
``--min-run-s`` is left; a run in progress stops at an epoch boundary when its next epoch would end after the
budget, and is then evaluated from its best checkpoint (``stop_reason: "time_budget"``).

Usage (one H100, ~8 minutes per call; four GPUs):
    python benchmarks/reproduce.py --data-root .devdata --out $OUT --time-budget-s 470 \\
        --only 'ml1m-n200-*-s2020'
    python benchmarks/reproduce.py --data-root .devdata --out $OUT --time-budget-s 500 --devices 4 \\
        --only 'ml1m-n200-*-s2021,beauty-n50-*-s2021,ml1m-n200-*-allpos-s2020'
(a glob like ``ml1m-n200-*-s2021`` matches the ``-allpos-`` runs too.)
CPU smoke test:
    python benchmarks/reproduce.py --only 'bundled-*' --max-epochs 2 --out /tmp/repro
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import io
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

import jax  # noqa: E402

DATA_FILES = {"ml1m": "ml-1m_full.txt", "beauty": "Beauty.txt", "bundled": None}
DEFAULT_EPOCHS = {("ml1m", "prefix"): 12, ("beauty", "prefix"): 200, ("ml1m", "all-positions"): 200,
                  ("bundled", "prefix"): 3, ("bundled", "all-positions"): 3}
DEFAULT_BATCH = {"prefix": 2048, "all-positions": 256}
# Rough H100 minutes of one run (training to the epoch cap or early stop + full-ranking test), to balance
# --devices (from the runs of 2026-11-27).
EXPECTED_MINUTES = {("ml1m", 200, "dense", "prefix"): 4.0, ("ml1m", 200, "blossom", "prefix"): 2.6,
                    ("ml1m", 200, "dense", "all-positions"): 1.4, ("ml1m", 200, "blossom", "all-positions"): 1.2,
                    ("ml1m", 50, "dense", "prefix"): 1.1, ("ml1m", 50, "blossom", "prefix"): 1.0,
                    ("beauty", 50, "dense", "prefix"): 0.8, ("beauty", 50, "blossom", "prefix"): 0.8}
MODELS = ("blossom", "dense")
OBJECTIVE_SUFFIX = {"prefix": "", "all-positions": "-allpos"}
SEEDS = (2020, 2021, 2022)
KEY_METRICS = ("ndcg@10", "recall@10", "mrr@10")
RUN_FILES = ("results.json", "metrics.jsonl", "train.log", "config.yaml", "data_stats.json")

log = logging.getLogger("reproduce")


@dataclass(frozen=True)
class Experiment:
    """One training run: dataset key (``DATA_FILES``), sequence length, attention kind, seed, objective."""

    data: str
    max_len: int
    model: str
    seed: int
    objective: str = "prefix"

    @property
    def name(self) -> str:
        return f"{self.data}-n{self.max_len}-{self.model}{OBJECTIVE_SUFFIX[self.objective]}-s{self.seed}"

    @property
    def expected_minutes(self) -> float:
        return EXPECTED_MINUTES.get((self.data, self.max_len, self.model, self.objective), 1.0)


def all_experiments() -> list[Experiment]:
    """Every named experiment, in the default running order."""
    plan = [("ml1m", 200, "prefix", SEEDS), ("ml1m", 200, "all-positions", SEEDS), ("ml1m", 50, "prefix", SEEDS),
            ("beauty", 50, "prefix", SEEDS), ("bundled", 20, "prefix", (2020,)),
            ("bundled", 20, "all-positions", (2020,))]
    return [Experiment(data, n, model, seed, objective)
            for data, n, objective, seeds in plan for seed in seeds for model in MODELS]


def select_experiments(experiments: list[Experiment], only: str | None) -> list[Experiment]:
    """The experiments matching any comma-separated name or glob of ``only`` (all but bundled if None)."""
    if not only:
        return [e for e in experiments if e.data != "bundled"]
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [e for e in experiments if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(e.name, p) for e in experiments)]
    if unmatched:
        raise ValueError(f"--only: no experiment matches {unmatched}; see --list")
    return chosen


def train_argv(exp: Experiment, run_dir: str, data_root: str, args: argparse.Namespace) -> list[str]:
    """The blossom-train flags of ``exp``."""
    argv = ["--out", run_dir, "--max-len", str(exp.max_len), "--attention", exp.model,
            "--seed", str(exp.seed), "--epochs", str(args.max_epochs or DEFAULT_EPOCHS[exp.data, exp.objective]),
            "--objective", exp.objective, "--batch-size", str(args.batch_size or DEFAULT_BATCH[exp.objective]),
            "--eval-protocol", "uni100", "--no-progress", "--no-tensorboard"]
    if DATA_FILES[exp.data] is not None:
        argv = ["--data", os.path.join(data_root, DATA_FILES[exp.data])] + argv
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.patience:
        argv += ["--patience", str(args.patience)]
    if exp.model == "dense" and args.dense_attention_dropout is not None:
        argv += ["--set", f"attention_dropout={args.dense_attention_dropout}"]
    for item in args.set:
        argv += ["--set", item]
    return argv


class BudgetStop(Exception):
    """Raised from the epoch callback to end a run at an epoch boundary when the time budget is spent."""


@dataclass
class EpochClock:
    """Records the end time of every epoch (train + validation + checkpoint) and enforces a deadline."""

    start: float
    deadline: float | None
    ends: list[float] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)

    def durations(self) -> list[float]:
        points = [self.start] + self.ends
        return [round(b - a, 3) for a, b in zip(points, points[1:])]

    def __call__(self, epoch: int, valid: dict) -> None:
        now = time.time()
        self.ends.append(now)
        self.valid.append({k: valid[k] for k in KEY_METRICS if k in valid})
        times = self.durations()
        print(f"  epoch {epoch}: {times[-1]:.1f} s, valid ndcg@10 {valid.get('ndcg@10', float('nan')):.4f}",
              flush=True)
        if self.deadline is not None:
            next_epoch = statistics.median(times[1:]) if len(times) > 1 else times[0]
            if now + next_epoch > self.deadline:
                raise BudgetStop(f"time budget: next epoch (~{next_epoch:.0f} s) would end after the deadline")


def brief(metrics: dict | None) -> dict | None:
    """The key metrics (``KEY_METRICS``) of a metrics dict."""
    return None if metrics is None else {k: metrics[k] for k in KEY_METRICS if k in metrics}


def run_experiment(exp: Experiment, argv: list[str], run_dir: str, deadline: float | None,
                   verbose: bool) -> dict[str, Any]:
    """Trains one experiment via the CLI's config resolution and ``train.loop.fit``; returns its row."""
    from train import cli
    from train.loop import evaluate_run, fit

    cfg = cli.resolve_config(cli._train_parser().parse_args(argv))
    cli._setup_logging(run_dir)
    if not verbose:  # the run's train.log keeps INFO; the console gets warnings and the epoch lines
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
    clock = EpochClock(time.time(), deadline)
    row: dict[str, Any] = {"name": exp.name, "model": exp.model, "data": exp.data, "data_file": cfg.data,
                           "max_len": exp.max_len, "seed": exp.seed, "batch_size": cfg.batch_size,
                           "dtype": cfg.compute_dtype, "objective": cfg.objective, "epochs_cap": cfg.epochs,
                           "attention_impl": cfg.attention_impl, "attention_dropout": cfg.attention_dropout,
                           "command": "blossom-train " + shlex.join(argv)}
    try:
        results = fit(cfg, run_dir, on_epoch_end=clock)
        row.update(status="ok", stop_reason=results["stop_reason"], epochs_run=results["epochs"],
                   best_epoch=results["best_epoch"], steps=results["steps"],
                   test_uni100=brief(results["test"]), valid_uni100=brief(results["valid"]),
                   data_stats=results["data"])
    except BudgetStop as stop:
        print(f"  {stop}", flush=True)
        uni = evaluate_run(run_dir, protocol="uni100")
        row.update(status="ok", stop_reason="time_budget", epochs_run=len(clock.ends),
                   best_epoch=uni["best_epoch"], test_uni100=brief(uni["test"]), valid_uni100=brief(uni["valid"]))
        with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"protocol": "uni100", "stop_reason": "time_budget", **uni}, f, indent=2)
    row["train_wall_s"] = round(time.time() - clock.start, 2)
    t_full = time.time()
    full = evaluate_run(run_dir, protocol="full", splits=("test",))
    row["test_full"] = brief(full["test"])
    row["full_eval_s"] = round(time.time() - t_full, 2)
    epochs = clock.durations()
    row.update(epoch_s=epochs, first_epoch_s=epochs[0] if epochs else None,
               median_epoch_s=statistics.median(epochs[1:]) if len(epochs) > 1 else None,
               valid_by_epoch=clock.valid, wall_s=round(time.time() - clock.start, 2))
    return row


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """Device, versions, date and arguments of this invocation."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "argv": sys.argv[1:], "time_budget_s": args.time_budget_s,
            "note": "median_epoch_s excludes epoch 1 (compilation); an epoch time includes validation"}


def _add_run_files(tar: tarfile.TarFile, run_dir: str, name: str) -> None:
    """The light files of one run (``RUN_FILES``) into ``tar`` under ``name/``."""
    for file_name in RUN_FILES:
        path = os.path.join(run_dir, file_name)
        if os.path.isfile(path):
            tar.add(path, arcname=f"{name}/{file_name}")


def _copy_results(out: str, run_dir: str, name: str) -> None:
    src = os.path.join(run_dir, "results.json")
    if os.path.isfile(src):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(src, "rb") as a, open(os.path.join(out, name, "results.json"), "wb") as b:
            b.write(a.read())


def write_outputs(out: str, info: dict, rows: list[dict], work_dir: str, per_run_files: bool) -> None:
    """summary.json, runs.tar.gz (light files of every run so far) and optional <name>/results.json."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1)
    os.replace(tmp, os.path.join(out, "summary.json"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for row in rows:
            _add_run_files(tar, os.path.join(work_dir, row["name"]), row["name"])
    with open(os.path.join(out, "runs.tar.gz"), "wb") as f:
        f.write(buffer.getvalue())
    if per_run_files:
        for row in rows:
            _copy_results(out, os.path.join(work_dir, row["name"]), row["name"])


def print_table(rows: list[dict]) -> None:
    """One line per run: test NDCG@10 (uni100 / full), epochs, best epoch, epoch time."""
    print(f"\n{'run':<28}{'status':<12}{'ep':>4}{'best':>5}{'uni100 ndcg':>12}{'full ndcg':>10}"
          f"{'s/epoch':>9}{'wall s':>8}")
    for r in rows:
        uni, full = (r.get("test_uni100") or {}), (r.get("test_full") or {})
        med = r.get("median_epoch_s") or r.get("first_epoch_s") or float("nan")
        print(f"{r['name']:<28}{r.get('stop_reason') or r['status']:<12}{r.get('epochs_run', 0):>4}"
              f"{r.get('best_epoch') or 0:>5}{uni.get('ndcg@10', float('nan')):>12.4f}"
              f"{full.get('ndcg@10', float('nan')):>10.4f}{med:>9.2f}{r.get('wall_s', 0.0):>8.1f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=".devdata",
                   help="directory holding ml-1m_full.txt and Beauty.txt (default .devdata)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/reproduce"),
                   help="where summary.json and runs.tar.gz go (default $OUT, else runs/reproduce)")
    p.add_argument("--work-dir", default=None,
                   help="run directories with checkpoints (default: a fresh temporary directory)")
    p.add_argument("--only", default=None,
                   help="comma-separated experiment names or globs, e.g. 'ml1m-n200-*-s2020,beauty-*'")
    p.add_argument("--list", action="store_true", help="print the experiment names and exit")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epoch cap of every run (default: 12 ML-1M, 200 Beauty, 3 bundled)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch size (default 2048 prefix, 256 all-positions)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default 15)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--devices", type=int, default=1,
                   help="run the experiments in this many child processes, one GPU each (default 1: here)")
    p.add_argument("--dense-attention-dropout", type=float, default=None,
                   help="attention dropout of the dense model (default: the config's 0.2, whose training "
                        "path materialises the probabilities; 0 lets it use cuDNN flash attention)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra blossom-train --set for every run (repeatable)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no run after this many seconds and stop a running one at an epoch boundary "
                        "before it (default: no limit)")
    p.add_argument("--min-run-s", type=float, default=60.0,
                   help="do not start a run with less than this many seconds of budget left (default 60)")
    p.add_argument("--per-run-files", action="store_true", help="also write <out>/<name>/results.json")
    p.add_argument("--verbose", action="store_true", help="training INFO logs on the console too")
    return p.parse_args(argv)


def assign_devices(experiments: list[Experiment], devices: int) -> list[list[Experiment]]:
    """Splits the experiments over ``devices`` queues: longest expected run first, onto the least loaded queue."""
    queues: list[list[Experiment]] = [[] for _ in range(devices)]
    loads = [0.0] * devices
    for exp in sorted(experiments, key=lambda e: -e.expected_minutes):
        i = loads.index(min(loads))
        queues[i].append(exp)
        loads[i] += exp.expected_minutes
    return [q for q in queues if q]


def child_argv(argv: Sequence[str], names: list[str], out: str, work_dir: str) -> list[str]:
    """This invocation's flags for one child process: its own --only, --out and --work-dir, no --devices."""
    drop_with_value = {"--only", "--out", "--work-dir", "--devices"}
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        flag = item.split("=", 1)[0]
        if flag in drop_with_value:
            skip = "=" not in item
            continue
        kept.append(item)
    return kept + ["--only", ",".join(names), "--out", out, "--work-dir", work_dir]


def run_on_devices(args: argparse.Namespace, argv: Sequence[str], experiments: list[Experiment],
                   work_dir: str) -> int:
    """Runs the experiments in one child process per GPU and merges their outputs into ``args.out``."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat()
    queues = assign_devices(experiments, args.devices)
    # This process only counts the GPUs: keep XLA from preallocating most of each one's memory here.
    child_env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    visible = jax.local_devices()
    if len(visible) < len(queues):
        raise ValueError(f"--devices {args.devices}: only {len(visible)} local device(s) here")
    children = []
    for i, queue in enumerate(queues):
        part = os.path.join(work_dir, f"part{i}")
        os.makedirs(part, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__)] + child_argv(argv, [e.name for e in queue],
                                                                      os.path.join(part, "out"), part)
        env = dict(child_env, CUDA_VISIBLE_DEVICES=str(visible[i].id))
        log_file = open(os.path.join(part, "console.log"), "w", encoding="utf-8")
        print(f"device {visible[i].id}: {', '.join(e.name for e in queue)}", flush=True)
        children.append((subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_file, part))
    codes = []
    for proc, log_file, _ in children:
        codes.append(proc.wait())
        log_file.close()
    rows, calls = [], []
    for _, _, part in children:
        summary_path = os.path.join(part, "out", "summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            rows += summary["rows"]
            calls.append(summary["meta"])
        with open(os.path.join(part, "console.log"), encoding="utf-8") as f:
            print(f.read(), end="", flush=True)
    order = {e.name: k for k, e in enumerate(experiments)}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    missing = [e.name for e in experiments if e.name not in {r["name"] for r in rows}]
    rows += [{"name": name, "status": "error", "error": "child process wrote no row"} for name in missing]
    info = dict(meta(args), date=started, children=calls, exit_codes=codes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1)
    with tarfile.open(os.path.join(args.out, "runs.tar.gz"), "w:gz") as tar:
        for _, _, part in children:
            for row in rows:
                _add_run_files(tar, os.path.join(part, row["name"]), row["name"])
                if args.per_run_files:
                    _copy_results(args.out, os.path.join(part, row["name"]), row["name"])
            tar.add(os.path.join(part, "console.log"), arcname=f"{os.path.basename(part)}.console.log")
    print_table([r for r in rows if "model" in r])
    return 0 if all(c == 0 for c in codes) and not missing else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    experiments = select_experiments(all_experiments(), args.only)
    if args.list:
        print("\n".join(e.name for e in (all_experiments() if not args.only else experiments)))
        return 0
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.devices > 1:
        return run_on_devices(args, argv, experiments, args.work_dir or tempfile.mkdtemp(prefix="blossom_reproduce_"))
    t0 = time.time()
    deadline = None if args.time_budget_s is None else t0 + args.time_budget_s
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="blossom_reproduce_")
    info = meta(args)
    print("meta", json.dumps(info), flush=True)
    rows: list[dict] = []
    for exp in experiments:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < args.min_run_s:
            rows.append({"name": exp.name, "model": exp.model, "data": exp.data, "max_len": exp.max_len,
                         "seed": exp.seed, "status": "not_started", "stop_reason": "time_budget"})
            continue
        run_dir = os.path.join(work_dir, exp.name)
        data_root = os.path.abspath(args.data_root)
        argv_run = train_argv(exp, run_dir, data_root, args)
        print(f"run {exp.name}: blossom-train {shlex.join(argv_run)}", flush=True)
        try:
            if DATA_FILES[exp.data] and not os.path.isfile(os.path.join(data_root, DATA_FILES[exp.data])):
                raise FileNotFoundError(f"{os.path.join(data_root, DATA_FILES[exp.data])} not found")
            row = run_experiment(exp, argv_run, run_dir, deadline, args.verbose)
        except Exception as error:  # noqa: BLE001 - record and go on with the next run
            log.exception("run %s failed", exp.name)
            row = {"name": exp.name, "model": exp.model, "data": exp.data, "max_len": exp.max_len,
                   "seed": exp.seed, "status": "error",
                   "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        rows.append(row)
        print("row", json.dumps({k: row.get(k) for k in ("name", "status", "stop_reason", "epochs_run",
                                                         "best_epoch", "test_uni100", "test_full",
                                                         "median_epoch_s", "wall_s")}), flush=True)
        write_outputs(args.out, info, rows, work_dir, args.per_run_files)
    info["total_wall_s"] = round(time.time() - t0, 2)
    write_outputs(args.out, info, rows, work_dir, args.per_run_files)
    print_table(rows)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
