"""Weight import from (and export to) the reference PyTorch/RecBole release (SPEC section 8).

State dicts are plain ``{name: numpy array}`` mappings with PyTorch's [out, in] weight layout; no torch
is needed (convert tensors with ``{k: v.numpy() for k, v in torch_state_dict.items()}``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from blossom_jax.config import AttentionConfig, ModelConfig

_ATTN = "trm_encoder.layer.{i}.blossom_attention.sparse_attention."
_LAYER = "trm_encoder.layer.{i}."


def _layer_map(i: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(reference name, path in our params, transpose?) for layer i."""
    attn, layer = _ATTN.format(i=i), _LAYER.format(i=i)
    ours = f"layer_{i}"
    blossom = (ours, "blossom_attention")
    return [
        (attn + "to_qkv.weight", blossom + ("to_qkv", "kernel"), True),
        (attn + "k_compress.1.weight", blossom + ("k_compress_1_kernel",), True),
        (attn + "k_compress.1.bias", blossom + ("k_compress_1_bias",), False),
        (attn + "k_compress.3.weight", blossom + ("k_compress_3_kernel",), True),
        (attn + "k_compress.3.bias", blossom + ("k_compress_3_bias",), False),
        (attn + "k_intrablock_positions", blossom + ("k_intrablock_positions",), False),
        (attn + "to_strategy_combine.0.weight", blossom + ("to_strategy_combine", "kernel"), True),
        (attn + "to_strategy_combine.0.bias", blossom + ("to_strategy_combine", "bias"), False),
        (attn + "combine_heads.weight", blossom + ("combine_heads", "kernel"), True),
        (layer + "blossom_attention.dense.weight", (ours, "attention_dense", "kernel"), True),
        (layer + "blossom_attention.dense.bias", (ours, "attention_dense", "bias"), False),
        (layer + "blossom_attention.LayerNorm.weight", (ours, "attention_norm", "scale"), False),
        (layer + "blossom_attention.LayerNorm.bias", (ours, "attention_norm", "bias"), False),
        (layer + "feed_forward.dense_1.weight", (ours, "dense_1", "kernel"), True),
        (layer + "feed_forward.dense_1.bias", (ours, "dense_1", "bias"), False),
        (layer + "feed_forward.dense_2.weight", (ours, "dense_2", "kernel"), True),
        (layer + "feed_forward.dense_2.bias", (ours, "dense_2", "bias"), False),
        (layer + "feed_forward.LayerNorm.weight", (ours, "ffn_norm", "scale"), False),
        (layer + "feed_forward.LayerNorm.bias", (ours, "ffn_norm", "bias"), False),
    ]


def _global_map() -> list[tuple[str, tuple[str, ...], bool]]:
    return [
        ("item_embedding.weight", ("item_embedding", "embedding"), False),
        ("LayerNorm.weight", ("embedding_norm", "scale"), False),
        ("LayerNorm.bias", ("embedding_norm", "bias"), False),
    ]


