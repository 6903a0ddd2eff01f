"""``offload-train clean RUN_DIR``: what a run's swap store holds, and giving that space back.

Dry run by default (``--yes`` acts). The report shows the swap file's size and what fills it: the
live state, the versions only one checkpoint pins, and free holes. Then one of:

- everything (the default once ``final/`` exists): the swap folder and every checkpoint go;
  ``final/``, the config, metrics and tokenizer stay, and a ``CLEANED`` marker tells a later
  ``train`` that there is nothing to resume;
- ``--keep-last``: the newest checkpoint stays resumable and everything else goes; its tensors are
  copied (checksums verified) into a new, compact swap file, so the disk space really returns.

The compaction never loses the kept checkpoint: the new store and its ``swap.json`` are built
beside the old ones, then three renames switch to them; an interrupted clean is finished (or
its partial copy dropped) by the next ``clean``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

from cli import checkpoint as ckpt_io
from cli.swap import OWNER_FILE, foreign_owner
from offload.errors import OffloadError, format_bytes
from offload.manifest import DATA_FILE_NAME, MANIFEST_NAME

CLEANED_FILE = "CLEANED"


@dataclass(frozen=True)
class SwapUsage:
    file_bytes: int  # the swap folder's files, as on disk
    live_bytes: int  # the state the next step would read
    pinned_bytes: dict[int, int]  # checkpoint step -> bytes only that checkpoint's versions use
    free_bytes: int  # holes: what no live tensor or checkpoint uses


def survey(run_dir: Path, nvme_path: Path) -> SwapUsage:
    """What the swap holds, from its manifest and the checkpoints' snapshots (nothing is read)."""
    file_bytes = tree_bytes(nvme_path)
    live = _live_extents(nvme_path)
    pinned: dict[int, set[tuple[str, int, int]]] = {}
    for ckpt in ckpt_io.list_checkpoints(run_dir):
        try:
            units = ckpt_io.CheckpointUnits(ckpt.path)
        except OffloadError:
            continue  # a damaged checkpoint pins nothing that can be used
        if units.nvme_path == nvme_path.resolve():
            pinned[ckpt.step] = {(e.file, e.offset, e.padded_bytes) for e in units.snapshot.extents.values()}
    only = {step: sum(n for *_, n in keys - live - set().union(*(v for s, v in pinned.items() if s != step)))
            for step, keys in pinned.items()}
    used = live | set().union(*pinned.values()) if pinned else live
    return SwapUsage(file_bytes, sum(n for *_, n in live), only, max(file_bytes - sum(n for *_, n in used), 0))


def _live_extents(nvme_path: Path) -> set[tuple[str, int, int]]:
    from offload.store import MANIFEST_NAME, Extent

    try:
        doc = json.loads((nvme_path / MANIFEST_NAME).read_text())
        extents = [Extent(n, r["file"], r["offset"], r["nbytes"], r["dtype"], tuple(r["shape"]))
                   for n, r in doc["extents"].items()]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {(e.file, e.offset, e.padded_bytes) for e in extents}


def report(run_dir: Path, nvme_path: Path, usage: SwapUsage) -> str:
    lines = [f"swap {nvme_path}: {format_bytes(usage.file_bytes)} on disk",
             f"  live state                {format_bytes(usage.live_bytes):>12}"]
    lines += [f"  pinned by step-{step:<10} {format_bytes(n):>12}" for step, n in sorted(usage.pinned_bytes.items())]
    lines.append(f"  free holes                {format_bytes(usage.free_bytes):>12}")
    final = run_dir / "final"
    lines.append(f"final/ {'exists' if final.is_dir() else 'does not exist (training has not finished)'}")
    return "\n".join(lines)


def run_store(run_dir: Path) -> Path:
    """The run's swap folder: ``offload.nvme_path`` of its config.yaml; for a run folder of the
    Python API (no config.yaml) the store its newest readable checkpoint names; else
    ``<run folder>/swap`` (the folder itself, wherever it was moved)."""
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        configured = (doc.get("offload") or {}).get("nvme_path")
    except (OSError, yaml.YAMLError, AttributeError):
        configured = None
    if configured:
        return Path(configured)
    if not (run_dir / "config.yaml").is_file():
        for ckpt in reversed(ckpt_io.list_checkpoints(run_dir)):
            try:
                return ckpt_io.CheckpointUnits(ckpt.path).nvme_path
            except OffloadError:
                continue
    return run_dir / "swap"


# What a swap store (offload/store.py, offload/manifest.py, offload/store_dir.py, cli/swap.py) and
# the hardware profile's scratch folders put in ``offload.nvme_path``: clean removes these only.
STORE_FILES = (MANIFEST_NAME, MANIFEST_NAME + ".tmp", DATA_FILE_NAME, ".lock", OWNER_FILE, OWNER_FILE + ".tmp")
STORE_PREFIXES = (".write-probe-", ".profile-")


