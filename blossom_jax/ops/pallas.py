"""``impl="pallas"``: BlossomRec attention on the Pallas kernels of ``pallas_kernels``.

One kernel API, one module per backend: ``pallas_kernels.{stis,ltis}_gpu`` (Pallas Triton lowering) and
``pallas_kernels.{stis,ltis}_tpu`` (Mosaic TPU). Per call:
  1. XLA: key compression MLP (dense matmuls) and the GQA mean query (SPEC 3.1-3.3);
  2. kernel: fused compressed scoring + running top-n selection (no gradient, as the reference);
  3. kernel: LTIS attention over the kept blocks + own block (custom_vjp, flash-style backward);
  4. kernel: STIS power-pattern attention (custom_vjp; its backward is a gather by inverse offsets);
     on GPU, for N <= ``fused_gpu.max_len(causal)`` (256 causal, 200 bidirectional), 3 and 4 are one
     kernel over dense key tiles that evaluates both key sets as masks of one score tile
     (``pallas_kernels.fused_gpu``);
  5. XLA: the gate mix. On GPU from ``gated_gpu.MIN_LEN`` (8192) positions, causal attention runs 3, 4 and 5
     as one kernel set (``pallas_kernels.gated_gpu``: forward, dQ, dK/dV; measured even with the separate
     kernels up to 4k and 10 % less device time at 32k).
With ``straight_through=True`` the LTIS part runs on the xla path (it needs the selection probabilities'
gradient, which the kernels do not produce); STIS still uses its kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp

from blossom_jax.config import AttentionConfig
from blossom_jax.ops import common
from blossom_jax.ops import xla as xla_ops

#: Shortest sequence length at which ``impl="auto"`` takes the GPU kernels. On an H100/H200 the kernels
#: beat the xla path at every length measured (N = 50 in a whole training step: 15.2 vs 28.8 ms; layer
#: fwd+bwd at N = 256: 2.1 vs 6.3 ms; see benchmarks/results/), so auto takes them from N = 1 on.
GPU_AUTO_MIN_LEN = 1

_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("blossom_pallas_target",
                                                                            default=None)


@contextlib.contextmanager
def target_backend(backend: str) -> Iterator[None]:
    """Trace ``impl="pallas"`` for ``backend`` ("gpu" or "tpu") whatever the host runs: for ahead-of-time
    compilation (e.g. ``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` on a CPU machine)."""
    if backend not in ("gpu", "tpu"):
        raise ValueError(f'target backend must be "gpu" or "tpu", got {backend!r}')
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def current_backend() -> str:
    """The backend ``impl="pallas"`` traces for: the ``target_backend`` override, else jax's default."""
    return _TARGET_BACKEND.get() or jax.default_backend()


@functools.cache
def _kernels(backend: str) -> types.SimpleNamespace:
    if backend == "gpu":
        from pallas_kernels import fused_gpu, gated_gpu, ltis_gpu, stis_gpu

        return types.SimpleNamespace(select=ltis_gpu.select_blocks_gpu, ltis=ltis_gpu.ltis_attention_gpu,
                                     stis=stis_gpu.stis_attention_gpu, fused=fused_gpu.fused_attention_gpu,
                                     fused_module=fused_gpu, gated=gated_gpu.gated_attention_gpu,
                                     gated_module=gated_gpu)
    if backend == "tpu":
        from pallas_kernels import ltis_tpu, stis_tpu

        return types.SimpleNamespace(select=ltis_tpu.select_blocks_tpu, ltis=ltis_tpu.ltis_attention_tpu,
                                     stis=stis_tpu.stis_attention_tpu, fused=None, fused_module=None,
                                     gated=None, gated_module=None)
    raise ValueError(f'impl="pallas" has kernels for "gpu" and "tpu", not for backend {backend!r}; '
                     'use impl="xla" (or "auto")')


def available(backend: str) -> bool:
    """Whether Pallas kernels exist and import for this backend."""
    try:
        _kernels(backend)
    except (ValueError, ImportError):
        return False
    return True


def auto_prefers_pallas(backend: str, seq_len: int, config: AttentionConfig) -> bool:
    """What ``impl="auto"`` picks: the GPU kernels from GPU_AUTO_MIN_LEN on; on TPU the xla path, since
    the TPU kernels are verified (interpret mode, AOT compile) but not yet measured on hardware."""
    return backend == "gpu" and seq_len >= GPU_AUTO_MIN_LEN


def _selection(kernels, q, compressed, valid, config, interpret):
    """(selected, kept) [B, N, Hk, n'] from the selection kernel; a single unkept slot when Nc = 0."""
    batch, seq_len, _, head_dim = q.shape
    kv_heads, group = config.num_kv_heads, config.group_size
    if compressed.shape[2] == 0:  # N < s: only the own block (causal) or nothing (bidirectional)
        selected = jnp.zeros((batch, seq_len, kv_heads, 1), jnp.int32)
        return selected, selected.astype(jnp.bool_)
    mean_query = q.astype(jnp.float32).reshape(batch, seq_len, kv_heads, group, head_dim).mean(3)
    return kernels.select(
        jax.lax.stop_gradient(mean_query), jax.lax.stop_gradient(compressed),
        common.block_validity(valid, config), causal=config.causal, num_selected=config.num_selected,
        block_size=config.selection_block, keep_threshold=config.keep_threshold, scale=1.0 / head_dim ** 0.5,
        interpret=interpret)


def uses_fused_kernel(backend: str, seq_len: int, config: AttentionConfig) -> bool:
    """Whether LTIS and STIS run as one dense-tile kernel (``pallas_kernels.fused_gpu``): on GPU up to
    ``FUSED_MAX_LEN`` positions (causal; ``FUSED_MAX_LEN_BIDIRECTIONAL`` otherwise), unless the
    straight-through option needs the xla LTIS path."""
    kernels = _kernels(backend)
    return (kernels.fused is not None and seq_len <= kernels.fused_module.max_len(config.causal)
            and not config.straight_through)


def uses_gated_kernels(backend: str, seq_len: int, config: AttentionConfig) -> bool:
    """Whether LTIS, STIS and the gate mix run as one kernel set (``pallas_kernels.gated_gpu``): on GPU beyond
    the fused kernel's range, for causal attention with a power-of-two GQA group, from ``gated_gpu.MIN_LEN``
    on, unless the straight-through option needs the xla LTIS path."""
    kernels = _kernels(backend)
    return (kernels.gated is not None and not uses_fused_kernel(backend, seq_len, config)
            and seq_len >= kernels.gated_module.MIN_LEN and not config.straight_through
            and kernels.gated_module.supports(causal=config.causal, num_heads=config.num_heads,
                                              num_kv_heads=config.num_kv_heads))


def blossom_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
                             compress_params: Mapping[str, jax.Array], valid: jax.Array,
                             config: AttentionConfig, *, backend: str | None = None,
                             interpret: Any = False) -> jax.Array:
    """Kernel-backed BlossomRec attention. Shapes as ``blossom_jax.blossom_attention``.

    Args:
      backend: "gpu" | "tpu"; default the running backend.
      interpret: run the kernels in the Pallas interpreter (``True``, or ``pltpu.InterpretParams`` for
        TPU) so that they execute on the CPU; for tests.
    """
    backend = backend or current_backend()
    kernels = _kernels(backend)
    batch, seq_len, num_heads, head_dim = q.shape
    kv_heads, group = config.num_kv_heads, config.group_size
    if config.causal:
        q, k, v = (jnp.where(valid[:, :, None, None], x, 0) for x in (q, k, v))
    compressed = common.compress_keys(k, compress_params, config)
    if uses_gated_kernels(backend, seq_len, config):
        selected, kept = _selection(kernels, q, compressed, valid, config, interpret)
        return kernels.gated(q, k, v, gates, valid, selected, kept, block_size=config.selection_block,
                             window=config.window, mask_padded_block_keys=config.mask_padded_block_keys,
                             interpret=interpret)
    if uses_fused_kernel(backend, seq_len, config):
        selected, kept = _selection(kernels, q, compressed, valid, config, interpret)
        o_ltis, o_stis = kernels.fused(
            q, k, v, valid, selected, kept, causal=config.causal, block_size=config.selection_block,
            window=config.window, sink=config.sink, mask_padded_block_keys=config.mask_padded_block_keys,
            interpret=interpret)
    else:
        if config.straight_through and compressed.shape[2] > 0:
            qf = q.astype(jnp.float32).reshape(batch, seq_len, kv_heads, group, head_dim)
            o_ltis = xla_ops.ltis_attention(qf, k.astype(jnp.float32), v.astype(jnp.float32), valid,
                                            compressed, config).reshape(batch, seq_len, num_heads, head_dim)
        else:
            selected, kept = _selection(kernels, q, compressed, valid, config, interpret)
            o_ltis = kernels.ltis(q, k, v, valid, selected, kept, causal=config.causal,
                                  block_size=config.selection_block,
                                  mask_padded_block_keys=config.mask_padded_block_keys, interpret=interpret)
        o_stis = kernels.stis(q, k, v, valid, causal=config.causal, window=config.window, sink=config.sink,
                              interpret=interpret)
    return common.gate_mix(o_ltis, o_stis, gates, valid).astype(q.dtype)
