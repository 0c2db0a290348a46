"""Gated BlossomRec attention (LTIS + STIS + gate mix, SPEC 3.5, 4, 5) as one set of Pallas GPU kernels
(Triton lowering): the gather path of ``ltis_gpu`` and ``stis_gpu`` merged, for causal attention.

``ltis_gpu`` and ``stis_gpu`` are separate ``custom_vjp`` kernels whose outputs XLA mixes with the gates
(``o = g_l * o_ltis + g_s * o_stis``); their backwards need XLA between them too (the gate gradients
``sum(dO * o)``, the gated cotangents ``g * dO``, each branch's ``delta``, and the sums ``dq_l + dq_s``,
``dk_l + dk_s``, ``dv_l + dv_s``). At N = 1k that is 7 kernels plus ~45 small XLA ops per layer call, and
the XLA part cost as much device time as the LTIS kernels (benchmarks/results/gpu_call20_2026-11-27). Here
each program computes both branches for the same rows and mixes them itself:

* forward (one program per (batch, kv head, BQ queries), rows packed query-major as in ``ltis_gpu``): the
  LTIS key walk (own causal block + kept blocks, ``ltis_gpu._walk_keys``), then the STIS keys as two tiles
  on the same ``[rows, d]`` query tile (the window as one contiguous key tile, the power-of-two offsets of
  ``stis_gpu``'s offset plan as one gathered, block-diagonally masked tile), two online softmaxes, and the
  gate mix. It writes the mixed output and, when a gradient is needed, each
  branch's output and log-sum-exp (base 2).
* dQ (same tiling and key tiles): the gate gradients ``dg = rowsum(dO * o_branch)`` (which are also each
  branch's softmax ``delta`` for the ungated cotangent), then ``dQ = sum over both key sets of g P (dP - dg) K``.
* dK/dV (one program per (batch, kv head, key block of b keys)): the LTIS part walks the queries that
  kept the block (the inverted selection of ``ltis_gpu._inverse_selection``: a sort, deterministic) and
  the block's own queries; the STIS part walks the queries ``j + o`` of each offset ``o`` (contiguous
  ``[b, G, d]`` tiles, ``stis_gpu``'s inverse offsets, elementwise). One write of dK and dV per key, no atomics: the backward is
  bitwise deterministic.

The gates enter every probability as a factor: with ``dO_l = g_l dO`` the LTIS branch's
``dS = P (dO_l . V - delta_l) = g_l P (dO . V - dg_l)`` and ``dV = P^T dO_l = (g_l P)^T dO``, so the
kernels read the raw ``dO`` and the per-row gate instead of materialising gated cotangents.

Measured (H100, see ``MIN_LEN``): no faster than the separate kernels up to N = 4k, 10 % less device time at
32k. Each program is short and latency-bound (one warp, a few dependent gathers), so merging two of them saves
little; what it removes is the XLA work between the branches, which grows with N (the gate and delta
reductions, the gradient sums). The first version walked the STIS offsets one dependent load at a time in
the forward and dQ kernels (dQ 0.41 ms at 1k against 0.26 ms for the two separate kernels, gpu_call22); they
now take the window as one contiguous key tile and the powers of two as one gathered tile.

Scope: causal attention (the SASRec-style model) with a power-of-two GQA group; under causal masking the
STIS sink is a no-op (SPEC 4), so there is no cross-tile reduction. Bidirectional attention and other
group sizes use ``ltis_gpu`` + ``stis_gpu`` (see ``supports``). Same masking rules as those kernels: padded
queries write zeros and walk no keys, masked keys are loaded as zero and masked scores replaced (select,
not multiply), so NaN at padded positions reaches nothing (causal, right padding).

Reference: the gate mix of ``ltis_reference.ltis_attention_reference`` and
``stis_reference.stis_attention_reference`` (``gated_attention_reference`` below).
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
from pallas_kernels import ltis_gpu, stis_gpu
from pallas_kernels.ltis_reference import ltis_attention_reference
from pallas_kernels.stis_reference import stis_attention_reference

__all__ = ["gated_attention_gpu", "gated_attention_reference", "supports"]

# Shortest sequence for which ``blossom_jax.ops.pallas`` uses these kernels instead of ``ltis_gpu`` + ``stis_gpu``
# (sequences up to ``fused_gpu.max_len`` take the fused dense-tile kernel first). Layer fwd+bwd device time on an
# H100, bf16, 65,536 tokens, gated / separate kernels (benchmarks/results/gpu_call24_2026-11-27, same call):
#   N = 1k: 1.134 / 1.128 ms, 4k: 1.308 / 1.315 ms, 32k: 1.872 / 2.070 ms
# (at 32k: dQ 0.24 vs 0.15 + 0.15, dK/dV 0.31 vs 0.20 + 0.15, XLA backward 0.30 vs 0.37). Even at short N, ahead
# at long N, so they start in between. ``DISABLED`` turns them off (``--set gated_gpu.MIN_LEN=2147483647``).
DISABLED = 2**31 - 1
MIN_LEN = 8192
# Warps per program. The forward / dQ tiles are the [16, 64] LTIS tiles of ``ltis_gpu`` plus two STIS key tiles:
# one warp (two: forward / dQ 0.19 / 0.29 -> 0.37 / 0.55 ms at N = 1k, gpu_call22). The dK/dV program adds a
# [b, G, d] STIS tile per offset to the LTIS walk: two warps (0.28 -> 0.24 ms at 1k, 0.39 -> 0.32 at 32k against
# one; four no better).
FWD_NUM_WARPS = 1
DQ_NUM_WARPS = 1
DKV_NUM_WARPS = 2
# Software-pipelining depth of the dK/dV kernel's query-list loop (Triton prefetches the next chunk's pair ids, q / dO
# rows and statistics with cp.async). 3 against 2, alternated in one process (H200, 65,536 tokens,
# benchmarks/results/gpu_call62..63_2026-11-29): 0.311 / 0.312 -> 0.300 / 0.301 ms at N = 32k, 0.306 / 0.304 -> 0.291 /
# 0.291 at 64k, same errors; the separate LTIS dK/dV kernel (``ltis_gpu.DKV_NUM_STAGES``) was no faster with 3.
DKV_NUM_STAGES = 3
# Packed rows (pairs x G heads) per chunk of the dK/dV kernel's query-list walk: 64 (32, the separate LTIS kernel's
# ``ltis_gpu.DKV_ROWS``: 0.286 -> 0.311 ms at N = 32k; 128: 0.292; H200, benchmarks/results/gpu_call67_2026-11-29).
DKV_ROWS = 64

_NEG_INF = float("-inf")


def supports(*, causal: bool, num_heads: int, num_kv_heads: int) -> bool:
    """Whether these kernels cover the configuration: causal attention with a power-of-two GQA group."""
    group = num_heads // num_kv_heads
    return bool(causal) and group >= 1 and (group & (group - 1)) == 0


def gated_attention_reference(q, k, v, gates, valid, selected_blocks, kept, *, window: int = 8,
                              block_size: int = 16, mask_padded_block_keys: bool = False) -> jax.Array:
    """Pure-jnp oracle: ``g_l * ltis + g_s * stis`` (causal), 0 at invalid queries. Shapes as
    :func:`gated_attention_gpu`."""
    o_l = ltis_attention_reference(q, k, v, valid, selected_blocks, kept, causal=True, block_size=block_size,
                                   mask_padded_block_keys=mask_padded_block_keys).astype(jnp.float32)
    o_s = stis_attention_reference(q, k, v, valid, causal=True, window=window).astype(jnp.float32)
    gates = gates.astype(jnp.float32)
    out = gates[..., 0:1] * o_l + gates[..., 1:2] * o_s
    return jnp.where(valid[:, :, None, None], out, 0.0).astype(q.dtype)


# ---------------------------------------------------------------------------------------------------------
# In-kernel pieces shared by the forward and dQ kernels (rows: ``gc.Rows``, packed query-major).

def _window_keys(window: int, bq: int) -> int:
    """Keys of the STIS window tile of a query tile: the window of its last query back to its first."""
    return max(16, gc.next_pow2(window + bq - 1))


def _power_columns(bq: int, npow: int) -> tuple[int, int]:
    """(offsets per query padded to a power of two, key columns of the power-offset tile)."""
    tp = gc.next_pow2(max(npow, 1))
    return tp, max(16, bq * tp)


def _stis_walk(carry, visit, q, q0, rows, k_ref, v_ref, valid_ref, *, seq_len, bq, window, plan):
    """Feeds the STIS keys of a query tile to ``visit(carry, scores, mask, k_tile, v_tile)`` as two tiles:

    * the window (offsets 0 .. window-1): the keys of the tile's queries are the contiguous positions
      ``q0 + bq - WK .. q0 + bq - 1``, one ``[rows, d] x [d, WK]`` product masked to ``0 <= i - j < window``;
    * the powers of two ``p0 << t``: key column ``c = j * TP + t`` is position ``q0 + j - (p0 << t)`` (query j
      of the tile), gathered and masked block-diagonally like the kept blocks of ``ltis_gpu``.

    Two tiles instead of one dependent load per offset: measured on H100s, the per-offset form made the merged
    dQ kernel 0.41 ms at N = 1k (gpu_call22), the two tiles 0.29 ms (gpu_call23); the separate LTIS + STIS dQ
    kernels take 0.26 ms together."""
    d = q.shape[-1]
    cd = jnp.arange(d, dtype=jnp.int32)[None, :]

    def load(kpos, kin):
        kpos_c = jnp.where(kin, kpos, 0)
        kval = kin & (valid_ref[kpos_c] != 0)
        kt = plgpu.load(k_ref.at[kpos_c[:, None], cd], mask=kval[:, None], other=0.0)
        vt = plgpu.load(v_ref.at[kpos_c[:, None], cd], mask=kval[:, None], other=0.0)
        return kval, kt, vt

    wk = _window_keys(window, bq)
    kpos = q0 + bq - wk + jnp.arange(wk, dtype=jnp.int32)
    kval, kt, vt = load(kpos, (kpos >= 0) & (kpos < seq_len))
    diff = rows.qi[:, None] - kpos[None, :]
    mask = rows.ok[:, None] & kval[None, :] & (diff >= 0) & (diff < window)
    carry = visit(carry, gc.dot(q, kt, trans_b=True), mask, kt, vt)
    if plan.npow:
        tp, n_cols = _power_columns(bq, plan.npow)
        c = jnp.arange(n_cols, dtype=jnp.int32)
        cj, ct = gc.idiv(c, tp), gc.irem(c, tp)
        kpos = q0 + cj - jnp.left_shift(jnp.full_like(ct, plan.p0), ct)
        kval, kt, vt = load(kpos, (cj < bq) & (ct < plan.npow) & (kpos >= 0) & (q0 + cj < seq_len))
        mask = rows.ok[:, None] & kval[None, :] & (rows.j[:, None] == cj[None, :])
        carry = visit(carry, gc.dot(q, kt, trans_b=True), mask, kt, vt)
    return carry


def _softmax_result(m, l, acc, ok):
    """(o [R, d], lse [R], base 2) of an online softmax; 0 for rows without any key."""
    nonempty = ok & (l > 0)
    l_safe = jnp.where(nonempty, l, 1.0)
    o = jnp.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    return o, jnp.where(nonempty, m + jnp.log2(l_safe), 0.0)


def _forward_rows(q, q0, rows, k_ref, v_ref, valid_ref, sel_ref, *, seq_len, n_sel, bq, block_size,
                  mask_padded, window, plan, qk_scale):
    """Both branches for one tile of packed rows: ((o_l, lse_l), (o_s, lse_s)), float32."""
    rp, d = q.shape

    def update(carry, s, mask, kt, vt):
        return ltis_gpu._softmax_step(carry, s, mask, vt, qk_scale)

    init = (jnp.full((rp,), _NEG_INF, jnp.float32), jnp.zeros((rp,), jnp.float32), jnp.zeros((rp, d), jnp.float32))
    ltis = ltis_gpu._walk_keys(init, update, q, q0, rows, k_ref, v_ref, valid_ref, sel_ref, seq_len=seq_len,
                               n_sel=n_sel, bq=bq, block_size=block_size, causal=True, mask_padded=mask_padded)
    stis = _stis_walk(init, update, q, q0, rows, k_ref, v_ref, valid_ref, seq_len=seq_len, bq=bq, window=window,
                      plan=plan)
    return _softmax_result(*ltis, rows.ok), _softmax_result(*stis, rows.ok)


# ---------------------------------------------------------------------------------------------------------
# Kernels. Refs (batch and kv head squeezed): q-like [N, G, d]; k, v [N, d]; valid [N] int32; sel [N, n]
# int32 (encoded: >= 0 kept block); per-row statistics [N, G] float32.

def _query_tile(q_ref, valid_ref, *, bq, rp, g, seq_len):
    """(head dim, first query, packed rows, whether any row is a valid query) of this program's query tile."""
    q0 = pl.program_id(0) * bq
    rows = gc.Rows(q0, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)
    return q_ref.shape[-1], q0, rows, ltis_gpu._any_row(rows)


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, gl_ref, gs_ref, out_ref, *res_refs, seq_len, g,
                n_sel, bq, rp, block_size, mask_padded, window, plan, qk_scale):
    d, q0, rows, any_row = _query_tile(q_ref, valid_ref, bq=bq, rp=rp, g=g, seq_len=seq_len)

    @pl.when(any_row)
    def _attend():
        q = rows.load(q_ref, d)
        (o_l, lse_l), (o_s, lse_s) = _forward_rows(
            q, q0, rows, k_ref, v_ref, valid_ref, sel_ref, seq_len=seq_len, n_sel=n_sel, bq=bq,
            block_size=block_size, mask_padded=mask_padded, window=window, plan=plan, qk_scale=qk_scale)
        gate_l, gate_s = rows.load_row(gl_ref), rows.load_row(gs_ref)
        out = jnp.where(rows.ok[:, None], gate_l[:, None] * o_l + gate_s[:, None] * o_s, 0.0)
        rows.store(out_ref, out.astype(out_ref.dtype))
        if res_refs:
            ol_ref, os_ref, lsel_ref, lses_ref = res_refs
            rows.store(ol_ref, o_l.astype(ol_ref.dtype))
            rows.store(os_ref, o_s.astype(os_ref.dtype))
            rows.store_row(lsel_ref, lse_l)
            rows.store_row(lses_ref, lse_s)

    @pl.when(jnp.logical_not(any_row))
    def _padding():  # a tile of padded queries: zeros, no key walk
        zeros = jnp.zeros((rp, d), out_ref.dtype)
        rows.store(out_ref, zeros)
        if res_refs:
            ol_ref, os_ref, lsel_ref, lses_ref = res_refs
            rows.store(ol_ref, zeros)
            rows.store(os_ref, zeros)
            rows.store_row(lsel_ref, jnp.zeros((rp,), jnp.float32))
            rows.store_row(lses_ref, jnp.zeros((rp,), jnp.float32))


