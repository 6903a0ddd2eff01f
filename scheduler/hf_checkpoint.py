"""Hugging Face checkpoints as transformers reads and writes them, one unit at a time.

transformers 5 does not load a checkpoint by parameter name: it renames keys (GPT-NeoX
``embed_out`` -> ``lm_head``, Mixtral ``block_sparse_moe`` -> ``mlp``, legacy ``gamma``/``beta``)
and fuses tensors (each expert's ``gate_proj``/``up_proj`` -> one ``experts.gate_up_proj``) with
the transforms that ``conversion_mapping.get_model_conversion_mapping(model)`` returns, and
``save_pretrained`` reverts them. This module calls that machinery rather than copying it:

- ``CheckpointInit`` maps every checkpoint key to the model parameter it feeds with
  ``core_model_loading.rename_source_key`` (the function ``from_pretrained`` uses), groups the keys
  of one target (all experts of a layer) and runs the transform's own ``convert`` when a unit asks
  for its tensors. Tied parameters (``model.all_tied_weights_keys``) are read under whichever of
  their names the checkpoint holds, as ``from_pretrained`` ties them symmetrically.
- ``hub_state_dict`` reverts the transforms for export (``revert_weight_conversion``), so the
  names written equal those ``save_pretrained`` writes for the same model.

Memory: a unit's load holds that unit's checkpoint tensors and their converted form (a fused
expert tensor is built by stacking, then concatenating): about three times the unit, never more
than one unit at a time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offload.errors import OffloadError
from scheduler.model_map import Unit


@dataclass
class _Target:
    """One transform's work: the checkpoint keys it reads, the parameters it produces."""

    transform: Any  # a WeightConverter template, or None for a plain (possibly renamed) copy
    first_name: str  # the parameter name transformers keys this transform by
    sources: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key)
    produces: tuple[str, ...] = ()


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded index, or one file)."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OffloadError(f"{index} is not a safetensors index ({err}); re-save the checkpoint "
                               f"with save_pretrained") from None
        files = {name: directory / f for name, f in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise OffloadError(f"{index} names {path.name}, which is missing from {directory}; "
                                   f"copy the whole checkpoint directory")
        for path in sorted(set(files.values())):  # headers only: a truncated shard fails here, before a run starts
            _check_shard(path)
        return files
    if single.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as err:  # safetensors raises its own error types
            raise OffloadError(f"{single} is not a readable safetensors file ({err})") from None
    raise OffloadError(f"no model.safetensors or model.safetensors.index.json in {directory}; give a "
                       f"Hugging Face checkpoint directory saved with safetensors")


def _unreadable_shard(path: Path, err: BaseException, key: str | None = None) -> OffloadError:
    from offload.errors import first_line

    what = f"cannot read {key} from {path}" if key else f"{path} is not a readable safetensors file"
    return OffloadError(f"{what} ({first_line(err)}); the file is truncated or damaged (or the index does not "
                        f"match it): copy the checkpoint again from its source")


def _check_shard(path: Path) -> None:
    """Open one shard: safetensors checks that its header covers the whole file (truncation)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except OSError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise _unreadable_shard(path, err) from None


def read_hf_config(directory: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoConfig.from_pretrained(directory)`` of a local checkpoint; a broken ``config.json``
    (not JSON, not an object, no or an unknown ``model_type``, a wrongly typed field) is a one-line
    ``OffloadError`` naming the file and what is wrong."""
    from transformers import AutoConfig

    from offload.errors import first_line

    path = Path(directory) / "config.json"
    fix = "fix it, or re-save the checkpoint with save_pretrained"
    if not path.is_file():
        raise OffloadError(f"{Path(directory)} is not a Hugging Face checkpoint directory (no config.json); give "
                           f"a local directory saved with save_pretrained")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise OffloadError(f"{path} is not text ({err.reason}); {fix}") from None
    except ValueError as err:  # json.JSONDecodeError
        raise OffloadError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise OffloadError(f"{path} holds a JSON {type(data).__name__}, not an object of config fields; {fix}")
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except MemoryError:
        raise
    except Exception as err:  # ValueError, OSError, huggingface_hub's strict-dataclass validation errors
        model_type = data.get("model_type")
        if not model_type:
            why = "has no model_type (e.g. llama, qwen2, gpt2)"
        elif not isinstance(model_type, str):
            why = f"has model_type {model_type!r}, not a name (e.g. llama, qwen2, gpt2)"
        elif "does not recognize this architecture" in str(err):
            why = (f"has model_type {model_type!r}, which this transformers does not know (a typo, or a newer "
                   f"model: upgrade transformers)")
        else:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = f"is not a valid {model_type} config ({lines[-1] if lines else first_line(err)})"
        raise OffloadError(f"{path} {why}; {fix}") from None


class CheckpointInit:
    """Initial fp32 weights of one unit from a local safetensors checkpoint, as ``from_pretrained``
    would load them into ``model`` (an empty model of the checkpoint's config)."""

    def __init__(self, directory: str | Path, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            dot_natural_key,
            rename_source_key,
        )

        self.directory = Path(directory)
        self.model = model
        quantized = getattr(getattr(model, "config", None), "quantization_config", None)
        if quantized:
            method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
            raise OffloadError(f"the checkpoint in {self.directory} is quantized ({method}): offload-train "
                               f"trains bf16/fp16/fp32 weights; use the unquantized checkpoint")
        self.file_of = checkpoint_files(self.directory)
        transforms = get_model_conversion_mapping(model)  # reads the model's structure only (meta is fine)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        # Shapes now: the executor later swaps the parameters for empty placeholders.
        self._shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
        wanted = set(self._shapes) | set(persistent_buffers(model))
        meta_state = {name: True for name in model.state_dict()}
        prefix = getattr(model, "base_model_prefix", None)
        self._targets: dict[str, _Target] = {}
        for key in sorted(self.file_of, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if name not in meta_state and key in meta_state:  # as from_pretrained: maybe only a prefix differs
                name, pattern = rename_source_key(key, [], [], prefix, meta_state)
            if name not in wanted:
                continue  # buffers, or keys the model does not have (from_pretrained ignores them too)
            target = self._targets.get(name)
            if target is None:
                conv = by_pattern[pattern] if pattern is not None else None
                target = self._targets[name] = _Target(conv, name)
                target.produces = (tuple(name.replace(conv.target_patterns[0], t, 1) for t in conv.target_patterns)
                                   if conv is not None else (name,))
            target.sources.append((pattern if pattern is not None else key, key))
        self._target_of = {n: t for t in self._targets.values() for n in t.produces}
        self._tied = tied_pairs(model)
        self._open: dict[Path, Any] = {}  # safetensors handles while a unit is read (_reading)
        # as from_pretrained records it: save_pretrained reverts only the transforms a load used, so
        # a checkpoint already in transformers' fused layout is exported fused
        model._weight_conversions = [t for t in transforms if t.was_used()]

    def __call__(self, unit: Unit) -> dict[str, torch.Tensor]:
        with self._reading():
            return self._unit_tensors(unit)

    def _unit_tensors(self, unit: Unit) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        done: set[str] = set()
        for s in unit.params:
            name = s.name
            target = self._find(name)
            if target.first_name not in done:
                done.add(target.first_name)
                out.update(self._convert(target))
            if name not in out:
                out[name] = out[self._alias_in(name, out)]
            got = out[name]
            if not got.is_floating_point() or got.element_size() < 2:  # int8/uint8/fp8: quantized data
                raise OffloadError(f"checkpoint tensor for {name} in {self.directory} is {got.dtype}, not a "
                                   f"bf16/fp16/fp32 weight; use the unquantized checkpoint")
            if tuple(got.shape) != s.shape:
                raise OffloadError(
                    f"checkpoint tensor for {name} has shape {list(got.shape)} but the model config gives "
                    f"{list(s.shape)}; the checkpoint in {self.directory} does not fit its config.json")
        return {s.name: out[s.name].to(torch.float32) for s in unit.params}

    def load_buffers(self) -> None:
        """Persistent buffers the checkpoint holds are copied into the model (in the buffer's
        dtype), as ``from_pretrained`` loads them; those it lacks keep the model's own values."""
        with self._reading():
            self._load_buffers()

    def _load_buffers(self) -> None:
        for name, buf in persistent_buffers(self.model).items():
            target = self._target_of.get(name)
            if target is None or buf.device.type == "meta":
                continue
            value = self._convert(target)[name]
            if value.shape != buf.shape:
                raise OffloadError(
                    f"checkpoint tensor for {name} has shape {list(value.shape)} but the model config gives "
                    f"{list(buf.shape)}; the checkpoint in {self.directory} does not fit its config.json")
            with torch.no_grad():
                buf.copy_(value.to(buf.dtype))

    def check_ties(self) -> None:
        """A tied pair stored under both names must hold one tensor: the config ties what the
        checkpoint keeps apart otherwise (from_pretrained would untie them; we do not guess)."""
        with self._reading():
            self._check_ties()

    def _check_ties(self) -> None:
        for name, others in self._tied.items():
            for other in others:
                a, b = self._target_of.get(name), self._target_of.get(other)
                if a is None or b is None or a is b or name > other:
                    continue
                if not torch.equal(self._convert(a)[name], self._convert(b)[other]):
                    raise OffloadError(
                        f"the checkpoint in {self.directory} holds different tensors for {name} and {other}, "
                        f"but its config ties them; set tie_word_embeddings: false in its config.json to "
                        f"train them apart, or drop one of them")

    def _find(self, name: str) -> _Target:
        for candidate in (name, *self._tied.get(name, ())):
            target = self._target_of.get(candidate)
            if target is not None:
                return target
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if head is not None and any(p is getattr(head, "weight", None) for n, p in
                                    self.model.named_parameters(remove_duplicate=False) if n == name):
            raise OffloadError(f"the checkpoint in {self.directory} has no LM head ({name}): it holds a base "
                               f"model; give a causal-LM checkpoint, or one whose config ties the head to "
                               f"the embeddings (tie_word_embeddings: true)")
        raise OffloadError(f"tensor {name} is missing from the checkpoint in {self.directory}; the "
                           f"checkpoint does not fit its config.json (re-save it with save_pretrained)")

    def _alias_in(self, name: str, out: dict[str, torch.Tensor]) -> str:
        return next(n for n in self._tied.get(name, ()) if n in out)

    def _convert(self, target: _Target) -> dict[str, torch.Tensor]:
        if target.transform is None:
            return {target.first_name: self._read(target.sources[0][1])}
        conv = copy.deepcopy(target.transform)  # each target gets its own instance, as in from_pretrained
        for pattern, key in target.sources:
            conv.add_tensor(target.first_name, key, pattern, functools.partial(self._read, key))
        try:
            realized = conv.convert(target.first_name, model=self.model, config=self.model.config)
        except Exception as err:  # a transform's op raising on tensors that do not fit it
            missing = self._missing_sources(target)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise OffloadError(f"tensor {missing[0]}{more} is missing from the checkpoint in "
                                   f"{self.directory}; the checkpoint does not fit its config.json") from None
            raise OffloadError(f"cannot convert the checkpoint tensors for {target.first_name} "
                               f"({type(err).__name__}: {err}); the checkpoint in {self.directory} does "
                               f"not fit its config.json") from None
        return {name: (t[0] if isinstance(t, list) else t) for name, t in realized.items()}

    def _missing_sources(self, target: _Target) -> list[str]:
        """Checkpoint keys ``save_pretrained`` would write for the target's parameters (its
        conversion reverted on meta tensors: no data) that the checkpoint lacks."""
        meta = {n: torch.empty(self._shapes[n], device="meta") for n in target.produces if n in self._shapes}
        try:
            expected = hub_state_dict(self.model, meta)
        except Exception:  # a reverse op that needs real data: nothing to tell
            return []
        return sorted(set(expected) - set(self.file_of))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Each safetensors file opened once for a unit's (or a pass's) reads, closed after."""
        try:
            yield
        finally:
            for handle in self._open.values():
                handle.__exit__(None, None, None)
            self._open.clear()

    def _read(self, key: str) -> torch.Tensor:
        path = self.file_of[key]
        handle = self._open.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._open[path] = safe_open(str(path), framework="pt", device="cpu").__enter__()
            except OSError:
                raise
            except Exception as err:  # safetensors raises its own error types
                raise _unreadable_shard(path, err) from None
        try:
            return handle.get_tensor(key)
        except OSError:
            raise
        except Exception as err:
            raise _unreadable_shard(path, err, key) from None


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``state_dict`` holds (so ``save_pretrained`` writes them), by name."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params}


def tied_pairs(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each tied parameter name -> the other names of the same tensor (both directions)."""
    tied: dict[str, list[str]] = {}
    keys = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in keys.items():
        tied.setdefault(target, []).append(source)
        tied.setdefault(source, []).append(target)
    return {k: tuple(v) for k, v in tied.items()}


def tie_weights(model: nn.Module) -> None:
    """Restore the ties a meta-device build lost (accelerate's ``init_empty_weights`` registers a
    new Parameter for the tied head), so a tied weight is one parameter, as in the real model."""
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()


def hub_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of one unit under the names ``save_pretrained`` writes (transformers' conversions
    reverted: fused experts split per expert, renamed keys back to the checkpoint's names)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))
