"""A saved DatasetDict given as ``data.eval_path`` is evaluated on its validation (or test) split,
not on its train split."""

from __future__ import annotations

import pytest

from cli.data import DataError, load_token_dataset

datasets = pytest.importorskip("datasets")


def _save(tmp_path, splits):
    path = tmp_path / "dd"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"input_ids": rows}) for name, rows in splits.items()}
                         ).save_to_disk(str(path))
    return path


def test_training_reads_train_and_evaluation_reads_validation_or_test(tmp_path):
    path = _save(tmp_path, {"train": [[1, 2, 3, 4]], "test": [[5, 6, 7, 8]]})
    train = load_token_dataset(path, None, 4, packing=False, vocab_size=16)
    held_out = load_token_dataset(path, None, 4, packing=False, vocab_size=16, split="eval")
    assert train[0]["input_ids"].tolist() == [1, 2, 3, 4]
    assert held_out[0]["input_ids"].tolist() == [5, 6, 7, 8]


def test_splits_with_no_known_name_are_an_error(tmp_path):
    path = _save(tmp_path, {"a": [[1, 2]], "b": [[3, 4]]})
    with pytest.raises(DataError, match="none is 'validation' or"):
        load_token_dataset(path, None, 4, packing=False, vocab_size=16, split="eval")
