"""StateStore: every unit's optimizer state, kept gradients and streamed weights, on their tier.

The only place that switches on a tier for unit state (HOST tensors in RAM, or chunked extents
of the swap store on NVME) and the only place that names extents (``unit.kind.chunk``).
Each kind of a unit is cut into chunks of ``plan.chunk_numel`` elements: the optimizer worker
moves one chunk at a time, so its staging stays small whatever the size of a unit.

Threads: ``init_unit`` and the whole-unit reads run on the main thread (start-up, export);
``host`` and ``read_unit`` on the loader thread (weights); the chunk reads and writes on the optimizer worker. A
unit's HOST tensors are touched by one thread at a time: the UnitClock orders the worker's
writes before the loader's next read of the same unit.

On a GPU the HOST tensors the weight loader copies to DEVICE (streamed weights, frozen parts) are
page-locked in place (``offload.pinned``: exactly their bytes, already counted in HOST), so their
copies are asynchronous; ``close()`` unlocks them.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from offload.pinned import PinnedBuffers
from offload.store import SwapStore, TensorSpec
from offload.tiers import Tier
from scheduler.model_map import ModelMap, Unit
from scheduler.placement import STATE_KINDS, Placement

Chunk = tuple[int, int]  # [a, b) element range of a unit's flat buffer
MOMENT_KINDS = tuple(k for k in STATE_KINDS if k != "master")
"""What an update reads and writes on the SSD when the unit's master is already in memory."""


def chunk_ranges(numel: int, chunk_numel: int) -> list[Chunk]:
    """[a, b) element ranges of at most ``chunk_numel`` covering ``numel`` (none for 0)."""
    return [(a, min(a + chunk_numel, numel)) for a in range(0, numel, chunk_numel)]


def extent_name(unit: Unit, kind: str, chunk: int) -> str:
    return f"{unit.name}.{kind}.{chunk}"


def state_extents(units: tuple[Unit, ...], chunk_numel: int) -> list[tuple[Unit, dict[str, list[tuple[str, int, int]]]]]:
    """The store extents an executor with optimizer states on NVME keeps them in, per unit and
    kind: (extent name, first element, end element), one per chunk of ``chunk_numel``."""
    return [(u, {kind: [(extent_name(u, kind, c), a, b) for c, (a, b) in enumerate(chunk_ranges(u.numel, chunk_numel))]
                 for kind in STATE_KINDS})
            for u in units]


def done(value: Any = None) -> Future[Any]:
    """A future that has already finished with ``value``."""
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


