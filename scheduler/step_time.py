"""The cost model's step time: busy seconds per resource, the lanes that run concurrently, and
how a phase's lanes and its exposed I/O add up to a step (``step_time``).

Pure functions of byte counts, compute seconds and the ``HardwareProfile``; ``scheduler.cost_model``
counts the bytes and calls them. Symbols as there; units: bytes, seconds, GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

from offload.tiers import Tier
from scheduler.model_shape import ModelShape
from scheduler.placement import Placement
from scheduler.plan import Plan
from scheduler.profile import HardwareProfile
from scheduler.workload import (
    Workload,
    host_state_numel,
    masters_in_memory_numel,
    masters_on_device_numel,
)

RESOURCES = ("compute", "recompute", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_adam", "checksum", "io_cpu")


def resource_times(links: dict[str, int], compute_s: float, recompute_s: float, adam_s: float, plan: Plan,
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
the backward, the longest sets its time: ``step_time``),
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


def step_time(rules: Placement, shape: ModelShape, wl: Workload, profile: HardwareProfile,
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
    optimizer_io_s = optimizer_ssd_s(rules, shape, wl, profile, gpu) if shape.frozen else ssd
    optimizer_s = max(lanes["cpu_adam"] if gpu else t["cpu_adam"], optimizer_io_s)
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


def optimizer_ssd_s(rules: Placement, shape: ModelShape, wl: Workload, profile: HardwareProfile,
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
