"""Placement: where each kind of tensor of each unit lives under a plan. Pure rules, no state.

One source of truth for the executor (which runs them), the cost model (which predicts from
them) and the layer probe (which measures what they swap): a rule changed here changes all three.

Units are indexed in forward order (0 = ``pre``, 1..L = decoder layers 0..L-1, L+1 = ``post``);
rules about activations take the decoder layer index i. Kinds of unit state:
``master``, ``exp_avg``, ``exp_avg_sq`` (state dtype), ``grad`` (kept gradients, state dtype),
``weight`` (compute-dtype weights of streamed units, unless the master is their home).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from offload.tiers import Tier
from scheduler.plan import Plan

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")

STAGING_ROWS = ("grad", "stored_grad", "master", "exp_avg", "exp_avg_sq")
"""The optimizer worker's staging slot: one chunk of each, in the state dtype. ``stored_grad``
receives the kept gradient, and after AdamW the compute-dtype weights cast from the master."""
STAGING_SETS = 2
"""Staging slots are double-buffered: chunk c+1 is read while chunk c computes."""

PINNED_CHECKPOINT_COPIES = 3
"""GPU, NVMe checkpoints: the most layer inputs in page-locked host buffers at once: in forward
the newest copy out, the one before it (written after the next layer starts) and one write in
flight; in backward one read back (the same buffers, reused by size)."""

SWAPPED_LAYERS_IN_MEMORY = 2
"""Swapped saved activations: the most layers' worth in host buffers at once (one written while
the next layer computes; one read ahead in backward)."""

SWAP_MIN_BYTES = 1 << 20
"""Saved activations smaller than this stay in memory when activations are swapped (norm
statistics, masks: not worth a request)."""


def grads_kept(grad_accum: int, deferred: bool, layer_major: bool = False) -> bool:
    """Gradients outlive a backward only when accumulated micro-batch by micro-batch or when
    updates are deferred; otherwise the grads tier holds nothing of the decoder layers (layer-major
    accumulation sums a layer's micro-batches on DEVICE and hands the layer over once; the
    embeddings and head keep theirs: ``Placement.keeps_grad``)."""
    return (grad_accum > 1 and not layer_major) or deferred


def tensor_storages(*objs: Any) -> set[int]:
    """Storage addresses of the tensors in ``objs`` (nested in tuples, lists and dicts)."""
    out: set[int] = set()
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            out.add(obj.untyped_storage().data_ptr())
        elif isinstance(obj, (tuple, list)):
            out |= tensor_storages(*obj)
        elif isinstance(obj, dict):
            out |= tensor_storages(*obj.values())
    return out


def layer_kept_storages(x: torch.Tensor, args_rest: tuple[Any, ...], kwargs: dict[str, Any]) -> set[int]:
    """Storages a layer's saved tensors may share that are never swapped: its input and what is
    passed to it (RoPE tables, masks), which stay in memory anyway."""
    return {x.untyped_storage().data_ptr(), *tensor_storages(args_rest, kwargs)}


def is_swapped_activation(t: torch.Tensor, kept: set[int], min_bytes: int = SWAP_MIN_BYTES) -> bool:
    """Whether a tensor autograd saves inside a layer (weights already left out) goes through the
    SSD: large enough and not one of the ``kept`` storages."""
    return t.numel() * t.element_size() >= min_bytes and t.untyped_storage().data_ptr() not in kept


class SavedOnce:
    """The swapped saves of one layer call, by the memory they cover: a tensor saved by several
    autograd nodes (a layer's normed input, read by its q, k and v projections), or saved again
    as another view of the same bytes (reshaped, transposed), is copied and swapped once. Two
    saves share a copy when both are dense over one span of memory (same address, same bytes,
    same dtype) at one version (no in-place change between them). The tensors saved are held
    until the layer's forward ends (``clear``), so no address is reused meanwhile; tensors with
    gaps never share."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], tuple[torch.Tensor, Any]] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
        if not dense_strides(t):
            return None
        return (t.data_ptr(), t.numel(), t.dtype, t._version)

    def get(self, t: torch.Tensor) -> Any:
        """What ``add`` recorded for an earlier save of the same memory, or None."""
        key = self._key(t)
        hit = self._seen.get(key) if key is not None else None
        return hit[1] if hit is not None else None

    def add(self, t: torch.Tensor, packed: Any) -> None:
        key = self._key(t)
        if key is not None:
            self._seen[key] = (t, packed)

    def clear(self) -> None:
        self._seen.clear()


def dense_strides(t: torch.Tensor) -> bool:
    """``t`` covers its memory without gaps or overlaps in some order of its dimensions (a
    contiguous tensor, or a transposed or permuted one): a buffer of ``numel`` elements holds
    it with the same strides."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def contiguous_strides(shape: Iterable[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides: list[int] = []
    step = 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Placement:
    """The placement rules of one run: a plan, the model's depth and the precision."""

    plan: Plan
    n_layers: int
    compute_dtype: str  # "float32", "bfloat16", "float16"
    state_dtype: str  # "float32", or the bfloat16 compute dtype (pure bf16)
    grads_kept: bool  # see ``grads_kept``
    on_gpu: bool  # DEVICE is GPU memory (else host memory: the CPU computes)
    layer_sums: bool = False
    """Layer-major accumulation (``plan.layer_major``, M > 1 micro-batches per step): a decoder
    layer's gradients sum on DEVICE over the micro-batches; the embeddings' and head's do not
    (``keeps_grad``)."""

    def is_end_unit(self, unit_index: int) -> bool:
        """``pre`` (embeddings) or ``post`` (final norm, LM head)."""
        return unit_index in (0, self.n_layers + 1)

    def keeps_grad(self, unit_index: int) -> bool:
        """A unit's gradient is kept (between micro-batches, or until a deferred update): every
        unit's with ``grads_kept``; with layer-major accumulation also those of ``pre`` and
        ``post``, which go to the optimizer every micro-batch and add up there, as in micro-batch
        order (a vocabulary-sized sum on DEVICE would hold GPU memory through the whole forward,
        and a tied embedding's sum would need both of its parts)."""
        return self.grads_kept or (self.layer_sums and self.is_end_unit(unit_index))

    @property
    def casts_gradient_sums(self) -> bool:
        """A decoder layer's layer-major sums are new DEVICE memory (the state dtype is wider
        than the compute dtype), not the first micro-batch's gradient itself."""
        return self.layer_sums and self.state_dtype != self.compute_dtype

    @property
    def compute_itemsize(self) -> int:
        return ITEMSIZE[self.compute_dtype]

    @property
    def state_itemsize(self) -> int:
        return ITEMSIZE[self.state_dtype]

    # ---------------------------------------------------------------- weights
    @property
    def weights_are_master(self) -> bool:
        """The compute weights of streamed units are their master weights (no second copy) when
        both have one dtype and the plan keeps both in one tier: loads read the master, and the
        optimizer writes no separate weights."""
        return self.compute_dtype == self.state_dtype and self.plan.weights == self.plan.optimizer

    @property
    def weights_kind(self) -> str:
        """The kind that holds the compute weights of streamed units."""
        return "master" if self.weights_are_master else "weight"

    def resident(self, unit_index: int) -> bool:
        """Compute weights never leave DEVICE: ``pre``, ``post`` and the plan's resident layers."""
        is_layer = 1 <= unit_index <= self.n_layers
        return not is_layer or (unit_index - 1) in self.plan.resident_layers

    def weights_home(self, unit_index: int) -> Tier:
        """Where a unit's streamed compute weights wait between uses (its frozen part, and its
        trainable part unless ``trainable_home`` says otherwise); DEVICE: never leaves it."""
        return Tier.DEVICE if self.resident(unit_index) else self.plan.weights

    def trainable_home(self, unit_index: int, has_frozen: bool) -> Tier:
        """The home of a unit's trainable compute weights: beside a frozen part (adapters on a
        frozen base: small, updated every step) they stay on DEVICE."""
        return Tier.DEVICE if has_frozen else self.weights_home(unit_index)

    @property
    def aliases_home(self) -> bool:
        """On a CPU device, HOST-home weights are used in place: no copy, no DEVICE bytes."""
        return self.plan.weights == Tier.HOST and not self.on_gpu

    def master_from_loads(self, unit_index: int, immediate: bool) -> bool:
        """A unit's update takes its master from the weights loaded for its backward (no SSD read
        of it): with ``plan.master_from_loads``, on a CPU device (the loaded buffer is host
        memory), for a streamed layer whose weights are its master and whose state is on the
        SSD, when the update follows the backward at once (``immediate``: the step's last
        micro-batch, no deferred update: the buffer is still the master of this step)."""
        return (self.plan.master_from_loads and immediate and not self.on_gpu and self.weights_are_master
                and self.plan.weights == Tier.NVME and not self.resident(unit_index)
                and self.optimizer_tier(unit_index) == Tier.NVME)

    def master_on_device(self, unit_index: int, has_frozen: bool) -> bool:
        """A unit's update copies its master from its DEVICE-resident trainable weights (no SSD
        read of it): on a CPU device, when compute and state share one dtype (every update
        publishes the new master into that buffer, bit for bit) and the unit's state is on the
        SSD. Holds for deferred updates too: the buffer changes only when the unit is updated."""
        return (not self.on_gpu and self.compute_dtype == self.state_dtype
                and self.trainable_home(unit_index, has_frozen) == Tier.DEVICE
                and self.optimizer_tier(unit_index) == Tier.NVME)

    def kept_over_turn(self, i: int) -> bool:
        """Decoder layer i stays on DEVICE from its forward into backward (needed first there)."""
        return i >= self.n_layers - self.plan.turn_keep

    # ---------------------------------------------------------------- unit state
    def optimizer_tier(self, unit_index: int) -> Tier:
        """Where a unit's master + Adam states live: the plan's tier, or HOST for the first
        ``plan.optimizer_host_units`` units."""
        return Tier.HOST if unit_index < self.plan.optimizer_host_units else self.plan.optimizer

    def kinds(self, unit_index: int, tier: Tier, trainable: bool = True, frozen: bool = False) -> list[tuple[str, str]]:
        """(kind, dtype name) of a unit's state held in ``tier`` (HOST or NVME); ``trainable``,
        ``frozen``: whether the unit has parameters of each part. Frozen parameters have one
        kind, ``frozen`` (compute dtype, written once)."""
        out: list[tuple[str, str]] = []
        if trainable:
            if self.optimizer_tier(unit_index) == tier:
                out += [(kind, self.state_dtype) for kind in STATE_KINDS]
            if self.plan.grads == tier and self.keeps_grad(unit_index):
                out.append(("grad", self.state_dtype))
            if self.trainable_home(unit_index, frozen) == tier and not self.weights_are_master:
                out.append(("weight", self.compute_dtype))
        if frozen and self.weights_home(unit_index) == tier:
            out.append(("frozen", self.compute_dtype))
        return out

    def host_bytes(self, unit_numels: Iterable[tuple[int, int]]) -> int:
        """HOST bytes of the unit state the plan keeps in RAM (``unit_numels``: (trainable,
        frozen) elements of each unit, in unit order)."""
        total = 0
        for index, (numel, frozen_numel) in enumerate(unit_numels):
            for kind, dtype in self.kinds(index, Tier.HOST, numel > 0, frozen_numel > 0):
                total += (frozen_numel if kind == "frozen" else numel) * ITEMSIZE[dtype]
        return total

    def staging_bytes(self, largest_unit_numel: int) -> int:
        """HOST bytes of the optimizer worker's double-buffered staging slots."""
        return STAGING_SETS * len(STAGING_ROWS) * self.state_itemsize * min(self.plan.chunk_numel, largest_unit_numel)

    def device_floor_bytes(self, fixed_numel: int, largest_layer_numel: int, largest_unit_numel: int) -> int:
        """DEVICE must hold pre + post (``fixed_numel``), one layer's weights and the gradients of
        the largest unit."""
        return (fixed_numel + largest_layer_numel + largest_unit_numel) * self.compute_itemsize

    # ---------------------------------------------------------------- activations
    def recomputes(self, i: int) -> bool:
        """Layer i keeps its input and is recomputed in backward: every layer with
        ``recompute``, else the first ``recompute_layers`` (selective recompute)."""
        return self.plan.recompute or i < self.plan.recompute_layers

    @property
    def recomputed_layers(self) -> int:
        return sum(1 for i in range(self.n_layers) if self.recomputes(i))

    def swaps_activations(self, i: int) -> bool:
        """Layer i's saved activations go through the SSD: all layers but the last two, which
        backward needs first (they stay in memory over the turn), and those recomputed."""
        return (not self.recomputes(i) and self.plan.activations == Tier.NVME
                and i < self.n_layers - 2)

    def checkpoint_tier(self) -> Tier:
        """Where recomputed layers keep their inputs: the plan's tier, or with selective
        recompute DEVICE (a layer's input is a small part of what it would swap)."""
        return self.plan.activations if self.plan.recompute else Tier.DEVICE

    @property
    def swapped_layers(self) -> int:
        """How many layers' saved activations go through the SSD each micro-batch."""
        return sum(1 for i in range(self.n_layers) if self.swaps_activations(i))

    @property
    def swap_tier(self) -> Tier:
        """Where activations read back from the SSD (swapped ones, NVMe checkpoints) wait in
        memory: host buffers (the DEVICE on a CPU)."""
        return Tier.HOST if self.on_gpu else Tier.DEVICE
