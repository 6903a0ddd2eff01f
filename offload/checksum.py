"""The per-extent checksum of the swap store: xxh3_64 (python-xxhash), ~5x faster than zlib's CRC32.

``checksum(buffer)`` hashes the bytes of a buffer in place (bytes, a memoryview, a C-contiguous
numpy array or a contiguous CPU tensor of any dtype). Stores and checkpoints written before the
switch carry CRC32 values: ``Checksum("crc32", value)`` still verifies those.

The GIL is released while a large buffer is hashed, so hashing in one call never stalls the other
Python threads (the executor's, the optimizer's). python-xxhash's one-shot functions hold it before
4.0, its streaming ``update()`` releases it in every release since 3.0, hence the streaming object.
Hashing in pieces would only add a GIL hand-over per piece.
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import torch
import xxhash

ALGORITHM = "xxh3_64"
"""What ``checksum()`` computes; manifests and snapshots name it."""
LEGACY_ALGORITHM = "crc32"
"""zlib's CRC32, what stores and checkpoints written by earlier versions carry."""


def _bytes(buffer: Any) -> Any:
    """Something with the buffer protocol over the bytes of ``buffer`` (no copy)."""
    if isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError("checksums need a contiguous CPU tensor")
        return buffer.reshape(-1).view(torch.uint8).numpy()
    return buffer


def checksum(buffer: Any) -> int:
    """xxh3_64 of the bytes of ``buffer``, an unsigned 64-bit int."""
    h = xxhash.xxh3_64()
    h.update(_bytes(buffer))
    return h.intdigest()


def crc32(buffer: Any) -> int:
    """zlib's CRC32 of the bytes of ``buffer`` (the checksum of earlier versions)."""
    return zlib.crc32(_bytes(buffer))


FUNCTIONS = {ALGORITHM: checksum, LEGACY_ALGORITHM: crc32}


class Checksum(NamedTuple):
    """One extent's checksum and the algorithm that produced it."""

    algorithm: str
    value: int

    @classmethod
    def of(cls, buffer: Any) -> Checksum:
        return cls(ALGORITHM, checksum(buffer))

    def matches(self, buffer: Any) -> bool:
        return FUNCTIONS[self.algorithm](buffer) == self.value
