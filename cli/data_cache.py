"""Tokenized data, cached: a second run or a resume on the same data does not tokenize again.

An entry is keyed by the data's identity (resolved path; size, modification time and inode of the
file, or of every file under a ``save_to_disk`` directory), every setting that shapes the
sequences (``seq_len``, ``packing``, ``text_field``, the model's ``vocab_size`` and pad id, the SFT
loss options) and a format number. It records the fingerprint of the tokenizer that encoded the
data's text (its full serialization and chat template), or none when the data held token ids
only; an entry whose tokenizer differs from the one the run would use is never served. Entries
live in ``$OFFLOAD_TRAIN_CACHE/data`` (default ``~/.cache/offload-train/data``), written atomically;
an unreadable entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cli.data import TokenDataset, load_token_dataset
from cli.sft import SftOptions

log = logging.getLogger(__name__)
FORMAT = 1
_TENSORS = ("tokens", "attention_mask", "labels", "position_ids")


def cache_dir() -> Path:
    from scheduler.profile import CACHE_DIR

    return CACHE_DIR / "data"


def load_cached(path: str | Path, tokenizer: Any, seq_len: int, packing: bool = True, text_field: str = "text",
                vocab_size: int | None = None, pad_token_id: int | None = None,
                sft: SftOptions | None = None, split: str = "train") -> TokenDataset:
    """``load_token_dataset`` with the cache in front of it (same arguments, same result)."""
    sft = sft or SftOptions()
    key = _key(Path(path).expanduser(), seq_len, packing, text_field, vocab_size, pad_token_id, sft, split)
    entry = cache_dir() / f"{key}.pt"
    cached = _read(entry)
    if cached is not None:
        fingerprint = cached.pop("tokenizer_fingerprint")
        loaded = _tokenizer(tokenizer) if fingerprint is not None else None
        if fingerprint is None or tokenizer_fingerprint(loaded) == fingerprint:
            log.info("%s: tokenized data from the cache (%s)", path, entry)
            return TokenDataset(**cached, tokenizer=loaded)
    dataset = load_token_dataset(path, tokenizer, seq_len, packing=packing, text_field=text_field,
                                 vocab_size=vocab_size, pad_token_id=pad_token_id, sft=sft, split=split)
    _write(entry, dataset)
    return dataset


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how a tokenizer encodes: its whole serialization, special tokens, chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    digest.update(json.dumps([special, tokenizer.chat_template or ""]).encode())
    return digest.hexdigest()


def _tokenizer(source: Any) -> Any:
    from transformers import PreTrainedTokenizerBase

    if source is None or isinstance(source, PreTrainedTokenizerBase):
        return source
    return source()


def _key(path: Path, seq_len: int, packing: bool, text_field: str, vocab_size: int | None,
         pad_token_id: int | None, sft: SftOptions, split: str = "train") -> str:
    doc = {"format": FORMAT, "path": str(path.resolve()), "files": _identity(path), "seq_len": seq_len,
           "packing": packing, "text_field": text_field, "vocab_size": vocab_size, "pad_token_id": pad_token_id,
           "sft": asdict(sft), **({} if split == "train" else {"split": split})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _identity(path: Path) -> list[list[Any]]:
    """(relative name, size, mtime_ns, inode) of the file, or of every file under the directory."""
    if not path.exists():
        return []  # load_token_dataset says what is wrong
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if f != path else "", st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def _read(entry: Path) -> dict[str, Any] | None:
    try:
        doc = torch.load(entry, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:  # a torn or foreign file: rebuild it
        log.warning("ignoring unreadable data cache entry %s (%s)", entry, err)
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT and doc.pop("format") else None


def _write(entry: Path, dataset: TokenDataset) -> None:
    doc: dict[str, Any] = {name: getattr(dataset, name) for name in _TENSORS}
    doc.update(format=FORMAT, source=dataset.source, n_documents=dataset.n_documents,
               vocab_size=dataset.vocab_size,
               tokenizer_fingerprint=tokenizer_fingerprint(dataset.tokenizer) if dataset.tokenizer else None)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        torch.save(doc, tmp)
        tmp.replace(entry)
    except OSError as err:  # a read-only or full cache disk costs only the next run's time
        log.warning("could not cache the tokenized data in %s (%s)", entry, err)
