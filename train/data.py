"""Interaction data: readers, item-id remapping, leave-one-out split and vectorised batching.

Supported input formats (``format=``):

* ``seq``       per-user lines ``user item item ...`` (whitespace separated, oldest item first).
* ``pairs``     SASRec pairs ``user item``, one interaction per line, in time order per user.
* ``recbole``   RecBole atomic ``.inter``: tab-separated with a typed header such as
                ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``. Rows are sorted by
                ``timestamp`` within each user with a stable sort (ties keep file order); without a
                timestamp column file order is time order.
* ``movielens`` MovieLens ``ratings.dat``: ``user::item::rating::timestamp``; stable-sorted by timestamp
                within each user.

``detect_format`` picks one from the extension (``.inter``, ``.dat``) or the content.

Item ids are remapped to 1..n_items (0 = padding) in ascending order of the raw id (numeric order when
every raw id is an integer, so already-contiguous 1..n ids map to themselves; string order otherwise).
The mapping (``ItemMap``) is saved with every run.

Split (leave-one-out, as SASRec / BERT4Rec / RecBole ``LS: valid_and_test``): for a user with L >= 3 items
the last item is the test target, the second-to-last the validation target and the first L - 2 items are
the training part. Users with fewer than 3 items cannot be split; ``short_users="train"`` (default) puts
their whole sequence into training and evaluates nothing for them, ``short_users="drop"`` ignores them.
Either way their number is logged and reported in ``SplitData.stats``.

Every example is a window of the flat item array: ``(start, end)`` means the items
``items[max(start, end - max_len):end]`` (the last ``max_len`` items before ``end``), right-padded to
``max_len``. Prediction targets are ``items[end]`` (prefix objective) or the window shifted by one
(all-positions objective). ``gather_windows`` builds a whole ``[B, N]`` batch with one fancy-index, and
``BatchIterator`` shuffles examples with a permutation derived only from ``(seed, epoch)`` so that a resumed
run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("seq", "pairs", "recbole", "movielens")
SHORT_USER_POLICIES = ("train", "drop")
# Number of leading lines format detection looks at.
_DETECT_LINES = 2000
# Stream ids that keep the independent random streams derived from the run seed apart.
STREAM_SHUFFLE = 1
STREAM_UNI100 = 2


# ----------------------------------------------------------------------------------------------------
# Raw interactions and readers
# ----------------------------------------------------------------------------------------------------


@dataclass
class RawInteractions:
    """Per-user item sequences with raw (string) ids, in time order (oldest first)."""

    users: list[str]
    sequences: list[list[str]]
    source: str
    format: str
    # Counts of things the reader skipped (e.g. blank lines); logged by the reader.
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


def _malformed(path: str, lineno: int, line: str, why: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: malformed line ({why}): {line.rstrip(chr(10))!r}")


def _is_int(token: str) -> bool:
    return token.isdigit() or (token[:1] == "-" and token[1:].isdigit())


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 text file ({e})") from None
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}: file is empty (no interactions)")
    return lines


def _log_skipped_blank(path: str, blank: int) -> None:
    if blank:
        log.warning("%s: skipped %d blank line(s)", path, blank)


def read_seq(path: str) -> RawInteractions:
    """Per-user format: ``user item item ...`` per line. Every token must be an integer id."""
    users: list[str] = []
    seqs: list[list[str]] = []
    first_line: dict[str, int] = {}
    blank = 0
    for lineno, line in enumerate(_read_lines(path), 1):
        tokens = line.split()
        if not tokens:
            blank += 1
            continue
        if len(tokens) < 2:
            raise _malformed(path, lineno, line, "expected 'user item [item ...]'")
        bad = next((t for t in tokens if not _is_int(t)), None)
        if bad is not None:
            raise _malformed(path, lineno, line, f"non-integer id {bad!r}")
        user = tokens[0]
        if user in first_line:
            raise _malformed(path, lineno, line,
                             f"user {user} already appeared at line {first_line[user]}; "
                             "is this a 'user item' pairs file (format='pairs')?")
        first_line[user] = lineno
        users.append(user)
        seqs.append(tokens[1:])
    _log_skipped_blank(path, blank)
    return RawInteractions(users, seqs, path, "seq", {"blank_lines": blank})


def _group(user_col: Sequence[str], item_col: Sequence[str], order: np.ndarray | None
           ) -> tuple[list[str], list[list[str]]]:
    """Groups rows by user (users in first-appearance order), rows in ``order`` (default file order)."""
    index: dict[str, int] = {}
    users: list[str] = []
    seqs: list[list[str]] = []
    rows = range(len(user_col)) if order is None else order.tolist()
    # First appearance is taken in file order so that user order does not depend on timestamps.
    for u in user_col:
        if u not in index:
            index[u] = len(users)
            users.append(u)
            seqs.append([])
    for r in rows:
        seqs[index[user_col[r]]].append(item_col[r])
    return users, seqs


def _stable_time_order(user_col: Sequence[str], times: np.ndarray) -> np.ndarray:
    """Row order: by user first appearance, then timestamp, ties in file order (stable)."""
    codes: dict[str, int] = {}
    user_code = np.fromiter((codes.setdefault(u, len(codes)) for u in user_col), np.int64,
                            count=len(user_col))
    return np.lexsort((np.arange(len(times)), times, user_code))


def read_pairs(path: str) -> RawInteractions:
    """SASRec pairs: ``user item`` per line, lines of each user in time order."""
    users_col: list[str] = []
    items_col: list[str] = []
    blank = 0
    for lineno, line in enumerate(_read_lines(path), 1):
        tokens = line.split()
        if not tokens:
            blank += 1
            continue
        if len(tokens) != 2:
            raise _malformed(path, lineno, line, f"expected 2 fields 'user item', got {len(tokens)}")
        bad = next((t for t in tokens if not _is_int(t)), None)
        if bad is not None:
            raise _malformed(path, lineno, line, f"non-integer id {bad!r}")
        users_col.append(tokens[0])
        items_col.append(tokens[1])
    _log_skipped_blank(path, blank)
    users, seqs = _group(users_col, items_col, None)
    return RawInteractions(users, seqs, path, "pairs", {"blank_lines": blank})


def read_recbole(path: str) -> RawInteractions:
    """RecBole atomic ``.inter`` file (typed, tab-separated header; needs user_id and item_id)."""
    lines = _read_lines(path)
    header = lines[0].split("\t")
    names = []
    for col in header:
        name, sep, ftype = col.strip().partition(":")
        if not sep or not name or not ftype:
            raise _malformed(path, 1, lines[0], f"header field {col!r} is not 'name:type'")
        names.append(name)
    for required in ("user_id", "item_id"):
        if required not in names:
            raise _malformed(path, 1, lines[0], f"header lacks a {required!r} column")
    iu, ii = names.index("user_id"), names.index("item_id")
    it = names.index("timestamp") if "timestamp" in names else None
    users_col: list[str] = []
    items_col: list[str] = []
    times: list[float] = []
    blank = 0
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            blank += 1
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise _malformed(path, lineno, line, f"expected {len(names)} tab-separated fields, "
                                                 f"got {len(fields)}")
        user, item = fields[iu].strip(), fields[ii].strip()
        if not user or not item:
            raise _malformed(path, lineno, line, "empty user_id or item_id")
        if it is not None:
            try:
                times.append(float(fields[it]))
            except ValueError:
                raise _malformed(path, lineno, line, f"timestamp {fields[it]!r} is not a number") from None
        users_col.append(user)
        items_col.append(item)
    if not users_col:
        raise ValueError(f"{path}: header only, no interactions")
    _log_skipped_blank(path, blank)
    order = None if it is None else _stable_time_order(users_col, np.asarray(times, np.float64))
    users, seqs = _group(users_col, items_col, order)
    return RawInteractions(users, seqs, path, "recbole", {"blank_lines": blank})


def read_movielens(path: str) -> RawInteractions:
    """MovieLens ``ratings.dat``: ``user::item::rating::timestamp``, stable-sorted by timestamp per user."""
    users_col: list[str] = []
    items_col: list[str] = []
    times: list[int] = []
    blank = 0
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            blank += 1
            continue
        fields = line.strip().split("::")
        if len(fields) != 4:
            raise _malformed(path, lineno, line, "expected 'user::item::rating::timestamp'")
        bad = next((t for t in (fields[0], fields[1], fields[3]) if not _is_int(t)), None)
        if bad is not None:
            raise _malformed(path, lineno, line, f"non-integer field {bad!r}")
        users_col.append(fields[0])
        items_col.append(fields[1])
        times.append(int(fields[3]))
    _log_skipped_blank(path, blank)
    order = _stable_time_order(users_col, np.asarray(times, np.int64))
    users, seqs = _group(users_col, items_col, order)
    return RawInteractions(users, seqs, path, "movielens", {"blank_lines": blank})


READERS: dict[str, Callable[[str], RawInteractions]] = {
    "seq": read_seq, "pairs": read_pairs, "recbole": read_recbole, "movielens": read_movielens}


def detect_format(path: str) -> str:
    """Guesses the format of ``path`` from its extension, else from its first lines.

    ``.inter`` -> recbole, ``.dat`` -> movielens. Otherwise: a ``::`` separated first line -> movielens; a
    tab-separated ``name:type`` header -> recbole; integer tokens -> pairs when every one of the first
    lines has exactly two tokens and some user id repeats, else seq (when no user repeats, the two readings
    give the same data).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".inter":
        return "recbole"
    if ext == ".dat":
        return "movielens"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    head: list[str] = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                head.append(line)
                if len(head) >= _DETECT_LINES:
                    break
    if not head:
        raise ValueError(f"{path}: file is empty (no interactions)")
    first = head[0].strip()
    if "::" in first:
        return "movielens"
    header = first.split("\t")
    if len(header) >= 2 and all(":" in h and h.split(":")[0] and h.split(":")[1] for h in header):
        return "recbole"
    rows = [line.split() for line in head]
    if not all(_is_int(t) for t in rows[0]):  # later bad lines are the reader's to report, with line numbers
        raise ValueError(
            f"{path}: cannot detect the data format from its first line {first[:120]!r}; expected "
            f"integer ids (seq/pairs), 'a::b::c::d' (movielens) or a typed tab header (recbole). "
            f"Pass the format explicitly, one of {FORMATS}.")
    if all(len(tok) == 2 for tok in rows):
        first_col = [tok[0] for tok in rows]
        if len(set(first_col)) < len(first_col):
            return "pairs"
    return "seq"


