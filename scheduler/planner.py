"""Choose the plan with the least predicted step time that fits the budgets.

The search is exhaustive over the discrete choices (where weights, optimizer states, gradients
and activation checkpoints live; recompute or not; prefetch depth) and greedy over the counts
that only ever help when memory allows (turn layers, then resident layers from layer 0 up). Each
candidate is scored by ``cost_model.estimate``; one whose predicted peak exceeds a budget in any
tier is never chosen. Without a GPU, DEVICE and HOST are the same RAM: the planner also chooses
how to split it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from offload.errors import BudgetError, format_bytes
from offload.tiers import Tier
from scheduler.cost_model import (
    STAGING_ARRAYS,
    Estimate,
    LayerTiming,
    activation_bytes,
    estimate,
    peak_memory,
)
from scheduler.model_shape import ModelShape
from scheduler.placement import grads_kept
from scheduler.plan import Plan
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload, lent_master_layers

MAX_CHUNK_NUMEL = 4 << 20  # 16 MiB of fp32 per optimizer chunk streams at full speed
MAX_TURN_KEEP = 2
DEVICE_SHARES = (0.3, 0.45, 0.6, 0.75, 0.9)  # tried when DEVICE and HOST share one RAM budget


@dataclass(frozen=True)
class Budgets:
    device_bytes: int
    host_bytes: int
    nvme_bytes: int
    """Free space at nvme_path."""
    shared: bool = False
    """DEVICE and HOST are one memory (no GPU): the planner may move bytes between them."""


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    estimate: Estimate
    candidates: int
    """Feasible plans compared."""
    timing: LayerTiming | None = None
    """The layer probe the estimate used (activation sizes and times), if any."""


def choose_plan(shape: ModelShape, wl: Workload, budgets: Budgets, profile: HardwareProfile, *,
                overlap: bool = True, recompute: bool | None = None,
                prefetch_depth: int | None = None, timing: LayerTiming | None = None) -> PlanChoice:
    """The fastest feasible plan; ``BudgetError`` says what does not fit, by how much, and what
    would make it fit. ``recompute``/``prefetch_depth`` fix those choices when not None."""
    splits = [(budgets.device_bytes, budgets.host_bytes)]
    if budgets.shared:
        total = budgets.device_bytes + budgets.host_bytes
        splits += [(int(total * s), total - int(total * s)) for s in DEVICE_SHARES]
    best: tuple[tuple[float, int, int, int], Plan, Estimate] | None = None
    feasible = 0
    for device_bytes, host_bytes in splits:
        for plan in _candidates(shape, wl, device_bytes, host_bytes, overlap, recompute, prefetch_depth,
                                gpu=profile.h2d_gbps is not None, timing=timing):
            est = estimate(plan, shape, wl, profile, timing)
            mem = est.memory
            if mem.device_bytes > device_bytes or mem.host_bytes > host_bytes or mem.nvme_bytes > budgets.nvme_bytes:
                continue
            feasible += 1
            key = (round(est.step_s, 9), mem.nvme_bytes, mem.host_bytes, mem.device_bytes)
            if best is None or key < best[0]:
                best = (key, plan, est)
    if best is None:
        raise BudgetError(_why_infeasible(shape, wl, budgets, overlap, recompute))
    return PlanChoice(plan=best[1], estimate=best[2], candidates=feasible, timing=timing)


def _chunk_numel(host_bytes: int, itemsize: int) -> int:
    """Optimizer staging (``itemsize`` bytes per state element) takes at most half the host budget."""
    return min(MAX_CHUNK_NUMEL, host_bytes // 2 // (STAGING_ARRAYS * itemsize)) // 2048 * 2048


def _candidates(shape: ModelShape, wl: Workload, device_bytes: int, host_bytes: int, overlap: bool,
                recompute: bool | None, prefetch_depth: int | None, gpu: bool,
                timing: LayerTiming | None):  # noqa: ANN202 - generator
    chunk = _chunk_numel(host_bytes, wl.state_itemsize)
    if chunk < 2048:
        return
    # (recompute, activations tier, layers recomputed among swapped ones: selective recompute)
    acts = [(True, Tier.DEVICE, 0), (True, Tier.HOST, 0), (True, Tier.NVME, 0), (False, Tier.DEVICE, 0)]
    if not gpu:  # swapped activations: measured on CPU-only machines only so far
        L = shape.n_layers
        acts += [(False, Tier.NVME, r) for r in sorted({0, L // 4, L // 2, 3 * L // 4}) if r == 0 or r <= L - 3]
    if recompute is not None:  # a fixed choice: selective recompute is neither
        acts = [a for a in acts if a[0] == recompute and a[2] == 0]
    depths = [prefetch_depth] if prefetch_depth is not None else ([1, 2, 3] if overlap else [0])
    # accumulation: micro-batch by micro-batch (gradients kept in a tier), or layer-major (each
    # layer loaded once per step; every micro-batch's activations kept): the estimate decides,
    # unless the forward draws dropout masks (layer-major would draw them in another order)
    orders = (False, True) if wl.grad_accum > 1 and not wl.random_forward else (False,)
    # job slots: units whose gradients wait for the optimizer; 1 saves a unit's gradients of
    # DEVICE memory (the worker runs one job at a time either way; 2 only absorbs uneven jobs)
    slots = (2, 1) if overlap else (1,)
    for layer_major, weights, optimizer, (rec, act_tier, rec_layers), depth, job_slots in itertools.product(
            orders, (Tier.HOST, Tier.NVME), (Tier.HOST, Tier.NVME), acts, depths, slots):
        # a grads tier: every unit's kept gradient, or layer-major the embeddings' and head's
        # (``Placement.keeps_grad``): RAM or SSD, as the estimate decides
        kept = grads_kept(wl.grad_accum, wl.deferred, layer_major) or (layer_major and wl.grad_accum > 1)
        # updates taking the master from the weights loaded for backward: fewer SSD reads, more
        # DEVICE memory (tried wherever ``Placement.master_from_loads`` applies)
        for grads, master_from_loads in itertools.product((Tier.HOST, Tier.NVME) if kept else (optimizer,),
                                                          (False, True)):
            base = Plan(weights=weights, optimizer=optimizer, grads=grads, activations=act_tier,
                        recompute=rec, recompute_layers=rec_layers, prefetch_depth=depth, turn_keep=0,
                        resident_layers=(), overlap=overlap, master_from_loads=master_from_loads,
                        layer_major=layer_major, device_budget_bytes=device_bytes, host_budget_bytes=host_bytes,
                        job_slots=job_slots, chunk_numel=chunk)
            if master_from_loads and not lent_master_layers(shape, wl, wl.placement(base, shape, on_gpu=gpu)):
                continue  # the rule does not apply here: the same plan as without it
            plan = _fill_device(base, shape, wl, timing, gpu)
            if plan is not None:
                yield _fill_host(plan, shape, wl, timing, gpu)


def _fill_device(plan: Plan, shape: ModelShape, wl: Workload, timing: LayerTiming | None = None,
                 gpu: bool = False) -> Plan | None:
    """Spend the DEVICE memory left on turn layers, then resident layers; None if none fits."""
    free = plan.device_budget_bytes - peak_memory(plan, shape, wl, timing, gpu).device_bytes
    if free < 0:
        return None
    w_layer = shape.layer_numel * wl.itemsize
    L = shape.n_layers
    if free >= L * w_layer:  # every layer fits: nothing streams
        return replace(plan, resident_layers=tuple(range(L)))
    turn = min(MAX_TURN_KEEP, L - 1, free // w_layer)
    free -= turn * w_layer
    resident = min(L - turn, free // w_layer)
    return replace(plan, turn_keep=int(turn), resident_layers=tuple(range(int(resident))))


def _fill_host(plan: Plan, shape: ModelShape, wl: Workload, timing: LayerTiming | None = None,
               gpu: bool = False) -> Plan:
    """Spend the HOST memory left on the optimizer states of the first units (``pre`` first):
    each unit kept in RAM takes its state's SSD reads and writes off every step."""
    if plan.optimizer != Tier.NVME:
        return plan
    free = plan.host_budget_bytes - peak_memory(plan, shape, wl, timing, gpu).host_bytes
    units = shape.n_layers + 2
    k = 0
    while k < units and wl.optimizer_bytes_per_param * shape.first_units_trainable_numel(k + 1) <= free:
        k += 1
    # a unit with nothing trainable (frozen) holds no state: counting it changes nothing
    return replace(plan, optimizer_host_units=k) if k else plan


