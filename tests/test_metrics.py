"""Ranking metrics (train/metrics.py) against brute-force numpy, and the popularity baseline."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from train import data as D
from train.evaluation import build_eval_set, eval_batches, evaluate, popularity_rank_fn
from train.metrics import KS, per_example, rank_stats, summarize


def _brute_rank_counts(logits, targets, candidates=None, history=None):
    """Loop version of rank_stats."""
    greater, ties = [], []
    for b in range(logits.shape[0]):
        t = targets[b]
        if candidates is not None:
            pool = list(candidates[b])
        else:
            excluded = set() if history is None else set(history[b].tolist())
            pool = [i for i in range(1, logits.shape[1]) if i != t and i not in excluded]
        scores = np.array([logits[b, i] for i in pool])
        greater.append(int((scores > logits[b, t]).sum()))
        ties.append(int((scores == logits[b, t]).sum()))
    return np.array(greater), np.array(ties)


def _brute_metrics(rank: int, k: int) -> dict[str, float]:
    hit = rank < k
    return {"recall": float(hit), "ndcg": hit / np.log2(rank + 2), "mrr": hit / (rank + 1)}


def test_rank_stats_matches_brute_force():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(16, 40)), 1).astype(np.float32)  # rounding creates ties
    targets = rng.integers(1, 40, size=16)
    history = np.where(rng.random((16, 6)) < 0.8, rng.integers(1, 40, size=(16, 6)), 0)
    candidates = rng.integers(1, 40, size=(16, 9))
    for kwargs in ({}, {"history": history}, {"candidates": candidates}):
        got = rank_stats(jnp.asarray(logits), jnp.asarray(targets),
                         **{k: jnp.asarray(v) for k, v in kwargs.items()})
        want = _brute_rank_counts(logits, targets, **kwargs)
        np.testing.assert_array_equal(np.asarray(got[0]), want[0])
        np.testing.assert_array_equal(np.asarray(got[1]), want[1])
        assert want[1].sum() > 0  # the case really has ties


def test_padding_column_never_competes():
    logits = jnp.array([[100.0, 1.0, 2.0, 3.0]])
    g, t = rank_stats(logits, jnp.array([3]))
    assert (int(g[0]), int(t[0])) == (0, 0)


def test_nan_target_counts_as_worst():
    logits = jnp.array([[0.0, jnp.nan, 1.0, 2.0, 3.0]])
    g, t = rank_stats(logits, jnp.array([1]))
    assert (int(g[0]), int(t[0])) == (3, 0)


def test_metrics_without_ties_match_definition():
    ranks = np.array([0, 1, 3, 4, 9, 10, 19, 20, 500])
    values = per_example(ranks, np.zeros_like(ranks))
    for k in KS:
        for name in ("recall", "ndcg", "mrr"):
            want = [_brute_metrics(int(r), k)[name] for r in ranks]
            np.testing.assert_allclose(values[f"{name}@{k}"], want, rtol=1e-12)


def test_expected_tie_handling_is_the_mean_over_tie_orders():
    for g, t in itertools.product([0, 2, 4, 8, 19, 25], [0, 1, 3, 7, 30]):
        values = per_example(np.array([g]), np.array([t]))
        for k in KS:
            for name in ("recall", "ndcg", "mrr"):
                want = np.mean([_brute_metrics(r, k)[name] for r in range(g, g + t + 1)])
                np.testing.assert_allclose(values[f"{name}@{k}"][0], want, rtol=1e-12)
    opt = per_example(np.array([2]), np.array([5]), ties_mode="optimistic")
    pes = per_example(np.array([2]), np.array([5]), ties_mode="pessimistic")
    assert opt["ndcg@10"][0] == pytest.approx(1 / np.log2(4)) and pes["ndcg@10"][0] == pytest.approx(1 / np.log2(9))


def test_constant_scores_give_chance_level_not_perfect():
    num_items = 100
    logits = jnp.zeros((4, num_items + 1))
    g, t = rank_stats(logits, jnp.array([1, 5, 50, 100]))
    out = summarize(np.asarray(g), np.asarray(t))
    assert out["recall@10"] == pytest.approx(10 / num_items)
    assert summarize(np.asarray(g), np.asarray(t), ties_mode="optimistic")["recall@10"] == 1.0
    with pytest.raises(ValueError, match="ties_mode"):
        per_example(np.array([0]), np.array([0]), ties_mode="random")


def _split(seqs):
    raw = D.RawInteractions([str(i) for i in range(len(seqs))], [[str(x) for x in s] for s in seqs], "m", "seq")
    return D.leave_one_out(D.encode(raw))


def test_popularity_baseline_matches_numpy_ranking():
    rng = np.random.default_rng(5)
    seqs = [list(rng.integers(1, 60, size=n)) for n in rng.integers(3, 30, size=80)]
    sp = _split(seqs)
    counts = D.item_counts(sp).astype(float)
    for protocol in ("full", "uni100"):
        eval_set = build_eval_set(sp, "test", protocol, seed=0)
        got = evaluate(popularity_rank_fn(sp), eval_batches(sp, eval_set, 32, 10))
        targets = sp.items[sp.test.ends]
        if protocol == "full":
            pools = [np.array([i for i in range(1, sp.num_items + 1) if i != t]) for t in targets]
        else:
            pools = list(eval_set.negatives)
        greater = np.array([(counts[p] > counts[t]).sum() for p, t in zip(pools, targets)])
        ties = np.array([(counts[p] == counts[t]).sum() for p, t in zip(pools, targets)])
        want = summarize(greater, ties)
        assert got == pytest.approx(want)
        assert got["num_examples"] == len(sp.test)


def test_popularity_with_history_excluded_matches_numpy():
    rng = np.random.default_rng(6)
    seqs = [list(rng.integers(1, 40, size=n)) for n in rng.integers(3, 25, size=60)]
    sp = _split(seqs)
    counts = D.item_counts(sp).astype(float)
    eval_set = build_eval_set(sp, "valid", "full", seed=0, exclude_history=True)
    batches = list(eval_batches(sp, eval_set, 16, 10))
    assert all(b["history"].shape[1] in (8, 16, 32) for b in batches)  # power-of-two widths
    got = evaluate(popularity_rank_fn(sp), iter(batches), ties_mode="pessimistic")
    greater, ties = [], []
    for start, end in zip(sp.valid.starts, sp.valid.ends):
        target, history = sp.items[end], set(sp.items[start:end].tolist())
        pool = np.array([i for i in range(1, sp.num_items + 1) if i != target and i not in history])
        greater.append((counts[pool] > counts[target]).sum())
        ties.append((counts[pool] == counts[target]).sum())
    assert got == pytest.approx(summarize(np.array(greater), np.array(ties), ties_mode="pessimistic"))