def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, gl_ref, gs_ref, do_ref, ol_ref, os_ref, lsel_ref,
               lses_ref, dq_ref, dgl_ref, dgs_ref, *, seq_len, g, n_sel, bq, rp, block_size, mask_padded,
               window, plan, qk_scale, sm_scale):
    d, q0, rows, any_row = _query_tile(q_ref, valid_ref, bq=bq, rp=rp, g=g, seq_len=seq_len)

    @pl.when(any_row)
    def _attend():
        q = rows.load(q_ref, d)
        do = rows.load(do_ref, d)
        do_f = do.astype(jnp.float32)
        # gate gradients = each branch's softmax delta for the ungated cotangent
        dg_l = jnp.sum(do_f * rows.load(ol_ref, d).astype(jnp.float32), axis=1)
        dg_s = jnp.sum(do_f * rows.load(os_ref, d).astype(jnp.float32), axis=1)

        def branch_update(lse, gate, dg):
            return functools.partial(ltis_gpu._dq_step, do=do, lse=lse, delta=dg, qk_scale=qk_scale, gate=gate)

        dq = ltis_gpu._walk_keys(
            jnp.zeros((rp, d), jnp.float32), branch_update(rows.load_row(lsel_ref), rows.load_row(gl_ref), dg_l),
            q, q0, rows, k_ref, v_ref, valid_ref, sel_ref, seq_len=seq_len, n_sel=n_sel, bq=bq,
            block_size=block_size, causal=True, mask_padded=mask_padded)
        dq = _stis_walk(dq, branch_update(rows.load_row(lses_ref), rows.load_row(gs_ref), dg_s), q, q0, rows,
                        k_ref, v_ref, valid_ref, seq_len=seq_len, bq=bq, window=window, plan=plan)
        rows.store(dq_ref, (dq * sm_scale).astype(dq_ref.dtype))
        rows.store_row(dgl_ref, jnp.where(rows.ok, dg_l, 0.0))
        rows.store_row(dgs_ref, jnp.where(rows.ok, dg_s, 0.0))

    @pl.when(jnp.logical_not(any_row))
    def _padding():
        rows.store(dq_ref, jnp.zeros((rp, d), dq_ref.dtype))
        rows.store_row(dgl_ref, jnp.zeros((rp,), jnp.float32))
        rows.store_row(dgs_ref, jnp.zeros((rp,), jnp.float32))


