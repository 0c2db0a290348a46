"""LTIS (long-term interest selection, SPEC section 3) as Pallas kernels for GPUs (Triton lowering).

Two entry points, each beside its pure-jnp reference in :mod:`pallas_kernels.ltis_reference`:

* :func:`select_blocks_gpu` - fused compressed scoring + top-n block selection (SPEC 3.3-3.4, 3.8), no
  gradient. Nothing of size ``[N, Nc]`` leaves the kernel, and in causal mode each program stops at the last
  block visible to its last query (the triangle is skipped). One program per (batch, kv head, ``SEL_BLOCK_Q``
  queries) scores ``SEL_CHUNK`` compressed blocks at a time as one ``[BQ, d] x [d, chunk]`` matmul (TF32x3
  products on the GPU, ``gpu_common.selection_score_precision``), masks the invisible ones, updates a running
  max / sum for the log-sum-exp, and splits the score tile into one ``[BQ]`` column per block. Pallas-Triton
  has no sort / top_k, so the running top-n is kept as n per-query (value, index) vectors, sorted descending,
  and each column goes in by a branch-free sorted insertion of ``[BQ]`` vectors (one entry per query): no
  max-and-mask rounds over the tile and no data-dependent loop. Chunks before the tile's first query's own
  block skip the per-query causal test, and in causal mode the query tiles launch longest first
  (``SEL_LONGEST_FIRST``) so that the last wave holds the short ones. It replaced two kernels: a tile kernel
  that inserted each tile's candidates by max-and-mask rounds, and a row kernel that summed each score by 16
  FMAs over 16 scalar key loads per block; in the layer at N = 32k the selection takes 0.31 instead of 0.62 ms
  of device time (benchmarks/NOTES.md, rounds 7 and 8).
  Ties go to the lower block index (same as ``lax.top_k``). Selection is by score, which orders
  blocks exactly as p does (p is a monotone function of the score); ``kept = p > keep_threshold`` uses the
  final log-sum-exp of ``[-1000, visible scores]`` (its running sum accumulated with base-2 exponentials, one
  ``ex2`` per score; ``p`` itself with an accurate ``exp``). Slots that hold no visible block (n larger than the
  number of visible blocks, or n > Nc) get index 0, kept False.

* :func:`ltis_attention_gpu` - fine attention over the kept blocks plus the causal own block (SPEC 3.5, 3.7,
  3.8), a ``jax.custom_vjp`` with a flash-style backward (the forward saves the log-sum-exp; the backward
  recomputes probabilities). Three ``pallas_call``\\ s: forward, dQ, dK/dV.

Packing of heads and queries (forward and dQ)
---------------------------------------------
A program handles (batch b, kv head h, tile of BQ consecutive queries). The G query heads of kv group h
share the same selected blocks and the same K/V, so the program packs its rows query-major:
row ``r = j * G + g`` is query ``q0 + j`` and head ``h * G + g`` (this is exactly the memory order of
``q[b, q0:q0+BQ, h*G:(h+1)*G, :]``). It then computes ``[BQ*G, d] x [d, keys]`` matmuls:

* own block (causal): the BQ queries lie in one selection block (BQ divides b), so all rows share the same b
  own-block keys: one ``[BQ*G, d] x [d, b]`` tile with the causal / validity mask.
* selected slots: the keys of the tile are the gathered blocks ``sel[q0 + j, r]`` of its BQ queries and
  of a group of slots, laid side by side (key column ``(j * SG + r) * b + t``; ``BQ * SG * b`` keys, at most
  ``ATTN_MAX_KEYS``; with G = 4, BQ = 4 and n = 4 that is four ``[16, d] x [d, 64]`` tiles of one slot
  each). Row (j, g) may only see the keys of its own query j, so the score tile is
  masked block-diagonally.

Why: with d = 16 a single query has only G = 4 rows, below the 16-row minimum of a tensor-core ``dot``, and
Pallas-Triton only has 2-D dots (no per-query batched matmul). Packing BQ queries gives >= 16 rows and one
gather of K/V serves all G heads. The block-diagonal mask wastes a factor BQ of the selected-block matmul
and exponentials, which is why ``ATTN_ROWS`` (rows per program) is small: the FLOPs are tiny anyway
(<= 80 keys per query), the kernel is bound by gathers and launch/latency.

dK / dV strategy (deterministic, no atomics)
--------------------------------------------
The selection is inverted in XLA: the (query, slot) pairs of each (batch, kv head) whose block is kept
(and whose query is valid) are stably sorted by block index (``lax.sort``, O(N n) memory: of (uint16 segment,
pair id) pairs of all rows as one 1-D array, which XLA runs as CUB's pair radix sort, or where the segments do not
fit 16 bits of packed int32 keys, per row of [B, Hk, N*n] or from ``DKV_FLAT_SORT_MIN_PAIRS`` pairs as one 1-D
array), and each key block's segment starts where the sorted keys first reach it. The
dK/dV kernel has one program per (batch, kv head, key block w): it loads K_w, V_w once, walks its segment in
chunks of ``DKV_ROWS`` packed rows (queries x G heads, gathered), accumulates ``dV += P^T dO`` and
``dK += dS^T Q`` in registers, adds the own-block contribution of the b queries of block w (causal), and writes
dK_w / dV_w once. Every output element is written by exactly one program in a fixed order: the backward is
bitwise deterministic.
Trade-offs: (+) no atomics (Pallas-Triton does expose ``atomic_add``, but float atomics make training
non-reproducible and the 4 x 16 x 16 scattered adds per query would contend in L2), no [N, Nc] or
[N, n, b, d] intermediate, dK/dV tiles are dense ``[rows, b]`` matmuls with no block-diagonal waste.
(-) one XLA sort of the N*n pairs of every (batch, kv head), and load imbalance: a block selected by many
queries is walked by one program (in causal mode early blocks are visible to more queries; with uniform
choices block 0 gets ~ n*b*ln(N/b) pairs vs n*b on average), which the launch order softens: key blocks are the
outermost grid axis (``DKV_BLOCKS_OUTER``), so the long early blocks of every row start first. The alternatives
considered: float atomics from the dQ kernel (fast, not deterministic) and the dense-by-tile scan (each key block
scans all later query tiles testing ``selected == w``: O(N^2 / b) work, far too slow beyond a few thousand
positions).

Inputs at padded positions never leak: invalid query rows are masked on load (q, dO, delta -> 0) and
store 0; masked keys are loaded as 0 and masked scores / dS entries are replaced (select, not multiply)
before they meet a value. One caveat of the packing: a key that *is* in some valid query's key set (a
padded key inside a kept block, bidirectional mode without ``mask_padded_block_keys``) and holds NaN makes
that query NaN (as in the reference) and also the other queries of its tile (0 * NaN in the shared
``P @ V`` product); finite padding, as the model produces, is unaffected.

Padding: a forward / dQ program whose queries are all padding writes zeros and walks no keys (``pl.when``),
so right-padded batches pay only for their valid queries; the dK/dV lists hold valid queries only.

Tile sizes are module constants (below) and keyword-only overrides are not exposed: tune them here.
All kernels pass ``plgpu.CompilerParams`` (Triton) explicitly so that jax 0.10.x does not route them to
Mosaic GPU. Works with jax 0.10.2 and 0.11.x.
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

from pallas_kernels import gpu_common
from pallas_kernels.gpu_common import NUM_STAGES, TRITON_CUSTOM_CALL_TARGET  # noqa: F401

__all__ = ["select_blocks_gpu", "ltis_attention_gpu", "TRITON_CUSTOM_CALL_TARGET"]

# --------------------------------------------------------------------------------------------------------
# Grids are (tile, batch, kv head): the tile index is the fastest-varying CUDA block index, so programs
# that run together read neighbouring queries / keys of one sequence.
# Tile sizes. Every array a Triton kernel touches must have a power-of-two number of elements and every
# matmul operand dimension must be >= 16; the wrappers round up and mask.
# --------------------------------------------------------------------------------------------------------
# Selection: queries per program (rows of the [BQ, d] x [d, SEL_CHUNK] scoring matmul), warps, and compressed
# blocks scored per matmul. Measured (H100, 65,536 tokens, selection alone, benchmarks/results/
# gpu_call33..35_2026-11-27): 128 queries x 4 warps x 32 blocks 0.53 / 0.54 ms at N = 32k and 0.88 / 0.86 at 64k;
# 32 x 1 x 16 0.58 / 1.00; 64 x 2 x 32 0.60 / 0.99; 256 x 8 x 32 0.59 / 1.06; 64-block chunks 0.61 / 0.92.
# SEL_LONGEST_FIRST = 1 launches the causal query tiles in reverse, those with the most visible blocks first, so
# that the last wave holds short programs: in the layer's profile 0.334 -> 0.306 ms at 32k and 0.637 -> 0.510 at
# 64k, unchanged up to 4k (H100, one process, benchmarks/results/gpu_call39_2026-11-27; NOTES.md, round 8).
SEL_BLOCK_Q = 128
SEL_NUM_WARPS = 4
SEL_CHUNK = 32
SEL_LONGEST_FIRST = 1
# Software-pipelining depth (Triton ``num_stages``) of the selection's chunk loop and of the dK/dV kernel's walk over
# a key block's query list (Triton prefetches the next chunk's pair ids, q / dO rows and statistics with cp.async).
# 3 instead of 2 (H200, 65,536 tokens, benchmarks/results/gpu_call62..63_2026-11-29): dK/dV 0.093 -> 0.099 ms at
# N = 1k and 0.114 -> 0.123 at 4k; the selection the same up to 4k, 0.300 -> 0.289 at 32k but 0.534 -> 0.562 at 64k.
SEL_NUM_STAGES = 2
DKV_NUM_STAGES = 2
# Fine attention (forward and dQ): packed rows (queries x G heads) per program. 16 is the tensor-core
# minimum; with G = 4 it is 4 queries (4x block-diagonal waste in the selected-key tile). Larger values
# share the own-block load over more queries but waste more exponentials on the block-diagonal mask.
ATTN_ROWS = 16
# Selected slots are processed side by side in groups of at most this many keys (bq * slots * b): with
# G = 4 the n = 4 slots of the 4 queries form four [16, 64] score tiles (one slot each). 128 measured a
# little faster than 256 (one [16, 256] tile) with one warp: 1.62 vs 1.70 ms for the whole layer's
# forward + backward at N = 1k (H200, benchmarks/results/gpu_call13_2026-11-27), 0.96 vs 1.09 ms for LTIS
# alone (gpu_call12_2026-11-27); 64 a little faster again, with 96 / 112 registers per thread (forward / dQ)
# instead of 156 / 162 (more programs per SM): forward 0.116 -> 0.111 ms and dQ 0.129 -> 0.124 at 1k, 0.119 ->
# 0.113 and 0.131 -> 0.125 at 4k (H200, head-major K / V, benchmarks/results/gpu_call58_2026-11-28).
ATTN_MAX_KEYS = 64
# One warp per forward / dQ program: its [16, 64] tiles are small, and with more warps every row max / sum
# becomes a cross-warp reduction through shared memory. Measured (H200, N = 1k and 32k, 65,536 tokens):
# LTIS forward + backward 1.85 -> 1.09 ms and 2.07 -> 1.25 ms going from 4 warps to 1
# (benchmarks/results/gpu_call12_2026-11-27).
ATTN_NUM_WARPS = 1
DQ_NUM_WARPS = 1
# dK/dV: packed rows (pairs x G heads) per chunk of a key block's query list ([rows, d] x [d, b] tiles). With the
# longest lists launched first (``DKV_BLOCKS_OUTER``) 32 beat 64 (H200, 65,536 tokens, per-kernel device time,
# benchmarks/results/gpu_call67_2026-11-29): 0.078 -> 0.065 ms at N = 1k, 0.085 -> 0.077 at 4k; 128: 0.109 / 0.122;
# at 32 rows, 16 rows took 0.080 / 0.108, 3 pipeline stages 0.070 / 0.088, 2 warps 0.097 / 0.103 (gpu_call69).
# The gated dK/dV kernel (N >= 8k) has its own constant, ``gated_gpu.DKV_ROWS`` (64: 32 took 0.311 instead of 0.286 ms
# there at 32k).
DKV_ROWS = 32
# One warp here too: the dK/dV kernel's device time 0.133 -> 0.092 ms at N = 1k, unchanged at 32k (H100, per-kernel
# profile, benchmarks/results/gpu_call20_2026-11-27; 2 warps with 32 rows: 0.113; 1 warp with 32 rows: 0.090 at
# 1k but 0.234 instead of 0.205 at 32k).
DKV_NUM_WARPS = 1
# dK/dV launch order. 1 = grid (batch, kv head, key block): CUDA launches blockIdx.x fastest, so every row's key block 0
# starts before any row's block 1, and so on. In causal mode the early blocks are visible to more queries and have the
# longest query lists (with uniform choices block 0 gets ~ n * b * ln(N / b) pairs against n * b on average: ~355
# against 64 at N = 4k), and in the key-block-fastest order (0) the last rows' long programs start in the
# kernel's last wave and run alone at its end. Bidirectional lists are even, so either order serves there. Measured
# (H200, 65,536 tokens, alternated twice in one process, benchmarks/results/gpu_call66_2026-11-29): dK/dV 0.092 ->
# 0.078 ms at N = 1k, 0.113 -> 0.085 at 4k; the gated dK/dV 0.298 -> 0.286 at 32k, 0.291 either way at 64k (B = 1).
DKV_BLOCKS_OUTER = 1
# dK/dV inverse selection where the (uint16) pair sort below does not apply: from this many (query, slot) pairs per
# (batch, kv head) on (N >= 8,192 with n = 4), all rows' packed int32 keys are sorted as one 1-D array, which XLA
# runs as CUB's radix sort (``_inverse_selection``). Device time of the sort (H100, 65,536 tokens,
# benchmarks/results/gpu_call31_2026-11-27): 0.053 / 0.054 / 0.053 ms at N = 1k / 4k / 32k against 0.035 / 0.058 /
# 0.115 for XLA's per-row sort, which is also one kernel instead of ~10.
DKV_FLAT_SORT_MIN_PAIRS = 32768
# 1 = sort (segment, pair id) as (uint16 key, int32 value) pairs, one 1-D array, wherever the segments (batch, kv head,
# key block or "none") fit 16 bits (for 65,536 tokens per batch at every N): XLA hands that to CUB's pair radix sort,
# which makes 2 passes over 16-bit keys instead of 4 over the packed int32 keys. 0 = the packed int32 sorts above.
# Device time of the sort (H200, alternated twice in one process, benchmarks/results/gpu_call65_2026-11-29): 0.034 ->
# 0.030 ms at N = 1k (7 more kernels: CUB's passes), 0.057 -> 0.032 at 4k, 0.052 -> 0.032 at 32k.
DKV_SORT_U16_KEYS = 1
# K / V as the attention kernels read them: True = head-major [B, Hk, N, d] (a transposed copy made in XLA: the
# layer's XLA time grew by ~0.002 ms at N = 1k, gpu_call59_2026-11-28), False = the model's [B, N, Hk, d]. With
# d = 16 a key row is 32 bytes either way, but head-major puts the 16 rows of a gathered block in 512 contiguous
# bytes (4 cache lines) instead of spreading them over 1 KB (8 lines, the other kv head's rows in between); ncu
# showed the forward / dQ kernels bound by L1 throughput (77-83 %, L2 at 35 %; H200, N = 4k, gpu_call56_2026-11-28):
# dQ 149 -> 134 us at 4k, layer throughput -2 to -3 % (gpu_call57_2026-11-28).
KV_HEAD_MAJOR = True
_compiler_params = gpu_common.compiler_params
_next_pow2, _floor_pow2 = gpu_common.next_pow2, gpu_common.floor_pow2
_idiv, _irem, _dot = gpu_common.idiv, gpu_common.irem, gpu_common.dot
_padded_head_dim, _pad_last = gpu_common.padded_head_dim, gpu_common.pad_last
_LOG2E = gpu_common.LOG2E


# ========================================================================================================
# (A) Selection
# ========================================================================================================
def _visible_blocks(q0, *, bq, seq_len, nc, block_size, causal):
    """Compressed blocks a query tile has to walk: in causal mode those before its last query's block."""
    if not causal:
        return jnp.int32(nc)
    last_q = jnp.minimum(q0 + bq, seq_len) - 1
    return jnp.minimum(jnp.int32(nc), _idiv(last_q, block_size))


