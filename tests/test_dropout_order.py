"""A model that draws dropout masks keeps micro-batch order: a layer-major step would draw them in
another order than in-memory training (Trainer, PyTorch) does, so the planner does not choose it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig, GPT2Config, LlamaConfig

from cli.budgets import draws_dropout, load_profile_file
from scheduler.model_shape import shape_from_config
from scheduler.planner import Budgets, choose_plan
from scheduler.workload import Workload

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


def test_dropout_is_read_from_the_config():
    assert draws_dropout(GPT2Config())  # resid/embd/attn_pdrop 0.1
    assert not draws_dropout(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert draws_dropout(LlamaConfig(attention_dropout=0.1))
    assert not draws_dropout(LlamaConfig())
    assert not draws_dropout(AutoConfig.for_model("gpt_neox"))  # classifier_dropout: a head not run


def test_the_planner_keeps_micro_batch_order_for_a_model_with_dropout():
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4))
    profile = load_profile_file(EXAMPLES / "workstation-24gb.json")
    wl = Workload(micro_batch=1, seq_len=2048, grad_accum=8, compute_dtype="bfloat16")
    budgets = Budgets(device_bytes=8 * 10**9, host_bytes=4 * 10**9, nvme_bytes=10**12)
    assert choose_plan(shape, wl, budgets, profile).plan.layer_major  # the faster order, without dropout
    assert not choose_plan(shape, replace(wl, random_forward=True), budgets, profile).plan.layer_major
