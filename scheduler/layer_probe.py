"""Time one decoder layer and the LM head of the real model shape on the compute device.

FLOP counts divided by a peak matmul rate miss what small matrices, attention kernels, norms and
activation functions really cost; the probe measures them for the shape being planned. It builds
the model with two decoder layers (random weights, the run's batch shape) and times forward and
forward + backward with its first layer only and with both, alternating, round after round; the
median difference is one layer.

It runs inside the run's memory budget (``budget_probe``): when two layers with the embeddings and
head of the real vocabulary do not fit, the vocabulary is halved until they do (the head's time
is then scaled up by the vocabulary ratio: the LM head matmul and the loss are linear in it);
when no vocabulary fits two layers, one layer is timed against none; when that does not fit
either, the micro-batch is halved too (times and saved bytes are then scaled up
by the batch ratio: at a fixed sequence length every tensor and kernel is linear in the batch);
when not even one sequence fits, the cost model falls back to FLOPs.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from offload.errors import OffloadError, first_line
from scheduler.cost_model import LayerTiming
from scheduler.model_shape import ModelShape
from scheduler.placement import ITEMSIZE
from scheduler.profile import CACHE_DIR
from scheduler.workload import Workload

REPEATS = 4
PROBE_FORMAT = 5  # 2: measures saved activations; 3: without tensors passed to layers (RoPE tables);
# 4: median of interleaved one- and two-layer rounds on one model (3: minimum, two models);
# 5: a tensor saved by several nodes of a layer counted once (the executor swaps it once)


T = TypeVar("T")

MIN_PROBE_VOCAB = 1024
PROBE_MARGIN = 1.25  # allocator rounding and the temporaries of random init


def probe_bytes(shape: ModelShape, wl: Workload, vocab: int, layers: int = 2) -> int:
    """Peak memory of the probe at ``vocab`` with a model of ``layers`` decoder layers (2, or 1
    when two do not fit): the layers, the embeddings and head (their vocabulary rows at
    ``vocab``), each as weights, gradients and init temporaries; fp32 logits and their gradients;
    the layers' saved activations (the cost model's estimate, tokens x (11 h + 6 i); with eager
    attention three score-sized tensors per layer besides)."""
    vocab_mats = min(2, (shape.pre_numel + shape.post_numel) // max(shape.vocab * shape.hidden, 1))
    other = shape.pre_numel + shape.post_numel - vocab_mats * shape.vocab * shape.hidden
    params = layers * shape.layer_numel + other + vocab_mats * vocab * shape.hidden
    itemsize = ITEMSIZE[wl.compute_dtype]
    logits = 3 * wl.tokens * vocab * 4
    saved = layers * wl.tokens * (11 * shape.hidden + 6 * shape.intermediate) * itemsize
    if not shape.fused_attention:  # eager attention: scores, probabilities and their dropout mask
        saved += layers * 3 * wl.micro_batch * shape.n_heads * wl.seq_len**2 * itemsize
    return int(PROBE_MARGIN * (3 * params * itemsize + logits + saved))


def probe_vocab(shape: ModelShape, wl: Workload, budget_bytes: int, layers: int = 2) -> int | None:
    """The vocabulary the probe runs with inside ``budget_bytes``: the model's, else halved until it
    fits (not below MIN_PROBE_VOCAB); None when ``layers`` layers do not fit at all."""
    vocab = shape.vocab
    while probe_bytes(shape, wl, vocab, layers) > budget_bytes:
        if vocab // 2 < min(MIN_PROBE_VOCAB, shape.vocab):
            return None
        vocab //= 2
    return vocab


@dataclasses.dataclass(frozen=True)
class ProbeSize:
    """What the probe runs inside the budget: a vocabulary, a micro-batch and 2 or 1 layers."""

    vocab: int
    micro_batch: int
    layers: int


def probe_size(shape: ModelShape, wl: Workload, budget_bytes: int) -> ProbeSize | None:
    """The probe inside ``budget_bytes``, closest to the run first: the run's micro-batch with two
    layers, else with one (timed against none), else the micro-batch halved (its scaling is the
    least exact: per-token time grows with the batch where large tensors get fresh pages); None
    when one sequence does not fit one layer."""
    batch = wl.micro_batch
    while True:
        for layers in (2, 1):
            vocab = probe_vocab(shape, dataclasses.replace(wl, micro_batch=batch), budget_bytes, layers)
            if vocab is not None:
                return ProbeSize(vocab, batch, layers)
        if batch == 1:
            return None
        batch = max(1, batch // 2)


def budget_probe(hf_config: Any, shape: ModelShape, wl: Workload, device: torch.device,
                 budget_bytes: int) -> LayerTiming | None:
    """The probe for ``wl`` sized to ``budget_bytes`` (``probe_size``; None: nothing fits, the
    cost model counts FLOPs), cached; measured at a smaller micro-batch, scaled to ``wl``'s."""
    size = probe_size(shape, wl, budget_bytes)
    if size is None:
        return None
    try:
        timing = cached_probe(hf_config, dataclasses.replace(wl, micro_batch=size.micro_batch), device, size.vocab,
                              size.layers)
    except (OffloadError, torch.OutOfMemoryError):
        raise  # what the probe found out about the model (a layer input it cannot stream, a budget)
    except (ValueError, RuntimeError, TypeError, IndexError, KeyError, AttributeError) as err:
        if "CUDA" in str(err) or "cuda" in type(err).__module__:
            raise  # the device's own error: sticky, it would resurface later as another one
        # a model cut to its first layers may not run alone (layers of several kinds: Jamba's first
        # ones have no attention to build a mask for); the whole model still trains
        print(f"offload-train: note: the layer probe cannot run the first {size.layers} layer(s) of this "
              f"{getattr(hf_config, 'model_type', 'model')} alone ({first_line(err)[:200]}); planning from FLOP "
              f"counts")
        return None
    scale = wl.micro_batch / size.micro_batch
    if scale == 1:
        return timing
    return LayerTiming(layer_forward_s=timing.layer_forward_s * scale, layer_backward_s=timing.layer_backward_s * scale,
                       head_s=timing.head_s * scale, layer_saved_bytes=int(timing.layer_saved_bytes * scale))


