"""The swap store's records on disk: extents, snapshots and ``manifest.json``.

Layout of a store directory::

    manifest.json   {"version": 1, "checksum_algorithm": "xxh3_64",
                     "extents": {name: {file, offset, nbytes, dtype, shape, checksum}}}
    data-000.bin    extents, each starting on a 4 KiB boundary and padded to 4 KiB
    .lock           flock'ed while a process has the store open (``offload.store_dir``)

A snapshot record (``Snapshot.to_dict()``, kept by a checkpoint) has the same ``extents`` plus a
``snapshot_id``. Extents written by earlier versions carry a ``crc32`` field instead of
``checksum``: they parse to a ``Checksum("crc32", ...)`` and are written back the same way until
the tensor is next written. Anything malformed is a ``CorruptionError`` naming the file.

Plain functions and frozen records: no locks here (``offload.store`` says who calls in when).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from offload.checksum import ALGORITHM, FUNCTIONS, LEGACY_ALGORITHM, Checksum
from offload.errors import CorruptionError
from offload.io.base import ALIGN_BYTES, align_up

MANIFEST_NAME = "manifest.json"
DATA_FILE_NAME = "data-000.bin"
MANIFEST_VERSION = 1
SNAPSHOT_VERSION = 1


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


def check_disjoint(extents: list[Extent]) -> None:
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
                "extents": _extent_records(self.extents, self.checksums)}

    @classmethod
    def from_dict(cls, doc: Any, source: str) -> Snapshot:
        """Parse ``to_dict()`` output; anything malformed is a ``CorruptionError`` naming ``source``."""
        try:
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            extents, sums = _parse_extents(doc)
            return cls(str(doc["snapshot_id"]), extents, sums)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptionError(f"{source} is damaged ({err}); resume from another checkpoint") from None


def read_manifest(root: Path) -> tuple[dict[str, Extent], dict[str, Checksum | None]]:
    """The extents of the store at ``root`` and their checksums (none without a manifest)."""
    path = root / MANIFEST_NAME
    if not path.exists():
        return {}, {}
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {doc.get('version')}")
        return _parse_extents(doc)
    except (ValueError, KeyError, TypeError, AttributeError, CorruptionError) as err:
        raise CorruptionError(
            f"swap manifest {path} is unreadable ({err}); delete only that file and resume from a checkpoint "
            f"(each keeps its own record of the data), or delete {root} to start over without them"
        ) from None


def manifest_doc(extents: dict[str, Extent], sums: dict[str, Checksum | None]) -> dict[str, Any]:
    """What ``write_manifest`` writes: a copy, so the caller's lock may be let go before."""
    return {"version": MANIFEST_VERSION, "checksum_algorithm": ALGORITHM,
            "extents": _extent_records(extents, sums)}


def write_manifest(root: Path, doc: dict[str, Any]) -> None:
    """Replace ``root``'s manifest atomically: temp file, fsync, rename, fsync the directory.

    The temp file is shared: one writer at a time (the caller's flush lock)."""
    tmp = root / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST_NAME)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _extent_records(extents: dict[str, Extent], sums: dict[str, Checksum | None]) -> dict[str, Any]:
    return {name: {**asdict(e), **_checksum_field(sums.get(name))} for name, e in extents.items()}


def _parse_extents(doc: Any) -> tuple[dict[str, Extent], dict[str, Checksum | None]]:
    """The ``extents`` of a manifest or snapshot document, checked; raises ``ValueError``,
    ``KeyError``, ``TypeError`` or ``AttributeError`` when malformed."""
    algorithm = _doc_algorithm(doc)
    extents: dict[str, Extent] = {}
    sums: dict[str, Checksum | None] = {}
    for name, rec in doc["extents"].items():
        ext = Extent(name, rec["file"], rec["offset"], rec["nbytes"], rec["dtype"], tuple(rec["shape"]))
        _check_extent(ext)
        extents[name], sums[name] = ext, _parse_checksum(name, rec, algorithm)
    check_disjoint(list(extents.values()))
    return extents, sums


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
