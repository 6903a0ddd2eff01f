"""Memory tiers and the byte accounting that enforces their budgets.

DEVICE is GPU memory, or CPU memory when there is no GPU (then budgets are enforced by this
accounting alone, so every placement path runs and is tested on a CPU-only machine). HOST is CPU
RAM (pinned where CUDA exists). NVME is files on an SSD (``offload.store``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from offload.errors import BudgetError, format_bytes


class Tier(str, Enum):
    DEVICE = "device"
    HOST = "host"
    NVME = "nvme"


@dataclass
class LinkCounters:
    """Bytes moved between DEVICE and HOST since the start (NVMe bytes: ``SwapStore`` counters)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0


@dataclass
class Accountant:
    """Tracks bytes held per tier against budgets; thread safe.

    ``alloc`` raises ``BudgetError`` when a tier would go over its budget; ``peak_bytes`` keeps the
    high-water mark per tier (what the metrics report).

    Cached bytes: buffers no longer in use, kept for reuse (``cache``; a later ``uncache`` takes
    them back into use, or gives them up). They count toward no budget check, but memory in use
    and cached together never exceed a budget: an ``alloc`` that would go past it has the
    reclaimers (``add_reclaimer``: each holder of cached buffers registers one) give up cached
    buffers, one reclaimer after the other, until it fits (called outside the lock, from the
    allocating thread, before the caller allocates).
    """

    budgets: dict[Tier, int]
    used_bytes: dict[Tier, int] = field(default_factory=lambda: {t: 0 for t in Tier})
    peak_bytes: dict[Tier, int] = field(default_factory=lambda: {t: 0 for t in Tier})
    cached_bytes: dict[Tier, int] = field(default_factory=lambda: {t: 0 for t in Tier})
    links: LinkCounters = field(default_factory=LinkCounters)
    reclaimers: list[Callable[[Tier, int], None]] = field(default_factory=list)
    """Each gives up cached buffers of a tier until at least this many bytes are freed (or none of
    its own is left)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_reclaimer(self, reclaim: Callable[[Tier, int], None], first: bool = False) -> None:
        """``first``: asked before the reclaimers added earlier (for buffers reused less often)."""
        with self._lock:
            self.reclaimers.insert(0 if first else len(self.reclaimers), reclaim)

    def remove_reclaimer(self, reclaim: Callable[[Tier, int], None]) -> None:
        with self._lock:
            if reclaim in self.reclaimers:
                self.reclaimers.remove(reclaim)

    def fits(self, tier: Tier, nbytes: int) -> bool:
        with self._lock:
            return self.used_bytes[tier] + nbytes <= self.budgets.get(tier, 1 << 62)

    def alloc(self, tier: Tier, nbytes: int, what: str) -> None:
        with self._lock:
            budget = self.budgets.get(tier, 1 << 62)
            if self.used_bytes[tier] + nbytes > budget:
                raise self._over_budget(tier, nbytes, what)
            self.used_bytes[tier] += nbytes
            self.peak_bytes[tier] = max(self.peak_bytes[tier], self.used_bytes[tier])
        with self._lock:
            reclaimers = list(self.reclaimers)
        for reclaim in reclaimers:
            over = self._over_bytes(tier)
            if over <= 0:
                break
            reclaim(tier, over)  # outside the lock: the callback calls ``uncache``

    def _over_bytes(self, tier: Tier) -> int:
        """Bytes in use and cached past the budget of ``tier``."""
        with self._lock:
            return self.used_bytes[tier] + self.cached_bytes[tier] - self.budgets.get(tier, 1 << 62)

    def free(self, tier: Tier, nbytes: int) -> None:
        with self._lock:
            self.used_bytes[tier] -= nbytes

    def cache(self, tier: Tier, nbytes: int) -> None:
        """Bytes in use become cached (kept for reuse)."""
        with self._lock:
            self.used_bytes[tier] -= nbytes
            self.cached_bytes[tier] += nbytes

    def uncache(self, tier: Tier, nbytes: int, reuse: bool, what: str = "a cached buffer") -> None:
        """Cached bytes are taken back into use (``reuse``: counted, and checked, as ``alloc``
        would) or given up."""
        with self._lock:
            self.cached_bytes[tier] -= nbytes
            if reuse:
                budget = self.budgets.get(tier, 1 << 62)
                if self.used_bytes[tier] + nbytes > budget:
                    self.cached_bytes[tier] += nbytes
                    raise self._over_budget(tier, nbytes, what)
                self.used_bytes[tier] += nbytes
                self.peak_bytes[tier] = max(self.peak_bytes[tier], self.used_bytes[tier])

    def _over_budget(self, tier: Tier, nbytes: int, what: str) -> BudgetError:
        budget = self.budgets.get(tier, 1 << 62)
        return BudgetError(f"{what} ({format_bytes(nbytes)}) does not fit the {tier.value} budget of "
                           f"{format_bytes(budget)} ({format_bytes(self.used_bytes[tier])} in use); "
                           f"raise the {tier.value} memory limit or lower the prefetch depth")

    def count(self, link: str, nbytes: int) -> None:
        with self._lock:
            setattr(self.links, link, getattr(self.links, link) + nbytes)
