"""Every bad input through ``offload-train train``: one line on stderr, exit 2, no traceback;
non-finite losses reported in the metrics; one run per nvme_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cli.main import main
from offload.io.posix import PosixBackend
from offload.store import SwapStore
from runs import fails_with, read_metrics, train_args, write_run_config


@pytest.mark.parametrize(("override", "words"), [
    ("train.learning_rat=0.1", ["unknown key 'train.learning_rat'", "did you mean 'learning_rate'"]),
    ("offload.nvme_pth=/tmp/x", ["did you mean 'nvme_path'"]),
    ("train.learning_rate=fast", ["train.learning_rate", "'fast'"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size", "0"]),
    ("train.save_steps=-2", ["train.save_steps", "-2"]),
    ("train.max_steps=-7", ["train.max_steps", "-7"]),
    ("offload.cpu_memory_limit=12 parsecs", ["offload.cpu_memory_limit", "12 parsecs"]),
    ("offload.gpu_memory_limit=-1GB", ["offload.gpu_memory_limit"]),
    ("model.name_or_path=/nonexistent/model", ["/nonexistent/model"]),
    ("data.path=/nonexistent/data.jsonl", ["/nonexistent/data.jsonl", "does not exist"]),
    ("train.lr_scheduler_type=reduce_lr_on_plateau", ["train.lr_scheduler_type", "evaluation metric"]),
    ("train.lr_scheduler_type=cosine_with_min_lr", ["cosine_with_min_lr", "min_lr", "train.lr_scheduler_kwargs"]),
])
def test_bad_value_is_one_line(tmp_path, capsys, override, words):
    cfg = write_run_config(tmp_path, "run")
    if override.startswith("model.name_or_path"):
        override = "model={name_or_path: /nonexistent/model}"
    fails_with(capsys, train_args(cfg, "--set", override), *words)


def test_seq_len_past_the_positions_is_an_error_for_a_table_a_warning_for_rotary(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    vocab = yaml.safe_load(cfg.read_text())["model"]["config"]["vocab_size"]
    gpt2 = ["--set", f"model.config={{model_type: gpt2, vocab_size: {vocab}, n_embd: 64, n_layer: 2, n_head: 4, "
                     f"n_positions: 64, bos_token_id: 0, eos_token_id: 0}}"]
    fails_with(capsys, train_args(cfg, "--set", "data.seq_len=65", *gpt2), "data.seq_len 65", "(64)", "position table")
    fails_with(capsys, ["plan", str(cfg), "--set", "data.seq_len=65", *gpt2], "data.seq_len 65", "position table")
    assert main(train_args(cfg, "--set", "data.seq_len=65", "--set", "train.max_steps=1")) == 0  # Llama: rotary
    assert "data.seq_len 65 is longer than the model's max_position_embeddings (64)" in capsys.readouterr().out


def test_empty_data_is_one_line(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails_with(capsys, train_args(cfg, "--set", f"data.path={empty}"), str(empty), "no documents")


def test_undecodable_data_is_one_line(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    fails_with(capsys, train_args(cfg, "--set", f"data.path={bad}"), str(bad), "UTF-8")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_data_is_one_line(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    data = tmp_path / "train.jsonl"
    data.chmod(0)
    fails_with(capsys, train_args(cfg), str(data), "cannot read")


def test_nvme_path_not_writable_is_one_line(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails_with(capsys, train_args(cfg, "--set", f"offload.nvme_path={blocker}/swap"), "not writable")


def fake_free_bytes(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free_bytes))


def test_ssd_too_small_for_the_plan_fails_before_training(tmp_path, capsys, monkeypatch):
    cfg = write_run_config(tmp_path, "run")
    fake_free_bytes(monkeypatch, 65 << 20)  # 64 MiB stay untouched: 1 MiB for a ~10 MiB store
    fails_with(capsys, train_args(cfg), "not enough space under", "nvme_path")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step ran


def test_ssd_too_small_for_the_checkpoints_fails_before_training(tmp_path, capsys, monkeypatch):
    cfg = write_run_config(tmp_path, "run", max_steps=40, save_steps=1, save_total_limit=None)
    fake_free_bytes(monkeypatch, 160 << 20)  # the live store fits, 39 held versions of its states do not
    fails_with(capsys, train_args(cfg), "not enough space under", "checkpoints keep up to 39 versions",
               "save_total_limit")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ram_budget_too_small_for_one_layer_is_one_line(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    line = fails_with(capsys, ["train", str(cfg), "--set", "offload.cpu_memory_limit=256KB",
                               "--set", "offload.gpu_memory_limit=128KB"])
    assert "memory_limit" in line or "budget" in line


def test_resume_with_another_model_or_data_config_is_refused(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run", max_steps=2)
    assert main(train_args(cfg)) == 0
    more = ["--set", "train.max_steps=4"]
    fails_with(capsys, train_args(cfg, *more, "--set", "model.config.hidden_size=128"), "another model")
    fails_with(capsys, train_args(cfg, *more, "--set", "data.seq_len=16"), "data.seq_len", "32", "16")
    fails_with(capsys, train_args(cfg, *more, "--set", "train.seed=3"), "train.seed")
    assert main(train_args(cfg, *more)) == 0  # the run's own config still resumes


def test_second_run_on_the_same_nvme_path_is_refused(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with SwapStore(tmp_path / "run" / "swap", PosixBackend(direct=False)):  # the running one
        metrics.write_text('{"step": 1, "loss": 9.0}\n')
        fails_with(capsys, train_args(cfg), "in use by another offload-train process")
        assert metrics.read_text() == '{"step": 1, "loss": 9.0}\n'  # the refused run touched nothing


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_follows_nan_policy_and_shows_in_metrics(tmp_path, capsys, policy):
    # A learning rate this large overflows the weights after the first update (step 2: warmup
    # makes step 1's learning rate 0).
    cfg = write_run_config(tmp_path, "run", max_steps=4, learning_rate=1e38, max_grad_norm=0.0, nan_policy=policy)
    if policy == "stop":
        fails_with(capsys, train_args(cfg), "loss is", "nan_policy: skip")
        return
    assert main(train_args(cfg)) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, False, True, True]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert records[-1]["loss"] is None  # strict JSON (jq reads it): no NaN literal

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in metrics.jsonl")

    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    cfg = write_run_config(tmp_path, "run")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "cli", *train_args(cfg, "--set", f"data.path={empty}")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    assert json.dumps(str(empty))[1:-1] in proc.stderr
