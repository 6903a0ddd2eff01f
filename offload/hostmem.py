"""Process-wide host memory settings and measurements.

glibc's malloc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in per-thread
arenas, so a process that streams layer-sized tensors through several threads keeps far more
resident memory than it uses. ``tune_malloc`` fixes the threshold, so large blocks go back to the
OS when freed, and caps the number of arenas. It changes the whole process: the CLI and the
benchmarks call it at start-up; a library user decides for their own process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import psutil

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_settings: tuple[int, int] | None = None  # (mmap threshold bytes, arenas) once tuned


def malloc_settings() -> tuple[int, int] | None:
    """What ``tune_malloc`` set in this process, or None: compute speed depends on it (with a low
    mmap threshold every large tensor is fresh, zero-filled pages), so timings carry it."""
    return _settings


def tune_malloc(mmap_threshold_bytes: int = 1 << 20, arena_max: int = 2) -> bool:
    """Apply the glibc settings above; returns False where glibc is not the allocator."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes))
    ok &= bool(mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold_bytes))
    ok &= bool(mallopt(_M_ARENA_MAX, arena_max))
    global _settings
    _settings = (mmap_threshold_bytes, arena_max) if ok else None
    log.debug("glibc malloc tuned: mmap threshold %d bytes, %d arenas", mmap_threshold_bytes, arena_max)
    return ok


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def available_bytes() -> int:
    """Memory the OS can still give without swapping."""
    return psutil.virtual_memory().available
