"""SwapStore read/write throughput against fio on the same directory.

    python -m bench.io_bench --path DIR --size-gb 4

For each backend, thread count and request size (tensor size = ``task_bytes``), writes
``--size-gb`` of tensors through a fresh ``SwapStore`` under DIR, drops the page cache, reads
them back (checksum-verified, as in training), and reports from ``describe()`` the share of bytes
that went through O_DIRECT. fio (sequential O_DIRECT, bs=1M, libaio, a few iodepths and job
counts) runs on a file of the same size there. Each of ``--repeats`` rounds runs every case and
fio job once in a shuffled order; the tables keep the best of the rounds, and the summary gives
ours/fio at our best request size, overall and round by round. Host memory: ``--buffer-mib`` of
tensors cycled through, plus the backend's bounce buffers. Everything written is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from offload.io import IOBackend, PosixBackend, aligned_empty
from offload.store import SwapStore, TensorSpec

MIB = 1 << 20
GB = 10**9  # throughput is reported in GB/s (10^9 bytes), as fio's bw_bytes is


@dataclass(frozen=True)
class Case:
    backend: str
    num_threads: int
    request_bytes: int


@dataclass(frozen=True)
class StoreResult:
    backend: str
    num_threads: int
    request_mib: int
    write_gbps: float
    read_gbps: float
    direct_fraction: float  # bytes moved with O_DIRECT / bytes moved
    bounced_fraction: float  # bytes copied through a bounce buffer / bytes moved
    cache_drop: str


@dataclass(frozen=True)
class FioResult:
    rw: str
    iodepth: int
    numjobs: int
    gbps: float


# -- arguments ----------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.io_bench", description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, type=Path, help="directory on the disk to test")
    p.add_argument("--size-gb", type=float, default=4.0, help="GB written and read per case")
    p.add_argument("--backends", default="posix,aio", help="comma list of posix, aio")
    p.add_argument("--threads", type=_int_list, default=[4, 16], help="comma list of num_threads")
    p.add_argument("--request-mib", type=_int_list, default=[1, 2, 4, 8, 16],
                   help="comma list of request sizes (tensor size and task_bytes), MiB")
    p.add_argument("--buffer-mib", type=int, default=256, help="host tensors cycled through, MiB")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of every case and fio job, interleaved; the best of each is kept")
    p.add_argument("--no-verify", action="store_true", help="SwapStore(verify_reads=False)")
    p.add_argument("--fio-iodepths", type=_int_list, default=[16, 32, 64])
    p.add_argument("--fio-numjobs", type=_int_list, default=[1, 2])
    p.add_argument("--no-fio", action="store_true", help="skip fio")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


# -- page cache ---------------------------------------------------------------------------------
def drop_page_cache(data_file: Path) -> str:
    """Drop the page cache (all of it when root, else ``data_file``'s pages); says how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "fadvise"


# -- SwapStore cases ----------------------------------------------------------------------------
def make_io_backend(case: Case) -> IOBackend:
    if case.backend == "posix":
        return PosixBackend(num_threads=case.num_threads, task_bytes=case.request_bytes)
    if case.backend == "aio":
        from offload.io.aio import AioBackend

        return AioBackend(num_threads=case.num_threads, task_bytes=case.request_bytes)
    raise ValueError(f"unknown backend {case.backend!r}; choose posix or aio")


def _ring_buffers(request_bytes: int, buffer_bytes: int, n_tensors: int) -> list[torch.Tensor]:
    """Page-aligned random host tensors, as many as ``buffer_bytes`` holds (at least one)."""
    count = max(1, min(n_tensors, buffer_bytes // request_bytes))
    gen = torch.Generator().manual_seed(1234)
    buffers = []
    for _ in range(count):
        buf = aligned_empty(request_bytes)
        buf.copy_(torch.randint(0, 256, (request_bytes,), dtype=torch.uint8, generator=gen))
        buffers.append(buf)
    return buffers


def _pump(names: list[str], buffers: list[torch.Tensor],
          submit: Callable[[str, torch.Tensor], Future[Any]], stamp: bool) -> float:
    """Submit one request per name, cycling through ``buffers`` (each slot waits for its
    previous request); returns the seconds until the last completes."""
    pending: list[Future[Any] | None] = [None] * len(buffers)
    start_s = time.perf_counter()
    for i, name in enumerate(names):
        slot = i % len(buffers)
        previous = pending[slot]
        if previous is not None:
            previous.result()
        if stamp:  # every tensor written differs from the others
            buffers[slot].view(torch.int64)[0] = i
        pending[slot] = submit(name, buffers[slot])
    for fut in pending:
        if fut is not None:
            fut.result()
    return time.perf_counter() - start_s


def _moved_fractions(info: dict[str, object]) -> tuple[float, float]:
    direct, bounced, buffered = (int(str(info.get(k, 0)))
                                 for k in ("direct_bytes", "bounced_bytes", "buffered_bytes"))
    total = max(direct + bounced + buffered, 1)
    return (direct + bounced) / total, bounced / total


def run_store_case(root: Path, case: Case, total_bytes: int, buffer_bytes: int,
                   verify_reads: bool) -> StoreResult:
    """Write then read ``total_bytes`` of ``case.request_bytes`` tensors through a SwapStore."""
    n_tensors = max(1, total_bytes // case.request_bytes)
    moved_bytes = n_tensors * case.request_bytes
    names = [f"t{i:06d}" for i in range(n_tensors)]
    buffers = _ring_buffers(case.request_bytes, buffer_bytes, n_tensors)
    store_dir = root / f"store-{case.backend}-t{case.num_threads}-{case.request_bytes // MIB}m"
    backend = make_io_backend(case)
    try:
        with SwapStore(store_dir, backend, verify_reads=verify_reads) as store:
            store.reserve([TensorSpec(n, torch.uint8, (case.request_bytes,)) for n in names])
            write_s = _pump(names, buffers, store.write, stamp=True)
            store.flush()
            cache_drop = drop_page_cache(store_dir / "data-000.bin")
            read_s = _pump(names, buffers, store.read, stamp=False)
        direct_fraction, bounced_fraction = _moved_fractions(backend.describe())
    finally:
        backend.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return StoreResult(case.backend, case.num_threads, case.request_bytes // MIB,
                       moved_bytes / write_s / GB, moved_bytes / read_s / GB,
                       direct_fraction, bounced_fraction, cache_drop)


def best_of(results: list[StoreResult]) -> StoreResult:
    """One result per case: the best write and the best read of its repeats."""
    first = results[0]
    return StoreResult(first.backend, first.num_threads, first.request_mib,
                       max(r.write_gbps for r in results), max(r.read_gbps for r in results),
                       min(r.direct_fraction for r in results), max(r.bounced_fraction for r in results),
                       first.cache_drop)


# -- fio ------------------------------------------------------------------------------------------
def run_fio(data_file: Path, rw: str, size_bytes: int, iodepth: int, numjobs: int) -> FioResult:
    """One sequential O_DIRECT fio job group over ``data_file``; its aggregate GB/s."""
    per_job_bytes = size_bytes // numjobs // MIB * MIB
    cmd = ["fio", f"--name=seq{rw}", f"--filename={data_file}", f"--rw={rw}", "--bs=1M",
           "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}", f"--numjobs={numjobs}",
           f"--size={per_job_bytes}", f"--offset_increment={per_job_bytes}", "--group_reporting",
           "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    doc = json.loads(out[out.index("{"):])  # fio may print notes before the JSON
    job = doc["jobs"][0]
    # rw: reads and writes at once (half each): both directions together
    bw_bytes = job["read"]["bw_bytes"] + job["write"]["bw_bytes"] if rw == "rw" else job[rw]["bw_bytes"]
    return FioResult(rw, iodepth, numjobs, bw_bytes / GB)


@dataclass(frozen=True)
class FioJob:
    rw: str
    iodepth: int
    numjobs: int


def run_fio_job(root: Path, job: FioJob, size_bytes: int) -> FioResult:
    """A write goes to a fresh file (as the store writes fresh extents); a read, or a mixed job
    (``rw``: reads and writes at once, overwriting in place), uses the file the last write left,
    written first (untimed) when there is none."""
    data_file = root / "fio-seq.bin"
    if job.rw == "write":
        data_file.unlink(missing_ok=True)
    elif not data_file.exists():
        run_fio(data_file, "write", size_bytes, iodepth=32, numjobs=1)
    if job.rw in ("read", "rw"):
        drop_page_cache(data_file)
    r = run_fio(data_file, job.rw, size_bytes, job.iodepth, job.numjobs)
    print(f"  fio {r.rw} iodepth={r.iodepth} numjobs={r.numjobs}: {r.gbps:.2f} GB/s", flush=True)
    return r


# -- report ---------------------------------------------------------------------------------------
def print_store_table(results: list[StoreResult]) -> None:
    print(f"{'backend':<8}{'threads':>8}{'req MiB':>9}{'write GB/s':>12}{'read GB/s':>11}"
          f"{'O_DIRECT':>10}{'bounced':>9}")
    for r in results:
        print(f"{r.backend:<8}{r.num_threads:>8}{r.request_mib:>9}{r.write_gbps:>12.2f}"
              f"{r.read_gbps:>11.2f}{r.direct_fraction:>10.0%}{r.bounced_fraction:>9.0%}")


def print_fio_table(results: list[FioResult]) -> None:
    print(f"{'fio':<8}{'iodepth':>8}{'numjobs':>9}{'GB/s':>8}")
    for r in results:
        print(f"{r.rw:<8}{r.iodepth:>8}{r.numjobs:>9}{r.gbps:>8.2f}")


def print_summary(store: list[StoreResult], fio: list[FioResult], target: float = 0.85) -> None:
    """Per backend and direction: ours at the best request size vs the best fio job."""
    for backend in dict.fromkeys(r.backend for r in store):
        ours = [r for r in store if r.backend == backend]
        for rw, key in (("write", lambda r: r.write_gbps), ("read", lambda r: r.read_gbps)):
            best = max(ours, key=key)
            line = (f"{backend:<5} {rw:<5}: ours {key(best):.2f} GB/s ({best.num_threads} threads, "
                    f"{best.request_mib} MiB requests)")
            fio_rw = [f for f in fio if f.rw == rw]
            if fio_rw:
                top = max(fio_rw, key=lambda f: f.gbps)
                ratio = key(best) / top.gbps
                line += (f" vs fio {top.gbps:.2f} GB/s (iodepth {top.iodepth}, numjobs "
                         f"{top.numjobs}) = {ratio:.0%} of fio (target {target:.0%})")
            print(line)


def round_ratios(store: list[StoreResult], fio: list[FioResult]) -> dict[str, float]:
    """Within one round: best ours / best fio, per backend and direction."""
    ratios = {}
    for backend in dict.fromkeys(r.backend for r in store):
        ours = [r for r in store if r.backend == backend]
        for rw, key in (("write", lambda r: r.write_gbps), ("read", lambda r: r.read_gbps)):
            fio_rw = [f.gbps for f in fio if f.rw == rw]
            if fio_rw:
                ratios[f"{backend} {rw}"] = max(key(r) for r in ours) / max(fio_rw)
    return ratios


def print_round_ratios(per_round: list[dict[str, float]]) -> None:
    """The same ratio taken round by round (ours and fio minutes apart), and its median."""
    if not per_round or not per_round[0]:
        return
    print("\nper round, best ours / best fio of the same round:")
    for name in per_round[0]:
        values = sorted(r[name] for r in per_round)
        shown = ", ".join(f"{r[name]:.0%}" for r in per_round)
        print(f"  {name:<12}: {shown}; median {statistics.median(values):.0%}")


# -- main -----------------------------------------------------------------------------------------
def _usable_backends(requested: str) -> list[str]:
    names = []
    for name in (n.strip() for n in requested.split(",") if n.strip()):
        if name == "aio":
            from offload.io.aio import aio_op_built

            built, why = aio_op_built()
            if not built:
                print(f"skipping aio: {why}", file=sys.stderr)
                continue
        elif name != "posix":
            raise SystemExit(f"unknown backend {name!r} in --backends; choose posix, aio")
        names.append(name)
    return names


def run_store_job(root: Path, case: Case, args: argparse.Namespace, total_bytes: int) -> StoreResult:
    r = run_store_case(root, case, total_bytes, args.buffer_mib * MIB, not args.no_verify)
    print(f"  {r.backend} threads={r.num_threads} req={r.request_mib} MiB: write "
          f"{r.write_gbps:.2f} GB/s, read {r.read_gbps:.2f} GB/s", flush=True)
    return r


def _round_jobs(args: argparse.Namespace, backends: list[str], use_fio: bool,
                round_no: int) -> list[Case | FioJob]:
    """Every store case and fio job once, in a shuffled order: a slow spell of the shared disk
    then hits ours and fio alike instead of whichever always runs at that point of a round."""
    jobs: list[Case | FioJob] = [Case(b, t, m * MIB) for b in backends for t in args.threads
                                 for m in args.request_mib]
    if use_fio:
        jobs += [FioJob(rw, d, n) for rw in ("write", "read") for n in args.fio_numjobs
                 for d in args.fio_iodepths]
    random.Random(round_no).shuffle(jobs)
    return jobs


def run_round(root: Path, args: argparse.Namespace, backends: list[str], use_fio: bool,
              round_no: int, total_bytes: int) -> tuple[list[StoreResult], list[FioResult]]:
    ours: list[StoreResult] = []
    fio: list[FioResult] = []
    try:
        for job in _round_jobs(args, backends, use_fio, round_no):
            if isinstance(job, Case):
                ours.append(run_store_job(root, job, args, total_bytes))
            else:
                fio.append(run_fio_job(root, job, total_bytes))
    finally:
        (root / "fio-seq.bin").unlink(missing_ok=True)
    return ours, fio


def _best_per_case(results: list[StoreResult]) -> list[StoreResult]:
    by_case: dict[tuple[str, int, int], list[StoreResult]] = {}
    for r in results:
        by_case.setdefault((r.backend, r.num_threads, r.request_mib), []).append(r)
    return [best_of(by_case[key]) for key in sorted(by_case)]


def _best_fio(results: list[FioResult]) -> list[FioResult]:
    best: dict[tuple[str, int, int], FioResult] = {}
    for r in results:
        key = (r.rw, r.iodepth, r.numjobs)
        if key not in best or r.gbps > best[key].gbps:
            best[key] = r
    return [best[key] for key in sorted(best, key=lambda k: (k[0] != "write", k[2], k[1]))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    total_bytes = int(args.size_gb * GB) // MIB * MIB
    backends = _usable_backends(args.backends)
    use_fio = not args.no_fio and shutil.which("fio") is not None
    root = args.path / f"io-bench-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=False)
    store_runs: list[StoreResult] = []
    fio_runs: list[FioResult] = []
    per_round: list[dict[str, float]] = []
    try:
        for round_no in range(1, args.repeats + 1):
            print(f"round {round_no}/{args.repeats}", flush=True)
            ours, fio = run_round(root, args, backends, use_fio, round_no, total_bytes)
            store_runs += ours
            fio_runs += fio
            per_round.append(round_ratios(ours, fio))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    store_results, fio_results = _best_per_case(store_runs), _best_fio(fio_runs)
    print(f"\n{total_bytes / GB:.2f} GB per direction per case, best of {args.repeats} round(s), "
          f"page cache dropped by {store_results[0].cache_drop if store_results else '-'}, "
          f"verify_reads={not args.no_verify}")
    print_store_table(store_results)
    if fio_results:
        print()
        print_fio_table(fio_results)
    print()
    if store_results:
        print_summary(store_results, fio_results)
        print_round_ratios(per_round)
    if args.json is not None:
        args.json.write_text(json.dumps({"store": [asdict(r) for r in store_runs],
                                         "fio": [asdict(r) for r in fio_runs]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
