"""Flax linen modules: the BlossomRec attention layer and the SASRec/BERT4Rec-style recommender (SPEC 6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from blossom_jax.attention import blossom_attention
from blossom_jax.config import AttentionConfig, ModelConfig
from blossom_jax.rope import apply_rope


def _normal(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def _dtype(config: ModelConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


class BlossomAttention(nn.Module):
    """Projections, RoPE, LTIS + STIS attention, gate and head merge (SPEC 2-5).

    Parameter names follow the reference release (``to_qkv``, ``k_compress_1``/``_3``,
    ``k_intrablock_positions``, ``to_strategy_combine``, ``combine_heads``). Kernels are [in, out].
    """

    attn: AttentionConfig
    impl: str = "auto"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x [B, N, D], valid bool [B, N] -> [B, N, D] (before the layer's output Dense)."""
        cfg = self.attn
        batch, seq_len, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(stddev=self.init_std)
        qkv = nn.Dense(heads * head_dim + 2 * kv_heads * head_dim, use_bias=False, kernel_init=init,
                       dtype=self.dtype, name="to_qkv")(x)
        q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
        q = apply_rope(q.reshape(batch, seq_len, heads, head_dim), base=cfg.rope_base)
        k = apply_rope(k.reshape(batch, seq_len, kv_heads, head_dim), base=cfg.rope_base)
        v = v.reshape(batch, seq_len, kv_heads, head_dim)

        width = cfg.compress_block * head_dim
        compress_params = {
            "intrablock_positions": self.param("k_intrablock_positions", nn.initializers.zeros,
                                               (kv_heads, cfg.compress_block, head_dim)),
            "w1": self.param("k_compress_1_kernel", init, (width, width)),
            "b1": self.param("k_compress_1_bias", nn.initializers.zeros, (width,)),
            "w2": self.param("k_compress_3_kernel", init, (width, head_dim)),
            "b2": self.param("k_compress_3_bias", nn.initializers.zeros, (head_dim,)),
        }
        gate_logits = nn.Dense(2 * heads, kernel_init=init, bias_init=nn.initializers.zeros,
                               dtype=self.dtype, name="to_strategy_combine")(x)
        gates = jax.nn.sigmoid(gate_logits.astype(jnp.float32)).astype(q.dtype)
        out = blossom_attention(q, k, v, gates.reshape(batch, seq_len, heads, 2), compress_params,
                                valid=valid, config=cfg, impl=self.impl)
        return nn.Dense(x.shape[-1], use_bias=False, kernel_init=init, dtype=self.dtype,
                        name="combine_heads")(out.reshape(batch, seq_len, heads * head_dim))


