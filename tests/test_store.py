"""SwapStore against a real PosixBackend on real files (CPU only)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zlib
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import xxhash

from offload.errors import (
    CorruptionError,
    NotWritableError,
    OffloadError,
    OutOfSpaceError,
    format_bytes,
)
from offload.io.base import ALIGN_BYTES
from offload.io.posix import PosixBackend, aligned_empty
from offload.store import DATA_FILE_NAME, MANIFEST_NAME, SwapStore, TensorSpec

BackendFactory = Callable[..., PosixBackend]

# Odd element counts: for every dtype below the byte size is not a multiple of 4 KiB.
NUMELS = (1, 4095, 4097, 1_000_003)
DTYPES = (torch.float32, torch.bfloat16, torch.uint8, torch.int64)
SMALL_TASK = 64 << 10  # small chunks: one big tensor becomes many requests in flight at once


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs and all) of ``dtype``: every byte is random."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def garbage_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer of ``t``'s dtype and shape filled with 0xA5, so an unfilled read shows."""
    out = torch.empty_like(t)
    out.reshape(-1).view(torch.uint8).fill_(0xA5)
    return out


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), (
        f"{name}: bytes differ after the round trip"
    )


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, t.dtype, tuple(t.shape))


def o_direct_refused(directory: Path) -> bool:
    """Whether the filesystem under ``directory`` refuses open(O_DIRECT)."""
    probe = directory / "o_direct_probe"
    probe.write_bytes(b"\0" * ALIGN_BYTES)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return True
    else:
        os.close(fd)
        return False
    finally:
        probe.unlink()


def write_all(store: SwapStore, tensors: dict[str, torch.Tensor]) -> None:
    futures = [store.write(name, t) for name, t in tensors.items()]
    for fut in futures:
        assert fut.result(timeout=120) is None


