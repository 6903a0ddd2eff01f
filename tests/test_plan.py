"""Plan values, the cost model and the planner.

The planner must never choose a plan over a budget (property-based over model shapes, batches
and budgets), and the cost model's byte and memory equations must match what the executor does
(checked against a real run's counters).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig

from offload import AdamWConfig, SwapStore, make_adamw
from offload.errors import BudgetError
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler import cost_model, step_time
from scheduler import placement as placement_rules
from scheduler.cost_model import activation_bytes, estimate, peak_memory, swapped_activation_bytes
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.layer_probe import probe_layer
from scheduler.model_shape import ModelShape, shape_from_config, shape_from_model
from scheduler.plan import Plan
from scheduler.planner import Budgets, choose_plan
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload

GB = 10**9


def profile(gpu: bool, ssd_gbps: float = 3.0, io_compute_s_per_gb: float | None = None,
            ssd_mixed_gbps: float | None = None, ssd_beside_compute_gbps: float | None = None) -> HardwareProfile:
    return HardwareProfile(
        machine="test", nvme_path="/swap", io_backend="posix", ssd_read_gbps=ssd_gbps, ssd_write_gbps=ssd_gbps,
        ssd_mixed_gbps=ssd_mixed_gbps, ssd_beside_compute_gbps=ssd_beside_compute_gbps,
        h2d_gbps=20.0 if gpu else None, d2h_gbps=20.0 if gpu else None,
        cpu_adam_params_per_s={"torch": 1e9}, matmul_tflops={"float32": 50.0 if gpu else 0.2, "bfloat16": 100.0},
        checksum_gbps=5.0, ram_available_bytes=64 * GB, vram_free_bytes=24 * GB if gpu else None,
        disk_free_bytes=2000 * GB, measured_at="test", io_compute_s_per_gb=io_compute_s_per_gb)


def test_plan_round_trips_through_json_dict():
    plan = Plan(weights=Tier.HOST, optimizer=Tier.NVME, grads=Tier.HOST, activations=Tier.NVME,
                prefetch_depth=2, resident_layers=(0, 1), recompute=True, chunk_numel=4096)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict({**plan.to_dict(), "predicted": {"step_s": 1.0}}) == plan  # plan.json extras
    assert "prefetch depth" in str(plan)


@pytest.mark.parametrize("bad", [dict(weights=Tier.DEVICE), dict(chunk_numel=1000), dict(job_slots=0),
                                 dict(recompute=False, activations=Tier.HOST), dict(prefetch_depth=-1)])
def test_invalid_plans_are_refused(bad):
    with pytest.raises(ValueError):
        Plan(**bad)


def test_shape_from_config_counts_a_70b_model_without_memory():
    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    shape = shape_from_config(cfg)
    # per layer: q, o (h x h), k, v (h x h/8 each), 3 MLP matrices, 2 norms
    h, i = 8192, 28672
    assert shape.layer_numel == 2 * h * h + 2 * h * (h // 8) + 3 * h * i + 2 * h
    assert shape.pre_numel == 128256 * h and shape.post_numel == 128256 * h + h
    assert shape.n_layers == 80 and shape.head_dim == 128


# ------------------------------------------------------------------------------------ cost model
SHAPE = ModelShape(n_layers=32, layer_numel=200_000_000, pre_numel=130_000_000, post_numel=130_000_000,
                   hidden=4096, intermediate=11008, n_heads=32, head_dim=128, vocab=32000)
ALL_NVME = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME)


def test_estimate_is_pure_and_accounts_every_resource():
    wl = Workload(micro_batch=1, seq_len=2048, grad_accum=2, compute_dtype="bfloat16", deferred=True)
    a = estimate(ALL_NVME, SHAPE, wl, profile(gpu=True))
    b = estimate(ALL_NVME, SHAPE, wl, profile(gpu=True))
    assert a == b
    assert all(a.time_s[k] > 0 for k in a.time_s if k != "io_cpu")  # io_cpu: CPU-only machines
    assert a.time_s["io_cpu"] == 0
    assert a.step_s >= max(a.time_s["compute"] + a.time_s["recompute"], a.time_s["ssd_read"] + a.time_s["ssd_write"])
    serial = estimate(dataclasses.replace(ALL_NVME, overlap=False, prefetch_depth=0), SHAPE, wl, profile(gpu=True))
    assert serial.step_s == pytest.approx(sum(serial.time_s.values()))
    assert serial.step_s > a.step_s


def test_cpu_only_compute_pays_for_the_bytes_the_store_moves():
    """Without a GPU the store's threads take compute time: the profile's cost per GB moved
    (checksums included), on the CPU lane; nothing without SSD traffic or where a GPU computes."""
    wl = Workload(micro_batch=2, seq_len=512)
    plain = estimate(ALL_NVME, SHAPE, wl, profile(gpu=False))
    costly = estimate(ALL_NVME, SHAPE, wl, profile(gpu=False, io_compute_s_per_gb=0.25))
    moved_gb = (costly.link_bytes["ssd_read"] + costly.link_bytes["ssd_write"]) / 1e9
    assert costly.time_s["io_cpu"] == pytest.approx(0.25 * moved_gb)
    assert costly.time_s["io_cpu"] > costly.time_s["checksum"] > 0
    cpu_lane = lambda e: e.time_s["compute"] + e.time_s["recompute"] + e.time_s["cpu_adam"]  # noqa: E731
    assert costly.step_s >= cpu_lane(costly) + costly.time_s["io_cpu"]
    assert costly.step_s - plain.step_s == pytest.approx(costly.time_s["io_cpu"] - plain.time_s["checksum"])
    host = Plan(weights=Tier.HOST, optimizer=Tier.HOST, grads=Tier.HOST, activations=Tier.HOST)
    assert estimate(host, SHAPE, wl, profile(gpu=False, io_compute_s_per_gb=0.25)).time_s["io_cpu"] == 0
    assert estimate(ALL_NVME, SHAPE, wl, profile(gpu=True, io_compute_s_per_gb=0.25)).time_s["io_cpu"] == 0
    serial = estimate(dataclasses.replace(ALL_NVME, overlap=False), SHAPE, wl,
                      profile(gpu=False, io_compute_s_per_gb=0.25))
    # serial: every resource once, the checksums counted inside io_cpu only
    assert serial.step_s == pytest.approx(sum(serial.time_s.values()) - serial.time_s["checksum"])


def test_host_placement_moves_no_ssd_bytes_and_faster_ssd_is_never_slower():
    wl = Workload(micro_batch=2, seq_len=512)
    host = Plan(weights=Tier.HOST, optimizer=Tier.HOST, grads=Tier.HOST, activations=Tier.HOST)
    est = estimate(host, SHAPE, wl, profile(gpu=False))
    assert est.link_bytes["ssd_read"] == est.link_bytes["ssd_write"] == 0
    slow, fast = (estimate(ALL_NVME, SHAPE, wl, profile(gpu=True, ssd_gbps=g)) for g in (1.0, 4.0))
    assert fast.time_s["ssd_read"] == pytest.approx(slow.time_s["ssd_read"] / 4)
    assert fast.step_s <= slow.step_s


@pytest.mark.parametrize("gpu", [False, True])
def test_a_step_that_reads_and_writes_at_once_gets_the_disks_mixed_rate(gpu):
    """The engine reads and writes concurrently: the bytes both directions move pair up at the
    profile's mixed rate, the rest alone; slower together than one after the other is what the
    step gets (no cap at the serial time), and without a mixed rate the directions add up."""
    wl = Workload(micro_batch=2, seq_len=512, deferred=True)
    serial = estimate(ALL_NVME, SHAPE, wl, profile(gpu, ssd_gbps=3.0))
    read_bytes, write_bytes = serial.link_bytes["ssd_read"], serial.link_bytes["ssd_write"]
    assert read_bytes > write_bytes > 0
    assert serial.time_s["ssd_read"] == pytest.approx(read_bytes / 3e9)
    assert serial.time_s["ssd_write"] == pytest.approx(write_bytes / 3e9)
    for mixed_gbps in (1.0, 6.0):  # slower and faster together than the 1.5 GB/s of one after the other
        mixed = estimate(ALL_NVME, SHAPE, wl, profile(gpu, ssd_gbps=3.0, ssd_mixed_gbps=mixed_gbps))
        assert mixed.link_bytes == serial.link_bytes
        assert mixed.time_s["ssd_write"] == pytest.approx(write_bytes / (mixed_gbps * 1e9))
        assert mixed.time_s["ssd_read"] == pytest.approx(write_bytes / (mixed_gbps * 1e9)
                                                         + (read_bytes - write_bytes) / 3e9)
        assert (mixed.step_s > serial.step_s) == (mixed_gbps < 1.5)


def test_without_a_gpu_the_overlapped_ssd_lane_is_slowed_as_the_store_was_beside_compute():
    """CPU only: the store's threads wait for the cores the compute takes, so an overlapped
    step's SSD time grows by the slowdown the profile saw (beside-compute over mixed rate), never
    shrinks (a beside-compute rate above the mixed one is noise); one thing at a time (overlap off)
    the disk is alone, and on a GPU machine the cores are not the compute's."""
    wl = Workload(micro_batch=2, seq_len=512)
    kw = dict(ssd_gbps=3.0, ssd_mixed_gbps=2.0)
    alone = estimate(ALL_NVME, SHAPE, wl, profile(False, **kw))
    beside = estimate(ALL_NVME, SHAPE, wl, profile(False, **kw, ssd_beside_compute_gbps=0.5))
    for direction in ("ssd_read", "ssd_write"):  # paired and unpaired bytes alike: 4x slower
        assert beside.time_s[direction] == pytest.approx(4 * alone.time_s[direction])
    assert beside.step_s > alone.step_s
    assert estimate(ALL_NVME, SHAPE, wl, profile(False, **kw, ssd_beside_compute_gbps=5.0)).time_s == alone.time_s
    serial = dataclasses.replace(ALL_NVME, overlap=False, prefetch_depth=0)
    assert estimate(serial, SHAPE, wl, profile(False, **kw, ssd_beside_compute_gbps=0.5)).time_s == \
        estimate(serial, SHAPE, wl, profile(False, **kw)).time_s
    assert estimate(ALL_NVME, SHAPE, wl, profile(True, **kw, ssd_beside_compute_gbps=0.5)).time_s == \
        estimate(ALL_NVME, SHAPE, wl, profile(True, **kw)).time_s
    # adapters on a frozen base, deferred updates: the optimizer pass runs beside the next forward
    lora = dataclasses.replace(SHAPE, trainable=(0, SHAPE.layer_numel // 100, 0))
    deferred = Workload(micro_batch=2, seq_len=512, deferred=True)
    rules = deferred.placement(ALL_NVME, lora)
    assert step_time.optimizer_ssd_s(rules, lora, deferred, profile(False, **kw, ssd_beside_compute_gbps=0.5),
                                       gpu=False) == pytest.approx(
        4 * step_time.optimizer_ssd_s(rules, lora, deferred, profile(False, **kw), gpu=False))


# --------------------------------------------------------------------------------------- planner
shapes = st.builds(
    ModelShape, n_layers=st.integers(1, 96), layer_numel=st.integers(10_000, 2_000_000_000),
    pre_numel=st.integers(0, 1_500_000_000), post_numel=st.integers(0, 1_500_000_000),
    hidden=st.integers(64, 16384), intermediate=st.integers(64, 65536), n_heads=st.integers(1, 128),
    head_dim=st.integers(16, 256), vocab=st.integers(256, 256_000))
workloads = st.builds(Workload, micro_batch=st.integers(1, 8), seq_len=st.integers(16, 8192),
                      grad_accum=st.integers(1, 8), compute_dtype=st.sampled_from(["float32", "bfloat16"]),
                      deferred=st.booleans())
budgets = st.builds(Budgets, device_bytes=st.integers(1 << 20, 96 * GB), host_bytes=st.integers(1 << 20, 512 * GB),
                    nvme_bytes=st.integers(1 << 20, 8000 * GB), shared=st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, wl=workloads, b=budgets, gpu=st.booleans(), recompute=st.sampled_from([None, True, False]))
def test_planner_never_exceeds_a_budget(shape, wl, b, gpu, recompute):
    try:
        choice = choose_plan(shape, wl, b, profile(gpu), recompute=recompute)
    except BudgetError as err:
        text = str(err)
        assert "\n" not in text and ("short" in text or "raise" in text), text
        return
    plan, mem = choice.plan, choice.estimate.memory
    assert mem == peak_memory(plan, shape, wl, gpu=gpu)
    if b.shared:  # one RAM: the planner may move the split, never the total
        assert plan.device_budget_bytes + plan.host_budget_bytes <= b.device_bytes + b.host_bytes
    else:
        assert (plan.device_budget_bytes, plan.host_budget_bytes) == (b.device_bytes, b.host_bytes)
    assert mem.device_bytes <= plan.device_budget_bytes
    assert mem.host_bytes <= plan.host_budget_bytes
    assert mem.nvme_bytes <= b.nvme_bytes
    assert all(0 <= i < shape.n_layers for i in plan.resident_layers)
    assert recompute is None or plan.recompute == recompute
    assert choice.estimate.step_s > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, wl=workloads, b=budgets, gpu=st.booleans(), more=st.floats(1.0, 8.0))
def test_more_memory_never_predicts_a_slower_step(shape, wl, b, gpu, more):
    b = dataclasses.replace(b, shared=False)
    try:
        small = choose_plan(shape, wl, b, profile(gpu))
    except BudgetError:
        return
    big_budgets = dataclasses.replace(b, device_bytes=int(b.device_bytes * more), host_bytes=int(b.host_bytes * more))
    big = choose_plan(shape, wl, big_budgets, profile(gpu))
    assert big.estimate.step_s <= small.estimate.step_s * (1 + 1e-9)


def test_infeasible_jobs_say_what_does_not_fit_and_by_how_much():
    wl = Workload(micro_batch=1, seq_len=2048, compute_dtype="bfloat16")
    with pytest.raises(BudgetError, match=r"device budget .* short; raise offload.gpu_memory_limit"):
        choose_plan(SHAPE, wl, Budgets(1 * GB, 100 * GB, 1000 * GB), profile(gpu=True))
    # without a GPU both tiers are the RAM that cpu_memory_limit bounds: that is the key to raise
    with pytest.raises(BudgetError, match=r"device budget .* short; raise offload.cpu_memory_limit"):
        choose_plan(SHAPE, wl, Budgets(GB // 2, GB // 2, 1000 * GB, shared=True), profile(gpu=False))
    with pytest.raises(BudgetError, match=r"training state needs .* short; free space or point offload.nvme_path"):
        choose_plan(SHAPE, wl, Budgets(20 * GB, 10 * GB, 50 * GB), profile(gpu=True))


# ------------------------------------------------------------- cost model against the executor
def _tiny_llama() -> tuple[torch.nn.Module, LlamaConfig]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg), cfg


def _run_two_steps(tmp_path, model, plan: Plan, ga: int, clip: float,
                   weights: dict | None = None) -> tuple[dict, dict, int]:
    """Executor metrics after step 1 and after step 2, and the store's allocated bytes;
    ``weights``: filled with the master weights after step 2."""
    settings_ = TrainSettings(gradient_accumulation_steps=ga, max_grad_norm=clip)
    g = torch.Generator().manual_seed(1)
    batches = [[{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(ga)] for _ in range(2)]
    adamw = make_adamw("torch", AdamWConfig())
    with (SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store,
          StreamingExecutor(model, plan, store, adamw, settings_, device=torch.device("cpu")) as ex):
        ex.train_step(batches[0], lr=1e-3)
        ex.synchronize()
        before = ex.metrics()
        ex.train_step(batches[1], lr=1e-3)
        ex.synchronize()
        after = ex.metrics()  # (reading the masters out may write those resident weights hold)
        if weights is not None:
            weights.update(ex.master_state_dict())
        return before, after, store.allocated_bytes


PLANS = {
    "all-nvme": ALL_NVME,
    "turn-and-resident": dataclasses.replace(ALL_NVME, turn_keep=1, resident_layers=(0,), prefetch_depth=2),
    "host-weights-nvme-state": Plan(weights=Tier.HOST, optimizer=Tier.NVME, grads=Tier.HOST, activations=Tier.HOST),
    "no-recompute": dataclasses.replace(ALL_NVME, recompute=False, activations=Tier.DEVICE),
    "layer-major": dataclasses.replace(ALL_NVME, layer_major=True),
    # the first units' master + Adam states in RAM: their updates and (master weights) loads skip the SSD
    "state-of-first-units-in-ram": dataclasses.replace(ALL_NVME, optimizer_host_units=3, turn_keep=1),
    "state-of-first-units-in-ram-resident": dataclasses.replace(ALL_NVME, optimizer_host_units=2, resident_layers=(0,),
                                                                grads=Tier.HOST),
    "layer-major-turn-and-resident": dataclasses.replace(ALL_NVME, turn_keep=1, resident_layers=(0,), prefetch_depth=2,
                                                         layer_major=True),
    "layer-major-no-recompute": dataclasses.replace(ALL_NVME, recompute=False, activations=Tier.DEVICE,
                                                    layer_major=True),
    # updates take the master from the weights loaded for backward (immediate updates only)
    "master-from-loads": dataclasses.replace(ALL_NVME, master_from_loads=True, turn_keep=1),
    "master-from-loads-layer-major-resident": dataclasses.replace(ALL_NVME, master_from_loads=True, layer_major=True,
                                                                  resident_layers=(0,), optimizer_host_units=3),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("ga, clip", [(1, 0.0), (2, 1.0), (3, 0.0)])
def test_predicted_ssd_bytes_equal_the_executors(tmp_path, plan_name, ga, clip):
    """The cost model's byte equations, term by term, against a real run's counters."""
    model, cfg = _tiny_llama()
    plan = dataclasses.replace(PLANS[plan_name], chunk_numel=8192)  # several chunks per unit
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga, deferred=clip > 0)
    est = estimate(plan, shape_from_model(model, cfg), wl, profile(gpu=False))
    before, after, nvme_bytes = _run_two_steps(tmp_path, model, plan, ga, clip)
    assert after["io_read_bytes"] - before["io_read_bytes"] == est.link_bytes["ssd_read"]
    assert after["io_write_bytes"] - before["io_write_bytes"] == est.link_bytes["ssd_write"]
    assert nvme_bytes <= est.memory.nvme_bytes


@pytest.mark.parametrize("ga", [1, 3])
def test_updates_taking_the_master_from_loaded_weights_read_a_master_less(tmp_path, ga):
    """``master_from_loads``: per step, the SSD reads fall by exactly every streamed layer's
    master (fp32), the writes stay, and the accounted DEVICE peak stays within the prediction
    (the lent weights wait for the optimizer)."""
    model, cfg = _tiny_llama()
    shape = shape_from_model(model, cfg)
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga)
    plain = dataclasses.replace(ALL_NVME, chunk_numel=8192, resident_layers=(0,))
    lent = dataclasses.replace(plain, master_from_loads=True)
    reads, writes = {}, {}
    for name, plan in (("plain", plain), ("lent", lent)):
        before, after, _ = _run_two_steps(tmp_path / name, copy.deepcopy(model), plan, ga, 0.0)
        reads[name] = after["io_read_bytes"] - before["io_read_bytes"]
        writes[name] = after["io_write_bytes"] - before["io_write_bytes"]
        assert after["peak_device_bytes"] <= estimate(plan, shape, wl, profile(gpu=False)).memory.device_bytes
    streamed = shape.n_layers - 1  # layer 0 is resident: its weights are not loaded
    assert reads["plain"] - reads["lent"] == streamed * shape.layer_numel * 4
    assert writes["plain"] == writes["lent"]
    # on a GPU the loaded weights are device memory: the rule does not apply, nothing is predicted
    gpu_est = estimate(lent, shape, wl, profile(gpu=True))
    assert gpu_est.link_bytes["ssd_read"] == estimate(plain, shape, wl, profile(gpu=True)).link_bytes["ssd_read"]


@pytest.mark.parametrize("ga, clip", [(1, 0.0), (2, 1.0)])
def test_updates_of_resident_units_take_the_master_from_their_weights(tmp_path, monkeypatch, ga, clip):
    """On a CPU in fp32 a DEVICE-resident unit's weights are its master: its update (immediate or
    deferred) copies the master from them and publishes it back there, without writing its
    extent. Per step the SSD reads and writes fall by exactly the masters of ``pre``, ``post`` and
    the resident layer against the same run moving them, and the weights read out (masters
    brought up to date in the store) are bitwise the same."""
    model, cfg = _tiny_llama()
    shape = shape_from_model(model, cfg)
    plan = dataclasses.replace(ALL_NVME, chunk_numel=8192, resident_layers=(0,))
    reads, writes, weights = {}, {}, {}
    for name in ("from memory", "from the ssd"):
        if name == "from the ssd":
            monkeypatch.setattr(placement_rules.Placement, "master_on_device", lambda self, i, frozen: False)
        weights[name] = {}
        before, after, _ = _run_two_steps(tmp_path / name.replace(" ", "-"), copy.deepcopy(model), plan, ga, clip,
                                          weights[name])
        reads[name] = after["io_read_bytes"] - before["io_read_bytes"]
        writes[name] = after["io_write_bytes"] - before["io_write_bytes"]
    resident_numel = shape.pre_numel + shape.post_numel + shape.layer_numel
    assert reads["from the ssd"] - reads["from memory"] == resident_numel * 4
    assert writes["from the ssd"] - writes["from memory"] == resident_numel * 4
    assert weights["from memory"].keys() == {n for n, _ in model.named_parameters()}
    for n, w in weights["from memory"].items():
        assert not torch.equal(w, dict(model.named_parameters())[n].detach()), n  # trained
        assert torch.equal(w, weights["from the ssd"][n]), n


def test_masters_resident_weights_hold_reach_their_extents_when_the_executor_closes(tmp_path):
    """The updates leave the master extents of ``pre``, ``post`` and resident layers behind their
    weights (stale after a step); closing the executor writes them, so the store it leaves
    holds every unit's master."""
    model, _ = _tiny_llama()
    plan = dataclasses.replace(ALL_NVME, chunk_numel=8192, resident_layers=(0,))
    batch = {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))}
    adamw = make_adamw("torch", AdamWConfig())
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store:
        with StreamingExecutor(model, plan, store, adamw, TrainSettings(),
                               device=torch.device("cpu")) as ex:
            ex.train_step([batch], lr=1e-3)
            ex.synchronize()
            stale = ex.state.stale_masters()
            assert [u.name for u in stale] == ["pre", "layer.0", "post"]
            resident = {u.name: ex.weights.resident_master(u.index).clone() for u in stale}
            for u in stale:  # the extents still hold the masters from before the step
                assert not torch.equal(ex.state.read_unit(u, "master"), resident[u.name]), u.name
        for u in stale:
            assert torch.equal(ex.state.read_unit(u, "master"), resident[u.name]), u.name
        assert ex.state.stale_masters() == []