def read_interactions(path: str, fmt: str = "auto") -> RawInteractions:
    """Reads ``path`` in format ``fmt`` (one of FORMATS, or "auto" to detect)."""
    if fmt == "auto":
        fmt = detect_format(path)
        log.info("%s: detected format %r", path, fmt)
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS} or 'auto'")
    raw = READERS[fmt](path)
    log.info("%s: %d users, %d interactions", path, len(raw.users), raw.num_interactions)
    return raw


# ----------------------------------------------------------------------------------------------------
# Item-id mapping and flat encoding
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemMap:
    """Raw item id <-> model item id (1..num_items; 0 is padding). ``id_to_raw[0]`` is None."""

    id_to_raw: tuple[str | None, ...]

    @property
    def num_items(self) -> int:
        return len(self.id_to_raw) - 1

    @property
    def raw_to_id(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.id_to_raw) if i}

    @classmethod
    def build(cls, raw_items: Iterable[str]) -> "ItemMap":
        """Numbers the distinct raw ids 1..n in ascending (numeric if all integers) order."""
        distinct = set(raw_items)
        if not distinct:
            raise ValueError("no items to map")
        if all(_is_int(r) for r in distinct):
            ordered = sorted(distinct, key=int)
        else:
            ordered = sorted(distinct)
        return cls((None, *ordered))

    def to_json_dict(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "padding_id": 0, "id_to_raw": list(self.id_to_raw)}

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "ItemMap":
        ids = d["id_to_raw"]
        if not ids or ids[0] is not None or len(ids) - 1 != d.get("num_items", len(ids) - 1):
            raise ValueError("invalid item map: id_to_raw must start with null (padding) and match num_items")
        return cls(tuple(ids))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json_dict(), f)

    @classmethod
    def load(cls, path: str) -> "ItemMap":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_json_dict(json.load(f))


