"""Hugging Face export: write master weights as safetensors shards that
``AutoModelForCausalLM.from_pretrained`` loads, one unit in memory at a time.

Names are those ``save_pretrained`` writes for the same model: transformers' weight conversions
are reverted (``scheduler.hf_checkpoint.hub_state_dict``: fused experts split per expert, renamed
keys back to the checkpoint's), and a tied weight is stored once, under its source name
(the unit cut holds it once), with ``tie_word_embeddings`` kept in ``config.json``."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from cli.checkpoint import CheckpointUnits, list_checkpoints
from offload.errors import OffloadError, first_line
from scheduler.model_map import ParamSlot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_hf_model(out_dir: Path, units: Iterable[tuple[str, list[ParamSlot], torch.Tensor]], n: int,
                   model: Any, dtype: torch.dtype, tokenizer: Any = None, rebuild: str | None = None) -> Path:
    """``n`` shards, one per unit (and one for the persistent buffers, if any), plus
    ``model.safetensors.index.json``, config and tokenizer.

    ``model`` is the (empty, meta-device) model the weights belong to: its config is written, its
    conversion mapping names the tensors, and its persistent buffers are written as they are
    (``save_pretrained`` writes them too; floating-point ones in ``dtype``, as it does).

    Everything is written into a sibling ``.NAME.partial`` folder first and moved into ``out_dir``
    only once complete: a full disk or a kill never leaves a half-written ``out_dir`` (a run's
    ``final/`` that would look finished). A failed write removes the partial folder and raises a
    one-line ``OffloadError``; ``rebuild`` says how to write the model again (default: from the
    run's checkpoints when ``out_dir`` is a run's ``final/``)."""
    partial = out_dir.parent / f".{out_dir.name}.partial"
    existed = out_dir.is_dir()
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(errno.EEXIST, "a file is in the way of the export folder", str(out_dir))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a killed export into the same folder
            shutil.rmtree(partial)
        partial.mkdir()
        _write_model_files(partial, units, n, model, dtype, tokenizer)
        _move_into_place(partial, out_dir)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        kept = f"{out_dir} was left as it was" if existed else f"nothing was written to {out_dir}"
        raise OffloadError(f"could not write the model to {out_dir}: {_what_failed(err)}; {kept} and "
                           f"{_rebuild_hint(out_dir, rebuild)}") from None
    return out_dir


def _write_model_files(out_dir: Path, units: Iterable[tuple[str, list[ParamSlot], torch.Tensor]], n: int,
                       model: Any, dtype: torch.dtype, tokenizer: Any) -> None:
    from scheduler.hf_checkpoint import hub_state_dict, persistent_buffers

    weight_map: dict[str, str] = {}
    total_bytes = 0
    buffers = {name: (b.to(dtype) if b.is_floating_point() else b).detach().cpu()
               for name, b in persistent_buffers(model).items() if b.device.type != "meta"}
    n_files = n + (1 if buffers else 0)
    groups = ((slots, master) for _, slots, master in units)
    for k, (slots, master) in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
        tensors = {s.name: master[s.offset : s.offset + s.numel].view(s.shape).to(dtype) for s in slots}
        total_bytes += _write_shard(out_dir / shard, hub_state_dict(model, tensors), weight_map)
    if buffers:
        shard = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
        total_bytes += _write_shard(out_dir / shard, hub_state_dict(model, buffers), weight_map)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf_config = model.config
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


INDEX_FILE = "model.safetensors.index.json"


def _move_into_place(partial: Path, out_dir: Path) -> None:
    """The complete export in ``partial`` becomes ``out_dir``: one rename when there is none yet;
    into an existing folder, file by file (renames: no space needed, the index last), its other
    files kept and the weight files of an earlier model removed (as ``save_pretrained`` does)."""
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    written = {p.name for p in partial.iterdir()}
    for path in sorted(partial.iterdir(), key=lambda p: p.name == INDEX_FILE):
        target = out_dir / path.name
        if path.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    partial.rmdir()
    _remove_stale_weights(out_dir, written)


def _what_failed(err: BaseException) -> str:
    """What ran out or broke, in one line: an OSError's text and file, or safetensors' message."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or first_line(err)}{where}"
    text = first_line(err)  # safetensors reports an I/O error as text, without an errno
    return "no space left on device" if "No space left" in text or "os error 28" in text else text


def _rebuild_hint(out_dir: Path, rebuild: str | None) -> str:
    if rebuild is not None:
        return rebuild
    run_dir = out_dir.parent
    if out_dir.name == "final" and (run_dir / "config.yaml").is_file():
        found = list_checkpoints(run_dir)
        if found:
            return (f"the checkpoints are intact: free space, then rebuild it with `offload-train export "
                    f"{found[-1].path} {out_dir}` (or resume the run with train.resume_from_checkpoint: auto)")
        return ("the run saved no checkpoint (train.save_steps: 0): free space and train again, with "
                "train.save_steps > 0 to keep checkpoints")
    return "nothing already saved was touched: free space or give another folder, then export again"


EXTRA_BUFFERS_FILE = "buffers.safetensors"
CONVERSIONS_FILE = "weight_conversions.json"


def write_model_extras(model: Any, directory: Path) -> None:
    """What a checkpoint's export needs besides the master weights and config.json: the
    generation config and the persistent buffers (loaded from the checkpoint, not re-derived)."""
    from scheduler.hf_checkpoint import persistent_buffers

    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    buffers = {n: b.detach().cpu().contiguous() for n, b in persistent_buffers(model).items()
               if b.device.type != "meta"}
    if buffers:
        save_file(buffers, str(directory / EXTRA_BUFFERS_FILE))
    if getattr(model, "_weight_conversions", None) == []:  # loaded from transformers' own layout
        (directory / CONVERSIONS_FILE).write_text(json.dumps({"revert_on_export": False}))


