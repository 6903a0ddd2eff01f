"""Rows cut to seq_len without packing are reported, not dropped silently."""

from __future__ import annotations

import json
import logging

from cli.data import load_token_dataset


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_longer_than_seq_len_are_reported(tmp_path, caplog):
    path = _rows(tmp_path / "d.jsonl", [{"input_ids": list(range(1, 11))}, {"input_ids": [1, 2, 3]},
                                        {"input_ids": list(range(1, 21))}])
    with caplog.at_level(logging.WARNING, logger="cli.data"):
        ds = load_token_dataset(path, None, 8, packing=False, vocab_size=64)
    assert len(ds) == 3
    assert "2 of 3 rows are longer than seq_len 8; their last 14 tokens" in caplog.text


def test_supervised_rows_left_without_targets_are_reported(tmp_path, caplog):
    rows = [{"input_ids": list(range(1, 11)), "labels": [-100] * 8 + [9, 10]},
            {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}]
    with caplog.at_level(logging.WARNING, logger="cli.data"):
        load_token_dataset(_rows(tmp_path / "d.jsonl", rows), None, 8, packing=False, vocab_size=64)
    assert "1 rows have no target left within seq_len 8" in caplog.text


def test_rows_that_fit_say_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cli.data"):
        load_token_dataset(_rows(tmp_path / "d.jsonl", [{"input_ids": [1, 2, 3]}]), None, 8, packing=False,
                           vocab_size=64)
    assert caplog.text == ""
