"""The public pure function: BlossomRec attention with an ``impl=`` switch."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from blossom_jax.config import IMPLEMENTATIONS, AttentionConfig
from blossom_jax.ops import common, reference, xla

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)


def _check_inputs(q, k, v, gates, compress_params, valid, config: AttentionConfig,
                  rows_only: bool = False) -> None:
    """ValueError on any shape/dtype mismatch. ``rows_only``: q and gates hold Q query rows, k/v all N."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, {'Q' if rows_only else 'N'}, H, d], got shape {q.shape}")
    batch, rows, num_heads, head_dim = q.shape
    if rows_only and k.ndim != 4:
        raise ValueError(f"k must be [B, N, Hk, d], got shape {k.shape}")
    seq_len = k.shape[1] if rows_only else rows
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if num_heads != config.num_heads or head_dim != config.head_dim:
        raise ValueError(
            f"q has {num_heads} heads of dim {head_dim} but the config says num_heads="
            f"{config.num_heads}, head_dim={config.head_dim}")
    kv_shape = (batch, seq_len, config.num_kv_heads, head_dim)
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != kv_shape:
            raise ValueError(f"{name} must have shape {kv_shape} (B, N, num_kv_heads, d), got {x.shape}")
    for name, x in (("q", q), ("k", k), ("v", v), ("gates", gates)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(gates.shape) != (batch, rows, num_heads, 2):
        raise ValueError(
            f"gates must be [B, {'Q' if rows_only else 'N'}, H, 2] = {(batch, rows, num_heads, 2)} (LTIS, "
            f"STIS weight per head), got {gates.shape}")
    if valid is not None:
        if tuple(valid.shape) != (batch, seq_len):
            raise ValueError(f"valid must be [B, N] = {(batch, seq_len)}, got {valid.shape}")
        if valid.dtype != jnp.bool_:
            raise ValueError(f"valid must be a bool array, got {valid.dtype}")
    expected = common.compress_param_shapes(config)
    missing = sorted(set(expected) - set(compress_params))
    if missing:
        raise ValueError(f"compress_params is missing {missing}; expected keys {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(compress_params[name].shape) != shape:
            raise ValueError(
                f"compress_params[{name!r}] must have shape {shape}, got {compress_params[name].shape}")


def resolve_impl(impl: str, seq_len: int, config: AttentionConfig) -> str:
    """The implementation ``impl="auto"`` runs for this backend and length.

    "auto" picks "pallas" on GPU/TPU where the kernels are available (see
    ``blossom_jax.ops.pallas.available``), else "xla". The dense "reference" is never picked.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    from blossom_jax.ops import pallas  # local: keeps the kernels out of CPU-only imports

    backend = pallas.current_backend()
    if pallas.available(backend) and pallas.auto_prefers_pallas(backend, seq_len, config):
        return "pallas"
    return "xla"


def blossom_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    compress_params: Mapping[str, jax.Array],
    *,
    valid: jax.Array | None = None,
    causal: bool | None = None,
    config: AttentionConfig = AttentionConfig(),
    impl: str = "auto",
) -> jax.Array:
    """BlossomRec attention (SPEC sections 3-5): gated sum of LTIS and STIS attention per head.

    Args:
      q: rotated queries [B, N, H, d] (float32 or bfloat16).
      k: rotated keys [B, N, Hk, d]; query head h uses kv head h // (H // Hk).
      v: values [B, N, Hk, d].
      gates: sigmoid gate values [B, N, H, 2]; [..., 0] weights LTIS, [..., 1] weights STIS.
      compress_params: the LTIS key-compression parameters: ``intrablock_positions`` [Hk, l, d],
        ``w1`` [l*d, l*d], ``b1`` [l*d], ``w2`` [l*d, d], ``b2`` [d] (weights [in, out]).
      valid: optional bool [B, N] (True = real item); rows are expected right-padded. Default all valid.
      causal: overrides ``config.causal`` when given.
      config: the attention knobs; its head counts must match the arrays.
      impl: "auto" | "reference" (dense masks, N <= 4096) | "xla" (sparse gathers) | "pallas" (kernels).
    Returns:
      [B, N, H, d] in q's dtype; 0 at invalid query positions. Softmax and accumulation in float32.

    Called outside ``jax.jit``, the chosen implementation still runs as one compiled program (one
    compilation per shape and config); the inputs are checked before it.
    """
    if causal is not None and causal != config.causal:
        config = config.replace(causal=causal)
    _check_inputs(q, k, v, gates, compress_params, valid, config)
    if valid is None:
        valid = jnp.ones(q.shape[:2], jnp.bool_)
    args = (q, k, v, gates, compress_params, valid)
    return _eager_as_one_program(_blossom_attention_impl, args, config=config,
                                 impl=resolve_impl(impl, q.shape[1], config))


def _eager_as_one_program(fn, args, **static):
    """``fn(*args, **static)``; called eagerly (a notebook, a script without jit), as one jitted program
    instead of op by op (hundreds of small compilations: most of a minute on a CPU for the README's example).
    Under a caller's trace ``fn`` runs inline as before, so the caller's program is unchanged and module-level
    kernel settings changed between traces (benchmark variants, tests) take effect. Eager calls are cached per
    shape and config: after changing such a setting, ``jax.clear_caches()`` before the next eager call."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
        return fn(*args, **static)
    return _JITTED[fn](*args, **static)


def _blossom_attention_impl(q, k, v, gates, compress_params, valid, *, config: AttentionConfig, impl: str):
    args = (q, k, v, gates, compress_params, valid, config)
    if impl == "reference":
        return reference.blossom_attention_reference(*args)
    if impl == "xla":
        return xla.blossom_attention_xla(*args)
    from blossom_jax.ops import pallas

    return pallas.blossom_attention_pallas(*args)


def blossom_attention_rows(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    compress_params: Mapping[str, jax.Array],
    *,
    query_positions: jax.Array,
    valid: jax.Array | None = None,
    causal: bool | None = None,
    config: AttentionConfig = AttentionConfig(),
) -> jax.Array:
    """BlossomRec attention for a few query positions per row (e.g. the last item, whose output becomes the
    user vector), against the keys and values of every position.

    Equal to ``blossom_attention(...)[b, query_positions[b, j]]`` computed over full queries, at a cost of
    O(Q * (n * b + b + |STIS|)) keys per row: no kernel over all N queries runs. Plain XLA on every
    backend (the work is a few small gathers).

    Args:
      q: rotated queries [B, Q, H, d] at ``query_positions``.
      k, v: rotated keys and values [B, N, Hk, d] of every position.
      gates: sigmoid gate values [B, Q, H, 2] of the query rows.
      compress_params: as ``blossom_attention``.
      query_positions: int [B, Q], each in 0..N-1.
      valid: optional bool [B, N] (True = real item), right-padded. Default all valid.
      causal: overrides ``config.causal`` when given.
      config: the attention knobs.
    Returns:
      [B, Q, H, d] in q's dtype; 0 where the query position is not valid. Compiled as one program when
      called eagerly, as ``blossom_attention``.
    """
    if causal is not None and causal != config.causal:
        config = config.replace(causal=causal)
    _check_inputs(q, k, v, gates, compress_params, valid, config, rows_only=True)
    if tuple(query_positions.shape) != q.shape[:2]:
        raise ValueError(f"query_positions must be [B, Q] = {q.shape[:2]}, got {query_positions.shape}")
    if not jnp.issubdtype(query_positions.dtype, jnp.integer):
        raise ValueError(f"query_positions must be integers, got {query_positions.dtype}")
    try:  # concrete positions (an eager call, or a constant under jit) are checked; traced ones cannot be
        concrete = np.asarray(query_positions)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None and concrete.size:
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= k.shape[1]:
            raise ValueError(f"query_positions must lie in [0, {k.shape[1] - 1}], got values in [{low}, {high}]")
    if valid is None:
        valid = jnp.ones(k.shape[:2], jnp.bool_)
    args = (q, k, v, gates, compress_params, valid, query_positions.astype(jnp.int32))
    return _eager_as_one_program(_blossom_attention_rows_impl, args, config=config)


def _blossom_attention_rows_impl(q, k, v, gates, compress_params, valid, query_positions, *,
                                 config: AttentionConfig):
    return xla.blossom_attention_rows_xla(q, k, v, gates, compress_params, valid, query_positions, config)


_JITTED = {_blossom_attention_impl: jax.jit(_blossom_attention_impl, static_argnames=("config", "impl")),
           _blossom_attention_rows_impl: jax.jit(_blossom_attention_rows_impl, static_argnames=("config",))}
