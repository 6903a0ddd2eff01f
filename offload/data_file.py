"""The swap store's data path: ``data-000.bin`` through an I/O backend, every byte checksummed.

``write()`` and ``read()`` hand a byte range to the backend and return at once with a future of
their own, settled by a completion callback once the backend's future is done: after a write the
callback computes the checksum of the bytes written (xxh3_64, ``offload.checksum``) and records it
in the extent table; after a read it checks the bytes against the recorded one (``verify_reads``),
so a flipped or truncated byte becomes a ``CorruptionError`` naming the tensor and the file, never
silent garbage. Tensors on the GPU are neither hashed nor checked. Backend errors become
``OffloadError``s naming the tensor. Every future handed out counts as in flight until settled.

The file only grows (``extend()``: a free-space check, then ``posix_fallocate``) until the store
is reset. Callbacks run on the backend's threads (or inline on the submitting thread when the
backend has already finished); the state lock they take is the store's, see ``offload.store``.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import torch

from offload.checksum import Checksum
from offload.errors import CorruptionError, OffloadError, OutOfSpaceError
from offload.extent_table import ExtentTable
from offload.io.base import IOBackend, as_byte_tensor
from offload.manifest import DATA_FILE_NAME, Extent

SPACE_RESERVE_BYTES = 64 << 20
"""Free space left untouched on the filesystem so that manifests and logs can still be written."""


class DataFile:
    """The data file of the store at ``root``, its length, the I/O in flight and byte counters."""

    def __init__(self, root: Path, backend: IOBackend, verify_reads: bool, table: ExtentTable,
                 state_lock: threading.Lock) -> None:
        self.root = root
        self.path = root / DATA_FILE_NAME
        self.backend = backend
        self.verify_reads = verify_reads
        self.nbytes = 0  # allocated length of the data file
        self.read_bytes = 0
        self.write_bytes = 0
        self._table = table  # checksums recorded and checked
        self._lock = state_lock  # guards the table, ``_in_flight`` and the counters
        self._handle: int | None = None
        self._in_flight: set[Future] = set()  # futures handed out by write() and read()

    # -- the file ---------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def open(self) -> None:
        self._handle = self.backend.open(str(self.path), create=True)
        self.nbytes = self.path.stat().st_size

    def close(self) -> None:
        """Close the file (the backend waits for its requests on it first)."""
        if self._handle is not None:
            self.backend.close_file(self._handle)
            self._handle = None

    def handle(self) -> int:
        if self._handle is None:
            raise RuntimeError("the swap store is not open: use `with SwapStore(...) as store`")
        return self._handle

    def sync(self) -> None:
        """fsync: every write that has landed is on disk."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self) -> None:
        """Shrink the file to nothing."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        self.nbytes = 0

    # -- growing ----------------------------------------------------------------------------
    def room(self) -> int:
        """Bytes the file may still grow by: free space on the filesystem beyond the reserve."""
        return max(shutil.disk_usage(self.root).free - SPACE_RESERVE_BYTES, 0)

    def extend(self, nbytes: int) -> int:
        """Grow the file by ``nbytes`` (a multiple of 4 KiB, more than 0) and return where they
        start; ``OutOfSpaceError`` before touching the disk when they do not fit."""
        offset = self.nbytes
        room = self.room()
        if nbytes > room:
            raise OutOfSpaceError(str(self.root), nbytes, room)
        self._grow_to(offset + nbytes)
        return offset

    def _grow_to(self, n_bytes: int) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, n_bytes)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG):
                os.ftruncate(fd, self.nbytes)  # give back a partial allocation
                raise self._grow_error(err.errno, n_bytes) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, n_bytes)  # filesystem without fallocate
        finally:
            os.close(fd)
        self.nbytes = n_bytes

    def _grow_error(self, err_no: int, n_bytes: int) -> OffloadError:
        if err_no == errno.EFBIG:
            return OffloadError(
                f"swap file {self.path} would be {n_bytes} bytes, more than the "
                f"filesystem under {self.root} allows in one file; point offload.nvme_path at "
                f"ext4 or xfs"
            )
        return OutOfSpaceError(
            str(self.root), n_bytes - self.nbytes, shutil.disk_usage(self.root).free
        )

    # -- reads and writes -------------------------------------------------------------------
    def write(self, ext: Extent, tensor: torch.Tensor) -> Future[None]:
        inner = self.backend.submit_write(self.handle(), tensor, ext.offset)
        fut: Future[None] = self._track(Future())
        inner.add_done_callback(lambda f: self._settle(fut, None, lambda: self._write_error(f, ext, tensor)))
        return fut

    def read(self, ext: Extent, out: torch.Tensor) -> Future[torch.Tensor]:
        inner = self.backend.submit_read(self.handle(), out, ext.offset)
        fut: Future[torch.Tensor] = self._track(Future())
        inner.add_done_callback(lambda f: self._settle(fut, out, lambda: self._read_error(f, ext, out)))
        return fut

    def wait_in_flight(self) -> None:
        """Block until every read and write submitted so far has finished (failed ones too)."""
        while True:
            with self._lock:
                pending = [f for f in self._in_flight if not f.done()]
            if not pending:
                return
            wait(pending)

    def _track(self, fut: Future) -> Future:
        """Mark ``fut`` running and count it in flight until it is settled."""
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._in_flight.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._in_flight.discard(fut)

    @staticmethod
    def _settle(fut: Future[Any], result: Any, error_of: Callable[[], BaseException | None]) -> None:
        """Completion callback: settle ``fut`` with ``result``, or with the error ``error_of()``
        returns or raises."""
        try:
            error = error_of()
        except BaseException as err:  # noqa: BLE001 - the future must always be settled
            error = err
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    def _write_error(self, inner: Future[int], ext: Extent, t: torch.Tensor) -> BaseException | None:
        err = inner.exception()  # on a backend thread, or inline on the one that submitted
        if err is not None:
            return self._translate(err, ext, "write")
        value = Checksum.of(as_byte_tensor(t)) if t.device.type == "cpu" else None
        with self._lock:
            self._table.sums[ext.name] = value
            self.write_bytes += ext.nbytes
        return None

    def _read_error(self, inner: Future[int], ext: Extent, out: torch.Tensor) -> BaseException | None:
        err = inner.exception()  # on a backend thread, or inline on the one that submitted
        if err is not None:
            return self._translate(err, ext, "read")
        with self._lock:
            expected = self._table.sums.get(ext.name)
            self.read_bytes += ext.nbytes
        if (self.verify_reads and expected is not None and out.device.type == "cpu"
                and not expected.matches(as_byte_tensor(out))):
            return CorruptionError(
                f"swap data for tensor {ext.name!r} in {self.root / ext.file} (offset "
                f"{ext.offset}, {ext.nbytes} bytes) fails its checksum: the file is corrupt; "
                f"resume from the last checkpoint"
            )
        return None

    def _translate(self, err: BaseException, ext: Extent, op: str) -> BaseException:
        path = self.root / ext.file
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return OutOfSpaceError(str(self.root), ext.nbytes, shutil.disk_usage(self.root).free)
        if isinstance(err, EOFError):
            return CorruptionError(f"swap data for tensor {ext.name!r} in {path} is truncated ({err})")
        if isinstance(err, OSError):
            return OffloadError(f"{op} of tensor {ext.name!r} in {path} failed: {err.strerror or err}")
        return err
