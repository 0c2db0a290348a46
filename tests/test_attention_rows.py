"""``blossom_attention_rows`` (a few query positions per row) against rows of the dense-mask oracle: outputs
and the gradients of q, k, v, the gates and the compression parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, blossom_attention, blossom_attention_rows
from conftest import random_attention_inputs

F32_TOL = dict(atol=2e-5, rtol=2e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _positions(valid: np.ndarray, rows: int, seed: int) -> jnp.ndarray:
    """[B, rows]: each row's last valid position first, then random positions (padded ones included)."""
    rng = np.random.default_rng(seed)
    batch, seq_len = valid.shape
    positions = rng.integers(0, seq_len, size=(batch, rows))
    positions[:, 0] = valid.sum(1) - 1
    return jnp.asarray(positions, jnp.int32)


def _take(x, positions):
    return jnp.take_along_axis(x, positions[:, :, None, None], axis=1)


def _outputs_and_grads(config, inputs, positions, cotangent, rows_path: bool):
    q, k, v, gates, params, valid = inputs

    def loss(q, k, v, gates, params):
        if rows_path:
            out = blossom_attention_rows(_take(q, positions), k, v, _take(gates, positions), params,
                                         query_positions=positions, valid=valid, config=config)
        else:
            full = blossom_attention(q, k, v, gates, params, valid=valid, config=config, impl="reference")
            out = _take(full, positions)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        q, k, v, gates, params)
    return out, grads


def assert_rows_match_reference(config, batch, seq_len, *, rows=3, dtype=jnp.float32, seed=0,
                                poison_padding=False):
    inputs = random_attention_inputs(config, batch, seq_len, seed=seed, dtype=dtype,
                                     poison_padding=poison_padding)
    clean = random_attention_inputs(config, batch, seq_len, seed=seed, dtype=dtype) if poison_padding \
        else inputs
    valid = np.asarray(inputs[5])
    positions = _positions(valid, rows, seed)
    query_valid = np.take_along_axis(valid, np.asarray(positions), axis=1)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(batch, rows) + inputs[0].shape[2:]),
                            jnp.float32)
    if poison_padding:  # padded rows' outputs are defined as 0 and get no cotangent (the model never reads them)
        cotangent = cotangent * query_valid[:, :, None, None]
    out, grads = _outputs_and_grads(config, inputs, positions, cotangent, rows_path=True)
    want, want_grads = _outputs_and_grads(config, clean, positions, cotangent, rows_path=False)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert out.dtype == dtype and out.shape == (batch, rows) + inputs[0].shape[2:]
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), **tol)
    assert np.all(np.asarray(out, np.float32)[~query_valid] == 0.0), "padded query rows must output exactly 0"
    for name, got, ref in zip(("q", "k", "v", "gates", "compress"), grads, want_grads):
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
            if poison_padding and name in ("q", "k", "v"):
                g, r = g[valid], r[valid]
            assert np.all(np.isfinite(g)), name
            np.testing.assert_allclose(g, r, err_msg=name, **tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [1, 5, 16, 17, 50, 129])
def test_rows_match_reference_lengths(causal, seq_len):
    assert_rows_match_reference(AttentionConfig(causal=causal), batch=3, seq_len=seq_len, seed=seq_len)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_rows_match_reference_gqa_groups(num_heads, num_kv_heads):
    for causal in (True, False):
        config = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal)
        assert_rows_match_reference(config, batch=2, seq_len=70, seed=num_heads * 10 + num_kv_heads)


@pytest.mark.slow
def test_rows_options_and_bfloat16():
    for causal in (True, False):
        assert_rows_match_reference(AttentionConfig(causal=causal, straight_through=True), 2, 90, seed=3)
        assert_rows_match_reference(AttentionConfig(causal=causal), 2, 40, dtype=jnp.bfloat16, seed=4)
    assert_rows_match_reference(AttentionConfig(causal=False, mask_padded_block_keys=True), 3, 60, seed=11)
    for num_selected in (1, 7):  # n = 1, and n larger than the number of visible blocks
        assert_rows_match_reference(AttentionConfig(num_selected=num_selected), 2, 40, seed=num_selected)
    # A single row per sequence (the model's user vector).
    assert_rows_match_reference(AttentionConfig(), 4, 33, rows=1, seed=8)


def test_rows_causal_nan_padding_does_not_leak():
    assert_rows_match_reference(AttentionConfig(causal=True), 3, 75, rows=4, seed=5, poison_padding=True)


def test_rows_input_validation():
    config = AttentionConfig()
    q, k, v, gates, params, valid = random_attention_inputs(config, 2, 20)
    positions = jnp.asarray([[19], [3]], jnp.int32)
    args = (q[:, :1], k, v, gates[:, :1], params)
    with pytest.raises(ValueError, match=r"query_positions must lie in \[0, 19\], got values in \[4, 20\]"):
        blossom_attention_rows(*args, query_positions=positions + 1, valid=valid, config=config)
    with pytest.raises(ValueError, match="query_positions must be \\[B, Q\\]"):
        blossom_attention_rows(*args, query_positions=positions[:, 0], valid=valid, config=config)
    with pytest.raises(ValueError, match="query_positions must be integers"):
        blossom_attention_rows(*args, query_positions=positions.astype(jnp.float32), valid=valid, config=config)
    with pytest.raises(ValueError, match="gates must be"):
        blossom_attention_rows(q[:, :1], k, v, gates, params, query_positions=positions, valid=valid,
                               config=config)
    with pytest.raises(ValueError, match="v must have shape"):
        blossom_attention_rows(q[:, :1], k[:, :5], v, gates[:, :1], params, query_positions=positions,
                               valid=valid, config=config)
