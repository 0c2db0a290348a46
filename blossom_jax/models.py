"""Flax linen modules: the BlossomRec attention layer and the SASRec/BERT4Rec-style recommender (SPEC 6)."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from blossom_jax.attention import blossom_attention, blossom_attention_rows
from blossom_jax.config import AttentionConfig, ModelConfig
from blossom_jax.ops.common import take_rows
from blossom_jax.rope import apply_rope


@jax.custom_vjp
def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of ``table`` [V, D] at integer ``ids`` [...] -> [..., D] (same as ``jnp.take(table, ids, 0)``).

    Only the backward differs from ``jnp.take``'s: the cotangents of padding positions (id 0) are summed
    with one reduction and added to row 0, and only the other positions go through the scatter-add. The
    gradient is the same, but a right-padded batch no longer sends half its tokens' atomic adds to one row
    (on an H100 at N = 200, B = 2048 that contention made the scatter 1 ms of a 16 ms train step).
    """
    return jnp.take(table, ids, axis=0)


def _embedding_lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (table, ids)


def _embedding_lookup_bwd(residuals, cotangent):
    table, ids = residuals
    rows, width = table.shape
    flat_ids = ids.reshape(-1)
    flat_cotangent = cotangent.reshape(-1, width)
    padding = flat_ids == 0
    padding_sum = jnp.sum(jnp.where(padding[:, None], flat_cotangent, 0), axis=0)
    scatter_rows = jnp.where(padding, rows, flat_ids)  # row index `rows` is out of range: dropped
    grad = jnp.zeros(table.shape, cotangent.dtype).at[scatter_rows].add(flat_cotangent, mode="drop")
    return grad.at[0].add(padding_sum).astype(table.dtype), None


embedding_lookup.defvjp(_embedding_lookup_fwd, _embedding_lookup_bwd)


