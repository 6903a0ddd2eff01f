"""Run folders users can move and copy: a checkpoint names its swap store relative to the run
folder, so a moved or copied run resumes from its own store, bit for bit; a checkpoint whose
states live in another store than the configured one is refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_faults import train_subprocess

from cli import checkpoint as ckpt_io
from cli.main import main
from runs import assert_same_run, one_line_error, train_args, write_run_config

KILL_AFTER_SECOND_CHECKPOINT = "checkpoint.renamed:2"  # step-4 written, then SIGKILL


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    assert main(train_args(write_run_config(tmp, "run"))) == 0
    return tmp / "run"


def killed_run(tmp_path: Path, name: str) -> Path:
    cfg = write_run_config(tmp_path, name)
    proc = train_subprocess(cfg, KILL_AFTER_SECOND_CHECKPOINT)
    assert proc.returncode == -9, proc.stderr
    assert [c.step for c in ckpt_io.list_checkpoints(tmp_path / name)] == [2, 4]
    return tmp_path / name


def test_checkpoints_name_their_store_relative_to_the_run_folder(tmp_path):
    run = killed_run(tmp_path, "a")
    swap = (run / "checkpoints" / "step-4" / ckpt_io.SWAP_FILE).read_text()
    assert '"nvme_path": "swap"' in swap and str(tmp_path) not in swap


def test_a_moved_run_folder_resumes_from_itself(tmp_path, straight):
    killed_run(tmp_path, "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert main(train_args(write_run_config(tmp_path, "b"))) == 0  # resume_from_checkpoint: auto
    assert_same_run(tmp_path / "b", straight)


def test_a_copied_run_folder_reads_only_its_own_store(tmp_path, straight):
    killed_run(tmp_path, "a")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "a")  # the original is gone: nothing may be read from it
    assert main(train_args(write_run_config(tmp_path, "c"))) == 0
    assert_same_run(tmp_path / "c", straight)


def test_a_checkpoint_in_another_store_than_the_configured_one_is_one_line(tmp_path, capsys):
    run = killed_run(tmp_path, "a")
    cfg = write_run_config(tmp_path, "a")
    capsys.readouterr()
    assert main(train_args(cfg, "--set", f"offload.nvme_path={tmp_path / 'elsewhere'}")) == 2
    line = one_line_error(capsys)
    assert str((run / "swap").resolve()) in line and str((tmp_path / "elsewhere").resolve()) in line
    assert "offload.nvme_path" in line


def test_any_checkpoint_exports_the_weights_of_its_step(tmp_path, straight):
    """step-4 of a killed run and of the straight run are the same weights; the straight run's
    last checkpoint is its final/."""
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        out = {}
        for shard in directory.glob("*.safetensors"):
            out.update(load_file(shard))
        return out

    run = killed_run(tmp_path, "a")
    assert main(["export", str(run / "checkpoints" / "step-4"), str(tmp_path / "a4"), "--dtype", "float32"]) == 0
    assert main(["export", str(straight / "checkpoints" / "step-4"), str(tmp_path / "s4"), "--dtype", "float32"]) == 0
    assert main(["export", str(straight / "checkpoints" / "step-6"), str(tmp_path / "s6"), "--dtype", "float32"]) == 0
    a4, s4, s6, final = (tensors(tmp_path / "a4"), tensors(tmp_path / "s4"), tensors(tmp_path / "s6"),
                         tensors(straight / "final"))
    assert a4.keys() == s4.keys() == s6.keys() == final.keys()
    assert all(torch.equal(a4[k], s4[k]) for k in a4) and any(not torch.equal(s4[k], s6[k]) for k in s4)
    assert all(torch.equal(s6[k], final[k].float()) for k in s6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "a4")  # a self-contained Hugging Face folder
