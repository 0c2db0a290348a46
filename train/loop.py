"""The training run: data -> model -> epochs of jitted steps -> validation, early stopping, checkpoints
-> test with the best parameters -> ``results.json``.

Epochs are numbered from 1 in logs and results (``best_epoch`` = the epoch after which the best validation
result was measured). One validation pass follows every epoch (and the last, partial one when
``max_steps`` stops a run mid-epoch); a checkpoint is written after every validation, so ``resume=True``
continues from the last one with the same data order, RNG stream and optimiser state and ends with the
same metrics as an uninterrupted run.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from blossom_jax.config import ModelConfig
from blossom_jax.models import SequentialRecommender
from train import checkpoint as ckpt_lib
from train.config import TrainConfig
from train.data import (BatchIterator, Examples, ItemMap, SplitData, encode, leave_one_out, prefetch,
                        prefix_examples, read_interactions, window_examples)
from train.evaluation import EvalSet, build_eval_set, eval_batches, evaluate, popularity_rank_fn
from train.objectives import select_loss
from train.steps import (DeviceMesh, abstract_state, make_eval_step, make_init, make_optimizer,
                         make_train_step, model_rank_fn)
from train.synthetic import SyntheticSpec, generate

log = logging.getLogger(__name__)

# Fields a resumed run may change; every other field must equal the saved config.
RESUME_MUTABLE = frozenset({"epochs", "max_steps", "patience", "prefetch", "log_every", "progress",
                            "tensorboard", "eval_batch_size", "popularity_baseline", "attention_impl"})


class RunInterrupted(Exception):
    """Raised by ``fit`` when ``max_epochs_this_run`` stops a run before it finished (resume it later)."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def load_split(cfg: TrainConfig, item_map: ItemMap | None = None, data: str | None = None,
               fmt: str | None = None) -> SplitData:
    """Reads ``data`` (default cfg.data; None = bundled synthetic) and splits it leave-one-out."""
    data = cfg.data if data is None else data
    if data is None:
        raw = generate(SyntheticSpec(num_users=cfg.synthetic_users, num_items=cfg.synthetic_items,
                                     seed=cfg.synthetic_seed))
    else:
        raw = read_interactions(data, fmt or cfg.format)
    return leave_one_out(encode(raw, item_map), cfg.short_users)


def train_examples(cfg: TrainConfig, split: SplitData) -> Examples:
    """The training examples of the configured objective (see train.data)."""
    if cfg.objective == "all-positions":
        return window_examples(split, cfg.max_len, include_target=cfg.bidirectional)
    return prefix_examples(split, include_target=cfg.bidirectional)


@dataclass(frozen=True)
class Program:
    """The model and its jitted functions for one (model, optimiser, objective, devices) combination."""

    model: SequentialRecommender
    tx: Any
    mesh: DeviceMesh
    target_kind: str
    init: Callable[[int], Any]
    train_step: Callable
    eval_step: Callable


@functools.lru_cache(maxsize=4)
def _program(model_cfg: ModelConfig, optim: tuple, objective: tuple, devices: tuple) -> Program:
    mesh = DeviceMesh.create(list(devices))
    model = SequentialRecommender(model_cfg)
    tx = make_optimizer(*optim)
    loss_fn, target_kind = select_loss(*objective)
    return Program(model, tx, mesh, target_kind, make_init(model, tx, model_cfg.max_len, mesh),
                   make_train_step(model, tx, loss_fn, mesh), make_eval_step(model, mesh))


def build_program(cfg: TrainConfig, model_cfg: ModelConfig, devices: list | None = None) -> Program:
    """Cached per configuration, so repeated runs in one process (sweeps, tests, resume) compile once."""
    optim = (cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip_norm)
    objective = (cfg.objective, cfg.loss, cfg.bidirectional, cfg.mask_ratio)
    return _program(model_cfg, optim, objective, tuple(devices if devices is not None else jax.devices()))


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------


class MetricsLogger:
    """Appends JSON lines to DIR/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

    def __init__(self, run_dir: str, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(f"{kind}/{key.replace('@', '_')}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands; saved as the checkpoint's ``meta``."""

    next_epoch: int = 0  # 0-based epoch to continue with
    next_batch: int = 0  # batch index within next_epoch to continue with
    best_metric: float = -math.inf
    best_epoch: int = 0  # 1-based; 0 = none yet
    bad_evals: int = 0
    best_valid: dict | None = None
    stop_reason: str | None = None
    baseline: dict | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["best_metric"] = None if math.isinf(self.best_metric) else self.best_metric
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Progress":
        d = dict(d)
        d["best_metric"] = -math.inf if d.get("best_metric") is None else d["best_metric"]
        return cls(**d)


def check_resume_config(saved: TrainConfig, cfg: TrainConfig) -> None:
    """Raises ValueError if ``cfg`` changes a field a resumed run must keep."""
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if k not in RESUME_MUTABLE and saved.to_dict()[k] != v)
    if changed:
        diffs = ", ".join(f"{k}: {saved.to_dict()[k]!r} -> {cfg.to_dict()[k]!r}" for k in changed)
        raise ValueError(f"--resume cannot change {diffs} (only {sorted(RESUME_MUTABLE)})")