def read_all(store: SwapStore, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outs = {name: garbage_like(t) for name, t in tensors.items()}
    futures = {name: store.read(name, outs[name]) for name in tensors}
    return {name: fut.result(timeout=120) for name, fut in futures.items()}


# -- round trips --------------------------------------------------------------------------------
def test_round_trip_odd_sizes_many_in_flight(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    backend = posix_backend_factory(num_threads=4, task_bytes=SMALL_TASK)
    tensors = {
        f"{str(dtype).removeprefix('torch.')}-{n}": random_tensor((n,), dtype, torch_gen)
        for dtype in DTYPES
        for n in NUMELS
    }
    tensors["matrix"] = random_tensor((37, 129), torch.bfloat16, torch_gen)
    names = list(tensors)
    with SwapStore(tmp_path / "swap", backend) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        write_all(store, tensors)
        for name, out in read_all(store, tensors).items():
            assert_same_bits(out, tensors[name], name)

        # Rewrite half of the tensors while the other half is being read: all in flight at once.
        rewritten = {name: random_tensor(tensors[name].shape, tensors[name].dtype, torch_gen)
                     for name in names[::2]}
        kept = {name: tensors[name] for name in names[1::2]}
        outs = {name: garbage_like(t) for name, t in kept.items()}
        writes = [store.write(name, t) for name, t in rewritten.items()]
        reads = {name: store.read(name, outs[name]) for name in kept}
        for fut in writes:
            fut.result(timeout=120)
        for name, fut in reads.items():
            assert_same_bits(fut.result(timeout=120), kept[name], name)

        for name, out in read_all(store, {**rewritten, **kept}).items():
            assert_same_bits(out, {**rewritten, **kept}[name], name)
        expected_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert store.write_bytes >= expected_bytes
        assert store.read_bytes >= expected_bytes


@pytest.mark.parametrize("nbytes", [1, 4095, 4097, 1_000_003])
def test_round_trip_unaligned_host_buffers(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator, nbytes: int
) -> None:
    backend = posix_backend_factory(num_threads=4, task_bytes=SMALL_TASK)
    big_src = random_tensor((nbytes + 64,), torch.uint8, torch_gen)
    src = big_src[1 : 1 + nbytes]  # starts at an odd byte address
    big_dst = torch.zeros(nbytes + 64, dtype=torch.uint8)
    dst = big_dst[3 : 3 + nbytes]
    assert src.data_ptr() % 2 == 1 and dst.data_ptr() % 2 == 1
    # float32 at a 4-byte but not page aligned address
    f32_big = random_tensor((nbytes + 16,), torch.float32, torch_gen)
    f32_src = f32_big[1 : 1 + nbytes]
    assert f32_src.data_ptr() % ALIGN_BYTES != 0
    f32_dst = torch.empty(nbytes + 16, dtype=torch.float32)[5 : 5 + nbytes]

    with SwapStore(tmp_path / "swap", backend) as store:
        store.reserve([spec_of("u8", src), spec_of("f32", f32_src)])
        write_all(store, {"u8": src, "f32": f32_src})
        futures = [store.read("u8", dst), store.read("f32", f32_dst)]
        for fut in futures:
            fut.result(timeout=60)
    assert_same_bits(dst, src, "u8")
    assert_same_bits(f32_dst, f32_src, "f32")
    assert torch.all(big_dst[:3] == 0) and torch.all(big_dst[3 + nbytes :] == 0), (
        "a read wrote outside its destination slice"
    )


def test_extents_are_aligned_and_disjoint(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    backend = posix_backend_factory()
    first = [TensorSpec(f"a{i}", torch.float32, (n,)) for i, n in enumerate(NUMELS)]
    second = [TensorSpec(f"b{i}", dtype, (n,)) for i, (dtype, n) in enumerate(zip(DTYPES, NUMELS, strict=True))]
    second.append(TensorSpec("empty", torch.float32, (0,)))
    with SwapStore(tmp_path / "swap", backend) as store:
        store.reserve(first)
        store.reserve(second)  # the file grows a second time
        extents = sorted((store.extent(name) for name in store.names()), key=lambda e: e.offset)
        assert len(extents) == len(first) + len(second)
        for ext in extents:
            assert ext.offset % ALIGN_BYTES == 0, ext
            assert ext.padded_bytes % ALIGN_BYTES == 0 and ext.padded_bytes >= ext.nbytes, ext
        for prev, nxt in pairwise(extents):
            assert prev.offset + prev.padded_bytes <= nxt.offset, (prev, nxt)
        end = extents[-1].offset + extents[-1].padded_bytes
        assert store.allocated_bytes >= end
        assert (tmp_path / "swap" / DATA_FILE_NAME).stat().st_size >= end


def test_wrong_buffer_size_is_refused(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    with SwapStore(tmp_path / "swap", posix_backend_factory()) as store:
        store.reserve([TensorSpec("w", torch.float32, (10,))])
        with pytest.raises(ValueError, match="'w'"):
            store.write("w", torch.zeros(11, dtype=torch.float32))
        with pytest.raises(ValueError, match="'w'"):
            store.read("w", torch.zeros(9, dtype=torch.float32))
        with pytest.raises(KeyError, match="nope"):
            store.read_new("nope")


# -- persistence ------------------------------------------------------------------------------
def make_model_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "layers.0.weight": random_tensor((33, 65), torch.bfloat16, gen),
        "layers.0.bias": random_tensor((4097,), torch.float32, gen),
        "step": random_tensor((1,), torch.int64, gen),
        "mask": random_tensor((1_000_003,), torch.uint8, gen),
        "empty": random_tensor((0, 7), torch.float32, gen),
    }


def test_reopen_reads_back_bit_identical(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    root = tmp_path / "swap"
    tensors = make_model_tensors(torch_gen)
    with SwapStore(root, posix_backend_factory(task_bytes=SMALL_TASK)) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        write_all(store, tensors)

    doc = json.loads((root / MANIFEST_NAME).read_text())
    assert set(doc["extents"]) == set(tensors) and doc["checksum_algorithm"] == "xxh3_64"
    for name, t in tensors.items():
        rec = doc["extents"][name]
        assert rec["dtype"] == str(t.dtype)
        assert rec["shape"] == list(t.shape)
        assert rec["checksum"] == xxhash.xxh3_64_intdigest(t.reshape(-1).view(torch.uint8).numpy()), name
        assert "crc32" not in rec

    with SwapStore(root, posix_backend_factory(task_bytes=SMALL_TASK)) as store:
        assert sorted(store.names()) == sorted(tensors)
        for name, t in tensors.items():
            assert_same_bits(store.read_new(name), t, name)


def test_close_waits_for_writes_still_in_flight(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    """close() right after submitting (without waiting) must still persist data and checksums."""
    root = tmp_path / "swap"
    tensors = {f"t{i}": random_tensor((1_000_003,), torch.float32, torch_gen) for i in range(8)}
    store = SwapStore(root, posix_backend_factory(num_threads=2, task_bytes=SMALL_TASK)).open()
    store.reserve([spec_of(name, t) for name, t in tensors.items()])
    futures = [store.write(name, t) for name, t in tensors.items()]
    store.close()
    assert all(fut.done() for fut in futures)
    for fut in futures:
        assert fut.exception() is None

    doc = json.loads((root / MANIFEST_NAME).read_text())
    for name, t in tensors.items():
        assert doc["extents"][name]["checksum"] == xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy()), name
    with SwapStore(root, posix_backend_factory()) as store:
        for name, t in tensors.items():
            assert_same_bits(store.read_new(name), t, name)


def test_manifest_write_is_atomic(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    root = tmp_path / "swap"
    tensors = make_model_tensors(torch_gen)
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        store.flush()
        assert json.loads((root / MANIFEST_NAME).read_text())["version"] == 1
        write_all(store, tensors)
    assert not (root / (MANIFEST_NAME + ".tmp")).exists()
    assert sorted(p.name for p in root.iterdir() if "manifest" in p.name) == [MANIFEST_NAME]
    doc = json.loads((root / MANIFEST_NAME).read_text())
    assert doc["version"] == 1 and set(doc["extents"]) == set(tensors)


def test_unreadable_manifest_is_corruption(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    root = tmp_path / "swap"
    root.mkdir()
    (root / MANIFEST_NAME).write_text('{"version": 1, "extents": {"a": {"file": ')
    with pytest.raises(CorruptionError, match=MANIFEST_NAME):
        SwapStore(root, posix_backend_factory()).open()
    # The failed open must not leave the directory locked.
    (root / MANIFEST_NAME).unlink()
    SwapStore(root, posix_backend_factory()).open().close()


# -- corruption -------------------------------------------------------------------------------
def written_store(root: Path, backend: PosixBackend, tensors: dict[str, torch.Tensor]) -> None:
    with SwapStore(root, backend) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        write_all(store, tensors)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_raises_corruption_naming_tensor_and_file(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator, where: str
) -> None:
    root = tmp_path / "swap"
    tensors = {"victim": random_tensor((4097,), torch.float32, torch_gen),
               "bystander": random_tensor((4097,), torch.float32, torch_gen)}
    written_store(root, posix_backend_factory(), tensors)
    with SwapStore(root, posix_backend_factory()) as store:
        ext = store.extent("victim")
    pos = ext.offset + {"first": 0, "middle": ext.nbytes // 2, "last": ext.nbytes - 1}[where]
    data_file = root / DATA_FILE_NAME
    with open(data_file, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))

    with SwapStore(root, posix_backend_factory()) as store:
        with pytest.raises(CorruptionError) as info:
            store.read_new("victim")
        message = str(info.value)
        assert "'victim'" in message and str(data_file) in message
        assert "\n" not in message
        assert_same_bits(store.read_new("bystander"), tensors["bystander"], "bystander")


def as_crc32_manifest(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite the manifest of ``root`` as the CRC32 versions wrote it: no checksum_algorithm,
    each extent's zlib.crc32 under ``crc32`` (null where the tensor was never written)."""
    doc = json.loads((root / MANIFEST_NAME).read_text())
    del doc["checksum_algorithm"]
    for name, rec in doc["extents"].items():
        del rec["checksum"]
        rec["crc32"] = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy()) if name in tensors else None
    (root / MANIFEST_NAME).write_text(json.dumps(doc))


def flip_byte(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))


def test_crc32_manifest_of_earlier_versions_opens_and_verifies(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    root = tmp_path / "swap"
    tensors = {"old": random_tensor((4097,), torch.float32, torch_gen),
               "rewritten": random_tensor((1_000_003,), torch.bfloat16, torch_gen)}
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()] + [TensorSpec("unwritten", torch.uint8, (5,))])
        write_all(store, tensors)
    as_crc32_manifest(root, tensors)

    with SwapStore(root, posix_backend_factory()) as store:
        for name, t in read_all(store, tensors).items():
            assert_same_bits(t, tensors[name], name)
        tensors["rewritten"] = random_tensor((1_000_003,), torch.bfloat16, torch_gen)
        write_all(store, {"rewritten": tensors["rewritten"]})
    # A mixed manifest: the extent written since carries the new checksum, the others their CRC32.
    doc = json.loads((root / MANIFEST_NAME).read_text())
    assert doc["checksum_algorithm"] == "xxh3_64"
    assert doc["extents"]["old"]["crc32"] == zlib.crc32(tensors["old"].view(torch.uint8).numpy())
    assert doc["extents"]["unwritten"]["checksum"] is None  # nothing to verify, in either format
    assert doc["extents"]["rewritten"]["checksum"] == xxhash.xxh3_64_intdigest(
        tensors["rewritten"].view(torch.uint8).numpy())
    with SwapStore(root, posix_backend_factory()) as store:
        for name, t in read_all(store, tensors).items():
            assert_same_bits(t, tensors[name], name)
        old_ext, new_ext = store.extent("old"), store.extent("rewritten")

    data_file = root / DATA_FILE_NAME
    for ext in (old_ext, new_ext):
        flip_byte(data_file, ext.offset + ext.nbytes // 3)
        with SwapStore(root, posix_backend_factory()) as store:
            with pytest.raises(CorruptionError, match="checksum") as info:
                store.read_new(ext.name)
            assert f"{ext.name!r}" in str(info.value) and str(data_file) in str(info.value)
        flip_byte(data_file, ext.offset + ext.nbytes // 3)  # repaired: the next one alone is bad


def test_unknown_checksum_algorithm_is_corruption(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    root = tmp_path / "swap"
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("a", torch.float32, (10,))])
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["checksum_algorithm"] = "md5"
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptionError, match=r"manifest\.json.*'md5'"):
        SwapStore(root, posix_backend_factory()).open()


def test_flipped_byte_passes_without_verification(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    """verify_reads=False really skips the check (so the check above is what catches it)."""
    root = tmp_path / "swap"
    t = random_tensor((100,), torch.uint8, torch_gen)
    written_store(root, posix_backend_factory(), {"t": t})
    with open(root / DATA_FILE_NAME, "r+b") as f:
        f.seek(10)
        f.write(bytes([int(t[10]) ^ 0xFF]))
    with SwapStore(root, posix_backend_factory(), verify_reads=False) as store:
        out = store.read_new("t")
    assert int(out[10]) == int(t[10]) ^ 0xFF


def test_truncated_data_file_fails_at_open_naming_the_file(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    root = tmp_path / "swap"
    tensors = {"a": random_tensor((4097,), torch.float32, torch_gen),
               "b": random_tensor((4097,), torch.float32, torch_gen)}
    written_store(root, posix_backend_factory(), tensors)
    data_file = root / DATA_FILE_NAME
    full_size = data_file.stat().st_size
    os.truncate(data_file, full_size - ALIGN_BYTES - 1)
    for _ in range(2):  # the failed open must release the directory lock
        with pytest.raises(CorruptionError) as info:
            SwapStore(root, posix_backend_factory()).open()
        assert str(data_file) in str(info.value) and "truncated" in str(info.value)


def test_truncation_under_an_open_store_fails_the_read(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    root = tmp_path / "swap"
    tensors = {"a": random_tensor((4096,), torch.float32, torch_gen),
               "b": random_tensor((4096,), torch.float32, torch_gen)}
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        write_all(store, tensors)
        os.truncate(root / DATA_FILE_NAME, store.extent("b").offset)
        with pytest.raises(CorruptionError) as info:
            store.read("b", aligned_empty(4096 * 4).view(torch.float32)).result(timeout=30)
        assert "'b'" in str(info.value) and str(root / DATA_FILE_NAME) in str(info.value)
        assert_same_bits(store.read_new("a"), tensors["a"], "a")


# -- environment failures ---------------------------------------------------------------------
def test_out_of_space_allocates_nothing(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    root = tmp_path / "swap"
    data_file = root / DATA_FILE_NAME
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("small", torch.float32, (1000,))])
        size_before = data_file.stat().st_size
        huge = TensorSpec("huge", torch.uint8, (2**50,))
        with pytest.raises(OutOfSpaceError) as info:
            store.reserve([TensorSpec("also_new", torch.float32, (10,)), huge])
        err = info.value
        assert err.required_bytes >= 2**50
        assert 0 <= err.available_bytes < 2**50
        message = str(err)
        assert format_bytes(err.required_bytes) in message
        assert format_bytes(err.available_bytes) in message
        assert str(root) in message and "\n" not in message
        again = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
        assert isinstance(again, OutOfSpaceError) and str(again) == message
        assert data_file.stat().st_size == size_before
        assert store.allocated_bytes == size_before
        assert "huge" not in store and "also_new" not in store
        assert sorted(store.names()) == ["small"]
    doc = json.loads((root / MANIFEST_NAME).read_text())
    assert list(doc["extents"]) == ["small"]


def test_nvme_path_under_a_regular_file_is_not_writable(
    tmp_path: Path, posix_backend_factory: BackendFactory
) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    for root in (blocker / "sub", blocker):
        with pytest.raises(NotWritableError) as info:
            SwapStore(root, posix_backend_factory()).open()
        assert str(root) in str(info.value) and "\n" not in str(info.value)
    assert blocker.read_bytes() == b"not a directory"


def test_second_store_on_the_same_directory_is_refused(
    tmp_path: Path, posix_backend_factory: BackendFactory
) -> None:
    root = tmp_path / "swap"
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("a", torch.float32, (10,))])
        with pytest.raises(OffloadError, match="in use"):
            SwapStore(root, posix_backend_factory()).open()
        assert store.read_new("a").shape == (10,)  # the first store is unharmed
    SwapStore(root, posix_backend_factory()).open().close()  # free again once closed


def test_reserve_same_name_other_shape_or_dtype_is_refused(
    tmp_path: Path, posix_backend_factory: BackendFactory
) -> None:
    root = tmp_path / "swap"
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("w", torch.float32, (4, 4))])
        allocated = store.allocated_bytes
        store.reserve([TensorSpec("w", torch.float32, (4, 4))])  # same spec: a no-op
        assert store.allocated_bytes == allocated
        with pytest.raises(OffloadError, match="'w'"):
            store.reserve([TensorSpec("w", torch.float32, (16,))])
        with pytest.raises(OffloadError, match="'w'"):
            store.reserve([TensorSpec("w", torch.int32, (4, 4))])
        with pytest.raises(OffloadError, match="'x'"):
            store.reserve([TensorSpec("x", torch.float32, (4,)), TensorSpec("x", torch.float32, (8,))])
        assert "x" not in store and store.allocated_bytes == allocated
        store.reserve([TensorSpec("y", torch.uint8, (5,)), TensorSpec("y", torch.uint8, (5,))])
        assert store.allocated_bytes == allocated + ALIGN_BYTES
    # the check survives a reopen
    with SwapStore(root, posix_backend_factory()) as store, pytest.raises(OffloadError, match="'w'"):
        store.reserve([TensorSpec("w", torch.float32, (2, 8))])


def test_store_refuses_io_when_not_open(tmp_path: Path, posix_backend_factory: BackendFactory) -> None:
    root = tmp_path / "swap"
    store = SwapStore(root, posix_backend_factory()).open()
    store.reserve([TensorSpec("a", torch.uint8, (10,))])
    store.close()
    with pytest.raises(RuntimeError, match="not open"):
        store.write("a", torch.zeros(10, dtype=torch.uint8))


# -- buffered and direct I/O --------------------------------------------------------------------
def round_trip_bytes(root: Path, backend: PosixBackend, gen: torch.Generator) -> int:
    """Write and read back a few tensors (aligned and not); return the bytes moved each way."""
    aligned = aligned_empty(256 << 10)
    aligned.copy_(random_tensor((256 << 10,), torch.uint8, gen))
    tensors = {"aligned": aligned, "odd": random_tensor((4097,), torch.float32, gen),
               "tiny": random_tensor((3,), torch.bfloat16, gen)}
    with SwapStore(root, backend) as store:
        store.reserve([spec_of(name, t) for name, t in tensors.items()])
        write_all(store, tensors)
        for name, out in read_all(store, {"odd": tensors["odd"], "tiny": tensors["tiny"]}).items():
            assert_same_bits(out, tensors[name], name)
        out = store.read("aligned", aligned_empty(256 << 10)).result(timeout=60)
        assert_same_bits(out, aligned, "aligned")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_buffered_backend_round_trip(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    backend = posix_backend_factory(direct=False, task_bytes=SMALL_TASK)
    moved = round_trip_bytes(tmp_path / "swap", backend, torch_gen)
    stats = backend.describe()
    assert stats["buffered_bytes"] == 2 * moved
    assert stats["direct_bytes"] == 0 and stats["bounced_bytes"] == 0


def test_direct_backend_uses_o_direct_where_allowed(
    tmp_path: Path, posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    if o_direct_refused(tmp_path):
        pytest.skip(f"the filesystem under {tmp_path} refuses O_DIRECT")
    backend = posix_backend_factory(direct=True, task_bytes=SMALL_TASK)
    moved = round_trip_bytes(tmp_path / "swap", backend, torch_gen)
    stats = backend.describe()
    assert stats["buffered_bytes"] == 0
    assert stats["direct_bytes"] >= 2 * (256 << 10)  # the aligned buffer went straight through
    assert stats["bounced_bytes"] > 0  # the unaligned ones through the bounce buffer
    assert stats["direct_bytes"] + stats["bounced_bytes"] == 2 * moved


def test_o_direct_refusing_filesystem_falls_back_to_buffered(
    posix_backend_factory: BackendFactory, torch_gen: torch.Generator
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm on this machine")
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        root = Path(tmp)
        if not o_direct_refused(root):
            pytest.skip(f"/dev/shm accepts O_DIRECT on kernel {os.uname().release}")
        backend = posix_backend_factory(direct=True, task_bytes=SMALL_TASK)
        moved = round_trip_bytes(root / "swap", backend, torch_gen)
    stats = backend.describe()
    assert stats["buffered_bytes"] == 2 * moved
    assert stats["direct_bytes"] == 0 and stats["bounced_bytes"] == 0


@pytest.mark.parametrize(
    "field, value",
    [("offset", 100), ("nbytes", 7), ("dtype", "torch.nonsense"), ("file", "../elsewhere.bin")],
)
def test_tampered_manifest_is_corruption(
    tmp_path: Path, posix_backend_factory: BackendFactory, field: str, value: object
) -> None:
    root = tmp_path / "swap"
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("a", torch.float32, (10,)), TensorSpec("b", torch.float32, (10,))])
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["extents"]["a"][field] = value
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptionError, match="'a'"):
        SwapStore(root, posix_backend_factory()).open()


def test_overlapping_extents_in_manifest_are_corruption(
    tmp_path: Path, posix_backend_factory: BackendFactory
) -> None:
    root = tmp_path / "swap"
    with SwapStore(root, posix_backend_factory()) as store:
        store.reserve([TensorSpec("a", torch.float32, (10,)), TensorSpec("b", torch.float32, (10,))])
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["extents"]["b"]["offset"] = doc["extents"]["a"]["offset"]
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptionError, match="overlap"):
        SwapStore(root, posix_backend_factory()).open()
