"""The Python API: the out-of-core engine for people with their own training loop.

```python
from cli import OffloadArguments, OffloadEngine

with OffloadEngine("/models/llama-3-8b", offload=OffloadArguments(cpu_memory_limit="32GB"),
                   weight_decay=0.01, max_grad_norm=1.0, gradient_accumulation_steps=2) as engine:
    for micro_batches in loader:                  # lists of {"input_ids", "labels", ...}
        engine.step(micro_batches, lr=2e-5)
    engine.save("out")                            # the hub layout (a PEFT model: its adapter folder)
```

The model is a checkpoint directory (streamed from its safetensors, never materialized) or a model
instance (copied into the swap store unit by unit, its memory released); a ``PeftModel`` trains
its adapters on a frozen base. Budgets and AdamW settings are given once; the planner chooses the
placement as ``offload-train train`` does, and the run folder (``output_dir``: plan.json, swap,
checkpoints/step-N) has the CLI's layout, so either can resume the other's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli.config import ConfigError, DataConfig, ModelConfig, OffloadConfig, RunConfig, TrainConfig
from cli.run_lock import RunLock
from offload.errors import OffloadError


@dataclass(kw_only=True)
class OffloadArguments(OffloadConfig):
    """The config's ``offload`` section for Python users (same keys, defaults and checks), plus
    ``plan``: a plan.json to replay instead of the planner's choice."""

    plan: str | None = None


TRAIN_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
              "gradient_accumulation_steps", "micro_batch_size", "seed", "nan_policy", "max_steps",
              "save_total_limit")


def offload_arguments(offload: OffloadArguments | dict[str, Any] | None, who: str) -> OffloadArguments:
    """``offload=`` as ``OffloadArguments`` or a dict of its keys (an unknown key: one error)."""
    if not isinstance(offload, dict):
        return offload or OffloadArguments()
    known = [f.name for f in dataclasses.fields(OffloadArguments)]
    unknown = sorted(set(offload) - set(known))
    if unknown:
        raise ConfigError(f"{who}: offload= has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(known)}")
    return OffloadArguments(**offload)


