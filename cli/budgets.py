"""From a run's config to memory budgets, a workload, a hardware profile and the planner's plan.

Budgets: on a GPU machine DEVICE is GPU memory (``offload.gpu_memory_limit``, "auto" = 80% of
free GPU memory) and HOST is CPU RAM (``offload.cpu_memory_limit``). Without a GPU both tiers are
RAM: ``cpu_memory_limit`` is the total and the planner splits it; ``gpu_memory_limit`` does not
apply there (a config written for a GPU workstation still plans, with one warning line). NVME is
the free space at ``offload.nvme_path``.

A profile file (``--profile``) plans for the machine it describes: its RAM, VRAM and disk figures
replace this machine's, so a 70B job can be planned on a laptop for a workstation.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from offload.errors import OffloadError, format_bytes
from offload.store import DATA_FILE_NAME
from scheduler.cost_model import LayerTiming, peak_memory
from scheduler.model_shape import ModelShape
from scheduler.plan import Plan
from scheduler.planner import Budgets, PlanChoice, choose_plan
from scheduler.profile import HardwareProfile, cache_path, existing_parent, load_or_measure
from scheduler.workload import Workload

CPU_DEVICE_SHARE = 0.6
PLANNING_PROFILE_BYTES = 256 << 20  # SSD bytes measured when train/plan profile a new disk


@dataclass(frozen=True)
class MachineMemory:
    ram_available_bytes: int
    vram_free_bytes: int | None  # None: no GPU
    disk_free_bytes: int


def live_memory(nvme_path: Path, device: torch.device) -> MachineMemory:
    vram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return MachineMemory(psutil.virtual_memory().available, vram,
                         shutil.disk_usage(existing_parent(nvme_path)).free + _swap_bytes(nvme_path))


def _swap_bytes(nvme_path: Path) -> int:
    """Bytes of an earlier store at nvme_path: the run reuses that space, so it counts as free."""
    if not nvme_path.is_dir():
        return 0
    data = nvme_path / DATA_FILE_NAME
    return data.stat().st_size if data.is_file() else 0


def budgets_for(cfg: Any, mem: MachineMemory) -> Budgets:
    from cli.config import resolve_memory_limit

    cpu_limit = resolve_memory_limit(cfg.offload.cpu_memory_limit, mem.ram_available_bytes)
    gpu_value = cfg.offload.gpu_memory_limit
    if mem.vram_free_bytes is not None:
        return Budgets(resolve_memory_limit(gpu_value, mem.vram_free_bytes), cpu_limit, mem.disk_free_bytes)
    if gpu_value != "auto":
        print(f"offload-train: warning: no GPU here: offload.gpu_memory_limit ({gpu_value}) does not apply; "
              f"offload.cpu_memory_limit ({cfg.offload.cpu_memory_limit}) bounds all RAM and the planner "
              f"splits it")
    device = int(CPU_DEVICE_SHARE * cpu_limit)
    return Budgets(device, cpu_limit - device, mem.disk_free_bytes, shared=True)


def workload_for(cfg: Any, total_steps: int | None = None) -> Workload:
    """``total_steps``: when known (data loaded), counts the checkpoints a run keeps exactly;
    else ``train.max_steps`` does, or one checkpoint is assumed."""
    from cli.swap import checkpoint_versions

    t = cfg.train
    deferred = t.max_grad_norm > 0 or cfg.model.dtype == "float16" or t.nan_policy == "skip"
    impl = cfg.optimizer_impl if cfg.optimizer_impl != "auto" else "torch"
    steps = total_steps if total_steps is not None else (t.max_steps if t.max_steps > 0 else None)
    versions = checkpoint_versions(0, steps, t.save_steps, t.save_total_limit) if steps else 1
    return Workload(micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len,
                    grad_accum=t.gradient_accumulation_steps, compute_dtype=cfg.model.dtype,
                    state_dtype=cfg.model.state_dtype,
                    deferred=deferred, optimizer_impl=impl, checkpoint_versions=versions)


def draws_dropout(hf_config: Any) -> bool:
    """Whether a model of this config draws dropout masks in training: any of its (or its
    sub-configs') dropout probabilities (``*dropout*``, GPT-2's ``*_pdrop``) above zero, but for
    heads a causal LM does not run (``classifier_dropout``, ``summary_first_dropout``)."""
    def draws(fields: dict[str, Any]) -> bool:
        return any(draws(v) if isinstance(v, dict) else
                   ("dropout" in k or k.endswith("pdrop")) and isinstance(v, (int, float)) and v > 0
                   for k, v in fields.items()
                   if isinstance(k, str) and not isinstance(v, bool) and not k.startswith(("classifier", "summary")))
    return draws(hf_config.to_dict())


def load_profile_file(path: str | Path) -> HardwareProfile:
    try:
        return HardwareProfile.from_json(Path(path).read_text())
    except OSError as err:
        raise OffloadError(f"--profile {path}: cannot read it ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise OffloadError(f"--profile {path}: not a hardware profile ({err}); write one with "
                           f"offload-train profile and edit it") from None


def profile_for(cfg: Any, profile_path: str | None) -> HardwareProfile:
    if profile_path is not None:
        return load_profile_file(profile_path)
    nvme_path = cfg.offload_nvme_path
    try:
        nvme_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OffloadError(f"offload.nvme_path {nvme_path} cannot be created ({err.strerror}); "
                           f"choose a writable directory on the SSD") from None
    if not cache_path(nvme_path).exists():
        print(f"measuring this machine for the planner (SSD at {nvme_path}, CPU AdamW, matmul); cached for "
              f"next time, refresh with offload-train profile")
    return load_or_measure(nvme_path, size_bytes=PLANNING_PROFILE_BYTES, io_backend=cfg.offload.io_backend)


def probe_budget_bytes(budgets: Budgets, device: torch.device) -> int:
    """Memory the layer probe may use: the run's, before the run holds any of it. Without a GPU
    both tiers are RAM (all of cpu_memory_limit); with one the probe runs in the GPU budget."""
    return budgets.device_bytes if device.type == "cuda" else budgets.device_bytes + budgets.host_bytes


@dataclass(frozen=True)
class PlannedJob:
    """The planner's choice and everything it was chosen from (the report prints all of it)."""

    choice: PlanChoice
    shape: ModelShape
    workload: Workload
    budgets: Budgets
    profile: HardwareProfile
    timing: LayerTiming | None


