"""The Plan: where each tensor group lives and how far ahead to fetch. A frozen value.

Tensor groups:
- ``weights``: compute-dtype weights of the decoder layers between uses (HOST or NVME; when their
  dtype is the state dtype and the tier the optimizer's, they are the master weights themselves);
  ``pre``/``post`` units and the layers in ``resident_layers`` stay on DEVICE for the whole run.
- ``optimizer``: master weights + Adam exp_avg + exp_avg_sq, fp32 or bf16 (HOST or NVME).
- ``grads``: gradients (state dtype) kept between micro-batches or until a deferred update (HOST or NVME).
- ``activations``: each layer's input, the checkpoint it is recomputed from (DEVICE, HOST, NVME);
  without recompute, every saved activation (DEVICE, or swapped through NVME).

``scheduler.planner`` chooses a plan from budgets and a cost model; ``plan.json`` replays one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from offload.errors import format_bytes
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
    optimizer_host_units: int = 0
    """With ``optimizer: nvme``: the master + Adam states of the first units in forward order
    (``pre``, then layers 0, 1, ...) stay in RAM instead, whatever RAM the budgets leave: their
    updates move no SSD bytes (``pre`` first: it is updated last and needed first)."""
    recompute: bool = True
    """True: keep each layer's input and recompute the layer in backward. False: no recompute:
    keep the layer's saved activations (weights inside them are re-fetched, not kept) on DEVICE
    (``activations: device``), or swap them through the SSD (``activations: nvme``: written after
    each layer's forward, read back one layer ahead in backward; two layers' worth in memory)."""
    layer_major: bool = False
    """Gradient accumulation (M > 1 micro-batches per step) layer by layer: each layer is loaded
    once per step and runs every micro-batch, forward and backward, its gradients summing on
    DEVICE; none are kept in a tier between micro-batches. Weight and gradient traffic no longer
    grow with M; every micro-batch's activations (checkpoints, or saved tensors) are kept until
    backward. Same sums as micro-batch order; dropout draws its masks in layer order (another
    valid draw, not the same one). False: one micro-batch after the other, gradients kept."""
    recompute_layers: int = 0
    """Selective recompute, with ``recompute: false`` and ``activations: nvme``: layers 0 ..
    recompute_layers - 1 keep only their input (in memory) and are recomputed in backward; the
    others swap their saved activations as above. Trades SSD traffic for compute, layer by layer,
    so a slow or busy disk does not force a switch between the two whole modes."""
    master_from_loads: bool = False
    """On a CPU device, with weights that are the master weights on the SSD and immediate updates
    (``Placement.master_from_loads``): each streamed layer's update takes its master from the
    weights just loaded for its backward instead of reading it from the SSD again (4 B per
    parameter per step less read); the buffer waits for the optimizer (DEVICE memory of up to
    ``job_slots`` layers more)."""
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
        if min(self.prefetch_depth, self.turn_keep, self.optimizer_host_units, self.recompute_layers) < 0 \
                or self.job_slots < 1:
            raise ValueError("prefetch_depth, turn_keep, optimizer_host_units and recompute_layers must be >= 0, "
                             "job_slots >= 1")
        if self.recompute_layers and (self.recompute or self.activations != Tier.NVME):
            raise ValueError("recompute_layers selects layers to recompute among swapped ones: it needs "
                             "recompute: false and activations: nvme")
        if not self.recompute and self.activations == Tier.HOST:
            raise ValueError("recompute: false keeps saved activations on device or swaps them through nvme: "
                             "set activations: device or nvme")
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
        kw.pop("predicted", None)  # the planner's prediction, written beside the plan
        return cls(**kw)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [
            ("layer weights", self.weights.value),
            ("master + Adam states", (self.optimizer.value if not self.optimizer_host_units or self.optimizer == Tier.HOST
             else f"host for the first {self.optimizer_host_units} units, then nvme")
             + ("; layers' master taken from their backward's load" if self.master_from_loads else "")),
            ("gradients", self.grads.value),
            ("activations", f"{self.activations.value} (checkpoints, recompute)" if self.recompute
             else f"{self.activations.value} (saved activations, no recompute"
                  f"{f'; layers 0-{self.recompute_layers - 1} recomputed' if self.recompute_layers else ''})"),
            ("resident layers", ",".join(map(str, self.resident_layers)) or "-"),
            ("prefetch depth", str(self.prefetch_depth)),
            ("accumulation", "layer-major (each layer loaded once per step)" if self.layer_major
             else "micro-batch by micro-batch"),
            ("overlap", "on" if self.overlap else "off (reference)"),
            ("device budget", _budget(self.device_budget_bytes)),
            ("host budget", _budget(self.host_budget_bytes)),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _budget(n_bytes: int) -> str:
    return "unlimited" if n_bytes >= 1 << 61 else format_bytes(n_bytes)
