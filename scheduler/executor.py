"""The streaming executor: runs a Plan on a Hugging Face causal LM, layer by layer.

One optimizer step over micro-batches m = 0..M-1 (index legend: i = decoder layer, L layers,
u = unit: ``pre``, ``layer.i``, ``post``; see ``scheduler.model_map``):

Forward (stock model code, hooks on each layer): before layer i runs, its weights are made
resident on DEVICE (prefetched ``prefetch_depth`` layers ahead by the loader thread), its input is
kept as the activation checkpoint (DEVICE, HOST or NVME per plan) together with the RNG state,
and it runs without autograd. Its weights are released after it, except the last ``turn_keep``
layers (first needed by backward) and resident layers. The last layer's output becomes a leaf
that requires grad, so ``loss.backward()`` covers only the final norm and LM head.

Backward, i = L-1..0: weights back on DEVICE (prefetched), layer i recomputed from its checkpoint
under the saved RNG state, ``autograd.backward(out_i, grad_out_i)``; the gradient w.r.t. its input
flows to layer i-1. Each unit's gradients are copied (D2H, in the state dtype) into host staging and handed
to the optimizer worker thread as soon as they exist. Last, the embedding's own graph is
back-propagated, completing the ``pre`` unit (which holds a tied LM head weight).

Optimizer worker (one thread, jobs in submission order): read master, exp_avg, exp_avg_sq
(HOST or NVME), AdamW, write them back, write the new compute-dtype weights where the next forward
reads them (the DEVICE copy of resident units, else the weights home). State dtype
(``TrainSettings.state_dtype``): fp32 (mixed precision), or bf16 for pure bf16 training. When the
compute dtype is the state dtype and the plan puts weights and optimizer in one tier, the master
*is* the weights' home: loads read the master and no second copy is written. The next step's forward
waits per unit for that unit's update, so updates overlap backward (immediate mode) or the next
forward (deferred mode).

Immediate mode: no clipping, no fp16 loss scaling: each unit is updated as soon as its last
micro-batch gradient exists, overlapping the backward of earlier layers. Same math as a plain
``optimizer.step()`` after backward, since AdamW is elementwise per parameter.
Deferred mode (``max_grad_norm > 0`` or fp16): global-norm clipping and overflow checks need every
gradient first, so gradients go to the grads tier, the global norm is reduced after backward
(a host sync point), and the updates run in forward order, overlapping the next step's forward.

``plan.overlap = False`` is the synchronous reference mode: loads and optimizer jobs run inline on
the calling thread, in the same order, with the same arithmetic: results are bitwise identical.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from offload.buffers import HostArena
from offload.errors import BudgetError, OffloadError, format_bytes
from offload.io.posix import aligned_empty
from offload.optim import FlatAdamW
from offload.store import SwapStore, TensorSpec
from offload.tiers import Accountant, Tier
from scheduler.model_map import ModelMap, Unit, build_model_map, check_layer_arguments
from scheduler.plan import Plan
from scheduler.router_loss import RouterLogits
from scheduler.trace import TracedStore, Tracer

log = logging.getLogger(__name__)

SWAP_MIN_BYTES = 1 << 20
"""Saved activations smaller than this stay in memory when activations are swapped (norm
statistics, masks: not worth a request)."""

Initializer = Callable[[Unit], dict[str, torch.Tensor]]
"""Returns the initial fp32 (or any dtype) tensors of one unit, by qualified parameter name."""

ResumeState = Callable[[Unit], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Returns a unit's saved flat (master, exp_avg, exp_avg_sq) in the state dtype, to continue a run."""


class NonFiniteError(OffloadError):
    """The loss or the gradients are NaN or inf."""


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
        """Updates wait for every gradient: clipping, fp16 overflow checks, or skipping
        non-finite steps all need the whole step's gradients before any weight changes."""
        return self.max_grad_norm > 0 or self.compute_dtype == torch.float16 or self.nan_policy == "skip"


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    tokens: int
    step_time_s: float


def _done(value: Any = None) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


@dataclass
class _UnitState:
    """Runtime record of one unit: where its compute weights are, and what is pending on it."""

    unit: Unit
    resident: bool  # compute weights never leave DEVICE
    device_flat: torch.Tensor | None = None
    load: Future[torch.Tensor] | None = None
    update: Future[None] = field(default_factory=_done)
    host_weights: torch.Tensor | None = None  # weights home when plan.weights is HOST
    host_master: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    host_grad: torch.Tensor | None = None
    has_stored_grad: bool = False
    grad_seen: list[bool] | None = None  # per parameter: a gradient arrived during this step


@dataclass
class _Job:
    """One optimizer-side job for one unit, run by the worker chunk by chunk."""

    st: _UnitState
    fresh: list[torch.Tensor | None]  # this micro-batch's gradients per parameter, or all None
    grad_bytes: int  # DEVICE bytes of ``fresh``, released when the job ends
    add_stored: bool  # add the gradient kept in the grads tier
    update: bool  # True: AdamW update; False: store the (accumulated) gradient
    norms: bool  # deferred mode: unscale and record per-parameter norm parts
    step: int
    lr: float
    coef: torch.Tensor | None = None  # clipping coefficient (deferred updates)
    seen: list[bool] | None = None  # update jobs: parameters that had a gradient (others keep still)

    @property
    def fresh_any(self) -> bool:
        return any(g is not None for g in self.fresh) or not self.add_stored


def _updated_runs(u: Unit, seen: list[bool] | None, a: int, b: int,
                  no_decay: frozenset[str] = frozenset()) -> list[tuple[int, int, bool]]:
    """Chunk-relative [lo, hi) runs of chunk [a, b) whose parameters had a gradient, each with
    whether its parameters are weight-decayed (neighbours alike merge into one run)."""
    decays = [s.name not in no_decay for s in u.params]
    if (seen is None or all(seen)) and all(decays):
        return [(0, b - a, True)]
    runs: list[tuple[int, int, bool]] = []
    for k, s in enumerate(u.params):
        lo, hi = max(a, s.offset) - a, min(b, s.offset + s.numel) - a
        if (seen is not None and not seen[k]) or lo >= hi:
            continue
        if runs and runs[-1][1] == lo and runs[-1][2] == decays[k]:
            runs[-1] = (runs[-1][0], hi, decays[k])
        else:
            runs.append((lo, hi, decays[k]))
    return runs


def _wait_all(futures: list[Future[Any]]) -> None:
    for f in futures:
        f.result()


def _chunk_ranges(numel: int, chunk_numel: int) -> list[tuple[int, int]]:
    """[a, b) element ranges of at most ``chunk_numel`` covering ``numel``."""
    return [(a, min(a + chunk_numel, numel)) for a in range(0, max(numel, 1), chunk_numel)]


