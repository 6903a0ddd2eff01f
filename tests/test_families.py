"""Every decoder family as users bring it: a checkpoint written by ``save_pretrained`` loads, trains
with its optimizer state on the SSD, and exports exactly as transformers does.

For each family a tiny config is built, saved with ``save_pretrained`` (fp32 or bf16, one file or
sharded), loaded by the engine through transformers' own conversion mapping (MoE experts fused,
GPT-NeoX's ``embed_out`` renamed, tied heads read under the embedding's name), trained for a few
steps with every tensor group on NVMe, and compared elementwise with ``from_pretrained`` + torch
AdamW in memory on the same batches. The export must carry the key names ``save_pretrained``
writes, and ``from_pretrained`` of it must give the trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cli.export import write_hf_model
from offload import AdamWConfig, SwapStore, make_adamw
from offload.io import PosixBackend
from offload.tiers import Tier
from scheduler.executor import StreamingExecutor, TrainSettings
from scheduler.hf_checkpoint import CheckpointInit
from scheduler.materialize import empty_model
from scheduler.plan import Plan

VOCAB = 128
LR = 1e-3
WD = 0.01
STEPS = 3
ALL_NVME = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.NVME,
                prefetch_depth=1, turn_keep=0)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family -> (model_type, config fields beyond SMALL, dtype the checkpoint is saved in, shard size)
FAMILIES = {
    "llama": ("llama", {}, torch.float32, None),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, torch.bfloat16, "20KB"),
    "mistral": ("mistral", {}, torch.float32, None),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, torch.float32, None),
    "qwen3": ("qwen3", {}, torch.bfloat16, None),
    "qwen3-moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  torch.float32, "40KB"),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16, None),
    "gemma2": ("gemma2", {}, torch.float32, None),
    "gemma3-text": ("gemma3_text", {}, torch.float32, None),
    "phi3": ("phi3", {}, torch.float32, None),
    "olmo2": ("olmo2", {}, torch.float32, None),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, torch.float32, "30KB"),
    "gpt-neox": ("gpt_neox", {}, torch.float32, None),
    # beyond the list: MoE and dense families transformers maps the same way, and two whose
    # layers hold persistent buffers that save_pretrained writes (Apertus' xIELU, MiniMax' decays)
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}, torch.float32, None),
    "granite-moe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.float32, None),
    "gpt-oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "layer_types": ["sliding_attention", "full_attention"]}, torch.bfloat16, None),
    "starcoder2": ("starcoder2", {}, torch.float32, None),
    "cohere2": ("cohere2", {}, torch.float32, None),
    "apertus": ("apertus", {}, torch.float32, None),
    "minimax": ("minimax", {}, torch.float32, None),
    # layers of several kinds (Mamba or linear attention beside attention): the layer probe cannot
    # run their first layers alone, the planner plans from FLOP counts, the model trains
    "jamba": ("jamba", {"num_experts": 2, "expert_layer_period": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
                        "mamba_d_state": 4, "mamba_expand": 2, "mamba_dt_rank": 4}, torch.float32, None),
    "lfm2": ("lfm2", {"layer_types": ["conv", "full_attention"], "block_ff_dim": 64}, torch.float32, None),
}
# Elements whose gradient is zero in exact arithmetic (softmax ignores a constant shift of the
# keys, so a k-projection bias gets rounding noise only): Adam turns that noise into a full-size
# step whose sign is a coin toss. They are compared against a bound of that size, not 1e-5.
ADAM_NOISE = ("k_proj.bias",)


def family_config(family: str):
    if family == "dbrx":
        return _dbrx_config()
    model_type, extra, _, _ = FAMILIES[family]
    fields = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra} \
        if model_type == "gpt2" else {**SMALL, **extra}
    return AutoConfig.for_model(model_type, **fields)


def save_checkpoint(family: str, directory: Path) -> Path:
    _, _, dtype, shard = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family))
    from scheduler.hf_checkpoint import persistent_buffers

    with torch.no_grad():  # persistent buffers unlike the model's defaults: loading must read them
        for buf in persistent_buffers(model).values():
            if buf.is_floating_point():
                buf.mul_(0.75).add_(0.01)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def make_batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (2, 16), generator=g)} for _ in range(STEPS)]


def train_in_memory(ckpt: Path, batches) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    model.train()
    torch.manual_seed(123)
    for b in batches:
        model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def saved_keys(directory: Path) -> set[str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def assert_weights_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Bulk elementwise within 1e-5; the named Adam-noise elements within two full steps."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        bound = 2 * LR * STEPS if name.endswith(ADAM_NOISE) else 1e-5
        diff = (got[name] - w).abs().max().item()
        assert diff <= bound, f"{name}: max abs diff {diff:.3g} > {bound:g}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_trains_and_exports_as_transformers(family, tmp_path):
    ckpt = save_checkpoint(family, tmp_path / "ckpt")
    batches = make_batches()
    ref = train_in_memory(ckpt, batches)
    want = {k: v.detach().clone() for k, v in ref.named_parameters()}

    model = empty_model(AutoConfig.from_pretrained(ckpt))
    init = CheckpointInit(ckpt, model)
    init.load_buffers()  # persistent buffers, as from_pretrained loads them
    settings = TrainSettings(weight_decay=WD)
    torch.manual_seed(123)
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, StreamingExecutor(
        model, ALL_NVME, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), settings,
        initializer=init,
    ) as ex:
        for b in batches:
            ex.train_step([b], LR)
        got = ex.master_state_dict()
        masters = [(u.name, list(u.params), m) for u, m in ex.unit_masters()]
        final = write_hf_model(tmp_path / "final", masters, len(masters), model, torch.float32)
        for _ in ex.unit_states():  # every state extent read back: each read checks its checksum
            pass
        probe = {"input_ids": batches[0]["input_ids"]}
        engine_loss_sum, n_targets = ex.evaluate(probe)  # the engine's own forward of the trained weights
        assert ex.metrics()["io_write_bytes"] >= STEPS * 12 * sum(v.numel() for v in got.values())

    assert_weights_match(got, want)
    ref.save_pretrained(tmp_path / "ref-saved")
    assert saved_keys(final) == saved_keys(tmp_path / "ref-saved")
    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p.detach(), got[name]), name
    with torch.no_grad():  # final/ computes what the engine computed
        logits = reloaded.eval()(input_ids=probe["input_ids"]).logits
    reloaded_sum = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), probe["input_ids"][:, 1:].flatten(),
                                                     reduction="sum").item()
    assert abs(reloaded_sum - engine_loss_sum) / n_targets <= 1e-5
    for name, buf in ref.named_buffers():  # persistent ones come from the checkpoint, as in from_pretrained
        if name in ref.state_dict():
            assert torch.equal(dict(reloaded.named_buffers())[name], buf), name
    if getattr(reloaded.config, "tie_word_embeddings", False):
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


KEPT_GRAPH = Plan(weights=Tier.NVME, optimizer=Tier.NVME, grads=Tier.NVME, activations=Tier.DEVICE,
                  recompute=False, prefetch_depth=1, turn_keep=0)


FAMILIES["dbrx"] = ("dbrx", {}, torch.float32, None)  # a router returning only its logits, which route


def _dbrx_config():  # noqa: ANN202 - nested sub-configs, unlike SMALL
    return AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                                attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("plan", [ALL_NVME, KEPT_GRAPH], ids=["recompute", "kept-graph"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "dbrx"])
def test_moe_router_aux_loss_trains_as_transformers(family, plan, tmp_path):
    """``output_router_logits``: the load-balancing loss is part of the loss, and its gradient
    reaches every router although each layer is back-propagated on its own."""
    ckpt = save_checkpoint(family, tmp_path / "ckpt")
    doc = json.loads((ckpt / "config.json").read_text())
    doc.update(output_router_logits=True, router_aux_loss_coef=0.5)  # large: its gradient must show
    (ckpt / "config.json").write_text(json.dumps(doc))
    batches = make_batches()
    ref = train_in_memory(ckpt, batches)
    without = train_in_memory(_without_aux(ckpt, tmp_path), batches)
    want = {k: v.detach().clone() for k, v in ref.named_parameters()}
    model = empty_model(AutoConfig.from_pretrained(ckpt))
    torch.manual_seed(123)
    losses = []
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=4)) as store, StreamingExecutor(
        model, plan, store, make_adamw("torch", AdamWConfig(weight_decay=WD)), TrainSettings(weight_decay=WD),
        initializer=CheckpointInit(ckpt, model),
    ) as ex:
        for b in batches:
            losses.append(ex.train_step([b], LR).loss)
        got = ex.master_state_dict()
    assert_weights_match(got, want)
    gate = next(k for k in want if ".gate." in k or k.endswith("gate.weight") or ".router." in k)
    assert (want[gate] - dict(without.named_parameters())[gate]).abs().max() > 1e-4  # the aux loss mattered
    with torch.no_grad():
        first = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        out = first(input_ids=batches[0]["input_ids"], labels=batches[0]["input_ids"])
    assert out.aux_loss is not None and abs(losses[0] - out.loss.item()) <= 1e-5


def _without_aux(ckpt: Path, tmp_path: Path) -> Path:
    import shutil

    other = tmp_path / "ckpt-no-aux"
    shutil.copytree(ckpt, other)
    doc = json.loads((other / "config.json").read_text())
    doc["output_router_logits"] = False
    (other / "config.json").write_text(json.dumps(doc))
    return other


@pytest.mark.parametrize("family", ["gemma", "gptj"])
def test_buffers_made_from_the_config_are_in_the_compute_dtype(tmp_path, family):
    """A checkpoint saved in bf16, trained in fp32: the buffers the model computes from its config
    (Gemma's embedding scale, GPT-J's rotary table) are what from_pretrained(dtype=float32) makes,
    not rounded to the checkpoint's bf16 (Gemma's scale at hidden 3072: 55.5 instead of 55.43)."""
    from cli.config import load_config
    from cli.train import build_model, load_model_config

    fields = ({"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 64} if family == "gptj"
              else {**SMALL, "hidden_size": 48, "head_dim": 16})  # scale sqrt(48): not a bf16 value
    path = tmp_path / family
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{"vocab_size": VOCAB, **fields})).to(
        torch.bfloat16).save_pretrained(path)
    (tmp_path / "run.yaml").write_text(json.dumps({"model": {"name_or_path": str(path), "dtype": "float32"},
                                                   "data": {"path": "unused.jsonl"},
                                                   "train": {"output_dir": str(tmp_path / "run")}}))
    cfg = load_config(tmp_path / "run.yaml")
    model, _ = build_model(cfg, load_model_config(cfg))
    want = dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).named_buffers())
    floating = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    assert floating
    for name, b in floating:
        assert b.dtype == want[name].dtype == torch.float32, name
        assert torch.equal(b, want[name]), name


def test_a_model_whose_first_layers_cannot_run_alone_is_planned(tmp_path, capsys):
    """Jamba's first layer is a Mamba layer: the probe's cut model has no attention to build a mask
    for. The planner says so in one note and plans from FLOP counts; the plan trains."""
    from cli.main import main

    ckpt = save_checkpoint("jamba", tmp_path / "ckpt")
    rows = make_batches()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n"
                                                  for b in rows for r in b["input_ids"]))
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"name_or_path": str(ckpt)}, "data": {"path": str(tmp_path / "train.jsonl"), "seq_len": 16},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 2, "logging_steps": 1},
        "offload": {"cpu_memory_limit": "64MB", "optimizer_impl": "torch", "io_backend": "posix"}}))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    assert "planning from FLOP counts" in capsys.readouterr().out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
