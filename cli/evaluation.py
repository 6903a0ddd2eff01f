"""Evaluation during training (``data.eval_path``, ``train.eval_strategy: steps``).

The eval set is read like the training data (same formats, tokenizer policy, ``seq_len`` and
``packing``) and evaluated in order, ``per_device_eval_batch_size`` sequences per batch, each
batch run through the engine's forward in pieces of at most ``micro_batch_size`` sequences (the
batch shape the plan's memory was sized for). ``eval_loss`` is the mean token loss over all of
the eval set's targets; for rows of equal length without masking it equals Trainer's
``evaluate()``. Evaluation streams the weights forward only: no optimizer traffic, no weight
writes, no effect on training (dropout is off and the training RNG is reseeded every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cli.data import DataError, TokenDataset
from cli.sft import SftOptions
from offload.errors import OffloadError

if TYPE_CHECKING:
    from scheduler.engine import Engine


@dataclass(frozen=True)
class Evaluator:
    dataset: TokenDataset
    batch_size: int
    micro_batch_size: int
    every_steps: int

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def run(self, engine: Engine) -> float:
        """eval_loss: the sum of token losses over the eval set's targets, over their number."""
        loss_sum, targets = 0.0, 0
        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            for lo in range(start, stop, self.micro_batch_size):
                piece = self.dataset.batch(torch.arange(lo, min(lo + self.micro_batch_size, stop)))
                part_sum, part_targets = engine.evaluate(piece)
                loss_sum += part_sum
                targets += part_targets
        return loss_sum / targets


def build_evaluator(cfg: Any, tokenizer: Any, vocab_size: int | None, pad_token_id: int | None) -> Evaluator | None:
    """The run's evaluator, or None (``eval_strategy: no``). ``tokenizer``: what the training data
    used (a tokenizer, a callable that loads one, or None)."""
    from cli.data_cache import load_cached

    t, d = cfg.train, cfg.data
    if t.eval_strategy == "no":
        return None
    try:
        dataset = load_cached(d.eval_path, tokenizer, d.seq_len, packing=d.packing, text_field=d.text_field,
                              vocab_size=vocab_size, pad_token_id=pad_token_id,
                              sft=SftOptions(d.completion_only_loss, d.assistant_only_loss), split="eval")
    except DataError as err:
        raise DataError(f"data.eval_path: {err}") from None
    if dataset.n_targets() == 0:
        raise OffloadError(f"data.eval_path {d.eval_path} holds no target tokens (every label is -100, or every "
                           f"sequence is a single token); give evaluation rows with targets")
    return Evaluator(dataset, t.per_device_eval_batch_size, t.micro_batch_size, t.eval_steps or t.logging_steps)