def _insert_sorted(vals, idxs, s, w):
    """Sorted (descending) insertion of the [bq] scores s of block w into the running top-n (vals, idxs), without
    branches. Blocks arrive in increasing order, so strict > keeps the lower index on ties."""
    above = [s > v for v in vals]
    new_vals, new_idxs = [jnp.where(above[0], s, vals[0])], [jnp.where(above[0], w, idxs[0])]
    for j in range(1, len(vals)):
        new_vals.append(jnp.where(above[j - 1], vals[j - 1], jnp.where(above[j], s, vals[j])))
        new_idxs.append(jnp.where(above[j - 1], idxs[j - 1], jnp.where(above[j], w, idxs[j])))
    return tuple(new_vals), tuple(new_idxs)


def _select_kernel(qm_ref, ck_ref, bv_ref, out_ref, *, seq_len, nc, n_sel, n_pad, block_size, causal, scale,
                   keep_threshold, bq, chunk, score_precision, longest_first):
    # qm_ref [N, dp] f32; ck_ref [Nc, dp] f32; bv_ref [Nc] int32; out_ref [N, n_pad] int32.
    tile = pl.program_id(0)
    if longest_first:
        tile = pl.num_programs(0) - 1 - tile
    q0 = tile * bq
    rows = q0 + jnp.arange(bq, dtype=jnp.int32)
    row_in = rows < seq_len
    qm = plgpu.load(qm_ref.at[pl.ds(q0, bq), :], mask=row_in[:, None], other=0.0)

    n_blocks = _visible_blocks(q0, bq=bq, seq_len=seq_len, nc=nc, block_size=block_size, causal=causal)
    # blocks before the tile's first query's block are visible to every query of the tile: their chunks skip
    # the per-query causal test
    n_shared_blocks = jnp.minimum(n_blocks, _idiv(q0, block_size)) if causal else n_blocks
    neg_inf = jnp.float32(-jnp.inf)

    def chunk_body(per_query_causal):
        def body(c, carry):
            m, l, vals, idxs = carry
            w0 = c * chunk
            cols = w0 + jnp.arange(chunk, dtype=jnp.int32)
            col_in = cols < n_blocks
            ck = plgpu.load(ck_ref.at[pl.ds(w0, chunk), :], mask=col_in[:, None], other=0.0)
            bv = plgpu.load(bv_ref.at[pl.ds(w0, chunk)], mask=col_in, other=0)
            s = _dot(qm, ck, trans_b=True, precision=score_precision) * scale  # [bq, chunk]
            vis = (col_in & (bv != 0))[None, :]
            if per_query_causal:
                vis = vis & ((cols * block_size + (block_size - 1))[None, :] < rows[:, None])
            s = jnp.where(vis, s, neg_inf)
            # running log-sum-exp (m starts at the -1000 sink with l = 1); its exponentials in base 2 (one ex2 and
            # one FMA each instead of an accurate exp's ~8 instructions: this kernel is issue-bound)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m2 = m_new * _LOG2E
            l = l * jnp.exp2(m * _LOG2E - m2) + jnp.sum(jnp.exp2(s * _LOG2E - m2[:, None]), axis=1)
            # the chunk's columns, one [bq] vector per block, into the running top-n
            for u, s_u in enumerate(jnp.split(s, chunk, axis=1)):
                vals, idxs = _insert_sorted(vals, idxs, jnp.squeeze(s_u, 1), w0 + u)
            return m_new, l, vals, idxs
        return body

    n_shared_chunks = _idiv(n_shared_blocks, chunk)
    n_chunks = _idiv(n_blocks + (chunk - 1), chunk)
    empty = (jnp.full((bq,), -1000.0, jnp.float32), jnp.ones((bq,), jnp.float32),
             tuple(jnp.full((bq,), -jnp.inf, jnp.float32) for _ in range(n_sel)),
             tuple(jnp.zeros((bq,), jnp.int32) for _ in range(n_sel)))
    carry = lax.fori_loop(0, n_shared_chunks, chunk_body(False), empty)
    m, l, vals, idxs = lax.fori_loop(n_shared_chunks, n_chunks, chunk_body(causal), carry)
    _store_selection(out_ref, q0, row_in, m, l, vals, idxs, n_sel=n_sel, n_pad=n_pad, bq=bq,
                     keep_threshold=keep_threshold)


