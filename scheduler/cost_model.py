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
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.io.base import align_up
from offload.tiers import Tier
from scheduler.model_shape import ModelShape
from scheduler.placement import (
    ITEMSIZE,
    PINNED_CHECKPOINT_COPIES,
    STAGING_ROWS,
    STAGING_SETS,
    SWAPPED_LAYERS_IN_MEMORY,
    Placement,
    grads_kept,
)
from scheduler.plan import Plan
from scheduler.profile import HardwareProfile

IN_FLIGHT = "layer weights in flight"
LAYER_SUMS = "a layer's gradient sums"
AWAITING = "gradients awaiting the optimizer"
HEAD_AWAITING = "head gradients awaiting the optimizer"
LAST_LAYER = "last layer kept through the heads"
WORKING_MEMORY = "working memory"
STAGING_ARRAYS = STAGING_SETS * len(STAGING_ROWS)  # optimizer worker: chunk-wide state-dtype arrays
EXTENT_ALIGN_BYTES = 4096
RESOURCES = ("compute", "recompute", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_adam", "checksum", "io_cpu")


@dataclass(frozen=True)
class Workload:
    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    compute_dtype: str = "float32"
    state_dtype: str = "float32"
    """Master weights, Adam states and kept gradients: float32, or bfloat16 with a bfloat16
    compute dtype (pure bf16 training)."""
    deferred: bool = False
    """Updates wait for the whole step's gradients (clipping, fp16 loss scaling, nan skip)."""
    optimizer_impl: str = "torch"
    checkpoint_versions: int = 0
    """Versions of the optimizer state that checkpoints keep on the SSD (copy-on-write snapshots:
    a kept checkpoint pins one full version while training writes the next)."""

    def __post_init__(self) -> None:
        if self.checkpoint_versions < 0:
            raise ValueError(f"checkpoint_versions must be >= 0: {self}")
        if min(self.micro_batch, self.seq_len, self.grad_accum) < 1:
            raise ValueError(f"workload needs positive batch, sequence length and accumulation: {self}")
        if self.compute_dtype not in ITEMSIZE:
            raise ValueError(f"compute_dtype must be one of {sorted(ITEMSIZE)}, not {self.compute_dtype!r}")
        if self.state_dtype not in ("float32", self.compute_dtype) or self.state_dtype == "float16":
            raise ValueError(f"state_dtype must be float32 or the bfloat16 compute dtype: {self}")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.compute_dtype]

    @property
    def state_itemsize(self) -> int:
        return ITEMSIZE[self.state_dtype]

    @property
    def optimizer_bytes_per_param(self) -> int:
        """Master + exp_avg + exp_avg_sq: 3 o (12 B mixed precision, 6 B pure bf16)."""
        return 3 * self.state_itemsize

    @property
    def grad_bytes_per_param(self) -> int:
        """Gradients kept between micro-batches or until a deferred update: o."""
        return self.state_itemsize

    def grads_kept_by(self, plan: Plan) -> bool:
        return grads_kept(self.grad_accum, self.deferred, plan.layer_major)

    def layer_major(self, plan: Plan) -> bool:
        """The step runs its micro-batches layer by layer (the executor's test: M > 1)."""
        return plan.layer_major and self.grad_accum > 1

    def weight_passes(self, plan: Plan) -> int:
        """Mw: how often a step streams the layers and hands gradients to the optimizer."""
        return 1 if self.layer_major(plan) else self.grad_accum

    def placement(self, plan: Plan, shape: ModelShape, on_gpu: bool = False) -> Placement:
        """The executor's placement rules for this workload under ``plan``."""
        return Placement(plan, shape.n_layers, self.compute_dtype, self.state_dtype, self.grads_kept_by(plan), on_gpu,
                         layer_sums=self.layer_major(plan))


def host_state_numel(plan: Plan, shape: ModelShape) -> int:
    """Trainable parameters whose master + Adam states live in RAM: all (``optimizer: host``), or
    those of the first ``plan.optimizer_host_units`` units."""
    if plan.optimizer == Tier.HOST:
        return shape.trainable_numel
    return shape.first_units_trainable_numel(plan.optimizer_host_units)


