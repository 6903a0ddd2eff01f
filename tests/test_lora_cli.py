"""``offload-train train`` with a ``peft`` section against Hugging Face Trainer on a PEFT model.

The same rows and settings as ``test_trainer_peer`` (masked prompts, variable lengths, GA 2,
warm-up, clipping, weight decay); the base is a Llama checkpoint written by ``save_pretrained``,
the adapter a PEFT folder with nonzero B. The run streams the frozen base through the SSD; its
``final/`` is a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from cli.main import main
from runs import PLAN, one_line_error, read_metrics
from test_trainer_peer import GA, MBS, SEQ, SETTINGS, STEPS, VOCAB, _InOrder, _Losses, padded, rows

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    path = tmp_path / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def make_adapter(tmp_path: Path, base: Path, r: int = 4) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS,
                                                          task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    out = tmp_path / f"adapter-r{r}"
    wrapped.save_pretrained(out)
    return out


def run_config(tmp_path: Path, base: Path, peft_section: dict, name: str = "run") -> Path:
    data = rows()
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = {
        "model": {"name_or_path": str(base)},
        "data": {"path": str(tmp_path / "sft.jsonl"), "seq_len": SEQ, "shuffle": False, "packing": False},
        "train": {"output_dir": str(tmp_path / name), "max_steps": STEPS, "micro_batch_size": MBS,
                  "gradient_accumulation_steps": GA, "logging_steps": 1, "save_steps": 2, "seed": 0, **SETTINGS},
        "offload": {"cpu_memory_limit": "24MB", "optimizer_impl": "torch", "io_backend": "posix"},
        "peft": peft_section,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())  # every tensor group through the SSD
    return path


def train_with_trainer(base: Path, adapter: Path, out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           adapter, is_trainable=True)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=MBS, gradient_accumulation_steps=GA,
                             max_steps=STEPS, optim="adamw_torch", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, **SETTINGS)
    losses = _Losses()
    _InOrder(model=model, args=args, train_dataset=[padded(r) for r in rows()], callbacks=[losses]).train()
    return losses.losses, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def adapter_weights(folder: Path, base: Path) -> dict[str, torch.Tensor]:
    """The adapter as PEFT loads it onto the base."""
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.slow
def test_lora_run_matches_trainer_with_peft(tmp_path):
    base = make_base(tmp_path)
    adapter = make_adapter(tmp_path, base)
    cfg = run_config(tmp_path, base, {"adapter_name_or_path": str(adapter)})
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0

    want_losses, want = train_with_trainer(base, adapter, tmp_path / "trainer")
    got_losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert [round(x, 4) for x in got_losses] == [round(x, 4) for x in want_losses]
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    got = adapter_weights(final, base)
    start = adapter_weights(adapter, base)
    assert got.keys() == want.keys() == start.keys()
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() <= 1e-5, name
    assert max((got[n] - start[n]).abs().max().item() for n in got) > 1e-4  # both factors learned
    # export: the adapter of the last checkpoint (= final/), and --merge: what PEFT's
    # merge_and_unload gives, in the hub layout, loadable by from_pretrained
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapter-out")]) == 0
    exported = adapter_weights(tmp_path / "adapter-out", base)
    assert all(torch.equal(exported[n], got[n]) for n in got)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge", "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    want_merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                                 final).merge_and_unload()
    merged_w, want_w = dict(merged.named_parameters()), dict(want_merged.named_parameters())
    assert merged_w.keys() == want_w.keys()
    assert max((merged_w[k] - want_w[k]).abs().max().item() for k in want_w) <= 1e-6
    ids = torch.tensor([padded(rows()[0])["input_ids"].tolist()])
    assert torch.allclose(merged(input_ids=ids).logits, want_merged(input_ids=ids).logits, atol=1e-5)
    # the swap holds the base's weights once, no state for them: far below 16 B per base parameter
    base_numel = sum(t.numel() for t in load_file(base / "model.safetensors").values())
    swap = sum(f.stat().st_size for f in (tmp_path / "run" / "swap").glob("data-*.bin"))
    assert swap < 8 * base_numel


@pytest.mark.slow
def test_fresh_lora_starts_as_peft_and_resumes_exactly(tmp_path):
    """A fresh adapter: A as PEFT initializes it, B = 0; a run killed after a checkpoint and
    resumed gives the adapter of the uninterrupted run, bit for bit."""
    base = make_base(tmp_path)
    section = {"r": 4, "lora_alpha": 16, "target_modules": TARGETS}
    straight = run_config(tmp_path, base, section, "straight")
    assert main(["train", str(straight), "--plan", str(tmp_path / "plan.json"), "--set", "train.max_steps=2"]) == 0
    first = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in first) and any("lora_B" in k for k in first)
    assert main(["train", str(straight), "--plan", str(tmp_path / "plan.json"), "--set",
                 "train.resume_from_checkpoint=auto"]) == 0  # continues from step 2 to STEPS
    resumed = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    again = run_config(tmp_path, base, section, "again")
    assert main(["train", str(again), "--plan", str(tmp_path / "plan.json")]) == 0
    uninterrupted = load_file(tmp_path / "again" / "final" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert [r["loss"] for r in read_metrics(tmp_path / "straight")] == [r["loss"] for r in read_metrics(tmp_path / "again")]


def test_fresh_adapter_is_initialised_as_peft_does(tmp_path):
    from cli.config import PeftSection
    from cli.lora import apply_lora
    from scheduler.materialize import empty_model

    base = make_base(tmp_path)
    cfg = AutoModelForCausalLM.from_pretrained(base).config
    _, adapters = apply_lora(empty_model(copy.deepcopy(cfg)), PeftSection(r=4, target_modules=TARGETS))
    assert adapters and all(torch.equal(t, torch.zeros_like(t)) for n, t in adapters.items() if "lora_B" in n)
    for name, t in adapters.items():
        if "lora_A" in name:  # kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(fan_in)
            bound = 1 / t.shape[1] ** 0.5
            assert t.abs().max() <= bound and t.std() > bound / 4


@pytest.mark.parametrize(("section", "words"), [
    ({"target_modules": ["q_proj", "qkv_proj"]}, ["peft.target_modules", "'qkv_proj'", "matches no module"]),
    ({"adapter_name_or_path": "ADAPTER_R8"}, ["another base model", "shape"]),
    ({"adapter_name_or_path": "MISSING"}, ["not a PEFT adapter folder"]),
])
def test_bad_peft_input_is_one_line(tmp_path, capsys, section, words):
    base = make_base(tmp_path)
    if section.get("adapter_name_or_path") == "ADAPTER_R8":  # an adapter of a wider model
        other = tmp_path / "other"
        other.mkdir()
        torch.manual_seed(0)
        wide = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        AutoModelForCausalLM.from_config(wide).save_pretrained(other / "base")
        section = {"adapter_name_or_path": str(make_adapter(other, other / "base", r=8))}
    elif section.get("adapter_name_or_path") == "MISSING":
        section = {"adapter_name_or_path": str(tmp_path / "nowhere")}
    cfg = run_config(tmp_path, base, section)
    capsys.readouterr()  # the set-up's progress bars
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    line = one_line_error(capsys)
    assert all(w in line for w in words), line


def test_peft_with_bf16_states_is_refused(tmp_path, capsys):
    base = make_base(tmp_path)
    cfg = run_config(tmp_path, base, {"r": 4})
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "model.dtype=bfloat16", "--set", "model.state_dtype=bfloat16"]) == 2
    assert "model.state_dtype" in one_line_error(capsys)


def test_merged_export_of_a_moe_adapter_equals_merge_and_unload(tmp_path):
    """all-linear on Mixtral: PEFT wraps the fused experts' parameters (nested wrappers) and the
    router; --merge gives what PEFT's merge_and_unload gives."""
    from transformers import MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, pad_token_id=0)
    base = tmp_path / "moe"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    config = run_config(tmp_path, base, {"r": 4, "target_modules": "all-linear"})
    assert main(["train", str(config), "--plan", str(tmp_path / "plan.json"), "--set", "train.max_steps=2"]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge", "--dtype", "float32"]) == 0
    want = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          tmp_path / "run" / "final").merge_and_unload()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([padded(rows()[1])["input_ids"].tolist()])
    assert torch.allclose(got(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(("model_type", "section"), [
    # trained biases (not adapters) are merged as trained, not read back from the base
    ("gpt2", {"target_modules": ["c_attn"], "bias": "lora_only"}),
    ("gpt2", {"target_modules": ["c_attn"], "bias": "all"}),
    # a trained copy of a tied embedding: the export unties, the head keeps the original
    ("qwen2", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}),
    # trained copies of both: untied, each exported as trained
    ("qwen2", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}),
])
def test_merged_export_keeps_what_else_was_trained(tmp_path, model_type, section):
    from transformers import AutoConfig

    torch.manual_seed(0)
    fields = ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64} if model_type == "gpt2" else
              {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True})
    base = tmp_path / model_type
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0,
                                                          **fields)).save_pretrained(base)
    config = run_config(tmp_path, base, {"r": 4, **section})
    assert main(["train", str(config), "--plan", str(tmp_path / "plan.json"), "--set", "train.max_steps=2"]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge", "--dtype", "float32"]) == 0
    want = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          tmp_path / "run" / "final").merge_and_unload()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert got.config.tie_word_embeddings == want.config.tie_word_embeddings
    got_w, want_w = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_w.keys() == want_w.keys()
    assert max((got_w[k] - want_w[k]).abs().max().item() for k in want_w) <= 1e-6
    ids = torch.tensor([padded(rows()[1])["input_ids"].tolist()])
    assert torch.allclose(got(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5)
