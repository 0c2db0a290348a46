"""Load an exported BlossomRec model and serve top-K recommendations.

Needs only jax, numpy and safetensors: the model graph travels as serialized ``jax.export`` functions,
the parameters as safetensors, the configuration as JSON (see ``blossom_jax.export`` for the writer).

Example::

    from blossom_jax import serving
    recommender = serving.load("export_dir")
    item_ids, scores = recommender.recommend([[3, 17, 5, 0, 0]], [3], k=10)
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import numpy as np

ARTIFACT_FORMAT = "blossom-jax-export/1"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
PARAM_SEPARATOR = "/"


def file_digest(path: pathlib.Path) -> str:
    """sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def function_file(platform: str, exclude_history: bool) -> str:
    """File name of one serialized recommend function."""
    return f"recommend_{platform}{'_exclude_history' if exclude_history else ''}.jax_exported"


class ExportError(ValueError):
    """An export directory that is incomplete, tampered with or of an unknown format."""


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(PARAM_SEPARATOR)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


class Recommender:
    """A loaded export: call ``recommend`` with item histories (internal ids 1..num_items, 0 = padding)."""

    def __init__(self, directory: pathlib.Path, manifest: dict[str, Any], params: dict[str, Any],
                 functions: dict[tuple[str, bool], Any]):
        self.directory = directory
        self.manifest = manifest
        self.params = params
        self._functions = functions
        model = manifest["model_config"]
        self.num_items: int = int(model["num_items"])
        self.max_len: int = int(manifest["max_len"])
        self.top_k: int = int(manifest["top_k"])
        mapping = manifest.get("item_mapping") or {}
        self.raw_to_internal: dict[str, int] = {str(k): int(v) for k, v in mapping.items()}
        self.internal_to_raw: dict[int, str] = {v: k for k, v in self.raw_to_internal.items()}

    @property
    def platforms(self) -> list[str]:
        return sorted({platform for platform, _ in self._functions})

    def encode_items(self, raw_ids: Sequence[Any]) -> list[int]:
        """Raw item ids (as in the training data) -> internal ids; unknown ids raise ValueError."""
        unknown = [r for r in raw_ids if str(r) not in self.raw_to_internal]
        if unknown:
            raise ValueError(f"unknown raw item ids: {unknown[:10]}")
        return [self.raw_to_internal[str(r)] for r in raw_ids]

    def decode_items(self, internal_ids: Sequence[int]) -> list[str]:
        """Internal ids -> raw item ids."""
        return [self.internal_to_raw.get(int(i), str(int(i))) for i in internal_ids]

    def _prepare(self, item_seq: Any, item_seq_len: Any) -> tuple[np.ndarray, np.ndarray]:
        seq = np.asarray(item_seq)
        lengths = np.asarray(item_seq_len)
        if seq.ndim != 2:
            raise ValueError(f"item_seq must have rank 2 [B, N], got shape {seq.shape}")
        if lengths.ndim != 1 or lengths.shape[0] != seq.shape[0]:
            raise ValueError(f"item_seq_len must have shape [B] = [{seq.shape[0]}], got {lengths.shape}")
        for name, array in (("item_seq", seq), ("item_seq_len", lengths)):
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
        if seq.shape[0] == 0:
            raise ValueError("item_seq has an empty batch")
        if lengths.min() < 1 or lengths.max() > seq.shape[1]:
            bad = lengths[(lengths < 1) | (lengths > seq.shape[1])]
            raise ValueError(f"item_seq_len must be in [1, {seq.shape[1]}], got {bad.tolist()[:10]}")
        columns = np.arange(seq.shape[1])[None, :]
        inside = columns < lengths[:, None]
        if seq.min() < 0 or seq.max() > self.num_items:
            raise ValueError(f"item ids must be in [0, {self.num_items}], got range [{seq.min()}, {seq.max()}]")
        if np.any(seq[inside] == 0):
            raise ValueError("item_seq holds padding id 0 inside a sequence (rows must be right-padded)")
        # Keep the last max_len items of each row, right-padded to max_len.
        start = np.maximum(lengths - self.max_len, 0)
        source = start[:, None] + np.arange(self.max_len)[None, :]
        new_lengths = np.minimum(lengths, self.max_len)
        keep = np.arange(self.max_len)[None, :] < new_lengths[:, None]
        padded = np.concatenate([seq, np.zeros((seq.shape[0], self.max_len), seq.dtype)], axis=1)
        out = np.where(keep, np.take_along_axis(padded, source, axis=1), 0)
        return out.astype(np.int32), new_lengths.astype(np.int32)

    def recommend(self, item_seq: Any, item_seq_len: Any, k: int | None = None, *,
                  exclude_history: bool = False, platform: str | None = None):
        """Top-k items per history.

        Args:
          item_seq: int [B, N] right-padded internal item ids (0 = padding); N may exceed max_len (the last
            max_len items are kept).
          item_seq_len: int [B], 1 <= len <= N.
          k: how many items (<= the exported top_k; default the exported top_k).
          exclude_history: drop items already in the (truncated) history.
          platform: "cpu" | "cuda" | "tpu" (that platform's function, on its default device). Default: the
            running jax backend's function if the export has one, else the CPU function on the host's CPU
            device (``blossom-export``'s default export, served on a GPU or TPU host).
        Returns:
          (item_ids int32 [B, k], scores float32 [B, k]) best first; padding id 0 never appears.
        """
        import jax

        k = self.top_k if k is None else int(k)
        if not 1 <= k <= self.top_k:
            raise ValueError(f"k must be in [1, {self.top_k}] (the exported top_k), got {k}")
        seq, lengths = self._prepare(item_seq, item_seq_len)
        if platform is None:
            platform = default_platform(jax.default_backend(), self.platforms)
        key = (platform, bool(exclude_history))
        if key not in self._functions:
            raise ValueError(f"this export has no function for platform {platform!r} "
                             f"(exported: {self.platforms})")
        try:
            device = jax.devices(_BACKENDS.get(platform, platform))[0]
        except RuntimeError as error:
            raise ValueError(f"platform {platform!r} has no device on this host ({error})") from error
        with jax.default_device(device):
            item_ids, scores = self._functions[key].call(self.params, seq, lengths)
        return np.asarray(item_ids)[:, :k], np.asarray(scores)[:, :k]