@dataclass
class AdamRows:
    """One chunk of a unit's master, exp_avg and exp_avg_sq, where AdamW updates them in place:
    the HOST tensors themselves, or staging rows the NVME extents are read into."""

    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class StateStore:
    """Unit state by (unit, kind, chunk) on the tier the placement names."""

    def __init__(self, model_map: ModelMap, placement: Placement, store: Any,
                 state_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        self.map = model_map
        self.placement = placement
        self.store: SwapStore = store  # or a TracedStore around it
        self.state_dtype = state_dtype
        self.compute_dtype = compute_dtype
        chunk_numel = placement.plan.chunk_numel
        self.chunks = [chunk_ranges(u.numel, chunk_numel) for u in model_map.units]  # trainable kinds
        self.frozen_chunks = [chunk_ranges(u.frozen_numel, chunk_numel) for u in model_map.units]
        self._host: list[dict[str, torch.Tensor]] = [{} for _ in model_map.units]  # HOST kinds per unit
        self._pinned = PinnedBuffers() if placement.on_gpu else None  # loader homes on a GPU machine
        # units whose master extents are older than their DEVICE-resident weights (updates that
        # skip the master write: ``write_adam(with_master=False)``; optimizer worker adds, main
        # thread clears in ``put_master`` after a sync point)
        self._stale_masters: set[int] = set()

    def close(self) -> None:
        """Unlock the page-locked HOST tensors (they stay usable, pageable)."""
        if self._pinned is not None:
            self._pinned.close()

    def _keep_host(self, u: Unit, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the HOST home of a kind: page-locked on a GPU when the weight loader
        copies it to DEVICE (a streamed unit's weights, or its frozen part)."""
        loaded = kind == "frozen" or (kind == self.placement.weights_kind and self.tier("weight", u) == Tier.HOST)
        if self._pinned is not None and loaded and kind in ("frozen", "weight", "master"):
            tensor = self._pinned.copy_of(tensor)
        self._host[u.index][kind] = tensor
        return tensor

    def tier(self, kind: str, unit: Unit) -> Tier:
        if kind in STATE_KINDS:
            return self.placement.optimizer_tier(unit.index)
        if kind == "grad":
            return self.placement.plan.grads
        if kind == "frozen":
            return self.placement.weights_home(unit.index)
        return self.placement.trainable_home(unit.index, unit.frozen_numel > 0)

    def kinds(self, u: Unit, tier: Tier) -> list[tuple[str, str]]:
        return self.placement.kinds(u.index, tier, u.numel > 0, u.frozen_numel > 0)

    def _chunks(self, u: Unit, kind: str) -> list[Chunk]:
        return (self.frozen_chunks if kind == "frozen" else self.chunks)[u.index]

    def _dtype(self, kind: str) -> torch.dtype:
        return self.compute_dtype if kind in ("weight", "frozen") else self.state_dtype

    def reserve(self) -> None:
        """Reserve every NVME extent of every unit (main thread, start-up)."""
        specs = []
        for u in self.map.units:
            for kind, dtype in self.kinds(u, Tier.NVME):
                specs += [TensorSpec(extent_name(u, kind, c), getattr(torch, dtype), (b - a,))
                          for c, (a, b) in enumerate(self._chunks(u, kind))]
        self.store.reserve(specs)

    # ---------------------------------------------------------------- whole units (main thread)
    def init_state(self, u: Unit, master: torch.Tensor, exp_avg: torch.Tensor | None,
                   exp_avg_sq: torch.Tensor | None) -> None:
        """Write a unit's starting master and Adam states (``None``: zeros)."""
        sd, n = self.state_dtype, u.numel
        if n == 0:
            return  # nothing trainable: no state
        if self.tier("master", u) == Tier.HOST:
            self._keep_host(u, "master", master)
            self._host[u.index].update(
                exp_avg=torch.zeros(n, dtype=sd) if exp_avg is None else exp_avg.clone(),
                exp_avg_sq=torch.zeros(n, dtype=sd) if exp_avg_sq is None else exp_avg_sq.clone())
            return
        zeros = torch.zeros(min(n, self.placement.plan.chunk_numel), dtype=sd)
        futs = []
        for c, (a, b) in enumerate(self.chunks[u.index]):
            for kind, flat in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                futs.append(self.store.write(extent_name(u, kind, c), zeros[: b - a] if flat is None else flat[a:b]))
        _wait_all(futs)

    def init_weights(self, u: Unit, master: torch.Tensor, weights: torch.Tensor) -> None:
        """Put a streamed unit's starting compute weights (``weights``, cast from ``master``) in
        their home, and zero its HOST gradients (DEVICE-resident weights are the caller's)."""
        if u.numel == 0:
            return
        if self.tier("grad", u) == Tier.HOST and self.placement.keeps_grad(u.index):
            self._host[u.index]["grad"] = torch.zeros(u.numel, dtype=self.state_dtype)
        home = self.tier("weight", u)
        if home == Tier.DEVICE or self.placement.weights_are_master:
            return  # the master just written is the weights' home
        self._put(u, "weight", weights.clone() if weights is master and home == Tier.HOST else weights)

    def init_frozen(self, u: Unit, flat: torch.Tensor) -> None:
        """Write a unit's frozen parameters (compute dtype) to their home, once (DEVICE-resident
        ones are the caller's)."""
        if u.frozen_numel and self.tier("frozen", u) != Tier.DEVICE:
            self._put(u, "frozen", flat)

    def _put(self, u: Unit, kind: str, flat: torch.Tensor) -> None:
        """A whole kind of a unit into its HOST or NVME home (blocking)."""
        if self.tier(kind, u) == Tier.HOST:
            self._keep_host(u, kind, flat)
            return
        _wait_all([self.store.write(extent_name(u, kind, c), flat[a:b]) for c, (a, b) in enumerate(self._chunks(u, kind))])

    def read_unit(self, u: Unit, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A whole kind of one unit (blocking): a copy of the HOST tensor, or its extents read."""
        host = self._host[u.index].get(kind)
        if host is not None:
            return host.clone() if out is None else out.copy_(host)
        if out is None:
            out = torch.empty(u.frozen_numel if kind == "frozen" else u.numel, dtype=self._dtype(kind))
        _wait_all([self.store.read(extent_name(u, kind, c), out[a:b]) for c, (a, b) in enumerate(self._chunks(u, kind))])
        return out

    def unit_state(self, u: Unit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of a unit's flat (master, exp_avg, exp_avg_sq)."""
        master, exp_avg, exp_avg_sq = (self.read_unit(u, kind) for kind in STATE_KINDS)
        return master, exp_avg, exp_avg_sq

    # ---------------------------------------------------------------- weights (loader thread)
    def host(self, u: Unit, kind: str) -> torch.Tensor:
        """The HOST home of a kind (the loader's: ``weights_kind`` or ``frozen``)."""
        return self._host[u.index][kind]

    # ---------------------------------------------------------------- chunks (optimizer worker)
    def adam_rows(self, u: Unit, c: int, staging: AdamRows,
                  master_from: torch.Tensor | None = None) -> tuple[AdamRows, list[Future[Any]]]:
        """Chunk c's AdamW state: HOST views (updated in place), or ``staging`` with its reads
        issued; ``master_from``: the unit's whole master, already in memory (the weights loaded
        for its backward): chunk c is copied from it, not read."""
        a, b = self.chunks[u.index][c]
        host = self._host[u.index]
        if "master" in host:
            return AdamRows(*(host[kind][a:b] for kind in STATE_KINDS)), []
        kinds = STATE_KINDS
        if master_from is not None:
            staging.master.copy_(master_from[a:b])
            kinds = MOMENT_KINDS
        futs = [self.store.read(extent_name(u, kind, c), getattr(staging, kind)) for kind in kinds]
        return staging, futs

    def write_adam(self, u: Unit, c: int, rows: AdamRows, with_master: bool = True) -> list[Future[None]]:
        """Write back chunk c's updated AdamW state (nothing to do for HOST views). ``with_master``
        False: the unit's DEVICE-resident weights hold its master (``Placement.master_on_device``):
        only exp_avg and exp_avg_sq are written; the master extents are brought up to date when
        the state is read out (``stale_masters``, ``put_master``)."""
        if "master" in self._host[u.index]:
            return []
        kinds = STATE_KINDS
        if not with_master:
            self._stale_masters.add(u.index)
            kinds = MOMENT_KINDS
        return [self.store.write(extent_name(u, kind, c), getattr(rows, kind)) for kind in kinds]

    def stale_masters(self) -> list[Unit]:
        """Units whose master extents are older than their resident weights (main thread, after
        every update has landed)."""
        return [u for u in self.map.units if u.index in self._stale_masters]

    def put_master(self, u: Unit, master: torch.Tensor) -> None:
        """Write a unit's whole master into its extents (blocking; main thread, every update landed)."""
        self._put(u, "master", master)
        self._stale_masters.discard(u.index)

    def read_grad(self, u: Unit, c: int, out: torch.Tensor) -> list[Future[Any]]:
        """Chunk c of a unit's kept gradient into ``out``."""
        return self._chunk_io(u, "grad", c, out, write=False)

    def write_grad(self, u: Unit, c: int, grad: torch.Tensor) -> list[Future[None]]:
        return self._chunk_io(u, "grad", c, grad, write=True)

    def write_weights(self, u: Unit, c: int, weights: torch.Tensor) -> list[Future[None]]:
        """Chunk c of a streamed unit's new compute weights to their home (nothing when the master
        just updated is that home; DEVICE-resident units are the WeightStreamer's)."""
        if self.placement.weights_are_master:
            return []
        return self._chunk_io(u, "weight", c, weights, write=True)

    def _chunk_io(self, u: Unit, kind: str, c: int, tensor: torch.Tensor, write: bool) -> list[Future[Any]]:
        """Copy chunk c of a HOST kind (done on return), or submit the I/O of its NVME extent."""
        host = self._host[u.index].get(kind)
        if host is not None:
            a, b = self.chunks[u.index][c]
            if write:
                host[a:b].copy_(tensor)
            else:
                tensor.copy_(host[a:b])
            return []
        name = extent_name(u, kind, c)
        return [self.store.write(name, tensor) if write else self.store.read(name, tensor)]

    def extents(self) -> list[tuple[Unit, dict[str, list[tuple[str, int, int]]] | None]] | None:
        """Where each unit's master and Adam states live in the store: ``None`` for a unit that
        keeps them in RAM, and ``None`` overall when every unit does."""
        if self.placement.plan.optimizer != Tier.NVME:
            return None
        return [(u, kinds if self.tier("master", u) == Tier.NVME else None)
                for u, kinds in state_extents(self.map.units, self.placement.plan.chunk_numel)]


def _wait_all(futures: list[Future[Any]]) -> None:
    for f in futures:
        f.result()
