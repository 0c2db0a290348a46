"""Training losses. Each ``*_loss(model, variables, batch, rng)`` returns (loss, weight): the weighted mean
loss over the batch's valid targets and the total weight (number of targets) it averaged over.

Batches hold ``seq`` int32 [B, N], ``len`` int32 [B], ``weight`` float32 [B] (0 = padding example) and a
``target`` whose shape depends on the objective. Logits are computed in the model's compute dtype and
accumulated/compared in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
LossFn = Callable[[nn.Module, Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]


def _weighted_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, 1.0), total


def _user_logits(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array) -> jax.Array:
    user = model.apply(variables, batch["seq"], batch["len"], deterministic=False, rngs={"dropout": rng})
    return model.apply(variables, user, method="item_logits").astype(jnp.float32)  # [B, V]


def next_item_ce_loss(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Softmax CE of target int32 [B] over all item ids (column 0 included, as the reference)."""
    logits = _user_logits(model, variables, batch, rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
    return _weighted_mean(ce, batch["weight"])


def sample_negatives(rng: jax.Array, targets: jax.Array, num_items: int) -> jax.Array:
    """One uniform negative per target from 1..num_items, never the target itself: int32 like targets."""
    if num_items < 2:
        raise ValueError(f"BPR needs at least 2 items, got num_items={num_items}")
    neg = jax.random.randint(rng, targets.shape, 1, num_items, dtype=jnp.int32)  # 1..num_items-1
    return jnp.where(neg >= targets, neg + 1, neg)


def next_item_bpr_loss(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """BPR: -log sigmoid(s(target) - s(negative)) with one uniform negative per example."""
    drop_rng, neg_rng = jax.random.split(rng)
    logits = _user_logits(model, variables, batch, drop_rng)
    neg = sample_negatives(neg_rng, batch["target"], model.config.num_items)
    pos_s = jnp.take_along_axis(logits, batch["target"][:, None], axis=1)[:, 0]
    neg_s = jnp.take_along_axis(logits, neg[:, None], axis=1)[:, 0]
    return _weighted_mean(-jax.nn.log_sigmoid(pos_s - neg_s), batch["weight"])


def all_positions_ce_loss(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
    """Next-item CE at every valid position: target int32 [B, N] (the window shifted by one).

    Averaged over all valid positions of the batch (token-level mean).
    """
    hidden = model.apply(variables, batch["seq"], batch["len"], deterministic=False,
                         rngs={"dropout": rng}, method="encode")  # [B, N, D]
    logits = model.apply(variables, hidden, method="item_logits").astype(jnp.float32)  # [B, N, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
    n = batch["seq"].shape[1]
    weights = batch["weight"][:, None] * (jnp.arange(n)[None, :] < batch["len"][:, None])
    return _weighted_mean(ce, weights)


def masked_positions(rng: jax.Array, lengths: jax.Array, max_len: int, ratio: float
                     ) -> tuple[jax.Array, jax.Array]:
    """Chooses round(ratio * len) (at least 1) distinct valid positions per row, uniformly at random.

    lengths int [B] -> (positions int32 [B, M], selected bool [B, M]) with M = max(1, ceil(ratio * N));
    only the first ``count`` entries of a row are selected, the rest are filler positions.
    """
    num_slots = max(1, math.ceil(ratio * max_len))
    keys = jax.random.uniform(rng, (lengths.shape[0], max_len))
    keys = jnp.where(jnp.arange(max_len)[None, :] < lengths[:, None], keys, 2.0)  # invalid last
    positions = jnp.argsort(keys, axis=1)[:, :num_slots].astype(jnp.int32)
    count = jnp.maximum(1, jnp.floor(ratio * lengths + 0.5)).astype(jnp.int32)
    return positions, jnp.arange(num_slots)[None, :] < count[:, None]


def masked_item_loss(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array, ratio: float
                     ) -> tuple[jax.Array, jax.Array]:
    """BERT4Rec objective: replace the chosen positions by the mask token, CE on them only.

    ``seq`` holds the whole window including the last (target) item; no ``target`` entry is needed.
    """
    mask_rng, drop_rng = jax.random.split(rng)
    seq = batch["seq"]
    rows = jnp.arange(seq.shape[0])[:, None]
    positions, selected = masked_positions(mask_rng, batch["len"], seq.shape[1], ratio)
    targets = seq[rows, positions]  # [B, M]
    masked = seq.at[rows, positions].set(jnp.where(selected, model.config.mask_token_id, targets))
    if model.config.last_layer_rows:  # the last layer only at the masked positions (exact, see ModelConfig)
        hidden = model.apply(variables, masked, batch["len"], deterministic=False, rngs={"dropout": drop_rng},
                             method="encode", query_positions=positions)
    else:
        hidden = model.apply(variables, masked, batch["len"], deterministic=False, rngs={"dropout": drop_rng},
                             method="encode")[rows, positions]
    logits = model.apply(variables, hidden, method="item_logits").astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _weighted_mean(ce, batch["weight"][:, None] * selected)


def select_loss(objective: str, loss: str, bidirectional: bool, mask_ratio: float) -> tuple[LossFn, str]:
    """(loss function, batch target kind for ``train.data.make_batch``) of a configuration."""
    if bidirectional:
        return (lambda m, v, b, r: masked_item_loss(m, v, b, r, mask_ratio)), "none"
    if objective == "all-positions":
        if loss != "ce":
            raise ValueError(f"objective 'all-positions' supports loss 'ce' only, got {loss!r}")
        return all_positions_ce_loss, "shift"
    if objective != "prefix":
        raise ValueError(f"objective must be 'prefix' or 'all-positions', got {objective!r}")
    if loss == "ce":
        return next_item_ce_loss, "next"
    if loss == "bpr":
        return next_item_bpr_loss, "next"
    raise ValueError(f"loss must be 'ce' or 'bpr', got {loss!r}")
