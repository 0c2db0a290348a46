"""Rotary position embedding with interleaved pairs (SPEC section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """Rotation frequencies f_m = base^(-2m/d), m = 0..d/2-1. Returns float32 [d/2]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return base ** (-exponents)


def apply_rope(x: jax.Array, *, base: float = 10000.0, positions: jax.Array | None = None) -> jax.Array:
    """Rotates interleaved feature pairs (2m, 2m+1) of x by angle position * f_m.

    Args:
      x: [B, N, heads, d] queries or keys.
      base: RoPE base theta.
      positions: optional int [N] or [B, N] positions; default 0..N-1 (absolute, from the row start).
    Returns:
      Rotated array [B, N, heads, d], same dtype as x (computed in float32).
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects [B, N, heads, d], got shape {x.shape}")
    _, seq_len, _, head_dim = x.shape
    freqs = rope_frequencies(head_dim, base)
    if positions is None:
        positions = jnp.arange(seq_len)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [N, d/2] or [B, N, d/2]
    if angles.ndim == 2:
        angles = angles[None]
    # x * cos + swap_pairs(x) * (-sin, +sin), elementwise over the [.., d] layout as it is: the products and sums of
    # (even cos - odd sin, odd cos + even sin) without stacking the two halves, which XLA emitted as a slower
    # concatenation fusion (H100, 65,536 tokens: the layer's XLA forward 0.105 -> 0.093 ms, benchmarks/NOTES.md
    # round 10).
    cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)[:, :, None, :]
    sin = jnp.repeat(jnp.sin(angles), 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), head_dim // 2)
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(*x.shape[:-1], head_dim // 2, 2)[..., ::-1].reshape(x.shape)  # (x_2m+1, x_2m) pairs
    return (x32 * cos + swapped * sin[:, :, None, :]).astype(x.dtype)