def _dkv_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, gl_ref, gs_ref, lsel_ref, lses_ref, dgl_ref, dgs_ref,
                order_ref, starts_ref, dk_ref, dv_ref, *, seq_len, g, n_sel, cq, rp, rp_own, block_size,
                mask_padded, window, plan, qk_scale, sm_scale, block_axis):
    # order_ref [N * n] (pair ids i * n + r sorted by kept block); starts_ref [NKB + 1]
    d = q_ref.shape[-1]
    w = pl.program_id(block_axis)
    k0 = w * block_size
    kpos = k0 + jnp.arange(block_size, dtype=jnp.int32)
    kin = kpos < seq_len
    kval = kin & (valid_ref[jnp.where(kin, kpos, 0)] != 0)
    ksel = kval if mask_padded else kin  # keys of block w as a kept block (padded keys unless masked)
    kw = plgpu.load(k_ref.at[pl.ds(k0, block_size), :], mask=kin[:, None], other=0.0)
    vw = plgpu.load(v_ref.at[pl.ds(k0, block_size), :], mask=kin[:, None], other=0.0)
    cd = jnp.arange(d, dtype=jnp.int32)[None, :]

    def ltis_accumulate(carry, qi_c, gg, ok, kmask):
        """dK, dV of block w from the packed (query qi_c, head gg) rows ``ok`` over keys ``kmask`` [R, b]."""
        dk, dv = carry
        q = plgpu.load(q_ref.at[qi_c[:, None], gg[:, None], cd], mask=ok[:, None], other=0.0)
        do = plgpu.load(do_ref.at[qi_c[:, None], gg[:, None], cd], mask=ok[:, None], other=0.0)
        lse = plgpu.load(lsel_ref.at[qi_c, gg], mask=ok, other=0.0)
        gate = plgpu.load(gl_ref.at[qi_c, gg], mask=ok, other=0.0)
        dg = plgpu.load(dgl_ref.at[qi_c, gg], mask=ok, other=0.0)
        mask = ok[:, None] & kmask
        s = jnp.where(mask, gc.dot(q, kw, trans_b=True) * qk_scale, _NEG_INF)
        p = jnp.exp2(s - lse[:, None]) * gate[:, None]
        dv = dv + gc.dot(p.astype(do.dtype), do, trans_a=True)
        ds = jnp.where(mask, p * (gc.dot(do, vw, trans_b=True) - dg[:, None]), 0.0)
        return dk + gc.dot(ds.astype(q.dtype), q, trans_a=True), dv

    carry = (jnp.zeros((block_size, d), jnp.float32), jnp.zeros((block_size, d), jnp.float32))

    # (1) LTIS: the queries that kept block w (in chunks of cq queries), then the block's own queries.
    start, end = starts_ref[w], starts_ref[w + 1]
    r = jnp.arange(rp, dtype=jnp.int32)
    rj, rg = gc.idiv(r, g), gc.irem(r, g)

    def chunk_body(c, carry):
        pidx = start + c * cq + rj
        pin = (r < cq * g) & (pidx < end)
        pair = plgpu.load(order_ref.at[jnp.where(pin, pidx, 0)], mask=pin, other=0)
        return ltis_accumulate(carry, jnp.where(pin, gc.idiv(pair, n_sel), 0), rg, pin, ksel[None, :])

    carry = lax.fori_loop(0, gc.idiv(end - start + (cq - 1), cq), chunk_body, carry)
    ro = jnp.arange(rp_own, dtype=jnp.int32)
    qi = k0 + gc.idiv(ro, g)
    in_b = (ro < block_size * g) & (qi < seq_len)
    qi_c = jnp.where(in_b, qi, 0)
    carry = ltis_accumulate(carry, qi_c, gc.irem(ro, g), in_b & (valid_ref[qi_c] != 0),
                       kval[None, :] & (kpos[None, :] <= qi[:, None]))

    # (2) STIS: key j receives from the queries j + o of every offset o, one [b, G, d] tile of queries per
    # offset (stis_gpu's inverse offsets), elementwise. Measured on H100s, the whole dK/dV kernel took 0.24 ms
    # at N = 1k this way (two warps, gpu_call22) and 0.31 ms with dense [b * G, b] score tiles per offset and
    # per window tile instead (gpu_call23).
    # Query loads are masked by range only and validity applied after, so they do not wait for the flags.
    heads = jnp.arange(g, dtype=jnp.int32)
    cd3 = jnp.arange(d, dtype=jnp.int32)[None, None, :]
    k_s = jnp.where(kval[:, None], kw.astype(jnp.float32), 0.0) * qk_scale
    v_s = jnp.where(kval[:, None], vw.astype(jnp.float32), 0.0)

    def stis_body(offset, carry):
        dk3, dv3 = carry
        qi = kpos + offset
        ok = kval & (qi < seq_len)
        qi_c = jnp.where(ok, qi, 0)
        qm = (ok & (valid_ref[qi_c] != 0))[:, None]
        idx, stat = (qi_c[:, None, None], heads[None, :, None], cd3), (qi_c[:, None], heads[None, :])
        q3 = plgpu.load(q_ref.at[idx], mask=ok[:, None, None], other=0.0).astype(jnp.float32)
        do3 = plgpu.load(do_ref.at[idx], mask=ok[:, None, None], other=0.0).astype(jnp.float32)
        lse = plgpu.load(lses_ref.at[stat], mask=ok[:, None], other=0.0)
        gate = plgpu.load(gs_ref.at[stat], mask=ok[:, None], other=0.0)
        dg = plgpu.load(dgs_ref.at[stat], mask=ok[:, None], other=0.0)
        # select, not multiply: a padded query row may hold NaN
        q3, do3 = jnp.where(qm[:, :, None], q3, 0.0), jnp.where(qm[:, :, None], do3, 0.0)
        p = jnp.where(qm, jnp.exp2(jnp.sum(q3 * k_s[:, None, :], axis=2) - lse) * gate, 0.0)
        ds = jnp.where(qm, p * (jnp.sum(do3 * v_s[:, None, :], axis=2) - dg), 0.0)
        return dk3 + ds[:, :, None] * q3, dv3 + p[:, :, None] * do3

    zeros3 = jnp.zeros((block_size, g, d), jnp.float32)
    dk3, dv3 = stis_gpu._for_each_offset(plan, stis_body, (zeros3, zeros3),
                                         active=jnp.max(kval.astype(jnp.int32)) > 0)
    dk, dv = carry
    dk, dv = dk + jnp.sum(dk3, axis=1), dv + jnp.sum(dv3, axis=1)
    plgpu.store(dk_ref.at[pl.ds(k0, block_size), :], (dk * sm_scale).astype(dk_ref.dtype), mask=kin[:, None])
    plgpu.store(dv_ref.at[pl.ds(k0, block_size), :], dv.astype(dv_ref.dtype), mask=kin[:, None])


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom_vjp.