def _store_selection(out_ref, q0, row_in, m, l, vals, idxs, *, n_sel, n_pad, bq, keep_threshold):
    """Writes the encoded selection (index if kept, -1 - index if not) of the tile's queries: kept iff
    p = exp(score - m) / l > keep_threshold, with (m, l) the final log-sum-exp."""
    slot = jnp.arange(n_pad, dtype=jnp.int32)[None, :]
    out = jnp.zeros((bq, n_pad), jnp.int32)
    for j in range(n_sel):
        p = jnp.exp(vals[j] - m) / l
        kept = p > keep_threshold
        enc = jnp.where(kept, idxs[j], -1 - idxs[j])  # encoded: >= 0 kept, < 0 not kept
        out = jnp.where(slot == j, enc[:, None], out)
    plgpu.store(out_ref.at[pl.ds(q0, bq), :], out, mask=row_in[:, None])


def select_blocks_gpu(
    q_mean: jax.Array,
    compressed_keys: jax.Array,
    block_valid: jax.Array,
    *,
    causal: bool = True,
    num_selected: int = 4,
    block_size: int = 16,
    keep_threshold: float = 1e-10,
    scale: float,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Fused compressed scoring + top-n selection (SPEC 3.3-3.4, 3.8). No gradient flows (discrete).

    Args:
      q_mean: [B, N, Hk, d] (mean over the G query heads of each kv group; scored in float32).
      compressed_keys: [B, Hk, Nc, d], Nc = N // block_size.
      block_valid: bool [B, Nc]: block has >= 1 valid key.
      causal: visibility ``w*b + b - 1 < i`` (True) or every valid block (False).
      num_selected: n. block_size: b. keep_threshold: kept iff p > this. scale: 1/sqrt(head_dim).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      (selected_blocks int32 [B, N, Hk, n], kept bool [B, N, Hk, n]); unfilled slots: index 0, kept False.
    """
    bsz, n, hk, d = q_mean.shape
    nc = compressed_keys.shape[2]
    n_sel = int(num_selected)
    if n_sel < 1:
        raise ValueError(f"num_selected must be >= 1, got {num_selected}")
    if compressed_keys.shape != (bsz, hk, nc, d):
        raise ValueError(f"compressed_keys shape {compressed_keys.shape} != {(bsz, hk, nc, d)}")
    gpu_common.check_grid_batch(bsz)
    if nc == 0:
        z = jnp.zeros((bsz, n, hk, n_sel), jnp.int32)
        return z, z.astype(bool)
    q_mean = lax.stop_gradient(q_mean)
    compressed_keys = lax.stop_gradient(compressed_keys)
    n_pad = _next_pow2(n_sel)
    enc = _select_call(q_mean, compressed_keys, block_valid, n_sel=n_sel, n_pad=n_pad, block_size=int(block_size),
                       causal=bool(causal), scale=float(scale), keep_threshold=float(keep_threshold),
                       interpret=interpret)
    enc = enc[..., :n_sel]
    kept = enc >= 0
    selected = jnp.where(kept, enc, -1 - enc)
    return selected, kept


def _select_call(q_mean, compressed_keys, block_valid, *, n_sel, n_pad, block_size, causal, scale, keep_threshold,
                 interpret):
    """Encoded selection [B, N, Hk, n_pad] int32 (index if kept, -1 - index if not)."""
    bsz, n, hk, d = q_mean.shape
    nc = compressed_keys.shape[2]
    dp = _padded_head_dim(d)
    bq = min(SEL_BLOCK_Q, max(16, _next_pow2(n)))
    kernel = functools.partial(
        _select_kernel, seq_len=n, nc=nc, n_sel=n_sel, n_pad=n_pad, block_size=block_size, causal=causal,
        scale=scale, keep_threshold=keep_threshold, bq=bq, chunk=SEL_CHUNK,
        score_precision=gpu_common.selection_score_precision(bool(interpret)),
        longest_first=bool(SEL_LONGEST_FIRST) and causal)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[
            pl.BlockSpec((None, n, None, dp), lambda t, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, None, nc, dp), lambda t, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, nc), lambda t, b, h: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, n, None, n_pad), lambda t, b, h: (b, 0, h, 0)),
        out_shape=jax.ShapeDtypeStruct((bsz, n, hk, n_pad), jnp.int32),
        compiler_params=_compiler_params(SEL_NUM_WARPS, SEL_NUM_STAGES),
        interpret=interpret,
        name="ltis_select",
    )(_pad_last(q_mean.astype(jnp.float32), dp), _pad_last(compressed_keys.astype(jnp.float32), dp),
      block_valid.astype(jnp.int32))


# ========================================================================================================
# (B) Fine attention
# ========================================================================================================
def _attn_tiles(g: int, block_size: int) -> tuple[int, int]:
    """(queries per program BQ, padded packed rows RP) for the forward / dQ kernels."""
    bq = min(block_size, _floor_pow2(max(1, ATTN_ROWS // g)))
    return bq, max(16, _next_pow2(bq * g))


def _dkv_tiles(g: int, rows: int) -> tuple[int, int]:
    """(pairs per chunk CQ, padded packed rows RP) of a dK/dV walk with ``rows`` packed rows per chunk."""
    cq = _floor_pow2(max(1, rows // g))
    return cq, max(16, _next_pow2(cq * g))


_Rows = gpu_common.Rows


def _own_keys(q0, *, block_size, seq_len, valid_ref):
    """Own-block key positions [b] of a query tile (all its queries lie in one block) and their validity."""
    own0 = _idiv(q0, block_size) * block_size
    kpos = own0 + jnp.arange(block_size, dtype=jnp.int32)
    kin = kpos < seq_len
    kval = kin & (valid_ref[jnp.where(kin, kpos, 0)] != 0)
    return own0, kpos, kval


def _group_keys(q0, r0, *, bq, sg, n_sel, block_size, seq_len, sel_ref, valid_ref, mask_padded):
    """Keys of selected slots r0 .. r0+sg-1 of the BQ queries of a tile, side by side.

    Key column c = (j * sg + rr) * b + t: query j of the tile, slot r0 + rr, offset t in the block.
    Returns (query of each column [BQ*sg*b], key positions, key mask)."""
    c = jnp.arange(bq * sg * block_size, dtype=jnp.int32)
    cb = _idiv(c, block_size)
    kj = _idiv(cb, sg)
    slot = r0 + _irem(cb, sg)
    qi = q0 + kj
    q_in = (qi < seq_len) & (slot < n_sel)
    qi_c = jnp.where(q_in, qi, 0)
    e = sel_ref[qi_c, jnp.where(q_in, slot, 0)]  # encoded block: >= 0 kept
    # Keys of an invalid query are never loaded: the [rows, keys] x [keys, d] product mixes the queries of
    # the tile, so a NaN key/value of one query's block would reach the others through 0 * NaN.
    kept = q_in & (e >= 0) & (valid_ref[qi_c] != 0)
    kpos = jnp.where(kept, e, 0) * block_size + _irem(c, block_size)
    kmask = kept
    if mask_padded:
        kmask = kmask & (valid_ref[kpos] != 0)
    return kj, kpos, kmask


def _slot_groups(n_sel: int, bq: int, block_size: int) -> tuple[int, int]:
    """(slots per group sg, number of groups): a group's keys (bq * sg * b) stay <= ATTN_MAX_KEYS."""
    sg = max(1, min(_next_pow2(n_sel), _floor_pow2(max(1, ATTN_MAX_KEYS // (bq * block_size)))))
    return sg, -(-n_sel // sg)


def _walk_keys(carry, visit, q, q0, rows, k_ref, v_ref, valid_ref, sel_ref, *, seq_len, n_sel, bq,
               block_size, causal, mask_padded):
    """Feeds every key tile of a query tile to ``visit(carry, scores, mask, k_tile, v_tile) -> carry``:
    the own causal block first (causal mode), then the packed groups of selected blocks. Shared by the
    forward and dQ kernels so both see exactly the same keys and masks."""
    d = q.shape[-1]
    if causal:
        own0, kpos, kval = _own_keys(q0, block_size=block_size, seq_len=seq_len, valid_ref=valid_ref)
        ko = plgpu.load(k_ref.at[pl.ds(own0, block_size), :], mask=kval[:, None], other=0.0)
        vo = plgpu.load(v_ref.at[pl.ds(own0, block_size), :], mask=kval[:, None], other=0.0)
        mask = rows.ok[:, None] & kval[None, :] & (kpos[None, :] <= rows.qi[:, None])
        carry = visit(carry, _dot(q, ko, trans_b=True), mask, ko, vo)
    cd = jnp.arange(d, dtype=jnp.int32)[None, :]
    sg, n_groups = _slot_groups(n_sel, bq, block_size)

    # The groups stay unrolled: as an ``scf.for`` (which lets Triton's pipeliner prefetch the next group's K / V
    # into shared memory with cp.async) the forward took 0.145 instead of 0.116 ms at N = 1k (H200,
    # benchmarks/results/gpu_call58_2026-11-28).
    for grp in range(n_groups):
        kj, kpos, kmask = _group_keys(q0, grp * sg, bq=bq, sg=sg, n_sel=n_sel, block_size=block_size,
                                      seq_len=seq_len, sel_ref=sel_ref, valid_ref=valid_ref,
                                      mask_padded=mask_padded)
        ks = plgpu.load(k_ref.at[kpos[:, None], cd], mask=kmask[:, None], other=0.0)
        vs = plgpu.load(v_ref.at[kpos[:, None], cd], mask=kmask[:, None], other=0.0)
        mask = rows.ok[:, None] & kmask[None, :] & (rows.j[:, None] == kj[None, :])
        carry = visit(carry, _dot(q, ks, trans_b=True), mask, ks, vs)
    return carry


def _softmax_step(carry, s, mask, vt, qk_scale):
    """One online-softmax step over a key tile, base 2: carry (m [R], l [R], acc [R, d]), raw scores s [R, K],
    mask [R, K], values vt [K, d]. Masked scores are replaced (select), so they may hold anything."""
    m, l, acc = carry
    neg_inf = jnp.float32(-jnp.inf)
    s = jnp.where(mask, s * qk_scale, neg_inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == neg_inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(vt.dtype), vt)
    return m_new, l, acc


def _dq_step(dq, s, mask, kt, vt, *, do, lse, delta, qk_scale, gate=None):
    """One dQ step over a key tile: ``dq + dS K`` with ``dS = P (dO V^T - delta)`` on the mask, where
    ``P = exp2(s * qk_scale - lse)`` from raw scores s [R, K] (times the per-row ``gate`` [R] when given).
    Masked entries are replaced (select), so they may hold anything."""
    s = jnp.where(mask, s * qk_scale, jnp.float32(-jnp.inf))
    p = jnp.exp2(s - lse[:, None])
    if gate is not None:
        p = p * gate[:, None]
    dp = _dot(do, vt, trans_b=True)
    ds = jnp.where(mask, p * (dp - delta[:, None]), 0.0)
    return dq + _dot(ds.astype(kt.dtype), kt)


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, o_ref, lse_ref, *, seq_len, g, n_sel, bq, rp,
                block_size, causal, mask_padded, qk_scale):
    # q_ref [N, G, d]; k_ref, v_ref [N, d]; valid_ref [N]; sel_ref [N, n]; o_ref [N, G, d]; lse_ref [N, G]
    d = q_ref.shape[-1]
    q0 = pl.program_id(0) * bq
    rows = _Rows(q0, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)

    @pl.when(_any_row(rows))
    def _attend():
        q = rows.load(q_ref, d)
        carry = (jnp.full((rp,), -jnp.inf, jnp.float32), jnp.zeros((rp,), jnp.float32),
                 jnp.zeros((rp, d), jnp.float32))
        carry = _walk_keys(carry, lambda c, s, mask, kt, vt: _softmax_step(c, s, mask, vt, qk_scale), q, q0,
                           rows, k_ref, v_ref, valid_ref, sel_ref, seq_len=seq_len, n_sel=n_sel, bq=bq,
                           block_size=block_size, causal=causal, mask_padded=mask_padded)
        m, l, acc = carry
        nonempty = rows.ok & (l > 0)
        o = acc / jnp.where(nonempty, l, 1.0)[:, None]
        o = jnp.where(nonempty[:, None], o, 0.0)
        lse = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), 0.0)
        rows.store(o_ref, o.astype(o_ref.dtype))
        rows.store_row(lse_ref, lse)

    @pl.when(jnp.logical_not(_any_row(rows)))
    def _padding():  # a tile of padded queries: zeros, no key walk
        rows.store(o_ref, jnp.zeros((rp, d), o_ref.dtype))
        rows.store_row(lse_ref, jnp.zeros((rp,), jnp.float32))


def _any_row(rows):
    """Whether any packed row of the tile is a valid query (else the program only writes zeros)."""
    return jnp.max(rows.ok.astype(jnp.int32)) > 0


def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, sel_ref, do_ref, lse_ref, delta_ref, dq_ref, *, seq_len,
               g, n_sel, bq, rp, block_size, causal, mask_padded, qk_scale, sm_scale):
    d = q_ref.shape[-1]
    q0 = pl.program_id(0) * bq
    rows = _Rows(q0, bq=bq, rp=rp, g=g, seq_len=seq_len, valid_ref=valid_ref)

    @pl.when(_any_row(rows))
    def _attend():
        q = rows.load(q_ref, d)
        do = rows.load(do_ref, d)
        lse = rows.load_row(lse_ref)
        delta = rows.load_row(delta_ref)

        update = functools.partial(_dq_step, do=do, lse=lse, delta=delta, qk_scale=qk_scale)
        dq = _walk_keys(jnp.zeros((rp, d), jnp.float32), update, q, q0, rows, k_ref, v_ref, valid_ref,
                        sel_ref, seq_len=seq_len, n_sel=n_sel, bq=bq, block_size=block_size, causal=causal,
                        mask_padded=mask_padded)
        rows.store(dq_ref, (dq * sm_scale).astype(dq_ref.dtype))

    @pl.when(jnp.logical_not(_any_row(rows)))
    def _padding():
        rows.store(dq_ref, jnp.zeros((rp, d), dq_ref.dtype))


def dkv_launch(nkb: int, bsz: int, hk: int, in_specs, out_specs):
    """(grid, in_specs, out_specs, key-block grid axis) of a dK/dV kernel whose specs index (key block, batch, kv
    head) grids, in the launch order of ``DKV_BLOCKS_OUTER``."""
    if not DKV_BLOCKS_OUTER:
        return (nkb, bsz, hk), in_specs, out_specs, 0

    def blocks_last(spec):
        index_map = spec.index_map
        return dataclasses.replace(spec, index_map=lambda b, h, t: index_map(t, b, h))

    return (bsz, hk, nkb), [blocks_last(s) for s in in_specs], [blocks_last(s) for s in out_specs], 2


def _dkv_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, order_ref, starts_ref,
                dk_ref, dv_ref, *, seq_len, g, n_sel, cq, rp, rp_own, block_size, causal, mask_padded,
                qk_scale, sm_scale, block_axis):
    # order_ref [M] (pair ids i*n + r sorted by block); starts_ref [NKB + 1]
    d = q_ref.shape[-1]
    w = pl.program_id(block_axis)
    k0 = w * block_size
    kpos = k0 + jnp.arange(block_size, dtype=jnp.int32)
    kin = kpos < seq_len
    kval = kin & (valid_ref[jnp.where(kin, kpos, 0)] != 0)
    # keys of block w as a *selected* block (padded keys included unless mask_padded)
    ksel = kval if mask_padded else kin
    kw = plgpu.load(k_ref.at[pl.ds(k0, block_size), :], mask=kin[:, None], other=0.0)
    vw = plgpu.load(v_ref.at[pl.ds(k0, block_size), :], mask=kin[:, None], other=0.0)
    cd = jnp.arange(d, dtype=jnp.int32)[None, :]
    neg_inf = jnp.float32(-jnp.inf)

    def accumulate(carry, qi_c, gg, ok, kmask):
        dk, dv = carry
        q = plgpu.load(q_ref.at[qi_c[:, None], gg[:, None], cd], mask=ok[:, None], other=0.0)
        do = plgpu.load(do_ref.at[qi_c[:, None], gg[:, None], cd], mask=ok[:, None], other=0.0)
        lse = plgpu.load(lse_ref.at[qi_c, gg], mask=ok, other=0.0)
        delta = plgpu.load(delta_ref.at[qi_c, gg], mask=ok, other=0.0)
        mask = ok[:, None] & kmask
        s = _dot(q, kw, trans_b=True) * qk_scale
        s = jnp.where(mask, s, neg_inf)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, vw, trans_b=True)
        # select, not multiply: a masked key may hold NaN (padding) and 0 * NaN = NaN
        ds = jnp.where(mask, p * (dp - delta[:, None]), 0.0)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros((block_size, d), jnp.float32), jnp.zeros((block_size, d), jnp.float32))

    # (1) queries that selected block w (all kept and valid by construction of the inverse map)
    start = starts_ref[w]
    end = starts_ref[w + 1]
    n_chunks = _idiv(end - start + (cq - 1), cq)
    r = jnp.arange(rp, dtype=jnp.int32)
    rj = _idiv(r, g)
    rg = _irem(r, g)

    def chunk_body(c, carry):
        pidx = start + c * cq + rj
        pin = (r < cq * g) & (pidx < end)
        pair = plgpu.load(order_ref.at[jnp.where(pin, pidx, 0)], mask=pin, other=0)
        qi = _idiv(pair, n_sel)
        qi_c = jnp.where(pin, qi, 0)
        return accumulate(carry, qi_c, rg, pin, ksel[None, :])

    carry = lax.fori_loop(0, n_chunks, chunk_body, carry)

    # (2) own block (causal): the b queries of block w, all G heads
    if causal:
        ro = jnp.arange(rp_own, dtype=jnp.int32)
        qi = k0 + _idiv(ro, g)
        in_b = (ro < block_size * g) & (qi < seq_len)
        qi_c = jnp.where(in_b, qi, 0)
        ok = in_b & (valid_ref[qi_c] != 0)
        kmask = kval[None, :] & (kpos[None, :] <= qi[:, None])
        carry = accumulate(carry, qi_c, _irem(ro, g), ok, kmask)

    dk, dv = carry
    plgpu.store(dk_ref.at[pl.ds(k0, block_size), :], (dk * sm_scale).astype(dk_ref.dtype),
                mask=kin[:, None])
    plgpu.store(dv_ref.at[pl.ds(k0, block_size), :], dv.astype(dv_ref.dtype), mask=kin[:, None])


