"""UnitClock: the one handshake between the optimizer and the weights.

Each unit has one ``updated`` future ("weights ready"): the last optimizer job submitted for it
that updates its weights. The main thread sets it when it submits an update (GradHandoff); the
loader thread and the main thread wait on it before they read or bind the unit's weights, so a
forward never sees weights older than the last update. Jobs that only keep a gradient
("gradients stored") are not on the clock (``GradHandoff``): the next micro-batch's forward does
not wait for them. Sync point: ``wait``.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import torch

from scheduler.state_store import done

NormParts = list[torch.Tensor]
"""Per-chunk float64 sums of squares of a unit's unscaled gradients (deferred mode), else empty."""


class UnitClock:
    def __init__(self, n_units: int) -> None:
        self._updated: list[Future[NormParts]] = [done([]) for _ in range(n_units)]

    def set(self, unit_index: int, updated: Future[NormParts]) -> None:
        """Main thread: the unit's newest job (replaces the previous one, which it follows)."""
        self._updated[unit_index] = updated

    def wait(self, unit_index: int) -> NormParts:
        """Block until the unit's newest job has ended (sync point; raises its error)."""
        return self._updated[unit_index].result()

    def wait_all(self) -> None:
        """Block until every unit's newest job has ended; errors are the worker's to report."""
        wait_quietly(self._updated)


def wait_quietly(futures: Iterable[Future[Any]]) -> None:
    """Block until every future has ended (sync point); their errors are not raised here: the
    optimizer worker reports its first one (``OptimizerWorker.raise_error``). A KeyboardInterrupt
    that arrives while waiting is raised once every future has ended."""
    interrupt: BaseException | None = None
    for fut in futures:
        while True:
            try:
                fut.result()
            except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C in this thread: still wait for
                interrupt = interrupt or exc  # the jobs to end (they use buffers), then raise it
                if not fut.done():
                    continue
            except Exception:  # noqa: S110 - the job's own error: raised by the worker
                pass
            break
    if interrupt is not None:
        raise interrupt