def _normal(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def _dtype(config: ModelConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_last_axis(x: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """x [..., sum(sizes)] -> consecutive pieces [..., sizes[i]] (as ``jnp.split``).

    The VJP concatenates the pieces' cotangents. Autodiff of ``jnp.split`` gives a zero-padded copy of each
    cotangent and their sum, which XLA on GPUs ran as one elementwise fusion evaluating every pad per output
    element (0.064 ms for the 4-way split of the fused projection at N = 1k, 65,536 tokens, H100), against a
    concatenation it writes once."""
    return tuple(jnp.split(x, list(itertools.accumulate(sizes[:-1])), axis=-1))


def _split_last_axis_fwd(x, sizes):
    return split_last_axis(x, sizes), None


def _split_last_axis_bwd(sizes, _, cotangents):
    return (jnp.concatenate(cotangents, axis=-1),)


split_last_axis.defvjp(_split_last_axis_fwd, _split_last_axis_bwd)


class _DenseParams(nn.Module):
    """The parameters of an ``nn.Dense`` (same names, shapes, dtype and initialisation), without applying it: lets
    one matmul serve several Dense layers over the same input while the parameter tree stays the Dense layout."""

    features: int
    use_bias: bool
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """-> (kernel [in_features, features] float32, bias [features] float32 or None)."""
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        return kernel, bias


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
    def __call__(self, x: jax.Array, valid: jax.Array, query_positions: jax.Array | None = None) -> jax.Array:
        """x [B, N, D], valid bool [B, N] -> [B, N, D] (before the layer's output Dense).

        With ``query_positions`` int [B, Q] only those query rows are computed: -> [B, Q, D]
        (``blossom_attention_rows``; keys and values still come from every position).
        """
        cfg = self.attn
        batch, seq_len, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(stddev=self.init_std)
        qkv_width = heads * head_dim + 2 * kv_heads * head_dim
        # to_qkv and to_strategy_combine (the gate logits) as one matmul over x: in the backward their output
        # cotangents then form one [.., qkv_width + 2H] buffer (split_last_axis) for one dX and one dW matmul, where
        # two Dense layers left XLA with two dX matmuls, their sum and a copy into a concatenated buffer for dW.
        # Same parameters, same values as the two Dense layers.
        w_qkv, _ = _DenseParams(qkv_width, use_bias=False, kernel_init=init, name="to_qkv")(x.shape[-1])
        w_gate, b_gate = _DenseParams(2 * heads, use_bias=True, kernel_init=init,
                                      name="to_strategy_combine")(x.shape[-1])
        x_in = x.astype(self.dtype)
        qkv_sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        if query_positions is None:
            projected = x_in @ jnp.concatenate([w_qkv, w_gate], axis=1).astype(self.dtype)
            q, k, v, gate_logits = split_last_axis(projected, qkv_sizes + (2 * heads,))
        else:  # the gates of the query rows only
            q, k, v = split_last_axis(x_in @ w_qkv.astype(self.dtype), qkv_sizes)
            gate_logits = take_rows(x_in, query_positions) @ w_gate.astype(self.dtype)
        gate_logits = gate_logits + b_gate.astype(self.dtype)
        q = q.reshape(batch, seq_len, heads, head_dim)
        if query_positions is None:
            q = apply_rope(q, base=cfg.rope_base)
        else:
            q = apply_rope(take_rows(q, query_positions), base=cfg.rope_base, positions=query_positions)
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
        gates = jax.nn.sigmoid(gate_logits.astype(jnp.float32)).astype(q.dtype)
        rows = q.shape[1]
        gates = gates.reshape(batch, rows, heads, 2)
        if query_positions is None:
            out = blossom_attention(q, k, v, gates, compress_params, valid=valid, config=cfg, impl=self.impl)
        else:
            out = blossom_attention_rows(q, k, v, gates, compress_params, query_positions=query_positions,
                                         valid=valid, config=cfg)
        return nn.Dense(x.shape[-1], use_bias=False, kernel_init=init, dtype=self.dtype,
                        name="combine_heads")(out.reshape(batch, rows, heads * head_dim))


# Dense attention kernels ----------------------------------------------------------------------------
#
# What jax offers (checked in the sources of jax 0.10.2 and 0.11.2, identical in this respect):
# * ``jax.nn.dot_product_attention(..., implementation=None)`` always runs the XLA formulation (a
#   "TODO: automatically select the best backend" in jax): [B, H, N, N] float32 logits, whatever the mask
#   argument. cuDNN flash attention runs only with ``implementation="cudnn"``, which raises (at trace time)
#   off GPU, without cuDNN, for float32 inputs (cuDNN takes float16 / bfloat16 / fp8 only) or for a head dim
#   that is not a multiple of 8 or exceeds 128 (256 on Hopper and later).
# * Layout: q [B, T, N, H] and k/v [B, S, K, H] ("BTNH", ours: [B, N, heads, d]) go to cuDNN as they are
#   (no transpose). GQA (K < N, N % K == 0) is accepted by both implementations; the dense baseline here is
#   plain multi-head attention (K = N).
# * ``is_causal`` + ``key_value_seq_lengths`` become cuDNN's PADDING_CAUSAL (or PADDING) mask, computed in the
#   kernel, no [N, N] array; query lengths default to N there (every query row, padded ones included, is
#   computed over the valid keys). The XLA formulation builds the same boolean mask from iotas.
# * A boolean ``mask=`` would be turned into an additive [B, 1, N, N] bias for cuDNN; we never pass one.
# * No attention-probability dropout in the public API: the training path with ``attention_dropout > 0`` keeps
#   its explicit einsum formulation (as before), so it cannot use cuDNN.

DENSE_IMPLS = ("cudnn", "xla", "mask")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _has_length_arguments() -> bool:
    """Whether this jax's ``dot_product_attention`` takes ``is_causal`` and ``key_value_seq_lengths``."""
    import inspect

    try:
        parameters = inspect.signature(jax.nn.dot_product_attention).parameters
    except (TypeError, ValueError):
        return False
    return "is_causal" in parameters and "key_value_seq_lengths" in parameters


_LENGTH_ARGUMENTS = _has_length_arguments()


def key_lengths(valid: jax.Array) -> jax.Array:
    """Number of valid keys per row, int32 [B], at least 1.

    ``valid`` bool [B, N] must be a right-padded prefix (SPEC 1); in the bidirectional model the mask token
    placed after the last item is a non-zero id and so counts as valid, exactly as in the boolean mask. A row
    with no valid position (never produced by the data pipeline; SPEC requires len >= 1) is given length 1
    so that its outputs stay finite (they attend to key 0; the boolean-mask formulation attended uniformly
    to every key there). Such a row has no used position.
    """
    return jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.int32), 1)


def dense_impl(impl: str, dtype, head_dim: int) -> str:
    """The dense attention formulation a model's ``attention_impl`` runs as (see ``DENSE_IMPLS``).

    * "auto" / "pallas": "cudnn" when tracing for GPU with float16/bfloat16 activations and a head dim cuDNN
      takes (multiple of 8, <= 128), else "xla".
    * "xla": ``jax.nn.dot_product_attention`` (XLA) with ``is_causal`` and key lengths (portable; export).
    * "reference": "mask", the explicit boolean [B, 1, N, N] mask (the formulation before lengths; oracle).
    A jax without the length arguments gets "mask" instead of "cudnn"/"xla".
    """
    if impl == "reference" or not _LENGTH_ARGUMENTS:
        return "mask"
    if impl == "xla":
        return "xla"
    if impl not in ("auto", "pallas"):
        raise ValueError(f"attention_impl must be one of auto, reference, xla, pallas; got {impl!r}")
    from blossom_jax.ops import pallas  # local, as blossom_jax.attention.resolve_impl

    on_gpu = pallas.current_backend() == "gpu"
    supported = jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and head_dim % 8 == 0 \
        and head_dim <= 128
    return "cudnn" if on_gpu and supported else "xla"


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, causal: bool,
                    impl: str = "xla") -> jax.Array:
    """Softmax attention over the valid keys (and, if ``causal``, keys at or before the query).

    q [B, N, H, d], k/v [B, N, K, d] (K divides H), valid bool [B, N] right-padded; ``impl`` one of
    ``DENSE_IMPLS`` (see ``dense_impl``). Every output row is finite, padded query rows included (for "cudnn"
    and "xla" they equal the "mask" formulation's wherever a row has at least one valid key).
    """
    if impl == "mask":
        batch, seq_len = valid.shape
        mask = jnp.broadcast_to(valid[:, None, None, :], (batch, 1, seq_len, seq_len))
        if causal:
            mask = mask & jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))[None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if impl not in ("cudnn", "xla"):
        raise ValueError(f"dense attention impl must be one of {DENSE_IMPLS}, got {impl!r}")
    lengths = key_lengths(valid)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                                implementation="cudnn")
        except (NotImplementedError, RuntimeError) as error:  # no cuDNN / unsupported shape: XLA instead
            _warn_cudnn_fallback(error)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths)


