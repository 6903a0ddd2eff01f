"""OptimizerWorker: runs each unit's optimizer job, chunk by chunk, on its own thread.

A job carries everything it needs (the fresh gradients, the step, learning rate, loss scale and
clipping coefficient) and returns what it found (the norm parts of the gradients it kept): no
state is shared with the main thread but the job itself and the unit's state in the StateStore.

Per chunk of a unit, over one staging set (rows named by ``placement.STAGING_ROWS``):
    gather   grad = fresh gradients (copied D2H and cast to the state dtype) [+ the kept gradient]
             (an update from one micro-batch's CPU gradients in the state dtype reads them where
             autograd left them instead: no copy)
             (an update reads master, exp_avg, exp_avg_sq; the master is copied instead from the
             weights loaded for backward when the job carries them: ``Job.master``)
    keep     (accumulating, or a deferred update's first pass) unscale, record the norm part,
             store the gradient in the grads tier
    update   AdamW on master, exp_avg, exp_avg_sq; write them back (not the master copied from
             a unit's resident weights: publishing puts it back there); publish the new compute
             weights where the next forward reads them
Chunks are double-buffered: the reads of chunk c+1 are in flight while chunk c computes, and the
writes of chunk c while chunk c+1 computes.

CUDA: a job's gradients are copied on the worker's own ``d2h`` stream, after the event recorded on
the compute stream when the unit's backward was queued (``Job.ready``), never on the compute
stream; they land in the pinned ``stored_grad`` row in their own dtype and are cast (and added to
the kept gradient, which is then read into ``grad``) on the CPU. The staging arena is pinned.
A job drops its fresh gradients (and frees their DEVICE bytes) once its last chunk is copied (read
in place: updated), before its last writes end.

Threads: ``submit`` is called by the main thread; jobs run one at a time, in submission order,
on the ``optimizer`` thread (``overlap: false``: inline on the caller). Sync points: the waits on
reads before a chunk computes, and on every I/O of a staging set before it is reused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from offload.buffers import HostArena
from offload.optim import FlatAdamW
from offload.tiers import Accountant, Tier
from scheduler.model_map import Unit
from scheduler.placement import STAGING_ROWS, STAGING_SETS
from scheduler.settings import NonFiniteError, TrainSettings, itemsize
from scheduler.state_store import AdamRows, StateStore, done
from scheduler.trace import Tracer
from scheduler.unit_clock import NormParts

Publish = Callable[[Unit, int, int, torch.Tensor], None]
"""Copies a DEVICE-resident unit's new weights [a, b) into place (``WeightStreamer.publish``)."""
Recycle = Callable[[torch.Tensor], None]
"""Takes back a buffer lent with a job (``WeightStreamer.recycle``: kept for reuse, or freed)."""


@dataclass(frozen=True)
class Job:
    """One optimizer-side job for one unit."""

    unit: Unit
    fresh: list[torch.Tensor | None]  # this micro-batch's gradients per parameter, or all None
    grad_bytes: int  # DEVICE bytes of ``fresh``, released when the job ends
    add_stored: bool  # add the gradient kept in the grads tier
    update: bool  # True: AdamW update; False: keep the (accumulated) gradient
    norms: bool  # keeping the step's last gradient before a deferred update: unscale, return norm parts
    step: int  # the optimizer step being taken (AdamW's bias correction)
    lr: float
    loss_scale: float = 1.0  # fp16: the loss was multiplied by this
    coef: torch.Tensor | None = None  # clipping coefficient (deferred updates)
    seen: list[bool] | None = None  # update jobs: parameters that had a gradient (others keep still)
    ready: Any = None  # CUDA: an event on the compute stream after the unit's backward (its gradients exist)
    master: torch.Tensor | None = None  # the unit's master already in memory (no SSD read of it):
    # its DEVICE-resident weights, or the buffer loaded for its backward (``lent``)
    lent: bool = False  # ``master`` is lent: given back (``Recycle``) once its last chunk is copied

    @property
    def fresh_any(self) -> bool:
        return any(g is not None for g in self.fresh) or not self.add_stored


