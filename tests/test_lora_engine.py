"""LoRA on a frozen, streamed base: the engine against PEFT + torch.optim.AdamW in memory.

The base weights are a frozen part of each unit: stored once in the compute dtype, streamed,
never written, no optimizer state; the adapters are the trainable part, resident, updated by the
same CPU AdamW."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.plan import Plan
from test_families import FAMILIES, family_config

VOCAB = 128
LR = 1e-2
WD = 0.01
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


def adapter_dir(tmp_path, base, dropout: float = 0.0, targets: list[str] | str = TARGETS):
    """A PEFT adapter folder with nonzero B (both factors learn from step 1)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out


def peft_model(base, path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=True)


def batches(steps: int, ga: int) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    return [[{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(ga)] for _ in range(steps)]


def train_peft(model, data, clip: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WD, fused=True)
    model.train()
    torch.manual_seed(123)
    losses = []
    for micro in data:
        total = 0.0
        for b in micro:
            loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss / len(micro)
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_engine(model, data, plan: Plan, tmp_path, clip: float):
    settings = TrainSettings(weight_decay=WD, max_grad_norm=clip, gradient_accumulation_steps=len(data[0]))
    torch.manual_seed(123)
    losses = []
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, \
         StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), settings) as ex:
        frozen_before = {u.name: f.clone() for u, f in _frozen(ex)}
        for micro in data:
            losses.append(ex.train_step(micro, LR).loss)
        weights = ex.master_state_dict()
        frozen_after = {u.name: f.clone() for u, f in _frozen(ex)}
        swap_bytes = store.allocated_bytes
        units = ex.units
    return losses, weights, (frozen_before, frozen_after), swap_bytes, units


def _frozen(ex):
    for u in ex.units:
        if u.frozen:
            yield u, ex.weights.frozen_weights(u)


BASE_ON_SSD = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.DEVICE, turn_keep=0)


@pytest.mark.parametrize(("ga", "clip", "layer_major"), [(1, 0.0, False), (2, 1.0, False), (3, 1.0, True)])
@pytest.mark.parametrize("recompute", [True, False])
def test_lora_on_a_streamed_base_matches_peft(tmp_path, ga, clip, layer_major, recompute):
    base = base_model()
    path = adapter_dir(tmp_path, base)
    data = batches(4, ga)
    ref_losses, ref = train_peft(peft_model(base, path), data, clip)
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.DEVICE, turn_keep=0,
                recompute=recompute, layer_major=layer_major)
    losses, got, (before, after), swap_bytes, units = train_engine(peft_model(base, path), data, plan, tmp_path, clip)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    trainable = [n for n in ref if "lora_" in n]
    assert trainable and all(n in got for n in trainable)
    assert max((got[n] - ref[n]).abs().max().item() for n in trainable) <= 1e-5
    assert any((ref[n] - dict(peft_model(base, path).named_parameters())[n]).abs().max() > 1e-4 for n in trainable)
    # the base: bit for bit what it was, and every base tensor equal to PEFT's (never updated)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(got[n], ref[n]) for n in ref if "lora_" not in n)
    # no state for the base: the swap holds the base once (fp32 here) plus the adapters' state
    base_numel = sum(u.frozen_numel for u in units)
    adapter_numel = sum(u.numel for u in units)
    assert base_numel > 5 * adapter_numel
    assert swap_bytes <= 4 * base_numel + 16 * adapter_numel  # full fine-tuning: 16 B per parameter


def test_lora_dropout_masks_match_under_recompute(tmp_path):
    """lora_dropout > 0: the recomputed layer draws the masks of its forward (same RNG state)."""
    base = base_model()
    path = adapter_dir(tmp_path, base, dropout=0.1)
    data = batches(3, 1)
    ref_losses, ref = train_peft(peft_model(base, path), data, 0.0)
    losses, got, *_ = train_engine(peft_model(base, path), data, BASE_ON_SSD, tmp_path, 0.0)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max((got[n] - ref[n]).abs().max().item() for n in ref if "lora_" in n) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_every_family_matches_peft(tmp_path, family):
    """all-linear adapters (GPT-2's Conv1D, MoE routers and attention) on the families of
    tests/test_families.py: the streamed engine against PEFT + AdamW in memory."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(family_config(family))
    path = adapter_dir(tmp_path, base, targets="all-linear")
    data = batches(3, 2)
    ref_losses, ref = train_peft(peft_model(base, path), data, 1.0)
    losses, got, (before, after), *_ = train_engine(peft_model(base, path), data, BASE_ON_SSD, tmp_path, 1.0)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    trainable = [n for n in ref if "lora_" in n]
    assert max((got[n] - ref[n]).abs().max().item() for n in trainable) <= 1e-5
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_on_a_bf16_base_trains(tmp_path):
    """bf16 compute: the base stored and streamed in bf16, the adapters' master and AdamW state in
    fp32; the loss goes down and the base stays bit for bit."""
    base = base_model()
    path = adapter_dir(tmp_path, base)
    model = peft_model(base, path)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    settings = TrainSettings(weight_decay=WD, compute_dtype=torch.bfloat16)
    data = batches(1, 1) * 6  # the same batch: the loss must fall
    with SwapStore(tmp_path / "swap", PosixBackend()) as store, \
         StreamingExecutor(model, BASE_ON_SSD, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), settings) as ex:
        frozen = {u.name: f.clone() for u, f in _frozen(ex)}
        assert all(f.dtype == torch.bfloat16 for f in frozen.values())
        losses = [ex.train_step(micro, LR).loss for micro in data]
        assert all(torch.equal(frozen[u.name], f) for u, f in _frozen(ex))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05
