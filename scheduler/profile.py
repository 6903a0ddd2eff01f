"""Measure this machine: SSD and PCIe bandwidth, CPU AdamW speed, matmul throughput, free memory.

The result is a frozen ``HardwareProfile``, cached as JSON per machine and filesystem of the swap
path (``~/.cache/offload-train/``), refreshed by ``offload-train profile``. The cost model reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from offload.checksum import checksum
from offload.io import make_backend
from offload.io.posix import aligned_empty
from offload.optim import measure_impl
from offload.store import SwapStore, TensorSpec

CACHE_DIR = Path(os.environ.get("OFFLOAD_TRAIN_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload-train")


@dataclass(frozen=True)
class HardwareProfile:
    machine: str
    nvme_path: str
    io_backend: str
    ssd_read_gbps: float
    ssd_write_gbps: float
    h2d_gbps: float | None  # None: no GPU
    d2h_gbps: float | None
    cpu_adam_params_per_s: dict[str, float]
    matmul_tflops: dict[str, float]  # by dtype, on the compute device
    ram_available_bytes: int
    vram_free_bytes: int | None
    disk_free_bytes: int
    measured_at: str
    checksum_gbps: float | None = None
    """The store's checksum (``offload.checksum``, xxh3_64) of host bytes on one core (the store
    checks every byte it moves); None: not measured (a hand-written profile may leave it out),
    checksums then cost nothing."""
    ssd_mixed_gbps: float | None = None
    """The store reading and writing at once, both directions together (10^9 bytes/s): training's
    traffic (the optimizer reads chunk c + 1 while chunk c is written back), which the disk may
    serve slower than its read and write rates alone suggest; None: not measured (a hand-written
    profile may leave it out), reads and writes then take their own rates one after the other."""
    io_compute_s_per_gb: float | None = None
    """Machines without a GPU: seconds of compute lost per GB the store reads or writes at the
    same time (its I/O threads, checksums and copies take turns on the compute's cores, and a
    parallel kernel waits for its slowest thread); None: a GPU computes, or not measured."""
    ssd_beside_compute_gbps: float | None = None
    """Machines without a GPU: the store reading and writing at once as the optimizer worker
    does (4 MiB extents, one chunk's reads in flight while the previous chunk's writes drain)
    while a compute kernel runs on the cores, which the store's threads then wait for; None: a
    GPU computes, or not measured."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        """Raises ValueError naming what is missing or unknown (a hand-written file, an old cache)."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(fields, dict):
            raise ValueError("a profile is a JSON object")
        names = set(cls.__dataclass_fields__)
        optional = {n for n, f in cls.__dataclass_fields__.items() if f.default is not MISSING}
        missing, unknown = sorted(names - optional - set(fields)), sorted(set(fields) - names)
        if missing or unknown:
            raise ValueError(f"missing keys {missing}, unknown keys {unknown}" if unknown else f"missing keys {missing}")
        _check_values(fields)
        return cls(**fields)

    def table(self) -> str:
        gib = 2**30
        rows = [
            ("SSD read / write", f"{self.ssd_read_gbps:.2f} / {self.ssd_write_gbps:.2f} GB/s ({self.io_backend})"),
            ("SSD both at once", "not measured" if self.ssd_mixed_gbps is None
             else f"{self.ssd_mixed_gbps:.2f} GB/s, reads and writes together"),
            ("H2D / D2H", "no GPU" if self.h2d_gbps is None else f"{self.h2d_gbps:.1f} / {self.d2h_gbps:.1f} GB/s"),
            ("CPU AdamW", ", ".join(f"{k} {v / 1e6:.0f} M params/s" for k, v in self.cpu_adam_params_per_s.items())),
            ("matmul", ", ".join(f"{k} {v:.2f} TFLOPS" for k, v in self.matmul_tflops.items())),
            ("checksum", "not measured" if self.checksum_gbps is None else f"{self.checksum_gbps:.1f} GB/s"),
            ("compute lost to I/O", "-" if self.io_compute_s_per_gb is None
             else f"{self.io_compute_s_per_gb:.2f} s per GB moved"),
            ("SSD beside compute", "-" if self.ssd_beside_compute_gbps is None
             else f"{self.ssd_beside_compute_gbps:.2f} GB/s, reads and writes together"),
            ("RAM available", f"{self.ram_available_bytes / gib:.1f} GiB"),
            ("VRAM free", "-" if self.vram_free_bytes is None else f"{self.vram_free_bytes / gib:.1f} GiB"),
            ("disk free", f"{self.disk_free_bytes / gib:.1f} GiB at {self.nvme_path}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _check_values(fields: dict[str, object]) -> None:
    """Rates must be positive numbers, sizes non-negative integers: name the first that is not."""
    for key in ("ssd_read_gbps", "ssd_write_gbps"):
        if not _positive(fields[key]):
            raise ValueError(f"{key} must be a positive number, not {fields[key]!r}")
    for key in ("h2d_gbps", "d2h_gbps", "checksum_gbps", "ssd_mixed_gbps", "ssd_beside_compute_gbps"):
        if fields.get(key) is not None and not _positive(fields[key]):
            raise ValueError(f"{key} must be a positive number or null, not {fields[key]!r}")
    value = fields.get("io_compute_s_per_gb")
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
        raise ValueError(f"io_compute_s_per_gb must be a number >= 0 or null, not {value!r}")
    for key in ("cpu_adam_params_per_s", "matmul_tflops"):
        table = fields[key]
        if not isinstance(table, dict) or not table or not all(_positive(v) for v in table.values()):
            raise ValueError(f"{key} must map names to positive numbers, not {table!r}")
    for key in ("ram_available_bytes", "vram_free_bytes", "disk_free_bytes"):
        value = fields[key]
        if value is None and key == "vram_free_bytes":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a whole number of bytes, not {value!r}")


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a swap directory not created yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


PROFILE_FORMAT = 5
"""2: checksum_gbps measures xxh3_64 (1: CRC32); 3: io_compute_s_per_gb, overwrite rate; 4: the
SSD's mixed rate alone and (CPU only) beside compute; read, write, mixed: medians of rounds; 5: the
store's buffers on transparent huge pages (faster I/O, less CPU per GB than 4 measured)."""


def cache_path(nvme_path: str | Path) -> Path:
    """One cached profile per machine and filesystem: directories on one disk share it."""
    # PROFILE_FORMAT in the key: profiles cached by a version that measured something else (the
    # CRC32 checksum rate, before xxh3) are measured anew, not reused
    key = f"{PROFILE_FORMAT}:{platform.node()}:{os.stat(existing_parent(Path(nvme_path))).st_dev}"
    return CACHE_DIR / f"profile-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def load_or_measure(nvme_path: str | Path, refresh: bool = False, size_bytes: int = 1 << 30,
                    io_backend: str = "auto") -> HardwareProfile:
    path = cache_path(nvme_path)
    if path.exists() and not refresh:
        try:
            return HardwareProfile.from_json(path.read_text())
        except ValueError:
            pass  # written by an older version: measure again
    profile = measure(nvme_path, size_bytes, io_backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
    return profile


def measure(nvme_path: str | Path, size_bytes: int = 1 << 30, io_backend: str = "auto") -> HardwareProfile:
    """Measure this machine. Its random data comes from a random state of its own: the caller's
    (a Trainer seeded before the engine starts) is left as it was."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        return _measure(Path(nvme_path), size_bytes, io_backend)


def _measure(nvme_path: Path, size_bytes: int, io_backend: str) -> HardwareProfile:
    nvme_path = Path(nvme_path)
    nvme_path.mkdir(parents=True, exist_ok=True)
    ssd = _ssd(nvme_path, size_bytes, io_backend)
    h2d = d2h = None
    vram = None
    if torch.cuda.is_available():
        h2d, d2h = _pcie()
        vram = torch.cuda.mem_get_info()[0]
    adam = {}
    for impl in ("torch", "deepspeed"):
        try:
            adam[impl] = measure_impl(impl, numel=16_000_000, repeats=3).params_per_s
        except Exception:  # noqa: BLE001 - an implementation missing here is simply not listed
            continue
    return HardwareProfile(
        machine=f"{platform.machine()}, {psutil.cpu_count()} cpus, "
                f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        nvme_path=str(nvme_path), io_backend=ssd.backend, ssd_read_gbps=ssd.read_gbps, ssd_write_gbps=ssd.write_gbps,
        ssd_mixed_gbps=ssd.mixed_gbps,
        h2d_gbps=h2d, d2h_gbps=d2h, cpu_adam_params_per_s=adam, matmul_tflops=_matmul(),
        checksum_gbps=_checksum(),
        **({} if torch.cuda.is_available() else asdict(_io_interference(nvme_path, io_backend))),
        ram_available_bytes=psutil.virtual_memory().available, vram_free_bytes=vram,
        disk_free_bytes=shutil.disk_usage(nvme_path).free, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


@dataclass(frozen=True)
class SsdRates:
    read_gbps: float
    write_gbps: float
    mixed_gbps: float
    backend: str


def _ssd(root: Path, size_bytes: int, io_backend: str, rounds: int = 3) -> SsdRates:
    """The store's rates (O_DIRECT) over ``size_bytes`` of 64 MiB tensors, the median of
    ``rounds`` (the disk of a shared or virtual machine swings from one second to the next): each
    round overwrites every tensor, reads every tensor, then reads the first half while it writes
    the second (requests interleaved, as the optimizer's reads and write-backs are)."""
    piece = 64 << 20
    n = max(2, size_bytes // piece)
    work = Path(tempfile.mkdtemp(prefix=".profile-", dir=root))
    reads_s, writes_s, mixed_s = [], [], []
    try:
        backend = make_backend(io_backend)
        with SwapStore(work, backend) as store:
            store.reserve([TensorSpec(f"p{i}", torch.uint8, (piece,)) for i in range(n)])
            src = aligned_empty(piece)
            src.random_(0, 255)
            outs = [aligned_empty(piece) for _ in range(min(n, 4))]
            # a first pass lets the filesystem allocate the blocks, untimed: training overwrites
            # extents it reserved (writing fresh blocks measured up to 2x slower on a virtual disk)
            _timed(lambda: [store.write(f"p{i}", src) for i in range(n)], sync=True)
            half = n // 2
            for _ in range(rounds):
                writes_s.append(_timed(lambda: [store.write(f"p{i}", src) for i in range(n)], sync=True))
                reads_s.append(_timed(lambda: [store.read(f"p{i}", outs[i % len(outs)]) for i in range(n)]))
                mixed_s.append(_timed(lambda: [f for i in range(half) for f in (
                    store.read(f"p{i}", outs[i % len(outs)]), store.write(f"p{half + i}", src))], sync=True))
            name = backend.name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = n * piece
    return SsdRates(read_gbps=total / statistics.median(reads_s) / 1e9,
                    write_gbps=total / statistics.median(writes_s) / 1e9,
                    mixed_gbps=2 * half * piece / statistics.median(mixed_s) / 1e9, backend=name)


def _timed(submit: Callable[[], list[Future[Any]]], sync: bool = False) -> float:
    """Seconds to submit requests and see every one done; ``sync``: and written through to the
    device (``os.sync``), so a write's time is the disk's, not a cache's."""
    t0 = time.perf_counter()
    for f in submit():
        f.result()
    if sync:
        os.sync()
    return time.perf_counter() - t0


def _pcie() -> tuple[float, float]:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 * n / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    for _ in range(5):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h = 5 * n / (time.perf_counter() - t0) / 1e9
    return h2d, d2h


def _matmul() -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    out = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        reps = 20 if device == "cuda" else 5
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    return out


def _checksum() -> float:
    """GB/s of the store's checksum (xxh3_64) on one core."""
    data = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8).numpy()
    checksum(data[: 1 << 20])
    t0 = time.perf_counter()
    for _ in range(3):
        checksum(data)
    return 3 * data.nbytes / (time.perf_counter() - t0) / 1e9


_CHUNK_EXTENTS = 3  # extents per direction in one chunk of the profile's I/O (master, exp_avg, exp_avg_sq)


@dataclass(frozen=True)
class IoInterference:
    io_compute_s_per_gb: float
    ssd_beside_compute_gbps: float | None  # None: no byte moved while the kernel ran


def _io_interference(root: Path, io_backend: str, trials: int = 3, work_s: float = 0.5) -> IoInterference:
    """Seconds of CPU compute lost per GB that the store moves alongside, and the rate it moves
    them at meanwhile (medians of ``trials``): compute and I/O sharing the cores slow both.

    A layer-like kernel mix (a 512 x 1024 by 1024 x 2816 matmul and a GELU, the compute's own
    threads) runs for about ``work_s`` alone, then again while one thread keeps the store writing
    and reading 4 MiB extents through ``io_backend`` as the optimizer worker does (checksummed;
    one chunk's reads in flight while the previous chunk's writes drain); the time it
    loses over the bytes moved meanwhile is the cost, those bytes over its time the rate. Separate
    buffers for reads and writes, so every checksum holds."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 2816)

    def work(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.gelu(a @ b)
        return time.perf_counter() - t0

    work(2)  # warm-up
    reps = max(1, int(work_s / max(work(3) / 3, 1e-6)))
    piece, n = 4 << 20, 32
    work_dir = Path(tempfile.mkdtemp(prefix=".profile-io-", dir=root))
    try:
        with SwapStore(work_dir, make_backend(io_backend)) as store:
            store.reserve([TensorSpec(f"p{i}", torch.uint8, (piece,)) for i in range(n)])
            sources = [aligned_empty(piece) for _ in range(4)]
            for buf in sources:
                buf.random_(0, 255)
            targets = [aligned_empty(piece) for _ in range(2 * _CHUNK_EXTENTS)]
            _timed(lambda: [store.write(f"p{i}", sources[i % 4]) for i in range(n)])
            stop = threading.Event()
            moved_bytes = [0]
            odd, even = list(range(1, n, 2)), list(range(0, n, 2))

            def chunk(c: int, names: list[int]) -> list[int]:
                return [names[(c * _CHUNK_EXTENTS + k) % len(names)] for k in range(_CHUNK_EXTENTS)]

            def settle(futs: list[Future[Any]]) -> None:
                for f in futs:
                    f.result()
                    moved_bytes[0] += piece

            def io() -> None:
                """The I/O thread, as the optimizer worker moves a unit's state: chunk c + 1's
                reads (odd extents) in flight while chunk c's writes (even extents) drain."""
                writes: list[list[Future[Any]]] = [[], []]
                reads = [store.read(f"p{i}", targets[k]) for k, i in enumerate(chunk(0, odd))]
                c = 0
                while not stop.is_set():
                    settle(writes[(c + 1) % 2])  # that set's buffers are free again
                    base = (c + 1) % 2 * _CHUNK_EXTENTS
                    next_reads = [store.read(f"p{i}", targets[base + k]) for k, i in enumerate(chunk(c + 1, odd))]
                    settle(reads)
                    writes[c % 2] = [store.write(f"p{i}", sources[k % 4]) for k, i in enumerate(chunk(c, even))]
                    reads, c = next_reads, c + 1
                settle(reads + writes[0] + writes[1])

            def moved_during(run: Callable[[], float]) -> tuple[int, float]:
                """Bytes the I/O thread moved while ``run`` ran, and its seconds."""
                stop.clear()
                moved_bytes[0] = 0
                thread = threading.Thread(target=io, name="profile-io")
                thread.start()
                try:
                    run_s = run()
                    moved = moved_bytes[0]
                finally:
                    stop.set()
                    thread.join()
                return moved, run_s

            costs, rates_gbps = [], []
            for _ in range(trials):
                alone_s = work(reps)
                moved, with_io_s = moved_during(lambda: work(reps))
                if moved:
                    costs.append(max(with_io_s - alone_s, 0.0) / (moved / 1e9))
                    rates_gbps.append(moved / with_io_s / 1e9)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return IoInterference(io_compute_s_per_gb=statistics.median(costs) if costs else 0.0,
                          ssd_beside_compute_gbps=statistics.median(rates_gbps) if rates_gbps else None)