@dataclass
class _Staging:
    """One staging set: one chunk-wide row of each ``STAGING_ROWS`` name, in the state dtype."""

    grad: torch.Tensor
    stored_grad: torch.Tensor
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def head(self, n: int) -> _Staging:
        return _Staging(*(getattr(self, row)[:n] for row in STAGING_ROWS))


class OptimizerWorker:
    def __init__(self, state: StateStore, adamw: FlatAdamW, settings: TrainSettings, acct: Accountant,
                 tracer: Tracer, publish: Publish, recycle: Recycle) -> None:
        self.state = state
        self.adamw = adamw
        self.settings = settings
        self.acct = acct
        self.tracer = tracer
        self.publish = publish
        self.recycle = recycle
        self._width = min(state.placement.plan.chunk_numel, max(max(u.numel for u in state.map.units), 1))
        self._arena: HostArena | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards ``_error`` (worker writes, main reads)
        self._lent: torch.Tensor | None = None  # the running job's lent master, until copied (worker thread)
        self._d2h: Any = None  # CUDA: the stream gradients are copied on (worker thread)

    def start(self) -> None:
        staging_bytes = self.state.placement.staging_bytes(self._width)
        self.acct.alloc(Tier.HOST, staging_bytes, "optimizer staging buffers")
        self._arena = HostArena(staging_bytes).open()  # pinned where CUDA is available
        if self.state.placement.plan.overlap:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="optimizer")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def submit(self, job: Job) -> Future[NormParts]:
        """Main thread: queue a job (synchronous mode: run it now)."""
        if self._pool is None:
            return done(self._run(job))
        return self._pool.submit(self._guarded, job)

    def raise_error(self) -> None:
        """Main thread: re-raise the first error a job raised on the worker."""
        with self._lock:
            err = self._error
        if err is not None:
            raise err

    def _guarded(self, job: Job) -> NormParts:
        try:
            return self._run(job)
        except BaseException as err:
            with self._lock:
                if self._error is None:
                    self._error = err
            raise

    # ---------------------------------------------------------------- one job (worker thread)
    def _run(self, job: Job) -> NormParts:
        assert self._arena is not None
        chunks = self.state.chunks[job.unit.index]
        width = min(self.state.placement.plan.chunk_numel, job.unit.numel)
        slot = self._arena.acquire(STAGING_SETS * len(STAGING_ROWS) * itemsize(self.settings.state_dtype) * width)
        issued: list[Future[Any]] = []  # every I/O on this slot: all must end before it is reused
        parts: NormParts = []
        self._lent = job.master if job.lent else None
        try:
            rows = slot.view(self.settings.state_dtype, STAGING_SETS * len(STAGING_ROWS) * width)
            rows = rows.view(STAGING_SETS, len(STAGING_ROWS), width)
            sets = [_Staging(*rows[k]) for k in range(STAGING_SETS)]
            writes: list[list[Future[None]]] = [[], []]
            in_place = self._grads_in_place(job)
            adam, reads = self._issue_reads(job, 0, sets[0])
            issued += reads
            for c, (a, b) in enumerate(chunks):
                if c + 1 < len(chunks):
                    _wait_all(writes[(c + 1) % 2])  # sync point: the set is free again
                    next_adam, next_reads = self._issue_reads(job, c + 1, sets[(c + 1) % 2])
                    issued += next_reads
                _wait_all(reads)  # sync point: chunk c's inputs have landed
                writes[c % 2] = self._chunk(job, c, a, b, sets[c % 2].head(b - a), adam, parts, in_place)
                issued += writes[c % 2]
                if c + 1 < len(chunks):
                    adam, reads = next_adam, next_reads
            _wait_all(writes[0] + writes[1])
        finally:
            wait(issued)  # also on errors: no read may land in a slot another job owns
            self._arena.release(slot)
            self._release_fresh(job)
            self._give_back_lent()
        return parts

    def _issue_reads(self, job: Job, c: int, staging: _Staging) -> tuple[AdamRows | None, list[Future[Any]]]:
        a, b = self.state.chunks[job.unit.index][c]
        n = b - a
        futs: list[Future[Any]] = []
        if job.add_stored:  # (CUDA: fresh gradients land in ``stored_grad``, the kept one in ``grad``)
            target = staging.stored_grad[:n] if job.fresh_any and job.ready is None else staging.grad[:n]
            futs += self.state.read_grad(job.unit, c, target)
        if not job.update:
            return None, futs
        rows, adam_reads = self.state.adam_rows(job.unit, c, AdamRows(
            staging.master[:n], staging.exp_avg[:n], staging.exp_avg_sq[:n]), master_from=job.master)
        if job.lent and c == len(self.state.chunks[job.unit.index]) - 1:
            self._give_back_lent()  # every chunk of the lent master is copied
        return rows, futs + adam_reads

    def _release_fresh(self, job: Job) -> None:
        """Drop the job's fresh gradients and free their DEVICE bytes (``grad_bytes`` is their
        sum): after its last chunk's gather (read in place: its AdamW), or at its end on errors;
        nothing left the second time."""
        if all(g is None for g in job.fresh):
            return
        job.fresh[:] = [None] * len(job.fresh)  # the job held the only references (GradHandoff took p.grad)
        self.acct.free(Tier.DEVICE, job.grad_bytes)

    def _give_back_lent(self) -> None:
        if self._lent is not None:
            self.recycle(self._lent)
            self._lent = None

    def _chunk(self, job: Job, c: int, a: int, b: int, staging: _Staging, adam: AdamRows | None,
               parts: NormParts, in_place: bool) -> list[Future[None]]:
        last = c == len(self.state.chunks[job.unit.index]) - 1
        if in_place:  # (``_grads_in_place``)
            assert adam is not None
            self._adam(job, c, a, b, self._fresh_pieces(job, a, b), adam)
            if last:
                self._release_fresh(job)
        else:
            self._gather(job, c, a, b, staging)
            if last:
                self._release_fresh(job)  # every chunk's share is copied out: not held while writes end
            if not job.update:
                return self._keep(job, c, staging.grad, parts)
            assert adam is not None
            self._adam(job, c, a, b, _Pieces.per_parameter(job.unit, a, b, staging.grad), adam)
        # a master copied from the unit's resident weights goes back there (``_publish``): its
        # extent is not written each step
        in_weights = job.master is not None and not job.lent
        return (self.state.write_adam(job.unit, c, adam, with_master=not in_weights)
                + self._publish(job.unit, c, a, b, adam.master, staging))

    def _gather(self, job: Job, c: int, a: int, b: int, staging: _Staging) -> None:
        """grad = this job's fresh gradients of chunk [a, b) (D2H + cast) + the stored gradient."""
        if not job.fresh_any:
            return  # the stored gradient was read into ``grad`` itself
        t_start_s = self.tracer.clock()
        if job.ready is None:
            d2h_bytes = self._copy_fresh(job, a, b, staging.grad)  # (D2H and) cast to the state dtype
            landing = None
        else:
            landing, d2h_bytes = self._land_from_cuda(job, a, b, staging)
        if d2h_bytes:
            self.acct.count("d2h_bytes", d2h_bytes)
        if t_start_s:
            self.tracer.add("d2h", f"gradients of {job.unit.name}.{c}", t_start_s)
        if landing is None:
            if job.add_stored:
                staging.grad.add_(staging.stored_grad)
        elif job.add_stored:  # the kept gradient was read into ``grad``: stored + fresh, the same sum
            staging.grad.add_(landing)  # fp32 += bf16: computed in fp32, exact upcast
        else:
            staging.grad.copy_(landing)

    @staticmethod
    def _copy_fresh(job: Job, a: int, b: int, dst: torch.Tensor, non_blocking: bool = False) -> int:
        """Chunk [a, b) of the job's fresh gradients into ``dst`` (zeros where a parameter had
        none); returns the bytes copied from a GPU."""
        d2h_bytes = 0
        for k, lo, hi in _parameter_spans(job.unit, a, b):
            s, g = job.unit.params[k], job.fresh[k]
            if g is None:
                dst[lo - a : hi - a].zero_()
            else:
                dst[lo - a : hi - a].copy_(g.reshape(-1)[lo - s.offset : hi - s.offset], non_blocking=non_blocking)
                if g.device.type == "cuda":
                    d2h_bytes += (hi - lo) * g.element_size()
        return d2h_bytes

    def _land_from_cuda(self, job: Job, a: int, b: int, staging: _Staging) -> tuple[torch.Tensor, int]:
        """CUDA: chunk [a, b) of the fresh gradients copied on the d2h stream into the pinned
        ``stored_grad`` row, in their dtype (cast on the CPU by the caller); (that row, bytes)."""
        first = next(g for g in job.fresh if g is not None)
        width_bytes = staging.stored_grad.numel() * staging.stored_grad.element_size()
        if (b - a) * first.element_size() > width_bytes:
            raise ValueError(f"gradients in {first.dtype} do not fit the {self.settings.state_dtype} staging row")
        landing = staging.stored_grad.view(torch.uint8)[: (b - a) * first.element_size()].view(first.dtype)
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(first.device)  # the gradients' device, not the current one
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(job.ready)  # the unit's backward has run on the compute stream
            d2h_bytes = self._copy_fresh(job, a, b, landing, non_blocking=True)
        self._d2h.synchronize()  # sync point: this worker thread only, never the compute stream
        return landing, d2h_bytes

    def _keep(self, job: Job, c: int, grad: torch.Tensor, parts: NormParts) -> list[Future[None]]:
        """Store the (accumulated) gradient; before a deferred update, unscaled, with its norm part."""
        if job.norms:
            if job.loss_scale != 1.0:
                grad.mul_(1.0 / job.loss_scale)
            # Sum of squares in float64: the global norm then does not depend on how units
            # are cut into chunks (every plan gives the same clipped update).
            parts.append(torch.linalg.vector_norm(grad, dtype=torch.float64).square())
        return self.state.write_grad(job.unit, c, grad)

    def _grads_in_place(self, job: Job) -> bool:
        """An update from this micro-batch's gradients alone, every one a CPU tensor in the state
        dtype, present exactly where the parameter had one: AdamW reads them where autograd left
        them (no copy into the staging row: ``_Pieces``)."""
        if not job.update or job.add_stored or job.ready is not None:
            return False
        seen = job.seen if job.seen is not None else [True] * len(job.fresh)
        return all((g is not None) == had and (g is None or (g.device.type == "cpu" and g.is_contiguous()
                   and g.dtype == self.settings.state_dtype)) for g, had in zip(job.fresh, seen, strict=True))

    @staticmethod
    def _fresh_pieces(job: Job, a: int, b: int) -> _Pieces:
        pieces = []
        for k, lo, hi in _parameter_spans(job.unit, a, b):
            g, start = job.fresh[k], job.unit.params[k].offset
            if g is not None:
                pieces.append((lo - a, g.view(-1)[lo - start : hi - start]))
        return _Pieces(pieces)

    def _adam(self, job: Job, c: int, a: int, b: int, grad: _Pieces, adam: AdamRows) -> None:
        u = job.unit
        if job.coef is not None:
            grad.mul_(job.coef)
        if not self.settings.deferred and not grad.all_finite():
            raise NonFiniteError(
                f"non-finite gradients in {u.name} at optimizer step {job.step}: the loss was finite, "
                f"so some weights may already be updated; resume from the last checkpoint with a "
                f"lower learning rate or with clipping (train.max_grad_norm)"
            )
        t_start_s = self.tracer.clock()
        for lo, hi, decays in updated_runs(u, job.seen, a, b, self.settings.no_decay):
            # torch.optim.AdamW leaves parameters without a gradient untouched (no decay, no
            # momentum): update only the runs of parameters that had one; the exempt ones with
            # weight decay 0, as a param group of their own does.
            for p, q, g in grad.within(lo, hi):
                self.adamw.step(adam.master[p:q], g, adam.exp_avg[p:q], adam.exp_avg_sq[p:q],
                                job.step, job.lr, weight_decay=None if decays else 0.0)
        if t_start_s:
            self.tracer.add("cpu_adam", f"{u.name}.{c}", t_start_s)

    def _publish(self, u: Unit, c: int, a: int, b: int, master: torch.Tensor, staging: _Staging) -> list[Future[None]]:
        """The new compute weights of chunk [a, b), where the next forward reads them."""
        compute_dtype = self.settings.compute_dtype
        if compute_dtype == self.settings.state_dtype:
            weights = master
        else:  # the stored-gradient row is free now: cast into it
            weights = staging.stored_grad.view(torch.uint8)[: (b - a) * itemsize(compute_dtype)].view(compute_dtype)
            weights.copy_(master)
        if self.state.tier("weight", u) == Tier.DEVICE:
            self.publish(u, a, b, weights)
            return []
        return self.state.write_weights(u, c, weights)


