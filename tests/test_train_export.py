"""A blossom-train run directory feeds blossom-export and the served model ranks like the trained one."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import serving
from blossom_jax.models import SequentialRecommender
from conftest import jitted_apply
from train.checkpoint import load_run
from train.config import TrainConfig
from train.export import main as export_main
from train.loop import fit


@pytest.mark.slow
def test_run_directory_exports_and_serves(tmp_path, capsys):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "export")
    cfg = TrainConfig(hidden_size=32, inner_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_len=20,
                      attention_impl="xla", batch_size=64, synthetic_users=60, synthetic_items=100, epochs=1,
                      progress=False, tensorboard=False, popularity_baseline=False)
    results = fit(cfg, run_dir)
    capsys.readouterr()
    assert export_main(["--checkpoint", run_dir, "--out", out, "--top-k", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["num_items"] == 100

    recommender = serving.load(out)
    assert recommender.manifest["extra"]["best_valid"] == results["valid"]
    run = load_run(run_dir)
    seq = np.array([[3, 7, 9] + [0] * 17, [5] * 20], np.int32)
    lengths = np.array([3, 20], np.int32)
    ids, _ = recommender.recommend(seq, lengths)
    logits = np.array(jitted_apply(SequentialRecommender(run.model_config), "score")(
        {"params": run.params}, jnp.asarray(seq), jnp.asarray(lengths)))
    logits[:, 0] = -np.inf
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=1, kind="stable")[:, :5])
    assert recommender.decode_items(ids[0]) == [run.item_map.id_to_raw[i] for i in ids[0]]