def ssd_layer_loads(plan: Plan, shape: ModelShape, rules: Placement, forward_only: bool = False) -> int:
    """Layer loads per pass that read the SSD: S in forward, S - K in backward (streamed layers
    R..L-1, turn layers the last K), less those whose weights are master weights kept in RAM;
    ``forward_only``: the forward's."""
    L, R = shape.n_layers, len(plan.resident_layers)
    K = min(plan.turn_keep, L - R)
    if plan.weights != Tier.NVME:
        return 0
    in_ram = set()
    if rules.weights_are_master and not shape.frozen:  # a layer's master lives where its unit's state does
        in_ram = {i for i in range(R, L) if rules.optimizer_tier(i + 1) == Tier.HOST}
    forward = [i for i in range(R, L) if i not in in_ram]
    backward = [i for i in range(R, L - K) if i not in in_ram]
    return len(forward) + (0 if forward_only else len(backward))


def lent_master_layers(shape: ModelShape, wl: Workload, rules: Placement) -> int:
    """Layers whose update takes the master from the weights loaded for their backward
    (``Placement.master_from_loads``): no SSD read of their master."""
    if shape.frozen:  # trainable weights beside a frozen base stay on DEVICE: nothing is loaded
        return 0
    return sum(1 for i in range(shape.n_layers) if rules.master_from_loads(i + 1, immediate=not wl.deferred))


def kept_grad_numel(shape: ModelShape, rules: Placement) -> int:
    """Trainable parameters whose gradient the grads tier keeps (``Placement.keeps_grad``): all,
    or with layer-major accumulation those of the embeddings and head."""
    if rules.grads_kept:
        return shape.trainable_numel
    return shape.end_trainable_numel if rules.layer_sums else 0


def masters_on_device_numel(shape: ModelShape, rules: Placement) -> int:
    """Trainable parameters of the units whose DEVICE-resident weights hold their master
    (``Placement.master_on_device``): their updates neither read nor write it on the SSD."""
    L = shape.n_layers
    pre, layer = shape.pre_trainable_numel, shape.layer_trainable_numel
    per_unit = [pre, *[layer] * L, shape.trainable_numel - pre - L * layer]
    return sum(n for i, n in enumerate(per_unit) if n and rules.master_on_device(i, shape.frozen))


