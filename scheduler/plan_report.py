"""The plan as a table a user reads: tensor groups x tiers, predicted time per resource, the
bottleneck; and the same facts as JSON for ``plan.json``."""

from __future__ import annotations

from typing import Any

from offload.errors import format_bytes
from offload.tiers import Tier
from scheduler.cost_model import Estimate, LayerTiming, placement
from scheduler.model_shape import ModelShape
from scheduler.plan import Plan
from scheduler.planner import Budgets, PlanChoice
from scheduler.profile import HardwareProfile
from scheduler.step_time import RESOURCES
from scheduler.workload import Workload


def _activations(plan: Plan) -> str:
    if plan.recompute:
        return "recompute from layer inputs"
    if plan.activations == Tier.NVME and plan.recompute_layers:
        r = plan.recompute_layers
        return (f"selective recompute: layer{' 0' if r == 1 else f's 0-{r - 1}'} recomputed from the layer input, "
                f"the other layers' saved activations swapped through the SSD")
    if plan.activations == Tier.NVME:
        return "no recompute, saved activations swapped through the SSD"
    return "no recompute"


def _host_units(plan: Plan, shape: ModelShape) -> str:
    k = plan.optimizer_host_units
    if not k or plan.optimizer != Tier.NVME:
        return ""
    n = min(k - 1, shape.n_layers)
    what = "embeddings" + ("" if n == 0 else " and layer 0" if n == 1 else f" and layers 0-{n - 1}")
    if k >= shape.n_layers + 2:
        what = "every unit"
    return f"; master + Adam states of the first {k} units in RAM ({what}), the rest on the SSD"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(n_bytes: int) -> str:
    return format_bytes(n_bytes) if n_bytes else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = [f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]]
    line = lambda r: "  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)).rstrip()  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


def format_report(choice: PlanChoice, shape: ModelShape, wl: Workload, budgets: Budgets,
                  profile: HardwareProfile, timing: LayerTiming | None = None) -> str:
    plan, est = choice.plan, choice.estimate
    if timing is not None:
        compute_basis = (f"compute from a probe of this shape: layer {timing.layer_forward_s * 1e3:.1f} ms forward, "
                         f"{timing.layer_backward_s * 1e3:.1f} ms backward; head {timing.head_s * 1e3:.1f} ms")
    else:
        rate = profile.matmul_tflops.get(wl.compute_dtype, profile.matmul_tflops.get("float32", 0.0))
        compute_basis = f"compute from FLOPs at {rate:.2f} TFLOPS ({wl.compute_dtype} matmul)"
    out = [
        f"model: {_count(shape.total_numel)} parameters"
        f"{f' ({_count(shape.trainable_numel)} trainable: LoRA adapters on a frozen base)' if shape.frozen else ''}, "
        f"{shape.n_layers} layers "
        f"(hidden {shape.hidden}, vocab {shape.vocab}); batch {wl.micro_batch} x {wl.seq_len} tokens, "
        f"gradient accumulation {wl.grad_accum}, {wl.compute_dtype}",
        f"machine: {profile.machine}; SSD {profile.ssd_read_gbps:.2f} / {profile.ssd_write_gbps:.2f} GB/s read / "
        f"write{_mixed(profile)}; {compute_basis}",
        "",
    ]
    rows = []
    for group, tier, nbytes in placement(plan, shape, wl, choice.timing, gpu=profile.h2d_gbps is not None):
        rows.append([group] + [_size(nbytes) if tier == t else "" for t in Tier])
    # the device peak: the layer and the head phases do not overlap (cost_model.peak_memory)
    mem = choice.estimate.memory
    totals = {Tier.DEVICE: mem.device_bytes, Tier.HOST: mem.host_bytes, Tier.NVME: mem.nvme_bytes}
    budget = {Tier.DEVICE: plan.device_budget_bytes, Tier.HOST: plan.host_budget_bytes, Tier.NVME: budgets.nvme_bytes}
    rows.append(["peak"] + [format_bytes(totals[t]) for t in Tier])
    rows.append(["budget"] + [format_bytes(budget[t]) for t in Tier])
    device_name = "device (GPU)" if profile.h2d_gbps is not None else "device (RAM)"
    out += _table(["tensor group", device_name, "host (RAM)", "nvme (SSD)"], rows)
    out.append("")
    layers = (f"resident layers 0-{len(plan.resident_layers) - 1}" if plan.resident_layers else "no resident layers")
    out.append(f"placement: {layers}, {plan.turn_keep} turn layer{'' if plan.turn_keep == 1 else 's'} kept into backward, prefetch depth "
               f"{plan.prefetch_depth}, {_activations(plan)}; "
               f"optimizer chunks of {plan.chunk_numel} elements"
               f"{'; layer-major accumulation (each layer loaded once per step)' if wl.layer_major(plan) else ''}"
               f"{_host_units(plan, shape)}")
    out.append("")
    link_rows = []
    for r in RESOURCES:
        t = est.time_s[r]
        if t <= 0 and r not in ("compute", "cpu_adam"):
            continue
        moved = _size(est.link_bytes[r]) if r in est.link_bytes else ""  # links are resources too
        link_rows.append([r, moved, f"{t:.3f} s"])
    out += _table(["resource", "bytes / step", "busy / step"], link_rows)
    out.append("")
    tokens = wl.tokens * wl.grad_accum
    out.append(f"predicted step: {est.step_s:.3f} s, {tokens / est.step_s:,.0f} tokens/s, "
               f"{est.model_flops / est.step_s / 1e12:.2f} model TFLOPS; bottleneck: {est.bottleneck}")
    out.append(f"({choice.candidates} feasible placements compared)")
    return "\n".join(out)


def plan_record(choice: PlanChoice) -> dict[str, Any]:
    """What ``plan.json`` holds: the plan's fields (``Plan.from_dict`` replays them) and the
    prediction it was chosen by."""
    return {**choice.plan.to_dict(), "predicted": prediction_dict(choice.estimate)}


def prediction_dict(est: Estimate) -> dict[str, Any]:
    return {"step_s": est.step_s, "bottleneck": est.bottleneck, "time_s": est.time_s,
            "link_bytes": est.link_bytes, "model_flops": est.model_flops,
            "peak_bytes": {"device": est.memory.device_bytes, "host": est.memory.host_bytes,
                           "nvme": est.memory.nvme_bytes}}


def _mixed(profile: HardwareProfile) -> str:
    """The SSD's rates reading and writing at once, where the profile measured them."""
    rates = [f"{gbps:.2f} GB/s {what}" for what, gbps in (("both at once", profile.ssd_mixed_gbps),
                                                            ("beside compute", profile.ssd_beside_compute_gbps))
             if gbps is not None]
    return f" ({', '.join(rates)})" if rates else ""
