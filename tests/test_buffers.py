"""HostArena: aligned slots carved from one host allocation under a hard byte budget."""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from offload.buffers import HostArena, Slot
from offload.errors import BudgetError
from offload.io.base import ALIGN_BYTES

KIB = 1024
BUDGET = 64 * KIB


def base_ptr(slots: list[Slot]) -> int:
    first = min(slots, key=lambda s: s.offset)
    return first.data.data_ptr() - first.offset


def test_slots_are_page_aligned_disjoint_and_within_budget() -> None:
    requests = [1, 4095, 4096, 4097, 10_000, 12 * KIB]
    with HostArena(BUDGET, pin_memory=False) as arena:
        slots = [arena.acquire(n) for n in requests]
        base = base_ptr(slots)
        assert base % ALIGN_BYTES == 0
        for slot, n in zip(slots, requests, strict=True):
            assert slot.nbytes >= n and slot.nbytes % ALIGN_BYTES == 0
            assert slot.offset % ALIGN_BYTES == 0
            assert slot.data.dtype == torch.uint8 and slot.data.numel() == slot.nbytes
            assert slot.data.data_ptr() == base + slot.offset
            assert slot.data.data_ptr() % ALIGN_BYTES == 0
            assert slot.offset >= 0 and slot.offset + slot.nbytes <= arena.budget_bytes <= BUDGET
        ordered = sorted(slots, key=lambda s: s.offset)
        for prev, nxt in pairwise(ordered):
            assert prev.offset + prev.nbytes <= nxt.offset, (prev.offset, nxt.offset)
        assert arena.used_bytes == sum(s.nbytes for s in slots) <= arena.budget_bytes

        # Writing one slot leaves every other slot alone.
        for i, slot in enumerate(slots):
            slot.data.fill_(i + 1)
        for i, slot in enumerate(slots):
            assert torch.all(slot.data == i + 1), f"slot {i} was overwritten"


