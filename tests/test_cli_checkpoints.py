"""Hub checkpoints through the command line: a tied and a MoE model written by ``save_pretrained``
train from ``model.name_or_path``, and ``final/`` and ``offload-train export`` give back what
``from_pretrained`` loads, under the names ``save_pretrained`` writes; checkpoints that do not fit
their config, and architectures the layer-by-layer cut does not fit, are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from cli.data import iterate_batches, load_token_dataset, load_tokenizer
from cli.main import main
from runs import PLAN, one_line_error
from test_families import saved_keys

LR = 1e-3
STEPS = 3
SEQ = 16
CHECKPOINTS = {
    # name: (model_type, config fields, dtype saved, shard size)
    "llama-tied": ("llama", {"tie_word_embeddings": True}, torch.bfloat16, "200KB"),
    "apertus": ("apertus", {}, torch.float32, None),  # persistent buffers (xIELU's beta and eps)
    "qwen3-moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  torch.float32, None),
}


def write_checkpoint(tmp_path: Path, name: str) -> Path:
    model_type, extra, dtype, shard = CHECKPOINTS[name]
    tokenizer = load_tokenizer(None, None)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    ckpt = tmp_path / f"{name}-ckpt"
    model = AutoModelForCausalLM.from_config(cfg)
    from scheduler.hf_checkpoint import persistent_buffers

    with torch.no_grad():  # persistent buffers unlike the defaults: they must come from the file
        for buf in persistent_buffers(model).values():
            if buf.is_floating_point():
                buf.mul_(0.5)
    model.to(dtype).save_pretrained(ckpt, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(ckpt)  # as the hub stores a model: with its tokenizer
    return ckpt


def write_config(tmp_path: Path, ckpt: Path, run: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i}: the {'quick ' * (i % 3)}layers stream through "
                                                f"the disk and back {i % 7} times."}) + "\n" for i in range(40)))
    cfg = {
        "model": {"name_or_path": str(ckpt)},
        "data": {"path": str(data), "seq_len": SEQ, "shuffle": False},
        "train": {"output_dir": str(tmp_path / run), "max_steps": STEPS, "micro_batch_size": 2,
                  "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 0.0, "logging_steps": 1, "save_steps": 0, "seed": 5},
        "offload": {"cpu_memory_limit": "24MB", "gpu_memory_limit": "16MB", "optimizer_impl": "torch",
                    "io_backend": "posix"},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())
    return path


def train_in_memory(ckpt: Path, data: Path) -> torch.nn.Module:
    """from_pretrained + torch AdamW on the batches the run reads (no shuffle, in order)."""
    dataset = load_token_dataset(data, load_tokenizer(None, str(ckpt)), SEQ, packing=True, text_field="text")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    model.train()
    for _, batch in zip(range(STEPS), iterate_batches(dataset, 2, 5, 0, shuffle=False), strict=False):
        model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_hub_checkpoint_trains_and_exports_what_from_pretrained_loads(name, tmp_path):
    ckpt = write_checkpoint(tmp_path, name)
    cfg = write_config(tmp_path, ckpt, "run")
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0
    final = tmp_path / "run" / "final"
    ref = train_in_memory(ckpt, tmp_path / "train.jsonl")
    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.randint(0, reloaded.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits, ref.eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    ref.save_pretrained(tmp_path / "ref-saved")
    reloaded.save_pretrained(tmp_path / "resaved")
    assert saved_keys(final) == saved_keys(tmp_path / "ref-saved") == saved_keys(tmp_path / "resaved")
    if reloaded.config.tie_word_embeddings:
        assert "lm_head.weight" not in saved_keys(final)
    # offload-train export of the last checkpoint: the same tensors under the same names
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    assert saved_keys(tmp_path / "exported") == saved_keys(final)
    a, b = _tensors(final), _tensors(tmp_path / "exported")
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    params = {n for n, _ in loaded.named_parameters(remove_duplicate=False)}
    for key, buf in loaded.state_dict().items():
        if key not in params:  # a persistent buffer: the checkpoint's value, both ways
            assert torch.equal(a[key].float(), buf) and torch.equal(b[key].float(), buf), key


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in directory.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def _rewrite(ckpt: Path, edit) -> None:  # noqa: ANN001 - a callable on the tensor dict
    for shard in ckpt.glob("*.safetensors"):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        present = {k for s in ckpt.glob("*.safetensors") for k in load_file(s)}
        doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if k in present}
        index.write_text(json.dumps(doc))


def test_tied_checkpoint_holding_only_the_head_or_both_names_loads(tmp_path):
    ckpt = write_checkpoint(tmp_path, "llama-tied")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    embed = ref.get_input_embeddings().weight.detach().to(torch.bfloat16)

    def head_only(t: dict) -> None:
        if t.pop("model.embed_tokens.weight", None) is not None:
            t["lm_head.weight"] = embed

    _rewrite(ckpt, head_only)
    index = ckpt / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["lm_head.weight"] = next(s.name for s in ckpt.glob("*.safetensors")
                                                if "lm_head.weight" in load_file(s))
    index.write_text(json.dumps(doc))
    from scheduler.hf_checkpoint import CheckpointInit
    from scheduler.materialize import empty_model
    from scheduler.model_map import build_model_map

    model = empty_model(AutoConfig.from_pretrained(ckpt))
    pre = build_model_map(model).pre
    got = CheckpointInit(ckpt, model)(pre)
    assert torch.equal(got["model.embed_tokens.weight"], embed.float())

    def both(t: dict) -> None:
        if "lm_head.weight" in t:
            t["model.embed_tokens.weight"] = t["lm_head.weight"].clone()

    _rewrite(ckpt, both)
    got = CheckpointInit(ckpt, model)(pre)
    assert torch.equal(got["model.embed_tokens.weight"], embed.float())


@pytest.mark.parametrize(("name", "missing"), [("qwen3-moe", "model.layers.1.mlp.experts.2.up_proj.weight"),
                                             ("llama-tied", "model.layers.0.self_attn.q_proj.weight")])
def test_checkpoint_missing_a_tensor_is_one_line(name, missing, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, name)
    _rewrite(ckpt, lambda t: t.pop(missing, None))
    cfg = write_config(tmp_path, ckpt, "run")
    capsys.readouterr()  # what writing the checkpoint printed
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    line = one_line_error(capsys)
    assert f"tensor {missing} is missing" in line and str(ckpt) in line


def test_checkpoint_whose_shapes_do_not_fit_its_config_is_one_line(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, "llama-tied")
    doc = json.loads((ckpt / "config.json").read_text())
    doc["intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(doc))
    cfg = write_config(tmp_path, ckpt, "run")
    capsys.readouterr()  # what writing the checkpoint printed
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    line = one_line_error(capsys)
    assert "model.layers.0.mlp" in line and "[64, 32]" in line and "[48, 32]" in line


@pytest.mark.parametrize(("model", "words"), [
    ({"model_type": "t5", "d_model": 32, "num_layers": 2}, "'t5'"),
    # an encoder's LM head without is_decoder: transformers builds it, with bidirectional attention
    ({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
      "intermediate_size": 64}, "bidirectional"),
])
def test_architecture_that_is_not_a_causal_lm_is_one_line(tmp_path, capsys, model, words):
    cfg = write_config(tmp_path, tmp_path, "run")
    doc = yaml.safe_load(cfg.read_text())
    doc["model"] = {"config": {**model, "vocab_size": 4096}}
    cfg.write_text(yaml.safe_dump(doc))
    for command in ("plan", "train"):
        assert main([command, str(cfg)]) == 2
        line = one_line_error(capsys)
        assert words in line and "causal LM" in line


def test_architecture_passing_trainable_tensors_between_layers_is_one_line(tmp_path, capsys):
    # Gemma 3n computes per-layer inputs from a trainable embedding before the layers and hands
    # them to every layer: a gradient the layer-by-layer cut cannot route.
    cfg = write_config(tmp_path, tmp_path, "run")
    doc = yaml.safe_load(cfg.read_text())
    doc["model"] = {"config": {
        "model_type": "gemma3n_text", "vocab_size": len(load_tokenizer(None, None)), "vocab_size_per_layer_input": 64,
        "hidden_size": 32, "hidden_size_per_layer_input": 8, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "laurel_rank": 4,
        "num_kv_shared_layers": 0, "activation_sparsity_pattern": [0.0, 0.0],
        "layer_types": ["sliding_attention", "full_attention"]}}
    doc["offload"]["cpu_memory_limit"] = "2GB"
    cfg.write_text(yaml.safe_dump(doc))
    # plan: the layer probe's forward finds it, before any weight of the run exists; train with a
    # replayed plan (no probe): the first layer's forward, before the first update
    for argv in (["plan", str(cfg)], ["train", str(cfg), "--plan", str(tmp_path / "plan.json")]):
        capsys.readouterr()
        assert main(argv) == 2
        line = one_line_error(capsys)
        assert "Gemma3nForCausalLM" in line and "layer by layer" in line


def test_quantized_checkpoint_is_one_line(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, "llama-tied")
    doc = json.loads((ckpt / "config.json").read_text())
    doc["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (ckpt / "config.json").write_text(json.dumps(doc))
    cfg = write_config(tmp_path, ckpt, "run")
    capsys.readouterr()
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    line = one_line_error(capsys)
    assert "quantized" in line and "fp8" in line


def test_tied_config_with_a_different_head_in_the_checkpoint_is_one_line(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, "llama-tied")

    def other_head(t: dict) -> None:
        if "model.embed_tokens.weight" in t:
            t["lm_head.weight"] = t["model.embed_tokens.weight"] * 2

    _rewrite(ckpt, other_head)
    index = ckpt / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["lm_head.weight"] = doc["weight_map"]["model.embed_tokens.weight"]
    index.write_text(json.dumps(doc))
    cfg = write_config(tmp_path, ckpt, "run")
    capsys.readouterr()
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    line = one_line_error(capsys)
    assert "different tensors for lm_head.weight and model.embed_tokens.weight" in line
    assert "tie_word_embeddings: false" in line


def test_generation_config_buffers_and_fused_layout_survive_train_and_export(tmp_path):
    """The checkpoint's generation config (sampling settings, eos ids) reaches final/ and the
    export; a MoE checkpoint already in transformers' fused layout is written fused, as
    save_pretrained writes a model loaded from it."""
    from transformers import GenerationConfig

    ckpt = write_checkpoint(tmp_path, "qwen3-moe")
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[2, 5]).save_pretrained(ckpt)
    fused = tmp_path / "fused-ckpt"
    native = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    native.save_pretrained(fused, save_original_format=False)  # transformers 5's own (fused) names
    load_tokenizer(None, None).save_pretrained(fused)
    assert any(k.endswith("experts.gate_up_proj") for k in saved_keys(fused))
    for source in (ckpt, fused):
        run = f"run-{source.name}"
        cfg = write_config(tmp_path, source, run)
        assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0
        assert main(["export", str(tmp_path / run), str(tmp_path / f"{run}-export")]) == 0
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        reference.save_pretrained(tmp_path / f"{run}-ref")
        for out in (tmp_path / run / "final", tmp_path / f"{run}-export"):
            assert saved_keys(out) == saved_keys(tmp_path / f"{run}-ref"), out
            gen = GenerationConfig.from_pretrained(out)
            assert (gen.do_sample, gen.temperature, gen.top_p, gen.eos_token_id) == (True, 0.6, 0.9, [2, 5])
