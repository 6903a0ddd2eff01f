"""A user's first run: peak RSS of ``offload-train train`` (the whole process tree) on a model loaded
from a hub-style checkpoint, with ``cpu_memory_limit`` at half its fp32 training state, from an
empty cache (profile and layer probe measured inside the run), then again warm.

    python -m bench.first_run [--path runs/first-run] [--layers 30] [--max-shard-size 50MB]

The model is SmolLM-135M-shaped (Llama, hidden 576, 30 layers, vocab 49152, tied embeddings), saved
in bf16 with ``save_pretrained`` as the hub stores it. The runtime overhead is measured in the same
run: the peak RSS of a process that imports what ``train`` imports and builds the empty model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.procmon import TreeMonitor

STATE_BYTES_PER_PARAM = 16  # fp32 master + exp_avg + exp_avg_sq + gradient
OVERHEAD_SCRIPT = """
import sys
from cli.train import load_model_config
from cli.config import load_config
from scheduler.materialize import empty_model
import scheduler.executor, transformers, torch
cfg = load_config(sys.argv[1], [])
empty_model(load_model_config(cfg))
"""


def smollm_config(layers: int):  # noqa: ANN201 - a transformers config
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=10000.0)


def write_checkpoint(ckpt: Path, layers: int, shard_size: str | None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from cli.data import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm_config(layers)).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ckpt, **({"max_shard_size": shard_size} if shard_size else {}))
    load_tokenizer(None, None).save_pretrained(ckpt)
    return n_params


def write_run_config(path: Path, ckpt: Path, run_dir: Path, limit_bytes: int, seq_len: int) -> Path:
    import yaml

    from cli.data import default_corpus_path

    cfg = {
        "model": {"name_or_path": str(ckpt)},
        "data": {"path": str(default_corpus_path()), "seq_len": seq_len},
        "train": {"output_dir": str(run_dir), "max_steps": 2, "micro_batch_size": 1, "save_steps": 0,
                  "logging_steps": 1},
        "offload": {"cpu_memory_limit": f"{limit_bytes}B", "optimizer_impl": "torch", "io_backend": "posix"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """(peak RSS of the tree in bytes, wall seconds, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMonitor(proc.pid, interval_s=0.005) as mon:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    return mon.peak_rss_bytes, time.perf_counter() - t0, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=Path("runs/first-run"))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-shard-size", default=None,
                        help="save the checkpoint sharded (e.g. 50MB); default: one model.safetensors")
    args = parser.parse_args(argv)
    root = args.path.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    n_params = write_checkpoint(root / "ckpt", args.layers, args.max_shard_size)
    state_bytes = STATE_BYTES_PER_PARAM * n_params
    limit_bytes = state_bytes // 2
    env = {**os.environ, "OFFLOAD_TRAIN_CACHE": str(root / "cache")}  # empty: profile and probe run inside
    exe = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))"]
    cfg = write_run_config(root / "run.yaml", root / "ckpt", root / "run-first", limit_bytes, args.seq_len)
    overhead, _, rc0 = peak_rss([sys.executable, "-c", OVERHEAD_SCRIPT, str(cfg)], env)
    first, first_s, rc1 = peak_rss([*exe, "train", str(cfg)], env)
    warm_cfg = write_run_config(root / "run-warm.yaml", root / "ckpt", root / "run-warm", limit_bytes, args.seq_len)
    warm, warm_s, rc2 = peak_rss([*exe, "train", str(warm_cfg)], env)
    gib = 1 << 30
    result = {
        "params": n_params, "state_bytes": state_bytes, "cpu_memory_limit_bytes": limit_bytes,
        "runtime_overhead_bytes": overhead,
        "first_run_peak_rss_bytes": first, "first_run_s": round(first_s, 1),
        "warm_run_peak_rss_bytes": warm, "warm_run_s": round(warm_s, 1),
        "first_over_budget_plus_overhead": round(first / (limit_bytes + overhead), 3),
        "exit_codes": [rc0, rc1, rc2],
    }
    print(json.dumps(result, indent=2))
    print(f"{n_params / 1e6:.1f}M params, fp32 state {state_bytes / gib:.2f} GiB, cpu_memory_limit "
          f"{limit_bytes / gib:.2f} GiB, runtime overhead {overhead / gib:.2f} GiB; peak RSS first run "
          f"{first / gib:.2f} GiB = {first / state_bytes:.2f}x state = {first / (limit_bytes + overhead):.2f}x "
          f"(budget + overhead); warm {warm / gib:.2f} GiB = {warm / state_bytes:.2f}x state")
    return 0 if rc0 == rc1 == rc2 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
