"""What a checkpoint costs: seconds per save and bytes written, through ``offload-train train``.

Trains a random-init Llama for ``--steps`` steps with a checkpoint after every step, under a
fixed plan that keeps the fp32 master weights and Adam states on the SSD, and times each save
(``cli.train._save``, after the step's pending updates have finished, so only the save is
counted). Prints one JSON object: seconds per save, bytes of each checkpoint directory, size of
the swap file. Run it from a source tree to measure that tree's checkpoint format::

    python -m bench.checkpoint_bench --out runs/ckpt-bench --hidden 1024 --layers 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_inputs(out: Path, hidden: int, layers: int, steps: int) -> tuple[Path, Path]:
    data = out / "train.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: weights stream through an SSD and back, {i % 13} times."
                                for i in range(400)))
    cfg = {
        "model": {"config": {"model_type": "llama", "vocab_size": 4096, "hidden_size": hidden,
                             "intermediate_size": hidden * 11 // 4 // 64 * 64, "num_hidden_layers": layers,
                             "num_attention_heads": max(hidden // 64, 1), "max_position_embeddings": 256}},
        "data": {"path": str(data), "seq_len": 64},
        "train": {"output_dir": str(out / "run"), "max_steps": steps, "micro_batch_size": 1, "logging_steps": 1,
                  "save_steps": 1, "save_total_limit": 2, "max_grad_norm": 1.0, "learning_rate": 1e-4},
        "offload": {"optimizer_impl": "torch", "io_backend": "posix"},
    }
    cfg_path = out / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    plan = {"weights": "nvme", "optimizer": "nvme", "grads": "nvme", "activations": "device",
            "prefetch_depth": 1, "device_budget_bytes": 4 << 30, "host_budget_bytes": 2 << 30,
            "chunk_numel": 4 << 20}
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan))
    return cfg_path, plan_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="scratch directory on the SSD (emptied first)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg_path, plan_path = write_inputs(out, args.hidden, args.layers, args.steps)

    import cli.train
    from cli.main import main as cli_main

    real_save = cli.train._save
    saves: list[dict[str, Any]] = []

    def timed_save(ctx: Any, engine: Any, *rest: Any) -> None:
        engine.synchronize()  # the step's own updates are not the checkpoint's cost
        t_start_s = time.perf_counter()
        real_save(ctx, engine, *rest)
        seconds = time.perf_counter() - t_start_s
        latest = max((ctx.run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
        saves.append({"step": int(latest.name[5:]), "seconds": seconds, "checkpoint_bytes": dir_bytes(latest)})

    cli.train._save = timed_save
    if cli_main(["train", str(cfg_path), "--plan", str(plan_path)]) != 0:
        raise SystemExit("training failed")
    swap = out / "run" / "swap" / "data-000.bin"
    secs = [s["seconds"] for s in saves]
    print(json.dumps({"hidden": args.hidden, "layers": args.layers, "saves": saves,
                      "median_save_s": statistics.median(secs),
                      "checkpoint_dir_bytes": saves[-1]["checkpoint_bytes"],
                      "swap_file_bytes": swap.stat().st_size if swap.exists() else 0}))


if __name__ == "__main__":
    main()