def is_store(path: Path) -> bool:
    """Whether ``path`` holds a swap store (its manifest or its data file)."""
    return (path / MANIFEST_NAME).is_file() or (path / DATA_FILE_NAME).is_file()


def store_entries(path: Path) -> list[Path]:
    """The entries of ``path`` that the swap store owns."""
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.name in STORE_FILES or p.name.startswith(STORE_PREFIXES)]


def remove_store(path: Path) -> None:
    """Remove the swap store's own files from ``path``, then the folder if nothing else is left in
    it: other files there (``offload.nvme_path`` may be a shared folder) stay."""
    for entry in store_entries(path):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with suppress(OSError):  # absent, or it holds other files: they are not the store's
        path.rmdir()


def is_run_folder(run_dir: Path) -> bool:
    """A ``train`` run folder (config.yaml) or one of the Python API (checkpoints/, plan.json, swap/)."""
    return any((run_dir / name).exists() for name in ("config.yaml", ckpt_io.CHECKPOINTS_DIR, "plan.json", "swap"))


def _lock(run_dir: Path, nvme_path: Path) -> ExitStack:
    """The locks a training run holds, its run folder's and its swap store's, or one line saying
    that a run holds them."""
    from cli.run_lock import RunLock
    from offload.store_dir import DirectoryLock

    stack = ExitStack()
    try:
        try:
            stack.enter_context(RunLock(run_dir))
        except OffloadError:
            raise OffloadError(f"a run is using {run_dir} and its swap: stop it first (or wait for it to "
                               f"finish), then run clean again") from None
        if nvme_path.is_dir():
            lock = DirectoryLock(nvme_path)
            try:
                lock.acquire()
            except OffloadError:
                raise OffloadError(f"a run is using this swap ({nvme_path}): stop it first (or wait for it "
                                   f"to finish), then run clean again") from None
            except OSError as err:
                raise OffloadError(f"cannot lock the swap {nvme_path} ({err.strerror or err}); fix its "
                                   f"permissions, then run clean again") from None
            stack.callback(lock.release)
    except BaseException:
        stack.close()
        raise
    return stack


def run_clean(run_dir: Path, nvme_path: Path | None, keep_last: bool, yes: bool) -> int:
    if not run_dir.is_dir() or not is_run_folder(run_dir):
        raise OffloadError(f"{run_dir} is not a run folder (no config.yaml, checkpoints/ or swap/); give the "
                           f"train.output_dir of a run, or the output_dir of an OffloadTrainer or OffloadEngine")
    if nvme_path is not None and not is_store(nvme_path) and not _switch_begun(nvme_path):
        raise OffloadError(f"--nvme-path {nvme_path} holds no swap store (no {MANIFEST_NAME} or "
                           f"{DATA_FILE_NAME}); give the run's own swap folder (its offload.nvme_path)")
    nvme_path = nvme_path or run_store(run_dir)
    owner = foreign_owner(nvme_path, run_dir)
    if owner is not None:
        raise OffloadError(f"the swap {nvme_path} belongs to the run {owner}, whose checkpoints live in it; "
                           f"clean that run instead (offload-train clean {owner})")
    with _lock(run_dir, nvme_path):
        return _clean_locked(run_dir, nvme_path, keep_last, yes)


def _clean_locked(run_dir: Path, nvme_path: Path, keep_last: bool, yes: bool) -> int:
    _finish_interrupted(run_dir, nvme_path)
    checkpoints = ckpt_io.list_checkpoints(run_dir)
    print(report(run_dir, nvme_path, survey(run_dir, nvme_path)))
    if not keep_last and not (run_dir / "final").is_dir():
        raise OffloadError(f"{run_dir} has no final/: removing the swap and every checkpoint would lose the "
                           f"training; use --keep-last to keep the newest checkpoint resumable")
    if keep_last and not checkpoints:
        raise OffloadError(f"{run_dir} has no checkpoint to keep; without --keep-last, clean removes the swap "
                           f"once final/ exists")
    plan = (f"keep {checkpoints[-1].path.name} (compacted) and remove the rest" if keep_last
            else "remove the swap and every checkpoint (final/ stays)")
    if not yes:
        print(f"dry run: clean --yes would {plan}")
        return 0
    if keep_last:
        _keep_newest(run_dir, nvme_path, checkpoints)
    else:
        _remove_all(run_dir, nvme_path, checkpoints)
    print(f"done: {plan}; the run folder now takes {format_bytes(tree_bytes(run_dir))}")
    return 0


