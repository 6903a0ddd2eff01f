"""DeepSpeed async_io backend (libaio), the path ZeRO-Infinity uses, for like-for-like comparison.

The op is JIT-compiled on first use (needs Debian's libaio-dev; several minutes on 2 cores);
``aio_op_built()`` says whether that already happened. Each pool thread owns one ``aio_handle``
and runs blocking ``sync_pread``/``sync_pwrite`` (they release the GIL). The op opens files by
path with O_DIRECT and copies any buffer it does not know as page-locked through a bounce buffer
it allocates and mlocks per call; so every chunk that is not already pinned goes through a
per-thread bounce buffer locked once by the op's own allocator (one memcpy, no per-call mlock).

The op aborts the process (a C ``assert``) when a read goes past the end of the file or when
mlock fails, so both are checked here first: reads past EOF raise ``EOFError``, and the page
padded tail of a file whose length is not page aligned is read with a plain ``pread``.
"""

from __future__ import annotations

import os
import resource
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from offload.io.base import ALIGN_BYTES, InFlight, align_up, host_request_bytes

_CAP_IPC_LOCK_BIT = 14
_first_write_lock = threading.Lock()
_first_write_done = False


def aio_op_built() -> tuple[bool, str]:
    """Whether DeepSpeed's async_io op can be loaded without compiling it; returns (ok, reason)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"deepspeed is not importable ({err})"
    builder = AsyncIOBuilder()
    if installed_ops.get(builder.NAME, False):
        return True, "async_io op installed with deepspeed"
    if not builder.is_compatible(verbose=False):
        return False, "async_io op is not compatible here (libaio-dev missing?)"
    from torch.utils.cpp_extension import _get_build_directory

    so_path = Path(_get_build_directory(builder.NAME, verbose=False)) / f"{builder.NAME}.so"
    if not so_path.exists():
        return False, f"async_io op not built ({so_path} missing; AsyncIOBuilder().load() builds it)"
    return True, f"async_io op built at {so_path}"


def _can_lock(n_bytes: int) -> bool:
    """Whether this process may mlock ``n_bytes`` more (CAP_IPC_LOCK or RLIMIT_MEMLOCK)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or n_bytes <= soft:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK_BIT & 1)
    return False


def _make_first_write(op: Any, directory: str) -> None:
    """Make the process's first async_io write here, on one thread, to a scratch file.

    DeepSpeed's ``sync_pwrite`` binding logs a one-time SSD-endurance warning through Python
    inside ``std::call_once`` while holding the GIL: when two threads make their first write at
    the same time, one waits in call_once holding the GIL while the other waits for the GIL
    inside call_once, and the process hangs (seen with DeepSpeed 0.19.8).
    """
    global _first_write_done
    with _first_write_lock:
        if _first_write_done:
            return
        from offload.io.posix import aligned_empty

        scratch = os.path.join(directory, f".aio-first-write-{os.getpid()}")
        handle = op.aio_handle(ALIGN_BYTES, 1, False, False, 1)
        try:
            handle.sync_pwrite(aligned_empty(ALIGN_BYTES).zero_(), scratch, 0)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
        _first_write_done = True


@dataclass
class _AioFile:
    path: str
    buffered_fd: int  # for the sub-page tail of files whose length is not page aligned
    in_flight: InFlight = field(default_factory=InFlight)


