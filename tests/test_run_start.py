"""How ``train`` starts in a run folder: nothing in the folder is written before every start-up
check has passed (a refused run leaves config.yaml, plan.json, metrics.jsonl and the checkpoints
as they were); one run per folder at a time (a lock on the folder); a resume from an older
checkpoint verifies it before the newer ones go, and says which go; a resume keeps the CPU AdamW
kernel its checkpoint was trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import offload
from cli import checkpoint as ckpt_io
from cli.main import main
from cli.run_lock import LOCK_FILE, RunLock
from runs import assert_same_run, one_line_error, train_args, write_run_config


def set_key(cfg: Path, section: str, key: str, value: object) -> Path:
    doc = yaml.safe_load(cfg.read_text())
    doc[section][key] = value
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def snapshot_files(run: Path) -> dict[str, bytes]:
    """The run folder's records (not the swap data)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "swap" not in p.relative_to(run).parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run keeping every checkpoint (step-2, step-4, step-6), optimizer_impl torch."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(train_args(write_run_config(tmp, "run", save_total_limit=None))) == 0
    assert [c.step for c in ckpt_io.list_checkpoints(tmp / "run")] == [2, 4, 6]
    return tmp / "run"


def copy_run(finished: Path, tmp_path: Path, name: str = "run", **train: object) -> Path:
    shutil.copytree(finished, tmp_path / name)
    cfg = write_run_config(tmp_path, name, save_total_limit=None, **train)
    return set_key(cfg, "data", "path", str(finished.parent / "train.jsonl"))  # the run's own data


def damage_only(run: Path, step: int) -> None:
    """Flip bytes of an extent that checkpoint ``step`` holds and no other checkpoint does."""
    def extents(s: int) -> dict:
        return json.loads((run / "checkpoints" / f"step-{s}" / ckpt_io.SWAP_FILE).read_text())["snapshot"]["extents"]

    others = {e["offset"] for c in ckpt_io.list_checkpoints(run) if c.step != step for e in extents(c.step).values()}
    offset = next(e["offset"] for e in extents(step).values() if e["offset"] not in others)
    with open(run / "swap" / "data-000.bin", "r+b") as f:
        f.seek(offset + 20)
        f.write(b"\xde\xad\xbe\xef")


# -- 1. a resume from an older checkpoint --------------------------------------------------------

def test_resume_from_a_damaged_older_checkpoint_keeps_the_newer_ones(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path, resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "step-2"))
    run = tmp_path / "run"
    damage_only(run, 2)
    before = snapshot_files(run)
    capsys.readouterr()
    assert main(train_args(cfg)) != 0
    err = one_line_error(capsys)
    assert "step-2" in err and "step-6 verifies" in err, err
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [2, 4, 6]
    assert snapshot_files(run) == before  # config.yaml, metrics.jsonl, checkpoints: untouched


def test_resume_from_an_older_checkpoint_says_which_newer_ones_go(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path, resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "step-2"))
    shutil.rmtree(tmp_path / "run" / "final")
    capsys.readouterr()
    assert main(train_args(cfg)) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "drops the newer checkpoints" in line]
    assert len(said) == 1 and "step-4, step-6" in said[0], out
    assert_same_run(tmp_path / "run", finished)  # the branch from step-2 trains the same steps again


# -- 2. one run per folder -----------------------------------------------------------------------

def test_a_second_train_on_a_running_folder_is_one_line_and_writes_nothing(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path, learning_rate=0.5)
    set_key(cfg, "offload", "nvme_path", str(tmp_path / "other_swap"))  # the swap's own lock does not apply
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    before = snapshot_files(run)
    capsys.readouterr()
    with RunLock(run):  # the running run
        assert main(train_args(cfg)) != 0
    err = one_line_error(capsys)
    assert "in use by another offload-train run" in err and "output_dir" in err, err
    assert snapshot_files(run) == before
    assert not (tmp_path / "other_swap").exists()


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path, finished):
    cfg = copy_run(finished, tmp_path)
    run = tmp_path / "run"
    for c in ckpt_io.list_checkpoints(run)[1:]:
        shutil.rmtree(c.path)
    shutil.rmtree(run / "final")
    assert (run / LOCK_FILE).exists()  # left by the finished run: no process holds it
    assert main(train_args(cfg)) == 0
    assert_same_run(run, finished)


