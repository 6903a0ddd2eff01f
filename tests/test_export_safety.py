"""A failed export never leaves a half-written model folder; file-system, safetensors, config.json
and missing-package errors are one line (exit 2), with nothing already saved lost."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import cli.export
from cli.main import main, os_error_line
from offload.errors import OffloadError
from runs import fails_with, train_args, write_run_config

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run with checkpoints (read-only for the tests: they copy what they change)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_run_config(tmp, "run")
    assert main(train_args(cfg)) == 0
    return tmp / "run"


def full_disk_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> None:
    """safetensors' save_file fails as on a full disk after ``n_ok`` files."""
    real = cli.export.save_file
    calls = {"n": 0}

    def save(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > n_ok:
            Path(args[1]).write_bytes(b"half")  # what a full disk leaves behind
            raise SafetensorError(ENOSPC_TEXT)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli.export, "save_file", save)


def test_export_on_a_full_disk_is_one_line_and_leaves_no_folder(trained_run, tmp_path, capsys, monkeypatch):
    full_disk_after(monkeypatch, 1)
    out = tmp_path / "exported"
    line = fails_with(capsys, ["export", str(trained_run), str(out)], "no space left", str(out),
                      "checkpoints/step-6", "intact")
    assert "SafetensorError" not in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial folder is gone too


def test_failed_export_leaves_an_earlier_export_as_it_was(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk_after(monkeypatch, 0)
    fails_with(capsys, ["export", str(trained_run), str(out)], "no space left", "left as it was")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_into_an_existing_folder_keeps_its_other_files_and_drops_stale_weights(trained_run, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "model.safetensors").write_bytes(b"an older model")
    assert main(["export", str(trained_run), str(out)]) == 0
    assert (out / "README.md").read_text() == "mine"
    assert not (out / "model.safetensors").exists()
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    assert not (tmp_path / ".exported.partial").exists()


def test_partial_folder_of_a_killed_export_is_replaced(trained_run, tmp_path):
    (tmp_path / ".exported.partial").mkdir()
    (tmp_path / ".exported.partial" / "model-00001-of-00009.safetensors").write_bytes(b"half")
    assert main(["export", str(trained_run), str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert not (tmp_path / "exported" / "model-00001-of-00009.safetensors").exists()


def test_final_on_a_full_disk_leaves_no_final_and_names_the_checkpoint(tmp_path, capsys, monkeypatch):
    cfg = write_run_config(tmp_path, "run")
    full_disk_after(monkeypatch, 1)  # train writes its checkpoints elsewhere (cli.checkpoint)
    line = fails_with(capsys, train_args(cfg), "no space left", "final", "checkpoints are intact",
                      "offload-train export")
    run = tmp_path / "run"
    assert str(run / "checkpoints" / "step-6") in line
    assert not (run / "final").exists() and not (run / ".final.partial").exists()
    assert (run / "checkpoints" / "step-6").is_dir()
    monkeypatch.undo()
    assert main(["export", str(run / "checkpoints" / "step-6"), str(run / "final")]) == 0
    assert (run / "final" / "model.safetensors.index.json").is_file()


# -- any OSError, safetensors' errors ----------------------------------------------------------------
@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOTDIR, ["Not a directory", "not a folder"]),
    (errno.EEXIST, ["File exists", "in the way"]),
    (errno.EISDIR, ["Is a directory"]),
    (errno.EIO, ["Input/output error", "disk"]),
    (errno.ENOSPC, ["No space left", "free space"]),
])
def test_every_os_error_is_one_line(code, words):
    import os

    line = os_error_line(OSError(code, os.strerror(code), "/some/path"), "export")
    for word in [*words, "/some/path", "run export again"]:
        assert word in line, line


def test_os_error_outside_the_known_codes_is_one_line_from_main(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fails_with(capsys, ["profile", "--nvme-path", str(a_file), "--size", "128MiB"], str(a_file))


def test_export_between_a_file_and_a_folder_is_one_line(trained_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fails_with(capsys, ["export", str(trained_run), str(a_file)], "is a file, not a folder")
    fails_with(capsys, ["export", str(trained_run), str(a_file / "sub")], "File exists", str(a_file))
    fails_with(capsys, ["export", str(a_file), str(tmp_path / "out")], "is a file, not a run folder")
    assert a_file.read_text() == "x"


def test_safetensors_error_reaching_main_is_one_line(capsys, monkeypatch):
    import cli.export as export

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setattr(export, "export_run", broken)
    fails_with(capsys, ["export", "/nowhere", "/nowhere2"], "incomplete metadata")


# -- a broken checkpoint: config.json, a truncated shard ---------------------------------------------
@pytest.mark.parametrize(("text", "words"), [
    ("{bad", ["not valid JSON"]),
    ("[1, 2]", ["JSON list, not an object"]),
    ('{"hidden_size": 64}', ["no model_type"]),
    ('{"model_type": "llamaX"}', ["'llamaX'", "does not know"]),
    ('{"model_type": "llama", "hidden_size": "64"}', ["hidden_size", "expected int"]),
])
def test_broken_config_json_of_a_checkpoint_is_one_line(trained_run, tmp_path, capsys, text, words):
    ckpt = tmp_path / "step-6"
    shutil.copytree(trained_run / "checkpoints" / "step-6", ckpt)
    (ckpt / "config.json").write_text(text)
    fails_with(capsys, ["export", str(ckpt), str(tmp_path / "out")], str(ckpt / "config.json"), *words)
    assert not (tmp_path / "out").exists()


def _sharded_checkpoint(directory: Path) -> Path:
    directory.mkdir()
    shards = {"model-00001-of-00002.safetensors": {"a": torch.zeros(64, 64)},
              "model-00002-of-00002.safetensors": {"b": torch.ones(64, 64)}}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name))
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_truncated_shard_of_a_sharded_checkpoint_is_one_line(tmp_path):
    from scheduler.hf_checkpoint import checkpoint_files

    ckpt = _sharded_checkpoint(tmp_path / "ckpt")
    assert set(checkpoint_files(ckpt)) == {"a", "b"}
    shard = ckpt / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(OffloadError, match="model-00002-of-00002.safetensors is not a readable.*truncated"):
        checkpoint_files(ckpt)


# -- io_backend kvikio without the package ------------------------------------------------------------
def test_kvikio_backend_without_kvikio_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)  # import kvikio: ImportError
    from offload.io import make_backend

    with pytest.raises(OffloadError, match="gpu-cu12"):
        make_backend("kvikio")
    cfg = write_run_config(tmp_path, "run")
    fails_with(capsys, [*train_args(cfg), "--set", "offload.io_backend=kvikio"], "kvikio", "gpu-cu12", "posix")
    fails_with(capsys, ["profile", "--nvme-path", str(tmp_path / "prof"), "--io-backend", "kvikio",
                        "--size", "128MiB"], "kvikio", "gpu-cu12")
