"""HostArena: one page-aligned host allocation with a hard byte budget (rounded up to a whole
page), carved into slots.

Pinned (page-locked in place with ``cudaHostRegister``: exactly the budget, not CUDA's caching host
allocator's next power of two) when CUDA is available, so H2D/D2H copies from it are real
asynchronous DMA; plain page-aligned memory otherwise. The arena never grows: a request that does
not fit waits until enough slots are returned, or fails at once with ``BudgetError`` when it could
never fit, or when ``timeout_s`` passes.

Allocation is first-fit over a sorted free list with coalescing on release; every slot starts and
ends on a 4 KiB boundary, so any slot is a valid O_DIRECT buffer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from offload.errors import BudgetError, format_bytes
from offload.io.base import ALIGN_BYTES, align_up
from offload.io.posix import aligned_empty
from offload.pinned import PinnedBuffers


@dataclass(frozen=True)
class Slot:
    """A carved byte range of the arena; ``view(dtype, numel)`` gives a typed tensor over it."""

    offset: int
    nbytes: int
    data: torch.Tensor  # uint8 view of the arena bytes [offset, offset + nbytes)

    def view(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel < 0 or numel * itemsize > self.nbytes:
            raise ValueError(f"slot of {self.nbytes} bytes cannot hold {numel} x {dtype}")
        return self.data[: numel * itemsize].view(dtype)


class HostArena:
    """A fixed host memory budget handed out as aligned slots. Use as a context manager."""

    def __init__(self, budget_bytes: int, pin_memory: bool | None = None) -> None:
        if budget_bytes < ALIGN_BYTES:
            raise ValueError(f"host arena budget must be at least {ALIGN_BYTES} bytes")
        self.budget_bytes = align_up(budget_bytes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._arena: torch.Tensor | None = None
        self._pinned: PinnedBuffers | None = None  # pinned: owns the registration of the arena
        self._free: list[tuple[int, int]] = []  # sorted (offset, nbytes)
        self._used_bytes = 0
        self.peak_bytes = 0
        self._cond = threading.Condition()

    def open(self) -> HostArena:
        if self.pin_memory:
            self._pinned = PinnedBuffers()
            arena = self._pinned.empty(self.budget_bytes, torch.uint8)
        else:
            arena = aligned_empty(self.budget_bytes)
        with self._cond:
            self._arena = arena
            self._free = [(0, self.budget_bytes)]
            self._used_bytes = 0
        return self

    def __enter__(self) -> HostArena:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the arena; waiting ``acquire`` calls fail. Slots still held keep their memory
        (pageable once pinned memory is unregistered: the owner has synchronized its copies)."""
        with self._cond:
            self._arena = None
            self._free = []
            self._used_bytes = 0
            self._cond.notify_all()
        if self._pinned is not None:
            self._pinned.close()
            self._pinned = None

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def acquire(self, nbytes: int, timeout_s: float | None = None) -> Slot:
        """A slot of at least ``nbytes`` (rounded up to 4 KiB); waits while others hold memory."""
        need = self._need(nbytes)
        with self._cond:
            slot = self._try_carve(need)
            if slot is None and not self._cond.wait_for(
                lambda: self._arena is None or self._fits(need), timeout=timeout_s
            ):
                raise BudgetError(
                    f"timed out waiting {timeout_s} s for {format_bytes(need)} of host buffer "
                    f"memory ({format_bytes(self._used_bytes)} of {format_bytes(self.budget_bytes)} "
                    f"in use); raise offload.cpu_memory_limit"
                )
            if slot is None:
                slot = self._try_carve(need)
            assert slot is not None
            return slot

    def try_acquire(self, nbytes: int) -> Slot | None:
        """A slot at once, or None when the budget has no room now; ``BudgetError`` when the
        request could never fit."""
        need = self._need(nbytes)
        with self._cond:
            return self._try_carve(need)

    def _need(self, nbytes: int) -> int:
        need = align_up(max(nbytes, 1))
        if need > self.budget_bytes:
            raise BudgetError(
                f"a {format_bytes(need)} buffer cannot fit the host buffer budget of "
                f"{format_bytes(self.budget_bytes)}; raise offload.cpu_memory_limit"
            )
        return need

    def release(self, slot: Slot) -> None:
        """Return ``slot`` (a no-op once the arena is closed); releasing a slot twice, or one of
        another arena, raises ``ValueError``."""
        with self._cond:
            if self._arena is None:
                return
            self._check_owned(slot)
            self._free.append((slot.offset, slot.nbytes))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for off, size in self._free:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((off, size))
            self._free = merged
            self._used_bytes -= slot.nbytes
            self._cond.notify_all()

    def _check_owned(self, slot: Slot) -> None:
        assert self._arena is not None
        if slot.data.data_ptr() != self._arena.data_ptr() + slot.offset:
            raise ValueError(f"slot at offset {slot.offset} does not belong to this host arena")
        end = slot.offset + slot.nbytes
        if any(off < end and slot.offset < off + size for off, size in self._free):
            raise ValueError(f"slot at offset {slot.offset} was already released")

    def _fits(self, need: int) -> bool:
        return any(size >= need for _, size in self._free)

    def _try_carve(self, need: int) -> Slot | None:
        if self._arena is None:
            raise RuntimeError("the host arena is not open: use `with HostArena(...) as arena`")
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                self._used_bytes += need
                self.peak_bytes = max(self.peak_bytes, self._used_bytes)
                return Slot(off, need, self._arena[off : off + need])
        return None
