"""Plan values and the budget-driven simple planner."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import BudgetError
from offload.tiers import Tier
from scheduler.plan import ModelBytes, Plan, simple_plan


def test_plan_round_trips_through_json_dict():
    plan = Plan(weights=Tier.HOST, optimizer=Tier.NVME, grads=Tier.HOST, activations=Tier.NVME,
                prefetch_depth=2, resident_layers=(0, 1), recompute=True, chunk_numel=4096)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert "prefetch depth" in str(plan)


@pytest.mark.parametrize("bad", [dict(weights=Tier.DEVICE), dict(chunk_numel=1000), dict(job_slots=0),
                                 dict(recompute=False, activations=Tier.NVME), dict(prefetch_depth=-1)])
def test_invalid_plans_are_refused(bad):
    with pytest.raises(ValueError):
        Plan(**bad)


def model_bytes(layer_numel: int, n_layers: int, embed_numel: int) -> ModelBytes:
    return ModelBytes(layer_numel=layer_numel, n_layers=n_layers, pre_numel=embed_numel,
                      post_numel=embed_numel, compute_itemsize=2, activation_bytes=1 << 20,
                      work_bytes=8 << 20)


@settings(max_examples=200, deadline=None)
@given(layer=st.integers(10_000, 50_000_000), n_layers=st.integers(1, 96),
       embed=st.integers(10_000, 200_000_000), device=st.integers(1 << 20, 1 << 36),
       host=st.integers(1 << 20, 1 << 37))
def test_simple_plan_never_exceeds_device_budget(layer, n_layers, embed, device, host):
    mb = model_bytes(layer, n_layers, embed)
    try:
        plan = simple_plan(mb, device, host)
    except BudgetError as err:
        assert "budget" in str(err)
        return
    w = layer * 2
    grads = max(layer, embed) * 2
    used = (2 * embed * 2 + mb.work_bytes + (1 + plan.prefetch_depth) * w + plan.job_slots * grads
            + (len(plan.resident_layers) + plan.turn_keep) * w
            + (mb.activation_bytes * n_layers if plan.activations == Tier.DEVICE else 0))
    assert used <= device
    assert all(0 <= i < n_layers for i in plan.resident_layers)
