"""Helpers shared by the Pallas GPU (Triton lowering) kernels: compiler params, integer helpers, the float32
dot precision, head-dim padding and the packed-row bookkeeping of (query, head) rows.

Every array a Triton kernel touches must have a power-of-two number of elements and every matmul operand
dimension must be >= 16; the kernel wrappers round up with these helpers and mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl  # noqa: F401  (re-exported for kernels)
from jax.experimental.pallas import triton as plgpu

TRITON_CUSTOM_CALL_TARGET = "__gpu$xla.gpu.triton"
NUM_STAGES = 2
LOG2E = math.log2(math.e)

# ``CompilerParams`` in current jax, ``TritonCompilerParams`` in older ones. Passing them explicitly also
# keeps jax 0.10.x from routing a GPU pallas_call to Mosaic GPU.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(num_warps: int, num_stages: int = NUM_STAGES):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def floor_pow2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def idiv(x, c: int):
    """Truncating integer division of a non-negative traced int32 by a static int (lowers to one op)."""
    return lax.div(x, jnp.full_like(x, c))


def irem(x, c: int):
    return lax.rem(x, jnp.full_like(x, c))


_IEEE_SETTINGS = ("highest", "float32", "f32_f32_f32")  # jax_default_matmul_precision takes names only


def float32_products_exact() -> bool:
    """Whether float32 attention dots use IEEE products: only when ``jax_default_matmul_precision`` asks for
    "highest"/"float32" at trace time. Otherwise they follow JAX's default on GPUs, TF32 tensor-core products
    (~1e-3 relative error), like every float32 XLA dot of the same model (projections, FFN)."""
    setting = jax.config.jax_default_matmul_precision
    return setting is not None and str(setting).lower() in _IEEE_SETTINGS


def selection_score_precision(interpret: bool):
    """Precision of the block-selection scores' float32 products, which decide the top-n and so must agree
    with the float32 reference's choice.

    Compiled for a GPU: TF32x3 (``lax.DotAlgorithmPreset.TF32_TF32_F32_X3``, three TF32 tensor-core passes,
    float32-level accuracy): measured 1.7-1.9x faster than Triton's IEEE dot (which runs on the FMA units) for
    the earlier tile selection kernel at N = 4k-64k (H200, benchmarks/results/gpu_call15_2026-11-27), and 0.58
    against 0.84 ms at N = 32k for the current one (H100, gpu_call33_2026-11-27), with the same kept sets as
    IEEE on every (query, kv head) of N = 1k-64k random inputs. One TF32 pass (the GPU default) is faster
    still but changes ~0.05 % of the kept sets, so it is not used.
    IEEE under ``jax_default_matmul_precision("highest")`` (see ``float32_products_exact``) and in the
    interpreter (the CPU has no TF32 algorithms)."""
    if interpret or float32_products_exact():
        return lax.Precision.HIGHEST
    return lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def dot(a, b, trans_a: bool = False, trans_b: bool = False, precision=None):
    """2-D matmul with float32 accumulation.

    ``precision`` (a ``lax.Precision`` or ``lax.DotAlgorithmPreset``) when given, e.g.
    :func:`selection_score_precision`; otherwise float32 operands get IEEE products when
    ``float32_products_exact()`` and the GPU default, TF32 (~1e-3 relative error), else.
    """
    if precision is None and a.dtype == jnp.float32 and b.dtype == jnp.float32 and float32_products_exact():
        precision = lax.Precision.HIGHEST
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def padded_head_dim(d: int) -> int:
    return max(16, next_pow2(d))


def pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def pad_head_dim(q: jax.Array, k: jax.Array, v: jax.Array):
    """Zero-pads d to ``padded_head_dim(d)``. Zero features change no dot product; the softmax scale must
    stay 1/sqrt(d), so the ratio is folded into q. Returns (q, k, v, d, padded d)."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    if dp != d:
        q = pad_last(q * jnp.asarray(math.sqrt(dp / d), q.dtype), dp)
        k, v = pad_last(k, dp), pad_last(v, dp)
    return q, k, v, d, dp


