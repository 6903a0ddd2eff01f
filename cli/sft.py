"""Supervised fine-tuning rows, rendered as TRL renders them.

A row's fields say its format (as TRL's ``SFTTrainer`` detects them):

- ``messages``: a list of ``{"role", "content"}`` turns, rendered with the tokenizer's chat
  template (``apply_chat_template``). Loss on every token, or with ``assistant_only_loss`` on the
  assistant turns only: from the template's ``{% generation %}`` markers where it has them
  (``return_assistant_tokens_mask``), else by rendering turn by turn (the characters each
  assistant turn adds, mapped to tokens by their offsets).
- ``prompt`` + ``completion``: strings (tokenized, eos appended to the completion), or message
  lists (the prompt rendered with the generation prompt, then prompt + completion). With
  ``completion_only_loss`` (the default) the prompt's tokens are not targets.

Each row becomes token ids and labels (``-100``: not a target). Errors name the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from offload.errors import OffloadError

ROLES = ("system", "developer", "user", "assistant", "tool")
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers finds the markers
IGNORE_INDEX = -100


class SftError(OffloadError):
    """An SFT row that cannot be rendered (its text says which row and why)."""


@dataclass(frozen=True)
class SftOptions:
    completion_only_loss: bool | None = None  # None: true (TRL's default for prompt/completion)
    assistant_only_loss: bool = False


@dataclass(frozen=True)
class SftRow:
    """A row in an SFT format, rendered once the tokenizer is known."""

    record: dict[str, Any]

    @staticmethod
    def detect(record: dict[str, Any]) -> bool:
        return "messages" in record or ("prompt" in record and "completion" in record)


def render(row: SftRow, tokenizer: Any, options: SftOptions, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT row."""
    record = row.record
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        return _render_messages(messages, tokenizer, options, where)
    prompt, completion = record["prompt"], record["completion"]
    completion_only = options.completion_only_loss is not False
    if isinstance(prompt, str) and isinstance(completion, str):
        return _render_text_pair(prompt, completion, tokenizer, completion_only)
    if isinstance(prompt, list) and isinstance(completion, list):
        return _render_chat_pair(_messages(prompt, where, "prompt"), _messages(completion, where, "completion"),
                                 tokenizer, completion_only, where)
    raise SftError(f"{where}: prompt and completion must both be strings or both be message lists (got "
                   f"{type(prompt).__name__} and {type(completion).__name__})")


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SftError(f"{where}: {field} must be a non-empty list of {{\"role\", \"content\"}} turns")
    for k, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise SftError(f"{where}: {field}[{k}] is not a {{\"role\", \"content\"}} turn")
        if turn["role"] not in ROLES:
            raise SftError(f"{where}: {field}[{k}] has role {turn['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise SftError(f"{where}: {field}[{k}] content is a {type(turn['content']).__name__}, not a string")
    return value


def _template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SftError(f"{where} holds chat messages but the tokenizer has no chat template; use the model's "
                       f"chat tokenizer (data.tokenizer) or give the tokenizer_config.json a chat_template")


def _ids(rendered: Any) -> list[int]:
    ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    return list(ids)


def _render_messages(messages: list[dict[str, str]], tokenizer: Any, options: SftOptions,
                     where: str) -> tuple[list[int], list[int]]:
    _template(tokenizer, where)
    if not options.assistant_only_loss:
        ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True))
        return ids, list(ids)
    if _GENERATION_BLOCK.search(tokenizer.chat_template):  # {% generation %} ... {% endgeneration %}
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]
    return _assistant_by_turns(messages, tokenizer, where)


def _assistant_by_turns(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """Assistant tokens without generation markers: the characters each assistant turn adds to
    the rendering (prefix renderings must be prefixes of the whole), mapped to tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise SftError(f"{where}: the chat template does not render turns as prefixes of the whole, so "
                           f"assistant tokens cannot be told apart; use a template with {{% generation %}} "
                           f"markers, or assistant_only_loss: false")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= lo and hi <= b and hi > lo for a, b in spans) else IGNORE_INDEX
              for t, (lo, hi) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


def _render_text_pair(prompt: str, completion: str, tokenizer: Any,
                      completion_only: bool) -> tuple[list[int], list[int]]:
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    ids = list(tokenizer(prompt + completion)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    n_prompt = _common_prefix(prompt_ids, ids)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] if completion_only else list(ids)
    return ids, labels


def _render_chat_pair(prompt: list[dict[str, str]], completion: list[dict[str, str]], tokenizer: Any,
                      completion_only: bool, where: str) -> tuple[list[int], list[int]]:
    _template(tokenizer, where)
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                    add_generation_prompt=True))
    ids = _ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True))
    n_prompt = _common_prefix(prompt_ids, ids)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] if completion_only else list(ids)
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens of ``a`` that ``b`` starts with (a prompt's tokens can merge with the completion's
    first characters: those are counted as the completion's, as TRL does)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
