"""Advice: the tokens per step at which a job turns compute-bound on a profile.

With layer-major accumulation a step moves the weights and the optimizer state once, whatever
its micro-batches; compute grows with them. So past some accumulation the compute lane sets the
time of the forward and of the backward, and every further token costs only compute. The search
re-plans (``choose_plan``, same budgets, same fixed choices) at growing
``gradient_accumulation_steps``: doubling until the bottleneck is compute, then bisecting. It stops where no layer-major plan fits any more (every micro-batch's activations
wait for backward) or at ``MAX_GRAD_ACCUM``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from offload.errors import BudgetError
from scheduler.model_shape import ModelShape
from scheduler.planner import Budgets, PlanChoice, choose_plan
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload

COMPUTE_LANES = ("compute", "cpu (compute + adam)")
"""Bottlenecks that mean compute-bound (on a CPU-only machine Adam shares the compute lane); a
step whose forward and backward are set by different lanes names both, and is not."""
MAX_GRAD_ACCUM = 4096


@dataclass(frozen=True)
class BatchAdvice:
    workload: Workload
    """The job as configured."""
    grad_accum: int | None
    """The smallest accumulation whose plan is compute-bound; None: none up to ``searched``."""
    choice: PlanChoice | None
    """The plan at ``grad_accum``."""
    searched: int
    """The largest accumulation tried that fits the budgets."""
    searched_choice: PlanChoice | None = None
    """The plan at ``searched``."""

    def line(self) -> str:
        wl = self.workload
        batch = f"micro_batch_size {wl.micro_batch} x {wl.seq_len} tokens"
        if self.grad_accum == wl.grad_accum:
            return "advice: compute-bound at this batch; more tokens per step cost compute only"
        if self.grad_accum is None or self.choice is None:
            at = ""
            if self.searched_choice is not None:
                est = self.searched_choice.estimate
                at = (f": predicted {est.step_s:.1f} s/step, {self.searched * wl.tokens / est.step_s:,.0f} "
                      f"tokens/s, bottleneck {est.bottleneck}")
            return (f"advice: not compute-bound up to gradient_accumulation_steps {self.searched} ({batch}; "
                    f"{self.searched * wl.tokens:,} tokens per step"
                    f"{', the most that fits the budgets' if self.searched < MAX_GRAD_ACCUM else ''}){at}")
        est = self.choice.estimate
        tokens = self.grad_accum * wl.tokens
        return (f"advice: compute-bound from {tokens:,} tokens per step (gradient_accumulation_steps "
                f"{self.grad_accum} at {batch}): predicted {est.step_s:.1f} s/step, "
                f"{tokens / est.step_s:,.0f} tokens/s")


def compute_bound(choice: PlanChoice) -> bool:
    return choice.estimate.bottleneck in COMPUTE_LANES


def advise_batch(shape: ModelShape, wl: Workload, budgets: Budgets, profile: HardwareProfile,
                 current: PlanChoice, **choose: Any) -> BatchAdvice:
    """``current``: the plan of ``wl`` itself; ``choose``: ``choose_plan``'s fixed choices."""
    if compute_bound(current):
        return BatchAdvice(wl, wl.grad_accum, current, wl.grad_accum)

    def plan_at(ga: int) -> PlanChoice | None:
        try:
            choice = choose_plan(shape, replace(wl, grad_accum=ga), budgets, profile, **choose)
        except BudgetError:
            return None
        # past the layer-major plans that fit, a step streams the weights once per micro-batch:
        # more tokens per step no longer amortise anything
        return choice if choice.plan.layer_major else None

    low, high, found = wl.grad_accum, None, None  # low: feasible, not compute-bound
    at_low: PlanChoice | None = current
    ga = wl.grad_accum
    while ga < MAX_GRAD_ACCUM:
        ga = min(2 * ga, MAX_GRAD_ACCUM)
        choice = plan_at(ga)
        if choice is None:
            high = ga  # does not fit: bisect below it for the largest that does
            break
        if compute_bound(choice):
            high, found = ga, choice
            break
        low, at_low = ga, choice
    if high is None:
        return BatchAdvice(wl, None, None, low, at_low)
    while high - low > 1:
        mid = (low + high) // 2
        choice = plan_at(mid)
        if choice is not None and compute_bound(choice):
            high, found = mid, choice
        elif choice is None:
            high = mid
        else:
            low, at_low = mid, choice
    if found is None:
        return BatchAdvice(wl, None, None, low, at_low)
    return BatchAdvice(wl, high, found, high, found)
