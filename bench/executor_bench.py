"""Executor benchmarks on this machine: out-of-core memory, and step time against plain PyTorch.

    python -m bench.executor_bench memory --path DIR        # peak RSS vs the memory budget
    python -m bench.executor_bench speed --path DIR         # step time vs in-memory PyTorch
    python -m bench.executor_bench accumulation --path DIR  # GA: micro-batch order vs layer-major

Both build a Llama-shaped model from a config (random init, no download), fp32 compute.
``memory`` trains with DEVICE + HOST budgets that sum to ``--budget`` while the model's fp32
training state (16 bytes/param) is several times larger, samples the process RSS every 5 ms,
and reports peak RSS minus the runtime overhead measured before training (torch, transformers,
the meta model). ``speed`` runs the same batches through in-memory PyTorch (torch AdamW, fused)
and through the engine out of core, in one process, and reports the ratio of median step times.
``accumulation`` does the same with ``--grad-accum`` micro-batches per step, weights and optimizer
states on the SSD, once accumulating micro-batch by micro-batch and once layer-major, and reports
SSD bytes per step beside the step times (layer-major: the weights are read once per step).
Each run prints one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil
import torch

SHAPES = {
    # name: hidden, intermediate, layers, heads, vocab
    "125m": (768, 2048, 12, 12, 32000),
    "300m": (1024, 2816, 24, 16, 32000),
}


def llama_config(shape: str, seq_len: int):  # noqa: ANN201 - transformers config
    from transformers import LlamaConfig

    h, i, n_layers, heads, vocab = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n_layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len,
                       tie_word_embeddings=False)


class RssSampler:
    """Peak resident set size of this process, sampled on a background thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class EngineRun:
    step_times_s: list[float]
    losses: list[float]
    metrics: dict[str, int]


def run_engine(model, batches, plan, path: str, impl: str, initializer) -> EngineRun:  # noqa: ANN001
    from offload import AdamWConfig, SwapStore, make_adamw, make_backend
    from scheduler.executor import StreamingExecutor, TrainSettings

    times, losses = [], []
    with SwapStore(path, make_backend("posix")) as store, StreamingExecutor(
        model, plan, store, make_adamw(impl, AdamWConfig()), TrainSettings(), initializer=initializer
    ) as ex:
        for batch in batches:
            t0 = time.perf_counter()
            losses.append(ex.train_step([batch], lr=1e-4).loss)
            times.append(time.perf_counter() - t0)
        ex.synchronize()
        metrics = ex.metrics()
    return EngineRun(times, losses, metrics)