def test_typed_view_shares_the_slot_memory() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        slot = arena.acquire(4097)
        view = slot.view(torch.float32, 1000)
        assert view.dtype == torch.float32 and view.shape == (1000,)
        assert view.data_ptr() == slot.data.data_ptr()
        view.fill_(1.5)
        again = slot.view(torch.float32, 1000)
        assert torch.all(again == 1.5)
        assert slot.view(torch.bfloat16, slot.nbytes // 2).numel() == slot.nbytes // 2
        with pytest.raises(ValueError, match="cannot hold"):
            slot.view(torch.float32, slot.nbytes // 4 + 1)
        with pytest.raises(ValueError, match="cannot hold"):
            slot.view(torch.int64, -1)


def test_budget_is_whole_pages_and_never_exceeded() -> None:
    # The budget is rounded up to a whole page (callers size it as n x unaligned request).
    with HostArena(10_000, pin_memory=False) as arena:
        assert arena.budget_bytes == 12 * KIB
        slots = [arena.acquire(4 * KIB) for _ in range(3)]
        assert arena.used_bytes == arena.budget_bytes
        assert arena.try_acquire(1) is None
        assert max(s.offset + s.nbytes for s in slots) == arena.budget_bytes
    with pytest.raises(ValueError, match="at least"):
        HostArena(ALIGN_BYTES - 1)


def test_request_larger_than_the_budget_fails_at_once() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        start = time.monotonic()
        with pytest.raises(BudgetError, match="budget") as info:
            arena.acquire(BUDGET + 1, timeout_s=30)
        assert time.monotonic() - start < 5
        assert "\n" not in str(info.value)
        with pytest.raises(BudgetError, match="budget"):
            arena.try_acquire(BUDGET + 1)
        assert arena.used_bytes == 0
        assert arena.acquire(BUDGET).nbytes == BUDGET  # the full budget itself fits


def test_full_arena_refuses_then_times_out() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        whole = arena.acquire(BUDGET)
        assert arena.try_acquire(1) is None
        start = time.monotonic()
        with pytest.raises(BudgetError, match="timed out"):
            arena.acquire(1, timeout_s=0.2)
        assert time.monotonic() - start >= 0.15
        arena.release(whole)
        assert arena.try_acquire(1) is not None


def test_blocked_acquire_proceeds_once_a_slot_is_released() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        held = [arena.acquire(BUDGET // 2), arena.acquire(BUDGET // 2)]
        got: list[Slot] = []
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                got.append(arena.acquire(BUDGET // 2, timeout_s=30))
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive() and not got, "acquire returned while the arena was full"
        arena.release(held[1])
        thread.join(timeout=10)
        assert not thread.is_alive() and not errors, errors
        assert len(got) == 1 and got[0].offset == held[1].offset
        assert arena.used_bytes == BUDGET


def test_close_wakes_a_blocked_acquire() -> None:
    arena = HostArena(BUDGET, pin_memory=False).open()
    arena.acquire(BUDGET)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            arena.acquire(ALIGN_BYTES, timeout_s=30)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.1)
    arena.close()
    thread.join(timeout=5)
    assert not thread.is_alive(), "acquire kept waiting on a closed arena"
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


def test_release_coalesces_free_space() -> None:
    quarter = BUDGET // 4
    with HostArena(BUDGET, pin_memory=False) as arena:
        slots = [arena.acquire(quarter) for _ in range(4)]
        assert arena.try_acquire(1) is None
        arena.release(slots[0])
        arena.release(slots[2])
        # Half the budget is free, but in two pieces: first fit cannot give a half-budget slot.
        assert arena.try_acquire(2 * quarter) is None
        arena.release(slots[3])
        arena.release(slots[1])
        assert arena.used_bytes == 0
        whole = arena.try_acquire(BUDGET)
        assert whole is not None and whole.offset == 0 and whole.nbytes == BUDGET


def test_peak_bytes_is_tracked() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        a = arena.acquire(10_000)  # 12 KiB
        b = arena.acquire(4 * KIB)
        arena.release(a)
        c = arena.acquire(8 * KIB)
        assert arena.peak_bytes == 16 * KIB
        d = arena.acquire(30 * KIB)
        assert arena.peak_bytes == 12 * KIB + 32 * KIB
        for slot in (b, c, d):
            arena.release(slot)
        assert arena.used_bytes == 0
        assert arena.peak_bytes == 44 * KIB


def test_double_release_is_refused_and_harmless() -> None:
    with HostArena(BUDGET, pin_memory=False) as arena:
        a = arena.acquire(BUDGET // 2)
        arena.release(a)
        with pytest.raises(ValueError, match="already released"):
            arena.release(a)
        assert arena.used_bytes == 0
        x = arena.acquire(BUDGET // 2)
        y = arena.acquire(BUDGET // 2)
        assert x.offset + x.nbytes <= y.offset or y.offset + y.nbytes <= x.offset
        assert arena.try_acquire(1) is None


def test_slot_of_another_arena_is_refused() -> None:
    with HostArena(BUDGET, pin_memory=False) as one, HostArena(BUDGET, pin_memory=False) as two:
        slot = one.acquire(ALIGN_BYTES)
        with pytest.raises(ValueError, match="does not belong"):
            two.release(slot)
        assert two.acquire(BUDGET).nbytes == BUDGET


def test_reopen_starts_empty() -> None:
    arena = HostArena(BUDGET, pin_memory=False)
    with arena:
        arena.acquire(BUDGET)
    assert arena.used_bytes == 0
    with arena:
        assert arena.used_bytes == 0
        assert arena.acquire(BUDGET).nbytes == BUDGET


def test_acquire_needs_an_open_arena() -> None:
    arena = HostArena(BUDGET, pin_memory=False)
    with pytest.raises(RuntimeError, match="not open"):
        arena.acquire(1)


class _CopyEvent:
    """Stands for the CUDA event a buffer is given back with: records whether it was waited for."""

    def __init__(self, done: bool = False) -> None:
        self.done = done
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_pinned_pool_reuses_buffers_by_size_and_counts_them_until_close() -> None:
    from offload.pinned import PinnedPool
    from offload.tiers import Accountant, Tier

    acct = Accountant({Tier.HOST: 1 << 20})
    pool = PinnedPool(acct, Tier.HOST, register=False)
    a = pool.take(3 * ALIGN_BYTES + 8, "a")  # exact bytes, page aligned, counted (whole pages) from here
    b = pool.take(ALIGN_BYTES, "b")
    assert a.numel() == 3 * ALIGN_BYTES + 8 and a.dtype == torch.uint8 and a.data_ptr() % ALIGN_BYTES == 0
    assert a.untyped_storage().data_ptr() == a.data_ptr()  # (what is_pinned() looks at)
    assert acct.used_bytes[Tier.HOST] == pool.held_bytes == 5 * ALIGN_BYTES
    copied = _CopyEvent()
    pool.give(a.view(torch.uint8)[: a.numel()], after=copied)  # any view over all its bytes
    assert pool.kept_bytes == 3 * ALIGN_BYTES + 8 and acct.used_bytes[Tier.HOST] == 5 * ALIGN_BYTES
    c = pool.take(ALIGN_BYTES, "c")  # another size: a new buffer, not the kept one
    assert c.data_ptr() != a.data_ptr() and acct.used_bytes[Tier.HOST] == 6 * ALIGN_BYTES
    assert not copied.waited
    again = pool.take(3 * ALIGN_BYTES + 8, "again")  # the kept one, once its copies have run
    assert again.data_ptr() == a.data_ptr() and copied.waited
    assert acct.used_bytes[Tier.HOST] == 6 * ALIGN_BYTES and pool.kept_bytes == 0
    for buf in (again, b, pool.take(0, "nothing")):
        pool.give(buf, after=_CopyEvent())
    pool.close()
    assert acct.used_bytes[Tier.HOST] == 0 and pool.held_bytes == 0 and pool.kept_bytes == 0
    assert acct.peak_bytes[Tier.HOST] == 6 * ALIGN_BYTES


def test_pinned_pool_refuses_past_the_budget_and_counts_nothing_it_could_not_make() -> None:
    from offload.pinned import PinnedPool
    from offload.tiers import Accountant, Tier

    acct = Accountant({Tier.HOST: 2 * ALIGN_BYTES})
    pool = PinnedPool(acct, Tier.HOST, register=False)
    pool.take(2 * ALIGN_BYTES, "first")
    with pytest.raises(BudgetError, match="second"):
        pool.take(ALIGN_BYTES, "second")
    assert acct.used_bytes[Tier.HOST] == pool.held_bytes == 2 * ALIGN_BYTES
    pool.close()
    assert acct.used_bytes[Tier.HOST] == 0


def test_a_pinned_pool_serves_threads_at_once() -> None:
    """Buffers given back from other threads (a write's completion callback) are reused, and no
    buffer is handed out twice at once."""
    from offload.pinned import PinnedPool
    from offload.tiers import Accountant, Tier

    acct = Accountant({Tier.HOST: 1 << 24})
    pool = PinnedPool(acct, Tier.HOST, register=False)
    in_use: set[int] = set()
    lock = threading.Lock()
    clashes = []

    def run() -> None:
        for _ in range(200):
            buf = pool.take(ALIGN_BYTES, "x")
            with lock:
                clashes.append(buf.data_ptr() in in_use)
                in_use.add(buf.data_ptr())
            with lock:
                in_use.discard(buf.data_ptr())
            pool.give(buf)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(clashes)
    assert pool.held_bytes <= 4 * ALIGN_BYTES and pool.kept_bytes == pool.held_bytes
    pool.close()
    assert acct.used_bytes[Tier.HOST] == 0


def test_a_pinned_pool_hands_out_a_buffer_whose_copies_have_run_first() -> None:
    from offload.pinned import PinnedPool
    from offload.tiers import Accountant, Tier

    pool = PinnedPool(Accountant({Tier.HOST: 1 << 20}), Tier.HOST, register=False)
    older, newer = pool.take(ALIGN_BYTES, "a"), pool.take(ALIGN_BYTES, "b")
    busy, done = _CopyEvent(), _CopyEvent(done=True)
    pool.give(older, after=busy)
    pool.give(newer, after=done)
    assert pool.take(ALIGN_BYTES, "c").data_ptr() == newer.data_ptr() and not busy.waited
    assert pool.take(ALIGN_BYTES, "d").data_ptr() == older.data_ptr() and busy.waited
    pool.close()


def test_trimming_a_pinned_pool_lets_go_of_the_sizes_no_longer_asked_for() -> None:
    from offload.pinned import PinnedPool
    from offload.tiers import Accountant, Tier

    acct = Accountant({Tier.HOST: 1 << 20})
    pool = PinnedPool(acct, Tier.HOST, register=False)
    old, kept = pool.take(2 * ALIGN_BYTES, "old shape"), pool.take(ALIGN_BYTES, "same shape")
    pool.give(old)
    pool.give(kept)
    pool.trim()  # both sizes were asked for since the pool began: both stay
    assert pool.kept_bytes == 3 * ALIGN_BYTES
    again = pool.take(ALIGN_BYTES, "same shape")
    pool.give(again, after=_CopyEvent())
    pool.trim()  # only the smaller size was asked for since the last trim
    assert pool.kept_bytes == ALIGN_BYTES and acct.used_bytes[Tier.HOST] == pool.held_bytes == ALIGN_BYTES
    pool.close()
    assert acct.used_bytes[Tier.HOST] == 0


def _huge_page_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address`` (bytes)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def _fault_fallbacks() -> int:
    """Huge-page faults the kernel served with small pages, since boot."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_fault_fallback "):
            return int(line.split()[1])
    return 0


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_io_buffers_from_two_mib_on_sit_on_huge_pages() -> None:
    # the arena and the layer, activation and bounce buffers all come from aligned_empty: where the
    # kernel gives huge pages only on request (madvise), only the advised buffers get them
    from offload.io.posix import aligned_empty

    fallbacks = _fault_fallbacks()
    with HostArena(8 << 20, pin_memory=False) as arena:
        slot = arena.acquire(8 << 20)
        slot.data.fill_(1)
        assert slot.data.data_ptr() % (2 << 20) == 0
        arena_huge_bytes = _huge_page_bytes_at(slot.data.data_ptr())
    buf = aligned_empty((5 << 20) + 4096)
    buf.fill_(1)
    assert buf.numel() == (5 << 20) + 4096 and buf.data_ptr() % (2 << 20) == 0
    assert buf.untyped_storage().data_ptr() == buf.data_ptr()
    if _fault_fallbacks() > fallbacks:
        pytest.skip("the kernel had no free huge page to give (fragmented memory)")
    assert arena_huge_bytes > 0
    assert _huge_page_bytes_at(buf.data_ptr()) >= 4 << 20
    small = aligned_empty(12 * KIB)
    assert small.numel() == 12 * KIB and small.data_ptr() % ALIGN_BYTES == 0
