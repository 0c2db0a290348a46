"""The issue 7/8 benchmark scripts run end to end on CPU at tiny sizes (benchmarks/reproduce.py with one and
two devices, summarize_reproduce.py, long_sequences.py, epoch_time.py, train_step.py --profile)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, host_devices_xla_flags


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
    assert len(names) == len(set(names)) == 28
    chosen = repro.select_experiments(repro.all_experiments(), "ml1m-n200-*-s2020,beauty-n50-dense-s2021")
    assert [e.name for e in chosen] == ["ml1m-n200-blossom-s2020", "ml1m-n200-dense-s2020",
                                        "ml1m-n200-blossom-allpos-s2020", "ml1m-n200-dense-allpos-s2020",
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
    assert [r["status"] for r in rows] == ["not_started"] * 4


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


@pytest.mark.slow
def test_long_sequences_end_to_end(tmp_path):
    long = _load("long_sequences")
    data = _write_seq_file(tmp_path / "seq.txt")
    out = tmp_path / "long.json"
    # One size (real sequences, padded) for both models; the synthetic batches are checked in
    # test_long_sequences_parsing_and_batches. Each (size, model) pair compiles a training step.
    assert long.main(["--sizes", "ml1m:32:4", "--models", "blossom,dense", "--num-items", "30",
                      "--steps", "1", "--warmup", "1", "--data", str(data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["jax"] and result["meta"]["device"]
    assert [(r["data"], r["model"], r["status"]) for r in result["rows"]] == [("ml1m", "blossom", "ok"),
                                                                               ("ml1m", "dense", "ok")]
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["loss_finite"]
        assert 0 < r["real_token_fraction"] < 1.0


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


def test_reproduce_objectives_and_device_queues():
    repro = _load("reproduce")
    by_name = {e.name: e for e in repro.all_experiments()}
    allpos = by_name["ml1m-n200-dense-allpos-s2021"]
    assert allpos.objective == "all-positions" and by_name["ml1m-n200-dense-s2021"].objective == "prefix"
    argv = repro.train_argv(allpos, "/tmp/x", "/data", repro.parse_args([]))
    from train import cli

    cfg = cli.resolve_config(cli._train_parser().parse_args(argv))
    assert (cfg.objective, cfg.batch_size, cfg.epochs) == ("all-positions", 256, 200)
    prefix_cfg = cli.resolve_config(cli._train_parser().parse_args(
        repro.train_argv(by_name["ml1m-n200-dense-s2021"], "/tmp/x", "/data", repro.parse_args([]))))
    assert (prefix_cfg.objective, prefix_cfg.batch_size, prefix_cfg.epochs) == ("prefix", 2048, 12)
    chosen = repro.select_experiments(repro.all_experiments(), "ml1m-n200-*-s2021,beauty-n50-*-s2021")
    queues = repro.assign_devices(chosen, 3)
    assert sorted(e.name for q in queues for e in q) == sorted(e.name for e in chosen)
    loads = [sum(e.expected_minutes for e in q) for q in queues]
    assert max(loads) - min(loads) <= max(e.expected_minutes for e in chosen)
    assert len(repro.assign_devices(chosen[:2], 4)) == 2  # no empty queues
    child = repro.child_argv(["--devices", "2", "--only=x", "--out", "o", "--max-epochs", "3"], ["a", "b"], "O", "W")
    assert child == ["--max-epochs", "3", "--only", "a,b", "--out", "O", "--work-dir", "W"]


@pytest.mark.slow
def test_reproduce_on_two_devices_merges_children(tmp_path):
    """--devices 2 on a CPU with two host devices: two child processes, one merged summary and tarball."""
    import os
    import subprocess
    import tarfile

    out = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS=host_devices_xla_flags(2), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "reproduce.py"), "--devices", "2",
           "--only", "bundled-n20-blossom-s2020,bundled-n20-dense-allpos-s2020", "--max-epochs", "1",
           "--set", "synthetic_users=60", "--per-run-files", "--out", str(out),
           "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["name"], r["status"], r["objective"]) for r in summary["rows"]] == [
        ("bundled-n20-blossom-s2020", "ok", "prefix"), ("bundled-n20-dense-allpos-s2020", "ok", "all-positions")]
    assert summary["meta"]["exit_codes"] == [0, 0] and len(summary["meta"]["children"]) == 2
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "bundled-n20-dense-allpos-s2020/results.json" in names and "part1.console.log" in names
    assert (out / "bundled-n20-blossom-s2020" / "results.json").is_file()


def test_summarize_reproduce_merges_seeds(tmp_path):
    summarize = _load("summarize_reproduce")

    def row(seed, ndcg, model="blossom", objective="prefix"):
        metrics = {"ndcg@10": ndcg, "recall@10": 0.8, "mrr@10": 0.5}
        return {"name": f"ml1m-n200-{model}-s{seed}", "status": "ok", "data": "ml1m", "max_len": 200,
                "model": model, "seed": seed, "objective": objective, "test_uni100": metrics,
                "test_full": metrics, "epochs_run": 12, "best_epoch": 9, "stop_reason": "epochs",
                "median_epoch_s": 10.0}

    first = tmp_path / "a.json"
    first.write_text(json.dumps({"meta": {"device": "NVIDIA H100 80GB HBM3"},
                                 "rows": [row(2020, 0.60), {"name": "x", "status": "error"}]}))
    second = tmp_path / "b.json"
    second.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "children": [{"device": "NVIDIA H200"}]},
                                  "rows": [row(2021, 0.62), row(2021, 0.70, model="dense")]}))
    out = tmp_path / "agg.json"
    assert summarize.main([str(first), str(second), "--json", str(out)]) == 0
    records = {r["model"]: r for r in json.loads(out.read_text())}
    assert records["blossom"]["seeds"] == [2020, 2021]
    assert abs(records["blossom"]["uni100"]["ndcg@10"] - 0.61) < 1e-9
    assert abs(records["blossom"]["uni100_std"]["ndcg@10"] - np.std([0.60, 0.62], ddof=1)) < 1e-9
    assert records["dense"]["uni100_std"]["ndcg@10"] is None
    assert set(records["blossom"]["epoch_s"]) == {"H100", "H200"}
    text, _ = summarize.table(summarize.load_rows([str(first), str(second)]))
    assert "0.6100±0.0141" in text and "12 (capped, best 9)" in text


@pytest.mark.slow
def test_train_step_profile_attributes_device_time(tmp_path, monkeypatch):
    """--profile on CPU: the traced ops are attributed to model components through their name stacks."""
    monkeypatch.setenv("XLA_FLAGS", "")  # --profile appends to it; restored after the test
    step = _load("train_step")
    out = tmp_path / "ts.json"
    step.main(["--shapes", "20:4", "--variants", "blossom:auto", "--dtypes", "float32", "--iters", "1",
               "--warmup", "1", "--profile", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["step_ms"] > 0 and "error" not in row
    profile = row["profile"]
    components = {k.split("/")[0] for k in profile["by_component_ms"]}
    assert {"attention_core", "layer_rest", "ce_head", "embeddings"} <= components
    assert profile["device_ms_per_step"] >= sum(v for v in profile["by_component_ms"].values()) - 1e-3
    # Both positive only: span <= wall holds on a GPU, but the CPU runtime's thunk events have idle gaps inside a
    # step as wide as those between steps, so the split into per-step spans can straddle two steps here.
    assert profile["wall_ms_per_step"] > 0 and profile["span_ms_per_step"] > 0
    assert step.component_of("jit(step)/transpose(jvp(M))/M.encode/layer_0/blossom_attention/x/pallas_call") \
        == "attention_kernels"
    assert step.component_of(None) == "unattributed"


def test_train_step_full_last_layer_variant_and_no_breakdown(tmp_path):
    """``attention:impl:full`` turns ModelConfig.last_layer_rows off; --no-breakdown times the step only."""
    step = _load("train_step")
    out = tmp_path / "ts.json"
    step.main(["--shapes", "20:4", "--variants", "blossom:xla", "dense:xla:full", "--dtypes", "float32",
               "--iters", "1", "--warmup", "1", "--no-breakdown", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["last_layer"] for r in rows] == ["rows", "full"]
    for row in rows:
        assert "error" not in row and row["step_ms"] > 0 and "encoder_fwdbwd_ms" not in row


def test_dropout_rng_benchmark(tmp_path):
    """Every (PRNG impl, draw) pair runs and drops close to the 20 % it is asked to."""
    bench = _load("dropout_rng")
    out = tmp_path / "dropout.json"
    bench.main(["--shape", "16,32,64", "--warmup", "1", "--iters", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(bench.IMPLS) * len(bench.DRAWS)
    for row in rows:
        assert row["ms"] > 0 and abs(row["kept_fraction"] - 0.8) < 0.02, row


def test_kernel_benchmark_helpers():
    """--set overrides (attention.py, kernels_fused.py), the LTIS tile sweep's overrides and the layer profile's
    kernel grouping."""
    overrides = _load("overrides")
    from pallas_kernels import ltis_gpu, stis_gpu

    saved = (ltis_gpu.ATTN_NUM_WARPS, stis_gpu.NUM_WARPS)
    try:
        assert overrides.apply("ltis_gpu.ATTN_NUM_WARPS=2, stis_gpu.NUM_WARPS=1") == {
            "ltis_gpu.ATTN_NUM_WARPS": 2, "stis_gpu.NUM_WARPS": 1}
        assert (ltis_gpu.ATTN_NUM_WARPS, stis_gpu.NUM_WARPS) == (2, 1)
    finally:
        ltis_gpu.ATTN_NUM_WARPS, stis_gpu.NUM_WARPS = saved
    assert overrides.apply(None) == {} and overrides.apply("") == {}
    with overrides.applied("ltis_gpu.ATTN_NUM_WARPS=4") as applied:
        assert applied == {"ltis_gpu.ATTN_NUM_WARPS": 4} and ltis_gpu.ATTN_NUM_WARPS == 4
    assert ltis_gpu.ATTN_NUM_WARPS == saved[0]
    with pytest.raises(RuntimeError), overrides.applied("stis_gpu.NUM_WARPS=8"):
        raise RuntimeError("restored on errors too")
    assert stis_gpu.NUM_WARPS == saved[1]
    unroll = stis_gpu.UNROLL
    with overrides.applied(f"stis_gpu.UNROLL={int(not unroll)}") as applied:
        assert applied == {"stis_gpu.UNROLL": (not unroll)} and stis_gpu.UNROLL is (not unroll)
    assert stis_gpu.UNROLL is unroll
    for bad in ("ltis_gpu.NOPE=1", "ltis_gpu._LOG2E=1", "ATTN_ROWS=2", "nomodule.X=1", "ltis_gpu.ATTN_ROWS",
                "stis_gpu.UNROLL=2"):
        with pytest.raises((ValueError, ModuleNotFoundError)):
            overrides.apply(bad)
    kernels_ltis = _load("kernels_ltis")
    assert kernels_ltis.parse_overrides("ATTN_ROWS=32,DKV_NUM_WARPS=2") == {"ATTN_ROWS": 32, "DKV_NUM_WARPS": 2}
    with pytest.raises(ValueError, match="not an int tile constant"):
        kernels_ltis.parse_overrides("attn_rows=3")
    attention = _load("attention")
    stack = "jit(loss)/transpose(jvp(BlossomAttention))/ltis_attention_dq/pallas_call"
    assert attention.kernel_group("pallas_call.3", stack) == "ltis_attention_dq"
    assert attention.kernel_group("sort.1", "jit(loss)/transpose(jvp(B))/sort") == "xla_sort"
    assert attention.kernel_group("fusion.2", "jit(loss)/transpose(jvp(B))/mul") == "xla_bwd"
    assert attention.kernel_group("fusion.3", "jit(loss)/jvp(B)/mul") == "xla_fwd"


def test_attention_benchmark_modes(tmp_path):
    """attention.py on the CPU: per-call latency and back-to-back throughput, compiled with command buffers as by
    default and off (an XLA GPU option the CPU compiler accepts and ignores), in one process."""
    attention = _load("attention")
    out = tmp_path / "attention.json"
    attention.main(["--lengths", "32", "--tokens", "64", "--impls", "xla", "--iters", "2", "--warmup", "1",
                    "--skip-check", "--command-buffers", "default", "off", "--pipelined", "--out", str(out)])
    [row] = json.loads(out.read_text())["timings"]
    assert row["impl"] == "xla" and row["N"] == 32 and row["B"] == 2 and "error" not in row
    for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_pipelined_ms", "fwd_ms_cb_off", "fwdbwd_ms_cb_off",
                "fwdbwd_pipelined_ms_cb_off", "fwdbwd_dispatch_ms", "fwdbwd_dispatch_ms_cb_off"):
        assert row[key] > 0, key
    for suffix in ("", "_cb_off"):  # the dispatch is part of the throughput's time
        assert row[f"fwdbwd_dispatch_ms{suffix}"] <= row[f"fwdbwd_pipelined_ms{suffix}"]


def test_call_spans_split_synchronised_calls():
    """profiling.call_spans_ns: events of calls separated by host syncs, split at the widest gaps."""
    profiling = _load("profiling")
    events = [("a", 0, 10, None), ("b", 12, 8, None),       # call 1: 0 .. 20
              ("c", 100, 5, None), ("d", 104, 26, None),    # call 2: 100 .. 130 (overlapping events)
              ("e", 200, 5, None)]                          # call 3: 200 .. 205
    assert profiling.call_spans_ns(events[::-1], 3) == [20, 30, 5]
    assert profiling.call_spans_ns(events, 1) == [205]
    assert profiling.call_spans_ns([], 3) == []


def test_attention_benchmark_variants_and_profile(tmp_path, monkeypatch):
    """attention.py --variants times (and checks) each blossom impl under each override set in one process and
    restores the constants; --profile reports each call's device span and host wall time; --keep-trace keeps
    the raw traces."""
    monkeypatch.setenv("XLA_FLAGS", "")  # --profile appends to it; restored after the test
    attention = _load("attention")
    from pallas_kernels import ltis_gpu

    chunk = ltis_gpu.SEL_CHUNK
    out, traces = tmp_path / "attention.json", tmp_path / "traces"
    attention.main(["--lengths", "32", "--tokens", "64", "--impls", "dense-xla", "xla", "--iters", "1",
                    "--warmup", "1", "--check-lengths", "17", "--variants", "default", "ltis_gpu.SEL_CHUNK=16",
                    "--profile", "--keep-trace", str(traces), "--out", str(out)])
    result = json.loads(out.read_text())
    assert ltis_gpu.SEL_CHUNK == chunk
    assert [(r["impl"], r["variant"]) for r in result["timings"]] == [
        ("dense-xla", "default"), ("xla", "default"), ("xla", "ltis_gpu.SEL_CHUNK=16")]
    for row in result["timings"]:
        profile = row["fwdbwd_profile"]
        # span <= wall is a GPU property (see test_train_step_profile_attributes_device_time for why not here)
        assert profile["wall_ms"] > 0 and profile["span_ms"] > 0 and profile["device_ms"] > 0, profile
        assert profile["top_ops_ms"] and "error" not in row
    assert len(list(traces.glob("*/**/*.xplane.pb"))) == 3
    with pytest.raises(ValueError, match="module.NAME=int"):
        attention.main(["--variants", "default", "nonsense", "--impls", "xla"])


def test_dispatch_floor_smoke(tmp_path):
    """dispatch_floor.py on the CPU: latency, throughput and their difference per chain length."""
    floor = _load("dispatch_floor")
    out = tmp_path / "floor.json"
    rows = floor.main(["--kernels", "1", "3", "--size", "32", "--iters", "3", "--out", str(out)])
    assert [row["kernels"] for row in rows] == [1, 3]
    assert all(row["latency_ms"] > 0 and row["throughput_ms"] > 0 for row in rows)
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(ValueError, match="--kernels"):
        floor.main(["--kernels", "0"])


def test_hlo_dump_writes_the_optimized_gradient(tmp_path):
    """hlo_dump.py compiles the layer's gradient at a small shape and writes its optimized HLO; bad shapes fail."""
    hlo = _load("hlo_dump")
    out = tmp_path / "hlo.txt"
    hlo.main(["--impl", "dense-xla", "--length", "40", "--tokens", "80", "--out", str(out)])
    text = out.read_text()
    assert "ENTRY" in text and "bf16[2,40,128]" in text
    with pytest.raises(ValueError, match="length"):
        hlo.optimized_hlo("dense-xla", 100, 50)


