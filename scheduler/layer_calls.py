"""The records a decoder layer's forward leaves for its backward, shared by the activation stores
(``scheduler.activations``): ``LayerCall`` (one layer call of one micro-batch), the memory of
saved activations swapped through the SSD (``SwappedTensor``, ``SwappedView``), and ``LayerCalls``,
the stores' common base (the records by (micro-batch, layer), CUDA's device-to-host stream and
page-locked pool). Threads and sync points: ``scheduler.activations``.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from offload.pinned import PinnedPool
from offload.tiers import Accountant, Tier
from scheduler.placement import (
    Placement,
    SavedOnce,
)
from scheduler.settings import itemsize


@dataclass
class LayerCall:
    """What forward gave layer i, for its backward."""

    args_rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    checkpoint: torch.Tensor | None = None  # recompute, DEVICE/HOST tier: the layer's input
    checkpoint_write: Future[None] | None = None  # recompute, NVME tier
    checkpoint_read: Future[Any] | None = None  # recompute, NVME tier: read ahead in backward
    checkpoint_buf: torch.Tensor | None = None  # ... into this page-aligned host buffer
    checkpoint_host: torch.Tensor | None = None  # CUDA, NVME tier: the pinned copy until its write starts
    d2h_done: Any = None  # CUDA, HOST/NVME tiers: event after the checkpoint's copy to the host
    x_leaf: torch.Tensor | None = None  # kept graph: the layer's input leaf
    output: torch.Tensor | None = None  # kept graph: the layer's output (graph root)
    saved: Any = None  # kept graph: the saved_tensors_hooks context while the layer runs
    saved_bytes: int = 0  # DEVICE bytes of saved activations kept in memory
    swapped: list[SwappedTensor] = field(default_factory=list)  # saved activations on NVME
    swapped_once: SavedOnce = field(default_factory=SavedOnce)  # ... by memory, while the forward runs
    kept_storage: set[int] = field(default_factory=set)  # never swapped (``layer_kept_storages``)
    thread: int = 0  # the thread whose saved_tensors_hooks stack holds ``saved`` (thread-local)

    @property
    def input_bytes(self) -> int:
        """Bytes of the layer's input (what a checkpoint holds)."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class SwappedTensor:
    """The memory of saved activations swapped through the SSD (one or more saves: ``SwappedView``)."""

    name: str  # store extent
    dtype: torch.dtype
    nbytes: int
    buf: torch.Tensor | None = None  # host copy: from saving until the next layer's forward
    # ends (its write done), and from reading back until its layer's backward ends
    write: Future[None] | None = None
    read: Future[Any] | None = None
    on_device: torch.Tensor | None = None  # CUDA: read back to DEVICE once for all its saves,
    # from the first unpack until its layer's backward ends (accounted in DEVICE)
    failed: bool = False  # its write or read failed: its buffer is never reused


@dataclass(frozen=True)
class SwappedView:
    """What autograd keeps for one save: the swapped memory, and the tensor's shape and strides
    over it (its own when it is dense, contiguous ones if it had gaps)."""

    swapped: SwappedTensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class LayerCalls:
    """The records of the layers whose forward ran and whose backward has not."""

    def __init__(self, placement: Placement, store: Any, acct: Accountant, device: torch.device) -> None:
        self.placement = placement
        self.store = store
        self.acct = acct
        self.device = device
        self.calls: dict[tuple[int, int], LayerCall] = {}  # by (micro-batch, layer)
        self._d2h_stream: Any = None  # CUDA: activations leave DEVICE on it, never on the compute stream
        # CUDA: the host buffers activations pass through, page-locked, exact sizes, reused by
        # size and counted in HOST until ``close``
        self._pinned = PinnedPool(acct, Tier.HOST) if device.type == "cuda" else None

    def _record(self, i: int, m: int, x: torch.Tensor, args_rest: tuple[Any, ...],
                kwargs: dict[str, Any]) -> LayerCall:
        call = LayerCall(args_rest, kwargs, torch.get_rng_state(),
                          torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                          shape=tuple(x.shape), dtype=x.dtype)
        self.calls[(m, i)] = call
        return call

    def read_ahead(self, i: int, m: int = 0) -> None:
        """Start bringing the activations of (m, i) back (overlaps the backward before it)."""

    def backward_hold_bytes(self) -> int:
        """DEVICE bytes held in backward beyond what forward left there (the weight streamer's
        prefetch leaves room for them, as for a layer's gradients)."""
        return 0

    def _queue_d2h(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """CUDA: copy ``src`` into host ``dst`` on the d2h stream, after the compute queued so far
        (which writes ``src``); the compute thread does not wait (``_d2h_event`` marks the end)."""
        if self._d2h_stream is None:
            self._d2h_stream = torch.cuda.Stream(src.device)
        self._d2h_stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self._d2h_stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self._d2h_stream)  # compute may free src before the copy has run

    def _d2h_event(self) -> Any:
        """A CUDA event after every copy queued on the d2h stream so far."""
        event = torch.cuda.Event()
        event.record(self._d2h_stream)
        return event

    def close(self) -> None:
        """Unregister the page-locked buffers (after the copies recorded on them)."""
        if self._pinned is not None:
            torch.cuda.synchronize(self.device)  # sync point: no copy may use a buffer unregistered
            self._pinned.close()

    def end_backward(self) -> None:
        """After the last layer's backward."""



def activation_extent(i: int, m: int, rest: str) -> str:
    """The store extent of an activation of layer i, micro-batch m (``rest``: its index, size)."""
    return f"act.{i}.{rest}" if m == 0 else f"act.{i}.m{m}.{rest}"
