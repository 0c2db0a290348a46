"""Dispatch of ``impl="pallas"`` to the backend's kernels in ``pallas_kernels``."""

from __future__ import annotations

from typing import Mapping

import jax

from blossom_jax.config import AttentionConfig


def available(backend: str) -> bool:
    """Whether Pallas kernels exist for this backend ("gpu", "tpu"; never "cpu")."""
    return False


def auto_prefers_pallas(backend: str, seq_len: int, config: AttentionConfig) -> bool:
    """Whether ``impl="auto"`` should take the kernels at this length (measured crossover)."""
    return False


def blossom_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
                             compress_params: Mapping[str, jax.Array], valid: jax.Array,
                             config: AttentionConfig) -> jax.Array:
    """Kernel-backed BlossomRec attention. Shapes as ``blossom_jax.blossom_attention``."""
    raise NotImplementedError(
        f'impl="pallas" has no kernels for backend {jax.default_backend()!r} yet; use impl="xla" or "auto"')
