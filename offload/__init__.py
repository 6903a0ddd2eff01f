"""Storage tiers and data movement: swap store, I/O backends, host buffers, CPU AdamW.

Knows nothing of schedules or models (``scheduler`` imports this package, never the reverse).
"""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # what DeepSpeed picks here anyway, named so that its import (ours, or transformers') does not
    # print "Setting accelerator to CPU ... unable to detect it" on every command
    os.environ["DS_ACCELERATOR"] = "cpu"

from offload.buffers import HostArena, Slot  # noqa: E402 - after the variable
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