def kv_heads(k, kv_head_major: bool) -> int:
    """Number of kv heads of a k / v array in the kernels' layout (see ``KV_HEAD_MAJOR``)."""
    return k.shape[1] if kv_head_major else k.shape[2]


def to_kernel_kv_layout(k, v):
    """(k, v, kv_head_major): k / v [B, N, Hk, d] in the layout the kernels read (``KV_HEAD_MAJOR``, read now)."""
    if KV_HEAD_MAJOR:
        return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), True
    return k, v, False


def _specs_common(n, g, d, kv_head_major=False):
    """Block specs of grids (tile, batch, kv head): q rows [N, G, d] of the kv group, k / v [N, d] of the kv head,
    validity [N], per-row statistics [N, G]."""
    q_spec = pl.BlockSpec((None, n, g, d), lambda t, b, h: (b, 0, h, 0))
    if kv_head_major:
        kv_spec = pl.BlockSpec((None, None, n, d), lambda t, b, h: (b, h, 0, 0))
    else:
        kv_spec = pl.BlockSpec((None, n, None, d), lambda t, b, h: (b, 0, h, 0))
    valid_spec = pl.BlockSpec((None, n), lambda t, b, h: (b, 0))
    row_spec = pl.BlockSpec((None, n, g), lambda t, b, h: (b, 0, h))
    return q_spec, kv_spec, valid_spec, row_spec


