"""Implementations of BlossomRec attention behind ``blossom_jax.blossom_attention(impl=...)``."""
