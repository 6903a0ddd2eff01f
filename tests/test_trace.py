"""The timeline (``offload.trace``): a tiny model trained through the CLI writes trace.json; the
cost model's lanes against the executor's traced concurrency."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import pytest
import torch
import yaml
from test_executor_parity import ALL_NVME, LR, WD, deep_model, make_batches

from cli.data import load_tokenizer
from cli.main import main
from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.step_time import lane_resources
from scheduler.trace import RESOURCES, Tracer, busy_seconds, overlap_seconds

TRACKS = {"compute": "compute", "recompute": "compute", "h2d": "h2d", "d2h": "d2h", "ssd_read": "ssd_read",
          "ssd_write": "ssd_write", "cpu_adam": "cpu_adam"}
"""The trace track of each cost-model resource (``checksum`` and ``io_cpu`` have none: they run
inside the I/O threads' spans)."""


def lane_tracks(gpu: bool) -> dict[str, list[str]]:
    return {lane: sorted({TRACKS[r] for r in resources if r in TRACKS})
            for lane, resources in lane_resources(gpu).items()}


def traced_step(plan, tmp_path, device: str = "cpu") -> list[dict]:
    """The events of the last of three steps of a 6-layer Llama under ``plan``."""
    tracer = Tracer()
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, \
         StreamingExecutor(deep_model("llama", 6), plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)),
                           TrainSettings(weight_decay=WD), device=torch.device(device), tracer=tracer) as ex:
        batches = make_batches(3, 1)
        for k, micro in enumerate(batches):
            if k == len(batches) - 1:
                tracer.start()
            ex.train_step(micro, LR)
        ex.synchronize()
        tracer.stop()
    return [e for e in tracer.to_json()["traceEvents"] if e.get("ph") == "X"]


