"""Write a self-contained serving artifact (read by ``blossom_jax.serving.load``).

Layout of the export directory:
  config.json                    model config, item-id mapping, versions, sha256 of every file
  params.safetensors             float32 parameters, names joined with "/" (no pickle anywhere)
  recommend_<platform>.jax_exported                  serialized jax.export function
  recommend_<platform>_exclude_history.jax_exported  the same with the history items excluded
Each function is ``recommend(params, item_seq int32 [B, N], item_seq_len int32 [B]) ->
(item_ids int32 [B, K], scores float32 [B, K])`` with a symbolic batch dimension B.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import blossom_jax
from blossom_jax import serving
from blossom_jax.config import ModelConfig

SUPPORTED_PLATFORMS = ("cpu", "cuda", "tpu")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if serving.PARAM_SEPARATOR in key:
            raise ValueError(f"parameter name {key!r} contains {serving.PARAM_SEPARATOR!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + serving.PARAM_SEPARATOR))
        else:
            flat[name] = np.asarray(value, dtype=np.float32)
    return flat


def make_recommend_fn(config: ModelConfig, top_k: int, exclude_history: bool):
    """The pure function that gets exported: (params, item_seq, item_seq_len) -> (ids, scores)."""
    from blossom_jax.models import SequentialRecommender

    model = SequentialRecommender(config)

    def recommend(params, item_seq, item_seq_len):
        logits = model.apply({"params": params}, item_seq, item_seq_len, method="score")
        logits = logits.at[:, 0].set(-jnp.inf)  # padding id
        if exclude_history:
            rows = jnp.arange(item_seq.shape[0])[:, None]
            seen = jnp.zeros(logits.shape, jnp.bool_).at[rows, item_seq].set(True)
            logits = jnp.where(seen, -jnp.inf, logits)
        scores, item_ids = jax.lax.top_k(logits, top_k)
        return item_ids.astype(jnp.int32), scores.astype(jnp.float32)

    return recommend


def export_model(config: ModelConfig, params: Mapping[str, Any], out_dir: str | pathlib.Path, *,
                 platforms: Sequence[str] = ("cpu",), max_len: int | None = None, top_k: int = 10,
                 item_mapping: Mapping[Any, int] | None = None,
                 extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes the serving artifact.

    Args:
      config: the trained model's config (its attention_impl is replaced by "xla": portable graphs).
      params: the model's ``params`` collection (nested dict of arrays).
      out_dir: directory to create (must be empty or absent).
      platforms: any of "cpu", "cuda", "tpu" (lowered here, no accelerator needed).
      max_len: input length N of the exported functions (default config.max_len).
      top_k: K, the number of items returned per row (1 <= K <= num_items).
      item_mapping: raw item id -> internal id (1..num_items), stored for ``Recommender.encode_items``.
      extra: JSON-serialisable metadata to store (e.g. training metrics).
    Returns:
      The export directory.
    """
    platforms = list(dict.fromkeys(platforms))
    unknown = [p for p in platforms if p not in SUPPORTED_PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"platforms must be a non-empty subset of {SUPPORTED_PLATFORMS}, got {platforms}")
    max_len = config.max_len if max_len is None else int(max_len)
    if max_len < 1 or (config.attention == "dense" and max_len > config.max_len):
        raise ValueError(f"max_len must be in [1, {config.max_len}] for this model, got {max_len}")
    if not 1 <= top_k <= config.num_items:
        raise ValueError(f"top_k must be in [1, num_items={config.num_items}], got {top_k}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"export directory {out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    from safetensors.numpy import save_file

    flat = _flatten(params)
    save_file(flat, str(out_dir / serving.PARAMS_FILE))
    export_config = config.replace(attention_impl="xla", max_len=max(max_len, 1))
    param_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                               serving._unflatten(flat))
    (batch,) = jax.export.symbolic_shape("batch")
    seq_spec = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    len_spec = jax.ShapeDtypeStruct((batch,), jnp.int32)
    files = {}
    for platform in platforms:
        for exclude in (False, True):
            fn = make_recommend_fn(export_config, top_k, exclude)
            exported = jax.export.export(jax.jit(fn), platforms=[platform])(param_specs, seq_spec, len_spec)
            name = serving.function_file(platform, exclude)
            (out_dir / name).write_bytes(exported.serialize())
    for path in sorted(out_dir.iterdir()):
        files[path.name] = serving.file_digest(path)
    manifest = {
        "format": serving.ARTIFACT_FORMAT,
        "model_config": config.to_dict(),
        "max_len": max_len,
        "top_k": top_k,
        "platforms": platforms,
        "item_mapping": {str(k): int(v) for k, v in (item_mapping or {}).items()},
        "versions": {"blossom_jax": blossom_jax.__version__, "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__},
        "extra": dict(extra or {}),
        "files": files,
    }
    (out_dir / serving.CONFIG_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir
