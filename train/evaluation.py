"""Evaluation sets and the evaluation loop shared by the model and the popularity baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from train.data import Examples, SplitData, batch_shape, gather_windows, item_counts, make_batch, sample_uni100
from train.metrics import KS, PROTOCOLS, rank_stats, summarize

# rank_fn(batch) -> (greater [B], ties [B]) for a padded evaluation batch (see train.metrics.rank_stats).
RankFn = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
SPLIT_STREAMS = {"valid": 0, "test": 1}


@dataclass
class EvalSet:
    """One evaluation split: examples (target = items[end]) and, for uni100, the fixed negatives [E, 100]."""

    name: str
    protocol: str
    examples: Examples
    negatives: np.ndarray | None
    exclude_history: bool = False

    def __len__(self) -> int:
        return len(self.examples)


def build_eval_set(split: SplitData, name: str, protocol: str, seed: int, exclude_history: bool = False
                   ) -> EvalSet:
    """The valid or test set of ``split`` under ``protocol`` ("full" or "uni100", negatives from seed)."""
    if name not in SPLIT_STREAMS:
        raise ValueError(f"split name must be 'valid' or 'test', got {name!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval protocol must be one of {PROTOCOLS}, got {protocol!r}")
    examples = split.valid if name == "valid" else split.test
    negatives = (sample_uni100(split, examples, seed, SPLIT_STREAMS[name]) if protocol == "uni100"
                 else None)
    return EvalSet(name, protocol, examples, negatives, exclude_history and protocol == "full")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def eval_batches(split: SplitData, eval_set: EvalSet, batch_size: int, max_len: int, num_devices: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches of ``eval_set`` in order: seq, len, target, weight (+ candidates, history).

    ``history`` (full protocol with exclude_history) is int32 [B, H], H the power of two >= the longest
    history in the batch (few distinct shapes, so few compilations).
    """
    ex = eval_set.examples
    per_batch, batch = batch_shape(len(ex), batch_size, num_devices)
    for lo in range(0, len(ex), per_batch):
        idx = np.arange(lo, min(lo + per_batch, len(ex)))
        out = make_batch(split.items, ex, idx, batch, max_len, "next")
        full = np.concatenate([idx, np.full(batch - idx.size, idx[0])])
        if eval_set.negatives is not None:
            out["candidates"] = eval_set.negatives[full]
        if eval_set.exclude_history:
            width = _next_pow2(int((ex.ends[full] - ex.starts[full]).max()))
            out["history"] = gather_windows(split.items, ex.starts[full], ex.ends[full], width)[0]
        out.pop("user")
        yield out


def evaluate(rank_fn: RankFn, batches: Iterator[dict[str, np.ndarray]], ties_mode: str = "expected",
             ks=KS) -> dict[str, float]:
    """Runs ``rank_fn`` over ``batches`` and summarises the ranks of the real (weight > 0) rows."""
    greater, ties = [], []
    for batch in batches:
        g, t = rank_fn(batch)
        keep = batch["weight"] > 0
        greater.append(np.asarray(g)[keep])
        ties.append(np.asarray(t)[keep])
    return summarize(np.concatenate(greater), np.concatenate(ties), ks, ties_mode)


def popularity_rank_fn(split: SplitData) -> RankFn:
    """Ranks items by their training-part interaction count (the popularity baseline)."""
    counts = jnp.asarray(item_counts(split), jnp.float32)

    @jax.jit
    def ranks(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = jnp.broadcast_to(counts, (batch["target"].shape[0], counts.shape[0]))
        return rank_stats(logits, batch["target"], batch.get("candidates"), batch.get("history"))

    def rank_fn(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        keys = ("target", "candidates", "history")
        g, t = ranks({k: batch[k] for k in keys if k in batch})
        return np.asarray(g), np.asarray(t)

    return rank_fn
