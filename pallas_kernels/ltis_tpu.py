"""LTIS block selection and fine attention as Pallas TPU (Mosaic) kernels, SPEC section 3.

API (same contracts as :mod:`pallas_kernels.ltis_gpu`)::

    select_blocks_tpu(q_mean, compressed_keys, block_valid, *, causal=True, num_selected=4, block_size=16,
                      keep_threshold=1e-10, scale, interpret=False) -> (selected_blocks, kept)
    ltis_attention_tpu(q, k, v, valid, selected_blocks, kept, *, causal=True, block_size=16,
                       mask_padded_block_keys=False, interpret=False) -> o

``interpret`` is forwarded to ``pallas_call`` (False, True or a ``pltpu.InterpretParams``). Both are usable
under ``jit`` with static shapes.

select_blocks_tpu
-----------------
q_mean [B, N, Hk, d] (float32), compressed_keys [B, Hk, Nc, d], block_valid bool [B, Nc] ->
selected_blocks int32 [B, N, Hk, n], kept bool [B, N, Hk, n]. score = q_mean . ck * scale; block w is
visible iff block_valid and (causal: ``w*b + b - 1 < i``); p = softmax([-1000, visible scores]) without its
first entry; the top-min(n, Nc) blocks by p (equal values: lower index first, as ``lax.top_k``), kept =
p > keep_threshold; slots beyond Nc hold index 0, kept False. No gradient (discrete outputs).

Kernel: grid (B, Hk, query tiles of <= 256 rows, compressed-key tiles of 128 columns); the last axis is a
reduction. Per step one [TQ, d] x [d, 128] matmul (float32, HIGHEST) gives the scores of one key tile; a
running logsumexp (initialised with the -1000 entry) and a running top-n (values and indices, lanes 0..n-1 of
a [TQ, 128] VMEM scratch) are updated by n rounds of max-and-mask over [running | tile] (ties: lowest index;
invisible blocks carry -1e30 so they fill missing slots in index order, exhausted slots -inf -> index 0).
Causally, key tiles entirely after the query tile are neither fetched (clamped index map) nor computed,
except tile 0. Nothing of size [N, Nc] exists.

ltis_attention_tpu
------------------
q [B, N, H, d], k, v [B, N, Hk, d], valid bool [B, N], selected_blocks int32 / kept bool [B, N, Hk, n] ->
o [B, N, H, d] (q.dtype). Key set of query i / head g (kv head h = g // G): for every slot r with kept, the
positions ``w*b .. w*b+b-1`` (w = selected_blocks[i, h, r]; positions >= N dropped; padded keys included
unless ``mask_padded_block_keys``) plus, causally, its own block ``floor(i/b)*b .. i`` (validity-masked).
Slots are summed as a list (like the pure-jnp reference; select_blocks never yields duplicates nor, causally,
blocks at or after the own block). Float32 softmax, scale 1/sqrt(d), 0 at invalid queries and for an empty
key set. ``jax.custom_vjp`` with gradients for q, k, v. block_size must be 16 or 32.

Layout and fetching: heads packed into lanes as in :mod:`pallas_kernels.tpu_common` (K/V repeated over their
GQA group, so a [b, 128] tile of rows ``w*b ..`` holds block w for every head). K and V of one batch row
stay resident in VMEM (one BlockSpec over the whole padded sequence per (batch row, lane group),
single-buffered); the data-dependent blocks are then aligned dynamic slices ``K[w*b : w*b+b]`` (w read from
SMEM: the per-query-tile list of kept block ids is a blocked SMEM operand, the per-block key validity/range
bits another). Per query the n selected tiles (each assembled from the Hk kv heads' blocks with a lane
select) and the own-block tile are stacked to [(n+1)*b, 128]; one segmented-sum matmul gives all scores,
and the softmax is a column reduction. VMEM grows with N (about N * 128 * (2 * itemsize) bytes forward and
N * 128 * (2 * itemsize + 8) backward, plus tiles); lengths beyond the 100 MiB cap raise a ValueError.
AOT-compiled for v5e at B=2, H=8, Hk=2, d=16, bf16 up to N = 32768 (fwd+bwd); N = 65536 exceeds the cap in
the backward (dK/dV accumulators are float32 and G-expanded: 4x the unique kv lanes).

Backward: one kernel computes dQ and dK/dV. The grid runs over (batch row, lane group, query tile) with the
query-tile axis sequential ("arbitrary"); dK and dV of the whole batch row are float32 outputs resident in
VMEM across that axis, and every (query, slot) adds its contribution to the block it read with an aligned
read-modify-write. The order of the additions is fixed by the grid and the loops, so dK/dV are deterministic
without atomics and without sorting (the "inversion" happens in VMEM). Recomputation uses the saved per-head
logsumexp; delta = rowsum(dO * O) comes from XLA.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_common as tc

__all__ = ["select_blocks_tpu", "ltis_attention_tpu"]

_NEG = -1e30
_INVIS = -1e30
_BIG = 2 ** 30


# ==============================================================================================
# select_blocks_tpu
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class _SelCfg:
    b: int
    n: int
    hk: int
    d: int
    nc: int
    n_sel: int
    bsz: int
    causal: bool
    thr: float
    scale: float
    tq: int
    interpret: Any

    @property
    def n_pad(self):
        return tc.round_up(self.n, self.tq)

    @property
    def nc_pad(self):
        return tc.round_up(self.nc, tc.LANES)

    @property
    def nqt(self):
        return self.n_pad // self.tq

    @property
    def nct(self):
        return self.nc_pad // tc.LANES


def _last_tile(cfg: _SelCfg, qi):
    """Last compressed-key tile with a block visible to some query of tile qi (causal), >= 0."""
    i_max = qi * cfg.tq + (cfg.tq - 1)
    w_max = lax.div(jnp.maximum(i_max - cfg.bsz, 0), cfg.bsz)
    return lax.div(w_max, tc.LANES)


def _select_kernel(cfg: _SelCfg, q_ref, ck_ref, bv_ref, sel_ref, kept_ref, m_sc, l_sc, rv_sc, ri_sc):
    qi, j = pl.program_id(2), pl.program_id(3)
    tq, tcn = cfg.tq, tc.LANES

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -1000.0, jnp.float32)
        l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        rv_sc[...] = jnp.full(rv_sc.shape, tc.NEG_INF, jnp.float32)
        ri_sc[...] = jnp.full(ri_sc.shape, _BIG, jnp.int32)

    process = (j == 0) | (j <= _last_tile(cfg, qi)) if cfg.causal else (j >= 0)

    @pl.when(process)
    def _step():
        q = q_ref[...].astype(jnp.float32)
        ck = ck_ref[...].astype(jnp.float32)
        s = lax.dot_general(q, ck, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * cfg.scale       # [TQ, 128]
        col = j * tcn + lax.broadcasted_iota(jnp.int32, (tq, tcn), 1)
        real = col < cfg.nc
        vis = real & (bv_ref[...] != 0)                                             # [1,128] bcast
        if cfg.causal:
            row = qi * tq + lax.broadcasted_iota(jnp.int32, (tq, tcn), 0)
            vis = vis & (col * cfg.bsz + (cfg.bsz - 1) < row)
        # running logsumexp over [-1000, visible scores]
        m = m_sc[...]
        m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, _NEG), axis=1, keepdims=True))
        l_sc[...] = l_sc[...] * jnp.exp(m - m_new) + jnp.sum(
            jnp.where(vis, jnp.exp(s - m_new), 0.0), axis=1, keepdims=True)
        m_sc[...] = m_new
        # running top-n: n rounds of max-and-mask over [running | tile]
        vals = jnp.where(real, jnp.where(vis, s, _INVIS), tc.NEG_INF)
        idx = jnp.where(real, col, _BIG)
        cv = jnp.concatenate([rv_sc[...], vals], axis=1)
        ci = jnp.concatenate([ri_sc[...], idx], axis=1)
        lane = lax.broadcasted_iota(jnp.int32, (tq, tc.LANES), 1)
        new_v = jnp.full((tq, tc.LANES), tc.NEG_INF, jnp.float32)
        new_i = jnp.full((tq, tc.LANES), _BIG, jnp.int32)
        for r in range(cfg.n_sel):
            mx = jnp.max(cv, axis=1, keepdims=True)
            pick = jnp.min(jnp.where(cv == mx, ci, _BIG), axis=1, keepdims=True)
            pick = jnp.where(mx == tc.NEG_INF, _BIG, pick)
            new_v = jnp.where(lane == r, mx, new_v)
            new_i = jnp.where(lane == r, pick, new_i)
            cv = jnp.where(ci == pick, tc.NEG_INF, cv)
        rv_sc[...] = new_v
        ri_sc[...] = new_i

    @pl.when(j == cfg.nct - 1)
    def _finish():
        lse = m_sc[...] + jnp.log(l_sc[...])
        rv = rv_sc[...]
        ri = ri_sc[...]
        p = jnp.exp(rv - lse)
        kept = (p > cfg.thr) & (ri != _BIG)
        sel = jnp.where(ri == _BIG, 0, ri)
        sel_ref[...] = sel[:, :cfg.n_sel]
        kept_ref[...] = kept[:, :cfg.n_sel].astype(jnp.int32)


def select_blocks_tpu(q_mean, compressed_keys, block_valid, *, causal: bool = True, num_selected: int = 4,
                      block_size: int = 16, keep_threshold: float = 1e-10, scale: float,
                      interpret: Any = False, block_rows: int | None = None):
    """Top-n compressed-block selection with a streaming Pallas TPU kernel (see module docstring)."""
    b, n, hk, d = q_mean.shape
    nc = compressed_keys.shape[2]
    n_sel = int(num_selected)
    if compressed_keys.shape != (b, hk, nc, d):
        raise ValueError(f"compressed_keys must be [B, Hk, Nc, d], got {compressed_keys.shape}")
    if block_valid.shape != (b, nc):
        raise ValueError(f"block_valid must be [B, Nc], got {block_valid.shape}")
    if not 1 <= n_sel <= tc.LANES:
        raise NotImplementedError(f"num_selected must be in 1..{tc.LANES}")
    if nc == 0:
        return jnp.zeros((b, n, hk, n_sel), jnp.int32), jnp.zeros((b, n, hk, n_sel), bool)
    tq = block_rows if block_rows is not None else min(256, tc.round_up(n, 8))
    tq = tc.round_up(tq, 8)
    cfg = _SelCfg(b=b, n=n, hk=hk, d=d, nc=nc, n_sel=n_sel, bsz=int(block_size), causal=bool(causal),
                  thr=float(keep_threshold), scale=float(scale), tq=tq, interpret=interpret)
    qt = jnp.transpose(q_mean.astype(jnp.float32), (0, 2, 1, 3))
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, cfg.n_pad - n), (0, 0)))
    ck = jnp.pad(compressed_keys.astype(jnp.float32), ((0, 0), (0, 0), (0, cfg.nc_pad - nc), (0, 0)))
    bv = jnp.pad(block_valid.astype(jnp.int32), ((0, 0), (0, cfg.nc_pad - nc)))[:, None, :]

    if cfg.causal:
        def kv_tile(qi, j):
            return jnp.minimum(j, _last_tile(cfg, qi))
    else:
        def kv_tile(qi, j):
            return j
    out_spec = pl.BlockSpec((None, None, tq, n_sel), lambda bb, h, qi, j: (bb, h, qi, 0))
    sel, kept = pl.pallas_call(
        functools.partial(_select_kernel, cfg),
        grid=(b, hk, cfg.nqt, cfg.nct),
        in_specs=[
            pl.BlockSpec((None, None, tq, d), lambda bb, h, qi, j: (bb, h, qi, 0)),
            pl.BlockSpec((None, None, tc.LANES, d), lambda bb, h, qi, j: (bb, h, kv_tile(qi, j), 0)),
            pl.BlockSpec((None, 1, tc.LANES), lambda bb, h, qi, j: (bb, 0, kv_tile(qi, j))),
        ],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((b, hk, cfg.n_pad, n_sel), jnp.int32)] * 2,
        scratch_shapes=[pltpu.VMEM((tq, 1), jnp.float32), pltpu.VMEM((tq, 1), jnp.float32),
                        pltpu.VMEM((tq, tc.LANES), jnp.float32), pltpu.VMEM((tq, tc.LANES), jnp.int32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tc.interpret_arg(interpret),
        name="ltis_select_tpu",
    )(qt, ck, bv)
    sel = jnp.transpose(sel[:, :, :n], (0, 2, 1, 3))
    kept = jnp.transpose(kept[:, :, :n], (0, 2, 1, 3)) != 0
    return sel, kept


# ==============================================================================================
# ltis_attention_tpu
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class _Cfg(tc.LaneGeometry):
    b: int
    n: int
    h: int
    hk: int
    d: int
    n_sel: int
    bsz: int
    causal: bool
    mask_padded: bool
    interpret: Any
    block_rows: int | None = None

    @property
    def tq(self):
        if self.block_rows is not None:
            return tc.round_up(self.block_rows, self.bsz)
        return self.bsz * min(8, -(-self.n // self.bsz))

    @property
    def n_pad(self):
        return tc.round_up(self.n, self.tq)

    @property
    def nqt(self):
        return self.n_pad // self.tq

    @property
    def nb(self):
        return self.n_pad // self.bsz

    @property
    def sel_len(self):
        return self.tq * self.hk * self.n_sel


def _lane_kv_masks(cfg: _Cfg, lgi):
    """[1, 128] bool per kv head: lanes of the heads of that GQA group (lane group lgi)."""
    g = cfg.h // cfg.hk
    lane = lax.broadcasted_iota(jnp.int32, (1, tc.LANES), 1)
    head = lax.shift_right_logical(lgi * tc.LANES + lane, tc.log2_exact(cfg.d))
    return [(head >= h * g) & (head < (h + 1) * g) for h in range(cfg.hk)]


def _bits_col(word, nrows):
    """Scalar int32 bit word -> bool [nrows, 1] (row t: bit t)."""
    t = lax.broadcasted_iota(jnp.int32, (nrows, 1), 0)
    return (lax.shift_right_logical(jnp.full((nrows, 1), word, jnp.int32), t) & 1) != 0


def _gather_tiles(cfg: _Cfg, sel_ref, bm_ref, k_ref, v_ref, i_tile, kv_masks):
    """Selected tiles of one query: lists of n [b,128] K and V tiles, masks [b,128], block ids, ok flags."""
    bsz = cfg.bsz
    ks, vs, ms, blocks = [], [], [], []
    for r in range(cfg.n_sel):
        kt = jnp.zeros((bsz, tc.LANES), jnp.float32)
        vt = jnp.zeros((bsz, tc.LANES), jnp.float32)
        mt = jnp.zeros((bsz, tc.LANES), jnp.float32)   # float 0/1 masks (bool vectors don't stack)
        blk_r = []
        for h in range(cfg.hk):
            w = sel_ref[(i_tile * cfg.hk + h) * cfg.n_sel + r]
            ok = w >= 0
            wc = jnp.maximum(w, 0)
            rows = pl.ds(pl.multiple_of(wc * bsz, bsz), bsz)
            kb = k_ref[rows, :].astype(jnp.float32)
            vb = v_ref[rows, :].astype(jnp.float32)
            word = bm_ref[2 * wc + 1]
            if cfg.mask_padded:
                word = word & bm_ref[2 * wc]
            keyok = jnp.where(_bits_col(word, bsz) & ok, 1.0, 0.0)
            lm = kv_masks[h]
            kt = jnp.where(lm, kb, kt)
            vt = jnp.where(lm, vb, vt)
            mt = jnp.where(lm, keyok, mt)
            blk_r.append(wc)
        ks.append(kt)
        vs.append(vt)
        ms.append(mt)
        blocks.append(blk_r)
    return ks, vs, ms, blocks


def _row(x, t):
    """Row t (dynamic) of a [R, 128] float32 value -> [1, 128]."""
    r = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(r == t, x, 0.0), axis=0, keepdims=True)


def _query_setup(cfg: _Cfg, bm_ref, k_ref, v_ref, cabs, t, own_k, own_v, ks, vs, ms):
    """Stack the selected tiles and the own-block tile; returns K, V [(n+1)b or nb, 128], mask."""
    bsz = cfg.bsz
    own_word = bm_ref[2 * cabs]
    qvalid = (lax.shift_right_logical(own_word, t) & 1) != 0
    if cfg.causal:
        r = lax.broadcasted_iota(jnp.int32, (bsz, 1), 0)
        own_ok = (r <= t) & _bits_col(own_word, bsz)
        ks = ks + [own_k]
        vs = vs + [own_v]
        ms = ms + [jnp.broadcast_to(jnp.where(own_ok, 1.0, 0.0), (bsz, tc.LANES))]
    kcat = jnp.concatenate(ks, axis=0)
    vcat = jnp.concatenate(vs, axis=0)
    mcat = (jnp.concatenate(ms, axis=0) > 0.0) & qvalid
    return kcat, vcat, mcat


def _fwd_kernel(cfg: _Cfg, sel_ref, bm_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    lgi, qi = pl.program_id(1), pl.program_id(2)
    bsz = cfg.bsz
    nblk = cfg.tq // bsz
    bd = tc.seg_matrix(cfg.d)
    scale = tc.scale_of(cfg.d)
    kv_masks = _lane_kv_masks(cfg, lgi)
    rid = lax.broadcasted_iota(jnp.int32, (bsz, tc.LANES), 0)

    def per_block(c, carry):
        cabs = qi * nblk + c
        rows_q = pl.ds(pl.multiple_of(c * bsz, bsz), bsz)
        rows_own = pl.ds(pl.multiple_of(cabs * bsz, bsz), bsz)
        qblk = q_ref[rows_q, :].astype(jnp.float32) * scale
        own_k = k_ref[rows_own, :].astype(jnp.float32)
        own_v = v_ref[rows_own, :].astype(jnp.float32)

        def per_query(t, acc):
            o_acc, lse_acc = acc
            i_tile = c * bsz + t
            qrow = _row(qblk, t)
            ks, vs, ms, _ = _gather_tiles(cfg, sel_ref, bm_ref, k_ref, v_ref, i_tile, kv_masks)
            kcat, vcat, mcat = _query_setup(cfg, bm_ref, k_ref, v_ref, cabs, t, own_k, own_v, ks, vs, ms)
            s = tc.seg_sum(kcat * qrow, bd)
            m = jnp.max(jnp.where(mcat, s, _NEG), axis=0, keepdims=True)
            p = jnp.where(mcat, jnp.exp(s - m), 0.0)
            l = jnp.sum(p, axis=0, keepdims=True)
            o = jnp.sum(p * vcat, axis=0, keepdims=True)
            ok = l > 0.0
            safe = jnp.where(ok, l, 1.0)
            o_row = jnp.where(ok, o / safe, 0.0)
            lse_row = jnp.where(ok, m + jnp.log(safe), 0.0)
            return jnp.where(rid == t, o_row, o_acc), jnp.where(rid == t, lse_row, lse_acc)

        zero = jnp.zeros((bsz, tc.LANES), jnp.float32)
        o_blk, lse_blk = lax.fori_loop(0, bsz, per_query, (zero, zero))
        o_ref[rows_q, :] = o_blk.astype(o_ref.dtype)
        lse_ref[rows_q, :] = lse_blk
        return carry

    lax.fori_loop(0, nblk, per_block, 0)


def _bwd_kernel(cfg: _Cfg, sel_ref, bm_ref, q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref,
                dq_ref, dk_ref, dv_ref):
    lgi, qi = pl.program_id(1), pl.program_id(2)
    bsz = cfg.bsz
    nblk = cfg.tq // bsz
    bd = tc.seg_matrix(cfg.d)
    scale = tc.scale_of(cfg.d)
    kv_masks = _lane_kv_masks(cfg, lgi)
    rid = lax.broadcasted_iota(jnp.int32, (bsz, tc.LANES), 0)

    @pl.when(qi == 0)
    def _zero():
        dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

    def per_block(c, carry):
        cabs = qi * nblk + c
        rows_q = pl.ds(pl.multiple_of(c * bsz, bsz), bsz)
        rows_own = pl.ds(pl.multiple_of(cabs * bsz, bsz), bsz)
        qblk = q_ref[rows_q, :].astype(jnp.float32) * scale
        doblk = do_ref[rows_q, :].astype(jnp.float32)
        lseblk = lse_ref[rows_q, :]
        dlblk = dl_ref[rows_q, :]
        own_k = k_ref[rows_own, :].astype(jnp.float32)
        own_v = v_ref[rows_own, :].astype(jnp.float32)

        def per_query(t, acc):
            dq_acc, dko, dvo = acc
            i_tile = c * bsz + t
            qrow = _row(qblk, t)
            dorow = _row(doblk, t)
            lse_row = _row(lseblk, t)
            dl_row = _row(dlblk, t)
            ks, vs, ms, blocks = _gather_tiles(cfg, sel_ref, bm_ref, k_ref, v_ref, i_tile, kv_masks)
            kcat, vcat, mcat = _query_setup(cfg, bm_ref, k_ref, v_ref, cabs, t, own_k, own_v, ks, vs, ms)
            s = tc.seg_sum(kcat * qrow, bd)
            p = jnp.where(mcat, jnp.exp(s - lse_row), 0.0)
            dp = tc.seg_sum(vcat * dorow, bd)
            ds = p * (dp - dl_row)
            dq_row = jnp.sum(ds * kcat, axis=0, keepdims=True) * scale
            dkc = ds * qrow
            dvc = p * dorow
            for r in range(cfg.n_sel):
                dk_r = dkc[r * bsz:(r + 1) * bsz]
                dv_r = dvc[r * bsz:(r + 1) * bsz]
                for h in range(cfg.hk):
                    rows = pl.ds(pl.multiple_of(blocks[r][h] * bsz, bsz), bsz)
                    lm = kv_masks[h]
                    dk_ref[rows, :] += jnp.where(lm, dk_r, 0.0)
                    dv_ref[rows, :] += jnp.where(lm, dv_r, 0.0)
            if cfg.causal:
                o0 = cfg.n_sel * bsz
                dko = dko + dkc[o0:o0 + bsz]
                dvo = dvo + dvc[o0:o0 + bsz]
            return jnp.where(rid == t, dq_row, dq_acc), dko, dvo

        zero = jnp.zeros((bsz, tc.LANES), jnp.float32)
        dq_blk, dko, dvo = lax.fori_loop(0, bsz, per_query, (zero, zero, zero))
        dq_ref[rows_q, :] = dq_blk.astype(dq_ref.dtype)
        if cfg.causal:
            dk_ref[rows_own, :] += dko
            dv_ref[rows_own, :] += dvo
        return carry

    lax.fori_loop(0, nblk, per_block, 0)


def _resident_spec(cfg: _Cfg):
    return pl.BlockSpec((None, cfg.n_pad, tc.LANES), lambda b, l, i: (b, 0, l),
                        pipeline_mode=pl.Buffered(1))


def _tile_spec(cfg: _Cfg):
    return pl.BlockSpec((None, cfg.tq, tc.LANES), lambda b, l, i: (b, i, l))


def _smem_specs(cfg: _Cfg):
    return [
        pl.BlockSpec((None, None, cfg.sel_len), lambda b, l, i: (b * cfg.nqt + i, 0, 0),
                     memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, 2 * cfg.nb), lambda b, l, i: (b, 0, 0), memory_space=pltpu.SMEM),
    ]


def _fwd_call(cfg: _Cfg, selk, bm, qp, kx, vx):
    lw = cfg.lg * tc.LANES
    isz = qp.dtype.itemsize
    nbytes = cfg.n_pad * tc.LANES * 2 * isz + 6 * cfg.tq * tc.LANES * 4 + (cfg.n_sel + 1) * cfg.bsz * 4096
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(cfg.b, cfg.lg, cfg.nqt),
        in_specs=_smem_specs(cfg) + [_tile_spec(cfg), _resident_spec(cfg), _resident_spec(cfg)],
        out_specs=[_tile_spec(cfg), _tile_spec(cfg)],
        out_shape=[jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), qp.dtype),
                   jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"),
            vmem_limit_bytes=tc.vmem_limit(nbytes)),
        interpret=tc.interpret_arg(cfg.interpret),
        name="ltis_fwd_tpu",
    )(selk, bm, qp, kx, vx)


def _bwd_call(cfg: _Cfg, selk, bm, qp, dop, lse, delta, kx, vx):
    lw = cfg.lg * tc.LANES
    isz = qp.dtype.itemsize
    acc_spec = pl.BlockSpec((None, cfg.n_pad, tc.LANES), lambda b, l, i: (b, 0, l))
    nbytes = (cfg.n_pad * tc.LANES * (2 * isz + 2 * 2 * 4) + 12 * cfg.tq * tc.LANES * 4
              + 2 * (cfg.n_sel + 1) * cfg.bsz * 4096)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg),
        grid=(cfg.b, cfg.lg, cfg.nqt),
        in_specs=_smem_specs(cfg) + [_tile_spec(cfg)] * 4 + [_resident_spec(cfg), _resident_spec(cfg)],
        out_specs=[_tile_spec(cfg), acc_spec, acc_spec],
        out_shape=[jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), qp.dtype),
                   jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), jnp.float32),
                   jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=tc.vmem_limit(nbytes)),
        interpret=tc.interpret_arg(cfg.interpret),
        name="ltis_bwd_tpu",
    )(selk, bm, qp, dop, lse, delta, kx, vx)


def _metadata(cfg: _Cfg, valid, selected_blocks, kept):
    """SMEM operands: kept block ids per query tile ([B*nqt, 1, TQ*Hk*n], -1 = unused slot) and per-block
    key bit words ([B, 1, 2*NB]: word 2w = validity bits, 2w+1 = in-range (< N) bits)."""
    n, bsz = cfg.n, cfg.bsz
    sel = selected_blocks.astype(jnp.int32)
    use = kept.astype(bool) & (sel >= 0) & (sel * bsz < n)
    selk = jnp.where(use, sel, -1)
    selk = jnp.pad(selk, ((0, 0), (0, cfg.n_pad - n), (0, 0), (0, 0)), constant_values=-1)
    selk = selk.reshape(cfg.b * cfg.nqt, 1, cfg.sel_len)
    vpad = jnp.pad(valid.astype(bool), ((0, 0), (0, cfg.n_pad - n)))
    vbits = tc.pack_bits(vpad.reshape(cfg.b, cfg.nb, bsz))[..., 0]
    rng = (jnp.arange(cfg.n_pad) < n).reshape(1, cfg.nb, bsz)
    rbits = jnp.broadcast_to(tc.pack_bits(rng)[..., 0], vbits.shape)
    bm = jnp.stack([vbits, rbits], axis=-1).reshape(cfg.b, 1, 2 * cfg.nb)
    return selk, bm


def _forward(cfg: _Cfg, q, k, v, valid, selected_blocks, kept):
    selk, bm = _metadata(cfg, valid, selected_blocks, kept)
    qp = tc.pack_heads(q, cfg.h_pad, cfg.n_pad)
    kx = tc.expand_kv(k, cfg.h, cfg.h_pad, cfg.n_pad)
    vx = tc.expand_kv(v, cfg.h, cfg.h_pad, cfg.n_pad)
    o_p, lse_p = _fwd_call(cfg, selk, bm, qp, kx, vx)
    return tc.unpack_heads(o_p, cfg.n, cfg.h, cfg.d), tc.compact_stat(lse_p, cfg.n, cfg.h, cfg.d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ltis(cfg, q, k, v, valid, selected_blocks, kept):
    return _forward(cfg, q, k, v, valid, selected_blocks, kept)[0]


def _ltis_fwd(cfg, q, k, v, valid, selected_blocks, kept):
    o, lse = _forward(cfg, q, k, v, valid, selected_blocks, kept)
    return o, (q, k, v, valid, selected_blocks, kept, o, lse)


def _ltis_bwd(cfg, res, do):
    q, k, v, valid, selected_blocks, kept, o, lse = res
    selk, bm = _metadata(cfg, valid, selected_blocks, kept)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse_x = tc.expand_stat(lse, cfg.h_pad, cfg.n_pad, cfg.d)
    dl_x = tc.expand_stat(delta, cfg.h_pad, cfg.n_pad, cfg.d)
    qp = tc.pack_heads(q, cfg.h_pad, cfg.n_pad)
    dop = tc.pack_heads(do.astype(q.dtype), cfg.h_pad, cfg.n_pad)
    kx = tc.expand_kv(k, cfg.h, cfg.h_pad, cfg.n_pad)
    vx = tc.expand_kv(v, cfg.h, cfg.h_pad, cfg.n_pad)
    dq_p, dk_x, dv_x = _bwd_call(cfg, selk, bm, qp, dop, lse_x, dl_x, kx, vx)
    dq = tc.unpack_heads(dq_p, cfg.n, cfg.h, cfg.d).astype(q.dtype)
    dk = tc.reduce_kv_grad(dk_x, cfg.n, cfg.h, cfg.hk, cfg.d).astype(k.dtype)
    dv = tc.reduce_kv_grad(dv_x, cfg.n, cfg.h, cfg.hk, cfg.d).astype(v.dtype)
    return dq, dk, dv, None, None, None


_ltis.defvjp(_ltis_fwd, _ltis_bwd)


def ltis_attention_tpu(q, k, v, valid, selected_blocks, kept, *, causal: bool = True, block_size: int = 16,
                       mask_padded_block_keys: bool = False, interpret: Any = False,
                       block_rows: int | None = None):
    """LTIS fine attention with Pallas TPU kernels (see module docstring). ``block_rows``: query rows per
    grid step (a multiple of block_size; default min(8 * block_size, N rounded up))."""
    b, n, h, d = q.shape
    hk = k.shape[2]
    if k.shape != (b, n, hk, d) or v.shape != k.shape:
        raise ValueError(f"bad shapes q {q.shape} k {k.shape} v {v.shape}")
    if h % hk:
        raise ValueError(f"H={h} must be a multiple of Hk={hk}")
    if selected_blocks.shape[:3] != (b, n, hk) or kept.shape != selected_blocks.shape:
        raise ValueError(f"selected_blocks/kept must be [B, N, Hk, n], got {selected_blocks.shape}")
    if block_size not in (16, 32):
        raise NotImplementedError("the TPU LTIS kernel supports block_size 16 or 32")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    cfg = _Cfg(b=b, n=n, h=h, hk=hk, d=d, n_sel=selected_blocks.shape[3], bsz=int(block_size),
               causal=bool(causal), mask_padded=bool(mask_padded_block_keys), interpret=interpret,
               block_rows=block_rows)
    return _ltis(cfg, q, k.astype(q.dtype), v.astype(q.dtype), valid.astype(bool),
                 selected_blocks.astype(jnp.int32), kept.astype(bool))
