"""The timeline (``offload.trace``): a tiny model trained through the CLI writes trace.json."""

from __future__ import annotations

import json
import time

import yaml

from cli.data import load_tokenizer
from cli.main import main
from scheduler.trace import RESOURCES, Tracer, busy_seconds


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
    assert {e["cat"] for e in events} >= {"step", "compute", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_adam"}
    names = {e["name"] for e in events if e["cat"] == "compute"}
    assert {"forward layer.0", "recompute layer.1", "backward layer.0"} <= names
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
