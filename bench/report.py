"""Per-engine figures from the raw runs, and the Markdown report (pure functions)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from bench.bound import PeakRates, StepBound, step_bound
from bench.flops import FORMULA, step_flops, tflops
from bench.suite import Suite
from bench.workers import EngineRun

BASELINE = "pytorch"
OURS = "offload-train"


@dataclass(frozen=True)
class EngineSummary:
    engine: str
    median_step_s: float  # steps 1.. (step 0 is warm-up)
    median_cpu_s: float  # CPU seconds (user + system, all threads) per step: robust to a busy machine
    tokens_per_s: float
    model_tflops: float  # recompute not counted
    hardware_tflops: float  # recompute counted
    peak_gpu_bytes: int | None
    peak_rss_bytes: int  # whole process tree, whole run (start-up and init included)
    ssd_read_bytes: int  # per step, median over steps 1..
    ssd_write_bytes: int
    io_source: str  # "engine counters" or "/proc/<pid>/io"
    bound: StepBound
    losses: list[float]
    init_s: float
    drain_s: float
    wall_s: float  # the engine's process, start to exit
    tree_read_bytes: int = 0  # whole run, /proc/<pid>/io of the process tree
    tree_write_bytes: int = 0

    @property
    def read_gbps(self) -> float:
        return self.ssd_read_bytes / self.median_step_s / 1e9 if self.median_step_s else 0.0

    @property
    def write_gbps(self) -> float:
        return self.ssd_write_bytes / self.median_step_s / 1e9 if self.median_step_s else 0.0

    @property
    def efficiency(self) -> float:
        return self.bound.efficiency(self.median_step_s)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["bound"] = {**asdict(self.bound), "bound_s": self.bound.bound_s, "limiter": self.bound.limiter}
        d.update(read_gbps=self.read_gbps, write_gbps=self.write_gbps, efficiency=self.efficiency)
        return d


def _steady(values: list[float] | list[int]) -> list[float]:
    """Steps 1.. when there are at least two steps (step 0 warms caches and allocators)."""
    return [float(v) for v in (values[1:] if len(values) > 1 else values)]


def summarize(run: EngineRun, suite: Suite, rates: PeakRates, peak_rss_bytes: int, wall_s: float,
              tree_io_bytes: tuple[int, int] = (0, 0)) -> EngineSummary:
    step_s = statistics.median(_steady(run.step_times_s))
    flops = step_flops(suite.hidden, suite.intermediate, suite.layers, suite.vocab, suite.seq_len,
                       suite.tokens_per_step, run.recompute)
    if run.engine_read_bytes is not None and run.engine_write_bytes is not None:
        reads, writes, source = run.engine_read_bytes, run.engine_write_bytes, "engine counters"
    else:
        reads, writes, source = run.proc_read_bytes, run.proc_write_bytes, "/proc/<pid>/io"
    read_b = int(statistics.median(_steady(reads)))
    write_b = int(statistics.median(_steady(writes)))
    return EngineSummary(
        engine=run.engine, median_step_s=step_s,
        median_cpu_s=statistics.median(_steady(run.step_cpu_s)) if run.step_cpu_s else 0.0, tokens_per_s=suite.tokens_per_step / step_s,
        model_tflops=tflops(flops.model_flops, step_s), hardware_tflops=tflops(flops.hardware_flops, step_s),
        peak_gpu_bytes=run.peak_gpu_bytes, peak_rss_bytes=peak_rss_bytes, ssd_read_bytes=read_b,
        ssd_write_bytes=write_b, io_source=source,
        bound=step_bound(flops.model_flops, read_b, write_b, rates), losses=list(run.losses),
        init_s=run.init_s, drain_s=run.drain_s, wall_s=wall_s, tree_read_bytes=tree_io_bytes[0],
        tree_write_bytes=tree_io_bytes[1])


def max_loss_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _mib(n: int | None) -> str:
    return "None" if n is None else f"{n / 2**20:.0f}"


def format_report(suite: Suite, n_params: int, rates: PeakRates, summaries: list[EngineSummary],
                  header: dict[str, str], notes: list[str],
                  timelines: dict[str, tuple[dict[str, float], float]] | None = None) -> str:
    """The Markdown report: header lines, per-engine table, ratios, bound, losses, targets, the
    busy time per resource of each traced step (engine -> (busy seconds per resource, traced
    span in seconds)), notes."""
    state_bytes = 16 * n_params
    budget_bytes = int(state_bytes * suite.ram_budget_share)
    lines = [f"### Suite `{suite.name}`", ""]
    lines += [f"- **{k}:** {v}" for k, v in header.items()]
    lines += [
        f"- **Model:** Llama-shaped, {n_params / 1e6:.1f}M parameters (hidden {suite.hidden}, "
        f"{suite.layers} layers, intermediate {suite.intermediate}, vocab {suite.vocab}, untied), fp32, "
        f"random init (seed 0); batch {suite.batch} x {suite.seq_len} tokens, {suite.steps} steps "
        f"(step 0 is warm-up: medians over steps 1-{suite.steps - 1}); AdamW lr {suite.learning_rate}, "
        f"no weight decay, no clipping.",
        f"- **fp32 training state** (16 bytes/param): {_gb(state_bytes)} GB; offload-train's RAM budget "
        f"(DEVICE + HOST): {_gb(budget_bytes)} GB ({state_bytes / budget_bytes:.1f}x smaller).",
        f"- **Peak rates measured in this run:** {_fio_line(rates)}; fp32 matmul "
        f"(2048^3) {rates.matmul_flops_per_s / 1e9:.0f} GFLOP/s.",
        f"- **FLOPs:** {FORMULA}.",
        "",
        "| engine | median s/step | CPU s/step | tokens/s | model TFLOPS | hw TFLOPS | peak GPU MiB | peak RSS MiB "
        "| SSD read GB/step | SSD write GB/step | read GB/s | write GB/s | bound s (limiter) | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.engine} | {s.median_step_s:.2f} | {s.median_cpu_s:.1f} | {s.tokens_per_s:.0f} | {s.model_tflops:.3f} | "
            f"{s.hardware_tflops:.3f} | {_mib(s.peak_gpu_bytes)} | {_mib(s.peak_rss_bytes)} | "
            f"{_gb(s.ssd_read_bytes)} | {_gb(s.ssd_write_bytes)} | {s.read_gbps:.2f} | {s.write_gbps:.2f} | "
            f"{s.bound.bound_s:.2f} ({s.bound.limiter}) | {s.efficiency:.0%} |")
    lines += ["", "CPU s/step: user + system CPU time of the engine's process over a step (all threads; "
              "less sensitive than wall time to other jobs on the machine, blind to time spent waiting "
              "for the disk). SSD bytes: " + "; ".join(f"{s.engine} from {s.io_source}" for s in summaries)
              + ". Peak RSS: the engine's whole process tree over its whole run (start-up and init "
              "included), sampled every 10 ms. Bound: max(model FLOPs / matmul rate, SSD bytes read / "
              "fio read, SSD bytes written / fio write, SSD bytes read + written / fio reading and writing at "
              "once); efficiency = bound / median step time.", ""]
    lines += ["| engine | start-up + init s | drain after last step s | process wall s | whole-run disk read GB "
              "| whole-run disk write GB |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {s.engine} | {s.init_s:.1f} | {s.drain_s:.2f} | {s.wall_s:.0f} | {_gb(s.tree_read_bytes)} | "
              f"{_gb(s.tree_write_bytes)} |" for s in summaries]
    lines.append("")
    by_name = {s.engine: s for s in summaries}
    ours = by_name.get(OURS)
    if ours is not None:
        lines.append("| ours vs | step time ratio | tokens/s ratio | peak RSS ratio | CPU s/step ratio |")
        lines.append("|---|---:|---:|---:|---:|")
        for s in summaries:
            if s is not ours:
                cpu = f"{ours.median_cpu_s / s.median_cpu_s:.2f}" if s.median_cpu_s else "-"
                lines.append(f"| {s.engine} | {ours.median_step_s / s.median_step_s:.2f} | "
                             f"{ours.tokens_per_s / s.tokens_per_s:.2f} | "
                             f"{ours.peak_rss_bytes / s.peak_rss_bytes:.2f} | {cpu} |")
        lines.append("")
    ref = by_name.get(BASELINE) or summaries[0]
    lines.append("| step | " + " | ".join(s.engine for s in summaries) + " |")
    lines.append("|---:|" + "---:|" * len(summaries))
    for k in range(max(len(s.losses) for s in summaries)):
        lines.append(f"| {k} | " + " | ".join(f"{s.losses[k]:.6f}" if k < len(s.losses) else "-"
                                               for s in summaries) + " |")
    diffs = [f"{s.engine} {max_loss_diff(s.losses, ref.losses):.1e}" for s in summaries if s is not ref]
    lines.append("")
    if diffs:
        lines += [f"Max abs loss difference against {ref.engine}: " + ", ".join(diffs) + ".", ""]
    if ours is not None:
        lines += _targets(ours, by_name, state_bytes)
    for engine, (busy_s, traced_step_s) in (timelines or {}).items():
        if not busy_s or traced_step_s <= 0:
            continue
        lines += [f"{engine}'s traced step (the last, {traced_step_s:.2f} s from its start to the end "
                  f"of its last optimizer update): time each resource was busy (union of its events; "
                  f"SSD events run from submission to completion).", "",
                  "| resource | busy s | share of the step |", "|---|---:|---:|"]
        lines += [f"| {r} | {t:.2f} | {t / traced_step_s:.0%} |" for r, t in busy_s.items()]
        lines.append("")
        if "gpu" in busy_s:
            lines += [f"GPU busy (CUDA events around {engine}'s compute): {busy_s['gpu'] / traced_step_s:.0%} "
                      f"of the step.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _targets(ours: EngineSummary, by_name: dict[str, EngineSummary], state_bytes: int) -> list[str]:
    out = ["Targets:", ""]
    base = by_name.get(BASELINE)
    if base is not None:
        r = ours.median_step_s / base.median_step_s
        out.append(f"- step time <= 1.25x in-memory PyTorch: {r:.2f}x ({'met' if r <= 1.25 else 'missed'})")
    r = ours.peak_rss_bytes / state_bytes
    out.append(f"- peak RSS <= 0.5x fp32 training state: {r:.2f}x ({'met' if r <= 0.5 else 'missed'})")
    zi = by_name.get("zero-infinity")
    if zi is not None:
        r = ours.median_step_s / zi.median_step_s
        out.append(f"- faster than ZeRO-Infinity per step: {r:.2f}x its step time "
                   f"({'met' if r < 1 else 'missed'})")
        if ours.peak_gpu_bytes is not None:  # a GPU run: the GPU check's goal
            out.append(f"- >= 3x ZeRO-Infinity's tokens/s on a GPU: {1 / r:.2f}x ({'met' if 1 / r >= 3 else 'missed'})")
    return [*out, ""]


def _fio_line(rates: PeakRates) -> str:
    if rates.ssd_read_gbps is None or rates.ssd_write_gbps is None:
        return "fio not installed (apt-get install fio): no SSD rates, the bound is compute only"
    mixed = (f", reading and writing at once {rates.ssd_mixed_gbps:.2f} GB/s both together"
             if rates.ssd_mixed_gbps else "")
    return (f"fio sequential O_DIRECT (bs 1M, libaio, iodepth 32, 2 jobs) read {rates.ssd_read_gbps:.2f} GB/s, "
            f"write {rates.ssd_write_gbps:.2f} GB/s{mixed}")
