"""ActivationStore: what a decoder layer's forward leaves for its backward, and where it waits.

Two implementations, chosen by ``plan.recompute``:
- ``RecomputeCheckpoints``: keep the layer's input (DEVICE, HOST or NVME) and its RNG state; the
  layer runs without autograd and is recomputed in backward (dropout masks match).
- ``SavedTensors``: keep the layer's autograd graph. Saved weights become WeightTokens
  (re-fetched in backward); saved activations stay on DEVICE, or, with ``activations: nvme``,
  large ones are copied into page-aligned buffers as autograd saves them, written after the
  layer's forward and read back one layer ahead in backward (at most two layers' worth in memory);
  on a GPU each comes back to DEVICE once, at its first unpack, until its layer's backward ends.

Both are keyed by (micro-batch m, decoder layer i) and driven the same way: ``enter``/``exit``
from the layer's forward hooks, ``replay`` + ``read_ahead`` before its backward, ``release`` after
it, ``drop`` to forget a step's forwards (non-finite loss, error), ``end_backward`` after the last
layer. Micro-batch-major steps use m = 0 only; layer-major steps (``scheduler.lockstep``) keep
every micro-batch's records of a layer until that layer's backward.

Threads: the thread running the forward (the main thread, or the micro-batch thread holding the
turn in a layer-major step: one at a time) for ``enter``/``exit`` and autograd's pack hook;
autograd's unpack hook on the thread running the backward (on a GPU autograd's device thread: it
counts the DEVICE bytes of what it brings back, in the thread-safe Accountant); the main thread
for the rest. Sync points: waits on the SSD writes and reads of checkpoints and
swapped activations (named where they happen).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from offload.io.posix import aligned_empty
from offload.pinned import PinnedPool, queued_work_event
from offload.store import TensorSpec
from offload.tiers import Accountant, Tier
from scheduler import placement as placement_rules
from scheduler.placement import (
    PINNED_CHECKPOINT_COPIES,
    Placement,
    SavedOnce,
    contiguous_strides,
    dense_strides,
    is_swapped_activation,
    layer_kept_storages,
)
from scheduler.router_loss import RouterLogits
from scheduler.settings import itemsize
from scheduler.weight_streamer import WeightStreamer, WeightToken


@dataclass
class _LayerCall:
    """What forward gave layer i, for its backward."""

    args_rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    checkpoint: torch.Tensor | None = None  # recompute, DEVICE/HOST tier: the layer's input
    checkpoint_write: Future[None] | None = None  # recompute, NVME tier
    checkpoint_read: Future[Any] | None = None  # recompute, NVME tier: read ahead in backward
    checkpoint_buf: torch.Tensor | None = None  # ... into this page-aligned host buffer
    checkpoint_host: torch.Tensor | None = None  # CUDA, NVME tier: the pinned copy until its write starts
    d2h_done: Any = None  # CUDA, HOST/NVME tiers: event after the checkpoint's copy to the host
    x_leaf: torch.Tensor | None = None  # kept graph: the layer's input leaf
    output: torch.Tensor | None = None  # kept graph: the layer's output (graph root)
    saved: Any = None  # kept graph: the saved_tensors_hooks context while the layer runs
    saved_bytes: int = 0  # DEVICE bytes of saved activations kept in memory
    swapped: list[_SwappedTensor] = field(default_factory=list)  # saved activations on NVME
    swapped_once: SavedOnce = field(default_factory=SavedOnce)  # ... by memory, while the forward runs
    kept_storage: set[int] = field(default_factory=set)  # never swapped (``layer_kept_storages``)
    thread: int = 0  # the thread whose saved_tensors_hooks stack holds ``saved`` (thread-local)

    @property
    def input_bytes(self) -> int:
        """Bytes of the layer's input (what a checkpoint holds)."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class _SwappedTensor:
    """The memory of saved activations swapped through the SSD (one or more saves: ``_SwappedView``)."""

    name: str  # store extent
    dtype: torch.dtype
    nbytes: int
    buf: torch.Tensor | None = None  # host copy: from saving until the next layer's forward
    # ends (its write done), and from reading back until its layer's backward ends
    write: Future[None] | None = None
    read: Future[Any] | None = None
    on_device: torch.Tensor | None = None  # CUDA: read back to DEVICE once for all its saves,
    # from the first unpack until its layer's backward ends (accounted in DEVICE)
    failed: bool = False  # its write or read failed: its buffer is never reused


