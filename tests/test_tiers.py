"""Byte accounting (``offload.tiers.Accountant``) with cached buffers, and the reuse of released
buffers on a CPU device: the weight streamer's, and the swap buffers of saved activations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_executor_parity import (
    ALL_NVME,
    LR,
    PLANS,
    VOCAB,
    WD,
    deep_model,
    make_batches,
    tiny_model,
    train_engine,
)

from offload import AdamWConfig, SwapStore, make_adamw
from offload.errors import BudgetError
from offload.io import PosixBackend
from offload.tiers import Accountant, Tier
from scheduler import placement as placement_rules
from scheduler import saved_tensors, weight_streamer
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.placement import Placement
from scheduler.plan import Plan


def test_cached_bytes_are_given_up_before_a_budget_would_be_passed():
    acct = Accountant({Tier.DEVICE: 100})
    cached = [40, 30]  # two kept buffers

    def reclaim(tier: Tier, nbytes: int) -> None:
        while cached and nbytes > 0:
            size = cached.pop()
            acct.uncache(tier, size, reuse=False)
            nbytes -= size

    acct.add_reclaimer(reclaim)
    acct.alloc(Tier.DEVICE, 70, "buffers")
    acct.cache(Tier.DEVICE, 70)  # both kept: nothing in use
    assert acct.used_bytes[Tier.DEVICE] == 0 and acct.cached_bytes[Tier.DEVICE] == 70
    assert acct.fits(Tier.DEVICE, 100)  # cached bytes can always be given up
    acct.alloc(Tier.DEVICE, 50, "gradients")  # 50 + 70 > 100: one kept buffer (30) goes
    assert cached == [40] and acct.cached_bytes[Tier.DEVICE] == 40
    assert acct.used_bytes[Tier.DEVICE] + acct.cached_bytes[Tier.DEVICE] <= 100
    acct.uncache(Tier.DEVICE, 40, reuse=True)  # taken back into use
    assert acct.used_bytes[Tier.DEVICE] == 90 and acct.peak_bytes[Tier.DEVICE] == 90
    acct.cache(Tier.DEVICE, 40)  # 50 in use, 40 cached
    acct.alloc(Tier.DEVICE, 40, "more")  # 90 in use: the cached 40 are given up
    assert acct.cached_bytes[Tier.DEVICE] == 0 and acct.used_bytes[Tier.DEVICE] == 90
    acct.remove_reclaimer(reclaim)
    acct.free(Tier.DEVICE, 40)
    acct.cache(Tier.DEVICE, 10)  # 40 in use, 10 cached
    acct.alloc(Tier.DEVICE, 55, "no reclaim")  # 95 in use: in use and cached pass the budget only
    with pytest.raises(BudgetError):  # ... without a reclaim callback; taking the 10 back would fail
        acct.uncache(Tier.DEVICE, 10, reuse=True)
    assert acct.cached_bytes[Tier.DEVICE] == 10 and acct.used_bytes[Tier.DEVICE] == 95


def _count_fresh_buffers(monkeypatch, module) -> list[int]:  # noqa: ANN001
    """The sizes of the fresh page-aligned buffers ``module`` makes from now on."""
    fresh: list[int] = []
    aligned_empty = module.aligned_empty

    def counted(n_bytes: int, pin_memory: bool = False) -> torch.Tensor:
        fresh.append(n_bytes)
        return aligned_empty(n_bytes, pin_memory)

    monkeypatch.setattr(module, "aligned_empty", counted)
    return fresh


def _watch_device_total(monkeypatch) -> list[tuple[int, int | None]]:  # noqa: ANN001
    """(DEVICE bytes in use and cached, DEVICE budget) after every allocation and every cache."""
    held: list[tuple[int, int | None]] = []
    cache, alloc = Accountant.cache, Accountant.alloc

    def note(acct: Accountant) -> None:
        held.append((acct.used_bytes[Tier.DEVICE] + acct.cached_bytes[Tier.DEVICE], acct.budgets.get(Tier.DEVICE)))

    monkeypatch.setattr(Accountant, "cache", lambda self, tier, n: (cache(self, tier, n), note(self))[0])
    monkeypatch.setattr(Accountant, "alloc", lambda self, tier, n, what: (alloc(self, tier, n, what), note(self))[0])
    return held


def test_reclaimers_give_up_cached_bytes_in_turn_until_the_allocation_fits():
    acct = Accountant({Tier.DEVICE: 100})
    kept = {"first": [30], "second": [20, 20]}
    calls = []

    def reclaimer(name: str):  # noqa: ANN202
        def reclaim(tier: Tier, nbytes: int) -> None:
            calls.append((name, nbytes))
            while kept[name] and nbytes > 0:
                size = kept[name].pop()
                acct.uncache(tier, size, reuse=False)
                nbytes -= size
        return reclaim

    first, second = reclaimer("first"), reclaimer("second")
    acct.add_reclaimer(first)
    acct.add_reclaimer(second)
    acct.alloc(Tier.DEVICE, 70, "buffers")
    acct.cache(Tier.DEVICE, 70)
    acct.alloc(Tier.DEVICE, 10, "fits beside them")  # 80: nobody asked
    assert calls == []
    acct.alloc(Tier.DEVICE, 45, "over by 25")  # the first gives its 30: enough, the second is not asked
    assert calls == [("first", 25)] and kept == {"first": [], "second": [20, 20]}
    acct.alloc(Tier.DEVICE, 30, "over by 25 again")  # the first has none left; the second gives 40
    assert calls[1:] == [("first", 25), ("second", 25)] and kept["second"] == []
    assert acct.used_bytes[Tier.DEVICE] == 85 and acct.cached_bytes[Tier.DEVICE] == 0
    acct.remove_reclaimer(first)
    acct.remove_reclaimer(first)  # (twice: no error)
    assert acct.reclaimers == [second]


def test_loads_reuse_released_buffers_within_the_device_budget(tmp_path, monkeypatch):
    """Every layer load after the first few reads into a buffer released before it (no page
    faults anew); in use and cached together, DEVICE never passes its budget; same math."""
    fresh = _count_fresh_buffers(monkeypatch, weight_streamer)
    held = _watch_device_total(monkeypatch)
    model = tiny_model("llama")
    layer_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    outer = sum(p.numel() for n, p in model.named_parameters() if "layers." not in n) * 4
    budget = outer + 6 * layer_bytes
    batches = make_batches(3, 1)
    for name, plan in (("plain", dataclasses.replace(ALL_NVME, device_budget_bytes=budget)),
                       ("lent", dataclasses.replace(ALL_NVME, device_budget_bytes=budget, master_from_loads=True))):
        fresh.clear()
        held.clear()
        losses, w, metrics = train_engine(tiny_model("llama"), batches, plan, tmp_path / name)
        loads = 3 * 2 * len(model.model.layers)  # three steps, each layer loaded for forward and backward
        layer_allocs = fresh.count(layer_bytes)  # (pre and post are resident: allocated once)
        assert 0 < layer_allocs <= 3, (name, fresh)  # the first loads only, not 18
        assert loads == 18
        assert all(total <= limit for total, limit in held), name
        if name == "plain":
            base = (losses, w)
        else:
            assert losses == base[0] and all(torch.equal(w[k], base[1][k]) for k in w)




def _run_keeping(plan, batches, tmp_path):  # noqa: ANN001, ANN202
    """Train on ``batches`` under ``plan``; after each step (settled) the kept swap buffers' sizes;
    at step 1 an allocation that needs exactly the kept buffers' memory is made and freed."""
    losses, kept_after = [], []
    torch.manual_seed(123)  # as ``train_engine``
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, \
         StreamingExecutor(deep_model("llama", 5), plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)),
                           TrainSettings(weight_decay=WD)) as ex:
        acct, kept, spare = ex.acct, ex.activations._kept, ex.weights._spare
        for k, micro in enumerate(batches):
            losses.append(ex.train_step(micro, LR).loss)
            ex.synchronize()
            kept_after.append(sorted(n for n, v in kept.items() for _ in v))
            if k == 1:  # an allocation that needs the kept buffers' memory: they go, the weights' stay
                spare_before = {n: len(v) for n, v in spare.items()}
                kept_bytes = sum(kept_after[-1])
                other_cached = acct.cached_bytes[Tier.DEVICE] - kept_bytes
                n = acct.budgets[Tier.DEVICE] - acct.used_bytes[Tier.DEVICE] - other_cached
                acct.alloc(Tier.DEVICE, n, "a test")
                assert kept_bytes > 0 and sum(len(v) for v in kept.values()) == 0
                assert {n: len(v) for n, v in spare.items()} == spare_before
                acct.free(Tier.DEVICE, n)
        w, m = ex.master_state_dict(), ex.metrics()
    assert acct.cached_bytes[Tier.DEVICE] == 0 and acct.reclaimers == []  # all given up at close
    return losses, w, m, kept_after


