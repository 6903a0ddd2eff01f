"""Storage tiers and data movement: swap store, I/O backends, host buffers, CPU AdamW.

Knows nothing of schedules or models (``scheduler`` imports this package, never the reverse).
"""

from offload.buffers import HostArena, Slot
from offload.errors import (
    BudgetError,
    CorruptionError,
    NotWritableError,
    OffloadError,
    OutOfSpaceError,
)
from offload.io import make_backend, select_backend
from offload.optim import AdamWConfig, choose_impl, make_adamw
from offload.store import Extent, SwapStore, TensorSpec

__all__ = [
    "AdamWConfig", "BudgetError", "CorruptionError", "Extent", "HostArena", "NotWritableError",
    "OffloadError", "OutOfSpaceError", "Slot", "SwapStore", "TensorSpec", "choose_impl",
    "make_adamw", "make_backend", "select_backend",
]
