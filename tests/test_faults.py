"""Crash consistency through the CLI: SIGKILL at named points, corrupted swap and checkpoint
files, a full disk. After a crash, ``resume_from_checkpoint: auto`` must give the same losses and
the same final weights, bit for bit, as a run that was never interrupted (CPU, fp32, shuffled
data, cosine schedule, clipping on)."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli import checkpoint as ckpt_io
from cli.main import main
from offload.faults import FAULT_ENV
from offload.store import DATA_FILE_NAME
from runs import (
    assert_same_run,
    final_weights,
    one_line_error,
    train_args,
    trajectory,
    write_run_config,
)


def train_subprocess(cfg: Path, fault: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "cli", *train_args(cfg)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run no crash interrupts; every test compares with it."""
    tmp = tmp_path_factory.mktemp("straight")
    assert main(train_args(write_run_config(tmp, "run"))) == 0
    return tmp / "run"


# Where to kill (point, hit count): forward/backward weight reads, optimizer and activation
# writes, and each stage of a checkpoint save; the counts land in different steps. Two more
# counts are drawn at random (seeded). A run makes about 1100 swap reads and 1100 swap writes
# (about 160 of each per step, the rest at start).
KILLS = [("store.read", 300), ("store.write", 700), ("checkpoint.snapshot", 2), ("checkpoint.written", 1),
         ("checkpoint.renamed", 2)]
_rng = random.Random(7)
KILLS += [(p, _rng.randint(1, 900)) for p in ("store.read", "store.write")]


def test_sigkill_anywhere_then_resume_equals_the_straight_run(tmp_path, straight):
    killed = 0
    for k, (point, hit) in enumerate(KILLS):
        cfg = write_run_config(tmp_path, f"crash{k}")
        proc = train_subprocess(cfg, f"{point}:{hit}")
        assert proc.returncode in (-9, 0), proc.stderr
        killed += proc.returncode == -9
        assert main(train_args(cfg)) == 0  # resume_from_checkpoint: auto
        assert_same_run(tmp_path / f"crash{k}", straight)
    assert killed == len(KILLS)  # every point was really reached


def test_checkpoints_do_not_copy_the_model(tmp_path, straight):
    """A checkpoint directory holds JSON only; the swap file keeps at most one version per kept
    checkpoint besides the live one."""
    ckpts = ckpt_io.list_checkpoints(straight)
    assert [c.step for c in ckpts] == [4, 6]  # save_total_limit 2
    for c in ckpts:
        assert sum(f.stat().st_size for f in c.path.rglob("*") if f.is_file()) < 200_000
    units = ckpt_io.CheckpointUnits(ckpts[-1].path)
    state_bytes = sum(e.padded_bytes for e in units.snapshot.extents.values())
    swap_bytes = (straight / "swap" / DATA_FILE_NAME).stat().st_size
    assert swap_bytes < 4 * state_bytes  # live + 2 kept versions, plus scratch (weights, activations)


def test_export_reads_the_latest_checkpoint(tmp_path, straight):
    assert main(["export", str(straight), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    exported: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(shard))
    final = final_weights(straight)
    assert all(torch.equal(exported[k], final[k]) for k in final)


def corrupt_checkpoint_extent(run_dir: Path, ckpt_step: int) -> str:
    ckpt = next(c for c in ckpt_io.list_checkpoints(run_dir) if c.step == ckpt_step)
    units = ckpt_io.CheckpointUnits(ckpt.path)
    name = units.extents["layer.0"]["master"][0][0]
    ext = units.snapshot.extents[name]
    with open(units.nvme_path / DATA_FILE_NAME, "r+b") as f:
        f.seek(ext.offset + random.Random(3).randrange(ext.nbytes))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    return name


def test_corrupted_swap_data_names_tensor_and_file(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run", max_steps=2)
    assert main(train_args(cfg)) == 0
    name = corrupt_checkpoint_extent(tmp_path / "run", 2)
    capsys.readouterr()
    assert main(train_args(cfg, "--set", "train.max_steps=4")) == 2
    line = one_line_error(capsys)
    assert name in line and DATA_FILE_NAME in line and "checksum" in line
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert name in line and DATA_FILE_NAME in line


def test_truncated_swap_file_and_damaged_checkpoint_file_are_one_line_errors(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run", max_steps=2)
    assert main(train_args(cfg)) == 0
    swap_json = tmp_path / "run" / "checkpoints" / "step-2" / "swap.json"
    good = swap_json.read_text()
    swap_json.write_text(good[: len(good) // 2])
    capsys.readouterr()
    assert main(train_args(cfg, "--set", "train.max_steps=4")) == 2
    assert str(swap_json) in one_line_error(capsys)
    swap_json.write_text(good)
    os.truncate(tmp_path / "run" / "swap" / DATA_FILE_NAME, 4096)
    assert main(train_args(cfg, "--set", "train.max_steps=4")) == 2
    line = one_line_error(capsys)
    assert "truncated" in line and DATA_FILE_NAME in line and "'" in line


def test_disk_full_stops_cleanly_and_the_last_checkpoint_resumes(tmp_path, straight, monkeypatch, capsys):
    """ENOSPC injected into the swap file's growth once the first checkpoint exists."""
    real_fallocate, real_save = os.posix_fallocate, ckpt_io.save_checkpoint
    armed = []

    def fallocate(fd: int, offset: int, length: int) -> None:
        if armed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fallocate(fd, offset, length)

    def save_then_arm(*args: object, **kwargs: object) -> Path:
        path = real_save(*args, **kwargs)
        armed.append(True)
        return path

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_then_arm)
    cfg = write_run_config(tmp_path, "run")
    capsys.readouterr()
    assert main(train_args(cfg)) == 2
    line = one_line_error(capsys)
    assert "not enough space" in line and "step-2 is intact" in line
    monkeypatch.undo()
    assert main(train_args(cfg)) == 0
    assert_same_run(tmp_path / "run", straight)


@pytest.mark.parametrize("plan_change", [{"chunk_numel": 8192}, {"optimizer": "host"},
                                         {"optimizer_host_units": 2}])  # the last: from the snapshot, in place
def test_resume_under_another_plan_copies_the_states_and_still_matches(tmp_path, straight, plan_change):
    """A checkpoint whose extents the new plan does not use is read back and written anew."""
    cfg = write_run_config(tmp_path, "run")
    assert main(train_args(cfg, "--set", "train.max_steps=3")) == 0  # checkpoints step-2 and step-3
    (tmp_path / "run" / "checkpoints" / "step-3").rename(tmp_path / "step-3-aside")  # resume from step-2
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**plan, **plan_change}))
    assert main(train_args(cfg)) == 0
    assert_same_run(tmp_path / "run", straight)


@pytest.mark.parametrize("then", [{}, {"optimizer_host_units": 0}], ids=["same-plan", "all-on-the-ssd"])
def test_states_partly_in_ram_checkpoint_and_resume_exactly(tmp_path, straight, then):
    """The first units' states in RAM, the rest on the SSD: a checkpoint holds both (the RAM ones
    copied into the store), and a resume, under the same plan or another, matches the straight run."""
    cfg = write_run_config(tmp_path, "run")
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "optimizer_host_units": 2}))
    assert main(train_args(cfg, "--set", "train.max_steps=3")) == 0
    (tmp_path / "run" / "checkpoints" / "step-3").rename(tmp_path / "step-3-aside")
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "optimizer_host_units": 2, **then}))
    assert main(train_args(cfg)) == 0
    assert_same_run(tmp_path / "run", straight)


