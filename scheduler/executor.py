"""The streaming executor: runs a Plan on a Hugging Face causal LM, layer by layer.

One optimizer step over micro-batches m = 0..M-1 (index legend: i = decoder layer, L layers,
u = unit: ``pre``, ``layer.i``, ``post``; see ``scheduler.model_map``). The model's own forward
runs; hooks on each decoder layer do the streaming:

    forward hook enter(i, x):  W.acquire(layer i); W.prefetch(next layers); A.enter(i, x)
    forward hook exit(i, out): A.exit(i, out); release layer i unless kept over the turn
    backward:
      loss.backward()  (final norm + LM head); G.unit_done(post)
      for i = L-1..0:  W.acquire(layer i); W.prefetch(previous layers); x, out = A.replay(i)
                       A.read_ahead(i - 1); backward(out, grad); A.release(i)
                       G.unit_done(layer i, with W.lend(layer i) where the update takes the
                       master from these loaded weights); W.release(layer i)
      (updates of DEVICE-resident units on a CPU take their master from the resident weights)
      embedding backward; G.unit_done(pre)
    P.finish(): immediate updates are already running; deferred ones start now

Layer-major gradient accumulation (``plan.layer_major``, M > 1): every layer is loaded once per
step. The M forwards run in lockstep (``scheduler.lockstep``: one thread per micro-batch, one
turn at a time), so layer i computes every micro-batch before layer i + 1; each micro-batch's
head and loss backward follow its forward. Backward then loads layer i once and back-propagates
every micro-batch through it, the gradients summing on DEVICE in the state dtype (each parameter's
as autograd produces it: the same sums, in the same order, as the CPU's accumulation), and hands
the layer over once. The embeddings and head hand their gradients over every micro-batch (their
jobs keep them in the grads tier, as in micro-batch order): no vocabulary-sized sum on DEVICE.

The pieces, one job each (their modules say which thread runs what):
    Placement         (``placement``)         where each kind of tensor lives: pure rules
    StateStore        (``state_store``)       master, Adam states, kept gradients, streamed weights
    UnitClock         (``unit_clock``)        per unit: its last optimizer job (the one handshake)
    WeightStreamer W  (``weight_streamer``)   compute weights on DEVICE: loads, prefetch, bindings
    ActivationStore A (``activations``)       checkpoints and recompute, or kept graphs and swapping
    GradHandoff G     (``grad_handoff``)      each unit's gradients to the optimizer worker
    TiedGradParking   (``tied_grads``)        layer-major: a tied head's gradient parts in host memory
    LayerHooks        (``layer_hooks``)       the forward hooks above; ``Lockstep`` (``lockstep``)
                                              runs a layer-major step's forwards in turns
    OptimizerWorker   (``optimizer_worker``)  per chunk: gather gradients, keep them or run AdamW
    UpdatePolicy P    (``update_policy``)     immediate or deferred updates, clipping, fp16, NaN

``plan.overlap = False`` is the synchronous reference mode: loads and optimizer jobs run inline on
the calling thread, in the same order, with the same arithmetic: results are bitwise identical.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any

import torch
from torch import nn

from offload.optim import FlatAdamW
from offload.pinned import PinnedPool
from offload.store import SwapStore
from offload.tiers import Accountant, Tier
from scheduler.activations import (
    ActivationStore,
    RecomputeCheckpoints,
    SavedTensors,
    SelectiveRecompute,
)
from scheduler.grad_handoff import GradHandoff
from scheduler.layer_hooks import LayerHooks
from scheduler.model_inputs import eval_loss_sum, model_inputs
from scheduler.model_map import (
    ModelMap,
    Unit,
    build_model_map,
)
from scheduler.optimizer_worker import OptimizerWorker
from scheduler.placement import Placement, grads_kept, tensor_storages
from scheduler.plan import Plan
from scheduler.router_loss import RouterLogits
from scheduler.settings import (
    Initializer,
    NonFiniteError,
    ResumeState,
    StepResult,
    TrainSettings,
    UpdateState,
    dtype_name,
)
from scheduler.state_export import StateExport
from scheduler.state_store import StateStore, state_extents
from scheduler.tied_grads import TiedGradParking
from scheduler.trace import TracedStore, Tracer
from scheduler.unit_clock import UnitClock
from scheduler.unit_init import (
    StartingState,
    check_device_fits,
    initialize_unit,
    move_buffers,
    replace_parameters,
)
from scheduler.update_policy import UpdatePolicy
from scheduler.weight_streamer import WeightStreamer

__all__ = ["NonFiniteError", "ResumeState", "StepResult", "StreamingExecutor", "TrainSettings",
           "state_extents", "tensor_storages"]


class StreamingExecutor(StateExport):
    """Trains ``model`` out of core under ``plan``; a context manager (``scheduler.engine.Engine``).

    ``with StreamingExecutor(model, plan, store, adamw, settings) as ex: ex.train_step(batches, lr)``
    """

    def __init__(self, model: nn.Module, plan: Plan, store: SwapStore, adamw: FlatAdamW,
                 settings: TrainSettings, device: torch.device | None = None,
                 initializer: Initializer | None = None, resume: ResumeState | None = None,
                 start_step: int = 0, tracer: Tracer | None = None, state_in_store: bool = False,
                 update_state: UpdateState | None = None) -> None:
        """``update_state``: the counters of a resumed run (``start_step`` alone: its step count);
        ``state_in_store``: the store already holds every unit's states under this plan's names
        (a restored checkpoint snapshot)."""
        self.model = model
        self.plan = plan
        self.tracer = tracer or Tracer(enabled=False)
        self.store = TracedStore(store, self.tracer) if self.tracer.enabled else store
        self.adamw = adamw
        self.settings = settings
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._start = StartingState(state_in_store, resume, initializer)
        self.policy = UpdatePolicy(settings, update_state or UpdateState(optimizer_step=start_step))
        self.acct = Accountant({Tier.DEVICE: plan.device_budget_bytes, Tier.HOST: plan.host_budget_bytes})
        self.map: ModelMap | None = None
        self._parts: list[Any] = []  # started pieces, closed in reverse
        self._hooks: list[Any] = []
        self._buffered: list[dict[str, torch.Tensor]] = []  # micro_step, layer-major: batches so far
        self._head_grad: dict[int, torch.Tensor | None] = {}  # per micro-batch: d loss / d head input
        self._bad_heads = False  # layer-major: a micro-batch's loss was not finite (the step is skipped)
        self._lr = 0.0
        self._step_skipped = False  # a non-finite loss skipped this step: its other micro-batches do nothing
        self._step_start_s: float | None = None  # when the step's first micro-batch began

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> StreamingExecutor:
        try:
            self.start()
        except BaseException:
            self.close(raise_job_errors=False)
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # An exception already on its way out is the one to report, not a worker's echo of it.
        self.close(raise_job_errors=exc_type is None)

    def start(self) -> None:
        self.map = m = build_model_map(self.model)
        self.tracer.watch_device(self.device)
        self.model.train()
        move_buffers(self.model, self.device)
        s = self.settings
        kept = grads_kept(s.gradient_accumulation_steps, s.deferred, self.plan.layer_major)
        self.placement = p = Placement(self.plan, len(m.layers), dtype_name(s.compute_dtype), dtype_name(s.state_dtype),
                                       kept, self.device.type == "cuda",
                                       layer_sums=self.plan.layer_major and s.gradient_accumulation_steps > 1)
        check_device_fits(p, m)
        self.acct.alloc(Tier.HOST, p.host_bytes((u.numel, u.frozen_numel) for u in m.units), "host-resident tensors of the plan")
        self.state = StateStore(m, p, self.store, s.state_dtype, s.compute_dtype)
        self._parts.append(self.state)  # closed last: its page-locked HOST tensors
        self.clock = UnitClock(len(m.units))
        # Without an initializer the model's own tensors are the start: keep them until written.
        originals = {n: q.detach() for n, q in self.model.named_parameters()} if self._start.initializer is None else {}
        self._start.originals = originals
        params = replace_parameters(self.model, m, s.compute_dtype, self.device)
        self.weights = WeightStreamer(self.state, self.clock, params, self.acct, self.device, self.tracer,
                                      make_room=lambda nbytes: self.handoff.make_room(nbytes))
        self.worker = OptimizerWorker(self.state, self.adamw, s, self.acct, self.tracer, self.weights.publish,
                                      self.weights.recycle)
        self.handoff = GradHandoff(m.units, params, self.worker, self.clock, self.acct, self.plan.job_slots, s.deferred,
                                   s.state_dtype, resident_master=self.weights.resident_master)
        tied_pool = PinnedPool(self.acct, Tier.HOST, register=self.device.type == "cuda")
        self._parts.append(tied_pool)  # (empty unless a layer-major step parks a tied head's gradient)
        self.tied = TiedGradParking(params, tied_pool, self.acct, self.device)
        for part in (self.worker, self.weights):
            part.start()
            self._parts.append(part)
        self.state.reserve()
        for u in m.units:
            initialize_unit(u, self._start, self.state, self.weights)
        originals.clear()
        self.weights.bind_resident()
        self.store.flush()
        self.router = RouterLogits(self.model, m.layers)
        self.activations = self._activation_store(p, m)
        self._parts.append(self.activations)  # closed first: its page-locked buffers (CUDA)
        self.weights.backward_hold_bytes = self.activations.backward_hold_bytes
        self.hooks = LayerHooks(self.model, m.layers, p, self.weights, self.activations, self.router, self.tracer)
        self._hooks.extend(self.router.install())
        self._hooks.extend(self.hooks.install())
        if p.layer_sums:
            self._hooks.extend(self.handoff.install_sum_hooks())

    def _activation_store(self, p: Placement, m: ModelMap) -> ActivationStore:
        """Checkpoints and recompute, kept graphs, or both by layer (selective recompute)."""
        recompute = RecomputeCheckpoints(p, self.store, self.acct, self.device, m.layers, self.router)
        if self.plan.recompute:
            return recompute
        saved = SavedTensors(p, self.store, self.acct, self.device, self.weights)
        return SelectiveRecompute(p, recompute, saved) if self.plan.recompute_layers else saved

    def close(self, raise_job_errors: bool = True) -> None:
        try:
            if not raise_job_errors:
                with contextlib.suppress(BaseException):
                    self.synchronize()
            elif self._parts:  # (nothing started: nothing to wait for)
                self.settle()  # the store then holds every unit's state
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            while self._parts:
                self._parts.pop().close()

    @property
    def _n_layers(self) -> int:
        assert self.map is not None
        return len(self.map.layers)

    # ------------------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        """One optimizer step over ``micro_batches`` (length = gradient_accumulation_steps).

        Each batch holds ``input_ids`` and optionally ``labels`` (default: input_ids),
        ``attention_mask``, ``position_ids`` and ``num_items_in_batch`` (the targets of the whole
        step, as Trainer counts them: the model's loss is then its token-loss sum over that, and
        the micro-batch losses add up to the step's; without it each micro-batch's mean loss
        counts 1/M). Returns the step's loss (a host sync point).
        """
        if len(micro_batches) != self.settings.gradient_accumulation_steps:
            raise ValueError(f"expected {self.settings.gradient_accumulation_steps} micro-batches, "
                             f"got {len(micro_batches)}")
        t0 = time.perf_counter()
        total_loss, tokens = 0.0, 0
        for m, batch in enumerate(micro_batches):
            total_loss += self.micro_step(batch, lr, last=m == len(micro_batches) - 1, n_micro=len(micro_batches))
            tokens += int(batch["input_ids"].numel())
            if self._step_skipped:
                break
        grad_norm, skipped = self.finish_step(lr)
        return StepResult(total_loss if not skipped else float("nan"), grad_norm, skipped, tokens,
                          time.perf_counter() - t0)

    def micro_step(self, batch: dict[str, torch.Tensor], lr: float, last: bool, n_micro: int) -> float:
        """Forward and backward of one micro-batch of a step (``train_step``'s loop, for loops that
        drive micro-batches themselves: ``last`` marks the step's last one, ``n_micro`` their
        number). Returns its loss (a host sync point); NaN once the step is skipped.

        Layer-major plans (``plan.layer_major``, ``n_micro`` > 1) keep the batches until the last
        one, then run them together: the earlier calls return 0.0, the last the step's loss."""
        if self._step_start_s is None:
            self._step_start_s = time.perf_counter()
        if self._step_skipped:
            return float("nan")
        if self.placement.layer_sums and n_micro > 1:  # (layer-major: the sum hooks are installed)
            self._buffered.append(batch)
            if not last:
                return 0.0
            batches, self._buffered = self._buffered, []
            total = 0.0
            for loss_value in self._run_micro_batches(batches, lr, n_micro):
                total += loss_value
            return total
        return self._run_micro_batches([batch], lr, n_micro, last)[0]

    def finish_step(self, lr: float) -> tuple[float | None, bool]:
        """After the step's last ``micro_step``: (gradient norm or None, skipped)."""
        grad_norm, skipped = (None, True) if self._step_skipped else self.policy.finish(lr, self.handoff)
        self._step_skipped = False
        self._buffered.clear()
        if self._step_start_s is not None and self.tracer.enabled:
            self.tracer.add("step", f"step {self.optimizer_step}", self._step_start_s)
        self._step_start_s = None
        return grad_norm, skipped

    def _run_micro_batches(self, batches: list[dict[str, torch.Tensor]], lr: float, n_micro: int,
                           last: bool = True) -> list[float]:
        """Forward and backward of ``batches``: one (micro-batch-major), or all of a step's in
        lockstep (layer-major). Returns their losses (NaN for all once the step is skipped)."""
        self.worker.raise_error()
        self._lr = lr
        self._bad_heads = False
        self.hooks.micro_count = len(batches)
        bad: float | None = None
        try:
            self.hooks.streaming = True
            try:
                if len(batches) == 1:
                    losses = [self._forward_and_head(batches[0], n_micro)]
                else:  # one thread per micro-batch, in turns: the layer hooks pass them on
                    losses = self.hooks.lockstep.run([functools.partial(self._forward_and_head, b, n_micro)
                                                      for b in batches])
            finally:
                self.hooks.streaming = False
            bad = next((v for v in losses if not math.isfinite(v)), None)
            if bad is None:
                self._backward(list(range(len(batches))), last)
        except BaseException:
            with contextlib.suppress(BaseException):  # the first error is the one to report
                self._drop_forward_state()
            raise
        finally:
            self.hooks.micro_count = 1
        if bad is not None:
            self._drop_forward_state()
            self._step_skipped = self.policy.non_finite(f"loss is {bad}", self.handoff)
            return [float("nan")] * len(batches)
        return losses

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The forward's arguments: input_ids and the batch's other model inputs (packed rows:
        position_ids restart per row; GPT-2's token_type_ids; ...)."""
        return model_inputs(self.model, batch, self.device)

    def _forward_and_head(self, batch: dict[str, torch.Tensor], n_micro: int) -> float:
        """A micro-batch's forward, then its head's backward (final norm + LM head + loss: their
        gradients add up in the post unit; the head input's gradient waits for the layers).
        Runs on the calling thread, or on its micro-batch thread in a layer-major step. Returns
        the loss (a host sync point); nothing is back-propagated from a non-finite one."""
        m = self.hooks.lockstep.index()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        kwargs = self._model_inputs(batch)
        kwargs["labels"] = batch.get("labels", batch["input_ids"]).to(self.device)
        if "num_items_in_batch" in batch:
            kwargs["num_items_in_batch"] = batch["num_items_in_batch"]
        self.weights.acquire(0)
        self.weights.prefetch(range(min(self.plan.prefetch_depth, self._n_layers)))
        self.hooks.model_forward_began(m)
        with torch.enable_grad():
            out = self.model(**kwargs)
        self.hooks.model_forward_ended(m)
        loss = (out.loss if hasattr(out, "loss") else out[0]).float()
        del out  # the logits (tokens x vocabulary): backward does not need them, freed before it
        if "num_items_in_batch" not in batch:
            loss = loss / n_micro
        loss_value = float(loss.detach())  # sync point: one per micro-batch
        if math.isfinite(loss_value):
            with torch.enable_grad(), self.tracer.span("compute", "backward post"):
                (loss * self.policy.loss_scale).backward()  # final norm + LM head; fills head_input.grad
            self._head_grad[m] = self.hooks.head_input.pop(m).grad
            if self.hooks.micro_count > 1:  # layer-major: the head's gradient goes to the worker now
                # (kept in the grads tier; the last one updates, unless a micro-batch was skipped)
                # (a tied weight's part parked first: nothing may fail after the head's update is sent)
                self.tied.park(m, keep={s.name for s in self.units[-1].params})
                self._unit_done(len(self.units) - 1, m == self.hooks.micro_count - 1 and not self._bad_heads)
        else:
            self._bad_heads = True  # (the step will be skipped: no later head updates)
        return loss_value

    def _backward(self, micros: list[int], last: bool) -> None:
        """The layers' and embeddings' backward of the micro-batches ``micros`` (their heads'
        already ran), layer by layer: each layer once for all of them."""
        summed = len(micros) > 1  # layer-major: a layer's gradients add up on DEVICE until it is done
        grads = [self._head_grad.pop(m) for m in micros]
        if not summed:  # (layer-major: the heads' jobs went with their micro-batches)
            self._unit_done(len(self.units) - 1, last)
        for i in reversed(range(self._n_layers)):
            self.weights.acquire(i + 1)
            if summed:  # (before the prefetch, which takes the DEVICE room left)
                self.handoff.reserve_sums(self.units[i + 1])
            self.weights.prefetch(range(i - 1, max(i - 1 - self.plan.prefetch_depth, -1), -1))
            self.handoff.summing = summed  # the sum hooks add each parameter's gradient as it comes
            try:
                for k, m in enumerate(micros):
                    ahead = (i, micros[k + 1]) if k + 1 < len(micros) else (i - 1, micros[0])
                    try:
                        grads[k] = self._layer_backward(i, m, grads[k], ahead)
                    finally:  # also on errors: nothing of this layer's forward stays in memory
                        self.activations.release(i, m)
            finally:
                self.handoff.summing = False
            self._unit_done(i + 1, last)
            self.weights.release(i + 1)
        self.activations.end_backward()
        for k, m in enumerate(micros):
            self.tied.restore(m)
            x0 = self.hooks.x0.pop(m)
            if x0.requires_grad:  # else nothing before layer 0 trains (frozen embeddings)
                with self.tracer.span("compute", "backward pre"):
                    x0.backward(grads[k])  # embeddings (and anything before layer 0)
            if summed:  # the embeddings' gradient goes to the worker every micro-batch, as the head's
                self._unit_done(0, last and k == len(micros) - 1)
        if not summed:
            self._unit_done(0, last)

    def _layer_backward(self, i: int, m: int, grad: torch.Tensor | None,
                        ahead: tuple[int, int]) -> torch.Tensor | None:
        """Layer i's backward for micro-batch m (recomputed, or from its kept graph); returns its
        input's gradient. ``ahead``: the (layer, micro-batch) whose activations to read next."""
        recomputed = self.placement.recomputes(i)
        traced = self.tracer.span("compute", f"recompute layer.{i}") if recomputed else contextlib.nullcontext()
        with traced:
            x, hidden = self.activations.replay(i, m)
        self.activations.read_ahead(*ahead)  # overlaps this layer's backward
        # MoE routers: d loss / d logits from the head's backward joins this layer's (aux loss)
        router_out, router_grad = self.router.backward_terms(i, m)
        with self.tracer.span("compute", f"backward layer.{i}"):
            torch.autograd.backward([hidden, *router_out], [grad, *router_grad])
        return x.grad

    def _unit_done(self, unit_index: int, last: bool) -> None:
        lend = self.placement.master_from_loads(unit_index, self.handoff.immediate(last))
        self.handoff.unit_done(self.units[unit_index], last, self.policy.next_step, self._lr, self.policy.loss_scale,
                               lent=self.weights.lend(unit_index) if lend else None)

    def _drop_forward_state(self) -> None:
        """Forget the forwards of a step (non-finite loss, or an error): every byte they hold is
        released. Every part is let go even when one raises (a failed swap write in the
        activations' drop must not leave gradient sums or kept gradients for the next step): ``ExitStack`` runs
        each, then raises what failed."""
        with contextlib.ExitStack() as forget:  # (callbacks run last registered first)
            forget.callback(self._forget_gradients)
            for part in (self.tied.forget, self._head_grad.clear, self.hooks.clear, self.router.clear,
                         self.weights.release_layers, self.activations.drop, self.handoff.drop_sums,
                         self.handoff.forget_kept):
                forget.callback(part)

    def _forget_gradients(self) -> None:
        for p in self.weights.params.values():
            p.grad = None

    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Forward only, streamed like training but keeping nothing: no checkpoints, gradients,
        optimizer traffic or weight writes. Returns (sum of token losses, target tokens) over
        ``batch`` (``labels`` default to ``input_ids``; -100 is not a target), the loss as
        transformers' causal-LM loss computes it (shifted, in fp32; an MoE model's router loss
        added per target, as its own loss adds it: ``eval_loss_sum``). Dropout is off (eval mode).
        Waits for every pending update first (sync point)."""
        loss_sum, n_targets, _, router = self.predict(batch)
        return loss_sum + n_targets * router, n_targets

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, torch.Tensor, float]:
        """``evaluate``'s parts: (sum of token losses, target tokens, logits, router term: what an
        MoE model adds to its mean token loss; 0 for others)."""
        self.synchronize()
        labels = batch.get("labels", batch["input_ids"]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        self.hooks.evaluating = True
        try:
            self.weights.acquire(0)
            self.weights.prefetch(range(min(self.plan.prefetch_depth, self._n_layers)))
            with self.tracer.span("compute", "evaluate"):
                out = self.model(**self._model_inputs(batch))
            loss_sum, n_targets, router = eval_loss_sum(self.model, out, labels)
        finally:
            self.hooks.evaluating = False
            self.weights.release_layers()
            self.model.train(was_training)
        return float(loss_sum), n_targets, out.logits, router

    # ------------------------------------------------------------------------------ results
    @property
    def optimizer_step(self) -> int:
        """Optimizer steps applied so far (skipped steps not counted)."""
        return self.policy.optimizer_step

    def update_state(self) -> UpdateState:
        """The update policy's counters, for a checkpoint."""
        return self.policy.state()

    def synchronize(self) -> None:
        """Wait for every pending optimizer job (sync point)."""
        if self.map is None or not self._parts:
            return
        self.handoff.wait_all()
        self.clock.wait_all()
        self.worker.raise_error()

    @property
    def units(self) -> tuple[Unit, ...]:
        assert self.map is not None
        return self.map.units

    def metrics(self) -> dict[str, int]:
        peak, links = self.acct.peak_bytes, self.acct.links
        return {"peak_device_bytes": peak[Tier.DEVICE], "peak_host_bytes": peak[Tier.HOST],
                "io_read_bytes": self.store.read_bytes, "io_write_bytes": self.store.write_bytes,
                "h2d_bytes": links.h2d_bytes, "d2h_bytes": links.d2h_bytes}