def test_triton_sass_lowers_every_kernel_and_reads_sass(tmp_path):
    """triton_sass.py captures one Triton module per pallas_call of the layer's fwd+bwd (lowered for CUDA on the
    CPU); its SASS reader counts opcodes and predicated backward branches; the compile step runs where Triton is
    installed."""
    sass = _load("triton_sass")
    kernels = sass.lower_layer_kernels(300, tokens=600)
    names = [name for name, _ in kernels]
    assert names == ["ltis_select", "ltis_attention_fwd", "stis_fwd", "stis_bwd_dq", "stis_bwd_dkv",
                     "ltis_attention_dq", "ltis_attention_dkv"]
    assert all("tt.func" in text for _, text in kernels)
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   BRA 0x30;
        /*0040*/                   EXIT ;
    """
    report = sass.sass_report(listing)
    assert report["instructions"] == 5 and report["opcodes"]["BRA"] == 2 and report["loop_bodies"] == [2]
    with pytest.raises(ValueError, match="warp count"):
        sass._launch("unknown_kernel")
    # (warps, pipeline depth) per kernel: the module constants, settable with --set
    from pallas_kernels import gated_gpu, gpu_common, ltis_gpu

    overrides = _load("overrides")
    assert sass._launch("gated_attention_dkv") == (gated_gpu.DKV_NUM_WARPS, gated_gpu.DKV_NUM_STAGES)
    assert sass._launch("ltis_attention_fwd") == (ltis_gpu.ATTN_NUM_WARPS, gpu_common.NUM_STAGES)
    with overrides.applied("ltis_gpu.DKV_NUM_STAGES=4,ltis_gpu.SEL_NUM_STAGES=1"):
        assert (sass._launch("ltis_attention_dkv")[1], sass._launch("ltis_select")[1]) == (4, 1)
    assert sass._launch("ltis_attention_dkv")[1] != 4
    if importlib.util.find_spec("triton") is None:
        return
    sass.main(["--length", "300", "--tokens", "600", "--kernels", "stis_fwd", "--out", str(tmp_path)])
    assert list(tmp_path.glob("*_stis_fwd.sass"))
