"""From a run's config to memory budgets and a plan (until the cost-model planner replaces it).

Budgets: on a GPU machine DEVICE is GPU memory (``offload.gpu_memory_limit``, "auto" = 80% of
free GPU memory) and HOST is CPU RAM (``offload.cpu_memory_limit``). Without a GPU both tiers are
RAM: ``cpu_memory_limit`` is the total, and DEVICE gets ``gpu_memory_limit`` of it ("auto" = 60%).
"""

from __future__ import annotations

from typing import Any

import psutil
import torch

from scheduler.model_map import build_model_map
from scheduler.plan import ModelBytes, Plan, simple_plan

CPU_DEVICE_SHARE = 0.6


def budgets_for_run(cfg: Any, device: torch.device) -> tuple[int, int]:
    """(device budget, host budget) in bytes."""
    from cli.config import resolve_memory_limit

    ram_total = psutil.virtual_memory().available
    cpu_limit = resolve_memory_limit(cfg.offload.cpu_memory_limit, ram_total)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        gpu_value = cfg.offload.gpu_memory_limit
        gpu_limit = resolve_memory_limit(gpu_value, free_bytes)
        return gpu_limit, cpu_limit
    gpu_value = cfg.offload.gpu_memory_limit
    device_limit = int(CPU_DEVICE_SHARE * cpu_limit) if gpu_value == "auto" else resolve_memory_limit(gpu_value, cpu_limit)
    return device_limit, max(cpu_limit - device_limit, 0)


def model_bytes(model: torch.nn.Module, hf_config: Any, micro_batch: int, seq_len: int, itemsize: int) -> ModelBytes:
    """Sizes the planner needs; transient memory is an estimate from the config."""
    mm = build_model_map(model)
    hidden = int(getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", 0))
    inter = int(getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden)
    heads = int(getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head", 1))
    vocab = int(getattr(hf_config, "vocab_size", 0))
    tokens = micro_batch * seq_len
    # Layer working set (inputs, projections, MLP) twice over for backward, plus attention scores.
    layer_work = tokens * (4 * hidden + 3 * inter) * itemsize * 2 + micro_batch * heads * seq_len**2 * itemsize * 2
    head_work = tokens * vocab * 4 * 3  # fp32 logits, their softmax and gradient
    saved = tokens * (12 * hidden + 6 * inter) * itemsize + micro_batch * heads * seq_len**2 * itemsize * 2
    return ModelBytes(
        layer_numel=max(u.numel for u in mm.layer_units), n_layers=len(mm.layer_units),
        pre_numel=mm.pre.numel, post_numel=mm.post.numel, compute_itemsize=itemsize,
        activation_bytes=tokens * hidden * itemsize, work_bytes=max(layer_work, head_work),
        saved_bytes=saved,
    )


def plan_for_run(ctx: Any) -> Plan:
    cfg = ctx.cfg
    device_budget, host_budget = budgets_for_run(cfg, ctx.device)
    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    mb = model_bytes(ctx.model, ctx.hf_config, cfg.train.micro_batch_size, cfg.data.seq_len, itemsize)
    recompute = None if cfg.offload.recompute == "auto" else bool(cfg.offload.recompute)
    plan = simple_plan(mb, device_budget, host_budget, recompute=recompute)
    if cfg.offload.prefetch_depth != "auto":
        from dataclasses import replace

        plan = replace(plan, prefetch_depth=int(cfg.offload.prefetch_depth))
    return plan
