"""Byte accounting (``offload.tiers.Accountant``) with cached buffers, and the weight streamer's
reuse of released buffers on a CPU device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_executor_parity import ALL_NVME, make_batches, tiny_model, train_engine

from offload.errors import BudgetError
from offload.tiers import Accountant, Tier
from scheduler import weight_streamer


def test_cached_bytes_are_given_up_before_a_budget_would_be_passed():
    acct = Accountant({Tier.DEVICE: 100})
    cached = [40, 30]  # two kept buffers

    def reclaim(tier: Tier, nbytes: int) -> None:
        while cached and nbytes > 0:
            size = cached.pop()
            acct.uncache(tier, size, reuse=False)
            nbytes -= size

    acct.reclaim = reclaim
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
    acct.reclaim = None
    acct.free(Tier.DEVICE, 40)
    acct.cache(Tier.DEVICE, 10)  # 40 in use, 10 cached
    acct.alloc(Tier.DEVICE, 55, "no reclaim")  # 95 in use: in use and cached pass the budget only
    with pytest.raises(BudgetError):  # ... without a reclaim callback; taking the 10 back would fail
        acct.uncache(Tier.DEVICE, 10, reuse=True)
    assert acct.cached_bytes[Tier.DEVICE] == 10 and acct.used_bytes[Tier.DEVICE] == 95


def test_loads_reuse_released_buffers_within_the_device_budget(tmp_path, monkeypatch):
    """Every layer load after the first few reads into a buffer released before it (no page
    faults anew); in use and cached together, DEVICE never passes its budget; same math."""
    fresh = []
    aligned_empty = weight_streamer.aligned_empty

    def counted(n_bytes: int, pin_memory: bool = False) -> torch.Tensor:
        fresh.append(n_bytes)
        return aligned_empty(n_bytes, pin_memory)

    monkeypatch.setattr(weight_streamer, "aligned_empty", counted)
    held = []
    cache, alloc = Accountant.cache, Accountant.alloc

    def note(acct: Accountant) -> None:
        held.append((acct.used_bytes[Tier.DEVICE] + acct.cached_bytes[Tier.DEVICE], acct.budgets.get(Tier.DEVICE)))

    monkeypatch.setattr(Accountant, "cache", lambda self, tier, n: (cache(self, tier, n), note(self))[0])
    monkeypatch.setattr(Accountant, "alloc", lambda self, tier, n, what: (alloc(self, tier, n, what), note(self))[0])
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
