"""WeightStreamer: puts each unit's compute weights on DEVICE while it is needed.

Resident units (``pre``, ``post``, the plan's resident layers) keep one DEVICE buffer for the
whole run; the optimizer publishes their new weights into it. Streamed layers are loaded from
their home (HOST or NVME, via the StateStore) into a fresh DEVICE buffer on ``acquire`` (or
earlier by ``prefetch``), bound to the model's parameters, and released after use.

Threads: ``acquire``, ``release``, ``prefetch``, ``token`` and ``view`` run on the main thread;
loads run on the ``loader`` thread (``overlap: false``: inline); ``publish`` runs on the optimizer
worker. A load first waits on the unit's UnitClock (its pending update must have landed). DEVICE
bytes of a load are reserved on the main thread when it is requested, so prefetch decisions that
follow see them. Sync points: ``acquire`` (the load has finished), the copy stream's synchronize
after each host-to-device copy (loader or worker thread, never the compute stream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.io.posix import aligned_empty
from offload.tiers import Accountant, Tier
from scheduler.model_map import Unit
from scheduler.state_store import StateStore, done
from scheduler.trace import Tracer
from scheduler.unit_clock import UnitClock


@dataclass(frozen=True)
class WeightToken:
    """A weight tensor autograd saved, as a view of its unit's flat buffer (re-fetched in backward)."""

    unit_index: int
    offset: int  # elements from the start of the flat buffer
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class _Residency:
    device_flat: torch.Tensor | None = None  # the unit's compute weights on DEVICE
    load: Future[torch.Tensor] | None = None  # a requested load


