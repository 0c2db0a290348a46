"""Shared helpers of the Pallas TPU (Mosaic) kernels ``stis_tpu`` and ``ltis_tpu``.

Lane packing used by every TPU attention kernel here
----------------------------------------------------
The head dim is small (d = 16 by default) while a TPU vector register is 8 sublanes x 128 lanes. Instead of
giving each head its own (mostly empty) 128-lane row, the heads of one token are packed side by side into the
lane dimension: ``q[B, N, H, d] -> [B, N, H*d]`` is a free reshape, so one 128-lane row holds ``128 // d``
heads (all 8 heads for the default H = 8, d = 16). K and V are repeated over their GQA group in the wrapper
(``k[B, N, Hk, d] -> [B, N, H*d]``, lane ``g*d + e`` holds kv head ``g // G``), so Q, K, V, O, dQ, dK and dV
tiles all share the layout ``[rows = tokens, lanes = (head, dim)]``; ``H*d`` is zero-padded to a multiple of
128 ("lane groups" of 128 lanes become a grid axis when ``H*d > 128``). Per-head dot products are a lane-wise
product followed by a *segmented* lane sum: a matmul with the block-diagonal 0/1 matrix
``BD[l, l'] = (l // d == l' // d)`` (float32, ``Precision.HIGHEST``), which leaves each head's score
broadcast over its ``d`` lanes. Softmax statistics are therefore also lane-dense ``[rows, 128]`` arrays
(every lane of a head holds the same value), and the weighted value sum is a plain lane-wise FMA.
The dK/dV of the repeated K/V are summed over the G heads of each group in the wrapper (plain XLA).

Constraints: ``d`` must be a power of two <= 128. Everything is computed in float32; inputs may be
float32 or bfloat16 and outputs have ``q.dtype``.

Mosaic details learned from AOT compiles (jax 0.10.2 / libtpu 0.0.42): signed integer ``//``/``%`` lower
through ``sign`` which queries the attached device (fails when compiling for TPU from a CPU host), so kernels
use shifts / ``lax.div`` on non-negative values only; 1-D SMEM/HBM blocks do the same, so SMEM operands are
3-D ``[X, 1, L]`` arrays; dynamic single-row loads/stores only work on 32-bit refs, so rows are extracted with
``where(iota == t)`` reductions from aligned tiles instead.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

LANES = 128
NEG_INF = float("-inf")
# Hard cap passed as vmem_limit_bytes (v5e / v6e have 128 MiB of VMEM per core; v7x 64 MiB).
VMEM_CAP_BYTES = 100 * 1024 * 1024


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def log2_exact(x: int) -> int:
    if x <= 0 or x & (x - 1):
        raise NotImplementedError(f"{x} must be a power of two")
    return x.bit_length() - 1


def interpret_arg(interpret: Any) -> Any:
    """``interpret`` is passed to ``pallas_call`` as is: False (compile with Mosaic), True (generic
    interpreter) or a ``pltpu.InterpretParams`` (TPU interpret mode, e.g. with race detection)."""
    if interpret is None:
        return False
    return interpret


def vmem_limit(nbytes: int) -> int:
    """A vmem_limit_bytes for a kernel whose live VMEM is about ``nbytes``."""
    want = int(nbytes * 1.5) + (8 << 20)
    want = max(want, 32 << 20)
    if nbytes > VMEM_CAP_BYTES:
        raise ValueError(
            f"kernel needs ~{nbytes / 2**20:.1f} MiB of VMEM (> {VMEM_CAP_BYTES / 2**20:.0f} MiB cap): "
            "sequence too long for the TPU kernel; use the XLA implementation")
    return min(want, VMEM_CAP_BYTES)


# ----------------------------------------------------------------------------------------------
# Lane packing (XLA side)
# ----------------------------------------------------------------------------------------------
def lane_geometry(h: int, d: int) -> tuple[int, int, int]:
    """(heads per 128-lane group, number of lane groups, padded head count)."""
    log2_exact(d)
    if d > LANES:
        raise NotImplementedError(f"head_dim {d} > {LANES} not supported by the TPU kernels")
    hpg = LANES // d
    lg = -(-h // hpg)
    return hpg, lg, lg * hpg


class LaneGeometry:
    """Mixin for kernel configs with fields ``h`` (heads) and ``d`` (head dim): their lane packing."""

    h: int
    d: int

    @property
    def geom(self) -> tuple[int, int, int]:
        return lane_geometry(self.h, self.d)

    @property
    def lg(self) -> int:
        """Number of 128-lane groups."""
        return self.geom[1]

    @property
    def h_pad(self) -> int:
        """Head count padded to whole lane groups."""
        return self.geom[2]


def pack_heads(x: jax.Array, h_pad: int, n_pad: int) -> jax.Array:
    """[B, N, H, d] -> [B, n_pad, h_pad*d] (zero padded heads and rows)."""
    b, n, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, h_pad - h), (0, 0)))
    return x.reshape(b, n_pad, h_pad * d)


def expand_kv(x: jax.Array, h: int, h_pad: int, n_pad: int) -> jax.Array:
    """[B, N, Hk, d] -> [B, n_pad, h_pad*d]: kv head repeated over its GQA group (head g -> g // G)."""
    hk = x.shape[2]
    x = jnp.repeat(x, h // hk, axis=2)
    return pack_heads(x, h_pad, n_pad)


def unpack_heads(x: jax.Array, n: int, h: int, d: int) -> jax.Array:
    """[B, n_pad, h_pad*d] -> [B, n, h, d]."""
    b, n_pad, lw = x.shape
    return x.reshape(b, n_pad, lw // d, d)[:, :n, :h]


def reduce_kv_grad(dx: jax.Array, n: int, h: int, hk: int, d: int) -> jax.Array:
    """Gradient of ``expand_kv``: [B, n_pad, h_pad*d] -> [B, n, Hk, d] (sum over the GQA group)."""
    b = dx.shape[0]
    dx = unpack_heads(dx, n, h, d)
    return dx.reshape(b, n, hk, h // hk, d).sum(axis=3)


def compact_stat(x: jax.Array, n: int, h: int, d: int) -> jax.Array:
    """A lane-dense per-head statistic [B, n_pad, h_pad*d] (constant over each head's d lanes) ->
    [B, n, h] (one lane per head)."""
    return unpack_heads(x, n, h, d)[..., 0]


def expand_stat(x: jax.Array, h_pad: int, n_pad: int, d: int) -> jax.Array:
    """[B, n, h] float32 -> lane-dense [B, n_pad, h_pad*d] (each head's value on its d lanes)."""
    b, n, h = x.shape
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, h_pad - h)))
    return jnp.repeat(x, d, axis=2)


def pack_bits(bits: jax.Array) -> jax.Array:
    """bool [..., K] -> int32 [..., ceil(K/32)] (bit k of word k // 32 is bits[..., k])."""
    k = bits.shape[-1]
    nw = -(-k // 32)
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, nw * 32 - k)])
    bits = bits.reshape(bits.shape[:-1] + (nw, 32)).astype(jnp.uint32)
    words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(words, jnp.int32)


# ----------------------------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------------------------
def seg_matrix(d: int) -> jax.Array:
    """Block-diagonal 0/1 [128, 128] float32: lanes of the same head."""
    s = log2_exact(d)
    r = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 0)
    c = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 1)
    return (lax.shift_right_logical(r, s) == lax.shift_right_logical(c, s)).astype(jnp.float32)


def seg_sum(x: jax.Array, bd: jax.Array) -> jax.Array:
    """Per-head lane sum of a float32 [R, 128] array, broadcast back over each head's lanes."""
    return lax.dot_general(x, bd, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def bit_of(words: jax.Array, k: int) -> jax.Array:
    """words int32 [R, nw] (a loaded ref) -> bool [R, 1]: bit k."""
    w, b = divmod(k, 32)
    col = words[:, w:w + 1]
    return (lax.shift_right_logical(col, jnp.int32(b)) & 1) != 0


def scale_of(d: int) -> float:
    return 1.0 / math.sqrt(d)