def cached_probe(hf_config: Any, wl: Workload, device: torch.device, vocab: int | None = None,
                 layers: int = 2) -> LayerTiming:
    """``probe_layer``, cached per machine, model config, batch shape and dtype (a resumed or
    repeated run starts without probing again; ``offload-train profile`` clears the cache)."""
    from offload.hostmem import malloc_settings

    # the allocator's settings change compute time (fresh pages for every large tensor): a probe
    # counts only for processes set up like the one that took it
    # (the config's own dtype is left out: the probe runs in the workload's compute dtype, and
    # `train` sets it where `plan` leaves the checkpoint's: both must find the same probe)
    fields = {k: v for k, v in hf_config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    key = json.dumps([PROBE_FORMAT, malloc_settings(), platform.node(), torch.__version__, str(device),
                      fields, vocab, layers,
                      wl.micro_batch, wl.seq_len, wl.compute_dtype], sort_keys=True, default=str)
    path = CACHE_DIR / f"probe-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return LayerTiming(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    timing = probe_layer(hf_config, wl, device, vocab, layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(timing)))
    return timing


def clear_probe_cache() -> None:
    for path in CACHE_DIR.glob("probe-*.json"):
        path.unlink(missing_ok=True)


def probe_layer(hf_config: Any, wl: Workload, device: torch.device, vocab: int | None = None,
                layers: int = 2) -> LayerTiming:
    """``vocab``: run with this vocabulary instead of the model's (see ``probe_vocab``);
    ``layers``: build 2 layers and time 1 against 2, or build 1 and time none against 1."""
    cfg = _probe_config(hf_config, vocab)
    cfg.num_hidden_layers = layers
    # the probe draws weights, ids and (training mode) dropout masks from its own random state:
    # the caller's (a Trainer seeded before the engine starts) is left as it was
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: no host copy
            model = _build(cfg, wl)
            ids = torch.randint(0, cfg.vocab_size, (wl.micro_batch, wl.seq_len), device=device)
        model.train()
        fewer = layers - 1
        try:
            # the whole model first: its layers' arguments are checked before anything else runs
            # (an architecture the layer-by-layer cut cannot take stops here with one line)
            saved_all = _saved_bytes(model, ids)
            rounds = []
            for r in range(REPEATS + 1):
                one = _with_layers(model, fewer, lambda m: _time_round(m, ids, device))
                two = _with_layers(model, layers, lambda m: _time_round(m, ids, device))
                if r:  # the first round warms up kernels and allocators
                    rounds.append((*one, *two))
            saved = [_with_layers(model, fewer, lambda m: _saved_bytes(m, ids)) if fewer else 0, saved_all]
        finally:
            del model
            gc.collect()  # the next probe, or the run, gets this memory back
    return layer_timing(rounds, saved[1] - saved[0], hf_config.vocab_size / cfg.vocab_size, head_layers=fewer)


def layer_timing(rounds: list[tuple[float, float, float, float]], saved_bytes: int,
                 head_scale: float = 1.0, head_layers: int = 1) -> LayerTiming:
    """One layer and the head from timed rounds (forward s and forward + backward s of the model
    with ``head_layers`` layers, then with one more): the median over rounds of each round's
    differences; the head is the smaller model less its layers. The two
    models of a round run back to back, so a slow spell of the machine shifts both; a minimum
    over rounds would predict for a machine quieter than the run's. ``head_scale``: the model's
    vocabulary over the probe's (the head matmul and the loss are linear in it)."""
    fwd_layer = max(statistics.median(f2 - f1 for f1, _, f2, _ in rounds), 1e-6)
    step_layer = max(statistics.median(b2 - b1 for _, b1, _, b2 in rounds), fwd_layer)
    head = max(statistics.median(b1 for _, b1, _, _ in rounds) - head_layers * step_layer, 0.0)
    return LayerTiming(layer_forward_s=fwd_layer, layer_backward_s=step_layer - fwd_layer,
                       head_s=head * head_scale, layer_saved_bytes=max(saved_bytes, 0))


def _probe_config(hf_config: Any, vocab: int | None) -> Any:
    cfg = copy.deepcopy(hf_config)
    if vocab is not None and vocab != cfg.vocab_size:
        cfg.vocab_size = vocab
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids past the smaller vocabulary
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value >= vocab:
                setattr(cfg, name, vocab - 1)
    return cfg


def _build(cfg: Any, wl: Workload) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, wl.compute_dtype))