def _static(n, g, n_sel, block_size, window):
    bq, rp = ltis_gpu._attn_tiles(g, block_size)
    plan = stis_gpu._plan(n, window, True, False, stis_gpu.UNROLL)
    return bq, rp, plan


def _fwd_call(q, k, v, gl, gs, valid_i, sel_enc, *, block_size, window, mask_padded, residuals, kv_head_major,
              interpret):
    bsz, n, h, d = q.shape
    hk = ltis_gpu.kv_heads(k, kv_head_major)
    g = h // hk
    n_sel = sel_enc.shape[-1]
    bq, rp, plan = _static(n, g, n_sel, block_size, window)
    q_spec, kv_spec, valid_spec, row_spec = ltis_gpu._specs_common(n, g, d, kv_head_major)
    sel_spec = pl.BlockSpec((None, n, None, n_sel), lambda t, b, hh: (b, 0, hh, 0))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    if residuals:
        out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2 + [jax.ShapeDtypeStruct((bsz, n, h), jnp.float32)] * 2
        out_specs += [q_spec, q_spec, row_spec, row_spec]
    kernel = functools.partial(
        _fwd_kernel, seq_len=n, g=g, n_sel=n_sel, bq=bq, rp=rp, block_size=block_size, mask_padded=mask_padded,
        window=window, plan=plan, qk_scale=gc.LOG2E / math.sqrt(d))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, sel_spec, row_spec, row_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=gc.compiler_params(FWD_NUM_WARPS),
        interpret=interpret,
        name="gated_attention_fwd",
    )(q, k, v, valid_i, sel_enc, gl, gs)