def test_reference_engine_checkpoints_resume_exactly(tmp_path):
    """Engines that keep the optimizer states in RAM write them into the store to checkpoint."""
    ref = ["--set", "offload.engine=reference"]
    assert main(train_args(write_run_config(tmp_path, "whole"), *ref)) == 0
    cfg = write_run_config(tmp_path, "split")
    assert main(train_args(cfg, *ref, "--set", "train.max_steps=3")) == 0
    (tmp_path / "split" / "checkpoints" / "step-3").rename(tmp_path / "step-3-aside")
    assert main(train_args(cfg, *ref)) == 0
    assert_same_run(tmp_path / "split", tmp_path / "whole")


def test_a_resume_between_two_records_logs_what_the_uninterrupted_run_logs(tmp_path):
    """logging_steps 4, checkpoints every 3: resumed at step 3, the record of step 4 still averages
    steps 1-4 (the steps since the last record travel in the checkpoint)."""
    every = ["--set", "train.logging_steps=4", "--set", "train.save_steps=3"]
    assert main(train_args(write_run_config(tmp_path, "whole"), *every)) == 0
    cfg = write_run_config(tmp_path, "split")
    assert main(train_args(cfg, *every)) == 0
    (tmp_path / "split" / "checkpoints" / "step-6").rename(tmp_path / "step-6-aside")
    assert main(train_args(cfg, *every)) == 0  # from step 3
    assert [r[0] for r in trajectory(tmp_path / "whole")] == [4, 6]
    assert_same_run(tmp_path / "split", tmp_path / "whole")


def test_a_resume_on_changed_data_says_so(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    assert main(train_args(cfg, "--set", "train.max_steps=3")) == 0
    assert main(train_args(cfg)) == 0  # the same data: no word about it
    assert "changed since" not in capsys.readouterr().out
    cfg = write_run_config(tmp_path, "again")
    assert main(train_args(cfg, "--set", "train.max_steps=3")) == 0
    data = tmp_path / "train.jsonl"
    data.write_text(data.read_text().replace("Record", "Entry"))
    capsys.readouterr()
    assert main(train_args(cfg)) == 0
    out = capsys.readouterr().out
    assert "changed since" in out and str(tmp_path / "again" / "checkpoints" / "step-3") in out


def test_recovery_advice_names_a_checkpoint_that_verifies(tmp_path, capsys):
    """The corrupt extent belongs to the newest checkpoint: the advice names the one before it,
    which verifies; with both corrupt it says none is left."""
    cfg = write_run_config(tmp_path, "run", max_steps=4)
    assert main(train_args(cfg)) == 0
    corrupt_checkpoint_extent(tmp_path / "run", 4)
    capsys.readouterr()
    assert main(train_args(cfg, "--set", "train.max_steps=6")) == 2
    line = one_line_error(capsys)
    assert "checksum" in line and "step-2 verifies" in line and "resume from the last checkpoint" not in line
    corrupt_checkpoint_extent(tmp_path / "run", 2)
    assert main(train_args(cfg, "--set", "train.max_steps=6")) == 2
    assert "none can be resumed" in one_line_error(capsys)
