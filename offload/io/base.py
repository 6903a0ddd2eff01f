"""The I/O backend protocol: submit reads and writes of host or device buffers, get futures.

A backend moves bytes between a buffer and a byte range of an open file. It knows nothing of
tensor names, manifests or checksums (that is ``offload.store``). All offsets and extents given
by the store are 4 KiB aligned; buffers may be anything C-contiguous, the backend bounces what
O_DIRECT cannot take.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Protocol

import torch

ALIGN_BYTES = 4096
"""O_DIRECT alignment of file offsets, lengths and buffer addresses (one page)."""


def align_up(n_bytes: int, align: int = ALIGN_BYTES) -> int:
    return (n_bytes + align - 1) // align * align


class IOBackend(Protocol):
    """Moves bytes between buffers and files. Every call returns at once with a future."""

    name: str

    def open(self, path: str, create: bool) -> int:
        """Open (or create) ``path`` for reading and writing; return a handle for submit_*."""
        ...

    def close_file(self, handle: int) -> None:
        """Wait for the requests in flight on ``handle``, then close its file."""
        ...

    def submit_read(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        """Fill ``buf`` (all its bytes) from ``file_offset``; the future gives bytes read."""
        ...

    def submit_write(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        """Write all bytes of ``buf`` at ``file_offset``; the future gives bytes written."""
        ...

    def describe(self) -> dict[str, object]:
        """What the backend really did so far (mode, direct or buffered, GDS bytes ...)."""
        ...

    def close(self) -> None:
        """Wait for in-flight requests, stop the workers, close every file."""
        ...


def as_byte_tensor(buf: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bf16 included)."""
    if not buf.is_contiguous():
        raise ValueError("I/O buffers must be contiguous")
    return buf.reshape(-1).view(torch.uint8)


def host_request_bytes(buf: torch.Tensor, file_offset: int, backend: str) -> torch.Tensor:
    """Check a request for a host-only backend; return the buffer as a flat uint8 view."""
    if buf.device.type != "cpu":
        raise ValueError(f"the {backend} backend moves host buffers only; copy device tensors first")
    if file_offset % ALIGN_BYTES:
        raise ValueError(f"file offset {file_offset} is not {ALIGN_BYTES}-byte aligned")
    return as_byte_tensor(buf)


class InFlight:
    """Counts requests in flight on one file so that closing it can wait for them first."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def begin(self, n: int = 1) -> None:
        with self._idle:
            self._count += n

    def end(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0)
