"""Host memory page-locked in place for CUDA copies, exactly the bytes asked for; a pool of such
buffers reused by size and counted in a budget.

``torch.empty(..., pin_memory=True)`` goes through CUDA's caching host allocator: it rounds every
request up to a power of two and keeps freed blocks for later requests, so pinned bytes are
neither what a budget counted nor given back. ``PinnedBuffers`` allocates page-aligned host
buffers of the exact size, registers them with CUDA (``cudaHostRegister``: copies from and to
them run asynchronously, at full PCIe rate) and unregisters them on ``close()``. The caller counts
their bytes in its HOST budget; they stay valid (pageable) memory after ``close``.

Thread: the owner's (allocation at start-up, ``close`` at the end); the buffers themselves are
used from any thread.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from offload.io.posix import aligned_empty
from offload.tiers import Accountant, Tier


class PinnedBuffers:
    """Owns host buffers registered with CUDA; ``close()`` unregisters every one."""

    def __init__(self) -> None:
        self._held: list[torch.Tensor] = []  # uint8 views, page aligned, registered

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized, page-locked 1-D host tensor of ``numel`` elements."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = aligned_empty(nbytes)
        if nbytes:
            err = int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), nbytes, 0))
            if err != 0:
                raise RuntimeError(f"could not page-lock {nbytes} bytes of host memory for CUDA copies "
                                   f"(cudaHostRegister error {err}): lower offload.cpu_memory_limit, or raise "
                                   f"the locked-memory limit (ulimit -l)")
            self._held.append(raw)
        return raw.view(dtype)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of host tensor ``t`` (same shape and dtype, contiguous)."""
        out = self.empty(t.numel(), t.dtype)
        out.copy_(t.reshape(-1))
        return out.view(t.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._held)

    def close(self) -> None:
        for raw in self._held:
            torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())  # its memory stays valid, pageable
        self._held.clear()


class PinnedPool:
    """Page-locked host buffers of exact sizes (``PinnedBuffers``), kept for reuse by size and
    counted in one tier of an ``Accountant`` from their creation to ``close()``: a kept buffer
    stays page-locked, so it stays counted (what CUDA's caching host allocator would round up
    to a power of two and keep uncounted).

    ``take`` hands out a kept buffer of the size asked for (once the CUDA event it was given
    back with has run) or registers a new one; ``give`` keeps it again, with the event after
    the last copy queued from or into it. ``register=False`` pools plain page-aligned memory
    (the same bookkeeping without CUDA).

    Threads: any (a lock guards the kept buffers; the event waits run outside it).
    """

    def __init__(self, acct: Accountant, tier: Tier, register: bool = True) -> None:
        self.acct = acct
        self.tier = tier
        self._buffers = PinnedBuffers() if register else None
        self._kept: dict[int, list[tuple[torch.Tensor, Any]]] = {}  # by bytes: (uint8 buffer, event or None)
        self._lock = threading.Lock()
        self.held_bytes = 0  # every buffer made, kept or handed out

    def take(self, nbytes: int, what: str) -> torch.Tensor:
        """A page-aligned, page-locked uint8 buffer of exactly ``nbytes``; ``what`` names a new
        one in a budget error."""
        with self._lock:
            kept = self._kept.get(nbytes)
            buf, after = kept.pop() if kept else (None, None)
        if buf is not None:
            if after is not None:
                after.synchronize()  # sync point: the copies queued on it before it was given back
            return buf
        self.acct.alloc(self.tier, nbytes, f"{what} (page-locked)")
        try:
            buf = self._buffers.empty(nbytes, torch.uint8) if self._buffers is not None else aligned_empty(nbytes)
        except BaseException:
            self.acct.free(self.tier, nbytes)
            raise
        with self._lock:
            self.held_bytes += nbytes
        return buf

    def give(self, buf: torch.Tensor, after: Any = None) -> None:
        """Keep ``buf`` (a buffer ``take`` made, any view of all its bytes) for the next ``take``
        of its size; ``after``: the CUDA event after the last copy queued on it, or None."""
        raw = buf.reshape(-1).view(torch.uint8)
        with self._lock:
            self._kept.setdefault(raw.numel(), []).append((raw, after))

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(n * len(bufs) for n, bufs in self._kept.items())

    def close(self) -> None:
        """Unregister every buffer made (their copies run first) and give their bytes back to
        the tier; buffers still handed out stay valid, pageable memory."""
        with self._lock:
            kept = [after for bufs in self._kept.values() for _, after in bufs if after is not None]
            self._kept.clear()
            held, self.held_bytes = self.held_bytes, 0
        for after in kept:
            after.synchronize()  # sync point: no copy may still read or write a buffer unregistered
        if self._buffers is not None:
            self._buffers.close()
        self.acct.free(self.tier, held)
