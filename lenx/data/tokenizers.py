"""Tokenizers: `byte`, `bpe:<vocab_size>` (byte-level BPE trained by lenx with `tokenizers`) and transformers
tokenizers (a hub name or a local directory).

A tokenizer turns documents into one token stream, each document followed by an end-of-document token. Every
tokenizer carries a per-token table of UTF-8 byte lengths (the end-of-document and other special tokens have
none), so `token_bytes(tokens)` is the byte count of the text behind them and bits per byte compare across
tokenizers. `get_tokenizer` (in `cache`) gives a tokenizer by name, training and caching a BPE one.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import LenxError, first_line
from ..io import write_text
from .corpora import Corpus, quiet_datasets
from ..progress import CountBar

EOD_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: one printable character per byte (the `tokenizers` ByteLevel mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class Tokenizer(ABC):
    """A tokenizer as lenx uses it: ids in [0, vocab_size), an end-of-document id, a per-token byte table."""

    name: str
    kind: str
    vocab_size: int
    eod_id: int
    fingerprint: str
    byte_lengths: np.ndarray  # UTF-8 bytes of each token's text; 0 for end-of-document and special tokens

    @property
    def dtype(self):
        return _dtype_for(self.vocab_size)

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, without end-of-document or other special tokens."""

    @abstractmethod
    def decode(self, tokens) -> str:
        """The text behind `tokens` (end-of-document and special tokens dropped)."""

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """Documents as one stream, each followed by the end-of-document token."""
        eod = np.array([self.eod_id], dtype=self.dtype)
        parts = [p for ids in self.encode_batch(list(docs)) for p in (ids.astype(self.dtype, copy=False), eod)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def token_bytes(self, tokens) -> int:
        """UTF-8 bytes of the text behind `tokens` (end-of-document and special tokens have none)."""
        return int(self.byte_lengths[np.asarray(tokens, dtype=np.int64)].sum())

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "fingerprint": self.fingerprint}

    def save(self, run_dir: Path) -> None:
        """Write what `load_run_tokenizer` needs into the run directory."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus an end-of-document token (256)."""

    name = kind = "byte"
    vocab_size = 257
    eod_id = 256
    fingerprint = "byte-utf8-eod256"

    def __init__(self):
        self.byte_lengths = np.ones(self.vocab_size, dtype=np.int64)
        self.byte_lengths[self.eod_id] = 0

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (`tokenizers`), trained by lenx; the end-of-document token is `<|endoftext|>`."""

    kind = "bpe"

    def __init__(self, tk, name: str):
        tk.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, never the separator
        self.tk, self.name = tk, name
        self.eod_id = tk.token_to_id(EOD_TOKEN)
        if self.eod_id is None:
            raise LenxError(f"tokenizer '{name}' has no {EOD_TOKEN} token; retrain it (delete its tokenizer.json)")
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "bpe-" + hashlib.sha256(tk.to_str().encode()).hexdigest()[:16]
        special = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        dec = byte_decoder()
        self.byte_lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in tk.get_vocab(with_added_tokens=True).items():
            if token not in special:
                self.byte_lengths[i] = len(token) if all(c in dec for c in token) else len(token.encode())

    @classmethod
    def train(cls, name: str, vocab_size: int, corpus: Corpus, progress: bool = True) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tk = HFTok(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOD_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        with CountBar(f"training {name} on {corpus.name}", corpus.size("train"), progress) as advance:
            def texts():
                for docs, units in corpus.batches("train"):
                    yield docs
                    advance(units)

            tk.train_from_iterator(texts(), trainer)
        return cls(tk, name)

    @classmethod
    def from_file(cls, path: Path, name: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_file(str(path)), name)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, tokens) -> str:
        return self.tk.decode([int(t) for t in tokens], skip_special_tokens=True)

    def save(self, run_dir: Path) -> None:
        write_text(Path(run_dir) / "tokenizer.json", self.tk.to_str(pretty=True))


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (AutoTokenizer: a hub name or a local directory; never remote code).
    End of document: `eod_id` when given (an HF model's own end-of-text id), else its eos token, else one extra id
    after its vocabulary."""

    kind = "hf"

    def __init__(self, tok, name: str, eod_id: int | None = None):
        self.tok, self.name = tok, name
        vocab = tok.get_vocab()
        n = max(len(tok), max(vocab.values(), default=-1) + 1)
        if eod_id is not None:
            self.eod_id, self.vocab_size = int(eod_id), max(n, int(eod_id) + 1)
        elif tok.eos_token_id is not None:
            self.eod_id, self.vocab_size = int(tok.eos_token_id), n
        else:
            self.eod_id, self.vocab_size = n, n + 1
        fast = getattr(tok, "is_fast", False)
        backend = tok.backend_tokenizer.to_str() if fast else json.dumps(vocab, sort_keys=True)
        h = hashlib.sha256(f"{type(tok).__name__}\0{self.eod_id}\0{self.vocab_size}\0".encode() + backend.encode())
        self.fingerprint = "hf-" + h.hexdigest()[:16]
        self.byte_level = '"ByteLevel"' in backend
        special = set(tok.all_special_ids) | {self.eod_id}
        added = tok.get_added_vocab()  # spelled as plain text, also in a byte-level vocabulary
        dec = byte_decoder()
        self.byte_lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if i in special or i >= self.vocab_size:
                continue
            if token in added:
                self.byte_lengths[i] = len(token.encode())
            elif self.byte_level and all(c in dec for c in token):
                self.byte_lengths[i] = len(token)  # exact: one alphabet character per byte
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                self.byte_lengths[i] = 1  # sentencepiece byte fallback
            else:  # sentencepiece / wordpiece pieces: close, not exact (decoders may drop a leading space)
                self.byte_lengths[i] = len(token.replace("\u2581", " ").removeprefix("##").encode())

    @classmethod
    def load(cls, name: str, local_only: bool = False) -> "HFTokenizer":
        from transformers import AutoTokenizer

        from ..hub import offline_reason, unreachable_note
        from ..runinfo import quiet_hf

        quiet_hf()
        quiet_datasets()
        local = local_only or Path(name).expanduser().exists()
        source = str(Path(name).expanduser()) if local else name
        offline = None if local else offline_reason()
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False,
                                                local_files_only=local or offline is not None)
        except Exception as e:
            raise LenxError(
                f"cannot load tokenizer '{name}' ({first_line(e)}); {unreachable_note(offline)}use byte, bpe:<vocab_size>, a local tokenizer "
                "directory, or a hub name already in the HF cache (offline: HF_HUB_OFFLINE=1)"
            ) from None
        return cls(tok, name)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self.tok(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                       verbose=False)
        return [np.asarray(ids, dtype=self.dtype) for ids in out["input_ids"]]

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in tokens if int(t) != self.eod_id], skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)

    def save(self, run_dir: Path) -> None:
        self.tok.save_pretrained(Path(run_dir) / "tokenizer")