@dataclass
class SequenceData:
    """All users' remapped sequences, concatenated.

    items:   int32 [I]        model item ids of every interaction, user after user, time order.
    offsets: int64 [U + 1]    user u owns items[offsets[u]:offsets[u + 1]].
    users:   list[str]        raw user ids.
    """

    items: np.ndarray
    offsets: np.ndarray
    users: list[str]
    item_map: ItemMap
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return self.item_map.num_items

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode(raw: RawInteractions, item_map: ItemMap | None = None) -> SequenceData:
    """Remaps raw ids to model ids. With a given ``item_map`` unknown items are dropped (count logged)."""
    if item_map is None:
        item_map = ItemMap.build(i for s in raw.sequences for i in s)
    lookup = item_map.raw_to_id
    stats = dict(raw.stats)
    unknown = 0
    users: list[str] = []
    flat: list[int] = []
    lengths: list[int] = []
    for user, seq in zip(raw.users, raw.sequences):
        ids = [lookup.get(i, 0) for i in seq]
        kept = [i for i in ids if i]
        unknown += len(ids) - len(kept)
        if kept:
            users.append(user)
            flat.extend(kept)
            lengths.append(len(kept))
    empty = len(raw.users) - len(users)
    if unknown:
        log.warning("%s: dropped %d interaction(s) with items unknown to the item map", raw.source, unknown)
    if empty:
        log.warning("%s: dropped %d user(s) left without any known item", raw.source, empty)
    if not flat:
        raise ValueError(f"{raw.source}: no interaction with a known item")
    stats.update(unknown_item_interactions=unknown, users_without_known_items=empty)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SequenceData(np.asarray(flat, np.int32), offsets, users, item_map, stats)


