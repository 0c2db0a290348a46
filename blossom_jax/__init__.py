"""blossom-jax: BlossomRec sparse attention for sequential recommendation in JAX.

The package root stays light (jax + numpy only) so that ``blossom_jax.serving`` can be used without
flax or optax. Flax modules live in ``blossom_jax.models``; weight import in ``blossom_jax.interop``.
"""

from blossom_jax.attention import blossom_attention, blossom_attention_rows, resolve_impl
from blossom_jax.config import AttentionConfig, ModelConfig
from blossom_jax.rope import apply_rope, rope_frequencies

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "ModelConfig",
    "apply_rope",
    "blossom_attention",
    "blossom_attention_rows",
    "resolve_impl",
    "rope_frequencies",
    "__version__",
]