def check_attention_shapes(q, k, v, selected_blocks, kept) -> None:
    """ValueError unless q [B, N, H, d], k = v [B, N, Hk, d] with Hk | H, selected/kept [B, N, Hk, n]."""
    bsz, n, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (bsz, n) or k.shape[3] != d:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
    hk = k.shape[2]
    if h % hk:
        raise ValueError(f"num heads {h} is not a multiple of kv heads {hk}")
    if selected_blocks.shape[:3] != (bsz, n, hk) or kept.shape != selected_blocks.shape:
        raise ValueError(f"selected_blocks {selected_blocks.shape} / kept {kept.shape} mismatch")
    check_grid_batch(bsz)


# The kernels' grids are (tiles, batch, kv heads): CUDA limits the second and third grid dimensions.
MAX_GRID_BATCH = 65535


def check_grid_batch(batch: int) -> None:
    if batch > MAX_GRID_BATCH:
        raise ValueError(f"batch {batch} exceeds the CUDA grid limit of {MAX_GRID_BATCH} sequences per kernel "
                         "call; split the batch")


def encode_selection(selected_blocks, kept, valid, *, seq_len: int, block_size: int):
    """(sel_enc int32 [B, N, Hk, n]: the block index where kept and in range, else -1; valid int32 [B, N]),
    both without gradient: the kernels' integer inputs."""
    sel = selected_blocks.astype(jnp.int32)
    kept_b = kept.astype(bool) & (sel >= 0) & (sel < seq_len // block_size)
    sel_enc = lax.stop_gradient(jnp.where(kept_b, sel, -1))
    return sel_enc, lax.stop_gradient(valid.astype(jnp.int32))


def load_select(ref_view, mask, other=0.0):
    """``ref_view`` (a ``ref.at[...]`` whose indices are all in range) loaded unpredicated, then ``other`` where
    ``mask`` (broadcastable to the loaded shape) is False, by select (a NaN behind the mask cannot leak).

    A predicated ``plgpu.load(..., mask=mask)`` whose mask comes from another load (validity flags) has to wait
    for that load. This form takes the wait off the chain, but it loads the masked-out rows too. Measured on an
    H100 (layer device profile at N = 1k / 4k / 32k, benchmarks/results/gpu_call43_2026-11-27): it helps the STIS
    dq kernel's per-offset key tiles (small [BQ, d] loads shared by the G heads, latency-bound; -5 %) and hurts
    everywhere the masked-out rows are real traffic or the tile feeds a ``dot``: the STIS dk/dv query tiles
    (+4 %), the LTIS forward / dQ / dK,dV (+30 / +60 / +20 %) and the gated kernels at 32k (+15-70 %). Those
    keep predicated loads."""
    x = plgpu.load(ref_view)
    return jnp.where(mask, x, jnp.asarray(other, x.dtype))


class Rows:
    """Packed-row bookkeeping of a program that owns BQ consecutive queries of one kv group: row
    r = (query q0 + r // G, head r % G), which is the memory order of ``q[b, q0:q0+BQ, h*G:(h+1)*G, :]``.
    ``rp`` (>= 16, a power of two) may exceed BQ * G; the extra rows are out of bounds."""

    def __init__(self, q0, *, bq, rp, g, seq_len, valid_ref):
        r = jnp.arange(rp, dtype=jnp.int32)
        self.j = idiv(r, g)  # local query
        self.g = irem(r, g)
        self.qi = q0 + self.j
        self.in_bounds = (r < bq * g) & (self.qi < seq_len)
        self.qi_c = jnp.where(self.in_bounds, self.qi, 0)
        self.ok = self.in_bounds & (valid_ref[self.qi_c] != 0)

    def load(self, ref, d, other=0.0):
        c = jnp.arange(d, dtype=jnp.int32)[None, :]
        return plgpu.load(ref.at[self.qi_c[:, None], self.g[:, None], c], mask=self.ok[:, None], other=other)

    def load_row(self, ref):
        return plgpu.load(ref.at[self.qi_c, self.g], mask=self.ok, other=0.0)

    # Stores index with the unclamped query: a masked-out row must not alias a real row of the same store
    # (the interpreter discharges a masked scatter as read-select-write; out-of-range writes are dropped).
    def store(self, ref, val):
        d = val.shape[1]
        c = jnp.arange(d, dtype=jnp.int32)[None, :]
        plgpu.store(ref.at[self.qi[:, None], self.g[:, None], c], val, mask=self.in_bounds[:, None])

    def store_row(self, ref, val):
        plgpu.store(ref.at[self.qi, self.g], val, mask=self.in_bounds)
