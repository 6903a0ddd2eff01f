"""LoRA through PEFT on an empty (meta) model: adapters made, initialized, loaded and saved by
the ``peft`` library; the base weights stay frozen and are streamed from their checkpoint.

``apply_lora`` wraps the empty model with PEFT's own modules (``get_peft_model``): every base
weight becomes a frozen parameter (``Unit.frozen``: stored once, streamed, no optimizer state),
the adapters the trainable ones. The adapters' starting values are PEFT's: its initialization
(``reset_lora_parameters``: A as ``nn.Linear``, B = 0) for a fresh adapter, or an adapter folder
read by ``load_peft_weights`` and mapped onto the model's names by ``set_peft_model_state_dict``.
``save_adapter`` writes ``final/`` as PEFT does (``adapter_config.json``,
``adapter_model.safetensors``), for ``PeftModel.from_pretrained(base, final)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offload.errors import OffloadError
from scheduler.model_map import ParamSlot, Unit

ADAPTER = "default"
_PEFT_WRAPPING = re.compile(r"\.(base_layer|original_module|modules_to_save\.default)(?=\.)")


def base_name(name: str) -> str:
    """The base model's name of a parameter of the PEFT-wrapped model (``base_model.model.``
    prefix, ``.base_layer``, ``.original_module`` and ``.modules_to_save.default`` removed)."""
    return _PEFT_WRAPPING.sub("", name.removeprefix("base_model.model."))


def is_adapter(name: str) -> bool:
    """A LoRA factor (``lora_A``/``lora_B``/``lora_embedding_*``/``lora_magnitude_vector``)."""
    return ".lora_" in name


def lora_config(section: Any) -> Any:
    """PEFT's ``LoraConfig`` from the ``peft`` config section (an adapter folder's own config
    when ``adapter_name_or_path`` is set)."""
    from peft import LoraConfig, PeftConfig

    if section.adapter_name_or_path is not None:
        path = Path(section.adapter_name_or_path)
        if not (path / "adapter_config.json").exists():
            raise OffloadError(f"peft.adapter_name_or_path: {path} is not a PEFT adapter folder (no "
                               f"adapter_config.json); give a folder written by save_pretrained of a PeftModel")
        cfg = PeftConfig.from_pretrained(str(path))
        if not isinstance(cfg, LoraConfig):
            raise OffloadError(f"peft.adapter_name_or_path: {path} holds a {cfg.peft_type} adapter; only LoRA "
                               f"adapters are trained here")
        cfg.inference_mode = False
        return cfg
    targets = section.target_modules
    return LoraConfig(r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=targets, bias=section.bias, modules_to_save=section.modules_to_save,
                      task_type="CAUSAL_LM")


def apply_lora(model: nn.Module, section: Any, init: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Wrap the empty ``model`` with LoRA adapters; returns the PEFT model and the adapters'
    starting tensors by parameter name (small, in RAM; none with ``init=False``: a plan needs
    the shapes only)."""
    from peft import get_peft_model

    cfg = lora_config(section)
    _check_targets(model, cfg)
    try:
        # adapters made on the meta device: their values come from _fresh_adapters or the folder
        wrapped = get_peft_model(model, cfg, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    except ValueError as err:
        raise OffloadError(f"peft: {str(err).splitlines()[0]}") from None
    if not init:
        return wrapped, {}
    if section.adapter_name_or_path is not None:
        adapters = _read_adapter(wrapped, Path(section.adapter_name_or_path))
    else:
        adapters = _fresh_adapters(wrapped, cfg)
    return wrapped, adapters


def _check_targets(model: nn.Module, cfg: Any) -> None:
    """Every ``target_modules`` entry must match a module (PEFT itself only checks that one does)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.target_modules
    if targets is None or isinstance(targets, str):
        return  # a regex or "all-linear": PEFT says when nothing matches
    names = [n for n, _ in model.named_modules() if n]
    for entry in targets:
        probe = type(cfg)(target_modules=[entry])
        if not any(check_target_module_exists(probe, n) for n in names):
            raise OffloadError(f"peft.target_modules: {entry!r} matches no module of {type(model).__name__} "
                               f"(its linear layers are named e.g. {', '.join(_linear_names(model)[:6])}); fix "
                               f"the name or use target_modules: all-linear")


def _linear_names(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for name, module in model.named_modules():
        short = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and short not in seen:
            seen.append(short)
    return seen


def _fresh_adapters(wrapped: nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
    """PEFT initializes adapters on the device of their base layer (meta here): give them host
    memory and run PEFT's own initialization (``reset_lora_parameters``) there."""
    from peft.tuners.lora import LoraLayer

    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            for holder in (module.lora_A, module.lora_B):
                if ADAPTER in holder:
                    holder[ADAPTER].to_empty(device="cpu")
            module.reset_lora_parameters(ADAPTER, cfg.init_lora_weights)
    return {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad and is_adapter(n)}


def _read_adapter(wrapped: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors by the model's parameter names, mapped by PEFT's own
    ``set_peft_model_state_dict`` (its final ``load_state_dict`` is caught: the model is empty)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    saved = load_peft_weights(str(path), device="cpu")
    mapped: dict[str, torch.Tensor] = {}

    def catch(state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        mapped.update(state_dict)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    wrapped.load_state_dict = catch  # type: ignore[method-assign]
    try:
        set_peft_model_state_dict(wrapped, saved, adapter_name=ADAPTER)
    finally:
        del wrapped.load_state_dict
    shapes = {n: tuple(p.shape) for n, p in wrapped.named_parameters() if p.requires_grad}
    for name, shape in shapes.items():
        got = mapped.get(name)
        if got is None:
            raise OffloadError(f"peft.adapter_name_or_path: {path} has no tensor for {name}; the folder does not "
                               f"match its own adapter_config.json")
        if tuple(got.shape) != shape:
            raise OffloadError(f"peft.adapter_name_or_path: {path} was made for another base model: {name} has "
                               f"shape {list(got.shape)} there and {list(shape)} here; give the adapter of this "
                               f"model.name_or_path")
    return {n: mapped[n].to(torch.float32) for n in shapes}


class LoraInit:
    """Starting tensors of one unit of the PEFT model: base weights (and the trainable copies of
    ``modules_to_save``) from the base model's initializer under their base names, adapters
    from ``apply_lora``."""

    def __init__(self, base: Callable[[Unit], dict[str, torch.Tensor]], adapters: dict[str, torch.Tensor],
                 rename: Callable[[str], str]) -> None:
        self.base = base
        self.adapters = adapters
        self.rename = rename  # a PEFT parameter name -> the name ``base`` knows

    def __call__(self, unit: Unit) -> dict[str, torch.Tensor]:
        from_base = [s for s in unit.all_params if s.name not in self.adapters]
        out = {s.name: self.adapters[s.name] for s in unit.all_params if s.name in self.adapters}
        if from_base:
            renamed = Unit(unit.name, unit.index, unit.modules,
                           tuple(ParamSlot(self.rename(s.name), s.shape, s.offset, s.numel) for s in from_base))
            got = self.base(renamed)
            out.update({s.name: got[self.rename(s.name)] for s in from_base})
        return out


def random_init_name(name: str) -> str:
    """Random init runs on the PEFT model itself: a trainable copy starts as its original."""
    return name.replace(".modules_to_save.default.", ".original_module.")


def save_adapter(wrapped: Any, out_dir: Path, named: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """``final/`` as PEFT writes it (``PeftModel.save_pretrained`` with the trained tensors)."""
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    state = {name: t for name, t in named if name in trainable}
    wrapped.save_pretrained(str(out_dir), state_dict=state, save_embedding_layers=False)
    return out_dir


def export_lora(run_dir: Path, ckpt: Path, out_dir: Path, merge: bool, dtype: torch.dtype | None) -> Path:
    """``export`` of a LoRA run's checkpoint: its adapter as a PEFT folder, or with ``merge`` the
    base with the adapter merged in (PEFT's ``merge``), in the hub layout, one unit in memory at a
    time. The base comes from the run's ``model.name_or_path``; the adapter from ``ckpt``."""
    from cli.checkpoint import CheckpointUnits
    from cli.config import load_config
    from cli.export import write_hf_model
    from cli.train import load_model_config
    from scheduler.materialize import empty_model

    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft is None:
        raise OffloadError(f"{run_dir} trained every weight, not LoRA adapters: export it without --merge")
    trained = {s.name: flat[s.offset : s.offset + s.numel].view(s.shape)
               for _, slots, flat in CheckpointUnits(ckpt).named_masters() for s in slots}
    hf_config = load_model_config(cfg)
    wrapped, _ = apply_lora(empty_model(hf_config), cfg.peft, init=False)
    if not merge:
        return save_adapter(wrapped, out_dir, trained.items())
    if cfg.model.name_or_path is None:
        raise OffloadError(f"{run_dir} trained adapters on a randomly initialized base (model.config): there "
                           f"is no base checkpoint to merge them into; export without --merge")
    if out_dir.resolve() == Path(cfg.model.name_or_path).resolve():
        raise OffloadError(f"{out_dir} is the base checkpoint the adapter merges into (read while the export "
                           f"is written); export into another folder")
    from scheduler.hf_checkpoint import CheckpointInit
    from scheduler.model_map import build_model_map

    plain = empty_model(load_model_config(cfg))  # names the exported tensors, as save_pretrained would
    base = CheckpointInit(cfg.model.name_or_path, plain)
    units = build_model_map(wrapped).units
    untied, untie = _untied_by_copies(wrapped, plain, trained)
    if untied:  # as PEFT's merge_and_unload: the trained copy and the original part ways
        plain.config.tie_word_embeddings = False
    merged = (_merged_unit(wrapped, u, base, trained, untie) for u in units)
    out_dtype = dtype or getattr(torch, cfg.model.dtype)
    tokenizer = None
    if (run_dir / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    return write_hf_model(out_dir, merged, len(units), plain, out_dtype, tokenizer)


def _untied_by_copies(wrapped: nn.Module, plain: nn.Module, trained: dict[str, torch.Tensor]) -> tuple[bool, dict[str, str]]:
    """Whether the export unties a tied pair (``modules_to_save`` trained a copy of one of them, a
    tied model's embeddings or head), and base name -> the name its partner is exported under with
    the original weights, for partners without a trained copy of their own. PEFT's
    ``merge_and_unload`` unties them the same way, unless the copies stay tied
    (``ensure_weight_tying``: one shared copy, exported under the tied names as before)."""
    from scheduler.hf_checkpoint import tied_pairs

    copied = {base_name(n) for n in trained if ".modules_to_save." in n}
    pairs = {name: partners for name, partners in tied_pairs(plain).items() if name in copied}
    config = getattr(wrapped, "peft_config", {}).get(ADAPTER)
    if not pairs or getattr(config, "ensure_weight_tying", False):
        return False, {}
    return True, {name: partner for name, partners in pairs.items() for partner in partners if partner not in copied}


def _merged_unit(wrapped: nn.Module, u: Unit, base: Callable[[Unit], dict[str, torch.Tensor]],
                 trained: dict[str, torch.Tensor], untie: dict[str, str]) -> tuple[str, list[ParamSlot], torch.Tensor]:
    """One unit's weights under their base names: the base, the trained ones (copies of
    ``modules_to_save`` in place of their originals, biases with ``bias: all`` or ``lora_only``),
    every LoRA layer merged by PEFT (``LoraLayer.merge``), and the original of a tied weight whose
    copy was trained under its partner's name (``untie``)."""

    names = [s.name for s in u.all_params]
    copies = {base_name(n) for n in names if ".modules_to_save." in n}
    from_base = [s for s in u.all_params if not is_adapter(s.name) and s.name not in trained
                 and (base_name(s.name) not in copies or base_name(s.name) in untie)]
    got = base(Unit(u.name, u.index, u.modules, tuple(
        ParamSlot(base_name(s.name), s.shape, s.offset, s.numel) for s in from_base)))
    weights = {untie.get(name, name): got[name] for name in (base_name(s.name) for s in from_base)}
    weights.update({base_name(n): trained[n] for n in names if n in trained and not is_adapter(n)})
    in_unit = set(names)
    for prefix, layer in _outermost_lora_layers(wrapped):
        params = [(f"{prefix}.{n}", n) for n, _ in layer.named_parameters()]
        if not params or params[0][0] not in in_unit:
            continue  # another unit's layer
        # every tensor of the layer (base weights, nested parameter wrappers, adapters) for real
        for full, local in params:
            value = trained[full] if is_adapter(full) else weights[base_name(full)]
            _put(layer, local, value.to(torch.float32).clone())
        from peft.tuners.lora import LoraLayer

        for sub in reversed(list(layer.modules())):  # nested wrappers (MoE experts) first, each once
            if isinstance(sub, LoraLayer) and not sub.merged:
                sub.merge(adapter_names=[ADAPTER])
        for full, local in params:
            if not is_adapter(full):
                weights[base_name(full)] = layer.get_parameter(local).data
            _put(layer, local, torch.empty(layer.get_parameter(local).shape, device="meta"))  # nothing stays
        for sub in layer.modules():
            if hasattr(sub, "merged_adapters"):
                sub.merged_adapters.clear()
    slots, offset = [], 0
    for name, t in weights.items():
        slots.append(ParamSlot(name, tuple(t.shape), offset, t.numel()))
        offset += t.numel()
    return u.name, slots, torch.cat([t.reshape(-1).to(torch.float32) for t in weights.values()])


def _outermost_lora_layers(wrapped: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT's LoRA layers not nested inside another (parameter wrappers of MoE experts nest)."""
    from peft.tuners.lora import LoraLayer

    found: list[tuple[str, nn.Module]] = []
    for name, module in wrapped.named_modules():
        if isinstance(module, LoraLayer) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted, under ``module``) with ``value``, frozen."""
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, nn.Parameter(value, requires_grad=False))
