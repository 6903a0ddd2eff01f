"""What a training step is asked to do and what it reports: optimizer and precision settings, the
step's result, the callables that give a unit its starting state. Shared by both engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from offload.errors import OffloadError
from scheduler.model_map import Unit

Initializer = Callable[[Unit], dict[str, torch.Tensor]]
"""Returns the initial fp32 (or any dtype) tensors of one unit, by qualified parameter name."""

ResumeState = Callable[[Unit], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Returns a unit's saved flat (master, exp_avg, exp_avg_sq) in the state dtype, to continue a run."""


class NonFiniteError(OffloadError):
    """The loss or the gradients are NaN or inf."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the names configs, workloads and placements use)."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def updates_deferred(max_grad_norm: float, compute_dtype: str, nan_policy: str) -> bool:
    """Updates wait for every gradient of the step: clipping, fp16 overflow checks, or skipping
    non-finite steps all need the whole step's gradients before any weight changes."""
    return max_grad_norm > 0 or compute_dtype == "float16" or nan_policy == "skip"


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Optimizer and precision settings (Hugging Face TrainingArguments meanings)."""

    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 disables clipping
    compute_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    """Master weights, Adam states and kept gradients. float32: mixed precision (the default).
    The compute dtype (bfloat16): pure low-precision training, the same math as a bf16 model with
    ``torch.optim.AdamW`` in memory (parameters, gradients and Adam states all bf16)."""
    gradient_accumulation_steps: int = 1
    no_decay: frozenset[str] = frozenset()
    """Parameter names that get no weight decay (Trainer exempts biases and normalization
    weights: ``cli.train`` fills this from transformers' own rule); empty: all are decayed."""
    nan_policy: str = "stop"  # "stop": raise NonFiniteError; "skip": skip the step
    initial_loss_scale: float = 2.0**16  # fp16 only (dynamic loss scaling)
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.max_grad_norm < 0:
            raise ValueError("max_grad_norm must be >= 0 (0 disables clipping)")
        if self.state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, not {self.state_dtype}")
        if self.state_dtype != torch.float32 and self.state_dtype != self.compute_dtype:
            raise ValueError(f"state_dtype {self.state_dtype} needs the same compute dtype (pure "
                             f"{self.state_dtype} training), not {self.compute_dtype}")

    @property
    def deferred(self) -> bool:
        """Updates wait for every gradient (``updates_deferred``)."""
        return updates_deferred(self.max_grad_norm, dtype_name(self.compute_dtype), self.nan_policy)


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    tokens: int
    step_time_s: float


@dataclass(frozen=True)
class UpdateState:
    """The update policy's counters, saved with checkpoints so a resumed run continues them."""

    optimizer_step: int = 0
    """Optimizer steps applied (lags the data step by the skipped ones)."""
    loss_scale: float | None = None
    """fp16 dynamic loss scale (1.0 otherwise); None: the initial one."""
    good_steps: int = 0
    """fp16: steps since the loss scale last changed."""

    def to_dict(self) -> dict[str, float | int | None]:
        return {"optimizer_step": self.optimizer_step, "loss_scale": self.loss_scale, "good_steps": self.good_steps}
