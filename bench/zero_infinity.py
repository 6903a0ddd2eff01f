"""DeepSpeed ZeRO-3 with parameters and optimizer states on NVMe (ZeRO-Infinity), one process.

Runs on a machine without a GPU on DeepSpeed's CPU accelerator (gloo, world size 1). Two
DeepSpeed bugs need a workaround on such a machine (see ``WORKAROUNDS``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from bench.suite import Suite
from bench.workers import ADAM_BETAS, ADAM_EPS, EngineRun, initial_model, timed_steps

WORKAROUNDS = (
    "DeepSpeed bug 1 (fp32 params offloaded to NVMe become bf16 on a CPU without fp16 support: "
    "operator precedence in zero.partition_parameters._set_dtype drops an explicit dtype): "
    "_set_dtype is patched at run time so an explicit dtype is honoured",
    "DeepSpeed bug 2 ('Not enough buffers 0 for swapping 1' in the second step, "
    "deepspeedai/DeepSpeed#3062): stage3_max_reuse_distance = 0",
)


def ds_config(suite: Suite, nvme_path: Path) -> dict[str, Any]:
    """ZeRO-3, offload_param and offload_optimizer on NVMe, DeepSpeed's own keys, fp32."""
    return {
        "train_batch_size": suite.batch,
        "train_micro_batch_size_per_gpu": suite.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {"lr": suite.learning_rate, "betas": list(ADAM_BETAS),
                                                  "eps": ADAM_EPS, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "sub_group_size": 1_000_000,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 10_000_000,
            "stage3_max_reuse_distance": 0,  # bug 2 workaround
            "stage3_prefetch_bucket_size": suite.zero_prefetch_bucket_numel,
            "reduce_bucket_size": 5_000_000,
            "offload_param": {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True,
                              "buffer_count": 8, "buffer_size": _param_buffer_numel(suite), "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True,
                                  "buffer_count": 4, "fast_init": False},
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True, "use_gds": False},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _param_buffer_numel(suite: Suite) -> int:
    """Swap buffers must hold the largest parameter (the embedding or the LM head)."""
    largest = max(suite.vocab * suite.hidden, suite.intermediate * suite.hidden)
    return max(4_000_000, largest)


def _patch_set_dtype() -> None:
    """Bug 1: honour an explicit dtype in ``Init._set_dtype``."""
    from deepspeed.runtime.zero import partition_parameters as pp

    cls = pp.InsertPostInitMethodToModuleSubClasses
    original = cls._set_dtype
    if getattr(original, "_offload_bench_patched", False):
        return

    def _set_dtype(self: Any, ds_config: Any, dtype: torch.dtype | None) -> None:
        if dtype is not None:
            self.dtype = dtype
            return
        original(self, ds_config, dtype)

    _set_dtype._offload_bench_patched = True  # type: ignore[attr-defined]
    cls._set_dtype = _set_dtype


def _single_process_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def run_zero_infinity(suite: Suite, swap_dir: Path, trace_path: Path | None) -> EngineRun:
    import deepspeed

    t0 = time.perf_counter()
    _single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    _patch_set_dtype()
    model = initial_model(suite)
    run = EngineRun("zero-infinity", sum(p.numel() for p in model.parameters()))
    run.notes += list(WORKAROUNDS)
    if suite.zero_prefetch_bucket_numel == 0:
        run.notes.append("ZeRO-Infinity parameter prefetch off in this suite (stage3_prefetch_bucket_size "
                         "0): with it, DeepSpeed fails in step 1 on this small model")
    swap_dir.mkdir(parents=True, exist_ok=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(suite, swap_dir))
    del model
    run.init_s = time.perf_counter() - t0

    def step(batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"].to(engine.device)
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    timed_steps(run, suite, step)
    if torch.cuda.is_available():
        run.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    engine.destroy()
    return run