# ----------------------------------------------------------------------------------------------------
# Leave-one-out split and example indices
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    """Windows of the flat item array: example e covers items[max(starts[e], ends[e] - N):ends[e]].

    starts, ends: int64 [E] absolute positions in ``SplitData.items``; ``users``: int64 [E] user index.
    """

    starts: np.ndarray
    ends: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return int(self.ends.shape[0])

    def take(self, idx: np.ndarray) -> "Examples":
        return Examples(self.starts[idx], self.ends[idx], self.users[idx])


@dataclass
class SplitData:
    """Leave-one-out split of a ``SequenceData``.

    train_len: int64 [U]  length of each user's training part (items[offsets[u]:offsets[u] + train_len[u]]).
    valid / test: eval examples (input = the user's items before the target, target = items[end]).
    """

    data: SequenceData
    train_len: np.ndarray
    valid: Examples
    test: Examples
    stats: dict[str, int]

    @property
    def items(self) -> np.ndarray:
        return self.data.items

    @property
    def offsets(self) -> np.ndarray:
        return self.data.offsets

    @property
    def num_items(self) -> int:
        return self.data.num_items


def leave_one_out(data: SequenceData, short_users: str = "train") -> SplitData:
    """Last item -> test, second-to-last -> valid, the rest -> train; users with < 3 items see module doc."""
    if short_users not in SHORT_USER_POLICIES:
        raise ValueError(f"short_users must be one of {SHORT_USER_POLICIES}, got {short_users!r}")
    lengths = data.lengths
    starts = data.offsets[:-1]
    long_enough = lengths >= 3
    n_short = int((~long_enough).sum())
    if n_short:
        what = ("their items are used for training only" if short_users == "train"
                else "they are ignored")
        log.warning("%d user(s) have fewer than 3 items and cannot be split leave-one-out; %s",
                    n_short, what)
    if short_users == "train":
        train_len = np.where(long_enough, lengths - 2, lengths)
    else:
        train_len = np.where(long_enough, lengths - 2, 0)
    eval_users = np.flatnonzero(long_enough)
    if eval_users.size == 0:
        raise ValueError("no user has at least 3 items: nothing to validate or test on")
    ustarts = starts[eval_users]
    valid = Examples(ustarts, ustarts + lengths[eval_users] - 2, eval_users)
    test = Examples(ustarts, ustarts + lengths[eval_users] - 1, eval_users)
    stats = dict(data.stats)
    stats.update(users=data.num_users, items=data.num_items, interactions=int(lengths.sum()),
                 eval_users=int(eval_users.size), short_users=n_short,
                 short_user_interactions=int(lengths[~long_enough].sum()),
                 train_interactions=int(train_len.sum()))
    return SplitData(data, train_len.astype(np.int64), valid, test, stats)