class WeightStreamer:
    def __init__(self, state: StateStore, clock: UnitClock, params: dict[str, nn.Parameter], acct: Accountant,
                 device: torch.device, tracer: Tracer, make_room: Callable[[int], None]) -> None:
        self.state = state
        self.placement = state.placement
        self.units = state.map.units
        self.clock = clock
        self.params = params
        self.acct = acct
        self.device = device
        self.tracer = tracer
        self.make_room = make_room  # waits for optimizer jobs to free DEVICE bytes (GradHandoff)
        self.dtype = state.compute_dtype
        self._units = [_Residency() for _ in self.units]
        self._loader: ThreadPoolExecutor | None = None
        self.copy_stream: Any = None
        self._grad_reserve_bytes = max(u.numel for u in state.map.layer_units) * self._itemsize

    @property
    def _itemsize(self) -> int:
        return self.placement.compute_itemsize

    def start(self) -> None:
        if self.placement.plan.overlap:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    def place_resident(self, u: Unit, weights: torch.Tensor) -> None:
        """Start-up: a resident unit's DEVICE buffer, holding its initial weights."""
        flat = self._alloc(u)
        flat.copy_(weights)
        self._units[u.index].device_flat = flat

    def bind_resident(self) -> None:
        for u in self.units:
            if self.placement.resident(u.index):
                self._bind(u)

    # ---------------------------------------------------------------- main thread
    def acquire(self, unit_index: int) -> None:
        """Make the unit's weights usable by the model (waits for its load or its update)."""
        u, r = self.units[unit_index], self._units[unit_index]
        if self.placement.resident(unit_index):
            with self.tracer.span("wait", f"update of {u.name}"):
                self.clock.wait(unit_index)  # sync point: the unit's optimizer update has finished
            return
        if r.device_flat is None:
            self._request(unit_index)
            assert r.load is not None
            with self.tracer.span("wait", f"weights of {u.name}"):
                r.device_flat = r.load.result()  # sync point: the load has finished
            r.load = None
        self._bind(u)

    def release(self, unit_index: int) -> None:
        """A streamed unit's weights leave DEVICE (resident units stay)."""
        r = self._units[unit_index]
        if self.placement.resident(unit_index) or r.device_flat is None:
            return
        self._unbind(self.units[unit_index])
        if not self.placement.aliases_home:
            self.acct.free(Tier.DEVICE, r.device_flat.numel() * r.device_flat.element_size())
        r.device_flat = None

    def release_layers(self) -> None:
        for u in self.state.map.layer_units:
            self.release(u.index)

    def prefetch(self, layer_indices: Iterable[int]) -> None:
        """Start loading these decoder layers while there is DEVICE room, keeping room for the
        gradients of one layer (they appear before the next layer is needed)."""
        if not self.placement.plan.overlap:
            return
        for i in layer_indices:
            unit_index = i + 1
            r = self._units[unit_index]
            if not self.placement.resident(unit_index) and r.device_flat is None and r.load is None:
                nbytes = self.units[unit_index].numel * self._itemsize
                if not self.acct.fits(Tier.DEVICE, nbytes + self._grad_reserve_bytes):
                    return  # no room now: it will be loaded on demand
                self._request(unit_index)

    def token(self, unit_index: int, t: torch.Tensor) -> WeightToken | None:
        """A saved tensor that is a view of the unit's weights, as a token (else None)."""
        flat = self._units[unit_index].device_flat
        if (flat is not None and t.device == flat.device and t.dtype == flat.dtype
                and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()):
            return WeightToken(unit_index, t.storage_offset() - flat.storage_offset(), tuple(t.shape), t.stride())
        return None

    def view(self, token: WeightToken) -> torch.Tensor:
        flat = self._units[token.unit_index].device_flat
        assert flat is not None, "weights must be loaded before their layer's backward"
        return flat.as_strided(token.size, token.stride, flat.storage_offset() + token.offset)

    def _request(self, unit_index: int) -> None:
        u, r = self.units[unit_index], self._units[unit_index]
        if self.placement.resident(unit_index) or r.device_flat is not None or r.load is not None:
            return
        if not self.placement.aliases_home:
            nbytes = u.numel * self._itemsize
            self.make_room(nbytes)  # gradients waiting for the worker hold DEVICE memory
            self.acct.alloc(Tier.DEVICE, nbytes, f"weights of {u.name}")
        r.load = done(self._load(u)) if self._loader is None else self._loader.submit(self._load, u)

    def _bind(self, u: Unit) -> None:
        flat = self._units[u.index].device_flat
        assert flat is not None
        for s in u.params:
            self.params[s.name].data = flat[s.offset : s.offset + s.numel].view(s.shape)

    def _unbind(self, u: Unit) -> None:
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for s in u.params:
            self.params[s.name].data = empty

    def _alloc(self, u: Unit, accounted: bool = False) -> torch.Tensor:
        """A DEVICE flat buffer for a unit's weights; ``accounted``: bytes already reserved."""
        if not accounted:
            self.acct.alloc(Tier.DEVICE, u.numel * self._itemsize, f"weights of {u.name}")
        if self.device.type == "cpu":
            return aligned_empty(u.numel * self._itemsize).view(self.dtype)
        return torch.empty(u.numel, dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------- loader thread
    def _load(self, u: Unit) -> torch.Tensor:
        """Wait for the unit's pending update, then bring its weights to DEVICE."""
        self.clock.wait(u.index)  # sync point: the worker has written this unit's new weights
        if self.placement.aliases_home:
            return self.state.host_weights(u)  # DEVICE is host memory: use the home copy in place
        flat = self._alloc(u, accounted=True)
        if self.placement.plan.weights == Tier.HOST:
            self._h2d(flat, self.state.host_weights(u))
        elif self.device.type == "cpu":
            self.state.read_weights(u, flat)
        else:
            staging = torch.empty(u.numel, dtype=flat.dtype, pin_memory=True)
            self.state.read_weights(u, staging)
            self._h2d(flat, staging)
        return flat

    # ---------------------------------------------------------------- optimizer worker thread
    def publish(self, u: Unit, a: int, b: int, weights: torch.Tensor) -> None:
        """A resident unit's new weights [a, b) into its DEVICE buffer."""
        flat = self._units[u.index].device_flat
        assert flat is not None
        self._h2d(flat[a:b], weights)

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        t_start_s = self.tracer.clock()
        if self.device.type == "cuda":
            # The destination may be memory the compute stream just released (caching
            # allocator): order the copy after all work queued on the compute stream so far.
            self.copy_stream.wait_stream(torch.cuda.default_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
            self.copy_stream.synchronize()  # sync point: this thread only, never the compute stream
            self.acct.count("h2d_bytes", nbytes)
        else:
            dst.copy_(src)
        if t_start_s:  # recording: name the event
            self.tracer.add("h2d", f"{nbytes} bytes", t_start_s)