def _why_infeasible(shape: ModelShape, wl: Workload, budgets: Budgets, overlap: bool,
                    recompute: bool | None) -> str:
    """One line: the tier that cannot be satisfied, the shortfall, and the fix."""
    device_total = budgets.device_bytes + (budgets.host_bytes if budgets.shared else 0)
    host_total = budgets.host_bytes + (budgets.device_bytes if budgets.shared else 0)
    if _chunk_numel(host_total, wl.state_itemsize) < 2048:
        need = 2 * STAGING_ARRAYS * wl.state_itemsize * 2048
        return (f"the host budget {format_bytes(host_total)} cannot stage optimizer updates (needs at least "
                f"{format_bytes(need)}); raise offload.cpu_memory_limit")
    # The least DEVICE any plan needs: everything streamed, checkpoints off the device.
    rec = True if recompute is None else recompute
    lean = Plan(activations=Tier.NVME if rec else Tier.DEVICE, recompute=rec, prefetch_depth=1 if overlap else 0,
                turn_keep=0, job_slots=1, overlap=overlap, chunk_numel=2048)
    device_need = peak_memory(lean, shape, wl).device_bytes
    if device_need > device_total:
        work = activation_bytes(shape, wl).work
        return (f"the device budget {format_bytes(device_total)} cannot hold even one streamed layer: "
                f"needs {format_bytes(device_need)} (embeddings and head "
                f"{format_bytes((shape.pre_numel + shape.post_numel) * wl.itemsize)}, a layer, its gradients, "
                f"{format_bytes(work)} working memory for batch {wl.micro_batch} x {wl.seq_len}), "
                f"{format_bytes(device_need - device_total)} short; raise "
                f"offload.{'cpu' if budgets.shared else 'gpu'}_memory_limit or lower train.micro_batch_size / "
                f"data.seq_len")
    # The state that must live somewhere off the device: optimizer, kept gradients, weights.
    n = shape.trainable_numel
    kept = wl.deferred  # layer-major accumulation keeps gradients only for deferred updates
    state = wl.optimizer_bytes_per_param * n + (wl.grad_bytes_per_param * n if kept else 0)
    if wl.state_dtype != wl.compute_dtype or shape.frozen:  # else the weights are the master weights
        state += shape.n_layers * shape.streamed_layer_numel * wl.itemsize
    versions = wl.checkpoint_versions * wl.optimizer_bytes_per_param * n
    room = budgets.nvme_bytes + max(host_total - STAGING_ARRAYS * wl.state_itemsize * MAX_CHUNK_NUMEL, 0)
    if state > room:
        kind = "fp32" if wl.state_dtype == "float32" else wl.state_dtype
        grads = (f" and {kind} gradients ({wl.grad_bytes_per_param} B/param, kept for clipping)"
                 if kept else "")
        weights = ", plus the layer weights" if wl.state_dtype != wl.compute_dtype else ""
        pure = ("; or train in pure bfloat16 (model.dtype and model.state_dtype: bfloat16, 6 B/param)"
                if wl.state_dtype == "float32" and wl.compute_dtype == "bfloat16" else "")
        return (f"the training state needs {format_bytes(state)} ({kind} master + Adam states, "
                f"{wl.optimizer_bytes_per_param} B/param for {n / 1e9:.2f}B parameters{grads}{weights}): the SSD has "
                f"{format_bytes(budgets.nvme_bytes)} free and RAM takes at most {format_bytes(max(room - budgets.nvme_bytes, 0))}, "
                f"{format_bytes(state - room)} short; free space or point offload.nvme_path at a larger disk{pure}")
    if state + versions > room:
        return (f"checkpoints keep {wl.checkpoint_versions} versions of the optimizer state "
                f"({format_bytes(wl.optimizer_bytes_per_param * n)} each) beside the training state "
                f"({format_bytes(state)}): the SSD has {format_bytes(budgets.nvme_bytes)} free, "
                f"{format_bytes(state + versions - room)} short; lower train.save_total_limit or free space")
    memory = (f"RAM {format_bytes(device_total)}" if budgets.shared else
              f"device {format_bytes(device_total)}, host {format_bytes(host_total)}")
    return (f"no placement fits {memory} and SSD {format_bytes(budgets.nvme_bytes)} together; raise "
            f"offload.cpu_memory_limit or free SSD space")
