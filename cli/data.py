"""Training data for causal-LM fine-tuning, with Hugging Face ``Trainer`` semantics.

Text is trained on with ``labels = input_ids`` (the model shifts them); positions whose label is
``-100`` (padding, or masked by the user's own ``labels``) are not targets. The loss of a step is
Trainer's: the sum of token losses over its micro-batches over the number of targets in the step.

Sources (:func:`load_token_dataset`):

* ``*.jsonl``: one JSON object per line (blank lines skipped). A line with an ``input_ids`` field
  (a list of ints, already tokenized) is used exactly as given, with its ``labels`` if it has them
  (same length, ``-100`` = not a target, as Trainer and TRL take them); ids are checked against
  the model's ``vocab_size``, and no tokenizer is needed for them. Otherwise its text field
  (``text`` by default, see ``text_field``) is tokenized.
* ``*.txt``: UTF-8 text; documents are separated by blank lines (a line holding only
  whitespace counts as blank), so a paragraph is a document. A file without blank lines is one
  document.
* a directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``, whose
  ``train`` split is used) with an ``input_ids`` or a text column; needs the ``datasets`` package.

Text is encoded with ``tokenizer(text, add_special_tokens=True)`` (so a tokenizer that prepends
``bos``, like Llama's, does so) and ``eos`` is appended to every text document that does not
already end with it (pre-tokenized rows are never changed). Empty documents are skipped.

* ``packing=True`` (default): documents are concatenated as they are and cut into windows of
  ``seq_len`` tokens (their labels alike); the last partial window is dropped. No attention mask.
* ``packing=False``: one sequence per document, truncated to ``seq_len`` and right-padded with the
  pad token (the eos token if the tokenizer has no pad token; the model's ``pad_token_id``, else 0,
  without a tokenizer); ``attention_mask`` is 0 and ``labels`` is -100 on padding. Unlike
  ``DataCollatorForLanguageModeling``, the mask (not the pad id) decides, so an eos that doubles as
  the pad token is still trained on.

Batches (:func:`iterate_batches`) come in an order that depends only on ``(seed, epoch)``, and a
:class:`DataPosition` resumes exactly where a run stopped. The whole data set is tokenized in
memory when loaded (int32 tokens, 4 bytes each).

Errors a user can fix raise :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cli.sft import SftOptions, SftRow, render
from offload.errors import OffloadError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Any one of these in a directory makes AutoTokenizer able to load a tokenizer from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")
SUPPORTED = ".jsonl file, .txt file, or a directory written by datasets' save_to_disk"
IGNORE_INDEX = -100
_TOKENIZE_BATCH = 256  # texts per tokenizer call
_DATASET_BATCH = 1024  # rows per read of a saved dataset



@dataclass(frozen=True)
class Tokens:
    """A pre-tokenized row: its ids, and its labels (None: the ids themselves)."""

    ids: list[Any]
    labels: list[Any] | None = None


Document = tuple[str, "str | Tokens | SftRow"]  # (where it comes from, for messages; text, ids or an SFT row)
TokenizerSource = Any  # a tokenizer, a zero-argument callable returning one (loaded on first text), or None


class DataError(OffloadError):
    """The training data or the tokenizer cannot be used as configured."""


# --------------------------------------------------------------------------------------------
# Shipped assets and the tokenizer


def default_tokenizer_path() -> Path:
    """Directory of the shipped byte-level BPE tokenizer (4096 tokens; loads offline)."""
    return ASSETS_DIR / "tokenizer"


def default_corpus_path() -> Path:
    """The shipped English corpus (Python's own documentation), a ``.txt`` of paragraphs."""
    return ASSETS_DIR / "corpus.txt"


def has_tokenizer_files(path: Path) -> bool:
    """Whether ``path`` is a directory holding at least one tokenizer file."""
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | None, model_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer to train with, loaded without any download.

    ``name_or_path`` if given (a local directory, or a model id already in the local Hugging Face
    cache); else ``model_path`` if that checkpoint directory holds tokenizer files; else the shipped
    default (:func:`default_tokenizer_path`).
    """
    if name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.exists() and _looks_like_hub_id(name_or_path):
            return _load_from_cache(name_or_path)
        if not path.exists():
            raise DataError(f"tokenizer directory {path} does not exist; point the tokenizer setting "
                            f"at a local directory saved with save_pretrained, or leave it unset")
        if not has_tokenizer_files(path):
            raise DataError(f"{path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                            f"point the tokenizer setting at a directory saved with save_pretrained")
        return _load_from_dir(path)
    if model_path and has_tokenizer_files(Path(model_path).expanduser()):
        return _load_from_dir(Path(model_path).expanduser())
    if model_path:
        log.warning("no tokenizer files in %s: using the shipped default tokenizer", model_path)
    return _load_from_dir(default_tokenizer_path())


@dataclass(frozen=True)
class TokenizerPolicy:
    """Which tokenizer a run's text is encoded with (``tokenizer_policy``).

    ``available``: a tokenizer that goes with the model (``data.tokenizer``, or the checkpoint's
    own files), loaded up front, saved with the run whether or not the data needed it.
    ``for_text()``: the tokenizer text is encoded with, or a one-line error; called only when the
    data holds text (token-id rows need none)."""

    available: PreTrainedTokenizerBase | None
    model_path: str | None
    vocab_size: int | None

    def for_text(self) -> PreTrainedTokenizerBase:
        tokenizer = self.available
        if tokenizer is None and self.model_path:
            # never tokenize real weights' training text with a tokenizer they were not trained with
            raise DataError(f"model.name_or_path {self.model_path} has no tokenizer files and the data is "
                            f"text; set data.tokenizer to the model's tokenizer (a directory saved with "
                            f"save_pretrained), or give pre-tokenized input_ids rows")
        if tokenizer is None:  # a random-init model.config: the shipped tokenizer may do
            tokenizer = _load_from_dir(default_tokenizer_path())
            where = "model.config.vocab_size"
        else:
            where = "the model's vocab_size"
        if self.vocab_size is not None and len(tokenizer) > self.vocab_size:
            raise DataError(f"the tokenizer has {len(tokenizer)} tokens but {where} is {self.vocab_size}; "
                            f"set model.config.vocab_size >= {len(tokenizer)} or use the model's tokenizer")
        return tokenizer


def tokenizer_policy(tokenizer_name: str | None, model_path: str | None,
                     vocab_size: int | None) -> TokenizerPolicy:
    """Text needs the model's tokenizer (``data.tokenizer`` overrides); a pretrained checkpoint
    without tokenizer files and text data is an error naming ``data.tokenizer``; a random-init
    ``model.config`` may use the shipped tokenizer, if its ``vocab_size`` covers it."""
    available = None
    if tokenizer_name:
        available = load_tokenizer(tokenizer_name, None)
    elif model_path and has_tokenizer_files(Path(model_path).expanduser()):
        available = _load_from_dir(Path(model_path).expanduser())
    return TokenizerPolicy(available, model_path, vocab_size)


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: not absolute, not relative-dotted, at most one slash."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def _load_from_dir(path: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a local directory, errors turned into DataError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types for unreadable tokenizer files
        raise DataError(f"cannot load the tokenizer in {path}: {first_line(err)}; "
                        f"re-save it with save_pretrained") from None


def _load_from_cache(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer already in the local Hugging Face cache (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # OSError when absent from the cache, ValueError for an invalid id
        raise DataError(f"tokenizer {name!r} is neither a local directory nor in the local Hugging "
                        f"Face cache (nothing is downloaded); give the path of a directory saved "
                        f"with save_pretrained") from None


# --------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Fixed-length token sequences, ready to batch.

    ``tokens`` is ``(len, seq_len)`` int32; ``attention_mask`` is ``None`` for packed data, else
    ``(len, seq_len)`` int8 with 0 on padding; ``labels`` is ``None`` when every label is its
    token, else ``(len, seq_len)`` int32 (``-100``: not a target).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    source: str
    n_documents: int
    vocab_size: int
    labels: torch.Tensor | None = None
    tokenizer: Any = None  # the tokenizer text was encoded with (None: the data was all token ids)
    position_ids: torch.Tensor | None = None  # packed supervised rows: positions restart per row

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self.tokens.shape[1])

    @property
    def packed(self) -> bool:
        """Whether documents were packed into full blocks (no padding, no attention mask)."""
        return self.attention_mask is None

    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the data set."""
        if self.attention_mask is None:
            return self.tokens.numel()
        return int(self.attention_mask.sum())

    def n_targets(self) -> int:
        """Target tokens as a causal LM counts them: labels other than -100, past each row's first."""
        targets = torch.ones_like(self.tokens[:, 1:], dtype=torch.bool)
        if self.labels is not None:
            targets &= self.labels[:, 1:].ne(IGNORE_INDEX)
        if self.attention_mask is not None:
            targets &= self.attention_mask[:, 1:].bool()
        return int(targets.sum())

    def max_token_id(self) -> int:
        """The largest token id present (must be below the model's ``vocab_size``)."""
        return int(self.tokens.max()) if self.tokens.numel() else -1

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Sequences ``indices`` as ``input_ids``, ``labels`` (and ``attention_mask``), int64."""
        index = torch.as_tensor(indices, dtype=torch.long)
        input_ids = self.tokens[index].long()
        labels = self.labels[index].long() if self.labels is not None else input_ids.clone()
        if self.attention_mask is None:
            out = {"input_ids": input_ids, "labels": labels}
            if self.position_ids is not None:  # transformers masks attention per packed row from these
                out["position_ids"] = self.position_ids[index].long()
            return out
        mask = self.attention_mask[index].long()
        return {"input_ids": input_ids, "labels": labels.masked_fill(mask == 0, IGNORE_INDEX),
                "attention_mask": mask}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Sequence ``i`` as 1-D tensors."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return {k: v[0] for k, v in self.batch([i % len(self)]).items()}

    def fingerprint(self) -> str:
        """SHA-256 of the sequences (and mask): a checkpoint can tell whether the data changed."""
        digest = hashlib.sha256(f"{tuple(self.tokens.shape)}:{self.packed}".encode())
        # hashed in place (a memoryview of each array, no copy of the dataset)
        digest.update(memoryview(self.tokens.contiguous().numpy()).cast("B"))
        if self.attention_mask is not None:
            digest.update(memoryview(self.attention_mask.contiguous().numpy()).cast("B"))
        if self.labels is not None:
            digest.update(b"labels")
            digest.update(memoryview(self.labels.contiguous().numpy()).cast("B"))
        if self.position_ids is not None:
            digest.update(b"positions")
            digest.update(memoryview(self.position_ids.contiguous().numpy()).cast("B"))
        return digest.hexdigest()


def load_token_dataset(path: str | Path, tokenizer: TokenizerSource, seq_len: int,
                       packing: bool = True, text_field: str = "text", vocab_size: int | None = None,
                       pad_token_id: int | None = None, sft: SftOptions | None = None,
                       split: str = "train") -> TokenDataset:
    """Read, tokenize and cut ``path`` into sequences of ``seq_len`` tokens (see the module doc).

    ``tokenizer``: a tokenizer, or a callable that returns one (called only if the data holds
    text), or None (token ids only). ``vocab_size``: the model's embedding rows, which token ids
    must stay below (default: the tokenizer's size). ``pad_token_id``: pads rows without packing
    when no tokenizer was needed (default 0; padding is masked out either way). ``sft``: loss
    masking of ``messages`` and ``prompt``/``completion`` rows (``cli.sft``)."""
    if seq_len < 2:
        raise DataError(f"seq_len is {seq_len}: a causal LM needs at least 2 tokens per sequence; "
                        f"set seq_len to e.g. 512")
    path = Path(path).expanduser()
    source = str(path)
    encoder = _Encoder(tokenizer)
    if vocab_size is None:
        if encoder.tokenizer is None:
            raise ValueError("load_token_dataset needs vocab_size when no tokenizer is given")
        vocab_size = len(encoder.tokenizer)
    rows = _collect(_token_documents(_read_documents(path, text_field, split), encoder, vocab_size, sft or SftOptions()))
    flat, flat_labels, lengths = rows.tokens, rows.labels, rows.lengths
    if not lengths:
        raise DataError(f"{source} holds no documents (empty, or every text is empty); "
                        f"give a file with training text")
    positions = None
    if packing:
        if rows.separate:  # supervised rows: no attention, and no target, across a row boundary
            flat_labels, positions = _separated(flat, flat_labels, lengths)
            positions = _pack(positions, seq_len, source)
        tokens, mask = _pack(flat, seq_len, source), None
        labels = _pack(flat_labels, seq_len, source) if flat_labels is not None else None
    else:
        pad = _pad_id(encoder.tokenizer) if encoder.tokenizer is not None else (pad_token_id or 0)
        tokens, mask = _pad(flat, lengths, seq_len, pad)
        labels = _pad(flat_labels, lengths, seq_len, IGNORE_INDEX)[0] if flat_labels is not None else None
        _warn_cut_rows(source, lengths, seq_len, labels)
    dataset = TokenDataset(tokens, mask, source, len(lengths), vocab_size, labels, encoder.tokenizer, positions)
    log.info("%s: %d documents, %d sequences of %d tokens (%s)", source, len(lengths), len(dataset),
             seq_len, "packed" if packing else "padded")
    return dataset


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad token id, or the eos token id where the tokenizer has no pad token."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class _Rows:
    tokens: torch.Tensor  # every document's tokens end to end, int32
    labels: torch.Tensor | None  # likewise; None when every label is its token
    lengths: list[int]
    separate: bool  # supervised rows: packed, each keeps to itself (positions restart, see _separated)


def _separated(flat: torch.Tensor, labels: torch.Tensor | None, lengths: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed supervised rows as TRL's padding-free packing treats them: position ids restart at
    each row (transformers then masks attention block-diagonally), and a row's first token is no
    target (it would be predicted from the row before)."""
    labels = (labels if labels is not None else flat).clone()
    positions = torch.empty_like(flat)
    offset = 0
    for length in lengths:
        positions[offset : offset + length] = torch.arange(length, dtype=flat.dtype)
        if length:
            labels[offset] = IGNORE_INDEX
        offset += length
    return labels, positions


def _collect(docs: Iterable[tuple[list[int], list[int] | None, bool]]) -> _Rows:
    """All documents' tokens and labels end to end, their lengths, whether any is supervised."""
    buffer, label_buffer = array("i"), array("i")
    lengths: list[int] = []
    any_labels = separate = False
    for ids, labels, supervised in docs:
        separate |= supervised
        buffer.extend(ids)
        if labels is not None and not any_labels:  # the first row with labels of its own
            any_labels = True
            label_buffer.extend(buffer[: len(buffer) - len(ids)])
        if any_labels:
            label_buffer.extend(labels if labels is not None else ids)
        lengths.append(len(ids))
    return _Rows(_int32(buffer), _int32(label_buffer) if any_labels else None, lengths, separate)


def _int32(buffer: array) -> torch.Tensor:
    return torch.frombuffer(buffer, dtype=torch.int32).clone() if buffer else torch.empty(0, dtype=torch.int32)


def _pack(flat: torch.Tensor, seq_len: int, source: str) -> torch.Tensor:
    """Cut full blocks of ``seq_len`` tokens from the concatenated documents; drop the rest."""
    n_blocks = flat.numel() // seq_len
    if n_blocks == 0:
        raise DataError(f"{source} gives {flat.numel()} tokens, fewer than one sequence of "
                        f"seq_len={seq_len}; add data or lower seq_len")
    dropped = flat.numel() - n_blocks * seq_len
    if dropped:
        log.info("%s: the last %d tokens do not fill a block of %d and are dropped", source, dropped,
                 seq_len)
    return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).clone()


def _warn_cut_rows(source: str, lengths: list[int], seq_len: int, labels: torch.Tensor | None) -> None:
    """Say how many rows ``_pad`` cuts to ``seq_len`` (their ends are not trained on), and how
    many supervised rows the cut leaves without any target."""
    long_rows = [n for n in lengths if n > seq_len]
    if long_rows:
        log.warning("%s: %d of %d rows are longer than seq_len %d; their last %d tokens in all are cut "
                    "(raise data.seq_len, or set data.packing: true to keep every token)", source,
                    len(long_rows), len(lengths), seq_len, sum(long_rows) - seq_len * len(long_rows))
    if labels is not None:
        empty = int(labels[:, 1:].ne(IGNORE_INDEX).sum(dim=1).eq(0).sum())
        if empty:
            log.warning("%s: %d rows have no target left within seq_len %d (the prompt fills it): they add "
                        "nothing to the loss; raise data.seq_len or shorten those prompts", source, empty, seq_len)


def _pad(flat: torch.Tensor, lengths: list[int], seq_len: int,
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per document: truncated to ``seq_len``, right-padded with ``pad_id``."""
    tokens = torch.full((len(lengths), seq_len), pad_id, dtype=torch.int32)
    mask = torch.zeros((len(lengths), seq_len), dtype=torch.int8)
    offset = 0
    for row, length in enumerate(lengths):
        n = min(length, seq_len)
        tokens[row, :n] = flat[offset : offset + n]
        mask[row, :n] = 1
        offset += length
    return tokens, mask


class _Encoder:
    """Text -> token ids with a tokenizer loaded on first use (data of token ids needs none)."""

    def __init__(self, source: TokenizerSource) -> None:
        from transformers import PreTrainedTokenizerBase

        self._source = source
        self.tokenizer = source if isinstance(source, PreTrainedTokenizerBase) else None

    def encode(self, texts: list[str], where: str) -> Iterator[list[int]]:
        """Tokenize a batch of texts (special tokens as the tokenizer adds them) and add eos."""
        if not texts:
            return
        tokenizer = self.get(where)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no eos token, needed to separate documents; "
                            "set eos_token in its tokenizer_config.json or use another tokenizer")
        encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        for ids in encoded:
            yield _with_eos(list(ids), eos)

    def get(self, where: str) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            if self._source is None:
                raise DataError(f"{where} is text, and no tokenizer is set for it; set data.tokenizer, "
                                f"or give pre-tokenized input_ids rows")
            self.tokenizer = self._source()
        return self.tokenizer


def _token_documents(docs: Iterable[Document], encoder: _Encoder, vocab: int, sft: SftOptions
                     ) -> Iterator[tuple[list[int], list[int] | None, bool]]:
    """Each non-empty document as (token ids, labels or None, supervised), in input order: text
    encoded with eos appended, token-id rows exactly as given, SFT rows rendered (``cli.sft``)."""
    pending: list[str] = []
    first_where = ""
    for where, doc in docs:
        if isinstance(doc, SftRow):
            yield from ((ids, None, False) for ids in encoder.encode(pending, first_where))
            pending, first_where = [], ""
            ids, labels = render(doc, encoder.get(where), sft, where)
            if ids:
                yield (*_checked_row(Tokens(ids, labels), vocab, where), True)
            continue
        if not (doc.strip() if isinstance(doc, str) else doc.ids):
            continue  # an empty document
        if isinstance(doc, str):
            first_where = first_where or where
            pending.append(doc)
            if len(pending) >= _TOKENIZE_BATCH:
                yield from ((ids, None, False) for ids in encoder.encode(pending, first_where))
                pending, first_where = [], ""
            continue
        yield from ((ids, None, False) for ids in encoder.encode(pending, first_where))
        pending, first_where = [], ""
        ids, labels = _checked_row(doc, vocab, where)
        yield ids, labels, labels is not None
    yield from ((ids, None, False) for ids in encoder.encode(pending, first_where))


def _with_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` ending with ``eos`` (appended unless already there)."""
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids


def _checked_row(row: Tokens, vocab: int, where: str) -> tuple[list[int], list[int] | None]:
    """A pre-tokenized row (copies), after checking its ids are ints in ``[0, vocab)`` and its
    labels, if any, ints of the same length (-100 or a token id)."""
    ids = _checked_ints(row.ids, where, "input_ids")
    out_of_range = next((x for x in ids if not 0 <= x < vocab), None)
    if out_of_range is not None:
        raise DataError(f"{where}: input_ids holds {out_of_range}, outside the model's vocabulary "
                        f"0..{vocab - 1} (vocab_size {vocab}); tokenize with the model's tokenizer")
    if row.labels is None:
        return ids, None
    labels = _checked_ints(row.labels, where, "labels")
    if len(labels) != len(ids):
        raise DataError(f"{where}: labels has {len(labels)} entries but input_ids has {len(ids)}; "
                        f"labels must match input_ids position by position (-100: not a target)")
    bad = next((x for x in labels if x != IGNORE_INDEX and not 0 <= x < vocab), None)
    if bad is not None:
        raise DataError(f"{where}: labels holds {bad}, neither -100 nor a token id of the model's "
                        f"vocabulary 0..{vocab - 1}")
    return ids, labels


def _checked_ints(values: list[Any], where: str, field: str) -> list[int]:
    bad = next((x for x in values if isinstance(x, bool) or not isinstance(x, int)), None)
    if bad is not None:
        raise DataError(f"{where}: {field} holds {bad!r}, not an integer; {field} must be a list of "
                        f"token ids")
    return list(values)


# --------------------------------------------------------------------------------------------
# Readers: each yields (where, text or ids) per document


def _read_documents(path: Path, text_field: str, split: str = "train") -> Iterator[Document]:
    """Dispatch on what ``path`` is; checks existence and type eagerly. ``split``: which split
    of a saved DatasetDict (``_pick_split``)."""
    if not path.exists():
        raise DataError(f"training data {path} does not exist; give a {SUPPORTED}")
    if path.is_dir():
        return _read_saved_dataset(path, text_field, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".txt":
        return _read_txt(path)
    raise DataError(f"{path}: unsupported data format {suffix or '(no extension)'!r}; give a "
                    f"{SUPPORTED} (a JSON-lines file must be named *.jsonl)")


def _read_txt(path: Path) -> Iterator[Document]:
    """Paragraphs (split on blank lines) of a UTF-8 text file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; check the path and its "
                        f"permissions") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); convert it to UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for i, part in enumerate(re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text), start=1):
        yield f"{path} paragraph {i}", part.strip("\n").rstrip()


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    """One document per non-blank line of a JSON-lines file."""
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; check the path and its "
                        f"permissions") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where} is not UTF-8 text; convert the file to UTF-8") from None
            if line.strip():
                yield where, _jsonl_document(line, where, text_field)


def _jsonl_document(line: str, where: str, text_field: str) -> str | Tokens | SftRow:
    """The ``input_ids`` or the text of one JSON line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not JSON ({err.msg} at column {err.colno}); a .jsonl file "
                        f"holds one JSON object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; each line must "
                        f"be an object such as {{\"{text_field}\": \"...\"}}")
    return _record_document(record, where, text_field, "fields")


def _record_document(record: dict[str, Any], where: str, text_field: str,
                     kind: str) -> str | Tokens | SftRow:
    """``record["input_ids"]`` (and ``labels``) if present, an SFT row (``messages``, or ``prompt``
    and ``completion``), else ``record[text_field]`` (a string)."""
    if "input_ids" not in record and SftRow.detect(record):
        return SftRow(record)
    if "input_ids" in record:
        ids, labels = record["input_ids"], record.get("labels")
        for field, value in (("input_ids", ids), ("labels", labels)):
            if value is not None and not isinstance(value, list):
                raise DataError(f"{where}: {field} is a {type(value).__name__}, not a list of token ids")
        return Tokens(ids, labels)
    if text_field not in record:
        present = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no {text_field!r} or 'input_ids' {kind[:-1]} ({kind} present: "
                        f"{present}); set text_field to the one holding the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_field!r} is a {type(text).__name__}, not a string")
    return text


def _read_saved_dataset(path: Path, text_field: str, split: str = "train") -> Iterator[Document]:
    """Rows of a ``save_to_disk`` directory (of a DatasetDict, the split ``_pick_split`` picks)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path} is a directory but not one written by datasets' save_to_disk (no "
                        f"state.json or dataset_dict.json); give a {SUPPORTED}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {path} (a save_to_disk directory) needs the 'datasets' package: "
                        f"pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, pyarrow errors on damaged files
        raise DataError(f"cannot read the dataset in {path}: {first_line(err)}; re-save it with "
                        f"save_to_disk") from None
    dataset = _pick_split(loaded, path, split)
    names = dataset.column_names
    if "input_ids" not in names and ("messages" in names or {"prompt", "completion"} <= set(names)):
        columns = ["messages"] if "messages" in names else ["prompt", "completion"]
        return _saved_rows(dataset.select_columns(columns), path, columns, text_field)
    column = "input_ids" if "input_ids" in names else text_field
    if column not in dataset.column_names:
        present = ", ".join(dataset.column_names) or "none"
        raise DataError(f"{path}: no {text_field!r} or 'input_ids' column (columns present: "
                        f"{present}); set text_field to the one holding the text")
    columns = [column, "labels"] if column == "input_ids" and "labels" in dataset.column_names else [column]
    return _saved_rows(dataset.select_columns(columns), path, columns, text_field)


EVAL_SPLITS = ("validation", "valid", "eval", "test", "dev")


def _pick_split(loaded: Any, path: Path, split: str = "train") -> Any:
    """A Dataset as it is; from a DatasetDict, its only split, else for training its ``train``
    split and for evaluation (``split="eval"``) the first of ``EVAL_SPLITS`` it holds."""
    if not hasattr(loaded, "keys"):
        return loaded
    splits = list(loaded.keys())
    if len(splits) == 1:
        return loaded[splits[0]]
    wanted = ("train",) if split == "train" else EVAL_SPLITS
    for name in wanted:
        if name in splits:
            return loaded[name]
    raise DataError(f"{path} holds splits {', '.join(splits)} and none is {' or '.join(map(repr, wanted))}; "
                    f"save the split to {'train' if split == 'train' else 'evaluate'} on alone with "
                    f"Dataset.save_to_disk")


def _saved_rows(dataset: Any, path: Path, columns: list[str], text_field: str) -> Iterator[Document]:
    """One document per row, read a batch of rows at a time."""
    row = 0
    for chunk in dataset.iter(batch_size=_DATASET_BATCH):
        for values in zip(*(chunk[c] for c in columns), strict=True):
            where = f"{path} row {row}"
            row += 1
            yield where, _record_document(dict(zip(columns, values, strict=True)), where, text_field, "columns")


# --------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True, order=True)
class DataPosition:
    """Where the data stream stands: the next micro-batch is ``batch_index`` of ``epoch``.

    Positions order as (epoch, batch_index). ``batch_index`` may equal the number of batches in
    the epoch (that epoch is finished).
    """

    epoch: int = 0
    batch_index: int = 0

    def advance(self, n_batches: int, batches_in_epoch: int) -> DataPosition:
        """The position ``n_batches`` micro-batches later, rolling over into later epochs."""
        if batches_in_epoch < 1:
            raise ValueError("batches_in_epoch must be positive")
        total = self.batch_index + n_batches
        return DataPosition(self.epoch + total // batches_in_epoch, total % batches_in_epoch)


def batches_per_epoch(dataset: TokenDataset, micro_batch_size: int) -> int:
    """Full micro-batches in one epoch (an incomplete last one is dropped)."""
    _check_micro_batch_size(micro_batch_size)
    return len(dataset) // micro_batch_size


def steps_per_epoch(dataset: TokenDataset, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of ``grad_accum`` full micro-batches in one epoch (may be 0)."""
    if grad_accum < 1:
        raise DataError(f"gradient accumulation steps is {grad_accum}; it must be at least 1")
    return batches_per_epoch(dataset, micro_batch_size) // grad_accum


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the ``n`` sequences in ``epoch``: a function of ``(seed, epoch)`` only."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing ``seed`` and ``epoch`` (no collisions such as (0, 1) vs (1, 0))."""
    digest = hashlib.sha256(f"offload-train data {seed} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def iterate_batches(dataset: TokenDataset, micro_batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True, start: DataPosition | None = None,
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of ``epoch`` in a ``(seed, epoch)``-determined order.

    Yields ``{"input_ids", "labels"[, "attention_mask"]}``, int64 tensors of shape
    ``(micro_batch_size, seq_len)``; the last incomplete micro-batch is dropped. With ``start``,
    batches at positions before it are skipped without being built: ``start`` in an earlier epoch
    skips nothing, in a later epoch skips all.
    """
    n_batches = batches_per_epoch(dataset, micro_batch_size)
    first = 0
    if start is not None and start.epoch == epoch:
        if not 0 <= start.batch_index <= n_batches:
            raise DataError(f"cannot resume at batch {start.batch_index} of epoch {epoch}: an epoch "
                            f"has {n_batches} micro-batches now; the data or micro_batch_size "
                            f"changed since the checkpoint")
        first = start.batch_index
    elif start is not None and start.epoch > epoch:
        first = n_batches
    return _batches(dataset, micro_batch_size, epoch_order(len(dataset), seed, epoch, shuffle),
                    first, n_batches)


def _batches(dataset: TokenDataset, micro_batch_size: int, order: torch.Tensor, first: int,
             n_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    for b in range(first, n_batches):
        yield dataset.batch(order[b * micro_batch_size : (b + 1) * micro_batch_size])


def _check_micro_batch_size(micro_batch_size: int) -> None:
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size is {micro_batch_size}; it must be at least 1")
