"""Typed, validated configuration of a training run: one YAML file, four sections (and ``peft``,
when the run trains LoRA adapters).

```yaml
model:
  name_or_path: /models/llama-3-8b    # or `config: {model_type: llama, hidden_size: 64, ...}`
  dtype: bfloat16
data:
  path: corpus.jsonl
  seq_len: 2048
train:                                # Hugging Face TrainingArguments names and defaults
  output_dir: runs/llama-8b
  max_steps: 1000
  learning_rate: 2e-5                 # numeric strings are accepted for float keys
offload:                              # optional section
  nvme_path: /nvme/swap               # default: <output_dir>/swap
  gpu_memory_limit: 20GiB
```

``load_config(path, overrides)`` reads the file, applies ``--set section.key=value`` overrides
(values parsed as YAML; ``model.config.hidden_size=64`` sets a key inside ``model.config``) and
validates everything. Every problem is a ``ConfigError`` whose one-line message names the key,
where it came from (the file or ``--set``), what is wrong and how to fix it.

Sizes (``parse_size``): a number with an optional unit, case-insensitive, spaces allowed.
``KB MB GB TB PB`` are decimal (10^3, 10^6, ...), ``KiB MiB GiB TiB PiB`` and the bare letters
``K M G T P`` are binary (2^10, 2^20, ...), as in ``ls -h``, ``free -h`` or ``numfmt --from=iec``;
``B`` or no unit is bytes. ``"8GB"`` = 8,000,000,000 and ``"8GiB"`` = ``"8G"`` = 8,589,934,592.

Paths are kept as written but for a leading ``~`` (``~/runs``, ``~user/x``), expanded to the home
directory in every path key (``_check_path``); relative ones are relative to the working directory
of the run (not to the config file). ``"auto"`` values are kept as ``"auto"`` and resolved where the machine is
known (``resolve_memory_limit``), so a dumped config stays portable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import yaml

from cli import config_checks
from offload.errors import OffloadError

AUTO_MEMORY_FRACTION = 0.8
"""``"auto"`` memory limits are this fraction of the bytes the caller reports as available."""

DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")
IO_BACKENDS = ("auto", "kvikio", "posix", "aio")
OPTIMIZER_IMPLS = ("auto", "deepspeed", "torch")
ENGINES = ("native", "reference")
PEFT_BIASES = ("none", "all", "lora_only")
NAN_POLICIES = ("stop", "skip")
EVAL_STRATEGIES = ("no", "steps")
REPORT_TO = ("none", "tensorboard")
SEED_LIMIT = 2**32
"""Seeds must be below this (numpy's ``np.random.seed`` range, used by ``transformers.set_seed``)."""


class ConfigError(OffloadError):
    """The run configuration is missing, unreadable or invalid. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


# ---------------------------------------------------------------------------------------------
# Sizes


_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_power
    _SIZE_UNITS[f"{_letter}ib"] = 1024**_power
    _SIZE_UNITS[f"{_letter}b"] = 1000**_power
del _power, _letter

_SIZE_RE = re.compile(r"\s*([+-]?)(\d*)(?:\.(\d*))?\s*([a-zA-Z]*)\s*")
_SIZE_EXAMPLE = "e.g. '8GB' (8*10^9 bytes), '8GiB' or '8G' (8*2^30 bytes), '512MiB', '64k', '1024'"


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"8GB"``, ``"8 GiB"``, ``"1.5TB"``, ``"64k"`` or ``1024``.

    GB/MB/KB/TB/PB are powers of 1000; GiB/MiB/KiB/TiB/PiB and bare G/M/K/T/P powers of 1024.
    Fractions round down to whole bytes; a size must be positive.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f"a size must be a string or an integer, got {_show(text)}; {_SIZE_EXAMPLE}")
    if isinstance(text, int):
        n_bytes = text
    else:
        n_bytes = _parse_size_text(text)
    if n_bytes <= 0:
        raise ConfigError(f"size {text!r} must be positive; {_SIZE_EXAMPLE}")
    return n_bytes


def _parse_size_text(text: str) -> int:
    match = _SIZE_RE.fullmatch(text)
    unit = _SIZE_UNITS.get(match.group(4).lower()) if match else None
    if match is None or unit is None or not (match.group(2) or match.group(3)):
        raise ConfigError(f"cannot parse size {text!r}: write a number and an optional unit, {_SIZE_EXAMPLE}")
    sign, whole, frac = match.group(1), match.group(2) or "0", match.group(3) or ""
    if unit == 1 and frac.strip("0"):
        raise ConfigError(f"size {text!r} is a fraction of a byte; give whole bytes or a unit, {_SIZE_EXAMPLE}")
    n_bytes = int(whole) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
    return -n_bytes if sign == "-" else n_bytes


def resolve_memory_limit(value: str | int, total_bytes: int) -> int:
    """Bytes of a memory limit: ``"auto"`` is ``AUTO_MEMORY_FRACTION`` (80%) of ``total_bytes``
    (what the caller measured as available), anything else is a size for ``parse_size``."""
    if value == "auto":
        return int(total_bytes * AUTO_MEMORY_FRACTION)
    return parse_size(value)


# ---------------------------------------------------------------------------------------------
# Where a value came from, for messages


@dataclass(frozen=True)
class _Origin:
    source: str
    """Name of the config file (or what the dict came from)."""
    overridden: frozenset[str] = frozenset()
    """``section.key`` names whose value was set by ``--set``."""


_ORIGIN: ContextVar[_Origin | None] = ContextVar("offload_train_config_origin", default=None)


@contextmanager
def _origin(origin: _Origin) -> Iterator[None]:
    token = _ORIGIN.set(origin)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def _where(key: str) -> str:
    """`` in config.yaml``, `` (from --set)`` or nothing (a dataclass built in Python)."""
    origin = _ORIGIN.get()
    if origin is None:
        return ""
    if key in origin.overridden:
        return " (from --set)"
    return f" in {origin.source}"


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "a list", dict: "a mapping"}


def _show(value: object) -> str:
    """A value and its type for a message, on one line, e.g. ``'abc' (a string)``."""
    if value is None:
        return "null"
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_TYPE_NAMES.get(type(value), type(value).__name__)})"


def _suggest(word: object, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(choices)}"


# ---------------------------------------------------------------------------------------------
# Field checks: each reads ``obj.<name>``, stores the normalized value or raises ConfigError


def _key(obj: object, name: str) -> str:
    return f"{obj._section}.{name}"  # type: ignore[attr-defined]


def _fail(obj: object, name: str, rule: str, value: object) -> NoReturn:
    key = _key(obj, name)
    raise ConfigError(f"{key}{_where(key)} must be {rule}, got {_show(value)}{_example(obj, name)}")


def _example(obj: object, name: str) -> str:
    examples: dict[str, str] = getattr(obj, "_examples", {})
    if name in examples:
        return f"; e.g. {name}: {examples[name]}"
    default = next((f.default for f in dataclasses.fields(obj) if f.name == name), None)  # type: ignore[arg-type]
    if default is None or default is dataclasses.MISSING:
        return ""
    shown = ("true" if default else "false") if isinstance(default, bool) else default
    return f"; e.g. {name}: {shown} (the default)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_str(obj: object, name: str, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        if isinstance(value, (int, float, dt.date)):  # YAML read a number, bool or date: say to quote it
            shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
            key = _key(obj, name)
            raise ConfigError(f"{key}{_where(key)} must be a non-empty string, got {_show(value)}: YAML reads "
                              f"{shown} as a {type(value).__name__}; quote it, e.g. {name}: '{shown}'")
        _fail(obj, name, "a non-empty string" + (" or null" if optional else ""), value)


def _check_path(obj: object, name: str, *, optional: bool = False) -> None:
    """A path: a non-empty string, with a leading ``~`` expanded to the home directory."""
    _check_str(obj, name, optional=optional)
    value = getattr(obj, name)
    if isinstance(value, str) and value.startswith("~"):
        setattr(obj, name, os.path.expanduser(value))


def _check_bool(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        _fail(obj, name, "true or false", value)


def _check_int(obj: object, name: str, *, ge: int | None = None, lt: int | None = None,
               optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    rule = "an integer" + _range_text(ge=ge, lt=lt) + (" or null" if optional else "")
    if not _is_int(value) or (ge is not None and value < ge) or (lt is not None and value >= lt):
        _fail(obj, name, rule, value)


def _check_float(obj: object, name: str, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None) -> None:
    """A number: ints and numeric strings (YAML reads ``1e-4`` as a string) become floats."""
    value = getattr(obj, name)
    number = _as_float(value)
    too_low = number is not None and ((gt is not None and number <= gt) or (ge is not None and number < ge))
    if number is None or too_low or (lt is not None and number >= lt):
        _fail(obj, name, "a number" + _range_text(gt=gt, ge=ge, lt=lt), value)
    setattr(obj, name, number)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _range_text(*, gt: float | None = None, ge: float | None = None, lt: float | None = None) -> str:
    parts = [f"{op} {bound if isinstance(bound, int) else f'{bound:g}'}"
             for op, bound in ((">", gt), (">=", ge), ("<", lt)) if bound is not None]
    return (" " + " and ".join(parts)) if parts else ""


def _check_choice(obj: object, name: str, choices: Sequence[str]) -> None:
    value = getattr(obj, name)
    if not isinstance(value, str) or value not in choices:
        key = _key(obj, name)
        raise ConfigError(f"{key}{_where(key)} must be one of {', '.join(choices)}, "
                          f"got {_show(value)}; {_suggest(value, choices)}")


def _check_size(obj: object, name: str) -> None:
    """``"auto"`` or a size (kept as written; an integer becomes its decimal string)."""
    value = getattr(obj, name)
    if value == "auto":
        return
    try:
        parse_size(value)
    except ConfigError as err:
        key = _key(obj, name)
        raise ConfigError(f"{key}{_where(key)} must be 'auto' or a size: {err}") from None
    setattr(obj, name, str(value) if _is_int(value) else value)


@lru_cache(maxsize=1)
def scheduler_types() -> tuple[str, ...]:
    """Valid ``train.lr_scheduler_type`` values: those of ``transformers.SchedulerType`` but the ones
    an evaluation metric drives each step (``reduce_lr_on_plateau``, ``greedy``: the loop has none)."""
    from transformers.trainer_utils import SchedulerType

    return tuple(member.value for member in SchedulerType if member.value not in METRIC_SCHEDULERS)


METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


@lru_cache(maxsize=1)
def _model_types() -> tuple[str, ...]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return tuple(CONFIG_MAPPING_NAMES)


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(kw_only=True)
class ModelConfig:
    """What to train: a local checkpoint, or a Hugging Face config for random initialization."""

    _section: ClassVar[str] = "model"
    _examples: ClassVar[dict[str, str]] = {"name_or_path": "/models/llama-3-8b",
                                           "config": "{model_type: llama, hidden_size: 64}"}

    name_or_path: str | None = None
    """Local Hugging Face checkpoint directory (``config.json`` + safetensors shards)."""
    config: dict[str, Any] | None = None
    """Hugging Face config fields, ``model_type`` included, for a randomly initialized model."""
    dtype: str = "float32"
    """Compute dtype of the weights on the GPU: float32, bfloat16 or float16."""
    state_dtype: str = "float32"
    """Master weights, Adam states and kept gradients: float32 (mixed precision: 12 bytes of
    optimizer state per parameter), or bfloat16 together with ``dtype: bfloat16`` (pure bf16
    training, 6 bytes per parameter: the math of a bf16 model with torch.optim.AdamW in memory)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the checkpoint directory to run."""

    def __post_init__(self) -> None:
        _check_path(self, "name_or_path", optional=True)
        self._check_config()
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "state_dtype", STATE_DTYPES)
        if self.state_dtype != "float32" and self.dtype != self.state_dtype:
            key = _key(self, "state_dtype")
            raise ConfigError(f"{key}{_where(key)} {self.state_dtype} needs model.dtype: {self.state_dtype} "
                              f"(pure {self.state_dtype} training), got model.dtype {self.dtype}; set both, "
                              f"or state_dtype: float32 for mixed precision")
        _check_bool(self, "trust_remote_code")
        if (self.name_or_path is None) == (self.config is None):
            self._fail_source()

    def _check_config(self) -> None:
        if self.config is None:
            return
        if not isinstance(self.config, Mapping) or not all(isinstance(k, str) for k in self.config):
            _fail(self, "config", "a mapping of Hugging Face config fields", self.config)
        self.config = dict(self.config)
        model_type = self.config.get("model_type")
        if isinstance(model_type, str) and model_type in _model_types():
            self._check_config_keys()
            return
        close = difflib.get_close_matches(str(model_type), _model_types(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "e.g. llama, gpt2, mistral, qwen2"
        raise ConfigError(f"model.config.model_type{_where('model.config')} must name a transformers "
                          f"model type, got {_show(model_type)}; {hint}")

    def _check_config_keys(self) -> None:
        """Every key is one the config class of model_type knows (transformers keeps unknown ones as
        plain attributes: a misspelled key would silently leave its default)."""
        assert self.config is not None
        unknown = config_checks.unknown_model_key(self.config)
        if unknown is None:
            return
        key, close = unknown
        cls = config_checks.config_class(self.config["model_type"]).__name__
        hint = (f"did you mean {close!r}?" if close else
                f"see {cls} in the transformers documentation for the keys it takes")
        raise ConfigError(f"unknown key 'model.config.{key}'{_where('model.config')}: {cls} "
                          f"(model_type {self.config['model_type']}) has no {key!r}; {hint}")

    def _fail_source(self) -> NoReturn:
        where = _where("model.name_or_path") or _where("model.config")
        if self.name_or_path is None:
            raise ConfigError(f"model{where} needs model.name_or_path (a local Hugging Face checkpoint "
                              "directory) or model.config (config fields with model_type, for random "
                              "init); add one of them")
        raise ConfigError(f"model{where} gives both model.name_or_path and model.config; keep one: "
                          "name_or_path loads a checkpoint, config builds a randomly initialized model")

    @property
    def torch_dtype(self) -> Any:
        """``torch.float32`` etc. (imports torch)."""
        import torch

        return getattr(torch, self.dtype)


@dataclass(kw_only=True)
class DataConfig:
    """Training text and how it becomes sequences."""

    _section: ClassVar[str] = "data"
    _examples: ClassVar[dict[str, str]] = {"path": "corpus.jsonl", "tokenizer": "/models/llama-3-8b"}

    path: str
    """Training data file or directory."""
    tokenizer: str | None = None
    """Tokenizer directory; null uses the one of model.name_or_path."""
    seq_len: int = 512
    """Tokens per training sequence."""
    shuffle: bool = True
    """Shuffle sequences every epoch (with train.seed)."""
    packing: bool = True
    """Concatenate documents and cut them into seq_len-token sequences (no padding)."""
    text_field: str = "text"
    """Field holding the text in JSON lines / dataset records."""
    eval_path: str | None = None
    """Evaluation data (same formats as path); used with train.eval_strategy: steps."""
    completion_only_loss: bool | None = None
    """prompt/completion rows: loss on the completion only (null: true, as TRL)."""
    assistant_only_loss: bool = False
    """messages rows: loss on the assistant turns only (as TRL)."""

    def __post_init__(self) -> None:
        _check_path(self, "path")
        _check_path(self, "eval_path", optional=True)
        if self.completion_only_loss is not None:
            _check_bool(self, "completion_only_loss")
        _check_bool(self, "assistant_only_loss")
        _check_path(self, "tokenizer", optional=True)
        _check_int(self, "seq_len", ge=1)
        _check_bool(self, "shuffle")
        _check_bool(self, "packing")
        _check_str(self, "text_field")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimization: Hugging Face ``TrainingArguments`` names and meanings."""

    _section: ClassVar[str] = "train"
    _examples: ClassVar[dict[str, str]] = {"output_dir": "runs/my-run", "save_total_limit": "3",
                                           "resume_from_checkpoint": "auto"}

    output_dir: str
    """Run folder: config.yaml, logs, checkpoints (and the swap, unless offload.nvme_path)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 runs num_train_epochs epochs instead."""
    num_train_epochs: float = 1.0
    """Passes over the data when max_steps is -1 (fractions allowed)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward (per_device_train_batch_size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule, a ``transformers.SchedulerType`` value (linear, cosine, ...)."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """What the schedule takes besides warm-up and length (``min_lr_rate`` of
    ``cosine_with_min_lr``, ``num_decay_steps`` of ``warmup_stable_decay``), as in TrainingArguments."""
    warmup_steps: float = 0.0
    """Linear warmup: steps when >= 1, a ratio of the total optimizer steps when below 1."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW beta2, in [0, 1)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    seed: int = 42
    """Seed of initialization, data order and dropout (0 <= seed < 2^32)."""
    logging_steps: int = 10
    """Log loss and throughput every this many optimizer steps."""
    save_steps: int = 500
    """Checkpoint every this many optimizer steps; 0 disables periodic checkpoints."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first); null keeps all."""
    resume_from_checkpoint: str | None = None
    """Checkpoint directory to resume from, ``auto`` for the latest in output_dir, or null.
    (``true``/``false`` are read as ``auto``/null, as Hugging Face allows.)"""
    nan_policy: str = "stop"
    """On a NaN/inf loss or gradient: ``stop`` the run, or ``skip`` that step's update."""
    eval_strategy: str = "no"
    """``steps``: evaluate on data.eval_path every eval_steps optimizer steps; ``no``: never."""
    eval_steps: int | None = None
    """Optimizer steps between evaluations; null: logging_steps (as Trainer)."""
    per_device_eval_batch_size: int = 8
    """Sequences per evaluation batch."""
    report_to: str = "none"
    """Where metrics go besides metrics.jsonl: ``none`` or ``tensorboard`` (event files in the run folder)."""

    def __post_init__(self) -> None:
        _check_path(self, "output_dir")
        self._check_max_steps()
        _check_float(self, "num_train_epochs", gt=0)
        _check_int(self, "micro_batch_size", ge=1)
        _check_int(self, "gradient_accumulation_steps", ge=1)
        _check_float(self, "learning_rate", gt=0)
        if self.lr_scheduler_type in METRIC_SCHEDULERS:
            _fail(self, "lr_scheduler_type", "a schedule the step count drives (reduce_lr_on_plateau and greedy "
                  "follow an evaluation metric each step)", self.lr_scheduler_type)
        _check_choice(self, "lr_scheduler_type", scheduler_types())
        self._check_warmup()
        _check_float(self, "weight_decay", ge=0)
        _check_float(self, "adam_beta1", ge=0, lt=1)
        _check_float(self, "adam_beta2", ge=0, lt=1)
        _check_float(self, "adam_epsilon", gt=0)
        _check_float(self, "max_grad_norm", ge=0)
        _check_int(self, "seed", ge=0, lt=SEED_LIMIT)
        _check_int(self, "logging_steps", ge=1)
        _check_int(self, "save_steps", ge=0)
        _check_int(self, "save_total_limit", ge=1, optional=True)
        self._check_resume()
        _check_choice(self, "nan_policy", NAN_POLICIES)
        if isinstance(self.eval_strategy, bool):  # YAML reads a bare no as false
            self.eval_strategy = "steps" if self.eval_strategy else "no"
        _check_choice(self, "eval_strategy", EVAL_STRATEGIES)
        if not isinstance(self.lr_scheduler_kwargs, dict):
            _fail(self, "lr_scheduler_kwargs", "a mapping of the schedule's arguments", self.lr_scheduler_kwargs)
        _check_int(self, "eval_steps", ge=1, optional=True)
        _check_int(self, "per_device_eval_batch_size", ge=1)
        _check_choice(self, "report_to", REPORT_TO)

    def _check_max_steps(self) -> None:
        if not _is_int(self.max_steps) or self.max_steps == 0 or self.max_steps < -1:
            _fail(self, "max_steps", "a positive integer, or -1 to train num_train_epochs epochs",
                  self.max_steps)

    def _check_warmup(self) -> None:
        _check_float(self, "warmup_steps", ge=0)
        if self.warmup_steps >= 1 and not self.warmup_steps.is_integer():
            _fail(self, "warmup_steps", "a whole number of steps when >= 1 (below 1 it is a ratio)",
                  self.warmup_steps)

    def _check_resume(self) -> None:
        if isinstance(self.resume_from_checkpoint, bool):
            self.resume_from_checkpoint = "auto" if self.resume_from_checkpoint else None
        _check_path(self, "resume_from_checkpoint", optional=True)

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps (as transformers computes it)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * self.warmup_steps)


