"""The sparse XLA implementation against the dense-mask oracle: outputs and all gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, blossom_attention
from blossom_jax.ops import xla as xla_ops
from blossom_jax.ops.common import compress_param_shapes
from conftest import random_attention_inputs

F32_TOL = dict(atol=2e-5, rtol=2e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _loss_and_grads(impl, config, inputs, cotangent):
    q, k, v, gates, params, valid = inputs

    def loss(q, k, v, gates, params):
        out = blossom_attention(q, k, v, gates, params, valid=valid, config=config, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        q, k, v, gates, params)
    return out, grads


def assert_matches_reference(config, batch, seq_len, *, dtype=jnp.float32, seed=0):
    inputs = random_attention_inputs(config, batch, seq_len, seed=seed, dtype=dtype)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).normal(size=inputs[0].shape), jnp.float32)
    out_ref, grads_ref = _loss_and_grads("reference", config, inputs, cotangent)
    out_xla, grads_xla = _loss_and_grads("xla", config, inputs, cotangent)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert out_xla.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out_xla.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out_xla, np.float32), np.asarray(out_ref, np.float32), **tol)
    valid = np.asarray(inputs[5])
    assert np.all(np.asarray(out_xla, np.float32)[~valid] == 0.0), "padded queries must output exactly 0"
    flat_ref, _ = jax.tree.flatten(grads_ref)
    flat_xla, _ = jax.tree.flatten(grads_xla)
    for g_ref, g_xla in zip(flat_ref, flat_xla):
        assert bool(jnp.all(jnp.isfinite(g_xla.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g_xla, np.float32), np.asarray(g_ref, np.float32), **tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 50, 200, 257])
def test_xla_matches_reference_lengths(causal, seq_len):
    # query_chunk 64 makes N >= 65 run through several lax.map chunks.
    config = AttentionConfig(causal=causal, query_chunk=64)
    assert_matches_reference(config, batch=3, seq_len=seq_len, seed=seq_len)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_xla_matches_reference_gqa_groups(causal, num_heads, num_kv_heads):
    config = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal)
    assert_matches_reference(config, batch=2, seq_len=70, seed=num_heads * 10 + num_kv_heads)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [17, 100])
def test_xla_matches_reference_bfloat16(causal, seq_len):
    config = AttentionConfig(causal=causal)
    assert_matches_reference(config, batch=2, seq_len=seq_len, dtype=jnp.bfloat16, seed=7)


@pytest.mark.parametrize("causal", [True, False])
def test_straight_through_gradients(causal):
    config = AttentionConfig(causal=causal, straight_through=True, query_chunk=32)
    assert_matches_reference(config, batch=2, seq_len=90, seed=3)
    # The option must actually give the compression parameters a gradient.
    inputs = random_attention_inputs(config, 2, 90, seed=3)
    cotangent = jnp.ones(inputs[0].shape, jnp.float32)
    _, grads = _loss_and_grads("xla", config, inputs, cotangent)
    assert float(jnp.abs(grads[4]["w1"]).sum()) > 0
    _, default_grads = _loss_and_grads("xla", config.replace(straight_through=False), inputs, cotangent)
    assert float(jnp.abs(default_grads[4]["w1"]).sum()) == 0.0


def test_mask_padded_block_keys_option():
    config = AttentionConfig(causal=False, mask_padded_block_keys=True)
    assert_matches_reference(config, batch=3, seq_len=60, seed=11)
    # Off by default: in bidirectional mode the padded keys of a kept block do change the output.
    inputs = random_attention_inputs(config, 3, 60, seed=11)
    on = blossom_attention(*inputs[:5], valid=inputs[5], config=config, impl="xla")
    off = blossom_attention(*inputs[:5], valid=inputs[5], config=config.replace(mask_padded_block_keys=False),
                            impl="xla")
    assert not np.allclose(np.asarray(on), np.asarray(off))


def test_few_visible_blocks_and_small_selection():
    # n larger than the number of visible blocks, and n = 1.
    for num_selected in (1, 7):
        config = AttentionConfig(num_selected=num_selected)
        assert_matches_reference(config, batch=2, seq_len=40, seed=num_selected)


def test_causal_nan_padding_does_not_leak():
    config = AttentionConfig(causal=True, query_chunk=32)
    inputs = random_attention_inputs(config, 3, 75, seed=5, poison_padding=True)
    cotangent = jnp.where(inputs[5][:, :, None, None], 1.0, 0.0) * jnp.ones(inputs[0].shape)
    out, grads = _loss_and_grads("xla", config, inputs, cotangent)
    valid = np.asarray(inputs[5])
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.asarray(out)[~valid] == 0.0)
    for grad in grads[:4]:
        assert np.all(np.isfinite(np.asarray(grad)[valid]))
    clean = random_attention_inputs(config, 3, 75, seed=5)
    out_clean = blossom_attention(*clean[:5], valid=clean[5], config=config, impl="xla")
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(out_clean)[valid], **F32_TOL)


@pytest.mark.parametrize("dtypes", [(jnp.float32,) * 3, (jnp.bfloat16,) * 3, (jnp.float32, jnp.bfloat16, jnp.bfloat16)])
def test_gate_mix_vjp_matches_autodiff(dtypes):
    """The gate mix's written-out VJP against autodiff of the same expression: bitwise, padding rows included."""
    from blossom_jax.ops import common

    rng = np.random.default_rng(3)
    shape = (2, 9, 4, 16)
    o_ltis, o_stis = (jnp.asarray(rng.normal(size=shape), dt) for dt in dtypes[:2])
    gates = jax.nn.sigmoid(jnp.asarray(rng.normal(size=shape[:3] + (2,)), jnp.float32)).astype(dtypes[2])
    valid = jnp.asarray(rng.random(shape[:2]) < 0.7)
    d_out = jnp.asarray(rng.normal(size=shape), jnp.result_type(*dtypes[:2]))

    def autodiff(o_l, o_s, g):
        g = g.astype(jnp.float32)
        out = g[..., 0:1] * o_l.astype(jnp.float32) + g[..., 1:2] * o_s.astype(jnp.float32)
        return jnp.where(valid[:, :, None, None], out, 0.0).astype(jnp.result_type(o_l, o_s))

    out, vjp = jax.vjp(lambda *a: common.gate_mix(*a, valid), o_ltis, o_stis, gates)
    want_out, want_vjp = jax.vjp(autodiff, o_ltis, o_stis, gates)
    assert out.dtype == want_out.dtype and bool(jnp.array_equal(out, want_out))
    for got, want in zip(vjp(d_out), want_vjp(d_out)):
        assert got.dtype == want.dtype and bool(jnp.array_equal(got, want))
    assert np.all(np.asarray(out, np.float32)[~np.asarray(valid)] == 0.0)