@pytest.mark.parametrize("ga, clip, layer_major, recompute_layers", [
    (1, 0.0, False, 0), (2, 1.0, False, 0), (2, 1.0, True, 0), (3, 0.0, True, 0),
    (1, 0.0, False, 1), (2, 1.0, True, 1)])  # the last two: layer 0 recomputed, layer 1 swapped
def test_predicted_swapped_activation_bytes_equal_the_executors(tmp_path, monkeypatch, ga, clip, layer_major,
                                                                recompute_layers):
    """Saved activations swapped through the SSD: the probe's measured size per layer gives the
    executor's extra SSD bytes exactly (every tensor swapped: the model is tiny)."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    model, cfg = _tiny_llama()
    plan = dataclasses.replace(ALL_NVME, recompute=False, chunk_numel=8192, layer_major=layer_major,
                               recompute_layers=recompute_layers)
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga, deferred=clip > 0)
    timing = probe_layer(cfg, wl, torch.device("cpu"))
    assert timing.layer_saved_bytes > 0
    est = estimate(plan, shape_from_model(model, cfg), wl, profile(gpu=False), timing)
    assert swapped_activation_bytes(plan, shape_from_model(model, cfg), wl, timing) > 0
    before, after, nvme_bytes = _run_two_steps(tmp_path, model, plan, ga, clip)
    assert after["io_read_bytes"] - before["io_read_bytes"] == est.link_bytes["ssd_read"]
    assert after["io_write_bytes"] - before["io_write_bytes"] == est.link_bytes["ssd_write"]
    assert nvme_bytes <= est.memory.nvme_bytes
    assert after["peak_device_bytes"] <= est.memory.device_bytes


@pytest.mark.parametrize("ga, clip", [(1, 0.0), (2, 1.0), (4, 0.0)])
def test_planned_memory_holds_in_the_executor(tmp_path, ga, clip):
    """A plan chosen under tight budgets runs, and its accounted peaks stay within the prediction."""
    model, cfg = _tiny_llama()
    shape = shape_from_model(model, cfg)
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga, deferred=clip > 0)
    # a device budget that fits the leanest streaming plan and half a layer more: all layers stream
    lean = dataclasses.replace(ALL_NVME, job_slots=1, chunk_numel=8192)
    device = peak_memory(lean, shape, wl).device_bytes + shape.layer_numel * 2
    choice = choose_plan(shape, wl, Budgets(device, 1 << 20, 1 << 40), profile(gpu=False))
    assert choice.plan.resident_layers == () and choice.plan.optimizer == Tier.NVME
    _, after, nvme_bytes = _run_two_steps(tmp_path, model, choice.plan, ga, clip)
    mem = choice.estimate.memory
    assert after["peak_device_bytes"] <= mem.device_bytes <= device
    assert after["peak_host_bytes"] <= mem.host_bytes <= 1 << 20
    assert nvme_bytes <= mem.nvme_bytes


@pytest.mark.parametrize("plan_name", ["all-nvme", "layer-major", "host-weights-nvme-state"])
def test_a_recomputed_layers_input_is_accounted_until_its_backward_ends(tmp_path, plan_name):
    """A layer's input read back from the SSD (or taken from its tier) is counted from the read
    (the take) to the end of the layer's backward: one layer's held while the next is read
    ahead, never more, within the cost model's peak; every byte freed when the step ends."""
    model, cfg = _tiny_llama()
    shape, plan = shape_from_model(model, cfg), PLANS[plan_name]
    ga = 2 if plan.layer_major else 1
    checkpoint_bytes = 2 * 16 * cfg.hidden_size * 4  # micro-batch 2 x 16 tokens x hidden, fp32
    g = torch.Generator().manual_seed(1)
    batches = [[{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(ga)] for _ in range(2)]
    with (SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store,
          StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig()),
                            TrainSettings(gradient_accumulation_steps=ga), device=torch.device("cpu")) as ex):
        acct, held, most = ex.acct, {}, [0]
        real_alloc, real_free = acct.alloc, acct.free

        def alloc(tier, nbytes, what):  # the real Accountant, watched: which bytes are read back
            real_alloc(tier, nbytes, what)
            if "read back" in what:
                held[nbytes] = held.get(nbytes, 0) + 1
                most[0] = max(most[0], sum(n * c for n, c in held.items()))

        def free(tier, nbytes):
            real_free(tier, nbytes)
            if held.get(nbytes):
                held[nbytes] -= 1

        acct.alloc, acct.free = alloc, free
        for batch in batches:
            used = dict(acct.used_bytes)
            ex.train_step(batch, lr=1e-3)
            ex.synchronize()
            assert acct.used_bytes == used  # every byte held for backward let go
    if plan.activations == Tier.NVME:
        assert most[0] == 2 * checkpoint_bytes  # the layer in backward + the next read ahead
    else:
        assert most[0] == 0
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga)
    assert acct.peak_bytes[Tier.DEVICE] <= peak_memory(plan, shape, wl).device_bytes


