"""SwapStore: named flat tensors kept in extents of files under ``nvme_path``.

A facade over four parts, each in its own module:

- ``offload.manifest``: the records and the on-disk format (``Extent``, ``Snapshot``,
  ``manifest.json`` read, and rewritten atomically by ``flush()`` and ``close()``);
- ``offload.extent_table``: the extent table in memory (live extents and their checksums, held
  snapshots, reference counts, holes, the copy-on-write decision);
- ``offload.data_file``: the data path (``data-000.bin``, growing it, reads and writes through
  the I/O backend with checksums computed and verified in completion callbacks, I/O in flight);
- ``offload.store_dir``: the directory's write check and its ``.lock``.

Every write records a checksum of the bytes written and every read checks it, so a flipped or
truncated byte becomes a ``CorruptionError`` naming the tensor and the file.

Snapshots (copy-on-write versions): ``snapshot(names)`` freezes the current extents of ``names``
(with their checksums) into a ``Snapshot`` that the caller persists, e.g. in a checkpoint. While
the store holds a snapshot, its extents are never written or handed out again: the next write of
one of those tensors goes to a fresh extent (a hole left by a released snapshot, else the end of
the data file). ``release()`` lets go of one; ``restore()`` reopens the store at one, holding the
others again. A checkpoint then costs an fsync and a small JSON file, not a copy of the tensors.

Threads and locks (the rules for all four parts: none has a threading lock of its own)
--------------------------------------------------------------------------------------
Who calls in:

- the main thread: ``open``/``close``, ``reserve``, ``read``/``write`` (initial states, saved
  activations), and at checkpoints, once the executor has synchronized its optimizer worker,
  ``snapshot``, ``release``, ``restore``, ``reset`` and ``flush``;
- the executor's loader thread: ``read`` (weights prefetched for the next layers);
- the executor's optimizer worker thread: ``read`` and ``write`` (gradients, optimizer states,
  new weights), so a copy-on-write allocation may run there, growing the file;
- I/O completion callbacks, on the backend's threads (or inline on the submitting thread when
  the backend has already finished): record or verify a checksum, count bytes, settle a future.

The caller guarantees that each extent has at most one write in flight and no read while it is
being written (the executor's sync points). Only a write of a name moves that name's extent (copy
on write), so ``extent()``, ``in``, ``names()``, ``allocated_bytes`` and the name check of
``reserve`` read without a lock: one dict or attribute read is atomic under the GIL.
``require_room`` and ``reusable_bytes`` read the free list's total without ``_alloc_lock``: an
estimate that a concurrent allocation may make stale at once.

The locks, in the order they are taken:

1. ``.lock`` (``DirectoryLock``, an flock): one process per store directory, from ``open()`` to
   ``close()``.
2. Either ``_alloc_lock`` or ``_flush_lock``, never both.
   ``_alloc_lock``: one change of the layout at a time. Guards the free list and the length of
   the data file (grown under it, ``posix_fallocate`` included), and makes "does a snapshot
   share this extent? then allocate a fresh one" one step. Taken by ``reserve``, ``write``
   (copy on write only), ``snapshot``, ``release``, ``restore`` and ``reset``.
   ``_flush_lock``: one manifest writer at a time (its temp file is shared); ``flush``.
   Neither is held across a wait for I/O in flight: ``snapshot``, ``restore`` and ``reset``
   wait first (sync point: every read and write submitted so far has ended), then lock.
3. ``_lock``, the state lock: taken last, inside either lock above or alone. Guards the extent
   table's maps (extents, checksums, snapshots, reference counts: changed only while holding
   ``_alloc_lock`` too, except the checksum a write callback records), the futures in flight
   and the byte counters. Held for in-memory updates only: never across I/O, a wait, a backend
   submit or ``add_done_callback`` (a callback may run inline and take it; it is not reentrant).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from offload.data_file import SPACE_RESERVE_BYTES, DataFile
from offload.errors import CorruptionError, OutOfSpaceError
from offload.extent_table import ExtentTable, TensorSpec
from offload.faults import fault_point
from offload.io.base import IOBackend, align_up
from offload.manifest import (
    DATA_FILE_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SNAPSHOT_VERSION,
    Extent,
    Snapshot,
    check_disjoint,
    dtype_from_name,
    manifest_doc,
    read_manifest,
    write_manifest,
)
from offload.store_dir import DirectoryLock, check_writable

__all__ = [
    "DATA_FILE_NAME", "MANIFEST_NAME", "MANIFEST_VERSION", "SNAPSHOT_VERSION", "SPACE_RESERVE_BYTES",
    "Extent", "Snapshot", "SwapStore", "TensorSpec", "dtype_from_name",
]


class SwapStore:
    """Named tensors on an SSD. Open with ``with SwapStore(root, backend) as store:``.

    Thread safety: see the module docstring.
    """

    def __init__(self, root: str | os.PathLike[str], backend: IOBackend, verify_reads: bool = True,
                 owns_backend: bool = True) -> None:
        self.root = Path(root)
        self.backend = backend
        self.owns_backend = owns_backend  # close() closes the backend too
        self._alloc_lock = threading.Lock()  # the locks: see the module docstring
        self._flush_lock = threading.Lock()
        self._lock = threading.Lock()  # the state lock, shared with ``_data``
        self._dir_lock = DirectoryLock(self.root)
        self._table = ExtentTable(self.root)
        self._data = DataFile(self.root, backend, verify_reads, self._table, self._lock)

    @property
    def verify_reads(self) -> bool:
        return self._data.verify_reads

    @property
    def read_bytes(self) -> int:
        return self._data.read_bytes

    @property
    def write_bytes(self) -> int:
        return self._data.write_bytes

    # -- lifetime (main thread) -------------------------------------------------------------
    def open(self) -> SwapStore:
        if self._dir_lock.held:
            raise RuntimeError(f"the swap store {self.root} is already open")
        check_writable(self.root)
        self._dir_lock.acquire()
        try:
            self._open_locked()
        except BaseException:
            self._release()  # a failed open must not leave the directory locked
            raise
        return self

    def _open_locked(self) -> None:
        extents, sums = read_manifest(self.root)
        self._data.open()
        data_bytes = self._data.nbytes
        beyond = [e for e in extents.values() if e.offset + e.padded_bytes > data_bytes]
        if beyond:
            needed = max(e.offset + e.padded_bytes for e in beyond)
            raise CorruptionError(
                f"swap file {self._data.path} is truncated: {data_bytes} bytes, the manifest needs "
                f"{needed} (tensor {beyond[0].name!r} and {len(beyond) - 1} more are cut off); delete "
                f"{self.root} to start fresh, or restore the file"
            )
        self._table.replace(extents, sums, (), data_bytes)

    def __enter__(self) -> SwapStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for in-flight reads and writes, write the manifest, close the file and unlock."""
        try:
            if self._data.is_open:
                self.wait_in_flight()
                self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        self._data.close()
        if self.owns_backend:
            self.backend.close()
        self._dir_lock.release()

    def reset(self) -> None:
        """Forget every extent and shrink the data file to nothing: the store as scratch space.

        Waits for in-flight I/O first. The manifest is rewritten at once, so a crash right after
        leaves an empty, consistent store.
        """
        self.wait_in_flight()
        with self._alloc_lock, self._lock:
            self._table.replace({}, {}, (), 0)  # no extents, no holes
        self.flush()  # first the empty manifest: a crash before the truncation leaves it valid
        self._data.truncate()

    def wait_in_flight(self) -> None:
        """Block until every read and write submitted so far has finished (failed ones too)."""
        self._data.wait_in_flight()

    def flush(self) -> None:
        """Write the manifest atomically: temp file, fsync, rename, fsync the directory.

        Checksums of writes still in flight are not in it yet; ``close()`` waits for them first.
        """
        with self._flush_lock:
            with self._lock:
                doc = manifest_doc(self._table.extents, self._table.sums)
            write_manifest(self.root, doc)

    # -- allocation -------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._table.extents

    def extent(self, name: str) -> Extent:
        return self._table.get(name)

    def names(self) -> list[str]:
        return list(self._table.extents)

    @property
    def allocated_bytes(self) -> int:
        return self._data.nbytes

    def reserve(self, specs: list[TensorSpec]) -> None:
        """Give each new spec an extent: a hole of the data file, else room at its end (the file
        grows once, after a free-space check).

        Specs already present must keep their dtype and shape. Raises ``OutOfSpaceError``
        before touching the disk when the filesystem cannot hold the new extents.
        """
        new = self._table.new_specs(specs)
        if not new:
            return
        with self._alloc_lock:
            placed: list[tuple[TensorSpec, int]] = []
            at_end: list[TensorSpec] = []
            for spec in new:
                offset = self._table.free.take(align_up(spec.nbytes)) if spec.nbytes else None
                if offset is None:
                    at_end.append(spec)
                else:
                    placed.append((spec, offset))
            try:
                grow_bytes = sum(align_up(s.nbytes) for s in at_end)
                # raises before any extent is recorded
                offset = self._data.extend(grow_bytes) if grow_bytes else self._data.nbytes
            except BaseException:
                for spec, hole in placed:
                    self._table.free.give(hole, align_up(spec.nbytes))
                raise
            for spec in at_end:
                placed.append((spec, offset))
                offset += align_up(spec.nbytes)
            with self._lock:
                for spec, at in placed:
                    self._table.add(spec, at)

    def require_room(self, nbytes: int) -> None:
        """Raise ``OutOfSpaceError`` unless ``nbytes`` more could be allocated (holes of the
        data file plus free space on the filesystem), e.g. for the versions checkpoints keep."""
        room = self._table.free.free_bytes + self._data.room()
        if nbytes > room:
            raise OutOfSpaceError(str(self.root), nbytes, room)

    def _allocate(self, nbytes: int) -> int:
        """Offset of ``nbytes`` (a multiple of 4 KiB) no extent uses; caller holds ``_alloc_lock``."""
        offset = self._table.free.take(nbytes)
        return self._data.extend(nbytes) if offset is None else offset

    # -- snapshots (main thread, no I/O in flight) ------------------------------------------
    def snapshot(self, names: Iterable[str], snapshot_id: str | None = None) -> Snapshot:
        """Freeze the extents of ``names`` as they are now, once every write has landed and the
        data file is on disk (fsync). Hold it until ``release()``."""
        self.wait_in_flight()  # sync point: every write submitted so far has landed
        self._data.sync()
        with self._alloc_lock, self._lock:
            return self._table.snapshot(names, snapshot_id)

    def release(self, snapshot_id: str) -> None:
        """Let go of a snapshot: extents no one else uses become free for new versions."""
        with self._alloc_lock, self._lock:
            self._table.release(snapshot_id)

    @property
    def reusable_bytes(self) -> int:
        """Bytes of the data file no live tensor uses: holes, and extents only snapshots hold
        (free again once those are released)."""
        with self._lock:
            return self._table.reusable_bytes()

    def restore(self, snapshot: Snapshot | None, held: Iterable[Snapshot] = ()) -> None:
        """Reopen the store at ``snapshot``: its tensors become the live ones (no other tensor
        stays; none with ``None``), and it and every snapshot in ``held`` are held. Raises
        ``CorruptionError`` naming the tensor and the file when the data file cannot hold an
        extent."""
        self.wait_in_flight()
        keep = {s.snapshot_id: s for s in (*held, *([snapshot] if snapshot else []))}
        self._check_restorable(keep.values())
        with self._alloc_lock, self._lock:
            self._table.replace(snapshot.extents if snapshot else {}, snapshot.checksums if snapshot else {},
                                keep.values(), self._data.nbytes)
        self.flush()

    def _check_restorable(self, snapshots: Iterable[Snapshot]) -> None:
        """``CorruptionError`` unless the data file holds every extent of ``snapshots``, and
        extents at one offset agree and others are disjoint."""
        used: dict[int, Extent] = {}
        path, data_bytes = self._data.path, self._data.nbytes
        for snap in snapshots:
            for ext in snap.extents.values():
                if ext.offset + ext.padded_bytes > data_bytes:
                    raise CorruptionError(
                        f"swap data for tensor {ext.name!r} in {path} is truncated: the file has "
                        f"{data_bytes} bytes, the checkpoint needs {ext.offset + ext.padded_bytes}; "
                        f"restore the file or resume from another checkpoint")
                if ext.padded_bytes and used.setdefault(ext.offset, ext).padded_bytes != ext.padded_bytes:
                    raise CorruptionError(f"checkpoints disagree about the extents of {path} (tensor "
                                          f"{ext.name!r}); resume from one checkpoint only")
        try:
            check_disjoint(list(used.values()))
        except ValueError as err:
            raise CorruptionError(f"checkpoints disagree about the extents of {path} ({err})") from None

    # -- data (any thread, see the module docstring) ----------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> Future[None]:
        """Start writing ``tensor`` (same numel and byte size as the extent); keep it alive and
        unchanged until the future is done."""
        fault_point("store.write")
        return self._data.write(self._writable(self._checked(name, tensor)), tensor)

    def _writable(self, ext: Extent) -> Extent:
        """Where a write of ``ext.name`` goes: its extent, or a fresh one when a held snapshot
        uses it (copy on write; the snapshot keeps the old bytes)."""
        if not ext.padded_bytes:
            return ext
        with self._alloc_lock:  # the main thread and the optimizer worker may both be here
            if not self._table.shared(ext):
                return ext
            offset = self._allocate(ext.padded_bytes)
            with self._lock:
                return self._table.move(ext, offset)

    def read(self, name: str, out: torch.Tensor) -> Future[torch.Tensor]:
        """Start reading extent ``name`` into ``out``; the future returns ``out`` once verified."""
        fault_point("store.read")
        return self._data.read(self._checked(name, out), out)

    def read_new(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """Read extent ``name`` into a new host tensor of its dtype and shape (blocking)."""
        ext = self.extent(name)
        out = torch.empty(ext.shape, dtype=ext.torch_dtype, pin_memory=pin_memory)
        return self.read(name, out).result()

    def _checked(self, name: str, tensor: torch.Tensor) -> Extent:
        ext = self.extent(name)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != ext.nbytes:
            raise ValueError(f"{name!r}: buffer has {nbytes} bytes, the extent {ext.nbytes}")
        return ext
