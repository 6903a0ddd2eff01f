"""Run-folder checkpoints: ``checkpoints/step-N/`` holds everything needed to continue exactly.

Layout of one checkpoint (written to ``step-N.tmp`` and renamed when complete, so a directory
named ``step-N`` is always whole)::

    units/<unit>.safetensors   flat fp32 master, exp_avg, exp_avg_sq of each unit
    units.json                 each unit's parameters: name, shape, offset in the flat buffer
    trainer_state.json         step, data position, lr-scheduler state, RNG states, loss scale,
                               fingerprint of the model config
    config.json                the Hugging Face model config (``export`` needs nothing else)

Writing copies the optimizer state once per checkpoint; ``bench/RESULTS.md`` has what it costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from offload.errors import OffloadError
from scheduler.model_map import ParamSlot, Unit

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


def model_fingerprint(hf_config_dict: dict[str, Any], units: Iterable[Unit]) -> str:
    """A hash of the model's shape: a checkpoint only resumes into the same model."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head")
    shape = {k: hf_config_dict.get(k) for k in keys}
    layout = [[u.name, [[s.name, list(s.shape)] for s in u.params]] for u in units]
    return hashlib.sha256(json.dumps([shape, layout], sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: Path, step: int,
                    unit_states: Iterable[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]],
                    trainer_state: dict[str, Any], hf_config: Any, total_limit: int | None = None) -> Path:
    """Write ``checkpoints/step-{step}`` atomically; keep at most ``total_limit`` checkpoints."""
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "units").mkdir(parents=True)
    layout = []
    for unit, master, exp_avg, exp_avg_sq in unit_states:
        save_file({"master": master.contiguous(), "exp_avg": exp_avg.contiguous(),
                   "exp_avg_sq": exp_avg_sq.contiguous()}, str(tmp / "units" / f"{unit.name}.safetensors"))
        layout.append({"name": unit.name, "params": [
            {"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in unit.params]})
    (tmp / "units.json").write_text(json.dumps(layout))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    hf_config.save_pretrained(tmp)
    _fsync_tree(tmp)
    old = root / f"step-{step}.old"
    if final.exists():  # never a moment without a complete step-N: move it aside, then drop it
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old.path)
    return final


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first (``*.tmp`` directories are incomplete and ignored)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            found.append(CheckpointInfo(p, int(p.name[5:])))
    return sorted(found, key=lambda c: c.step)


def resolve_resume(run_dir: Path, value: str | None) -> CheckpointInfo | None:
    """``None``: start fresh; ``"auto"``: the latest checkpoint of this run, if any; else a path."""
    if value is None:
        return None
    if value == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "trainer_state.json").exists():
        raise OffloadError(f"resume_from_checkpoint: {path} is not a checkpoint directory (no "
                           f"trainer_state.json); give a checkpoints/step-N directory or 'auto'")
    return CheckpointInfo(path, read_trainer_state(CheckpointInfo(path, 0))["step"])


def read_trainer_state(ckpt: CheckpointInfo) -> dict[str, Any]:
    try:
        state = json.loads((ckpt.path / "trainer_state.json").read_text())
        int(state["step"])
        dict(state["data_position"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OffloadError(f"checkpoint {ckpt.path} is damaged (trainer_state.json: {err}); delete it "
                           f"to resume from the one before") from None
    return state


def drop_checkpoints_after(run_dir: Path, step: int) -> None:
    """Remove checkpoints newer than ``step`` (left by a run this one resumes before its end)."""
    for c in list_checkpoints(run_dir):
        if c.step > step:
            shutil.rmtree(c.path)


class CheckpointUnits:
    """Reads units back from a checkpoint: the executor's ``resume`` callable."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir = ckpt_dir
        self.layout = {u["name"]: u["params"] for u in json.loads((ckpt_dir / "units.json").read_text())}

    def __call__(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.dir / "units" / f"{unit.name}.safetensors"
        saved = self.layout.get(unit.name)
        expected = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in unit.params]
        if saved != expected or not path.exists():
            raise OffloadError(f"checkpoint {self.dir} does not match this model (unit {unit.name}); "
                               f"resume with the config the run was started with, or start fresh")
        t = load_file(str(path))
        return t["master"], t["exp_avg"], t["exp_avg_sq"]

    def named_masters(self) -> Iterable[tuple[str, list[ParamSlot], torch.Tensor]]:
        """(unit name, parameter slots, flat master) per unit, one unit in memory at a time."""
        for name, params in self.layout.items():
            slots = [ParamSlot(p["name"], tuple(p["shape"]), p["offset"], p["numel"]) for p in params]
            master = load_file(str(self.dir / "units" / f"{name}.safetensors"))["master"]
            yield name, slots, master


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