def _segments_arange(seg_start: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments with ``counts[s]`` elements: (segment id, index within segment) of every element."""
    counts = np.maximum(counts, 0)
    seg = np.repeat(np.arange(counts.size), counts)
    first = np.cumsum(counts) - counts
    within = np.arange(seg.size) - first[seg]
    return seg, within


def prefix_examples(split: SplitData, include_target: bool = False) -> Examples:
    """Prefix augmentation: for training part t (length T) the examples t[:j] -> t[j] for j = 1..T-1.

    With ``include_target`` (masked-item objective) each example window is t[:j + 1] instead.
    """
    starts = split.offsets[:-1]
    seg, j = _segments_arange(starts, split.train_len - 1)
    ends = starts[seg] + j + 1 + (1 if include_target else 0)
    return Examples(starts[seg], ends, seg.astype(np.int64))


def window_examples(split: SplitData, max_len: int, include_target: bool = False) -> Examples:
    """All-positions windows: every training target predicted exactly once, up to N per example.

    Causal (``include_target=False``): the inputs t[0:T-1] of each user's training part are cut into
    windows of ``max_len`` aligned at the end (the most recent window is full, only the oldest may be
    shorter); a window (start, end) has inputs items[begin:end] and targets items[begin + 1:end + 1].
    Masked (``include_target=True``): the whole training part t[0:T] is cut the same way.
    """
    _positive(max_len, "max_len")
    starts = split.offsets[:-1]
    seg_len = split.train_len - (0 if include_target else 1)
    n_windows = -(-np.maximum(seg_len, 0) // max_len)
    seg, k = _segments_arange(starts, n_windows)
    ends = starts[seg] + seg_len[seg] - k * max_len
    return Examples(starts[seg], ends, seg.astype(np.int64))


def _positive(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Vectorised batch assembly
# ----------------------------------------------------------------------------------------------------


def gather_windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded windows items[max(start, end - N):end] as one fancy-index.

    items int32 [I]; starts, ends int [B] with start < end -> (seq int32 [B, N], lengths int32 [B]).
    """
    lens = np.minimum(ends - starts, max_len)
    begins = ends - lens
    cols = np.arange(max_len)
    valid = cols[None, :] < lens[:, None]
    pos = np.where(valid, begins[:, None] + cols[None, :], 0)
    seq = np.where(valid, items[pos], 0).astype(np.int32)
    return seq, lens.astype(np.int32)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_shape(num_examples: int, batch_size: int, num_devices: int) -> tuple[int, int]:
    """(examples per batch, padded batch rows): min(batch_size, num_examples) real examples, padded with
    weight-0 rows up to a multiple of ``num_devices`` so that every device gets the same share."""
    _positive(batch_size, "batch_size")
    _positive(num_devices, "num_devices")
    per_batch = max(1, min(batch_size, num_examples))
    return per_batch, round_up(per_batch, num_devices)


def make_batch(items: np.ndarray, ex: Examples, idx: np.ndarray, batch: int, max_len: int,
               target: str) -> dict[str, np.ndarray]:
    """Assembles examples ``idx`` (at most ``batch``) into a padded batch of exactly ``batch`` rows.

    Rows beyond ``len(idx)`` repeat example ``idx[0]`` with weight 0 (masked). ``target`` selects:
      "next"   -> target int32 [B]     = items[end]                (prefix objective, evaluation)
      "shift"  -> target int32 [B, N]  = window shifted by one, 0 past the length (all-positions)
      "none"   -> no target (masked-item objective: the targets are the inputs themselves)
    Returns seq int32 [B, N], len int32 [B], weight float32 [B], user int64 [B] (+ target).
    """
    n = idx.shape[0]
    if n == 0 or n > batch:
        raise ValueError(f"need 1..{batch} examples for a batch, got {n}")
    full = np.concatenate([idx, np.full(batch - n, idx[0], idx.dtype)])
    starts, ends = ex.starts[full], ex.ends[full]
    seq, lens = gather_windows(items, starts, ends, max_len)
    out = {"seq": seq, "len": lens,
           "weight": (np.arange(batch) < n).astype(np.float32), "user": ex.users[full]}
    if target == "next":
        out["target"] = items[ends].astype(np.int32)
    elif target == "shift":
        out["target"] = gather_windows(items, starts + 1, ends + 1, max_len)[0]
    elif target != "none":
        raise ValueError(f"target must be 'next', 'shift' or 'none', got {target!r}")
    return out


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a function of (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_SHUFFLE, epoch]))
    return rng.permutation(n)


