"""Start-up of a streaming run: the model's parameters become placeholders, and every unit's
starting state (from an initializer, a resumed checkpoint, the store itself, or the model's own
tensors) is written to its home. Main thread, one unit in memory at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offload.errors import BudgetError, OffloadError, format_bytes
from offload.tiers import Tier
from scheduler.model_map import ModelMap, ParamSlot, Unit
from scheduler.placement import Placement
from scheduler.settings import Initializer, ResumeState
from scheduler.state_store import StateStore
from scheduler.weight_streamer import WeightStreamer


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers (RoPE tables, masks) live on DEVICE for the whole run."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def check_device_fits(placement: Placement, model_map: ModelMap) -> None:
    """DEVICE must hold pre + post, one layer's weights and the gradients of the largest unit."""
    m, budget_bytes = model_map, placement.plan.device_budget_bytes
    weights = [u.numel + u.frozen_numel for u in m.units]
    need = placement.device_floor_bytes(weights[0] + weights[-1], max(weights[1:-1]), max(u.numel for u in m.units))
    if need > budget_bytes:
        raise BudgetError(f"the device budget {format_bytes(budget_bytes)} is too small: embeddings, head, one "
                          f"layer and its gradients need {format_bytes(need)}; raise offload.gpu_memory_limit")


def replace_parameters(model: nn.Module, model_map: ModelMap, dtype: torch.dtype,
                       device: torch.device) -> dict[str, nn.Parameter]:
    """Give every parameter an empty placeholder (tied parameters stay one object); returns the
    placeholders by qualified name (the WeightStreamer binds weights into them)."""
    old_by_name = dict(model.named_parameters())
    new_by_old: dict[int, nn.Parameter] = {}
    params: dict[str, nn.Parameter] = {}
    for unit in model_map.units:
        for slot in unit.all_params:
            old = old_by_name[slot.name]
            new = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=old.requires_grad)
            new_by_old[id(old)] = new
            params[slot.name] = new
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in new_by_old:
                module._parameters[pname] = new_by_old[id(p)]
    return params


@dataclass
class StartingState:
    """Where the units' starting state comes from (the first that is set)."""

    state_in_store: bool = False  # the store already holds every unit's states under our names
    resume: ResumeState | None = None  # a checkpoint's states
    initializer: Initializer | None = None  # initial weights (zero Adam states)
    originals: dict[str, torch.Tensor] | None = None  # else: the model's own tensors, by name


def initialize_unit(u: Unit, start: StartingState, state: StateStore, weights: WeightStreamer) -> None:
    """Write a unit's master weights, Adam states and compute weights, and its frozen weights."""
    sd, compute = state.state_dtype, state.compute_dtype
    from_given = not start.state_in_store and start.resume is None  # else the state comes from a checkpoint
    given = _given_tensors(u, start) if from_given or u.frozen else {}  # frozen weights: always given
    if u.frozen:
        frozen = _flat(u.frozen, given, compute)
        state.init_frozen(u, frozen)
        if state.placement.resident(u.index):
            weights.place_resident(u, frozen, frozen=True)
    if not u.params:
        return
    if start.state_in_store:
        if state.placement.plan.optimizer != Tier.NVME:
            raise ValueError("state_in_store needs a plan with the optimizer states on NVME")
        master = state.read_unit(u, "master")  # (from the store: nothing is in RAM yet)
        if state.tier("master", u) == Tier.HOST:  # a unit the plan keeps in RAM: copy it there
            state.init_state(u, master, state.read_unit(u, "exp_avg"), state.read_unit(u, "exp_avg_sq"))
    else:
        if start.resume is not None:
            master, exp_avg, exp_avg_sq = start.resume(u)
            for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if t.dtype != sd or t.numel() != u.numel:
                    raise OffloadError(f"saved {name} of {u.name} has {t.numel()} x {t.dtype}, expected "
                                       f"{u.numel} x {sd}: the checkpoint is from another model or "
                                       f"model.state_dtype")
        else:
            master, exp_avg, exp_avg_sq = _flat(u.params, given, sd), None, None
        state.init_state(u, master, exp_avg, exp_avg_sq)
    compute_weights = master.to(compute)
    state.init_weights(u, master, compute_weights)
    if state.tier("weight", u) == Tier.DEVICE:
        weights.place_resident(u, compute_weights)


def _given_tensors(u: Unit, start: StartingState) -> dict[str, torch.Tensor]:
    """A unit's starting tensors by name: from the initializer, or the model's own tensors."""
    if start.initializer is not None:
        return start.initializer(u)
    assert start.originals is not None
    return {s.name: start.originals.pop(s.name) for s in u.all_params}


def _flat(slots: tuple[ParamSlot, ...], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors of ``slots`` laid out in one flat buffer of ``dtype``."""
    flat = torch.empty(sum(s.numel for s in slots), dtype=dtype)
    for s in slots:
        t = tensors[s.name]
        if tuple(t.shape) != s.shape:
            raise OffloadError(f"initial tensor {s.name} has shape {tuple(t.shape)}, expected {s.shape}")
        flat[s.offset : s.offset + s.numel].copy_(t.reshape(-1))
    return flat
