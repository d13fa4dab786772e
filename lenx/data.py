"""Corpora and tokenizers.

A corpus is a list of documents per split (train / validation / test). A tokenizer turns a split
into one token stream with an end-of-document token between documents. The embedded default corpus,
`stdlib`, is the running Python's own standard library (`*.py`, no tests, no site-packages): it needs
no download, and its fingerprint (file list and contents) is recorded with every run and result.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import LenxError

SPLITS = ("train", "validation", "test")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    name: str
    fingerprint: str
    splits: dict[str, list[str]] = field(repr=False)

    def documents(self, split: str) -> list[str]:
        docs = self.splits.get(split) or []
        if not docs:
            raise LenxError(f"dataset '{self.name}' has no {split} documents; give it more text or files")
        return docs


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token (256)."""

    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        parts = []
        eod = np.array([self.eod_id], dtype=np.uint16)
        for doc in docs:
            parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
            parts.append(eod)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    def token_bytes(self, tokens: np.ndarray) -> int:
        """UTF-8 bytes of the text behind `tokens` (the end-of-document token has none)."""
        return int(np.count_nonzero(np.asarray(tokens) != self.eod_id))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


def get_tokenizer(name: str) -> ByteTokenizer:
    if name != "byte":
        raise LenxError(f"unknown tokenizer '{name}'; known: byte")
    return ByteTokenizer()


def _split_of(key: str) -> str:
    """Deterministic split by document: 90% train, 5% validation, 5% test."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "train" if h < 90 else "validation" if h < 95 else "test"


def _fingerprint(named_texts: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in named_texts:
        h.update(name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:16]


def _split_documents(named_texts: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Split (name, text) documents: by a hash of the name when there are enough of them;
    with few documents, the last goes to test and the one before to validation; one document
    is cut 90/5/5 by characters."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    if len(named_texts) >= 20:
        for name, text in named_texts:
            splits[_split_of(name)].append(text)
    elif len(named_texts) >= 3:
        splits["train"] = [t for _, t in named_texts[:-2]]
        splits["validation"] = [named_texts[-2][1]]
        splits["test"] = [named_texts[-1][1]]
    elif named_texts:
        text = "\n".join(t for _, t in named_texts)
        a, b = int(len(text) * 0.90), int(len(text) * 0.95)
        splits = {"train": [text[:a]], "validation": [text[a:b]], "test": [text[b:]]}
    return splits


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LenxError(f"cannot read {path}: {e.strerror}") from None


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune: never walk site-packages
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=4)
def load_corpus(spec: str) -> Corpus:
    """`stdlib`, a `.txt` file, or a directory of `.txt` files (one document per file)."""
    if spec == "stdlib":
        root, files = stdlib_files()
        named = [(p.relative_to(root).as_posix(), _read(p)) for p in files]
        return Corpus("stdlib", _fingerprint(named), _split_documents(named))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise LenxError(f"dataset directory {path} has no .txt files; put one document per .txt file there")
        named = [(p.relative_to(path).as_posix(), _read(p)) for p in files]
    elif path.is_file():
        named = [(path.name, _read(path))]
    else:
        raise LenxError(f"dataset '{spec}' not found; use 'stdlib', a .txt file or a directory of .txt files")
    named = [(n, t) for n, t in named if t.strip()]
    if not named:
        raise LenxError(f"dataset {path} is empty; give it some text")
    return Corpus(str(path), _fingerprint(named), _split_documents(named))


@lru_cache(maxsize=8)
def token_stream(spec: str, tokenizer: str, split: str) -> np.ndarray:
    """The split as one token stream, documents separated by the end-of-document token."""
    corpus = load_corpus(spec)
    return get_tokenizer(tokenizer).encode_documents(corpus.documents(split))


@lru_cache(maxsize=8)
def document_tokens(spec: str, tokenizer: str, split: str) -> tuple[np.ndarray, ...]:
    """The split's documents one by one, each as its tokens followed by the end-of-document token
    (the same tokens, in the same order, as `token_stream`)."""
    corpus = load_corpus(spec)
    tok = get_tokenizer(tokenizer)
    return tuple(tok.encode_documents([doc]) for doc in corpus.documents(split))