def masters_in_memory_numel(shape: ModelShape, wl: Workload, rules: Placement) -> int:
    """Trainable parameters whose update copies the master from memory instead of reading it
    from the SSD: the layers lent their loaded weights (``lent_master_layers``) and the units
    whose DEVICE-resident weights hold it (``masters_on_device_numel``)."""
    return lent_master_layers(shape, wl, rules) * shape.layer_numel + masters_on_device_numel(shape, rules)


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
    # (GPU: the swapped ones pass through page-locked host buffers, kept for reuse)
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
    w, L, M, N = wl.itemsize, shape.n_layers, wl.grad_accum, shape.trainable_numel
    R = len(plan.resident_layers)
    S = L - R
    K = min(plan.turn_keep, S)
    w_layer = shape.streamed_layer_numel * w  # what a load moves
    act = activation_bytes(shape, wl, timing)

    # ---- compute: forward F = L * layer + head; backward = 2 F; recompute = L * layer
    f_layer, f_head = layer_flops(shape, wl)
    model_flops = 3.0 * M * (L * f_layer + f_head)
    n_recomputed = wl.placement(plan, shape).recomputed_layers  # L, or selective: recompute_layers
    recompute_flops = M * n_recomputed * f_layer
    rate_flops = 1e12 * profile.matmul_tflops.get(wl.compute_dtype, profile.matmul_tflops.get("float32", 0.1))

    ssd_read = ssd_write = h2d = d2h = 0
    Mw = wl.weight_passes(plan)
    rules = wl.placement(plan, shape, on_gpu=gpu)
    # ---- layer weights: per pass, S loads in forward and S - K in backward (the turn layers
    # stay; without recompute backward re-fetches the weights its saved tensors refer to); from
    # the SSD unless they are master weights the plan keeps in RAM (``ssd_layer_loads``)
    loads = Mw * (2 * S - K) * w_layer
    if plan.weights == Tier.NVME:
        ssd_read += Mw * ssd_layer_loads(plan, shape, rules) * w_layer
        if not rules.weights_are_master and not shape.frozen:
            ssd_write += S * w_layer  # the updated weights of streamed layers, once per step
    if gpu:  # + updated weights of resident units (every trainable one beside a frozen base)
        h2d += loads + (N - (0 if shape.frozen else S * shape.layer_numel)) * w
    # ---- optimizer: every parameter's master + exp_avg + exp_avg_sq read and written once per
    # step, 3 o bytes each way (those not kept in RAM), less the masters held in memory
    ssd_state = wl.optimizer_bytes_per_param * (N - host_state_numel(plan, shape))
    ssd_read += ssd_state - masters_in_memory_numel(shape, wl, rules) * wl.state_itemsize
    ssd_write += ssd_state - masters_on_device_numel(shape, rules) * wl.state_itemsize
    # ---- gradients: D2H once per pass (compute dtype; layer-major: a layer's sums once, in the
    # state dtype, the embeddings' and head's every micro-batch); kept ones are written
    # (Mw - 1 + deferred) times and read as often, o bytes per parameter each
    if gpu and rules.layer_sums:  # (+ a tied head's parts, parked in RAM and back, every micro-batch)
        d2h += (L * shape.layer_trainable_numel * wl.state_itemsize
                + M * (shape.end_trainable_numel + shape.shared_trainable_numel) * w)
        h2d += M * shape.shared_trainable_numel * w
    elif gpu:
        d2h += Mw * N * w
    if wl.grads_kept_by(plan) and plan.grads == Tier.NVME:
        passes = Mw - 1 + int(wl.deferred)
        ssd_write += passes * wl.grad_bytes_per_param * N
        ssd_read += passes * wl.grad_bytes_per_param * N
    if rules.layer_sums and plan.grads == Tier.NVME:  # the embeddings' and head's, every micro-batch
        ssd_write += (M - 1) * shape.end_trainable_numel * wl.grad_bytes_per_param
        ssd_read += (M - 1) * shape.end_trainable_numel * wl.grad_bytes_per_param
    # ---- activation checkpoints: written in forward, read in backward, per layer and micro-batch
    act_traffic = M * L * act.checkpoint if plan.recompute else 0
    if plan.activations == Tier.NVME and plan.recompute:
        ssd_write += act_traffic
        ssd_read += act_traffic
    if gpu and plan.activations != Tier.DEVICE and plan.recompute:
        d2h += act_traffic
        h2d += act_traffic
    # ---- swapped activations (no recompute, activations: nvme): M * (L - 2) * saved written in
    # forward and read in backward (on a GPU also copied D2H and H2D); the copy into aligned
    # buffers when saved is compute-lane work, not modeled (~1/100 of a layer's forward)
    swapped = swapped_activation_bytes(plan, shape, wl, timing)
    ssd_write += swapped
    ssd_read += swapped
    if gpu:
        d2h += swapped
        h2d += swapped

    adam_rate = profile.cpu_adam_params_per_s.get(wl.optimizer_impl) or max(profile.cpu_adam_params_per_s.values())
    if timing is not None:
        # compute = M * (L * (forward + backward) + head); recompute = M * (recomputed layers) * forward
        compute_s = M * (L * (timing.layer_forward_s + timing.layer_backward_s) + timing.head_s)
        recompute_s = M * n_recomputed * timing.layer_forward_s
        forward_s = M * (L * timing.layer_forward_s + timing.head_s)
    else:
        compute_s, recompute_s = model_flops / rate_flops, recompute_flops / rate_flops
        forward_s = M * (L * f_layer + 3.0 * f_head) / rate_flops
    links = {"ssd_read": ssd_read, "ssd_write": ssd_write, "h2d": h2d, "d2h": d2h}
    adam_s = N / adam_rate
    time_s = _resource_times(links, compute_s, recompute_s, adam_s, plan, profile, gpu)
    # ---- the forward's share: the layers' forward and the head's forward and backward (both run
    # before the first job is submitted), its layer loads and the activations it writes (the
    # optimizer's jobs start with the layers' backward, and the next forward waits for the last
    # of them: ``_step_time``)
    forward_links = {
        "ssd_read": Mw * ssd_layer_loads(plan, shape, rules, forward_only=True) * w_layer,
        "ssd_write": swapped + (act_traffic if plan.activations == Tier.NVME else 0),
        "h2d": Mw * S * w_layer if gpu else 0,
        "d2h": (swapped + (act_traffic if plan.activations != Tier.DEVICE else 0)) if gpu else 0,
    }
    backward_links = {k: links[k] - forward_links[k] for k in links}
    phases = (_resource_times(forward_links, forward_s, 0.0, 0.0, plan, profile, gpu),
              _resource_times(backward_links, compute_s - forward_s, recompute_s, adam_s, plan, profile, gpu))
    step_s, bottleneck = _step_time(rules, shape, wl, profile, time_s, phases, gpu)
    return Estimate(link_bytes=links, time_s=time_s, step_s=step_s, bottleneck=bottleneck,
                    memory=peak_memory(plan, shape, wl, timing, gpu), model_flops=model_flops)


