"""User-facing errors of the storage layer.

Every error here carries a one-line message that says what is wrong and how to fix it; the CLI
prints ``str(err)`` and exits non-zero without a traceback.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of an error raised by a library."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


class OffloadError(RuntimeError):
    """Base class of the errors a user can act on."""


class OutOfSpaceError(OffloadError):
    """The SSD (or the filesystem under ``nvme_path``) cannot hold what was asked."""

    def __init__(self, path: str, required_bytes: int, available_bytes: int) -> None:
        self.path = path
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"not enough space under {path}: need {format_bytes(required_bytes)}, "
            f"only {format_bytes(available_bytes)} free; free up space or point "
            f"offload.nvme_path at a larger disk"
        )

    def __reduce__(self) -> tuple[type[OutOfSpaceError], tuple[str, int, int]]:
        # Exceptions pickle as cls(*args); args here is the message, not the constructor's.
        return (type(self), (self.path, self.required_bytes, self.available_bytes))


class NotWritableError(OffloadError):
    """``nvme_path`` cannot be created or written."""


class CorruptionError(OffloadError):
    """A swap extent failed its checksum or could not be read in full."""


class BudgetError(OffloadError):
    """A request does not fit a memory budget, even when everything else is freed."""


def format_bytes(n_bytes: float) -> str:
    """Human-readable size in binary units, e.g. ``1.50 GiB``."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
