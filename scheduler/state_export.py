"""Reading the trained state back out of a streaming run: master weights, Adam states, frozen
weights and where they live in the store (export, checkpoints, ``final/``). Main thread; every
read first waits for the pending updates (``synchronize``, a sync point) and writes the masters
that live in DEVICE-resident weights into their extents (their updates skip that write)."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

import torch

from scheduler.model_map import ParamSlot, Unit, with_frozen

if TYPE_CHECKING:
    from scheduler.engine import StateExtents
    from scheduler.state_store import StateStore
    from scheduler.weight_streamer import WeightStreamer


class StateExport:
    """The reading half of ``StreamingExecutor`` (a mixin: it reads the executor's pieces)."""

    state: StateStore
    weights: WeightStreamer

    @property
    def units(self) -> tuple[Unit, ...]:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The master weights (state dtype) by qualified parameter name (reads them from their
        tier); frozen parameters as stored (compute dtype), cast to the state dtype."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape).clone()
                for _, slots, flat in self.unit_weights() for s in slots}

    def settle(self) -> None:
        """Wait for every pending update (sync point), then bring the master extents the updates
        left behind their resident weights up to date (``StateStore.stale_masters``)."""
        self.synchronize()
        for u in self.state.stale_masters():
            master = self.weights.resident_master(u.index)
            if master is None:
                raise RuntimeError(f"the master of {u.name} is neither in its extents nor on DEVICE")
            self.state.put_master(u, master)

    def unit_masters(self) -> Iterator[tuple[Unit, torch.Tensor]]:
        """Each unit's flat master weights, one unit in memory at a time (Adam states not read)."""
        self.settle()
        for u in self.units:
            yield u, self.state.read_unit(u, "master")

    def unit_weights(self) -> Iterator[tuple[Unit, list[ParamSlot], torch.Tensor]]:
        """Each unit's weights, trainable (master) and frozen, as slots into one flat of the
        state dtype; one unit in memory at a time."""
        for u, master in self.unit_masters():
            yield u, *with_frozen(u, master, self.weights.frozen_weights(u) if u.frozen else None)

    def unit_states(self, names: Collection[str] | None = None
                    ) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each unit's flat (master, exp_avg, exp_avg_sq), one unit in memory at a time
        (``names``: these units only)."""
        self.settle()
        for u in self.units:
            if names is None or u.name in names:
                yield u, *self.state.unit_state(u)

    def optimizer_state_extents(self) -> StateExtents | None:
        """Where the optimizer states live in the store once every update has landed (``None``:
        in host memory, ``unit_states()`` has them; per unit for units the plan keeps in RAM)."""
        self.settle()
        return self.state.extents()