def plan_job(cfg: Any, hf_config: Any, shape: ModelShape, device: torch.device,
             profile_path: str | None = None, total_steps: int | None = None) -> PlannedJob:
    """Plan on this machine, or on the one a profile file describes (its RAM, VRAM and disk).

    On this machine, one layer of the real shape is timed when it fits easily (layer_probe);
    for another machine the cost model counts FLOPs against the profile's matmul rate.
    """
    from scheduler.layer_probe import budget_probe

    profile = profile_for(cfg, profile_path)
    if profile_path is not None:
        mem = MachineMemory(profile.ram_available_bytes, profile.vram_free_bytes, profile.disk_free_bytes)
    else:
        mem = live_memory(cfg.offload_nvme_path, device)
    recompute = None if cfg.offload.recompute == "auto" else bool(cfg.offload.recompute)
    depth = None if cfg.offload.prefetch_depth == "auto" else int(cfg.offload.prefetch_depth)
    wl, budgets = workload_for(cfg, total_steps), budgets_for(cfg, mem)
    wl = replace(wl, random_forward=draws_dropout(hf_config))
    timing = None if profile_path is not None else budget_probe(
        hf_config, shape, wl, device, probe_budget_bytes(budgets, device))
    choice = choose_plan(shape, wl, budgets, profile, recompute=recompute, prefetch_depth=depth, timing=timing)
    return PlannedJob(choice, shape, wl, budgets, profile, timing)


def batch_advice(job: PlannedJob, cfg: Any) -> str:
    """One line for ``plan``: the tokens per step at which this job turns compute-bound."""
    from scheduler.batch_advice import advise_batch

    recompute = None if cfg.offload.recompute == "auto" else bool(cfg.offload.recompute)
    depth = None if cfg.offload.prefetch_depth == "auto" else int(cfg.offload.prefetch_depth)
    return advise_batch(job.shape, job.workload, job.budgets, job.profile, job.choice, recompute=recompute,
                        prefetch_depth=depth, timing=job.timing).line()