@pytest.mark.parametrize("plan_name", ["all-nvme", "layer-major"])
def test_a_failed_checkpoint_read_leaves_nothing_accounted(tmp_path, plan_name):
    """A layer input that cannot be read back fails the step; what the step held is let go, and
    the next step runs with the same bytes in use as before the failed one."""
    from concurrent.futures import Future

    model, _ = _tiny_llama()
    plan = PLANS[plan_name]
    ga = 2 if plan.layer_major else 1
    g = torch.Generator().manual_seed(1)
    batch = [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(ga)]
    with (SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store,
          StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig()),
                            TrainSettings(gradient_accumulation_steps=ga), device=torch.device("cpu")) as ex):
        ex.train_step(batch, lr=1e-3)
        ex.synchronize()
        used = dict(ex.acct.used_bytes)
        real_read = store.read

        def failing_read(name, out):  # the disk refuses the second checkpoint read back
            if name.startswith("act.") and failing_read.calls == 1:
                failing_read.calls += 1
                failed: Future = Future()
                failed.set_exception(OSError(5, "Input/output error"))
                return failed
            failing_read.calls += name.startswith("act.")
            return real_read(name, out)

        failing_read.calls = 0
        store.read = failing_read
        with pytest.raises(OSError):
            ex.train_step(batch, lr=1e-3)
        store.read = real_read
        assert failing_read.calls == 2
        ex.train_step(batch, lr=1e-3)
        ex.synchronize()
        assert ex.acct.used_bytes == used


