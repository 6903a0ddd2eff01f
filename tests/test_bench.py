"""The benchmark harness's pure parts: FLOP formula, lower bound, summaries and the report."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest

from bench.bound import PeakRates, step_bound
from bench.flops import step_flops, tflops
from bench.report import EngineSummary, format_report, max_loss_diff, summarize
from bench.suite import SUITES, Suite, llama_param_count
from bench.workers import EngineRun, native_plan

SUITE = Suite("t", hidden=64, intermediate=128, layers=2, heads=4, vocab=100, batch=2, seq_len=16, steps=3)
RATES = PeakRates(matmul_flops_per_s=1e9, ssd_read_gbps=2.0, ssd_write_gbps=1.0)


def test_flops_match_a_count_by_hand() -> None:
    h, i, n_layers, vocab, s, tokens = 64, 128, 2, 100, 16, 32
    # forward per token: q, k, v, o (4h²) and gate, up, down (3hi) per layer, LM head (hV), all
    # x2 for multiply-add; attention QKᵀ and AV: 2 · 2·s·h per layer
    forward = 2 * (n_layers * (4 * h * h + 3 * h * i) + h * vocab) + n_layers * 4 * s * h
    f = step_flops(h, i, n_layers, vocab, s, tokens, recompute=False)
    assert f.model_flops == f.hardware_flops == 3 * tokens * forward
    r = step_flops(h, i, n_layers, vocab, s, tokens, recompute=True)
    assert r.model_flops == f.model_flops  # recompute is not model work
    assert r.hardware_flops - r.model_flops == tokens * (2 * n_layers * (4 * h * h + 3 * h * i) + n_layers * 4 * s * h)
    assert tflops(2e12, 2.0) == 1.0 and tflops(1.0, 0.0) == 0.0


def test_flops_follow_6_n_t_when_attention_is_small() -> None:
    f = step_flops(4096, 11008, 32, 32000, seq_len=1, tokens=1000, recompute=False)
    matmul_params = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert f.model_flops == pytest.approx(6 * matmul_params * 1000, rel=1e-3)


def test_the_bound_is_the_busiest_resource() -> None:
    b = step_bound(flops=3e9, read_bytes=4e9, write_bytes=1e9, rates=RATES)
    assert (b.compute_s, b.ssd_read_s, b.ssd_write_s) == (3.0, 2.0, 1.0)
    assert b.bound_s == 3.0 and b.limiter == "compute"
    assert b.efficiency(6.0) == 0.5
    io = step_bound(flops=1e9, read_bytes=0, write_bytes=5e9, rates=RATES)
    assert io.limiter == "ssd write" and io.bound_s == 5.0 and io.ssd_read_s == 0.0


def test_a_step_that_reads_and_writes_is_bounded_by_the_mixed_rate() -> None:
    """One device serves both directions (read 2.0, write 1.0, both at once 1.5 GB/s together):
    1 GB read + 1 GB written pair up at the mixed rate (2 GB / 1.5 = 1.33 s, more than either
    alone); a lopsided step pairs what it can and moves the rest alone (2 GB read + 0.5 GB written:
    0.67 s paired + 0.75 s of reads alone), never more than reading all, then writing all; a step
    that only writes, or a run without the mixed rate, is not bounded by it."""
    rates = dataclasses.replace(RATES, ssd_mixed_gbps=1.5)
    b = step_bound(flops=1e9, read_bytes=1e9, write_bytes=1e9, rates=rates)
    assert (b.ssd_read_s, b.ssd_write_s) == (0.5, 1.0)
    assert b.ssd_mixed_s == pytest.approx(2 / 1.5)
    assert b.bound_s == b.ssd_mixed_s and b.limiter == "ssd read + write"
    lopsided = step_bound(flops=1e9, read_bytes=2e9, write_bytes=0.5e9, rates=rates)
    assert lopsided.ssd_mixed_s == pytest.approx(1 / 1.5 + 1.5 / 2.0)
    slow_mix = step_bound(flops=1e9, read_bytes=2e9, write_bytes=0.5e9, rates=dataclasses.replace(RATES, ssd_mixed_gbps=0.5))
    assert slow_mix.ssd_mixed_s == pytest.approx(2.0 / 2.0 + 0.5 / 1.0)  # read all, then write all
    assert step_bound(flops=1e9, read_bytes=0, write_bytes=1e9, rates=rates).ssd_mixed_s == 0.0
    assert step_bound(flops=1e9, read_bytes=2e9, write_bytes=1e9, rates=RATES).bound_s == 1.0


def test_param_count_formula_matches_the_model() -> None:
    from bench.suite import llama_config
    from scheduler.materialize import empty_model

    model = empty_model(llama_config(SUITE))
    assert llama_param_count(SUITE) == sum(p.numel() for p in model.parameters())


def test_quick_suite_state_is_four_times_the_budget(tmp_path) -> None:
    q = SUITES["quick"]
    n = llama_param_count(q)
    plan = native_plan(q, overlap=False, swap_dir=tmp_path)  # the planner's choice, as train makes it
    assert 16 * n >= 4 * (plan.device_budget_bytes + plan.host_budget_bytes)
    assert 2 * 5 * 4 * plan.chunk_numel <= plan.host_budget_bytes  # optimizer staging fits


def _run(engine: str, times: list[float], losses: list[float], engine_io: bool) -> EngineRun:
    run = EngineRun(engine, 1000, losses=losses, step_times_s=times, step_cpu_s=[2 * t for t in times],
                    proc_read_bytes=[5, 7, 9],
                    proc_write_bytes=[1, 1, 1], recompute=engine_io)
    if engine_io:
        run.engine_read_bytes, run.engine_write_bytes = [10**9, 2 * 10**9, 4 * 10**9], [0, 10**9, 10**9]
    return run


def test_summary_uses_steps_after_the_first_and_engine_counters() -> None:
    s = summarize(_run("offload-train", [9.0, 2.0, 4.0], [3.0, 2.0, 1.0], True), SUITE, RATES,
                  peak_rss_bytes=123, wall_s=20.0)
    assert s.median_step_s == 3.0 and s.median_cpu_s == 6.0
    assert s.tokens_per_s == SUITE.tokens_per_step / 3.0
    assert s.ssd_read_bytes == 3 * 10**9 and s.ssd_write_bytes == 10**9 and s.io_source == "engine counters"
    assert s.read_gbps == pytest.approx(1.0)
    assert s.bound.ssd_read_s == 1.5 and s.efficiency == pytest.approx(0.5)
    p = summarize(_run("pytorch", [9.0, 2.0, 4.0], [3.0, 2.0, 1.0], False), SUITE, RATES, 1, 1.0)
    assert p.ssd_read_bytes == 8 and p.io_source == "/proc/<pid>/io"
    assert p.model_tflops == s.model_tflops and p.hardware_tflops < s.hardware_tflops


def test_max_loss_diff() -> None:
    assert max_loss_diff([1.0, 2.0], [1.0, 2.5]) == 0.5
    with pytest.raises(ValueError):
        max_loss_diff([1.0], [1.0, 2.0])


def test_report_has_every_engine_ratios_losses_and_targets() -> None:
    ours = summarize(_run("offload-train", [9.0, 2.0, 2.0], [3.0, 2.0, 1.0], True), SUITE, RATES,
                     peak_rss_bytes=100 * 2**20, wall_s=20.0)
    base = summarize(_run("pytorch", [9.0, 2.0, 2.0], [3.0, 2.0, 1.0], False), SUITE, RATES,
                     peak_rss_bytes=400 * 2**20, wall_s=20.0)
    zi = summarize(_run("zero-infinity", [9.0, 4.0, 4.0], [3.0, 2.0, 1.0 + 1e-6], False), SUITE, RATES,
                   peak_rss_bytes=200 * 2**20, wall_s=20.0)
    summaries: list[EngineSummary] = [ours, base, zi]
    text = format_report(SUITE, 1000, RATES, summaries, {"Command": "python -m bench run --suite t"},
                         ["a workaround"], {"offload-train": ({"compute": 1.5, "ssd_read": 0.5}, 2.0)})
    assert "| offload-train | 2.00 | 4.0 |" in text and "| zero-infinity | 4.00 | 8.0 |" in text
    assert "| pytorch | 1.00 | 1.00 | 0.25 | 1.00 |" in text  # ours vs pytorch: time, tokens/s, RSS, CPU
    assert "| zero-infinity | 0.50 | 2.00 | 0.50 | 0.50 |" in text
    assert "zero-infinity 1.0e-06" in text and "offload-train 0.0e+00" in text
    assert "step time <= 1.25x in-memory PyTorch: 1.00x (met)" in text
    assert "faster than ZeRO-Infinity per step: 0.50x its step time (met)" in text
    assert "| compute | 1.50 | 75% |" in text
    assert "- a workaround" in text and "**Command:** python -m bench run --suite t" in text
    assert "| 2 | 1.000000 | 1.000000 | 1.000001 |" in text


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (.ci/setup installs it)")
def test_fio_measures_reads_writes_and_both_at_once(tmp_path, capsys) -> None:
    """The harness's three fio jobs run and parse (the mixed job reports reads and writes in two
    sections of fio's JSON: both are summed); the data file is removed."""
    from bench.hardware import fio_gbps

    try:
        read_gbps, write_gbps, mixed_gbps = fio_gbps(tmp_path, 32 << 20)
    except subprocess.CalledProcessError as err:  # e.g. a tmpfs refuses O_DIRECT
        pytest.skip(f"fio cannot run O_DIRECT in {tmp_path}: {err.stderr}")
    assert read_gbps > 0 and write_gbps > 0 and mixed_gbps > 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["write", "read", "rw"]
    assert not (tmp_path / "fio-seq.bin").exists()


