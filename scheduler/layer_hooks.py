"""LayerHooks: the forward hooks on each decoder layer that stream its weights and keep, per
micro-batch, what its backward needs.

    enter(i):  layer-major: wait for this micro-batch's turn at layer i (``Lockstep.turn``);
               the first micro-batch at layer i acquires it and prefetches the next ones;
               ActivationStore.enter (checkpoint, or the saved-tensor hooks)
    exit(i):   ActivationStore.exit; the last micro-batch at layer i releases it (unless kept
               over the turn); after the last layer: acquire ``post`` and cut the graph at the
               head's input (a leaf: ``loss.backward()`` stops there)

The hooks act only while ``streaming`` (a training forward) or ``evaluating`` (forward only:
layers stream, nothing is kept); a recompute in backward runs the layer with both off.

Threads: the thread running the forward: the main thread, or in a layer-major step the
micro-batch thread holding the turn (one at a time). Sync point: ``turn`` in ``enter``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scheduler.activations import ActivationStore
from scheduler.lockstep import Lockstep
from scheduler.model_map import check_layer_arguments
from scheduler.placement import Placement
from scheduler.router_loss import RouterLogits
from scheduler.trace import Tracer
from scheduler.weight_streamer import WeightStreamer


class LayerHooks:
    def __init__(self, model: nn.Module, layers: nn.ModuleList, placement: Placement, weights: WeightStreamer,
                 activations: ActivationStore, router: RouterLogits, tracer: Tracer) -> None:
        self.model = model
        self.layers = layers
        self.placement = placement
        self.weights = weights
        self.activations = activations
        self.router = router
        self.tracer = tracer
        self.lockstep = Lockstep()  # layer-major steps: the micro-batches' forwards in turns
        self.streaming = False  # inside a training forward: the layer hooks stream and keep
        self.evaluating = False  # forward only (evaluate): layers stream, nothing is kept
        self.micro_count = 1  # micro-batches whose forwards run together (layer-major: M)
        self.x0: dict[int, torch.Tensor] = {}  # per micro-batch: layer 0's input (the embedding's graph root)
        self.head_input: dict[int, torch.Tensor] = {}  # per micro-batch: the last layer's output, a leaf
        self._arguments_checked: set[int] = set()  # layers whose call arguments were checked
        self._layer_spans: dict[int, Any] = {}  # tracing: each layer's open forward span
        # tracing, per micro-batch: the open span of the forward outside the layers (from the
        # model call: the embeddings; after the last layer: the head)
        self._outside_spans: dict[int, Any] = {}

    def install(self) -> list[Any]:
        """Register the hooks; returns their handles (removed by the caller)."""
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._enter_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._exit_hook(i), with_kwargs=True))
        return handles

    def clear(self) -> None:
        """Forget the graph roots and leaves of the step's forwards (and the trace spans a forward
        that raised left open: never recorded)."""
        self.x0.clear()
        self.head_input.clear()
        self._layer_spans.clear()
        self._outside_spans.clear()

    @property
    def _n_layers(self) -> int:
        return len(self.layers)

    def model_forward_began(self, m: int) -> None:
        """Tracing: micro-batch m's model call starts (its embeddings compute until layer 0).
        The compute track holds compute only: the loads and waits inside the model call (layer
        weights, the head's) fall between these spans and the layers' own."""
        self._outside_spans[m] = self.tracer.begin("compute", "forward pre")

    def model_forward_ended(self, m: int) -> None:
        """Tracing: micro-batch m's model call returned (the head computed since the last layer)."""
        _end_span(self._outside_spans, m)

    def _enter_hook(self, i: int) -> Callable[..., Any]:
        plan = self.placement.plan

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not (self.streaming or self.evaluating):
                return None  # a recompute in backward: the driver placed everything
            # layer-major: wait until the micro-batches before this one have run layer i (sync point)
            if i == 0 and self.streaming:  # (before waiting for the turn: not compute)
                _end_span(self._outside_spans, self.lockstep.index())
            m = self.lockstep.turn() if self.lockstep.active else 0
            if self.streaming and i not in self._arguments_checked:  # a property of the architecture
                check_layer_arguments(self.model, args[1:], kwargs)
                self._arguments_checked.add(i)
            if m == 0:  # the first micro-batch to run layer i: it is loaded once for all
                self.weights.acquire(i + 1)
                self.weights.prefetch(range(i + 1, min(i + 1 + plan.prefetch_depth, self._n_layers)))
            if self.evaluating:
                return None
            if i == 0:
                self.x0[m] = args[0]
            self._layer_spans[i] = self.tracer.begin("compute", f"forward layer.{i}")
            self.router.forward(i, keep_graph=not self.placement.recomputes(i), m=m)
            return self.activations.enter(i, args[0], args[1:], kwargs, m)

        return hook

    def _exit_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not (self.streaming or self.evaluating):
                return None
            m = self.lockstep.index()
            if self.streaming:
                self.router.done()
                _end_span(self._layer_spans, i)
                self.activations.exit(i, output, m)
            if (self.evaluating or not self.placement.kept_over_turn(i)) and m == self.micro_count - 1:
                self.weights.release(i + 1)
            if i != self._n_layers - 1:
                return None
            self.weights.acquire(len(self.weights.units) - 1)  # post
            if self.evaluating:
                return None
            self._outside_spans[m] = self.tracer.begin("compute", "forward head")
            hidden = output[0] if isinstance(output, tuple) else output
            self.head_input[m] = leaf = hidden.detach().requires_grad_(True)  # loss.backward() stops here
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

        return hook


def _end_span(spans: dict[int, Any], key: int) -> None:
    """Close and forget the trace span opened under ``key`` (none when not recording)."""
    span = spans.pop(key, None)
    if span is not None:
        span.end()
