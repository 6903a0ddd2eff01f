"""Side by side with Hugging Face Trainer: the same rows, the same settings, the same numbers.

``transformers.Trainer`` (in-order sampler, ``optim="adamw_torch"``) and ``offload-train train``
(optimizer state through the SSD) on the same pre-tokenized rows: variable lengths, ``labels``
with masked prompts, no packing, gradient accumulation 2, linear warm-up, clipping 1.0, weight
decay 0.1 (Trainer exempts biases and norm weights), a Qwen2-shaped model (q/k/v biases, tied
embeddings). Per-step losses must agree to the 4 decimals Trainer logs, final weights to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from cli.main import main
from runs import PLAN, read_metrics

VOCAB = 257
SEQ = 24
MBS, GA, STEPS = 2, 2, 4
SETTINGS = {"learning_rate": 2e-3, "lr_scheduler_type": "linear", "warmup_steps": 2, "weight_decay": 0.1,
            "max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
# softmax ignores a constant shift of the keys: a k-projection bias gets rounding noise only,
# which Adam turns into full-size steps (see tests/test_families.py)
ADAM_NOISE = ("k_proj.bias",)


def rows() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(MBS * GA * STEPS):
        n = 6 + (i * 5) % (SEQ - 5)
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = 2 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def padded(row: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The row as offload-train pads it (packing: false): right-padded, mask 0, label -100."""
    n = len(row["input_ids"])
    ids = torch.zeros(SEQ, dtype=torch.long)
    labels = torch.full((SEQ,), -100)
    mask = torch.zeros(SEQ, dtype=torch.long)
    ids[:n], labels[:n], mask[:n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _InOrder(Trainer):
    def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202 - Trainer's signature
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


class _Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train_with_trainer(ckpt: Path, data: list[dict], out: Path) -> tuple[list[float], dict]:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=MBS, gradient_accumulation_steps=GA,
                             max_steps=STEPS, optim="adamw_torch", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, **SETTINGS)
    losses = _Losses()
    trainer = _InOrder(model=model, args=args, train_dataset=[padded(r) for r in data], callbacks=[losses])
    trainer.train()
    return losses.losses, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.slow
def test_offload_train_matches_trainer(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    data = rows()
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    run_cfg = {
        "model": {"name_or_path": str(ckpt)},
        "data": {"path": str(tmp_path / "sft.jsonl"), "seq_len": SEQ, "shuffle": False, "packing": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": STEPS, "micro_batch_size": MBS,
                  "gradient_accumulation_steps": GA, "logging_steps": 1, "save_steps": 0, "seed": 0, **SETTINGS},
        "offload": {"cpu_memory_limit": "24MB", "optimizer_impl": "torch", "io_backend": "posix"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())  # every tensor group through the SSD
    assert main(["train", str(tmp_path / "run.yaml"), "--plan", str(tmp_path / "plan.json")]) == 0

    want_losses, want = train_with_trainer(ckpt, data, tmp_path / "trainer")
    got_losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(got_losses) == len(want_losses) == STEPS
    assert [round(x, 4) for x in got_losses] == [round(x, 4) for x in want_losses]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32)
    got = {k: v.detach() for k, v in final.named_parameters()}
    assert got.keys() == want.keys()
    for name, w in want.items():
        bound = 2 * SETTINGS["learning_rate"] * STEPS if name.endswith(ADAM_NOISE) else 1e-5
        diff = (got[name] - w).abs().max().item()
        assert diff <= bound, f"{name}: max abs diff {diff:.3g} > {bound:g}"
    # weight decay was on, and Trainer's exemptions held: a norm weight decayed would differ
    assert any("norm" in k for k in want)