def test_a_machine_without_fio_gets_a_report_without_the_ssd_bound(tmp_path, monkeypatch, capsys) -> None:
    """No fio: one line says so, the SSD rates are None, the bound is compute alone, the report
    still renders."""
    from bench import hardware

    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    monkeypatch.setattr(hardware, "matmul_flops_per_s", lambda device: 1e9)  # not what is tested: quick
    rates = hardware.measure_rates(tmp_path, 1 << 20)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "fio is not installed" in out
    assert rates.ssd_read_gbps is None and rates.ssd_write_gbps is None and rates.matmul_flops_per_s == 1e9
    s = summarize(_run("offload-train", [9.0, 2.0, 4.0], [3.0, 2.0, 1.0], True), SUITE, rates,
                  peak_rss_bytes=123, wall_s=20.0)
    assert s.bound.ssd_read_s == s.bound.ssd_write_s == 0.0 and s.bound.limiter == "compute"
    text = format_report(SUITE, 1000, rates, [s], {"Command": "c"}, [], {})
    assert "fio not installed" in text


def test_an_engine_that_fails_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys) -> None:
    """A worker that fails (a missing op, a crash) is named in the report's notes and the exit
    status; the engines after it still run and are reported."""
    from bench import harness

    monkeypatch.setattr(harness, "measure_rates", lambda root, size, device: RATES)

    def worker(engine, suite, root, out_dir):
        if engine == "zero-infinity":
            raise RuntimeError("the zero-infinity worker failed (exit status 1); its output is above")
        return _run(engine, [9.0, 2.0, 4.0], [3.0, 2.0, 1.0], engine == "offload-train"), _Monitor(), 20.0

    monkeypatch.setattr(harness, "run_worker", worker)
    out = tmp_path / "report"
    rc = harness.run_suite(SUITE, tmp_path, out, ["zero-infinity", "offload-train", "pytorch"], plots=False)
    assert rc == 1
    text = (out / "report.md").read_text()
    assert "zero-infinity failed: the zero-infinity worker failed (exit status 1)" in text
    assert "| offload-train |" in text and "| pytorch |" in text
    assert "going on without it" in capsys.readouterr().err


