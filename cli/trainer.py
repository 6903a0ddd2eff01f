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

What the engine cannot do is refused at construction, in one error naming it, never ignored: a
custom optimizer (``optimizers=``, ``optim`` other than AdamW), a custom loss (``compute_loss_func``,
a ``compute_loss`` override, ``label_smoothing_factor``), ``load_best_model_at_end``, and a model
instance whose trainable weights are not float32. Checkpoint folders Trainer rotates out (keeping
the best one) take their engine snapshot with them; a batch without labels stops as Trainer does.

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

from cli.api import OffloadArguments, OffloadEngine, offload_arguments
from cli.config import ConfigError

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
                 offload: OffloadArguments | dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.offload = offload_arguments(offload, "OffloadTrainer")
        self._source = model
        if isinstance(model, (str, os.PathLike)):  # a checkpoint: an empty model now, weights streamed later
            from transformers import AutoConfig

            from scheduler.materialize import empty_model

            model = empty_model(AutoConfig.from_pretrained(model))
        self.offload_engine: OffloadEngine | None = None
        self._resume_from: str | None = None
        self._tracked: set[int] = set()  # steps of Trainer's checkpoints with an engine snapshot
        self._closed = False
        super().__init__(model, args, *posargs, **kwargs)
        _refuse_unsupported(self)

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
        if self.offload_engine is not None and self._resume_from is not None:
            self.close_engine()  # started by evaluate() or save_model(): restart it at the checkpoint
        self._tracked = self._trainer_checkpoints()  # checkpoint-N folders whose snapshots follow them
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.args.save_strategy != "no":
            self._drop_rotated_snapshots()
        return output

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.offload_engine is None:  # first train(), or train(resume) after the engine was closed
            self._start_engine()
        if self.optimizer is None:
            self.optimizer = _LearningRate(self.args.learning_rate)
        return self.optimizer

    def close(self) -> None:
        """Stop the engine and close its swap store (its lock, threads): call it when done with
        the trainer (after training, saving and evaluating), before another run uses the swap.
        The trainer cannot train, evaluate or save after it."""
        self.close_engine()
        self._closed = True

    def close_engine(self) -> None:
        """Stop the engine only (the trainer may start it again: at a checkpoint, in train())."""
        if self.offload_engine is not None:
            self.offload_engine.close(raise_errors=True)
            self.offload_engine = None

    def _start_engine(self) -> None:
        if self._closed:  # a new engine would start from the base weights, not the trained ones
            raise ConfigError("OffloadTrainer: this trainer was closed (close() released its engine and swap "
                              "store); save and evaluate before close(), or build a new OffloadTrainer")
        a = self.args
        step = None
        if self._resume_from is not None:
            step = Path(self._resume_from).name.rpartition("-")[2]
        source = self._source if isinstance(self._source, (str, os.PathLike)) else self.model
        engine = OffloadEngine(
            source, output_dir=a.output_dir, dtype=_dtype_name(a), seq_len=_seq_len(self.train_dataset),
            offload=self.offload, learning_rate=a.learning_rate, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_epsilon=a.adam_epsilon,
            max_grad_norm=a.max_grad_norm, gradient_accumulation_steps=a.gradient_accumulation_steps,
            micro_batch_size=a.per_device_train_batch_size, seed=a.seed, save_total_limit=a.save_total_limit,
            resume_from_checkpoint=None if step is None else str(Path(a.output_dir) / "checkpoints" / f"step-{step}"))
        try:
            engine.open()
        except BaseException:
            engine.close()  # what it opened (the store's lock); the trainer holds no half-open engine
            raise
        self.offload_engine = engine
        self.model = self.model_wrapped = engine.ctx.model

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        assert self.offload_engine is not None
        inputs = self._prepare_inputs(inputs)
        if "labels" not in inputs:  # Trainer's model would return no loss: it stops too
            raise ValueError(f"the batch has no labels, only {', '.join(inputs)}: the model returns no loss; "
                             f"use a collator that makes them (DataCollatorForLanguageModeling(tokenizer, "
                             f"mlm=False)) or put labels in the dataset")
        batch = dict(inputs)  # the model inputs among them pass to its forward (model_inputs)
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

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("OffloadTrainer: hyperparameter_search is not supported (one engine and swap store per "
                          "output_dir); run one OffloadTrainer per trial instead")

    # ------------------------------------------------------------------------------ evaluation
    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        if self.offload_engine is None:  # evaluate() or predict() before train(): the engine places
            self._start_engine()  # the model first (a checkpoint's is empty until then)
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        if self.offload_engine is None:  # evaluate() before train(): start the engine now
            self._start_engine()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        loss_sum, n, logits, router = self.offload_engine.engine.predict(inputs)
        if self.model_accepts_loss_kwargs and labels is not None:  # Trainer's count of the targets
            items = self._get_num_items_in_batch([inputs], self.args.device)  # (GPT-2's: unshifted)
            n = int(items) if items is not None else n
        loss = torch.tensor(loss_sum / max(n, 1) + router)  # the model's loss: Trainer's eval loss
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
            self._save_beside(out)
            return
        if self.offload_engine is None:
            if not isinstance(self._source, (str, os.PathLike)):  # neither trained nor evaluated: the
                return super().save_model(output_dir, _internal_call)  # model is the user's, in memory
            self._start_engine()  # a checkpoint's model: streamed through the engine
        if self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            self.offload_engine.save(out)
            self._save_beside(out)
        return None

    def _save_beside(self, out: Path) -> None:
        """What Trainer's ``_save`` writes beside the weights: the processing class (or the
        collator's tokenizer) and ``training_args.bin``."""
        from transformers.trainer import TRAINING_ARGS_NAME

        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        assert self.offload_engine is not None
        self.offload_engine.checkpoint(self.state.global_step, rotate=False)  # Trainer's rotation decides
        self._tracked.add(self.state.global_step)
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False
        self._drop_rotated_snapshots()

    def _drop_rotated_snapshots(self) -> None:
        """Remove the engine snapshots of the checkpoint-N folders Trainer rotated out: after each
        checkpoint, and after training (with save_total_limit 1 it drops the last one if another
        is the best)."""
        if self.offload_engine is None:
            return
        kept = self._trainer_checkpoints()
        for step in sorted(self._tracked - kept):  # never a snapshot Trainer did not make (a CLI run's)
            self.offload_engine.remove_checkpoint(step)  # (no-op where there is none)
        self._tracked &= kept

    def _trainer_checkpoints(self) -> set[int]:
        """N of every ``checkpoint-N`` folder in the output directory."""
        return {int(p.name.rpartition("-")[2]) for p in Path(self.args.output_dir).glob("checkpoint-*")
                if p.name.rpartition("-")[2].isdigit()}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        return None  # the engine restarts from the checkpoint's snapshot (create_optimizer)