def _bwd_call(q, k, v, gl, gs, valid_i, sel_enc, o_l, o_s, lse_l, lse_s, do, *, block_size, window, mask_padded,
              kv_head_major, interpret):
    bsz, n, h, d = q.shape
    hk = ltis_gpu.kv_heads(k, kv_head_major)
    g = h // hk
    n_sel = sel_enc.shape[-1]
    bq, rp, plan = _static(n, g, n_sel, block_size, window)
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale = gc.LOG2E * sm_scale
    do = do.astype(q.dtype)
    q_spec, kv_spec, valid_spec, row_spec = ltis_gpu._specs_common(n, g, d, kv_head_major)
    sel_spec = pl.BlockSpec((None, n, None, n_sel), lambda t, b, hh: (b, 0, hh, 0))
    stat = jax.ShapeDtypeStruct((bsz, n, h), jnp.float32)
    dq, dg_l, dg_s = pl.pallas_call(
        functools.partial(_dq_kernel, seq_len=n, g=g, n_sel=n_sel, bq=bq, rp=rp, block_size=block_size,
                          mask_padded=mask_padded, window=window, plan=plan, qk_scale=qk_scale,
                          sm_scale=sm_scale),
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, sel_spec, row_spec, row_spec, q_spec, q_spec, q_spec,
                  row_spec, row_spec],
        out_specs=[q_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat, stat],
        compiler_params=gc.compiler_params(DQ_NUM_WARPS),
        interpret=interpret,
        name="gated_attention_dq",
    )(q, k, v, valid_i, sel_enc, gl, gs, do, o_l, o_s, lse_l, lse_s)

    nkb = pl.cdiv(n, block_size)
    order, starts = ltis_gpu._inverse_selection(valid_i, sel_enc, nkb)
    cq, rp_dkv = ltis_gpu._dkv_tiles(g, DKV_ROWS)
    grid, in_specs, out_specs, block_axis = ltis_gpu.dkv_launch(
        nkb, bsz, hk, [q_spec, kv_spec, kv_spec, valid_spec, q_spec] + [row_spec] * 6 + [
            pl.BlockSpec((None, None, n * n_sel), lambda t, b, hh: (b, hh, 0)),
            pl.BlockSpec((None, None, nkb + 1), lambda t, b, hh: (b, hh, 0))], [kv_spec, kv_spec])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, seq_len=n, g=g, n_sel=n_sel, cq=cq, rp=rp_dkv,
                          rp_own=max(16, gc.next_pow2(block_size * g)), block_size=block_size,
                          mask_padded=mask_padded, window=window, plan=plan, qk_scale=qk_scale,
                          sm_scale=sm_scale, block_axis=block_axis),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=gc.compiler_params(DKV_NUM_WARPS, DKV_NUM_STAGES),
        interpret=interpret,
        name="gated_attention_dkv",
    )(q, k, v, valid_i, do, gl, gs, lse_l, lse_s, dg_l, dg_s, order, starts)
    return dq, dk, dv, dg_l, dg_s


