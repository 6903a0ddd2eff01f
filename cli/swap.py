"""A run's swap store: opened fresh or at a checkpoint, room for checkpoint versions checked
before training, and the optimizer states of engines that keep them in RAM written into it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import checkpoint as ckpt_io
from offload.errors import OffloadError, format_bytes
from offload.io.base import align_up
from offload.store import SwapStore, TensorSpec
from scheduler.executor import ResumeState, state_extents
from scheduler.model_map import Unit

OWNER_FILE = "owner.json"
"""In the store's folder: the run folder (``train.output_dir``, resolved) whose swap it is."""


@dataclass(frozen=True)
class StoreStart:
    """How an engine starts on the prepared store."""

    resume: ResumeState | None  # reads a checkpoint's states (copied into the engine's tier)
    state_in_store: bool  # the store already holds the states under the engine's extent names


def prepare_store(store: SwapStore, run_dir: Path, ckpt: ckpt_io.CheckpointInfo | None,
                  units: tuple[Unit, ...], chunk_numel: int | None) -> StoreStart:
    """Empty the store for a fresh run, or reopen it at checkpoint ``ckpt``; the store is then
    recorded as ``run_dir``'s (``OWNER_FILE``). A store holding another run's checkpoints is refused.

    Every checkpoint of the run keeps its snapshot held. When the checkpoint's extents are the
    ones an executor with ``chunk_numel`` (optimizer states on NVME; ``None`` otherwise) uses,
    the store is reopened at them and nothing is copied; else the states are read from the
    snapshot and written anew by the engine.
    """
    check_owner(store.root, run_dir)
    if ckpt is None:
        claim(store.root, run_dir)
        store.reset()  # nothing to keep: the engine writes every tensor at start
        return StoreStart(None, False)
    saved = ckpt_io.CheckpointUnits(ckpt.path)
    ckpt_io.check_in_store(saved, store.root)
    saved.check_units(units)
    claim(store.root, run_dir)
    held = ckpt_io.held_snapshots(run_dir, store.root)
    if chunk_numel is not None and saved.in_store(state_extents(units, chunk_numel), store.root):
        store.restore(saved.snapshot, held)
        return StoreStart(None, True)
    store.restore(None, held)
    return StoreStart(saved, False)


def store_owner(store_root: Path) -> Path | None:
    """The run folder the store at ``store_root`` belongs to; ``None`` when it has no owner record
    (stores written by earlier versions, or an unreadable record): it belongs to whoever opens it."""
    try:
        return Path(json.loads((store_root / OWNER_FILE).read_text())["output_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_owner(store_root: Path, run_dir: Path) -> Path | None:
    """The other run folder whose checkpoints still live in the store at ``store_root``, if any:
    starting fresh, resetting or compacting that store would destroy them."""
    owner = store_owner(store_root)
    if owner is None or owner == run_dir.resolve():
        return None
    return owner if ckpt_io.held_snapshots(owner, store_root) else None  # gone, moved or cleaned: free


def check_owner(store_root: Path, run_dir: Path) -> None:
    """Refuse a store that holds the checkpoints of another run."""
    owner = foreign_owner(store_root, run_dir)
    if owner is not None:
        raise OffloadError(f"the swap store {store_root.resolve()} belongs to the run {owner}, whose checkpoints "
                           f"live in it; give this run its own offload.nvme_path, or `offload-train clean "
                           f"{owner}` first")


def claim(store_root: Path, run_dir: Path) -> None:
    """Record ``run_dir`` as the store's owner (written atomically)."""
    tmp = store_root / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps({"output_dir": str(run_dir.resolve())}) + "\n")
    os.replace(tmp, store_root / OWNER_FILE)


def check_checkpoint_room(store: SwapStore, units: Iterable[Unit], versions: int, states_in_store: bool,
                          itemsize: int = 4) -> None:
    """Fail before training unless the SSD holds ``versions`` more copies of the optimizer
    states (checkpoints keep one each; ``itemsize`` bytes per element) besides what is allocated now."""
    state_bytes = sum(3 * align_up(itemsize * u.numel) for u in units)
    copies = versions if states_in_store else versions + 1  # RAM states: the live copy is written too
    need = max(copies * state_bytes - store.reusable_bytes, 0)
    try:
        store.require_room(need)
    except OffloadError as err:
        raise OffloadError(f"{err} (checkpoints keep up to {copies} versions of the optimizer state, "
                           f"{format_bytes(state_bytes)} each; lower train.save_total_limit)") from None


def checkpoint_versions(start_step: int, total_steps: int, save_steps: int, total_limit: int | None) -> int:
    """Checkpoints held while training still writes: each pins one version of the optimizer
    state. The last step's checkpoint pins nothing new (no write follows it)."""
    saves = sum(1 for s in range(start_step + 1, total_steps) if save_steps and s % save_steps == 0)
    return min(saves, total_limit) if total_limit else saves


def write_states(store: SwapStore, unit_states: Iterable[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]]
                 ) -> list[ckpt_io.UnitExtents]:
    """Write each unit's (master, exp_avg, exp_avg_sq) into the store, one extent per tensor,
    for engines that keep them in RAM; returns where they are, for ``save_checkpoint``."""
    out: list[ckpt_io.UnitExtents] = []
    for unit, *flats in unit_states:
        if unit.numel == 0:  # nothing trainable: no state
            out.append((unit, {k: [] for k in ckpt_io.STATE_KINDS}))
            continue
        names = {kind: f"ckpt.{unit.name}.{kind}" for kind in ckpt_io.STATE_KINDS}
        store.reserve([TensorSpec(names[k], flat.dtype, (unit.numel,))
                       for k, flat in zip(ckpt_io.STATE_KINDS, flats, strict=True)])
        futures = [store.write(names[k], flat.contiguous()) for k, flat in zip(ckpt_io.STATE_KINDS, flats, strict=True)]
        for f in futures:
            f.result()
        out.append((unit, {k: [(names[k], 0, unit.numel)] for k in ckpt_io.STATE_KINDS}))
    return out