@pytest.mark.parametrize("ga", [1, 2], ids=["micro-batch", "layer-major"])
def test_a_failed_swap_write_leaves_nothing_accounted(tmp_path, monkeypatch, ga):
    """A saved activation that cannot be written (a full disk) fails the step; every layer's
    swapped activations are let go all the same (the failed one's buffer is not reused), and
    the next step runs with the same bytes in use as before the failed one."""
    from concurrent.futures import Future

    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    model, _ = _tiny_llama()
    plan = dataclasses.replace(ALL_NVME, recompute=False, layer_major=ga > 1)
    g = torch.Generator().manual_seed(1)
    steps = [[{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(ga)] for _ in range(3)]
    with (SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store,
          StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig()),
                            TrainSettings(gradient_accumulation_steps=ga), device=torch.device("cpu")) as ex):
        ex.train_step(steps[0], lr=1e-3)
        ex.synchronize()
        used = dict(ex.acct.used_bytes)
        real_write = store.write

        def failing_write(name, data):  # the disk refuses the second swapped activation
            failing_write.calls += name.startswith("act.")
            if name.startswith("act.") and failing_write.calls == 2:
                failed: Future = Future()
                failed.set_exception(OSError(28, "No space left on device"))
                return failed
            return real_write(name, data)

        failing_write.calls = 0
        store.write = failing_write
        with pytest.raises(OSError):
            ex.train_step(steps[1], lr=1e-3)
        store.write = real_write
        assert not ex.activations.calls
        ex.train_step(steps[2], lr=1e-3)  # (it may use layers prefetched before the error)
        ex.synchronize()
        assert ex.acct.used_bytes == used


