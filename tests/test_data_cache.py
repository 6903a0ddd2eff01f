"""Tokenized data is cached: the second load does not tokenize, and nothing stale is served."""

from __future__ import annotations

import json
import os

import pytest
import torch

import cli.data as data_module
import scheduler.profile as profile_module
from cli.data import load_token_dataset, load_tokenizer
from cli.data_cache import cache_dir, load_cached
from cli.sft import SftOptions


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """Use a fresh cache and count the tokenizer's encode calls."""
    monkeypatch.setattr(profile_module, "CACHE_DIR", tmp_path / "cache")
    calls = []
    real = data_module._Encoder.encode

    def encode(self, texts, where):  # noqa: ANN001, ANN202
        calls.append(len(texts))
        return real(self, texts, where)

    monkeypatch.setattr(data_module._Encoder, "encode", encode)
    return calls


def assert_same(a, b) -> None:
    assert a.fingerprint() == b.fingerprint()
    assert (a.n_documents, a.vocab_size, a.source) == (b.n_documents, b.vocab_size, b.source)


def write(path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_second_load_does_not_tokenize_and_equals_the_first(tmp_path, counted):
    tok = load_tokenizer(None, None)
    path = tmp_path / "d.jsonl"
    write(path, [f"document number {i} about streaming" for i in range(40)])
    first = load_cached(path, tok, 8)
    n_calls = sum(counted)
    second = load_cached(path, lambda: tok, 8)
    assert sum(counted) == n_calls and n_calls > 0  # no tokenization the second time
    assert_same(first, second)
    assert second.tokenizer is tok
    assert_same(second, load_token_dataset(path, tok, 8))
    assert len(list(cache_dir().glob("*.pt"))) == 1


def test_a_changed_file_setting_or_tokenizer_is_never_served_stale(tmp_path, counted):
    tok = load_tokenizer(None, None)
    path = tmp_path / "d.jsonl"
    write(path, [f"document number {i}" for i in range(40)])
    base = load_cached(path, tok, 8)
    calls = sum(counted)
    assert load_cached(path, tok, 4).seq_len == 4 and sum(counted) > calls  # another setting
    calls = sum(counted)
    write(path, [f"other words {i}" for i in range(40)])
    os.utime(path, ns=(1, 1))  # even a file whose mtime went back is a new identity (size, inode...)
    changed = load_cached(path, tok, 8)
    assert sum(counted) > calls and changed.fingerprint() != base.fingerprint()
    calls = sum(counted)
    other = load_tokenizer(None, None)
    other.chat_template = "{{ messages }}"  # a tokenizer that would render chat data differently
    load_cached(path, other, 8)
    assert sum(counted) > calls


def test_token_rows_need_no_tokenizer_on_a_cache_hit(tmp_path, counted):
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [1, 2, 3, 4, i % 7]}) + "\n" for i in range(10)))

    def no_tokenizer():  # noqa: ANN202
        raise AssertionError("token rows need no tokenizer")

    first = load_cached(path, no_tokenizer, 5, vocab_size=16, sft=SftOptions())
    second = load_cached(path, no_tokenizer, 5, vocab_size=16)
    assert_same(first, second)
    assert second.tokenizer is None


def test_a_torn_cache_entry_is_rebuilt(tmp_path, counted):
    tok = load_tokenizer(None, None)
    path = tmp_path / "d.jsonl"
    write(path, [f"document number {i}" for i in range(40)])
    first = load_cached(path, tok, 8)
    (entry,) = cache_dir().glob("*.pt")
    entry.write_bytes(b"not a torch file")
    calls = sum(counted)
    again = load_cached(path, tok, 8)
    assert sum(counted) > calls and torch.equal(again.tokens, first.tokens)
