"""The CLI on real datasets from ../shared/data (read by path, never copied): trains, early-stops, writes
results.json, and blossom-eval re-evaluates the run under the other protocol."""

from __future__ import annotations

import json
import os

import pytest

from conftest import shared_path
from train.cli import eval_main, train_main

# Two epochs over ~100k interactions: more running than compiling, faster with XLA's optimisations (~1.5x).
pytestmark = pytest.mark.usefixtures("xla_optimizations")

SMALL = ["--hidden-size", "32", "--inner-size", "64", "--num-layers", "1", "--num-heads", "2",
         "--num-kv-heads", "1", "--max-len", "20", "--batch-size", "1024", "--attention-impl", "xla",
         "--no-progress", "--no-tensorboard"]


# One dataset (the readers of the others are tested in tests/test_data.py); both protocols: uni100 while training,
# full ranking when blossom-eval re-evaluates the run.
@pytest.mark.slow
def test_cli_trains_early_stops_and_evaluates_real_data(tmp_path, capsys):
    protocol, other = "uni100", "full"
    data = str(shared_path("data/ml-100k/ml-100k_seq.txt"))
    run_dir = str(tmp_path / "run")
    # patience 1 with lr 1e-12 (Adam steps below float32 resolution: the ranking never changes): early stopping after epoch 2.
    argv = SMALL + ["--data", data, "--out", run_dir, "--eval-protocol", protocol, "--epochs", "6",
                    "--lr", "1e-12", "--set", "patience=1"]
    assert train_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(os.path.join(run_dir, "results.json")) as handle:
        results = json.load(handle)
    assert results["protocol"] == protocol and printed["test"] == results["test"]
    assert results["stop_reason"] == "early_stopping" and results["best_epoch"] == 1
    assert results["epochs"] == 2
    assert 0 < results["test"]["ndcg@10"] < 1 and 0 < results["valid"]["recall@10"] <= 1
    assert eval_main(["--checkpoint", run_dir, "--eval-protocol", other, "--split", "test"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["protocol"] == other and 0 < again["test"]["recall@20"] <= 1
