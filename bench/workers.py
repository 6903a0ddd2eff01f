"""One engine's training run, in its own process (``python -m bench worker ...``).

Every engine starts from the same weights (``RandomInit`` under seed 0, unit by unit, as the
streaming executor initializes them), trains on the same batches in fp32 with the same AdamW
(lr, betas, eps, no weight decay, no clipping, constant lr), and writes an ``EngineRun`` as JSON.
Step time is the wall time of one optimizer step as the caller sees it; disk bytes per step are
the deltas of /proc/self/io over each step (all threads of the process).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.procmon import own_cpu_s, own_io_bytes
from bench.suite import Suite, llama_config, make_batches

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class EngineRun:
    engine: str
    n_params: int
    losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)  # user + system CPU of the process, per step
    proc_read_bytes: list[int] = field(default_factory=list)  # per step, /proc/self/io
    proc_write_bytes: list[int] = field(default_factory=list)
    engine_read_bytes: list[int] | None = None  # per step, the engine's own counters
    engine_write_bytes: list[int] | None = None
    drain_s: float = 0.0  # waiting, after the last step, for work it left running
    init_s: float = 0.0
    peak_gpu_bytes: int | None = None
    recompute: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineRun:
        return cls(**json.loads(text))


def initial_model(suite: Suite) -> torch.nn.Module:
    """The model with its initial fp32 weights in RAM (what the in-memory engines train)."""
    from scheduler.materialize import RandomInit, empty_model, materialize_in_memory

    torch.manual_seed(0)
    model = empty_model(llama_config(suite))
    return materialize_in_memory(model, RandomInit(model))


def timed_steps(run: EngineRun, suite: Suite, step: Callable[[dict[str, torch.Tensor]], float],
                 counters: Callable[[], tuple[int, int]] | None = None) -> None:
    if counters is not None:
        run.engine_read_bytes, run.engine_write_bytes = [], []
    for batch in make_batches(suite):
        io0, c0 = own_io_bytes(), counters() if counters else (0, 0)
        cpu0, t0 = own_cpu_s(), time.perf_counter()
        loss = step(batch)
        run.step_times_s.append(time.perf_counter() - t0)
        run.step_cpu_s.append(own_cpu_s() - cpu0)
        run.losses.append(loss)
        io1 = own_io_bytes()
        run.proc_read_bytes.append(io1[0] - io0[0])
        run.proc_write_bytes.append(io1[1] - io0[1])
        if counters is not None:
            c1 = counters()
            run.engine_read_bytes.append(c1[0] - c0[0])  # type: ignore[union-attr]
            run.engine_write_bytes.append(c1[1] - c0[1])  # type: ignore[union-attr]
        print(f"  step {len(run.losses) - 1}: loss {loss:.6f}  {run.step_times_s[-1]:.2f} s", flush=True)


def run_pytorch(suite: Suite, swap_dir: Path, trace_path: Path | None) -> EngineRun:
    """Plain in-memory PyTorch: the whole model, its gradients and fused AdamW states in RAM."""
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = initial_model(suite).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=suite.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=0.0, fused=True)
    run = EngineRun("pytorch", sum(p.numel() for p in model.parameters()))
    run.init_s = time.perf_counter() - t0

    def step(batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    timed_steps(run, suite, step)
    if device.type == "cuda":
        run.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return run


def native_plan(suite: Suite, overlap: bool, swap_dir: Path) -> Any:  # noqa: ANN401 - a Plan
    """``native_choice``'s plan."""
    return native_choice(suite, overlap, swap_dir).plan


def native_plan_dict(suite: Suite, overlap: bool, swap_dir: Path) -> dict[str, Any]:
    """``native_choice`` as ``plan.json`` holds it: the plan and, under ``predicted``, the cost
    model's step time and bottleneck."""
    choice = native_choice(suite, overlap, swap_dir)
    return {**choice.plan.to_dict(),
            "predicted": {"step_s": choice.estimate.step_s, "bottleneck": choice.estimate.bottleneck}}