class _Monitor:
    peak_rss_bytes, read_bytes, write_bytes = 1 << 30, 0, 0


def test_the_gpu_suite_streams_a_model_four_times_its_gpu_budget() -> None:
    """bench/gpu_check.sh's suite: the fp32 weights are at least 4x the GPU memory budget, and
    the planner finds a plan for it on a GPU machine."""
    from bench.suite import llama_config
    from scheduler.model_shape import shape_from_config
    from scheduler.planner import Budgets, choose_plan
    from scheduler.profile import HardwareProfile
    from scheduler.workload import Workload

    suite = SUITES["gpu"]
    shape = shape_from_config(llama_config(suite))
    budget = int(16 * shape.total_numel * suite.ram_budget_share)
    device = int(budget * suite.device_share)
    assert 4 * shape.total_numel >= 4 * device
    gpu = HardwareProfile(machine="gpu", nvme_path="/swap", io_backend="posix", ssd_read_gbps=3.0,
                          ssd_write_gbps=3.0, h2d_gbps=25.0, d2h_gbps=25.0, cpu_adam_params_per_s={"torch": 1e9},
                          matmul_tflops={"float32": 50.0}, ram_available_bytes=128 << 30,
                          vram_free_bytes=80 << 30, disk_free_bytes=60 << 30, measured_at="test")
    choice = choose_plan(shape, Workload(micro_batch=suite.batch, seq_len=suite.seq_len),
                         Budgets(device, budget - device, 60 << 30), gpu)
    assert choice.estimate.memory.device_bytes <= device


def test_the_report_gives_the_gpu_busy_fraction_from_cuda_events() -> None:
    s = summarize(_run("offload-train", [9.0, 2.0, 4.0], [3.0, 2.0, 1.0], True), SUITE, RATES,
                  peak_rss_bytes=123, wall_s=20.0)
    text = format_report(SUITE, 1000, RATES, [s], {"Command": "c"}, [],
                         {"offload-train": ({"compute": 1.5, "gpu": 1.8}, 2.0)})
    assert "GPU busy (CUDA events around offload-train's compute): 90% of the step." in text


def test_page_size_io_moves_the_bytes_through_both_buffers_and_cleans_up(tmp_path, capsys) -> None:
    from bench import page_size_io

    page_size_io.main(["--path", str(tmp_path), "--rounds", "1", "--buffer-mib", "2", "--passes", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[1], r[-4]) for r in rows] == [("4", "read"), ("4", "write"), ("huge", "read"), ("huge", "write")]
    assert all(float(r[-3]) > 0 for r in rows)
    assert list(tmp_path.iterdir()) == []
