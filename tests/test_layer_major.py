"""Layer-major gradient accumulation: every layer loaded once per step, the same weights.

``plan.layer_major`` runs a step's micro-batches layer by layer (``scheduler.lockstep``), summing
each unit's gradients on DEVICE. The reference is today's micro-batch-by-micro-batch accumulation
(itself checked against plain PyTorch in test_executor_parity): the sums are the same additions in
the same order, so weights and losses must be bitwise equal, under every plan, with clipping,
with swapped activations, with MoE router losses and in mixed precision.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from test_executor_parity import (
    ALL_NVME,
    LR,
    PLANS,
    WD,
    make_batches,
    max_diff,
    tiny_model,
    train_engine,
)
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler import placement as placement_rules
from scheduler.executor import NonFiniteError, StreamingExecutor, TrainSettings
from scheduler.plan import Plan


def layer_major(plan: Plan) -> Plan:
    return dataclasses.replace(plan, layer_major=True)


def assert_same_training(model, batches, plan: Plan, tmp_path, **kw) -> dict:
    """Micro-batch order and layer-major order from the same start: bitwise equal weights and
    losses. Returns the layer-major run's metrics."""
    twin = copy.deepcopy(model)
    losses, weights, _ = train_engine(model, batches, plan, tmp_path / "micro-batch-major", **kw)
    lm_losses, lm_weights, metrics = train_engine(twin, batches, layer_major(plan), tmp_path / "layer-major", **kw)
    assert lm_losses == losses
    assert max_diff(lm_weights, weights) == 0.0
    return metrics


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_layer_major_equals_micro_batch_order_bit_for_bit(plan_name, clip, tmp_path):
    assert_same_training(tiny_model("llama"), make_batches(3, 3), PLANS[plan_name], tmp_path, clip=clip)


def test_tied_embeddings_and_swapped_activations(tmp_path, monkeypatch):
    """GPT-2 (tied head: the embedding's gradient comes from both ends of every micro-batch),
    every saved activation swapped through the SSD."""
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # dropout draws masks in another order
    model = AutoModelForCausalLM.from_config(cfg)
    metrics = assert_same_training(model, make_batches(2, 4), PLANS["swapped-activations"], tmp_path, clip=1.0)
    assert metrics["io_write_bytes"] > 0


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["mixed", "pure-bf16"])
def test_low_precision_sums_in_the_state_dtype(state_dtype, tmp_path):
    """bf16 compute: gradients add up in the state dtype (fp32 for mixed precision), as the
    optimizer worker adds them; not in bf16."""
    plan = PLANS["small-chunks"]
    assert_same_training(tiny_model("llama"), make_batches(2, 4), plan, tmp_path, clip=1.0, dtype=torch.bfloat16,
                         state_dtype=state_dtype)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept-graph"])
@pytest.mark.parametrize("family", ["mixtral", "dbrx"])
def test_moe_router_losses_follow_each_micro_batch(family, recompute, tmp_path):
    """``output_router_logits``: each micro-batch's load-balancing loss reaches its routers."""
    torch.manual_seed(0)
    if family == "dbrx":
        cfg = AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=128,
                                   attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                   ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
                                   output_router_logits=True, router_aux_loss_coef=0.5)
    else:
        cfg = AutoConfig.for_model("mixtral", vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                   router_aux_loss_coef=0.5)
    plan = dataclasses.replace(ALL_NVME, recompute=recompute, activations=Tier.NVME if recompute else Tier.DEVICE)
    assert_same_training(AutoModelForCausalLM.from_config(cfg), make_batches(2, 3), plan, tmp_path)


def _read_per_step(tmp_path, ga: int, grads: Tier = Tier.NVME) -> int:
    """SSD bytes read by the second step (the first one also writes the initial state)."""
    plan = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=grads, activations=Tier.DEVICE,
                layer_major=True, chunk_numel=8192)
    settings = TrainSettings(gradient_accumulation_steps=ga)
    batches = make_batches(2, ga)
    with SwapStore(tmp_path / f"swap-{ga}", PosixBackend()) as store, \
         StreamingExecutor(tiny_model("llama"), plan, store, make_adamw("torch", AdamWConfig()), settings) as ex:
        ex.train_step(batches[0], LR)
        ex.synchronize()
        before = ex.metrics()["io_read_bytes"]
        ex.train_step(batches[1], LR)
        ex.synchronize()
        return ex.metrics()["io_read_bytes"] - before


def test_ssd_reads_per_step_do_not_grow_with_accumulation(tmp_path):
    """Weights and optimizer states on the SSD: GA 4 reads what GA 1 reads (within 1.2x), where
    micro-batch order would read the layers four times and park gradients between."""
    one, four = _read_per_step(tmp_path, 1), _read_per_step(tmp_path, 4)
    assert 0 < one <= four <= 1.2 * one
    # the embeddings' and head's gradients (handed over every micro-batch) kept in RAM: not a byte more
    one, four = _read_per_step(tmp_path / "ram", 1, Tier.HOST), _read_per_step(tmp_path / "ram", 4, Tier.HOST)
    assert 0 < one == four