def fit_replayed_plan(cfg: Any, plan: Plan, saved: dict[str, Any], shape: ModelShape, device: torch.device,
                      source: str, total_steps: int | None = None) -> Plan:
    """A plan replayed with ``--plan`` (``saved``: its plan.json), held to this run's memory limits.

    Budgets the plan names must fit within the config's limits (``offload.cpu_memory_limit``, and
    ``gpu_memory_limit`` on a GPU; without a GPU their sum within the RAM limit): past a limit the
    config sets, one line says so; past an ``auto`` one (what is free now, which moves), a
    warning. A plan written by hand without them gets the config's. Where its predicted peak on
    this model and batch passes its budgets, a warning says the run may stop short.
    """
    budgets = budgets_for(cfg, live_memory(cfg.offload_nvme_path, device))
    named = [key for key in BUDGET_KEYS if key in saved]
    for key in named:
        value = getattr(plan, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise OffloadError(f"--plan {source}: {key} must be a positive whole number of bytes, got {value!r}; "
                               f"fix it or leave it out (the config's limit is used)")
    plan = replace(plan, **_missing_budgets(plan, named, budgets))
    if named and budgets.shared:
        _check_limit(source, "RAM", plan.device_budget_bytes + plan.host_budget_bytes,
                     budgets.device_bytes + budgets.host_bytes, "cpu", cfg.offload.cpu_memory_limit)
    elif named:
        _check_limit(source, "GPU memory", plan.device_budget_bytes, budgets.device_bytes, "gpu",
                     cfg.offload.gpu_memory_limit)
        _check_limit(source, "CPU memory", plan.host_budget_bytes, budgets.host_bytes, "cpu",
                     cfg.offload.cpu_memory_limit)
    peak = peak_memory(plan, shape, workload_for(cfg, total_steps), gpu=device.type == "cuda")
    over = [f"{tier} {format_bytes(need)} > {format_bytes(have)}" for tier, need, have in (
        ("device", peak.device_bytes, plan.device_budget_bytes), ("host", peak.host_bytes, plan.host_budget_bytes))
        if need > have]
    if over:
        print(f"offload-train: warning: --plan {source}: on this model and batch its predicted peak passes its "
              f"budgets ({', '.join(over)}); the run may stop with a budget error: drop --plan to plan again")
    return plan


BUDGET_KEYS = ("device_budget_bytes", "host_budget_bytes")


def _missing_budgets(plan: Plan, named: list[str], budgets: Budgets) -> dict[str, int]:
    """The budgets a plan.json leaves out (``named``: those it gives), from the config's: its own,
    or without a GPU (one RAM) the rest of the RAM limit beside the one the plan names."""
    config = dict(zip(BUDGET_KEYS, (budgets.device_bytes, budgets.host_bytes), strict=True))
    if len(named) != 1 or not budgets.shared:
        return {key: value for key, value in config.items() if key not in named}
    (given,) = named
    other = next(key for key in BUDGET_KEYS if key != given)
    return {other: max(sum(config.values()) - getattr(plan, given), 1)}


def _check_limit(source: str, memory: str, planned_bytes: int, allowed_bytes: int, key: str, value: Any) -> None:
    """A replayed plan's budget against the limit ``offload.<key>_memory_limit`` (``value``) allows."""
    if planned_bytes <= allowed_bytes:
        return
    said = (f"--plan {source}: it was made for {format_bytes(planned_bytes)} of {memory}, this run allows "
            f"{format_bytes(allowed_bytes)} (offload.{key}_memory_limit {value})")
    if value == "auto":  # what is free now: the run may still fit
        print(f"offload-train: warning: {said}; if it stops short, drop --plan to plan for what is free")
        return
    raise OffloadError(f"{said}; drop --plan to plan for this limit, or raise offload.{key}_memory_limit")