@dataclass(kw_only=True)
class OffloadConfig:
    """Where tensors live and how they move. Every key has a default."""

    _section: ClassVar[str] = "offload"
    _examples: ClassVar[dict[str, str]] = {"nvme_path": "/nvme/swap", "gpu_memory_limit": "20GiB",
                                           "cpu_memory_limit": "64GB"}

    nvme_path: str | None = None
    """Swap directory on a fast SSD; null means ``<train.output_dir>/swap``."""
    gpu_memory_limit: str = "auto"
    """GPU memory budget: a size (``20GiB``) or ``auto`` (80% of the free GPU memory)."""
    cpu_memory_limit: str = "auto"
    """CPU RAM budget (pinned buffers included): a size (``64GB``) or ``auto`` (80% of available)."""
    io_backend: str = "auto"
    """SSD I/O: auto (kvikio with CUDA and kvikio installed, else posix), kvikio, posix or aio."""
    optimizer_impl: str = "auto"
    """CPU AdamW kernel: auto (the faster one, measured), deepspeed or torch."""
    engine: str = "native"
    """native: stream through GPU/CPU/NVMe; reference: plain in-memory PyTorch, for comparison."""
    recompute: bool | str = "auto"
    """true: recompute each layer in backward from its input; false: keep its activations; auto:
    decided by the planner from the memory budgets."""
    prefetch_depth: int | str = "auto"
    """Layers fetched ahead of the one computing (an integer >= 0), or auto (planner)."""
    trace: bool = False
    """Record a timeline of the last step's compute, transfers, SSD I/O and CPU Adam
    (``trace.json`` in output_dir, Chrome trace / Perfetto format; native engine only)."""
    io_threads: int = 8
    """Threads submitting SSD reads and writes."""

    def __post_init__(self) -> None:
        _check_path(self, "nvme_path", optional=True)
        _check_size(self, "gpu_memory_limit")
        _check_size(self, "cpu_memory_limit")
        _check_choice(self, "io_backend", IO_BACKENDS)
        _check_choice(self, "optimizer_impl", OPTIMIZER_IMPLS)
        _check_choice(self, "engine", ENGINES)
        if not isinstance(self.recompute, bool) and self.recompute != "auto":
            _fail(self, "recompute", "auto, true or false", self.recompute)
        if self.prefetch_depth != "auto" and not (_is_int(self.prefetch_depth) and self.prefetch_depth >= 0):
            _fail(self, "prefetch_depth", "an integer >= 0 or auto", self.prefetch_depth)
        _check_bool(self, "trace")
        _check_int(self, "io_threads", ge=1)


