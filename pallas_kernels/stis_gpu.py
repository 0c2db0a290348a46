"""STIS (power-pattern) sparse attention as Pallas GPU kernels (Triton lowering), SPEC section 4.

Semantics (see ``stis_reference.py`` for the pure-jnp oracle): query ``i`` attends key ``j`` (both valid)
iff ``o = i - j`` is in a fixed offset list ``O`` (causal: ``0..window-1`` and the powers of two
``>= window`` below ``N``; bidirectional additionally ``-(window-1)..-1``) or, bidirectionally with
``sink``, ``j = N - 1`` when that key is not already in the window (``N - 1 - i >= window``). One float32
softmax over that key set, scale ``1/sqrt(d)``; output 0 at invalid queries and at valid queries without
any valid key (never NaN).

Why these kernels look the way they do
--------------------------------------
* **The offsets are static.** ``O`` depends only on ``(N, window, causal)``: one contiguous range
  (the window) plus a geometric series (the powers of two), fixed at trace time. For one offset ``o``
  the keys of the consecutive queries ``i0 .. i0+BQ-1`` are the consecutive rows
  ``i0-o .. i0-o+BQ-1``: one contiguous (shifted) tile, no data-dependent gather. Rows outside
  ``[0, N)`` are clamped into range and masked, so no out-of-range address is ever formed (and the same
  code runs in interpret mode, whose dynamic slices would otherwise move a tile that starts before
  row 0). Tiles are loaded through integer index arrays (``ref.at[rows, heads, cols]``), which
  Pallas-Triton turns into the same pointer-tensor loads that a ``pl.ds`` slice produces.
* **Offsets as two static-trip-count loops by default** (``unroll=False``): ``scf.for`` over the window
  range and over the powers of two (``o = p0 << t``); ``unroll=True`` unrolls all ~20-30 offsets at
  trace time instead (more loads in flight per program, more registers). Compiling the Triton IR with
  Triton 3.6 for sm_90 (ptxas, bf16, N = 4096, G = 4, default tiles) gives, loops / unrolled, in
  registers per thread and no spills anywhere: forward 107-113 / 150-154, dq 141-155 / 168,
  dk/dv 111-113 / 144-145 (causal-bidirectional ranges). An exact two-pass softmax holding all
  ``|O|`` score vectors went to 255 registers with spills, hence the online softmax below. Both offset
  variants are tested; the benchmark (``benchmarks/kernels_stis.py --sweep``) compares them.
* **It is a bandwidth/latency problem, not a matmul.** With ``d = 16`` (below the tensor-core ``k``
  minimum for a useful ``tl.dot``) and one key per (query, offset), the score of a query is a row-wise
  dot product per offset: ``|O|`` multiply-adds of length ``d`` per (query, head). So the kernels use
  elementwise multiply + ``sum`` over ``d`` and no ``pl.dot``.
* **GQA packing.** The ``G = H / Hk`` query heads of one kv head share every key, so one program owns
  ``(batch, kv head, tile of BQ queries)`` and holds its queries as a ``[BQ, G, d]`` block (the ``G``
  heads of a group are adjacent in the ``H`` axis, so the block is one contiguous ``G*d`` run per
  query). Each shifted key/value tile ``[BQ, d]`` is loaded once per offset and broadcast over the
  ``G`` axis: ``G`` times fewer key loads than one program per query head, and ``BQ*G*d`` elements of
  work per offset (256 rows of 16 in the forward, 64 in the backward kernels for the defaults). If ``G``
  is not a power of two (Triton tensors need power-of-two sizes) the kernels fall back to one query head
  per program.
* **Padding is skipped.** A program whose queries (forward, dq) or keys (dk/dv) are all padding visits no
  offset (its loops get zero trips) and stores zeros: right-padded batches pay only for their valid tiles.
* **Forward: online softmax** (running max, rescaled accumulator) over the keys, float32 throughout, in base 2
  (``log2(e)`` folded into the scaled q, so each exponential is one ``ex2`` instead of the ~8 instructions of an
  accurate ``exp``: the kernels are issue-bound); ``lse = m + log2(l)`` (base 2) per (query, head) is saved for the
  backward.
* **Backward (flash style, deterministic, no atomics).** ``dq`` recomputes the probabilities from the
  saved ``lse`` on the same shifted key tiles (and writes ``delta = rowsum(o * do)``). ``dk``/``dv`` use
  the inverse offsets: key ``j`` receives from the queries ``j + o``, again one contiguous tile per
  offset, so a program owning a key tile gathers instead of scattering. The one exception is the
  bidirectional sink (key ``N - 1`` receives from almost every query): the ``dq`` kernel also writes
  each tile's partial sink gradients, which XLA sums (a small fixed-order reduction) and the
  ``dk``/``dv`` kernel adds to row ``N - 1``.

Layout: q/o ``[B, N, H, d]`` are used in place; k/v ``[B, N, Hk, d]`` are read head-major (``[B, Hk, N, d]``, one
transposed copy in XLA that the LTIS kernels share; ``KV_HEAD_MAJOR``), dk/dv are written in the model's layout; the
grid is ``(B * num_tiles, H // G)`` with the large axis first (CUDA limits grid y/z to 65535).

The lowering uses ``plgpu.CompilerParams`` (Triton) explicitly: jax 0.10.2 otherwise sends a GPU
``pallas_call`` to Mosaic GPU. Written for jax 0.10.2 and 0.11.x (the version-dependent names are
looked up with fallbacks); tested on CPU with 0.10.2 (interpreter, CUDA lowering, and the lowered
Triton IR compiled by Triton 3.6 for sm_90).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_common import LOG2E, load_select
from pallas_kernels.stis_reference import stis_attention_reference  # noqa: F401  (reference beside kernel)

# Triton compiler params: ``CompilerParams`` in current jax, ``TritonCompilerParams`` in older ones.
_TritonParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
# Squeezed block dimension marker (``None`` is the legacy spelling).
_SQ = getattr(pl, "squeezed", None)

# ---------------------------------------------------------------------------------------------------
# Tile sizes and launch parameters (all overridable per call).
# Rows per program = BQ * G (query, head) pairs. 256 rows x d = 16 in float32 is 4096 accumulator
# elements = 32 registers per thread with 4 warps, plus q (and do) and one offset's key/value tile.
# ptxas (Triton 3.6, sm_90, bf16, G = 4, offset loops) reports 113 registers for the forward and 155
# for dq at 256 rows, no spills; >= 2048 programs at 65,536 tokens (H = 8, Hk = 2) fill the 132 SMs
# of an H100 many times over. The dk/dv kernel carries two [rows, d] float32 accumulators plus q and
# do tiles per offset: 168 registers at 256 rows, 113 at 128. The backward kernels run smaller tiles than
# the forward (more programs in flight to hide their dependent loads): in the layer's device profile
# (H100, N = 1k, 65,536 tokens, benchmarks/results/gpu_call40..42_2026-11-27) dq took 0.121 / 0.105 /
# 0.087 / 0.120 ms at 256 / 128 / 64 / 32 rows and dk/dv 0.135 / 0.117 / 0.101 / 0.131 ms at 256 / 128 / 64 /
# 32 rows, while the forward took 0.074 / 0.074 / 0.080 ms at 256 / 128 / 64 rows.
DEFAULT_ROWS_PER_PROGRAM = 256
DEFAULT_ROWS_PER_PROGRAM_DQ = 64
DEFAULT_ROWS_PER_PROGRAM_DKV = 64
# Never below 16 queries per tile (keeps Triton tensors from degenerating at tiny N); never above the
# padded sequence length (no fully masked tiles at small N).
MIN_BLOCK = 16
# 4 warps = 128 threads for 4096-element tiles: 32 elements per thread, 16-byte vector loads along d.
NUM_WARPS = 4
# Software pipelining depth for the offset loops. Triton 3.6 emitted the same code for 1 and 2 stages
# (these pointer-tensor loads feed no dot, so its pipeliner leaves them alone); kept at 2 so a newer
# Triton that pipelines such loads may overlap offset t+1's loads with offset t's math.
NUM_STAGES = 2
# Offsets as loops (False) or fully unrolled at trace time (True); see the module docstring.
UNROLL = False
# K / V as the kernels read them: head-major [B, Hk, N, d] (a transposed copy made in XLA, shared with the LTIS
# kernels, ``ltis_gpu.KV_HEAD_MAJOR``) or the model's [B, N, Hk, d]; head-major makes each shifted [BQ, d] tile
# one contiguous run of BQ * d elements.
KV_HEAD_MAJOR = True

_NEG = -1e30  # finite "minus infinity" for masked scores (no inf - inf = NaN)


# ---------------------------------------------------------------------------------------------------
# Static structure.

def stis_offsets(n: int, window: int, causal: bool) -> tuple[int, ...]:
    """Offsets ``o = i - j`` of the STIS key set (sink excluded), ``|o| < n``, in kernel order."""
    plan = _plan(n, window, causal, False, True)
    return tuple(range(plan.lo, plan.hi)) + tuple(plan.p0 << t for t in range(plan.npow))


@dataclasses.dataclass(frozen=True)
class _Plan:
    lo: int                 # window offsets: o in [lo, hi)
    hi: int
    p0: int                 # powers of two: o = p0 << t, t in [0, npow)
    npow: int
    sink_window: int | None  # bidirectional sink: extra key N-1 for queries with N-1-i >= sink_window
    unroll: bool


def _plan(n: int, window: int, causal: bool, sink: bool, unroll: bool) -> _Plan:
    w = min(window, n)
    p0 = 1
    while p0 < window:
        p0 *= 2                # smallest power of two >= window (smaller ones are in the window)
    npow = 0
    while (p0 << npow) < n:
        npow += 1
    # Under causal masking the sink j = N-1 is only visible to i = N-1, where it is the key o = 0.
    sink_window = window if (sink and not causal and n - 1 >= window) else None
    return _Plan(lo=0 if causal else -(w - 1), hi=w, p0=p0, npow=npow, sink_window=sink_window,
                 unroll=unroll)


def _for_each_offset(plan: _Plan, body, carry, active=None):
    """carry = body(o, carry) for every offset o of the plan (Python ints if unrolled, else traced).

    ``active`` (traced bool, optional): when False no offset is visited (a tile of padding, whose every
    contribution is masked to zero anyway). Unrolled plans visit every offset regardless."""
    if plan.unroll:
        for o in range(plan.lo, plan.hi):
            carry = body(o, carry)
        for t in range(plan.npow):
            carry = body(plan.p0 << t, carry)
        return carry
    # 0/1 factors, not jnp.where: a select between two literals lowers to an i1 value in Pallas-Triton, which
    # the scf.for verifier rejects next to i32 bounds (jax 0.11.2)
    on = None if active is None else active.astype(jnp.int32)
    hi = plan.hi if on is None else plan.lo + (plan.hi - plan.lo) * on
    carry = lax.fori_loop(plan.lo, hi, body, carry)
    if plan.npow:
        p0 = jnp.int32(plan.p0)
        npow = plan.npow if on is None else plan.npow * on
        carry = lax.fori_loop(0, npow, lambda t, c: body(jnp.left_shift(p0, t), c), carry)
    return carry


def _any(mask):
    return jnp.max(mask.astype(jnp.int32)) > 0


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _pick_block(block: int | None, n: int, gp: int, rows: int) -> int:
    if block is None:
        block = max(1, rows // gp)
    if not _is_pow2(block):
        raise ValueError(f"block size must be a power of two, got {block}")
    return max(min(block, pl.next_power_of_2(n)), min(block, MIN_BLOCK))


# ---------------------------------------------------------------------------------------------------
# In-kernel helpers. Refs seen by the kernels (batch squeezed):
#   qlike_ref [N, GP, d] (q, o, do, dq), kv_ref [N, d], valid_ref [N] (int32), stat_ref [N, GP].
# Rows passed to the loads are always clamped into [0, N) (no out-of-range address is formed).

def _ld_rows(ref, rows, mask, *, by_select=False):
    """Rows ``rows`` [R] of a [N, d] ref -> [R, d] float32, zero where ``mask`` [R] is False."""
    cols = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    return _load(ref.at[rows[:, None], cols[None, :]], mask[:, None], by_select).astype(jnp.float32)


def _ld_qrows(ref, rows, mask, *, by_select=False):
    """Rows ``rows`` [R] of a [N, GP, d] ref -> [R, GP, d] float32, zero where ``mask`` [R] is False."""
    gp, d = ref.shape[-2], ref.shape[-1]
    heads = jnp.arange(gp, dtype=jnp.int32)
    cols = jnp.arange(d, dtype=jnp.int32)
    x = _load(ref.at[rows[:, None, None], heads[None, :, None], cols[None, None, :]], mask[:, None, None], by_select)
    return x.astype(jnp.float32)


def _ld_stat(ref, rows, mask, *, by_select=False):
    """Rows ``rows`` [R] of a [N, GP] float32 ref -> [R, GP], zero where ``mask`` is False."""
    heads = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    return _load(ref.at[rows[:, None], heads[None, :]], mask[:, None], by_select)


def _load(ref_view, mask, by_select):
    """Masked load. ``by_select``: unpredicated, masked afterwards (``gpu_common.load_select``), so that the load
    does not wait for the validity flags behind ``mask``: used by the forward and dq kernels, whose per-offset key /
    value tiles are small [BQ, d] loads shared by the G heads (one memory latency per offset instead of two). In the
    layer's device profile (H100, N = 1k, 65,536 tokens, against the predicated loads in the same call,
    benchmarks/results/gpu_call43..47_2026-11-27) dq went 0.087 -> 0.083 ms (0.097 -> 0.092 at 4k) and the forward
    stayed at 0.074-0.075 ms in three of four calls. The dk/dv kernel keeps predicated loads: its masked-out query
    rows (padding past a sequence's end, reached by the large offsets) are real L2 traffic, and unpredicated loads
    measured 4 % slower there."""
    if by_select:
        return load_select(ref_view, mask)
    return plgpu.load(ref_view, mask=mask, other=0.0)


def _ld_valid(valid_ref, rows, in_range):
    return jnp.logical_and(plgpu.load(valid_ref.at[rows], mask=in_range, other=0) != 0, in_range)


# Stores: ``rows`` may exceed N-1 (masked), never negative (interpret mode's scatter drops
# out-of-range indices but would wrap negative ones).
def _st_qrows(ref, rows, mask, val):
    gp, d = ref.shape[-2], ref.shape[-1]
    heads = jnp.arange(gp, dtype=jnp.int32)
    cols = jnp.arange(d, dtype=jnp.int32)
    plgpu.store(ref.at[rows[:, None, None], heads[None, :, None], cols[None, None, :]],
                val.astype(ref.dtype), mask=mask[:, None, None])


def _st_rows(ref, rows, mask, val):
    cols = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    plgpu.store(ref.at[rows[:, None], cols[None, :]], val.astype(ref.dtype), mask=mask[:, None])


def _st_stat(ref, rows, mask, val):
    heads = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    plgpu.store(ref.at[rows[:, None], heads[None, :]], val.astype(ref.dtype), mask=mask[:, None])


def _tile_rows(block, nt):
    t = pl.program_id(0) % nt
    return t * block + jnp.arange(block, dtype=jnp.int32)


def _shifted(rows, o, n):
    """Rows ``rows - o`` clamped into [0, N) and whether they were in range."""
    src = rows - o
    ok = jnp.logical_and(src >= 0, src < n)
    return jnp.minimum(jnp.maximum(src, 0), n - 1), ok


def _sink_rows(qi, n, sink_window):
    """The sink key N-1 for every query, in range only where it is an extra key (N-1-i >= window)."""
    return jnp.full_like(qi, n - 1), (n - 1 - qi) >= sink_window


# ---------------------------------------------------------------------------------------------------
# Forward kernel: o and lse for one (batch, head group, query tile).

def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, n, nt, block, plan, scale):
    qi = _tile_rows(block, nt)                      # [BQ] query positions
    in_q = qi < n
    qic = jnp.minimum(qi, n - 1)
    vq = _ld_valid(valid_ref, qic, in_q)            # [BQ]
    # [BQ, G, d] f32 with scale and log2(e) folded in: scores in base 2, so each exponential is one ex2
    q = _ld_qrows(q_ref, qic, vq, by_select=True) * (scale * LOG2E)

    def attend(kj, ok, carry):
        m, l, acc = carry
        km = jnp.logical_and(_ld_valid(valid_ref, kj, ok), vq)
        k = _ld_rows(k_ref, kj, km, by_select=True)   # [BQ, d]
        v = _ld_rows(v_ref, kj, km, by_select=True)
        s = jnp.where(km[:, None], jnp.sum(q * k[:, None, :], axis=2), _NEG)   # [BQ, G]
        m_new = jnp.maximum(m, s)
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(km[:, None], jnp.exp2(s - m_new), 0.0)
        return m_new, l * alpha + p, acc * alpha[:, :, None] + p[:, :, None] * v[:, None, :]

    carry = (jnp.full(q.shape[:2], _NEG, jnp.float32), jnp.zeros(q.shape[:2], jnp.float32),
             jnp.zeros_like(q))
    carry = _for_each_offset(plan, lambda o, c: attend(*_shifted(qi, o, n), c), carry, active=_any(vq))
    if plan.sink_window is not None:
        carry = attend(*_sink_rows(qi, n, plan.sink_window), carry)
    m, l, acc = carry

    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    _st_qrows(o_ref, qi, in_q, acc / l_safe[:, :, None])
    _st_stat(lse_ref, qi, in_q, jnp.where(has, m + jnp.log2(l_safe), 0.0))   # base 2


# ---------------------------------------------------------------------------------------------------
# Backward kernel 1: dq (and delta, and the tile's partial sink gradients).

def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, do_ref, lse_ref,
               dq_ref, delta_ref, *sink_refs, n, nt, block, plan, scale):
    qi = _tile_rows(block, nt)
    in_q = qi < n
    qic = jnp.minimum(qi, n - 1)
    vq = _ld_valid(valid_ref, qic, in_q)
    q = _ld_qrows(q_ref, qic, vq, by_select=True) * scale   # scaled q: scores = q_s . k
    do = _ld_qrows(do_ref, qic, vq, by_select=True)
    lse = _ld_stat(lse_ref, qic, vq, by_select=True)        # [BQ, G], base 2
    delta = jnp.sum(_ld_qrows(o_ref, qic, vq, by_select=True) * do, axis=2)   # [BQ, G]

    def grad_s(kj, ok):
        """Probabilities p, dL/ds (s = scaled logits) [BQ, G] and the key tile [BQ, d]."""
        km = jnp.logical_and(_ld_valid(valid_ref, kj, ok), vq)
        k = _ld_rows(k_ref, kj, km, by_select=True)
        v = _ld_rows(v_ref, kj, km, by_select=True)
        s = jnp.sum(q * k[:, None, :], axis=2)
        p = jnp.where(km[:, None], jnp.exp2(s * LOG2E - lse), 0.0)
        ds = p * (jnp.sum(do * v[:, None, :], axis=2) - delta)
        return p, ds, k

    def body(o, dq):
        _, ds, k = grad_s(*_shifted(qi, o, n))
        return dq + ds[:, :, None] * k[:, None, :]

    dq = _for_each_offset(plan, body, jnp.zeros_like(q), active=_any(vq))
    if plan.sink_window is not None:
        dks_ref, dvs_ref = sink_refs
        p, ds, k = grad_s(*_sink_rows(qi, n, plan.sink_window))
        dq = dq + ds[:, :, None] * k[:, None, :]
        # This tile's part of the sink key/value gradients, summed over its (query, head) rows. q is the
        # scaled q, so dks is complete (dk = sum ds * q * scale).
        dks_ref[...] = jnp.sum(jnp.sum(ds[:, :, None] * q, axis=1), axis=0).astype(dks_ref.dtype)
        dvs_ref[...] = jnp.sum(jnp.sum(p[:, :, None] * do, axis=1), axis=0).astype(dvs_ref.dtype)

    _st_qrows(dq_ref, qi, in_q, dq * scale)
    _st_stat(delta_ref, qi, in_q, delta)


# ---------------------------------------------------------------------------------------------------
# Backward kernel 2: dk, dv for one (batch, head group, key tile), by the inverse offsets.

def _dkv_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, *rest,
                n, nt, block, plan, scale):
    if plan.sink_window is not None:
        dks_ref, dvs_ref, dk_ref, dv_ref = rest
    else:
        dk_ref, dv_ref = rest
    kj = _tile_rows(block, nt)                      # [BK] key positions
    in_k = kj < n
    kjc = jnp.minimum(kj, n - 1)
    vk = _ld_valid(valid_ref, kjc, in_k)
    k2 = _ld_rows(k_ref, kjc, vk) * (scale * LOG2E)  # scores in base 2: s2 = q . k2
    v = _ld_rows(v_ref, kjc, vk)

    def body(o, carry):
        dk, dv = carry
        qi, ok = _shifted(kj, -o, n)                  # the queries i = j + o
        qm = jnp.logical_and(_ld_valid(valid_ref, qi, ok), vk)
        q = _ld_qrows(q_ref, qi, qm)                  # [BK, G, d]
        do = _ld_qrows(do_ref, qi, qm)
        lse = _ld_stat(lse_ref, qi, qm)               # [BK, G]
        delta = _ld_stat(delta_ref, qi, qm)
        s2 = jnp.sum(q * k2[:, None, :], axis=2)
        p = jnp.where(qm[:, None], jnp.exp2(s2 - lse), 0.0)
        ds = p * (jnp.sum(do * v[:, None, :], axis=2) - delta)
        return dk + ds[:, :, None] * q, dv + p[:, :, None] * do

    gp, d = q_ref.shape[-2], q_ref.shape[-1]
    zeros = jnp.zeros((block, gp, d), jnp.float32)
    # a tile of padding keys receives nothing (every query mask includes the key's validity)
    dk, dv = _for_each_offset(plan, body, (zeros, zeros), active=_any(vk))
    dk = jnp.sum(dk, axis=1) * scale                # [BK, d]: sum over the G query heads
    dv = jnp.sum(dv, axis=1)
    if plan.sink_window is not None:
        is_sink = (kj == n - 1)[:, None]
        dk = dk + jnp.where(is_sink, dks_ref[...][None, :], 0.0)   # already scaled (see _dq_kernel)
        dv = dv + jnp.where(is_sink, dvs_ref[...][None, :], 0.0)
    _st_rows(dk_ref, kj, in_k, dk)
    _st_rows(dv_ref, kj, in_k, dv)


# ---------------------------------------------------------------------------------------------------
# pallas_call wrappers.

@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    window: int
    sink: bool
    block_q: int | None
    block_k: int | None
    num_warps: int
    num_stages: int
    unroll: bool
    scale: float
    interpret: bool
    kv_head_major: bool = False

    def params(self):
        return _TritonParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _geometry(q, k, block, rows=None):
    """Shapes and tiling; ``rows`` (query-head rows per program) defaults to DEFAULT_ROWS_PER_PROGRAM, read at
    trace time so that benchmark overrides of the constant take effect."""
    rows = DEFAULT_ROWS_PER_PROGRAM if rows is None else rows
    b, n, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    gp = g if _is_pow2(g) else 1                    # query heads per program
    block = _pick_block(block, n, gp, rows)
    return b, n, h, d, hk, g, gp, block, pl.cdiv(n, block)


def _specs(n, d, g, gp, nt, kv_head_major=False):
    """BlockSpecs: whole-sequence refs of one (batch, head group); tiles are indexed inside. k / v [N, d] of the
    group's kv head, from [B, Hk, N, d] (``kv_head_major``) or [B, N, Hk, d]."""
    qspec = pl.BlockSpec((_SQ, n, gp, d), lambda p, hp: (p // nt, 0, hp, 0))
    if kv_head_major:
        kvspec = pl.BlockSpec((_SQ, _SQ, n, d), lambda p, hp: (p // nt, (hp * gp) // g, 0, 0))
    else:
        kvspec = pl.BlockSpec((_SQ, n, _SQ, d), lambda p, hp: (p // nt, 0, (hp * gp) // g, 0))
    vspec = pl.BlockSpec((_SQ, n), lambda p, hp: (p // nt, 0))
    statspec = pl.BlockSpec((_SQ, n, gp), lambda p, hp: (p // nt, 0, hp))
    return qspec, kvspec, vspec, statspec


def _kernel_kv(k, v, cfg: _Config):
    """k, v [B, N, Hk, d] in the layout the kernels read (``cfg.kv_head_major``)."""
    return (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) if cfg.kv_head_major else (k, v)


def _stis_fwd_call(q, k, v, valid, cfg: _Config):
    b, n, h, d, hk, g, gp, block, nt = _geometry(q, k, cfg.block_q)
    plan = _plan(n, cfg.window, cfg.causal, cfg.sink, cfg.unroll)
    qspec, kvspec, vspec, statspec = _specs(n, d, g, gp, nt, cfg.kv_head_major)
    k, v = _kernel_kv(k, v, cfg)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, nt=nt, block=block, plan=plan, scale=cfg.scale),
        grid=(b * nt, h // gp),
        in_specs=[qspec, kvspec, kvspec, vspec],
        out_specs=[qspec, statspec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, h), jnp.float32)],
        compiler_params=cfg.params(),
        interpret=cfg.interpret,
        name="stis_fwd",
    )(q, k, v, valid)
    return o, lse


def _stis_bwd_call(q, k, v, valid, o, lse, do, cfg: _Config):
    b, n, h, d, hk, g, gp, block, nt = _geometry(q, k, cfg.block_q, DEFAULT_ROWS_PER_PROGRAM_DQ)
    plan = _plan(n, cfg.window, cfg.causal, cfg.sink, cfg.unroll)
    has_sink = plan.sink_window is not None
    qspec, kvspec, vspec, statspec = _specs(n, d, g, gp, nt, cfg.kv_head_major)
    ngrp = h // gp
    dtype_k, dtype_v = k.dtype, v.dtype
    *_, block_kv, nk = _geometry(q, k, cfg.block_k, DEFAULT_ROWS_PER_PROGRAM_DKV)  # (before the layout change)
    k, v = _kernel_kv(k, v, cfg)

    # dq (+ delta, + per-tile sink partials)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, h), jnp.float32)]
    out_specs = [qspec, statspec]
    if has_sink:
        part = jax.ShapeDtypeStruct((b, nt, ngrp, d), jnp.float32)
        pspec = pl.BlockSpec((_SQ, _SQ, _SQ, d), lambda p, hp: (p // nt, p % nt, hp, 0))
        out_shape += [part, part]
        out_specs += [pspec, pspec]
    res = pl.pallas_call(
        functools.partial(_dq_kernel, n=n, nt=nt, block=block, plan=plan, scale=cfg.scale),
        grid=(b * nt, ngrp),
        in_specs=[qspec, kvspec, kvspec, vspec, qspec, qspec, statspec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=cfg.params(),
        interpret=cfg.interpret,
        name="stis_bwd_dq",
    )(q, k, v, valid, o, do, lse)
    dq, delta = res[0], res[1]

    # dk, dv: one program per (batch, head group, key tile). With GQA packing (gp == g) the group is
    # the whole kv head; otherwise each program writes the part of one query head, summed below.
    qspec, kvspec, vspec, statspec = _specs(n, d, g, gp, nk, cfg.kv_head_major)
    in_specs = [qspec, kvspec, kvspec, vspec, qspec, statspec, statspec]
    args = [q, k, v, valid, do, lse, delta]
    if has_sink:
        sspec = pl.BlockSpec((_SQ, _SQ, d), lambda p, hp: (p // nk, hp, 0))
        in_specs += [sspec, sspec]
        args += [jnp.sum(res[2], axis=1), jnp.sum(res[3], axis=1)]   # [B, ngrp, d], fixed order
    packed = gp == g
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n=n, nt=nk, block=block_kv, plan=plan, scale=cfg.scale),
        grid=(b * nk, ngrp),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((_SQ, n, _SQ, d), lambda p, hp: (p // nk, 0, hp, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((b, n, ngrp, d), dtype_k if packed else jnp.float32),
                   jax.ShapeDtypeStruct((b, n, ngrp, d), dtype_v if packed else jnp.float32)],
        compiler_params=cfg.params(),
        interpret=cfg.interpret,
        name="stis_bwd_dkv",
    )(*args)
    if not packed:
        dk = dk.reshape(b, n, hk, g // gp, d).sum(axis=3).astype(dtype_k)
        dv = dv.reshape(b, n, hk, g // gp, d).sum(axis=3).astype(dtype_v)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# custom_vjp.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _stis(q, k, v, valid, cfg):
    return _stis_fwd_call(q, k, v, valid, cfg)[0]


def _stis_vjp_fwd(q, k, v, valid, cfg):
    o, lse = _stis_fwd_call(q, k, v, valid, cfg)
    return o, (q, k, v, valid, o, lse)


def _stis_vjp_bwd(cfg, res, do):
    q, k, v, valid, o, lse = res
    dq, dk, dv = _stis_bwd_call(q, k, v, valid, o, lse, do.astype(o.dtype), cfg)
    return dq, dk, dv, None


_stis.defvjp(_stis_vjp_fwd, _stis_vjp_bwd)


def stis_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                       causal: bool = True, window: int = 8, sink: bool = True,
                       block_q: int | None = None, block_k: int | None = None,
                       num_warps: int | None = None, num_stages: int | None = None,
                       unroll: bool | None = None, interpret: bool = False) -> jax.Array:
    """STIS attention with Pallas-Triton kernels; same contract as ``stis_attention_reference``.

    Args:
      q: [B, N, H, d] queries; k, v: [B, N, Hk, d] (H a multiple of Hk; head g uses kv head g // (H/Hk)).
      valid: bool [B, N] (right padding in the model, but any pattern works).
      causal, window, sink: the STIS rules (SPEC section 4). ``window >= 1``.
      block_q: queries per program in the forward and dq kernels, a power of two; default
        ``DEFAULT_ROWS_PER_PROGRAM // G`` (64 for G = 4) in the forward and ``DEFAULT_ROWS_PER_PROGRAM_DQ // G``
        (16) in dq; lowered to next_pow2(N) for short sequences, but never below min(block, 16).
      block_k: keys per program in the dk/dv kernel; default ``DEFAULT_ROWS_PER_PROGRAM_DKV // G``
        (16 for G = 4), same clipping.
      num_warps, num_stages, unroll: launch/codegen knobs, default ``NUM_WARPS``, ``NUM_STAGES``,
        ``UNROLL`` (offset loops vs fully unrolled offsets).
      interpret: run the kernels with the Pallas interpreter (CPU tests).

    Returns:
      o [B, N, H, d] in q.dtype (float32 accumulation); 0 at invalid queries. Differentiable in q, k,
      v (custom VJP with Pallas backward kernels; deterministic, no atomics).
    """
    b, n, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, n) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"bad shapes q={q.shape} k={k.shape} v={v.shape}")
    if valid.shape != (b, n):
        raise ValueError(f"valid must be [B, N] = {(b, n)}, got {valid.shape}")
    if window < 1:
        raise ValueError("window must be >= 1")
    for blk in (block_q, block_k):
        if blk is not None and not _is_pow2(blk):
            raise ValueError(f"block sizes must be powers of two, got {blk}")
    cfg = _Config(
        causal=bool(causal), window=int(window), sink=bool(sink), block_q=block_q, block_k=block_k,
        num_warps=NUM_WARPS if num_warps is None else int(num_warps),
        num_stages=NUM_STAGES if num_stages is None else int(num_stages),
        unroll=UNROLL if unroll is None else bool(unroll),
        scale=1.0 / math.sqrt(d), interpret=bool(interpret), kv_head_major=bool(KV_HEAD_MAJOR))
    valid_i = valid.astype(jnp.int32)
    dp = pl.next_power_of_2(d)
    if dp == d:
        return _stis(q, k, v, valid_i, cfg)
    # Triton tensors need power-of-two sizes: zero-pad the head dim (scores unchanged; the scale stays
    # 1/sqrt(d) of the true d). Autodiff goes through the pad/slice.
    pad = [(0, 0)] * 3 + [(0, dp - d)]
    o = _stis(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), valid_i, cfg)
    return o[..., :d]
