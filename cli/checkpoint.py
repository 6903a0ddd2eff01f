"""Run-folder checkpoints: ``checkpoints/step-N/`` holds everything needed to continue exactly.

The master weights and Adam states (fp32, or bf16 for pure bf16 training) already live in the swap store (``offload.nvme_path``),
so a checkpoint does not copy them: it is a *snapshot* of the store's extents (copy on write: the
next update of a tensor goes to a fresh extent, the snapshot keeps the old bytes) plus small JSON
files. Layout of one checkpoint (written to ``step-N.tmp`` and renamed when complete, so a
directory named ``step-N`` is always whole)::

    swap.json            the swap directory, and each state tensor's extent (offset, size, checksum)
    units.json           each unit's parameters (name, shape, offset in the flat buffer) and which
                         extents hold its master, exp_avg and exp_avg_sq (element ranges)
    trainer_state.json   step, data position, lr-scheduler state, loss scale, model fingerprint
    config.json          the Hugging Face model config (``export`` needs nothing else)

The store holds the snapshot of every checkpoint on disk: deleting a checkpoint (rotation) lets
its extents be reused. After a crash, ``cli.swap.prepare_store`` reopens the store at a
checkpoint's snapshot. ``bench/RESULTS.md`` has what a checkpoint costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offload.errors import CorruptionError, OffloadError
from offload.faults import fault_point
from offload.snapshot_reader import SnapshotReader
from offload.store import Snapshot, SwapStore
from scheduler.model_map import ParamSlot, Unit

CHECKPOINTS_DIR = "checkpoints"
SWAP_FILE = "swap.json"
UNITS_FILE = "units.json"
STATE_FILE = "trainer_state.json"
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")

UnitExtents = tuple[Unit, dict[str, list[tuple[str, int, int]]]]
"""A unit and, per state kind, the store extents holding it: (extent name, first element, end)."""


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


def save_checkpoint(run_dir: Path, step: int, store: SwapStore, units: list[UnitExtents],
                    trainer_state: dict[str, Any], hf_config: Any, total_limit: int | None = None,
                    write_extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoints/step-{step}`` atomically; keep at most ``total_limit`` checkpoints.

    ``units`` says which store extents hold each unit's optimizer state (all writes to them must
    be finished); they are snapshotted, not copied. ``write_extras(dir)`` adds the model's other
    files (generation config, persistent buffers) that an export of the checkpoint needs.
    """
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    snap = store.snapshot([name for _, kinds in units for ranges in kinds.values() for name, _, _ in ranges])
    fault_point("checkpoint.snapshot")
    try:
        tmp.mkdir(parents=True)
        layout = [{"name": unit.name, "params": _params_doc(unit), "extents": kinds} for unit, kinds in units]
        (tmp / UNITS_FILE).write_text(json.dumps(layout))
        (tmp / SWAP_FILE).write_text(json.dumps({"nvme_path": store_reference(run_dir, store.root),
                                                 "snapshot": snap.to_dict()}))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
        hf_config.save_pretrained(tmp)
        if write_extras is not None:
            write_extras(tmp)
        _fsync_tree(tmp)
        fault_point("checkpoint.written")
    except BaseException:
        store.release(snap.snapshot_id)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root / f"step-{step}.old"
    replaced = _snapshot_id(final) if final.exists() else None
    if final.exists():  # never a moment without a complete step-N: move it aside, then drop it
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("checkpoint.renamed")
    if old.exists():
        shutil.rmtree(old)
    if replaced is not None and replaced != snap.snapshot_id:
        store.release(replaced)
    if total_limit:
        for gone in list_checkpoints(run_dir)[:-total_limit]:
            remove_checkpoint(gone, store)
    return final


def remove_checkpoint(ckpt: CheckpointInfo, store: SwapStore) -> None:
    """Delete a checkpoint and give its snapshot's extents back to the store."""
    snapshot_id = _snapshot_id(ckpt.path)
    shutil.rmtree(ckpt.path)
    if snapshot_id is not None:
        store.release(snapshot_id)


def _params_doc(unit: Unit) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in unit.params]


