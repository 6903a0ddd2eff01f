"""Which run a swap store belongs to: ``clean`` removes only the store's own files and never one
another run trains on or owns; a run never resets a store holding another run's checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli import checkpoint as ckpt_io
from cli.main import main
from cli.run_lock import RunLock
from cli.swap import OWNER_FILE, check_owner, claim
from offload.errors import OffloadError
from offload.store_dir import DirectoryLock
from runs import one_line_error, train_args, write_run_config


def _train(cfg: Path, *extra: str) -> int:
    return main(train_args(cfg, *extra))


def test_clean_refuses_a_nvme_path_without_a_store(tmp_path, capsys):
    assert _train(write_run_config(tmp_path, "run")) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("two years of work")
    capsys.readouterr()
    assert main(["clean", str(tmp_path / "run"), "--nvme-path", str(precious), "--yes"]) == 2
    assert "holds no swap store" in one_line_error(capsys)
    assert (precious / "thesis.txt").read_text() == "two years of work"


def test_clean_removes_only_the_stores_files_from_a_shared_folder(tmp_path, capsys):
    shared = tmp_path / "shared"
    (shared / "dataset").mkdir(parents=True)
    (shared / "other_file.txt").write_text("keep")
    (shared / "dataset" / "a").write_text("d")
    assert _train(write_run_config(tmp_path, "run"), "--set", f"offload.nvme_path={shared}") == 0
    assert (shared / "data-000.bin").exists() and (shared / OWNER_FILE).exists()
    assert main(["clean", str(tmp_path / "run"), "--yes"]) == 0
    assert sorted(p.name for p in shared.iterdir()) == ["dataset", "other_file.txt"]
    assert (shared / "dataset" / "a").read_text() == "d"


@pytest.mark.parametrize("held", ["store", "run"])
def test_clean_is_refused_while_a_run_holds_the_swap(tmp_path, capsys, held):
    cfg = write_run_config(tmp_path, "run")
    assert _train(cfg) == 0
    run = tmp_path / "run"
    before = sorted(p.name for p in (run / "swap").iterdir())
    lock = DirectoryLock(run / "swap") if held == "store" else RunLock(run)
    lock.acquire()  # as a training run holds them
    try:
        capsys.readouterr()
        for args in (["--keep-last", "--yes"], ["--yes"]):
            assert main(["clean", str(run), *args]) == 2
            err = one_line_error(capsys)
            assert "a run is using" in err and "stop it first" in err, err
    finally:
        lock.release()
    assert sorted(p.name for p in (run / "swap").iterdir()) == before
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [4, 6]


def test_a_run_does_not_reset_the_store_of_another_run(tmp_path, capsys):
    swap = tmp_path / "swap"
    assert _train(write_run_config(tmp_path, "a"), "--set", f"offload.nvme_path={swap}") == 0
    a = tmp_path / "a"
    assert json.loads((swap / OWNER_FILE).read_text())["output_dir"] == str(a.resolve())
    capsys.readouterr()
    assert _train(write_run_config(tmp_path, "b"), "--set", f"offload.nvme_path={swap}") == 2
    err = one_line_error(capsys)
    assert str(a.resolve()) in err and "offload.nvme_path" in err and "offload-train clean" in err, err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    assert all(ckpt_io.verifies(c) for c in ckpt_io.list_checkpoints(a))
    # clean of b with a's swap is refused too: it would remove a's checkpoints' data
    (tmp_path / "b").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "b.yaml", tmp_path / "b" / "config.yaml")
    (tmp_path / "b" / "final").mkdir()
    capsys.readouterr()
    assert main(["clean", str(tmp_path / "b"), "--nvme-path", str(swap), "--yes"]) == 2
    assert str(a.resolve()) in one_line_error(capsys)
    assert all(ckpt_io.verifies(c) for c in ckpt_io.list_checkpoints(a))


def test_owner_record_rules(tmp_path):
    store, a, b = tmp_path / "swap", tmp_path / "a", tmp_path / "b"
    store.mkdir()
    check_owner(store, b)  # no owner record (an earlier version's store): whoever opens it owns it
    claim(store, a)
    check_owner(store, b)  # a has no checkpoint in it: nothing to lose
    check_owner(store, a)


def test_foreign_checkpoint_advice_does_not_point_at_the_other_store(tmp_path, capsys):
    assert _train(write_run_config(tmp_path, "a")) == 0
    a = tmp_path / "a"
    capsys.readouterr()
    assert _train(write_run_config(tmp_path, "b"), "--set",
                  f"train.resume_from_checkpoint={a / 'checkpoints' / 'step-6'}") == 2
    err = one_line_error(capsys)
    assert "offload-train export" in err and "set offload.nvme_path to" not in err, err
    # and doing it anyway (b on a's swap) is refused: a's checkpoints stay resumable
    assert _train(write_run_config(tmp_path, "b"), "--set",
                  f"train.resume_from_checkpoint={a / 'checkpoints' / 'step-6'}",
                  "--set", f"offload.nvme_path={a / 'swap'}") == 2
    assert str(a.resolve()) in one_line_error(capsys)
    assert all(ckpt_io.verifies(c) for c in ckpt_io.list_checkpoints(a))


def test_clean_takes_a_run_folder_of_the_python_api(tmp_path, capsys):
    """No config.yaml (OffloadEngine, OffloadTrainer): the swap its checkpoints name is found."""
    swap = tmp_path / "elsewhere"
    assert _train(write_run_config(tmp_path, "run"), "--set", f"offload.nvme_path={swap}") == 0
    run = tmp_path / "run"
    (run / "config.yaml").unlink()
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert main(["clean", str(run), "--keep-last"]) == 0  # dry run
    assert f"swap {swap}" in capsys.readouterr().out
    assert main(["clean", str(run), "--keep-last", "--yes"]) == 0
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [6]
    assert ckpt_io.verifies(ckpt_io.list_checkpoints(run)[0])
    assert (swap / OWNER_FILE).exists()
    with pytest.raises(OffloadError, match="not a run folder"):
        from cli.clean import run_clean
        run_clean(tmp_path / "nothing", None, False, False)
