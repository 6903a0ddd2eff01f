"""Measuring the machine and probing a layer leave the caller's random state as it was: a Trainer
seeds torch before the engine starts, and an empty cache (first run) must not change its dropout
masks or its data order."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from scheduler.layer_probe import probe_layer
from scheduler.profile import measure
from scheduler.workload import Workload


def test_the_layer_probe_leaves_the_callers_random_state():
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, attention_dropout=0.1)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    probe_layer(cfg, Workload(micro_batch=1, seq_len=32), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


def test_measuring_the_machine_leaves_the_callers_random_state(tmp_path):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    measure(tmp_path, size_bytes=16 << 20, io_backend="posix")
    assert torch.equal(torch.get_rng_state(), before)