def _resource_times(links: dict[str, int], compute_s: float, recompute_s: float, adam_s: float, plan: Plan,
                    profile: HardwareProfile, gpu: bool) -> dict[str, float]:
    """Busy seconds of each resource (``RESOURCES``) for the bytes ``links`` moves and the given
    compute, recompute and Adam seconds."""
    moved_bytes = links["ssd_read"] + links["ssd_write"]
    ssd_read_s, ssd_write_s = ssd_busy_s(links["ssd_read"], links["ssd_write"], *_lane_ssd_gbps(plan, profile, gpu))
    return {
        "compute": compute_s,
        "recompute": recompute_s,
        "h2d": links["h2d"] / (profile.h2d_gbps * 1e9) if gpu and profile.h2d_gbps else 0.0,
        "d2h": links["d2h"] / (profile.d2h_gbps * 1e9) if gpu and profile.d2h_gbps else 0.0,
        "ssd_read": ssd_read_s,
        "ssd_write": ssd_write_s,
        "cpu_adam": adam_s,
        # checksum (xxh3_64) of every byte the store reads or writes, on the CPU
        "checksum": moved_bytes / (profile.checksum_gbps * 1e9) if profile.checksum_gbps else 0.0,
        # CPU only: compute lost to the store's threads moving these bytes (checksums included)
        "io_cpu": moved_bytes / 1e9 * profile.io_compute_s_per_gb if not gpu and profile.io_compute_s_per_gb else 0.0,
    }


GPU_LANES: dict[str, tuple[str, ...]] = {
    "compute": ("compute", "recompute"),  # the compute stream
    "h2d": ("h2d",),  # the copy and publish streams (weight loads, resident units' new weights)
    "d2h": ("d2h",),  # the worker's and the activations' D2H streams: one PCIe direction
    "ssd (read + write)": ("ssd_read", "ssd_write"),  # one device
    "cpu_adam": ("cpu_adam", "checksum"),  # the optimizer worker and the I/O threads, on the CPU
}
"""Overlapped mode on a GPU machine: lanes that run concurrently (within a phase, the forward or
the backward, the longest sets its time: ``_step_time``),
each the resources that add up on one engine. ``tests/test_trace.py`` and ``tests/test_gpu.py``
check against a traced step that the executor runs the lanes concurrently."""
CPU_LANES: dict[str, tuple[str, ...]] = {
    # the device is the CPU: compute, Adam and the store's threads share its cores
    "cpu (compute + adam)": ("compute", "recompute", "cpu_adam", "checksum", "io_cpu"),
    "ssd (read + write)": ("ssd_read", "ssd_write"),
}
"""Overlapped mode on a CPU-only machine (see ``GPU_LANES``)."""
SSD_LANE = "ssd (read + write)"
_SHARED_COST = ("checksum", "io_cpu")
"""``io_cpu`` is measured with the checksums included: a lane holding both counts the larger."""


def lane_resources(gpu: bool) -> dict[str, tuple[str, ...]]:
    return GPU_LANES if gpu else CPU_LANES


def lane_times(t: dict[str, float], gpu: bool) -> dict[str, float]:
    """Busy seconds per lane from busy seconds per resource."""
    times = {}
    for lane, resources in lane_resources(gpu).items():
        shared = [t[r] for r in resources if r in _SHARED_COST]
        times[lane] = sum(t[r] for r in resources if r not in _SHARED_COST) + max(shared, default=0.0)
    return times