def train_in_memory(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                    lr: float = 1e-4, grad_accum: int = 1) -> tuple[list[float], list[float]]:
    """In-memory PyTorch: ``torch.optim.AdamW(fused=True)`` over the trainable parameters, one
    step per ``grad_accum`` batches (each loss / grad_accum); (step times in s, step losses)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    model.train()
    times, losses = [], []
    for k in range(0, len(batches), grad_accum):
        t0 = time.perf_counter()
        total = 0.0
        for b in batches[k : k + grad_accum]:
            loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss / grad_accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        times.append(time.perf_counter() - t0)
    return times, losses


def run_accumulating(model, steps, plan, path: str, impl: str) -> tuple[EngineRun, int, int]:  # noqa: ANN001
    """The engine over ``steps`` (lists of micro-batches); also the SSD bytes read and written by
    the last step (counted after its optimizer jobs end)."""
    from offload import AdamWConfig, SwapStore, make_adamw, make_backend
    from scheduler.executor import StreamingExecutor, TrainSettings

    times, losses = [], []
    settings = TrainSettings(gradient_accumulation_steps=len(steps[0]))
    with SwapStore(path, make_backend("posix")) as store, StreamingExecutor(
        model, plan, store, make_adamw(impl, AdamWConfig()), settings) as ex:
        for k, micro in enumerate(steps):
            if k == len(steps) - 1:
                ex.synchronize()
                before = ex.metrics()
            t0 = time.perf_counter()
            losses.append(ex.train_step(micro, lr=1e-4).loss)
            times.append(time.perf_counter() - t0)
        ex.synchronize()
        metrics = ex.metrics()
    read, written = (metrics[k] - before[k] for k in ("io_read_bytes", "io_write_bytes"))
    return EngineRun(times, losses, metrics), read, written


def make_batches(n: int, batch: int, seq_len: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=g)} for _ in range(n)]


def memory(args: argparse.Namespace) -> dict[str, object]:
    from offload.tiers import Tier
    from scheduler.materialize import RandomInit, empty_model
    from scheduler.plan import Plan

    cfg = llama_config(args.shape, args.seq_len)
    torch.manual_seed(0)
    model = empty_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(args.steps, args.batch, args.seq_len, cfg.vocab_size)
    overhead_bytes = psutil.Process().memory_info().rss  # runtime before any weight exists
    budget = int(args.budget_gb * 2**30)
    device_budget = int(budget * args.device_share)
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                prefetch_depth=1, turn_keep=1, device_budget_bytes=device_budget,
                host_budget_bytes=budget - device_budget, job_slots=1)
    with RssSampler() as rss:
        run = run_engine(model, batches, plan, args.path, args.impl, RandomInit(model))
    return {
        "bench": "memory", "shape": args.shape, "params": n_params,
        "train_state_bytes": 16 * n_params, "budget_bytes": budget,
        "state_over_budget": round(16 * n_params / budget, 2),
        "overhead_rss_bytes": overhead_bytes, "peak_rss_bytes": rss.peak_bytes,
        "peak_rss_minus_overhead_bytes": rss.peak_bytes - overhead_bytes,
        "step_times_s": [round(t, 2) for t in run.step_times_s], "losses": run.losses, **run.metrics,
    }


def speed(args: argparse.Namespace) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    from offload.tiers import Tier
    from scheduler.plan import Plan

    cfg = llama_config(args.shape, args.seq_len)
    batches = make_batches(args.steps + 1, args.batch, args.seq_len, cfg.vocab_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    base_times, base_losses = train_in_memory(model, batches)  # the baseline
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)  # same initial weights for the engine
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                activations=Tier.DEVICE if not args.recompute else Tier.NVME,
                recompute=args.recompute, prefetch_depth=1, turn_keep=1, job_slots=2)
    run = run_engine(model, batches, plan, args.path, args.impl, None)
    base_s = statistics.median(base_times[1:])
    ours_s = statistics.median(run.step_times_s[1:])
    return {
        "bench": "speed", "shape": args.shape, "params": n_params, "tokens_per_step": args.batch * args.seq_len,
        "recompute": args.recompute, "optimizer_impl": args.impl,
        "pytorch_step_s": round(base_s, 3), "ours_step_s": round(ours_s, 3), "ratio": round(ours_s / base_s, 3),
        "pytorch_times_s": [round(t, 2) for t in base_times], "ours_times_s": [round(t, 2) for t in run.step_times_s],
        "max_loss_diff": max(abs(a - b) for a, b in zip(base_losses, run.losses, strict=True)), **run.metrics,
    }


def accumulation(args: argparse.Namespace) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    from offload.tiers import Tier
    from scheduler.plan import Plan

    cfg = llama_config(args.shape, args.seq_len)
    ga = args.grad_accum
    flat = make_batches((args.steps + 1) * ga, args.batch, args.seq_len, cfg.vocab_size)
    steps = [flat[k : k + ga] for k in range(0, len(flat), ga)]
    torch.manual_seed(0)
    base_times, base_losses = train_in_memory(AutoModelForCausalLM.from_config(cfg), flat, grad_accum=ga)
    base_s = statistics.median(base_times[1:])
    result: dict[str, object] = {"bench": "accumulation", "shape": args.shape, "grad_accum": ga,
                                 "tokens_per_step": ga * args.batch * args.seq_len, "recompute": args.recompute,
                                 "pytorch_step_s": round(base_s, 3)}
    for name, layer_major in (("micro_batch_major", False), ("layer_major", True)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        # micro-batch order parks every gradient on the SSD between micro-batches; layer-major
        # keeps only the embeddings' and head's (handed over every micro-batch), in RAM
        plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.HOST if layer_major else Tier.NVME,
                    activations=Tier.NVME if args.recompute else Tier.DEVICE, recompute=args.recompute,
                    prefetch_depth=1, turn_keep=1, job_slots=2, layer_major=layer_major)
        run, read, written = run_accumulating(model, steps, plan, tempfile.mkdtemp(dir=args.path), args.impl)
        ours_s = statistics.median(run.step_times_s[1:])
        result[name] = {"step_s": round(ours_s, 3), "ratio_to_pytorch": round(ours_s / base_s, 3),
                        "ssd_read_bytes_per_step": read, "ssd_write_bytes_per_step": written,
                        "times_s": [round(t, 2) for t in run.step_times_s],
                        "max_loss_diff": max(abs(a - b) for a, b in zip(base_losses, run.losses, strict=True))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["memory", "speed", "accumulation"])
    parser.add_argument("--path", default=None, help="swap directory on the SSD (default: a temp dir)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="300m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4, help="accumulation mode: micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=1.0, help="memory mode: DEVICE + HOST budget")
    parser.add_argument("--device-share", type=float, default=0.7, help="memory mode: DEVICE part of it")
    parser.add_argument("--impl", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--recompute", action="store_true", help="speed mode: recompute layers in backward")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc malloc defaults")
    args = parser.parse_args()
    if not args.no_malloc_tuning:
        from offload.hostmem import tune_malloc

        tune_malloc()
    if args.path is None:
        args.path = tempfile.mkdtemp(prefix="offload-bench-")
    result = {"memory": memory, "speed": speed, "accumulation": accumulation}[args.mode](args)
    result.update(machine=f"{platform.machine()}, {psutil.cpu_count()} cpus, "
                  f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), torch_threads=torch.get_num_threads(),
                  malloc_tuned=not args.no_malloc_tuning)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
