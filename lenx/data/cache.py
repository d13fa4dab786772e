"""What lenx caches under `cache_dir()`: trained BPE tokenizers and token streams.

A BPE tokenizer is trained once per (vocabulary size, corpus fingerprint) and kept as `tokenizers/bpe<n>-<fp>.json`.
A split's token stream is kept as a memmap `tokens/<dataset fp>-<tokenizer fp>-<split>.bin` beside a JSON sidecar;
the file is written to a temporary name, fsynced and renamed, and read only if its sidecar's length, dtype and
checksum agree with it, so a half-written or corrupted file is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LenxError
from ..io import atomic_path, write_text
from .corpora import Corpus, load_corpus
from ..progress import CountBar
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, check_tokenizer_name, hf_tokenizer, parse_bpe


def cache_dir() -> Path:
    """`$LENX_CACHE`, else `$HF_HOME/lenx`, else `~/.cache/huggingface/lenx` (`$XDG_CACHE_HOME` respected)."""
    if os.environ.get("LENX_CACHE"):
        return Path(os.environ["LENX_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(hf_home).expanduser() / "lenx"


# ---------------------------------------------------------------- tokenizers by name


def get_tokenizer(name: str, dataset: Any = None, progress: bool = True) -> Tokenizer:
    """`byte`; `bpe:<n>`, trained on `dataset`'s training split (cached); or a transformers tokenizer."""
    check_tokenizer_name(name)
    if name == "byte":
        return ByteTokenizer()
    size = parse_bpe(name)
    if size is None:
        return hf_tokenizer(name)
    if dataset is None:
        raise LenxError(f"tokenizer '{name}' is trained on a dataset; none was given")
    corpus = load_corpus(dataset)
    tok = _trained_bpe(name, size, corpus, progress)
    if tok.vocab_size != size:  # the trainer stops when no pair is left to merge
        raise LenxError(f"tokenizer '{name}': the training split of '{corpus.name}' has too little text for {size} "
                        f"tokens (it gives {tok.vocab_size}); use bpe:{tok.vocab_size} or fewer, or more text")
    return tok


def _trained_bpe(name: str, size: int, corpus: Corpus, progress: bool) -> BPETokenizer:
    """The BPE tokenizer trained on `corpus`, read from the cache, else trained and cached."""
    path = cache_dir() / "tokenizers" / f"bpe{size}-{corpus.fingerprint}.json"
    if path.exists():
        try:
            return BPETokenizer.from_file(path, name)
        except Exception:  # unreadable: train it again below
            pass
    tok = BPETokenizer.train(name, size, corpus, progress)
    write_text(path, tok.tk.to_str())
    return tok


# ---------------------------------------------------------------- token streams


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _read_cached(path: Path, meta_path: Path, want: dict) -> np.ndarray | None:
    """The cached stream, or None when it is missing, half-written or does not match its sidecar."""
    try:
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in want.items()):
            return None
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
        if length <= 0 or path.stat().st_size != length * dtype.itemsize or _sha256_file(path) != meta["sha256"]:
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=(length,))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_stream(spec: Any, tokenizer: Tokenizer | str, split: str, progress: bool = True) -> np.ndarray:
    """The split as one token stream (a read-only memmap), each document followed by the end-of-document token.
    Cached under `cache_dir()/tokens`, keyed by (dataset fingerprint, tokenizer fingerprint, split)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer, spec, progress)
    corpus = load_corpus(spec)
    key = f"{corpus.fingerprint}-{tok.fingerprint}-{split}"
    path = cache_dir() / "tokens" / f"{key}.bin"
    meta_path = path.with_suffix(".json")
    want = {"dataset_fingerprint": corpus.fingerprint, "tokenizer_fingerprint": tok.fingerprint, "split": split,
            "dtype": np.dtype(tok.dtype).name, "eod_id": tok.eod_id}
    cached = _read_cached(path, meta_path, want)
    if cached is not None:
        return cached
    written = _write_stream(path, corpus, tok, split, progress)
    meta = {**want, **written, "dataset": corpus.name, "tokenizer": tok.name}
    write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    stream = _read_cached(path, meta_path, want)
    if stream is None:
        raise LenxError(f"the token cache {path} changed while it was written; rerun (or set LENX_CACHE)")
    return stream


def _write_stream(path: Path, corpus: Corpus, tok: Tokenizer, split: str, progress: bool) -> dict:
    """Tokenise the split into `path` (atomically); its length, documents and checksum for the sidecar."""
    total = corpus.size(split)  # raises the usual one-line error for an empty split
    h, n, n_docs = hashlib.sha256(), 0, 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(
            f"cannot create the token cache {path.parent}: {e.strerror}; set LENX_CACHE to a writable directory"
        ) from None
    with atomic_path(path) as tmp:
        bar = CountBar(f"tokenising {corpus.name} {split} ({tok.name})", total, progress)
        with open(tmp, "wb") as f, bar as advance:
            for docs, units in corpus.batches(split):
                if docs:
                    chunk = tok.encode_documents(docs)
                    data = chunk.tobytes()
                    f.write(data)
                    h.update(data)
                    n += len(chunk)
                    n_docs += len(docs)
                advance(units)
        if n == 0:
            raise LenxError(f"dataset '{corpus.name}' has no {split} documents; give it more text or files")
    return {"length": n, "documents": n_docs, "sha256": h.hexdigest()}


def document_tokens(spec: Any, tokenizer: Tokenizer | str, split: str, progress: bool = True) -> list[np.ndarray]:
    """The split's documents as a list of token arrays, each ending with its end-of-document token (views of
    the cached stream: the same tokens, in the same order, as `token_stream`)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer, spec, progress)
    stream = token_stream(spec, tok, split, progress)
    ends = np.flatnonzero(stream == tok.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s : e + 1] for s, e in zip(starts, ends)]