def test_workload_rejects_nonsense():
    with pytest.raises(ValueError):
        Workload(micro_batch=0, seq_len=16)
    with pytest.raises(ValueError):
        Workload(micro_batch=1, seq_len=16, compute_dtype="int8")


def test_a_gpu_plan_counts_the_pinned_staging_of_weight_loads():
    """On a GPU every load from the SSD lands in one page-locked buffer of a layer (counted in
    HOST); on a CPU loads read straight into their DEVICE buffer (no such row)."""
    from scheduler.cost_model import placement as placement_rows

    model, cfg = _tiny_llama()
    shape = shape_from_model(model, cfg)
    wl = Workload(micro_batch=2, seq_len=16)
    plan = dataclasses.replace(ALL_NVME, chunk_numel=8192)
    gpu_rows = {g: (t, n) for g, t, n in placement_rows(plan, shape, wl, gpu=True)}
    cpu_rows = {g: (t, n) for g, t, n in placement_rows(plan, shape, wl)}
    assert gpu_rows["pinned staging of weight loads"] == (Tier.HOST, shape.layer_numel * 4)
    assert "pinned staging of weight loads" not in cpu_rows
    host = dataclasses.replace(plan, weights=Tier.HOST)
    assert all(g != "pinned staging of weight loads" for g, _, _ in placement_rows(host, shape, wl, gpu=True))
    # (and the pinned buffers NVMe checkpoints are copied out and read back through: three
    # layer inputs)
    layer_input_bytes = 2 * 16 * cfg.hidden_size * 4
    assert gpu_rows["checkpoints' pinned copies"] == (Tier.HOST, 3 * layer_input_bytes)
    assert (peak_memory(plan, shape, wl, gpu=True).host_bytes - peak_memory(plan, shape, wl).host_bytes
            == shape.layer_numel * 4 + 3 * layer_input_bytes)
    # swapped saved activations pass through pinned host buffers on a GPU: two layers' worth
    swap = dataclasses.replace(plan, recompute=False)
    swap_gpu = {g: (t, n) for g, t, n in placement_rows(swap, shape, wl, gpu=True)}
    swap_cpu = {g: (t, n) for g, t, n in placement_rows(swap, shape, wl)}
    assert "saved activations' pinned buffers" not in swap_cpu
    assert swap_gpu["saved activations' pinned buffers"] == (Tier.HOST, 2 * activation_bytes(shape, wl).saved)


