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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cli import checkpoint as ckpt_io
from offload.errors import OffloadError, format_bytes

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
    """The run's swap folder: ``offload.nvme_path`` of its config.yaml, else ``<run folder>/swap``
    (the folder itself, wherever it was moved)."""
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        configured = (doc.get("offload") or {}).get("nvme_path")
    except (OSError, yaml.YAMLError, AttributeError):
        configured = None
    return Path(configured) if configured else run_dir / "swap"


def run_clean(run_dir: Path, nvme_path: Path | None, keep_last: bool, yes: bool) -> int:
    if not (run_dir / "config.yaml").is_file():
        raise OffloadError(f"{run_dir} is not a run folder (no config.yaml); give the train.output_dir of a run")
    nvme_path = nvme_path or run_store(run_dir)
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
    shutil.rmtree(nvme_path, ignore_errors=True)


def _keep_newest(run_dir: Path, nvme_path: Path, checkpoints: list[ckpt_io.CheckpointInfo]) -> None:
    newest = checkpoints[-1]
    units = ckpt_io.CheckpointUnits(newest.path)
    ckpt_io.check_in_store(units, nvme_path)
    compact, new_swap_json = _compact_paths(nvme_path, newest.path)
    shutil.rmtree(compact, ignore_errors=True)
    snapshot = _copy_snapshot(units, compact)
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


def _switch(nvme_path: Path, ckpt_dir: Path) -> None:
    """old store aside, new store in, new swap.json in, old store gone: each step a rename."""
    compact, new_swap_json = _compact_paths(nvme_path, ckpt_dir)
    old = nvme_path.with_name(nvme_path.name + ".old")
    if nvme_path.exists():
        nvme_path.rename(old)
    compact.rename(nvme_path)
    new_swap_json.replace(ckpt_dir / ckpt_io.SWAP_FILE)
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted(run_dir: Path, nvme_path: Path) -> None:
    """A clean stopped between building the compact store and switching to it."""
    old = nvme_path.with_name(nvme_path.name + ".old")
    compact = nvme_path.with_name(nvme_path.name + ".compact")
    pending = [p for c in ckpt_io.list_checkpoints(run_dir)
               if (p := c.path / (ckpt_io.SWAP_FILE + ".compact")).exists()]
    if old.exists() or (pending and not nvme_path.exists()):  # the switch had begun: finish it
        if compact.exists():
            compact.rename(nvme_path)
        for p in pending:
            p.replace(p.with_name(ckpt_io.SWAP_FILE))
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(compact, ignore_errors=True)  # the copy had not finished: the old store is intact
    for p in pending:
        p.unlink()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
