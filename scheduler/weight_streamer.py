"""WeightStreamer: puts each unit's compute weights on DEVICE while it is needed.

A unit has up to two parts, each one flat buffer: its trainable weights and its frozen ones (see
``Unit``). A part is resident (one DEVICE buffer for the whole run: ``pre``, ``post``, the plan's
resident layers, and the trainable part beside a frozen one, e.g. LoRA adapters) or streamed
(loaded from its home, HOST or NVME via the StateStore, into a fresh DEVICE buffer on ``acquire``
or earlier by ``prefetch``, released after use). The optimizer publishes the new weights of
resident trainable parts; frozen parts never change, so their loads wait for nothing.

CUDA streams: loads copy on ``copy_stream``, compute runs on the caller's stream
(``compute_stream``, captured at start). A load allocates its buffer on the copy stream and the
compute stream is recorded on it when acquired, so loads never wait for queued compute; each load
records a "ready" event after its copy and ``acquire`` makes the compute stream wait on it (no
host sync on the compute thread). A resident unit's new weights are copied on their own
``publish_stream``, after the compute queued before them (it may still read them), so loads do
not queue behind that compute.

Threads: ``acquire``, ``release``, ``prefetch``, ``token`` and ``view`` run on the thread driving
the step (the main thread, or in a layer-major forward the micro-batch thread holding the turn:
one at a time, ``scheduler.lockstep``);
loads run on the ``loader`` thread (``overlap: false``: inline); ``publish`` runs on the optimizer
worker. A load first waits on the unit's UnitClock (its pending update must have landed). DEVICE
bytes of a load are reserved on the main thread when it is requested, so prefetch decisions that
follow see them. Sync points: ``acquire`` (the load's host part has finished: its read from
the SSD, its copy queued), on the loader thread the previous copy out of the pinned staging
before the next read into it and the copy of a trainable part from its HOST home (the worker
rewrites that home after the update), on the worker thread each publish's copy.

On a CPU device a released buffer is kept for the next load of its size (``_spare``: cached
bytes in the Accountant, given up when an allocation needs the room): a fresh buffer costs its
page faults on every load (0.6 CPU-seconds per GB read here, against 0.1 into a buffer reused).
Buffers lent to the optimizer (``lend``) come back through ``recycle`` on the worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.io.posix import aligned_empty
from offload.pinned import PinnedBuffers
from offload.tiers import Accountant, Tier
from scheduler.model_map import ParamSlot, Unit
from scheduler.state_store import StateStore, done
from scheduler.trace import Tracer
from scheduler.unit_clock import UnitClock


@dataclass(frozen=True)
class WeightToken:
    """A weight tensor autograd saved, as a view of its unit's flat buffer (re-fetched in backward)."""

    unit_index: int
    part: int  # which flat buffer of the unit (0: trainable, 1: frozen)
    offset: int  # elements from the start of the flat buffer
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class _Part:
    """One flat buffer of a unit: its trainable weights (``kind``: the StateStore kind they are
    read from) or its frozen ones (``frozen``)."""

    kind: str
    slots: tuple[ParamSlot, ...]
    numel: int
    resident: bool
    flat: torch.Tensor | None = None  # on DEVICE (bound to the parameters while acquired)
    load: Future[tuple[torch.Tensor, Any]] | None = None  # a requested load (streamed parts):
    # its buffer and, on CUDA, the event after its copy


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
        self._parts = [self._unit_parts(u) for u in self.units]
        self._loader: ThreadPoolExecutor | None = None
        self.copy_stream: Any = None  # CUDA: the stream of the loads' host-to-device copies
        self.publish_stream: Any = None  # CUDA: the stream of resident units' new weights
        self.compute_stream: Any = None  # CUDA: the caller's current stream at start (compute runs on it)
        self._pinned: PinnedBuffers | None = None  # CUDA: owns ``_staging``
        self._staging: torch.Tensor | None = None  # CUDA, NVMe loads: page-locked landing of one part
        self._staging_copied: Any = None  # CUDA: the event after the last copy out of ``_staging`` (loader)
        self._grad_reserve_bytes = max(u.numel for u in state.map.layer_units) * self._itemsize
        # the activation store's DEVICE bytes held in backward, also kept free by prefetch (set
        # by the executor once the store exists)
        self.backward_hold_bytes: Callable[[], int] = lambda: 0
        # released CPU buffers by size, for the next loads (main, loader and worker threads)
        self._spare: dict[int, list[torch.Tensor]] = {}
        self._spare_lock = threading.Lock()
        # the loads in flight in one phase, and the buffers lent to the optimizer meanwhile
        self._spare_max = 1 + self.placement.plan.prefetch_depth + self.placement.plan.job_slots

    def _unit_parts(self, u: Unit) -> list[_Part]:
        trainable = _Part(self.placement.weights_kind, u.params, u.numel,
                          self.placement.trainable_home(u.index, u.frozen_numel > 0) == Tier.DEVICE)
        frozen = _Part("frozen", u.frozen, u.frozen_numel, self.placement.resident(u.index))
        return [p for p in (trainable, frozen) if p.numel]

    @property
    def _itemsize(self) -> int:
        return self.placement.compute_itemsize

    def start(self) -> None:
        if self.placement.plan.overlap:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
            self.publish_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.current_stream(self.device)
            self._start_staging()
        elif not self.placement.aliases_home:
            self.acct.add_reclaimer(self._reclaim)

    def _start_staging(self) -> None:
        """CUDA, weights on NVMe: one page-locked buffer the size of the largest streamed part,
        counted in HOST: every load lands there, then copies to DEVICE (loads run one at a time,
        on the loader thread; a load reads into it once the previous copy out of it has run)."""
        streamed = [p.numel for parts in self._parts for p in parts if not p.resident]
        if self.placement.plan.weights != Tier.NVME or not streamed:
            return
        numel = max(streamed)
        self.acct.alloc(Tier.HOST, numel * self._itemsize, "pinned staging of weight loads")
        self._pinned = PinnedBuffers()
        self._staging = self._pinned.empty(numel, self.dtype)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None
        if self.copy_stream is not None:
            # sync point: copies queued by loads never acquired (an error) still read pinned memory
            self.copy_stream.synchronize()
            self.publish_stream.synchronize()
        if self._pinned is not None:
            self._pinned.close()
            self._pinned = None
            self.acct.free(Tier.HOST, self._staging.numel() * self._itemsize)
            self._staging = None
        self._spare_max = 0  # buffers given back from now on (jobs still running) are freed
        self._reclaim(Tier.DEVICE, 1 << 62)
        self.acct.remove_reclaimer(self._reclaim)

    def place_resident(self, u: Unit, weights: torch.Tensor, frozen: bool = False) -> None:
        """Start-up: a resident part's DEVICE buffer, holding its initial weights."""
        for part in self._parts[u.index]:
            if part.resident and (part.kind == "frozen") == frozen:
                part.flat = self._alloc(u, part)
                part.flat.copy_(weights)

    def bind_resident(self) -> None:
        for u in self.units:
            self._bind(u, resident=True)

    # ---------------------------------------------------------------- main thread
    def acquire(self, unit_index: int) -> None:
        """Make the unit's weights usable by the model (waits for its loads, or for its update)."""
        u, parts = self.units[unit_index], self._parts[unit_index]
        if any(p.resident and p.kind != "frozen" for p in parts):
            with self.tracer.span("wait", f"update of {u.name}"):
                self.clock.wait(unit_index)  # sync point: the unit's optimizer update has finished
        streamed = [p for p in parts if not p.resident and p.flat is None]
        if streamed:
            self._request(unit_index)
            with self.tracer.span("wait", f"weights of {u.name}"):
                for p in streamed:
                    assert p.load is not None
                    p.flat, ready = p.load.result()  # sync point: the load's host part has finished
                    p.load = None
                    if self.compute_stream is not None:
                        compute = torch.cuda.current_stream(self.device)  # this thread's compute
                        if ready is not None:  # the compute queued from here on runs after the copy
                            compute.wait_event(ready)  # (a GPU-side wait)
                        # allocated on the copy stream, read by compute: its block is not reused
                        # before the compute stream has passed this point of its queue
                        p.flat.record_stream(compute)
        self._bind(u, resident=False)

    def release(self, unit_index: int) -> None:
        """A unit's streamed parts leave DEVICE (resident parts stay)."""
        for part in self._parts[unit_index]:
            if part.resident or part.flat is None:
                continue
            self._unbind(part)
            if not self.placement.aliases_home:
                self.recycle(part.flat)
            part.flat = None

    def lend(self, unit_index: int) -> torch.Tensor | None:
        """A unit's streamed trainable buffer, loaded and holding its master weights, handed to
        the optimizer (``Placement.master_from_loads``) instead of released (its DEVICE bytes stay
        counted until the borrower gives it back: ``recycle``); None if the unit has no such
        buffer on DEVICE."""
        part = self._parts[unit_index][0] if self._parts[unit_index] else None
        if part is None or part.resident or part.kind != "master" or part.flat is None or self.placement.aliases_home:
            return None
        flat, part.flat = part.flat, None
        self._unbind(part)
        return flat

    def resident_master(self, unit_index: int) -> torch.Tensor | None:
        """A unit's DEVICE-resident trainable buffer when it holds the unit's master
        (``Placement.master_on_device``): the optimizer copies each chunk from it before
        publishing that chunk's new values (not lent: it stays the unit's); else None."""
        u, parts = self.units[unit_index], self._parts[unit_index]
        part = parts[0] if parts and parts[0].kind != "frozen" else None
        if part is None or not part.resident or part.flat is None:
            return None
        return part.flat if self.placement.master_on_device(unit_index, u.frozen_numel > 0) else None

    def release_layers(self) -> None:
        for u in self.state.map.layer_units:
            self.release(u.index)

    def prefetch(self, layer_indices: Iterable[int]) -> None:
        """Start loading these decoder layers while there is DEVICE room, keeping room for the
        gradients of one layer (they appear before the next layer is needed) and for the layer
        inputs the activation store holds in backward."""
        if not self.placement.plan.overlap:
            return
        for i in layer_indices:
            waiting = [p for p in self._parts[i + 1] if not p.resident and p.flat is None and p.load is None]
            if waiting:
                nbytes = sum(p.numel for p in waiting) * self._itemsize
                if not self.acct.fits(Tier.DEVICE, nbytes + self._grad_reserve_bytes + self.backward_hold_bytes()):
                    return  # no room now: it will be loaded on demand
                self._request(i + 1)

    def frozen_weights(self, u: Unit) -> torch.Tensor:
        """A copy of a unit's frozen weights, from DEVICE when resident, else from their home."""
        part = next(p for p in self._parts[u.index] if p.kind == "frozen")
        if part.resident:
            assert part.flat is not None
            return part.flat.to("cpu", copy=True)
        return self.state.read_unit(u, "frozen")

    def token(self, unit_index: int, t: torch.Tensor) -> WeightToken | None:
        """A saved tensor that is a view of the unit's weights, as a token (else None)."""
        for k, part in enumerate(self._parts[unit_index]):
            flat = part.flat
            if (flat is not None and t.device == flat.device and t.dtype == flat.dtype
                    and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()):
                return WeightToken(unit_index, k, t.storage_offset() - flat.storage_offset(), tuple(t.shape), t.stride())
        return None

    def view(self, token: WeightToken) -> torch.Tensor:
        flat = self._parts[token.unit_index][token.part].flat
        assert flat is not None, "weights must be loaded before their layer's backward"
        return flat.as_strided(token.size, token.stride, flat.storage_offset() + token.offset)

    def _request(self, unit_index: int) -> None:
        """Main thread: reserve DEVICE bytes for the unit's streamed parts and start their loads."""
        u = self.units[unit_index]
        for part in self._parts[unit_index]:
            if part.resident or part.flat is not None or part.load is not None:
                continue
            spare = None
            if not self.placement.aliases_home:
                nbytes = part.numel * self._itemsize
                self.make_room(nbytes)  # gradients waiting for the worker hold DEVICE memory
                spare = self._take_spare(nbytes, f"weights of {u.name}")
                if spare is None:
                    self.acct.alloc(Tier.DEVICE, nbytes, f"weights of {u.name}")
            part.load = (done(self._load(u, part, spare)) if self._loader is None
                         else self._loader.submit(self._load, u, part, spare))

    def _bind(self, u: Unit, resident: bool) -> None:
        for part in self._parts[u.index]:
            if part.resident != resident:
                continue
            flat = part.flat
            assert flat is not None
            for s in part.slots:
                self.params[s.name].data = flat[s.offset : s.offset + s.numel].view(s.shape)

    def _unbind(self, part: _Part) -> None:
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for s in part.slots:
            self.params[s.name].data = empty

    def _alloc(self, u: Unit, part: _Part, accounted: bool = False) -> torch.Tensor:
        """A DEVICE flat buffer for a part's weights; ``accounted``: bytes already reserved."""
        if not accounted:
            self.acct.alloc(Tier.DEVICE, part.numel * self._itemsize, f"weights of {u.name}")
        if self.device.type == "cpu":
            return aligned_empty(part.numel * self._itemsize).view(self.dtype)
        return torch.empty(part.numel, dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------- loader thread
    def _load(self, u: Unit, part: _Part, spare: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Bring a streamed part's weights to DEVICE (trainable ones once their update landed),
        into ``spare`` when given (a released buffer of the size, already accounted). Returns the
        buffer and, on CUDA, the event after its copy (queued, not waited for)."""
        if part.kind != "frozen":
            self.clock.wait(u.index)  # sync point: the worker has written this unit's new weights
        if self.placement.aliases_home:
            return self.state.host(u, part.kind), None  # DEVICE is host memory: the home copy in place
        if self.device.type == "cuda":
            # allocated on the copy stream: the block comes from that stream's pool, where a
            # buffer the compute read returns only once the compute queued on it has run
            # (``record_stream`` in ``acquire``): the copy needs no wait on the compute stream
            # and overlaps it
            with torch.cuda.stream(self.copy_stream):
                flat = torch.empty(part.numel, dtype=self.dtype, device=self.device)
        else:
            flat = spare if spare is not None else self._alloc(u, part, accounted=True)
        if self.placement.plan.weights == Tier.HOST:
            # a trainable home is rewritten by the worker after the unit's update, which a job
            # without gradients runs with no GPU event to order it after this copy: that copy is
            # waited for here (loader thread); frozen homes never change
            return flat, self._h2d(flat, self.state.host(u, part.kind), wait=part.kind != "frozen")
        if self.device.type == "cpu":
            self.state.read_unit(u, part.kind, flat)
            return flat, None
        assert self._staging is not None, "a load from the SSD on CUDA needs the pinned staging"
        if self._staging_copied is not None:
            self._staging_copied.synchronize()  # sync point (the loading thread): the staging is free again
        staging = self._staging[: part.numel]
        self.state.read_unit(u, part.kind, staging)
        self._staging_copied = self._h2d(flat, staging, wait=False)
        return flat, self._staging_copied

    # ---------------------------------------------------------------- spare buffers (CPU device)
    def recycle(self, flat: torch.Tensor) -> None:
        """A streamed buffer no longer in use (released, or given back by the optimizer): kept
        for the next load of its size on a CPU device, else its DEVICE bytes freed. Any thread."""
        nbytes = flat.numel() * flat.element_size()
        if self.device.type == "cpu":
            with self._spare_lock:
                if sum(len(v) for v in self._spare.values()) < self._spare_max:
                    self._spare.setdefault(nbytes, []).append(flat)
                    self.acct.cache(Tier.DEVICE, nbytes)
                    return
        self.acct.free(Tier.DEVICE, nbytes)

    def _take_spare(self, nbytes: int, what: str) -> torch.Tensor | None:
        """A kept buffer of ``nbytes``, back in use (accounted), or None."""
        with self._spare_lock:
            kept = self._spare.get(nbytes)
            if not kept:
                return None
            self.acct.uncache(Tier.DEVICE, nbytes, reuse=True, what=what)  # BudgetError: still kept
            return kept.pop()

    def _reclaim(self, tier: Tier, nbytes: int) -> None:
        """The Accountant's reclaimer: give up kept buffers until ``nbytes`` are freed."""
        if tier != Tier.DEVICE:
            return
        with self._spare_lock:
            for size in sorted(self._spare, reverse=True):
                while self._spare[size] and nbytes > 0:
                    self._spare[size].pop()
                    self.acct.uncache(Tier.DEVICE, size, reuse=False)
                    nbytes -= size

    # ---------------------------------------------------------------- optimizer worker thread
    def publish(self, u: Unit, a: int, b: int, weights: torch.Tensor) -> None:
        """A resident trainable part's new weights [a, b) into its DEVICE buffer."""
        flat = self._parts[u.index][0].flat
        assert flat is not None
        self._h2d(flat[a:b], weights, after_compute=True)

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor, after_compute: bool = False, wait: bool = True) -> Any:
        """Copy to DEVICE. On CUDA: a load's copy on the copy stream, a resident unit's new
        weights (``after_compute``: ``dst`` is read by kernels already queued on the compute
        stream) on the publish stream after those kernels; ``wait``: the calling thread waits
        for the copy, else the event after it is returned (None on a CPU device)."""
        nbytes = src.numel() * src.element_size()
        if self.device.type != "cuda":
            t_start_s = self.tracer.clock()
            dst.copy_(src)
            if t_start_s:  # recording: name the event
                self.tracer.add("h2d", f"{nbytes} bytes", t_start_s)
            return None
        stream = self.publish_stream if after_compute else self.copy_stream
        if after_compute:
            stream.wait_stream(self.compute_stream)
        began = self.tracer.stream_mark(stream)  # the trace times the copy on the GPU
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        self.tracer.add_stream_span("h2d", f"{nbytes} bytes", began, stream)
        self.acct.count("h2d_bytes", nbytes)
        if wait:
            stream.synchronize()  # sync point: this thread only, never the compute stream
            return None
        copied = torch.cuda.Event()
        copied.record(stream)
        return copied
