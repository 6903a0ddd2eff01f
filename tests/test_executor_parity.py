"""Offloading must not change the math: the streaming executor against plain PyTorch.

Tiny Llama and GPT-2 (tied embeddings, dropout on) built from configs, 5 optimizer steps, every
tensor group forced through NVMe. The reference is in-memory training with torch.optim.AdamW
(fused, the same CPU kernel as ``optimizer_impl: torch``) on the same batches and RNG seed.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler import placement as placement_rules
from scheduler.executor import NonFiniteError, StreamingExecutor, TrainSettings
from scheduler.plan import Plan

VOCAB = 128
LR = 1e-3
WD = 0.01
ALL_NVME = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                prefetch_depth=1, turn_keep=0)


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                         bos_token_id=0, eos_token_id=0)  # dropout 0.1 stays on
    return AutoModelForCausalLM.from_config(cfg)


def make_batches(steps: int, ga: int, seed: int = 1) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [[{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(ga)]
            for _ in range(steps)]


def params_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters in ``dtype``, buffers (RoPE tables) as they are: a model loaded with
    ``from_pretrained(..., dtype=dtype)``."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def train_reference(model: torch.nn.Module, batches, clip: float, device: str = "cpu") -> tuple[list[float], dict]:
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD, fused=True)
    model.train()
    torch.manual_seed(123)
    losses = []
    for micro in batches:
        total = 0.0
        for b in micro:
            ids = b["input_ids"].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(micro)
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def train_engine(model, batches, plan: Plan, tmp_path, clip: float = 0.0, impl: str = "torch",
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 state_dtype: torch.dtype = torch.float32) -> tuple[list[float], dict, dict]:
    settings = TrainSettings(weight_decay=WD, max_grad_norm=clip, compute_dtype=dtype, state_dtype=state_dtype,
                             gradient_accumulation_steps=len(batches[0]))
    torch.manual_seed(123)
    losses = []
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, \
         StreamingExecutor(model, plan, store, make_adamw(impl, AdamWConfig(weight_decay=WD)), settings,
                           device=torch.device(device)) as ex:
        for micro in batches:
            losses.append(ex.train_step(micro, LR).loss)
        weights = ex.master_state_dict()
        metrics = ex.metrics()
    return losses, weights, metrics


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(("ga", "clip"), [(1, 0.0), (2, 0.0), (1, 1.0), (2, 0.5)])
def test_all_nvme_matches_pytorch(kind, ga, clip, tmp_path):
    model = tiny_model(kind)
    ref_model = copy.deepcopy(model)
    batches = make_batches(5, ga)
    ref_losses, ref_w = train_reference(ref_model, batches, clip)
    losses, w, metrics = train_engine(model, batches, ALL_NVME, tmp_path, clip)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5
    # Everything went through the SSD: optimizer states, weights, grads, activations.
    n_params = sum(t.numel() for t in ref_w.values())
    assert metrics["io_read_bytes"] >= 5 * 12 * n_params
    assert metrics["io_write_bytes"] >= 5 * 12 * n_params


PLANS = {
    "reference-mode": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                           activations=Tier.NVME, overlap=False),
    "host-tiers": Plan(weights=Tier.HOST, optimizer=Tier.HOST, grads=Tier.HOST, activations=Tier.HOST,
                       prefetch_depth=2, turn_keep=1),
    "resident-first-layers": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.HOST,
                                  activations=Tier.DEVICE, resident_layers=(0, 1), turn_keep=1),
    "no-recompute": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                         activations=Tier.DEVICE, recompute=False),
    "no-recompute-reference": Plan(weights=Tier.HOST, optimizer=Tier.NVME, grads=Tier.HOST,
                                   activations=Tier.DEVICE, recompute=False, overlap=False),
    "swapped-activations": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                                activations=Tier.NVME, recompute=False),
    "swapped-activations-reference": Plan(weights=Tier.HOST, optimizer=Tier.HOST, grads=Tier.HOST,
                                          activations=Tier.NVME, recompute=False, overlap=False),
    "selective-recompute": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                                recompute=False, recompute_layers=1),
    "small-chunks": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                         activations=Tier.NVME, chunk_numel=2048, job_slots=1),
    "state-of-first-units-in-ram": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                                        optimizer_host_units=2, turn_keep=1),
    "deep-prefetch": Plan(weights=Tier.NVME, optimizer=Tier.HOST, grads=Tier.NVME,
                          activations=Tier.NVME, prefetch_depth=3, turn_keep=2, job_slots=3),
    # updates take the master from the weights loaded for backward (several chunks per unit)
    "master-from-loads": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                              master_from_loads=True, chunk_numel=4096),
    "master-from-loads-swapped": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                                      activations=Tier.NVME, recompute=False, master_from_loads=True, turn_keep=1,
                                      optimizer_host_units=2, job_slots=1),
    "master-from-loads-reference": Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME,
                                        activations=Tier.NVME, master_from_loads=True, overlap=False),
}


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_plan_is_bitwise_identical(kind, clip, tmp_path):
    batches = make_batches(3, 2)
    base_losses, base_w, _ = train_engine(tiny_model(kind), batches, ALL_NVME, tmp_path / "base", clip)
    for name, plan in PLANS.items():
        losses, w, _ = train_engine(tiny_model(kind), batches, plan, tmp_path / name, clip)
        assert losses == base_losses, name
        for k in base_w:
            assert torch.equal(w[k], base_w[k]), (name, k)


def deep_model(kind: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                         bos_token_id=0, eos_token_id=0)  # dropout 0.1 stays on
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_swapped_activations_go_through_the_ssd_bit_for_bit(kind, clip, tmp_path, monkeypatch):
    """activations: nvme without recompute: every saved activation (dropout masks included) of
    layers 0..L-3 is written after its layer's forward and read back for its backward; the math
    is unchanged (GA 2, with and without deferred clipped updates)."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)  # tiny model: swap every tensor
    batches = make_batches(3, 2)
    kept = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.DEVICE,
                recompute=False)
    base_losses, base_w, base_m = train_engine(deep_model(kind, 5), batches, kept, tmp_path / "kept", clip)
    extra = {}
    for name in ("swapped-activations", "selective-recompute", "swapped-activations-reference"):
        losses, w, m = train_engine(deep_model(kind, 5), batches, PLANS[name], tmp_path / name, clip)
        assert losses == base_losses, name
        for k in base_w:
            assert torch.equal(w[k], base_w[k]), (name, k)
        if name != "swapped-activations-reference":  # same tiers as the baseline but for the activations
            extra[name] = m["io_write_bytes"] - base_m["io_write_bytes"]
            assert extra[name] > 0 and m["io_read_bytes"] - base_m["io_read_bytes"] == extra[name]
        else:  # HOST tiers, synchronous: the activations are all the SSD traffic
            assert m["io_write_bytes"] == m["io_read_bytes"] > 0
    # selective recompute: layer 0 recomputed, layers 1-2 swapped: two thirds of the traffic
    assert 3 * extra["selective-recompute"] == 2 * extra["swapped-activations"]