def native_choice(suite: Suite, overlap: bool, swap_dir: Path) -> Any:  # noqa: ANN401 - a PlanChoice
    """The plan ``offload-train train`` would choose: the planner, with DEVICE + HOST budgets
    summing to ``ram_budget_share`` of the fp32 training state (16 bytes per parameter; one RAM
    pool on a CPU-only machine), this machine's profile and a probe of the layer shape.
    ``overlap=False`` is the engine's synchronous mode (same math). Run it outside the measured
    worker: the probe builds a two-layer model."""
    import shutil

    from cli.budgets import probe_budget_bytes
    from scheduler.layer_probe import budget_probe
    from scheduler.model_shape import shape_from_config
    from scheduler.planner import Budgets, choose_plan
    from scheduler.profile import load_or_measure
    from scheduler.workload import Workload

    config = llama_config(suite)
    shape = shape_from_config(config)
    budget = int(16 * shape.total_numel * suite.ram_budget_share)
    device_bytes = int(budget * suite.device_share)
    gpu = torch.cuda.is_available()
    budgets = Budgets(device_bytes, budget - device_bytes, shutil.disk_usage(swap_dir).free, shared=not gpu)
    wl = Workload(micro_batch=suite.batch, seq_len=suite.seq_len)
    profile = load_or_measure(swap_dir, size_bytes=256 << 20)
    device = torch.device("cuda" if gpu else "cpu")
    # what `offload-train train` probes with: the run's budget (the probe runs here, in the
    # harness, before any engine starts)
    timing = budget_probe(config, shape, wl, device, probe_budget_bytes(budgets, device))
    return choose_plan(shape, wl, budgets, profile, overlap=overlap, timing=timing)


def run_native(suite: Suite, swap_dir: Path, trace_path: Path | None, overlap: bool = True,
               name: str = "offload-train", plan_path: Path | None = None) -> EngineRun:
    """offload-train's streaming executor, out of core; traces the last step when asked.

    ``overlap=False`` is the engine's synchronous mode (same math): on a CPU-only box the loader,
    optimizer and I/O threads compete with the compute's OpenMP threads for the same cores, so
    the harness also reports that mode there (engine ``offload-train-sync``)."""
    from offload import AdamWConfig, SwapStore, make_adamw, make_backend
    from scheduler.executor import StreamingExecutor, TrainSettings
    from scheduler.materialize import RandomInit, empty_model
    from scheduler.plan import Plan
    from scheduler.trace import Tracer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = empty_model(llama_config(suite))
    n_params = sum(p.numel() for p in model.parameters())
    saved = json.loads(plan_path.read_text()) if plan_path is not None else native_plan_dict(suite, overlap, swap_dir)
    plan = Plan.from_dict(saved)
    run = EngineRun(name, n_params, recompute=plan.recompute)
    run.notes.append(f"plan of {name}: {json.dumps(plan.to_dict())}")
    if "predicted" in saved:
        p = saved["predicted"]
        run.notes.append(f"predicted by the cost model for {name}: {p['step_s']:.2f} s/step ({p['bottleneck']})")
    tracer = Tracer(enabled=trace_path is not None)
    adamw = make_adamw("torch", AdamWConfig(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0))
    settings = TrainSettings(adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS)
    with contextlib.closing(adamw), SwapStore(swap_dir, make_backend("posix")) as store, StreamingExecutor(
        model, plan, store, adamw, settings, initializer=RandomInit(model), tracer=tracer
    ) as ex:
        run.init_s = time.perf_counter() - t0
        last = suite.steps - 1

        def step(batch: dict[str, torch.Tensor]) -> float:
            if len(run.losses) == last:
                tracer.start()
            return ex.train_step([batch], lr=suite.learning_rate).loss

        def counters() -> tuple[int, int]:
            m = ex.metrics()
            return m["io_read_bytes"], m["io_write_bytes"]

        timed_steps(run, suite, step, counters)
        t_drain = time.perf_counter()
        ex.synchronize()
        run.drain_s = time.perf_counter() - t_drain
        tracer.stop()
        if trace_path is not None:
            tracer.write(trace_path)
        if ex.device.type == "cuda":
            run.peak_gpu_bytes = torch.cuda.max_memory_allocated(ex.device)
    return run


ENGINES: dict[str, Callable[[Suite, Path, Path | None, Path | None], EngineRun]] = {
    "pytorch": lambda suite, swap, trace, plan: run_pytorch(suite, swap, trace),
    "offload-train": lambda suite, swap, trace, plan: run_native(suite, swap, trace, True, "offload-train", plan),
    "offload-train-sync": lambda suite, swap, trace, plan: run_native(suite, swap, trace, False,
                                                                     "offload-train-sync", plan),
}


def run_engine(name: str, suite: Suite, swap_dir: Path, out: Path, trace_path: Path | None,
               plan_path: Path | None = None) -> None:
    from offload.hostmem import tune_malloc

    tune_malloc()  # every engine gets the same allocator settings
    if name == "zero-infinity":
        from bench.zero_infinity import run_zero_infinity

        run = run_zero_infinity(suite, swap_dir, trace_path)
    else:
        run = ENGINES[name](suite, swap_dir, trace_path, plan_path)
    out.write_text(run.to_json())