class DenseAttention(nn.Module):
    """RecBole SASRec/BERT4Rec multi-head attention (query/key/value Linear with bias, softmax)."""

    num_heads: int
    causal: bool = True
    attention_dropout: float = 0.0
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True) -> jax.Array:
        """x [B, N, D], valid bool [B, N] -> merged heads [B, N, D] (before the output Dense)."""
        batch, seq_len, hidden = x.shape
        head_dim = hidden // self.num_heads
        init = nn.initializers.normal(stddev=self.init_std)

        def project(name):
            y = nn.Dense(hidden, kernel_init=init, dtype=self.dtype, name=name)(x)
            return y.reshape(batch, seq_len, self.num_heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        mask = jnp.broadcast_to(valid[:, None, None, :], (batch, 1, seq_len, seq_len))
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))[None, None]
        if self.attention_dropout > 0.0 and not deterministic:
            scores = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
            probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
            probs = nn.Dropout(self.attention_dropout)(probs, deterministic=False)
            out = jnp.einsum("bhij,bjhd->bihd", probs.astype(v.dtype), v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return out.reshape(batch, seq_len, hidden)


class TransformerLayer(nn.Module):
    """Post-LN SASRec layer: a = LN(x + Drop(Dense(Attn(x)))), y = LN(a + Drop(FFN(a)))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        init = _normal(cfg)
        dtype = _dtype(cfg)
        if cfg.attention == "blossom":
            attended = BlossomAttention(cfg.attn, impl=cfg.attention_impl, init_std=cfg.initializer_range,
                                        dtype=dtype, name="blossom_attention")(x, valid)
        else:
            attended = DenseAttention(cfg.attn.num_heads, causal=cfg.causal,
                                      attention_dropout=cfg.attention_dropout,
                                      init_std=cfg.initializer_range, dtype=dtype,
                                      name="dense_attention")(x, valid, deterministic)
        attended = nn.Dense(cfg.hidden_size, kernel_init=init, dtype=dtype, name="attention_dense")(attended)
        attended = nn.Dropout(cfg.dropout)(attended, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="attention_norm")(
            x + attended.astype(jnp.float32))
        hidden = nn.Dense(cfg.inner_size, kernel_init=init, dtype=dtype, name="dense_1")(x)
        hidden = jax.nn.gelu(hidden, approximate=False)
        hidden = nn.Dense(cfg.hidden_size, kernel_init=init, dtype=dtype, name="dense_2")(hidden)
        hidden = nn.Dropout(cfg.dropout)(hidden, deterministic=deterministic)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="ffn_norm")(
            x + hidden.astype(jnp.float32))


def place_mask_token(item_seq: jax.Array, item_seq_len: jax.Array, mask_token: int):
    """Bidirectional prediction input: the mask token right after the last item.

    Rows already full (len == N) drop their oldest item first. Returns (sequence [B, N], position [B]).
    """
    seq_len = item_seq.shape[1]
    full = item_seq_len >= seq_len
    shifted = jnp.where(full[:, None], jnp.roll(item_seq, -1, axis=1), item_seq)
    position = jnp.where(full, seq_len - 1, item_seq_len)
    columns = jnp.arange(seq_len)[None, :]
    return jnp.where(columns == position[:, None], mask_token, shifted), position


class SequentialRecommender(nn.Module):
    """SASRec-style recommender with BlossomRec or dense attention (SPEC 6).

    ``causal=True``: next-item model (SASRec). ``causal=False``: BERT4Rec-style masked-item model whose
    mask token is ``config.mask_token_id`` (= num_items + 1).
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        init = _normal(cfg)
        self.item_embedding = nn.Embed(cfg.embedding_rows, cfg.hidden_size, embedding_init=init,
                                       name="item_embedding")
        if cfg.attention == "dense":
            self.position_embedding = nn.Embed(cfg.max_len, cfg.hidden_size, embedding_init=init,
                                               name="position_embedding")
        self.embedding_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                                           name="embedding_norm")
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.layers = [TransformerLayer(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]

    def _check(self, item_seq: jax.Array, item_seq_len: jax.Array | None = None) -> None:
        if item_seq.ndim != 2:
            raise ValueError(f"item_seq must be [B, N], got shape {item_seq.shape}")
        if not jnp.issubdtype(item_seq.dtype, jnp.integer):
            raise ValueError(f"item_seq must hold integer ids, got {item_seq.dtype}")
        if self.config.attention == "dense" and item_seq.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence length {item_seq.shape[1]} exceeds max_len {self.config.max_len} of the "
                "learned position table")
        if item_seq_len is not None and tuple(item_seq_len.shape) != (item_seq.shape[0],):
            raise ValueError(f"item_seq_len must be [B] = [{item_seq.shape[0]}], got {item_seq_len.shape}")

    def encode(self, item_seq: jax.Array, item_seq_len: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
        """Hidden states of every position. item_seq int [B, N] (0 = padding) -> float32 [B, N, D]."""
        self._check(item_seq, item_seq_len)
        cfg = self.config
        valid = item_seq != 0
        x = self.item_embedding(item_seq)
        if cfg.attention == "dense":
            x = x + self.position_embedding(jnp.arange(item_seq.shape[1]))[None]
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, valid, deterministic)
        return x

    def __call__(self, item_seq: jax.Array, item_seq_len: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """User vectors [B, D]: the hidden state at position len - 1 (causal), or at the mask token
        placed right after the last item (bidirectional). item_seq int [B, N], item_seq_len int [B]."""
        self._check(item_seq, item_seq_len)
        if self.config.causal:
            position = item_seq_len - 1
        else:
            item_seq, position = place_mask_token(item_seq, item_seq_len, self.config.mask_token_id)
        hidden = self.encode(item_seq, item_seq_len, deterministic)
        return jnp.take_along_axis(hidden, position[:, None, None].astype(jnp.int32), axis=1)[:, 0]

    def item_logits(self, x: jax.Array) -> jax.Array:
        """Scores of every item id: x [..., D] -> float32 [..., num_items + 1] (column 0 = padding)."""
        table = self.item_embedding.embedding[: self.config.num_items + 1]
        dtype = _dtype(self.config)
        return jnp.einsum("...d,nd->...n", x.astype(dtype), table.astype(dtype),
                          preferred_element_type=jnp.float32)

    def score(self, item_seq: jax.Array, item_seq_len: jax.Array,
              deterministic: bool = True) -> jax.Array:
        """Logits over all item ids [B, num_items + 1] for the next (or masked) item."""
        return self.item_logits(self(item_seq, item_seq_len, deterministic))
