"""O_DIRECT reads and writes into host buffers on small pages against transparent huge pages.

    python -m bench.page_size_io --path DIR [--rounds 2] [--buffer-mib 64] [--passes 6]

The posix backend moves ``--passes`` x 8 requests of ``--buffer-mib`` through one buffer of each
kind (reused, as the engine reuses its I/O buffers): one on 4 KiB pages (``MADV_NOHUGEPAGE``)
and one from ``offload.hostmem.anonymous_buffer`` (2 MiB aligned, ``MADV_HUGEPAGE``), round by
round in turn. Prints the rate and the process's CPU seconds per GB moved (user + system, all
threads: the kernel's page pinning and the completions run in the I/O threads). The file under
DIR (8 x the buffer) is deleted at the end.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from offload.hostmem import anonymous_buffer
from offload.io.posix import PosixBackend

MIB = 1 << 20
REQUESTS = 8


def _cpu_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def measure(backend: PosixBackend, handle: int, buf: torch.Tensor, write: bool, passes: int) -> dict[str, float]:
    submit = backend.submit_write if write else backend.submit_read
    n_bytes = buf.numel()
    cpu0, sys0 = _cpu_s()
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(REQUESTS):
            submit(handle, buf, i * n_bytes).result()
    wall_s = time.perf_counter() - t0
    cpu1, sys1 = _cpu_s()
    gb = passes * REQUESTS * n_bytes / 1e9
    return {"gbps": gb / wall_s, "cpu_s_per_gb": (cpu1 - cpu0) / gb, "sys_s_per_gb": (sys1 - sys0) / gb}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, required=True, help="a directory on the SSD to measure")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--buffer-mib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=6)
    args = ap.parse_args(argv)
    n_bytes = args.buffer_mib * MIB
    args.path.mkdir(parents=True, exist_ok=True)
    path = args.path / "page-size-io.bin"
    backend = PosixBackend()
    handle = backend.open(str(path), create=True)
    try:
        fill = anonymous_buffer(n_bytes, huge_pages=False).fill_(3)
        for i in range(REQUESTS):
            backend.submit_write(handle, fill, i * n_bytes).result()
        buffers = {"4 KiB pages": anonymous_buffer(n_bytes, huge_pages=False), "huge pages": anonymous_buffer(n_bytes)}
        for buf in buffers.values():
            buf.fill_(1)  # resident before timing
        print(f"{'round':>5}  {'buffer':<12} {'op':<5} {'GB/s':>6} {'CPU s/GB':>9} {'sys s/GB':>9}")
        for r in range(args.rounds):
            for name, buf in buffers.items():
                for write in (False, True):
                    m = measure(backend, handle, buf, write, args.passes)
                    print(f"{r:>5}  {name:<12} {'write' if write else 'read':<5} {m['gbps']:>6.2f} "
                          f"{m['cpu_s_per_gb']:>9.3f} {m['sys_s_per_gb']:>9.3f}")
    finally:
        backend.close_file(handle)
        backend.close()
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
