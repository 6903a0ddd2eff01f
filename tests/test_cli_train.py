"""End to end through the CLI: train, resume, export, reload with transformers; bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from cli.data import load_tokenizer
from cli.main import main

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "peak_device_bytes",
               "peak_host_bytes", "io_read_bytes", "io_write_bytes"}


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return len(load_tokenizer(None, None))


def tiny_config(vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64}


def write_texts(path: Path, n: int = 60) -> Path:
    lines = [json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times."})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(tmp_path: Path, name: str, model: dict, data_path: Path, **train) -> Path:
    cfg = {
        "model": model,
        "data": {"path": str(data_path), "seq_len": 32},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 4, "micro_batch_size": 2,
                  "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2, "seed": 7,
                  "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_grad_norm": 1.0, **train},
        "offload": {"cpu_memory_limit": "24MB", "gpu_memory_limit": "16MB", "optimizer_impl": "torch",
                    "io_backend": "posix"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def checkpoint_dir(tmp_path, vocab_size) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in tiny_config(vocab_size).items()
                                                            if k != "model_type"}))
    out = tmp_path / "base-model"
    model.save_pretrained(out, max_shard_size="100KB")  # sharded safetensors
    load_tokenizer(None, None).save_pretrained(out)  # as the hub stores a model: with its tokenizer
    assert (out / "model.safetensors.index.json").exists()
    return out


def test_train_from_checkpoint_then_export_and_reload(tmp_path, checkpoint_dir):
    data = write_texts(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path, "run", {"name_or_path": str(checkpoint_dir)}, data)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "final", "checkpoints/step-2", "checkpoints/step-4"):
        assert (run / name).exists(), name
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r.keys() >= METRIC_KEYS for r in records)
    assert records[-1]["io_read_bytes"] > 0 and records[-1]["io_write_bytes"] > 0
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    ids = torch.randint(0, final.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(final(ids).logits, exported(ids).logits)
    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_native_engine_matches_reference_engine(tmp_path, vocab_size):
    data = write_texts(tmp_path / "train.jsonl")
    model = {"config": tiny_config(vocab_size)}
    assert main(["train", str(write_config(tmp_path, "native", model, data))]) == 0
    assert main(["train", str(write_config(tmp_path, "ref", model, data)), "--set", "offload.engine=reference"]) == 0
    native, ref = read_metrics(tmp_path / "native"), read_metrics(tmp_path / "ref")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(native, ref, strict=True)) <= 1e-5
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "native" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_resume_continues_exactly(tmp_path, vocab_size):
    data = write_texts(tmp_path / "train.jsonl")
    model = {"config": tiny_config(vocab_size)}
    # A schedule that does not depend on max_steps, so stopping at 2 is an interruption.
    sched = {"lr_scheduler_type": "constant_with_warmup"}
    assert main(["train", str(write_config(tmp_path, "straight", model, data, **sched))]) == 0
    cfg = write_config(tmp_path, "split", model, data, resume_from_checkpoint="auto", **sched)
    assert main(["train", str(cfg), "--set", "train.max_steps=2"]) == 0
    assert main(["train", str(cfg)]) == 0  # picks up checkpoints/step-2
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    split = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split")}
    assert straight == split
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pure_bf16_matches_reference_resumes_exactly_and_exports_bf16(tmp_path, vocab_size):
    """model.state_dtype: bfloat16 trains with bf16 master weights and Adam states: the same
    math as the in-memory reference engine's bf16 model, checkpoints and resumes bit for bit."""
    data = write_texts(tmp_path / "train.jsonl")
    model = {"config": tiny_config(vocab_size), "dtype": "bfloat16", "state_dtype": "bfloat16"}
    train = {"lr_scheduler_type": "constant_with_warmup", "max_grad_norm": 0.0}
    assert main(["train", str(write_config(tmp_path, "native", model, data, **train))]) == 0
    assert main(["train", str(write_config(tmp_path, "ref", model, data, **train)),
                 "--set", "offload.engine=reference"]) == 0
    cfg = write_config(tmp_path, "split", model, data, resume_from_checkpoint="auto", **train)
    assert main(["train", str(cfg), "--set", "train.max_steps=2"]) == 0
    assert main(["train", str(cfg)]) == 0  # resumes at checkpoints/step-2
    native = [r["loss"] for r in read_metrics(tmp_path / "native")]
    assert native == [r["loss"] for r in read_metrics(tmp_path / "ref")]
    assert native == [r["loss"] for r in read_metrics(tmp_path / "split")]
    finals = [AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict()
              for name in ("native", "ref", "split")]
    for k, v in finals[0].items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, finals[1][k]) and torch.equal(v, finals[2][k]), k


