"""A timeline of one training step: Chrome trace / Perfetto JSON ("X" complete events).

One track (``tid``) per resource: ``compute`` (the embeddings' forward, each layer's forward,
the head's forward, each recompute and backward: the loads and waits of the model call fall
between these spans), ``h2d`` and ``d2h`` (copies to and from DEVICE), ``ssd_read`` and
``ssd_write`` (each store request, from submission to completion, so queueing in the I/O pool is
included), ``cpu_adam`` (AdamW per chunk), ``wait`` (the compute thread blocked on weights still
loading, or on a resident unit's optimizer update) and ``step``. On a CUDA device
(``watch_device``) the compute spans are also timed with CUDA events on the compute stream:
track ``gpu``, when the GPU ran them (its busy time over the step's is the GPU-busy fraction);
the weight copies' ``h2d`` events are timed with CUDA events on their own streams (when the GPU
ran the copy, not when it was queued); both converted when recording stops.
Open ``trace.json`` in https://ui.perfetto.dev or chrome://tracing.

Cost when not recording: one attribute test per hook; a tracer built with ``enabled=False`` never
records. Events are appended from several threads (a list append is atomic in CPython).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

RESOURCES = ("step", "compute", "gpu", "wait", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_adam")
"""Track names, in display order; the track id is the index + 1."""

_PID = 1
_NULL_SPAN = contextlib.nullcontext()


class _Span:
    __slots__ = ("_tracer", "_resource", "_name", "_start_s", "_gpu_start")

    def __init__(self, tracer: Tracer, resource: str, name: str) -> None:
        self._tracer, self._resource, self._name = tracer, resource, name
        self._start_s = 0.0
        self._gpu_start: Any = None

    def __enter__(self) -> None:
        self._start_s = time.perf_counter()
        self._gpu_start = self._tracer.stream_mark() if self._resource == "compute" else None

    def __exit__(self, *exc: object) -> None:
        self.end()

    def end(self) -> None:
        self._tracer.add(self._resource, self._name, self._start_s)
        if self._gpu_start is not None:
            self._tracer._gpu_spans.append(("gpu", self._name, self._gpu_start, self._tracer.stream_mark()))


class Tracer:
    """Collects events while ``recording`` (between ``start()`` and ``stop()``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.recording = False
        self.events: list[dict[str, Any]] = []
        self._origin_s = time.perf_counter()
        self._gpu_device: Any = None  # a CUDA torch.device whose compute spans get CUDA events
        self._gpu_origin: tuple[float, Any] | None = None  # (perf_counter s, event) at start()
        self._gpu_spans: list[tuple[str, str, Any, Any]] = []  # (resource, name, start event, end event)

    def watch_device(self, device: Any) -> None:
        """Time compute spans on ``device`` with CUDA events too (track ``gpu``); a CPU device:
        nothing more."""
        self._gpu_device = device if getattr(device, "type", "cpu") == "cuda" else None

    def start(self) -> None:
        """Start recording (no-op when disabled); earlier events are dropped."""
        if self.enabled:
            self.events = []
            self._gpu_spans = []
            self._origin_s = time.perf_counter()
            self.recording = True
            if self._gpu_device is not None:
                import torch

                torch.cuda.synchronize(self._gpu_device)  # sync point: the origin event runs now
                self._gpu_origin = (time.perf_counter(), self.stream_mark())

    def stop(self) -> None:
        """Stop recording; CUDA-event spans become events of their track (``gpu``, ``h2d``:
        a device sync)."""
        self.recording = False
        if self._gpu_origin is None:
            return
        import torch

        torch.cuda.synchronize(self._gpu_device)  # sync point: every recorded event has run
        origin_s, origin = self._gpu_origin
        spans, self._gpu_spans = self._gpu_spans, []  # (other threads may still append to the list)
        for resource, name, begin, end in spans:
            if end is None:  # ended after recording stopped
                continue
            end.synchronize()  # (recorded by another thread after the device sync above)
            start_s = origin_s + origin.elapsed_time(begin) / 1e3  # elapsed_time: milliseconds
            self.events.append({"name": name, "cat": resource, "ph": "X", "pid": _PID, "tid": _tid(resource),
                                "ts": (start_s - self._origin_s) * 1e6, "dur": max(begin.elapsed_time(end), 0.0) * 1e3})
        self._gpu_origin = None

    def stream_mark(self, stream: Any = None) -> Any:
        """A timing event recorded now on a CUDA ``stream`` (default: the current stream of the
        watched device; the start of an ``add_stream_span``), or None when not recording or not
        on a watched CUDA device."""
        if self._gpu_device is None or not self.recording:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self._gpu_device))
        return event

    def add_stream_span(self, resource: str, name: str, begin: Any, stream: Any) -> None:
        """One event of ``resource`` timed on the GPU: from ``begin`` (``stream_mark``) to now
        on ``stream`` (converted when recording stops); nothing when ``begin`` is None."""
        if begin is not None and self.recording:
            self._gpu_spans.append((resource, name, begin, self.stream_mark(stream)))

    def clock(self) -> float:
        """``time.perf_counter()`` while recording, else 0.0 (start of a span closed by ``add``)."""
        return time.perf_counter() if self.recording else 0.0

    def add(self, resource: str, name: str, start_s: float, end_s: float | None = None,
            args: dict[str, Any] | None = None) -> None:
        """One event from ``start_s`` to ``end_s`` (default: now), both ``perf_counter`` seconds."""
        if not self.recording or start_s <= 0.0:
            return
        end = time.perf_counter() if end_s is None else end_s
        event = {"name": name, "cat": resource, "ph": "X", "pid": _PID, "tid": _tid(resource),
                 "ts": (start_s - self._origin_s) * 1e6, "dur": max(end - start_s, 0.0) * 1e6}
        if args:
            event["args"] = args
        self.events.append(event)

    def span(self, resource: str, name: str) -> contextlib.AbstractContextManager[None]:
        """Context manager recording its body as one event (a shared no-op when not recording);
        a ``compute`` span on a watched CUDA device also as a ``gpu`` event."""
        if not self.recording:
            return _NULL_SPAN
        return _Span(self, resource, name)

    def begin(self, resource: str, name: str) -> _Span | None:
        """A span opened now and closed later by its ``end()`` (from a hook to another), as
        ``span`` records it; None when not recording."""
        if not self.recording:
            return None
        opened = _Span(self, resource, name)
        opened.__enter__()
        return opened

    def watch(self, fut: Future[Any], resource: str, name: str, n_bytes: int) -> Future[Any]:
        """Record ``fut`` from now until it completes; returns it."""
        if self.recording:
            start_s = time.perf_counter()
            fut.add_done_callback(lambda _f: self.add(resource, name, start_s, args={"bytes": n_bytes}))
        return fut

    def to_json(self) -> dict[str, Any]:
        meta = [{"name": "process_name", "ph": "M", "pid": _PID, "args": {"name": "offload-train"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": _PID, "tid": _tid(r), "args": {"name": r}}
                 for r in RESOURCES]
        meta += [{"name": "thread_sort_index", "ph": "M", "pid": _PID, "tid": _tid(r),
                  "args": {"sort_index": _tid(r)}} for r in RESOURCES]
        return {"traceEvents": meta + sorted(self.events, key=lambda e: e["ts"]),
                "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path


_TIDS = {r: i + 1 for i, r in enumerate(RESOURCES)}


def _tid(resource: str) -> int:
    return _TIDS.get(resource, len(RESOURCES) + 1)


def busy_seconds(events: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per resource (event ``cat``), the time at least one of its "X" events was running:
    the length of the union of their intervals, in seconds."""
    return {resource: sum(hi - lo for lo, hi in spans) / 1e6 for resource, spans in _busy_spans(events).items()}


def overlap_seconds(events: Iterable[dict[str, Any]], a: Iterable[str], b: Iterable[str]) -> float:
    """Seconds during which some event of a resource in ``a`` and some event of one in ``b`` ran
    at once (the intersection of the two unions of intervals)."""
    spans = _busy_spans(events)
    a_spans = _union([s for r in a for s in spans.get(r, [])])
    b_spans = _union([s for r in b for s in spans.get(r, [])])
    both_us, k = 0.0, 0
    for lo, hi in a_spans:  # both lists sorted and disjoint: one merge pass
        while k < len(b_spans) and b_spans[k][1] <= lo:
            k += 1
        j = k
        while j < len(b_spans) and b_spans[j][0] < hi:
            both_us += min(hi, b_spans[j][1]) - max(lo, b_spans[j][0])
            j += 1
    return both_us / 1e6


def _busy_spans(events: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per resource, the union of its "X" events' intervals (µs), sorted and disjoint."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X":
            spans.setdefault(e["cat"], []).append((e["ts"], e["ts"] + e["dur"]))
    return {resource: _union(intervals) for resource, intervals in spans.items()}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class TracedStore:
    """A SwapStore whose reads and writes are recorded on ``tracer`` (attributes delegated)."""

    def __init__(self, store: Any, tracer: Tracer) -> None:
        self._store = store
        self._tracer = tracer

    def read(self, name: str, out: Any) -> Future[Any]:
        fut = self._store.read(name, out)
        return self._tracer.watch(fut, "ssd_read", name, out.numel() * out.element_size())

    def write(self, name: str, tensor: Any) -> Future[None]:
        fut = self._store.write(name, tensor)
        return self._tracer.watch(fut, "ssd_write", name, tensor.numel() * tensor.element_size())

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)