@dataclass
class BatchIterator:
    """Fixed-shape batches over ``examples``; shuffled per epoch from (seed, epoch) when ``shuffle``.

    Each batch holds ``per_batch`` examples (the last one possibly fewer) in ``batch`` rows (see
    ``batch_shape``); the padding rows have weight 0.
    """

    items: np.ndarray
    examples: Examples
    batch_size: int
    max_len: int
    target: str
    num_devices: int = 1
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.examples) == 0:
            raise ValueError("no examples to iterate over (is every training sequence too short?)")
        self.per_batch, self.batch = batch_shape(len(self.examples), self.batch_size, self.num_devices)

    @property
    def num_batches(self) -> int:
        return -(-len(self.examples) // self.per_batch)

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields the batches of ``epoch`` from batch index ``start_batch`` on."""
        n = len(self.examples)
        order = epoch_permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)
        for b in range(start_batch, self.num_batches):
            idx = order[b * self.per_batch:(b + 1) * self.per_batch]
            yield make_batch(self.items, self.examples, idx, self.batch, self.max_len, self.target)


def prefetch(iterator: Iterator[Any], size: int, transform: Callable[[Any], Any] = lambda x: x
             ) -> Iterator[Any]:
    """Runs ``transform`` (e.g. host-to-device transfer) on a background thread, ``size`` items ahead.

    ``size <= 0`` disables the thread. Exceptions of the producer are re-raised in the consumer.
    """
    if size <= 0:
        for x in iterator:
            yield transform(x)
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for x in iterator:
                if stop.is_set():
                    return
                q.put(transform(x))
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


# ----------------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------------


def user_item_keys(split: SplitData) -> np.ndarray:
    """Sorted int64 keys ``user * (num_items + 1) + item`` of every (user, item) interaction."""
    users = np.repeat(np.arange(split.data.num_users, dtype=np.int64), split.data.lengths)
    return np.unique(users * (split.num_items + 1) + split.items.astype(np.int64))


def sample_uni100(split: SplitData, ex: Examples, seed: int, stream: int, num_negatives: int = 100
                  ) -> np.ndarray:
    """``num_negatives`` uniform negatives per example, drawn with replacement (as SASRec and RecBole do)
    from the items the user never interacted with (the target is one of the user's items, so it is
    excluded too). Deterministic in (seed, stream). Returns int32 [E, num_negatives].
    """
    keys = user_item_keys(split)
    n_items = split.num_items
    distinct = np.bincount(keys // (n_items + 1), minlength=split.data.num_users)
    if np.any(distinct[ex.users] >= n_items):
        bad = int(ex.users[np.argmax(distinct[ex.users] >= n_items)])
        raise ValueError(f"user {split.data.users[bad]!r} interacted with every item: no negatives")
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_UNI100, stream]))
    out = np.zeros((len(ex), num_negatives), np.int64)
    todo = np.ones(out.shape, bool)
    rows = ex.users.astype(np.int64)[:, None] * (n_items + 1)
    while todo.any():
        cand = rng.integers(1, n_items + 1, size=out.shape)
        key = rows + cand
        pos = np.minimum(keys.searchsorted(key), keys.size - 1)
        ok = todo & (keys[pos] != key)
        out[ok] = cand[ok]
        todo &= ~ok
    return out.astype(np.int32)


def item_counts(split: SplitData) -> np.ndarray:
    """Training-part interaction count of every item id: int64 [num_items + 1] (index 0 is 0)."""
    starts = split.offsets[:-1]
    seg, j = _segments_arange(starts, split.train_len)
    return np.bincount(split.items[starts[seg] + j], minlength=split.num_items + 1).astype(np.int64)
