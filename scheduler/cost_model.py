"""Predict one optimizer step of a plan: bytes per link, time per resource, step time, peak memory.

``estimate(plan, shape, workload, profile)`` is a pure function: no weights, no I/O, no clock. It
mirrors what ``scheduler.executor`` does with a plan; the equations are written next to each
term. Symbols (per optimizer step):

    L  decoder layers          R  resident layers        K  turn layers (kept into backward)
    S  streamed layers = L - R N  all parameters         P  parameters of the largest layer
    M  micro-batches (gradient accumulation)             T  tokens per micro-batch = b * s
    Mw passes over the weights per step: 1 with layer-major accumulation (``plan.layer_major``),
       else M (each micro-batch streams every layer and hands its gradients over)
    w  bytes per element of the compute dtype            h, V, H, d  hidden, vocab, heads, head dim
    o  bytes per element of the state dtype (master weights, Adam states, kept gradients):
       4 for mixed precision (fp32 master), 2 for pure bf16 training

Units: bytes, seconds, FLOPs. Rates come from the ``HardwareProfile`` (GB/s are 1e9 bytes/s).

Here: the bytes each link moves and the memory each tier holds at peak; the step time those bytes
and the compute add up to is ``scheduler.step_time``'s, the workload and the parameter counts
both use are ``scheduler.workload``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.io.base import align_up
from offload.tiers import Tier
from scheduler.model_shape import ModelShape
from scheduler.placement import (
    PINNED_CHECKPOINT_COPIES,
    STAGING_ROWS,
    STAGING_SETS,
    SWAPPED_LAYERS_IN_MEMORY,
    Placement,
)
from scheduler.plan import Plan
from scheduler.profile import HardwareProfile
from scheduler.step_time import resource_times, step_time
from scheduler.workload import (
    Workload,
    host_state_numel,
    kept_grad_numel,
    lent_master_layers,
    masters_in_memory_numel,
    masters_on_device_numel,
    ssd_layer_loads,
)

IN_FLIGHT = "layer weights in flight"
LAYER_SUMS = "a layer's gradient sums"
AWAITING = "gradients awaiting the optimizer"
HEAD_AWAITING = "head gradients awaiting the optimizer"
LAST_LAYER = "last layer kept through the heads"
WORKING_MEMORY = "working memory"
STAGING_ARRAYS = STAGING_SETS * len(STAGING_ROWS)  # optimizer worker: chunk-wide state-dtype arrays
EXTENT_ALIGN_BYTES = 4096


@dataclass(frozen=True)
class LayerTiming:
    """Measured on the compute device for this shape and batch (``scheduler.layer_probe``)."""

    layer_forward_s: float  # one decoder layer, one micro-batch, forward
    layer_backward_s: float  # its backward
    head_s: float  # embeddings + final norm + LM head + loss, forward and backward
    layer_saved_bytes: int = 0  # what autograd saves for one layer's backward besides the layer's
    # input and the weights (0: not measured)


@dataclass(frozen=True)
class ActivationBytes:
    """Per layer and micro-batch (estimates from the shape; the executor measures the real ones)."""

    checkpoint: int  # the layer's input, kept for recompute: T * h * w
    saved: int  # what autograd keeps without recompute, besides the layer's input and weights
    layer_work: int  # transient memory while one layer computes
    head_work: int  # transient memory while the LM head and the loss compute

    @property
    def work(self) -> int:
        return max(self.layer_work, self.head_work)


def activation_bytes(shape: ModelShape, wl: Workload, timing: LayerTiming | None = None) -> ActivationBytes:
    t, h, i, w = wl.tokens, shape.hidden, shape.intermediate, wl.itemsize
    # one attention score matrix (none materialized by fused attention)
    scores = 0 if shape.fused_attention else wl.micro_batch * shape.n_heads * wl.seq_len**2 * w
    # saved = the probe's measurement, else T * (11 h + 6 i) * w + 2 scores: projections, norms,
    # MLP intermediates, softmax (an upper bound: fused attention saves no scores)
    saved = (timing.layer_saved_bytes if timing is not None and timing.layer_saved_bytes
             else t * (11 * h + 6 * i) * w + 2 * scores)
    # work: layer 2 * T * (4 h + 3 i) * w + 2 scores; head 3 * T * V * 4 (fp32 logits, softmax,
    # gradient)
    return ActivationBytes(checkpoint=t * h * w, saved=saved, layer_work=2 * t * (4 * h + 3 * i) * w + 2 * scores,
                           head_work=3 * t * shape.vocab * 4)


@dataclass(frozen=True)
class MemoryPeak:
    device_bytes: int
    host_bytes: int
    nvme_bytes: int


def placement(plan: Plan, shape: ModelShape, wl: Workload, timing: LayerTiming | None = None,
              gpu: bool = False) -> list[tuple[str, Tier, int]]:
    """(tensor group, tier, bytes at peak) of everything the executor holds under ``plan``
    (``gpu``: DEVICE is a GPU, host buffers of its copies are page-locked)."""
    w, L = wl.itemsize, shape.n_layers
    rules = wl.placement(plan, shape, on_gpu=gpu)
    act = activation_bytes(shape, wl, timing)
    w_layer = shape.layer_numel * w
    R = len(plan.resident_layers)
    K = min(plan.turn_keep, L - R)
    n = shape.trainable_numel  # gradients and optimizer state: trainable parameters only
    n_host = host_state_numel(plan, shape)  # ... of which in RAM
    rows: list[tuple[str, Tier, int]] = [
        # DEVICE: embeddings and head stay; (1 + prefetch) layers in flight; resident + turn layers
        ("embeddings + head weights", Tier.DEVICE, (shape.pre_numel + shape.post_numel) * w),
        (IN_FLIGHT, Tier.DEVICE, (1 + plan.prefetch_depth) * w_layer if R < L else 0),
        ("resident + turn layer weights", Tier.DEVICE, (R + K) * w_layer),
        # (none when they are the master weights themselves; frozen weights: always, written once)
        ("layer weights streamed", plan.weights, (L - R) * shape.streamed_layer_numel * w
         if shape.frozen or not rules.weights_are_master else 0),
        # trainable weights beside frozen ones (adapters) stay on DEVICE
        ("adapter weights", Tier.DEVICE, (L - R) * shape.layer_trainable_numel * w if shape.frozen else 0),
        # job_slots units' gradients (compute dtype) wait on DEVICE for the CPU optimizer;
        # layer-major: in backward a layer's sums (state dtype), while the heads run the head's
        # gradients (every micro-batch), and the last layer stays loaded through the heads
        # (``peak_memory`` takes the two phases apart)
        (AWAITING, Tier.DEVICE, plan.job_slots * max(
            shape.largest_trainable_unit_numel * w,
            shape.layer_trainable_numel * wl.state_itemsize if rules.layer_sums else 0)),
        (HEAD_AWAITING, Tier.DEVICE, plan.job_slots * max(shape.pre_trainable_numel, shape.post_trainable_numel) * w
         if rules.layer_sums else 0),
        (LAST_LAYER, Tier.DEVICE, w_layer if rules.layer_sums and K == 0 and R < L else 0),
        # layer-major, sums wider than the gradients: the layer in backward sums into new memory
        (LAYER_SUMS, Tier.DEVICE,
         shape.layer_trainable_numel * wl.state_itemsize if rules.casts_gradient_sums else 0),
        # layer-major, a tied head: the head's part of the embedding's gradient, per micro-batch,
        # waits in RAM for the embeddings' backward (the two are added before the optimizer sees them)
        ("tied head gradients parked", Tier.HOST, wl.grad_accum * align_up(shape.shared_trainable_numel * w)
         if rules.layer_sums and shape.shared_trainable_numel else 0),
        # ... and with them the weights loaded for their backward, when the update takes its master there
        ("layer weights lent to the optimizer", Tier.DEVICE,
         plan.job_slots * w_layer if lent_master_layers(shape, wl, rules) else 0),
        (f"{_state_name(wl)} master + Adam states", Tier.HOST, wl.optimizer_bytes_per_param * n_host),
        (f"{_state_name(wl)} master + Adam states", Tier.NVME, wl.optimizer_bytes_per_param * (n - n_host)),
        # (layer-major: the embeddings' and head's only, handed over every micro-batch)
        (f"{_state_name(wl)} gradients kept", plan.grads, wl.grad_bytes_per_param * kept_grad_numel(shape, rules)),
        *_activation_rows(rules, act, wl.grad_accum if wl.layer_major(plan) else 1),
        # layer-major: every micro-batch's layer-0 input and head-input gradient wait for backward
        ("micro-batch boundary states", Tier.DEVICE, 2 * wl.grad_accum * act.checkpoint if wl.layer_major(plan) else 0),
        # checkpoints pin versions of the optimizer state in the swap store; states kept in RAM
        # are written there too when saved (one more copy)
        ("checkpoint versions", Tier.NVME,
         wl.optimizer_bytes_per_param * (wl.checkpoint_versions * n + n_host) if wl.checkpoint_versions else 0),
        # transient compute memory of one layer or the LM head (largest)
        (WORKING_MEMORY, Tier.DEVICE, act.work),
        # optimizer worker: double-buffered chunk-wide rows (grad, stored grad, master, m, v)
        ("optimizer staging", Tier.HOST, rules.staging_bytes(shape.largest_trainable_unit_numel)),
        # GPU: every load from the SSD lands in one page-locked buffer of a layer, then copies over
        ("pinned staging of weight loads", Tier.HOST,
         shape.streamed_layer_numel * w if gpu and plan.weights == Tier.NVME and (R < L or shape.frozen) else 0),
    ]
    if plan.weights == Tier.NVME or plan.optimizer == Tier.NVME or plan.grads == Tier.NVME:
        # every unit's chunks become 4 KiB-aligned extents: at most one block lost per extent
        chunks = sum(-(-numel // plan.chunk_numel) for numel in
                     [shape.layer_numel] * L + [shape.pre_numel, shape.post_numel] if numel)
        rows.append(("extent alignment", Tier.NVME, chunks * 5 * EXTENT_ALIGN_BYTES))
    return [r for r in rows if r[2] > 0]


def _activation_rows(rules: Placement, act: ActivationBytes, kept: int) -> list[tuple[str, Tier, int]]:
    """``kept``: micro-batches whose activations wait for backward at once (layer-major: M)."""
    plan, L = rules.plan, rules.n_layers
    if plan.recompute:
        # in backward a layer's input is held from its recompute to the end of its backward, and
        # the next one read ahead from the SSD: into a pinned buffer, then a device copy, on a
        # GPU; into the CPU device's memory, where the recompute takes it, without one
        rows = [("activation checkpoints", plan.activations, kept * L * act.checkpoint)]
        if plan.activations == Tier.NVME and rules.on_gpu:  # copies out and reads back share them
            rows += [("checkpoints' pinned copies", Tier.HOST, PINNED_CHECKPOINT_COPIES * act.checkpoint),
                     ("checkpoints read back", Tier.DEVICE, act.checkpoint)]
        elif plan.activations == Tier.NVME:
            rows.append(("checkpoints read back", Tier.DEVICE, 2 * act.checkpoint))
        elif plan.activations == Tier.HOST and rules.on_gpu:  # copied back for the recompute
            rows.append(("checkpoint copied back", Tier.DEVICE, act.checkpoint))
        return rows
    if plan.activations == Tier.DEVICE:
        return [("saved activations (no recompute)", Tier.DEVICE, kept * L * (act.saved + act.checkpoint))]
    # swapped through the SSD (``Placement.swaps_activations``: all layers but the last two and
    # the recomputed ones); in memory: at most two layers' worth of swapped ones (one written
    # while the next computes; one read ahead in backward), or the unswapped graphs of the last
    # layers of every kept micro-batch (at the turn), besides every layer's input (the previous
    # layer's output, never swapped; a recomputed layer's checkpoint)
    # (GPU: the swapped ones pass through page-locked host buffers, kept for reuse; CPU: a
    # backward's stay from its end to the next forward's first layers as cached bytes, which any
    # allocation takes back first: in RSS then, never in a peak counted here)
    swapped, recomputed = rules.swapped_layers, rules.recomputed_layers
    return [("saved activations in memory", Tier.DEVICE,
             max(min(L, SWAPPED_LAYERS_IN_MEMORY), kept * (L - swapped - recomputed)) * act.saved
             + kept * L * act.checkpoint),
            ("saved activations swapped", Tier.NVME, kept * swapped * act.saved),
            ("saved activations' pinned buffers", Tier.HOST,
             SWAPPED_LAYERS_IN_MEMORY * act.saved if rules.on_gpu and swapped else 0)]


def swapped_activation_bytes(plan: Plan, shape: ModelShape, wl: Workload,
                             timing: LayerTiming | None = None) -> int:
    """SSD bytes written (and read as many) per step for swapped activations:
    M * (layers swapped) * saved (``Placement.swapped_layers``: L - 2 without recompute and with
    ``activations: nvme``, else 0)."""
    swapped = wl.placement(plan, shape).swapped_layers
    return wl.grad_accum * swapped * activation_bytes(shape, wl, timing).saved if swapped else 0


def peak_memory(plan: Plan, shape: ModelShape, wl: Workload, timing: LayerTiming | None = None,
                gpu: bool = False) -> MemoryPeak:
    """Bytes per tier at peak: the sums of ``placement``, except that on DEVICE the layer phase
    and the head phase do not overlap:
        device = everything else + max(layer weights in flight + a layer's gradient sums
                                       [+ layer-major: gradients awaiting the optimizer]
                                       + layer work,
                                       [layer-major: the head's gradients awaiting the optimizer
                                       + the last layer kept through the heads] + head work)
    (while the LM head computes no streamed layer is on DEVICE, but in a layer-major step the
    last one, kept until the last micro-batch's head; backward's loads and a layer's sums start
    after the heads, and a layer-major step's layer jobs have ended before its heads run: each
    layer's forward waited for its update)."""
    layer_groups = {IN_FLIGHT, LAYER_SUMS} | ({AWAITING} if wl.layer_major(plan) else set())
    total = {t: 0 for t in Tier}
    layer_phase = head_phase = 0
    for group, tier, nbytes in placement(plan, shape, wl, timing, gpu):
        total[tier] += nbytes
        layer_phase += nbytes if group in layer_groups else 0
        head_phase += nbytes if group in (HEAD_AWAITING, LAST_LAYER) else 0
    act = activation_bytes(shape, wl, timing)
    total[Tier.DEVICE] += (max(layer_phase + act.layer_work, head_phase + act.head_work)
                           - layer_phase - head_phase - act.work)
    return MemoryPeak(device_bytes=total[Tier.DEVICE], host_bytes=total[Tier.HOST], nvme_bytes=total[Tier.NVME])


@dataclass(frozen=True)
class Estimate:
    link_bytes: dict[str, int]
    """Per step: ssd_read, ssd_write, h2d, d2h."""
    time_s: dict[str, float]
    """Per step, busy time of each resource (RESOURCES)."""
    step_s: float
    """Predicted step time with the plan's overlap."""
    bottleneck: str
    """The lane that sets the step time (a resource, or a sum of resources sharing the CPU); in an
    overlapped step whose forward and backward are set by different lanes, both:
    "<lane> in backward, <lane> in forward"."""
    memory: MemoryPeak
    model_flops: float
    """Model FLOPs per step, 3 x forward, recompute not counted (see ``layer_flops``)."""


def layer_flops(shape: ModelShape, wl: Workload) -> tuple[float, float]:
    """Forward FLOPs of one micro-batch: (one decoder layer, LM head).

    layer = 2 * P * T  (every weight: one multiply-add per token)
          + 4 * b * s^2 * H * d  (attention: Q K^T and scores x V, full square, no causal saving)
    head  = 2 * V * h * T
    """
    layer = 2.0 * shape.layer_numel * wl.tokens + 4.0 * wl.micro_batch * wl.seq_len**2 * shape.n_heads * shape.head_dim
    head = 2.0 * shape.vocab * shape.hidden * wl.tokens
    return layer, head


def estimate(plan: Plan, shape: ModelShape, wl: Workload, profile: HardwareProfile,
             timing: LayerTiming | None = None) -> Estimate:
    """Predict one step. ``timing``: measured layer times replace FLOPs / matmul rate."""
    gpu = profile.h2d_gbps is not None
    links, forward_links = link_bytes(plan, shape, wl, timing, gpu)
    compute = compute_seconds(plan, shape, wl, profile, timing)
    adam_rate = profile.cpu_adam_params_per_s.get(wl.optimizer_impl) or max(profile.cpu_adam_params_per_s.values())
    adam_s = shape.trainable_numel / adam_rate
    time_s = resource_times(links, compute.total_s, compute.recompute_s, adam_s, plan, profile, gpu)
    # ---- the forward's share: the layers' forward and the head's forward and backward (both run
    # before the first job is submitted), its layer loads and the activations it writes (the
    # optimizer's jobs start with the layers' backward, and the next forward waits for the last
    # of them: ``step_time``)
    backward_links = {k: links[k] - forward_links[k] for k in links}
    phases = (resource_times(forward_links, compute.forward_s, 0.0, 0.0, plan, profile, gpu),
              resource_times(backward_links, compute.total_s - compute.forward_s, compute.recompute_s, adam_s,
                             plan, profile, gpu))
    rules = wl.placement(plan, shape, on_gpu=gpu)
    step_s, bottleneck = step_time(rules, shape, wl, profile, time_s, phases, gpu)
    return Estimate(link_bytes=links, time_s=time_s, step_s=step_s, bottleneck=bottleneck,
                    memory=peak_memory(plan, shape, wl, timing, gpu), model_flops=compute.model_flops)


@dataclass(frozen=True)
class ComputeSeconds:
    """One step's compute: all of it (forward + backward + head), the recompute, the forward's
    share (the layers' forward and the head's forward and backward), and its FLOPs."""

    total_s: float
    recompute_s: float
    forward_s: float
    model_flops: float


def compute_seconds(plan: Plan, shape: ModelShape, wl: Workload, profile: HardwareProfile,
                    timing: LayerTiming | None) -> ComputeSeconds:
    """Forward F = L * layer + head, backward = 2 F, recompute = the recomputed layers' forward;
    from the measured layer times where ``timing`` is given, else FLOPs / the matmul rate."""
    L, M = shape.n_layers, wl.grad_accum
    f_layer, f_head = layer_flops(shape, wl)
    model_flops = 3.0 * M * (L * f_layer + f_head)
    n_recomputed = wl.placement(plan, shape).recomputed_layers  # L, or selective: recompute_layers
    if timing is not None:
        return ComputeSeconds(total_s=M * (L * (timing.layer_forward_s + timing.layer_backward_s) + timing.head_s),
                              recompute_s=M * n_recomputed * timing.layer_forward_s,
                              forward_s=M * (L * timing.layer_forward_s + timing.head_s),
                              model_flops=model_flops)
    rate_flops = 1e12 * profile.matmul_tflops.get(wl.compute_dtype, profile.matmul_tflops.get("float32", 0.1))
    return ComputeSeconds(total_s=model_flops / rate_flops, recompute_s=M * n_recomputed * f_layer / rate_flops,
                          forward_s=M * (L * f_layer + 3.0 * f_head) / rate_flops, model_flops=model_flops)


def link_bytes(plan: Plan, shape: ModelShape, wl: Workload, timing: LayerTiming | None,
               gpu: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes each link (``ssd_read``, ``ssd_write``, ``h2d``, ``d2h``) moves in one step, and the
    forward's share of them."""
    rules = wl.placement(plan, shape, on_gpu=gpu)
    links = {"ssd_read": 0, "ssd_write": 0, "h2d": 0, "d2h": 0}
    _add_weight_and_state_bytes(links, plan, shape, wl, rules, gpu)
    _add_gradient_bytes(links, plan, shape, wl, rules, gpu)
    # ---- activation checkpoints: written in forward, read in backward, per layer and micro-batch
    act_traffic = wl.grad_accum * shape.n_layers * activation_bytes(shape, wl, timing).checkpoint \
        if plan.recompute else 0
    if plan.activations == Tier.NVME and plan.recompute:
        links["ssd_write"] += act_traffic
        links["ssd_read"] += act_traffic
    if gpu and plan.activations != Tier.DEVICE and plan.recompute:
        links["d2h"] += act_traffic
        links["h2d"] += act_traffic
    # ---- swapped activations (no recompute, activations: nvme): M * (L - 2) * saved written in
    # forward and read in backward (on a GPU also copied D2H and H2D); the copy into aligned
    # buffers when saved is compute-lane work, not modeled (~1/100 of a layer's forward)
    swapped = swapped_activation_bytes(plan, shape, wl, timing)
    links["ssd_write"] += swapped
    links["ssd_read"] += swapped
    if gpu:
        links["d2h"] += swapped
        links["h2d"] += swapped
    # ---- the forward's share: its layer loads and the activations it writes
    Mw, S = wl.weight_passes(plan), shape.n_layers - len(plan.resident_layers)
    w_layer = shape.streamed_layer_numel * wl.itemsize
    forward_links = {
        "ssd_read": Mw * ssd_layer_loads(plan, shape, rules, forward_only=True) * w_layer,
        "ssd_write": swapped + (act_traffic if plan.activations == Tier.NVME else 0),
        "h2d": Mw * S * w_layer if gpu else 0,
        "d2h": (swapped + (act_traffic if plan.activations != Tier.DEVICE else 0)) if gpu else 0,
    }
    return links, forward_links


def _add_weight_and_state_bytes(links: dict[str, int], plan: Plan, shape: ModelShape, wl: Workload,
                                rules: Placement, gpu: bool) -> None:
    """The layer weights' loads and writes, and the optimizer's state, added to ``links``."""
    w, N, Mw = wl.itemsize, shape.trainable_numel, wl.weight_passes(plan)
    S = shape.n_layers - len(plan.resident_layers)
    K = min(plan.turn_keep, S)
    w_layer = shape.streamed_layer_numel * w  # what a load moves
    # ---- layer weights: per pass, S loads in forward and S - K in backward (the turn layers
    # stay; without recompute backward re-fetches the weights its saved tensors refer to); from
    # the SSD unless they are master weights the plan keeps in RAM (``ssd_layer_loads``)
    if plan.weights == Tier.NVME:
        links["ssd_read"] += Mw * ssd_layer_loads(plan, shape, rules) * w_layer
        if not rules.weights_are_master and not shape.frozen:
            links["ssd_write"] += S * w_layer  # the updated weights of streamed layers, once per step
    if gpu:  # + updated weights of resident units (every trainable one beside a frozen base)
        links["h2d"] += Mw * (2 * S - K) * w_layer + (N - (0 if shape.frozen else S * shape.layer_numel)) * w
    # ---- optimizer: every parameter's master + exp_avg + exp_avg_sq read and written once per
    # step, 3 o bytes each way (those not kept in RAM), less the masters held in memory
    ssd_state = wl.optimizer_bytes_per_param * (N - host_state_numel(plan, shape))
    links["ssd_read"] += ssd_state - masters_in_memory_numel(shape, wl, rules) * wl.state_itemsize
    links["ssd_write"] += ssd_state - masters_on_device_numel(shape, rules) * wl.state_itemsize


def _add_gradient_bytes(links: dict[str, int], plan: Plan, shape: ModelShape, wl: Workload,
                        rules: Placement, gpu: bool) -> None:
    """Gradients, added to ``links``: D2H once per pass (compute dtype; layer-major: a layer's
    sums once, in the state dtype, the embeddings' and head's every micro-batch); kept ones are
    written (Mw - 1 + deferred) times and read as often, o bytes per parameter each."""
    w, N, M, Mw = wl.itemsize, shape.trainable_numel, wl.grad_accum, wl.weight_passes(plan)
    if gpu and rules.layer_sums:  # (+ a tied head's parts, parked in RAM and back, every micro-batch)
        links["d2h"] += (shape.n_layers * shape.layer_trainable_numel * wl.state_itemsize
                         + M * (shape.end_trainable_numel + shape.shared_trainable_numel) * w)
        links["h2d"] += M * shape.shared_trainable_numel * w
    elif gpu:
        links["d2h"] += Mw * N * w
    if wl.grads_kept_by(plan) and plan.grads == Tier.NVME:
        passes = Mw - 1 + int(wl.deferred)
        links["ssd_write"] += passes * wl.grad_bytes_per_param * N
        links["ssd_read"] += passes * wl.grad_bytes_per_param * N
    if rules.layer_sums and plan.grads == Tier.NVME:  # the embeddings' and head's, every micro-batch
        links["ssd_write"] += (M - 1) * shape.end_trainable_numel * wl.grad_bytes_per_param
        links["ssd_read"] += (M - 1) * shape.end_trainable_numel * wl.grad_bytes_per_param


def _state_name(wl: Workload) -> str:
    return "fp32" if wl.state_dtype == "float32" else wl.state_dtype
