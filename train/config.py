"""Training configuration: one frozen dataclass, every field documented by the comment above it.

Resolution order (later wins): dataclass defaults (= the reference run, SPEC section 7) < the bundled-data
preset (only when ``data`` is unset and only for fields the user did not set) < a YAML file
(``--config``) < command-line flags. ``to_yaml`` writes the resolved config as commented YAML (the comments
are read from this file's source), which ``from_yaml`` reads back.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml

from blossom_jax.config import AttentionConfig, ModelConfig
from train.data import FORMATS, SHORT_USER_POLICIES
from train.metrics import KS, METRICS, PROTOCOLS, TIE_MODES

OBJECTIVES = ("prefix", "all-positions")
LOSSES = ("ce", "bpr")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Defaults reproduce the reference run (SPEC section 7)."""

    # --- data -------------------------------------------------------------------------------------
    # Interaction file; null = the bundled synthetic dataset (train/synthetic.py).
    data: str | None = None
    # File format: auto | seq | pairs | recbole | movielens ("auto" detects from extension/content).
    format: str = "auto"
    # Users with fewer than 3 items (no leave-one-out split): "train" = train-only, "drop" = ignore.
    short_users: str = "train"
    # Bundled data (ignored when data is set): number of users of the generator.
    synthetic_users: int = 1000
    # Bundled data: number of items (a multiple of 20, the number of clusters).
    synthetic_items: int = 400
    # Bundled data: generator seed.
    synthetic_seed: int = 0
    # Maximum sequence length N: each example keeps its last max_len items.
    max_len: int = 50

    # --- model ------------------------------------------------------------------------------------
    # Attention: "blossom" (BlossomRec sparse attention + RoPE) or "dense" (SASRec attention).
    attention: str = "blossom"
    # Attention implementation: auto | reference | xla | pallas (dense: auto/pallas = cuDNN on GPU in
    # bfloat16, else XLA; reference = explicit boolean mask).
    attention_impl: str = "auto"
    # Bidirectional (BERT4Rec-style masked-item) model instead of the causal next-item model.
    bidirectional: bool = False
    # Hidden size D (= num_heads * head_dim for BlossomRec attention).
    hidden_size: int = 128
    # Feed-forward inner size.
    inner_size: int = 256
    # Number of transformer layers.
    num_layers: int = 2
    # Query heads H.
    num_heads: int = 8
    # Key/value heads Hk (H must be a multiple).
    num_kv_heads: int = 2
    # Dropout on embeddings and hidden states.
    dropout: float = 0.2
    # Dropout on attention probabilities (dense attention only).
    attention_dropout: float = 0.2
    # Compute dtype of activations: float32 | bfloat16 (parameters stay float32).
    compute_dtype: str = "float32"
    # Extra AttentionConfig fields, e.g. {num_selected: 4, straight_through: false}.
    attn_overrides: dict = dataclasses.field(default_factory=dict)

    # --- objective --------------------------------------------------------------------------------
    # Training examples: "prefix" (every prefix of the training part predicts its next item) or
    # "all-positions" (windows of up to max_len items, stride max_len, a next-item loss at every position).
    objective: str = "prefix"
    # Loss of the causal model: "ce" (softmax over all item ids) or "bpr" (one uniform negative).
    loss: str = "ce"
    # Bidirectional model: fraction of the valid positions replaced by the mask token (at least one).
    mask_ratio: float = 0.2

    # --- optimisation -----------------------------------------------------------------------------
    # Training batch size (examples per step, over all devices).
    batch_size: int = 2048
    # Maximum number of epochs.
    epochs: int = 300
    # Stop after this many optimiser steps in total; 0 = no limit.
    max_steps: int = 0
    # Adam learning rate (peak, after warmup).
    learning_rate: float = 0.001
    # Linear warmup steps from 0 to learning_rate; 0 = constant rate.
    warmup_steps: int = 0
    # Decoupled (AdamW) weight decay; 0 = plain Adam.
    weight_decay: float = 0.0
    # Clip gradients to this global norm; 0 = no clipping.
    grad_clip_norm: float = 0.0
    # Random seed (parameters, dropout, masking, negatives, data order).
    seed: int = 2020

    # --- evaluation -------------------------------------------------------------------------------
    # Ranking protocol: "full" (all items) or "uni100" (100 uniform negatives per user).
    eval_protocol: str = "full"
    # Full ranking: also exclude the items the user had before the target (except the target).
    exclude_history: bool = False
    # Tie handling of ranks: expected | optimistic | pessimistic (see train/metrics.py).
    ties: str = "expected"
    # Evaluation batch size.
    eval_batch_size: int = 2048
    # Validation metric for early stopping and best-model selection (name@k, higher is better).
    valid_metric: str = "ndcg@10"
    # Stop after this many evaluations without improvement of valid_metric.
    patience: int = 15
    # Evaluate a popularity ranking with the same code and report it next to the model.
    popularity_baseline: bool = True

    # --- runtime ----------------------------------------------------------------------------------
    # Batches prepared ahead on a background thread (0 = none).
    prefetch: int = 2
    # Update the progress bar every this many steps.
    log_every: int = 10
    # Show a tqdm progress bar.
    progress: bool = True
    # Write TensorBoard event files (tensorboardX) under <out>/tb.
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _choice("format", self.format, ("auto", *FORMATS))
        _choice("short_users", self.short_users, SHORT_USER_POLICIES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("loss", self.loss, LOSSES)
        _choice("eval_protocol", self.eval_protocol, PROTOCOLS)
        _choice("ties", self.ties, TIE_MODES)
        for name in ("synthetic_users", "synthetic_items", "max_len", "batch_size", "epochs",
                     "eval_batch_size", "patience", "log_every", "hidden_size", "inner_size",
                     "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "warmup_steps", "prefetch", "seed", "synthetic_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "grad_clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        name, _, k = self.valid_metric.partition("@")
        if name not in METRICS or not k.isdigit() or int(k) not in KS:
            raise ValueError(f"valid_metric must be one of {METRICS} @ one of {KS}, got {self.valid_metric!r}")
        if self.bidirectional and self.loss != "ce":
            raise ValueError("the bidirectional (masked-item) objective supports only loss='ce'")
        if self.loss == "bpr" and self.objective != "prefix":
            raise ValueError("loss='bpr' is implemented for objective='prefix' only")
        if not isinstance(self.attn_overrides, dict):
            raise ValueError(f"attn_overrides must be a mapping, got {self.attn_overrides!r}")
        self.model_config(1)  # validates the model fields early

    def model_config(self, num_items: int) -> ModelConfig:
        """The ModelConfig of this run for a dataset of ``num_items`` items."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        attn = AttentionConfig(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                               head_dim=self.hidden_size // self.num_heads, **self.attn_overrides)
        return ModelConfig(num_items=num_items, max_len=self.max_len, hidden_size=self.hidden_size,
                           inner_size=self.inner_size, num_layers=self.num_layers, dropout=self.dropout,
                           attention_dropout=self.attention_dropout, attention=self.attention, attn=attn,
                           attention_impl=self.attention_impl, causal=not self.bidirectional,
                           compute_dtype=self.compute_dtype)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """``base`` (default: defaults) with ``values`` applied; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return dataclasses.replace(base or cls(), **values)

    def to_yaml(self) -> str:
        """The config as YAML with every field's comment above it."""
        docs = field_comments()
        out = io.StringIO()
        out.write("# blossom-train configuration (train/config.py:TrainConfig).\n")
        for f in dataclasses.fields(self):
            for line in docs.get(f.name, ()):
                out.write(f"# {line}\n")
            out.write(yaml.safe_dump({f.name: getattr(self, f.name)}, default_flow_style=False,
                                     sort_keys=False))
        return out.getvalue()

    @classmethod
    def from_yaml(cls, text: str, base: "TrainConfig | None" = None) -> "TrainConfig":
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"a config file must hold a mapping, got {type(values).__name__}")
        return cls.from_dict(values, base)


# Applied when no data file is given, to the fields the user did not set: sized so that
# `blossom-train` with no arguments trains and evaluates on the bundled data in about a minute on a
# 2-core CPU.
BUNDLED_PRESET: dict[str, Any] = {
    "hidden_size": 32, "inner_size": 64, "num_heads": 2, "num_kv_heads": 1, "num_layers": 2,
    "max_len": 20, "batch_size": 256, "epochs": 10, "patience": 5, "learning_rate": 0.003,
    "dropout": 0.1, "attention_dropout": 0.1,
}


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@lru_cache(maxsize=None)
def field_comments() -> dict[str, tuple[str, ...]]:
    """Field name -> the comment lines directly above it in TrainConfig's source."""
    source = inspect.getsource(TrainConfig)
    docs: dict[str, tuple[str, ...]] = {}
    pending: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text.startswith("---"):
                pending = []
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.line.strip().startswith(tok.string + ":"):
            if pending:
                docs[tok.string] = tuple(pending)
        elif tok.type == tokenize.NEWLINE and pending and not tok.line.strip().startswith("#"):
            pending = []
        if tok.type == tokenize.NAME and tok.string == "def":
            break
    return docs