@dataclass(frozen=True)
class _SwappedView:
    """What autograd keeps for one save: the swapped memory, and the tensor's shape and strides
    over it (its own when it is dense, contiguous ones if it had gaps)."""

    swapped: _SwappedTensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _LayerCalls:
    """The records of the layers whose forward ran and whose backward has not."""

    def __init__(self, placement: Placement, store: Any, acct: Accountant, device: torch.device) -> None:
        self.placement = placement
        self.store = store
        self.acct = acct
        self.device = device
        self.calls: dict[tuple[int, int], _LayerCall] = {}  # by (micro-batch, layer)
        self._d2h_stream: Any = None  # CUDA: activations leave DEVICE on it, never on the compute stream
        # CUDA: the host buffers activations pass through, page-locked, exact sizes, reused by
        # size and counted in HOST until ``close``
        self._pinned = PinnedPool(acct, Tier.HOST) if device.type == "cuda" else None

    def _record(self, i: int, m: int, x: torch.Tensor, args_rest: tuple[Any, ...],
                kwargs: dict[str, Any]) -> _LayerCall:
        call = _LayerCall(args_rest, kwargs, torch.get_rng_state(),
                          torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                          shape=tuple(x.shape), dtype=x.dtype)
        self.calls[(m, i)] = call
        return call

    def read_ahead(self, i: int, m: int = 0) -> None:
        """Start bringing the activations of (m, i) back (overlaps the backward before it)."""

    def backward_hold_bytes(self) -> int:
        """DEVICE bytes held in backward beyond what forward left there (the weight streamer's
        prefetch leaves room for them, as for a layer's gradients)."""
        return 0

    def _queue_d2h(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """CUDA: copy ``src`` into host ``dst`` on the d2h stream, after the compute queued so far
        (which writes ``src``); the compute thread does not wait (``_d2h_event`` marks the end)."""
        if self._d2h_stream is None:
            self._d2h_stream = torch.cuda.Stream(src.device)
        self._d2h_stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self._d2h_stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self._d2h_stream)  # compute may free src before the copy has run

    def _d2h_event(self) -> Any:
        """A CUDA event after every copy queued on the d2h stream so far."""
        event = torch.cuda.Event()
        event.record(self._d2h_stream)
        return event

    def close(self) -> None:
        """Unregister the page-locked buffers (after the copies recorded on them)."""
        if self._pinned is not None:
            torch.cuda.synchronize(self.device)  # sync point: no copy may use a buffer unregistered
            self._pinned.close()

    def end_backward(self) -> None:
        """After the last layer's backward."""