@dataclass(kw_only=True)
class PeftSection:
    """LoRA adapters on a frozen, streamed base (PEFT's ``LoraConfig`` names and defaults). The run
    trains adapters only when the config has a ``peft`` section (``peft: {}`` takes every default)."""

    _section: ClassVar[str] = "peft"
    _examples: ClassVar[dict[str, str]] = {"target_modules": "[q_proj, v_proj]",
                                           "adapter_name_or_path": "runs/sft/final"}

    r: int = 8
    """Rank of the adapters."""
    lora_alpha: float = 8
    """Scale numerator: the update is B A x times lora_alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (masks identical under recompute)."""
    target_modules: str | list[str] = "all-linear"
    """Module names (or name suffixes) that get adapters, a regex, or all-linear (every linear
    layer but the LM head)."""
    bias: str = "none"
    """Biases trained too: none, all or lora_only (as PEFT)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapters (e.g. [lm_head]); their copy is saved too."""
    adapter_name_or_path: str | None = None
    """Continue from a PEFT adapter folder (its adapter_config.json replaces the keys above)."""

    def __post_init__(self) -> None:
        _check_int(self, "r", ge=1)
        _check_float(self, "lora_alpha", gt=0)
        _check_float(self, "lora_dropout", ge=0, lt=1)
        targets = self.target_modules
        if not ((isinstance(targets, str) and targets.strip())
                or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
            _fail(self, "target_modules", "all-linear, a module name regex, or a list of module names", targets)
        _check_choice(self, "bias", PEFT_BIASES)
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, list) and all(isinstance(t, str) and t for t in self.modules_to_save)):
            _fail(self, "modules_to_save", "a list of module names or null", self.modules_to_save)
        _check_path(self, "adapter_name_or_path", optional=True)


