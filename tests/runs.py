"""Helpers of the run-level tests: a tiny run config, a fixed plan, what a run left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli.data import load_tokenizer
from offload.tiers import Tier
from scheduler.plan import Plan

STEPS = 6
# Every tensor group through the SSD, optimizer states in several chunks per unit; replayed with
# --plan so that every run (and every resume) uses exactly this plan.
PLAN = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME, chunk_numel=16384,
            device_budget_bytes=16_000_000, host_budget_bytes=8_000_000)  # within 24MB, the configs' limit
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "skipped_steps")  # not timings or I/O counts


def write_run_config(tmp_path: Path, name: str, **train: object) -> Path:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"Record {i}: streaming layers {i % 5} through an SSD, "
                                                    f"{'again ' * (i % 4)}and back."}) + "\n" for i in range(80)))
    cfg = {
        "model": {"config": {"model_type": "llama", "vocab_size": len(load_tokenizer(None, None)),
                             "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"path": str(data), "seq_len": 32, "shuffle": True},
        "train": {"output_dir": str(tmp_path / name), "max_steps": STEPS, "micro_batch_size": 2,
                  "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_grad_norm": 0.5,
                  "logging_steps": 1, "save_steps": 2, "save_total_limit": 2, "seed": 11,
                  "resume_from_checkpoint": "auto", **train},
        "offload": {"cpu_memory_limit": "24MB", "gpu_memory_limit": "16MB", "optimizer_impl": "torch",
                    "io_backend": "posix"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())
    return path


def train_args(cfg: Path, *extra: str) -> list[str]:
    return ["train", str(cfg), "--plan", str(cfg.parent / "plan.json"), *extra]


def trajectory(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in EXACT_KEYS) for r in records]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((run_dir / "final").glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def assert_same_run(run_dir: Path, straight_dir: Path) -> None:
    assert trajectory(run_dir) == trajectory(straight_dir)
    a, b = final_weights(run_dir), final_weights(straight_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def fails_with(capsys: pytest.CaptureFixture[str], args: list[str], *words: str) -> str:
    """``offload-train ARGS`` exits 2 with one line (no traceback) holding every one of ``words``."""
    from cli.main import main

    capsys.readouterr()
    assert main(args) == 2
    line = one_line_error(capsys)
    for word in words:
        assert word in line, line
    assert "Traceback" not in line
    return line




def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
