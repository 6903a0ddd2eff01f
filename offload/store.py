"""SwapStore: named flat tensors kept in extents of files under ``nvme_path``.

Layout of a store directory::

    manifest.json   {"version": 1, "checksum_algorithm": "xxh3_64",
                     "extents": {name: {file, offset, nbytes, dtype, shape, checksum}}}
    data-000.bin    extents, each starting on a 4 KiB boundary and padded to 4 KiB
    .lock           flock'ed while a process has the store open

Every write records a checksum (xxh3_64, ``offload.checksum``) of the bytes written; every read
checks it (``verify_reads``), so a flipped or truncated byte becomes a ``CorruptionError`` naming
the tensor and the file, never silent garbage. Extents written by earlier versions carry a
``crc32`` field instead, verified with zlib's CRC32 until they are next written. The manifest is
rewritten atomically (temp file, fsync, rename) by ``flush()`` and ``close()``.

Snapshots (copy-on-write versions): ``snapshot(names)`` freezes the current extents of ``names``
(with their checksums) into a ``Snapshot`` that the caller persists, e.g. in a checkpoint. While
the store holds a snapshot, its extents are never written or handed out again: the next write of
one of those tensors goes to a fresh extent (a hole left by a released snapshot, else the end of
the data file). ``release()`` lets go of one; ``restore()`` reopens the store at one, holding the
others again. A checkpoint then costs an fsync and a small JSON file, not a copy of the tensors.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from offload.checksum import ALGORITHM, FUNCTIONS, LEGACY_ALGORITHM, Checksum
from offload.errors import CorruptionError, NotWritableError, OffloadError, OutOfSpaceError
from offload.faults import fault_point
from offload.freelist import FreeList
from offload.io.base import ALIGN_BYTES, IOBackend, align_up, as_byte_tensor

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_FILE_NAME = "data-000.bin"
MANIFEST_VERSION = 1
SNAPSHOT_VERSION = 1
SPACE_RESERVE_BYTES = 64 << 20
"""Free space left untouched on the filesystem so that manifests and logs can still be written."""


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptionError(f"unknown dtype {name!r} in the swap manifest")
    return dtype


@dataclass(frozen=True)
class Extent:
    """Where one named tensor lives: a byte range of a data file."""

    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def padded_bytes(self) -> int:
        return align_up(self.nbytes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _check_extent(ext: Extent) -> None:
    """Raise ``ValueError`` when a manifest record cannot describe an extent of this store."""
    if ext.file != DATA_FILE_NAME:
        raise ValueError(f"{ext.name!r} lives in unknown file {ext.file!r}")
    if not isinstance(ext.offset, int) or ext.offset < 0 or ext.offset % ALIGN_BYTES:
        raise ValueError(f"{ext.name!r} has offset {ext.offset!r}, not a multiple of {ALIGN_BYTES}")
    if not all(isinstance(d, int) and d >= 0 for d in ext.shape):
        raise ValueError(f"{ext.name!r} has shape {list(ext.shape)!r}")
    try:
        itemsize = torch.empty((), dtype=ext.torch_dtype).element_size()
    except CorruptionError:
        raise ValueError(f"{ext.name!r} has unknown dtype {ext.dtype!r}") from None
    if ext.nbytes != ext.numel * itemsize:
        raise ValueError(f"{ext.name!r} has {ext.nbytes!r} bytes, not {ext.numel} x {ext.dtype}")


def _checksum_field(value: Checksum | None) -> dict[str, int | None]:
    """An extent's checksum as manifests and snapshots hold it: ``checksum`` (the document's
    ``checksum_algorithm``), or ``crc32`` for a value an earlier version wrote."""
    if value is not None and value.algorithm == LEGACY_ALGORITHM:
        return {"crc32": value.value}
    return {"checksum": None if value is None else value.value}


def _doc_algorithm(doc: dict[str, Any]) -> str | None:
    """The ``checksum_algorithm`` of a manifest or snapshot (None in those of earlier versions)."""
    algorithm = doc.get("checksum_algorithm")
    if algorithm is not None and algorithm not in FUNCTIONS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return algorithm


def _parse_checksum(name: str, rec: dict[str, Any], algorithm: str | None) -> Checksum | None:
    """Inverse of ``_checksum_field``; raises ``ValueError``/``KeyError`` when malformed."""
    if "crc32" in rec and "checksum" not in rec:
        algorithm, value = LEGACY_ALGORITHM, rec["crc32"]
    else:
        value = rec["checksum"]
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name!r} has checksum {value!r}")
    if algorithm is None:
        raise ValueError("no checksum_algorithm")
    return Checksum(algorithm, value)


def _check_disjoint(extents: list[Extent]) -> None:
    """Raise ``ValueError`` when two extents share bytes."""
    ordered = sorted((e for e in extents if e.nbytes), key=lambda e: e.offset)
    for prev, nxt in pairwise(ordered):
        if prev.offset + prev.padded_bytes > nxt.offset:
            raise ValueError(f"extents {prev.name!r} and {nxt.name!r} overlap")


@dataclass(frozen=True)
class Snapshot:
    """A frozen set of extents, each with the checksum of its bytes (None: never written): what
    one checkpoint holds."""

    snapshot_id: str
    extents: dict[str, Extent]
    checksums: dict[str, Checksum | None]

    def to_dict(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, "snapshot_id": self.snapshot_id, "checksum_algorithm": ALGORITHM,
                "extents": {n: {**asdict(e), **_checksum_field(self.checksums.get(n))}
                            for n, e in self.extents.items()}}

    @classmethod
    def from_dict(cls, doc: Any, source: str) -> Snapshot:
        """Parse ``to_dict()`` output; anything malformed is a ``CorruptionError`` naming ``source``."""
        try:
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            algorithm = _doc_algorithm(doc)
            extents: dict[str, Extent] = {}
            sums: dict[str, Checksum | None] = {}
            for name, rec in doc["extents"].items():
                ext = Extent(name, rec["file"], rec["offset"], rec["nbytes"], rec["dtype"], tuple(rec["shape"]))
                _check_extent(ext)
                extents[name], sums[name] = ext, _parse_checksum(name, rec, algorithm)
            _check_disjoint(list(extents.values()))
            return cls(str(doc["snapshot_id"]), extents, sums)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptionError(f"{source} is damaged ({err}); resume from another checkpoint") from None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to reserve room for: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SwapStore:
    """Named tensors on an SSD. Open with ``with SwapStore(root, backend) as store:``.

    Thread safety: submit calls may come from any thread; each extent must have at most one
    write in flight, and no read while it is being written (the executor guarantees this).
    """

    def __init__(self, root: str | os.PathLike[str], backend: IOBackend, verify_reads: bool = True,
                 owns_backend: bool = True) -> None:
        self.root = Path(root)
        self.backend = backend
        self.verify_reads = verify_reads
        self.owns_backend = owns_backend  # close() closes the backend too
        self._extents: dict[str, Extent] = {}
        self._sums: dict[str, Checksum | None] = {}  # None: not written yet, or from the GPU
        self._data_handle: int | None = None
        self._data_bytes = 0  # allocated length of the data file
        self._lock_fd: int | None = None
        self._lock = threading.Lock()
        self._alloc_lock = threading.Lock()  # one allocation at a time; taken before ``_lock``
        self._snapshots: dict[str, Snapshot] = {}  # held: their extents are never reused
        self._refs: dict[int, int] = {}  # extent offset -> live names + held snapshots using it
        self._free = FreeList()  # holes of the data file no extent uses
        self._flush_lock = threading.Lock()  # one manifest writer at a time (shared temp file)
        self._in_flight: set[Future] = set()  # futures handed out by write() and read()
        self.read_bytes = 0
        self.write_bytes = 0

    # -- lifetime ---------------------------------------------------------------------------
    def open(self) -> SwapStore:
        if self._lock_fd is not None:
            raise RuntimeError(f"the swap store {self.root} is already open")
        self._check_writable()
        self._take_lock()
        try:
            self._open_locked()
        except BaseException:
            self._release()  # a failed open must not leave the directory locked
            raise
        return self

    def _check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise NotWritableError(
                f"nvme_path {self.root} is a file, not a directory; point offload.nvme_path at a "
                f"directory"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise NotWritableError(
                f"nvme_path {self.root} is not writable ({err.strerror}); choose a directory "
                f"you can write, or fix its permissions"
            ) from None

    def _open_locked(self) -> None:
        self._extents.clear()
        self._sums.clear()
        manifest = self.root / MANIFEST_NAME
        if manifest.exists():
            self._load_manifest(manifest)
        data_path = self.root / DATA_FILE_NAME
        self._data_handle = self.backend.open(str(data_path), create=True)
        self._data_bytes = data_path.stat().st_size
        beyond = [e for e in self._extents.values() if e.offset + e.padded_bytes > self._data_bytes]
        if beyond:
            needed = max(e.offset + e.padded_bytes for e in beyond)
            raise CorruptionError(
                f"swap file {data_path} is truncated: {self._data_bytes} bytes, the manifest needs "
                f"{needed} (tensor {beyond[0].name!r} and {len(beyond) - 1} more are cut off); delete "
                f"{self.root} to start fresh, or restore the file"
            )
        self._snapshots.clear()
        self._refs.clear()
        for ext in self._extents.values():
            self._ref(ext)
        self._rebuild_free()

    def __enter__(self) -> SwapStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for in-flight reads and writes, write the manifest, close the file and unlock."""
        try:
            if self._data_handle is not None:
                self.wait_in_flight()
                self.flush()
        finally:
            self._release()

    def reset(self) -> None:
        """Forget every extent and shrink the data file to nothing: the store as scratch space.

        Waits for in-flight I/O first. The manifest is rewritten at once, so a crash right after
        leaves an empty, consistent store.
        """
        self.wait_in_flight()
        with self._alloc_lock, self._lock:
            self._extents.clear()
            self._sums.clear()
            self._snapshots.clear()
            self._refs.clear()
            self._free.clear()
        self.flush()  # first the empty manifest: a crash before the truncation leaves it valid
        fd = os.open(self.root / DATA_FILE_NAME, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        self._data_bytes = 0

    def wait_in_flight(self) -> None:
        """Block until every read and write submitted so far has finished (failed ones too)."""
        while True:
            with self._lock:
                pending = [f for f in self._in_flight if not f.done()]
            if not pending:
                return
            wait(pending)

    def _release(self) -> None:
        if self._data_handle is not None:
            self.backend.close_file(self._data_handle)
            self._data_handle = None
        if self.owns_backend:
            self.backend.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _take_lock(self) -> None:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OffloadError(
                f"{self.root} is in use by another offload-train process; wait for it to finish "
                f"or give this run another offload.nvme_path"
            ) from None
        self._lock_fd = fd

    # -- manifest ---------------------------------------------------------------------------
    def _load_manifest(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {doc.get('version')}")
            algorithm = _doc_algorithm(doc)
            for name, rec in doc["extents"].items():
                ext = Extent(
                    name, rec["file"], rec["offset"], rec["nbytes"], rec["dtype"], tuple(rec["shape"])
                )
                _check_extent(ext)
                self._sums[name] = _parse_checksum(name, rec, algorithm)
                self._extents[name] = ext
            _check_disjoint(list(self._extents.values()))
        except (ValueError, KeyError, TypeError, AttributeError, CorruptionError) as err:
            raise CorruptionError(
                f"swap manifest {path} is unreadable ({err}); delete {self.root} to start fresh"
            ) from None

    def flush(self) -> None:
        """Write the manifest atomically: temp file, fsync, rename, fsync the directory.

        Checksums of writes still in flight are not in it yet; ``close()`` waits for them first.
        """
        with self._flush_lock:
            with self._lock:
                extents = {
                    name: {**asdict(e), **_checksum_field(self._sums.get(name))}
                    for name, e in self._extents.items()
                }
            doc = {"version": MANIFEST_VERSION, "checksum_algorithm": ALGORITHM, "extents": extents}
            tmp = self.root / (MANIFEST_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / MANIFEST_NAME)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # -- allocation -------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._extents

    def extent(self, name: str) -> Extent:
        try:
            return self._extents[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in the swap store {self.root}") from None

    def names(self) -> list[str]:
        return list(self._extents)

    @property
    def allocated_bytes(self) -> int:
        return self._data_bytes

    def reserve(self, specs: list[TensorSpec]) -> None:
        """Give each new spec an extent: a hole of the data file, else room at its end (the file
        grows once, after a free-space check).

        Specs already present must keep their dtype and shape. Raises ``OutOfSpaceError``
        before touching the disk when the filesystem cannot hold the new extents.
        """
        new = self._new_specs(specs)
        if not new:
            return
        with self._alloc_lock:
            placed: list[tuple[TensorSpec, int]] = []
            at_end: list[TensorSpec] = []
            for spec in new:
                offset = self._free.take(align_up(spec.nbytes)) if spec.nbytes else None
                if offset is None:
                    at_end.append(spec)
                else:
                    placed.append((spec, offset))
            try:
                offset = self._data_bytes
                grow_bytes = sum(align_up(s.nbytes) for s in at_end)
                if grow_bytes:
                    self._check_room(grow_bytes)
                    self._grow_to(offset + grow_bytes)  # raises before any extent is recorded
            except BaseException:
                for spec, hole in placed:
                    self._free.give(hole, align_up(spec.nbytes))
                raise
            for spec in at_end:
                placed.append((spec, offset))
                offset += align_up(spec.nbytes)
            with self._lock:
                for spec, at in placed:
                    ext = Extent(spec.name, DATA_FILE_NAME, at, spec.nbytes, str(spec.dtype), tuple(spec.shape))
                    self._extents[ext.name] = ext
                    self._sums[ext.name] = None
                    self._ref(ext)

    def _check_room(self, nbytes: int) -> None:
        free_bytes = shutil.disk_usage(self.root).free - SPACE_RESERVE_BYTES
        if nbytes > free_bytes:
            raise OutOfSpaceError(str(self.root), nbytes, max(free_bytes, 0))

    def require_room(self, nbytes: int) -> None:
        """Raise ``OutOfSpaceError`` unless ``nbytes`` more could be allocated (holes of the
        data file plus free space on the filesystem), e.g. for the versions checkpoints keep."""
        free_bytes = max(shutil.disk_usage(self.root).free - SPACE_RESERVE_BYTES, 0)
        room = self._free.free_bytes + free_bytes
        if nbytes > room:
            raise OutOfSpaceError(str(self.root), nbytes, room)

    def _allocate(self, nbytes: int) -> int:
        """Offset of ``nbytes`` (a multiple of 4 KiB) no extent uses; caller holds ``_alloc_lock``."""
        offset = self._free.take(nbytes)
        if offset is not None:
            return offset
        offset = self._data_bytes
        self._check_room(nbytes)
        self._grow_to(offset + nbytes)
        return offset

    def _ref(self, ext: Extent) -> None:
        if ext.padded_bytes:
            self._refs[ext.offset] = self._refs.get(ext.offset, 0) + 1

    def _unref(self, ext: Extent) -> None:
        if not ext.padded_bytes:
            return
        left = self._refs[ext.offset] - 1
        if left:
            self._refs[ext.offset] = left
        else:
            del self._refs[ext.offset]
            self._free.give(ext.offset, ext.padded_bytes)

    def _rebuild_free(self) -> None:
        """Holes = the data file minus every extent in use (live or held by a snapshot)."""
        used = {e.offset: e.padded_bytes for e in self._extents.values() if e.padded_bytes}
        for snap in self._snapshots.values():
            used.update((e.offset, e.padded_bytes) for e in snap.extents.values() if e.padded_bytes)
        self._free.clear()
        at = 0
        for offset, nbytes in sorted(used.items()):
            if offset > at:
                self._free.give(at, offset - at)
            at = max(at, offset + nbytes)
        if self._data_bytes > at:
            self._free.give(at, self._data_bytes - at)

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self, names: Iterable[str], snapshot_id: str | None = None) -> Snapshot:
        """Freeze the extents of ``names`` as they are now, once every write has landed and the
        data file is on disk (fsync). Hold it until ``release()``."""
        self.wait_in_flight()
        self._sync_data()
        with self._alloc_lock, self._lock:
            extents = {n: self._extents[n] for n in names if self._known(n)}
            snap = Snapshot(snapshot_id or uuid.uuid4().hex, extents, {n: self._sums.get(n) for n in extents})
            self._hold(snap)
        return snap

    def _known(self, name: str) -> bool:
        if name not in self._extents:
            raise KeyError(f"no tensor named {name!r} in the swap store {self.root}")
        return True

    def _hold(self, snap: Snapshot) -> None:
        if snap.snapshot_id in self._snapshots:
            raise ValueError(f"snapshot {snap.snapshot_id} is already held")
        self._snapshots[snap.snapshot_id] = snap
        for ext in snap.extents.values():
            self._ref(ext)

    def release(self, snapshot_id: str) -> None:
        """Let go of a snapshot: extents no one else uses become free for new versions."""
        with self._alloc_lock, self._lock:
            snap = self._snapshots.pop(snapshot_id, None)
            if snap is not None:
                for ext in snap.extents.values():
                    self._unref(ext)

    @property
    def reusable_bytes(self) -> int:
        """Bytes of the data file no live tensor uses: holes, and extents only snapshots hold
        (free again once those are released)."""
        with self._lock:
            live = {e.offset for e in self._extents.values()}
            held_only = {e.offset: e.padded_bytes for snap in self._snapshots.values()
                         for e in snap.extents.values() if e.offset not in live}
        return self._free.free_bytes + sum(held_only.values())

    def restore(self, snapshot: Snapshot | None, held: Iterable[Snapshot] = ()) -> None:
        """Reopen the store at ``snapshot``: its tensors become the live ones (no other tensor
        stays; none with ``None``), and it and every snapshot in ``held`` are held. Raises
        ``CorruptionError`` naming the tensor and the file when the data file cannot hold an
        extent."""
        self.wait_in_flight()
        keep = {s.snapshot_id: s for s in (*held, *([snapshot] if snapshot else []))}
        used: dict[int, Extent] = {}
        path = self.root / DATA_FILE_NAME
        for snap in keep.values():
            for ext in snap.extents.values():
                if ext.offset + ext.padded_bytes > self._data_bytes:
                    raise CorruptionError(
                        f"swap data for tensor {ext.name!r} in {path} is truncated: the file has "
                        f"{self._data_bytes} bytes, the checkpoint needs {ext.offset + ext.padded_bytes}; "
                        f"restore the file or resume from another checkpoint")
                if ext.padded_bytes and used.setdefault(ext.offset, ext).padded_bytes != ext.padded_bytes:
                    raise CorruptionError(f"checkpoints disagree about the extents of {path} (tensor "
                                          f"{ext.name!r}); resume from one checkpoint only")
        try:
            _check_disjoint(list(used.values()))
        except ValueError as err:
            raise CorruptionError(f"checkpoints disagree about the extents of {path} ({err})") from None
        with self._alloc_lock, self._lock:
            self._snapshots.clear()
            self._refs.clear()
            self._extents = dict(snapshot.extents) if snapshot else {}
            self._sums = dict(snapshot.checksums) if snapshot else {}
            for ext in self._extents.values():
                self._ref(ext)
            for snap in keep.values():
                self._hold(snap)
            self._rebuild_free()
        self.flush()

    def _sync_data(self) -> None:
        fd = os.open(self.root / DATA_FILE_NAME, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _new_specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The specs not in the store yet (each name once); a name seen with another dtype or
        shape, in the store or earlier in ``specs``, raises ``OffloadError``."""
        new: dict[str, TensorSpec] = {}
        for spec in specs:
            old = self._extents.get(spec.name)
            if old is not None:
                self._check_same(spec, old.torch_dtype, old.shape, "holds")
            elif spec.name in new:
                self._check_same(spec, new[spec.name].dtype, new[spec.name].shape, "was asked for")
            else:
                new[spec.name] = spec
        return list(new.values())

    def _check_same(self, spec: TensorSpec, dtype: torch.dtype, shape: tuple[int, ...], how: str) -> None:
        if dtype != spec.dtype or tuple(shape) != tuple(spec.shape):
            raise OffloadError(
                f"swap store {self.root} {how} {spec.name!r} as {dtype}{list(shape)}, "
                f"not {spec.dtype}{list(spec.shape)}: it belongs to another model; use a "
                f"fresh offload.nvme_path"
            )

    def _grow_to(self, n_bytes: int) -> None:
        path = self.root / DATA_FILE_NAME
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, n_bytes)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG):
                os.ftruncate(fd, self._data_bytes)  # give back a partial allocation
                raise self._grow_error(err.errno, n_bytes) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, n_bytes)  # filesystem without fallocate
        finally:
            os.close(fd)
        self._data_bytes = n_bytes

    def _grow_error(self, err_no: int, n_bytes: int) -> OffloadError:
        if err_no == errno.EFBIG:
            return OffloadError(
                f"swap file {self.root / DATA_FILE_NAME} would be {n_bytes} bytes, more than the "
                f"filesystem under {self.root} allows in one file; point offload.nvme_path at "
                f"ext4 or xfs"
            )
        return OutOfSpaceError(
            str(self.root), n_bytes - self._data_bytes, shutil.disk_usage(self.root).free
        )

    # -- data -------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> Future[None]:
        """Start writing ``tensor`` (same numel and byte size as the extent); keep it alive and
        unchanged until the future is done."""
        fault_point("store.write")
        ext = self._writable(self._checked(name, tensor))
        inner = self.backend.submit_write(self._handle(), tensor, ext.offset)
        fut: Future[None] = self._track(Future())
        inner.add_done_callback(lambda f: self._after_write(f, fut, ext, tensor))
        return fut

    def _writable(self, ext: Extent) -> Extent:
        """Where a write of ``ext.name`` goes: its extent, or a fresh one when a held snapshot
        uses it (copy on write; the snapshot keeps the old bytes)."""
        if not ext.padded_bytes:
            return ext
        with self._alloc_lock:
            if self._refs.get(ext.offset, 0) <= 1:
                return ext
            new = replace(ext, offset=self._allocate(ext.padded_bytes))
            with self._lock:
                self._extents[ext.name] = new
                self._sums[ext.name] = None
                self._unref(ext)
                self._ref(new)
        return new

    def read(self, name: str, out: torch.Tensor) -> Future[torch.Tensor]:
        """Start reading extent ``name`` into ``out``; the future returns ``out`` once verified."""
        fault_point("store.read")
        ext = self._checked(name, out)
        inner = self.backend.submit_read(self._handle(), out, ext.offset)
        fut: Future[torch.Tensor] = self._track(Future())
        inner.add_done_callback(lambda f: self._after_read(f, fut, ext, out))
        return fut

    def read_new(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """Read extent ``name`` into a new host tensor of its dtype and shape (blocking)."""
        ext = self.extent(name)
        out = torch.empty(ext.shape, dtype=ext.torch_dtype, pin_memory=pin_memory)
        return self.read(name, out).result()

    def _handle(self) -> int:
        if self._data_handle is None:
            raise RuntimeError("the swap store is not open: use `with SwapStore(...) as store`")
        return self._data_handle

    def _checked(self, name: str, tensor: torch.Tensor) -> Extent:
        ext = self.extent(name)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != ext.nbytes:
            raise ValueError(f"{name!r}: buffer has {nbytes} bytes, the extent {ext.nbytes}")
        return ext

    def _track(self, fut: Future) -> Future:
        """Mark ``fut`` running and count it in flight until it is settled."""
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._in_flight.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._in_flight.discard(fut)

    def _after_write(self, inner: Future[int], fut: Future[None], ext: Extent, t: torch.Tensor) -> None:
        try:
            error = self._write_error(inner, ext, t)
        except BaseException as err:  # noqa: BLE001 - the future must always be settled
            error = err
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _write_error(self, inner: Future[int], ext: Extent, t: torch.Tensor) -> BaseException | None:
        err = inner.exception()
        if err is not None:
            return self._translate(err, ext, "write")
        value = Checksum.of(as_byte_tensor(t)) if t.device.type == "cpu" else None
        with self._lock:
            self._sums[ext.name] = value
            self.write_bytes += ext.nbytes
        return None

    def _after_read(self, inner: Future[int], fut: Future[torch.Tensor], ext: Extent, out: torch.Tensor) -> None:
        try:
            error = self._read_error(inner, ext, out)
        except BaseException as err:  # noqa: BLE001 - the future must always be settled
            error = err
        if error is None:
            fut.set_result(out)
        else:
            fut.set_exception(error)

    def _read_error(self, inner: Future[int], ext: Extent, out: torch.Tensor) -> BaseException | None:
        err = inner.exception()
        if err is not None:
            return self._translate(err, ext, "read")
        with self._lock:
            expected = self._sums.get(ext.name)
            self.read_bytes += ext.nbytes
        if (self.verify_reads and expected is not None and out.device.type == "cpu"
                and not expected.matches(as_byte_tensor(out))):
            return CorruptionError(
                f"swap data for tensor {ext.name!r} in {self.root / ext.file} (offset "
                f"{ext.offset}, {ext.nbytes} bytes) fails its checksum: the file is corrupt; "
                f"resume from the last checkpoint"
            )
        return None

    def _translate(self, err: BaseException, ext: Extent, op: str) -> BaseException:
        path = self.root / ext.file
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return OutOfSpaceError(str(self.root), ext.nbytes, shutil.disk_usage(self.root).free)
        if isinstance(err, EOFError):
            return CorruptionError(f"swap data for tensor {ext.name!r} in {path} is truncated ({err})")
        if isinstance(err, OSError):
            return OffloadError(f"{op} of tensor {ext.name!r} in {path} failed: {err.strerror or err}")
        return err