def read_model_extras(model: Any, directory: Path) -> None:
    """The inverse of ``write_model_extras`` into an empty model (checkpoints without them: no-op)."""
    from safetensors.torch import load_file

    from scheduler.hf_checkpoint import persistent_buffers

    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    if (directory / CONVERSIONS_FILE).is_file():
        model._weight_conversions = []  # export keeps the layout the checkpoint came in, as save_pretrained
    if (directory / EXTRA_BUFFERS_FILE).is_file():
        saved = load_file(directory / EXTRA_BUFFERS_FILE)
        with torch.no_grad():
            for name, buf in persistent_buffers(model).items():
                if name in saved and saved[name].shape == buf.shape and buf.device.type != "meta":
                    buf.copy_(saved[name].to(buf.dtype))


STALE_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|pytorch_model\.bin\.index\.json")
"""The weight files ``save_pretrained`` replaces (and removes when it writes others)."""


def _remove_stale_weights(out_dir: Path, written: set[str]) -> None:
    """Weight files of an earlier model in ``out_dir``, those ``save_pretrained`` would remove:
    left there, ``from_pretrained`` could load them instead of the export."""
    for path in out_dir.iterdir():
        if path.is_file() and STALE_WEIGHTS.fullmatch(path.name) and path.name not in written:
            path.unlink()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> int:
    """One safetensors file; its names go into ``weight_map``; returns the bytes written."""
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    for name in tensors:
        weight_map[name] = path.name
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_run(run_dir: Path, out_dir: Path, dtype_name: str | None = None, merge: bool = False) -> Path:
    """``offload-train export RUN_DIR OUT_DIR``: the latest checkpoint of a run, in HF format;
    ``export RUN_DIR/checkpoints/step-N OUT_DIR``: that checkpoint. A LoRA run (``peft``
    section) exports its adapter folder, or with ``merge`` the base with the adapter merged in."""
    from cli.checkpoint import SWAP_FILE
    from scheduler.hf_checkpoint import read_hf_config

    _check_target(out_dir)
    pointer = run_dir / "offload_checkpoint.json"  # OffloadTrainer's checkpoint-N: its snapshot
    if pointer.is_file() and not (run_dir / SWAP_FILE).is_file():
        try:
            run_dir = (run_dir / json.loads(pointer.read_text())["snapshot"]).resolve()
        except (ValueError, KeyError, TypeError) as err:
            raise OffloadError(f"{pointer} does not name a checkpoint ({type(err).__name__}: {err}); export "
                               f"the run folder or one of its checkpoints/step-N instead") from None
    if run_dir.exists() and not run_dir.is_dir():
        raise OffloadError(f"{run_dir} is a file, not a run folder; give a run folder (train.output_dir) or one "
                           f"of its checkpoints/step-N")
    if not run_dir.is_dir():
        raise OffloadError(f"{run_dir} does not exist; give a run folder (train.output_dir) or one of its "
                           f"checkpoints/step-N")
    if (run_dir / SWAP_FILE).is_file():  # a checkpoint folder itself
        ckpt, run_dir = run_dir, run_dir.parent.parent
    else:
        found = list_checkpoints(run_dir)
        if not found:
            final = run_dir / "final"
            hint = (f"; the trained model is already in {final} (the hub layout)" if final.is_dir() else
                    "; train with train.save_steps > 0, or point at a run folder or one of its checkpoints")
            raise OffloadError(f"{run_dir} has no checkpoints/step-N to export{hint}")
        ckpt = found[-1].path
    if merge or _trains_adapters(run_dir):
        from cli.lora import export_lora

        return export_lora(run_dir, ckpt, out_dir, merge, DTYPES[dtype_name] if dtype_name else None)
    hf_config = read_hf_config(ckpt)
    dtype = DTYPES[dtype_name] if dtype_name else (getattr(hf_config, "dtype", None) or torch.float32)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    tokenizer = None
    tok_dir = run_dir / "tokenizer"
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    from scheduler.materialize import empty_model

    units = CheckpointUnits(ckpt)
    model = empty_model(hf_config)  # meta device: its structure names the exported tensors
    read_model_extras(model, ckpt)
    rebuild = f"the checkpoint {ckpt} is intact: free space or give another folder, then export again"
    return write_hf_model(out_dir, units.named_masters(), len(units.layout), model, dtype, tokenizer, rebuild)


def _check_target(out_dir: Path) -> None:
    """Not into a run's checkpoint or swap (the export would overwrite what resumes read)."""
    from cli.checkpoint import SWAP_FILE
    from offload.manifest import MANIFEST_NAME

    if out_dir.exists() and not out_dir.is_dir():
        raise OffloadError(f"{out_dir} is a file, not a folder; give the folder to export into (it is created "
                           f"if missing)")
    if (out_dir / SWAP_FILE).is_file() or (out_dir / MANIFEST_NAME).is_file():
        raise OffloadError(f"{out_dir} holds a checkpoint or a swap store; export into a folder of its own")


def _trains_adapters(run_dir: Path) -> bool:
    """The run's resolved config (``config.yaml``) has a ``peft`` section."""
    import yaml

    try:
        return "peft" in (yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return False