_WARNED: set[str] = set()


def _warn_cudnn_fallback(error: Exception) -> None:
    message = f"{type(error).__name__}: {error}"
    if message not in _WARNED:
        _WARNED.add(message)
        import logging

        logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA", message)


class DenseAttention(nn.Module):
    """RecBole SASRec/BERT4Rec multi-head attention (query/key/value Linear with bias, softmax).

    ``impl`` is the model's ``attention_impl``, mapped by ``dense_impl`` (cuDNN flash attention on GPU in
    bfloat16). With attention dropout in training the probabilities are materialised (explicit einsum).
    """

    num_heads: int
    causal: bool = True
    attention_dropout: float = 0.0
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """x [B, N, D], valid bool [B, N] -> merged heads [B, N, D] (before the output Dense).

        With ``query_positions`` int [B, Q] only those query rows are computed: -> [B, Q, D] (explicit
        boolean mask over the N keys, XLA).
        """
        batch, seq_len, hidden = x.shape
        head_dim = hidden // self.num_heads
        init = nn.initializers.normal(stddev=self.init_std)
        query_x = x if query_positions is None else take_rows(x, query_positions)

        def project(name, inputs):
            y = nn.Dense(hidden, kernel_init=init, dtype=self.dtype, name=name)(inputs)
            return y.reshape(batch, inputs.shape[1], self.num_heads, head_dim)

        q, k, v = project("query", query_x), project("key", x), project("value", x)
        rows = q.shape[1]
        dropout = self.attention_dropout > 0.0 and not deterministic
        if dropout or query_positions is not None:
            mask = jnp.broadcast_to(valid[:, None, None, :], (batch, 1, rows, seq_len))
            if self.causal:
                query_pos = (jnp.arange(seq_len)[None] if query_positions is None else query_positions)
                mask = mask & (jnp.arange(seq_len) <= query_pos[..., None])[:, None]
        if dropout:
            scores = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
            probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
            probs = nn.Dropout(self.attention_dropout)(probs, deterministic=False)
            out = jnp.einsum("bhij,bjhd->bihd", probs.astype(v.dtype), v)
        elif query_positions is not None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            out = dense_attention(q, k, v, valid, causal=self.causal,
                                  impl=dense_impl(self.impl, q.dtype, head_dim))
        return out.reshape(batch, rows, hidden)


