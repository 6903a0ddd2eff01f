"""SwapStore snapshots: copy-on-write versions, release, restore, free space (real files)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

from offload.errors import CorruptionError, OutOfSpaceError
from offload.freelist import FreeList
from offload.io.posix import PosixBackend
from offload.snapshot_reader import SnapshotReader
from offload.store import DATA_FILE_NAME, Snapshot, SwapStore, TensorSpec

NUMEL = 3000  # 12000 bytes: padded to 12 KiB


def open_store(root: Path) -> SwapStore:
    return SwapStore(root, PosixBackend(direct=False))


def filled(value: float) -> torch.Tensor:
    return torch.full((NUMEL,), value)


def test_free_list_merges_neighbours_and_takes_first_fit():
    free = FreeList()
    free.give(8192, 4096)
    free.give(0, 4096)
    free.give(4096, 4096)
    assert free.ranges() == [(0, 12288)]
    assert free.take(4096) == 0
    assert free.take(16384) is None
    assert free.ranges() == [(4096, 8192)]
    with pytest.raises(ValueError, match="already free"):
        free.give(8192, 4096)


def test_write_after_snapshot_goes_to_a_fresh_extent_and_the_snapshot_keeps_its_bytes(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("a", torch.float32, (NUMEL,)), TensorSpec("b", torch.float32, (NUMEL,))])
        store.write("a", filled(1.0)).result()
        store.write("b", filled(2.0)).result()
        size_before = store.allocated_bytes
        snap = store.snapshot(["a"])
        store.write("a", filled(3.0)).result()
        assert store.extent("a").offset != snap.extents["a"].offset
        assert store.allocated_bytes == size_before + 12288  # one new version, no copy of b
        store.write("b", filled(4.0)).result()
        assert store.allocated_bytes == size_before + 12288  # b is not in the snapshot: in place
        assert torch.equal(store.read_new("a"), filled(3.0))
        store.restore(snap)
        assert torch.equal(store.read_new("a"), filled(1.0))
        assert "b" not in store  # only the snapshot's tensors stay live


def test_released_versions_are_reused_so_the_file_stops_growing(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("a", torch.float32, (NUMEL,))])
        store.write("a", filled(0.0)).result()
        kept: list[Snapshot] = []
        sizes = []
        for step in range(1, 8):
            store.write("a", filled(float(step))).result()
            kept.append(store.snapshot(["a"]))
            if len(kept) > 2:  # keep two checkpoints
                store.release(kept.pop(0).snapshot_id)
            sizes.append(store.allocated_bytes)
        assert sizes[-1] == sizes[2] == 3 * 12288  # two held versions + the live one
        store.restore(kept[0], kept)
        assert torch.equal(store.read_new("a"), filled(6.0))


def test_restore_after_reopen_holds_other_snapshots(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("a", torch.float32, (NUMEL,))])
        store.write("a", filled(1.0)).result()
        first = Snapshot.from_dict(store.snapshot(["a"]).to_dict(), "test")
        store.write("a", filled(2.0)).result()
        second = store.snapshot(["a"])
        store.write("a", filled(9.0)).result()  # work after the last checkpoint: lost on restore
    with open_store(tmp_path) as store:
        store.restore(first, [first, second])
        assert torch.equal(store.read_new("a"), filled(1.0))
        store.write("a", filled(5.0)).result()  # must not land on the second snapshot's bytes
        store.restore(second, [first, second])
        assert torch.equal(store.read_new("a"), filled(2.0))


def test_corrupted_snapshot_extent_names_tensor_and_file(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("layer.0.master.0", torch.float32, (NUMEL,))])
        store.write("layer.0.master.0", filled(1.0)).result()
        snap = store.snapshot(["layer.0.master.0"])
    path = tmp_path / DATA_FILE_NAME
    with open(path, "r+b") as f:
        f.seek(snap.extents["layer.0.master.0"].offset + 100)
        f.write(b"\xff")
    with open_store(tmp_path) as store:
        store.restore(snap)
        with pytest.raises(CorruptionError, match=r"'layer\.0\.master\.0'.*data-000\.bin.*checksum"):
            store.read_new("layer.0.master.0")


def test_crc32_snapshot_of_earlier_versions_restores_and_verifies(tmp_path):
    """A checkpoint's swap.json written by the CRC32 versions: no checksum_algorithm, ``crc32``."""
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("layer.0.master.0", torch.float32, (NUMEL,)),
                       TensorSpec("never.written", torch.float32, (NUMEL,))])
        store.write("layer.0.master.0", filled(1.0)).result()
        doc = store.snapshot(["layer.0.master.0", "never.written"]).to_dict()
    assert doc["checksum_algorithm"] == "xxh3_64"
    del doc["checksum_algorithm"]
    for rec in doc["extents"].values():
        del rec["checksum"]
    doc["extents"]["layer.0.master.0"]["crc32"] = zlib.crc32(filled(1.0).view(torch.uint8).numpy())
    doc["extents"]["never.written"]["crc32"] = None
    snap = Snapshot.from_dict(doc, "swap.json")
    with open_store(tmp_path) as store:
        store.restore(snap)
        assert torch.equal(store.read_new("layer.0.master.0"), filled(1.0))
    with SnapshotReader(tmp_path, snap) as reader:
        assert torch.equal(reader.read("layer.0.master.0", torch.empty(NUMEL)), filled(1.0))

    with open(tmp_path / DATA_FILE_NAME, "r+b") as f:
        f.seek(snap.extents["layer.0.master.0"].offset + 100)
        f.write(b"\xff")
    pattern = r"'layer\.0\.master\.0'.*data-000\.bin.*checksum"
    with open_store(tmp_path) as store:
        store.restore(snap)
        with pytest.raises(CorruptionError, match=pattern):
            store.read_new("layer.0.master.0")
    with SnapshotReader(tmp_path, snap) as reader, pytest.raises(CorruptionError, match=pattern):
        reader.read("layer.0.master.0", torch.empty(NUMEL))