class AioBackend:
    name = "aio"

    def __init__(self, num_threads: int = 4, task_bytes: int = 8 << 20, block_bytes: int = 1 << 20,
                 queue_depth: int = 32) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if task_bytes < ALIGN_BYTES or task_bytes % ALIGN_BYTES:
            raise ValueError(f"task_bytes must be a positive multiple of {ALIGN_BYTES}")
        self.num_threads = num_threads
        self.task_bytes = task_bytes
        self.block_bytes = block_bytes
        self.queue_depth = queue_depth
        self._op: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._files: dict[int, _AioFile] = {}
        self._next_handle = 0
        self._lock = threading.Lock()
        self._stats = {"direct_bytes": 0, "bounced_bytes": 0, "buffered_bytes": 0}
        self._states: list[tuple[Any, torch.Tensor]] = []  # every thread's (handle, bounce)

    def _start(self) -> None:
        if self._pool is not None:
            return
        locked_bytes = self.num_threads * self.task_bytes
        if not _can_lock(locked_bytes):
            raise OSError(f"aio backend needs {locked_bytes} bytes of mlock'ed bounce buffers: "
                          f"raise `ulimit -l` or lower num_threads/task_bytes")
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if self._op is None:
            self._op = AsyncIOBuilder().load(verbose=False)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="aio")

    def _thread_state(self) -> tuple[Any, torch.Tensor]:
        state = getattr(self._local, "state", None)
        if state is None:
            handle = self._op.aio_handle(self.block_bytes, self.queue_depth, False, False, 1)
            bounce = handle.new_cpu_locked_tensor(self.task_bytes, torch.empty(0, dtype=torch.uint8))
            state = (handle, bounce)
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def open(self, path: str, create: bool) -> int:
        self._start()
        _make_first_write(self._op, os.path.dirname(os.path.abspath(path)))
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        buffered_fd = os.open(path, flags, 0o644)
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._files[handle] = _AioFile(path, buffered_fd)
        return handle

    def close_file(self, handle: int) -> None:
        with self._lock:
            f = self._files.pop(handle)
        f.in_flight.wait_idle()
        os.close(f.buffered_fd)

    def submit_read(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=False)

    def submit_write(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=True)

    def _submit(self, handle: int, buf: torch.Tensor, file_offset: int, write: bool) -> Future[int]:
        data = host_request_bytes(buf, file_offset, self.name)
        f = self._files[handle]
        assert self._pool is not None
        future: Future[int] = Future()
        future.set_running_or_notify_cancel()
        f.in_flight.begin()
        try:
            self._pool.submit(self._run, f, data, file_offset, write, future)
        except BaseException:
            f.in_flight.end()
            raise
        return future

    def _run(self, f: _AioFile, data: torch.Tensor, offset: int, write: bool,
             future: Future[int]) -> None:
        """Move ``data`` in ``task_bytes`` chunks; the future (and its callbacks) completes
        before the file's in-flight count drops, so close_file waits for both."""
        try:
            if not write:
                self._check_readable(f, offset, data.numel())
            for start in range(0, data.numel(), self.task_bytes):
                chunk = data[start : start + self.task_bytes]
                if write:
                    self._write_chunk(f, chunk, offset + start)
                else:
                    self._read_chunk(f, chunk, offset + start)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting future
            future.set_exception(err)
        else:
            future.set_result(data.numel())
        finally:
            f.in_flight.end()

    @staticmethod
    def _check_readable(f: _AioFile, offset: int, n_bytes: int) -> None:
        file_bytes = os.fstat(f.buffered_fd).st_size
        if offset + n_bytes > file_bytes:
            raise EOFError(f"{f.path}: read of {n_bytes} bytes at offset {offset} goes past the "
                           f"end of the file ({file_bytes} bytes)")

    def _pinned(self, handle: Any, chunk: torch.Tensor) -> bool:
        aligned = chunk.data_ptr() % ALIGN_BYTES == 0 and chunk.numel() % ALIGN_BYTES == 0
        return aligned and (chunk.is_pinned() or bool(handle.is_pinned(chunk)))

    def _write_chunk(self, f: _AioFile, chunk: torch.Tensor, offset: int) -> None:
        handle, bounce = self._thread_state()
        n_bytes = chunk.numel()
        if self._pinned(handle, chunk):
            self._call(handle.sync_pwrite, chunk, f.path, offset, "write")
            self._count("direct_bytes", n_bytes)
            return
        target = bounce[: align_up(n_bytes)]
        target[:n_bytes].copy_(chunk)
        target[n_bytes:].zero_()
        self._call(handle.sync_pwrite, target, f.path, offset, "write")
        self._count("bounced_bytes", n_bytes)

    def _read_chunk(self, f: _AioFile, chunk: torch.Tensor, offset: int) -> None:
        handle, bounce = self._thread_state()
        n_bytes = chunk.numel()
        if self._pinned(handle, chunk):
            self._call(handle.sync_pread, chunk, f.path, offset, "read")
            self._count("direct_bytes", n_bytes)
            return
        # Only whole pages that exist in the file go through the op; a sub-page tail at EOF
        # (file length not page aligned) is read with pread.
        file_bytes = os.fstat(f.buffered_fd).st_size
        direct_bytes = min(align_up(n_bytes), (file_bytes - offset) // ALIGN_BYTES * ALIGN_BYTES)
        if direct_bytes:
            self._call(handle.sync_pread, bounce[:direct_bytes], f.path, offset, "read")
        head = min(direct_bytes, n_bytes)
        chunk[:head].copy_(bounce[:head])
        if head < n_bytes:
            tail = os.pread(f.buffered_fd, n_bytes - head, offset + head)
            if len(tail) != n_bytes - head:
                raise EOFError(f"{f.path}: short read at offset {offset + head}")
            chunk[head:].copy_(torch.frombuffer(bytearray(tail), dtype=torch.uint8))
            self._count("buffered_bytes", n_bytes - head)
        self._count("bounced_bytes", head)

    @staticmethod
    def _call(op: Any, buf: torch.Tensor, path: str, offset: int, what: str) -> None:
        if op(buf, path, offset) < 0:
            raise OSError(f"aio {what} of {buf.numel()} bytes failed on {path} at offset {offset}")

    def _count(self, key: str, n_bytes: int) -> None:
        with self._lock:
            self._stats[key] += n_bytes

    def describe(self) -> dict[str, object]:
        with self._lock:
            stats = dict(self._stats)
        return {"backend": self.name, "num_threads": self.num_threads, "task_bytes": self.task_bytes,
                "block_bytes": self.block_bytes, "queue_depth": self.queue_depth, **stats}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for handle, bounce in self._states:
            handle.free_cpu_locked_tensor(bounce)
        self._states.clear()
        for file_handle in list(self._files):
            self.close_file(file_handle)