def test_micro_step_keeps_batches_until_the_last(tmp_path):
    """Loops that drive micro-batches themselves (OffloadTrainer): the earlier calls return 0.0,
    the last one the step's loss, and the weights equal train_step's."""
    batches = make_batches(2, 3)
    plan = layer_major(ALL_NVME)
    _, want, _ = train_engine(tiny_model("llama"), batches, plan, tmp_path / "train-step")
    settings = TrainSettings(weight_decay=WD, gradient_accumulation_steps=3)
    torch.manual_seed(123)
    with SwapStore(tmp_path / "swap", PosixBackend()) as store, \
         StreamingExecutor(tiny_model("llama"), plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)),
                           settings) as ex:
        for micro in batches:
            returned = [ex.micro_step(b, LR, last=k == 2, n_micro=3) for k, b in enumerate(micro)]
            assert returned[:2] == [0.0, 0.0] and returned[2] > 0
            ex.finish_step(LR)
        got = ex.master_state_dict()
    assert max_diff(got, want) == 0.0


def _executor(tmp_path, name: str, nan_policy: str, plan: Plan = ALL_NVME) -> StreamingExecutor:
    settings = TrainSettings(gradient_accumulation_steps=3, nan_policy=nan_policy)
    store = SwapStore(tmp_path / name, PosixBackend()).open()
    return StreamingExecutor(tiny_model("llama"), layer_major(plan), store, make_adamw("torch", AdamWConfig()), settings)


def _nan_micro_batches(batches: list[dict]) -> list[dict]:
    """The middle micro-batch has no target: its loss is NaN."""
    return [batches[0], {"input_ids": batches[1]["input_ids"], "labels": torch.full((2, 16), -100)}, batches[2]]


@pytest.mark.parametrize("plan_name", ["all-nvme", "swapped-activations"])
def test_a_non_finite_micro_batch_skips_the_step_and_frees_everything(plan_name, tmp_path, monkeypatch):
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    batches = make_batches(2, 3)
    plan = ALL_NVME if plan_name == "all-nvme" else PLANS[plan_name]
    with _executor(tmp_path, "skip", "skip", plan) as ex:
        held = dict(ex.acct.used_bytes)
        before = ex.master_state_dict()
        result = ex.train_step(_nan_micro_batches(batches[0]), LR)
        assert result.skipped and ex.optimizer_step == 0
        assert dict(ex.acct.used_bytes) == held
        assert all(torch.equal(before[k], v) for k, v in ex.master_state_dict().items())
        assert not ex.train_step(batches[1], LR).skipped
    with _executor(tmp_path, "stop", "stop") as ex, pytest.raises(NonFiniteError, match="loss is nan at optimizer step 1"):
        ex.train_step(_nan_micro_batches(batches[0]), LR)


def test_an_error_in_one_forward_stops_the_others_and_leaves_nothing(tmp_path):
    """A micro-batch whose ids do not fit the embedding: its error reaches the caller, the other
    micro-batches' forwards unwind, every byte is given back, and the next step trains."""
    batches = make_batches(2, 3)
    bad = [batches[0][0], {"input_ids": torch.full((2, 16), 10_000)}, batches[0][2]]
    with _executor(tmp_path, "error", "stop") as ex:
        held = dict(ex.acct.used_bytes)
        with pytest.raises(IndexError):
            ex.train_step(bad, LR)
        assert not ex.activations.calls
        assert not [t for t in threading.enumerate() if t.name.startswith("micro-batch-")]
        assert not ex.train_step(batches[1], LR).skipped  # (it uses the layer prefetched before the error)
        assert ex.optimizer_step == 1
        ex.synchronize()
        assert dict(ex.acct.used_bytes) == held


def test_lockstep_runs_tasks_in_turns_and_stops_them_on_an_error():
    from scheduler.lockstep import Lockstep

    lockstep, order = Lockstep(), []

    def task(steps: int):  # noqa: ANN202
        def run() -> int:
            m = lockstep.index()
            for k in range(steps):
                order.append((k, m))
                lockstep.turn()
            return m
        return run

    assert lockstep.run([task(3), task(3), task(2)]) == [0, 1, 2]
    # stage by stage (all tasks' step k before any step k + 1); a finished task leaves the ring
    assert order == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    reached = []

    def failing() -> None:
        lockstep.turn()
        raise RuntimeError("micro-batch 1 failed")

    def waiting() -> None:
        for _ in range(3):
            lockstep.turn()
            reached.append(lockstep.index())

    with pytest.raises(RuntimeError, match="micro-batch 1 failed"):
        lockstep.run([waiting, failing, waiting])
    assert reached == [0]  # task 0 ran to its next turn before task 1 failed; the others stopped there
    assert not lockstep.active


