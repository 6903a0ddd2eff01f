"""Data as users bring it, through the command line: pre-tokenized rows used exactly as given (no
tokenizer needed), ``labels`` masks, and Trainer's loss (token-loss sum over the step's targets),
against a plain torch loop over the same rows; a GPU config planned on a machine without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from cli.main import main
from runs import PLAN, read_metrics

VOCAB = 211  # smaller than the shipped tokenizer: no tokenizer may be involved
SEQ = 16
LR = 1e-3
STEPS = 3


def write_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)  # no tokenizer files
    return directory


def write_config(tmp_path: Path, data: Path, packing: bool, ga: int) -> Path:
    cfg = {
        "model": {"name_or_path": str(write_checkpoint(tmp_path / "ckpt"))},
        "data": {"path": str(data), "seq_len": SEQ, "shuffle": False, "packing": packing},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": STEPS, "micro_batch_size": 2,
                  "gradient_accumulation_steps": ga, "learning_rate": LR, "lr_scheduler_type": "constant",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 0.0, "logging_steps": 1,
                  "save_steps": 0, "seed": 1},
        "offload": {"cpu_memory_limit": "24MB", "optimizer_impl": "torch", "io_backend": "posix"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())
    return path


def plain_loop(ckpt: Path, steps: list[list[dict[str, torch.Tensor]]]) -> tuple[list[float], dict]:
    """from_pretrained + torch AdamW; each step's loss is its token-loss sum over its targets."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    losses = []
    for micro in steps:
        n_items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                reduction="sum") / n_items
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach() for k, v in model.named_parameters()}


def rows_of_seq_len(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, VOCAB, (n, SEQ), generator=g).tolist()


@pytest.mark.parametrize("packing", [True, False])
def test_rows_of_exactly_seq_len_train_as_a_plain_loop(tmp_path, packing):
    rows = rows_of_seq_len(2 * STEPS)
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    cfg = write_config(tmp_path, data, packing, ga=1)
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0
    ids = torch.tensor(rows)
    steps = [[{"input_ids": ids[2 * s : 2 * s + 2], "labels": ids[2 * s : 2 * s + 2]}] for s in range(STEPS)]
    want_losses, want = plain_loop(tmp_path / "ckpt", steps)
    got = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert max(abs(a - b) for a, b in zip(got, want_losses, strict=True)) <= 1e-5
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32)
    assert max((p.detach() - want[k]).abs().max().item() for k, p in final.named_parameters()) <= 1e-5
    assert not (tmp_path / "run" / "tokenizer").exists()  # none was needed, none was made up


def test_masked_labels_variable_lengths_and_accumulation_give_trainers_loss(tmp_path):
    """Rows of several lengths, prompts masked with -100, no packing, gradient accumulation 2:
    the loss of a step is its token-loss sum over all its targets (Trainer's num_items_in_batch)."""
    g = torch.Generator().manual_seed(5)
    records = []
    for i in range(4 * STEPS):
        n = 5 + (i * 3) % (SEQ - 4)
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = 1 + i % 4
        records.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = write_config(tmp_path, data, packing=False, ga=2)
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0

    def batch(rs: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(rs), SEQ, dtype=torch.long)
        labels = torch.full((len(rs), SEQ), -100)
        mask = torch.zeros(len(rs), SEQ, dtype=torch.long)
        for k, r in enumerate(rs):
            n = len(r["input_ids"])
            ids[k, :n], labels[k, :n], mask[k, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    steps = [[batch(records[4 * s : 4 * s + 2]), batch(records[4 * s + 2 : 4 * s + 4])] for s in range(STEPS)]
    want_losses, want = plain_loop(tmp_path / "ckpt", steps)
    got = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert max(abs(a - b) for a, b in zip(got, want_losses, strict=True)) <= 1e-5
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32)
    assert max((p.detach() - want[k]).abs().max().item() for k, p in final.named_parameters()) <= 1e-5


def test_text_with_a_checkpoint_without_tokenizer_names_data_tokenizer(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "some words to train on"}) + "\n")
    cfg = write_config(tmp_path, data, packing=True, ga=1)
    capsys.readouterr()
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.tokenizer" in err[0] and "no tokenizer files" in err[0]


def test_a_gpu_config_plans_on_a_machine_without_one(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rows = rows_of_seq_len(4)
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    cfg = write_config(tmp_path, data, packing=True, ga=1)
    doc = yaml.safe_load(cfg.read_text())
    doc["offload"].update(gpu_memory_limit="24GB", cpu_memory_limit="64MB")  # a workstation's GPU budget
    cfg.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "gpu_memory_limit (24GB) does not apply" in out and "predicted step" in out
