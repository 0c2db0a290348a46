"""Pure-jnp reference for STIS (power-pattern) sparse attention, SPEC section 4.

This is the oracle the Pallas kernels (``stis_gpu.py``) are tested against. It is written in the
*offset-shift* formulation: the key set of query ``i`` is ``{i - o : o in O}`` for a fixed offset list
``O`` (plus, bidirectionally, the sink key ``N - 1`` when it is not already one of them), so for every
offset the keys of all queries are the key sequence shifted by ``o`` rows (a pad + slice, no gather).
It never builds an ``N x N`` tensor: memory is ``O(B * N * H * |O|)`` with ``|O| ~ 8 + log2 N`` (causal)
or ``~ 15 + log2 N`` (bidirectional).

It is deliberately independent of the kernel code (own offset list, own masking), uses a float32
softmax, returns ``q.dtype`` and is differentiable with ``jax.grad`` (only pads, slices, ``where`` and
einsums). Inputs at invalid positions are zeroed before use, so NaN padding can leak neither into the
outputs nor into the gradients.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Full float32 products (no TF32 / bf16 passes on GPU or TPU): this is the oracle.
_HI = jax.lax.Precision.HIGHEST


def stis_reference_offsets(n: int, window: int, causal: bool) -> tuple[int, ...]:
    """Offsets ``o = i - j`` of the STIS key set (sink excluded), each with ``|o| < n``.

    Causal: ``0 .. window-1`` and the powers of two ``>= window`` below ``n``.
    Bidirectional: additionally ``-(window-1) .. -1`` (keys after the query, inside the window).
    """
    offs = set(o for o in range(0, window) if o < n)
    p = 1
    while p < n:
        offs.add(p)  # powers of two below the window are already there
        p *= 2
    if not causal:
        offs.update(-o for o in range(1, window) if o < n)
    return tuple(sorted(offs))


def _shift_rows(x: jax.Array, o: int, fill) -> jax.Array:
    """``y[:, i] = x[:, i - o]`` where ``0 <= i - o < N``, else ``fill`` (axis 1 is the sequence)."""
    n = x.shape[1]
    if o == 0:
        return x
    pad = [(0, 0)] * x.ndim
    if o > 0:
        pad[1] = (o, 0)
        return jnp.pad(x, pad, constant_values=fill)[:, :n]
    pad[1] = (0, -o)
    return jnp.pad(x, pad, constant_values=fill)[:, -o:-o + n]


def stis_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                             causal: bool = True, window: int = 8, sink: bool = True) -> jax.Array:
    """STIS attention. q [B, N, H, d]; k, v [B, N, Hk, d]; valid bool [B, N] -> o [B, N, H, d] (q.dtype).

    Query head ``g`` uses kv head ``g // (H // Hk)``. Scale ``1/sqrt(d)``. Output at invalid queries (and
    at valid queries without any valid key) is 0.
    """
    b, n, h, d = q.shape
    hk = k.shape[2]
    if h % hk:
        raise ValueError(f"H={h} must be a multiple of Hk={hk}")
    if window < 1:
        raise ValueError("window must be >= 1")
    g = h // hk
    scale = 1.0 / math.sqrt(d)
    valid = valid.astype(bool)
    vm = valid[:, :, None, None]
    qf = jnp.where(vm, q.astype(jnp.float32), 0.0).reshape(b, n, hk, g, d)
    kf = jnp.where(vm, k.astype(jnp.float32), 0.0)
    vf = jnp.where(vm, v.astype(jnp.float32), 0.0)

    scores, values, masks = [], [], []
    for o in stis_reference_offsets(n, window, causal):
        ks = _shift_rows(kf, o, 0.0)
        scores.append(jnp.einsum("bnhgd,bnhd->bnhg", qf, ks, precision=_HI))
        values.append(_shift_rows(vf, o, 0.0))
        masks.append(valid & _shift_rows(valid, o, False))
    if sink and not causal:
        # The sink key N-1 is an extra key only where it is not already in the window: N-1-i >= window.
        i = jnp.arange(n)
        ks = jnp.broadcast_to(kf[:, n - 1:n], kf.shape)
        scores.append(jnp.einsum("bnhgd,bnhd->bnhg", qf, ks, precision=_HI))
        values.append(jnp.broadcast_to(vf[:, n - 1:n], vf.shape))
        masks.append(valid & valid[:, n - 1:n] & (n - 1 - i >= window)[None, :])

    s = jnp.stack(scores, axis=-1) * scale            # [B, N, Hk, G, K]
    vals = jnp.stack(values, axis=-2)                 # [B, N, Hk, K, d]
    mask = jnp.stack(masks, axis=-1)[:, :, None, None, :]  # [B, N, 1, 1, K]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bnhgk,bnhkd->bnhgd", p, vals, precision=_HI).reshape(b, n, h, d)
    # Exact zeros at invalid queries; also stops a non-finite cotangent there from reaching v.
    o = jnp.where(valid[:, :, None, None], o, 0.0)
    return o.astype(q.dtype)
