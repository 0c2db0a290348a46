"""Readers, id mapping, leave-one-out split, example indices and vectorised batching (train/data.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import shared_path
from train import data as D


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _shared(*parts: str) -> str:
    return str(shared_path("/".join(("data",) + parts)))


# ------------------------------------------------------------------------------------------ readers


def test_read_seq(tmp_path, caplog):
    path = _write(tmp_path, "a.txt", "1 5 6 7\n\n2 7 5 \n3 9\n")
    with caplog.at_level(logging.WARNING):
        raw = D.read_interactions(path, "seq")
    assert raw.users == ["1", "2", "3"]
    assert raw.sequences == [["5", "6", "7"], ["7", "5"], ["9"]]
    assert raw.stats["blank_lines"] == 1
    assert "skipped 1 blank line" in caplog.text


@pytest.mark.parametrize("text, lineno, why", [
    ("1 2 3\n4\n", 2, "expected 'user item"),
    ("1 2 3\n2 x 3\n", 2, "non-integer id 'x'"),
    ("1 2 3\n2 4\n1 5\n", 3, "already appeared at line 1"),
])
def test_read_seq_malformed(tmp_path, text, lineno, why):
    path = _write(tmp_path, "bad.txt", text)
    with pytest.raises(ValueError) as e:
        D.read_seq(path)
    bad_line = text.splitlines()[lineno - 1]
    assert f"{path}:{lineno}:" in str(e.value) and why in str(e.value) and repr(bad_line) in str(e.value)


def test_read_pairs_groups_users_in_file_order(tmp_path):
    path = _write(tmp_path, "p.txt", "2 10\n2 11\n1 12\n2 13\n1 10\n")
    raw = D.read_pairs(path)
    assert raw.users == ["2", "1"]
    assert raw.sequences == [["10", "11", "13"], ["12", "10"]]
    with pytest.raises(ValueError, match=r"p2.txt:2: .*expected 2 fields"):
        D.read_pairs(_write(tmp_path, "p2.txt", "1 2\n1 2 3\n"))


def test_read_recbole_sorts_by_time_stably(tmp_path):
    text = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "u1\ti3\t1\t30\n"
            "u2\ti1\t5\t5\n"
            "u1\ti1\t1\t10\n"
            "u1\ti2\t1\t30\n"   # ties with i3 (earlier in the file): stays after it
            "u1\ti9\t1\t20\n")
    raw = D.read_recbole(_write(tmp_path, "x.inter", text))
    assert raw.users == ["u1", "u2"]
    assert raw.sequences == [["i1", "i9", "i3", "i2"], ["i1"]]


def test_read_recbole_without_timestamp_keeps_file_order(tmp_path):
    raw = D.read_recbole(_write(tmp_path, "x.inter", "item_id:token\tuser_id:token\nb\tu\na\tu\n"))
    assert raw.sequences == [["b", "a"]]


@pytest.mark.parametrize("text, lineno, why", [
    ("user_id:token\titem_id:token\n1\t2\t3\n", 2, "expected 2 tab-separated fields"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n", 2, "timestamp 'soon'"),
    ("user_id:token\tfoo:token\n1\t2\n", 1, "lacks a 'item_id' column"),
    ("user_id\titem_id:token\n1\t2\n", 1, "is not 'name:type'"),
    ("user_id:token\titem_id:token\n1\t\n", 2, "empty user_id or item_id"),
])
def test_read_recbole_malformed(tmp_path, text, lineno, why):
    path = _write(tmp_path, "bad.inter", text)
    with pytest.raises(ValueError) as e:
        D.read_recbole(path)
    assert f"{path}:{lineno}:" in str(e.value) and why in str(e.value)


def test_read_movielens(tmp_path):
    text = "1::20::5::300\n1::10::3::100\n2::10::4::50\n1::30::3::300\n"
    raw = D.read_interactions(_write(tmp_path, "ratings.dat", text))
    assert raw.format == "movielens"
    assert raw.sequences == [["10", "20", "30"], ["10"]]
    with pytest.raises(ValueError, match=r"r2.dat:1: malformed line .*'1::2::3'"):
        D.read_movielens(_write(tmp_path, "r2.dat", "1::2::3\n"))


def test_empty_and_unknown(tmp_path):
    empty = _write(tmp_path, "e.txt", "\n  \n")
    for fmt in ("auto", "seq", "pairs", "movielens", "recbole"):
        with pytest.raises(ValueError, match="empty"):
            D.read_interactions(empty, fmt)
    with pytest.raises(ValueError, match="header only"):
        D.read_interactions(_write(tmp_path, "h.inter", "user_id:token\titem_id:token\n"))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        D.read_interactions(_write(tmp_path, "a.txt", "1 2\n"), "csv")
    with pytest.raises(ValueError, match="cannot detect the data format"):
        D.read_interactions(_write(tmp_path, "a.csv", "user,item\n1,2\n"))
    with pytest.raises(FileNotFoundError):
        D.read_interactions(str(tmp_path / "missing.txt"))


def test_detect_format(tmp_path):
    assert D.detect_format(_write(tmp_path, "a.txt", "1 2 3\n2 4 5 6\n")) == "seq"
    assert D.detect_format(_write(tmp_path, "b.txt", "1 2\n1 3\n2 4\n")) == "pairs"
    assert D.detect_format(_write(tmp_path, "c.txt", "1 2\n2 3\n")) == "seq"  # same data either way
    assert D.detect_format(_write(tmp_path, "d.txt", "1::2::3::4\n")) == "movielens"
    assert D.detect_format(_write(tmp_path, "e.tsv", "user_id:token\titem_id:token\n1\t2\n")) == "recbole"
    assert D.detect_format(str(tmp_path / "whatever.inter")) == "recbole"


# -------------------------------------------------------------------------------- mapping and split


def test_item_map_numeric_order_and_round_trip(tmp_path):
    m = D.ItemMap.build(["10", "9", "100", "9"])
    assert m.id_to_raw == (None, "9", "10", "100")
    path = str(tmp_path / "map.json")
    m.save(path)
    assert D.ItemMap.load(path) == m
    assert D.ItemMap.build(["b", "a"]).id_to_raw == (None, "a", "b")


def test_encode_identity_for_contiguous_ids_and_unknown_items(caplog):
    raw = D.RawInteractions(["u1", "u2"], [["1", "3", "2"], ["3"]], "mem", "seq")
    data = D.encode(raw)
    np.testing.assert_array_equal(data.items, [1, 3, 2, 3])
    np.testing.assert_array_equal(data.offsets, [0, 3, 4])
    other = D.RawInteractions(["u1", "u9"], [["1", "7", "2"], ["8"]], "mem2", "seq")
    with caplog.at_level(logging.WARNING):
        enc = D.encode(other, data.item_map)
    np.testing.assert_array_equal(enc.items, [1, 2])
    assert enc.users == ["u1"]
    assert enc.stats["unknown_item_interactions"] == 2 and enc.stats["users_without_known_items"] == 1
    assert "dropped 2 interaction(s)" in caplog.text and "dropped 1 user(s)" in caplog.text


def _split(seqs, policy="train"):
    raw = D.RawInteractions([str(i) for i in range(len(seqs))], [[str(x) for x in s] for s in seqs],
                            "mem", "seq")
    return D.leave_one_out(D.encode(raw), policy)


def test_leave_one_out_and_short_users(caplog):
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    with caplog.at_level(logging.WARNING):
        sp = _split(seqs)
    assert "2 user(s) have fewer than 3 items" in caplog.text
    np.testing.assert_array_equal(sp.train_len, [3, 2, 1, 1])
    np.testing.assert_array_equal(sp.valid.users, [0, 2])
    np.testing.assert_array_equal(sp.items[sp.valid.ends], [4, 9])
    np.testing.assert_array_equal(sp.items[sp.test.ends], [5, 10])
    np.testing.assert_array_equal(sp.test.ends - sp.test.starts, [4, 2])
    assert sp.stats["short_users"] == 2 and sp.stats["short_user_interactions"] == 3
    dropped = _split(seqs, "drop")
    np.testing.assert_array_equal(dropped.train_len, [3, 0, 1, 0])
    with pytest.raises(ValueError, match="short_users"):
        _split(seqs, "keep")
    with pytest.raises(ValueError, match="no user has at least 3 items"):
        _split([[1, 2]])


def _naive_prefix(seqs, max_len, include_target=False):
    out = []
    for s in seqs:
        train = s[:-2] if len(s) >= 3 else s
        for j in range(1, len(train)):
            window = train[:j + 1] if include_target else train[:j]
            out.append((window[-max_len:], train[j]))
    return out


def test_prefix_examples_and_batches_match_naive_loop():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 30, size=n)) for n in rng.integers(1, 25, size=40)]
    sp = _split(seqs)
    for include_target in (False, True):
        ex = D.prefix_examples(sp, include_target)
        naive = _naive_prefix(seqs, 7, include_target)
        assert len(ex) == len(naive)
        b = D.make_batch(sp.items, ex, np.arange(len(ex)), len(ex) + 3, 7, "next")
        for row, (window, target) in enumerate(naive):
            assert b["len"][row] == len(window)
            np.testing.assert_array_equal(b["seq"][row], window + [0] * (7 - len(window)))
            if not include_target:
                assert b["target"][row] == target
        np.testing.assert_array_equal(b["weight"], [1] * len(ex) + [0] * 3)
        np.testing.assert_array_equal(b["seq"][-1], b["seq"][0])  # padding repeats example 0


def test_window_examples_cover_every_target_once():
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(1, 50, size=n)) for n in rng.integers(3, 40, size=30)]
    sp = _split(seqs)
    n = 8
    ex = D.window_examples(sp, n)
    b = D.make_batch(sp.items, ex, np.arange(len(ex)), len(ex), n, "shift")
    got = {}
    for row in range(len(ex)):
        user = int(ex.users[row])
        length = int(b["len"][row])
        assert 1 <= length <= n
        assert np.all(b["target"][row, length:] == 0) and np.all(b["seq"][row, length:] == 0)
        got.setdefault(user, []).append((b["seq"][row, :length].tolist(), b["target"][row, :length].tolist()))
    for user, s in enumerate(seqs):
        train = [int(x) for x in s[:-2]]
        windows = sorted(got.get(user, []), key=lambda w: -len(w[0]))
        inputs = [x for w in reversed(got.get(user, [])) for x in w[0]]
        targets = [x for w in reversed(got.get(user, [])) for x in w[1]]
        assert inputs == train[:-1] and targets == train[1:]
        if windows:  # aligned at the end: only the oldest window may be short
            assert all(len(w[0]) == n for w in got[user][:-1])
    masked = D.window_examples(sp, n, include_target=True)
    mb = D.make_batch(sp.items, masked, np.arange(len(masked)), len(masked), n, "none")
    assert int(mb["len"].sum()) == int(sp.train_len.sum())
    assert "target" not in mb


def test_batch_iterator_deterministic_shuffle_and_resume():
    sp = _split([list(range(1, 40)), list(range(5, 30)), list(range(2, 12))])
    ex = D.prefix_examples(sp)
    it = D.BatchIterator(sp.items, ex, 8, 10, "next", num_devices=3, seed=7)
    assert (it.per_batch, it.batch) == (8, 9) and it.num_batches == -(-len(ex) // 8)
    e0 = list(it.epoch(0))
    assert all(b["seq"].shape == (9, 10) and b["weight"].sum() <= 8 for b in e0)
    again = list(D.BatchIterator(sp.items, ex, 8, 10, "next", num_devices=3, seed=7).epoch(0))
    for a, b in zip(e0, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    tail = list(it.epoch(0, start_batch=2))
    assert len(tail) == len(e0) - 2
    np.testing.assert_array_equal(tail[0]["seq"], e0[2]["seq"])
    e1 = list(it.epoch(1))
    assert not np.array_equal(e0[0]["seq"], e1[0]["seq"])
    seen = np.concatenate([np.stack([b["seq"][b["weight"] > 0].sum(1), b["target"][b["weight"] > 0]], 1)
                           for b in e0])
    full = D.make_batch(sp.items, ex, np.arange(len(ex)), len(ex), 10, "next")
    expect = np.stack([full["seq"].sum(1), full["target"]], 1)
    assert sorted(map(tuple, seen)) == sorted(map(tuple, expect))  # each example exactly once
    with pytest.raises(ValueError, match="no examples"):
        D.BatchIterator(sp.items, ex.take(np.arange(0)), 8, 10, "next")


def test_gather_windows_truncates_to_last_items():
    items = np.arange(100, dtype=np.int32)
    seq, lens = D.gather_windows(items, np.array([0, 10]), np.array([30, 12]), 5)
    np.testing.assert_array_equal(seq, [[25, 26, 27, 28, 29], [10, 11, 0, 0, 0]])
    np.testing.assert_array_equal(lens, [5, 2])


def test_prefetch_preserves_order_and_errors():
    assert list(D.prefetch(iter(range(10)), 2, lambda x: x * 2)) == list(range(0, 20, 2))
    assert list(D.prefetch(iter(range(3)), 0)) == [0, 1, 2]

    def boom():
        yield 1
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        list(D.prefetch(boom(), 2))
    gen = D.prefetch(iter(range(1000)), 2)
    assert next(gen) == 0
    gen.close()  # stops the producer thread


def test_uni100_negatives_avoid_history_and_are_seeded():
    rng = np.random.default_rng(3)
    seqs = [list(rng.choice(np.arange(1, 200), size=n, replace=False)) for n in rng.integers(3, 120, 50)]
    sp = _split(seqs)
    neg = D.sample_uni100(sp, sp.test, seed=1, stream=0)
    assert neg.shape == (len(sp.test), 100)
    for row, user in enumerate(sp.test.users):
        history = set(sp.items[sp.offsets[user]:sp.offsets[user + 1]].tolist())
        assert not history & set(neg[row].tolist())
        assert neg[row].min() >= 1 and neg[row].max() <= sp.num_items
    np.testing.assert_array_equal(neg, D.sample_uni100(sp, sp.test, seed=1, stream=0))
    assert not np.array_equal(neg, D.sample_uni100(sp, sp.test, seed=2, stream=0))
    with pytest.raises(ValueError, match="interacted with every item"):
        D.sample_uni100(_split([[1, 2, 3]]), _split([[1, 2, 3]]).test, 0, 0)


def test_item_counts_use_training_part_only():
    sp = _split([[1, 2, 3, 4], [2, 2, 1], [3]])
    np.testing.assert_array_equal(D.item_counts(sp), [0, 1, 2, 1, 0])


# ------------------------------------------------------------------------------------- real datasets


def test_ml100k_inter_matches_derived_seq_file():
    inter = D.read_interactions(_shared("ml-100k", "ml-100k.inter"))
    seq = D.read_interactions(_shared("ml-100k", "ml-100k_seq.txt"))
    assert (inter.format, seq.format) == ("recbole", "seq")
    assert dict(zip(inter.users, inter.sequences)) == dict(zip(seq.users, seq.sequences))
    sp = D.leave_one_out(D.encode(seq))
    assert (sp.stats["users"], sp.stats["items"], sp.stats["interactions"]) == (943, 1682, 100000)
    assert sp.data.item_map.id_to_raw[1:4] == ("1", "2", "3")  # contiguous ids map to themselves


def test_lastfm_and_wikipedia_statistics():
    sp = D.leave_one_out(D.encode(D.read_interactions(_shared("lastfm", "LastFM.txt"))))
    assert (sp.stats["users"], sp.stats["items"], sp.stats["interactions"]) == (1090, 3646, 52551)
    wiki = D.read_interactions(_shared("wikipedia", "wikipedia.txt"))
    assert wiki.format == "pairs"
    assert (len(wiki.users), wiki.num_interactions) == (8227, 157474)
