"""Every I/O backend checked against plain Python file I/O, both directions, plus error paths.

The aio backend is tested only when DeepSpeed's async_io op is already built (never compiled
here); kvikio with CUDA tensors only on a GPU machine with kvikio installed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from offload.io import (
    ALIGN_BYTES,
    IOBackend,
    PosixBackend,
    align_up,
    aligned_empty,
    make_backend,
    select_backend,
)

# Odd sizes around page and task boundaries; each placed at an aligned offset (see _layout).
SIZES_BYTES = (1, 511, 4095, 4096, 4097, 12_345, 65_536 + 7, (1 << 20) + 3, (3 << 20) - 777)


@functools.cache
def _aio_status() -> tuple[bool, str]:
    from offload.io.aio import aio_op_built

    return aio_op_built()


def _need_aio() -> None:
    ok, why = _aio_status()
    if not ok:
        pytest.skip(f"aio backend not tested: {why}")


def _make_aio(num_threads: int, task_bytes: int) -> IOBackend:
    _need_aio()
    from offload.io.aio import AioBackend

    return AioBackend(num_threads=num_threads, task_bytes=task_bytes)


def _make_posix(direct: bool) -> Callable[[int, int], IOBackend]:
    def make(num_threads: int, task_bytes: int) -> IOBackend:
        return PosixBackend(num_threads=num_threads, task_bytes=task_bytes, direct=direct)

    return make


FACTORIES: dict[str, Callable[[int, int], IOBackend]] = {
    "posix-direct": _make_posix(True),
    "posix-buffered": _make_posix(False),
    "aio": _make_aio,
}
# (num_threads, task_bytes): one thread with page-sized tasks, a few threads, many threads.
POOLS = [(1, ALIGN_BYTES), (4, 64 << 10), (16, 1 << 20)]


@pytest.fixture(params=list(FACTORIES))
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=POOLS, ids=lambda p: f"t{p[0]}-task{p[1] >> 10}k")
def backend(request: pytest.FixtureRequest, backend_name: str) -> Iterator[IOBackend]:
    num_threads, task_bytes = request.param
    b = FACTORIES[backend_name](num_threads, task_bytes)
    yield b
    b.close()


# -- helpers ----------------------------------------------------------------------------------
def _layout(sizes_bytes: tuple[int, ...]) -> list[tuple[int, int]]:
    """(file offset, size) for each size, each offset page aligned, one free page between."""
    placed, offset = [], 0
    for n in sizes_bytes:
        placed.append((offset, n))
        offset += align_up(n) + ALIGN_BYTES
    return placed


def _host_buffer(n_bytes: int, aligned: bool) -> torch.Tensor:
    """A uint8 host tensor, page aligned or deliberately one byte off a page boundary."""
    if aligned:
        return aligned_empty(n_bytes)
    return aligned_empty(n_bytes + 1)[1:]


def _image(placed: list[tuple[int, int]], payloads: list[bytes]) -> bytes:
    """The file contents expected: each payload at its offset, zeros elsewhere."""
    end = placed[-1][0] + placed[-1][1]
    image = bytearray(end)
    for (offset, n), data in zip(placed, payloads, strict=True):
        image[offset : offset + n] = data
    return bytes(image)


def _assert_file_holds(path: Path, image: bytes) -> None:
    data = path.read_bytes()
    assert len(data) >= len(image), f"file has {len(data)} bytes, expected at least {len(image)}"
    assert data[: len(image)] == image
    assert data[len(image) :].count(0) == len(data) - len(image), "padding past the data is not zero"


# -- backend vs plain file I/O ----------------------------------------------------------------
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned-buf", "unaligned-buf"])
def test_backend_writes_plain_reads(backend: IOBackend, tmp_path: Path, aligned: bool) -> None:
    path = tmp_path / "swap.bin"
    path.touch()
    placed = _layout(SIZES_BYTES)
    payloads = [os.urandom(n) for _, n in placed]
    handle = backend.open(str(path), create=False)
    buffers, futures = [], []
    for (offset, n), data in zip(placed, payloads, strict=True):
        buf = _host_buffer(n, aligned)
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        buffers.append(buf)
        futures.append(backend.submit_write(handle, buf, offset))  # all in flight at once
    assert [f.result(timeout=60) for f in futures] == [n for _, n in placed]
    backend.close_file(handle)
    _assert_file_holds(path, _image(placed, payloads))


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned-buf", "unaligned-buf"])
def test_plain_writes_backend_reads(backend: IOBackend, tmp_path: Path, aligned: bool) -> None:
    path = tmp_path / "swap.bin"
    placed = _layout(SIZES_BYTES)
    payloads = [os.urandom(n) for _, n in placed]
    path.write_bytes(_image(placed, payloads))  # ends mid-page: the last read hits EOF
    handle = backend.open(str(path), create=False)
    buffers = [_host_buffer(n, aligned) for _, n in placed]
    futures = [backend.submit_read(handle, buf, off) for buf, (off, _) in zip(buffers, placed, strict=True)]
    assert [f.result(timeout=60) for f in futures] == [n for _, n in placed]
    for buf, data in zip(buffers, payloads, strict=True):
        assert bytes(buf.numpy()) == data
    backend.close_file(handle)


def test_many_requests_in_flight_round_trip(backend: IOBackend, tmp_path: Path) -> None:
    """Two hundred tensors of mixed dtypes and odd lengths queued before any is awaited."""
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    gen = torch.Generator().manual_seed(0)
    numels = [int(n) for n in torch.randint(1, 75_000, (200,), generator=gen)]
    dtypes = (torch.float32, torch.bfloat16, torch.int8)
    tensors = [torch.randn(n, generator=gen).to(dtypes[i % 3]) for i, n in enumerate(numels)]
    placed = _layout(tuple(t.numel() * t.element_size() for t in tensors))
    writes = [backend.submit_write(handle, t, off) for t, (off, _) in zip(tensors, placed, strict=True)]
    for w in writes:
        w.result(timeout=60)
    outs = [torch.empty_like(t) for t in tensors]
    reads = [backend.submit_read(handle, o, off) for o, (off, _) in zip(outs, placed, strict=True)]
    for r in reads:
        r.result(timeout=60)
    for t, o in zip(tensors, outs, strict=True):
        assert torch.equal(t, o)
    backend.close_file(handle)


def test_rewrite_in_place(backend: IOBackend, tmp_path: Path) -> None:
    path = tmp_path / "swap.bin"
    handle = backend.open(str(path), create=True)
    first, second = os.urandom(3 * ALIGN_BYTES + 5), os.urandom(3 * ALIGN_BYTES + 5)
    for data in (first, second):
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        backend.submit_write(handle, buf, ALIGN_BYTES).result(timeout=60)
    backend.close_file(handle)
    assert path.read_bytes()[ALIGN_BYTES : ALIGN_BYTES + len(second)] == second


def test_close_file_waits_for_requests_in_flight(backend: IOBackend, tmp_path: Path) -> None:
    path = tmp_path / "swap.bin"
    handle = backend.open(str(path), create=True)
    payloads = [os.urandom(256 << 10) for _ in range(32)]
    futures = [backend.submit_write(handle, torch.frombuffer(bytearray(d), dtype=torch.uint8), i * len(d))
               for i, d in enumerate(payloads)]
    backend.close_file(handle)  # must not close the file under the writes
    assert all(f.done() and f.exception() is None for f in futures)
    assert path.read_bytes() == b"".join(payloads)


# -- what the backends report -----------------------------------------------------------------
def test_posix_describe_counts_direct_bounced_buffered(tmp_path: Path) -> None:
    backend = PosixBackend(num_threads=2, task_bytes=64 << 10)
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    backend.submit_write(handle, _host_buffer(256 << 10, aligned=True), 0).result()
    backend.submit_write(handle, _host_buffer(10_000, aligned=False), 256 << 10).result()
    info = backend.describe()
    backend.close()
    if info["buffered_bytes"]:
        pytest.skip(f"O_DIRECT refused on {tmp_path}: nothing direct to count")
    assert info["o_direct"] is True
    assert info["direct_bytes"] == 256 << 10
    assert info["bounced_bytes"] == 10_000


def test_posix_buffered_mode_counts_buffered(tmp_path: Path) -> None:
    backend = PosixBackend(num_threads=2, direct=False)
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    backend.submit_write(handle, _host_buffer(8192, aligned=True), 0).result()
    info = backend.describe()
    backend.close()
    assert (info["o_direct"], info["direct_bytes"], info["buffered_bytes"]) == (False, 0, 8192)


def test_aio_describe_counts_bounced(tmp_path: Path) -> None:
    backend = _make_aio(2, 64 << 10)
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    backend.submit_write(handle, _host_buffer(256 << 10, aligned=True), 0).result()
    backend.submit_read(handle, _host_buffer(10_000, aligned=False), 0).result()
    info = backend.describe()
    backend.close()
    # Host tensors are never page-locked without CUDA: every byte goes through the locked bounce.
    assert info["bounced_bytes"] + info["direct_bytes"] == (256 << 10) + 10_000
    assert info["buffered_bytes"] == 0


# -- error paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bytes", [2 * ALIGN_BYTES, 5000], ids=["aligned-len", "odd-len"])
def test_read_past_eof_raises_eof_error(backend: IOBackend, tmp_path: Path, n_bytes: int) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(os.urandom(ALIGN_BYTES))
    handle = backend.open(str(path), create=False)
    future = backend.submit_read(handle, aligned_empty(n_bytes), 0)
    with pytest.raises(EOFError):
        future.result(timeout=60)
    beyond = backend.submit_read(handle, aligned_empty(ALIGN_BYTES), 16 * ALIGN_BYTES)
    with pytest.raises(EOFError):
        beyond.result(timeout=60)
    backend.close_file(handle)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_unaligned_file_offset_raises_value_error(backend: IOBackend, tmp_path: Path, write: bool) -> None:
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    submit = backend.submit_write if write else backend.submit_read
    with pytest.raises(ValueError, match="aligned"):
        submit(handle, aligned_empty(ALIGN_BYTES), 100)
    backend.close_file(handle)


def test_posix_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_threads"):
        PosixBackend(num_threads=0)
    with pytest.raises(ValueError, match="task_bytes"):
        PosixBackend(task_bytes=1000)


def test_posix_rejects_non_contiguous_buffer(tmp_path: Path) -> None:
    backend = PosixBackend()
    handle = backend.open(str(tmp_path / "swap.bin"), create=True)
    with pytest.raises(ValueError, match="contiguous"):
        backend.submit_write(handle, torch.zeros(64, 64).t(), 0)
    backend.close()


# -- backend choice ---------------------------------------------------------------------------
def test_auto_picks_posix_while_only_host_buffers_reach_the_store() -> None:
    name, reason = select_backend("auto")
    assert name == "posix"
    assert "O_DIRECT" in reason and "page cache" in reason


def test_unknown_backend_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown io_backend"):
        select_backend("nvme-magic")
    with pytest.raises(ValueError):
        make_backend("nvme-magic")


def test_make_backend_posix_settings() -> None:
    backend = make_backend("posix", num_threads=3, task_bytes=1 << 20)
    assert isinstance(backend, PosixBackend)
    assert (backend.num_threads, backend.task_bytes) == (3, 1 << 20)
    backend.close()


# -- kvikio with CUDA tensors -----------------------------------------------------------------
def _need_kvikio() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        import kvikio  # noqa: F401
    except ImportError as err:
        pytest.skip(f"kvikio is not installed ({err})")


@pytest.fixture
def kvikio_backend() -> Iterator[IOBackend]:
    _need_kvikio()
    from offload.io.kvikio_backend import KvikioBackend

    backend = KvikioBackend(num_threads=4, task_bytes=1 << 20)
    yield backend
    backend.close()


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_kvikio_writes_plain_reads(kvikio_backend: IOBackend, tmp_path: Path, device: str) -> None:
    path = tmp_path / "swap.bin"
    path.touch()
    placed = _layout(SIZES_BYTES)
    payloads = [os.urandom(n) for _, n in placed]
    handle = kvikio_backend.open(str(path), create=False)
    buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8).to(device) for d in payloads]
    futures = [kvikio_backend.submit_write(handle, b, off) for b, (off, _) in zip(buffers, placed, strict=True)]
    for f in futures:
        f.result(timeout=60)
    kvikio_backend.close_file(handle)
    data = path.read_bytes()
    for (off, n), expected in zip(placed, payloads, strict=True):
        assert data[off : off + n] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_plain_writes_kvikio_reads(kvikio_backend: IOBackend, tmp_path: Path, device: str) -> None:
    path = tmp_path / "swap.bin"
    placed = _layout(SIZES_BYTES)
    payloads = [os.urandom(n) for _, n in placed]
    path.write_bytes(_image(placed, payloads))
    handle = kvikio_backend.open(str(path), create=False)
    outs = [torch.empty(n, dtype=torch.uint8, device=device) for _, n in placed]
    futures = [kvikio_backend.submit_read(handle, o, off) for o, (off, _) in zip(outs, placed, strict=True)]
    for f in futures:
        f.result(timeout=60)
    for out, expected in zip(outs, payloads, strict=True):
        assert bytes(out.cpu().numpy()) == expected
    info = kvikio_backend.describe()
    assert info["backend"] == "kvikio"
    kvikio_backend.close_file(handle)


@pytest.mark.gpu
def test_kvikio_unaligned_offset_raises(kvikio_backend: IOBackend, tmp_path: Path) -> None:
    handle = kvikio_backend.open(str(tmp_path / "swap.bin"), create=True)
    with pytest.raises(ValueError, match="aligned"):
        kvikio_backend.submit_write(handle, torch.zeros(4096, dtype=torch.uint8, device="cuda"), 7)
    kvikio_backend.close_file(handle)
