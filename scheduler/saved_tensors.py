"""SavedTensors: keep a decoder layer's autograd graph. Saved weights become WeightTokens
(re-fetched in backward); saved activations stay on DEVICE, or, with ``activations: nvme``, large
ones are copied into page-aligned buffers as autograd saves them, written after the layer's forward
and read back one layer ahead in backward (at most two layers' worth in memory); on a GPU each comes
back to DEVICE once, at its first unpack, until its layer's backward ends. On a CPU a backward's
swap buffers are kept for the next forward (the Accountant's cached bytes, given up first).

Driven as every activation store is (``scheduler.activations``: threads and sync points there).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

from offload.io.posix import aligned_empty
from offload.store import TensorSpec
from offload.tiers import Accountant, Tier
from scheduler import placement as placement_rules
from scheduler.layer_calls import (
    LayerCall,
    LayerCalls,
    SwappedTensor,
    SwappedView,
    activation_extent,
)
from scheduler.placement import (
    Placement,
    contiguous_strides,
    dense_strides,
    is_swapped_activation,
    layer_kept_storages,
)
from scheduler.weight_streamer import WeightStreamer, WeightToken


class SavedTensors(LayerCalls):
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
        self._copying: list[LayerCall] = []  # CUDA: calls whose copies out may run, writes not started

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

    def _release(self, call: LayerCall) -> None:
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
        ``SwappedTensor`` tokens; the rest stays, accounted."""
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
                swapped = SwappedTensor(activation_extent(i, m, f"{len(call.swapped)}.{nbytes}"), t.dtype,
                                         nbytes, buf)
                call.swapped.append(swapped)
                call.swapped_once.add(t, swapped)
            return SwappedView(swapped, tuple(t.shape), stride)
        self.acct.alloc(Tier.DEVICE, nbytes, f"saved activations of layer {i}")
        call.saved_bytes += nbytes
        return t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, WeightToken):
            return self.weights.view(packed)
        if not isinstance(packed, SwappedView):
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

    def _swap_out(self, call: LayerCall) -> None:
        """After a layer's forward: write its swapped activations (extents reserved once); on a
        GPU once their copies out have run, from the next layer's end on (``_start_writes``)."""
        if self._d2h_stream is not None:
            call.d2h_done = self._d2h_event()
            self._copying.append(call)
            self._start_writes(keep=1)
            return
        self._write_swapped(call)

    def _start_writes(self, keep: int = 0, through: LayerCall | None = None) -> None:
        """CUDA: start the writes of the calls whose copies out were queued, oldest first: all but
        the newest ``keep``, or (``through`` given) up to and including ``through`` only."""
        while (through is None and len(self._copying) > keep) or any(c is through for c in self._copying):
            call = self._copying.pop(0)
            call.d2h_done.synchronize()  # sync point: the layer's copies have landed
            self._write_swapped(call)

    def _write_swapped(self, call: LayerCall) -> None:
        self.store.reserve([TensorSpec(t.name, torch.uint8, (t.nbytes,)) for t in call.swapped
                            if t.name not in self.store])
        for t in call.swapped:
            assert t.buf is not None
            t.write = self.store.write(t.name, t.buf)  # holds ``buf`` until done

    def _drop_buffers(self, call: LayerCall, read_until: Any = None) -> None:
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

    def _swap_in(self, i: int, call: LayerCall | None) -> None:
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

