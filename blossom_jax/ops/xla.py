"""Sparse BlossomRec attention in plain XLA: every query touches only the keys it uses.

* STIS: the key set of query i is {i - o : o in O} for a fixed offset list O (plus the sink), so each
  offset is one shifted copy of K/V (pad + slice): no gather, and the backward is a shift too.
* LTIS: queries are processed in chunks of ``config.query_chunk`` (``lax.map`` over rematerialised
  chunks). Per chunk: compressed scoring [B, Hk, C, Nc], top-n selection, a gather of the selected key
  blocks [B, Hk, C, n, b, d] and the query's own causal block (a block-local [b, b] attention). Nothing
  of size [N, N] or [N, Nc] for all N exists at once.
Softmax and accumulation run in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from blossom_jax.config import AttentionConfig
from blossom_jax.ops import common


def stis_offsets(seq_len: int, config: AttentionConfig) -> list[int]:
    """Offsets o (key = query - o) of the STIS pattern, sink excluded, in increasing order."""
    offsets = set(range(config.window))
    power = 1
    while power < seq_len:
        offsets.add(power)
        power *= 2
    if not config.causal:
        offsets.update(-o for o in range(1, config.window))
    return sorted(o for o in offsets if -seq_len < o < seq_len)


def _shift(x: jax.Array, offset: int) -> jax.Array:
    """y[:, i] = x[:, i - offset] (zero where i - offset is out of range); x is [B, N, ...]."""
    seq_len = x.shape[1]
    pad = [(0, 0)] * x.ndim
    if offset >= 0:
        pad[1] = (offset, 0)
        return jnp.pad(x, pad)[:, :seq_len]
    pad[1] = (0, -offset)
    return jnp.pad(x, pad)[:, -offset:]


def stis_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                   config: AttentionConfig) -> jax.Array:
    """Power-pattern attention (SPEC 4).

    Args:
      q: float32 [B, N, Hk, G, d]; k, v: float32 [B, N, Hk, d]; valid: bool [B, N].
    Returns:
      float32 [B, N, Hk, G, d] (0 where a query has no valid key).
    """
    seq_len, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    offsets = stis_offsets(seq_len, config)
    keys = [_shift(k, o) for o in offsets]
    values = [_shift(v, o) for o in offsets]
    key_valid = [_shift(valid, o) for o in offsets]
    if config.sink and not config.causal:
        # The sink j = N-1 is an extra key only for queries whose window does not already hold it.
        positions = jnp.arange(seq_len)
        keys.append(jnp.broadcast_to(k[:, -1:], k.shape))
        values.append(jnp.broadcast_to(v[:, -1:], v.shape))
        key_valid.append(valid[:, -1:] & (seq_len - 1 - positions >= config.window)[None, :])
    keys = jnp.stack(keys, axis=3)  # [B, N, Hk, T, d]
    values = jnp.stack(values, axis=3)
    scores = jnp.einsum("bnhgd,bnhtd->bnhgt", q, keys) * scale
    mask = jnp.stack(key_valid, axis=-1)[:, :, None, None, :] & valid[:, :, None, None, None]
    weights = common.masked_softmax(scores, mask)
    return jnp.einsum("bnhgt,bnhtd->bnhgd", weights, values)


def _select_chunk(mean_query: jax.Array, compressed: jax.Array, block_valid: jax.Array,
                  query_pos: jax.Array, config: AttentionConfig):
    """Top-n selection for one chunk of queries.

    Args:
      mean_query: float32 [B, C, Hk, d]; compressed: float32 [B, Hk, Nc, d]; block_valid: bool [B, Nc];
      query_pos: int [C] or [B, C] absolute query positions.
    Returns:
      selected_blocks int32 [B, Hk, C, n'], kept bool [B, Hk, C, n'], selected_probs float32 [B, Hk, C, n']
      with n' = min(n, Nc).
    """
    n_blocks, head_dim = compressed.shape[2], compressed.shape[3]
    stride = config.compress_stride
    scores = jnp.einsum("bchd,bhwd->bhcw", mean_query, compressed) / jnp.sqrt(jnp.float32(head_dim))
    visible = block_valid[:, None, None, :]
    if config.causal:
        block_end = jnp.arange(n_blocks) * stride + stride - 1
        before = block_end < query_pos[..., None]  # [C, Nc] or [B, C, Nc]
        visible = visible & (before[None, None] if before.ndim == 2 else before[:, None])
    probs = common.selection_probabilities(scores, visible)
    top_probs, selected = jax.lax.top_k(jax.lax.stop_gradient(probs), min(config.num_selected, n_blocks))
    kept = top_probs > config.keep_threshold
    selected_probs = jnp.take_along_axis(probs, selected, axis=-1)
    return selected.astype(jnp.int32), kept, selected_probs


def _gather_blocks(blocks: jax.Array, selected: jax.Array) -> jax.Array:
    """blocks [B, Hk, Nc, b, d], selected int [B, Hk, C, n] -> [B, Hk, C, n, b, d]."""
    batch, kv_heads, n_blocks, block, head_dim = blocks.shape
    chunk, count = selected.shape[2], selected.shape[3]
    flat_blocks = blocks.reshape(batch * kv_heads, n_blocks, block * head_dim)
    flat_index = selected.reshape(batch * kv_heads, chunk * count)
    gathered = jax.vmap(lambda table, rows: table[rows])(flat_blocks, flat_index)
    return gathered.reshape(batch, kv_heads, chunk, count, block, head_dim)


def _selectable_blocks(k: jax.Array, v: jax.Array, valid: jax.Array, n_blocks: int, block: int):
    """k, v [B, N, Hk, d], valid [B, N] -> key and value blocks [B, Hk, Nc, b, d] of the first Nc * b
    positions and their key validity bool [B, Nc, b]."""
    batch, _, kv_heads, head_dim = k.shape
    key_blocks, value_blocks = (jnp.transpose(
        x[:, : n_blocks * block].reshape(batch, n_blocks, block, kv_heads, head_dim), (0, 3, 1, 2, 4))
        for x in (k, v))
    return key_blocks, value_blocks, valid[:, : n_blocks * block].reshape(batch, n_blocks, block)


def _ltis_chunk(q_chunk, k_chunk, v_chunk, valid_chunk, chunk_start, key_blocks, value_blocks,
                block_key_valid, compressed, block_valid, config: AttentionConfig):
    """LTIS output for one query chunk.

    Args:
      q_chunk: float32 [B, C, Hk, G, d]; k_chunk, v_chunk: float32 [B, C, Hk, d] (same positions);
      valid_chunk: bool [B, C]; chunk_start: int scalar; key_blocks, value_blocks: float32
      [B, Hk, Nc, b, d]; block_key_valid: bool [B, Nc, b]; compressed: [B, Hk, Nc, d];
      block_valid: bool [B, Nc].
    Returns:
      float32 [B, C, Hk, G, d].
    """
    batch, chunk, kv_heads, group, head_dim = q_chunk.shape
    block = config.selection_block
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    score_parts, mask_parts, value_parts, factor_parts = [], [], [], []

    n_blocks = compressed.shape[2]
    if n_blocks > 0:
        query_pos = chunk_start + jnp.arange(chunk)
        selected, kept, selected_probs = _select_chunk(
            q_chunk.mean(3), compressed, block_valid, query_pos, config)
        count = selected.shape[-1]
        sel_keys = _gather_blocks(key_blocks, selected)  # [B, Hk, C, n, b, d]
        sel_values = _gather_blocks(value_blocks, selected)
        sel_scores = jnp.einsum("bchgd,bhcnkd->bchgnk", q_chunk, sel_keys) * scale
        sel_mask = jnp.broadcast_to(jnp.transpose(kept, (0, 2, 1, 3))[:, :, :, None, :, None],
                                    sel_scores.shape)
        if config.mask_padded_block_keys:
            key_ok = jax.vmap(lambda table, rows: table[rows])(block_key_valid, selected.reshape(batch, -1))
            key_ok = jnp.transpose(key_ok.reshape(batch, kv_heads, chunk, count, block), (0, 2, 1, 3, 4))
            sel_mask = sel_mask & key_ok[:, :, :, None]
        factor = jnp.ones(sel_scores.shape[:-1], jnp.float32)
        if config.straight_through:
            st = common.straight_through_factor(jnp.transpose(selected_probs, (0, 2, 1, 3)))
            factor = jnp.broadcast_to(st[:, :, :, None, :], factor.shape)
        shape = (batch, chunk, kv_heads, group, count * block)
        score_parts.append(sel_scores.reshape(shape))
        mask_parts.append(sel_mask.reshape(shape))
        factor_parts.append(jnp.repeat(factor, block, axis=-1).reshape(shape))
        value_parts.append(("selected", jnp.transpose(sel_values, (0, 2, 1, 3, 4, 5))))

    if config.causal:
        # Own block: positions floor(i/b)*b ... i. Chunks start at multiples of b, so blocks are local.
        n_local = chunk // block
        q_local = q_chunk.reshape(batch, n_local, block, kv_heads, group, head_dim)
        k_local = k_chunk.reshape(batch, n_local, block, kv_heads, head_dim)
        own_scores = jnp.einsum("bqihgd,bqjhd->bqihgj", q_local, k_local) * scale
        causal = jnp.arange(block)[:, None] >= jnp.arange(block)[None, :]  # [i, j]
        own_mask = causal[None, None, :, None, None, :] & valid_chunk.reshape(
            batch, n_local, 1, 1, 1, block)
        shape = (batch, chunk, kv_heads, group, block)
        score_parts.append(own_scores.reshape(shape))
        mask_parts.append(jnp.broadcast_to(own_mask, own_scores.shape).reshape(shape))
        factor_parts.append(jnp.ones(shape, jnp.float32))
        value_parts.append(("own", v_chunk.reshape(batch, n_local, block, kv_heads, head_dim)))

    if not score_parts:
        return jnp.zeros_like(q_chunk)
    scores = jnp.concatenate(score_parts, axis=-1)
    mask = jnp.concatenate(mask_parts, axis=-1) & valid_chunk[:, :, None, None, None]
    weights = common.masked_softmax(scores, mask) * jnp.concatenate(factor_parts, axis=-1)
    out = jnp.zeros_like(q_chunk)
    start = 0
    for kind, values in value_parts:
        if kind == "selected":  # values [B, C, Hk, n, b, d]
            width = values.shape[3] * block
            part = weights[..., start:start + width].reshape(*weights.shape[:-1], values.shape[3], block)
            out = out + jnp.einsum("bchgnk,bchnkd->bchgd", part, values)
        else:  # own block values [B, C/b, b, Hk, d]
            width = block
            part = weights[..., start:start + width].reshape(batch, chunk // block, block, kv_heads, group, block)
            out = out + jnp.einsum("bqihgj,bqjhd->bqihgd", part, values).reshape(out.shape)
        start += width
    return out


def ltis_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                   compressed: jax.Array, config: AttentionConfig) -> jax.Array:
    """Selected-block attention (SPEC 3) over query chunks.

    Args:
      q: float32 [B, N, Hk, G, d]; k, v: float32 [B, N, Hk, d]; valid: bool [B, N];
      compressed: float32 [B, Hk, Nc, d].
    Returns:
      float32 [B, N, Hk, G, d].
    """
    batch, seq_len, kv_heads, group, head_dim = q.shape
    block = config.selection_block
    n_blocks = compressed.shape[2]
    chunk = min(config.query_chunk, -(-seq_len // block) * block)
    n_chunks = -(-seq_len // chunk)
    padded_len = n_chunks * chunk
    pad = padded_len - seq_len

    def pad_seq(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    key_blocks, value_blocks, block_key_valid = _selectable_blocks(k, v, valid, n_blocks, block)
    block_valid = block_key_valid.any(-1)

    def to_chunks(x):
        x = pad_seq(x)
        x = x.reshape(batch, n_chunks, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def run_chunk(args):
        q_c, k_c, v_c, valid_c, start = args
        return _ltis_chunk(q_c, k_c, v_c, valid_c, start, key_blocks, value_blocks, block_key_valid,
                           compressed, block_valid, config)

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    chunks = (to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(valid), starts)
    if n_chunks == 1:
        out = run_chunk(jax.tree.map(lambda x: x[0], chunks))[None]
    else:
        out = jax.lax.map(jax.checkpoint(run_chunk), chunks)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded_len, kv_heads, group, head_dim)
    return out[:, :seq_len]


def blossom_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    compress_params: Mapping[str, jax.Array],
    valid: jax.Array,
    config: AttentionConfig,
) -> jax.Array:
    """Sparse BlossomRec attention. Shapes as ``blossom_jax.blossom_attention``."""
    batch, seq_len, num_heads, head_dim = q.shape
    kv_heads, group = config.num_kv_heads, config.group_size
    if config.causal:
        # Values at padded positions never matter in causal mode: zero them so NaN cannot leak.
        q, k, v = (jnp.where(valid[:, :, None, None], x, 0) for x in (q, k, v))
    qf = q.astype(jnp.float32).reshape(batch, seq_len, kv_heads, group, head_dim)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    compressed = common.compress_keys(k, compress_params, config)
    o_ltis = ltis_attention(qf, kf, vf, valid, compressed, config)
    o_stis = stis_attention(qf, kf, vf, valid, config)
    gates = gates.astype(jnp.float32).reshape(batch, seq_len, kv_heads, group, 2)
    out = gates[..., 0:1] * o_ltis + gates[..., 1:2] * o_stis
    out = jnp.where(valid[:, :, None, None, None], out, 0.0)
    return out.reshape(batch, seq_len, num_heads, head_dim).astype(q.dtype)


def _rows_attention(q, scores_mask_values, scale):
    """One softmax over the concatenation of several key sets of each query row.

    q: float32 [B, Q, Hk, G, d]; scores_mask_values: list of (keys [B, Q, Hk, T, d], mask bool broadcastable
    to [B, Q, Hk, G, T], values [B, Q, Hk, T, d], factor float32 broadcastable to [B, Q, Hk, G, T]).
    Returns float32 [B, Q, Hk, G, d].
    """
    scores = jnp.concatenate([jnp.einsum("bqhgd,bqhtd->bqhgt", q, keys) * scale
                              for keys, _, _, _ in scores_mask_values], axis=-1)
    shape = scores.shape
    mask = jnp.concatenate([jnp.broadcast_to(m, shape[:-1] + (keys.shape[3],))
                            for keys, m, _, _ in scores_mask_values], axis=-1)
    factor = jnp.concatenate([jnp.broadcast_to(f, shape[:-1] + (keys.shape[3],))
                              for keys, _, _, f in scores_mask_values], axis=-1)
    values = jnp.concatenate([v for _, _, v, _ in scores_mask_values], axis=3)
    weights = common.masked_softmax(scores, mask) * factor
    return jnp.einsum("bqhgt,bqhtd->bqhgd", weights, values)


def blossom_attention_rows_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    compress_params: Mapping[str, jax.Array],
    valid: jax.Array,
    query_positions: jax.Array,
    config: AttentionConfig,
) -> jax.Array:
    """BlossomRec attention of a few query positions per row against every key (SPEC 3-5).

    Args:
      q: rotated queries [B, Q, H, d] at ``query_positions`` int [B, Q] (each in 0..N-1);
      k, v: [B, N, Hk, d] at every position; gates: [B, Q, H, 2]; valid: bool [B, N].
    Returns:
      [B, Q, H, d] in q's dtype: rows ``query_positions`` of ``blossom_attention_xla``'s output (0 where
      the query position is invalid). Gathers O(Q * (n * b + b + |STIS|)) keys per row, nothing of size N
      per query.
    """
    batch, rows, num_heads, head_dim = q.shape
    seq_len = k.shape[1]
    kv_heads, group, block = config.num_kv_heads, config.group_size, config.selection_block
    query_valid = common.take_rows(valid, query_positions)  # [B, Q]
    if config.causal:
        q = jnp.where(query_valid[:, :, None, None], q, 0)
        k, v = (jnp.where(valid[:, :, None, None], x, 0) for x in (k, v))
    qf = q.astype(jnp.float32).reshape(batch, rows, kv_heads, group, head_dim)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    row_ok = query_valid[:, :, None, None, None]

    def gather_keys(positions):
        """positions int [B, Q, T] (may be out of range) -> keys, values [B, Q, Hk, T, d], in-range bool."""
        inside = (positions >= 0) & (positions < seq_len)
        flat = jnp.clip(positions, 0, seq_len - 1).reshape(batch, -1)
        keys, values = (jnp.moveaxis(common.take_rows(x, flat).reshape(batch, rows, -1, kv_heads, head_dim),
                                     2, 3) for x in (kf, vf))
        key_ok = inside & common.take_rows(valid, flat).reshape(positions.shape)
        return keys, values, key_ok

    # LTIS: kept selected blocks + (causal) the own block, one softmax.
    ltis_parts = []
    compressed = common.compress_keys(k, compress_params, config)
    n_blocks = compressed.shape[2]
    ones = jnp.ones((), jnp.float32)
    if n_blocks > 0:
        key_blocks, value_blocks, block_key_valid = _selectable_blocks(kf, vf, valid, n_blocks, block)
        selected, kept, selected_probs = _select_chunk(qf.mean(3), compressed, block_key_valid.any(-1),
                                                       query_positions, config)  # [B, Hk, Q, n]
        count = selected.shape[-1]
        to_rows = lambda x: jnp.moveaxis(x, 2, 1)  # [B, Hk, Q, ...] -> [B, Q, Hk, ...]  # noqa: E731
        sel_keys, sel_values = (to_rows(_gather_blocks(x, selected)).reshape(
            batch, rows, kv_heads, count * block, head_dim) for x in (key_blocks, value_blocks))
        sel_mask = jnp.repeat(to_rows(kept), block, axis=-1)  # [B, Q, Hk, n*b]
        if config.mask_padded_block_keys:
            key_ok = jax.vmap(lambda table, index: table[index])(block_key_valid, selected.reshape(batch, -1))
            sel_mask = sel_mask & to_rows(key_ok.reshape(batch, kv_heads, rows, count * block))
        factor = ones
        if config.straight_through:
            factor = jnp.repeat(common.straight_through_factor(to_rows(selected_probs)), block,
                                axis=-1)[:, :, :, None]
        ltis_parts.append((sel_keys, sel_mask[:, :, :, None], sel_values, factor))
    if config.causal:
        own = (query_positions // block * block)[..., None] + jnp.arange(block)  # [B, Q, b]
        own_keys, own_values, own_ok = gather_keys(own)
        own_ok = own_ok & (own <= query_positions[..., None])
        ltis_parts.append((own_keys, own_ok[:, :, None, None], own_values, ones))
    if ltis_parts:
        o_ltis = jnp.where(row_ok, _rows_attention(qf, ltis_parts, scale), 0.0)
    else:
        o_ltis = jnp.zeros_like(qf)

    # STIS: the fixed offset pattern (and the bidirectional sink), its own softmax.
    offsets = jnp.asarray(stis_offsets(seq_len, config), jnp.int32)
    stis_pos = query_positions[..., None] - offsets  # [B, Q, T]
    stis_keys, stis_values, stis_ok = gather_keys(stis_pos)
    stis_parts = [(stis_keys, stis_ok[:, :, None, None], stis_values, ones)]
    if config.sink and not config.causal:
        sink_pos = jnp.full(query_positions.shape + (1,), seq_len - 1, jnp.int32)
        sink_keys, sink_values, sink_ok = gather_keys(sink_pos)
        sink_ok = sink_ok & (seq_len - 1 - query_positions >= config.window)[..., None]
        stis_parts.append((sink_keys, sink_ok[:, :, None, None], sink_values, ones))
    o_stis = jnp.where(row_ok, _rows_attention(qf, stis_parts, scale), 0.0)

    gates = gates.astype(jnp.float32).reshape(batch, rows, kv_heads, group, 2)
    out = gates[..., 0:1] * o_ltis + gates[..., 1:2] * o_stis
    return out.reshape(batch, rows, num_heads, head_dim).astype(q.dtype)
