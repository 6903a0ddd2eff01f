"""Peak rates of this machine, measured in the run: fio at the swap path, and matmul FLOP/s."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from bench.bound import PeakRates
from bench.io_bench import FioJob, run_fio_job


def fio_gbps(root: Path, size_bytes: int, iodepth: int = 32, numjobs: int = 2) -> tuple[float, float, float]:
    """Sequential O_DIRECT (read, write, mixed) GB/s of fio at ``root`` (bench.io_bench's jobs;
    mixed: reading and writing at once, both directions together); the file is deleted
    afterwards. Raises FileNotFoundError when fio is not installed."""
    if shutil.which("fio") is None:
        raise FileNotFoundError("fio is not installed (apt-get install fio)")
    root.mkdir(parents=True, exist_ok=True)
    try:
        write = run_fio_job(root, FioJob("write", iodepth, numjobs), size_bytes)
        read = run_fio_job(root, FioJob("read", iodepth, numjobs), size_bytes)
        mixed = run_fio_job(root, FioJob("rw", iodepth, numjobs), size_bytes)
    finally:
        (root / "fio-seq.bin").unlink(missing_ok=True)
    return read.gbps, write.gbps, mixed.gbps


def matmul_flops_per_s(n: int = 2048, dtype: torch.dtype = torch.float32, min_time_s: float = 2.0,
                       device: str = "cpu") -> float:
    """The best rate of n x n x n matmuls (2·n³ FLOPs each) over ``min_time_s`` of repeats."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = a @ b  # warm-up
    best_s = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        if device != "cpu":
            torch.cuda.synchronize()
        best_s = min(best_s, time.perf_counter() - t0)
    return 2.0 * n**3 / best_s


def measure_rates(root: Path, fio_size_bytes: int, device: str = "cpu") -> PeakRates:
    """fio and matmul rates; without fio the SSD rates are None (said in one line) and the
    run goes on without the SSD bound."""
    try:
        read_gbps, write_gbps, mixed_gbps = fio_gbps(root, fio_size_bytes)
    except FileNotFoundError as err:
        print(f"note: {err}; the report has no SSD bound", flush=True)
        read_gbps = write_gbps = mixed_gbps = None
    return PeakRates(matmul_flops_per_s(device=device), read_gbps, write_gbps, mixed_gbps)
