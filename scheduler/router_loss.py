"""MoE router auxiliary losses across the layer-by-layer cut.

A MoE model whose config sets ``output_router_logits`` adds ``router_aux_loss_coef`` times a
load-balancing loss of every layer's router logits to its loss (transformers computes it in the
``ForCausalLM`` forward from the logits its ``OutputRecorder`` collected). The executor runs the
stock forward, so the loss *value* is transformers' own; its gradient must reach each router,
whose layer is back-propagated on its own, later:

- forward: a hook on each router module (the class ``model._can_record_outputs["router_logits"]``
  names) hands the recorder a leaf copy of the logits, so the loss's graph stops there; the
  layer's own computation uses the router's other outputs (scores, indices) and is unchanged;
- head backward: ``loss.backward()`` leaves d loss / d logits_i in each leaf's ``grad``;
- layer i's backward: the logits recomputed (or kept, without recompute) join the layer's
  ``autograd.backward`` with that gradient: exactly the chain rule of the whole model.

A router that returns only its logits (DBRX) routes with them: without recompute the layer then
consumes the leaf, whose ``grad`` also collects the routing gradient during the layer's backward.
That ``grad`` tensor is the one handed to ``autograd.backward`` for the logits, and autograd
accumulates into it before it runs the router's own backward (the router's node is older than
every node that used the leaf): tests/test_families.py pins this for DBRX.

No family-specific code: the router class and output index come from the model's recorder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RouterLogits:
    """Carries d loss / d router logits from the head's backward to each layer's backward."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(recorder, "target_class", None)
        self.index: int = getattr(recorder, "index", 0) or 0
        wants = bool(getattr(getattr(model, "config", None), "output_router_logits", False))
        self.routers: list[list[nn.Module]] = [
            [m for m in layer.modules() if target is not None and isinstance(m, target)] for layer in layers]
        self.active = wants and any(self.routers)
        self._layer: int | None = None
        self._micro = 0  # the micro-batch whose layer runs (layer-major steps keep several)
        self._recomputing = False
        self._keep_graph = False
        self._leaves: dict[tuple[int, int], list[torch.Tensor]] = {}  # by (micro-batch, layer)
        self._outputs: dict[tuple[int, int], list[torch.Tensor]] = {}

    def install(self) -> list[Any]:
        """Forward hooks on the routers, ahead of transformers' recorder hooks."""
        if not self.active:
            return []
        return [m.register_forward_hook(self._hook(i), prepend=True)
                for i, modules in enumerate(self.routers) for m in modules]

    def forward(self, i: int, keep_graph: bool, m: int = 0) -> None:
        """Layer i's forward of micro-batch m begins (the thread running the forward; one at a
        time); ``keep_graph``: no recompute, the logits' graph is back-propagated later as it is."""
        self._layer, self._micro, self._recomputing, self._keep_graph = i, m, False, keep_graph
        self._leaves[(m, i)], self._outputs[(m, i)] = [], []

    def recompute(self, i: int, m: int = 0) -> None:
        """Layer i is recomputed for its backward: its logits are collected again, with graph."""
        self._layer, self._micro, self._recomputing = i, m, True
        self._outputs[(m, i)] = []

    def done(self) -> None:
        self._layer = None

    def backward_terms(self, i: int, m: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(logits of layer i, d loss / d logits) for its ``autograd.backward`` of micro-batch m;
        forgets them."""
        leaves, outputs = self._leaves.pop((m, i), []), self._outputs.pop((m, i), [])
        if len(outputs) != len(leaves):
            raise RuntimeError(f"layer {i} ran {len(outputs)} routers in backward but {len(leaves)} in forward")
        pairs = [(out, leaf.grad) for out, leaf in zip(outputs, leaves, strict=True)
                 if leaf.grad is not None and out.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def clear(self) -> None:
        self._leaves.clear()
        self._outputs.clear()
        self._layer = None

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._layer != i:
                return None
            key = (self._micro, i)
            out = output[self.index] if isinstance(output, tuple) else output
            if self._recomputing:
                self._outputs[key].append(out)
                return None
            leaf = out.detach().requires_grad_(True)
            self._leaves[key].append(leaf)
            if self._keep_graph:
                self._outputs[key].append(out)
            if isinstance(output, tuple):
                return (*output[: self.index], leaf, *output[self.index + 1 :])
            return leaf

        return hook
