"""offload.checksum: the store's per-extent checksum (xxh3_64) and the CRC32 of earlier versions."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import xxhash

from offload.checksum import ALGORITHM, LEGACY_ALGORITHM, Checksum, checksum, crc32

SIZES = (0, 1, 3, 4095, 4097, 65_537, 1_000_003)  # odd sizes, below and above 64 KiB


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("n", SIZES)
def test_agrees_with_xxhash_on_odd_sizes(n: int) -> None:
    data = random_bytes(n)
    expected = xxhash.xxh3_64_intdigest(data.tobytes())
    assert checksum(data) == expected
    assert checksum(memoryview(data)) == expected
    assert checksum(data.tobytes()) == expected
    assert checksum(torch.from_numpy(data)) == expected
    assert 0 <= expected < 2**64


def test_agrees_with_xxhash_hashing_in_pieces() -> None:
    data = random_bytes(3_000_001)
    h = xxhash.xxh3_64()
    for start in range(0, data.nbytes, 1 << 20):
        h.update(data[start:start + (1 << 20)])
    assert checksum(data) == h.intdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_tensor_of_any_dtype_is_hashed_as_its_bytes(dtype: torch.dtype) -> None:
    t = torch.from_numpy(random_bytes(8 * 1001)).view(dtype)
    assert checksum(t) == xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy().tobytes())
    assert crc32(t) == zlib.crc32(t.view(torch.uint8).numpy().tobytes())


def test_non_contiguous_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        checksum(torch.zeros(10, 10).t())


@pytest.mark.parametrize("pos", [0, 4096, 65_536, 1_000_002])
def test_flipped_byte_changes_the_checksum(pos: int) -> None:
    data = random_bytes(1_000_003)
    before = checksum(data)
    data[pos] ^= 0x01
    assert checksum(data) != before


def test_checksum_records_its_algorithm_and_verifies() -> None:
    data = random_bytes(70_001)
    value = Checksum.of(data)
    assert value == Checksum(ALGORITHM, checksum(data)) and ALGORITHM == "xxh3_64"
    assert value.matches(data)
    legacy = Checksum(LEGACY_ALGORITHM, zlib.crc32(data))
    assert legacy.matches(data) and LEGACY_ALGORITHM == "crc32"
    data[70_000] ^= 0x80
    assert not value.matches(data) and not legacy.matches(data)