# -- 3. a refused run writes nothing -------------------------------------------------------------

def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path, learning_rate=0.5, max_steps=8)
    set_key(cfg, "data", "seq_len", 16)  # a resume key: refused
    assert_refused_leaving_the_folder(tmp_path / "run", cfg, capsys, "data.seq_len")


def test_a_refused_model_change_leaves_config_and_plan(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path, max_steps=8)
    doc = yaml.safe_load(cfg.read_text())
    doc["model"]["config"]["intermediate_size"] = 96  # another model: the fingerprint check refuses it
    cfg.write_text(yaml.safe_dump(doc))
    assert_refused_leaving_the_folder(tmp_path / "run", cfg, capsys, "another model")


def assert_refused_leaving_the_folder(run, cfg, capsys, words: str) -> None:
    """``train`` on ``cfg`` stops in one line naming ``words``; no file of ``run`` changed."""
    before = snapshot_files(run)
    capsys.readouterr()
    assert main(train_args(cfg)) != 0
    assert words in one_line_error(capsys)
    assert snapshot_files(run) == before


def test_plan_does_not_replace_a_runs_plan_json(tmp_path, finished, capsys):
    cfg = copy_run(finished, tmp_path)
    set_key(cfg, "train", "micro_batch_size", 4)
    run = tmp_path / "run"
    before = (run / "plan.json").read_bytes()
    assert main(["plan", str(cfg)]) == 0
    assert "plan not written" in capsys.readouterr().out
    assert (run / "plan.json").read_bytes() == before


# -- 4. the CPU AdamW kernel a resume uses --------------------------------------------------------

def test_checkpoints_record_the_optimizer_impl_and_auto_resumes_with_it(tmp_path, finished, monkeypatch):
    assert ckpt_io.read_trainer_state(ckpt_io.list_checkpoints(finished)[0])["optimizer_impl"] == "torch"
    cfg = copy_run(finished, tmp_path)
    set_key(cfg, "offload", "optimizer_impl", "auto")
    run = tmp_path / "run"
    for c in ckpt_io.list_checkpoints(run)[1:]:
        shutil.rmtree(c.path)
    shutil.rmtree(run / "final")

    def no_timing(requested: str = "auto", *a: object, **k: object) -> tuple[str, list]:
        if requested == "auto":
            return "deepspeed", []  # what timing might pick this time
        return requested, []

    monkeypatch.setattr(offload, "choose_impl", no_timing)
    assert main(train_args(cfg)) == 0
    assert_same_run(run, finished)
    assert ckpt_io.read_trainer_state(ckpt_io.list_checkpoints(run)[-1])["optimizer_impl"] == "torch"


class _Made:
    def __init__(self, impl: str) -> None:
        self.impl = impl


def _make(unusable: set[str]):  # noqa: ANN202
    def make(impl: str, config: object) -> _Made:
        if impl in unusable:
            raise ImportError(f"no {impl} here")
        return _Made(impl)
    return make


def test_optimizer_impl_keeps_the_saved_kernel_or_warns(monkeypatch, capsys):
    from cli.train import optimizer_impl

    monkeypatch.setattr(offload, "choose_impl", lambda requested="auto", *a, **k:
                        ("torch" if requested == "auto" else requested, []))
    impl, made = optimizer_impl("auto", "deepspeed", None, _make(set()))
    assert (impl, made.impl) == ("deepspeed", "deepspeed") and capsys.readouterr().out == ""
    impl, _ = optimizer_impl("auto", None, None, _make(set()))  # a fresh run (or an old checkpoint): timed
    assert impl == "torch" and capsys.readouterr().out == ""
    impl, _ = optimizer_impl("auto", "deepspeed", None, _make({"deepspeed"}))  # not available here
    out = capsys.readouterr().out.splitlines()
    assert impl == "torch" and len(out) == 1 and "warning" in out[0] and "last bits" in out[0], out
    impl, _ = optimizer_impl("torch", "deepspeed", None, _make(set()))  # the config names the other one
    out = capsys.readouterr().out.splitlines()
    assert impl == "torch" and len(out) == 1 and "warning" in out[0] and "last bits" in out[0], out
    impl, _ = optimizer_impl("torch", "torch", None, _make(set()))
    assert impl == "torch" and capsys.readouterr().out == ""
