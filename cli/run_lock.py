"""The lock on a run folder: one ``train`` per ``train.output_dir`` at a time.

An flock on ``<output_dir>/.run.lock``, taken before anything in the folder is written and held
until the run ends. The kernel drops it when its process dies, so a lock left by a killed run
never blocks the next one (the file stays; it is empty and harmless).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from offload.errors import OffloadError

LOCK_FILE = ".run.lock"


class RunLock:
    """``with RunLock(run_dir):`` the run folder is this process's, or ``OffloadError`` in one line."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OffloadError(f"train.output_dir {self.run_dir}: cannot create it or its lock file "
                               f"({err.strerror or err}); give a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OffloadError(f"{self.run_dir} is in use by another offload-train run; wait for it to finish "
                               f"or give this run another train.output_dir") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