def _split_gates(gates):
    gates = gates.astype(jnp.float32)
    return gates[..., 0], gates[..., 1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _gated(q, k, v, gates, valid_i, sel_enc, block_size, window, mask_padded, kv_head_major, interpret):
    (out,) = _fwd_call(q, k, v, *_split_gates(gates), valid_i, sel_enc, block_size=block_size, window=window,
                       mask_padded=mask_padded, residuals=False, kv_head_major=kv_head_major, interpret=interpret)
    return out


def _gated_fwd(q, k, v, gates, valid_i, sel_enc, block_size, window, mask_padded, kv_head_major, interpret):
    out, o_l, o_s, lse_l, lse_s = _fwd_call(q, k, v, *_split_gates(gates), valid_i, sel_enc,
                                            block_size=block_size, window=window, mask_padded=mask_padded,
                                            residuals=True, kv_head_major=kv_head_major, interpret=interpret)
    return out, (q, k, v, gates, valid_i, sel_enc, o_l, o_s, lse_l, lse_s)


def _gated_bwd(block_size, window, mask_padded, kv_head_major, interpret, res, d_out):
    q, k, v, gates, valid_i, sel_enc, o_l, o_s, lse_l, lse_s = res
    dq, dk, dv, dg_l, dg_s = _bwd_call(q, k, v, *_split_gates(gates), valid_i, sel_enc, o_l, o_s, lse_l, lse_s,
                                       d_out, block_size=block_size, window=window, mask_padded=mask_padded,
                                       kv_head_major=kv_head_major, interpret=interpret)
    d_gates = jnp.stack([dg_l, dg_s], axis=-1).astype(gates.dtype)
    return dq, dk, dv, d_gates, None, None


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    valid: jax.Array,
    selected_blocks: jax.Array,
    kept: jax.Array,
    *,
    block_size: int = 16,
    window: int = 8,
    mask_padded_block_keys: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Causal BlossomRec attention, gate mix included (SPEC 3.5, 4, 5); differentiable w.r.t. q, k, v, gates.

    Args:
      q: [B, N, H, d]; k, v: [B, N, Hk, d] (GQA: head g uses kv head g // (H // Hk), H // Hk a power of two);
        same float dtype.
      gates: [B, N, H, 2] sigmoid gate values ([..., 0] weights LTIS, [..., 1] STIS); float32 or bfloat16.
      valid: bool [B, N].
      selected_blocks: int [B, N, Hk, n]; kept: bool [B, N, Hk, n] (from ``ltis_gpu.select_blocks_gpu``).
      block_size: b, a power of two >= 16. window: the STIS window (SPEC 4).
      mask_padded_block_keys: also mask invalid keys inside kept blocks (off = the reference).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      [B, N, H, d] in q.dtype: ``g_l * o_ltis + g_s * o_stis``, 0 at invalid queries.
    """
    gc.check_attention_shapes(q, k, v, selected_blocks, kept)
    bsz, n, h, d = q.shape
    if not supports(causal=True, num_heads=h, num_kv_heads=k.shape[2]):
        raise ValueError(f"gated_attention_gpu needs a power-of-two GQA group, got {h} heads over {k.shape[2]} kv heads")
    if gates.shape != (bsz, n, h, 2):
        raise ValueError(f"gates must be [B, N, H, 2] = {(bsz, n, h, 2)}, got {gates.shape}")
    b = int(block_size)
    if b < 16 or b & (b - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sel_enc, valid_i = gc.encode_selection(selected_blocks, kept, valid, seq_len=n, block_size=b)
    q, k, v, d, dp = gc.pad_head_dim(q, k, v)
    k, v, kv_head_major = ltis_gpu.to_kernel_kv_layout(k, v)
    out = _gated(q, k, v, gates, valid_i, sel_enc, b, int(window), bool(mask_padded_block_keys), kv_head_major,
                 bool(interpret))
    return out[..., :d] if dp != d else out
