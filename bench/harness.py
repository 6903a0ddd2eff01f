"""The suite run: peak rates, one process per engine (monitored), then the report and plots."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch

from bench.hardware import measure_rates
from bench.procmon import TreeMonitor
from bench.report import EngineSummary, format_report, summarize
from bench.suite import Suite, llama_param_count
from bench.workers import EngineRun
from scheduler.trace import RESOURCES, busy_seconds

ENGINE_NAMES = ("offload-train", "offload-train-sync", "pytorch", "zero-infinity")


def default_engines() -> list[str]:
    """Every engine; the synchronous variant of ours only on machines without a GPU, where the
    engine's threads share the CPU cores with the compute (see ``bench.workers.run_native``)."""
    return [e for e in ENGINE_NAMES if e != "offload-train-sync" or not torch.cuda.is_available()]


def machine_line() -> str:
    vm = psutil.virtual_memory()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {psutil.cpu_count()} CPUs, {vm.total / 2**30:.0f} GiB RAM, {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; "
            f"load average at start {psutil.getloadavg()[0]:.1f}")


def run_worker(engine: str, suite: Suite, root: Path, out_dir: Path
               ) -> tuple[EngineRun, TreeMonitor, float]:
    """Runs one engine in a child process; returns its run, the monitor of its process tree
    (peak RSS, disk bytes) and its wall time. Its swap directory is deleted afterwards."""
    swap = root / f"swap-{engine}"
    shutil.rmtree(swap, ignore_errors=True)
    swap.mkdir(parents=True)
    result = out_dir / f"run-{engine}.json"
    cmd = [sys.executable, "-m", "bench", "worker", "--engine", engine, "--suite", suite.name,
           "--swap", str(swap), "--out", str(result)]
    if engine.startswith("offload-train"):
        from bench.workers import native_plan_dict
        from offload.hostmem import tune_malloc

        # the layer probe runs here: with the allocator settings of the engines it predicts
        tune_malloc()
        # planned here, not in the measured worker (the layer probe builds a small model)
        plan_path = out_dir / f"plan-{engine}.json"
        plan_path.write_text(json.dumps(native_plan_dict(suite, engine == "offload-train", swap), indent=2))
        cmd += ["--trace", str(out_dir / trace_name(engine)), "--plan", str(plan_path)]
    print(f"== {engine}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd)
    try:
        with TreeMonitor(proc.pid) as monitor:
            rc = proc.wait()
    finally:
        shutil.rmtree(swap, ignore_errors=True)
    wall_s = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the {engine} worker failed (exit status {rc}); its output is above")
    return EngineRun.from_json(result.read_text()), monitor, wall_s


def run_suite(suite: Suite, root: Path, out_dir: Path, engines: list[str], plots: bool = True) -> int:
    unknown = sorted(set(engines) - set(ENGINE_NAMES))
    if unknown:
        print(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINE_NAMES)}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    print(f"suite {suite.name}: measuring fio at {root} and matmul throughput", flush=True)
    rates = measure_rates(root, suite.fio_size_bytes, "cuda" if torch.cuda.is_available() else "cpu")
    runs: dict[str, EngineRun] = {}
    summaries: list[EngineSummary] = []
    failed: list[str] = []
    for engine in engines:
        try:
            run, monitor, wall_s = run_worker(engine, suite, root, out_dir)
        except RuntimeError as err:  # one engine's failure (a missing op, a crash): the others still run
            print(f"{err}; going on without it", file=sys.stderr, flush=True)
            failed.append(f"{engine} failed: {err}")
            continue
        runs[engine] = run
        summaries.append(summarize(run, suite, rates, monitor.peak_rss_bytes, wall_s,
                                   (monitor.read_bytes, monitor.write_bytes)))
    if not summaries:
        print(f"suite {suite.name}: every engine failed, no report", file=sys.stderr)
        return 1
    n_params = llama_param_count(suite)
    notes = failed + sorted({n for r in runs.values() for n in r.notes if not n.startswith("plan of")})
    notes += [n for r in runs.values() for n in r.notes if n.startswith("plan of")]
    notes.append("glibc malloc tuned identically in every engine process (offload.hostmem.tune_malloc: "
                 "1 MiB mmap threshold, 2 MiB trim threshold, 2 arenas)")
    header = {"Command": f"python -m bench run --suite {suite.name} --path {root}",
              "Date": f"{started} (took {time.perf_counter() - t_start:.0f} s)",
              "Machine": (f"{machine}, at the end {psutil.getloadavg()[0]:.1f} "
                          f"({psutil.cpu_count()} = every core busy)")}
    timelines = {e: _traced_busy(out_dir / trace_name(e)) for e in runs if (out_dir / trace_name(e)).exists()}
    report = format_report(suite, n_params, rates, summaries, header, notes, timelines)
    (out_dir / "report.md").write_text(report)
    (out_dir / "results.json").write_text(json.dumps({
        "suite": suite.to_dict(), "n_params": n_params, "rates": rates.__dict__, "header": header,
        "engines": [s.to_dict() for s in summaries]}, indent=1))
    if plots:
        _plots(out_dir, summaries)
    print(report)
    print(f"report, results.json, trace and plots in {out_dir}")
    return 1 if failed else 0


def trace_name(engine: str) -> str:
    return "trace.json" if engine == "offload-train" else f"trace-{engine}.json"


def _traced_busy(trace: Path) -> tuple[dict[str, float], float]:
    """Busy seconds per resource in the trace, and the traced span (first start to last end)."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    if not events:
        return {}, 0.0
    span_s = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e6
    busy = busy_seconds(events)
    return {r: busy[r] for r in RESOURCES if r in busy}, span_s


def _plots(out_dir: Path, summaries: list[EngineSummary]) -> None:
    from bench.plots import plot_losses, plot_timeline  # imports matplotlib only when plotting

    try:
        plot_losses({s.engine: s.losses for s in summaries}, out_dir / "losses.png")
        for s in summaries:
            trace = out_dir / trace_name(s.engine)
            if trace.exists():
                png = trace.name.replace("trace", "timeline").replace(".json", ".png")
                plot_timeline(json.loads(trace.read_text()), out_dir / png, s.engine)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[bench])")

