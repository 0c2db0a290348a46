"""Checkpoints (orbax) and the files a run leaves for evaluation and serving export.

Layout of a run directory ``DIR``:

* ``DIR/checkpoints/<step>/`` (orbax ``CheckpointManager``, the latest one kept) with three items:
  ``state`` (params, optimiser state, step, base RNG key: ``train.steps.TrainState``), ``best`` (the
  parameters of the best validation result so far) and ``meta`` (JSON: epoch and batch to continue from,
  best metric and epoch, evaluations without improvement, best validation metrics, stop reason).
  Because every checkpoint carries the best parameters too, keeping the latest keeps both.
* ``DIR/config.yaml`` the resolved ``TrainConfig``; ``DIR/model_config.json`` ``ModelConfig.to_dict()``;
  ``DIR/item_map.json`` the item-id mapping (``train.data.ItemMap``); ``DIR/data_stats.json``.
* ``DIR/metrics.jsonl``, ``DIR/tb/`` (TensorBoard), ``DIR/results.json``.

``load_run(DIR)`` returns what serving needs: the ModelConfig, the best parameters and the item map.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp

from blossom_jax.config import ModelConfig
from train.config import TrainConfig
from train.data import ItemMap

CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
ITEM_MAP_FILE = "item_map.json"
CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores (state, best params, meta) under ``DIR/checkpoints``; keeps the latest only."""

    def __init__(self, run_dir: str):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "best", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, best_params: Any, meta: dict[str, Any]) -> None:
        """Saves asynchronously; a later save or ``close`` waits for it."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best_params),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state: Any, abstract_params: Any, step: int | None = None
                ) -> tuple[Any, Any, dict[str, Any]]:
        """(state, best params, meta) of ``step`` (default latest), shaped/sharded like the targets."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), best=ocp.args.StandardRestore(abstract_params),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["best"], dict(out["meta"])

    def restore_best(self, abstract_params: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(best params, meta) of ``step`` (default latest) without touching the optimiser state."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            best=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
        return out["best"], dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def save_run_files(run_dir: str, cfg: TrainConfig, model_cfg: ModelConfig, item_map: ItemMap) -> None:
    """Writes config.yaml, model_config.json and item_map.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    write_json(os.path.join(run_dir, MODEL_CONFIG_FILE), model_cfg.to_dict())
    item_map.save(os.path.join(run_dir, ITEM_MAP_FILE))


def load_train_config(run_dir: str) -> TrainConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a blossom-train run directory (no {CONFIG_FILE})")
    with open(path, "r", encoding="utf-8") as f:
        return TrainConfig.from_yaml(f.read())


@dataclass
class LoadedRun:
    """What evaluation and serving need from a run directory."""

    train_config: TrainConfig
    model_config: ModelConfig
    item_map: ItemMap
    params: Any
    meta: dict[str, Any]


def load_run(run_dir: str) -> LoadedRun:
    """Loads the configs, item map and best parameters (replicated on the default devices) of a run."""
    from blossom_jax.models import SequentialRecommender
    from train.steps import DeviceMesh, init_params

    cfg = load_train_config(run_dir)
    model_cfg = ModelConfig.from_dict(read_json(os.path.join(run_dir, MODEL_CONFIG_FILE)))
    item_map = ItemMap.load(os.path.join(run_dir, ITEM_MAP_FILE))
    if item_map.num_items != model_cfg.num_items:
        raise ValueError(f"{run_dir}: item map has {item_map.num_items} items, model config "
                         f"{model_cfg.num_items}")
    mesh = DeviceMesh.create()
    model = SequentialRecommender(model_cfg)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), model_cfg.max_len))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=mesh.replicated),
                            shapes)
    ckpt = Checkpointer(run_dir)
    try:
        params, meta = ckpt.restore_best(abstract)
    finally:
        ckpt.close()
    return LoadedRun(cfg, model_cfg, item_map, params, meta)