def _fwd_call(q, k, v, valid_i, sel_enc, *, causal, block_size, mask_padded, kv_head_major, interpret):
    bsz, n, h, d = q.shape
    hk = kv_heads(k, kv_head_major)
    g = h // hk
    n_sel = sel_enc.shape[-1]
    bq, rp = _attn_tiles(g, block_size)
    q_spec, kv_spec, valid_spec, row_spec = _specs_common(n, g, d, kv_head_major)
    sel_spec = pl.BlockSpec((None, n, None, n_sel), lambda t, b, hh: (b, 0, hh, 0))
    kernel = functools.partial(
        _fwd_kernel, seq_len=n, g=g, n_sel=n_sel, bq=bq, rp=rp, block_size=block_size, causal=causal,
        mask_padded=mask_padded, qk_scale=_LOG2E / math.sqrt(d),
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, sel_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, n, h), jnp.float32)],
        compiler_params=_compiler_params(ATTN_NUM_WARPS),
        interpret=interpret,
        name="ltis_attention_fwd",
    )(q, k, v, valid_i, sel_enc)


_PACKED_SORT_MAX = 2**31 - 1  # largest packed sort key (int32)


def _inverse_selection(valid_i, sel_enc, n_key_blocks):
    """(order [B, Hk, N*n] pair ids sorted by block, starts [B, Hk, NKB + 1]) for the dK/dV kernel.

    Pairs (query i, slot r) have id i * n + r and key = their kept block, or NKB (sorts last) when the
    slot is not kept or the query is padding. One ``lax.sort`` orders them stably by block: of (uint16 segment
    ``row * (NKB + 1) + key``, int32 id) pairs over all rows where the segments fit 16 bits (``DKV_SORT_U16_KEYS``),
    else of the packed int32 ``key * (N n) + id`` where that fits (one operand sorts faster than a (key, id)
    pair), else of (key, id). A block's segment starts where the sorted keys first reach it: each key's first
    position is scattered to its block (unique indices, the rest dropped) and blocks nobody selected take the next
    block's start (a reverse cumulative min). Deterministic, and without the contended scatter-add of
    per-block counts; ``searchsorted`` would be a ``while`` loop of ~log2(N n) small kernels.
    """
    bsz, n, hk, n_sel = sel_enc.shape
    n_pairs = n * n_sel
    keys = jnp.where((sel_enc >= 0) & (valid_i[:, :, None, None] != 0), sel_enc, n_key_blocks)
    keys = jnp.transpose(keys, (0, 2, 1, 3)).reshape(bsz, hk, n_pairs).astype(jnp.int32)
    ids = lax.broadcasted_iota(jnp.int32, keys.shape, 2)
    rows = lax.broadcasted_iota(jnp.int32, keys.shape, 0) * hk + lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    n_segments = bsz * hk * (n_key_blocks + 1)
    if DKV_SORT_U16_KEYS and n_segments <= 2**16:
        # stable, so each segment keeps its pair ids in increasing order (as the packed sorts below)
        segment_keys = (rows * (n_key_blocks + 1) + keys).astype(jnp.uint16).reshape(-1)
        sorted_segments, order = lax.sort((segment_keys, ids.reshape(-1)), num_keys=1, is_stable=True)
        order = order.reshape(bsz, hk, n_pairs)
        sorted_keys = sorted_segments.astype(jnp.int32).reshape(bsz, hk, n_pairs) % (n_key_blocks + 1)
    elif n_pairs >= DKV_FLAT_SORT_MIN_PAIRS and n_segments * n_pairs <= _PACKED_SORT_MAX:
        # (row, key, id) packed into one int32 and sorted as one 1-D array: each row's n_pairs entries stay
        # together and in order, and XLA hands a long 1-D int32 sort to CUB's radix sort on GPUs
        packed = (rows * (n_key_blocks + 1) + keys) * n_pairs + ids
        packed = lax.sort(packed.reshape(-1)).reshape(bsz, hk, n_pairs)
        order, sorted_keys = packed % n_pairs, (packed // n_pairs) % (n_key_blocks + 1)
    elif (n_key_blocks + 1) * n_pairs <= _PACKED_SORT_MAX:
        packed = lax.sort(keys * n_pairs + ids, dimension=2)
        order, sorted_keys = packed % n_pairs, packed // n_pairs
    else:
        sorted_keys, order = lax.sort((keys, ids), dimension=2, is_stable=True, num_keys=1)
    first = jnp.concatenate([jnp.ones_like(sorted_keys[..., :1], jnp.bool_),
                             sorted_keys[..., 1:] != sorted_keys[..., :-1]], axis=-1)
    # every other position gets its own out-of-range index, so that all indices are unique and dropped
    segment = jnp.where(first, rows * (n_key_blocks + 1) + sorted_keys, n_segments + rows * n_pairs + ids)
    starts = jnp.full((n_segments,), n_pairs, jnp.int32).at[segment.reshape(-1)].set(
        ids.reshape(-1), mode="drop", unique_indices=True)
    starts = lax.cummin(starts.reshape(bsz, hk, n_key_blocks + 1), axis=2, reverse=True)
    return order, starts


def _bwd_call(q, k, v, valid_i, sel_enc, o, lse, do, *, causal, block_size, mask_padded, kv_head_major,
              interpret):
    bsz, n, h, d = q.shape
    hk = kv_heads(k, kv_head_major)
    g = h // hk
    n_sel = sel_enc.shape[-1]
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale = _LOG2E * sm_scale
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, N, H]
    do = do.astype(q.dtype)
    q_spec, kv_spec, valid_spec, row_spec = _specs_common(n, g, d, kv_head_major)

    # dQ: same tiling as the forward
    bq, rp = _attn_tiles(g, block_size)
    sel_spec = pl.BlockSpec((None, n, None, n_sel), lambda t, b, hh: (b, 0, hh, 0))
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel, seq_len=n, g=g, n_sel=n_sel, bq=bq, rp=rp, block_size=block_size, causal=causal,
            mask_padded=mask_padded, qk_scale=qk_scale, sm_scale=sm_scale,
        ),
        grid=(pl.cdiv(n, bq), bsz, hk),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, sel_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(DQ_NUM_WARPS),
        interpret=interpret,
        name="ltis_attention_dq",
    )(q, k, v, valid_i, sel_enc, do, lse, delta)

    # dK/dV: one program per key block, over the inverted selection
    nkb = pl.cdiv(n, block_size)
    order, starts = _inverse_selection(valid_i, sel_enc, nkb)
    cq, rp_dkv = _dkv_tiles(g, DKV_ROWS)
    rp_own = max(16, _next_pow2(block_size * g))
    grid, in_specs, out_specs, block_axis = dkv_launch(nkb, bsz, hk, [
        q_spec, kv_spec, kv_spec, valid_spec, q_spec, row_spec, row_spec,
        pl.BlockSpec((None, None, n * n_sel), lambda t, b, hh: (b, hh, 0)),
        pl.BlockSpec((None, None, nkb + 1), lambda t, b, hh: (b, hh, 0)),
    ], [kv_spec, kv_spec])
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel, seq_len=n, g=g, n_sel=n_sel, cq=cq, rp=rp_dkv, rp_own=rp_own,
            block_size=block_size, causal=causal, mask_padded=mask_padded, qk_scale=qk_scale,
            sm_scale=sm_scale, block_axis=block_axis,
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(DKV_NUM_WARPS, DKV_NUM_STAGES),
        interpret=interpret,
        name="ltis_attention_dkv",
    )(q, k, v, valid_i, do, lse, delta, order, starts)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ltis_attention(q, k, v, valid_i, sel_enc, causal, block_size, mask_padded, kv_head_major, interpret):
    o, _ = _fwd_call(q, k, v, valid_i, sel_enc, causal=causal, block_size=block_size,
                     mask_padded=mask_padded, kv_head_major=kv_head_major, interpret=interpret)
    return o


