"""What a batch passes to the model's forward, and the evaluation loss of its output: one rule
for the streaming engine and the in-memory reference.

Besides ``input_ids``, every tensor of the batch that the model's ``forward`` takes by name goes
in (``attention_mask``, ``position_ids``, GPT-2's ``token_type_ids``, ...), as Trainer passes a
dataset's columns; ``labels`` and ``num_items_in_batch`` are the loss's, and inputs that bypass
the streamed embeddings or carry a generation cache are refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

LOSS_KEYS = frozenset({"labels", "num_items_in_batch"})
REFUSED = frozenset({"inputs_embeds", "past_key_values", "encoder_hidden_states"})
ENGINE_SET = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states",
                        "cache_position", "logits_to_keep"})


def forward_names(model: nn.Module) -> frozenset[str]:
    """The names ``model.forward`` takes by name; a PEFT model's, and its base model's (to which
    its ``**kwargs`` go)."""
    names = frozenset(inspect.signature(model.forward).parameters)
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    return names | forward_names(base) if isinstance(base, nn.Module) and base is not model else names


def model_inputs(model: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The keyword arguments of the model's forward for ``batch`` (without labels), on ``device``."""
    refused = sorted(REFUSED & batch.keys())
    if refused:
        raise ValueError(f"the batch holds {', '.join(refused)}: the engine streams the model from input_ids "
                         f"(and attention_mask, position_ids); drop {'it' if len(refused) == 1 else 'them'}")
    names = forward_names(model)
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    for key, value in batch.items():
        if key in names and key not in kwargs and key not in LOSS_KEYS | ENGINE_SET and isinstance(value, torch.Tensor):
            kwargs[key] = value.to(device)
    return kwargs


def eval_loss_sum(model: nn.Module, out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """(sum of token losses, target tokens, router term) of a causal-LM output: transformers'
    loss (shifted, fp32, -100 not a target) summed, and what an MoE model adds to its own loss
    (``router_aux_loss_coef`` x ``aux_loss``, present where the config sets
    ``output_router_logits``; else 0): the model's loss is sum / targets + router term."""
    logits = out.logits
    targets = labels[..., 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].float().flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    coef = getattr(model, "router_aux_loss_coef", None)  # what the model adds to its own loss
    router = float(coef * aux.float()) if aux is not None and coef else 0.0
    return loss_sum, int(targets.ne(-100).sum()), router
