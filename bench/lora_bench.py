"""LoRA on a frozen base larger than the RAM budget, against PEFT in memory.

    python -m bench.lora_bench --path DIR [--shape 300m] [--budget-gb 0.5] [--steps 4]

Both engines train the same PEFT adapters (r 16, alpha 32, every linear layer but the head) on
the same batches of a Llama-shaped base (random init, saved with ``save_pretrained``, fp32), each
in its own process so that the
peak RSS is its own: ``peft`` is ``peft.get_peft_model`` + ``torch.optim.AdamW(fused=True)`` in
memory (the whole base in RAM); ``offload-train`` streams the frozen base from the SSD under a
DEVICE + HOST budget of ``--budget-gb`` (the base is several times larger), the adapters and their
AdamW state resident. Reported: median step time (steps after the first), the ratio, SSD bytes
read and written per step, peak RSS of each process, the largest loss difference. Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench.executor_bench import SHAPES, RssSampler, llama_config, make_batches, train_in_memory

TARGETS = "all-linear"


def write_inputs(root: Path, shape: str, seq_len: int) -> tuple[Path, Path]:
    """The base as the hub stores it (``save_pretrained``, fp32) and a PEFT adapter folder (B
    nonzero, so both factors learn from the first step)."""
    import peft
    from transformers import AutoModelForCausalLM

    base, adapter = root / "base", root / "adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(shape, seq_len))
    model.save_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                         task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    wrapped.save_pretrained(adapter)
    return base, adapter


def worker(args: argparse.Namespace) -> dict[str, object]:
    cfg = llama_config(args.shape, args.seq_len)
    batches = make_batches(args.steps, args.batch, args.seq_len, cfg.vocab_size)
    overhead_bytes = psutil.Process().memory_info().rss
    root = Path(args.path)
    with RssSampler() as rss:
        if args.engine == "peft":
            times, losses, metrics = _train_peft(root, batches)
        else:
            times, losses, metrics = _train_offload(root, batches, args)
    return {"engine": args.engine, "step_times_s": [round(t, 3) for t in times], "losses": losses,
            "peak_rss_bytes": rss.peak_bytes, "overhead_rss_bytes": overhead_bytes, **metrics}


def _train_peft(root: Path, batches):  # noqa: ANN001, ANN202
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32),
                                           root / "adapter", is_trainable=True)
    times, losses = train_in_memory(model, batches)
    return times, losses, {"base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
                           "adapter_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _train_offload(root: Path, batches, args: argparse.Namespace):  # noqa: ANN001, ANN202
    """As ``offload-train train`` builds a LoRA run: the empty model, PEFT's adapters from the
    folder, the base streamed from its checkpoint unit by unit (never whole in memory)."""
    from transformers import AutoConfig

    from cli.config import PeftSection
    from cli.lora import LoraInit, apply_lora, base_name
    from offload import AdamWConfig, SwapStore, make_adamw, make_backend
    from offload.tiers import Tier
    from scheduler.executor import StreamingExecutor, TrainSettings
    from scheduler.hf_checkpoint import CheckpointInit
    from scheduler.materialize import empty_model
    from scheduler.plan import Plan

    model = empty_model(AutoConfig.from_pretrained(root / "base"))
    base_init = CheckpointInit(root / "base", model)
    model, adapters = apply_lora(model, PeftSection(adapter_name_or_path=str(root / "adapter")))
    initializer = LoraInit(base_init, adapters, base_name)

    budget = int(args.budget_gb * 2**30)
    # kept graphs with the saved activations swapped through the SSD (the CPU's best plan so far),
    # or layer inputs kept and every layer recomputed
    plan = Plan(weights=Tier.NVME, optimizer=Tier.HOST, grads=Tier.HOST,
                activations=Tier.DEVICE if args.recompute else Tier.NVME, recompute=args.recompute, prefetch_depth=1, turn_keep=1,
                device_budget_bytes=budget * 8 // 10, host_budget_bytes=budget - budget * 8 // 10)
    times, losses, reads, writes = [], [], [], []
    with SwapStore(root / "swap", make_backend("posix")) as store, StreamingExecutor(
            model, plan, store, make_adamw("torch", AdamWConfig()), TrainSettings(), initializer=initializer) as ex:
        swap_bytes = store.allocated_bytes
        for b in batches:
            r0, w0, t0 = store.read_bytes, store.write_bytes, time.perf_counter()
            losses.append(ex.train_step([b], lr=1e-4).loss)
            ex.synchronize()
            times.append(time.perf_counter() - t0)
            reads.append(store.read_bytes - r0)
            writes.append(store.write_bytes - w0)
    units = ex.units
    return times, losses, {"plan": plan.to_dict(), "budget_bytes": budget, "swap_bytes": swap_bytes,
                           "base_params": sum(u.frozen_numel for u in units),
                           "adapter_params": sum(u.numel for u in units),
                           "ssd_read_bytes_per_step": statistics.median(reads[1:]),
                           "ssd_write_bytes_per_step": statistics.median(writes[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help="swap directory on the SSD (default: a temp dir)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="300m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=0.65, help="offload-train's DEVICE + HOST budget")
    parser.add_argument("--recompute", action="store_true", help="recompute layers in backward")
    parser.add_argument("--engine", choices=["peft", "offload-train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from offload.hostmem import tune_malloc

    tune_malloc()
    if args.engine is not None:  # a worker process
        print(json.dumps(worker(args)))
        return
    root = Path(args.path or tempfile.mkdtemp(prefix="offload-lora-"))
    write_inputs(root, args.shape, args.seq_len)
    runs = {}
    for engine in ("peft", "offload-train"):
        cmd = [sys.executable, "-m", "bench.lora_bench", "--engine", engine, *sys.argv[1:], "--path", str(root)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[engine] = json.loads(out.strip().splitlines()[-1])
    peft_s = statistics.median(runs["peft"]["step_times_s"][1:])
    ours_s = statistics.median(runs["offload-train"]["step_times_s"][1:])
    ours = runs["offload-train"]
    print(json.dumps({
        "bench": "lora", "shape": args.shape, "tokens_per_step": args.batch * args.seq_len,
        "base_params": ours["base_params"], "adapter_params": ours["adapter_params"],
        "base_bytes_fp32": 4 * ours["base_params"], "budget_bytes": ours["budget_bytes"],
        "base_over_budget": round(4 * ours["base_params"] / ours["budget_bytes"], 2),
        "peft_step_s": round(peft_s, 3), "ours_step_s": round(ours_s, 3), "ratio": round(ours_s / peft_s, 3),
        "ssd_read_bytes_per_step": ours["ssd_read_bytes_per_step"],
        "ssd_write_bytes_per_step": ours["ssd_write_bytes_per_step"], "swap_bytes": ours["swap_bytes"],
        "peft_peak_rss_bytes": runs["peft"]["peak_rss_bytes"], "ours_peak_rss_bytes": ours["peak_rss_bytes"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(runs["peft"]["losses"], ours["losses"], strict=True)),
        "plan": ours["plan"], "peft_times_s": runs["peft"]["step_times_s"], "ours_times_s": ours["step_times_s"],
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cpus, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }))


if __name__ == "__main__":
    main()