@dataclass
class RunConfig:
    """A whole run: ``RunConfig(model, data, train, offload, peft)``."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    peft: PeftSection | None = None
    """LoRA on a frozen base when set; None: every weight trains."""

    def __post_init__(self) -> None:
        if self.model.state_dtype != "float32" and self.offload.optimizer_impl == "deepspeed":
            key = "offload.optimizer_impl"
            raise ConfigError(f"{key} deepspeed{_where(key)} takes float32 optimizer states only; with "
                              f"model.state_dtype {self.model.state_dtype} use torch (or auto)")
        if self.offload.engine == "reference" and self.model.state_dtype != self.model.dtype:
            key = "offload.engine"
            raise ConfigError(f"{key} reference{_where(key)} trains in one dtype (the model and torch AdamW "
                              f"in memory), but model.dtype is {self.model.dtype} and model.state_dtype "
                              f"{self.model.state_dtype}; set model.state_dtype: {self.model.dtype} (pure "
                              f"{self.model.dtype}) or model.dtype: float32, or use engine: native")

        if self.peft is not None and self.model.state_dtype != "float32":
            key = "model.state_dtype"
            raise ConfigError(f"{key} {self.model.state_dtype}{_where(key)} with a peft section: the frozen base "
                              f"has no optimizer state and the adapters' is small; keep state_dtype: float32 "
                              f"(model.dtype sets the base's dtype)")
        if self.peft is not None and self.offload.engine == "reference":
            key = "offload.engine"
            raise ConfigError(f"{key} reference{_where(key)} does not train LoRA adapters; use engine: native")
        if self.train.eval_strategy == "steps" and self.data.eval_path is None:
            key = "train.eval_strategy"
            raise ConfigError(f"{key} steps{_where(key)} needs data.eval_path: set it to the evaluation data "
                              f"(same formats as data.path), or set {key}: no")

    @property
    def optimizer_impl(self) -> str:
        """offload.optimizer_impl, with ``auto`` narrowed to torch for bf16 states (DeepSpeed's
        cpu_adam takes fp32 only)."""
        if self.model.state_dtype != "float32" and self.offload.optimizer_impl == "auto":
            return "torch"
        return self.offload.optimizer_impl

    @property
    def offload_nvme_path(self) -> Path:
        """The swap directory: offload.nvme_path, or ``<train.output_dir>/swap``."""
        if self.offload.nvme_path is not None:
            return Path(self.offload.nvme_path)
        return Path(self.train.output_dir) / "swap"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values by section, every key present (defaults filled in, ``auto`` and sizes as
        written); ``config_from_dict`` of it gives an equal RunConfig."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS
                if getattr(self, name) is not None}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                             "offload": OffloadConfig, "peft": PeftSection}
OPTIONAL_SECTIONS = frozenset({"peft"})
"""Sections that are off unless the config has them (every other section is built from its defaults)."""
_MAPPING_KEYS = frozenset({"model.config", "train.lr_scheduler_kwargs"})
"""Keys whose value is a free-form mapping: ``--set`` may reach inside them."""
_BOOLEAN_STRING_KEYS = frozenset({"train.resume_from_checkpoint", "train.eval_strategy"})
"""String keys that also take true/false (read as auto/null, steps/no): --set keeps those booleans."""


def _unknown_key_hint(section: str, key: object, names: Sequence[str]) -> str:
    return config_checks.key_hint(section, key) or _suggest(key, names)


def _is_string_key(section: str, name: str) -> bool:
    spec = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    return spec.type in ("str", "str | None")


# ---------------------------------------------------------------------------------------------
# Building from a dict


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a ``{section: {key: value}}`` mapping; ``source`` names it in messages."""
    return _build(d, _Origin(source))


