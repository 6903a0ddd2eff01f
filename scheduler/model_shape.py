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
    trainable: tuple[int, int, int] | None = None
    """(pre, largest layer, post) trainable parameters when some are frozen (LoRA adapters on a
    frozen base: only these have gradients and optimizer state); None: every parameter trains.
    The ``*_numel`` counts above are all weights, trainable or not."""
    shared_trainable_numel: int = 0
    """Trainable parameters used in two places (a tied LM head's weight, counted once in
    ``pre``): in a layer-major step the head's part of their gradient waits for the embeddings'
    backward of the same micro-batch."""

    def __post_init__(self) -> None:
        if min(self.n_layers, self.layer_numel, self.hidden, self.n_heads, self.vocab) < 1:
            raise ValueError(f"model shape has a non-positive dimension: {self}")

    @property
    def total_numel(self) -> int:
        return self.n_layers * self.layer_numel + self.pre_numel + self.post_numel

    @property
    def largest_unit_numel(self) -> int:
        return max(self.layer_numel, self.pre_numel, self.post_numel)

    @property
    def frozen(self) -> bool:
        """Some weights are frozen: stored once, streamed, no state (``Unit.frozen``)."""
        return self.trainable is not None

    @property
    def _trainable(self) -> tuple[int, int, int]:
        return self.trainable if self.trainable is not None else (self.pre_numel, self.layer_numel, self.post_numel)

    @property
    def layer_trainable_numel(self) -> int:
        return self._trainable[1]

    @property
    def pre_trainable_numel(self) -> int:
        return self._trainable[0]

    @property
    def trainable_numel(self) -> int:
        """Parameters with gradients and optimizer state."""
        pre, layer, post = self._trainable
        return pre + self.n_layers * layer + post

    def first_units_trainable_numel(self, k: int) -> int:
        """Trainable parameters of the first ``k`` units in forward order (pre, layers, post)."""
        pre, layer, post = self._trainable
        k = max(k, 0)
        return (pre if k else 0) + layer * min(max(k - 1, 0), self.n_layers) + (post if k >= self.n_layers + 2 else 0)

    @property
    def post_trainable_numel(self) -> int:
        return self._trainable[2]

    @property
    def end_trainable_numel(self) -> int:
        """Trainable parameters of the embeddings and head (``pre`` and ``post``)."""
        return self._trainable[0] + self._trainable[2]

    @property
    def largest_trainable_unit_numel(self) -> int:
        return max(self._trainable)

    @property
    def streamed_layer_numel(self) -> int:
        """Weights of a streamed layer that travel from their tier: all of them, or only the
        frozen ones (trainable weights beside frozen ones stay on DEVICE, ``Placement``)."""
        return self.layer_numel - self.layer_trainable_numel if self.frozen else self.layer_numel


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
    frozen = any(u.frozen for u in mm.units)
    trainable = (mm.pre.numel, max(u.numel for u in mm.layer_units), mm.post.numel) if frozen else None
    shared = (sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)
              - sum(p.numel() for p in model.parameters() if p.requires_grad))
    return ModelShape(n_layers=len(mm.layer_units), layer_numel=max(u.numel + u.frozen_numel for u in mm.layer_units),
                      pre_numel=mm.pre.numel + mm.pre.frozen_numel, post_numel=mm.post.numel + mm.post.frozen_numel,
                      fused_attention=attn not in (None, "eager"), trainable=trainable,
                      shared_trainable_numel=shared, **_dims(hf_config))


def shape_from_config(hf_config: Any, trust_remote_code: bool = False) -> ModelShape:
    """Counts from a meta-device build of the config: exact, and no memory used."""
    from scheduler.materialize import empty_model

    return shape_from_model(empty_model(hf_config, trust_remote_code=trust_remote_code), hf_config)