def _step_time(rules: Placement, shape: ModelShape, wl: Workload, profile: HardwareProfile,
               t: dict[str, float], phases: tuple[dict[str, float], dict[str, float]],
               gpu: bool) -> tuple[float, str]:
    """Step time from busy times (``t``: the step's; ``phases``: its forward's and backward's).

    overlap off:  step = sum of every resource's time (one thing at a time; io_cpu includes the
                  checksums, counted once).
    overlap on:   resources run concurrently in lanes, within each phase: the optimizer's jobs
                  start with the backward (a unit's gradients are its backward's), and the next
                  forward waits for the last of them (updated last, needed first), so the
                  backward's lanes hold the optimizer's work and the forward's only its loads
                  and activation writes (and the head's compute, forward and backward, which
                  runs before the first job): step = max(forward lane) + max(backward lane),
                  with a phase's exposed I/O after each lane but the one that moves it (the SSD,
                  or H2D for a first layer loaded from RAM) (deferred updates: max(lane) over
                  the whole step + exposed, see below), where
      GPU machine: lanes (``GPU_LANES``) gpu = compute + recompute, h2d, d2h, ssd = read +
                   write (``ssd_busy_s``: paired at the mixed rate), cpu = adam + checksum;
      CPU only:    (``CPU_LANES``) the device is the CPU, so compute, Adam and the store's
                   threads share its cores: cpu = compute + recompute + adam + max(checksum, io_cpu), where
                   io_cpu = the compute the profile saw lost per GB moved (checksums included)
                   x the bytes moved; ssd = read + write (``ssd_busy_s``) at the rate the
                   profile saw the store keep beside a compute kernel;
      exposed = the first streamed layer's load at the start of each pass (Mw; nothing to
                hide it behind; the forward's; at the SSD's read rate, or H2D's from RAM) + the
                update I/O of ``pre`` after backward (updated last, needed first; the
                backward's), at the SSD's rates alone (nothing computes meanwhile).
      Deferred updates (clipping, fp16, nan skip): the optimizer pass cannot overlap backward,
      only the next forward: step >= max(forward, optimizer) + backward + recompute, with
      forward = compute / 3 and optimizer = max(Adam (+ checksums on a GPU machine), ssd lane).
    """
    plan = rules.plan
    if not plan.overlap:  # (io_cpu includes the checksums: counted once)
        return sum(t.values()) - min(t["checksum"], t["io_cpu"]), "serial (overlap off)"
    first_load_s, first_load_lane, pre_update_s = _exposed_s(rules, shape, wl, profile)
    # (one job slot adds nothing here: backward queues unit u - 1's compute before it waits for
    # unit u's job, and the worker runs one job at a time whatever the slots, so a unit takes
    # max(its backward, the job before it) either way; measured on a CPU, where the wait even
    # stops the compute: 2.97 against 2.91 s/step, bench/RESULTS.md)
    if not wl.deferred:  # the lane moving a phase's exposed I/O holds it already; the others wait for it
        forward = _with_exposed(lane_times(phases[0], gpu), first_load_s, first_load_lane)
        backward = _with_exposed(lane_times(phases[1], gpu), pre_update_s, SSD_LANE)
        forward_lane, backward_lane = (max(lanes, key=lambda k: lanes[k]) for lanes in (forward, backward))
        bottleneck = (backward_lane if backward_lane == forward_lane
                      else f"{backward_lane} in backward, {forward_lane} in forward")
        return max(forward.values()) + max(backward.values()), bottleneck
    lanes = lane_times(t, gpu)
    ssd = lanes[SSD_LANE]
    bottleneck = max(lanes, key=lambda k: lanes[k])
    step = lanes[bottleneck]
    forward_s = t["compute"] / 3
    # a frozen base streams during forward and backward: the optimizer pass moves only the
    # adapters' state and kept gradients
    optimizer_ssd_s = _optimizer_ssd_s(rules, shape, wl, profile, gpu) if shape.frozen else ssd
    optimizer_s = max(lanes["cpu_adam"] if gpu else t["cpu_adam"], optimizer_ssd_s)
    serial = max(forward_s, optimizer_s) + 2 * forward_s + t["recompute"]
    if serial > step:
        step, bottleneck = serial, "deferred optimizer (cpu_adam + ssd after backward)"
    return step + first_load_s + pre_update_s, bottleneck


def _with_exposed(lanes: dict[str, float], exposed_s: float, carrier: str) -> dict[str, float]:
    """A phase's lanes with ``exposed_s`` (I/O that nothing hides) after every lane but ``carrier``,
    the one that moves it."""
    return {k: v + (0.0 if k == carrier else exposed_s) for k, v in lanes.items()}