def _ltis_attention_fwd(q, k, v, valid_i, sel_enc, causal, block_size, mask_padded, kv_head_major, interpret):
    o, lse = _fwd_call(q, k, v, valid_i, sel_enc, causal=causal, block_size=block_size,
                       mask_padded=mask_padded, kv_head_major=kv_head_major, interpret=interpret)
    return o, (q, k, v, valid_i, sel_enc, o, lse)


def _ltis_attention_bwd(causal, block_size, mask_padded, kv_head_major, interpret, res, do):
    q, k, v, valid_i, sel_enc, o, lse = res
    dq, dk, dv = _bwd_call(q, k, v, valid_i, sel_enc, o, lse, do, causal=causal, block_size=block_size,
                           mask_padded=mask_padded, kv_head_major=kv_head_major, interpret=interpret)
    return dq, dk, dv, None, None


_ltis_attention.defvjp(_ltis_attention_fwd, _ltis_attention_bwd)


def ltis_attention_gpu(
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
    interpret: bool = False,
) -> jax.Array:
    """LTIS fine attention over the selected blocks (SPEC 3.5, 3.7, 3.8); differentiable w.r.t. q, k, v.

    Args:
      q: [B, N, H, d]; k, v: [B, N, Hk, d] (GQA: head g uses kv head g // (H // Hk)); same dtype.
      valid: bool [B, N].
      selected_blocks: int [B, N, Hk, n]; kept: bool [B, N, Hk, n] (from :func:`select_blocks_gpu`).
      causal: add the own causal block and require nothing else (kept blocks end before it).
      block_size: b, a power of two >= 16.
      mask_padded_block_keys: also mask invalid keys inside kept blocks (off = the reference).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      o [B, N, H, d] in q.dtype, 0 at invalid queries and where the key set is empty.
    """
    gpu_common.check_attention_shapes(q, k, v, selected_blocks, kept)
    b = int(block_size)
    if b < 16 or b & (b - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    sel_enc, valid_i = gpu_common.encode_selection(selected_blocks, kept, valid, seq_len=q.shape[1],
                                                   block_size=b)
    q, k, v, d, dp = gpu_common.pad_head_dim(q, k, v)
    k, v, kv_head_major = to_kernel_kv_layout(k, v)
    o = _ltis_attention(q, k, v, valid_i, sel_enc, bool(causal), b, bool(mask_padded_block_keys), kv_head_major,
                        bool(interpret))
    return o[..., :d] if dp != d else o
