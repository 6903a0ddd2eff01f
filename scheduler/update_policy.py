"""UpdatePolicy: when a step's updates run, and what a non-finite loss or gradient does.

Immediate mode (no clipping, no fp16, ``nan_policy: stop``): each unit is updated by its own job
as soon as its last gradient exists (GradHandoff). Deferred mode: the gradients are kept, the
global norm is reduced after backward, and then every unit is updated with the clipping
coefficient, in forward order, overlapping the next forward. fp16: dynamic loss scaling.

Owns the step counter, the loss scale and the good-step count (``UpdateState``, saved with
checkpoints). A step is counted only when its updates are submitted; a skipped or stopped step
leaves the counter and the kept gradients as they were before it.

Thread: the main thread. Sync point: ``finish`` in deferred mode (the global norm).
"""

from __future__ import annotations

import logging
import math

import torch

from scheduler.grad_handoff import GradHandoff
from scheduler.settings import NonFiniteError, TrainSettings, UpdateState

log = logging.getLogger(__name__)


class UpdatePolicy:
    def __init__(self, settings: TrainSettings, state: UpdateState) -> None:
        self.settings = settings
        fp16 = settings.compute_dtype == torch.float16
        self.optimizer_step = state.optimizer_step
        initial_scale = settings.initial_loss_scale if fp16 else 1.0
        self.loss_scale = initial_scale if state.loss_scale is None else state.loss_scale
        self.good_steps = state.good_steps

    @property
    def next_step(self) -> int:
        """The optimizer step being taken (AdamW's step count for its updates)."""
        return self.optimizer_step + 1

    def state(self) -> UpdateState:
        return UpdateState(self.optimizer_step, self.loss_scale, self.good_steps)

    def non_finite(self, what: str, handoff: GradHandoff) -> bool:
        """A non-finite loss or norm: the step's kept gradients are dropped, then ``stop`` raises
        (naming the step being taken) and ``skip`` warns. Returns True: the step is skipped."""
        handoff.discard()
        if self.settings.nan_policy == "stop":
            raise NonFiniteError(f"{what} at optimizer step {self.next_step}; lower the learning rate, enable "
                                 f"clipping (train.max_grad_norm), or set nan_policy: skip")
        log.warning("%s: skipping optimizer step %d", what, self.next_step)
        return True

    def finish(self, lr: float, handoff: GradHandoff) -> tuple[float | None, bool]:
        """After the step's last backward: (gradient norm or None, skipped)."""
        if not self.settings.deferred:
            self.optimizer_step += 1  # the updates were submitted unit by unit during backward
            return None, False
        handoff.drain()
        squares = handoff.norm_parts()
        total = torch.stack(squares).sum().sqrt().float() if squares else torch.zeros(())
        total_f = float(total)  # sync point: the global norm
        if not math.isfinite(total_f):
            if self.settings.compute_dtype == torch.float16:
                self.loss_scale /= 2
                self.good_steps = 0
                log.warning("fp16 gradient overflow: skipping step, loss scale -> %g", self.loss_scale)
                handoff.discard()
            else:
                self.non_finite(f"gradient norm is {total_f}", handoff)
            return total_f, True
        coef = None
        if self.settings.max_grad_norm > 0:
            coef = torch.clamp(self.settings.max_grad_norm / (total + 1e-6), max=1.0)
        handoff.submit_updates(self.next_step, lr, coef)
        self.optimizer_step += 1
        if self.settings.compute_dtype == torch.float16:
            self.good_steps += 1
            if self.good_steps % self.settings.loss_scale_window == 0:
                self.loss_scale *= 2
        return total_f, False