def test_swapped_activations_hold_two_layers_whatever_the_depth(tmp_path, monkeypatch):
    """Kept graphs grow with depth; swapped ones keep at most two layers' worth in memory."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    batches = make_batches(1, 1)
    # synchronous mode: the peaks do not depend on when the optimizer thread frees gradients
    kept = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.DEVICE,
                recompute=False, overlap=False)
    swapped = dataclasses.replace(kept, activations=Tier.NVME)
    peaks = {}
    for layers in (5, 8):
        for name, plan in (("kept", kept), ("swapped", swapped)):
            _, _, m = train_engine(deep_model("llama", layers), batches, plan, tmp_path / f"{name}{layers}")
            peaks[name, layers] = m["peak_device_bytes"]
    assert peaks["swapped", 5] < peaks["kept", 5]
    # three more layers: kept graphs grow by three layers' saved tensors, swapped ones only by
    # what stays anyway (each layer's input, the RoPE tables each layer saves)
    assert peaks["swapped", 8] - peaks["swapped", 5] < (peaks["kept", 8] - peaks["kept", 5]) / 4


def test_a_skipped_step_releases_swapped_activations(tmp_path, monkeypatch):
    """A non-finite loss drops the forward: its swap buffers and accounting are all released."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    batches = make_batches(2, 1)
    settings = TrainSettings(nan_policy="skip")
    with SwapStore(tmp_path / "s", PosixBackend()) as store, \
         StreamingExecutor(deep_model("llama", 5), PLANS["swapped-activations"], store,
                           make_adamw("torch", AdamWConfig()), settings) as ex:
        ex.train_step(batches[0], LR)
        ex.synchronize()
        used = dict(ex.acct.used_bytes)
        bad = [{"input_ids": batches[1][0]["input_ids"], "labels": torch.full((2, 16), -100)}]
        assert ex.train_step(bad, LR).skipped
        ex.synchronize()
        assert ex.acct.used_bytes == used
        assert not ex.train_step(batches[1], LR).skipped


