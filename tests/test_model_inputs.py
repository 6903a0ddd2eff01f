"""The batch's model inputs reach the streamed model as they reach it in memory (GPT-2's
``token_type_ids``), and evaluation reports the loss the model itself returns (an MoE model's
router loss included, as Trainer's ``evaluate()`` reports it)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, MixtralConfig

from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.hf_checkpoint import CheckpointInit
from scheduler.materialize import empty_model
from scheduler.model_inputs import model_inputs
from scheduler.plan import Plan

ALL_NVME = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                device_budget_bytes=8 << 20, host_budget_bytes=8 << 20, chunk_numel=4096)
LR = 1e-3


def _streamed(ckpt, tmp_path):  # noqa: ANN202 - (executor context, its store)
    model = empty_model(AutoConfig.from_pretrained(ckpt))
    init = CheckpointInit(ckpt, model)
    init.load_buffers()
    store = SwapStore(tmp_path / "swap", PosixBackend(num_threads=2))
    ex = StreamingExecutor(model, ALL_NVME, store, make_adamw("torch", AdamWConfig(weight_decay=0.0)),
                           TrainSettings(weight_decay=0.0), initializer=init)
    return store, ex


def test_token_type_ids_train_as_in_memory(tmp_path):
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g),
                "token_type_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(3)]

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0, fused=True)
    want_losses = []
    for b in batches:
        loss = ref(**b, labels=b["input_ids"], use_cache=False).loss
        want_losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()

    store, ex = _streamed(tmp_path / "ckpt", tmp_path)
    with store, ex:
        got_losses = [ex.train_step([b], LR).loss for b in batches]
        got = ex.master_state_dict()
    assert got_losses == pytest.approx(want_losses, abs=1e-6)
    for name, p in ref.named_parameters():
        assert (got[name] - p.detach()).abs().max().item() <= 1e-5, name


def test_moe_evaluation_includes_the_router_loss_as_the_model_does(tmp_path):
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, labels=ids, use_cache=False)
    assert out.aux_loss.item() > 0

    store, ex = _streamed(tmp_path / "ckpt", tmp_path)
    with store, ex:
        loss_sum, n_targets = ex.evaluate({"input_ids": ids})
    assert n_targets == ids[:, 1:].numel()
    assert loss_sum / n_targets == pytest.approx(out.loss.item(), abs=1e-5)


def test_inputs_that_bypass_the_streamed_embeddings_are_refused():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "inputs_embeds": torch.zeros(1, 4, 16)}
    with pytest.raises(ValueError, match="inputs_embeds"):
        model_inputs(model, batch, torch.device("cpu"))
    kwargs = model_inputs(model, {"input_ids": batch["input_ids"], "length": torch.tensor([4]),
                                  "token_type_ids": batch["input_ids"]}, torch.device("cpu"))
    assert set(kwargs) == {"input_ids", "use_cache", "token_type_ids"}  # not a forward argument: left out
