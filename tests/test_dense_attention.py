"""Dense baseline attention: the length-based formulation (is_causal + key lengths; cuDNN on GPU) equals
the boolean-mask formulation it replaced, outputs and gradients, causal and bidirectional."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, ModelConfig
from blossom_jax.models import SequentialRecommender, dense_attention, dense_impl, key_lengths
from blossom_jax.ops import pallas
from conftest import jitted_apply, random_lengths
from train.objectives import masked_item_loss, next_item_ce_loss

ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, batch, seq_len, heads, kv_heads, head_dim, dtype=jnp.float32, lengths=None):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(batch, seq_len, h, head_dim)).astype(np.float32)
               for h in (heads, kv_heads, kv_heads))
    if lengths is None:
        lengths = random_lengths(rng, batch, seq_len)
    valid = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(valid), np.asarray(lengths)


def _loss(impl, causal, valid, weights):
    def f(q, k, v):
        out = dense_attention(q, k, v, valid, causal=causal, impl=impl).astype(jnp.float32)
        return jnp.sum(out * weights)  # every position, padded queries included
    return f


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len,heads,kv_heads", [(37, 2, 2), (50, 4, 2), (1, 2, 2), (70, 8, 8)])
def test_lengths_equal_boolean_mask(causal, seq_len, heads, kv_heads):
    q, k, v, valid, _ = _inputs(seq_len, 6, seq_len, heads, kv_heads, 16)
    weights = jax.random.normal(jax.random.key(seq_len), q.shape)
    ref = dense_attention(q, k, v, valid, causal=causal, impl="mask")
    out = dense_attention(q, k, v, valid, causal=causal, impl="xla")
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)  # all positions, padded ones too
    g_ref = jax.jit(jax.grad(_loss("mask", causal, valid, weights), argnums=(0, 1, 2)))(q, k, v)
    g_out = jax.jit(jax.grad(_loss("xla", causal, valid, weights), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_key_lengths_and_empty_rows_stay_finite():
    lengths = np.array([0, 1, 5, 9])
    q, k, v, valid, _ = _inputs(0, 4, 9, 2, 2, 16, lengths=lengths)
    np.testing.assert_array_equal(key_lengths(valid), [1, 1, 5, 9])
    assert key_lengths(valid).dtype == jnp.int32
    for causal in (True, False):
        out = dense_attention(q, k, v, valid, causal=causal, impl="xla")
        assert np.all(np.isfinite(out))
        grads = jax.grad(_loss("xla", causal, valid, jnp.ones_like(q)), argnums=(0, 1, 2))(q, k, v)
        assert all(np.all(np.isfinite(g)) for g in grads)
        ref = dense_attention(q, k, v, valid, causal=causal, impl="mask")
        np.testing.assert_allclose(out[1:], ref[1:], atol=1e-6)  # rows with >= 1 valid key: identical


def test_dense_impl_selection():
    assert dense_impl("reference", jnp.bfloat16, 16) == "mask"
    assert dense_impl("xla", jnp.bfloat16, 16) == "xla"
    expected = "cudnn" if ON_GPU else "xla"
    assert dense_impl("auto", jnp.bfloat16, 16) == expected
    assert dense_impl("pallas", jnp.bfloat16, 16) == expected
    assert dense_impl("auto", jnp.float32, 16) == "xla"  # cuDNN flash attention takes fp16/bf16 only
    with pallas.target_backend("gpu"):
        assert dense_impl("auto", jnp.bfloat16, 16) == "cudnn"
        assert dense_impl("auto", jnp.float16, 64) == "cudnn"
        assert dense_impl("auto", jnp.float32, 16) == "xla"
        assert dense_impl("auto", jnp.bfloat16, 12) == "xla"  # head dim not a multiple of 8
    with pallas.target_backend("tpu"):
        assert dense_impl("auto", jnp.bfloat16, 16) == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        dense_impl("cuda", jnp.bfloat16, 16)


@pytest.mark.skipif(ON_GPU, reason="the fallback is for hosts without cuDNN")
def test_cudnn_request_without_cudnn_falls_back_to_xla():
    q, k, v, valid, _ = _inputs(1, 3, 21, 2, 2, 16, dtype=jnp.bfloat16)
    out = dense_attention(q, k, v, valid, causal=True, impl="cudnn")
    ref = dense_attention(q, k, v, valid, causal=True, impl="xla")
    np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len,heads,kv_heads", [(37, 8, 8), (200, 8, 8), (50, 8, 2)])
def test_cudnn_matches_boolean_mask(causal, seq_len, heads, kv_heads):
    q, k, v, valid, _ = _inputs(seq_len, 8, seq_len, heads, kv_heads, 16, dtype=jnp.bfloat16)
    ref = dense_attention(q, k, v, valid, causal=causal, impl="mask").astype(jnp.float32)
    out = dense_attention(q, k, v, valid, causal=causal, impl="cudnn").astype(jnp.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    weights = jax.random.normal(jax.random.key(0), q.shape)
    g_ref = jax.grad(_loss("mask", causal, valid, weights), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.grad(_loss("cudnn", causal, valid, weights), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=5e-2 * max(1.0, float(np.abs(b).max())), rtol=5e-2)
    # Compiled on GPU, the "auto" choice really is cuDNN (a custom call in the HLO).
    hlo = jax.jit(lambda a, b, c: dense_attention(a, b, c, valid, causal=causal, impl="cudnn")
                  ).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower()


def _model_and_batch(causal, dtype, impl, seq_len=37, batch=6, seed=0):
    config = ModelConfig(num_items=40, max_len=seq_len, hidden_size=32, inner_size=64, num_layers=2,
                         attention="dense", attention_impl=impl, causal=causal, compute_dtype=dtype,
                         attention_dropout=0.0, attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16))
    rng = np.random.default_rng(seed)
    lengths = random_lengths(rng, batch, seq_len)
    items = rng.integers(1, 41, size=(batch, seq_len))
    items = np.where(np.arange(seq_len)[None] < lengths[:, None], items, 0)
    targets = rng.integers(1, 41, size=batch)
    batch_dict = {"seq": jnp.asarray(items, jnp.int32), "len": jnp.asarray(lengths, jnp.int32),
                  "target": jnp.asarray(targets, jnp.int32), "weight": jnp.ones(batch, jnp.float32)}
    return SequentialRecommender(config), batch_dict


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_model_equals_boolean_mask_model(causal):
    """Whole dense model (float32): outputs of every position, user vectors, scores and training-loss
    gradients (dropout on, attention dropout 0) equal those of the boolean-mask formulation. (In float32
    "auto" is "xla" on every backend, see test_dense_impl_selection; cuDNN is tested in bfloat16 below.)"""
    ref_model, batch = _model_and_batch(causal, "float32", "reference")
    model, _ = _model_and_batch(causal, "float32", "xla")
    variables = jax.jit(ref_model.init)(jax.random.key(0), batch["seq"], batch["len"])
    for method in ("encode", "score", "__call__"):
        apply, ref_apply = (jitted_apply(m, method) for m in (model, ref_model))
        np.testing.assert_allclose(apply(variables, batch["seq"], batch["len"]),
                                   ref_apply(variables, batch["seq"], batch["len"]), atol=2e-5, rtol=2e-5)
    if causal:
        loss_fn = next_item_ce_loss
    else:
        loss_fn = lambda m, v, b, r: masked_item_loss(m, v, b, r, 0.2)  # noqa: E731

    def grads(m):
        return jax.jit(jax.grad(lambda p: loss_fn(m, {"params": p}, batch, jax.random.key(3))[0]))(
            variables["params"])

    g_ref, g_new = grads(ref_model), grads(model)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_model_bfloat16_auto_close_to_boolean_mask(causal):
    ref_model, batch = _model_and_batch(causal, "bfloat16", "reference")
    model, _ = _model_and_batch(causal, "bfloat16", "auto")
    variables = jax.jit(ref_model.init)(jax.random.key(0), batch["seq"], batch["len"])
    out = jitted_apply(model, "score")(variables, batch["seq"], batch["len"])
    ref = jitted_apply(ref_model, "score")(variables, batch["seq"], batch["len"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=5e-2)
