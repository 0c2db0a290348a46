"""blossom-train / blossom-eval (train/cli.py): config printing, errors, exact resume, evaluation."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from train.cli import eval_main, train_main
from train.config import BUNDLED_PRESET, TrainConfig, field_comments

TINY_FLAGS = ["--hidden-size", "32", "--inner-size", "64", "--num-layers", "1", "--num-heads", "2",
              "--num-kv-heads", "1", "--max-len", "20", "--batch-size", "128", "--lr", "0.005",
              "--attention-impl", "xla", "--no-progress", "--no-tensorboard",
              "--set", "synthetic_users=150", "--set", "synthetic_items=100", "--set", "popularity_baseline=false"]


def test_print_config_is_commented_yaml_that_round_trips(capsys):
    assert train_main(["--print-config"]) == 0
    text = capsys.readouterr().out
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    lines = text.splitlines()
    for name in fields:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
        assert lines[at - 1].startswith("# "), f"field {name} has no comment"
    assert set(field_comments()) == set(fields)
    cfg = TrainConfig.from_yaml(text)
    assert cfg.data is None and cfg.hidden_size == BUNDLED_PRESET["hidden_size"]  # bundled preset applied
    assert train_main(["--print-config", "--data", "x.txt"]) == 0
    cfg = TrainConfig.from_yaml(capsys.readouterr().out)
    assert cfg == TrainConfig(data=os.path.abspath("x.txt"))  # reference defaults, absolute data path


def test_config_precedence(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": "d.txt", "epochs": 7, "hidden_size": 64, "num_heads": 4}))
    assert train_main(["--print-config", "--config", str(path), "--epochs", "9", "--bidirectional"]) == 0
    cfg = TrainConfig.from_yaml(capsys.readouterr().out)
    assert (cfg.data, cfg.epochs, cfg.hidden_size, cfg.bidirectional) == ("d.txt", 9, 64, True)  # YAML as is
    assert cfg.batch_size == 2048  # a data file given: no bundled preset


@pytest.mark.parametrize("argv, message", [
    (["--print-config", "--set", "hidden_sise=3"], "unknown config key(s) ['hidden_sise']"),
    (["--print-config", "--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--print-config", "--set", "valid_metric=auc@10"], "valid_metric"),
    (["--print-config", "--bidirectional", "--loss", "bpr"], "supports only loss='ce'"),
])
def test_config_errors(argv, message, capsys):
    assert train_main(argv) == 2
    assert message in capsys.readouterr().err


def test_data_errors_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n2 x\n")
    assert train_main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: malformed line" in capsys.readouterr().err
    assert train_main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "data file not found" in capsys.readouterr().err


def _results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        r = json.load(f)
    return {k: r[k] for k in ("valid", "test", "best_epoch", "protocol", "steps", "epochs", "stop_reason")}


def test_resume_after_interruption_gives_identical_results(tmp_path, capsys):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    flags = TINY_FLAGS + ["--epochs", "3", "--eval-protocol", "uni100"]
    assert train_main(flags + ["--out", full]) == 0
    assert train_main(flags + ["--out", cut, "--max-epochs-this-run", "1"]) == 3
    assert not os.path.exists(os.path.join(cut, "results.json"))
    assert train_main(["--out", cut, "--resume", "--epochs", "3"]) == 0
    assert _results(cut) == _results(full)
    assert _results(full)["epochs"] == 3 and _results(full)["protocol"] == "uni100"
    assert train_main(["--out", cut, "--resume", "--hidden-size", "64", "--num-heads", "4"]) == 2
    assert "--resume cannot change" in capsys.readouterr().err

    capsys.readouterr()
    assert eval_main(["--checkpoint", full]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"] == pytest.approx(_results(full)["test"], rel=1e-12)
    assert eval_main(["--checkpoint", full, "--eval-protocol", "full", "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "full" and "valid" not in out and 0 < out["test"]["ndcg@10"] < 1
    assert eval_main(["--checkpoint", str(tmp_path / "nothing")]) == 2
