"""Cut a Hugging Face causal LM into streamable units without editing the model's code.

Units, in forward order: ``pre`` (everything that runs before the decoder layers: token and
position embeddings), ``layer.0`` .. ``layer.{L-1}`` (the repeated decoder layers), ``post`` (final
norm and LM head). A tied LM head shares its weight with the embedding; the weight belongs to
``pre`` (its gradient is complete only after the embedding's backward, which comes last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.errors import OffloadError


class UnsupportedArchitecture(OffloadError):
    """The model does not cut into pre / repeated decoder layers / post units."""


KNOWN_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


@dataclass(frozen=True)
class ParamSlot:
    """One parameter of a unit: its qualified name, shape and place in the unit's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, into the unit's flat buffer
    numel: int


@dataclass(frozen=True)
class Unit:
    """A group of parameters loaded, updated and released together.

    ``params`` are the trainable ones (master weights, gradients, Adam states: one flat buffer);
    ``frozen`` the ones that do not require grad (a second flat buffer, weights only: no state,
    never written after start-up), e.g. the base weights under LoRA adapters."""

    name: str
    index: int  # position in forward order
    modules: tuple[nn.Module, ...]
    params: tuple[ParamSlot, ...]
    frozen: tuple[ParamSlot, ...] = ()

    @property
    def numel(self) -> int:
        """Elements of the trainable parameters."""
        return sum(p.numel for p in self.params)

    @property
    def frozen_numel(self) -> int:
        return sum(p.numel for p in self.frozen)

    @property
    def all_params(self) -> tuple[ParamSlot, ...]:
        return self.params + self.frozen

    @property
    def is_layer(self) -> bool:
        return self.name.startswith("layer.")


@dataclass(frozen=True)
class ModelMap:
    units: tuple[Unit, ...]
    layers: nn.ModuleList
    layers_path: str

    @property
    def pre(self) -> Unit:
        return self.units[0]

    @property
    def post(self) -> Unit:
        return self.units[-1]

    @property
    def layer_units(self) -> tuple[Unit, ...]:
        return self.units[1:-1]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder layers: known paths first, then the largest uniform ModuleList."""
    modules = dict(model.named_modules())
    for path in (*KNOWN_LAYER_PATHS, *(f"base_model.model.{p}" for p in KNOWN_LAYER_PATHS)):  # PEFT-wrapped too
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            if len(classes) == 1 and (best is None or len(module) > len(best[1])):
                best = (path, module)
    if best is None:
        raise UnsupportedArchitecture(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
            f"identical blocks; supported families include Llama, Mistral, Qwen2, GPT-2, GPT-NeoX"
        )
    return best


def build_model_map(model: nn.Module) -> ModelMap:
    """Assign every parameter of ``model`` to exactly one unit (tied parameters once)."""
    layers_path, layers = find_decoder_layers(model)
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = i
    after = _modules_after(model, layers_path)
    pre_params: list[tuple[str, torch.Tensor]] = []
    post_params: list[tuple[str, torch.Tensor]] = []
    per_layer: list[list[tuple[str, torch.Tensor]]] = [[] for _ in layers]
    for name, p in model.named_parameters():  # deduplicated: a tied weight appears once
        if id(p) in layer_of:
            per_layer[layer_of[id(p)]].append((name, p))
        elif any(name == m or name.startswith(m + ".") for m in after):
            post_params.append((name, p))
        else:
            pre_params.append((name, p))
    units = [_unit("pre", 0, (), pre_params)]
    for i, params in enumerate(per_layer):
        units.append(_unit(f"layer.{i}", i + 1, (layers[i],), params))
    units.append(_unit("post", len(units), (), post_params))
    return ModelMap(tuple(units), layers, layers_path)


def _modules_after(model: nn.Module, layers_path: str) -> list[str]:
    """Qualified names of the modules registered after the layers, at each level of the path."""
    after: list[str] = []
    parts = layers_path.split(".")
    parent: nn.Module = model
    prefix = ""
    for part in parts:
        names = [n for n, _ in parent.named_children()]
        idx = names.index(part)
        after.extend(prefix + n for n in names[idx + 1 :])
        parent = getattr(parent, part)
        prefix = prefix + part + "."
    return after


def with_frozen(u: Unit, master: torch.Tensor, frozen: torch.Tensor | None) -> tuple[list[ParamSlot], torch.Tensor]:
    """A unit's trainable ``master`` and its ``frozen`` weights as slots into one flat buffer (of
    the master's dtype): the frozen slots follow the trainable ones."""
    if frozen is None or not u.frozen:
        return list(u.params), master
    moved = [ParamSlot(s.name, s.shape, s.offset + u.numel, s.numel) for s in u.frozen]
    return list(u.params) + moved, torch.cat([master, frozen.to(master.dtype)])


def _unit(name: str, index: int, modules: tuple[nn.Module, ...],
          params: list[tuple[str, torch.Tensor]]) -> Unit:
    """Trainable and frozen parameters each get their own flat layout."""
    return Unit(name, index, modules, _slots([(n, p) for n, p in params if p.requires_grad]),
                _slots([(n, p) for n, p in params if not p.requires_grad]))


def _slots(params: list[tuple[str, torch.Tensor]]) -> tuple[ParamSlot, ...]:
    slots = []
    offset = 0
    for pname, p in params:
        slots.append(ParamSlot(pname, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return tuple(slots)


def trainable_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The name of the first tensor among a layer's other arguments that requires grad, if any."""
    named = [(f"argument {k + 1}", a) for k, a in enumerate(args)] + list(kwargs.items())
    for name, obj in named:
        stack = [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                if item.requires_grad:
                    return name
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
    return None


def check_layer_arguments(model: nn.Module, args_rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A decoder layer may receive tensors besides its hidden states (RoPE tables, masks), but
    none that requires grad: the cut back-propagates each layer from its hidden-state input only."""
    trainable = trainable_argument(args_rest, kwargs)
    if trainable is not None:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} passes a trainable tensor ({trainable}) to its decoder layers "
            f"besides the hidden states: its gradient would not reach the unit that made it, so this "
            f"architecture cannot be trained layer by layer")
