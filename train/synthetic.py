"""The bundled default dataset: a seeded generator of sequences with planted structure.

Nothing is shipped as a file; ``generate(SyntheticSpec(...))`` rebuilds the same data bit for bit from its
seed (numpy ``default_rng``, PCG64). The process, per user:

* **Long-term preference.** Items are split into ``num_clusters`` clusters (item i is in cluster
  ``(i - 1) % num_clusters``). Each user has two favourite clusters, drawn at random, with weights
  ``favourite_weight`` and ``1 - favourite_weight``. Within a cluster items follow a Zipf law with exponent
  ``zipf`` (the cluster's first item is the most popular), so the data has a popularity signal too.
* **Short-term transitions.** Every item i has a fixed successor ``succ[i]`` in the same cluster (a random
  cycle through the cluster). Each next item is ``succ[previous]`` with probability ``p_transition``, a
  draw from the user's favourite clusters with probability ``p_preference``, and a uniformly random item
  otherwise (noise). The first item is a favourite-cluster draw.
* Sequence lengths are uniform in ``[min_len, max_len]``.

A sequential model can learn both signals (the transition makes roughly ``p_transition`` of next items
predictable exactly from the last item; the preference narrows the rest to two clusters), while a
popularity ranking only sees the Zipf head of each cluster, so the model must beat popularity by a wide
margin. Item ids are the integers 1..num_items as strings; user ids 1..num_users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.data import RawInteractions


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the bundled data generator (see module docstring)."""

    # Number of users (sequences).
    num_users: int = 1000
    # Number of items; a multiple of num_clusters.
    num_items: int = 400
    # Number of item clusters (long-term interests).
    num_clusters: int = 20
    # Shortest and longest sequence (inclusive).
    min_len: int = 5
    max_len: int = 40
    # Probability that the next item is the previous item's fixed successor.
    p_transition: float = 0.5
    # Probability that the next item is drawn from the user's favourite clusters.
    p_preference: float = 0.35
    # Weight of the first of the two favourite clusters.
    favourite_weight: float = 0.7
    # Zipf exponent of item popularity inside a cluster.
    zipf: float = 1.0
    # Generator seed.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_clusters", "min_len", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_items % self.num_clusters or self.num_items // self.num_clusters < 2:
            raise ValueError(f"num_items ({self.num_items}) must be a multiple of num_clusters "
                             f"({self.num_clusters}) with at least 2 items per cluster")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        if not (0 <= self.p_transition and 0 <= self.p_preference
                and self.p_transition + self.p_preference <= 1):
            raise ValueError(f"need p_transition, p_preference >= 0 with sum <= 1, got "
                             f"{self.p_transition}, {self.p_preference}")
        if not 0 <= self.favourite_weight <= 1:
            raise ValueError(f"favourite_weight must be in [0, 1], got {self.favourite_weight}")


def _cluster_tables(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(members int64 [C, m] items of each cluster by popularity rank, succ int64 [num_items + 1])."""
    c, m = spec.num_clusters, spec.num_items // spec.num_clusters
    members = np.arange(1, spec.num_items + 1).reshape(m, c).T.copy()  # item i in cluster (i-1) % C
    succ = np.zeros(spec.num_items + 1, np.int64)
    for row in members:
        cycle = rng.permutation(row)
        succ[cycle] = np.roll(cycle, -1)
    return members, succ


def generate_arrays(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Generates the sequences: (items int64 [U, max_len] right-padded with 0, lengths int64 [U])."""
    rng = np.random.default_rng(spec.seed)
    members, succ = _cluster_tables(spec, rng)
    c, m = members.shape
    u = spec.num_users
    zipf_cdf = np.cumsum(1.0 / np.arange(1, m + 1) ** spec.zipf)
    zipf_cdf /= zipf_cdf[-1]
    favourites = np.stack([rng.permutation(c)[:2] for _ in range(u)])  # [U, 2]
    lengths = rng.integers(spec.min_len, spec.max_len + 1, size=u)

    def preferred() -> np.ndarray:
        second = rng.random(u) >= spec.favourite_weight
        cluster = favourites[np.arange(u), second.astype(np.int64)]
        rank = np.minimum(np.searchsorted(zipf_cdf, rng.random(u)), m - 1)
        return members[cluster, rank]

    seq = np.zeros((u, spec.max_len), np.int64)
    seq[:, 0] = preferred()
    for t in range(1, spec.max_len):
        r = rng.random(u)
        noise = rng.integers(1, spec.num_items + 1, size=u)
        pref = preferred()
        nxt = np.where(r < spec.p_transition, succ[seq[:, t - 1]],
                       np.where(r < spec.p_transition + spec.p_preference, pref, noise))
        seq[:, t] = nxt
    seq[np.arange(spec.max_len)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


def generate(spec: SyntheticSpec = SyntheticSpec()) -> RawInteractions:
    """The bundled dataset as ``RawInteractions`` (user ids and item ids as decimal strings)."""
    seq, lengths = generate_arrays(spec)
    users = [str(i + 1) for i in range(spec.num_users)]
    sequences = [[str(x) for x in row[:n]] for row, n in zip(seq.tolist(), lengths.tolist())]
    return RawInteractions(users, sequences, f"synthetic(seed={spec.seed})", "synthetic", {})