def test_cli_writes_a_trace_with_every_resource(tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps {i % 5} times."})
                              for i in range(40)) + "\n")
    model = {"model_type": "llama", "vocab_size": len(load_tokenizer(None, None)), "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 64}
    run_dir = tmp_path / "run"
    cfg = {"model": {"config": model}, "data": {"path": str(data), "seq_len": 32},
           "train": {"output_dir": str(run_dir), "max_steps": 3, "micro_batch_size": 2, "logging_steps": 1,
                     "save_steps": 0, "max_grad_norm": 0.0},
           "offload": {"cpu_memory_limit": "12MB", "optimizer_impl": "torch",  # too small for the state: SSD
                       "io_backend": "posix", "recompute": True, "trace": True}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0

    doc = json.loads((run_dir / "trace.json").read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    # no "d2h": on a CPU an update reads one micro-batch's gradients in place, nothing is copied
    assert {e["cat"] for e in events} >= {"step", "compute", "h2d", "ssd_read", "ssd_write", "cpu_adam"}
    assert "d2h" not in {e["cat"] for e in events}
    names = {e["name"] for e in events if e["cat"] == "compute"}
    assert {"forward pre", "forward layer.0", "forward head", "recompute layer.1", "backward layer.0"} <= names
    assert all(e["dur"] >= 0 and {"pid", "tid", "ts"} <= e.keys() for e in events)
    steps = [e for e in events if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 3"]  # the last step only
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert threads == set(RESOURCES)


def test_a_tracer_records_only_between_start_and_stop() -> None:
    tracer = Tracer()
    with tracer.span("compute", "before"):
        pass
    tracer.start()
    with tracer.span("compute", "inside"):
        time.sleep(0.01)
    tracer.add("cpu_adam", "chunk", tracer.clock())
    tracer.stop()
    with tracer.span("compute", "after"):
        pass
    assert [e["name"] for e in tracer.events] == ["inside", "chunk"]
    assert tracer.events[0]["dur"] >= 0.01 * 1e6 * 0.9
    off = Tracer(enabled=False)
    off.start()
    with off.span("compute", "never"):
        pass
    assert off.events == [] and not off.recording


def test_busy_seconds_is_the_union_of_intervals() -> None:
    def ev(cat: str, ts_us: float, dur_us: float) -> dict:
        return {"ph": "X", "cat": cat, "ts": ts_us, "dur": dur_us, "name": "x"}

    events = [ev("compute", 0, 2e6), ev("compute", 1e6, 2e6), ev("compute", 5e6, 1e6),
              ev("ssd_read", 0, 0.5e6), ev("ssd_read", 0.1e6, 0.1e6), {"ph": "M", "name": "thread_name"}]
    assert busy_seconds(events) == {"compute": 4.0, "ssd_read": 0.5}


@pytest.mark.parametrize("swapped", [False, True], ids=["recompute", "swapped-activations"])
def test_the_cost_models_lanes_run_concurrently_in_the_executor(swapped, tmp_path) -> None:
    """Overlapped, the cost model takes each phase of a step (forward, backward) as long as its
    longest lane (``CPU_LANES`` on this machine: compute + Adam sharing the cores, the SSD): the
    executor must run every pair of lanes at once somewhere in a traced step. The compute track
    holds compute only: the main thread's waits (weights loading, an update landing) never fall
    inside it."""
    plan = dataclasses.replace(ALL_NVME, recompute=not swapped, prefetch_depth=1)
    events = traced_step(plan, tmp_path)
    lanes = lane_tracks(gpu=False)
    assert all(tracks for tracks in lanes.values())
    for a, b in itertools.combinations(lanes, 2):
        assert overlap_seconds(events, lanes[a], lanes[b]) > 0, (a, b)
    assert overlap_seconds(events, ["compute"], ["wait"]) == 0


def test_the_synchronous_mode_runs_one_thing_at_a_time(tmp_path) -> None:
    """``overlap: false`` (the cost model's serial sum): the compute overlaps neither the SSD nor
    the optimizer; loads and updates run between the layers. (An SSD event ends when the I/O
    thread's completion callback stamps it, a little after the waiting thread went on: 1 ms of
    slack.)"""
    plan = dataclasses.replace(ALL_NVME, activations=Tier.DEVICE, recompute=False, prefetch_depth=0, overlap=False)
    events = traced_step(plan, tmp_path)
    busy = busy_seconds(events)
    assert busy["compute"] > 0 and busy["ssd_read"] > 0 and busy["ssd_write"] > 0 and busy["cpu_adam"] > 0
    assert overlap_seconds(events, ["compute"], ["ssd_read", "ssd_write", "cpu_adam", "wait"]) < 1e-3


def test_overlap_seconds_intersects_the_unions() -> None:
    def ev(cat: str, ts_s: float, dur_s: float) -> dict:
        return {"ph": "X", "cat": cat, "ts": ts_s * 1e6, "dur": dur_s * 1e6, "name": "x"}

    events = [ev("compute", 0, 2), ev("compute", 1, 2), ev("compute", 5, 1),  # busy [0, 3) and [5, 6)
              ev("ssd_read", 2.5, 3), ev("ssd_write", 2, 0.25), ev("cpu_adam", 10, 1)]  # [2, 2.25) + [2.5, 5.5)
    assert overlap_seconds(events, ["compute"], ["ssd_read", "ssd_write"]) == pytest.approx(0.25 + 0.5 + 0.5)
    assert overlap_seconds(events, ["ssd_read"], ["compute"]) == pytest.approx(1.0)
    assert overlap_seconds(events, ["compute"], ["cpu_adam"]) == 0
    assert overlap_seconds(events, ["compute"], ["gpu"]) == 0


@pytest.mark.parametrize("swapped", [False, True], ids=["recompute", "swapped-activations"])
def test_no_optimizer_state_moves_beside_the_forward(swapped, tmp_path) -> None:
    """The cost model adds the forward's longest lane to the backward's (``step_time.step_time``)
    because the optimizer's jobs start with the backward and the next forward waits for the last
    of them (``pre``'s, updated last, needed first): in a traced step no read or write of the
    optimizer's state overlaps the forward's compute, and some starts during the backward. (An SSD
    event ends when the I/O thread's completion callback stamps it, a little after the waiting
    thread went on: 1 ms of slack.)"""
    plan = dataclasses.replace(ALL_NVME, recompute=not swapped, prefetch_depth=1)
    events = traced_step(plan, tmp_path)

    def spans(prefix: str) -> list[tuple[float, float]]:
        return [(e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] == "compute" and e["name"].startswith(prefix)]

    state_io = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                if e["cat"] in ("ssd_read", "ssd_write") and "exp_avg" in e["name"]]
    forward, backward = spans("forward"), spans("backward")
    assert forward and backward and state_io

    def beside(compute: list[tuple[float, float]], slack_us: float = 1e3) -> list[str]:
        return [name for a, b, name in state_io if any(a < end and start < b - slack_us for start, end in compute)]

    assert beside(forward) == []
    backward_start, backward_end = min(a for a, _ in backward), max(b for _, b in backward)
    assert any(backward_start <= a < backward_end for a, _, _ in state_io)