def _build(d: object, origin: _Origin) -> RunConfig:
    """Names first (unknown sections and keys, missing required keys), then values."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{origin.source} must hold a mapping of sections ({', '.join(SECTIONS)}) "
                          f"at the top level, got {_show(d)}")
    for name in d:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {str(name)!r} in {origin.source}; {_suggest(name, list(SECTIONS))}")
    present = {name: cls for name, cls in SECTIONS.items() if name not in OPTIONAL_SECTIONS or name in d}
    raw = {name: _section_keys(cls, name, d.get(name), origin.source) for name, cls in present.items()}
    for name, cls in present.items():
        _check_required(cls, name, raw[name], origin.source)
    with _origin(origin):
        return RunConfig(**{name: cls(**_deep_copy(raw[name])) for name, cls in present.items()})


def _section_keys(cls: type, name: str, raw: object, source: str) -> Mapping[str, Any]:
    """The section's mapping (null is empty), after checking that every key is a field of cls."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section {name!r} in {source} must be a mapping of keys, got {_show(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key '{name}.{key}' in {source}; {_unknown_key_hint(name, key, names)}")
    return raw


def _check_required(cls: type, name: str, raw: Mapping[str, Any], source: str) -> None:
    for spec in dataclasses.fields(cls):
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if required and spec.name not in raw:
            example = cls._examples.get(spec.name, "...")  # type: ignore[attr-defined]
            raise ConfigError(f"{name}.{spec.name} is required but missing in {source}; "
                              f"add it under {name}:, e.g. {spec.name}: {example}")


