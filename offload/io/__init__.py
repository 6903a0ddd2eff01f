"""I/O backends behind one protocol (``offload.io.base.IOBackend``) and the ``auto`` choice."""

from __future__ import annotations

import logging

from offload.io.base import ALIGN_BYTES, IOBackend, align_up
from offload.io.posix import PosixBackend, aligned_empty

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "posix", "kvikio", "aio")

__all__ = ["ALIGN_BYTES", "BACKEND_NAMES", "IOBackend", "PosixBackend", "align_up", "aligned_empty",
           "make_backend", "select_backend"]


AUTO_REASON = ("the store moves host buffers only (no device buffer reaches it yet): posix reads them with "
               "O_DIRECT, past the page cache, where kvikio's host-buffer path goes through it")


def select_backend(requested: str = "auto") -> tuple[str, str]:
    """Resolve ``auto`` to a concrete backend name; returns (name, reason).

    ``auto`` is posix on every machine until device buffers are read and written directly
    (GPUDirect Storage through kvikio); ``kvikio`` stays available by name."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"unknown io_backend {requested!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if requested != "auto":
        return requested, "requested"
    return "posix", AUTO_REASON


def make_backend(requested: str = "auto", num_threads: int = 8, task_bytes: int = 8 << 20) -> IOBackend:
    """Build the backend named ``requested`` (``auto``: posix, see ``select_backend``), logged."""
    name, why = select_backend(requested)
    log.info("I/O backend: %s (%s)", name, why)
    if name == "posix":
        return PosixBackend(num_threads=num_threads, task_bytes=task_bytes)
    if name == "kvikio":
        from offload.io.kvikio_backend import KvikioBackend

        _need_kvikio()

        return KvikioBackend(num_threads=num_threads, task_bytes=task_bytes)
    from offload.io.aio import AioBackend

    return AioBackend(num_threads=min(num_threads, 4), task_bytes=task_bytes)


def _need_kvikio() -> None:
    """The ``kvikio`` backend needs the kvikio package: without it, a one-line error naming the extra."""
    from offload.errors import OffloadError

    try:
        import kvikio  # noqa: F401
    except ImportError as err:
        raise OffloadError(f"io_backend kvikio needs the kvikio package, which cannot be imported here ({err}); "
                           f"install the gpu-cu12 or gpu-cu13 extra (the CUDA major version of your torch), "
                           f"or use io_backend auto or posix (offload.io_backend; profile: --io-backend)") from None
