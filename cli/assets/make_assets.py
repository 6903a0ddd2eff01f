"""Regenerate the shipped training assets: ``corpus.txt`` and ``tokenizer/``.

Run from the repository root (no network needed)::

    .venv/bin/python cli/assets/make_assets.py            # writes next to this file
    .venv/bin/python cli/assets/make_assets.py --out DIR  # writes elsewhere

What it builds:

* ``corpus.txt``: English text that every CPython install carries: the Zen of Python, the
  language-reference help topics of ``pydoc_data.topics`` (what ``help("if")`` prints), and the
  docstrings of a fixed list of side-effect-free standard-library modules and of the public
  functions, classes and methods they define. Documents are separated by blank lines (the
  ``.txt`` convention of :mod:`cli.data`); the file is capped at ``--max-bytes``. Its content
  depends on the Python version that ran this script, which is why the result is committed.
* ``tokenizer/``: a byte-level BPE (GPT-2 style pre-tokenization, every byte in the base alphabet,
  so any text encodes and ``decode(encode(text)) == text``) trained with the ``tokenizers``
  library on ``corpus.txt``, with special tokens ``<|bos|>`` ``<|eos|>`` ``<|pad|>`` ``<|unk|>``
  (ids 0-3), saved as a ``transformers`` fast tokenizer so that
  ``AutoTokenizer.from_pretrained(dir)`` loads it offline. No special token is added when
  encoding: :mod:`cli.data` appends ``<|eos|>`` after each document.

Given the same corpus and library versions the output is byte-identical: modules, members and
topics are visited in sorted order, duplicates are dropped, and the BPE trainer is deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

# Pure-Python or C modules whose import has no side effect (no window, no output, no thread).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "bz2", "calendar",
    "cmd", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)

SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
}
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 1_200_000


def zen_of_python() -> str:
    """The Zen of Python, decoded from the ``this`` module (whose first import prints it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(c, c) for c in this.s)


def clean(text: str) -> str:
    """Normalize one document: dedent, strip line ends, at most one blank line in a row."""
    text = inspect.cleandoc(text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def member_docs(module: object) -> Iterator[str]:
    """Docstrings of the public functions and classes ``module`` defines, and of their methods."""
    name = getattr(module, "__name__", "")
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield obj.__doc__ or ""
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isroutine(meth):
                    yield getattr(meth, "__doc__", None) or ""


def stdlib_documents() -> Iterator[str]:
    """Every raw document, in a fixed order: Zen, help topics, then module docstrings."""
    yield zen_of_python()
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. sqlite3 or zoneinfo missing from a minimal build
            continue
        yield module.__doc__ or ""
        yield from member_docs(module)


def build_corpus(documents: Iterable[str], max_bytes: int) -> str:
    """Join cleaned, de-duplicated, non-trivial documents with blank lines, up to ``max_bytes``."""
    seen: set[str] = set()
    parts: list[str] = []
    size = 0
    for raw in documents:
        doc = clean(raw)
        if len(doc) < 40 or doc in seen:  # one-liners like "Return self+value." teach little
            continue
        seen.add(doc)
        cost = len(doc.encode("utf-8")) + 2
        if size + cost > max_bytes:
            break
        parts.append(doc)
        size += cost
    return "\n\n".join(parts) + "\n"


def train_tokenizer(corpus_path: Path, out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on ``corpus_path`` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus_path)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # save_pretrained pretty-prints tokenizer.json (one line per merge item): rewrite it compactly.
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Write ``corpus.txt`` and ``tokenizer/`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus_path = args.out / "corpus.txt"
    with warnings.catch_warnings():  # touching typing.io and typing.re warns on Python 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        corpus = build_corpus(stdlib_documents(), args.max_bytes)
    corpus_path.write_text(corpus, encoding="utf-8")
    train_tokenizer(corpus_path, args.out / "tokenizer", args.vocab_size)
    for path in sorted([corpus_path, *(args.out / "tokenizer").iterdir()]):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