def test_a_skipped_step_whose_clean_up_fails_leaves_no_gradient_sums_behind(tmp_path):
    """A non-finite micro-batch skips the step; if letting go of its activations then fails (a
    disk error on a swap write), the error is raised, and still no gradient summed before the
    skip reaches the next step: it trains as if the skipped step had been skipped cleanly."""
    batches = make_batches(2, 3)
    with _executor(tmp_path, "clean", "skip") as ex:
        assert ex.train_step(_nan_micro_batches(batches[0]), LR).skipped
        ex.train_step(batches[1], LR)
        want = ex.master_state_dict()
    with _executor(tmp_path, "failing", "skip") as ex:
        real_drop = ex.activations.drop

        def failing_drop():
            real_drop()
            raise OSError(5, "Input/output error")

        ex.activations.drop = failing_drop
        with pytest.raises(OSError):
            ex.train_step(_nan_micro_batches(batches[0]), LR)
        ex.activations.drop = real_drop
        ex.train_step(batches[1], LR)
        got = ex.master_state_dict()
    assert max_diff(got, want) == 0.0


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["mixed", "fp32"])
def test_a_layers_sums_are_counted_while_they_live_and_held_one_layer_at_a_time(compute_dtype, tmp_path):
    """bf16 compute with fp32 state: a decoder layer's sums are fp32 copies, new DEVICE memory
    (twice its gradients' bytes) from its first micro-batch to its optimizer job. Sampled each
    time autograd hands over a parameter's gradient: every live byte of them is counted, no
    fresh gradient of a layer waits beside them (each is added as it comes), only one layer's
    sums live at once, the embeddings and head never have any (their gradients go to the worker
    every micro-batch), and nothing stays counted after the step. With fp32 compute the first
    micro-batch's gradient is the sum: nothing new to count."""
    settings = TrainSettings(gradient_accumulation_steps=3, compute_dtype=compute_dtype, state_dtype=torch.float32)
    store = SwapStore(tmp_path / "swap", PosixBackend()).open()
    samples: list[tuple[int, int, int, set[int]]] = []
    with StreamingExecutor(tiny_model("llama"), layer_major(PLANS["small-chunks"]), store,
                           make_adamw("torch", AdamWConfig()), settings) as ex:
        held = dict(ex.acct.used_bytes)
        layer_params = [ex.weights.params[s.name] for u in ex.units[1:-1] for s in u.params]

        def sample(_p):  # runs after the executor's own hook on the parameter (registered first)
            sums = ex.handoff._sums
            live = sum(t.numel() * t.element_size() for ts in sums.values() for t in ts
                       if t is not None and t.dtype != compute_dtype)
            fresh = sum(q.grad.numel() for q in layer_params if q.grad is not None)
            samples.append((live, sum(ex.handoff._sum_bytes.values()), fresh, set(sums)))

        handles = [p.register_post_accumulate_grad_hook(sample) for p in layer_params]
        try:
            ex.train_step(make_batches(1, 3)[0], LR)
        finally:
            for h in handles:
                h.remove()
        ex.synchronize()  # (the last updates run on the worker)
        assert dict(ex.acct.used_bytes) == held
    assert samples
    largest = max(u.numel for u in ex.units[1:-1])
    assert all(live <= counted for live, counted, _, _ in samples)
    assert max(live for live, *_ in samples) == (largest * 4 if compute_dtype == torch.bfloat16 else 0)
    assert all(fresh == 0 for _, _, fresh, _ in samples)
    assert all(len(units) == 1 and not units & {0, len(ex.units) - 1} for *_, units in samples)


