"""Named points where a crash test may kill this process (``SIGKILL``, no clean-up at all).

``OFFLOAD_TRAIN_FAULT=NAME:N`` kills the process the N-th time execution reaches
``fault_point(NAME)``. Unset (always, outside crash tests), a fault point is one string compare.
Points: ``store.write`` and ``store.read`` (every swap write or read submitted: forward, backward
and optimizer I/O), ``checkpoint.snapshot``, ``checkpoint.written`` and ``checkpoint.renamed``
(the stages of a checkpoint save).
"""

from __future__ import annotations

import os
import signal
import threading

FAULT_ENV = "OFFLOAD_TRAIN_FAULT"


def _parse(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition(":")
    return (name, int(count)) if name and count.isdigit() and int(count) > 0 else ("", 0)


_TARGET, _AT_HIT = _parse(os.environ.get(FAULT_ENV, ""))
_hits = 0
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Kill this process here if ``OFFLOAD_TRAIN_FAULT`` asks for this point and hit count."""
    if name != _TARGET:
        return
    global _hits
    with _lock:
        _hits += 1
        if _hits == _AT_HIT:
            os.kill(os.getpid(), signal.SIGKILL)