@pytest.mark.parametrize("plan_name", ["layer-major", "layer-major-turn-and-resident"])
def test_a_mixed_precision_layer_major_step_stays_within_the_predicted_device_peak(tmp_path, plan_name):
    """bf16 compute with fp32 state, layer-major: a layer's fp32 sums (counted from its first
    micro-batch) and the fp32 jobs they become are in the cost model's DEVICE peak, in the layer
    phase only; the embeddings' and head's gradients go to the grads tier every micro-batch and
    their bytes moved are the prediction's."""
    model, cfg = _tiny_llama()
    shape, plan = shape_from_model(model, cfg), dataclasses.replace(PLANS[plan_name], chunk_numel=8192)
    ga = 3
    g = torch.Generator().manual_seed(1)
    batches = [[{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(ga)] for _ in range(2)]
    settings_ = TrainSettings(gradient_accumulation_steps=ga, compute_dtype=torch.bfloat16)
    with (SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store,
          StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig()), settings_,
                            device=torch.device("cpu")) as ex):
        ex.train_step(batches[0], lr=1e-3)
        ex.synchronize()
        before = ex.metrics()
        ex.train_step(batches[1], lr=1e-3)
        ex.synchronize()
        after = ex.metrics()
        peak = ex.acct.peak_bytes[Tier.DEVICE]
    wl = Workload(micro_batch=2, seq_len=16, grad_accum=ga, compute_dtype="bfloat16")
    est = estimate(plan, shape, wl, profile(gpu=False))
    rows = {group: nbytes for group, tier, nbytes in cost_model.placement(plan, shape, wl) if tier == Tier.DEVICE}
    assert rows["a layer's gradient sums"] == shape.layer_numel * 4
    assert rows["gradients awaiting the optimizer"] == plan.job_slots * max(shape.layer_numel * 4,
                                                                             shape.largest_unit_numel * 2)
    assert peak <= est.memory.device_bytes
    assert after["io_read_bytes"] - before["io_read_bytes"] == est.link_bytes["ssd_read"]
    assert after["io_write_bytes"] - before["io_write_bytes"] == est.link_bytes["ssd_write"]
    # the heads run without a layer's sums or jobs (each layer's forward waited for its update),
    # with the head's own jobs and, without a turn layer, the last layer still loaded
    act = cost_model.activation_bytes(shape, wl)
    layer_groups = ["layer weights in flight", "a layer's gradient sums", "gradients awaiting the optimizer"]
    head_groups = ["head gradients awaiting the optimizer"] + (["last layer kept through the heads"]
                                                                if not plan.turn_keep else [])
    assert rows["head gradients awaiting the optimizer"] == plan.job_slots * max(shape.pre_numel, shape.post_numel) * 2
    layer_phase = sum(rows[g] for g in layer_groups) + act.layer_work
    head_phase = sum(rows[g] for g in head_groups) + act.head_work
    others = sum(rows.values()) - sum(rows[g] for g in layer_groups + head_groups) - act.work
    assert est.memory.device_bytes == others + max(layer_phase, head_phase)


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_one_job_slot_costs_no_step_time(gpu):
    """Backward queues unit u - 1's compute before it waits for unit u's job, and the worker runs
    one job at a time whatever the slots: one slot predicts the step two do (measured on a CPU,
    where the wait even stops the compute: bench/RESULTS.md); slots trade DEVICE memory only."""
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=8, num_attention_heads=16))
    # (compute about as long as the SSD's share: where waiting for each job would show most)
    wl = Workload(micro_batch=16 if gpu else 1, seq_len=4096 if gpu else 1024,
                  compute_dtype="bfloat16" if gpu else "float32")
    one, two = (estimate(dataclasses.replace(ALL_NVME, job_slots=k), shape, wl, profile(gpu=gpu)) for k in (1, 2))
    assert one.step_s == two.step_s and one.bottleneck == two.bottleneck
    assert one.memory.device_bytes < two.memory.device_bytes