@pytest.mark.parametrize("fmt", ["txt", "input_ids"])
def test_other_data_formats(tmp_path, vocab_size, fmt):
    if fmt == "txt":
        data = tmp_path / "train.txt"
        data.write_text("\n\n".join(f"Paragraph {i} about streaming weights through an SSD." for i in range(80)))
    else:
        data = tmp_path / "train.jsonl"
        g = torch.Generator().manual_seed(0)
        data.write_text("\n".join(json.dumps({"input_ids": torch.randint(0, vocab_size, (40,), generator=g).tolist()})
                                  for _ in range(30)))
    cfg = write_config(tmp_path, fmt, {"config": tiny_config(vocab_size)}, data, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    assert len(read_metrics(tmp_path / fmt)) == 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("override", "expected"), [
    ("train.learning_rat=0.1", "did you mean 'learning_rate'"),
    ("train.micro_batch_size=0", "micro_batch_size"),
    ("offload.cpu_memory_limit=lots", "cpu_memory_limit"),
    ("data.path=/nonexistent/data.jsonl", "/nonexistent/data.jsonl"),
    ("model.name_or_path=/nonexistent/model", "/nonexistent/model"),
    ("model.state_dtype=bfloat16", "needs model.dtype: bfloat16"),
    ("model.state_dtype=float16", "model.state_dtype"),
])
def test_bad_config_is_one_line_error(tmp_path, vocab_size, override, expected):
    data = write_texts(tmp_path / "train.jsonl")
    model = {"config": tiny_config(vocab_size)}
    if override.startswith("model.name_or_path"):
        model = {"name_or_path": "/nonexistent/model"}
        override = "train.seed=1"
    cfg = write_config(tmp_path, "bad", model, data)
    proc = run_cli("train", str(cfg), "--set", override)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]


def test_shipped_quickstart_runs(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # data.path in the quickstart is relative to the repository root
    out = tmp_path / "qs"
    sets = ["--set", f"train.output_dir={out}", "--set", "train.max_steps=3", "--set", "train.save_steps=0"]
    assert main(["plan", "configs/quickstart.yaml", *sets]) == 0
    assert json.loads((out / "plan.json").read_text())["optimizer"] == "nvme"  # it really streams
    assert main(["train", "configs/quickstart.yaml", *sets]) == 0
    assert len(read_metrics(out)) == 1  # logging_steps 10: only the last step is logged
    assert (out / "final" / "config.json").exists()


def test_checkpoints_from_before_state_dtype_resume_only_as_fp32(tmp_path):
    from cli.config import config_from_dict
    from cli.train import _check_resume_keys, resume_keys
    from offload.errors import OffloadError

    base = {"model": {"config": tiny_config(64), "dtype": "bfloat16"}, "data": {"path": "x.jsonl"},
            "train": {"output_dir": str(tmp_path)}}
    old_keys = {k: v for k, v in resume_keys(config_from_dict(base)).items() if k != "model.state_dtype"}
    _check_resume_keys(config_from_dict(base), {"resume_keys": old_keys}, tmp_path)  # fp32: fine
    pure = {**base, "model": {**base["model"], "state_dtype": "bfloat16"}}
    with pytest.raises(OffloadError, match="model.state_dtype = 'float32'"):
        _check_resume_keys(config_from_dict(pure), {"resume_keys": old_keys}, tmp_path)
