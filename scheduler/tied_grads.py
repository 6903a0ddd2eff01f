"""TiedGradParking: in a layer-major step, the head's part of a tied weight's gradient waits in
host memory, per micro-batch, for the embeddings' backward of the same micro-batch.

A tied LM head shares its weight with the embeddings (the weight belongs to ``pre``). Layer-major
accumulation runs every micro-batch's head backward before any layer's backward, so micro-batch
m's head part of that gradient must wait until m's embeddings' backward adds its own part: the
optimizer then sees each micro-batch's gradient whole, the same additions in the same order as
micro-batch order (bit for bit). There are M of them (vocabulary x hidden each): on a GPU they
would hold its memory through the whole backward, so they wait in host buffers instead, from a
``PinnedPool`` (page-locked on CUDA, counted in HOST, kept for reuse by size: the next step
takes the same sizes).

Threads: ``park`` on a layer-major step's micro-batch threads (``scheduler.lockstep``: one at a
time), ``restore`` and ``forget`` on the main thread. Sync points: none on the host in ``park``
and ``restore`` (the copy back waits for the copy out on the GPU, by event); a reused buffer
waits for the copy it was given back after (``PinnedPool.take``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from offload.pinned import PinnedPool, queued_work_event
from offload.tiers import Accountant


class TiedGradParking:
    def __init__(self, params: dict[str, nn.Parameter], pool: PinnedPool, acct: Accountant,
                 device: torch.device) -> None:
        self.params = params
        self.pool = pool
        self.acct = acct
        self.device = device
        # per micro-batch: (parameter name, host copy, pool buffer), the event after the copies
        # out and (CUDA) the stream they were queued on: the micro-batch thread's, where its
        # forward ran, so where the embeddings' backward adds into the gradient
        self._parked: dict[int, tuple[list[tuple[str, torch.Tensor, torch.Tensor]], Any, Any]] = {}

    def park(self, m: int, keep: set[str]) -> None:
        """After micro-batch ``m``'s head backward: every gradient on a parameter outside
        ``keep`` (the head unit's own) goes to a host buffer and off its parameter."""
        parked: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        moved_bytes = 0
        try:
            for name, p in self.params.items():
                g = p.grad
                if g is None or name in keep:
                    continue
                nbytes = g.numel() * g.element_size()
                buf = self.pool.take(nbytes, "the head's part of a tied weight's gradient")
                host = buf.view(g.dtype).view(g.shape)
                parked.append((name, host, buf))  # (before the copy: a failed one still gives it back)
                host.copy_(g, non_blocking=True)  # (CUDA: on the compute stream, after the backward)
                p.grad = None  # (the caching allocator frees it after the queued copy)
                moved_bytes += nbytes
        finally:  # (also when a buffer could not be had: those parked are let go with the step)
            self._parked[m] = (parked, self._event(), self._stream())
        if self.device.type == "cuda":
            self.acct.count("d2h_bytes", moved_bytes)

    def restore(self, m: int) -> None:
        """Before micro-batch ``m``'s embeddings' backward: its parked gradients back on their
        parameters (on DEVICE), their buffers back to the pool."""
        parked, copied_out, stream = self._parked.pop(m, ([], None, None))
        moved_bytes = 0
        # on the stream the copies out (and the micro-batch's forward) ran on: the embeddings'
        # backward accumulates into the gradient there, after this copy back
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(), \
                _given_back(self.pool, parked, self._event):
            if copied_out is not None:
                torch.cuda.current_stream(self.device).wait_event(copied_out)
            for name, host, _ in parked:
                g = torch.empty(host.shape, dtype=host.dtype, device=self.device)
                g.copy_(host, non_blocking=True)
                self.params[name].grad = g
                moved_bytes += host.numel() * host.element_size()
        if self.device.type == "cuda":
            self.acct.count("h2d_bytes", moved_bytes)

    def forget(self) -> None:
        """The step is dropped: every parked gradient's buffer back to the pool."""
        parked, self._parked = self._parked, {}
        for entries, event, _ in parked.values():
            for _, _, buf in entries:
                self.pool.give(buf, event)

    def _stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _event(self) -> Any:
        return queued_work_event(self.device)


@contextlib.contextmanager
def _given_back(pool: PinnedPool, parked: list[tuple[str, torch.Tensor, torch.Tensor]],
                event: Callable[[], Any]) -> Iterator[None]:
    """On leaving (also on an error): every parked buffer back to ``pool``, with an event after
    the copies queued in the block (a buffer is reused only once they have run)."""
    try:
        yield
    finally:
        after = event()
        for _, _, buf in parked:
            pool.give(buf, after)