class OffloadEngine:
    """Builds and runs the streaming engine; a context manager. ``train`` keys (Hugging Face
    TrainingArguments names: ``weight_decay``, ``max_grad_norm``, ``gradient_accumulation_steps``,
    ``micro_batch_size``, ``seed``, ...) set AdamW and the step once; ``seq_len`` is what the
    planner plans for."""

    def __init__(self, model: str | os.PathLike[str] | nn.Module, *, output_dir: str | os.PathLike[str] = "offload-run",
                 dtype: str = "float32", state_dtype: str = "float32", seq_len: int = 512,
                 offload: OffloadArguments | dict[str, Any] | None = None, resume_from_checkpoint: str | None = None,
                 **train: Any) -> None:
        unknown = sorted(set(train) - set(TRAIN_KEYS))
        if unknown:
            raise ConfigError(f"OffloadEngine got unknown argument(s) {', '.join(unknown)}; the training ones are "
                              f"{', '.join(TRAIN_KEYS)}")
        if isinstance(model, nn.Module) and any(p.device.type == "meta" for p in model.parameters()):
            raise ConfigError("the model has no weights (meta device): pass the checkpoint's path instead, "
                              "whose weights are streamed from its files")
        self.model_source = model
        self.offload = offload_arguments(offload, "OffloadEngine")
        self.cfg = RunConfig(
            model=ModelConfig(name_or_path=str(model), dtype=dtype, state_dtype=state_dtype)
            if isinstance(model, (str, os.PathLike)) else
            ModelConfig(config={"model_type": model.config.model_type}, dtype=dtype, state_dtype=state_dtype),
            data=DataConfig(path="<python>", seq_len=seq_len),
            train=TrainConfig(output_dir=str(output_dir), resume_from_checkpoint=resume_from_checkpoint,
                              **{"max_grad_norm": 0.0, **train}),
            offload=OffloadConfig(**{f.name: getattr(self.offload, f.name) for f in dataclasses.fields(OffloadConfig)}))
        self.engine: Any = None
        self.store: Any = None
        self.ctx: Any = None
        self.resumed_step = 0
        self._closing: list[Any] = []
        self._lock: RunLock | None = None

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> OffloadEngine:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(exc_type is None)

    def open(self) -> OffloadEngine:
        """Plan, open the swap store (at the checkpoint resumed from, if any), start the engine."""
        from cli import checkpoint as ckpt_io
        from cli import swap
        from cli.train import (
            RunContext,
            build_model,
            check_resumable_before_newer,
            load_model_config,
            make_engine,
            make_plan,
        )
        from offload import SwapStore, make_backend
        from offload.tiers import Tier
        from scheduler.model_map import build_model_map
        from scheduler.settings import UpdateState

        cfg = self.cfg
        run_dir = Path(cfg.train.output_dir)
        self._lock = RunLock(run_dir).acquire()  # released by close(); one run per folder
        if isinstance(self.model_source, nn.Module):
            model, initializer, hf_config = self.model_source, None, self.model_source.config
        else:
            hf_config = load_model_config(cfg)
            model, initializer = build_model(cfg, hf_config)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ctx = RunContext(cfg, run_dir, hf_config, None, None, model, initializer,
                              getattr(torch, cfg.model.dtype), device)
        plan, record = make_plan(self.ctx, self.offload.plan, None, cfg.train.max_steps if cfg.train.max_steps > 0 else None)
        ckpt = ckpt_io.resolve_resume(run_dir, cfg.train.resume_from_checkpoint)
        if ckpt is None and ckpt_io.list_checkpoints(run_dir):  # a fresh store would drop their snapshots
            raise OffloadError(f"{run_dir} already holds checkpoints of an earlier run; resume from one "
                               f"(resume_from_checkpoint), or choose another output_dir")
        update, saved_impl, newer = UpdateState(), None, []
        if ckpt is not None:
            state = ckpt_io.read_trainer_state(ckpt)
            self.resumed_step = state["step"]
            update = UpdateState(state.get("optimizer_step", ckpt.step), state.get("loss_scale"),
                                 state.get("good_steps", 0))
            saved_impl = state.get("optimizer_impl")
            newer = [c for c in ckpt_io.list_checkpoints(run_dir) if c.step > ckpt.step]
        self.store = SwapStore(cfg.offload_nvme_path, make_backend(cfg.offload.io_backend, cfg.offload.io_threads))
        self.store.open()
        units = build_model_map(model).units
        self.fingerprint = ckpt_io.model_fingerprint(hf_config.to_dict(), units)
        on_nvme = cfg.offload.engine != "reference" and plan.optimizer == Tier.NVME
        start = swap.prepare_store(self.store, run_dir, ckpt, units, plan.chunk_numel if on_nvme else None)
        if newer:  # an older checkpoint resumed: it must verify before the newer ones go (as in train)
            check_resumable_before_newer(ckpt, newer, cfg.offload_nvme_path)
        self.engine = make_engine(self.ctx, plan, self.store, start, update, self._closing, saved_impl)
        for c in newer:
            ckpt_io.remove_checkpoint(c, self.store)  # training on from ckpt rewrites them
        (run_dir / "plan.json").write_text(json.dumps(record, indent=2))
        self.engine.__enter__()
        return self

    def close(self, raise_errors: bool = False) -> None:
        try:
            if self.engine is not None:
                self.engine.__exit__(None if raise_errors else RuntimeError)
        finally:
            self.engine = None
            if self.store is not None:
                self.store.close()
                self.store = None
            while self._closing:
                self._closing.pop().close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------------------ training
    def step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> Any:
        """One optimizer step (``StreamingExecutor.train_step``): returns its ``StepResult``."""
        engine = self._running()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr={lr!r}: the learning rate must be a finite number >= 0")
        n_micro = self.cfg.train.gradient_accumulation_steps
        if len(micro_batches) != n_micro:
            raise ValueError(f"step() got {len(micro_batches)} micro-batches, but the engine was built with "
                             f"gradient_accumulation_steps={n_micro}: pass lists of {n_micro}, or build it with "
                             f"gradient_accumulation_steps={len(micro_batches)}")
        vocab = getattr(self.ctx.hf_config.get_text_config(), "vocab_size", None)
        for k, batch in enumerate(micro_batches):
            ids = batch["input_ids"]
            if not vocab or not ids.numel():
                continue
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            if not 0 <= bad < vocab:
                raise ValueError(f"micro-batch {k} has token id {bad} outside the model's vocabulary "
                                 f"[0, {vocab}): tokenize with the model's tokenizer")
        return engine.train_step(micro_batches, lr)

    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of token losses, target tokens) of a forward in eval mode."""
        return self._running().evaluate(batch)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """The trained model in the hub layout (a PEFT model: its adapter folder), streamed unit
        by unit."""
        from cli.train import write_model

        return write_model(self.ctx.model, self._running(), Path(out_dir), self.ctx.dtype)

    def checkpoint(self, step: int, extra_state: dict[str, Any] | None = None, rotate: bool = True) -> Path:
        """A resumable checkpoint ``output_dir/checkpoints/step-N`` (the CLI's format); with
        ``rotate`` the oldest beyond ``save_total_limit`` go, else ``remove_checkpoint`` does."""
        from cli.train import save_engine_checkpoint

        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint({step!r}): the step must be an int >= 0 (it names checkpoints/step-N)")
        state = {"step": step, "fingerprint": self.fingerprint, "data_position": {"epoch": 0, "batch_index": 0},
                 **(extra_state or {})}
        return save_engine_checkpoint(self.ctx, self._running(), self.store, step, state, rotate)

    def remove_checkpoint(self, step: int) -> None:
        """Delete ``checkpoints/step-N`` and give its snapshot's SSD space back (no-op if absent)."""
        from cli import checkpoint as ckpt_io

        self._running()
        for ckpt in ckpt_io.list_checkpoints(Path(self.cfg.train.output_dir)):
            if ckpt.step == step:
                ckpt_io.remove_checkpoint(ckpt, self.store)

    def _running(self) -> Any:
        if self.engine is None:
            raise OffloadError("the engine is not open: use `with OffloadEngine(...) as engine:` or call open()")
        return self.engine
