"""Frozen, validated configuration dataclasses for BlossomRec attention and the recommender.

Every field is documented where it is declared; defaults reproduce the reference release (SPEC.md).
Only the standard library is imported here so that serving code can use these classes without flax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")
ATTENTION_KINDS = ("blossom", "dense")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Every knob of BlossomRec attention (SPEC sections 2-5). Defaults = the reference release."""

    # Query heads H.
    num_heads: int = 8
    # Key/value heads Hk (GQA); num_heads must be a multiple. G = num_heads // num_kv_heads.
    num_kv_heads: int = 2
    # Per-head feature size d (even: RoPE rotates interleaved pairs).
    head_dim: int = 16
    # LTIS compression window length l (keys per compressed block).
    compress_block: int = 32
    # LTIS compression stride s (a new compressed block every s keys).
    compress_stride: int = 16
    # LTIS selection block size b: a selected block contributes b contiguous keys. Must equal s
    # (the only geometry the reference defines).
    selection_block: int = 16
    # LTIS number of selected blocks n per query and kv head.
    num_selected: int = 4
    # A selected block is kept only if its selection probability exceeds this (reference: 1e-10).
    keep_threshold: float = 1e-10
    # STIS local window: offsets 0..window-1 (and -(window-1)..-1 when bidirectional).
    window: int = 8
    # STIS: whether the last padded position N-1 is an extra key for every query (reference: on).
    sink: bool = True
    # RoPE base theta.
    rope_base: float = 10000.0
    # Causal (SASRec-style) or bidirectional (BERT4Rec-style) rules.
    causal: bool = True
    # Extension (off = reference): straight-through gates give the compression MLP, the intra-block
    # position table and the queries a gradient through the selected blocks' selection probability.
    straight_through: bool = False
    # Extension (off = reference quirk): mask padded keys inside kept LTIS blocks (bidirectional mode).
    mask_padded_block_keys: bool = False
    # xla impl: queries per chunk for compressed scoring / selection / gathers (multiple of
    # selection_block). Bounds temporary memory at O(chunk * N / s) instead of O(N^2 / s).
    query_chunk: int = 1024

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "compress_block", "compress_stride",
                     "selection_block", "num_selected", "window", "query_chunk"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for interleaved RoPE, got {self.head_dim}")
        if self.selection_block % self.compress_stride:
            raise ValueError(
                f"selection_block ({self.selection_block}) must be a multiple of compress_stride "
                f"({self.compress_stride})")
        if self.selection_block != self.compress_stride:
            raise ValueError(
                f"selection_block ({self.selection_block}) must equal compress_stride "
                f"({self.compress_stride}): the reference defines LTIS only for b == s")
        if self.compress_block < self.compress_stride:
            raise ValueError(
                f"compress_block ({self.compress_block}) must be >= compress_stride "
                f"({self.compress_stride})")
        if not 0.0 <= self.keep_threshold < 1.0:
            raise ValueError(f"keep_threshold must be in [0, 1), got {self.keep_threshold}")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.query_chunk % self.selection_block:
            raise ValueError(
                f"query_chunk ({self.query_chunk}) must be a multiple of selection_block "
                f"({self.selection_block})")

    @property
    def group_size(self) -> int:
        """Query heads per kv head, G."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "AttentionConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig:
    """The sequential recommender (SPEC section 6). Defaults = the reference run."""

    # Number of real items; item ids are 1..num_items, 0 is padding. The embedding table has
    # num_items + 1 rows (+1 more, the mask token num_items + 1, for the bidirectional model).
    num_items: int = 1
    # Maximum sequence length N (longer histories keep their last max_len items).
    max_len: int = 50
    # Hidden size D = num_heads * head_dim for BlossomRec attention.
    hidden_size: int = 128
    # Feed-forward inner size.
    inner_size: int = 256
    # Number of transformer layers L.
    num_layers: int = 2
    # Dropout on embeddings and hidden states.
    dropout: float = 0.2
    # Dropout on dense attention probabilities (dense baseline only; BlossomRec has none).
    attention_dropout: float = 0.2
    # "blossom" (BlossomRec attention + RoPE) or "dense" (SASRec multi-head attention + learned positions).
    attention: str = "blossom"
    # BlossomRec attention knobs; for "dense", num_heads is used and the rest ignored.
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    # Attention implementation: auto | reference | xla | pallas. For "dense" (models.dense_impl): auto and
    # pallas = cuDNN flash attention on GPU in bfloat16, else XLA; xla = XLA; reference = boolean mask.
    attention_impl: str = "auto"
    # Causal (SASRec next-item) or bidirectional (BERT4Rec masked-item) model.
    causal: bool = True
    # Activations / matmul dtype; parameters always stay float32.
    compute_dtype: str = "float32"
    # LayerNorm epsilon (RecBole: 1e-12).
    layer_norm_eps: float = 1e-12
    # Std of the normal initialiser of every Linear and Embedding weight.
    initializer_range: float = 0.02
    # User vectors (__call__, score, the prefix objective) and the BERT4Rec loss compute the last layer
    # only at the positions that are read: the user vector's, the masked ones (encode(query_positions=...)).
    # Exact up to float rounding: no other row of that layer is read. False: every position, then the rows
    # are taken (as the reference does).
    last_layer_rows: bool = True

    def __post_init__(self) -> None:
        for name in ("num_items", "max_len", "hidden_size", "inner_size", "num_layers"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.attn, dict):  # allow construction from parsed YAML/JSON
            object.__setattr__(self, "attn", AttentionConfig(**self.attn))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_impl must be one of {IMPLEMENTATIONS}, got {self.attention_impl!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.attn.causal != self.causal:
            object.__setattr__(self, "attn", self.attn.replace(causal=self.causal))
        if self.hidden_size % self.attn.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.attn.num_heads})")
        if self.attention == "blossom" and self.attn.num_heads * self.attn.head_dim != self.hidden_size:
            raise ValueError(
                f"BlossomRec needs hidden_size == num_heads * head_dim, got {self.hidden_size} != "
                f"{self.attn.num_heads} * {self.attn.head_dim}")

    @property
    def mask_token_id(self) -> int:
        """Item id of the [MASK] token of the bidirectional model."""
        return self.num_items + 1

    @property
    def embedding_rows(self) -> int:
        """Rows of the item embedding table (padding + items [+ mask token])."""
        return self.num_items + 1 + (0 if self.causal else 1)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        values = dict(values)
        if isinstance(values.get("attn"), dict):
            values["attn"] = AttentionConfig(**values["attn"])
        return cls(**values)
