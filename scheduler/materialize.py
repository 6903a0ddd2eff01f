"""Build a model without its weights, and produce each unit's initial weights one at a time.

A model larger than RAM is never materialized whole: ``empty_model`` builds it with parameters on
the meta device (buffers such as RoPE frequencies stay real), and the executor asks an
initializer for one unit's tensors at a time, writes them to their tier and drops them.

- ``RandomInit``: Hugging Face init semantics (``model._init_weights`` applied to the unit's
  modules, children before parents, as ``PreTrainedModel.initialize_weights`` does).
- ``scheduler.hf_checkpoint.CheckpointInit``: streams tensors from a local Hugging Face
  checkpoint (sharded or not), converted as ``from_pretrained`` converts them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from offload.errors import OffloadError, first_line
from scheduler.model_map import Unit


def empty_model(config: object, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with parameters on meta; buffers stay on CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from scheduler.hf_checkpoint import tie_weights

    model_type = getattr(config, "model_type", type(config).__name__)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, ImportError, AttributeError, KeyError) as err:
        first = first_line(err)
        if "Unrecognized configuration class" in first:
            first = f"transformers has no causal LM (AutoModelForCausalLM) for model_type {model_type!r}"
        raise OffloadError(f"cannot build the model ({first}); offload-train fine-tunes decoder-only "
                           f"causal LMs (Llama, Qwen, Mistral, Gemma, GPT-2, ...)") from None
    tie_weights(model)  # the context re-registers a tied head as a new Parameter: tie it again
    causal = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if causal == {False}:  # every attention bidirectional: an encoder's LM head (BERT without is_decoder)
        raise OffloadError(f"the {model_type} model's attention is bidirectional (an encoder), not a causal LM; "
                           f"offload-train fine-tunes decoder-only causal LMs (set is_decoder: true in its "
                           f"config if it is meant as a decoder)")
    return model


class RandomInit:
    """Random initial weights of one unit, with the model's own ``_init_weights``.

    Called by the executor after it replaced the parameters with empty placeholders: each
    parameter of the unit gets an fp32 tensor for the duration of the call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, unit: Unit) -> dict[str, torch.Tensor]:
        init_weights = getattr(self.model, "_init_weights", None)
        if init_weights is None:
            raise OffloadError(f"{type(self.model).__name__} has no _init_weights: give model.name_or_path")
        params = {s.name: (self.model.get_parameter(s.name), s.shape) for s in unit.all_params}
        saved = {name: p.data for name, (p, _) in params.items()}
        try:
            for p, shape in params.values():
                p.data = torch.empty(shape, dtype=torch.float32)
            for module in self._modules_of(unit):
                module.apply(init_weights)  # children first, then the module itself
            return {name: p.data for name, (p, _) in params.items()}
        finally:
            for name, (p, _) in params.items():
                p.data = saved[name]

    def _modules_of(self, unit: Unit) -> list[nn.Module]:
        if unit.modules:
            return list(unit.modules)
        owners: list[nn.Module] = []
        for s in unit.all_params:
            owner = self.model.get_submodule(s.name.rpartition(".")[0])
            if all(owner is not o for o in owners):
                owners.append(owner)
        return owners


def materialize_in_memory(model: nn.Module, initializer: Callable[[Unit], dict[str, torch.Tensor]]) -> nn.Module:
    """Give an empty (meta) model real fp32 weights in RAM, unit by unit, from ``initializer``.

    Uses the same per-unit initialization order as the streaming executor, so with the same seed
    both engines start from identical weights (the reference engine relies on it).
    """
    from scheduler.model_map import build_model_map

    mm = build_model_map(model)
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in placeholders:
                placeholders[id(p)] = nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
            module._parameters[name] = placeholders[id(p)]
    for unit in mm.units:
        tensors = initializer(unit)
        for s in unit.all_params:
            model.get_parameter(s.name).data = tensors[s.name].to(torch.float32).reshape(s.shape).clone()
    return model
