"""RecomputeCheckpoints: keep a decoder layer's input (DEVICE, HOST or NVME) and its RNG state;
the layer runs without autograd and is recomputed in backward (dropout masks match).

Driven as every activation store is (``scheduler.activations``: threads and sync points there).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from offload.io.posix import aligned_empty
from offload.pinned import queued_work_event
from offload.store import TensorSpec
from offload.tiers import Accountant, Tier
from scheduler.layer_calls import (
    LayerCall,
    LayerCalls,
    activation_extent,
)
from scheduler.placement import (
    PINNED_CHECKPOINT_COPIES,
    Placement,
)
from scheduler.router_loss import RouterLogits


class RecomputeCheckpoints(LayerCalls):
    def __init__(self, placement: Placement, store: Any, acct: Accountant, device: torch.device,
                 layers: nn.ModuleList, router: RouterLogits) -> None:
        super().__init__(placement, store, acct, device)
        self.layers = layers
        self.router = router
        self._grad_mode_stack: list[bool] = []
        self._unwritten: list[tuple[int, int, LayerCall]] = []  # CUDA, NVME tier: (m, i, call) not yet written
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

    def _save(self, i: int, m: int, call: LayerCall, x: torch.Tensor) -> None:
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

    def _to_host(self, call: LayerCall, x: torch.Tensor, what: str) -> torch.Tensor:
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

    def _start_read(self, i: int, m: int, call: LayerCall) -> None:
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

    def _take(self, i: int, m: int, call: LayerCall) -> torch.Tensor:
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
    def _rng_restored(self, call: LayerCall) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(call.rng_cpu)
            if call.rng_cuda is not None:
                torch.cuda.set_rng_state(call.rng_cuda, self.device)
            yield

