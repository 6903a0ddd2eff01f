"""Process-wide host memory settings and measurements, and the anonymous memory of I/O buffers.

glibc's malloc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in per-thread
arenas, so a process that streams layer-sized tensors through several threads keeps far more
resident memory than it uses. ``tune_malloc`` fixes the threshold, so large blocks go back to the
OS when freed, and caps the number of arenas. It changes the whole process: the CLI and the
benchmarks call it at start-up; a library user decides for their own process.

``anonymous_buffer`` maps the host buffers that SSD reads and writes go through (O_DIRECT) on
transparent huge pages where the kernel offers them (``madvise``): the kernel then pins and maps a
2 MiB page per I/O where it walked 512 small ones, which halves the CPU time per GB moved and
raises the rate by about a third on this project's development machines (bench/RESULTS.md). It
changes only the buffers it makes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_settings: tuple[int, int] | None = None  # (mmap threshold bytes, arenas) once tuned


def _huge_page_bytes() -> int:
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20  # x86-64's, and arm64's with 4 KiB pages


HUGE_PAGE_BYTES = _huge_page_bytes()
"""The kernel's transparent huge page size (2 MiB on x86-64)."""


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


def anonymous_buffer(n_bytes: int, huge_pages: bool = True) -> torch.Tensor:
    """A uint8 tensor of ``n_bytes`` over fresh anonymous memory of its own (zero pages, resident
    once touched) whose storage starts on a page; from 2 MiB on, on a huge page, advised onto
    transparent huge pages (``MADV_HUGEPAGE``; where the kernel or platform has none: plain pages).
    The mapping lives as long as the tensor's storage. For the alignment one huge page of address
    space more is mapped; it is never touched, so never resident. ``huge_pages=False``: advised
    off them (``MADV_NOHUGEPAGE``: small pages even where the kernel gives huge ones unasked), for
    comparisons (``bench.page_size_io``)."""
    if n_bytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not huge_pages or n_bytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        mapping = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE)
        if not huge_pages and hasattr(mmap, "MADV_NOHUGEPAGE"):
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        return torch.frombuffer(mapping, dtype=torch.uint8)
    mapping = mmap.mmap(-1, n_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE)
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    start = (-base) % HUGE_PAGE_BYTES
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, n_bytes)
    except OSError as err:  # EINVAL: a kernel built without transparent huge pages
        log.debug("no transparent huge pages for I/O buffers: %s", err)
    # the storage starts at the aligned byte (``is_pinned`` and O_DIRECT look at where it starts)
    return torch.frombuffer(mapping, dtype=torch.uint8, offset=start, count=n_bytes)
