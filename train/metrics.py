"""Ranking metrics for next-item prediction: Recall (= Hit), NDCG and MRR at K.

Protocols:

* ``full``: the target is ranked against every item id 1..num_items (the padding id 0 is excluded).
  Optionally (``exclude_history``, off by default) the items before the target in the user's sequence
  are excluded too, except the target itself.
* ``uni100``: the target is ranked against 100 negatives drawn uniformly, with replacement, from the items
  the user never interacted with (``train.data.sample_uni100``, seeded, fixed for the whole run).

Rank convention: with ``g`` candidates scoring strictly higher than the target and ``t`` other candidates
scoring exactly the same, the 0-based rank is ``g`` when there are no ties (the reference's convention:
rank = number of items with a strictly greater score). Ties are rare with float32 scores but common for
degenerate models, bfloat16 logits and the popularity baseline, where "strictly greater" would reward a
constant model with perfect scores. ``ties="expected"`` (default) therefore reports the exact expectation
of each metric when ties are broken uniformly at random (rank uniform in g..g+t); ``"optimistic"`` uses
rank g and ``"pessimistic"`` rank g + t. Without ties all three agree.

With one relevant item: Recall@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2) and
MRR@K = [rank < K] / (rank + 1), averaged over users.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

KS = (5, 10, 20)
METRICS = ("recall", "ndcg", "mrr")
TIE_MODES = ("expected", "optimistic", "pessimistic")
PROTOCOLS = ("full", "uni100")


def rank_stats(logits: jnp.ndarray, targets: jnp.ndarray, candidates: jnp.ndarray | None = None,
               history: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Counts how many candidates beat and tie the target.

    logits: float [B, V] scores of item ids 0..V-1 (column 0 = padding, never a candidate).
    targets: int [B] target item ids (1..V-1).
    candidates: optional int [B, C] negative ids (uni100): only they compete with the target.
    history: optional int [B, H] ids (0 = none) excluded from the full ranking (the target never is).
    Returns (greater int32 [B], ties int32 [B]); ties exclude the target itself. A NaN target score
    counts as beaten by every candidate.
    """
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(logits.shape[0])[:, None]
    target_score = jnp.take_along_axis(logits, targets[:, None], axis=1)  # [B, 1]
    if candidates is not None:
        scores = jnp.take_along_axis(logits, candidates, axis=1)  # [B, C]
        competing = jnp.ones(scores.shape, bool)
    else:
        scores = logits
        ids = jnp.arange(logits.shape[1])[None, :]
        competing = (ids != 0) & (ids != targets[:, None])
        if history is not None:
            excluded = jnp.zeros(logits.shape, bool).at[rows, history].set(True)
            competing &= ~excluded
    greater = jnp.sum(competing & (scores > target_score), axis=1)
    ties = jnp.sum(competing & (scores == target_score), axis=1)
    n_competing = jnp.sum(competing, axis=1)
    nan = jnp.isnan(target_score[:, 0])
    greater = jnp.where(nan, n_competing, greater)
    ties = jnp.where(nan, 0, ties)
    return greater.astype(jnp.int32), ties.astype(jnp.int32)


def _prefix(values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(values)])


def per_example(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int] = KS, ties_mode: str = "expected"
                ) -> dict[str, np.ndarray]:
    """Per-example metric values {"recall@k", "ndcg@k", "mrr@k"} -> float64 [B] (see module doc)."""
    if ties_mode not in TIE_MODES:
        raise ValueError(f"ties_mode must be one of {TIE_MODES}, got {ties_mode!r}")
    if not ks or any(not isinstance(k, (int, np.integer)) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    g = np.asarray(greater, np.int64)
    t = np.asarray(ties, np.int64)
    if ties_mode == "optimistic":
        t = np.zeros_like(t)
    elif ties_mode == "pessimistic":
        g, t = g + t, np.zeros_like(t)
    kmax = max(ks)
    r = np.arange(kmax)
    gains = {"recall": _prefix(np.ones(kmax)), "ndcg": _prefix(1.0 / np.log2(r + 2.0)),
             "mrr": _prefix(1.0 / (r + 1.0))}
    out = {}
    for k in ks:
        lo = np.clip(g, 0, k)
        hi = np.clip(g + t + 1, 0, k)  # ranks g..g+t that fall below k contribute
        for name in METRICS:
            out[f"{name}@{k}"] = (gains[name][hi] - gains[name][lo]) / (t + 1)
    return out


def summarize(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int] = KS, ties_mode: str = "expected"
              ) -> dict[str, float]:
    """Mean of ``per_example`` over examples, keys sorted as name@k; plus "num_examples"."""
    if np.asarray(greater).size == 0:
        raise ValueError("no examples to summarize")
    values = per_example(greater, ties, ks, ties_mode)
    out: dict[str, float] = {key: float(np.mean(v)) for key, v in sorted(values.items())}
    out["num_examples"] = int(np.asarray(greater).size)
    return out