@dataclass
class _LayerCall:
    """What forward gave layer i, to recompute it in backward."""

    args_rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    checkpoint: torch.Tensor | None = None  # DEVICE/HOST tier
    checkpoint_write: Future[None] | None = None  # NVME tier
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    x_leaf: torch.Tensor | None = None  # no-recompute mode: the layer's input leaf
    output: torch.Tensor | None = None  # no-recompute mode: the layer's output (graph root)
    saved: Any = None  # the saved_tensors_hooks context while the layer runs
    saved_bytes: int = 0  # DEVICE bytes of saved activations kept in memory
    swapped: list[_SwappedTensor] = field(default_factory=list)  # saved activations on NVME
    kept_storage: set[int] = field(default_factory=set)
    """Storages never swapped: the layer's input and tensors passed to it (RoPE tables, masks),
    which stay in memory anyway."""
    trace_start_s: float = 0.0  # when the layer's forward began (0.0: not tracing)


@dataclass
class _SwappedTensor:
    """A saved activation swapped through the SSD (no-recompute mode, ``activations: nvme``):
    copied into a page-aligned buffer when saved, written after its layer's forward, read back
    before its layer's backward."""

    name: str  # store extent
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    buf: torch.Tensor | None = None  # host copy: from saving until the next layer's forward
    # ends (its write done), and from reading back until its layer's backward ends
    write: Future[None] | None = None
    read: Future[Any] | None = None


@dataclass(frozen=True)
class _WeightView:
    """A saved weight tensor, as a view of its unit's flat buffer (re-fetched in backward)."""

    unit_index: int
    offset: int  # elements from the start of the flat buffer
    size: tuple[int, ...]
    stride: tuple[int, ...]


