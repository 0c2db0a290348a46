"""The issue 7/8 benchmark scripts run end to end on CPU at tiny sizes (benchmarks/reproduce.py,
long_sequences.py, epoch_time.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_seq_file(path: pathlib.Path, users: int = 60, items: int = 30, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    lines = [" ".join([str(u + 1)] + [str(i) for i in rng.integers(1, items + 1, size=rng.integers(4, 40))])
             for u in range(users)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reproduce_experiment_names_and_flags():
    repro = _load("reproduce")
    names = [e.name for e in repro.all_experiments()]
    assert "ml1m-n200-blossom-s2020" in names and "beauty-n50-dense-s2022" in names
    assert len(names) == len(set(names)) == 20
    chosen = repro.select_experiments(repro.all_experiments(), "ml1m-n200-*-s2020,beauty-n50-dense-s2021")
    assert [e.name for e in chosen] == ["ml1m-n200-blossom-s2020", "ml1m-n200-dense-s2020",
                                        "beauty-n50-dense-s2021"]
    assert all(e.data != "bundled" for e in repro.select_experiments(repro.all_experiments(), None))
    with pytest.raises(ValueError, match="no experiment"):
        repro.select_experiments(repro.all_experiments(), "ml2m-*")
    args = repro.parse_args(["--max-epochs", "3", "--dense-attention-dropout", "0", "--set", "patience=2"])
    argv = repro.train_argv(chosen[1], "/tmp/x", "/data", args)
    from train import cli

    cfg = cli.resolve_config(cli._train_parser().parse_args(argv))
    assert (cfg.data, cfg.max_len, cfg.attention, cfg.epochs, cfg.seed) == ("/data/ml-1m_full.txt", 200, "dense", 3,
                                                                           2020)
    assert (cfg.compute_dtype, cfg.eval_protocol, cfg.attention_dropout, cfg.patience) == (
        "bfloat16", "uni100", 0.0, 2)


def test_reproduce_runs_and_respects_the_budget(tmp_path):
    repro = _load("reproduce")
    out = tmp_path / "out"
    common = ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--max-epochs", "1",
              "--set", "synthetic_users=80", "--per-run-files"]
    assert repro.main(["--only", "bundled-n20-dense-s2020", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary["rows"][0]
    assert row["status"] == "ok" and row["epochs_run"] == 1 and row["best_epoch"] == 1
    assert set(row["test_uni100"]) == set(row["test_full"]) == {"ndcg@10", "recall@10", "mrr@10"}
    assert len(row["epoch_s"]) == 1 and row["wall_s"] > 0 and row["command"].startswith("blossom-train ")
    assert (out / "runs.tar.gz").is_file() and (out / "bundled-n20-dense-s2020" / "results.json").is_file()
    assert summary["meta"]["jax"] and summary["meta"]["device"]
    out2 = tmp_path / "out2"
    assert repro.main(["--only", "bundled-*", "--out", str(out2), "--time-budget-s", "0"]) == 0
    rows = json.loads((out2 / "summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["not_started", "not_started"]


def test_long_sequences_parsing_and_batches():
    long = _load("long_sequences")
    assert long.parse_sizes("ml1m:1024:128,synth:8192:16") == [("ml1m", 1024, 128), ("synth", 8192, 16)]
    assert long.parse_models("blossom,dense:xla") == [("blossom", "auto"), ("dense", "xla")]
    for bad in ("ml1m:10", "foo:1:2", "synth:a:2"):
        with pytest.raises(ValueError):
            long.parse_sizes(bad)
    with pytest.raises(ValueError):
        long.parse_models("sparse")
    b = long.synthetic_batches("all-positions", 16, 2, 3, 50, 0)
    assert b["seq"].shape == b["target"].shape == (3, 2, 16) and b["len"].tolist() == [[16, 16]] * 3
    np.testing.assert_array_equal(b["target"][:, :, :-1], b["seq"][:, :, 1:])
    assert long.synthetic_batches("prefix", 16, 2, 3, 50, 0)["target"].shape == (3, 2)
    assert long.is_oom("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")


def test_long_sequences_end_to_end(tmp_path):
    long = _load("long_sequences")
    data = _write_seq_file(tmp_path / "seq.txt")
    out = tmp_path / "long.json"
    assert long.main(["--sizes", "synth:40:2,ml1m:32:4", "--models", "blossom,dense", "--num-items", "30",
                      "--steps", "1", "--warmup", "1", "--data", str(data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["jax"] and result["meta"]["device"]
    assert [(r["data"], r["model"], r["status"]) for r in result["rows"]] == [
        ("synth", "blossom", "ok"), ("synth", "dense", "ok"), ("ml1m", "blossom", "ok"), ("ml1m", "dense", "ok")]
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["loss_finite"]
    assert result["rows"][0]["real_token_fraction"] == 1.0 and result["rows"][2]["real_token_fraction"] < 1.0


def test_epoch_time_end_to_end(tmp_path):
    epoch = _load("epoch_time")
    data = _write_seq_file(tmp_path / "seq.txt")
    out = tmp_path / "epoch.json"
    assert epoch.main(["--data", str(data), "--max-len", "16", "--batch-size", "64", "--steps", "2",
                       "--warmup", "1", "--dtypes", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pipeline"]["batches"] >= 1 and result["meta"]["usable_cpus"] >= 1
    step = result["steps"][0]
    assert len(step["step_s"]) == 2 and step["validation_pass_s"] > 0
    extra = step["extrapolated"]
    assert extra["label"].startswith("EXTRAPOLATED")
    assert extra["train_epoch_serial_s"] >= extra["train_epoch_overlapped_s"] > 0