class RecomputeCheckpoints(_LayerCalls):
    def __init__(self, placement: Placement, store: Any, acct: Accountant, device: torch.device,
                 layers: nn.ModuleList, router: RouterLogits) -> None:
        super().__init__(placement, store, acct, device)
        self.layers = layers
        self.router = router
        self._grad_mode_stack: list[bool] = []
        self._unwritten: list[tuple[int, int, _LayerCall]] = []  # CUDA, NVME tier: (m, i, call) not yet written
        # CUDA, NVME tier: writes from pinned copies, with their buffers (back to the pool once done)
        self._writing: deque[tuple[Future[None], torch.Tensor]] = deque()
        # (m, i) -> (tier, bytes) of layer i's input while its recompute and backward hold it
        self._held: dict[tuple[int, int], tuple[Tier, int]] = {}
        self._largest_input_bytes = 0

    def enter(self, i: int, x: torch.Tensor, args_rest: tuple[Any, ...], kwargs: dict[str, Any], m: int = 0) -> Any:
        call = self._record(i, m, x, args_rest, kwargs)
        self._save(i, m, call, x.detach())
        self._start_writes(keep=1)  # the copies queued before this layer's forward
        # one forward at a time runs between enter and exit (lockstep turns only at enter)
        self._grad_mode_stack.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)  # the layer runs without autograd: recomputed in backward
        return None

    def exit(self, i: int, output: Any, m: int = 0) -> None:
        torch.set_grad_enabled(self._grad_mode_stack.pop())

    def replay(self, i: int, m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute layer i of micro-batch m from its checkpoint under its forward's RNG state:
        (input leaf, output)."""
        call = self.calls.pop((m, i))
        x = self._take(i, m, call).detach().requires_grad_(True)
        self.router.recompute(i, m)
        try:
            with self._rng_restored(call):
                out = self.layers[i](x, *call.args_rest, **call.kwargs)
        finally:
            self.router.done()
        return x, out[0] if isinstance(out, tuple) else out

    def release(self, i: int, m: int = 0) -> None:
        """Layer i's backward is done: its input (the checkpoint taken, or its device copy) goes."""
        held = self._held.pop((m, i), None)
        if held is not None:
            self.acct.free(*held)

    def drop(self) -> None:
        for held in self._held.values():
            self.acct.free(*held)
        self._held.clear()
        for _, _, call in self._unwritten:  # (a call replay took, and an error left unwritten)
            call.d2h_done.synchronize()  # sync point: no copy may land in a buffer let go
            if call.checkpoint_host is not None:
                self._give(call.checkpoint_host)
                call.checkpoint_host = None
        while self._writing:
            write, host = self._writing.popleft()
            with contextlib.suppress(Exception):  # a failed write (not the error being handled):
                write.result()  # sync point: ... its buffer stays out of the pool
                self._give(host)
        for call in self.calls.values():
            if call.d2h_done is not None:
                call.d2h_done.synchronize()  # sync point: no copy may land in a buffer let go
            if call.checkpoint_read is not None:
                read_failed = False
                try:
                    call.checkpoint_read.result()  # sync point: no read may land in a buffer let go
                except Exception:  # a failed read (not the error being handled): on CUDA its
                    read_failed = True  # buffer stays out of the pool
                if self._pinned is None:
                    self.acct.free(self.placement.swap_tier, call.input_bytes)
                elif not read_failed:
                    self._give(call.checkpoint_buf)
            if call.checkpoint_write is not None:
                # (CUDA: a failed write is not the error being handled; its buffer stays out)
                with contextlib.suppress(Exception) if self._pinned is not None else contextlib.nullcontext():
                    call.checkpoint_write.result()  # sync point: the write holds the host copy
            elif call.checkpoint is not None and call.d2h_done is not None:
                self._give(call.checkpoint)  # CUDA, HOST tier: the pinned copy
            elif call.checkpoint is not None:
                self.acct.free(self.placement.checkpoint_tier(), call.checkpoint.numel() * call.checkpoint.element_size())
        self.calls.clear()
        self._grad_mode_stack.clear()
        self._unwritten.clear()
        if self._pinned is not None:
            self._pinned.trim()

    def end_backward(self) -> None:
        if self._pinned is not None:
            self._wait_writes(0)
            self._pinned.trim()  # (sizes of an earlier shape)

    def backward_hold_bytes(self) -> int:
        """A layer's input, from its take (or read-back) to the end of its backward, where it
        was not on DEVICE since forward: read back from the SSD (and the next one read ahead,
        on a CPU) or copied to a GPU; a DEVICE checkpoint (on a CPU: RAM) is held one layer
        longer than the plan's rows kept it (from take to release)."""
        tier, gpu = self.placement.checkpoint_tier(), self.device.type == "cuda"
        layers = 2 if tier == Tier.NVME and not gpu else 1 if (gpu or tier == Tier.DEVICE) else 0
        return layers * self._largest_input_bytes

    def _save(self, i: int, m: int, call: _LayerCall, x: torch.Tensor) -> None:
        nbytes = x.numel() * x.element_size()
        self._largest_input_bytes = max(self._largest_input_bytes, nbytes)
        tier = self.placement.checkpoint_tier()
        if tier == Tier.NVME:
            name = activation_extent(i, m, str(nbytes))
            if name not in self.store:
                self.store.reserve([TensorSpec(name, torch.uint8, (nbytes,))])
            if x.device.type == "cuda":  # written once the copy has run (``_start_writes``)
                # at most PINNED_CHECKPOINT_COPIES copies in HOST: this one, the one before it
                # (its write starts after this layer's), one write in flight
                self._wait_writes(PINNED_CHECKPOINT_COPIES - 2)
                call.checkpoint_host = self._to_host(call, x, f"activation checkpoint of layer {i} copied out")
                self._unwritten.append((m, i, call))
                return
            # The write holds the tensor until done; backward waits on it before reading.
            call.checkpoint_write = self.store.write(name, x.contiguous().reshape(-1).view(torch.uint8))
            return
        what = f"activation checkpoint of layer {i} (micro-batch {m})"
        if tier == Tier.HOST and x.device.type == "cuda":
            call.checkpoint = self._to_host(call, x, what)  # (counted by the pinned pool)
            return
        call.checkpoint = x
        self.acct.alloc(tier, nbytes, what)

    def _wait_writes(self, limit: int) -> None:
        """CUDA, NVME tier: wait until at most ``limit`` checkpoint writes are in flight; the
        buffers of those done go back to the pool (not a failed one's: a request may still
        read from it; it stays counted, unused)."""
        while self._writing and (self._writing[0][0].done() or len(self._writing) > limit):
            write, host = self._writing.popleft()
            write.result()  # sync point: a write from a pinned copy has ended
            self._give(host)

    def _to_host(self, call: _LayerCall, x: torch.Tensor, what: str) -> torch.Tensor:
        """CUDA: a pinned host copy of ``x`` (from the pool), queued on the d2h stream;
        ``call.d2h_done`` marks its end."""
        nbytes = x.numel() * x.element_size()
        assert self._pinned is not None
        host = self._pinned.take(nbytes, what).view(x.dtype).view(x.shape)
        self._queue_d2h(host, x)
        self.acct.count("d2h_bytes", nbytes)
        call.d2h_done = self._d2h_event()
        return host

    def _start_writes(self, keep: int = 0) -> None:
        """CUDA, NVME tier: start the store writes of the checkpoints copied to the host, all but
        the newest ``keep`` (a layer's copy ends while the next layer computes: waiting for it one
        layer later leaves the GPU that layer's work queued)."""
        while len(self._unwritten) > keep:
            m, i, call = self._unwritten.pop(0)  # (replay may have taken the call off ``calls``)
            if call.checkpoint_host is None:
                continue
            call.d2h_done.synchronize()  # sync point: the copy has landed in the pinned buffer
            host, call.checkpoint_host = call.checkpoint_host, None
            nbytes = host.numel() * host.element_size()
            # The write holds the buffer until done (``_wait_writes`` then gives it back);
            # backward waits on it before reading.
            try:
                write = self.store.write(activation_extent(i, m, str(nbytes)), host.reshape(-1).view(torch.uint8))
            except BaseException:
                self._give(host)  # (nothing started)
                raise
            call.checkpoint_write = write
            self._writing.append((write, host))

    def _give(self, host: torch.Tensor, after: Any = None) -> None:
        assert self._pinned is not None
        self._pinned.give(host, after)

    def read_ahead(self, i: int, m: int = 0) -> None:
        """Start reading layer i's NVMe checkpoint back (overlaps the backward before it)."""
        self._start_writes()
        call = self.calls.get((m, i))
        if call is not None and call.checkpoint_write is not None and call.checkpoint_read is None:
            self._start_read(i, m, call)

    def _start_read(self, i: int, m: int, call: _LayerCall) -> None:
        assert call.checkpoint_write is not None
        call.checkpoint_write.result()  # sync point: written before it is read back (long done by now)
        nbytes = call.input_bytes
        what = f"activation checkpoint of layer {i} read back (micro-batch {m})"
        if self._pinned is not None:  # CUDA: into a pinned buffer of the pool (counted in HOST)
            self._wait_writes(0)  # (long done by now: their buffers serve the reads back)
            buf = self._pinned.take(nbytes, what)
            try:
                read = self.store.read(activation_extent(i, m, str(nbytes)), buf)
            except BaseException:
                self._give(buf)
                raise
            call.checkpoint_buf, call.checkpoint_read = buf, read
            return
        # the CPU device's memory, where the recompute takes it as it is (``swap_tier``, as
        # swapped activations)
        self.acct.alloc(self.placement.swap_tier, nbytes, what)
        try:
            buf = aligned_empty(nbytes)
            read = self.store.read(activation_extent(i, m, str(nbytes)), buf)
        except BaseException:
            self.acct.free(self.placement.swap_tier, nbytes)
            raise
        call.checkpoint_buf, call.checkpoint_read = buf, read

    def _take(self, i: int, m: int, call: _LayerCall) -> torch.Tensor:
        self._start_writes()
        if call.checkpoint_write is not None:
            if call.checkpoint_read is None:
                self._start_read(i, m, call)
            assert call.checkpoint_read is not None and call.checkpoint_buf is not None
            read, call.checkpoint_read = call.checkpoint_read, None
            buf, call.checkpoint_buf = call.checkpoint_buf, None
            if self._pinned is None:
                # held from here (replay took the call off ``calls``): a failed read is freed by release
                self._held[(m, i)] = (self.placement.swap_tier, call.input_bytes)
                read.result()  # sync point: read back
                return buf.view(call.dtype).view(call.shape)  # (DEVICE until release)
            read.result()  # sync point: read back (failed: its buffer stays out of the pool)
            return self._pinned_to_device(i, m, buf.view(call.dtype).view(call.shape))
        assert call.checkpoint is not None
        x = call.checkpoint
        call.checkpoint = None
        if call.d2h_done is not None:  # CUDA, HOST tier: the compute stream waits for the copy out
            torch.cuda.current_stream(self.device).wait_event(call.d2h_done)
            return self._pinned_to_device(i, m, x)
        self._held[(m, i)] = (self.placement.checkpoint_tier(), x.numel() * x.element_size())  # until release
        return x.to(self.device) if x.device != self.device else x

    def _pinned_to_device(self, i: int, m: int, x: torch.Tensor) -> torch.Tensor:
        """CUDA: the pinned checkpoint's copy on the compute stream, on DEVICE until release;
        the pinned buffer goes back to the pool, reused once the copy has run."""
        nbytes = x.numel() * x.element_size()
        try:
            self.acct.alloc(Tier.DEVICE, nbytes, f"activation checkpoint of layer {i} on the device (micro-batch {m})")
            self._held[(m, i)] = (Tier.DEVICE, nbytes)
            self.acct.count("h2d_bytes", nbytes)
            return x.to(self.device, non_blocking=True)
        finally:  # the pinned buffer goes back: reused once the copy (if queued) has run
            self._give(x, queued_work_event(self.device))

    @contextlib.contextmanager
    def _rng_restored(self, call: _LayerCall) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(call.rng_cpu)
            if call.rng_cuda is not None:
                torch.cuda.set_rng_state(call.rng_cuda, self.device)
            yield


class SavedTensors(_LayerCalls):
    def __init__(self, placement: Placement, store: Any, acct: Accountant, device: torch.device,
                 weights: WeightStreamer) -> None:
        super().__init__(placement, store, acct, device)
        self.weights = weights
        # released swap buffers by size (accounted), each with the CUDA event after which nothing
        # reads it any more (its copies back to DEVICE), or None
        self._pool: dict[int, list[tuple[torch.Tensor, Any]]] = {}
        # CPU: a backward's released swap buffers by size, kept for the next forward as the
        # Accountant's cached bytes (reused instead of faulting in fresh pages; given up to any
        # allocation that needs their memory: ``_reclaim``, on the allocating thread, hence the lock)
        self._kept: dict[int, list[torch.Tensor]] = {}
        self._kept_lock = threading.Lock()
        self._reclaiming = False  # ``_reclaim`` registered with the Accountant
        self._last_exit: tuple[int, int] | None = None  # the call whose forward ended last
        self._copying: list[_LayerCall] = []  # CUDA: calls whose copies out may run, writes not started

    def enter(self, i: int, x: torch.Tensor, args_rest: tuple[Any, ...], kwargs: dict[str, Any], m: int = 0) -> Any:
        call = self._record(i, m, x, args_rest, kwargs)
        call.x_leaf = x.detach().requires_grad_(True)
        if self.placement.swaps_activations(i):
            call.kept_storage = layer_kept_storages(x, args_rest, kwargs)
        call.saved = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(i, m, t), self._unpack)
        call.saved.__enter__()
        call.thread = threading.get_ident()
        return (call.x_leaf, *args_rest), kwargs

    def exit(self, i: int, output: Any, m: int = 0) -> None:
        call = self.calls[(m, i)]
        call.saved.__exit__(None, None, None)
        call.saved = None
        call.swapped_once.clear()  # the saved tensors themselves may go now
        call.output = output[0] if isinstance(output, tuple) else output
        if call.swapped:
            self._swap_out(call)
        previous = self.calls.get(self._last_exit) if self._last_exit is not None else None
        if previous is not None and previous.swapped:
            # at most two calls' saved activations in memory: the writes of the forward that ended
            # before this one end here (their buffers serve the next call, if it swaps)
            self._drop_buffers(previous)
        self._last_exit = (m, i)
        if not self.placement.swaps_activations(i):
            # swapping layers come first: no forward after this one swaps; its buffers are
            # freed, not kept, for the heads' working memory (kept through the heads they would
            # fill whatever the budget leaves there: a higher peak RSS)
            self._clear_pool()

    def replay(self, i: int, m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's kept graph of micro-batch m: (input leaf, output); its swapped activations
        are read back."""
        call = self.calls[(m, i)]
        assert call.x_leaf is not None and call.output is not None
        self._swap_in(i, call)
        return call.x_leaf, call.output

    def read_ahead(self, i: int, m: int = 0) -> None:
        self._swap_in(i, self.calls.get((m, i)))

    def release(self, i: int, m: int = 0) -> None:
        """After the backward of (m, i) (also on errors): nothing of its forward stays in memory."""
        call = self.calls.pop((m, i), None)
        if call is not None:
            self._release(call)

    def drop(self) -> None:
        if self._d2h_stream is not None:
            # sync point: no copy may land in a buffer handed on (also those of a layer that
            # raised inside its forward, queued after the last recorded event)
            self._d2h_stream.synchronize()
        self._copying.clear()
        # every call goes even when one's swap write or read failed (callbacks run last
        # registered first; what failed is raised after)
        with contextlib.ExitStack() as let_go:
            let_go.callback(self.end_backward)
            let_go.callback(self.calls.clear)
            for call in self.calls.values():
                if call.saved is not None:  # a layer that raised inside its forward
                    if call.thread == threading.get_ident():  # else its thread, and its hook stack, ended
                        call.saved.__exit__(None, None, None)
                    call.saved = None
                let_go.callback(self._release, call)

    def end_backward(self) -> None:
        self._last_exit = None
        self._keep_pool()
        if self._pinned is not None:
            self._pinned.trim()  # (sizes of an earlier shape)

    def close(self) -> None:
        self._clear_pool()  # (the kept buffers too)
        self.acct.remove_reclaimer(self._reclaim)
        self._reclaiming = False
        super().close()

    def _release(self, call: _LayerCall) -> None:
        """Everything of a call's forward goes, even when one of its reads or writes failed (the
        first such error is raised after)."""
        first_error: BaseException | None = None
        for t in call.swapped:
            if t.read is not None:
                try:
                    t.read.result()  # sync point: no read may land in a buffer handed on
                except Exception as err:
                    first_error, t.failed = first_error or err, True
            t.read = None
        read_until = None
        if self._d2h_stream is not None and call.swapped:  # CUDA: after the copies back queued so far
            read_until = torch.cuda.Event()
            read_until.record(torch.cuda.current_stream(self.device))
        try:
            self._drop_buffers(call, read_until)
        except Exception as err:
            first_error = first_error or err
        for t in call.swapped:
            if t.on_device is not None:  # (autograd's views of it, if any, end with its graph)
                self.acct.free(Tier.DEVICE, t.nbytes)
                t.on_device = None
        call.swapped.clear()
        call.swapped_once.clear()
        self.acct.free(Tier.DEVICE, call.saved_bytes)
        call.saved_bytes = 0
        if first_error is not None:
            raise first_error

    # ---------------------------------------------------------------- autograd's hooks
    def _pack(self, i: int, m: int, t: torch.Tensor) -> Any:
        """Saved weights become WeightTokens; with ``activations: nvme`` large activations become
        ``_SwappedTensor`` tokens; the rest stays, accounted."""
        token = self.weights.token(i + 1, t)
        if token is not None:
            return token
        nbytes = t.numel() * t.element_size()
        call = self.calls[(m, i)]
        if (self.placement.swaps_activations(i)
                and is_swapped_activation(t, call.kept_storage, placement_rules.SWAP_MIN_BYTES)):
            stride = tuple(t.stride()) if dense_strides(t) else contiguous_strides(t.shape)
            swapped = call.swapped_once.get(t)
            if swapped is None:  # else saved before (by another node, or as another view): one copy
                # A copy in a page-aligned buffer (O_DIRECT, no bounce), with the tensor's own
                # strides where it has no gaps; autograd drops ``t`` (``swapped_once`` holds it
                # until the forward ends). On a GPU the copy is queued on the d2h stream.
                buf = self._buffer(nbytes, f"saved activations of layer {i} (swapped)")
                self._copy_out(buf.view(t.dtype).as_strided(t.shape, stride), t)
                swapped = _SwappedTensor(activation_extent(i, m, f"{len(call.swapped)}.{nbytes}"), t.dtype,
                                         nbytes, buf)
                call.swapped.append(swapped)
                call.swapped_once.add(t, swapped)
            return _SwappedView(swapped, tuple(t.shape), stride)
        self.acct.alloc(Tier.DEVICE, nbytes, f"saved activations of layer {i}")
        call.saved_bytes += nbytes
        return t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, WeightToken):
            return self.weights.view(packed)
        if not isinstance(packed, _SwappedView):
            return packed
        swapped = packed.swapped
        assert swapped.read is not None or swapped.buf is not None, "activations must be swapped in first"
        if swapped.read is not None:
            swapped.read.result()  # sync point: the read of this activation has landed
        assert swapped.buf is not None
        if self.device.type == "cpu":  # (dense: strides preserved)
            return swapped.buf.view(swapped.dtype).as_strided(packed.shape, packed.stride)
        if swapped.on_device is None:  # the first of its saves unpacked: one copy serves them all
            self.acct.alloc(Tier.DEVICE, swapped.nbytes, "saved activations read back to the device")
            self.acct.count("h2d_bytes", swapped.nbytes)
            # queued on the backward's stream; the buffer is not reused before it has run (the
            # event ``_release`` records)
            swapped.on_device = swapped.buf.view(swapped.dtype).to(self.device, non_blocking=True)
        return swapped.on_device.as_strided(packed.shape, packed.stride)

    def _copy_out(self, dst: torch.Tensor, t: torch.Tensor) -> None:
        """Copy saved tensor ``t`` into host buffer ``dst`` (on a GPU queued on the d2h stream;
        ``_swap_out`` records its end)."""
        if t.device.type == "cuda":
            self._queue_d2h(dst, t)
            self.acct.count("d2h_bytes", dst.numel() * dst.element_size())
        else:
            dst.copy_(t)

    # ---------------------------------------------------------------- swap buffers and I/O
    def _buffer(self, nbytes: int, what: str) -> torch.Tensor:
        """A page-aligned host buffer: a released one of this size (already accounted; layers
        save the same shapes, so buffers are reused, not faulted in anew), else a new one; on
        CUDA from the pinned pool (kept, and counted, until ``close``)."""
        if self._pinned is not None:
            return self._pinned.take(nbytes, what)
        pooled = self._pool.get(nbytes)
        if pooled:
            buf, read_until = pooled.pop()
            if read_until is not None:
                read_until.synchronize()  # sync point: its copies back to DEVICE have run
            return buf
        kept = self._take_kept(nbytes, what)
        if kept is not None:
            return kept
        self.acct.alloc(self.placement.swap_tier, nbytes, what)
        return aligned_empty(nbytes)

    def _clear_pool(self) -> None:
        """The forward's last swapping layer has run: free the released swap buffers, and the kept
        ones this forward did not take (sizes of an earlier shape) (on CUDA the pinned pool keeps
        them, counted, for the next; ``end_backward`` trims it)."""
        for nbytes, bufs in self._pool.items():
            self.acct.free(self.placement.swap_tier, nbytes * len(bufs))
        self._pool.clear()
        self._reclaim(self.placement.swap_tier, 1 << 62)

    def _keep_pool(self) -> None:
        """End of a backward (or of a dropped step): the released swap buffers stop counting as
        in use and are kept, as cached bytes, for the next forward's first layers."""
        tier = self.placement.swap_tier
        with self._kept_lock:
            for nbytes, bufs in self._pool.items():
                for buf, _ in bufs:
                    self.acct.cache(tier, nbytes)
                    self._kept.setdefault(nbytes, []).append(buf)
            if self._pool and not self._reclaiming:
                # (given up before the weight streamer's, which serve every layer's load)
                self.acct.add_reclaimer(self._reclaim, first=True)
                self._reclaiming = True
        self._pool.clear()

    def _take_kept(self, nbytes: int, what: str) -> torch.Tensor | None:
        """A kept buffer of ``nbytes`` back in use (counted, and checked, as an allocation), or None."""
        with self._kept_lock:
            kept = self._kept.get(nbytes)
            if not kept:
                return None
            self.acct.uncache(self.placement.swap_tier, nbytes, reuse=True, what=what)  # BudgetError: still kept
            return kept.pop()

    def _reclaim(self, tier: Tier, nbytes: int) -> None:
        """The Accountant's reclaimer: give up kept buffers (largest first) until ``nbytes`` are freed."""
        if tier != self.placement.swap_tier:
            return
        with self._kept_lock:
            for size in sorted(self._kept, reverse=True):
                while self._kept[size] and nbytes > 0:
                    self._kept[size].pop()  # its mapping goes with its last reference
                    self.acct.uncache(tier, size, reuse=False)
                    nbytes -= size

    def _swap_out(self, call: _LayerCall) -> None:
        """After a layer's forward: write its swapped activations (extents reserved once); on a
        GPU once their copies out have run, from the next layer's end on (``_start_writes``)."""
        if self._d2h_stream is not None:
            call.d2h_done = self._d2h_event()
            self._copying.append(call)
            self._start_writes(keep=1)
            return
        self._write_swapped(call)

    def _start_writes(self, keep: int = 0, through: _LayerCall | None = None) -> None:
        """CUDA: start the writes of the calls whose copies out were queued, oldest first: all but
        the newest ``keep``, or (``through`` given) up to and including ``through`` only."""
        while (through is None and len(self._copying) > keep) or any(c is through for c in self._copying):
            call = self._copying.pop(0)
            call.d2h_done.synchronize()  # sync point: the layer's copies have landed
            self._write_swapped(call)

    def _write_swapped(self, call: _LayerCall) -> None:
        self.store.reserve([TensorSpec(t.name, torch.uint8, (t.nbytes,)) for t in call.swapped
                            if t.name not in self.store])
        for t in call.swapped:
            assert t.buf is not None
            t.write = self.store.write(t.name, t.buf)  # holds ``buf`` until done

    def _drop_buffers(self, call: _LayerCall, read_until: Any = None) -> None:
        """Wait for the writes of a layer's swapped activations, then hand their buffers to the
        pool (still accounted; ``_clear_pool`` frees them, ``_keep_pool`` keeps them);
        ``read_until``: CUDA event after the copies that read them. A buffer whose write or read
        failed is not reused (a request may still use it): on a CPU its bytes are freed, on CUDA
        it stays out of the pinned pool. Every buffer is handled before the first failed write's
        error is raised."""
        self._start_writes(through=call)
        first_error: BaseException | None = None
        for t in call.swapped:
            if t.write is not None:
                try:
                    t.write.result()  # sync point: the write of this activation has ended
                except Exception as err:
                    first_error, t.failed = first_error or err, True
            if t.buf is not None and t.failed:
                if self._pinned is None:
                    self.acct.free(self.placement.swap_tier, t.nbytes)
            elif t.buf is not None and self._pinned is not None:
                self._pinned.give(t.buf, read_until)
            elif t.buf is not None:
                self._pool.setdefault(t.nbytes, []).append((t.buf, read_until))
            t.buf = None
        if first_error is not None:
            raise first_error

    def _swap_in(self, i: int, call: _LayerCall | None) -> None:
        """Read layer i's swapped activations back into buffers, unless still in memory."""
        if call is None:
            return
        self._start_writes(through=call)  # CUDA: its copies out have landed (buffers still held, or written)
        for t in call.swapped:
            if t.buf is not None or t.read is not None:
                continue
            assert t.write is not None
            t.write.result()  # sync point: written before read back (long done by now)
            t.buf = self._buffer(t.nbytes, f"saved activations of layer {i} (read back)")
            t.read = self.store.read(t.name, t.buf)


