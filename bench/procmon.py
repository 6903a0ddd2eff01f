"""Peak resident memory and disk bytes of a process tree, sampled from a background thread."""

from __future__ import annotations

import threading
import time

import psutil


class TreeMonitor:
    """Samples RSS summed over ``pid`` and all its descendants every ``interval_s``.

    Disk bytes are /proc/<pid>/io ``read_bytes``/``write_bytes`` (bytes that reached the block
    layer), kept per process at their last sample, so children that exit still count.
    """

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self._io: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        rss = 0
        for proc in self._tree():
            try:
                rss += proc.memory_info().rss
                io = proc.io_counters()
                self._io[proc.pid] = (io.read_bytes, io.write_bytes)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    @property
    def read_bytes(self) -> int:
        return sum(r for r, _ in self._io.values())

    @property
    def write_bytes(self) -> int:
        return sum(w for _, w in self._io.values())

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def own_io_bytes() -> tuple[int, int]:
    """This process's (read_bytes, write_bytes) from /proc/self/io, all its threads included."""
    io = psutil.Process().io_counters()
    return io.read_bytes, io.write_bytes


def own_cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far, all its threads."""
    t = psutil.Process().cpu_times()
    return t.user + t.system
