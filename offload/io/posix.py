"""POSIX backend: a thread pool running os.preadv/os.pwritev, O_DIRECT where the filesystem allows.

Works everywhere, GPU or not. Each request is cut into ``task_bytes`` chunks spread over the
pool so that one large tensor uses every thread. A chunk whose buffer address and length are
page aligned goes straight to the O_DIRECT descriptor; any other chunk goes through a per-thread
page-aligned bounce buffer (one memcpy). Where O_DIRECT is refused (tmpfs, some overlay
filesystems) the file falls back to buffered I/O, logged once per backend.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from offload.hostmem import HUGE_PAGE_BYTES, anonymous_buffer
from offload.io.base import ALIGN_BYTES, InFlight, align_up, host_request_bytes

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_empty(n_bytes: int, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 host tensor of ``n_bytes`` whose first byte is page aligned.

    Pinned: the exact size first (CUDA's pinned blocks start on a page, and the caching host
    allocator rounds a request up to a power of two: one page more would double a power-of-two
    request); pageable from 2 MiB on: on transparent huge pages (``hostmem.anonymous_buffer``);
    smaller, or a pinned block that is not aligned: one page more, cut to alignment."""
    if not pin_memory and n_bytes >= HUGE_PAGE_BYTES:
        return anonymous_buffer(n_bytes)
    if pin_memory:
        raw = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
        if raw.data_ptr() % ALIGN_BYTES == 0:
            return raw
        del raw
    raw = torch.empty(n_bytes + ALIGN_BYTES, dtype=torch.uint8, pin_memory=pin_memory)
    shift = (-raw.data_ptr()) % ALIGN_BYTES
    return raw[shift : shift + n_bytes]


@dataclass
class _OpenFile:
    path: str
    buffered_fd: int
    direct_fd: int | None  # None: O_DIRECT refused by the filesystem at open
    direct_refused: bool = False  # O_DIRECT refused at I/O time; direct_fd stays open until close
    in_flight: InFlight = field(default_factory=InFlight)  # chunks queued or running

    @property
    def usable_direct_fd(self) -> int | None:
        return None if self.direct_refused else self.direct_fd


@dataclass
class _Request:
    """One submitted read or write, split into chunks; done when every chunk is."""

    future: Future[int]
    total_bytes: int
    pending_chunks: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: bool = False

    def chunk_done(self, error: BaseException | None) -> None:
        with self.lock:
            if self.failed:
                return
            if error is not None:
                self.failed = True
                self.future.set_exception(error)
                return
            self.pending_chunks -= 1
            if self.pending_chunks == 0:
                self.future.set_result(self.total_bytes)