def fit(cfg: TrainConfig, run_dir: str, *, resume: bool = False, max_epochs_this_run: int | None = None,
        devices: list | None = None, on_epoch_end: Callable[[int, dict], None] | None = None
        ) -> dict[str, Any]:
    """Trains, validates and tests; writes the run directory (see train.checkpoint) and returns results.

    ``resume`` continues from DIR's latest checkpoint (a fresh start if there is none yet).
    ``max_epochs_this_run`` ends this call with ``RunInterrupted`` after that many epochs (tests/debug).
    ``on_epoch_end(epoch, valid_metrics)`` is called after each validation (1-based epoch).
    """
    run_dir = os.path.abspath(run_dir)
    has_checkpoint = os.path.isdir(os.path.join(run_dir, ckpt_lib.CHECKPOINT_DIR))
    if has_checkpoint and not resume:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or use a new --out")
    item_map = None
    if resume and os.path.isfile(os.path.join(run_dir, ckpt_lib.CONFIG_FILE)):
        check_resume_config(ckpt_lib.load_train_config(run_dir), cfg)
        item_map = ItemMap.load(os.path.join(run_dir, ckpt_lib.ITEM_MAP_FILE))

    t_start = time.time()
    split = load_split(cfg, item_map)
    model_cfg = cfg.model_config(split.num_items)
    ckpt_lib.save_run_files(run_dir, cfg, model_cfg, split.data.item_map)
    if jax.process_index() == 0:
        ckpt_lib.write_json(os.path.join(run_dir, "data_stats.json"), split.stats)
    log.info("data: %s", split.stats)

    program = build_program(cfg, model_cfg, devices)
    mesh, train_step, eval_step = program.mesh, program.train_step, program.eval_step
    batches = BatchIterator(split.items, train_examples(cfg, split), cfg.batch_size, cfg.max_len,
                            program.target_kind, mesh.num_devices, shuffle=True, seed=cfg.seed)
    valid_set = build_eval_set(split, "valid", cfg.eval_protocol, cfg.seed, cfg.exclude_history)
    test_set = build_eval_set(split, "test", cfg.eval_protocol, cfg.seed, cfg.exclude_history)

    def run_eval(params: Any, eval_set: EvalSet) -> dict[str, float]:
        rank_fn = model_rank_fn(eval_step, params, mesh)
        return evaluate(rank_fn, eval_batches(split, eval_set, cfg.eval_batch_size, cfg.max_len,
                                              mesh.num_devices), cfg.ties)

    checkpointer = ckpt_lib.Checkpointer(run_dir)
    logger = MetricsLogger(run_dir, cfg.tensorboard)
    try:
        if resume and checkpointer.latest_step() is not None:
            target = abstract_state(program.model, program.tx, cfg.max_len, mesh)
            state, best_params, meta = checkpointer.restore(target, target.params)
            progress = Progress.from_json(meta)
            log.info("resumed from step %d (epoch %d, batch %d)", int(state.step), progress.next_epoch + 1,
                     progress.next_batch)
        else:
            state = program.init(cfg.seed)
            best_params = _copy(state.params)
            progress = Progress()
            if cfg.popularity_baseline:
                progress.baseline = {"popularity": {
                    s.name: evaluate(popularity_rank_fn(split), eval_batches(
                        split, s, cfg.eval_batch_size, cfg.max_len), cfg.ties)
                    for s in (valid_set, test_set)}}
                log.info("popularity baseline: valid %s", _brief(progress.baseline["popularity"]["valid"]))
        log.info("model: %s", model_cfg)
        log.info("%d training examples, %d batches of %d per epoch (%d rows on %d device(s))",
                 len(batches.examples), batches.num_batches, batches.per_batch, batches.batch,
                 mesh.num_devices)

        epochs_this_run = 0
        step = int(state.step)
        if progress.stop_reason in ("epochs", "max_steps"):  # a resumed run may have new limits
            progress.stop_reason = None
        while progress.stop_reason is None:
            if progress.next_epoch >= cfg.epochs:
                progress.stop_reason = "epochs"
                break
            if cfg.max_steps and step >= cfg.max_steps:
                progress.stop_reason = "max_steps"
                break
            if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
                raise RunInterrupted(f"stopped after {epochs_this_run} epoch(s) this run; continue with "
                                     f"--resume")
            epoch = progress.next_epoch
            state, step, next_batch, loss = _train_epoch(cfg, batches, train_step, mesh, state, epoch,
                                                         progress.next_batch, logger)
            valid = run_eval(state.params, valid_set)
            improved = valid[cfg.valid_metric] > progress.best_metric
            if improved:
                progress.best_metric, progress.best_epoch = valid[cfg.valid_metric], epoch + 1
                progress.best_valid, progress.bad_evals = valid, 0
                best_params = _copy(state.params)  # the train step donates (deletes) state's buffers
            else:
                progress.bad_evals += 1
            if next_batch >= batches.num_batches:
                progress.next_epoch, progress.next_batch = epoch + 1, 0
            else:  # max_steps stopped the epoch part way
                progress.next_batch = next_batch
            if progress.bad_evals >= cfg.patience:
                progress.stop_reason = "early_stopping"
            checkpointer.save(step, state, best_params, progress.to_json())
            logger.log("valid", step, {"epoch": epoch + 1, "train_loss": loss, **valid})
            log.info("epoch %d step %d: loss %.4f, valid %s%s", epoch + 1, step, loss, _brief(valid),
                     " (best)" if improved else "")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, valid)
            epochs_this_run += 1

        test = run_eval(best_params, test_set)
        logger.log("test", step, {"best_epoch": progress.best_epoch, **test})
        results = {
            "protocol": cfg.eval_protocol,
            "valid": progress.best_valid,
            "test": test,
            "best_epoch": progress.best_epoch,
            "stop_reason": progress.stop_reason,
            "steps": step,
            "epochs": progress.next_epoch + (1 if progress.next_batch else 0),
            "baseline": progress.baseline,
            "data": split.stats,
            "config": cfg.to_dict(),
            "model_config": model_cfg.to_dict(),
            "devices": [str(d) for d in mesh.mesh.devices.flat],
            "wall_time_s_this_run": round(time.time() - t_start, 2),
        }
        if jax.process_index() == 0:
            ckpt_lib.write_json(os.path.join(run_dir, "results.json"), results)
        log.info("test (best epoch %d): %s", progress.best_epoch, _brief(test))
        return results
    finally:
        logger.close()
        checkpointer.close()