def _refuse_unsupported(trainer: OffloadTrainer) -> None:
    """Trainer features the engine would otherwise ignore without a word: one error naming each."""
    from transformers import Trainer

    a = trainer.args
    said = None
    if trainer.optimizer is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        said = ("optimizers= is not supported: the engine runs its own CPU AdamW (its state on the SSD); set "
                "learning_rate, weight_decay and adam_beta1/2/epsilon in TrainingArguments instead")
    elif (optim := str(getattr(a.optim, "value", a.optim))) not in SUPPORTED_OPTIM:
        said = (f"optim={optim!r} is not supported: the engine runs AdamW ({' or '.join(SUPPORTED_OPTIM)}, the "
                f"same math); drop optim or set it to adamw_torch_fused")
    elif a.label_smoothing_factor:
        said = "label_smoothing_factor is not supported: the engine trains the model's own loss; set it to 0"
    elif getattr(trainer, "compute_loss_func", None) is not None or type(trainer).compute_loss is not Trainer.compute_loss:
        said = ("a custom loss (compute_loss_func=, or compute_loss overridden) is not supported: the engine "
                "trains the model's own loss, streamed layer by layer")
    elif a.load_best_model_at_end:
        said = ("load_best_model_at_end is not supported yet: checkpoints are the engine's snapshots; export the "
                "best one with `offload-train export OUTPUT_DIR/checkpoints/step-N OUT`")
    elif not isinstance(trainer._source, (str, os.PathLike)) and any(
            p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 for p in trainer.model.parameters()):
        said = ("the model's trainable weights are not float32: the engine keeps fp32 master weights; load it in "
                "float32 (bf16=True trains in mixed precision), or pass the checkpoint's path")
    if said is not None:
        raise ConfigError(f"OffloadTrainer: {said}")


SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused")


def _dtype_name(args: Any) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def _seq_len(dataset: Any) -> int:
    """The longest of the first rows (what the planner plans a step for)."""
    try:
        return max(len(dataset[i]["input_ids"]) for i in range(min(len(dataset), 64)))
    except (TypeError, KeyError, IndexError, ValueError):
        return 512
