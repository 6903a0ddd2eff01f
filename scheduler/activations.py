"""ActivationStore: what a decoder layer's forward leaves for its backward, and where it waits.

Two implementations, chosen by ``plan.recompute``, each in its own module (their shared records,
``LayerCall`` and the ``LayerCalls`` base, in ``scheduler.layer_calls``), and ``SelectiveRecompute``
below, which routes each layer to one of them:
- ``RecomputeCheckpoints`` (``scheduler.recompute``): keep the layer's input (DEVICE, HOST or
  NVME) and its RNG state; the layer runs without autograd and is recomputed in backward (dropout
  masks match).
- ``SavedTensors`` (``scheduler.saved_tensors``): keep the layer's autograd graph. Saved weights
  become WeightTokens (re-fetched in backward); saved activations stay on DEVICE, or, with
  ``activations: nvme``, large ones are copied into page-aligned buffers as autograd saves them,
  written after the layer's forward and read back one layer ahead in backward (at most two layers'
  worth in memory); on a GPU each comes back to DEVICE once, at its first unpack, until its layer's
  backward ends.

All are keyed by (micro-batch m, decoder layer i) and driven the same way: ``enter``/``exit``
from the layer's forward hooks, ``replay`` + ``read_ahead`` before its backward, ``release`` after
it, ``drop`` to forget a step's forwards (non-finite loss, error), ``end_backward`` after the last
layer. Micro-batch-major steps use m = 0 only; layer-major steps (``scheduler.lockstep``) keep
every micro-batch's records of a layer until that layer's backward.

Threads: the thread running the forward (the main thread, or the micro-batch thread holding the
turn in a layer-major step: one at a time) for ``enter``/``exit`` and autograd's pack hook;
autograd's unpack hook on the thread running the backward (on a GPU autograd's device thread: it
counts the DEVICE bytes of what it brings back, in the thread-safe Accountant); the main thread
for the rest. Sync points: waits on the SSD writes and reads of checkpoints and
swapped activations (named where they happen).
"""

from __future__ import annotations

from typing import Any

import torch

from scheduler.layer_calls import LayerCall
from scheduler.placement import Placement
from scheduler.recompute import RecomputeCheckpoints
from scheduler.saved_tensors import SavedTensors

__all__ = ["ActivationStore", "RecomputeCheckpoints", "SavedTensors", "SelectiveRecompute"]


class SelectiveRecompute:
    """Selective recompute: the layers ``Placement.recomputes`` names go to a
    ``RecomputeCheckpoints``, the others to a ``SavedTensors`` (kept graphs, swapped)."""

    def __init__(self, placement: Placement, recompute: RecomputeCheckpoints, saved: SavedTensors) -> None:
        self.placement = placement
        self.recompute = recompute
        self.saved = saved

    def _store(self, i: int) -> RecomputeCheckpoints | SavedTensors:
        return self.recompute if self.placement.recomputes(i) else self.saved

    @property
    def calls(self) -> dict[tuple[int, int], LayerCall]:
        return {**self.recompute.calls, **self.saved.calls}

    def enter(self, i: int, x: torch.Tensor, args_rest: tuple[Any, ...], kwargs: dict[str, Any], m: int = 0) -> Any:
        return self._store(i).enter(i, x, args_rest, kwargs, m)

    def exit(self, i: int, output: Any, m: int = 0) -> None:
        self._store(i).exit(i, output, m)

    def replay(self, i: int, m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self._store(i).replay(i, m)

    def backward_hold_bytes(self) -> int:
        return self.recompute.backward_hold_bytes() + self.saved.backward_hold_bytes()

    def read_ahead(self, i: int, m: int = 0) -> None:
        self._store(i).read_ahead(i, m)

    def release(self, i: int, m: int = 0) -> None:
        self._store(i).release(i, m)

    def drop(self) -> None:
        self.recompute.drop()
        self.saved.drop()

    def end_backward(self) -> None:
        self.recompute.end_backward()
        self.saved.end_backward()

    def close(self) -> None:
        self.recompute.close()
        self.saved.close()


ActivationStore = RecomputeCheckpoints | SavedTensors | SelectiveRecompute
