"""Evaluation during training: ``eval_loss`` at every ``eval_steps`` equals plain transformers on
the weights of that step, training is the same with and without it, TensorBoard gets the same
numbers, and bad eval data is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from cli.checkpoint import CheckpointUnits
from cli.export import write_hf_model
from cli.main import main
from runs import PLAN, one_line_error, read_metrics
from scheduler.materialize import empty_model

VOCAB = 199
SEQ = 12


def write_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    return directory


def write_rows(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g).tolist()}) + "\n"
                            for _ in range(n)))
    return path


def write_config(tmp_path: Path, run: str, **train: object) -> Path:
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        write_checkpoint(ckpt)
        write_rows(tmp_path / "train.jsonl", 16, 1)
        write_rows(tmp_path / "eval.jsonl", 7, 2)  # not a multiple of the batch sizes
    cfg = {
        "model": {"name_or_path": str(ckpt)},
        "data": {"path": str(tmp_path / "train.jsonl"), "seq_len": SEQ, "shuffle": True,
                 "eval_path": str(tmp_path / "eval.jsonl")},
        "train": {"output_dir": str(tmp_path / run), "max_steps": 4, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 2,
                  "max_grad_norm": 1.0, "seed": 3, "per_device_eval_batch_size": 3, **train},
        "offload": {"cpu_memory_limit": "24MB", "optimizer_impl": "torch", "io_backend": "posix"},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())  # through the SSD
    return path


def train(cfg: Path, *extra: str) -> int:
    return main(["train", str(cfg), "--plan", str(cfg.parent / "plan.json"), *extra])


def plain_eval_loss(model_dir: Path, eval_rows: Path) -> float:
    """transformers on the saved weights: each row's mean token loss, averaged (equal lengths)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([json.loads(line)["input_ids"] for line in eval_rows.read_text().splitlines()])
    with torch.no_grad():
        return float(torch.stack([model(input_ids=row[None], labels=row[None]).loss for row in ids]).mean())


def test_eval_loss_equals_transformers_on_the_weights_of_each_step(tmp_path):
    cfg = write_config(tmp_path, "run", eval_strategy="steps", eval_steps=2)
    assert train(cfg) == 0
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    model = empty_model(AutoConfig.from_pretrained(tmp_path / "ckpt"))
    for record in evals:
        ckpt = tmp_path / "run" / "checkpoints" / f"step-{record['step']}"
        units = CheckpointUnits(ckpt)
        out = write_hf_model(tmp_path / f"weights-{record['step']}", units.named_masters(), len(units.layout),
                             model, torch.float32)
        assert abs(record["eval_loss"] - plain_eval_loss(out, tmp_path / "eval.jsonl")) <= 1e-4
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]


def test_training_is_the_same_with_and_without_evaluation(tmp_path):
    assert train(write_config(tmp_path, "with", eval_strategy="steps", eval_steps=1)) == 0
    assert train(write_config(tmp_path, "without", eval_strategy="no")) == 0
    with_eval = [r for r in read_metrics(tmp_path / "with") if "loss" in r]
    without = read_metrics(tmp_path / "without")
    assert [(r["step"], r["loss"]) for r in with_eval] == [(r["step"], r["loss"]) for r in without]
    from safetensors.torch import load_file

    for shard in (tmp_path / "without" / "final").glob("*.safetensors"):
        a, b = load_file(shard), load_file(tmp_path / "with" / "final" / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_gets_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path, "run", eval_strategy="steps", eval_steps=2, report_to="tensorboard")
    assert train(cfg) == 0
    # resumed from step 2: steps 3-4 run again, and TensorBoard shows them once, as metrics.jsonl
    (tmp_path / "run" / "checkpoints" / "step-4").rename(tmp_path / "step-4-aside")
    assert train(cfg, "--set", "train.resume_from_checkpoint=auto") == 0
    events = EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    records = read_metrics(tmp_path / "run")
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        scalars = events.Scalars(tag)
        want = [r for r in records if key in r]
        assert [e.step for e in scalars] == [r["step"] for r in want]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in want], rel=1e-6)


@pytest.mark.parametrize("case", ["empty", "no targets", "no eval_path"])
def test_bad_eval_data_is_one_line(tmp_path, capsys, case):
    cfg = write_config(tmp_path, "run", eval_strategy="steps")
    doc = yaml.safe_load(cfg.read_text())
    if case == "empty":
        (tmp_path / "eval.jsonl").write_text("")
        expected = ["data.eval_path", "eval.jsonl", "no documents"]
    elif case == "no targets":
        (tmp_path / "eval.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7], "labels": [-100] * 3}) + "\n")
        doc["data"]["packing"] = False
        expected = ["data.eval_path", "no target tokens"]
    else:
        del doc["data"]["eval_path"]
        expected = ["train.eval_strategy", "data.eval_path"]
    cfg.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert train(cfg) == 2
    line = one_line_error(capsys)
    assert all(e in line for e in expected), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
