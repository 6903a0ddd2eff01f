"""Free byte ranges of a data file: first-fit allocation, neighbours merged on release."""

from __future__ import annotations

import bisect


class FreeList:
    """Sorted, disjoint, merged ``(offset, nbytes)`` ranges that may be handed out again."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._ranges)

    def clear(self) -> None:
        self._ranges.clear()

    def take(self, nbytes: int) -> int | None:
        """The offset of ``nbytes`` taken from the first range that holds them, or ``None``."""
        for k, (offset, size) in enumerate(self._ranges):
            if size >= nbytes:
                if size == nbytes:
                    del self._ranges[k]
                else:
                    self._ranges[k] = (offset + nbytes, size - nbytes)
                return offset
        return None

    def give(self, offset: int, nbytes: int) -> None:
        """Return ``[offset, offset + nbytes)``; it must not overlap a range already free."""
        if nbytes <= 0:
            return
        k = bisect.bisect_left(self._ranges, (offset, 0))
        prev = self._ranges[k - 1] if k > 0 else None
        nxt = self._ranges[k] if k < len(self._ranges) else None
        if (prev is not None and prev[0] + prev[1] > offset) or (nxt is not None and offset + nbytes > nxt[0]):
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) are already free")
        if nxt is not None and offset + nbytes == nxt[0]:
            nbytes += nxt[1]
            del self._ranges[k]
        if prev is not None and prev[0] + prev[1] == offset:
            self._ranges[k - 1] = (prev[0], prev[1] + nbytes)
        else:
            self._ranges.insert(k, (offset, nbytes))

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)