def test_stis_offsets():
    causal = AttentionConfig()
    assert xla_ops.stis_offsets(100, causal) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    assert xla_ops.stis_offsets(5, causal) == [0, 1, 2, 3, 4]
    bidirectional = causal.replace(causal=False)
    assert xla_ops.stis_offsets(20, bidirectional) == list(range(-7, 8)) + [8, 16]


def _compiled_temp_bytes(fn, seq_len, config):
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    params = {name: spec(*shape) for name, shape in compress_param_shapes(config).items()}
    args = (spec(1, seq_len, 8, 16), spec(1, seq_len, 2, 16), spec(1, seq_len, 2, 16), spec(1, seq_len, 8, 2),
            params)
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_xla_memory_is_linear_in_sequence_length():
    config = AttentionConfig()

    def forward(q, k, v, gates, params):
        return blossom_attention(q, k, v, gates, params, config=config, impl="xla")

    backward = jax.grad(lambda *args: jnp.sum(forward(*args)), argnums=(0, 1, 2, 3))
    for fn in (forward, backward):
        big = _compiled_temp_bytes(fn, 16384, config)
        half = _compiled_temp_bytes(fn, 8192, config)
        # N^2 float32 scores at N = 16384 would be 1 GiB; we stay under an eighth of that...
        assert big < 16384 ** 2 * 4 / 5, f"temporary memory {big / 2**20:.0f} MiB is not far below N^2"
        # ... and doubling N roughly doubles it (quadratic growth would give 4x).
        assert big / half < 2.6, f"temp memory grew {big / half:.2f}x from N = 8192 to 16384"
