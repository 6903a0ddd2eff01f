"""Training data: shipped assets, readers, packing and padding, batch order, resume, errors."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch

from cli.data import (
    IGNORE_INDEX,
    DataError,
    DataPosition,
    TokenDataset,
    batches_per_epoch,
    default_corpus_path,
    default_tokenizer_path,
    iterate_batches,
    load_token_dataset,
    load_tokenizer,
    steps_per_epoch,
)
from offload.errors import OffloadError

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="the 'datasets' package is not installed")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Simple is better than complex.\nComplex is better than complicated.",
    "Flat is better than nested; sparse is better than dense. Readability counts.",
]


@pytest.fixture(scope="module")
def tok():
    """The shipped tokenizer, loaded once for the module."""
    return load_tokenizer(None, None)


def encode_doc(tok, text: str) -> list[int]:
    """What the data pipeline should make of one text document: its encoding, then eos."""
    return tok(text)["input_ids"] + [tok.eos_token_id]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def many_docs(n: int) -> list[str]:
    return [f"Document number {i}: {DOCS[i % len(DOCS)]}" for i in range(n)]


def one_line_data_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, OffloadError)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# Shipped assets and tokenizer loading


def test_shipped_tokenizer_loads_offline_and_round_trips(monkeypatch):
    from transformers import AutoTokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("the shipped tokenizer must load without the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    assert 2048 <= len(tok) <= 4096
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.bos_token_id is not None and tok.unk_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    for text in ["Hello, world!", "  def f(x):\n\treturn x ** 2  \n", "naïve café, 東京, 🤖 emoji"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    english = "Errors should never pass silently, unless explicitly silenced."
    assert len(tok(english)["input_ids"]) < len(english) / 2  # BPE merges, not bytes


def test_shipped_assets_are_small():
    files = [default_corpus_path(), *default_tokenizer_path().iterdir()]
    assert default_corpus_path().stat().st_size <= 2 * 2**20
    assert sum(p.stat().st_size for p in default_tokenizer_path().iterdir()) < 2**20
    assert all(p.is_file() for p in files)


def test_shipped_corpus_gives_at_least_200_blocks_of_128(tok):
    dataset = load_token_dataset(default_corpus_path(), tok, 128)
    assert len(dataset) >= 200
    assert dataset.seq_len == 128 and dataset.packed
    assert "Zen of Python" in tok.decode(dataset[0]["input_ids"])


def test_load_tokenizer_prefers_explicit_then_model_dir_then_default(tmp_path, tok):
    model_dir = tmp_path / "model"
    tok.save_pretrained(str(model_dir))
    other = tmp_path / "other"
    tok.save_pretrained(str(other))
    assert Path(load_tokenizer(str(other), str(model_dir)).name_or_path) == other
    assert Path(load_tokenizer(None, str(model_dir)).name_or_path) == model_dir
    bare_model = tmp_path / "bare"
    bare_model.mkdir()
    (bare_model / "config.json").write_text("{}")
    assert Path(load_tokenizer(None, str(bare_model)).name_or_path) == default_tokenizer_path()
    assert Path(load_tokenizer(None, None).name_or_path) == default_tokenizer_path()


def test_tokenizer_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError) as excinfo:
        load_tokenizer(str(tmp_path / "missing"), None)
    assert "does not exist" in one_line_data_error(excinfo)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        load_tokenizer(str(empty), None)
    assert "no tokenizer files" in one_line_data_error(excinfo)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError) as excinfo:
        load_tokenizer(str(broken), None)
    assert "cannot load the tokenizer" in one_line_data_error(excinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_tokenizer("no-such-org/no-such-model", None)
    assert "local Hugging Face cache" in one_line_data_error(excinfo)


# --------------------------------------------------------------------------------------------
# Readers and packing


def test_jsonl_text_packs_into_blocks_equal_to_the_encoding(tmp_path, tok):
    docs = many_docs(40)
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": d, "meta": i} for i, d in enumerate(docs)])
    seq_len = 32
    dataset = load_token_dataset(path, tok, seq_len)
    stream = [t for d in docs for t in encode_doc(tok, d)]
    assert len(dataset) == len(stream) // seq_len
    assert dataset.n_documents == len(docs)
    assert dataset[0]["input_ids"].tolist() == stream[:seq_len]
    assert dataset.tokens.flatten().tolist() == stream[: len(dataset) * seq_len]
    assert set(dataset[0]) == {"input_ids", "labels"}
    assert torch.equal(dataset[0]["labels"], dataset[0]["input_ids"])


def test_jsonl_custom_text_field_and_blank_lines(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"content": d}) for d in DOCS) + "\n\n\n", encoding="utf-8")
    dataset = load_token_dataset(path, tok, 8, text_field="content")
    stream = [t for d in DOCS for t in encode_doc(tok, d)]
    assert dataset.tokens.flatten().tolist() == stream[: len(dataset) * 8]


def test_jsonl_input_ids_are_used_exactly_as_given(tmp_path, tok):
    eos = tok.eos_token_id
    rows = [[10, 11, 12, 13, 14], [20, 21, eos], [30, 31, 32, 33]]
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": r} for r in rows])
    dataset = load_token_dataset(path, tok, 4)
    stream = [10, 11, 12, 13, 14, 20, 21, eos, 30, 31, 32, 33]  # concatenated as they are: no eos added
    assert dataset.tokens.flatten().tolist() == stream
    assert len(dataset) == 3 and dataset.labels is None
    assert torch.equal(dataset.batch([0])["labels"], dataset.batch([0])["input_ids"])


@pytest.mark.parametrize("packing", [True, False])
def test_rows_of_exactly_seq_len_stay_one_sample_each(tmp_path, packing):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 211, (6, 16), generator=g).tolist()
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": r} for r in rows])
    dataset = load_token_dataset(path, None, 16, packing=packing, vocab_size=211)  # no tokenizer needed
    assert dataset.tokens.tolist() == rows and dataset.tokenizer is None
    batch = dataset.batch(list(range(6)))
    assert batch["labels"].tolist() == rows
    if not packing:
        assert batch["attention_mask"].eq(1).all()


def test_labels_are_kept_padded_and_packed(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10]},
            {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    padded = load_token_dataset(path, None, 4, packing=False, vocab_size=32, pad_token_id=3)
    b = padded.batch([0, 1, 2])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3], [11, 12, 13, 3]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100], [-100, 12, 13, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    packed = load_token_dataset(path, None, 3, packing=True, vocab_size=32)
    b = packed.batch([0, 1, 2])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    # supervised rows packed as TRL's padding-free packing: positions restart per row, and a row's
    # first token is no target (it would be predicted from the row before)
    assert b["labels"].tolist() == [[-100, -100, 7], [8, -100, 10], [-100, 12, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [3, 0, 1], [0, 1, 2]]
    assert packed.fingerprint() != load_token_dataset(
        write_jsonl(tmp_path / "plain.jsonl", [{"input_ids": r["input_ids"]} for r in rows]), None, 3,
        vocab_size=32).fingerprint()


def test_ids_are_checked_against_the_models_vocabulary_not_the_tokenizers(tmp_path, tok):
    big = len(tok) + 500  # a 32k-vocabulary model's ids, beyond the shipped tokenizer's 4096
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, big, 3]}])
    assert load_token_dataset(path, tok, 3, vocab_size=big + 1).tokens.tolist() == [[1, big, 3]]
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(path, None, 3, vocab_size=211)
    message = one_line_data_error(excinfo)
    assert f"{path} line 1: input_ids holds {big}, outside the model's vocabulary 0..210" in message


def test_text_is_tokenized_only_when_there_is_text(tmp_path, tok):
    calls = []

    def source():
        calls.append(1)
        return tok

    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3, 4]}])
    load_token_dataset(ids, source, 4, vocab_size=len(tok))
    assert calls == []
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS])
    dataset = load_token_dataset(text, source, 4, vocab_size=len(tok))
    assert calls == [1] and dataset.tokenizer is tok
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(text, None, 4, vocab_size=len(tok))
    assert "line 1 is text, and no tokenizer is set" in one_line_data_error(excinfo)


def test_txt_documents_are_paragraphs(tmp_path, tok):
    text = "First paragraph,\n  second line.\n\n\n   \n  Indented second paragraph.\r\n\r\nThird.\n"
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode())
    dataset = load_token_dataset(path, tok, 4, packing=False)
    assert dataset.n_documents == 3
    expected = ["First paragraph,\n  second line.", "  Indented second paragraph.", "Third."]
    packed = load_token_dataset(path, tok, 4)
    stream = [t for d in expected for t in encode_doc(tok, d)]
    assert packed.tokens.flatten().tolist() == stream[: len(packed) * 4]


def test_txt_without_blank_lines_is_one_document(tmp_path, tok):
    path = tmp_path / "one.txt"
    path.write_text("line one\nline two\nline three\n", encoding="utf-8")
    dataset = load_token_dataset(path, tok, 64, packing=False)
    assert dataset.n_documents == 1
    assert dataset[0]["input_ids"][: dataset.n_tokens()].tolist() == encode_doc(tok, "line one\nline two\nline three")


def test_too_little_data_for_one_block_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(path, tok, 512)
    message = one_line_data_error(excinfo)
    assert "fewer than one sequence" in message and "seq_len=512" in message


# --------------------------------------------------------------------------------------------
# No packing


def test_no_packing_truncates_pads_and_masks(tmp_path, tok):
    docs = ["short", DOCS[1] * 5, DOCS[0]]
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs])
    seq_len = 24
    dataset = load_token_dataset(path, tok, seq_len, packing=False)
    assert len(dataset) == 3 and not dataset.packed
    batch = dataset.batch([0, 1, 2])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(v.dtype == torch.long and v.shape == (3, seq_len) for v in batch.values())
    for row, doc in enumerate(docs):
        ids = encode_doc(tok, doc)[:seq_len]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][row, :n].eq(1).all() and batch["attention_mask"][row, n:].eq(0).all()
        assert batch["labels"][row, :n].tolist() == ids
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all()  # the long document was truncated to seq_len
    assert dataset.n_tokens() == int(batch["attention_mask"].sum())


def test_no_packing_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path, tok):
    no_pad = load_tokenizer(None, None)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a few words"}])
    dataset = load_token_dataset(path, no_pad, 16, packing=False)
    sample = dataset[0]
    n = int(sample["attention_mask"].sum())
    assert sample["input_ids"][n - 1] == tok.eos_token_id  # the document's own eos is trained on
    assert sample["labels"][n - 1] == tok.eos_token_id
    assert sample["input_ids"][n:].eq(tok.eos_token_id).all() and sample["labels"][n:].eq(IGNORE_INDEX).all()


def test_a_tokenizer_without_eos_is_an_error(tmp_path):
    no_eos = load_tokenizer(None, None)
    no_eos.eos_token = None
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a few words"}])
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(path, no_eos, 16)
    assert "no eos token" in one_line_data_error(excinfo)


# --------------------------------------------------------------------------------------------
# save_to_disk directories


@needs_datasets
def test_save_to_disk_text_and_input_ids(tmp_path, tok):
    import datasets

    docs = many_docs(30)
    datasets.Dataset.from_dict({"text": docs, "id": list(range(30))}).save_to_disk(str(tmp_path / "text"))
    dataset = load_token_dataset(tmp_path / "text", tok, 16)
    stream = [t for d in docs for t in encode_doc(tok, d)]
    assert dataset.tokens.flatten().tolist() == stream[: len(dataset) * 16]

    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    labels = [[-100, 6, 7], [8, 9], [-100, -100, 12, 13]]
    datasets.Dataset.from_dict({"input_ids": rows, "labels": labels}).save_to_disk(str(tmp_path / "ids"))
    padded = load_token_dataset(tmp_path / "ids", tok, 4, packing=False)
    pad = tok.pad_token_id
    assert padded.tokens.tolist() == [[5, 6, 7, pad], [8, 9, pad, pad], [10, 11, 12, 13]]  # no eos added
    assert padded.batch([0, 1, 2])["labels"].tolist() == [[-100, 6, 7, -100], [8, 9, -100, -100],
                                                           [-100, -100, 12, 13]]


@needs_datasets
def test_save_to_disk_dataset_dict_uses_train_split(tmp_path, tok):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["train text one", "train text two"]}),
        "test": datasets.Dataset.from_dict({"body": ["held out"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    dataset = load_token_dataset(tmp_path / "dd", tok, 64, packing=False, text_field="body")
    assert dataset.n_documents == 2
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(tmp_path / "dd", tok, 64)
    message = one_line_data_error(excinfo)
    assert "no 'text' or 'input_ids' column" in message and "body" in message


def test_save_to_disk_without_datasets_package_is_a_clear_error(tmp_path, tok, monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(saved, tok, 16)
    assert "pip install datasets" in one_line_data_error(excinfo)


# --------------------------------------------------------------------------------------------
# Errors


def _bad_inputs(tmp: Path, tok) -> dict[str, tuple[Path, dict[str, object], str]]:
    """name -> (path, extra kwargs, text the message must contain)."""
    (tmp / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp / "bad_utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("\n \n\t\n")
    (tmp / "empty_texts.jsonl").write_text('{"text": ""}\n{"text": "  "}\n{"input_ids": []}\n')
    (tmp / "not_json.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    (tmp / "not_object.jsonl").write_text('["a list"]\n')
    write_jsonl(tmp / "no_field.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(tmp / "text_not_str.jsonl", [{"text": 3}])
    write_jsonl(tmp / "out_of_range.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [1, len(tok)]}])
    write_jsonl(tmp / "negative.jsonl", [{"input_ids": [1, -1]}])
    write_jsonl(tmp / "not_ints.jsonl", [{"input_ids": [1, "2"]}])
    write_jsonl(tmp / "short_labels.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 3], "labels": [1, 2]}])
    write_jsonl(tmp / "bad_label.jsonl", [{"input_ids": [1, 2, 3], "labels": [-100, 2, -5]}])
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "plain_dir").mkdir()
    return {
        "missing file": (tmp / "nope.jsonl", {}, "does not exist"),
        "unreadable txt": (tmp / "bad_utf8.txt", {}, "not UTF-8"),
        "unreadable jsonl": (tmp / "bad_utf8.jsonl", {}, "line 2 is not UTF-8"),
        "empty file": (tmp / "empty.jsonl", {}, "no documents"),
        "blank txt": (tmp / "blank.txt", {}, "no documents"),
        "empty texts": (tmp / "empty_texts.jsonl", {}, "no documents"),
        "not json": (tmp / "not_json.jsonl", {}, "line 3 is not JSON"),
        "not an object": (tmp / "not_object.jsonl", {}, "line 1 is a JSON list"),
        "missing field": (tmp / "no_field.jsonl", {}, "fields present: question, answer"),
        "text not a string": (tmp / "text_not_str.jsonl", {}, "'text' is a int"),
        "id out of range": (tmp / "out_of_range.jsonl", {}, f"line 2: input_ids holds {len(tok)}, outside"),
        "negative id": (tmp / "negative.jsonl", {}, "holds -1, outside"),
        "ids not ints": (tmp / "not_ints.jsonl", {}, "not an integer"),
        "labels of the wrong length": (tmp / "short_labels.jsonl", {}, "line 2: labels has 2 entries but input_ids has 3"),
        "label out of range": (tmp / "bad_label.jsonl", {}, "line 1: labels holds -5"),
        "unsupported extension": (tmp / "data.csv", {}, "unsupported data format '.csv'"),
        "plain directory": (tmp / "plain_dir", {}, "not one written by datasets' save_to_disk"),
        "seq_len too small": (tmp / "no_field.jsonl", {"seq_len": 1}, "seq_len is 1"),
    }


ERROR_CASES = ["missing file", "unreadable txt", "unreadable jsonl", "empty file", "blank txt",
               "empty texts", "not json", "not an object", "missing field", "text not a string",
               "id out of range", "negative id", "ids not ints", "labels of the wrong length",
               "label out of range", "unsupported extension",
               "plain directory", "seq_len too small"]


@pytest.mark.parametrize("case", ERROR_CASES)
@pytest.mark.parametrize("packing", [True, False])
def test_bad_data_is_a_one_line_data_error(tmp_path, tok, case, packing):
    path, kwargs, expected = _bad_inputs(tmp_path, tok)[case]
    seq_len = int(kwargs.get("seq_len", 4))
    with pytest.raises(DataError) as excinfo:
        load_token_dataset(path, tok, seq_len, packing=packing)
    message = one_line_data_error(excinfo)
    assert expected in message
    if case not in ("seq_len too small",):
        assert str(path) in message


def test_error_cases_cover_every_case(tmp_path, tok):
    assert sorted(_bad_inputs(tmp_path, tok)) == sorted(ERROR_CASES)


# --------------------------------------------------------------------------------------------
# Batches: order, determinism, resume


def numbered_dataset(n: int, seq_len: int = 3, padded: bool = False) -> TokenDataset:
    """Sequence i holds tokens [i, i, ...]: batches show which sequences they hold."""
    tokens = torch.arange(n, dtype=torch.int32).unsqueeze(1).repeat(1, seq_len)
    mask = torch.ones(n, seq_len, dtype=torch.int8) if padded else None
    return TokenDataset(tokens, mask, "numbered", n, n)


def order_of(dataset: TokenDataset, mbs: int, seed: int, epoch: int, **kwargs) -> list[int]:
    return [int(x) for b in iterate_batches(dataset, mbs, seed, epoch, **kwargs)
            for x in b["input_ids"][:, 0]]


def test_batches_shape_dtype_and_drop_last():
    dataset = numbered_dataset(10, seq_len=5, padded=True)
    batches = list(iterate_batches(dataset, 4, seed=0, epoch=0))
    assert len(batches) == 2 == batches_per_epoch(dataset, 4)
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert all(v.shape == (4, 5) and v.dtype == torch.long for v in batch.values())
    packed = list(iterate_batches(numbered_dataset(10), 3, seed=0, epoch=0))
    assert len(packed) == 3 and set(packed[0]) == {"input_ids", "labels"}


def test_order_depends_only_on_seed_and_epoch():
    dataset = numbered_dataset(64)
    first = order_of(dataset, 4, seed=7, epoch=0)
    torch.manual_seed(123)  # the global RNG must not matter
    assert order_of(dataset, 4, seed=7, epoch=0) == first
    assert sorted(first) == list(range(64))  # a permutation: each sequence once per epoch
    assert first != list(range(64))
    assert order_of(dataset, 4, seed=7, epoch=1) != first
    assert order_of(dataset, 4, seed=8, epoch=0) != first
    assert order_of(dataset, 4, seed=0, epoch=1) != order_of(dataset, 4, seed=1, epoch=0)
    assert order_of(dataset, 4, seed=7, epoch=0, shuffle=False) == list(range(64))
    assert order_of(dataset, 8, seed=7, epoch=0) == first  # micro-batch size only groups


def test_resume_from_a_position_equals_the_tail_of_an_uninterrupted_run():
    dataset = numbered_dataset(50, padded=True)
    full = list(iterate_batches(dataset, 4, seed=3, epoch=2))
    assert len(full) == 12
    for k in (0, 1, 5, 11, 12):
        resumed = list(iterate_batches(dataset, 4, seed=3, epoch=2, start=DataPosition(2, k)))
        assert len(resumed) == len(full) - k
        for a, b in zip(resumed, full[k:], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    earlier = list(iterate_batches(dataset, 4, seed=3, epoch=2, start=DataPosition(1, 7)))
    assert [b["input_ids"].tolist() for b in earlier] == [b["input_ids"].tolist() for b in full]
    assert list(iterate_batches(dataset, 4, seed=3, epoch=2, start=DataPosition(3, 0))) == []


def test_resume_past_the_end_of_an_epoch_is_an_error():
    with pytest.raises(DataError) as excinfo:
        iterate_batches(numbered_dataset(8), 4, seed=0, epoch=0, start=DataPosition(0, 3))
    assert "data or micro_batch_size changed" in one_line_data_error(excinfo)


def test_positions_order_and_advance():
    assert DataPosition(0, 9) < DataPosition(1, 0) < DataPosition(1, 1)
    assert DataPosition(1, 3).advance(4, batches_in_epoch=5) == DataPosition(2, 2)
    assert DataPosition(0, 0).advance(10, batches_in_epoch=5) == DataPosition(2, 0)


def test_steps_per_epoch():
    dataset = numbered_dataset(50)
    assert batches_per_epoch(dataset, 4) == 12
    assert steps_per_epoch(dataset, 4, 1) == 12
    assert steps_per_epoch(dataset, 4, 5) == 2
    assert steps_per_epoch(dataset, 8, 8) == 0
    for bad in ((0, 1), (4, 0)):
        with pytest.raises(DataError):
            steps_per_epoch(dataset, *bad)


def test_fingerprint_changes_with_the_data():
    a, b = numbered_dataset(8), numbered_dataset(9)
    assert a.fingerprint() == numbered_dataset(8).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != numbered_dataset(8, padded=True).fingerprint()
