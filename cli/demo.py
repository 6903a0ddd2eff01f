"""``offload-train demo``: train a small Llama-shaped model through NVMe on text that ships with
Python (no download, no GPU), and print the loss falling.

Tokens are raw UTF-8 bytes (vocabulary 256), so no tokenizer file is needed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cli.config import ConfigError

if TYPE_CHECKING:
    from scheduler.executor import TrainSettings
    from scheduler.plan import Plan

log = logging.getLogger(__name__)


def shipped_corpus_bytes() -> bytes:
    """Docstrings of standard-library modules: always present, deterministic for a Python version."""
    import collections
    import json
    import pathlib
    import textwrap

    from cli.assets.make_assets import zen_of_python

    zen = zen_of_python()  # the first paragraph (``import this`` would print it)
    docs = [inspect.getdoc(m) or "" for m in (collections, json, pathlib, textwrap, inspect)]
    return "\n\n".join([zen, *docs]).encode()


def run_demo(steps: int, nvme_path: str | None, seq_len: int = 128, batch: int = 4) -> int:
    from transformers import LlamaConfig

    from offload.tiers import Tier
    from scheduler.executor import TrainSettings
    from scheduler.materialize import empty_model
    from scheduler.plan import Plan

    if steps < 1:
        raise ConfigError(f"demo --steps must be at least 1, not {steps}")
    torch.manual_seed(0)
    data = torch.tensor(list(shipped_corpus_bytes()), dtype=torch.long)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len)
    model = empty_model(cfg)
    # Budgets far below the model's training state (~80 MiB): every layer streams through NVMe.
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                device_budget_bytes=16 << 20, host_budget_bytes=16 << 20, chunk_numel=256 << 10)
    settings = TrainSettings(weight_decay=0.0, max_grad_norm=1.0)
    with contextlib.ExitStack() as stack:
        # a swap folder of its own is removed at the end (a named one is the user's to keep)
        root = Path(nvme_path) if nvme_path else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="offload-demo-")))
        return _train(model, plan, settings, data, root, steps, seq_len, batch)


def _train(model: torch.nn.Module, plan: Plan, settings: TrainSettings, data: torch.Tensor, root: Path,
           steps: int, seq_len: int, batch: int) -> int:
    from offload import AdamWConfig, SwapStore, make_adamw, make_backend
    from scheduler.executor import StreamingExecutor
    from scheduler.materialize import RandomInit

    print(f"demo: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{data.numel()} bytes of text, swap at {root}")
    print(plan)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with SwapStore(root, make_backend("auto")) as store, StreamingExecutor(
        model, plan, store, make_adamw("torch", AdamWConfig()), settings, initializer=RandomInit(model)
    ) as ex:
        for step in range(1, steps + 1):
            starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=g)
            ids = torch.stack([data[s : s + seq_len] for s in starts])
            result = ex.train_step([{"input_ids": ids}], lr=3e-3)
            if step == 1 or step % 10 == 0 or step == steps:
                print(f"step {step:4d}  loss {result.loss:.4f}  {result.tokens / result.step_time_s:8.0f} tok/s")
        m = ex.metrics()
    print(f"done in {time.perf_counter() - t0:.1f} s; SSD read {m['io_read_bytes'] / 2**20:.0f} MiB, "
          f"written {m['io_write_bytes'] / 2**20:.0f} MiB")
    return 0
