"""Pallas kernels for BlossomRec attention (GPU: Triton lowering; TPU: Mosaic), each beside its pure-jnp
reference and wrapped in a ``jax.custom_vjp``.

Import the per-backend modules directly; this package ``__init__`` stays import-light.
"""