def _snapshot_id(ckpt_dir: Path) -> str | None:
    """The snapshot a checkpoint holds, or ``None`` when its swap.json is unreadable."""
    try:
        return str(json.loads((ckpt_dir / SWAP_FILE).read_text())["snapshot"]["snapshot_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    """A checkpoint's unit layout and snapshot; reads units back (the executor's ``resume``
    callable, and ``export``) straight from the swap file, checksums verified."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir = ckpt_dir
        units = _read_json(ckpt_dir / UNITS_FILE)
        swap = _read_json(ckpt_dir / SWAP_FILE)
        try:
            self.layout: dict[str, list[dict[str, Any]]] = {u["name"]: u["params"] for u in units}
            self.extents: dict[str, dict[str, list[list[Any]]]] = {u["name"]: u["extents"] for u in units}
            self.nvme_path = resolve_store(ckpt_dir, swap["nvme_path"])
            snapshot_doc = swap["snapshot"]
        except (KeyError, TypeError) as err:
            raise OffloadError(f"checkpoint {ckpt_dir} is damaged (missing {err} in {UNITS_FILE} or "
                               f"{SWAP_FILE}); resume from another checkpoint") from None
        self.snapshot = Snapshot.from_dict(snapshot_doc, str(ckpt_dir / SWAP_FILE))

    def check_units(self, units: Iterable[Unit]) -> None:
        """Raise unless the checkpoint was made for exactly these units."""
        units = list(units)
        if [u.name for u in units] != list(self.layout) or any(self.layout[u.name] != _params_doc(u) for u in units):
            raise OffloadError(f"checkpoint {self.dir} does not match this model; resume with the config "
                               f"the run was started with, or start fresh")

    def in_store(self, units: Iterable[UnitExtents], nvme_path: Path) -> bool:
        """True when ``nvme_path`` holds this snapshot under exactly the extents ``units`` name:
        the store can be reopened at it as is, nothing copied."""
        if nvme_path.resolve() != self.nvme_path:
            return False
        return all({k: [list(r) for r in kinds[k]] for k in STATE_KINDS} == self.extents.get(u.name)
                   for u, kinds in units)

    def __call__(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A unit's flat (master, exp_avg, exp_avg_sq), in the dtype they were saved in."""
        if self.layout.get(unit.name) != _params_doc(unit):
            raise OffloadError(f"checkpoint {self.dir} does not match this model (unit {unit.name}); "
                               f"resume with the config the run was started with, or start fresh")
        with SnapshotReader(self.nvme_path, self.snapshot) as reader:
            master, exp_avg, exp_avg_sq = (self._read(reader, unit.name, kind) for kind in STATE_KINDS)
        return master, exp_avg, exp_avg_sq

    def _read(self, reader: SnapshotReader, unit_name: str, kind: str) -> torch.Tensor:
        ranges = self.extents[unit_name][kind]
        dtype = self.snapshot.extents[ranges[0][0]].torch_dtype if ranges else torch.float32
        flat = torch.empty(max((b for _, _, b in ranges), default=0), dtype=dtype)
        for name, a, b in ranges:
            reader.read(name, flat[a:b])
        return flat

    def named_masters(self) -> Iterable[tuple[str, list[ParamSlot], torch.Tensor]]:
        """(unit name, parameter slots, flat master) per unit, one unit in memory at a time."""
        with SnapshotReader(self.nvme_path, self.snapshot) as reader:
            for name, params in self.layout.items():
                slots = [ParamSlot(p["name"], tuple(p["shape"]), p["offset"], p["numel"]) for p in params]
                yield name, slots, self._read(reader, name, "master")


def store_reference(run_dir: Path, store_root: Path) -> str:
    """How a checkpoint names its swap store: relative to the run folder when the store lives
    inside it (the default ``<output_dir>/swap``: a moved or copied run folder then reads its own
    store), absolute otherwise."""
    root, run = store_root.resolve(), run_dir.resolve()
    return str(root.relative_to(run)) if root.is_relative_to(run) else str(root)


def resolve_store(ckpt_dir: Path, reference: str) -> Path:
    """The store a checkpoint's ``swap.json`` names (``checkpoints/step-N`` lies in the run folder)."""
    path = Path(reference)
    return path if path.is_absolute() else (ckpt_dir.parent.parent / path).resolve()


def check_in_store(units: CheckpointUnits, store_root: Path) -> None:
    """A run reads only its own store: refuse a checkpoint whose snapshot lives in another one."""
    if units.nvme_path != store_root.resolve():
        # Never advise pointing this run at the other store: training there overwrites the extents
        # the other run's checkpoints pin. Resume that run itself, or start anew from an export.
        run = units.dir.resolve().parent.parent
        raise OffloadError(f"checkpoint {units.dir} keeps its states in the swap store {units.nvme_path}, but "
                           f"offload.nvme_path names {store_root.resolve()}; resume it as its own run "
                           f"(train.output_dir: {run}, offload.nvme_path: {units.nvme_path}), or run "
                           f"`offload-train export {units.dir} DIR` and start a new run with model.name_or_path: DIR")


def verifies(ckpt: CheckpointInfo) -> bool:
    """Whether every extent of the checkpoint reads back whole with its checksum (reads it all)."""
    try:
        units = CheckpointUnits(ckpt.path)
        with SnapshotReader(units.nvme_path, units.snapshot) as reader:
            for ext in units.snapshot.extents.values():
                reader.read(ext.name, torch.empty(ext.shape, dtype=ext.torch_dtype))
    except (OffloadError, OSError):
        return False
    return True


def recovery_advice(error: str, run_dir: Path, nvme_path: Path) -> str:
    """``error`` (a corrupt or unreadable swap extent), with the checkpoint that can really be
    resumed: the newest whose extents all verify, or the word that none is left."""
    error = error.split("; resume from")[0]
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            in_store = CheckpointUnits(ckpt.path).nvme_path == nvme_path.resolve()
        except OffloadError:
            continue
        if in_store and verifies(ckpt):
            return (f"{error}; {ckpt.path.name} verifies: resume from it with train.resume_from_checkpoint: "
                    f"{ckpt.path} (newer checkpoints fail their checksums)")
    return f"{error}; no checkpoint of {run_dir} verifies, so none can be resumed: start a fresh run"


def held_snapshots(run_dir: Path, nvme_path: Path) -> list[Snapshot]:
    """The snapshots of this run's checkpoints that live in ``nvme_path``: the store must keep
    their extents. A checkpoint whose swap.json is unreadable holds nothing (it cannot be resumed)."""
    held = []
    for ckpt in list_checkpoints(run_dir):
        try:
            units = CheckpointUnits(ckpt.path)
        except OffloadError:
            continue
        if units.nvme_path == nvme_path.resolve():
            held.append(units.snapshot)
    return held


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OffloadError(f"checkpoint {path.parent} has no {path.name}; it was not written by this version "
                           f"of offload-train, or is damaged: resume from another checkpoint") from None
    except (OSError, ValueError) as err:
        raise CorruptionError(f"checkpoint file {path} is damaged ({err}); resume from another "
                              f"checkpoint") from None


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
