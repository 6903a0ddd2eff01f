"""The Plan: where each tensor group lives and how far ahead to fetch. A frozen value.

Tensor groups:
- ``weights``: compute-dtype weights of the decoder layers between uses (HOST or NVME);
  ``pre``/``post`` units and the layers in ``resident_layers`` stay on DEVICE for the whole run.
- ``optimizer``: fp32 master weights + Adam exp_avg + exp_avg_sq (HOST or NVME).
- ``grads``: fp32 gradients kept between micro-batches or until a deferred update (HOST or NVME).
- ``activations``: each layer's input, the checkpoint it is recomputed from (DEVICE, HOST, NVME).

``simple_plan`` derives a plan from budgets with a byte count; the cost-model planner
(``scheduler.planner``) replaces it where available.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from offload.errors import BudgetError, format_bytes
from offload.tiers import Tier


@dataclass(frozen=True, kw_only=True)
class Plan:
    weights: Tier = Tier.NVME
    optimizer: Tier = Tier.NVME
    grads: Tier = Tier.NVME
    activations: Tier = Tier.DEVICE
    prefetch_depth: int = 1
    """Layers fetched ahead of the one computing (forward and backward)."""
    turn_keep: int = 1
    """Last layers of forward kept on DEVICE into backward (they are needed first there)."""
    resident_layers: tuple[int, ...] = ()
    """Layers whose weights never leave DEVICE (the first ones: needed first by the next step)."""
    recompute: bool = True
    """True: keep each layer's input and recompute the layer in backward. False: keep the
    layer's saved activations on DEVICE (weights inside them are re-fetched, not kept): no
    recompute, more DEVICE memory."""
    overlap: bool = True
    """False: synchronous reference mode, same math, no prefetch and no concurrent optimizer."""
    device_budget_bytes: int = 1 << 62
    host_budget_bytes: int = 1 << 62
    job_slots: int = 2
    """Units whose gradients may wait for the optimizer worker at once (bounds DEVICE memory)."""
    chunk_numel: int = 4 << 20
    """Elements per optimizer chunk: master, Adam states and gradients move in chunks this size
    (16 MiB of fp32), so host staging stays small whatever the size of a unit."""

    def __post_init__(self) -> None:
        for name in ("weights", "optimizer", "grads"):
            if getattr(self, name) == Tier.DEVICE:
                raise ValueError(f"plan.{name} must be host or nvme")
        if self.prefetch_depth < 0 or self.turn_keep < 0 or self.job_slots < 1:
            raise ValueError("prefetch_depth and turn_keep must be >= 0, job_slots >= 1")
        if not self.recompute and self.activations != Tier.DEVICE:
            raise ValueError("recompute: false keeps saved activations on DEVICE: set activations: device")
        if self.chunk_numel < 2048 or self.chunk_numel % 2048:
            raise ValueError("chunk_numel must be a positive multiple of 2048 (4 KiB-aligned chunks)")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Tier):
                d[k] = v.value
        d["resident_layers"] = list(self.resident_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Plan:
        kw = dict(d)
        for k in ("weights", "optimizer", "grads", "activations"):
            if k in kw:
                kw[k] = Tier(kw[k])
        kw["resident_layers"] = tuple(kw.get("resident_layers", ()))  # type: ignore[arg-type]
        kw.pop("notes", None)  # written by early versions, never used
        return cls(**kw)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [
            ("layer weights", self.weights.value),
            ("fp32 master + Adam", self.optimizer.value),
            ("gradients", self.grads.value),
            ("activation checkpoints", self.activations.value if self.recompute else "device (no recompute)"),
            ("resident layers", ",".join(map(str, self.resident_layers)) or "-"),
            ("prefetch depth", str(self.prefetch_depth)),
            ("overlap", "on" if self.overlap else "off (reference)"),
            ("device budget", _budget(self.device_budget_bytes)),
            ("host budget", _budget(self.host_budget_bytes)),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _budget(n_bytes: int) -> str:
    return "unlimited" if n_bytes >= 1 << 61 else format_bytes(n_bytes)


@dataclass(frozen=True)
class ModelBytes:
    """Byte sizes the simple planner needs, from the model map and batch shape."""

    layer_numel: int  # largest decoder layer
    n_layers: int
    pre_numel: int
    post_numel: int
    compute_itemsize: int
    activation_bytes: int  # one layer input checkpoint, one micro-batch
    work_bytes: int  # transient compute memory of one layer (estimate)
    saved_bytes: int = 0  # autograd-saved activations of one layer, one micro-batch (estimate)


def simple_plan(mb: ModelBytes, device_budget_bytes: int, host_budget_bytes: int,
                overlap: bool = True, force_nvme: bool = False, recompute: bool | None = None) -> Plan:
    """Keep on HOST/DEVICE what fits, in order of benefit; the rest goes to NVME.

    DEVICE must hold pre + post weights, the working window (current layer, prefetched layers,
    turn layers) and transient compute memory. HOST holds I/O staging for the optimizer jobs.
    """
    w_layer = mb.layer_numel * mb.compute_itemsize
    fixed_device = (mb.pre_numel + mb.post_numel) * mb.compute_itemsize + mb.work_bytes
    prefetch = 1 if overlap else 0
    job_slots = 2 if overlap else 1
    # current layer + prefetched layers + gradients waiting for the optimizer (the largest unit)
    w_grads = max(mb.layer_numel, mb.pre_numel, mb.post_numel) * mb.compute_itemsize
    window = (1 + prefetch) * w_layer + job_slots * w_grads
    if fixed_device + window > device_budget_bytes:
        raise BudgetError(
            f"the device budget {format_bytes(device_budget_bytes)} cannot hold even one layer: "
            f"need {format_bytes(fixed_device + window)} (embeddings, head, one layer, its "
            f"gradients, working memory); raise offload.gpu_memory_limit or lower the batch size"
        )
    # Optimizer staging (2 chunk sets of grad, stored grad, master, exp_avg, exp_avg_sq in fp32)
    # takes at most half the host budget; chunks of 4 Mi elements are enough to stream at speed.
    biggest = max(mb.layer_numel, mb.pre_numel, mb.post_numel)
    chunk_numel = min(4 << 20, host_budget_bytes // 2 // 40) // 2048 * 2048
    if chunk_numel < 2048:
        raise BudgetError(
            f"the host budget {format_bytes(host_budget_bytes)} cannot stage optimizer updates "
            f"(needs at least {format_bytes(2 * 40 * 2048)}); raise offload.cpu_memory_limit"
        )
    job_bytes = 40 * min(chunk_numel, biggest)
    free_device = device_budget_bytes - fixed_device - window
    saved_all = mb.saved_bytes * mb.n_layers
    if recompute is None:  # auto: skip the recompute when every layer's saved activations fit
        recompute = force_nvme or mb.saved_bytes == 0 or saved_all > free_device
    if not recompute:
        if saved_all > free_device:
            raise BudgetError(
                f"recompute: false keeps {format_bytes(saved_all)} of activations on the device, "
                f"{format_bytes(max(free_device, 0))} is free; use recompute: auto or a smaller batch"
            )
        free_device -= saved_all
        activations = Tier.DEVICE
    else:
        act_all = mb.activation_bytes * mb.n_layers
        activations = Tier.DEVICE if (act_all <= free_device and not force_nvme) else Tier.NVME
        if activations == Tier.DEVICE:
            free_device -= act_all
    resident: list[int] = []
    turn_keep = 0
    if not force_nvme:
        if free_device >= mb.n_layers * w_layer:  # every layer fits: nothing streams
            resident = list(range(mb.n_layers))
            free_device -= mb.n_layers * w_layer
        else:
            while turn_keep < min(2, mb.n_layers - 1) and free_device >= w_layer:
                turn_keep += 1
                free_device -= w_layer
            for i in range(mb.n_layers - turn_keep):
                if free_device < w_layer:
                    break
                resident.append(i)
                free_device -= w_layer
    # HOST, in order of traffic saved: optimizer states (master + Adam + gradients, 16 bytes per
    # parameter of every unit), then the streamed layers' weights. The rest goes to NVME.
    free_host = host_budget_bytes - job_bytes
    total_numel = mb.layer_numel * mb.n_layers + mb.pre_numel + mb.post_numel
    optimizer = Tier.HOST if (16 * total_numel <= free_host and not force_nvme) else Tier.NVME
    if optimizer == Tier.HOST:
        free_host -= 16 * total_numel
    streamed = mb.n_layers - len(resident)
    weights = Tier.HOST if (streamed * w_layer <= free_host and not force_nvme) else Tier.NVME
    return Plan(
        weights=weights,
        optimizer=optimizer,
        grads=Tier.NVME if force_nvme or optimizer == Tier.NVME else Tier.HOST,
        activations=activations,
        recompute=recompute,
        prefetch_depth=prefetch,
        turn_keep=turn_keep,
        resident_layers=tuple(resident),
        overlap=overlap,
        device_budget_bytes=device_budget_bytes,
        host_budget_bytes=host_budget_bytes,
        job_slots=job_slots,
        chunk_numel=chunk_numel,
    )
