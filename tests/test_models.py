"""Flax modules, RoPE, reference-release conformance and weight import/export."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, ModelConfig, apply_rope
from blossom_jax.interop import load_reference_state_dict, to_reference_state_dict
from blossom_jax.models import SequentialRecommender, embedding_lookup, place_mask_token, split_last_axis
from conftest import jitted_apply, shared_path


@pytest.fixture(autouse=True)
def _float32_products():
    """IEEE float32 products: the float32 comparisons here (1e-5 and tighter) hold on GPUs too, whose float32
    matmuls default to TF32 (on the CPU this changes nothing)."""
    with jax.default_matmul_precision("highest"):
        yield


SMALL = dict(num_items=40, max_len=37, hidden_size=32, inner_size=64, num_layers=2,
             attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16), attention_impl="xla")


def _batch(rng, config, batch=4):
    seq_len = config.max_len
    lengths = rng.integers(1, seq_len + 1, size=batch)
    lengths[0] = seq_len
    lengths[1] = 1
    items = rng.integers(1, config.num_items + 1, size=(batch, seq_len))
    items = np.where(np.arange(seq_len)[None] < lengths[:, None], items, 0)
    return jnp.asarray(items, jnp.int32), jnp.asarray(lengths, jnp.int32)


def _init(config, seed=0):
    model = SequentialRecommender(config)
    seq, lengths = _batch(np.random.default_rng(seed), config)
    return model, jax.jit(model.init)(jax.random.key(seed), seq, lengths), seq, lengths


@pytest.mark.parametrize("per_row_positions", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_matches_formula(per_row_positions, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 300, size=(2, 9)) if per_row_positions else np.broadcast_to(np.arange(9), (2, 9))
    x_in = jnp.asarray(x, dtype)
    out = apply_rope(x_in, positions=jnp.asarray(positions) if per_row_positions else None)
    assert out.dtype == dtype and out.shape == x.shape
    x = np.asarray(x_in, np.float32)
    freqs = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    angle = positions[..., None] * freqs
    cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    out = np.asarray(out, np.float32)
    np.testing.assert_allclose(out[..., 0::2], x[..., 0::2] * cos - x[..., 1::2] * sin, atol=atol)
    np.testing.assert_allclose(out[..., 1::2], x[..., 1::2] * cos + x[..., 0::2] * sin, atol=atol)


@pytest.mark.slow
def test_conformance_with_reference_release():
    data = np.load(shared_path("conformance/reference_full_len64.npz"))
    state = {name[len("param/"):]: data[name] for name in data.files if name.startswith("param/")}
    seq = jnp.asarray(data["item_seq"], jnp.int32)
    lengths = jnp.asarray(data["item_seq_len"], jnp.int32)
    for impl in ("reference", "xla"):
        model, variables = load_reference_state_dict(state, max_len=int(data["max_len"]), attention_impl=impl)
        assert model.config.num_items + 1 == int(data["n_items"])
        for method, want in (("__call__", "seq_output"), ("encode", "hidden"), ("score", "scores")):
            np.testing.assert_allclose(jitted_apply(model, method)(variables, seq, lengths), data[want], atol=1e-4)


@pytest.mark.slow
def test_interop_round_trip_and_errors():
    config = ModelConfig(**SMALL)
    model, variables, seq, lengths = _init(config)
    state = to_reference_state_dict(variables["params"], config)
    state["trm_encoder.layer.0.blossom_attention.sparse_attention.v_compress.1.weight"] = np.zeros((3, 3))
    loaded, loaded_vars = load_reference_state_dict(state, max_len=config.max_len,
                                                    attention_impl="xla", attn={"compress_stride": 16})
    assert loaded.config.attn == config.attn
    np.testing.assert_array_equal(jitted_apply(loaded)(loaded_vars, seq, lengths), jitted_apply(model)(variables, seq, lengths))
    missing = dict(state)
    del missing["trm_encoder.layer.1.feed_forward.dense_2.bias"]
    with pytest.raises(KeyError, match="dense_2.bias"):
        load_reference_state_dict(missing, max_len=config.max_len)
    wrong = dict(state)
    wrong["trm_encoder.layer.0.feed_forward.dense_2.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="dense_2.bias"):
        load_reference_state_dict(wrong, max_len=config.max_len)


def test_initialisation_follows_spec():
    config = ModelConfig(**{**SMALL, "num_items": 3000, "hidden_size": 128,
                            "attn": AttentionConfig()})
    _, variables, _, _ = _init(config)
    params = variables["params"]
    attn = params["layer_0"]["blossom_attention"]
    assert np.all(np.asarray(attn["k_intrablock_positions"]) == 0)
    assert np.all(np.asarray(attn["to_strategy_combine"]["bias"]) == 0)
    assert "bias" not in attn["to_qkv"] and "bias" not in attn["combine_heads"]
    assert np.all(np.asarray(params["layer_0"]["ffn_norm"]["scale"]) == 1)
    embedding = np.asarray(params["item_embedding"]["embedding"])
    assert embedding.shape == (3001, 128)
    assert abs(embedding.std() - 0.02) < 0.002 and abs(embedding[0]).sum() > 0  # padding row too


@pytest.mark.parametrize("attention", ["blossom", "dense"])
def test_causal_prefix_property_and_call(attention):
    config = ModelConfig(**{**SMALL, "attention": attention})
    model, variables, seq, lengths = _init(config)
    encode, call, score = (jitted_apply(model, method) for method in ("encode", "__call__", "score"))
    hidden = encode(variables, seq, lengths)
    users = call(variables, seq, lengths)
    np.testing.assert_allclose(users, hidden[jnp.arange(4), lengths - 1], atol=1e-6)
    # Changing the items after position t leaves positions <= t unchanged (causality).
    t = 20
    changed = seq.at[0, t + 1:].set((seq[0, t + 1:] % config.num_items) + 1)
    hidden_changed = encode(variables, changed, lengths)
    np.testing.assert_allclose(hidden_changed[0, : t + 1], hidden[0, : t + 1], atol=1e-5)
    assert not np.allclose(hidden_changed[0, t + 1:], hidden[0, t + 1:])
    logits = score(variables, seq, lengths)
    assert logits.shape == (4, config.num_items + 1)
    np.testing.assert_allclose(logits, model.apply(variables, users, method="item_logits"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["blossom", "dense"])
@pytest.mark.parametrize("causal", [True, False])
def test_last_layer_rows_equals_full_last_layer(attention, causal):
    """The user vectors, their gradients, and encode(query_positions) agree with the full last layer."""
    config = ModelConfig(**{**SMALL, "attention": attention, "causal": causal, "dropout": 0.0,
                            "attention_dropout": 0.0})
    full = config.replace(last_layer_rows=False)
    model, variables, seq, lengths = _init(config)
    full_model = SequentialRecommender(full)
    targets = jnp.arange(seq.shape[0]) % config.num_items + 1

    def loss(params, m):
        logits = m.apply({"params": params}, seq, lengths, method="score")
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(seq.shape[0]), targets])

    # jitted: one compilation per program instead of one per op (eagerly this test took ~100 s on a CI core)
    np.testing.assert_allclose(jax.jit(model.apply)(variables, seq, lengths),
                               jax.jit(full_model.apply)(variables, seq, lengths), atol=1e-5)
    grads = jax.jit(jax.grad(lambda params: loss(params, model)))(variables["params"])
    full_grads = jax.jit(jax.grad(lambda params: loss(params, full_model)))(variables["params"])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
    positions = jnp.asarray(np.random.default_rng(3).integers(0, config.max_len, size=(seq.shape[0], 5)))
    encode = jitted_apply(model, "encode")
    rows = encode(variables, seq, lengths, query_positions=positions)
    hidden = encode(variables, seq, lengths)
    np.testing.assert_allclose(rows, hidden[jnp.arange(seq.shape[0])[:, None], positions], atol=1e-5)
    # Training mode (dropout, and the dense model's attention-probability dropout) runs on the rows path.
    train = SequentialRecommender(config.replace(dropout=0.2, attention_dropout=0.2))
    users = jitted_apply(train, deterministic=False)(variables, seq, lengths, rngs={"dropout": jax.random.key(0)})
    assert users.shape == (seq.shape[0], config.hidden_size) and bool(jnp.all(jnp.isfinite(users)))


def test_embedding_lookup_gradient_equals_take():
    """The lookup's backward (padding summed apart from the scatter) gives jnp.take's gradient exactly in
    value: repeated ids, padding (id 0), all-padding rows."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
    ids = jnp.asarray([[3, 3, 0, 0], [0, 0, 0, 0], [8, 1, 3, 0]], jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    got_out, got_vjp = jax.vjp(lambda t: embedding_lookup(t, ids), table)
    want_out, want_vjp = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
    np.testing.assert_array_equal(got_out, want_out)
    np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], atol=1e-6)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(embedding_lookup(t, ids) ** 2)))(table)
    np.testing.assert_allclose(grad[0], 2 * table[0] * 7, rtol=1e-6)  # seven padding positions
    np.testing.assert_allclose(grad[3], 2 * table[3] * 3, rtol=1e-6)
    assert float(jnp.abs(grad[2]).sum()) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_last_axis_matches_jnp_split(dtype):
    """The split's concatenating VJP against autodiff of jnp.split, bitwise, including a piece whose cotangent is
    zero because it is unused."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 13)), dtype)
    sizes = (8, 2, 2, 1)
    weights = [jnp.asarray(rng.normal(size=(size,)), dtype) for size in sizes]

    def loss(pieces):
        return sum(jnp.sum(piece * w) for piece, w in zip(pieces[:3], weights))  # the last piece unused

    got = jax.grad(lambda y: loss(split_last_axis(y, sizes)))(x)
    want = jax.grad(lambda y: loss(jnp.split(y, [8, 10, 12], axis=-1)))(x)
    assert got.dtype == dtype and bool(jnp.array_equal(got, want))
    assert bool(jnp.all(got[..., 12:] == 0)) and bool(jnp.any(got[..., :12] != 0))
    for piece, want_piece in zip(split_last_axis(x, sizes), jnp.split(x, [8, 10, 12], axis=-1)):
        assert bool(jnp.array_equal(piece, want_piece))


def test_dropout_changes_training_outputs_only():
    config = ModelConfig(**SMALL)
    model, variables, seq, lengths = _init(config)
    train, call = jitted_apply(model, deterministic=False), jitted_apply(model)
    a = train(variables, seq, lengths, rngs={"dropout": jax.random.key(1)})
    b = train(variables, seq, lengths, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(call(variables, seq, lengths), call(variables, seq, lengths))


@pytest.mark.parametrize("attention", ["blossom", "dense"])
def test_bidirectional_model(attention):
    config = ModelConfig(**{**SMALL, "attention": attention, "causal": False})
    assert config.attn.causal is False and config.mask_token_id == 41
    model, variables, seq, lengths = _init(config)
    assert variables["params"]["item_embedding"]["embedding"].shape[0] == 42
    encode = jitted_apply(model, "encode")
    users = jitted_apply(model)(variables, seq, lengths)
    masked, position = place_mask_token(seq, lengths, config.mask_token_id)
    hidden = encode(variables, masked, lengths)
    np.testing.assert_allclose(users, hidden[jnp.arange(4), position], atol=1e-6)
    # A full row drops its oldest item; a short row gets the mask right after its last item.
    assert int(position[0]) == config.max_len - 1 and int(masked[0, -1]) == 41
    assert int(masked[0, 0]) == int(seq[0, 1])
    assert int(position[1]) == 1 and int(masked[1, 1]) == 41 and int(masked[1, 0]) == int(seq[1, 0])
    # Bidirectional: a later item changes earlier hidden states.
    changed = seq.at[0, -3].set(seq[0, -3] % config.num_items + 1)
    assert not np.allclose(encode(variables, changed, lengths)[0, 0], hidden[0, 0])


def test_bfloat16_compute_keeps_float32_params():
    config = ModelConfig(**{**SMALL, "compute_dtype": "bfloat16"})
    model, variables, seq, lengths = _init(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits = jitted_apply(model, "score")(variables, seq, lengths)
    logits_f32 = jitted_apply(SequentialRecommender(ModelConfig(**SMALL)), "score")(variables, seq, lengths)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, logits_f32, atol=5e-2)


def test_model_gradients_are_finite_and_reach_attention():
    config = ModelConfig(**SMALL)
    model, variables, seq, lengths = _init(config)

    def loss(params):
        logits = model.apply({"params": params}, seq, lengths, method="score")
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 1])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    attn = grads["layer_0"]["blossom_attention"]
    assert float(jnp.abs(attn["to_qkv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(attn["to_strategy_combine"]["kernel"]).sum()) > 0
    assert float(jnp.abs(attn["k_compress_1_kernel"]).sum()) == 0  # no gradient through selection


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        AttentionConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="even"):
        AttentionConfig(head_dim=15)
    with pytest.raises(ValueError, match="multiple of compress_stride"):
        AttentionConfig(selection_block=24)
    with pytest.raises(ValueError, match="attention must be"):
        ModelConfig(num_items=5, attention="linear")
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(num_items=5, hidden_size=100)
    with pytest.raises(ValueError, match="num_items"):
        ModelConfig(num_items=0)


def test_attention_input_validation():
    from blossom_jax import blossom_attention
    from conftest import random_attention_inputs

    config = AttentionConfig()
    q, k, v, gates, params, valid = random_attention_inputs(config, 1, 20)
    with pytest.raises(ValueError, match="k must have shape"):
        blossom_attention(q, k[:, :, :1], v, gates, params, config=config)
    with pytest.raises(ValueError, match="gates"):
        blossom_attention(q, k, v, gates[..., :1], params, config=config)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        blossom_attention(q.astype(jnp.float16), k, v, gates, params, config=config)
    with pytest.raises(ValueError, match="impl"):
        blossom_attention(q, k, v, gates, params, config=config, impl="cuda")
    with pytest.raises(ValueError, match="missing"):
        blossom_attention(q, k, v, gates, {"w1": params["w1"]}, config=config)
    with pytest.raises(ValueError, match="valid"):
        blossom_attention(q, k, v, gates, params, valid=valid.astype(jnp.int32), config=config)
    long = random_attention_inputs(config, 1, 4097, padded=False)
    with pytest.raises(ValueError, match="N <= 4096"):
        blossom_attention(*long[:5], config=config, impl="reference")
