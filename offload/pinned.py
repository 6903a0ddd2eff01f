"""Host memory page-locked in place for CUDA copies, exactly the bytes asked for; a pool of such
buffers reused by size and counted in a budget.

``torch.empty(..., pin_memory=True)`` goes through CUDA's caching host allocator: it rounds every
request up to a power of two and keeps freed blocks for later requests, so pinned bytes are
neither what a budget counted nor given back. ``PinnedBuffers`` maps host buffers of the exact
size (anonymous memory of their own: page aligned where their storage starts, so ``is_pinned()``
sees the registration), registers them with CUDA (``cudaHostRegister``: copies from and to them
run asynchronously, at full PCIe rate) and unregisters them on ``release``/``close()``. The caller
counts their bytes in its HOST budget; they stay valid (pageable) memory after ``close``.

Thread: the owner's for ``PinnedBuffers`` (allocation at start-up, ``close`` at the end); the
buffers themselves are used from any thread. ``PinnedPool`` is thread safe.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from offload.hostmem import anonymous_buffer
from offload.io.base import align_up
from offload.tiers import Accountant, Tier


class PinnedBuffers:
    """Owns host buffers registered with CUDA; ``close()`` unregisters every one."""

    def __init__(self, register: bool = True) -> None:
        self.register = register  # False: the same buffers, not page-locked (no CUDA)
        self._held: dict[int, torch.Tensor] = {}  # by address: uint8, page aligned, registered

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized, page-locked 1-D host tensor of ``numel`` elements."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not nbytes:
            return torch.empty(0, dtype=dtype)
        # a private anonymous map (the tensor keeps it; nothing else sees it), on huge pages from
        # 2 MiB on: fewer pages to lock, and to pin per SSD read or write
        raw = anonymous_buffer(nbytes)
        if self.register:
            err = int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), nbytes, 0))
            if err != 0:
                raise RuntimeError(f"could not page-lock {nbytes} bytes of host memory for CUDA copies "
                                   f"(cudaHostRegister error {err}): lower offload.cpu_memory_limit, or raise "
                                   f"the locked-memory limit (ulimit -l)")
        self._held[raw.data_ptr()] = raw
        return raw.view(dtype)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of host tensor ``t`` (same shape and dtype, contiguous)."""
        out = self.empty(t.numel(), t.dtype)
        out.copy_(t.reshape(-1))
        return out.view(t.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._held.values())

    def release(self, buf: torch.Tensor) -> int:
        """Unregister one buffer ``empty`` made (no copy may still use it); returns its bytes."""
        raw = self._held.pop(buf.data_ptr(), None)
        if raw is None:  # (an empty buffer: nothing was registered)
            return 0
        if self.register:
            torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())  # its memory stays valid, pageable
        return raw.numel()

    def close(self) -> None:
        for raw in list(self._held.values()):
            self.release(raw)


class PinnedPool:
    """Page-locked host buffers of exact sizes (``PinnedBuffers``), kept for reuse by size and
    counted in one tier of an ``Accountant`` while they exist: a kept buffer stays page-locked,
    so it stays counted (what CUDA's caching host allocator would round up to a power of two and
    keep uncounted).

    ``take`` hands out a kept buffer of the size asked for (one whose copies have run first, else
    the oldest, once they have) or registers a new one; ``give`` keeps it again, with the CUDA
    event after the last copy queued from or into it. A buffer whose I/O failed is not given
    back (a request may still be writing into it): it stays counted, unused, until ``close``.
    ``trim`` unregisters the kept buffers of sizes no ``take`` asked for since the last trim
    (shapes that changed); ``register=False`` pools plain memory (the same bookkeeping without
    CUDA).
    """

    def __init__(self, acct: Accountant, tier: Tier, register: bool = True) -> None:
        self.acct = acct
        self.tier = tier
        self._buffers = PinnedBuffers(register)
        self._kept: dict[int, list[tuple[torch.Tensor, Any]]] = {}  # by bytes: (uint8 buffer, event or None), oldest first
        self._asked: set[int] = set()  # sizes taken since the last trim
        self._lock = threading.Lock()  # guards the three fields above and ``held_bytes``
        self.held_bytes = 0  # every buffer made and not yet released

    def take(self, nbytes: int, what: str) -> torch.Tensor:
        """A page-aligned, page-locked uint8 buffer of exactly ``nbytes`` (whole pages locked and
        counted); ``what`` names a new one in a budget error."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with self._lock:
            self._asked.add(nbytes)
            kept = self._kept.get(nbytes)
            buf, after = kept.pop(_ready_index(kept)) if kept else (None, None)
        if buf is not None:
            if after is not None:
                after.synchronize()  # sync point: the copies queued on it before it was given back
            return buf
        locked_bytes = align_up(nbytes)
        self.acct.alloc(self.tier, locked_bytes, f"{what} (page-locked)" if self._buffers.register else what)
        try:
            with self._lock:
                buf = self._buffers.empty(nbytes, torch.uint8)
                self.held_bytes += locked_bytes
        except BaseException:
            self.acct.free(self.tier, locked_bytes)
            raise
        return buf

    def give(self, buf: torch.Tensor, after: Any = None) -> None:
        """Keep ``buf`` (a buffer ``take`` made, any view of all its bytes) for the next ``take``
        of its size; ``after``: the CUDA event after the last copy queued on it, or None."""
        raw = buf.reshape(-1).view(torch.uint8)
        if raw.numel() == 0:
            return
        with self._lock:
            self._kept.setdefault(raw.numel(), []).append((raw, after))

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(n * len(bufs) for n, bufs in self._kept.items())

    def trim(self) -> None:
        """Unregister the kept buffers of sizes not taken since the last trim."""
        with self._lock:
            unused = [self._kept.pop(n) for n in list(self._kept) if n not in self._asked]
            self._asked.clear()
        self._release([entry for bufs in unused for entry in bufs])

    def close(self) -> None:
        """Unregister every buffer made (their copies run first) and give their bytes back to
        the tier; buffers still handed out stay valid, pageable memory."""
        with self._lock:
            kept = [entry for bufs in self._kept.values() for entry in bufs]
            self._kept.clear()
        self._release(kept)
        with self._lock:
            rest, self.held_bytes = self.held_bytes, 0
            self._buffers.close()
        self.acct.free(self.tier, rest)

    def _release(self, entries: list[tuple[torch.Tensor, Any]]) -> None:
        for buf, after in entries:
            if after is not None:
                after.synchronize()  # sync point: no copy may still use a buffer unregistered
            with self._lock:
                locked_bytes = align_up(self._buffers.release(buf))
                self.held_bytes -= locked_bytes
            self.acct.free(self.tier, locked_bytes)


def queued_work_event(device: torch.device) -> Any:
    """CUDA: an event recorded now on the calling thread's current stream of ``device``, after
    the work queued there so far (what a buffer is given back with); None off CUDA."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _ready_index(kept: list[tuple[torch.Tensor, Any]]) -> int:
    """The first kept buffer whose copies have run (no event, or a completed one), else the
    oldest."""
    return next((k for k, (_, after) in enumerate(kept) if after is None or after.query()), 0)
