"""What one optimizer step asks of a plan: the batch, dtypes and update mode (``Workload``), and
the counts of parameters and layer loads that follow from a plan's placement rules.

Shared by the cost model's bytes and memory (``scheduler.cost_model``) and its step time
(``scheduler.step_time``); symbols as in ``scheduler.cost_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.tiers import Tier
from scheduler.model_shape import ModelShape
from scheduler.placement import ITEMSIZE, Placement, grads_kept
from scheduler.plan import Plan


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
    random_forward: bool = False
    """The model draws random numbers in its training forward (dropout): micro-batch order only,
    since a layer-major step would draw them in another order than in-memory training does."""

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