class StreamingExecutor:
    """Trains ``model`` out of core under ``plan``. Use as a context manager.

    Example::

        with StreamingExecutor(model, plan, store, adamw, settings) as ex:
            for batches in loader:
                result = ex.train_step(batches, lr=1e-4)
            weights = ex.master_state_dict()
    """

    def __init__(self, model: nn.Module, plan: Plan, store: SwapStore, adamw: FlatAdamW,
                 settings: TrainSettings, device: torch.device | None = None,
                 initializer: Initializer | None = None, resume: ResumeState | None = None,
                 start_step: int = 0, tracer: Tracer | None = None, state_in_store: bool = False) -> None:
        self.model = model
        self.plan = plan
        self.tracer = tracer or Tracer(enabled=False)
        self.store = TracedStore(store, self.tracer) if self.tracer.enabled else store
        self.adamw = adamw
        self.settings = settings
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.initializer = initializer
        self.resume = resume
        # The store already holds every unit's master/exp_avg/exp_avg_sq under this plan's
        # names (a restored checkpoint snapshot): read them instead of initializing.
        self.state_in_store = state_in_store
        self.acct = Accountant({Tier.DEVICE: plan.device_budget_bytes, Tier.HOST: plan.host_budget_bytes})
        self.map: ModelMap | None = None
        self._states: list[_UnitState] = []
        self._params: dict[str, nn.Parameter] = {}
        self._chunks: list[list[tuple[int, int]]] = []
        self._pending_jobs: deque[Future[None]] = deque()
        self._arena: HostArena | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._hooks: list[Any] = []
        self._router: RouterLogits | None = None  # MoE router aux-loss gradients (set in start)
        self._evaluating = False  # forward only (evaluate): layers stream, nothing is kept
        self._arguments_checked: set[int] = set()  # layers whose call arguments were checked
        self._calls: dict[int, _LayerCall] = {}
        self._swap_pool: dict[int, list[torch.Tensor]] = {}  # released swap buffers by size
        self._streaming = False
        self._grad_mode_stack: list[bool] = []
        self._x0: torch.Tensor | None = None
        self._head_input: torch.Tensor | None = None
        self._norms: dict[int, list[torch.Tensor]] = {}
        self._job_error: BaseException | None = None
        self._lock = threading.Lock()
        self.optimizer_step = start_step
        self.loss_scale = settings.initial_loss_scale if settings.compute_dtype == torch.float16 else 1.0
        self.good_steps = 0
        self._pending_lr = 0.0
        self.copy_stream: Any = None

    # ------------------------------------------------------------------------------ set-up
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
        self.map = build_model_map(self.model)
        self.model.train()
        for module in self.model.modules():  # buffers (RoPE tables, masks) live on DEVICE
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != self.device and buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)
        self._check_device_fits()
        for unit in self.map.units:
            self._states.append(_UnitState(unit, resident=self._is_resident(unit)))
            self._chunks.append(_chunk_ranges(unit.numel, self.plan.chunk_numel))
        arena_bytes = 2 * 5 * self._state_itemsize * min(self.plan.chunk_numel, max(u.numel for u in self.map.units))
        self.acct.alloc(Tier.HOST, arena_bytes, "optimizer staging buffers")
        self.acct.alloc(Tier.HOST, self._host_resident_bytes(), "host-resident tensors of the plan")
        self._arena = HostArena(arena_bytes).open()
        if self.plan.overlap:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="optimizer")
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
        self._reserve_store()
        # The default initializer reads the model's own tensors: keep them until written.
        originals = {n: p.detach() for n, p in self.model.named_parameters()} if self.initializer is None else {}
        self._replace_parameters()
        for st in self._states:
            self._initialize_unit(st, originals)
        originals.clear()
        for st in self._states:
            if st.resident:
                self._bind(st)
        self.store.flush()
        self._install_hooks()

    def close(self, raise_job_errors: bool = True) -> None:
        try:
            if raise_job_errors:
                self.synchronize()
            else:
                with contextlib.suppress(BaseException):
                    self.synchronize()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for pool in (self._loader, self._worker):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._loader = self._worker = None
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def _check_device_fits(self) -> None:
        """DEVICE must hold pre + post, one layer's weights and the gradients of the largest unit."""
        assert self.map is not None
        itemsize = _itemsize(self.settings.compute_dtype)
        biggest = max(u.numel for u in self.map.layer_units) * itemsize
        biggest_grads = max(u.numel for u in self.map.units) * itemsize
        fixed = (self.map.pre.numel + self.map.post.numel) * itemsize
        need = fixed + biggest + biggest_grads
        if need > self.plan.device_budget_bytes:
            raise BudgetError(
                f"the device budget {format_bytes(self.plan.device_budget_bytes)} is too small: "
                f"embeddings, head, one layer and its gradients need {format_bytes(need)}; raise "
                f"offload.gpu_memory_limit"
            )

    def _is_resident(self, unit: Unit) -> bool:
        if not unit.is_layer:
            return True
        return (unit.index - 1) in self.plan.resident_layers

    def _host_resident_bytes(self) -> int:
        assert self.map is not None
        total = 0
        for u in self.map.units:
            if self.plan.optimizer == Tier.HOST:
                total += 3 * self._state_itemsize * u.numel
            if self.plan.grads == Tier.HOST and self._grads_kept():
                total += self._state_itemsize * u.numel
            if self._weights_home(u) == Tier.HOST and not self._weights_are_master:
                total += _itemsize(self.settings.compute_dtype) * u.numel
        return total

    @property
    def _state_itemsize(self) -> int:
        return _itemsize(self.settings.state_dtype)

    @property
    def _weights_are_master(self) -> bool:
        """The compute weights of streamed units are their master weights (no second copy) when
        both have one dtype and the plan keeps both in one tier: loads read the master, and the
        optimizer writes no separate weights."""
        return (self.settings.compute_dtype == self.settings.state_dtype
                and self.plan.weights == self.plan.optimizer)

    def _grads_kept(self) -> bool:
        """Gradients outlive a backward only when accumulated or when updates are deferred;
        otherwise the grads tier holds nothing and gets no space."""
        return self.settings.gradient_accumulation_steps > 1 or self.settings.deferred

    def _weights_home(self, u: Unit) -> Tier:
        """Where a unit's compute weights wait between uses (DEVICE: never leaves it)."""
        if self._is_resident(u):
            return Tier.DEVICE
        return self.plan.weights

    def _replace_parameters(self) -> None:
        """Give every parameter an empty placeholder; tied parameters stay one object."""
        assert self.map is not None
        old_by_name = dict(self.model.named_parameters())
        new_by_old: dict[int, nn.Parameter] = {}
        dtype = self.settings.compute_dtype
        for unit in self.map.units:
            for slot in unit.params:
                old = old_by_name[slot.name]
                new = nn.Parameter(torch.empty(0, dtype=dtype, device=self.device),
                                   requires_grad=old.requires_grad)
                new_by_old[id(old)] = new
                self._params[slot.name] = new
        for module in self.model.modules():
            for pname, p in list(module._parameters.items()):
                if p is not None and id(p) in new_by_old:
                    module._parameters[pname] = new_by_old[id(p)]

    def _reserve_store(self) -> None:
        assert self.map is not None
        specs = []
        for u in self.map.units:
            kinds: list[tuple[str, torch.dtype]] = []
            sd = self.settings.state_dtype
            if self.plan.optimizer == Tier.NVME:
                kinds += [("master", sd), ("exp_avg", sd), ("exp_avg_sq", sd)]
            if self.plan.grads == Tier.NVME and self._grads_kept():
                kinds.append(("grad", sd))
            if self._weights_home(u) == Tier.NVME and not self._weights_are_master:
                kinds.append(("weight", self.settings.compute_dtype))
            for c, (a, b) in enumerate(self._chunks[u.index]):
                specs += [TensorSpec(f"{u.name}.{kind}.{c}", dtype, (b - a,)) for kind, dtype in kinds]
        self.store.reserve(specs)

    def _initialize_unit(self, st: _UnitState, originals: dict[str, torch.Tensor]) -> None:
        """Write a unit's initial master weights, zero Adam states and compute weights."""
        u = st.unit
        if self.state_in_store:
            if self.plan.optimizer != Tier.NVME:
                raise ValueError("state_in_store needs a plan with the optimizer states on NVME")
            master = torch.empty(u.numel, dtype=self.settings.state_dtype)
            self._read_chunks(u, "master", master)
            self._write_weights(st, master.to(self.settings.compute_dtype), master)
            return
        if self.resume is not None:
            master, exp_avg, exp_avg_sq = self.resume(u)
            sd = self.settings.state_dtype
            for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if t.dtype != sd or t.numel() != u.numel:
                    raise OffloadError(f"saved {name} of {u.name} has {t.numel()} x {t.dtype}, expected "
                                       f"{u.numel} x {sd}: the checkpoint is from another model or "
                                       f"model.state_dtype")
        else:
            master = self._initial_master(u, originals)
            exp_avg = exp_avg_sq = None
        weights = master.to(self.settings.compute_dtype)
        sd = self.settings.state_dtype
        if self.plan.optimizer == Tier.HOST:
            st.host_master = (master, torch.zeros(u.numel, dtype=sd) if exp_avg is None else exp_avg.clone(),
                              torch.zeros(u.numel, dtype=sd) if exp_avg_sq is None else exp_avg_sq.clone())
        else:
            zeros = torch.zeros(min(u.numel, self.plan.chunk_numel), dtype=sd)
            futs = []
            for c, (a, b) in enumerate(self._chunks[u.index]):
                futs += [self.store.write(f"{u.name}.master.{c}", master[a:b]),
                         self.store.write(f"{u.name}.exp_avg.{c}", zeros[: b - a] if exp_avg is None else exp_avg[a:b]),
                         self.store.write(f"{u.name}.exp_avg_sq.{c}",
                                          zeros[: b - a] if exp_avg_sq is None else exp_avg_sq[a:b])]
            for f in futs:
                f.result()
        self._write_weights(st, weights, master)

    def _write_weights(self, st: _UnitState, weights: torch.Tensor, master: torch.Tensor) -> None:
        """Put a unit's initial compute weights in their home (and zero its HOST gradients)."""
        u = st.unit
        if self.plan.grads == Tier.HOST and self._grads_kept():
            st.host_grad = torch.zeros(u.numel, dtype=self.settings.state_dtype)
        home = self._weights_home(u)
        if home == Tier.DEVICE:
            st.device_flat = self._alloc_device(u)
            st.device_flat.copy_(weights)
        elif self._weights_are_master:
            # the master is the weights' home: nothing more to write
            st.host_weights = st.host_master[0] if st.host_master is not None else None
        elif home == Tier.HOST:
            st.host_weights = weights.clone() if weights is master else weights
        else:
            futs = [self.store.write(f"{u.name}.weight.{c}", weights[a:b])
                    for c, (a, b) in enumerate(self._chunks[u.index])]
            for f in futs:
                f.result()

    def _initial_master(self, u: Unit, originals: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.initializer is not None:
            tensors = self.initializer(u)
        else:
            tensors = {s.name: originals.pop(s.name) for s in u.params}
        master = torch.empty(u.numel, dtype=self.settings.state_dtype)
        for s in u.params:
            t = tensors[s.name]
            if tuple(t.shape) != s.shape:
                raise OffloadError(f"initial tensor {s.name} has shape {tuple(t.shape)}, expected {s.shape}")
            master[s.offset : s.offset + s.numel].copy_(t.reshape(-1))
        return master

    # ------------------------------------------------------------------------------ weights
    def _alloc_device(self, u: Unit, accounted: bool = False) -> torch.Tensor:
        """A DEVICE flat buffer for a unit's weights; ``accounted``: bytes already reserved."""
        itemsize = _itemsize(self.settings.compute_dtype)
        if not accounted:
            self.acct.alloc(Tier.DEVICE, u.numel * itemsize, f"weights of {u.name}")
        if self.device.type == "cpu":
            return aligned_empty(u.numel * itemsize).view(self.settings.compute_dtype)
        return torch.empty(u.numel, dtype=self.settings.compute_dtype, device=self.device)

    def _aliases_home(self) -> bool:
        """On a CPU device, HOST-home weights are used in place: no copy, no DEVICE bytes."""
        return self.plan.weights == Tier.HOST and self.device.type == "cpu"

    def _bind(self, st: _UnitState) -> None:
        flat = st.device_flat
        assert flat is not None
        for s in st.unit.params:
            self._params[s.name].data = flat[s.offset : s.offset + s.numel].view(s.shape)

    def _unbind(self, st: _UnitState) -> None:
        empty = torch.empty(0, dtype=self.settings.compute_dtype, device=self.device)
        for s in st.unit.params:
            self._params[s.name].data = empty

    def _load_weights(self, st: _UnitState) -> torch.Tensor:
        """Loader job: wait for the unit's pending update, then bring its weights to DEVICE."""
        st.update.result()
        u = st.unit
        if self._aliases_home():
            assert st.host_weights is not None
            return st.host_weights  # DEVICE is host memory: use the home copy in place
        flat = self._alloc_device(u, accounted=True)
        if self.plan.weights == Tier.HOST:
            assert st.host_weights is not None
            self._h2d(flat, st.host_weights)
        elif self.device.type == "cpu":
            self._read_chunks(u, self._weights_kind, flat)
        else:
            staging = torch.empty(u.numel, dtype=flat.dtype, pin_memory=True)
            self._read_chunks(u, self._weights_kind, staging)
            self._h2d(flat, staging)
        return flat

    @property
    def _weights_kind(self) -> str:
        """The store extents that hold the compute weights of streamed units."""
        return "master" if self._weights_are_master else "weight"

    def _read_chunks(self, u: Unit, kind: str, out: torch.Tensor) -> None:
        futs = [self.store.read(f"{u.name}.{kind}.{c}", out[a:b])
                for c, (a, b) in enumerate(self._chunks[u.index])]
        for f in futs:
            f.result()

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        t_start_s = self.tracer.clock()
        if self.device.type == "cuda":
            # The destination may be memory the compute stream just released (caching
            # allocator): order the copy after all work queued on the compute stream so far.
            self.copy_stream.wait_stream(torch.cuda.default_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
            self.copy_stream.synchronize()  # sync point: loader thread only, never the compute stream
            self.acct.count("h2d_bytes", nbytes)
        else:
            dst.copy_(src)
        if t_start_s:  # recording: name the event
            self.tracer.add("h2d", f"{nbytes} bytes", t_start_s)

    def _request_load(self, st: _UnitState) -> None:
        if st.resident or st.device_flat is not None or st.load is not None:
            return
        if not self._aliases_home():
            # Reserve the DEVICE bytes now, on the calling thread, so prefetch decisions that
            # follow see them (the loader allocates the buffer later). Gradients waiting for the
            # worker hold DEVICE memory: let them drain first when there is no room.
            nbytes = st.unit.numel * _itemsize(self.settings.compute_dtype)
            while self._pending_jobs and not self.acct.fits(Tier.DEVICE, nbytes):
                self._pending_jobs.popleft().result()
            self.acct.alloc(Tier.DEVICE, nbytes, f"weights of {st.unit.name}")
        if self._loader is None:
            st.load = _done(self._load_weights(st))
        else:
            st.load = self._loader.submit(self._load_weights, st)

    def _ensure_loaded(self, st: _UnitState) -> None:
        if st.resident:
            with self.tracer.span("wait", f"update of {st.unit.name}"):
                st.update.result()  # sync point: the unit's optimizer update must be finished
            return
        if st.device_flat is None:
            self._request_load(st)
            assert st.load is not None
            with self.tracer.span("wait", f"weights of {st.unit.name}"):
                st.device_flat = st.load.result()
            st.load = None
        self._bind(st)

    def _release(self, st: _UnitState) -> None:
        if st.resident or st.device_flat is None:
            return
        self._unbind(st)
        if not self._aliases_home():
            self.acct.free(Tier.DEVICE, st.device_flat.numel() * st.device_flat.element_size())
        st.device_flat = None

    def _prefetch(self, layer_indices: Iterator[int]) -> None:
        """Start loading these layers while there is DEVICE room, keeping room for the
        gradients of one layer (they appear before the next layer is needed)."""
        if not self.plan.overlap:
            return
        itemsize = _itemsize(self.settings.compute_dtype)
        assert self.map is not None
        grad_reserve = max(u.numel for u in self.map.layer_units) * itemsize
        for i in layer_indices:
            st = self._states[i + 1]
            if not st.resident and st.device_flat is None and st.load is None:
                if not self.acct.fits(Tier.DEVICE, st.unit.numel * itemsize + grad_reserve):
                    return  # no room now: it will be loaded on demand
                self._request_load(st)

    # ------------------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        assert self.map is not None
        self._router = RouterLogits(self.model, self.map.layers)
        self._hooks.extend(self._router.install())
        for i, layer in enumerate(self.map.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(i), with_kwargs=True))

    def _make_pre_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._evaluating:
                self._ensure_loaded(self._states[i + 1])
                self._prefetch(iter(range(i + 1, min(i + 1 + self.plan.prefetch_depth, self._n_layers))))
                return None
            if not self._streaming:
                return None
            x = args[0]
            if i not in self._arguments_checked:  # a property of the architecture: once per layer
                check_layer_arguments(self.model, args[1:], kwargs)
                self._arguments_checked.add(i)
            if i == 0:
                self._x0 = x
            call = _LayerCall(args[1:], kwargs, torch.get_rng_state(),
                              torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                              shape=tuple(x.shape), dtype=x.dtype)
            self._calls[i] = call
            self._ensure_loaded(self._states[i + 1])
            self._prefetch(iter(range(i + 1, min(i + 1 + self.plan.prefetch_depth, self._n_layers))))
            call.trace_start_s = self.tracer.clock()
            self._router.forward(i, keep_graph=not self.plan.recompute)
            if self.plan.recompute:
                self._save_checkpoint(i, call, x.detach())
                self._grad_mode_stack.append(torch.is_grad_enabled())
                torch.set_grad_enabled(False)
                return None
            # Keep this layer's autograd graph; its saved weights become tokens (re-fetched in
            # backward), its saved activations stay on DEVICE.
            call.x_leaf = x.detach().requires_grad_(True)
            if self._swaps_activations(i):
                call.kept_storage = {x.untyped_storage().data_ptr(), *tensor_storages(args[1:], kwargs)}
            call.saved = torch.autograd.graph.saved_tensors_hooks(
                lambda t: self._pack(i, t), lambda packed: self._unpack(packed))
            call.saved.__enter__()
            return (call.x_leaf, *args[1:]), kwargs

        return hook

    def _make_post_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if self._evaluating:
                self._release(self._states[i + 1])
                if i == self._n_layers - 1:
                    self._ensure_loaded(self._states[-1])
                return None
            if not self._streaming:
                return None
            call = self._calls[i]
            self._router.done()
            if call.trace_start_s:
                self.tracer.add("compute", f"forward layer.{i}", call.trace_start_s)
            if self.plan.recompute:
                torch.set_grad_enabled(self._grad_mode_stack.pop())
            else:
                assert call.saved is not None
                call.saved.__exit__(None, None, None)
                call.saved = None
                call.output = output[0] if isinstance(output, tuple) else output
                if call.swapped:
                    self._swap_out(i, call)
                if i >= 1 and self._swaps_activations(i - 1):
                    # at most two layers' saved activations in memory: the previous layer's
                    # writes end here (their buffers serve the next layer, if it swaps)
                    self._drop_swap_buffers(self._calls[i - 1])
                if not self._swaps_activations(i + 1):
                    self._clear_swap_pool()
            if i < self._n_layers - self.plan.turn_keep:
                self._release(self._states[i + 1])
            if i != self._n_layers - 1:
                return None
            self._ensure_loaded(self._states[-1])
            hidden = output[0] if isinstance(output, tuple) else output
            leaf = hidden.detach().requires_grad_(True)
            self._head_input = leaf
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

        return hook

    def _pack(self, i: int, t: torch.Tensor) -> Any:
        """Saved-tensor hook (no-recompute mode): weights become (unit, view) tokens; with
        ``activations: nvme`` large activations become ``_SwappedTensor`` tokens."""
        st = self._states[i + 1]
        flat = st.device_flat
        if (flat is not None and t.device == flat.device and t.dtype == flat.dtype
                and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()):
            return _WeightView(i + 1, t.storage_offset() - flat.storage_offset(), tuple(t.shape), t.stride())
        nbytes = t.numel() * t.element_size()
        call = self._calls[i]
        if (self._swaps_activations(i) and nbytes >= SWAP_MIN_BYTES
                and t.untyped_storage().data_ptr() not in call.kept_storage):
            # A copy in a page-aligned buffer (O_DIRECT, no bounce); autograd drops ``t``.
            # Sync point on a GPU: the D2H copy blocks this thread.
            buf = self._swap_buffer(nbytes, f"saved activations of layer {i} (swapped)")
            buf.view(t.dtype).view(t.shape).copy_(t)
            token = _SwappedTensor(f"act.{i}.{len(call.swapped)}.{nbytes}", tuple(t.shape), t.dtype, nbytes, buf)
            call.swapped.append(token)
            return token
        self.acct.alloc(Tier.DEVICE, nbytes, f"saved activations of layer {i}")
        call.saved_bytes += nbytes
        return t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _SwappedTensor):
            assert packed.read is not None or packed.buf is not None, "activations must be swapped in first"
            if packed.read is not None:
                packed.read.result()  # sync point: the read of this activation has landed
            assert packed.buf is not None
            x = packed.buf.view(packed.dtype).view(packed.shape)
            return x if self.device.type == "cpu" else x.to(self.device)
        if not isinstance(packed, _WeightView):
            return packed
        flat = self._states[packed.unit_index].device_flat
        assert flat is not None, "weights must be loaded before their layer's backward"
        return flat.as_strided(packed.size, packed.stride, flat.storage_offset() + packed.offset)

    def _swaps_activations(self, i: int) -> bool:
        """Layer i's saved activations go through the SSD: all layers but the last two, which
        backward needs first (they stay in memory over the turn)."""
        return (not self.plan.recompute and self.plan.activations == Tier.NVME
                and i < self._n_layers - 2)

    @property
    def _swap_tier(self) -> Tier:
        """Where swapped activations wait in memory: host buffers (the DEVICE on a CPU)."""
        return Tier.DEVICE if self.device.type == "cpu" else Tier.HOST

    def _swap_buffer(self, nbytes: int, what: str) -> torch.Tensor:
        """A page-aligned host buffer: a released one of this size (already accounted; layers
        save the same shapes, so buffers are reused, not faulted in anew), else a new one."""
        pooled = self._swap_pool.get(nbytes)
        if pooled:
            return pooled.pop()
        self.acct.alloc(self._swap_tier, nbytes, what)
        return aligned_empty(nbytes, pin_memory=self.device.type == "cuda")

    def _clear_swap_pool(self) -> None:
        """Give the released swap buffers back (end of forward, of backward, of a dropped step)."""
        for nbytes, bufs in self._swap_pool.items():
            self.acct.free(self._swap_tier, nbytes * len(bufs))
        self._swap_pool.clear()

    def _swap_out(self, i: int, call: _LayerCall) -> None:
        """After layer i's forward: write its swapped activations (extents reserved once)."""
        self.store.reserve([TensorSpec(t.name, torch.uint8, (t.nbytes,)) for t in call.swapped
                            if t.name not in self.store])
        for t in call.swapped:
            assert t.buf is not None
            t.write = self.store.write(t.name, t.buf)  # holds ``buf`` until done

    def _drop_swap_buffers(self, call: _LayerCall) -> None:
        """Wait for the writes of a layer's swapped activations, then hand their buffers to the
        swap pool (still accounted; ``_clear_swap_pool`` frees them)."""
        for t in call.swapped:
            if t.write is not None:
                t.write.result()  # sync point: the write of this activation has ended
            if t.buf is not None:
                self._swap_pool.setdefault(t.nbytes, []).append(t.buf)  # stays accounted
                t.buf = None

    def _swap_in(self, i: int, call: _LayerCall | None) -> None:
        """Before layer i's backward (and one layer ahead): read its swapped activations back
        into fresh buffers, unless they are still in memory."""
        if call is None:
            return
        for t in call.swapped:
            if t.buf is not None or t.read is not None:
                continue
            assert t.write is not None
            t.write.result()  # sync point: written before read back (long done by now)
            t.buf = self._swap_buffer(t.nbytes, f"saved activations of layer {i} (read back)")
            t.read = self.store.read(t.name, t.buf)

    def _release_swapped(self, call: _LayerCall) -> None:
        """After a layer's backward (or a dropped forward): nothing of its swap stays in memory."""
        for t in call.swapped:
            if t.read is not None:
                t.read.result()
            t.read = None
        self._drop_swap_buffers(call)
        call.swapped.clear()

    @property
    def _n_layers(self) -> int:
        assert self.map is not None
        return len(self.map.layers)

    # ------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, i: int, call: _LayerCall, x: torch.Tensor) -> None:
        nbytes = x.numel() * x.element_size()
        tier = self.plan.activations
        if tier == Tier.NVME:
            name = f"act.{i}.{nbytes}"
            if name not in self.store:
                self.store.reserve([TensorSpec(name, torch.uint8, (nbytes,))])
            host = x.contiguous() if x.device.type == "cpu" else x.to("cpu")
            self.acct.count("d2h_bytes", nbytes if x.device.type != "cpu" else 0)
            # The write holds ``host`` until done; backward waits on it before reading.
            call.checkpoint_write = self.store.write(name, host.reshape(-1).view(torch.uint8))
            return
        if tier == Tier.HOST and x.device.type != "cpu":
            call.checkpoint = x.to("cpu")
        else:
            call.checkpoint = x
        self.acct.alloc(tier, nbytes, f"activation checkpoint of layer {i}")

    def _take_checkpoint(self, i: int, call: _LayerCall) -> torch.Tensor:
        if call.checkpoint_write is not None:
            call.checkpoint_write.result()
            nbytes = math.prod(call.shape) * _itemsize(call.dtype)
            raw = aligned_empty(nbytes)
            self.store.read(f"act.{i}.{nbytes}", raw).result()
            x = raw.view(call.dtype).view(call.shape)
            return x.to(self.device) if self.device.type != "cpu" else x
        assert call.checkpoint is not None
        x = call.checkpoint
        self.acct.free(self.plan.activations, x.numel() * x.element_size())
        call.checkpoint = None
        return x.to(self.device) if x.device != self.device else x

    # ------------------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        """One optimizer step over ``micro_batches`` (length = gradient_accumulation_steps).

        Each batch holds ``input_ids`` and optionally ``labels`` (default: input_ids),
        ``attention_mask`` and ``num_items_in_batch`` (the targets of the whole step, as Trainer
        counts them: the model's loss is then its token-loss sum over that, and the micro-batch
        losses add up to the step's; without it each micro-batch's mean loss counts 1/M).
        Returns the step's loss (a host sync point).
        """
        if len(micro_batches) != self.settings.gradient_accumulation_steps:
            raise ValueError(f"expected {self.settings.gradient_accumulation_steps} micro-batches, "
                             f"got {len(micro_batches)}")
        self._raise_job_error()
        self._pending_lr = lr
        t0 = time.perf_counter()
        n_micro = len(micro_batches)
        total_loss = 0.0
        tokens = 0
        skipped = False
        for m, batch in enumerate(micro_batches):
            try:
                loss = self._forward(batch)
                if "num_items_in_batch" not in batch:
                    loss = loss / n_micro
                loss_value = float(loss.detach())  # sync point: one per micro-batch
                if math.isfinite(loss_value):
                    self._backward(loss, last=(m == n_micro - 1))
            except BaseException:
                with contextlib.suppress(BaseException):  # the first error is the one to report
                    self._drop_forward_state()
                raise
            tokens += int(batch["input_ids"].numel())
            if not math.isfinite(loss_value):
                self._drop_forward_state()
                skipped = self._non_finite(f"loss is {loss_value}")
                break
            total_loss += loss_value
        grad_norm = None
        if not skipped:
            self.optimizer_step += 1
            if self.settings.deferred:
                grad_norm, skipped = self._deferred_update(lr)
        else:
            self._discard_accumulation()
        self.tracer.add("step", f"step {self.optimizer_step}", t0)
        return StepResult(total_loss if not skipped else float("nan"), grad_norm, skipped, tokens,
                          time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Forward only, streamed like training but keeping nothing: no checkpoints, gradients,
        optimizer traffic or weight writes. Returns (sum of token losses, target tokens) over
        ``batch`` (``labels`` default to ``input_ids``; -100 is not a target), the loss as
        transformers' causal-LM loss computes it (shifted, in fp32). Dropout is off (eval mode).
        Waits for every pending update first (sync point)."""
        self.synchronize()
        input_ids = batch["input_ids"].to(self.device)
        labels = batch.get("labels", batch["input_ids"]).to(self.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        for key in ("attention_mask", "position_ids"):
            if key in batch:
                kwargs[key] = batch[key].to(self.device)
        was_training = self.model.training
        self.model.eval()
        self._evaluating = True
        try:
            self._ensure_loaded(self._states[0])
            self._prefetch(iter(range(min(self.plan.prefetch_depth, self._n_layers))))
            with self.tracer.span("compute", "evaluate"):
                logits = self.model(**kwargs).logits
            targets = labels[..., 1:]
            loss_sum = torch.nn.functional.cross_entropy(
                logits[..., :-1, :].float().flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")
        finally:
            self._evaluating = False
            for st in self._states[1:-1]:
                self._release(st)
            self.model.train(was_training)
        return float(loss_sum), int(targets.ne(-100).sum())

    def _non_finite(self, what: str) -> bool:
        if self.settings.nan_policy == "stop":
            raise NonFiniteError(f"{what} at optimizer step {self.optimizer_step + 1}; lower the "
                                 f"learning rate, enable clipping (train.max_grad_norm), or set "
                                 f"nan_policy: skip")
        log.warning("%s: skipping optimizer step %d", what, self.optimizer_step + 1)
        return True

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device)
        labels = batch.get("labels", batch["input_ids"]).to(self.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "use_cache": False}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"].to(self.device)
        if "num_items_in_batch" in batch:
            kwargs["num_items_in_batch"] = batch["num_items_in_batch"]
        if "position_ids" in batch:  # packed rows: positions restart per row (block-diagonal attention)
            kwargs["position_ids"] = batch["position_ids"].to(self.device)
        self._ensure_loaded(self._states[0])
        self._prefetch(iter(range(min(self.plan.prefetch_depth, self._n_layers))))
        self._streaming = True
        try:
            with torch.enable_grad(), self.tracer.span("compute", "forward"):
                out = self.model(**kwargs)
        finally:
            self._streaming = False
        loss = out.loss if hasattr(out, "loss") else out[0]
        return loss.float()

    def _drop_forward_state(self) -> None:
        """Forget a forward (non-finite loss, or an error): every byte it holds is released."""
        for i, call in self._calls.items():
            if call.saved is not None:  # a layer that raised inside its forward
                call.saved.__exit__(None, None, None)
                call.saved = None
            self.acct.free(Tier.DEVICE, call.saved_bytes)
            call.saved_bytes = 0
            self._release_swapped(call)
            if call.checkpoint_write is not None:
                call.checkpoint_write.result()
            elif call.checkpoint is not None:
                self.acct.free(self.plan.activations, call.checkpoint.numel() * call.checkpoint.element_size())
            self._release(self._states[i + 1])
        self._calls.clear()
        if self._router is not None:
            self._router.clear()
        self._clear_swap_pool()
        self._grad_mode_stack.clear()
        self._x0 = self._head_input = None
        for p in self._params.values():
            p.grad = None

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        assert self._head_input is not None and self._x0 is not None
        with self.tracer.span("compute", "backward post"):
            (loss * self.loss_scale).backward()  # final norm + LM head; fills head_input.grad
        grad = self._head_input.grad
        self._head_input = None
        self._unit_grads_ready(self._states[-1], last)
        for i in reversed(range(self._n_layers)):
            st = self._states[i + 1]
            self._ensure_loaded(st)
            self._prefetch(iter(range(i - 1, max(i - 1 - self.plan.prefetch_depth, -1), -1)))
            call = self._calls.pop(i)
            try:
                grad = self._layer_backward(i, call, grad)
            finally:  # also on errors: nothing of this layer's forward stays accounted
                self._release_swapped(call)
                self.acct.free(Tier.DEVICE, call.saved_bytes)
                call.saved_bytes = 0
                del call
            self._unit_grads_ready(st, last)
            self._release(st)
        self._clear_swap_pool()
        with self.tracer.span("compute", "backward pre"):
            self._x0.backward(grad)  # embeddings (and anything before layer 0)
        self._x0 = None
        self._unit_grads_ready(self._states[0], last)

    def _layer_backward(self, i: int, call: _LayerCall, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Layer i's backward (recomputed, or from its kept graph); returns its input's gradient."""
        if self.plan.recompute:
            x = self._take_checkpoint(i, call).detach().requires_grad_(True)
            self._router.recompute(i)
            try:
                with self._rng_restored(call), self.tracer.span("compute", f"recompute layer.{i}"):
                    out = self.map.layers[i](x, *call.args_rest, **call.kwargs)  # type: ignore[union-attr]
            finally:
                self._router.done()
            hidden = out[0] if isinstance(out, tuple) else out
            del out
        else:
            assert call.x_leaf is not None and call.output is not None
            x, hidden = call.x_leaf, call.output
            self._swap_in(i, call)
            self._swap_in(i - 1, self._calls.get(i - 1))  # overlaps this layer's backward
        # MoE routers: d loss / d logits from the head's backward joins this layer's (aux loss)
        router_out, router_grad = self._router.backward_terms(i)
        with self.tracer.span("compute", f"backward layer.{i}"):
            torch.autograd.backward([hidden, *router_out], [grad, *router_grad])
        return x.grad

    @contextlib.contextmanager
    def _rng_restored(self, call: _LayerCall) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(call.rng_cpu)
            if call.rng_cuda is not None:
                torch.cuda.set_rng_state(call.rng_cuda, self.device)
            yield

    # ------------------------------------------------------------------------------ gradients
    def _unit_grads_ready(self, st: _UnitState, last: bool) -> None:
        """Hand a unit's fresh gradients to the optimizer worker (accumulate, or update now)."""
        self._raise_job_error()
        u = st.unit
        fresh: list[torch.Tensor | None] = []
        for s in u.params:
            p = self._params[s.name]
            fresh.append(p.grad)
            p.grad = None
        grad_bytes = sum(g.numel() * g.element_size() for g in fresh if g is not None)
        # Bound the gradients waiting for the worker (DEVICE memory): wait for the oldest jobs.
        while self._pending_jobs and (len(self._pending_jobs) >= self.plan.job_slots
                                      or not self.acct.fits(Tier.DEVICE, grad_bytes)):
            self._pending_jobs.popleft().result()
        self.acct.alloc(Tier.DEVICE, grad_bytes, f"gradients of {u.name}")
        immediate = last and not self.settings.deferred
        seen = [g is not None for g in fresh]
        if st.has_stored_grad and st.grad_seen is not None:
            seen = [a or b for a, b in zip(seen, st.grad_seen, strict=True)]
        st.grad_seen = seen
        job = _Job(st, fresh, grad_bytes, add_stored=st.has_stored_grad,
                   update=immediate, norms=last and self.settings.deferred,
                   step=self.optimizer_step + 1, lr=self._pending_lr, seen=list(seen))
        st.has_stored_grad = not immediate
        st.update = self._submit(job)
        self._pending_jobs.append(st.update)

    def _submit(self, job: _Job) -> Future[None]:
        if self._worker is None:
            self._run_job(job)
            return _done()
        return self._worker.submit(self._guarded, job)

    def _guarded(self, job: _Job) -> None:
        try:
            self._run_job(job)
        except BaseException as err:
            with self._lock:
                if self._job_error is None:
                    self._job_error = err
            raise

    def _raise_job_error(self) -> None:
        with self._lock:
            err = self._job_error
        if err is not None:
            raise err

    def _run_job(self, job: _Job) -> None:
        """Worker: per chunk, gradient = fresh (+ stored); then store it, or run AdamW on it.

        Chunks are double-buffered: the reads of chunk c+1 are in flight while chunk c computes,
        and the writes of chunk c while chunk c+1 computes.
        """
        assert self._arena is not None
        u = job.st.unit
        chunks = self._chunks[u.index]
        width = min(self.plan.chunk_numel, u.numel)
        slot = self._arena.acquire(2 * 5 * self._state_itemsize * width)
        issued: list[Future[Any]] = []  # every I/O on this slot: all must end before it is reused
        try:
            sets = slot.view(self.settings.state_dtype, 10 * width).view(2, 5, width)
            writes: list[list[Future[None]]] = [[], []]
            reads = self._issue_reads(job, 0, sets[0])
            issued += reads
            for c, (a, b) in enumerate(chunks):
                if c + 1 < len(chunks):
                    _wait_all(writes[(c + 1) % 2])
                    next_reads = self._issue_reads(job, c + 1, sets[(c + 1) % 2])
                    issued += next_reads
                _wait_all(reads)
                writes[c % 2] = self._compute_chunk(job, c, a, b, sets[c % 2])
                issued += writes[c % 2]
                if c + 1 < len(chunks):
                    reads = next_reads
            _wait_all(writes[0] + writes[1])
        finally:
            wait(issued)  # also on errors: no read may land in a slot another job owns
            self._arena.release(slot)
            self.acct.free(Tier.DEVICE, job.grad_bytes)

    def _issue_reads(self, job: _Job, c: int, bufs: torch.Tensor) -> list[Future[Any]]:
        u = job.st.unit
        a, b = self._chunks[u.index][c]
        n = b - a
        futs: list[Future[Any]] = []
        if job.add_stored:
            target = bufs[1, :n] if job.fresh_any else bufs[0, :n]
            if self.plan.grads == Tier.HOST:
                assert job.st.host_grad is not None
                target.copy_(job.st.host_grad[a:b])
            else:
                futs.append(self.store.read(f"{u.name}.grad.{c}", target))
        if job.update and self.plan.optimizer == Tier.NVME:
            for k, kind in ((2, "master"), (3, "exp_avg"), (4, "exp_avg_sq")):
                futs.append(self.store.read(f"{u.name}.{kind}.{c}", bufs[k, :n]))
        return futs

    def _compute_chunk(self, job: _Job, c: int, a: int, b: int, bufs: torch.Tensor) -> list[Future[None]]:
        st, u = job.st, job.st.unit
        n = b - a
        grad = bufs[0, :n]
        if job.fresh_any:
            t_start_s = self.tracer.clock()
            d2h_bytes = 0
            for s, g in zip(u.params, job.fresh, strict=True):
                lo, hi = max(a, s.offset), min(b, s.offset + s.numel)
                if lo >= hi:
                    continue
                dst = grad[lo - a : hi - a]
                if g is None:
                    dst.zero_()
                else:
                    dst.copy_(g.reshape(-1)[lo - s.offset : hi - s.offset])  # D2H + cast to state dtype
                    if g.device.type == "cuda":
                        d2h_bytes += (hi - lo) * g.element_size()
            if d2h_bytes:
                self.acct.count("d2h_bytes", d2h_bytes)
            if t_start_s:
                self.tracer.add("d2h", f"gradients of {u.name}.{c}", t_start_s)
            if job.add_stored:
                grad.add_(bufs[1, :n])
        writes: list[Future[None]] = []
        if not job.update:
            if job.norms:
                if self.loss_scale != 1.0:
                    grad.mul_(1.0 / self.loss_scale)
                # Sum of squares in float64: the global norm then does not depend on how units
                # are cut into chunks (every plan gives the same clipped update).
                parts = self._norms.setdefault(u.index, [])
                parts.append(torch.linalg.vector_norm(grad, dtype=torch.float64).square())
            if self.plan.grads == Tier.HOST:
                assert st.host_grad is not None
                st.host_grad[a:b].copy_(grad)
            else:
                writes.append(self.store.write(f"{u.name}.grad.{c}", grad))
            return writes
        if job.coef is not None:
            grad.mul_(job.coef)
        if not self.settings.deferred and not bool(torch.isfinite(grad).all()):
            raise NonFiniteError(
                f"non-finite gradients in {u.name} at optimizer step {job.step}: the loss was finite, "
                f"so some weights may already be updated; resume from the last checkpoint with a "
                f"lower learning rate or with clipping (train.max_grad_norm)"
            )
        if self.plan.optimizer == Tier.HOST:
            assert st.host_master is not None
            master, exp_avg, exp_avg_sq = (t[a:b] for t in st.host_master)
        else:
            master, exp_avg, exp_avg_sq = bufs[2, :n], bufs[3, :n], bufs[4, :n]
        t_start_s = self.tracer.clock()
        for lo, hi, decays in _updated_runs(u, job.seen, a, b, self.settings.no_decay):
            # torch.optim.AdamW leaves parameters without a gradient untouched (no decay, no
            # momentum): update only the runs of parameters that had one; the exempt ones with
            # weight decay 0, as a param group of their own does.
            self.adamw.step(master[lo:hi], grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], job.step, job.lr,
                            weight_decay=None if decays else 0.0)
        if t_start_s:
            self.tracer.add("cpu_adam", f"{u.name}.{c}", t_start_s)
        if self.plan.optimizer == Tier.NVME:
            writes += [self.store.write(f"{u.name}.master.{c}", master),
                       self.store.write(f"{u.name}.exp_avg.{c}", exp_avg),
                       self.store.write(f"{u.name}.exp_avg_sq.{c}", exp_avg_sq)]
        if self.settings.compute_dtype == self.settings.state_dtype:
            weights = master
        else:  # the stored-gradient buffer is free now: convert into it
            weights = bufs[1].view(torch.uint8)[: n * _itemsize(self.settings.compute_dtype)]
            weights = weights.view(self.settings.compute_dtype)
            weights.copy_(master)
        home = self._weights_home(u)
        if home == Tier.DEVICE:
            assert st.device_flat is not None
            self._h2d(st.device_flat[a:b], weights)
        elif self._weights_are_master:
            pass  # the master just updated (or written) is the weights' home
        elif home == Tier.HOST:
            assert st.host_weights is not None
            st.host_weights[a:b].copy_(weights)
        else:
            writes.append(self.store.write(f"{u.name}.weight.{c}", weights))
        return writes

    def _deferred_update(self, lr: float) -> tuple[float | None, bool]:
        """After backward: global norm (sync point), then updates in forward order."""
        self._drain_jobs()
        squares = [n for st in self._states for n in self._norms.pop(st.unit.index, [])]
        total = torch.stack(squares).sum().sqrt().float() if squares else torch.zeros(())
        total_f = float(total)
        if not math.isfinite(total_f):
            if self.settings.compute_dtype == torch.float16:
                self.loss_scale /= 2
                self.good_steps = 0
                log.warning("fp16 gradient overflow: skipping step, loss scale -> %g", self.loss_scale)
            else:
                self._non_finite(f"gradient norm is {total_f}")
            self._discard_accumulation()
            self.optimizer_step -= 1
            return total_f, True
        coef = None
        if self.settings.max_grad_norm > 0:
            coef = torch.clamp(self.settings.max_grad_norm / (total + 1e-6), max=1.0)
        for st in self._states:
            job = _Job(st, [None] * len(st.unit.params), 0, add_stored=True, update=True,
                       norms=False, step=self.optimizer_step, lr=lr, coef=coef, seen=st.grad_seen)
            st.has_stored_grad = False
            st.update = self._submit(job)
        if self.settings.compute_dtype == torch.float16:
            self.good_steps += 1
            if self.good_steps % self.settings.loss_scale_window == 0:
                self.loss_scale *= 2
        return total_f, False

    def _drain_jobs(self) -> None:
        while self._pending_jobs:
            self._pending_jobs.popleft().result()  # sync point
        self._raise_job_error()

    def _discard_accumulation(self) -> None:
        self._drain_jobs()
        for st in self._states:
            st.has_stored_grad = False
        self._norms.clear()

    # ------------------------------------------------------------------------------ results
    def synchronize(self) -> None:
        """Wait for every pending optimizer job (sync point)."""
        self._pending_jobs.clear()
        for st in self._states:
            with contextlib.suppress(BaseException):
                st.update.result()
        self._raise_job_error()

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The master weights (state dtype) by qualified parameter name (reads them from their tier)."""
        out: dict[str, torch.Tensor] = {}
        for u, master in self.unit_masters():
            for s in u.params:
                out[s.name] = master[s.offset : s.offset + s.numel].view(s.shape).clone()
        return out

    def unit_masters(self) -> Iterator[tuple[Unit, torch.Tensor]]:
        """Each unit's flat master weights, one unit in memory at a time (Adam states not read)."""
        self.synchronize()
        for st in self._states:
            u = st.unit
            if st.host_master is not None:
                yield u, st.host_master[0].clone()
                continue
            master = torch.empty(u.numel, dtype=self.settings.state_dtype)
            self._read_chunks(u, "master", master)
            yield u, master

    def unit_states(self) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each unit's flat (master, exp_avg, exp_avg_sq), one unit in memory at a time."""
        self.synchronize()
        for st in self._states:
            u = st.unit
            if st.host_master is not None:
                yield u, *(t.clone() for t in st.host_master)
                continue
            flats = tuple(torch.empty(u.numel, dtype=self.settings.state_dtype) for _ in range(3))
            for kind, flat in zip(("master", "exp_avg", "exp_avg_sq"), flats, strict=True):
                self._read_chunks(u, kind, flat)
            yield u, *flats

    def optimizer_state_extents(self) -> list[tuple[Unit, dict[str, list[tuple[str, int, int]]]]] | None:
        """Where each unit's master, exp_avg and exp_avg_sq live in the store, once every
        pending update has landed: kind -> [(extent name, first element, end element)]. ``None``
        when the plan keeps them in host memory (``unit_states()`` has them then)."""
        self.synchronize()
        if self.plan.optimizer != Tier.NVME:
            return None
        return state_extents(self.units, self.plan.chunk_numel)

    @property
    def units(self) -> tuple[Unit, ...]:
        assert self.map is not None
        return self.map.units

    def metrics(self) -> dict[str, int]:
        links = self.acct.links
        return {
            "peak_device_bytes": self.acct.peak_bytes[Tier.DEVICE],
            "peak_host_bytes": self.acct.peak_bytes[Tier.HOST],
            "io_read_bytes": self.store.read_bytes,
            "io_write_bytes": self.store.write_bytes,
            "h2d_bytes": links.h2d_bytes,
            "d2h_bytes": links.d2h_bytes,
        }


def state_extents(units: tuple[Unit, ...], chunk_numel: int) -> list[tuple[Unit, dict[str, list[tuple[str, int, int]]]]]:
    """The store extents an executor with optimizer states on NVME keeps them in, per unit and
    kind: (extent name, first element, end element), one per chunk of ``chunk_numel``."""
    return [(u, {kind: [(f"{u.name}.{kind}.{c}", a, b) for c, (a, b) in enumerate(_chunk_ranges(u.numel, chunk_numel))]
                 for kind in ("master", "exp_avg", "exp_avg_sq")})
            for u in units]


def tensor_storages(*objs: Any) -> set[int]:
    """Storage addresses of the tensors in ``objs`` (nested in tuples, lists and dicts)."""
    out: set[int] = set()
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            out.add(obj.untyped_storage().data_ptr())
        elif isinstance(obj, (tuple, list)):
            out |= tensor_storages(*obj)
        elif isinstance(obj, dict):
            out |= tensor_storages(*obj.values())
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