def _deep_copy(value: Any) -> Any:
    """Plain copies of mappings and lists, so a RunConfig shares nothing with its input."""
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Loading a file, overrides, dumping


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (yaml would keep the last)."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise _DuplicateKeyError(None, None, f"key {key!r} is given twice; keep one",
                                     key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        hint = "" if isinstance(err, _DuplicateKeyError) else "; fix the syntax there (indentation, quotes)"
        raise ConfigError(f"invalid YAML in {where}{at}: {problem}{hint}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; check the path "
                          f"(relative to {Path.cwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a directory; give the YAML file, "
                          f"e.g. {path / 'config.yaml'}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {err.start}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}; check its permissions") from None


def load_config(path: str | Path, overrides: Sequence[str] | None = ()) -> RunConfig:
    """Read, override (``section.key=value`` strings from ``--set``) and validate a config file."""
    if isinstance(overrides, str):
        overrides = [overrides]
    overrides = overrides or ()
    source = str(path)
    raw = _parse_yaml(_read_text(Path(path)), source)
    if raw is None:
        raise ConfigError(f"config file {source} is empty; it needs the sections model, data and "
                          "train (offload is optional), e.g. 'data: {path: corpus.jsonl}'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections ({', '.join(SECTIONS)}) "
                          f"at the top level, got {_show(raw)}")
    overridden = frozenset(_apply_override(raw, text) for text in overrides)
    return _build(raw, _Origin(source, overridden))


