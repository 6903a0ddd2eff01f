"""Chat and prompt/completion data, with TRL's loss masks, checked token by token against the
template's rendering; packed rows that never attend across row boundaries; the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from cli.data import DataError, load_token_dataset, load_tokenizer
from cli.main import main
from cli.sft import SftError, SftOptions, SftRow, render
from runs import PLAN, one_line_error, read_metrics

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the same rendering, with the assistant turns inside generation markers
CHATML_MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}"
                 "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six, of course."}]


def chat_tokenizer(template: str = CHATML):  # noqa: ANN201 - a transformers tokenizer
    tok = load_tokenizer(None, None)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["turn-by-turn", "generation-markers"])
def test_assistant_only_labels_are_the_assistant_turns_token_by_token(template):
    tok = chat_tokenizer(template)
    ids, labels = render(SftRow({"messages": CHAT}), tok, SftOptions(assistant_only_loss=True), "row 1")
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the template's rendering, as tokens
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assistant_text = "".join(f"{m['content']}<|im_end|>\n" for m in CHAT if m["role"] == "assistant")
    # token by token: a target exactly where the token's characters belong to an assistant turn
    spans, pos = [], 0
    for m in CHAT:
        head = f"<|im_start|>{m['role']}\n"
        body = f"{m['content']}<|im_end|>\n"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        pos += len(head) + len(body)
    for t, label, (lo, hi) in zip(ids, labels, enc["offset_mapping"], strict=True):
        inside = any(a <= lo and hi <= b for a, b in spans)
        assert label == (t if inside else -100), (tok.decode([t]), lo, hi)
    assert tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]) == assistant_text


def test_messages_without_assistant_only_loss_train_on_every_token():
    tok = chat_tokenizer()
    ids, labels = render(SftRow({"messages": CHAT}), tok, SftOptions(), "row 1")
    assert labels == ids and tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)


def test_prompt_completion_masks_the_prompt():
    tok = load_tokenizer(None, None)
    ids, labels = render(SftRow({"prompt": "Translate to French: cat", "completion": " chat"}), tok,
                         SftOptions(), "row 1")
    assert tok.decode(ids) == "Translate to French: cat chat<|eos|>"
    assert tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]) == " chat<|eos|>"
    assert labels[0] == -100
    _, all_labels = render(SftRow({"prompt": "Translate to French: cat", "completion": " chat"}), tok,
                           SftOptions(completion_only_loss=False), "row 1")
    assert all_labels == ids


def test_conversational_prompt_completion_masks_the_prompt_turns():
    tok = chat_tokenizer()
    row = SftRow({"prompt": CHAT[:2], "completion": CHAT[2:3]})
    ids, labels = render(row, tok, SftOptions(), "row 1")
    assert tok.decode(ids) == tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]) == "Four.<|im_end|>\n"


@pytest.mark.parametrize(("record", "tokenizer", "expected"), [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, CHATML, "messages[0] has role 'wizard'"),
    ({"messages": CHAT}, None, "has no chat template"),
    ({"messages": [{"role": "user"}]}, CHATML, "messages[0] is not a"),
    ({"prompt": "a", "completion": ["b"]}, CHATML, "both be strings or both be message lists"),
])
def test_bad_sft_rows_are_one_line(tmp_path, record, tokenizer, expected):
    tok = load_tokenizer(None, None)
    tok.chat_template = tokenizer
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises((SftError, DataError)) as excinfo:
        load_token_dataset(path, tok, 8) if tokenizer else load_token_dataset(path, tok, 8)
    message = str(excinfo.value)
    assert "\n" not in message and expected in message
    assert f"{path} line {1 if tokenizer is None else 2}" in message


def test_packed_rows_never_attend_across_row_boundaries(tmp_path):
    """Each packed row's loss equals the row run alone (positions restart, the row's first token
    is no target), while the same window without the position ids mixes rows."""
    tok = chat_tokenizer()
    rows = [{"messages": CHAT[1:3]}, {"prompt": "Say hi.", "completion": " Hi!"}, {"messages": CHAT}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [len(render(SftRow(r), tok, SftOptions(), "r")[0]) for r in rows]
    seq_len = sum(lengths)  # one window holding all three rows
    dataset = load_token_dataset(path, tok, seq_len, packing=True)
    batch = dataset.batch([0])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).eval()

    def token_losses(ids: torch.Tensor, labels: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        # use_cache=False as the engine runs it: transformers detects packed rows only without a cache
        logits = model(input_ids=ids[None], use_cache=False, **{k: v[None] for k, v in kw.items()}).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")

    with torch.no_grad():
        packed = token_losses(batch["input_ids"][0], batch["labels"][0], position_ids=batch["position_ids"][0])
        mixed = token_losses(batch["input_ids"][0], batch["labels"][0])
        offset = 0
        for n in lengths:
            ids, labels = batch["input_ids"][0, offset : offset + n], batch["labels"][0, offset : offset + n]
            alone = token_losses(ids, labels)
            # within the window the row's targets are its positions 1..n-1 (shifted by one)
            got = packed[offset : offset + n - 1]
            assert torch.allclose(got, alone, atol=1e-5), (offset, n)
            offset += n
        assert not torch.allclose(packed, mixed, atol=1e-4)


def _cli_config(tmp_path: Path, rows: list[dict], **data: object) -> Path:
    tok = chat_tokenizer()
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)  # a chat model's tokenizer, template included
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": {"name_or_path": str(ckpt)}, "data": {"path": str(path), "seq_len": 64, **data},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 2,
                     "logging_steps": 1, "save_steps": 0, "learning_rate": 1e-3},
           "offload": {"cpu_memory_limit": "48MB", "optimizer_impl": "torch", "io_backend": "posix"}}
    out = tmp_path / "run.yaml"
    out.write_text(yaml.safe_dump(cfg))
    (tmp_path / "plan.json").write_text(PLAN.to_json())
    return out


@pytest.mark.parametrize("kind", ["messages", "prompt-completion"])
@pytest.mark.parametrize("packing", [True, False])
def test_sft_data_trains_end_to_end(tmp_path, kind, packing):
    if kind == "messages":
        rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                              {"role": "assistant", "content": " ".join(str(k) for k in range(i))}]}
                for i in range(1, 13)]
        extra = {"assistant_only_loss": True}
    else:
        rows = [{"prompt": f"Double {i}:", "completion": f" {2 * i}"} for i in range(80)]
        extra = {}
    cfg = _cli_config(tmp_path, rows, packing=packing, **extra)
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_sft_row_errors_reach_the_cli_as_one_line(tmp_path, capsys):
    cfg = _cli_config(tmp_path, [{"messages": [{"role": "wizard", "content": "hi"}]}])
    capsys.readouterr()
    assert main(["train", str(cfg), "--plan", str(tmp_path / "plan.json")]) == 2
    assert "role 'wizard'" in one_line_error(capsys)
