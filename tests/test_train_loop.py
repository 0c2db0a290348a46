"""End-to-end training runs (train/loop.py) on the bundled data at small size, tiny model."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from train.checkpoint import load_run
from train.config import TrainConfig
from train.loop import check_resume_config, evaluate_run, fit

TINY = dict(hidden_size=32, inner_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_len=20,
            attention_impl="xla", batch_size=128, eval_batch_size=512, learning_rate=0.005,
            synthetic_users=300, synthetic_items=200, progress=False, dropout=0.1)


def test_fit_beats_popularity_and_leaves_a_complete_run(tmp_path):
    run_dir = str(tmp_path / "run")
    results = fit(TrainConfig(**TINY, epochs=4), run_dir)
    pop = results["baseline"]["popularity"]
    assert results["protocol"] == "full"
    assert results["test"]["ndcg@10"] > pop["test"]["ndcg@10"] + 0.1, (results["test"], pop["test"])
    assert results["valid"]["recall@10"] > pop["valid"]["recall@10"] + 0.1
    assert set(results["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20)} | {
        "num_examples"}
    assert 1 <= results["best_epoch"] <= 4 and results["stop_reason"] == "epochs"
    for name in ("results.json", "config.yaml", "model_config.json", "item_map.json", "metrics.jsonl",
                 "data_stats.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))
    with open(os.path.join(run_dir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk["test"] == results["test"] and on_disk["config"]["seed"] == 2020
    kinds = [json.loads(line)["type"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert kinds.count("valid") == 4 and kinds.count("test") == 1 and "train" in kinds

    run = load_run(run_dir)
    assert run.model_config.num_items == run.item_map.num_items == 200
    assert run.meta["best_epoch"] == results["best_epoch"]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(run.params))
    again = evaluate_run(run_dir)
    assert again["test"] == pytest.approx(results["test"], rel=1e-12)
    assert again["valid"] == pytest.approx(results["valid"], rel=1e-12)


def test_bidirectional_uni100_beats_popularity(tmp_path):
    cfg = TrainConfig(**{**TINY, "learning_rate": 0.01}, bidirectional=True, eval_protocol="uni100",
                      epochs=3, popularity_baseline=True, tensorboard=False)
    results = fit(cfg, str(tmp_path / "bert"))
    pop = results["baseline"]["popularity"]["test"]
    assert results["protocol"] == "uni100"
    assert results["test"]["ndcg@10"] > pop["ndcg@10"] + 0.1, (results["test"], pop)


def test_early_stopping_and_run_dir_guard(tmp_path):
    # a learning rate this small leaves every ranking unchanged: no improvement after epoch 1
    cfg = TrainConfig(**{**TINY, "synthetic_users": 80, "learning_rate": 1e-12}, epochs=10, patience=2,
                      popularity_baseline=False, tensorboard=False)
    run_dir = str(tmp_path / "es")
    results = fit(cfg, run_dir)
    assert results["stop_reason"] == "early_stopping"
    assert results["best_epoch"] == 1 and results["epochs"] == 3
    # the best parameters survived two more epochs of (buffer-donating) train steps
    assert evaluate_run(run_dir, splits=("test",))["test"] == pytest.approx(results["test"], rel=1e-12)
    with pytest.raises(ValueError, match="already holds a run"):
        fit(cfg, run_dir)


def test_resume_rejects_changed_fields():
    saved = TrainConfig(**TINY)
    check_resume_config(saved, saved.replace(epochs=7, max_steps=3, progress=True))
    with pytest.raises(ValueError, match="hidden_size: 32 -> 64"):
        check_resume_config(saved, saved.replace(hidden_size=64, num_heads=4))