class PosixBackend:
    """Thread-pool POSIX I/O. See the module docstring."""

    name = "posix"

    def __init__(self, num_threads: int = 8, task_bytes: int = 8 << 20, direct: bool = True) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if task_bytes < ALIGN_BYTES or task_bytes % ALIGN_BYTES:
            raise ValueError(f"task_bytes must be a positive multiple of {ALIGN_BYTES}")
        self.num_threads = num_threads
        self.task_bytes = task_bytes
        self.direct = direct and _O_DIRECT != 0
        self._pool: ThreadPoolExecutor | None = None
        self._files: dict[int, _OpenFile] = {}
        self._next_handle = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._stats = {"direct_bytes": 0, "buffered_bytes": 0, "bounced_bytes": 0}
        self._warned_fallback = False

    # -- files ------------------------------------------------------------------------------
    def open(self, path: str, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        buffered_fd = os.open(path, flags, 0o644)
        direct_fd = None
        if self.direct:
            try:
                direct_fd = os.open(path, os.O_RDWR | _O_DIRECT)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    os.close(buffered_fd)
                    raise
                self._log_fallback(path, err)
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._files[handle] = _OpenFile(path, buffered_fd, direct_fd)
        return handle

    def close_file(self, handle: int) -> None:
        with self._lock:
            f = self._files.pop(handle)
        f.in_flight.wait_idle()
        os.close(f.buffered_fd)
        if f.direct_fd is not None:
            os.close(f.direct_fd)

    def _log_fallback(self, path: str, err: OSError) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning(
                "O_DIRECT refused for %s (%s): using buffered I/O (page cache) on this filesystem",
                path,
                os.strerror(err.errno or 0),
            )

    # -- requests ---------------------------------------------------------------------------
    def submit_read(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=False)

    def submit_write(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=True)

    def _submit(self, handle: int, buf: torch.Tensor, file_offset: int, write: bool) -> Future[int]:
        data = host_request_bytes(buf, file_offset, self.name)
        f = self._files[handle]
        pool = self._started_pool()
        n_bytes = data.numel()
        starts = list(range(0, n_bytes, self.task_bytes)) or [0]
        request = _Request(Future(), n_bytes, len(starts))
        request.future.set_running_or_notify_cancel()
        for start in starts:
            chunk = data[start : start + self.task_bytes]
            f.in_flight.begin()
            try:
                pool.submit(self._run_chunk, request, f, chunk, file_offset + start, write)
            except BaseException:
                f.in_flight.end()
                raise
        return request.future

    def _started_pool(self) -> ThreadPoolExecutor:
        with self._lock:  # submits may come from several threads at once
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="posix-io")
            return self._pool

    def _run_chunk(
        self, request: _Request, f: _OpenFile, chunk: torch.Tensor, offset: int, write: bool
    ) -> None:
        try:
            if chunk.numel():
                self._move(f, chunk, offset, write)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting future
            request.chunk_done(err)
        else:
            request.chunk_done(None)
        finally:
            f.in_flight.end()  # after chunk_done: closing the file also waits for callbacks

    def _move(self, f: _OpenFile, chunk: torch.Tensor, offset: int, write: bool) -> None:
        n_bytes = chunk.numel()
        aligned = chunk.data_ptr() % ALIGN_BYTES == 0 and n_bytes % ALIGN_BYTES == 0
        direct_fd = f.usable_direct_fd
        if direct_fd is not None:
            try:
                if aligned:
                    self._transfer(direct_fd, chunk, offset, write, f.path)
                    self._count("direct_bytes", n_bytes)
                else:
                    self._bounced(direct_fd, chunk, offset, write, f.path)
                    self._count("bounced_bytes", n_bytes)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # The filesystem accepted O_DIRECT at open but refuses it for I/O. The fd is
                # closed by close_file only: other threads may be using it right now.
                self._log_fallback(f.path, err)
                f.direct_refused = True
        self._transfer(f.buffered_fd, chunk, offset, write, f.path)
        self._count("buffered_bytes", n_bytes)

    def _bounced(self, fd: int, chunk: torch.Tensor, offset: int, write: bool, path: str) -> None:
        """O_DIRECT through this thread's aligned buffer; the length is padded to a page."""
        bounce = self._bounce()
        n_bytes = chunk.numel()
        padded = align_up(n_bytes)
        view = bounce[:padded]
        if write:
            view[:n_bytes].copy_(chunk)
            view[n_bytes:].zero_()
            self._transfer(fd, view, offset, True, path)
        else:
            self._transfer(fd, view, offset, False, path, need_bytes=n_bytes)
            chunk.copy_(view[:n_bytes])

    def _bounce(self) -> torch.Tensor:
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            buf = aligned_empty(self.task_bytes)
            self._local.bounce = buf
        return buf

    @staticmethod
    def _transfer(
        fd: int,
        buf: torch.Tensor,
        offset: int,
        write: bool,
        path: str,
        need_bytes: int | None = None,
    ) -> None:
        """Move all of ``buf`` (reads: at least ``need_bytes``), looping over short transfers.

        A read that comes back short at an offset O_DIRECT cannot continue from (not page
        aligned) has hit the end of the file, as has a read of zero bytes.
        """
        view = memoryview(buf.numpy()).cast("B")
        total = len(view)
        need = total if need_bytes is None else need_bytes
        done = 0
        while done < total:
            if write:
                n = os.pwritev(fd, [view[done:]], offset + done)
            else:
                n = os.preadv(fd, [view[done:]], offset + done)
            done += n
            at_eof = n == 0 or (not write and done < total and (offset + done) % ALIGN_BYTES != 0)
            if at_eof:
                if not write and done >= need:
                    return  # the page-padded tail lies past EOF: nothing more to read
                raise EOFError(
                    f"{path}: short {'write' if write else 'read'} at offset {offset + done}: "
                    f"file ends before the extent ({done} of {need} bytes)"
                )

    def _count(self, key: str, n_bytes: int) -> None:
        with self._lock:
            self._stats[key] += n_bytes

    def describe(self) -> dict[str, object]:
        with self._lock:
            stats = dict(self._stats)
        return {
            "backend": self.name,
            "num_threads": self.num_threads,
            "task_bytes": self.task_bytes,
            "o_direct": self.direct,
            **stats,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for handle in list(self._files):
            self.close_file(handle)