def test_the_optimizers_ssd_traffic_does_not_hide_behind_the_forward():
    """The optimizer's jobs start with the backward (a unit's gradients are its backward's) and
    the next forward waits for the last of them (updated last, needed first): a long forward (32
    micro-batches, layer-major) leaves the SSD idle but for its loads, so the step is at least the
    forward's compute plus every other SSD second, not the larger of the step's compute and SSD."""
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.HOST, layer_major=True)
    wl = Workload(micro_batch=1, seq_len=4096, grad_accum=32, compute_dtype="bfloat16")
    est = estimate(plan, SHAPE, wl, profile(gpu=True))  # (3 GB/s each way, no mixed rate: the seconds add)
    forward_compute_s = est.time_s["compute"] / 3
    forward_loads_s = SHAPE.n_layers * SHAPE.layer_numel * wl.itemsize / (3.0 * GB)  # every layer once
    other_ssd_s = est.time_s["ssd_read"] + est.time_s["ssd_write"] - forward_loads_s
    assert forward_compute_s > forward_loads_s  # the forward is compute-bound: its SSD lane idles
    assert est.step_s >= forward_compute_s + other_ssd_s
    assert est.bottleneck == "ssd (read + write) in backward, compute in forward"
    # two micro-batches: the forward's loads outlast its compute, and the step is the SSD's seconds
    short = estimate(plan, SHAPE, dataclasses.replace(wl, grad_accum=2), profile(gpu=True))
    assert short.time_s["compute"] / 3 < forward_loads_s
    assert short.step_s == pytest.approx(short.time_s["ssd_read"] + short.time_s["ssd_write"])
    assert short.bottleneck == "ssd (read + write)"


def test_a_step_whose_phases_have_different_bottlenecks_names_both_and_is_not_compute_bound():
    """Weights streamed from the SSD, state in RAM, layer-major: the forward's loads outlast its
    compute long after the backward has turned compute-bound, so only where both phases are set
    by compute is the step compute-bound (what ``plan``'s advice searches for)."""
    from scheduler.batch_advice import COMPUTE_LANES

    prof = dataclasses.replace(profile(gpu=True), cpu_adam_params_per_s={"torch": 1e11}, checksum_gbps=100.0)
    plan = Plan(weights=Tier.NVME, optimizer=Tier.HOST, grads=Tier.HOST, activations=Tier.HOST, layer_major=True,
                turn_keep=0)
    named = {}
    for ga in (16, 22, 40):
        wl = Workload(micro_batch=1, seq_len=1024, grad_accum=ga, compute_dtype="bfloat16")
        named[ga] = estimate(plan, SHAPE, wl, prof).bottleneck
    assert named[16] == "ssd (read + write)"
    assert named[22] == "compute in backward, ssd (read + write) in forward"
    assert named[40] == "compute"
    assert [named[ga] in COMPUTE_LANES for ga in (16, 22, 40)] == [False, False, True]
