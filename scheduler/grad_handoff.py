"""GradHandoff: takes each unit's gradients as soon as its backward ends and hands them to the
optimizer worker.

Owns what gradient accumulation needs between micro-batches: in micro-batch-major steps whether
a unit has a gradient kept in the grads tier and which of its parameters had one; in layer-major
steps a decoder layer's sums on DEVICE (in the state dtype, each micro-batch's gradient added in
order, as the worker adds a fresh gradient to a kept one: the same values bit for bit), each
parameter's as autograd produces it (``install_sum_hooks``), so a layer's backward holds its sums
and one parameter's fresh gradient, never a whole fresh gradient beside them. Sums wider than the
gradients (bf16 compute, fp32 state) are new DEVICE memory: counted from the layer's first
micro-batch (``reserve_sums``) to its job. Bounds the gradients waiting for the worker (they hold
DEVICE memory): at most ``plan.job_slots`` jobs, and only while DEVICE has room.

Threads: the main thread, and a layer-major step's micro-batch threads (``scheduler.lockstep``:
one at a time) for the head's jobs; the sum hooks on autograd's thread (the caller's on a CPU,
the device's on CUDA) while the main thread waits in ``backward``. Sync points: waits on the
oldest pending job (``make_room``, ``drain``, ``reserve_sums``).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from offload.pinned import queued_work_event
from offload.tiers import Accountant, Tier
from scheduler.model_map import Unit
from scheduler.optimizer_worker import Job, OptimizerWorker
from scheduler.state_store import done
from scheduler.unit_clock import NormParts, UnitClock, wait_quietly


class GradHandoff:
    def __init__(self, units: tuple[Unit, ...], params: dict[str, nn.Parameter], worker: OptimizerWorker,
                 clock: UnitClock, acct: Accountant, job_slots: int, deferred: bool,
                 sum_dtype: torch.dtype = torch.float32,
                 resident_master: Callable[[int], torch.Tensor | None] = lambda unit_index: None) -> None:
        self.units = units
        self.params = params
        self.worker = worker
        self.clock = clock
        self.acct = acct
        self.job_slots = job_slots
        self.deferred = deferred
        self._pending: deque[Future[NormParts]] = deque()  # jobs whose gradients hold DEVICE memory
        # per unit: its newest job that keeps a gradient ("gradients stored"; its result: the norm
        # parts before a deferred update). Update jobs go to the UnitClock ("weights ready")
        # instead: a forward waits for updates only, never for gradients being stored.
        self._kept: list[Future[NormParts]] = [done([]) for _ in units]
        self._stored = [False] * len(units)  # a gradient of this step is kept in the grads tier
        self._seen: list[list[bool] | None] = [None] * len(units)  # per parameter: had a gradient this step
        self.sum_dtype = sum_dtype  # layer-major sums: the state dtype (the worker's accumulation dtype)
        self._sums: dict[int, list[torch.Tensor | None]] = {}  # layer-major: per unit, per parameter
        self._sum_bytes: dict[int, int] = {}  # per unit: DEVICE bytes its cast sums are counted with
        self.summing = False  # layer-major backward of the decoder layers: the hooks add into the sums
        # a unit's master held by its DEVICE-resident weights, or None (``WeightStreamer.resident_master``)
        self.resident_master = resident_master

    def install_sum_hooks(self) -> list[RemovableHandle]:
        """Hooks that add each decoder layer parameter's gradient into its sum as soon as autograd
        has accumulated it (while ``summing``): the executor removes them on close."""
        handles = []
        for u in self.units[1:-1]:
            for k, s in enumerate(u.params):
                p = self.params[s.name]
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, u, k)))
        return handles

    def _on_grad(self, u: Unit, k: int, p: nn.Parameter) -> None:
        if self.summing:  # (autograd's thread; the main thread waits in backward)
            self._add(u, k, p)

    def reserve_sums(self, u: Unit) -> None:
        """Layer-major, before unit ``u``'s first micro-batch backward: count its sums in DEVICE
        when they are wider than its gradients (a copy, not the gradient itself), waiting for
        pending jobs until they fit (sync point)."""
        if u.numel == 0 or u.index in self._sum_bytes:
            return
        compute_dtype = self.params[u.params[0].name].dtype
        if compute_dtype == self.sum_dtype:
            return  # the first micro-batch's gradient becomes the sum: no new memory
        nbytes = u.numel * self.sum_dtype.itemsize
        self.make_room(nbytes)
        self.acct.alloc(Tier.DEVICE, nbytes, f"gradient sums of {u.name} ({self.sum_dtype})")
        self._sum_bytes[u.index] = nbytes

    def _add(self, u: Unit, k: int, p: nn.Parameter) -> None:
        g, p.grad = p.grad, None
        if g is None:
            return
        sums = self._sums.setdefault(u.index, [None] * len(u.params))
        total = sums[k]
        if total is None:
            sums[k] = g.to(self.sum_dtype)  # (the tensor itself when its dtype already is)
        else:
            total.add_(g)

    def drop_sums(self) -> None:
        self._sums.clear()
        self._free_sums()

    def _free_sums(self, unit_index: int | None = None) -> None:
        for index in [unit_index] if unit_index is not None else list(self._sum_bytes):
            self.acct.free(Tier.DEVICE, self._sum_bytes.pop(index, 0))

    def immediate(self, last: bool) -> bool:
        """The job of a unit's backward updates it at once (the step's last micro-batch, updates
        not deferred)."""
        return last and not self.deferred

    def unit_done(self, u: Unit, last: bool, step: int, lr: float, loss_scale: float,
                  lent: torch.Tensor | None = None) -> None:
        """Take unit ``u``'s fresh gradients (``p.grad``, cleared) and submit its job: keep the
        gradient (accumulating, or deferred updates), or update now (the step's last micro-batch
        in immediate mode). ``step``: the optimizer step being taken; ``lent``: the unit's
        master weights as loaded for this backward (``WeightStreamer.lend``: the job gives the
        buffer back). A unit with nothing trainable (frozen) has no job."""
        try:
            self.worker.raise_error()
        except BaseException:
            if lent is not None:
                self.acct.free(Tier.DEVICE, lent.numel() * lent.element_size())  # no job will take it
            raise
        if u.numel == 0:
            return
        fresh: list[torch.Tensor | None] = []
        for s in u.params:
            p = self.params[s.name]
            fresh.append(p.grad)
            p.grad = None
        if u.index in self._sums:  # a layer-major step: every micro-batch's gradient, summed
            fresh = self._sums.pop(u.index)
        self._free_sums(u.index)  # (counted again below, as the job's)
        grad_bytes = sum(g.numel() * g.element_size() for g in fresh if g is not None)
        while self._pending and (len(self._pending) >= self.job_slots or not self.acct.fits(Tier.DEVICE, grad_bytes)):
            self._pending.popleft().result()  # sync point: the oldest job has taken its gradients
        self.acct.alloc(Tier.DEVICE, grad_bytes, f"gradients of {u.name}")
        immediate = self.immediate(last)
        seen = [g is not None for g in fresh]
        previous = self._seen[u.index]
        if self._stored[u.index] and previous is not None:
            seen = [a or b for a, b in zip(seen, previous, strict=True)]
        self._seen[u.index] = seen
        job = Job(u, fresh, grad_bytes, add_stored=self._stored[u.index], update=immediate,
                  norms=last and self.deferred, step=step, lr=lr, loss_scale=loss_scale, seen=list(seen),
                  ready=_backward_done(fresh),
                  **(self._master(u, lent) if immediate else {}))
        self._stored[u.index] = not immediate
        fut = self.worker.submit(job)
        if immediate:
            self.clock.set(u.index, fut)
        else:
            self._kept[u.index] = fut
        self._pending.append(fut)

    def _master(self, u: Unit, lent: torch.Tensor | None) -> dict[str, Any]:
        """An update job's master already in memory: ``lent``, else the unit's resident weights
        where they hold it (no SSD read of either)."""
        if lent is not None:
            return {"master": lent, "lent": True}
        return {"master": self.resident_master(u.index)}

    def make_room(self, nbytes: int) -> None:
        """Wait for pending jobs (oldest first) until DEVICE has ``nbytes`` free or none is left."""
        while self._pending and not self.acct.fits(Tier.DEVICE, nbytes):
            self._pending.popleft().result()  # sync point

    def drain(self) -> None:
        """Wait for every pending job (sync point) and raise the worker's first error."""
        while self._pending:
            self._pending.popleft().result()
        self.worker.raise_error()

    def norm_parts(self) -> NormParts:
        """After ``drain``: the kept gradients' norm parts, in unit then chunk order (one order
        for every plan, so the global norm is bitwise the same)."""
        return [part for u in self.units for part in self._kept[u.index].result()]

    def submit_updates(self, step: int, lr: float, coef: torch.Tensor | None) -> None:
        """Deferred mode: update every unit from its kept gradient, in forward order (the next
        forward needs ``pre`` first)."""
        for u in self.units:
            if u.numel == 0:
                continue
            job = Job(u, [None] * len(u.params), 0, add_stored=True, update=True, norms=False, step=step,
                      lr=lr, coef=coef, seen=self._seen[u.index], **self._master(u, None))
            self._stored[u.index] = False
            self.clock.set(u.index, self.worker.submit(job))

    def discard(self) -> None:
        """Forget the step's kept gradients (skipped step): wait for its jobs first."""
        self.drain()
        self.forget_kept()

    def forget_kept(self) -> None:
        """The step's kept gradients are not added to the next step's: its first job of each
        unit stores instead of adding (jobs still pending run first: the worker's queue is in
        order)."""
        self._stored = [False] * len(self.units)

    def wait_all(self) -> None:
        """``synchronize``: wait for every job that keeps a gradient (the UnitClock waits for the
        updates); errors are the worker's to report; nothing pending stays counted."""
        wait_quietly(self._kept)
        self._pending.clear()


def _backward_done(fresh: list[torch.Tensor | None]) -> torch.cuda.Event | None:
    """CUDA gradients: an event recorded on the compute stream now, after the kernels that make
    them were queued (the worker's copy waits on it); else None."""
    g = next((g for g in fresh if g is not None), None)
    return queued_work_event(g.device) if g is not None else None
