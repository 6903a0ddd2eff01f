"""Which bytes of the data file belong to whom: the swap store's extent table, in memory only.

Each live tensor name maps to an ``Extent`` and the checksum of its last write. Snapshots held
for checkpoints pin their extents too: every extent offset carries a reference count (live names
plus held snapshots using it), and an extent whose count drops to zero becomes a hole of the
``FreeList``. A write to an extent that a held snapshot shares must go elsewhere (``shared()``,
then ``move()``): copy on write.

No I/O and no locks of its own: ``SwapStore`` (``offload.store``) takes its locks around every
call, as its module docstring says.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from offload.checksum import Checksum
from offload.errors import OffloadError
from offload.freelist import FreeList
from offload.manifest import DATA_FILE_NAME, Extent, Snapshot


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


class ExtentTable:
    """Live extents and their checksums, held snapshots, reference counts and holes."""

    def __init__(self, root: Path) -> None:
        self.root = root  # named in errors
        self.extents: dict[str, Extent] = {}
        self.sums: dict[str, Checksum | None] = {}  # None: not written yet, or from the GPU
        self.snapshots: dict[str, Snapshot] = {}  # held: their extents are never reused
        self.free = FreeList()  # holes of the data file no extent uses
        self._refs: dict[int, int] = {}  # extent offset -> live names + held snapshots using it

    def get(self, name: str) -> Extent:
        try:
            return self.extents[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in the swap store {self.root}") from None

    def replace(self, extents: dict[str, Extent], sums: dict[str, Checksum | None],
                held: Iterable[Snapshot], data_bytes: int) -> None:
        """Make ``extents`` the live ones and hold ``held`` (nothing else): reference counts and
        the holes of a data file of ``data_bytes`` recomputed."""
        self.extents, self.sums = dict(extents), dict(sums)
        self.snapshots.clear()
        self._refs.clear()
        for ext in self.extents.values():
            self._ref(ext)
        for snap in held:
            self._hold(snap)
        self._rebuild_free(data_bytes)

    def new_specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The specs not in the store yet (each name once); a name seen with another dtype or
        shape, in the store or earlier in ``specs``, raises ``OffloadError``."""
        new: dict[str, TensorSpec] = {}
        for spec in specs:
            old = self.extents.get(spec.name)
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

    def add(self, spec: TensorSpec, offset: int) -> None:
        """Record ``spec`` at ``offset`` (room the caller allocated), not written yet."""
        ext = Extent(spec.name, DATA_FILE_NAME, offset, spec.nbytes, str(spec.dtype), tuple(spec.shape))
        self.extents[ext.name] = ext
        self.sums[ext.name] = None
        self._ref(ext)

    def shared(self, ext: Extent) -> bool:
        """Whether a held snapshot uses ``ext`` too: a write must not land there."""
        return self._refs.get(ext.offset, 0) > 1

    def move(self, ext: Extent, offset: int) -> Extent:
        """Copy on write: ``ext.name`` lives at ``offset`` from now on (not written yet); the
        snapshots keep the old extent."""
        new = replace(ext, offset=offset)
        self.extents[ext.name] = new
        self.sums[ext.name] = None
        self._unref(ext)
        self._ref(new)
        return new

    def snapshot(self, names: Iterable[str], snapshot_id: str | None) -> Snapshot:
        """Freeze the extents of ``names`` with their checksums, and hold them."""
        extents = {n: self.get(n) for n in names}
        snap = Snapshot(snapshot_id or uuid.uuid4().hex, extents, {n: self.sums.get(n) for n in extents})
        self._hold(snap)
        return snap

    def release(self, snapshot_id: str) -> None:
        snap = self.snapshots.pop(snapshot_id, None)
        if snap is not None:
            for ext in snap.extents.values():
                self._unref(ext)

    def reusable_bytes(self) -> int:
        """Holes, plus the extents only snapshots hold."""
        live = {e.offset for e in self.extents.values()}
        held_only = {e.offset: e.padded_bytes for snap in self.snapshots.values()
                     for e in snap.extents.values() if e.offset not in live}
        return self.free.free_bytes + sum(held_only.values())

    def _hold(self, snap: Snapshot) -> None:
        if snap.snapshot_id in self.snapshots:
            raise ValueError(f"snapshot {snap.snapshot_id} is already held")
        self.snapshots[snap.snapshot_id] = snap
        for ext in snap.extents.values():
            self._ref(ext)

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
            self.free.give(ext.offset, ext.padded_bytes)

    def _rebuild_free(self, data_bytes: int) -> None:
        """Holes = the data file minus every extent in use (live or held by a snapshot)."""
        used = {e.offset: e.padded_bytes for e in self.extents.values() if e.padded_bytes}
        for snap in self.snapshots.values():
            used.update((e.offset, e.padded_bytes) for e in snap.extents.values() if e.padded_bytes)
        self.free.clear()
        at = 0
        for offset, nbytes in sorted(used.items()):
            if offset > at:
                self.free.give(at, offset - at)
            at = max(at, offset + nbytes)
        if data_bytes > at:
            self.free.give(at, data_bytes - at)