def _remove_all(run_dir: Path, nvme_path: Path, checkpoints: list[ckpt_io.CheckpointInfo]) -> None:
    (run_dir / CLEANED_FILE).write_text(json.dumps({"cleaned_at": time.time(), "kept": "final/"}) + "\n")
    for ckpt in checkpoints:
        shutil.rmtree(ckpt.path)
    remove_store(nvme_path)


def _keep_newest(run_dir: Path, nvme_path: Path, checkpoints: list[ckpt_io.CheckpointInfo]) -> None:
    from cli.swap import claim

    newest = checkpoints[-1]
    units = ckpt_io.CheckpointUnits(newest.path)
    ckpt_io.check_in_store(units, nvme_path)
    compact, new_swap_json = _compact_paths(nvme_path, newest.path)
    remove_store(compact)
    snapshot = _copy_snapshot(units, compact)
    claim(compact, run_dir)  # the compact store stays this run's
    new_swap_json.write_text(json.dumps({"nvme_path": ckpt_io.store_reference(run_dir, nvme_path),
                                         "snapshot": snapshot.to_dict()}))
    for ckpt in checkpoints[:-1]:
        shutil.rmtree(ckpt.path)
    _switch(nvme_path, newest.path)


def _copy_snapshot(units: ckpt_io.CheckpointUnits, compact: Path):  # noqa: ANN202 - a Snapshot
    """Every tensor of the checkpoint, read (checksums verified) and written into a new store."""
    import torch

    from offload.io import PosixBackend
    from offload.snapshot_reader import SnapshotReader
    from offload.store import SwapStore, TensorSpec

    extents = units.snapshot.extents
    with SwapStore(compact, PosixBackend()) as store, SnapshotReader(units.nvme_path, units.snapshot) as reader:
        store.reserve([TensorSpec(e.name, e.torch_dtype, e.shape) for e in extents.values()])
        for ext in extents.values():
            buf = torch.empty(ext.shape, dtype=ext.torch_dtype)
            reader.read(ext.name, buf)
            store.write(ext.name, buf).result()
        return store.snapshot(list(extents), snapshot_id=units.snapshot.snapshot_id)


def _compact_paths(nvme_path: Path, ckpt_dir: Path) -> tuple[Path, Path]:
    return nvme_path.with_name(nvme_path.name + ".compact"), ckpt_dir / (ckpt_io.SWAP_FILE + ".compact")


def _old_marker(nvme_path: Path) -> Path:
    return nvme_path.with_name(nvme_path.name + ".old")


def _switch_begun(nvme_path: Path) -> bool:
    return _old_marker(nvme_path).is_dir()


def _switch(nvme_path: Path, ckpt_dir: Path) -> None:
    """Marker in (the compact store is complete: the switch has begun), each of the compact
    store's files renamed over the old one's, new swap.json in, marker gone. Only the store's own
    files move: other files in the swap folder stay where they are."""
    compact, new_swap_json = _compact_paths(nvme_path, ckpt_dir)
    keep = {p.name for p in compact.iterdir()}
    for entry in store_entries(nvme_path):  # leftovers (temp files) the compact store has no version of
        if entry.name not in keep and entry.is_file():
            entry.unlink(missing_ok=True)
    _old_marker(nvme_path).mkdir(exist_ok=True)
    _move_in(compact, nvme_path)
    new_swap_json.replace(ckpt_dir / ckpt_io.SWAP_FILE)
    remove_store(compact)
    remove_store(_old_marker(nvme_path))


def _move_in(compact: Path, nvme_path: Path) -> None:
    """The compact store's files (not its lock) renamed into the swap folder."""
    nvme_path.mkdir(parents=True, exist_ok=True)
    if not compact.is_dir():
        return
    for entry in compact.iterdir():
        if entry.name != ".lock" and entry.is_file():
            os.replace(entry, nvme_path / entry.name)


def _finish_interrupted(run_dir: Path, nvme_path: Path) -> None:
    """A clean stopped between building the compact store and switching to it. (A ``.old``
    folder holding a whole store was left by the earlier, folder-renaming switch.)"""
    compact = nvme_path.with_name(nvme_path.name + ".compact")
    pending = [p for c in ckpt_io.list_checkpoints(run_dir)
               if (p := c.path / (ckpt_io.SWAP_FILE + ".compact")).exists()]
    if _switch_begun(nvme_path) or (pending and not nvme_path.exists()):  # the switch had begun: finish it
        _move_in(compact, nvme_path)
        for p in pending:
            p.replace(p.with_name(ckpt_io.SWAP_FILE))
        remove_store(compact)
        remove_store(_old_marker(nvme_path))
        return
    remove_store(compact)  # the copy had not finished: the old store is intact
    for p in pending:
        p.unlink()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
