"""``offload-train clean``: what a run's swap holds, and the space given back without losing what
the user keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_faults import train_subprocess

from cli import checkpoint as ckpt_io
from cli.clean import CLEANED_FILE, survey
from cli.main import main
from runs import assert_same_run, final_weights, one_line_error, train_args, write_run_config


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def finished(tmp_path) -> Path:
    assert main(train_args(write_run_config(tmp_path, "run"))) == 0
    return tmp_path / "run"


def test_dry_run_reports_and_removes_nothing(finished, capsys):
    before = tree_bytes(finished)
    capsys.readouterr()
    assert main(["clean", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "live state" in out and "pinned by step-4" in out and "free holes" in out and "dry run" in out
    assert tree_bytes(finished) == before
    usage = survey(finished, finished / "swap")
    assert usage.file_bytes == tree_bytes(finished / "swap") and usage.live_bytes > 0


def test_clean_all_leaves_final_and_train_says_nothing_to_resume(finished, capsys):
    weights = final_weights(finished)
    final_bytes = tree_bytes(finished / "final")
    assert main(["clean", str(finished), "--yes"]) == 0
    assert not (finished / "swap").exists() and not ckpt_io.list_checkpoints(finished)
    kept = tree_bytes(finished) - final_bytes - tree_bytes(finished / "tokenizer")
    assert kept < 50_000  # config, plan, metrics, the marker
    assert (finished / CLEANED_FILE).exists()
    got = final_weights(finished)
    assert all((got[k] == weights[k]).all() for k in weights)
    capsys.readouterr()
    assert main(train_args(finished.parent / "run.yaml")) == 2
    assert "nothing is left to resume" in one_line_error(capsys)
    # export has no checkpoint left to read: it points at final/, and a missing folder is named
    assert main(["export", str(finished), str(finished.parent / "out")]) == 2
    assert str(finished / "final") in one_line_error(capsys)
    assert main(["export", str(finished.parent / "nowhere"), str(finished.parent / "out")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_keep_last_compacts_and_the_run_still_resumes(tmp_path, capsys):
    """A run killed after its step-4 checkpoint: clean --keep-last keeps step-4 only, the swap
    shrinks, and resuming gives the uninterrupted run bit for bit."""
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main(train_args(write_run_config(straight, "run"))) == 0
    cfg = write_run_config(tmp_path, "run")
    assert train_subprocess(cfg, "checkpoint.renamed:2").returncode == -9
    run = tmp_path / "run"
    swap_before = tree_bytes(run / "swap")
    assert main(["clean", str(run), "--keep-last", "--yes"]) == 0
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [4]
    assert tree_bytes(run / "swap") < swap_before
    assert main(train_args(cfg)) == 0  # resume_from_checkpoint: auto
    assert_same_run(run, straight / "run")


def test_clean_all_is_refused_before_training_finished(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "run")
    assert train_subprocess(cfg, "checkpoint.renamed:2").returncode == -9
    capsys.readouterr()
    assert main(["clean", str(tmp_path / "run"), "--yes"]) == 2
    assert "--keep-last" in one_line_error(capsys)
    assert ckpt_io.list_checkpoints(tmp_path / "run")


def test_export_over_an_earlier_model_leaves_only_the_export(finished, capsys):
    """An export into a folder holding another model's weights: those go (as save_pretrained's
    do), so from_pretrained loads the export; a checkpoint or the swap is never a target."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = finished.parent / "out"
    out.mkdir()
    save_file({"stale": torch.zeros(2)}, str(out / "model.safetensors"))
    (out / "pytorch_model.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(finished), str(out)]) == 0
    assert not (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    assert (out / "notes.txt").read_text() == "mine"
    got = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).named_parameters())
    want = final_weights(finished)
    assert all(torch.equal(got[k], want[k]) for k in want)
    capsys.readouterr()
    for target in (ckpt_io.list_checkpoints(finished)[-1].path, finished / "swap"):
        assert main(["export", str(finished), str(target)]) == 2
        assert "folder of its own" in one_line_error(capsys)
