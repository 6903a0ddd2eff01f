"""A model's shape from its config alone: parameter counts per unit and the dimensions that set
compute and activation sizes. No weights are needed, so a 70B model is planned on a laptop.

``shape_from_config`` builds the model on the meta device (no memory) and cuts it into units with
the same model map the executor uses, so the counts are exact for every supported architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from scheduler.model_map import build_model_map


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    layer_numel: int
    """Parameters of the largest decoder layer."""
    pre_numel: int
    """Parameters before the first layer (embeddings; a tied LM head's weight counts here)."""
    post_numel: int
    """Parameters after the last layer (final norm, untied LM head)."""
    hidden: int
    intermediate: int
    n_heads: int
    head_dim: int
    vocab: int
    fused_attention: bool = False
    """Attention runs in a fused kernel (SDPA, flash): no score matrix is materialized or saved.
    False (eager attention, or unknown) counts the scores: an upper bound."""

    def __post_init__(self) -> None:
        if min(self.n_layers, self.layer_numel, self.hidden, self.n_heads, self.vocab) < 1:
            raise ValueError(f"model shape has a non-positive dimension: {self}")

    @property
    def total_numel(self) -> int:
        return self.n_layers * self.layer_numel + self.pre_numel + self.post_numel

    @property
    def largest_unit_numel(self) -> int:
        return max(self.layer_numel, self.pre_numel, self.post_numel)


def _dims(hf_config: Any) -> dict[str, int]:
    def first(*names: str, default: int = 0) -> int:
        for name in names:
            value = getattr(hf_config, name, None)
            if isinstance(value, (list, tuple)):  # per-layer values (e.g. Gemma 3n): the largest
                value = max((v for v in value if isinstance(v, (int, float))), default=None)
            if value:
                return int(value)
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", default=1)
    return {
        "hidden": hidden,
        "intermediate": first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        "n_heads": heads,
        "head_dim": first("head_dim", default=hidden // max(heads, 1)),
        "vocab": first("vocab_size"),
    }


def shape_from_model(model: nn.Module, hf_config: Any) -> ModelShape:
    """Counts from a built model (meta or real) and dimensions from its config."""
    mm = build_model_map(model)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return ModelShape(n_layers=len(mm.layer_units), layer_numel=max(u.numel for u in mm.layer_units),
                      pre_numel=mm.pre.numel, post_numel=mm.post.numel,
                      fused_attention=attn not in (None, "eager"), **_dims(hf_config))


def shape_from_config(hf_config: Any, trust_remote_code: bool = False) -> ModelShape:
    """Counts from a meta-device build of the config: exact, and no memory used."""
    from scheduler.materialize import empty_model

    return shape_from_model(empty_model(hf_config, trust_remote_code=trust_remote_code), hf_config)
