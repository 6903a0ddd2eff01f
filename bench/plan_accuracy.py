"""Predicted against measured step time: the cost model's accuracy on this machine.

For each case (a model shape, a batch and memory budgets), ``offload-train train`` runs a few
steps on the shipped corpus; the planner's prediction is in the run's ``plan.json`` and the
measured step times in ``metrics.jsonl``. The error is (predicted - measured) / measured, with
the median step time over the steps after the warm-up ones.

    python -m bench.plan_accuracy --path runs/accuracy [--steps 6] [--cases a,b,c]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    model: dict[str, Any]
    micro_batch: int
    seq_len: int
    grad_accum: int
    max_grad_norm: float
    cpu_memory_limit: str
    gpu_memory_limit: str = "auto"
    resume_at: int = 0
    """> 0: train that many steps, checkpoint, and measure the run resumed from that checkpoint
    (the swap store reopened at a snapshot: the first writes go to new extents)."""


CASES = {
    "a": Case("llama 8 x h512, all streamed", {"model_type": "llama", "vocab_size": 4096, "hidden_size": 512,
              "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "max_position_embeddings": 512, "tie_word_embeddings": False},
              micro_batch=4, seq_len=256, grad_accum=1, max_grad_norm=0.0, cpu_memory_limit="160MB"),
    "b": Case("gpt2 12 x h768, clipping, GA 2", {"model_type": "gpt2", "vocab_size": 4096, "n_embd": 768,
              "n_layer": 12, "n_head": 12, "n_positions": 512},
              micro_batch=2, seq_len=512, grad_accum=2, max_grad_norm=1.0, cpu_memory_limit="400MB"),
    "c": Case("llama 4 x h1024, state in RAM", {"model_type": "llama", "vocab_size": 4096, "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
              "num_key_value_heads": 16, "max_position_embeddings": 512, "tie_word_embeddings": False},
              micro_batch=2, seq_len=512, grad_accum=1, max_grad_norm=1.0, cpu_memory_limit="3GB"),
    "d": Case("llama 8 x h512, resumed from a checkpoint", {"model_type": "llama", "vocab_size": 4096,
              "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "max_position_embeddings": 512, "tie_word_embeddings": False},
              micro_batch=4, seq_len=256, grad_accum=1, max_grad_norm=0.0, cpu_memory_limit="160MB", resume_at=2),
    "e": Case("llama 6 x h768, 32k vocab, 256 tokens/step", {"model_type": "llama", "vocab_size": 32000,
              "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12,
              "num_key_value_heads": 12, "max_position_embeddings": 512, "tie_word_embeddings": False},
              micro_batch=1, seq_len=256, grad_accum=1, max_grad_norm=1.0, cpu_memory_limit="500MB"),
}


def write_config(case: Case, run_dir: Path, steps: int, save_steps: int = 0, resume: bool = False) -> Path:
    cfg = {
        "model": {"config": case.model, "dtype": "float32"},
        "data": {"path": str(ROOT / "cli" / "assets" / "corpus.txt"), "seq_len": case.seq_len},
        "train": {"output_dir": str(run_dir), "max_steps": steps, "micro_batch_size": case.micro_batch,
                  "gradient_accumulation_steps": case.grad_accum, "learning_rate": 1e-4,
                  "max_grad_norm": case.max_grad_norm, "logging_steps": 1, "save_steps": save_steps, "seed": 1,
                  **({"resume_from_checkpoint": "auto"} if resume else {})},
        "offload": {"cpu_memory_limit": case.cpu_memory_limit, "gpu_memory_limit": case.gpu_memory_limit,
                    "io_backend": "posix", "optimizer_impl": "torch"},
    }
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_case(case: Case, root: Path, steps: int, warmup: int) -> dict[str, Any]:
    run_dir = root / case.name.split()[0] / f"run-{int(time.time())}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if case.resume_at:  # a first run leaves the checkpoint the measured run starts from
        _train(case, write_config(case, run_dir, case.resume_at, save_steps=case.resume_at))
    # the measured run saves no checkpoint of its own (what resuming costs, not checkpointing)
    _train(case, write_config(case, run_dir, case.resume_at + steps, resume=case.resume_at > 0))
    saved = json.loads((run_dir / "plan.json").read_text())  # the measured run's plan
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "step_time_s" in m and m["step"] > case.resume_at]
    measured = statistics.median(m["step_time_s"] for m in metrics[warmup:])
    predicted = saved["predicted"]["step_s"]
    params = _params(case)
    return {"case": case.name, "params": params, "tiers": f"w:{saved['weights']} opt:{saved['optimizer']} "
            f"act:{saved['activations'] if saved['recompute'] else 'no-recompute'} "
            f"res:{len(saved['resident_layers'])}{_extras(saved, case)}",
            "predicted_s": predicted, "measured_s": measured, "error": (predicted - measured) / measured,
            "bottleneck": saved["predicted"]["bottleneck"], "steps": [round(m["step_time_s"], 3) for m in metrics]}


def _train(case: Case, config: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "train", str(config)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{case.name}: train failed:\n{proc.stderr[-2000:]}")


def _extras(saved: dict[str, Any], case: Case) -> str:
    """The plan's newer choices, when made: layer-major accumulation, states in RAM, recompute."""
    out = ""
    if saved.get("layer_major") and case.grad_accum > 1:
        out += " layer-major"
    if saved.get("optimizer_host_units"):
        out += f" opt-in-ram:{saved['optimizer_host_units']}"
    if saved.get("recompute_layers"):
        out += f" recomputed:{saved['recompute_layers']}"
    return out


def _params(case: Case) -> int:
    from transformers import AutoConfig

    from scheduler.model_shape import shape_from_config

    fields = dict(case.model)
    return shape_from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).total_numel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="runs/accuracy", help="directory for runs and swap (on the SSD)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    rows = [run_case(CASES[c], Path(args.path).absolute(), args.steps, args.warmup) for c in args.cases.split(",")]
    print("| case | params | plan | predicted s/step | measured s/step (median) | error | bottleneck |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['tiers']} | {r['predicted_s']:.2f} | "
              f"{r['measured_s']:.2f} | {r['error'] * 100:+.0f}% | {r['bottleneck']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
