"""Pure-jnp references for the two LTIS kernels (SPEC section 3), written directly from the SPEC.

They share the contracts of :mod:`pallas_kernels.ltis_gpu` and are independent of its code:

* :func:`select_blocks_reference` - compressed scoring + top-n block selection (SPEC 3.3-3.4, 3.8). It builds
  the full ``[B, Hk, N, Nc]`` score matrix and uses ``lax.top_k``: fine for tests and moderate N, not for
  production lengths.
* :func:`ltis_attention_reference` - fine attention over the selected blocks (+ the own causal block) (SPEC
  3.5, 3.7, 3.8). It gathers each query's explicit key list (at most ``n*b + b`` keys), so memory is
  O(N * (n+1) * b), never N x N, and it is differentiable with ``jax.grad`` (the gathers' transposes are
  scatter-adds: slow on GPU, which is why the kernels exist).

Both are plain functions of arrays; jit them at the call site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["select_blocks_reference", "ltis_attention_reference"]


def select_blocks_reference(
    q_mean: jax.Array,
    compressed_keys: jax.Array,
    block_valid: jax.Array,
    *,
    causal: bool = True,
    num_selected: int = 4,
    block_size: int = 16,
    keep_threshold: float = 1e-10,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Top-n compressed-block selection (no gradient: the outputs are discrete).

    Args:
      q_mean: [B, N, Hk, d], mean over the G query heads of each kv group (float32 advised).
      compressed_keys: [B, Hk, Nc, d].
      block_valid: bool [B, Nc], block w holds at least one valid key.
      causal: visibility rule ``w*b + b - 1 < i`` (True) or every valid block (False).
      num_selected: n.
      block_size: b (= compression stride s).
      keep_threshold: a selected block is kept iff its probability exceeds this.
      scale: softmax scale (1/sqrt(head_dim)).

    Returns:
      (selected_blocks int32 [B, N, Hk, n], kept bool [B, N, Hk, n]). Slots beyond Nc hold index 0, kept False.
    """
    b_, n_, hk, _ = q_mean.shape
    nc = compressed_keys.shape[2]
    n_sel = int(num_selected)
    if nc == 0:
        return (jnp.zeros((b_, n_, hk, n_sel), jnp.int32), jnp.zeros((b_, n_, hk, n_sel), bool))
    qf = q_mean.astype(jnp.float32)
    kf = compressed_keys.astype(jnp.float32)
    scores = jnp.einsum("bnhd,bhwd->bhnw", qf, kf, precision=lax.Precision.HIGHEST) * scale
    visible = block_valid.astype(bool)[:, None, None, :]  # [B, 1, 1, Nc]
    if causal:
        i = jnp.arange(n_)[:, None]
        w = jnp.arange(nc)[None, :]
        visible = visible & (w * block_size + block_size - 1 < i)[None, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    # softmax over [-1000, score_0, ..., score_{Nc-1}], first entry dropped
    sink = jnp.full(scores.shape[:-1] + (1,), -1000.0, jnp.float32)
    p = jax.nn.softmax(jnp.concatenate([sink, scores], axis=-1), axis=-1)[..., 1:]
    k_eff = min(n_sel, nc)
    vals, idx = lax.top_k(p, k_eff)  # [B, Hk, N, k_eff]
    kept = vals > keep_threshold
    if k_eff < n_sel:
        pad = ((0, 0),) * 3 + ((0, n_sel - k_eff),)
        idx = jnp.pad(idx, pad)
        kept = jnp.pad(kept, pad)
    return (jnp.transpose(idx, (0, 2, 1, 3)).astype(jnp.int32), jnp.transpose(kept, (0, 2, 1, 3)))


def ltis_key_lists(
    n: int,
    valid: jax.Array,
    selected_blocks: jax.Array,
    kept: jax.Array,
    *,
    causal: bool,
    block_size: int,
    mask_padded_block_keys: bool,
) -> tuple[jax.Array, jax.Array]:
    """Explicit key set of every (query, kv head): positions [B, N, Hk, K] and a mask [B, N, Hk, K].

    K = n_sel * b (+ b for the causal own block). Masked slots hold position 0.
    """
    b = block_size
    t = jnp.arange(b)
    sel = selected_blocks.astype(jnp.int32)
    # (a) kept blocks: positions w*b .. w*b+b-1
    pos_sel = sel[..., None] * b + t  # [B, N, Hk, n, b]
    in_range = (sel[..., None] >= 0) & (pos_sel < n)
    pos_sel = jnp.where(in_range, pos_sel, 0)
    ok_sel = kept.astype(bool)[..., None] & in_range
    if mask_padded_block_keys:
        ok_sel = ok_sel & _gather_valid(valid, pos_sel)
    pos = pos_sel.reshape(sel.shape[:3] + (-1,))
    ok = ok_sel.reshape(sel.shape[:3] + (-1,))
    if causal:
        # (b) own block: floor(i/b)*b .. i
        i = jnp.arange(n)
        pos_own = (i // b * b)[:, None] + t[None, :]  # [N, b]
        ok_own = pos_own <= i[:, None]
        pos_own = jnp.where(ok_own, pos_own, 0)
        pos_own = jnp.broadcast_to(pos_own[None, :, None, :], sel.shape[:3] + (b,))
        ok_own = ok_own[None, :, None, :] & _gather_valid(valid, pos_own)
        pos = jnp.concatenate([pos, pos_own], axis=-1)
        ok = jnp.concatenate([ok, ok_own], axis=-1)
    return pos, ok


def _gather_valid(valid: jax.Array, pos: jax.Array) -> jax.Array:
    """valid[b, pos[b, ...]] for a position array whose leading dim is the batch."""
    bsz = valid.shape[0]
    flat = pos.reshape(bsz, -1)
    return jnp.take_along_axis(valid.astype(bool), flat, axis=1).reshape(pos.shape)


def ltis_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    selected_blocks: jax.Array,
    kept: jax.Array,
    *,
    causal: bool = True,
    block_size: int = 16,
    mask_padded_block_keys: bool = False,
) -> jax.Array:
    """LTIS fine attention (SPEC 3.5, 3.7, 3.8), differentiable w.r.t. q, k, v.

    Args:
      q: [B, N, H, d]; k, v: [B, N, Hk, d] (head g uses kv head g // (H // Hk)).
      valid: bool [B, N].
      selected_blocks, kept: [B, N, Hk, n] (int32 / bool), as returned by the selection.
    Returns:
      o [B, N, H, d] in q.dtype; 0 at invalid queries and where the key set is empty.
    """
    bsz, n, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    valid = valid.astype(bool)
    pos, ok = ltis_key_lists(
        n, valid, selected_blocks, kept, causal=causal, block_size=block_size,
        mask_padded_block_keys=mask_padded_block_keys,
    )  # [B, N, Hk, K]
    ok = ok & valid[:, :, None, None]
    kk = pos.shape[-1]
    # gather keys: k [B, N, Hk, d] -> [B, Hk, N, d]; index [B, Hk, N*K]
    kt = jnp.transpose(k, (0, 2, 1, 3)).astype(jnp.float32)
    vt = jnp.transpose(v, (0, 2, 1, 3)).astype(jnp.float32)
    idx = jnp.transpose(pos, (0, 2, 1, 3)).reshape(bsz, hk, n * kk, 1)
    kg = jnp.take_along_axis(kt, idx, axis=2).reshape(bsz, hk, n, kk, d)
    vg = jnp.take_along_axis(vt, idx, axis=2).reshape(bsz, hk, n, kk, d)
    okt = jnp.transpose(ok, (0, 2, 1, 3))  # [B, Hk, N, K]
    # masked keys are replaced by zeros so that nothing from them (NaN included) reaches values or gradients
    kg = jnp.where(okt[..., None], kg, 0.0)
    vg = jnp.where(okt[..., None], vg, 0.0)
    qf = jnp.where(valid[:, :, None, None], q.astype(jnp.float32), 0.0).reshape(bsz, n, hk, g, d)
    s = jnp.einsum("bnhgd,bhnkd->bhngk", qf, kg, precision=lax.Precision.HIGHEST) / jnp.sqrt(
        jnp.float32(d)
    )
    mask = okt[:, :, :, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("bhngk,bhnkd->bnhgd", p, vg, precision=lax.Precision.HIGHEST).reshape(bsz, n, h, d)
    o = jnp.where(valid[:, :, None, None], o, 0.0)
    return o.astype(q.dtype)
