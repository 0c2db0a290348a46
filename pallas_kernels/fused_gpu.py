"""LTIS and STIS fine attention in one Pallas GPU kernel over dense key tiles, for short sequences.

Both BlossomRec branches attend with the *same* q, k and v (SPEC 2-5) and differ only in their key sets:
LTIS sees the kept blocks plus the causal own block (SPEC 3.5, 3.8), STIS the window, the power-of-two
offsets and the sink (SPEC 4). For short sequences (a few hundred positions) every key of a sequence fits in
a handful of tiles, so instead of gathering each query's keys (``ltis_gpu``) or walking shifted diagonals
(``stis_gpu``), this kernel runs flash attention over contiguous key tiles and evaluates both key sets as
masks on one shared score tile:

* one ``[R, d] x [d, BK]`` matmul per key tile (R = BQ queries x G heads, packed query-major as in
  ``ltis_gpu``; contiguous K/V tile loads, no gather, no block-diagonal waste), then
* two masks (LTIS: key block in the query's kept list, or own block and ``j <= i``; STIS: ``i - j`` in the
  window or a power of two, or the sink) and two online softmaxes, one per branch.

It returns ``(o_ltis, o_stis)``; the gate mix stays in XLA. The backward is flash-style and deterministic
(no atomics): a dQ kernel (one program per query tile, the same key walk) and a dK/dV kernel (one program
per key tile, walking the query tiles that can see it). With both branches in one tile, the backward needs
one ``dS = P_l (dP_l - delta_l) + P_s (dP_s - delta_s)`` per tile for dQ and dK, and
``dV = P_l^T dO_l + P_s^T dO_s``.

Padding costs nothing: each program reads the sequence's valid extent (one past its last valid position) and
skips query tiles past it and key tiles past it (see ``_query_tile_key_tiles``), as cuDNN does with key
lengths; with right-padded batches of lengths uniform in [1, N] that is about a third of the causal work.
Kept blocks are a per-row int32 bitmask when ceil(N / b) <= 32 (every N this kernel serves at b = 16).

Cost: O(N) score-tile work per query (causal: the keys up to the query tile), against O(n b + log N) for the
gather kernels, but with none of their per-query gathers, sorting or launch count. It wins at short N and
loses at long N; ``blossom_jax.ops.pallas`` picks it up to ``FUSED_MAX_LEN`` (measured crossover, see
benchmarks/results/).

Padding: in causal mode keys are loaded only where valid (the model zeroes padded q/k/v anyway, and with
right padding a kept block never holds a padded key); NaN at padded positions reaches nothing. In
bidirectional mode without ``mask_padded_block_keys`` the reference includes padded keys of kept blocks, so
K/V are loaded at every in-range position; the STIS branch zeroes padded values before use, but a NaN
padded key/value can reach other rows of the same tile through ``0 * NaN`` in the LTIS ``P @ V`` product
(the same caveat as ``ltis_gpu``; finite padding, as the model produces, is exact).

The pure-jnp references are ``ltis_reference.ltis_attention_reference`` and
``stis_reference.stis_attention_reference``: this kernel must equal the pair of them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import gpu_common as gc
from pallas_kernels.ltis_reference import ltis_attention_reference  # noqa: F401  (reference beside kernel)
from pallas_kernels.stis_reference import stis_attention_reference  # noqa: F401

__all__ = ["fused_attention_gpu", "FUSED_MAX_LEN", "FUSED_MAX_LEN_BIDIRECTIONAL", "max_len"]

# Longest sequence for which ``blossom_jax.ops.pallas`` uses this kernel on GPU (longer ones take the
# gather kernels, whose work per query does not grow with N). Measured on an H200 against the gather kernels
# of this commit (one-warp LTIS programs; bf16, 65,536 tokens, LTIS + STIS fwd+bwd, ms, fused / gather;
# benchmarks/results/gpu_call14_2026-11-27 and gpu_call15_2026-11-27; an H100 gave the same picture in
# gpu_call16_2026-11-27: causal 256 full 1.07 / 1.02, padded 0.62 / 0.81, 384 padded 0.76 / 0.76):
#   causal, full rows:          N = 200: 0.97 / 1.07, 256: 1.19 / 1.04, 320: 1.25 / 1.00, 384: 1.36 / 1.05
#   causal, padded rows*:       N = 200: 0.58 / 0.78, 256: 0.65 / 0.78, 320: 0.63 / 0.75, 384: 0.79 / 0.90
#   bidirectional, full rows:   N = 128: 0.88 / 1.12, 200: 1.38 / 1.32, 256: 1.46 / 1.22
#   bidirectional, padded rows: N = 128: 0.65 / 0.92, 200: 0.81 / 0.97, 256: 1.00 / 0.95
# (* lengths uniform in [1, N], as in training batches; both skip padding, the fused kernel whole tiles.) The limits
# sit where full-length batches are about even and padded ones still favour the fused kernel.
# (Before the gather kernels ran one warp per program the causal crossover was near N = 600 and the limit 512.)
FUSED_MAX_LEN = 256
FUSED_MAX_LEN_BIDIRECTIONAL = 200
# Tiles, from a one-at-a-time sweep at N = 256 on the H200 (benchmarks/results/kernels_fused_h200_2026-11-27.json,
# with the kernel of that day's first version): packed (query, head) rows per forward /
# dQ program and keys per streamed score tile (32 beat 64 and 128) ...
ROWS = 64
KEYS = 32
# ... dK/dV: keys per program and packed query rows per streamed tile (16/64 keys and 32/128 rows were slower;
# 2 and 8 warps too).
DKV_KEYS = 32
DKV_ROWS = 64
NUM_WARPS = 4
NUM_STAGES = gc.NUM_STAGES


def max_len(causal: bool) -> int:
    """Longest N for which the fused kernel is the faster choice (read at trace time, so tests can lower it)."""
    return FUSED_MAX_LEN if causal else FUSED_MAX_LEN_BIDIRECTIONAL


def _tiles(g: int) -> tuple[int, int]:
    """(queries per tile BQ, padded rows RP) for ROWS packed rows with G heads per query."""
    bq = gc.floor_pow2(max(1, ROWS // g))
    return bq, max(16, gc.next_pow2(bq * g))


def _dkv_tiles(g: int) -> tuple[int, int]:
    bq = gc.floor_pow2(max(1, DKV_ROWS // g))
    return bq, max(16, gc.next_pow2(bq * g))


class _Keys:
    """A tile of BK contiguous key positions k0 .. k0+BK-1 of one (batch, kv head)."""

    def __init__(self, k0, bk, *, seq_len, valid_ref, load_padded):
        self.j = k0 + jnp.arange(bk, dtype=jnp.int32)
        self.in_range = self.j < seq_len
        self.valid = self.in_range & (valid_ref[jnp.where(self.in_range, self.j, 0)] != 0)
        # where K/V are read at all (zeros elsewhere): valid keys, or every in-range key when the LTIS key
        # set may include padded keys of kept blocks (bidirectional, mask_padded_block_keys off)
        self.loaded = self.in_range if load_padded else self.valid

    # Index arrays, not pl.ds: the interpreter clamps a dynamic slice that runs past the end (moving the
    # tile), while a masked index-array access stays put; on the GPU both are the same pointer tensor.
    def load(self, ref):
        c = jnp.arange(ref.shape[-1], dtype=jnp.int32)[None, :]
        rows = jnp.where(self.in_range, self.j, 0)[:, None]
        return plgpu.load(ref.at[rows, c], mask=self.loaded[:, None], other=0.0)

    def store(self, ref, val):
        c = jnp.arange(ref.shape[-1], dtype=jnp.int32)[None, :]
        plgpu.store(ref.at[self.j[:, None], c], val, mask=self.in_range[:, None])


# Kept blocks travel as a per-row bitmask when every block index fits in one int32 (ceil(N / b) <= 32, which
# covers FUSED_MAX_LEN at b = 16): the kept test of a score element is then a shift and an and instead of n
# compares.
MAX_BITMASK_BLOCKS = 32
# Position given to rows that are out of bounds or invalid: far below every key, so each position test below
# (own block, window, power-of-two offset) is false for them without a separate row-validity mask.
_FAR_BEFORE = -(1 << 30)


def _uses_bitmask(seq_len: int, block_size: int) -> bool:
    return -(-seq_len // block_size) <= MAX_BITMASK_BLOCKS


class _QueryRows:
    """Per-row inputs of the mask tests of packed query rows, computed once per program: position ``i``
    (``_FAR_BEFORE`` where the row is not a valid query), own block, validity ``ok`` and the kept blocks
    (``kept``: int32 bitmask [R], or n int32 vectors [R] with -1 = not kept)."""

    def __init__(self, rows: gc.Rows, sel_ref, n_sel, *, block_size, use_bits):
        self.ok = rows.ok
        self.i = jnp.where(rows.ok, rows.qi, _FAR_BEFORE)
        self.own_block = gc.idiv(self.i, block_size)  # negative for invalid rows: matches no key block
        sel = [plgpu.load(sel_ref.at[rows.qi_c, r], mask=rows.ok, other=-1) for r in range(n_sel)]
        if use_bits:
            bits = jnp.zeros_like(sel[0])
            for s in sel:
                bits = bits | jnp.where(s >= 0, jnp.left_shift(jnp.ones_like(s), jnp.maximum(s, 0)), 0)
            self.kept = bits
        else:
            self.kept = sel


def _branch_masks(rows: _QueryRows, keys: _Keys, *, seq_len, causal, block_size, window, sink, mask_padded,
                  use_bits):
    """Key-set masks (ltis, stis), bool [R, BK], of packed query rows against a key tile."""
    j = keys.j[None, :]
    kb = gc.idiv(keys.j, block_size)
    if use_bits:  # in-range keys have kb < MAX_BITMASK_BLOCKS; the clamp only touches out-of-range keys
        kb_c = jnp.minimum(kb, MAX_BITMASK_BLOCKS - 1)
        in_kept = (lax.shift_right_logical(rows.kept[:, None], kb_c[None, :]) & 1) != 0
    else:
        in_kept = rows.kept[0][:, None] == kb[None, :]
        for s in rows.kept[1:]:
            in_kept = in_kept | (s[:, None] == kb[None, :])
    ltis = in_kept & (keys.valid if mask_padded else keys.in_range)[None, :]
    if causal:
        ltis = ltis | ((kb[None, :] == rows.own_block[:, None]) & (j <= rows.i[:, None]) & keys.valid[None, :])

    diff = rows.i[:, None] - j
    # true for diff = 0 (always inside the window) and diff = 2^k; false for every negative diff
    pow2_or_zero = (diff & (diff - 1)) == 0
    if causal:
        stis = ((diff >= 0) & (diff < window)) | pow2_or_zero
    else:
        stis = ((diff > -window) & (diff < window)) | pow2_or_zero
        if sink:
            stis = stis | ((j == seq_len - 1) & rows.ok[:, None])
    return ltis, stis & keys.valid[None, :]


def _valid_extent(valid_ref, seq_len):
    """One past the last valid position of the sequence (0 if none); every position from it on is padding.
    Reads the whole validity row: O(N) per program, negligible at the lengths this kernel serves."""
    idx = jnp.arange(gc.next_pow2(seq_len), dtype=jnp.int32)
    inside = idx < seq_len
    v = plgpu.load(valid_ref.at[jnp.where(inside, idx, 0)], mask=inside, other=0)
    return jnp.max(jnp.where(v != 0, idx + 1, 0))


def _query_tile_key_tiles(q0, extent, *, bq, bk, seq_len, causal, load_padded):
    """Key tiles the forward / dQ program of the query tile at q0 walks. Padding is skipped: a tile of
    padded queries walks none (its rows are all zero), and keys at or after the valid extent take part in
    no valid query's key sets (causal: kept blocks lie before the query's own block, SPEC 3.4, and the own
    block and STIS need valid keys; bidirectional: only with mask_padded_block_keys), unless
    ``load_padded``."""
    n_tiles = _num_key_tiles(q0 + bq - 1, seq_len=seq_len, bk=bk, causal=causal)
    if not load_padded:
        n_tiles = jnp.minimum(n_tiles, gc.idiv(extent + (bk - 1), bk))
    return n_tiles * (q0 < extent).astype(jnp.int32)  # a 0/1 factor: see stis_gpu._for_each_offset


def _num_key_tiles(q_last, *, seq_len, bk, causal):
    """Key tiles a query tile with last query ``q_last`` walks: up to its last query (causal) or all."""
    if causal:
        return gc.idiv(jnp.minimum(q_last, seq_len - 1) + bk, bk)
    return pl.cdiv(seq_len, bk)


def _online_update(carry, s, mask, v):
    """One flash step of one branch: running max m, sum l and accumulator acc (base-2 exponentials)."""
    m, l, acc = carry
    neg_inf = jnp.float32(-jnp.inf)
    s = jnp.where(mask, s, neg_inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == neg_inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + gc.dot(p.astype(v.dtype), v)
    return m_new, l, acc


def _finish(carry, ok):
    m, l, acc = carry
    nonempty = ok & (l > 0)
    o = acc / jnp.where(nonempty, l, 1.0)[:, None]
    o = jnp.where(nonempty[:, None], o, 0.0)
    lse = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), 0.0)
    return o, lse


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, ol_ref, os_ref, lsel_ref, lses_ref, *, seq_len, g,
                n_sel, bq, rp, bk, causal, masks, block_size, use_bits, load_padded, qk_scale):
    d = q_ref.shape[-1]
    q0 = pl.program_id(0) * bq
    rows = gc.Rows(q0, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)
    q = rows.load(q_ref, d)
    mask_rows = _QueryRows(rows, sel_ref, n_sel, block_size=block_size, use_bits=use_bits)

    def body(t, carry):
        c_l, c_s = carry
        keys = _Keys(t * bk, bk, seq_len=seq_len, valid_ref=valid_ref, load_padded=load_padded)
        kt, vt = keys.load(k_ref), keys.load(v_ref)
        s = gc.dot(q, kt, trans_b=True) * qk_scale
        m_l, m_s = masks(mask_rows, keys)
        vs = jnp.where(keys.valid[:, None], vt, 0.0).astype(vt.dtype)
        return _online_update(c_l, s, m_l, vt), _online_update(c_s, s, m_s, vs)

    init = (jnp.full((rp,), -jnp.inf, jnp.float32), jnp.zeros((rp,), jnp.float32),
            jnp.zeros((rp, d), jnp.float32))
    n_tiles = _query_tile_key_tiles(q0, _valid_extent(valid_ref, seq_len), bq=bq, bk=bk, seq_len=seq_len,
                                    causal=causal, load_padded=load_padded)
    c_l, c_s = lax.fori_loop(0, n_tiles, body, (init, init))
    for carry, o_ref, lse_ref in ((c_l, ol_ref, lsel_ref), (c_s, os_ref, lses_ref)):
        o, lse = _finish(carry, rows.ok)
        rows.store(o_ref, o.astype(o_ref.dtype))
        rows.store_row(lse_ref, lse)


def _probs_and_ds(s, m_l, m_s, lse_l, lse_s, dp_l, dp_s, delta_l, delta_s):
    """Recomputed probabilities of both branches and the combined score gradient dS [R, BK]."""
    neg_inf = jnp.float32(-jnp.inf)
    p_l = jnp.exp2(jnp.where(m_l, s, neg_inf) - lse_l[:, None])
    p_s = jnp.exp2(jnp.where(m_s, s, neg_inf) - lse_s[:, None])
    # select, not multiply: masked entries may pair with a non-finite dP
    ds = (jnp.where(m_l, p_l * (dp_l - delta_l[:, None]), 0.0)
          + jnp.where(m_s, p_s * (dp_s - delta_s[:, None]), 0.0))
    return p_l, p_s, ds


def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, dol_ref, dos_ref, lsel_ref, lses_ref, dell_ref,
               dels_ref, dq_ref, *, seq_len, g, n_sel, bq, rp, bk, causal, masks, block_size, use_bits,
               load_padded, qk_scale, sm_scale):
    d = q_ref.shape[-1]
    q0 = pl.program_id(0) * bq
    rows = gc.Rows(q0, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)
    q = rows.load(q_ref, d)
    do_l, do_s = rows.load(dol_ref, d), rows.load(dos_ref, d)
    lse_l, lse_s = rows.load_row(lsel_ref), rows.load_row(lses_ref)
    delta_l, delta_s = rows.load_row(dell_ref), rows.load_row(dels_ref)
    mask_rows = _QueryRows(rows, sel_ref, n_sel, block_size=block_size, use_bits=use_bits)

    def body(t, dq):
        keys = _Keys(t * bk, bk, seq_len=seq_len, valid_ref=valid_ref, load_padded=load_padded)
        kt, vt = keys.load(k_ref), keys.load(v_ref)
        s = gc.dot(q, kt, trans_b=True) * qk_scale
        m_l, m_s = masks(mask_rows, keys)
        _, _, ds = _probs_and_ds(s, m_l, m_s, lse_l, lse_s, gc.dot(do_l, vt, trans_b=True),
                                 gc.dot(do_s, vt, trans_b=True), delta_l, delta_s)
        return dq + gc.dot(ds.astype(kt.dtype), kt)

    n_tiles = _query_tile_key_tiles(q0, _valid_extent(valid_ref, seq_len), bq=bq, bk=bk, seq_len=seq_len,
                                    causal=causal, load_padded=load_padded)
    dq = lax.fori_loop(0, n_tiles, body, jnp.zeros((rp, d), jnp.float32))
    rows.store(dq_ref, (dq * sm_scale).astype(dq_ref.dtype))


def _dkv_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, dol_ref, dos_ref, lsel_ref, lses_ref, dell_ref,
                dels_ref, dk_ref, dv_ref, *, seq_len, g, n_sel, bq, rp, bk, causal, masks, block_size,
                use_bits, load_padded, qk_scale, sm_scale):
    d = k_ref.shape[-1]
    k0 = pl.program_id(0) * bk
    keys = _Keys(k0, bk, seq_len=seq_len, valid_ref=valid_ref, load_padded=load_padded)
    kt, vt = keys.load(k_ref), keys.load(v_ref)

    def body(t, carry):
        dk, dv = carry
        rows = gc.Rows(t * bq, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)
        q = rows.load(q_ref, d)
        do_l, do_s = rows.load(dol_ref, d), rows.load(dos_ref, d)
        lse_l, lse_s = rows.load_row(lsel_ref), rows.load_row(lses_ref)
        delta_l, delta_s = rows.load_row(dell_ref), rows.load_row(dels_ref)
        mask_rows = _QueryRows(rows, sel_ref, n_sel, block_size=block_size, use_bits=use_bits)
        s = gc.dot(q, kt, trans_b=True) * qk_scale
        m_l, m_s = masks(mask_rows, keys)
        p_l, p_s, ds = _probs_and_ds(s, m_l, m_s, lse_l, lse_s, gc.dot(do_l, vt, trans_b=True),
                                     gc.dot(do_s, vt, trans_b=True), delta_l, delta_s)
        dv = dv + gc.dot(p_l.astype(do_l.dtype), do_l, trans_a=True)
        dv = dv + gc.dot(p_s.astype(do_s.dtype), do_s, trans_a=True)
        dk = dk + gc.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    # causal: query i sees key j only if j <= i, so the walk starts at the query tile holding k0
    first = gc.idiv(k0, bq) if causal else 0
    # query tiles up to the last valid query; none when every key of the tile is padding that no valid
    # query sees (see _query_tile_key_tiles)
    extent = _valid_extent(valid_ref, seq_len)
    last = jnp.minimum(pl.cdiv(seq_len, bq), gc.idiv(extent + (bq - 1), bq))
    if not load_padded:
        last = first + (last - first) * (k0 < extent).astype(jnp.int32)
    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(first, jnp.maximum(last, first), body, (zeros, zeros))
    keys.store(dk_ref, (dk * sm_scale).astype(dk_ref.dtype))
    keys.store(dv_ref, dv.astype(dv_ref.dtype))


def _specs(n, g, d, n_sel):
    q_spec = pl.BlockSpec((None, n, g, d), lambda t, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, n, None, d), lambda t, b, h: (b, 0, h, 0))
    valid_spec = pl.BlockSpec((None, n), lambda t, b, h: (b, 0))
    sel_spec = pl.BlockSpec((None, n, None, n_sel), lambda t, b, h: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, n, g), lambda t, b, h: (b, 0, h))
    return q_spec, kv_spec, valid_spec, sel_spec, row_spec


def _static(q, k, sel_enc, opts):
    """Shapes and the static kernel keywords shared by the three kernels."""
    bsz, n, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    n_sel = sel_enc.shape[-1]
    causal, block_size, window, sink, mask_padded = opts
    use_bits = _uses_bitmask(n, block_size)
    masks = functools.partial(_branch_masks, seq_len=n, causal=causal, block_size=block_size, window=window,
                              sink=sink, mask_padded=mask_padded, use_bits=use_bits)
    common = dict(seq_len=n, g=g, n_sel=n_sel, causal=causal, masks=masks, block_size=block_size,
                  use_bits=use_bits,
                  load_padded=(not causal) and (not mask_padded), qk_scale=gc.LOG2E / math.sqrt(d))
    return (bsz, n, h, hk, g, d, n_sel), common


def _fwd_call(q, k, v, valid_i, sel_enc, opts, interpret):
    (bsz, n, h, hk, g, d, n_sel), common = _static(q, k, sel_enc, opts)
    bq, rp = _tiles(g)
    q_spec, kv_spec, valid_spec, sel_spec, row_spec = _specs(n, g, d, n_sel)
    o_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((bsz, n, h), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bq=bq, rp=rp, bk=KEYS, **common),
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, sel_spec],
        out_specs=[q_spec, q_spec, row_spec, row_spec],
        out_shape=[o_shape, o_shape, lse_shape, lse_shape],
        compiler_params=gc.compiler_params(NUM_WARPS, NUM_STAGES),
        interpret=interpret,
        name="blossom_fused_fwd",
    )(q, k, v, valid_i, sel_enc)


def _bwd_call(q, k, v, valid_i, sel_enc, o_l, o_s, lse_l, lse_s, do_l, do_s, opts, interpret):
    (bsz, n, h, hk, g, d, n_sel), common = _static(q, k, sel_enc, opts)
    sm_scale = 1.0 / math.sqrt(d)
    delta_l = jnp.sum(o_l.astype(jnp.float32) * do_l.astype(jnp.float32), axis=-1)
    delta_s = jnp.sum(o_s.astype(jnp.float32) * do_s.astype(jnp.float32), axis=-1)
    do_l, do_s = do_l.astype(q.dtype), do_s.astype(q.dtype)
    q_spec, kv_spec, valid_spec, sel_spec, row_spec = _specs(n, g, d, n_sel)
    in_specs = [q_spec, kv_spec, kv_spec, valid_spec, sel_spec, q_spec, q_spec, row_spec, row_spec, row_spec,
                row_spec]
    args = (q, k, v, valid_i, sel_enc, do_l, do_s, lse_l, lse_s, delta_l, delta_s)
    bq, rp = _tiles(g)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, rp=rp, bk=KEYS, sm_scale=sm_scale, **common),
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=gc.compiler_params(NUM_WARPS, NUM_STAGES),
        interpret=interpret,
        name="blossom_fused_dq",
    )(*args)
    bq_kv, rp_kv = _dkv_tiles(g)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq_kv, rp=rp_kv, bk=DKV_KEYS, sm_scale=sm_scale, **common),
        grid=(pl.cdiv(n, DKV_KEYS), bsz, hk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=gc.compiler_params(NUM_WARPS, NUM_STAGES),
        interpret=interpret,
        name="blossom_fused_dkv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(q, k, v, valid_i, sel_enc, opts, interpret):
    o_l, o_s, _, _ = _fwd_call(q, k, v, valid_i, sel_enc, opts, interpret)
    return o_l, o_s


def _fused_fwd(q, k, v, valid_i, sel_enc, opts, interpret):
    o_l, o_s, lse_l, lse_s = _fwd_call(q, k, v, valid_i, sel_enc, opts, interpret)
    return (o_l, o_s), (q, k, v, valid_i, sel_enc, o_l, o_s, lse_l, lse_s)


def _fused_bwd(opts, interpret, res, cotangents):
    q, k, v, valid_i, sel_enc, o_l, o_s, lse_l, lse_s = res
    do_l, do_s = cotangents
    dq, dk, dv = _bwd_call(q, k, v, valid_i, sel_enc, o_l, o_s, lse_l, lse_s, do_l, do_s, opts, interpret)
    return dq, dk, dv, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    selected_blocks: jax.Array,
    kept: jax.Array,
    *,
    causal: bool = True,
    block_size: int = 16,
    window: int = 8,
    sink: bool = True,
    mask_padded_block_keys: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """LTIS (SPEC 3.5, 3.7, 3.8) and STIS (SPEC 4) fine attention in one kernel; differentiable w.r.t.
    q, k, v (flash-style backward).

    Args:
      q: [B, N, H, d]; k, v: [B, N, Hk, d] (GQA: head g uses kv head g // (H // Hk)); same dtype.
      valid: bool [B, N].
      selected_blocks: int [B, N, Hk, n]; kept: bool [B, N, Hk, n] (from the selection kernel). n >= 1.
      causal: causal rules (own block for LTIS; keys j <= i for STIS) or bidirectional (SPEC 3.8, 4).
      block_size: b (key block of the selection). window: STIS window. sink: bidirectional sink key N-1.
      mask_padded_block_keys: also mask invalid keys inside kept blocks (off = the reference).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      (o_ltis, o_stis), each [B, N, H, d] in q.dtype; 0 at invalid queries and where a key set is empty.
    """
    gc.check_attention_shapes(q, k, v, selected_blocks, kept)
    if int(block_size) < 1 or int(window) < 1:
        raise ValueError(f"block_size and window must be >= 1, got {block_size}, {window}")
    sel_enc, valid_i = gc.encode_selection(selected_blocks, kept, valid, seq_len=q.shape[1],
                                           block_size=int(block_size))
    q, k, v, d, dp = gc.pad_head_dim(q, k, v)
    opts = (bool(causal), int(block_size), int(window), bool(sink), bool(mask_padded_block_keys))
    o_l, o_s = _fused(q, k, v, valid_i, sel_enc, opts, bool(interpret))
    if dp != d:
        o_l, o_s = o_l[..., :d], o_s[..., :d]
    return o_l, o_s