def _apply_override(raw: dict[str, Any], text: str) -> str:
    """Set one ``section.key[.subkey...]=value`` in ``raw``; returns ``section.key``."""
    dotted, sep, value_text = text.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"bad override {text!r}: expected section.key=value, "
                          "e.g. --set train.learning_rate=1e-4")
    section, name, *deeper = parts
    where = f"--set {text}"
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} in {where}; {_suggest(section, list(SECTIONS))}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        raise ConfigError(f"unknown key '{section}.{name}' in {where}; {_unknown_key_hint(section, name, names)}")
    value = _parse_yaml(value_text, where)
    cut = config_checks.comment_cut(value_text)
    if not deeper and _is_string_key(section, name) and config_checks.is_plain_text(value_text) and (
            cut or (value is not None and not isinstance(value, str)
                    and not (isinstance(value, bool) and f"{section}.{name}" in _BOOLEAN_STRING_KEYS))):
        value = value_text.strip()  # a string key: 2024-01-01, 123, yes or 'a #b' are that text
    elif cut:
        raise ConfigError(f"bad override {text!r}: YAML reads ' #' as the start of a comment and would cut "
                          f"the value to {_show(value)}; quote the value (--set \"{dotted.strip()}='a #b'\") or drop the ' #' part")
    target = _child_mapping(raw, section, where)
    if not deeper:
        target[name] = value
        return f"{section}.{name}"
    if f"{section}.{name}" not in _MAPPING_KEYS:
        raise ConfigError(f"bad override {text!r}: {section}.{name} is not a mapping, so it has no "
                          f"keys inside; use --set {section}.{name}=VALUE")
    node = _child_mapping(target, name, where)
    for part in deeper[:-1]:
        node = _child_mapping(node, part, where)
    node[deeper[-1]] = value
    return f"{section}.{name}"


def _child_mapping(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    child = parent.get(key)
    if child is None:
        child = parent[key] = {}
    if not isinstance(child, dict):
        raise ConfigError(f"cannot apply {where}: {key!r} holds {_show(child)}, not a mapping")
    return child


def dump_yaml(cfg: RunConfig) -> str:
    """YAML text of ``cfg.to_dict()``, sections and keys in declaration order; loads back equal."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
