"""The swap store's directory: checked writable, and locked against other processes.

``DirectoryLock`` holds an exclusive ``flock`` on ``<root>/.lock`` from ``SwapStore.open()`` to
``close()``: a second offload-train process on the same ``nvme_path`` is refused at once instead
of overwriting the first one's extents. The kernel drops the lock when the process dies, so a
killed run never leaves the directory locked. Only the main thread opens and closes a store.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from offload.errors import NotWritableError, OffloadError


def check_writable(root: Path) -> None:
    """Create ``root`` if needed and prove a file can be written there, else ``NotWritableError``."""
    if root.exists() and not root.is_dir():
        raise NotWritableError(
            f"nvme_path {root} is a file, not a directory; point offload.nvme_path at a "
            f"directory"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise NotWritableError(
            f"nvme_path {root} is not writable ({err.strerror}); choose a directory "
            f"you can write, or fix its permissions"
        ) from None


class DirectoryLock:
    """The flock on ``<root>/.lock``: ``acquire()`` or ``OffloadError``, then ``release()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OffloadError(
                f"{self.root} is in use by another offload-train process; wait for it to finish "
                f"or give this run another offload.nvme_path"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
