"""The bundled synthetic dataset (train/synthetic.py): deterministic, valid, with the planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from train import data as D
from train.synthetic import SyntheticSpec, _cluster_tables, generate, generate_arrays


def test_deterministic_and_shaped():
    spec = SyntheticSpec(num_users=200, num_items=100, num_clusters=10, seed=3)
    a, b = generate(spec), generate(spec)
    assert a.sequences == b.sequences and a.users == b.users
    assert generate(SyntheticSpec(num_users=200, num_items=100, num_clusters=10, seed=4)).sequences != a.sequences
    lengths = [len(s) for s in a.sequences]
    assert min(lengths) >= spec.min_len and max(lengths) <= spec.max_len
    assert all(1 <= int(i) <= spec.num_items for s in a.sequences for i in s)
    split = D.leave_one_out(D.encode(a))
    assert split.stats["short_users"] == 0


def test_planted_transitions_and_preferences():
    spec = SyntheticSpec(num_users=500, num_items=200, num_clusters=10, p_transition=0.5, seed=0)
    seq, lengths = generate_arrays(spec)
    _, succ = _cluster_tables(spec, np.random.default_rng(spec.seed))
    prev, nxt = seq[:, :-1], seq[:, 1:]
    valid = nxt > 0
    follows = (nxt == succ[prev])[valid].mean()
    # successor draws plus the chance that a preference/noise draw hits the successor anyway
    assert 0.5 <= follows <= 0.6
    same_cluster = ((nxt - 1) % 10 == (prev - 1) % 10)[valid].mean()
    assert same_cluster > 0.6  # chance is 0.1: transitions and favourite clusters keep users in few


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_items=101, num_clusters=10), "multiple of num_clusters"),
    (dict(min_len=10, max_len=5), "min_len"),
    (dict(p_transition=0.8, p_preference=0.5), "sum <= 1"),
    (dict(num_users=0), "num_users"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**kwargs)