def test_a_tied_heads_gradients_wait_in_counted_host_buffers(tmp_path):
    """GPT-2 (tied head), layer-major: the head's part of the embedding's gradient waits, per
    micro-batch, for the embeddings' backward in host buffers counted in HOST (kept for the next
    step's), never on DEVICE; a skipped step lets them go all the same."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    settings = TrainSettings(gradient_accumulation_steps=3, nan_policy="skip")
    store = SwapStore(tmp_path / "swap", PosixBackend()).open()
    batches = make_batches(2, 3)
    part_bytes = -(-cfg.vocab_size * cfg.n_embd * 4 // 4096) * 4096  # (whole pages)
    with StreamingExecutor(AutoModelForCausalLM.from_config(cfg), layer_major(ALL_NVME), store,
                           make_adamw("torch", AdamWConfig()), settings) as ex:
        held = dict(ex.acct.used_bytes)
        parked: list[int] = []
        real_restore = ex.tied.restore

        def restore(m):  # the real one, watched: what HOST holds for the parts before each goes back
            parked.append(ex.acct.used_bytes[Tier.HOST] - held[Tier.HOST])
            real_restore(m)

        ex.tied.restore = restore
        assert ex.train_step(_nan_micro_batches(batches[0]), LR).skipped  # parked, then let go
        assert ex.acct.used_bytes[Tier.DEVICE] == held[Tier.DEVICE]
        ex.train_step(batches[1], LR)
        ex.synchronize()
        assert ex.acct.used_bytes[Tier.DEVICE] == held[Tier.DEVICE]
        assert ex.acct.used_bytes[Tier.HOST] - held[Tier.HOST] == 3 * part_bytes  # kept for reuse
        assert not ex.tied._parked
    assert parked == [3 * part_bytes] * 3  # one part per micro-batch of the step that ran


def test_a_failed_copy_back_of_a_tied_part_gives_every_buffer_back(tmp_path, monkeypatch):
    """A tied part that cannot be brought back (the device out of memory) fails the step; every
    parked buffer still goes back to the pool (none held uncounted, none handed out twice), and
    the next steps reuse the same buffers."""
    import scheduler.tied_grads as tied_grads

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    store = SwapStore(tmp_path / "swap", PosixBackend()).open()
    batches = make_batches(3, 3)
    with StreamingExecutor(AutoModelForCausalLM.from_config(cfg), layer_major(ALL_NVME), store,
                           make_adamw("torch", AdamWConfig()), TrainSettings(gradient_accumulation_steps=3)) as ex:
        ex.train_step(batches[0], LR)
        ex.synchronize()
        used = dict(ex.acct.used_bytes)
        pool_bytes = ex.tied.pool.held_bytes
        calls = [0]

        class FailingTorch:  # the module's torch, with its second allocation of a copy back failing
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def empty(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 2:
                    raise torch.OutOfMemoryError("injected")
                return torch.empty(*args, **kwargs)

        monkeypatch.setattr(tied_grads, "torch", FailingTorch())
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            ex.train_step(batches[1], LR)
        monkeypatch.setattr(tied_grads, "torch", torch)
        assert calls[0] == 2
        assert ex.tied.pool.kept_bytes == pool_bytes  # all three back
        ex.train_step(batches[2], LR)
        ex.synchronize()
        assert dict(ex.acct.used_bytes) == used and ex.tied.pool.held_bytes == pool_bytes



def _odd_sized_llama() -> torch.nn.Module:
    """Norm weights of 36 and MLP rows of 52 elements: AdamW calls with a remainder past the
    kernel's last whole vector, whose elements the fused kernel rounds differently."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=36, intermediate_size=52, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


def _states(model, batches, plan: Plan, tmp_path) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every parameter's (weight, exp_avg, exp_avg_sq) after training with the engine."""
    settings = TrainSettings(weight_decay=WD, gradient_accumulation_steps=len(batches[0]))
    torch.manual_seed(123)
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, \
         StreamingExecutor(model, plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), settings) as ex:
        for micro in batches:
            ex.train_step(micro, LR)
        return {s.name: tuple(t[s.offset : s.offset + s.numel].clone() for t in flats)
                for u, *flats in ex.unit_states() for s in u.params}


def _pytorch_states(model, batches) -> dict[str, tuple[torch.Tensor, ...]]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    torch.manual_seed(123)
    for micro in batches:
        for b in micro:
            (model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss / len(micro)).backward()
        opt.step()
        opt.zero_grad()
    return {n: (p.detach().reshape(-1), opt.state[p]["exp_avg"].reshape(-1), opt.state[p]["exp_avg_sq"].reshape(-1))
            for n, p in model.named_parameters()}


def _unequal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if not all(torch.equal(x, y) for x, y in zip(a[n], b[n], strict=True))]


def test_odd_sized_parameters_keep_the_same_optimizer_state_in_both_orders_and_as_pytorch(tmp_path):
    # Layer-major steps read the gradient sums in place, micro-batch order's last job copies the
    # stored sum into the staging row; without accumulation the gradients are read in place:
    # AdamW must be called alike on every path, once per parameter, as torch.optim.AdamW does.
    model = _odd_sized_llama()
    batches = make_batches(3, 2)
    by_micro_batch = _states(copy.deepcopy(model), batches, ALL_NVME, tmp_path / "micro-batch")
    assert _unequal(_states(copy.deepcopy(model), batches, layer_major(ALL_NVME), tmp_path / "layer-major"),
                    by_micro_batch) == []
    assert _unequal(by_micro_batch, _pytorch_states(copy.deepcopy(model), batches)) == []
    single = make_batches(3, 1)
    assert _unequal(_states(copy.deepcopy(model), single, ALL_NVME, tmp_path / "ga1"),
                    _pytorch_states(model, single)) == []
