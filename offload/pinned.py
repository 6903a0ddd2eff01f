"""Host memory page-locked in place for CUDA copies, exactly the bytes asked for.

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

import torch

from offload.io.posix import aligned_empty


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