class TransformerLayer(nn.Module):
    """Post-LN SASRec layer: a = LN(x + Drop(Dense(Attn(x)))), y = LN(a + Drop(FFN(a)))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """x [B, N, D] -> [B, N, D]; with ``query_positions`` int [B, Q] only those rows: -> [B, Q, D]."""
        cfg = self.config
        init = _normal(cfg)
        dtype = _dtype(cfg)
        if cfg.attention == "blossom":
            attended = BlossomAttention(cfg.attn, impl=cfg.attention_impl, init_std=cfg.initializer_range,
                                        dtype=dtype, name="blossom_attention")(x, valid, query_positions)
        else:
            attended = DenseAttention(cfg.attn.num_heads, causal=cfg.causal,
                                      attention_dropout=cfg.attention_dropout,
                                      init_std=cfg.initializer_range, dtype=dtype, impl=cfg.attention_impl,
                                      name="dense_attention")(x, valid, deterministic, query_positions)
        if query_positions is not None:
            x = take_rows(x, query_positions)
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
               deterministic: bool = True, query_positions: jax.Array | None = None) -> jax.Array:
        """Hidden states of every position. item_seq int [B, N] (0 = padding) -> float32 [B, N, D].

        With ``query_positions`` int [B, Q]: only the hidden states at those positions, float32 [B, Q, D].
        The last layer then computes only those rows (its keys and values still come from every position
        of the layer below), which is exact: nothing else reads that layer's other rows.
        """
        self._check(item_seq, item_seq_len)
        cfg = self.config
        valid = item_seq != 0
        with jax.named_scope("item_embedding"):
            x = embedding_lookup(self.item_embedding.embedding, item_seq)
        if cfg.attention == "dense":
            x = x + self.position_embedding(jnp.arange(item_seq.shape[1]))[None]
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
        for index, layer in enumerate(self.layers):
            last = index == len(self.layers) - 1
            x = layer(x, valid, deterministic, query_positions if last else None)
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
        position = position.astype(jnp.int32)[:, None]
        if self.config.last_layer_rows:
            return self.encode(item_seq, item_seq_len, deterministic, query_positions=position)[:, 0]
        return take_rows(self.encode(item_seq, item_seq_len, deterministic), position)[:, 0]

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