def _train_epoch(cfg: TrainConfig, batches: BatchIterator, train_step: Callable, mesh: DeviceMesh,
                 state: Any, epoch: int, start_batch: int, logger: MetricsLogger
                 ) -> tuple[Any, int, int, float]:
    """Runs epoch ``epoch`` from batch ``start_batch`` on, stopping early at cfg.max_steps.

    Returns (state, global step, index of the next batch of this epoch, mean training loss of this call).
    """
    step = int(state.step)
    n_batches = batches.num_batches - start_batch
    if cfg.max_steps:
        n_batches = min(n_batches, max(0, cfg.max_steps - step))
    device_losses = []
    bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", disable=not cfg.progress or jax.process_index() > 0,
               leave=False, dynamic_ncols=True)
    window_start, window_seen = time.time(), 0
    stream = prefetch(itertools.islice(batches.epoch(epoch, start_batch), n_batches), cfg.prefetch,
                      lambda b: (mesh.put({k: v for k, v in b.items() if k != "user"}),
                                 int(b["weight"].sum())))
    try:
        for i, (batch, n_real) in enumerate(stream):
            state, out = train_step(state, batch)
            step += 1
            device_losses.append(out["loss"])
            window_seen += n_real
            if step % cfg.log_every == 0 or i == n_batches - 1:
                loss = float(out["loss"])
                rate = window_seen / max(time.time() - window_start, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
                logger.log("train", step, {"epoch": epoch + 1, "loss": loss,
                                           "grad_norm": float(out["grad_norm"]), "examples_per_s": rate})
                window_start, window_seen = time.time(), 0
            bar.update(1)
    finally:
        stream.close()
        bar.close()
    mean_loss = float(np.mean(jax.device_get(device_losses))) if device_losses else float("nan")
    return state, step, start_batch + n_batches, mean_loss


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.copy(), tree)


def _brief(metrics: dict[str, float]) -> str:
    keys = ("recall@10", "ndcg@10", "mrr@10")
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def evaluate_run(run_dir: str, data: str | None = None, fmt: str | None = None,
                 protocol: str | None = None, exclude_history: bool | None = None, ties: str | None = None,
                 splits: tuple[str, ...] = ("valid", "test")) -> dict[str, Any]:
    """Evaluates the best parameters of a run on its data (or ``data``, mapped with the run's item map)."""
    run = ckpt_lib.load_run(run_dir)
    cfg = run.train_config
    protocol = protocol or cfg.eval_protocol
    exclude_history = cfg.exclude_history if exclude_history is None else exclude_history
    split = load_split(cfg, run.item_map, data, fmt)
    program = build_program(cfg, run.model_config)
    mesh = program.mesh
    rank_fn = model_rank_fn(program.eval_step, run.params, mesh)
    out: dict[str, Any] = {"protocol": protocol, "checkpoint": os.path.abspath(run_dir),
                           "data": data or cfg.data or "bundled", "best_epoch": run.meta.get("best_epoch")}
    for name in splits:
        eval_set = build_eval_set(split, name, protocol, cfg.seed, exclude_history)
        out[name] = evaluate(rank_fn, eval_batches(split, eval_set, cfg.eval_batch_size,
                                                   run.model_config.max_len, mesh.num_devices),
                             ties or cfg.ties)
    return out