_PLATFORMS = {"gpu": "cuda"}  # jax backend name -> jax.export platform name
_BACKENDS = {platform: backend for backend, platform in _PLATFORMS.items()}


def default_platform(backend: str, exported: Sequence[str]) -> str:
    """The export platform ``recommend`` uses by default on a host whose jax backend is ``backend`` ("cpu",
    "gpu", "tpu"): that backend's own platform when exported, else "cpu" when exported (any host has a CPU
    device), else the backend's platform (``recommend`` then raises, naming the exported platforms)."""
    own = _PLATFORMS.get(backend, backend)
    if own not in exported and "cpu" in exported:
        return "cpu"
    return own


def load(directory: str | pathlib.Path) -> Recommender:
    """Loads and verifies an export directory written by ``blossom_jax.export.export_model``.

    Raises ``ExportError`` (a ValueError) when a file is missing, altered or of another format.
    """
    import jax
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{config_path} is missing: not a blossom-jax export directory")
    try:
        manifest = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{config_path} is not valid JSON: {error}") from error
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ExportError(f"unknown export format {manifest.get('format')!r}; expected {ARTIFACT_FORMAT!r}")
    files = manifest.get("files", {})
    if PARAMS_FILE not in files:
        raise ExportError(f"{config_path} lists no {PARAMS_FILE}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in {CONFIG_FILE})")
        if file_digest(path) != expected:
            raise ExportError(f"{path} does not match its sha256 in {CONFIG_FILE}: altered or truncated")
    params = _unflatten(load_file(str(directory / PARAMS_FILE)))
    functions = {}
    for platform in manifest["platforms"]:
        for exclude in (False, True):
            name = function_file(platform, exclude)
            if name not in files:
                raise ExportError(f"{CONFIG_FILE} lists platform {platform!r} but not {name}")
            functions[(platform, exclude)] = jax.export.deserialize(bytearray((directory / name).read_bytes()))
    return Recommender(directory, manifest, params, functions)