def parse_bpe(name: str) -> int | None:
    """The vocabulary size of `bpe:<n>`, None for other names; a bad size is a LenxError."""
    if not name.startswith("bpe:"):
        return None
    size = name[4:]
    if not size.isdigit() or not 257 <= int(size) <= 1 << 20:
        raise LenxError(
            f"tokenizer '{name}' needs a vocabulary size from 257 (256 bytes + end of document) to {1 << 20}, "
            "e.g. bpe:4096"
        )
    return int(size)


def check_tokenizer_name(name: str) -> None:
    if not name or not name.strip():
        raise LenxError("--tokenizer is empty; use byte, bpe:<vocab_size> or a transformers tokenizer name / path")
    parse_bpe(name)


def hf_tokenizer(name: str) -> "HFTokenizer":
    """The transformers tokenizer `--tokenizer` names; a path that is not a tokenizer directory says so."""
    from ..hub import is_path

    if is_path(name) and not Path(name).expanduser().exists():
        raise LenxError(f"--tokenizer {name}: no such directory; give a tokenizer directory, a hub name, byte or "
                        "bpe:<vocab_size>")
    path = Path(name).expanduser()
    if path.is_dir() and not any(path.iterdir()):
        raise LenxError(f"--tokenizer {name}: the directory is empty; save a tokenizer there (save_pretrained: "
                        "tokenizer.json, tokenizer_config.json) or use byte or bpe:<vocab_size>")
    return HFTokenizer.load(name)


def load_run_tokenizer(run_dir: str | Path, name: str, fingerprint: str | None = None) -> Tokenizer:
    """The tokenizer a run was trained with, read from its directory (never a fresh one)."""
    run_dir = Path(run_dir)
    if name == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif name.startswith("bpe:"):
        path = run_dir / "tokenizer.json"
        if not path.exists():
            raise LenxError(f"{run_dir} has no tokenizer.json for its tokenizer {name}; retrain it with --overwrite")
        try:
            tok = BPETokenizer.from_file(path, name)
        except LenxError:
            raise
        except Exception:
            raise LenxError(f"{path} is unreadable or corrupt; retrain the run with --overwrite") from None
    else:
        path = run_dir / "tokenizer"
        if not path.is_dir():
            raise LenxError(
                f"{run_dir} has no tokenizer/ directory for its tokenizer {name}; retrain it with --overwrite"
            )
        tok = HFTokenizer.load(str(path), local_only=True)
        tok.name = name
    if fingerprint and tok.fingerprint != fingerprint:
        raise LenxError(
            f"{run_dir}: its tokenizer does not match the one it was trained with; retrain it with --overwrite"
        )
    return tok
