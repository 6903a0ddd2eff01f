"""kvikio backend: CuFile pread/pwrite into CUDA tensors (GPUDirect Storage when the driver and
filesystem allow it, else kvikio's POSIX compat path) and into host buffers.

kvikio needs libcuda.so.1 for any I/O, host buffers included: on a machine without a GPU this
backend is never chosen by ``auto`` (see ``offload.io.select_backend``). Whether GDS really
moved the bytes is read from ``kvikio.SummaryMonitor`` and reported by ``describe()``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from offload.io.base import ALIGN_BYTES, InFlight, as_byte_tensor


class KvikioBackend:
    """CuFile-based I/O; kvikio's own thread pool splits each request into ``task_bytes`` tasks."""

    name = "kvikio"

    def __init__(self, num_threads: int = 8, task_bytes: int = 8 << 20) -> None:
        self.num_threads = num_threads
        self.task_bytes = task_bytes
        self._kvikio: Any = None
        self._monitor: Any = None
        self._files: dict[int, Any] = {}
        self._in_flight: dict[int, InFlight] = {}
        self._next_handle = 0
        self._lock = threading.Lock()
        self._waiters: ThreadPoolExecutor | None = None

    def _start(self) -> Any:
        if self._kvikio is None:
            import kvikio
            import kvikio.defaults

            kvikio.defaults.set({"num_threads": self.num_threads, "task_size": self.task_bytes})
            self._kvikio = kvikio
            self._monitor = kvikio.SummaryMonitor() if hasattr(kvikio, "SummaryMonitor") else None
            # Threads that block on kvikio futures so callers get concurrent.futures.Future.
            self._waiters = ThreadPoolExecutor(4, thread_name_prefix="kvikio-wait")
        return self._kvikio

    def open(self, path: str, create: bool) -> int:
        kvikio = self._start()
        if create and not os.path.exists(path):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
        cufile = kvikio.CuFile(path, "r+")  # "r+": never truncates an existing swap file
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._files[handle] = cufile
            self._in_flight[handle] = InFlight()
        return handle

    def close_file(self, handle: int) -> None:
        with self._lock:
            cufile = self._files.pop(handle)
            in_flight = self._in_flight.pop(handle)
        in_flight.wait_idle()
        cufile.close()

    @staticmethod
    def _buffer(buf: torch.Tensor) -> Any:
        data = as_byte_tensor(buf)
        # CUDA tensors go through __cuda_array_interface__; host tensors need the buffer protocol.
        return data if data.is_cuda else data.numpy()

    def submit_read(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=False)

    def submit_write(self, handle: int, buf: torch.Tensor, file_offset: int) -> Future[int]:
        return self._submit(handle, buf, file_offset, write=True)

    def _submit(self, handle: int, buf: torch.Tensor, file_offset: int, write: bool) -> Future[int]:
        if file_offset % ALIGN_BYTES:
            raise ValueError(f"file offset {file_offset} is not {ALIGN_BYTES}-byte aligned")
        cufile = self._files[handle]
        data = self._buffer(buf)
        n_bytes = buf.numel() * buf.element_size()
        op = cufile.pwrite if write else cufile.pread
        in_flight = self._in_flight[handle]
        future: Future[int] = Future()
        future.set_running_or_notify_cancel()
        in_flight.begin()
        try:
            io_future = op(data, n_bytes, file_offset)
            assert self._waiters is not None
            self._waiters.submit(self._wait, io_future, n_bytes, write, future, in_flight)
        except BaseException:
            in_flight.end()
            raise
        return future

    @staticmethod
    def _wait(io_future: Any, n_bytes: int, write: bool, future: Future[int],
              in_flight: InFlight) -> None:
        """Complete ``future`` from kvikio's; then drop the file's in-flight count."""
        try:
            done = io_future.get()  # blocks until kvikio's tasks finish; raises on I/O errors
            if done != n_bytes:
                raise EOFError(f"short {'write' if write else 'read'}: {done} of {n_bytes} bytes")
        except BaseException as err:  # noqa: BLE001 - handed to the waiting future
            future.set_exception(err)
        else:
            future.set_result(done)
        finally:
            in_flight.end()

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {"backend": self.name, "num_threads": self.num_threads,
                                   "task_bytes": self.task_bytes}
        if self._kvikio is None:
            return info
        try:
            import kvikio.cufile_driver

            info["gds_available"] = bool(kvikio.cufile_driver.get("is_gds_available"))
        except Exception as err:  # noqa: BLE001 - reported, never fatal
            info["gds_available"] = f"unknown ({err})"
        info["compat_mode_preferred"] = bool(self._kvikio.defaults.is_compat_mode_preferred())
        if self._monitor is not None:
            summary = self._monitor.get()
            info["bytes_by_path"] = {
                path: stats["bytes_transferred"] if isinstance(stats, dict)
                else getattr(stats, "bytes_transferred", stats)
                for path, stats in summary.by_backend.items()
            }
        return info

    def close(self) -> None:
        if self._waiters is not None:
            self._waiters.shutdown(wait=True)
            self._waiters = None
        for handle in list(self._files):
            self.close_file(handle)