def _name_map(num_layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
    entries = _global_map()
    for i in range(num_layers):
        entries += _layer_map(i)
    return entries


def _count_layers(state_dict: Mapping[str, Any]) -> int:
    indices = {int(m.group(1)) for name in state_dict
               if (m := re.match(r"trm_encoder\.layer\.(\d+)\.", name))}
    if not indices:
        raise KeyError("state_dict holds no 'trm_encoder.layer.{i}.*' parameters")
    if indices != set(range(len(indices))):
        raise KeyError(f"state_dict layer indices are not contiguous from 0: {sorted(indices)}")
    return len(indices)


def infer_config(state_dict: Mapping[str, Any], *, max_len: int, **overrides: Any) -> ModelConfig:
    """ModelConfig whose shapes match a reference state dict (compression stride etc. from overrides)."""
    num_layers = _count_layers(state_dict)
    attn = _ATTN.format(i=0)
    required = ["item_embedding.weight", attn + "to_qkv.weight", attn + "combine_heads.weight",
                attn + "k_intrablock_positions", _LAYER.format(i=0) + "feed_forward.dense_1.weight"]
    missing = [name for name in required if name not in state_dict]
    if missing:
        raise KeyError(f"state_dict is missing required parameters: {missing}")
    rows, hidden = np.shape(state_dict["item_embedding.weight"])
    qkv_rows = np.shape(state_dict[attn + "to_qkv.weight"])[0]
    heads_times_dim = np.shape(state_dict[attn + "combine_heads.weight"])[1]
    kv_heads, compress_block, head_dim = np.shape(state_dict[attn + "k_intrablock_positions"])
    num_heads = heads_times_dim // head_dim
    if qkv_rows != num_heads * head_dim + 2 * kv_heads * head_dim:
        raise ValueError(
            f"to_qkv.weight has {qkv_rows} rows, expected H*d + 2*Hk*d = "
            f"{num_heads * head_dim + 2 * kv_heads * head_dim} for H={num_heads}, Hk={kv_heads}, d={head_dim}")
    attn_overrides = overrides.pop("attn", {})
    if isinstance(attn_overrides, AttentionConfig):
        attn_overrides = {k: getattr(attn_overrides, k) for k in attn_overrides.__dataclass_fields__}
    attn_fields = dict(num_heads=num_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       compress_block=compress_block)
    attn_fields.update(attn_overrides)
    return ModelConfig(
        num_items=rows - 1,
        max_len=max_len,
        hidden_size=hidden,
        inner_size=np.shape(state_dict[_LAYER.format(i=0) + "feed_forward.dense_1.weight"])[0],
        num_layers=num_layers,
        attn=AttentionConfig(**attn_fields),
        **overrides,
    )


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_reference_state_dict(state_dict: Mapping[str, Any], *, max_len: int,
                              attention_impl: str = "xla", **config_overrides: Any):
    """Builds our model from a reference-release state dict.

    Args:
      state_dict: reference parameter names (SPEC 8) -> arrays ([out, in] weights). Unused keys (v_compress,
        rotary freqs, optimiser leftovers, ...) are ignored.
      max_len: the sequence length N the model will run at.
      attention_impl: "auto" | "reference" | "xla" | "pallas".
      config_overrides: further ModelConfig fields (e.g. ``dropout``, ``attn={"compress_stride": 16}``).
    Returns:
      (model, variables) with ``model.apply(variables, item_seq, item_seq_len)`` the user vectors.
    Raises:
      KeyError naming missing parameters; ValueError on shape mismatches.
    """
    from blossom_jax.models import SequentialRecommender  # flax only when importing weights

    config = infer_config(state_dict, max_len=max_len, attention_impl=attention_impl, **config_overrides)
    entries = _name_map(config.num_layers)
    missing = [name for name, _, _ in entries if name not in state_dict]
    if missing:
        raise KeyError(f"state_dict is missing required parameters: {missing}")
    freqs_name = _ATTN.format(i=0) + "rotary_emb.freqs"
    if freqs_name in state_dict:
        head_dim = config.attn.head_dim
        expected = config.attn.rope_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if not np.allclose(np.asarray(state_dict[freqs_name], np.float64), expected, rtol=1e-5):
            raise ValueError(f"{freqs_name} does not match rope_base={config.attn.rope_base}")

    model = SequentialRecommender(config)
    shapes = _expected_shapes(model)
    params: dict = {}
    for name, path, transpose in entries:
        value = np.asarray(state_dict[name], dtype=np.float32)
        if transpose:
            value = value.T
        want = tuple(_get(shapes, path))
        if value.shape != want:
            raise ValueError(f"{name}: expected shape {want} (after transpose={transpose}), got {value.shape}")
        _set(params, path, value)
    return model, {"params": params}


def _expected_shapes(model) -> dict:
    import jax
    import jax.numpy as jnp

    seq = jnp.ones((1, model.config.max_len), jnp.int32)
    length = jnp.full((1,), model.config.max_len, jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), seq, length))
    return jax.tree.map(lambda x: x.shape, abstract["params"])


def to_reference_state_dict(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> reference-release names and layouts (the inverse of ``load_reference_state_dict``)."""
    if config.attention != "blossom" or not config.causal:
        raise ValueError("only the causal BlossomRec model has a reference-release layout")
    out = {}
    for name, path, transpose in _name_map(config.num_layers):
        value = np.asarray(_get(params, path), dtype=np.float32)
        out[name] = value.T if transpose else value
    head_dim = config.attn.head_dim
    freqs = (config.attn.rope_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    for i in range(config.num_layers):
        out[_ATTN.format(i=i) + "rotary_emb.freqs"] = freqs.astype(np.float32)
    return out
