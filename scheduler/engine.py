"""The Engine protocol: what a training loop drives, whichever engine runs the step.

``StreamingExecutor`` (out of core) and ``ReferenceEngine`` (in memory, for comparison) both
implement it; ``cli.train`` drives either through it alone.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

import torch

from scheduler.model_map import ParamSlot, Unit
from scheduler.settings import StepResult, UpdateState
from scheduler.trace import Tracer

StateExtents = list[tuple[Unit, dict[str, list[tuple[str, int, int]]] | None]]
"""Per unit: kind -> [(store extent, first element, end element)] of its optimizer state, or None
for a unit whose state is in memory (``unit_states`` has it)."""


class Engine(Protocol):
    tracer: Tracer
    """Records the timeline of the steps run between ``tracer.start()`` and ``tracer.stop()``."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, exc_type: object, *exc: object) -> None: ...

    @property
    def units(self) -> tuple[Unit, ...]: ...

    @property
    def optimizer_step(self) -> int:
        """Optimizer steps applied so far (skipped steps not counted)."""
        ...

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult: ...

    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of token losses, target tokens) of a forward in eval mode."""
        ...

    def synchronize(self) -> None:
        """Wait for every pending update (sync point)."""
        ...

    def unit_states(self, names: Collection[str] | None = None
                    ) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each unit's flat (master, exp_avg, exp_avg_sq), one at a time (``names``: these units only)."""
        ...

    def unit_masters(self) -> Iterator[tuple[Unit, torch.Tensor]]: ...

    def unit_weights(self) -> Iterator[tuple[Unit, list[ParamSlot], torch.Tensor]]:
        """Each unit's weights, trainable and frozen, as slots into one flat buffer."""
        ...

    def master_state_dict(self) -> dict[str, torch.Tensor]: ...

    def optimizer_state_extents(self) -> StateExtents | None:
        """Where the optimizer state lives in the swap store; None: in memory (``unit_states``)."""
        ...

    def update_state(self) -> UpdateState:
        """The counters a checkpoint saves (step, fp16 loss scale)."""
        ...

    def metrics(self) -> dict[str, int]: ...
