"""Read the tensors of a ``Snapshot`` straight from a store's data file, checksums verified.

Used where no ``SwapStore`` is open on the directory (``offload-train export``) or where the
snapshot's layout is not the one the running store uses. A held snapshot's extents never change,
so reading them needs no lock.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from offload.errors import CorruptionError, OffloadError
from offload.store import DATA_FILE_NAME, Snapshot


class SnapshotReader:
    """``with SnapshotReader(nvme_path, snapshot) as r: r.read(name, out)``."""

    def __init__(self, root: str | os.PathLike[str], snapshot: Snapshot) -> None:
        self.path = Path(root) / DATA_FILE_NAME
        self.snapshot = snapshot
        self._fd: int | None = None

    def open(self) -> SnapshotReader:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise OffloadError(f"cannot open the swap file {self.path} ({err.strerror}); the checkpoint's "
                               f"tensors live there: restore it, or resume from another checkpoint") from None
        return self

    def __enter__(self) -> SnapshotReader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, CPU, the extent's byte size) with tensor ``name``."""
        if self._fd is None:
            raise RuntimeError("the snapshot reader is not open: use `with SnapshotReader(...)`")
        ext = self.snapshot.extents.get(name)
        if ext is None:
            raise CorruptionError(f"the checkpoint has no tensor {name!r} in {self.path}")
        raw = out.reshape(-1).view(torch.uint8)
        if raw.numel() != ext.nbytes:
            raise ValueError(f"{name!r}: buffer has {raw.numel()} bytes, the extent {ext.nbytes}")
        view = memoryview(raw.numpy())
        done = 0
        while done < ext.nbytes:
            n = os.preadv(self._fd, [view[done:]], ext.offset + done)
            if n == 0:
                raise CorruptionError(f"swap data for tensor {name!r} in {self.path} is truncated: "
                                      f"{done} of {ext.nbytes} bytes at offset {ext.offset}")
            done += n
        expected = self.snapshot.checksums.get(name)
        if expected is not None and not expected.matches(view):
            raise CorruptionError(f"swap data for tensor {name!r} in {self.path} (offset {ext.offset}, "
                                  f"{ext.nbytes} bytes) fails its checksum: the file is corrupt; resume "
                                  f"from another checkpoint")
        return out