def test_deepspeed_adam_matches_pytorch(tmp_path):
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    batches = make_batches(5, 1)
    ref_losses, ref_w = train_reference(ref_model, batches, 0.0)
    losses, w, _ = train_engine(model, batches, ALL_NVME, tmp_path, impl="deepspeed")
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_compute_trains(dtype, tmp_path):
    batches = make_batches(8, 1, seed=5)
    batches = [batches[0]] * 8  # one batch repeated: the loss must fall
    losses, w, _ = train_engine(tiny_model("llama"), batches, ALL_NVME, tmp_path, dtype=dtype)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05
    assert all(t.dtype == torch.float32 for t in w.values())  # masters stay fp32


@pytest.mark.parametrize("plan_name", ["all-nvme", "host-tiers", "no-recompute", "reference-mode"])
@pytest.mark.parametrize("ga", [1, 2])
def test_pure_bf16_matches_pytorch_bitwise(plan_name, ga, tmp_path):
    """model.state_dtype bfloat16: the math of a bf16 model with torch.optim.AdamW in memory
    (bf16 parameters, gradients and Adam states), bit for bit, at half the optimizer bytes."""
    plan = ALL_NVME if plan_name == "all-nvme" else PLANS[plan_name]
    model = tiny_model("llama")
    ref_model = params_to(copy.deepcopy(model), torch.bfloat16)
    batches = make_batches(4, ga)
    ref_losses, ref_w = train_reference(ref_model, batches, 0.0)
    losses, w, metrics = train_engine(model, batches, plan, tmp_path, dtype=torch.bfloat16,
                                      state_dtype=torch.bfloat16)
    assert losses == ref_losses
    for k in ref_w:
        assert w[k].dtype == torch.bfloat16
        assert torch.equal(w[k], ref_w[k]), k
    if plan_name == "all-nvme":  # master + 2 Adam states of 2 bytes, read and written per step
        n_params = sum(t.numel() for t in ref_w.values())
        assert 4 * 6 * n_params <= metrics["io_write_bytes"] < 4 * 8 * n_params + 4 * 3 * 4096 * 64


def test_pure_bf16_with_clipping_follows_pytorch(tmp_path):
    """Clipping: our global norm is reduced in float64, torch's in bf16: close, not bitwise."""
    model = tiny_model("gpt2")
    ref_model = params_to(copy.deepcopy(model), torch.bfloat16)
    batches = make_batches(4, 2)
    ref_losses, ref_w = train_reference(ref_model, batches, 0.5)
    losses, w, _ = train_engine(model, batches, ALL_NVME, tmp_path, clip=0.5, dtype=torch.bfloat16,
                                state_dtype=torch.bfloat16)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 2e-2
    assert max_diff({k: v.float() for k, v in w.items()}, {k: v.float() for k, v in ref_w.items()}) <= 2e-2


def test_device_budget_is_never_exceeded(tmp_path):
    model = tiny_model("llama")
    itemsize = 4
    layer_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * itemsize
    outer = (model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
             + model.model.norm.weight.numel()) * itemsize
    budget = outer + 3 * layer_bytes  # two layers of weights + one layer of gradients
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                prefetch_depth=3, turn_keep=0, device_budget_bytes=budget)
    _, _, metrics = train_engine(model, make_batches(2, 1), plan, tmp_path)
    assert metrics["peak_device_bytes"] <= budget
    assert metrics["peak_device_bytes"] >= outer + layer_bytes