def test_swap_buffers_of_a_backward_serve_the_next_forward_within_the_device_budget(tmp_path, monkeypatch):
    """Saved activations written to the SSD: the buffers of a backward's read-backs serve the next
    forward's swaps (no page faulted in anew for them); kept between the two, they count as
    cached bytes (in use and cached together never pass the budget), are given up first to any
    allocation that needs the memory, and those of another shape at the next forward's end;
    same math as kept graphs."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)  # tiny model: swap every tensor
    fresh = _count_fresh_buffers(monkeypatch, saved_tensors)
    batches = make_batches(4, 1)
    plan = PLANS["swapped-activations"]
    kept_graphs = dataclasses.replace(plan, activations=Tier.DEVICE)
    base_losses, base_w, base_m = train_engine(deep_model("llama", 5), batches, kept_graphs, tmp_path / "kept")
    _, _, probe_m = train_engine(deep_model("llama", 5), batches, plan, tmp_path / "probe")
    plan = dataclasses.replace(plan, device_budget_bytes=probe_m["peak_device_bytes"])  # no slack at the peak
    held = _watch_device_total(monkeypatch)
    fresh.clear()
    after_step = []
    monkeypatch.setattr(StreamingExecutor, "synchronize",
                        (lambda real: lambda self: (real(self), after_step.append(len(fresh)))[0])(StreamingExecutor.synchronize))
    losses, w, m, _ = _run_keeping(plan, batches, tmp_path / "swapped")
    assert losses == base_losses and all(torch.equal(w[k], base_w[k]) for k in base_w)
    assert m["io_write_bytes"] > base_m["io_write_bytes"]  # the activations went through the SSD
    assert held and all(total <= limit for total, limit in held)
    per_step = [b - a for a, b in zip([0, *after_step[:3]], after_step[:4], strict=True)]
    # the first step makes its forward's buffers and its backward's; later ones only the backward's,
    # but after the kept ones were given up (step 2's forward makes them anew)
    assert per_step[1] == per_step[3] == per_step[0] // 2 and per_step[2] == per_step[0], per_step

    # two shapes in turn: a forward gives up the kept buffers of the other shape it did not take
    g = torch.Generator().manual_seed(2)
    shapes = [[{"input_ids": torch.randint(0, VOCAB, (2, t), generator=g)}] for t in (16, 12, 16, 12)]
    *_, kept_after = _run_keeping(PLANS["swapped-activations"], shapes, tmp_path / "shapes")
    assert kept_after[0] != kept_after[1]
    assert kept_after[2] == kept_after[0] and kept_after[3] == kept_after[1], kept_after


def test_a_kept_swap_buffer_that_does_not_fit_stays_kept(tmp_path):
    """Taking a kept buffer back into use past the budget raises, and leaves it kept and counted."""
    placement = Placement(Plan(activations=Tier.NVME, recompute=False), n_layers=4, compute_dtype="float32",
                          state_dtype="float32", grads_kept=False, on_gpu=False)
    acct = Accountant({Tier.DEVICE: 1 << 20})
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store:
        acts = saved_tensors.SavedTensors(placement, store, acct, torch.device("cpu"), None)  # type: ignore[arg-type]
        buf = acts._buffer(4096, "a swap buffer")
        acts._pool[4096] = [(buf, None)]
        acts.end_backward()  # kept, as cached bytes
        assert acct.used_bytes[Tier.DEVICE] == 0 and acct.cached_bytes[Tier.DEVICE] == 4096
        acct.alloc(Tier.DEVICE, (1 << 20) - 2048, "nearly everything")  # the kept buffer's room is taken...
        assert acct.cached_bytes[Tier.DEVICE] == 0 and not acts._kept[4096]  # ... so it was given up
        acct.free(Tier.DEVICE, (1 << 20) - 2048)
        acts._pool[4096] = [(acts._buffer(4096, "a swap buffer"), None)]
        acts.end_backward()
        acct.used_bytes[Tier.DEVICE] = (1 << 20) - 2048  # in use behind the reclaimer's back: no room
        with pytest.raises(BudgetError):
            acts._buffer(4096, "a swap buffer")
        assert len(acts._kept[4096]) == 1 and acct.cached_bytes[Tier.DEVICE] == 4096
        acct.used_bytes[Tier.DEVICE] = 0
        acts.close()
        assert acct.cached_bytes[Tier.DEVICE] == 0 and acct.reclaimers == []
