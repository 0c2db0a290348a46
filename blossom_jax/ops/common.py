"""Pieces shared by every implementation: the key compression MLP and small numeric helpers."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from blossom_jax.config import AttentionConfig

#: Logit of the extra "no block" column prepended before the selection softmax (SPEC 3.4).
SELECTION_PAD_LOGIT = -1000.0

COMPRESS_PARAM_NAMES = ("intrablock_positions", "w1", "b1", "w2", "b2")


def compress_param_shapes(config: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """Expected shapes of the compression parameters (weights are [in, out])."""
    width = config.compress_block * config.head_dim
    return {
        "intrablock_positions": (config.num_kv_heads, config.compress_block, config.head_dim),
        "w1": (width, width),
        "b1": (width,),
        "w2": (width, config.head_dim),
        "b2": (config.head_dim,),
    }


def num_compressed_blocks(seq_len: int, config: AttentionConfig) -> int:
    """Nc = floor(N / s)."""
    return seq_len // config.compress_stride


def compress_keys(k: jax.Array, params: Mapping[str, jax.Array], config: AttentionConfig) -> jax.Array:
    """Compressed keys of SPEC 3.1-3.2.

    Args:
      k: rotated keys [B, N, Hk, d].
      params: ``intrablock_positions`` [Hk, l, d], ``w1`` [l*d, l*d], ``b1`` [l*d], ``w2`` [l*d, d], ``b2`` [d].
    Returns:
      float32 [B, Hk, Nc, d]; Nc may be 0.
    """
    batch, seq_len, kv_heads, head_dim = k.shape
    length, stride = config.compress_block, config.compress_stride
    n_blocks = num_compressed_blocks(seq_len, config)
    if n_blocks == 0:
        return jnp.zeros((batch, kv_heads, 0, head_dim), jnp.float32)
    # Window w covers positions w*s - (l - s) ... w*s + s - 1; positions < 0 read as zeros.
    # Matmul operands in the keys' dtype (bfloat16 stays bfloat16), accumulation in float32.
    dtype = k.dtype
    padded = jnp.pad(k, ((0, 0), (length - stride, 0), (0, 0), (0, 0)))
    window_rows = jnp.arange(n_blocks)[:, None] * stride + jnp.arange(length)[None, :]  # [Nc, l]
    windows = padded[:, window_rows]  # [B, Nc, l, Hk, d]
    windows = (jnp.transpose(windows, (0, 3, 1, 2, 4)).astype(jnp.float32)
               + params["intrablock_positions"][None, :, None])
    flat = windows.reshape(batch, kv_heads, n_blocks, length * head_dim)  # slot-major: slot*d + feature
    hidden = jnp.dot(flat.astype(dtype), params["w1"].astype(dtype), preferred_element_type=jnp.float32)
    hidden = jax.nn.relu(hidden + params["b1"])
    compressed = jnp.dot(hidden.astype(dtype), params["w2"].astype(dtype), preferred_element_type=jnp.float32)
    return compressed + params["b2"]


def block_validity(valid: jax.Array, config: AttentionConfig) -> jax.Array:
    """bool [B, Nc]: compressed block w holds at least one valid key in w*s ... w*s + s - 1."""
    batch, seq_len = valid.shape
    n_blocks = num_compressed_blocks(seq_len, config)
    stride = config.compress_stride
    return valid[:, : n_blocks * stride].reshape(batch, n_blocks, stride).any(-1)


def masked_softmax(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax over ``axis`` restricted to ``mask``; rows with no allowed entry give all zeros.

    Masked scores may be NaN or inf: they never reach the result or its gradient.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(scores, axis=axis, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(row_max)), 0.0)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def selection_probabilities(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """p = softmax([-1000, scores...]) with the first entry dropped, over visible blocks only.

    Args:
      scores: [..., Nc] block scores (already scaled); invisible entries may hold anything.
      visible: bool [..., Nc].
    Returns:
      float32 [..., Nc], 0 at invisible blocks.
    """
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    row_max = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), SELECTION_PAD_LOGIT)
    row_max = jax.lax.stop_gradient(row_max)
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    total = jnp.exp(SELECTION_PAD_LOGIT - row_max) + jnp.sum(weights, axis=-1, keepdims=True)
    return weights / total


def straight_through_factor(prob: jax.Array) -> jax.Array:
    """1 in value, d/dprob = 1 in gradient: scales a selected block's attention weights (SPEC 3.6 option)."""
    return 1.0 + prob - jax.lax.stop_gradient(prob)


def take_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, N, ...] at int positions [B, P] -> [B, P, ...] (positions must be in range)."""
    index = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _gate_mix_value(o_ltis, o_stis, gates, valid):
    gates = gates.astype(jnp.float32)
    out = gates[..., 0:1] * o_ltis.astype(jnp.float32) + gates[..., 1:2] * o_stis.astype(jnp.float32)
    return jnp.where(valid[:, :, None, None], out, 0.0).astype(jnp.result_type(o_ltis, o_stis))


@jax.custom_vjp
def gate_mix(o_ltis: jax.Array, o_stis: jax.Array, gates: jax.Array, valid: jax.Array) -> jax.Array:
    """``gates[..., 0] * o_ltis + gates[..., 1] * o_stis`` in float32, 0 at invalid queries (SPEC: the gated sum of
    the two branches).

    Args:
      o_ltis, o_stis: [B, N, H, d] branch outputs; gates: [B, N, H, 2]; valid: bool [B, N].

    Returns:
      [B, N, H, d] in the wider dtype of o_ltis and o_stis.

    The VJP is written out (the values are those of autodiff) so that all cotangents come from one read of the
    output cotangent, the gates and both branch outputs: on an H100 (N = 1k, 65,536 tokens) autodiff left XLA two
    passes (0.053 ms per call), this VJP one (0.034 ms, with the LTIS backward's ``delta`` reduction fused in;
    benchmarks/results/gpu_call44_2026-11-27).
    """
    return _gate_mix_value(o_ltis, o_stis, gates, valid)


def _gate_mix_fwd(o_ltis, o_stis, gates, valid):
    return _gate_mix_value(o_ltis, o_stis, gates, valid), (o_ltis, o_stis, gates, valid)


def _gate_mix_bwd(res, d_out):
    o_ltis, o_stis, gates, valid = res
    d_out = jnp.where(valid[:, :, None, None], d_out.astype(jnp.float32), 0.0)
    gates_f = gates.astype(jnp.float32)
    d_ltis = (gates_f[..., 0:1] * d_out).astype(o_ltis.dtype)
    d_stis = (gates_f[..., 1:2] * d_out).astype(o_stis.dtype)
    d_gates = jnp.stack([jnp.sum(d_out * o_ltis.astype(jnp.float32), axis=-1),
                         jnp.sum(d_out * o_stis.astype(jnp.float32), axis=-1)], axis=-1)
    return d_ltis, d_stis, d_gates.astype(gates.dtype), None


gate_mix.defvjp(_gate_mix_fwd, _gate_mix_bwd)
