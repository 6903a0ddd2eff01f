"""Crash soak: SIGKILL ``offload-train train`` over and over, resume, compare with a straight run.

Each round starts a fresh run folder and kills the training process either at a named fault
point (``offload.faults``: swap reads and writes, checkpoint stages) at a random hit count, or
after a random delay; it is then rerun with ``resume_from_checkpoint: auto`` (and killed again
with some probability) until it finishes. The losses (``metrics.jsonl``) and the final weights
must equal the uninterrupted run's bit for bit. The CI version is ``tests/test_faults.py``::

    python -m bench.fault_soak --out runs/soak --rounds 50 --steps 10 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from cli.data import load_tokenizer
from offload.faults import FAULT_ENV

POINTS = ("store.read", "store.write", "checkpoint.snapshot", "checkpoint.written", "checkpoint.renamed")
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "skipped_steps")


def write_inputs(root: Path, name: str, steps: int) -> list[str]:
    data = root / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"Record {i}: layers {i % 5} go through an SSD."}) + "\n"
                                for i in range(200)))
    cfg = {
        "model": {"config": {"model_type": "llama", "vocab_size": len(load_tokenizer(None, None)),
                             "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"path": str(data), "seq_len": 32, "shuffle": True},
        "train": {"output_dir": str(root / name), "max_steps": steps, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
                  "warmup_steps": 1, "max_grad_norm": 0.5, "logging_steps": 1, "save_steps": 2,
                  "save_total_limit": 2, "seed": 5, "resume_from_checkpoint": "auto"},
        "offload": {"optimizer_impl": "torch", "io_backend": "posix"},
    }
    plan = {"weights": "nvme", "optimizer": "nvme", "grads": "nvme", "activations": "nvme",
            "device_budget_bytes": 16 << 20, "host_budget_bytes": 8 << 20, "chunk_numel": 16384}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    (root / "plan.json").write_text(json.dumps(plan))
    return ["train", str(root / f"{name}.yaml"), "--plan", str(root / "plan.json")]


def run(args: list[str], fault: str | None = None, kill_after_s: float | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"unexpected exit {proc.returncode}: {err}")
    return proc.returncode


def outcome(run_dir: Path) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted((run_dir / "final").glob("*.safetensors")):
        weights.update(load_file(shard))
    return [tuple(r[k] for k in EXACT_KEYS) for r in records], weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t_start_s = time.perf_counter()
    run(write_inputs(root, "straight", args.steps))
    want_metrics, want_weights = outcome(root / "straight")
    kills = 0
    for k in range(args.rounds):
        cli_args = write_inputs(root, f"round{k}", args.steps)
        while True:
            point = rng.choice(POINTS)
            if rng.random() < 0.3:  # whatever the process is doing then (imports and set-up too)
                code = run(cli_args, kill_after_s=rng.uniform(1.0, 8.0))
            elif point.startswith("checkpoint"):
                code = run(cli_args, fault=f"{point}:{rng.randint(1, args.steps // 2 + 1)}")
            else:  # a few hundred swap reads and writes per step
                code = run(cli_args, fault=f"{point}:{rng.randint(1, 200 * args.steps)}")
            kills += code != 0
            if code == 0:
                break
        metrics, weights = outcome(root / f"round{k}")
        same = metrics == want_metrics and weights.keys() == want_weights.keys() and all(
            torch.equal(weights[n], want_weights[n]) for n in weights)
        print(json.dumps({"round": k, "kills_so_far": kills, "same": same}), flush=True)
        if not same:
            raise SystemExit(f"round {k}: the resumed run differs from the straight run ({root / f'round{k}'})")
        shutil.rmtree(root / f"round{k}")
    print(json.dumps({"rounds": args.rounds, "kills": kills, "all_same": True,
                      "seconds": round(time.perf_counter() - t_start_s, 1)}))


if __name__ == "__main__":
    main()
