"""Dense-mask oracle of BlossomRec attention, written line by line from SPEC sections 3-5.

O(N^2) memory and time: for tests and small N only (refuses N > 4096).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from blossom_jax.config import AttentionConfig
from blossom_jax.ops import common

MAX_REFERENCE_LEN = 4096
_HIGHEST = jax.lax.Precision.HIGHEST


def _is_power_of_two(x: jax.Array) -> jax.Array:
    return (x > 0) & ((x & (x - 1)) == 0)


def stis_mask(valid: jax.Array, config: AttentionConfig) -> jax.Array:
    """bool [B, N(query), N(key)] of SPEC section 4."""
    seq_len = valid.shape[1]
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    distance = i - j
    if config.causal:
        pattern = (distance >= 0) & ((distance < config.window) | _is_power_of_two(distance))
    else:
        pattern = (jnp.abs(distance) < config.window) | _is_power_of_two(distance)
    if config.sink:
        sink = j == seq_len - 1
        pattern = pattern | (sink & (distance >= 0) if config.causal else sink)
    return pattern[None] & valid[:, :, None] & valid[:, None, :]


def ltis_selection(q: jax.Array, compressed: jax.Array, valid: jax.Array, config: AttentionConfig):
    """Dense top-n block selection (SPEC 3.3-3.4).

    Args:
      q: float32 [B, N, H, d]; compressed: float32 [B, Hk, Nc, d]; valid: bool [B, N].
    Returns:
      (block_mask bool [B, Hk, N, Nc] of kept blocks, probs float32 [B, Hk, N, Nc]).
    """
    batch, seq_len, _, head_dim = q.shape
    n_blocks = compressed.shape[2]
    stride = config.compress_stride
    mean_query = q.reshape(batch, seq_len, config.num_kv_heads, config.group_size, head_dim).mean(3)
    scores = jnp.einsum("bihd,bhwd->bhiw", mean_query, compressed, precision=_HIGHEST) / jnp.sqrt(head_dim)
    block_end = jnp.arange(n_blocks) * stride + stride - 1
    visible = common.block_validity(valid, config)[:, None, None, :]
    if config.causal:
        visible = visible & (block_end[None, :] < jnp.arange(seq_len)[:, None])[None, None]
    probs = common.selection_probabilities(scores, visible)
    top = min(config.num_selected, n_blocks)
    top_probs, top_index = jax.lax.top_k(jax.lax.stop_gradient(probs), top)
    chosen = jax.nn.one_hot(top_index, n_blocks, dtype=jnp.bool_).any(-2)  # [B, Hk, N, Nc]
    kept_probs = jnp.max(jnp.where(jax.nn.one_hot(top_index, n_blocks, dtype=jnp.bool_),
                                   top_probs[..., None], 0.0), axis=-2)
    block_mask = chosen & (kept_probs > config.keep_threshold)
    return block_mask, probs


def blossom_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    compress_params: Mapping[str, jax.Array],
    valid: jax.Array,
    config: AttentionConfig,
) -> jax.Array:
    """BlossomRec attention with explicit [N, N] masks. Shapes as ``blossom_jax.blossom_attention``."""
    batch, seq_len, num_heads, head_dim = q.shape
    if seq_len > MAX_REFERENCE_LEN:
        raise ValueError(
            f'impl="reference" builds [N, N] masks and is limited to N <= {MAX_REFERENCE_LEN}; got N = '
            f'{seq_len}. Use impl="xla" or "pallas".')
    group = config.group_size
    block = config.selection_block
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf_heads = jnp.repeat(kf, group, axis=2)
    vf_heads = jnp.repeat(vf, group, axis=2)
    scores = jnp.einsum("bihd,bjhd->bhij", qf, kf_heads, precision=_HIGHEST) / jnp.sqrt(head_dim)

    # LTIS (SPEC 3).
    compressed = common.compress_keys(k, compress_params, config)
    n_blocks = compressed.shape[2]
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    key_block = j // block
    ltis = jnp.zeros((batch, config.num_kv_heads, seq_len, seq_len), jnp.bool_)
    scale_keys = jnp.ones((batch, config.num_kv_heads, seq_len, seq_len), jnp.float32)
    if n_blocks > 0:
        block_mask, probs = ltis_selection(qf, compressed, valid, config)
        in_selectable = (j < n_blocks * block)[None, None]
        key_block_clipped = jnp.minimum(key_block, n_blocks - 1)[0]
        selected_keys = jnp.take(block_mask, key_block_clipped, axis=-1) & in_selectable
        if config.mask_padded_block_keys:
            selected_keys = selected_keys & valid[:, None, None, :]
        ltis = ltis | selected_keys
        if config.straight_through:
            key_probs = jnp.take(probs, key_block_clipped, axis=-1)
            scale_keys = jnp.where(selected_keys, common.straight_through_factor(key_probs), 1.0)
    if config.causal:
        own_block = (key_block == (i // block)) & (j <= i)
        ltis = ltis | (own_block[None, None] & valid[:, None, None, :])
    ltis = ltis & valid[:, None, :, None]
    ltis_heads = jnp.repeat(ltis, group, axis=1)
    ltis_weights = common.masked_softmax(scores, ltis_heads) * jnp.repeat(scale_keys, group, axis=1)
    o_ltis = jnp.einsum("bhij,bjhd->bihd", ltis_weights, vf_heads, precision=_HIGHEST)

    # STIS (SPEC 4).
    stis = stis_mask(valid, config)[:, None]
    stis_weights = common.masked_softmax(scores, stis)
    o_stis = jnp.einsum("bhij,bjhd->bihd", stis_weights, vf_heads, precision=_HIGHEST)

    # Gate (SPEC 5).
    gates = gates.astype(jnp.float32)
    out = gates[..., 0:1] * o_ltis + gates[..., 1:2] * o_stis
    out = jnp.where(valid[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)