def _with_layers(model: Any, n_layers: int, run: Callable[[Any], T]) -> T:
    """``run(model)`` with the model cut to its first ``n_layers`` decoder layers (the module list and
    the config's layer count, as a model built with that many would have them; none: the
    embeddings and the head alone, without an MoE router loss)."""
    from scheduler.model_map import find_decoder_layers

    path, layers = find_decoder_layers(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    configured = model.config.num_hidden_layers
    router_logits = getattr(model.config, "output_router_logits", None)
    setattr(parent, attr, nn.ModuleList(list(layers)[:n_layers]))
    model.config.num_hidden_layers = n_layers
    if not n_layers and router_logits:
        model.config.output_router_logits = False  # an MoE router loss needs one layer's logits
    try:
        return run(model)
    finally:
        setattr(parent, attr, layers)
        model.config.num_hidden_layers = configured
        if router_logits is not None:
            model.config.output_router_logits = router_logits


def _time_round(model: Any, ids: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(forward s without autograd, forward + backward s) of one batch."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    _sync(device)
    t1 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def _saved_bytes(model: Any, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of the decoder layers, weights and the
    tensors passed to each layer left out by the executor's own rules (``scheduler.placement``:
    it re-fetches weights and keeps layer inputs, RoPE tables and masks anyway): what the layers add without recompute, and what the executor
    swaps when activations go through the SSD. Counted while a layer runs, as the executor packs
    them (the tensors passed to it are alive then: their addresses identify them)."""
    from scheduler.model_map import build_model_map, check_layer_arguments
    from scheduler.placement import SavedOnce, is_swapped_activation, layer_kept_storages

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    passed: set[int] | None = None  # inside a layer: the storages of what it was given
    once = SavedOnce()  # inside a layer: a tensor saved by several nodes counts once, as swapped
    total = 0

    def enter(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal passed
        check_layer_arguments(model, args[1:], kwargs)  # before any weight of the run is touched
        passed = weights | layer_kept_storages(args[0], args[1:], kwargs)

    def leave(*_: Any) -> None:
        nonlocal passed
        passed = None
        once.clear()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if (passed is not None and is_swapped_activation(t, passed, min_bytes=0)  # the executor's rule, all sizes
                and once.get(t) is None):
            once.add(t, True)
            total += t.numel() * t.element_size()
        # Detached: a node that saves its own output would otherwise hold itself through the
        # hook's return value, a cycle inside autograd that keeps the whole graph (logits
        # included) alive after the loss is gone; this graph is never back-propagated.
        return t.detach()

    hooks = []
    for layer in build_model_map(model).layers:
        hooks.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(layer.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        del loss
    finally:
        for h in hooks:
            h.remove()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
