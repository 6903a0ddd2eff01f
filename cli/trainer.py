"""``OffloadTrainer``: a ``transformers.Trainer`` whose step runs out of core. A Trainer script
changes one line (``Trainer(...)`` → ``OffloadTrainer(..., offload=OffloadArguments(...))``).

What stays Trainer's: the data loader and collator, ``num_items_in_batch``, the learning-rate
schedule, logging and ``report_to``, callbacks, ``evaluate()`` with ``compute_metrics``, checkpoint
folders and ``save_total_limit``. What the engine owns is overridden, each with the least code:

- ``create_optimizer``: starts the engine (``cli.api.OffloadEngine``: planner, swap store, CPU
  AdamW). ``self.optimizer`` only carries the learning rate the scheduler sets; the AdamW state
  exists once, in the engine.
- ``training_step``: forward and backward of one micro-batch in the engine (``micro_step``; the
  loss is normalized as Trainer's).
- ``_clip_grad_norm`` / ``_get_grad_norm``: the engine finishes the step there (clipping, updates
  or their deferred pass) with the scheduler's learning rate and returns its norm: Trainer asks
  for the norm before ``optimizer.step()``, which is then a no-op.
- ``prediction_step``: a streamed forward (``predict``) gives the loss and, unless only the loss
  is wanted, the logits for ``compute_metrics``.
- ``save_model``/``_save``: the hub layout (a PEFT model: its adapter folder), streamed unit by
  unit; inside checkpoints the engine's snapshot replaces the weights (``_save_checkpoint`` writes
  ``checkpoints/step-N`` in the CLI's format beside Trainer's ``checkpoint-N``).
- ``_load_from_checkpoint``: nothing to load into the model: ``train(resume_from_checkpoint=...)``
  restarts the engine from the snapshot of that step, and Trainer restores the rest.
- ``_move_model_to_device`` and ``_wrap_model``: the engine places every tensor.

Checked on transformers 5.25 (``tests/test_offload_trainer.py`` pins the versions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from cli.api import OffloadArguments, OffloadEngine

CHECKED_TRANSFORMERS = ("5.24", "5.25")
"""transformers minor versions whose Trainer internals these overrides were checked against."""


class _LearningRate(torch.optim.Optimizer):
    """What the scheduler drives: one parameter group holding the learning rate; ``step`` is a
    no-op (the engine updates in ``OffloadTrainer._get_grad_norm``)."""

    def __init__(self, lr: float) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": lr})

    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - torch's signature
        return None


class OffloadTrainer(Trainer):
    def __init__(self, model: nn.Module | str | os.PathLike[str] | None = None, args: Any = None, *posargs: Any,
                 offload: OffloadArguments | None = None, **kwargs: Any) -> None:
        self.offload = offload or OffloadArguments()
        self._source = model
        if isinstance(model, (str, os.PathLike)):  # a checkpoint: an empty model now, weights streamed later
            from transformers import AutoConfig

            from scheduler.materialize import empty_model

            model = empty_model(AutoConfig.from_pretrained(model))
        self.offload_engine: OffloadEngine | None = None
        self._resume_from: str | None = None
        super().__init__(model, args, *posargs, **kwargs)

    # ------------------------------------------------------------------------------ placement
    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        return None  # the engine places every tensor (a checkpoint's model is empty until then)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        return model

    # ------------------------------------------------------------------------------ the step
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        from transformers.trainer_utils import get_last_checkpoint

        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if self.offload_engine is None:
                self._start_engine()
            self.optimizer = _LearningRate(self.args.learning_rate)
        return self.optimizer

    def close(self) -> None:
        """Stop the engine and close its swap store (its lock, threads): call it when done with
        the trainer (after training, saving and evaluating), before another run uses the swap."""
        if self.offload_engine is not None:
            self.offload_engine.close(raise_errors=True)
            self.offload_engine = None

    def _start_engine(self) -> None:
        a = self.args
        step = None
        if self._resume_from is not None:
            step = Path(self._resume_from).name.rpartition("-")[2]
        source = self._source if isinstance(self._source, (str, os.PathLike)) else self.model
        self.offload_engine = OffloadEngine(
            source, output_dir=a.output_dir, dtype=_dtype_name(a), seq_len=_seq_len(self.train_dataset),
            offload=self.offload, learning_rate=a.learning_rate, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_epsilon=a.adam_epsilon,
            max_grad_norm=a.max_grad_norm, gradient_accumulation_steps=a.gradient_accumulation_steps,
            micro_batch_size=a.per_device_train_batch_size, seed=a.seed, save_total_limit=a.save_total_limit,
            resume_from_checkpoint=None if step is None else str(Path(a.output_dir) / "checkpoints" / f"step-{step}"))
        self.offload_engine.open()
        self.model = self.model_wrapped = self.offload_engine.ctx.model

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        assert self.offload_engine is not None
        inputs = self._prepare_inputs(inputs)
        batch = {k: inputs[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in inputs}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        loss = self.offload_engine.engine.micro_step(batch, self._lr(), last=self.accelerator.sync_gradients,
                                                     n_micro=self.current_gradient_accumulation_steps)
        return torch.tensor(loss, device=self.args.device)

    def _clip_grad_norm(self, model: nn.Module) -> None:
        return None  # clipped by the engine in _get_grad_norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float | None:
        assert self.offload_engine is not None
        norm, _ = self.offload_engine.engine.finish_step(self._lr())
        return norm

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------ evaluation
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        if self.offload_engine is None:  # evaluate() before train(): start the engine now
            self._start_engine()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        loss_sum, n, logits = self.offload_engine.engine.predict(inputs)
        loss = torch.tensor(loss_sum / max(n, 1))
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, labels

    # ------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call and getattr(self, "_in_checkpoint", False):
            # a checkpoint holds the engine's snapshot (checkpoints/step-N), not a copy of the weights
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "offload_checkpoint.json").write_text(json.dumps(
                {"snapshot": f"../checkpoints/step-{self.state.global_step}"}))
            return
        if self.offload_engine is None:  # neither trained nor evaluated yet: the model is the user's
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.offload_engine.save(output_dir or self.args.output_dir)
        return None

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        assert self.offload_engine is not None
        self.offload_engine.checkpoint(self.state.global_step)
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        return None  # the engine restarts from the checkpoint's snapshot (create_optimizer)


def _dtype_name(args: Any) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def _seq_len(dataset: Any) -> int:
    """The longest of the first rows (what the planner plans a step for)."""
    try:
        return max(len(dataset[i]["input_ids"]) for i in range(min(len(dataset), 64)))
    except (TypeError, KeyError, IndexError, ValueError):
        return 512
