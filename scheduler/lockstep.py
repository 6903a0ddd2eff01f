"""Lockstep: runs the forwards of a step's micro-batches layer by layer, one turn at a time.

Layer-major gradient accumulation runs layer i for every micro-batch while its weights are on
DEVICE, then layer i + 1. The model's own forward (``model(**batch)``: masks, rotary tables,
router recorders, the loss: everything family-specific) stays intact: each micro-batch's forward
runs on a thread of its own, and the layer hooks call ``turn()``, which hands over to the next
micro-batch in the ring and waits until it is this one's turn again. Exactly one thread runs at
any time, so the order of every operation (and of every random draw) is fixed:

    pre_0 .. pre_{M-1} | layer 0: m = 0 .. M-1 | layer 1: m = 0 .. M-1 | ... | layer L-1, head_m

(a micro-batch that finishes its forward, head and loss included, leaves the ring.)

Threads: ``run`` on the caller (it waits for all: a sync point); the tasks on threads named
``micro-batch-m``; ``turn`` and ``index`` on those. An error in one task stops the others at their
next turn (``Aborted``, a BaseException, unwinds their forwards) and is raised by ``run``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any


class Aborted(BaseException):
    """Raised inside a waiting task when another task failed: its forward unwinds."""


class Lockstep:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._local = threading.local()
        self._turn = 0  # the index of the task that may run
        self._finished: list[bool] = []
        self._error: BaseException | None = None

    @property
    def active(self) -> bool:
        """Whether the calling thread is one of ``run``'s tasks."""
        return getattr(self._local, "index", None) is not None

    def index(self) -> int:
        """The calling task's micro-batch index (0 outside ``run``)."""
        return getattr(self._local, "index", None) or 0

    def run(self, tasks: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``tasks`` in turns; returns their results in order, or raises the first error."""
        self._turn, self._finished, self._error = 0, [False] * len(tasks), None
        results: list[Any] = [None] * len(tasks)
        threads = [threading.Thread(target=self._main, args=(m, task, results), name=f"micro-batch-{m}", daemon=True)
                   for m, task in enumerate(tasks)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()  # sync point: every micro-batch's forward has ended
        except BaseException as err:  # (KeyboardInterrupt): stop the tasks before anything is freed
            with self._cond:
                if self._error is None:
                    self._error = err
                self._cond.notify_all()
            for t in threads:
                t.join()  # the running task stops at its next turn
            self._error = None
            raise
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return results

    def turn(self) -> int:
        """From a task: let the next micro-batch run up to here, wait for this one's turn again.
        Returns this task's index."""
        m = self._local.index
        with self._cond:
            self._pass_on(m)
            self._wait_for(m)
        return m

    # ---------------------------------------------------------------- internals
    def _main(self, m: int, task: Callable[[], Any], results: list[Any]) -> None:
        self._local.index = m
        try:
            with self._cond:
                self._wait_for(m)
            results[m] = task()
        except Aborted:
            pass
        except BaseException as err:  # handed to ``run``
            with self._cond:
                if self._error is None:
                    self._error = err
        finally:
            with self._cond:
                self._finished[m] = True
                self._pass_on(m)
            self._local.index = None

    def _pass_on(self, m: int) -> None:
        """Under the lock: the turn goes to the next unfinished task after ``m`` in the ring."""
        n = len(self._finished)
        for step in range(1, n + 1):
            k = (m + step) % n
            if not self._finished[k]:
                self._turn = k
                break
        self._cond.notify_all()

    def _wait_for(self, m: int) -> None:
        """Under the lock: wait until task ``m`` has the turn (or another one failed)."""
        while self._turn != m and self._error is None:
            self._cond.wait()
        if self._error is not None:
            raise Aborted