def test_nan_loss_stop_and_skip(tmp_path):
    batches = make_batches(2, 1)
    settings = TrainSettings(nan_policy="stop")
    with SwapStore(tmp_path / "a", PosixBackend()) as store, \
         StreamingExecutor(tiny_model("llama"), ALL_NVME, store, make_adamw("torch", AdamWConfig()), settings) as ex:
        ex.train_step(batches[0], LR)
        with pytest.raises(NonFiniteError, match="loss is nan"):
            ex.train_step([{"input_ids": batches[1][0]["input_ids"],
                            "labels": torch.full((2, 16), -100)}], LR)  # no valid label: loss is nan
    settings = TrainSettings(nan_policy="skip")
    with SwapStore(tmp_path / "b", PosixBackend()) as store, \
         StreamingExecutor(tiny_model("llama"), ALL_NVME, store, make_adamw("torch", AdamWConfig()), settings) as ex:
        before = ex.master_state_dict()
        result = ex.train_step([{"input_ids": batches[1][0]["input_ids"], "labels": torch.full((2, 16), -100)}], LR)
        assert result.skipped
        assert ex.optimizer_step == 0
        after = ex.master_state_dict()
        for k in before:
            assert torch.equal(before[k], after[k])
        assert not ex.train_step(batches[0], LR).skipped


def _nan_gradient_run(tmp_path, batches, bad_step: int | None) -> tuple[StreamingExecutor, dict]:
    """Deferred (clipped) updates, GA 2: the step ``bad_step`` gets NaN head gradients from a
    finite loss and must stop; the run then goes on with the remaining batches."""
    settings = TrainSettings(weight_decay=WD, max_grad_norm=1.0, gradient_accumulation_steps=2, nan_policy="stop")
    model = tiny_model("llama")
    with SwapStore(tmp_path / f"swap-{bad_step}", PosixBackend()) as store, \
         StreamingExecutor(model, ALL_NVME, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), settings) as ex:
        for k, micro in enumerate(batches):
            if k != bad_step:
                assert not ex.train_step(micro, LR).skipped
                continue
            hook = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            with pytest.raises(NonFiniteError, match=f"gradient norm is nan at optimizer step {k + 1};"):
                ex.train_step(micro, LR)
            hook.remove()
            assert ex.optimizer_step == k  # the stopped step is not counted
        return ex, ex.master_state_dict()