def test_snapshot_reader_detects_a_flipped_byte(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("x", torch.float32, (NUMEL,))])
        store.write("x", filled(2.0)).result()
        snap = Snapshot.from_dict(store.snapshot(["x"]).to_dict(), "swap.json")
    with SnapshotReader(tmp_path, snap) as reader:
        assert torch.equal(reader.read("x", torch.empty(NUMEL)), filled(2.0))
    with open(tmp_path / DATA_FILE_NAME, "r+b") as f:
        f.seek(snap.extents["x"].offset + NUMEL * 4 - 1)
        f.write(b"\x00")
    with SnapshotReader(tmp_path, snap) as reader, \
            pytest.raises(CorruptionError, match=r"'x'.*data-000\.bin.*checksum"):
        reader.read("x", torch.empty(NUMEL))


def test_truncated_data_file_fails_restore_naming_tensor_and_file(tmp_path):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("x", torch.float32, (NUMEL,))])
        store.write("x", filled(1.0)).result()
        snap = store.snapshot(["x"])
        store.reset()  # the data file is now empty: the snapshot's bytes are gone
    with open_store(tmp_path) as store, pytest.raises(CorruptionError, match=r"'x'.*data-000\.bin.*truncated"):
        store.restore(snap)


def test_damaged_snapshot_record_is_corruption():
    with pytest.raises(CorruptionError, match="swap.json is damaged"):
        Snapshot.from_dict({"version": 1, "snapshot_id": "s", "extents": {"a": {"offset": 3}}}, "swap.json")


def test_new_version_without_room_is_out_of_space(tmp_path, monkeypatch):
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("a", torch.float32, (NUMEL,))])
        store.write("a", filled(1.0)).result()
        store.snapshot(["a"])
        import shutil

        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0))
        with pytest.raises(OutOfSpaceError, match="not enough space"):
            store.write("a", filled(2.0))
        with pytest.raises(OutOfSpaceError):
            store.require_room(1)
        monkeypatch.undo()
        assert torch.equal(store.read_new("a"), filled(1.0))  # nothing half-done


def test_snapshot_reaches_the_disk(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with open_store(tmp_path) as store:
        store.reserve([TensorSpec("a", torch.float32, (NUMEL,))])
        store.write("a", filled(1.0)).result()
        synced.clear()
        store.snapshot(["a"])
        assert synced  # the data file was fsynced before the snapshot was handed out