class SelectiveRecompute:
    """Selective recompute: the layers ``Placement.recomputes`` names go to a
    ``RecomputeCheckpoints``, the others to a ``SavedTensors`` (kept graphs, swapped)."""

    def __init__(self, placement: Placement, recompute: RecomputeCheckpoints, saved: SavedTensors) -> None:
        self.placement = placement
        self.recompute = recompute
        self.saved = saved

    def _store(self, i: int) -> RecomputeCheckpoints | SavedTensors:
        return self.recompute if self.placement.recomputes(i) else self.saved

    @property
    def calls(self) -> dict[tuple[int, int], _LayerCall]:
        return {**self.recompute.calls, **self.saved.calls}

    def enter(self, i: int, x: torch.Tensor, args_rest: tuple[Any, ...], kwargs: dict[str, Any], m: int = 0) -> Any:
        return self._store(i).enter(i, x, args_rest, kwargs, m)

    def exit(self, i: int, output: Any, m: int = 0) -> None:
        self._store(i).exit(i, output, m)

    def replay(self, i: int, m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self._store(i).replay(i, m)

    def backward_hold_bytes(self) -> int:
        return self.recompute.backward_hold_bytes() + self.saved.backward_hold_bytes()

    def read_ahead(self, i: int, m: int = 0) -> None:
        self._store(i).read_ahead(i, m)

    def release(self, i: int, m: int = 0) -> None:
        self._store(i).release(i, m)

    def drop(self) -> None:
        self.recompute.drop()
        self.saved.drop()

    def end_backward(self) -> None:
        self.recompute.end_backward()
        self.saved.end_backward()

    def close(self) -> None:
        self.recompute.close()
        self.saved.close()


ActivationStore = RecomputeCheckpoints | SavedTensors | SelectiveRecompute


def activation_extent(i: int, m: int, rest: str) -> str:
    """The store extent of an activation of layer i, micro-batch m (``rest``: its index, size)."""
    return f"act.{i}.{rest}" if m == 0 else f"act.{i}.m{m}.{rest}"