def test_a_stopped_deferred_step_names_its_step_and_leaves_no_trace(tmp_path):
    """A non-finite gradient norm under clipping: the error names the step being taken (k + 1),
    and a caller that goes on finds the counter and the kept gradients as before that step: the
    next steps equal a run that never saw it, bit for bit."""
    batches = make_batches(4, 2)
    ex, weights = _nan_gradient_run(tmp_path, batches, bad_step=1)
    clean, clean_weights = _nan_gradient_run(tmp_path, [batches[0], *batches[2:]], bad_step=None)
    assert ex.optimizer_step == clean.optimizer_step == 3
    assert all(torch.equal(weights[k], clean_weights[k]) for k in weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("plan_name", ["all-nvme", "no-recompute", "host-tiers", "swapped-activations"])
def test_cuda_engine_matches_cuda_pytorch(plan_name, tmp_path, monkeypatch):
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)  # tiny model: swap every activation
    plan = ALL_NVME if plan_name == "all-nvme" else PLANS[plan_name]
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    batches = make_batches(5, 2)
    ref_losses, ref_w = train_reference(ref_model, batches, 1.0, device="cuda")
    losses, w, metrics = train_engine(model, batches, plan, tmp_path, 1.0, device="cuda")
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-4
    assert max_diff(w, ref_w) <= 1e-4  # CUDA kernels differ between fused and per-layer runs
    assert metrics["h2d_bytes"] > 0


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_frozen_parameters_stay_put(clip, tmp_path):
    model = tiny_model("llama")
    model.model.norm.weight.requires_grad_(False)  # frozen: no gradient, no AdamW step
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    ref_model = copy.deepcopy(model)
    batches = make_batches(4, 2)
    ref_losses, ref_w = train_reference(ref_model, batches, clip)
    losses, w, _ = train_engine(model, batches, ALL_NVME, tmp_path, clip)
    assert torch.equal(w["model.norm.weight"], ref_w["model.norm.weight"])
    assert torch.equal(w["model.layers.1.mlp.up_proj.weight"], ref_w["model.layers.1.mlp.up_proj.weight"])
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt_neox"])
def test_other_families_match_pytorch(family, tmp_path):
    from transformers import GPTNeoXConfig, MistralConfig, Qwen2Config

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    cfg = {"mistral": lambda: MistralConfig(num_key_value_heads=2, **small),
           "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **small),
           "gpt_neox": lambda: GPTNeoXConfig(**small)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ref_model = copy.deepcopy(model)
    batches = make_batches(3, 2)
    ref_losses, ref_w = train_reference(ref_model, batches, 1.0)
    losses, w, _ = train_engine(model, batches, ALL_NVME, tmp_path, 1.0)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5


def test_the_finiteness_check_is_exact():
    """The optimizer's gradient check takes a sum first: NaN, inf and inf - inf are caught, and a
    sum that overflows from finite elements is not taken for a non-finite gradient."""
    from scheduler.optimizer_worker import all_finite

    assert all_finite(torch.randn(10_000))
    assert all_finite(torch.full((8,), 3e38))  # sum overflows to inf; every element is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.randn(10_000)
        g[1234] = bad
        assert not all_finite(g)
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # sums to NaN


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_the_next_micro_batch_does_not_wait_for_gradients_being_stored(tmp_path, monkeypatch, clip):
    """Micro-batch by micro-batch: the jobs that store micro-batch 0's gradients may still run
    when micro-batch 1's forward starts (only updates hold a forward back). Here they cannot
    finish before it starts: each waits until layer 0 runs micro-batch 1 (at most 5 s)."""
    from scheduler.state_store import StateStore

    second_forward = threading.Event()
    waited_in_vain = []
    write_grad = StateStore.write_grad

    def held_write_grad(self, u, c, grad):  # noqa: ANN001, ANN202 - the optimizer worker's call
        if not second_forward.wait(5):
            waited_in_vain.append(u.name)
        return write_grad(self, u, c, grad)

    monkeypatch.setattr(StateStore, "write_grad", held_write_grad)
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    calls = []

    def count_forwards(*_: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            second_forward.set()

    # inside layer 0, after the executor's own hook has made its weights usable
    model.model.layers[0].input_layernorm.register_forward_pre_hook(count_forwards)
    batches = make_batches(1, 2)
    # no recompute (layer 0 runs once per micro-batch); every kept gradient may wait for the worker
    plan = dataclasses.replace(ALL_NVME, recompute=False, activations=Tier.DEVICE, job_slots=8)
    ref_losses, ref_w = train_reference(ref_model, batches, clip)
    losses, w, _ = train_engine(model, batches, plan, tmp_path, clip)
    assert waited_in_vain == []
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5


def test_a_job_drops_its_fresh_gradients_before_its_last_writes(tmp_path, monkeypatch):
    """An update job holds a unit's fresh gradients only until its last chunk is gathered: when
    that chunk's state is written back they are gone (weak references to them are dead), and
    the training still matches PyTorch."""
    import weakref

    from scheduler.grad_handoff import GradHandoff
    from scheduler.state_store import StateStore

    fresh: dict[str, list[weakref.ref]] = {}
    unit_done, write_adam = GradHandoff.unit_done, StateStore.write_adam
    alive_at_last_write: list[str] = []
    last_writes: list[str] = []

    def watch_unit_done(self, u, *args, **kwargs):  # noqa: ANN001, ANN202 - the main thread's call
        fresh[u.name] = [weakref.ref(self.params[s.name].grad) for s in u.params
                         if self.params[s.name].grad is not None]
        return unit_done(self, u, *args, **kwargs)

    def watch_write_adam(self, u, c, rows, *args, **kwargs):  # noqa: ANN001, ANN202 - the worker's call
        if c == len(self.chunks[u.index]) - 1:
            last_writes.append(u.name)
            alive_at_last_write.extend(u.name for ref in fresh[u.name] if ref() is not None)
        return write_adam(self, u, c, rows, *args, **kwargs)

    monkeypatch.setattr(GradHandoff, "unit_done", watch_unit_done)
    monkeypatch.setattr(StateStore, "write_adam", watch_write_adam)
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    batches = make_batches(2, 1)
    plan = dataclasses.replace(ALL_NVME, chunk_numel=4096)  # several chunks per unit
    ref_losses, ref_w = train_reference(ref_model, batches, 0.0)
    losses, w, _ = train_engine(model, batches, plan, tmp_path)
    assert len(last_writes) == 2 * (len(model.model.layers) + 2)  # every unit, both steps
    assert alive_at_last_write == []
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_diff(w, ref_w) <= 1e-5
