"""Losses and train steps (train/objectives.py, train/steps.py) on the real model with tiny dimensions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax.models import SequentialRecommender
from train import data as D
from train.config import TrainConfig
from train.objectives import (all_positions_ce_loss, masked_positions, next_item_ce_loss, sample_negatives,
                              select_loss)
from train.steps import DeviceMesh, create_state, init_params, make_optimizer, make_train_step
from train.synthetic import SyntheticSpec, generate

TINY = dict(hidden_size=32, inner_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_len=20,
            attention_impl="xla", batch_size=64, learning_rate=0.005)


@pytest.fixture(scope="module")
def split():
    return D.leave_one_out(D.encode(generate(SyntheticSpec(num_users=200, num_items=100, num_clusters=10))))


def _model(split, **kw):
    cfg = TrainConfig(**{**TINY, **kw})
    return cfg, SequentialRecommender(cfg.model_config(split.num_items))


@pytest.mark.parametrize("attention", ["blossom", "dense"])
def test_all_positions_loss_equals_mean_of_prefix_losses(split, attention):
    """A causal model's hidden state at position i of a window equals the user vector of the prefix
    ending at i, so the all-positions CE is the mean of the prefix CEs of the same targets."""
    cfg, model = _model(split, dropout=0.0, attention_dropout=0.0, attention=attention)
    params = {"params": jax.jit(lambda: init_params(model, jax.random.PRNGKey(0), cfg.max_len))()}
    windows = D.window_examples(split, cfg.max_len).take(np.arange(12))
    wb = D.make_batch(split.items, windows, np.arange(12), 12, cfg.max_len, "shift")
    begins = windows.ends - wb["len"]
    rows = np.repeat(np.arange(12), wb["len"])
    pos = np.concatenate([np.arange(n) for n in wb["len"]])
    prefixes = D.Examples(begins[rows], begins[rows] + pos + 1, rows)
    pb = D.make_batch(split.items, prefixes, np.arange(len(prefixes)), len(prefixes), cfg.max_len, "next")
    np.testing.assert_array_equal(pb["target"], wb["target"][rows, pos])
    rng = jax.random.PRNGKey(1)
    all_pos, n_all = jax.jit(lambda b: all_positions_ce_loss(model, params, b, rng))(
        {k: v for k, v in wb.items() if k != "user"})
    prefix, n_prefix = jax.jit(lambda b: next_item_ce_loss(model, params, b, rng))(
        {k: v for k, v in pb.items() if k != "user"})
    assert int(n_all) == int(n_prefix) == len(prefixes)
    np.testing.assert_allclose(float(all_pos), float(prefix), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["blossom", "dense"])
def test_masked_item_loss_rows_only_equals_full_last_layer(split, attention):
    """BERT4Rec's loss computes the last layer only at the masked positions; same value and gradient."""
    cfg, model = _model(split, dropout=0.0, attention_dropout=0.0, attention=attention, bidirectional=True,
                        num_layers=2)
    full = SequentialRecommender(model.config.replace(last_layer_rows=False))
    loss_fn, _ = select_loss("prefix", "ce", True, 0.2)
    params = jax.jit(lambda: init_params(model, jax.random.PRNGKey(0), cfg.max_len))()
    windows = D.window_examples(split, cfg.max_len).take(np.arange(16))
    batch = {k: jnp.asarray(v) for k, v in
             D.make_batch(split.items, windows, np.arange(16), 16, cfg.max_len, "none").items() if k != "user"}
    rng = jax.random.PRNGKey(4)
    grad_fn = lambda m: jax.jit(jax.value_and_grad(lambda p: loss_fn(m, {"params": p}, batch, rng)[0]))  # noqa: E731
    (loss, grads), (full_loss, full_grads) = grad_fn(model)(params), grad_fn(full)(params)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def test_masked_positions():
    lengths = jnp.array([1, 2, 7, 20, 13])
    pos, sel = masked_positions(jax.random.PRNGKey(0), lengths, 20, 0.2)
    pos, sel = np.asarray(pos), np.asarray(sel)
    assert pos.shape == (5, 4)
    np.testing.assert_array_equal(sel.sum(1), [1, 1, 1, 4, 3])  # round(0.2 * len), at least 1
    for row, n in enumerate(np.asarray(lengths)):
        chosen = pos[row][sel[row]]
        assert len(set(chosen.tolist())) == len(chosen) and np.all(chosen < n)


def test_sample_negatives_never_hits_target():
    targets = jnp.asarray(np.random.default_rng(0).integers(1, 6, size=5000), jnp.int32)
    neg = np.asarray(sample_negatives(jax.random.PRNGKey(0), targets, 5))
    assert neg.min() == 1 and neg.max() == 5
    assert not np.any(neg == np.asarray(targets))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(loss="bpr", compute_dtype="bfloat16"),
    dict(objective="all-positions"),
    dict(bidirectional=True),
    dict(attention="dense", warmup_steps=3, weight_decay=0.01, grad_clip_norm=1.0),
])
def test_train_steps_reduce_loss(split, kw):
    cfg, model = _model(split, **kw)
    mesh = DeviceMesh.create()
    tx = make_optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip_norm)
    loss_fn, target = select_loss(cfg.objective, cfg.loss, cfg.bidirectional, cfg.mask_ratio)
    from train.loop import train_examples

    batches = D.BatchIterator(split.items, train_examples(cfg, split), cfg.batch_size, cfg.max_len, target,
                              seed=0)
    batch = mesh.put({k: v for k, v in next(batches.epoch(0)).items() if k != "user"})
    state = create_state(model, tx, 0, cfg.max_len, mesh)
    step = make_train_step(model, tx, loss_fn, mesh)
    losses = []
    for _ in range(12):  # fit one batch (the masked objective draws new masks every step)
        state, out = step(state, batch)
        losses.append(float(out["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.98 * losses[0], losses
    assert int(state.step) == 12
    leaves = jax.tree.leaves(state.params)
    assert all(x.dtype == jnp.float32 for x in leaves)  # params stay float32 under bfloat16 compute
