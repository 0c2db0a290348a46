"""Serving export: parity with the training model, validation, tamper detection, fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, ModelConfig, serving
from blossom_jax.export import export_model
from blossom_jax.models import SequentialRecommender
from conftest import jitted_apply

CONFIG = ModelConfig(num_items=60, max_len=24, hidden_size=32, inner_size=64, num_layers=1,
                     attn=AttentionConfig(num_heads=2, num_kv_heads=1), attention_impl="xla")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = SequentialRecommender(CONFIG)
    seq = jnp.ones((1, CONFIG.max_len), jnp.int32)
    params = model.init(jax.random.key(3), seq, jnp.array([CONFIG.max_len]))["params"]
    directory = tmp_path_factory.mktemp("export") / "artifact"
    export_model(CONFIG, params, directory, platforms=["cpu", "cuda", "tpu"], top_k=8,
                 item_mapping={f"raw{i}": i for i in range(1, 61)}, extra={"note": "test"})
    return model, params, directory


def _histories(rng, batch, seq_len, num_items):
    lengths = rng.integers(1, seq_len + 1, size=batch)
    lengths[0] = seq_len
    items = rng.integers(1, num_items + 1, size=(batch, seq_len))
    return np.where(np.arange(seq_len)[None] < lengths[:, None], items, 0).astype(np.int32), lengths.astype(np.int32)


def test_served_top_k_equals_model_top_k(exported):
    model, params, directory = exported
    recommender = serving.load(directory)
    assert recommender.platforms == ["cpu", "cuda", "tpu"]
    seq, lengths = _histories(np.random.default_rng(0), 5, CONFIG.max_len, CONFIG.num_items)
    ids, scores = recommender.recommend(seq, lengths)
    logits = np.array(jitted_apply(model, "score")({"params": params}, jnp.asarray(seq), jnp.asarray(lengths)))
    logits[:, 0] = -np.inf
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(logits, expected, 1), rtol=1e-5, atol=1e-6)
    assert ids.dtype == np.int32 and scores.dtype == np.float32 and not np.any(ids == 0)
    # k and exclude_history.
    few, _ = recommender.recommend(seq, lengths, k=3)
    np.testing.assert_array_equal(few, expected[:, :3])
    excluded, _ = recommender.recommend(seq, lengths, exclude_history=True)
    for row, length, recs in zip(seq, lengths, excluded):
        assert not set(recs.tolist()) & set(row[:length].tolist())


def test_longer_histories_keep_the_last_max_len_items(exported):
    _, _, directory = exported
    recommender = serving.load(directory)
    rng = np.random.default_rng(1)
    long_seq, long_len = _histories(rng, 3, 40, CONFIG.num_items)
    long_len[:] = [40, 30, 5]
    long_seq = np.where(np.arange(40)[None] < long_len[:, None], rng.integers(1, 61, (3, 40)), 0).astype(np.int32)
    truncated = np.zeros((3, CONFIG.max_len), np.int32)
    lengths = np.minimum(long_len, CONFIG.max_len)
    for b in range(3):
        tail = long_seq[b, max(0, long_len[b] - CONFIG.max_len): long_len[b]]
        truncated[b, : len(tail)] = tail
    np.testing.assert_array_equal(recommender.recommend(long_seq, long_len)[0],
                                  recommender.recommend(truncated, lengths)[0])
    short = truncated[:, :10]
    short_len = np.minimum(lengths, 10)
    short = np.where(np.arange(10)[None] < short_len[:, None], short, 0)
    assert recommender.recommend(short, short_len)[0].shape == (3, 8)


def test_input_validation(exported):
    recommender = serving.load(exported[2])
    seq, lengths = _histories(np.random.default_rng(2), 2, 10, CONFIG.num_items)
    with pytest.raises(ValueError, match="rank 2"):
        recommender.recommend(seq[0], lengths)
    with pytest.raises(ValueError, match="integers"):
        recommender.recommend(seq.astype(np.float32), lengths)
    with pytest.raises(ValueError, match=r"item ids must be in \[0, 60\]"):
        recommender.recommend(np.where(seq > 0, 61, 0), lengths)
    with pytest.raises(ValueError, match="item_seq_len must be in"):
        recommender.recommend(seq, np.array([0, 3]))
    with pytest.raises(ValueError, match="item_seq_len must have shape"):
        recommender.recommend(seq, np.array([3]))
    with pytest.raises(ValueError, match="k must be in"):
        recommender.recommend(seq, lengths, k=9)
    assert recommender.encode_items(["raw5", "raw7"]) == [5, 7]
    assert recommender.decode_items([5]) == ["raw5"]
    with pytest.raises(ValueError, match="unknown raw item ids"):
        recommender.encode_items(["nope"])


def test_tampered_or_partial_export_fails(exported, tmp_path):
    import shutil

    _, _, directory = exported
    tampered = tmp_path / "tampered"
    shutil.copytree(directory, tampered)
    params = tampered / serving.PARAMS_FILE
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(serving.ExportError, match="sha256"):
        serving.load(tampered)
    partial = tmp_path / "partial"
    shutil.copytree(directory, partial)
    (partial / serving.function_file("cpu", False)).unlink()
    with pytest.raises(serving.ExportError, match="missing"):
        serving.load(partial)
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    manifest = json.loads((other / serving.CONFIG_FILE).read_text())
    manifest["format"] = "something-else"
    (other / serving.CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(serving.ExportError, match="format"):
        serving.load(other)
    with pytest.raises(serving.ExportError, match="not a blossom-jax export"):
        serving.load(tmp_path / "nothing")


def test_default_platform_falls_back_to_the_cpu_function(exported):
    """A GPU or TPU host serves blossom-export's default (CPU-only) export on its CPU device."""
    assert serving.default_platform("gpu", ["cpu", "cuda"]) == "cuda"
    assert serving.default_platform("gpu", ["cpu"]) == "cpu"
    assert serving.default_platform("tpu", ["cpu", "tpu"]) == "tpu"
    assert serving.default_platform("tpu", ["cuda"]) == "tpu"  # recommend() then names the exported platforms
    assert serving.default_platform("cpu", ["cpu", "tpu"]) == "cpu"
    recommender = serving.load(exported[2])
    seq, lengths = _histories(np.random.default_rng(1), 2, CONFIG.max_len, CONFIG.num_items)
    ids, _ = recommender.recommend(seq, lengths, platform="cpu")
    np.testing.assert_array_equal(ids, recommender.recommend(seq, lengths)[0])
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="platform 'cuda' has no device on this host"):
            recommender.recommend(seq, lengths, platform="cuda")


def test_fresh_process_serves_without_flax_or_training_code(exported):
    _, _, directory = exported
    script = (
        "import sys, json\n"
        "from blossom_jax import serving\n"
        f"r = serving.load({str(directory)!r})\n"
        "ids, scores = r.recommend([[1, 2, 3, 0]], [3], k=4)\n"
        "print(json.dumps({'ids': ids.tolist(), 'heavy': [m for m in ('flax', 'optax', 'train', 'orbax')"
        " if m in sys.modules]}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heavy"] == []
    assert len(payload["ids"][0]) == 4


def test_export_argument_errors(exported, tmp_path):
    model, params, directory = exported
    with pytest.raises(ValueError, match="platforms"):
        export_model(CONFIG, params, tmp_path / "a", platforms=["rocm"])
    with pytest.raises(ValueError, match="top_k"):
        export_model(CONFIG, params, tmp_path / "b", top_k=0)
    with pytest.raises(ValueError, match="not empty"):
        export_model(CONFIG, params, directory)