def _exposed_s(rules: Placement, shape: ModelShape, wl: Workload,
               profile: HardwareProfile) -> tuple[float, str, float]:
    """(the first streamed layer's loads, one per pass, before anything computes, and the lane that
    moves them; ``pre``'s update I/O after the backward: updated last, needed first), each at its
    link's rate alone."""
    plan = rules.plan
    first_load_s = pre_update_s = 0.0
    first_load_lane = SSD_LANE
    w_layer = shape.streamed_layer_numel * wl.itemsize
    if shape.n_layers > len(plan.resident_layers) and 0 not in plan.resident_layers:
        from_ssd = plan.weights == Tier.NVME and not (
            rules.weights_are_master and not shape.frozen and rules.optimizer_tier(1) == Tier.HOST)
        rate = profile.ssd_read_gbps if from_ssd else (profile.h2d_gbps or 0.0)
        first_load_lane = SSD_LANE if from_ssd else "h2d"
        if rate > 0:
            first_load_s = wl.weight_passes(plan) * w_layer / (rate * 1e9)
    if rules.optimizer_tier(0) == Tier.NVME:
        # (without its master when its resident weights hold it: neither read nor written)
        moved_bytes = wl.optimizer_bytes_per_param - (wl.state_itemsize if rules.master_on_device(0, shape.frozen) else 0)
        pre_update_s = _ssd_s(shape.pre_trainable_numel * moved_bytes, shape.pre_trainable_numel * moved_bytes, profile)
    return first_load_s, first_load_lane, pre_update_s


def _optimizer_ssd_s(rules: Placement, shape: ModelShape, wl: Workload, profile: HardwareProfile,
                     gpu: bool) -> float:
    """SSD time of a deferred optimizer pass alone: master + Adam states read (less the masters
    in memory) and written, the kept gradients read (trainable parameters only)."""
    plan, n = rules.plan, shape.trainable_numel
    state = wl.optimizer_bytes_per_param * (n - host_state_numel(plan, shape))
    read = state - masters_in_memory_numel(shape, wl, rules) * wl.state_itemsize
    read += wl.grad_bytes_per_param * n if plan.grads == Tier.NVME else 0
    write = state - masters_on_device_numel(shape, rules) * wl.state_itemsize
    return sum(ssd_busy_s(read, write, *_lane_ssd_gbps(plan, profile, gpu)))  # beside the next forward


def ssd_busy_s(read_bytes: float, write_bytes: float, read_gbps: float, write_gbps: float,
               mixed_gbps: float | None) -> tuple[float, float]:
    """Seconds the SSD spends on a step's reads and on its writes (one device serves both).

    With a mixed rate (reading and writing at once, both directions together): as many bytes as
    both directions move pair up at that rate, half of their time each, and the rest go alone at
    the read or write rate; without one, each direction at its own rate, one after the other.
    The engine's reads and writes are concurrent (the optimizer reads chunk c + 1 while chunk c
    is written back), so the mixed rate is what a step gets, even where the disk serves them
    slower together than one after the other."""
    if mixed_gbps is None:
        return read_bytes / (read_gbps * 1e9), write_bytes / (write_gbps * 1e9)
    paired_bytes = min(read_bytes, write_bytes)
    paired_s = paired_bytes / (mixed_gbps * 1e9)  # each direction's half of 2 x paired bytes
    return (paired_s + (read_bytes - paired_bytes) / (read_gbps * 1e9),
            paired_s + (write_bytes - paired_bytes) / (write_gbps * 1e9))


def _lane_ssd_gbps(plan: Plan, profile: HardwareProfile, gpu: bool) -> tuple[float, float, float | None]:
    """(read, write, mixed) GB/s of the SSD lane. CPU only, overlapped: the optimizer's I/O runs
    beside the compute, whose cores the store's threads wait for: the mixed rate is the one the
    profile measured so (``ssd_beside_compute_gbps``), the read and write rates scaled alike
    (never faster than the disk alone: a higher rate beside compute is noise)."""
    read, write, mixed = profile.ssd_read_gbps, profile.ssd_write_gbps, profile.ssd_mixed_gbps
    beside = profile.ssd_beside_compute_gbps
    if gpu or not plan.overlap or beside is None or mixed is None:
        return read, write, mixed
    slowdown = min(beside / mixed, 1.0)
    return read * slowdown, write * slowdown, mixed * slowdown


def _ssd_s(read_bytes: float, write_bytes: float, profile: HardwareProfile) -> float:
    """The SSD alone (nothing computes meanwhile: the exposed loads and updates at a step's start)."""
    return sum(ssd_busy_s(read_bytes, write_bytes, profile.ssd_read_gbps, profile.ssd_write_gbps,
                          profile.ssd_mixed_gbps))


def _state_name(wl: Workload) -> str:
    return "fp32" if wl.state_dtype == "float32" else wl.state_dtype
