"""I/O backends behind one protocol (``offload.io.base.IOBackend``) and the ``auto`` choice."""

from __future__ import annotations

import logging

from offload.io.base import ALIGN_BYTES, IOBackend, align_up
from offload.io.posix import PosixBackend, aligned_empty

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "posix", "kvikio", "aio")

__all__ = ["ALIGN_BYTES", "BACKEND_NAMES", "IOBackend", "PosixBackend", "align_up", "aligned_empty",
           "make_backend", "select_backend"]


def select_backend(requested: str = "auto") -> tuple[str, str]:
    """Resolve ``auto`` to a concrete backend name; returns (name, reason)."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"unknown io_backend {requested!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if requested != "auto":
        return requested, "requested"
    from offload.io.kvikio_backend import kvikio_usable

    usable, why = kvikio_usable()
    if usable:
        return "kvikio", why
    return "posix", f"kvikio not usable: {why}"


def make_backend(requested: str = "auto", num_threads: int = 8, task_bytes: int = 8 << 20) -> IOBackend:
    """Build the backend named ``requested`` (``auto``: kvikio with CUDA, else posix), logged."""
    name, why = select_backend(requested)
    log.info("I/O backend: %s (%s)", name, why)
    if name == "posix":
        return PosixBackend(num_threads=num_threads, task_bytes=task_bytes)
    if name == "kvikio":
        from offload.io.kvikio_backend import KvikioBackend

        return KvikioBackend(num_threads=num_threads, task_bytes=task_bytes)
    from offload.io.aio import AioBackend

    return AioBackend(num_threads=min(num_threads, 4), task_bytes=task_bytes)
