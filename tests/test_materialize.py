"""Out-of-core model building: empty (meta) models initialized one unit at a time."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.hf_checkpoint import CheckpointInit
from scheduler.materialize import RandomInit, empty_model
from scheduler.plan import Plan

PLAN = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME)


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


def masters(model, initializer, tmp_path) -> dict[str, torch.Tensor]:
    with SwapStore(tmp_path / "swap", PosixBackend()) as store, StreamingExecutor(
        model, PLAN, store, make_adamw("torch", AdamWConfig()), TrainSettings(), initializer=initializer
    ) as ex:
        return ex.master_state_dict()


def test_empty_model_has_meta_params_and_real_buffers():
    model = empty_model(llama_config())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_safetensors_sharded_checkpoint_is_streamed_exactly(tmp_path):
    torch.manual_seed(3)
    source = AutoModelForCausalLM.from_config(llama_config())
    source.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    model = empty_model(source.config)
    got = masters(model, CheckpointInit(tmp_path / "ckpt", model), tmp_path)
    for name, p in source.named_parameters():
        assert torch.equal(got[name], p.detach()), name


def test_random_init_follows_hf_semantics(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=4, n_head=4, n_positions=64, initializer_range=0.05)
    model = empty_model(cfg)
    got = masters(model, RandomInit(model), tmp_path)
    ln = got["transformer.h.0.ln_1.weight"]
    assert torch.equal(ln, torch.ones_like(ln))
    assert torch.equal(got["transformer.h.1.attn.c_attn.bias"], torch.zeros(192))
    std_attn = got["transformer.h.2.attn.c_attn.weight"].std().item()
    std_proj = got["transformer.h.2.attn.c_proj.weight"].std().item()  # GPT-2 scales residual projections
    assert abs(std_attn - 0.05) < 0.005
    assert abs(std_proj - 0.05 / (2 * 4) ** 0.5) < 0.003
    assert abs(got["transformer.wte.weight"].std().item() - 0.05) < 0.005
    assert len({tuple(t.shape) for t in got.values()}) > 3
