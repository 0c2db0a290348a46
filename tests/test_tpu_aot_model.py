"""Ahead-of-time compilation, for TPU topologies, of a whole training step of the recommender with
``impl="pallas"`` (Mosaic kernels): catches layout and VMEM errors that interpret mode cannot.

Needs libtpu (``pip install -e ".[test,tpu]"``, as CI does); skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import optax
import pytest

from blossom_jax import AttentionConfig, ModelConfig
from blossom_jax.models import SequentialRecommender
from blossom_jax.ops import pallas as pallas_ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]')")


def _topology_device(name: str):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(name, "tpu").devices[0]
    except Exception as error:  # noqa: BLE001 - older libtpu may not know the generation
        if "lockfile" in str(error):  # a setup error, not a missing TPU generation
            raise
        pytest.skip(f"libtpu cannot describe topology {name}: {error}")


def _train_step(model: SequentialRecommender, optimizer: optax.GradientTransformation):
    def loss_fn(params, item_seq, item_seq_len, targets, key):
        users = model.apply({"params": params}, item_seq, item_seq_len, deterministic=False,
                            rngs={"dropout": key})
        logits = model.apply({"params": params}, users, method="item_logits")
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(params, opt_state, item_seq, item_seq_len, targets, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, item_seq, item_seq_len, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# The training configuration (causal, bfloat16, N = 200 as for ML-1M) on one generation: the compile of the whole
# step grows with N (about 24 s at N = 200, 60 s at 512 on one core), and tests/test_pallas_tpu.py compiles the
# kernels themselves, multi-tile at N = 1,024, for v5e and v6e, causal and bidirectional.
@pytest.mark.slow
@pytest.mark.parametrize("topology,causal,dtype", [("v5e:2x2", True, "bfloat16")])
def test_model_train_step_compiles_for_tpu(topology, causal, dtype):
    device = _topology_device(topology)
    sharding = jax.sharding.SingleDeviceSharding(device)
    config = ModelConfig(num_items=3706, max_len=200, causal=causal, attention_impl="pallas",
                         compute_dtype=dtype, attn=AttentionConfig())
    model = SequentialRecommender(config)
    optimizer = optax.adam(1e-3)
    batch = 8
    seq = jax.ShapeDtypeStruct((batch, config.max_len), jnp.int32, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    targets = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding)
    with pallas_ops.target_backend("tpu"):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, config.max_len), jnp.int32),
                                                   jnp.ones((1,), jnp.int32))["params"])
        opt_state = jax.eval_shape(optimizer.init, params)
        on_device = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
        traced = jax.jit(_train_step(model, optimizer)).trace(
            on_device(params), on_device(opt_state), seq, lengths, targets, key)
        lowered = traced.lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert "tpu_custom_call" in text, "the Mosaic kernels are not in the lowered step"
    lowered.compile()