def _parameter_spans(u: Unit, a: int, b: int) -> list[tuple[int, int, int]]:
    """(parameter index, lo, hi): [lo, hi) of each of the unit's parameters within chunk [a, b),
    in unit offsets."""
    spans = []
    for k, s in enumerate(u.params):
        lo, hi = max(a, s.offset), min(b, s.offset + s.numel)
        if lo < hi:
            spans.append((k, lo, hi))
    return spans


@dataclass(frozen=True)
class _Pieces:
    """A chunk's gradient as one piece per parameter, at chunk-relative offsets: of the staging row,
    or views of the parameters' own gradients. AdamW runs once per piece, as
    ``torch.optim.AdamW`` does once per parameter: its fused CPU kernel rounds the elements past
    the last whole vector of a call differently (the last bit of ``exp_avg_sq``), so calls cut
    where parameters start give the same bits whichever path gathered the gradient."""

    pieces: list[tuple[int, torch.Tensor]]  # (chunk-relative start, 1-D contiguous gradient)

    @classmethod
    def per_parameter(cls, u: Unit, a: int, b: int, row: torch.Tensor) -> _Pieces:
        """The staging row of chunk [a, b) cut where the unit's parameters start."""
        return cls([(lo - a, row[lo - a : hi - a]) for _, lo, hi in _parameter_spans(u, a, b)])

    def mul_(self, coef: torch.Tensor) -> None:
        for _, g in self.pieces:
            g.mul_(coef)

    def all_finite(self) -> bool:
        return all(all_finite(g) for _, g in self.pieces)

    def within(self, lo: int, hi: int) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, gradient) of every piece's share of chunk-relative [lo, hi)."""
        out = []
        for start, g in self.pieces:
            p, q = max(lo, start), min(hi, start + g.numel())
            if p < q:
                out.append((p, q, g[p - start : q - start]))
        return out


def updated_runs(u: Unit, seen: list[bool] | None, a: int, b: int,
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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. A finite sum proves it (NaN and inf propagate
    through a sum) in one pass; only a non-finite sum (non-finite elements, or finite ones whose
    sum overflows) is checked element by element (``isfinite().all()``: five passes on a CPU)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _wait_all(futures: list[Future[Any]]) -> None:
    for f in futures:
        f.result()
