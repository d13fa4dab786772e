"""Corpora, tokenizers and cached token streams.

A corpus is a set of documents per split (train / validation / test), named by a `DataSpec`:

- `stdlib`: the embedded default, the running Python's own standard library (`*.py`, no tests, no
  site-packages, sorted, one document per file, split by a hash of the file path). No download.
- hub datasets, loaded with `datasets.load_dataset` into the usual Hugging Face cache: `wikitext-103`,
  `wikitext-2` (the raw configs of `Salesforce/wikitext`; its rows are lines, grouped here into articles at
  the ` = Title = ` headings), `pg19` (`deepmind/pg19`), and `hf:<repo>[:<config>]` (column `text_field`).
  A hub dataset without a test split is split by a hash of the row index.
- local paths, read with `datasets`' local loaders: a `.txt` file, a directory of `.txt` files (one document
  per file), `.jsonl` / `.json` (column `text_field`) or `.parquet` (one document per row). They are split
  by document, deterministically (`_split_documents`), unless explicit `train_file` / `validation_file` /
  `test_file` give the splits (`dataset: files`).

A tokenizer (`byte`, `bpe:<vocab_size>` trained on the training split with `tokenizers`, or a transformers
tokenizer name / local path) turns a split into one token stream, documents separated by an end-of-document
token. Streams are cached as memmaps under `cache_dir()`, keyed by (dataset fingerprint, tokenizer fingerprint);
a cache file is written to a temporary name, fsynced and renamed, and read only if its JSON sidecar's length,
dtype and checksum agree with it, so a half-written or corrupted file is rebuilt, never read.

Every tokenizer carries a per-token table of UTF-8 byte lengths (the end-of-document and other special tokens
have none), so `token_bytes(tokens)` is the byte count of the text behind them and bits per byte compare
across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import LenxError, first_line
from .io import atomic_path, write_text

SPLITS = ("train", "validation", "test")
FILE_KEYS = ("train_file", "validation_file", "test_file")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
EOD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    text_field: str = "text"
    wikitext: bool = False  # rows are lines: group them into articles


HUB_DATASETS = {
    "wikitext-103": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", wikitext=True),
    "wikitext-2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", wikitext=True),
    "pg19": HubDataset("deepmind/pg19", None),
}
DATASET_HELP = (
    "'stdlib' (embedded), wikitext-103, wikitext-2, pg19, hf:<repo>[:<config>], a .txt / .jsonl / .json / "
    ".parquet file, a directory of .txt files, or 'files' with --train-file/--test-file"
)


# ---------------------------------------------------------------- what to load


@dataclass(frozen=True)
class DataSpec:
    """Everything that names a corpus: `--dataset`, `--text-field` and the explicit split files."""

    dataset: str = "stdlib"
    text_field: str = "text"
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None

    def __post_init__(self):
        if self.files and self.dataset == "stdlib":  # the default dataset: explicit files replace it
            object.__setattr__(self, "dataset", "files")

    @classmethod
    def of(cls, spec: Any) -> "DataSpec":
        """From a DataSpec, a dataset string, a TrainConfig or a run's config dict (missing keys: defaults)."""
        if isinstance(spec, DataSpec):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(dataset=str(spec))
        get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
        files = {k: (str(get(k)) if get(k) else None) for k in FILE_KEYS}
        return cls(dataset=str(get("dataset", "stdlib")), text_field=str(get("text_field", "text") or "text"), **files)

    @property
    def files(self) -> dict[str, str]:
        return {s: getattr(self, f"{s}_file") for s in SPLITS if getattr(self, f"{s}_file")}


@dataclass
class _Docs:
    """Documents held in memory."""

    docs: list[str]

    def __len__(self) -> int:
        return len(self.docs)

    def batches(self, max_docs: int = 512, max_chars: int = 1 << 21) -> Iterator[tuple[list[str], int]]:
        batch, chars = [], 0
        for doc in self.docs:
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= max_docs or chars >= max_chars:
                yield batch, len(batch)
                batch, chars = [], 0
        if batch:
            yield batch, len(batch)


@dataclass
class _Rows:
    """Documents in a column of a `datasets.Dataset` (memory-mapped Arrow), read in batches on demand."""

    ds: Any
    text_field: str
    wikitext: bool = False

    def __len__(self) -> int:
        return len(self.ds)  # rows (lines, for wikitext), the unit of progress

    def batches(self, max_docs: int = 512, max_chars: int = 1 << 21) -> Iterator[tuple[list[str], int]]:
        docs, chars, rows = [], 0, 0
        for doc, n_rows in self._documents():
            rows += n_rows
            if doc.strip():
                docs.append(doc)
                chars += len(doc)
            if len(docs) >= max_docs or chars >= max_chars:
                yield docs, rows
                docs, chars, rows = [], 0, 0
        if docs or rows:
            yield docs, rows

    def _texts(self) -> Iterator[str]:
        for batch in self.ds.select_columns([self.text_field]).iter(batch_size=4096):
            for text in batch[self.text_field]:
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise LenxError(
                        f"column '{self.text_field}' holds {type(text).__name__} values, not text; "
                        "name the text column with --text-field"
                    )
                yield text

    def _documents(self) -> Iterator[tuple[str, int]]:
        if not self.wikitext:
            for text in self._texts():
                yield text, 1
            return
        yield from group_wikitext(self._texts())


def is_wikitext_title(line: str) -> bool:
    """A top-level wikitext heading ` = Title = ` (sections are ` = = Section = = `)."""
    s = line.rstrip()
    return s.startswith(" = ") and not s.startswith(" = = ") and s.endswith(" =") and len(s) > 4


def group_wikitext(lines) -> Iterator[tuple[str, int]]:
    """Wikitext rows are lines; an article runs from one ` = Title = ` line to the next.
    Yields (article text, rows consumed); rows end with a newline in the article text."""
    article: list[str] = []
    for line in lines:
        if is_wikitext_title(line) and any(s.strip() for s in article):
            yield "".join(article), len(article)
            article = []
        article.append(line if line.endswith("\n") else line + "\n")
    if article:
        yield "".join(article), len(article)


@dataclass
class Corpus:
    name: str
    fingerprint: str
    sources: dict[str, Any] = field(repr=False)

    def _source(self, split: str):
        source = self.sources.get(split)
        if source is None or len(source) == 0:
            raise LenxError(f"dataset '{self.name}' has no {split} documents; give it more text or files")
        return source

    def documents(self, split: str) -> list[str]:
        docs = [d for batch, _ in self._source(split).batches() for d in batch]
        if not docs:
            raise LenxError(f"dataset '{self.name}' has no {split} documents; give it more text or files")
        return docs

    def batches(self, split: str) -> Iterator[tuple[list[str], int]]:
        """(documents, progress units) in batches; units sum to `size(split)`."""
        return self._source(split).batches()

    def size(self, split: str) -> int:
        return len(self._source(split))

    @property
    def splits(self) -> dict[str, list[str]]:
        return {s: self.documents(s) for s in SPLITS if s in self.sources and len(self.sources[s])}


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


def _hashed(named_texts: list[tuple[str, str]]) -> bool:
    """Whether documents are split by a hash of their names: 20 or more, at least one of which hashes to test
    (with 20 to 60 documents, often none does: such a corpus could be trained on but never evaluated)."""
    return len(named_texts) >= 20 and any(_split_of(name) == "test" for name, _ in named_texts)


def _local_corpus(label: str, named_texts: list[tuple[str, str]]) -> Corpus:
    """A corpus split by `_split_documents`, and its fingerprint (keys its token cache): the text's, marked where
    20 or more documents are split in order because none hashed to test (lenx used to hash them all the same,
    leaving test empty: a train split cached then holds this one's test document and must not be read), and
    where documents repeated across splits were dropped (lenx used to keep them: a validation or test split
    cached then holds text of the training split)."""
    splits = _split_documents(named_texts)
    marks = [("split", "in order")] if len(named_texts) >= 20 and not _hashed(named_texts) else []
    # whole documents each go to one split, so fewer than were given means repeats were dropped
    if len(named_texts) >= 3 and sum(map(len, splits.values())) < len(named_texts):
        marks.append(("split", "cross-split duplicates dropped"))
    return Corpus(label, _fingerprint([*marks, *named_texts]), {s: _Docs(d) for s, d in splits.items()})


def _split_documents(named_texts: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Split (name, text) documents: by a hash of the name when there are enough of them (`_hashed`);
    otherwise (few documents, or none hashed to test) the last goes to test and the one before to validation;
    one document is cut 90/5/5 by characters. A document whose exact text (not blank) is already in an earlier
    split (train, then validation) is dropped from the later one: the same file under two names must not be both
    trained on and scored. (The three parts of a cut text are never dropped: a periodic text's parts can be equal.)"""
    splits = _split_documents_as_named(named_texts)
    whole = len(named_texts) >= 3  # documents go to splits whole; fewer are one text cut in three, not copies
    return _drop_repeats(splits) if whole else splits


def _drop_repeats(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """The splits without the documents whose exact text (not blank) is in an earlier split (train, validation,
    test); repeats within one split stay."""
    out, seen = {}, set()
    for s in SPLITS:
        if s in splits:
            out[s] = [t for t in splits[s] if not (t.strip() and t in seen)]
            seen.update(out[s])
    return out


def _split_documents_as_named(named_texts: list[tuple[str, str]]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    if _hashed(named_texts):
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


# ---------------------------------------------------------------- loading


def quiet_datasets() -> None:
    """lenx draws its own progress; silence the per-file bars and retry chatter of datasets / huggingface_hub."""
    import datasets
    import huggingface_hub.utils as hf_utils

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_utils.disable_progress_bars()
    hf_utils.logging.set_verbosity_error()


LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _load_local(path: Path, text_field: str) -> list[tuple[str, str]]:
    """(name, text) documents of a local file or directory, through `datasets`' local loaders."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise LenxError(f"dataset directory {path} has no .txt files; put one document per .txt file there")
        texts = _load_files("text", files, "text", path)
        return [(p.relative_to(path).as_posix(), t) for p, t in zip(files, texts)]
    kind = LOCAL_KINDS.get(path.suffix.lower(), "text")
    if kind == "text":
        return [(path.name, _load_files("text", [path], "text", path)[0])]
    texts = _load_files(kind, [path], text_field, path)
    return [(f"{path.name}#{i}", t) for i, t in enumerate(texts)]


def _load_files(kind: str, files: list[Path], text_field: str, shown: Path) -> list[str]:
    import datasets

    quiet_datasets()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to load ..." line: ours says it, once
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
    if kind != "text" and all(f.stat().st_size == 0 for f in files):  # datasets' json/parquet readers fail opaquely
        raise LenxError(f"dataset {shown} is empty; give it some text")
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # a malformed file: name it, never a traceback
        while e.__cause__ is not None:  # DatasetGenerationError wraps the parser's error, which says what is wrong
            e = e.__cause__
        raise LenxError(f"cannot read {shown} as {kind} ({first_line(e)}); check the file's format") from None
    if text_field not in ds.column_names:
        raise LenxError(
            f"{shown} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
            "name the text column with --text-field"
        )
    texts = list(_Rows(ds, text_field)._texts())
    if kind == "text" and len(texts) != len(files):
        raise LenxError(f"reading {shown} gave {len(texts)} documents for {len(files)} files; check the files")
    return texts


def _nonempty(named: list[tuple[str, str]], shown: str) -> list[tuple[str, str]]:
    named = [(n, t) for n, t in named if t.strip()]
    if not named:
        raise LenxError(f"dataset {shown} is empty; give it some text")
    return named


def _local_path(value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise LenxError(f"{what} '{value}' not found; use {DATASET_HELP}")
    return path


def _load_hub(name: str, hub: HubDataset) -> Corpus:
    import datasets

    from .hub import offline_unless_reachable, unreachable_note

    quiet_datasets()
    shown = hub.repo + (f":{hub.config}" if hub.config else "")
    offline = None
    try:
        with offline_unless_reachable() as offline:
            dd = datasets.load_dataset(hub.repo, hub.config)
    except Exception as e:
        raise LenxError(
            f"cannot load dataset '{name}' ({shown}) from the Hugging Face Hub ({first_line(e)}); "
            + unreachable_note(offline)
            + "without network, "
            "pass a local copy as the dataset (--dataset, or train.dataset in a sweep config: a .txt/.jsonl/.parquet "
            "file or a directory of .txt files), or load it once "
            "online so the HF cache holds it and set HF_DATASETS_OFFLINE=1"
        ) from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    aliases = {"valid": "validation", "dev": "validation"}
    parts = {aliases.get(k, k): v for k, v in dd.items()}
    for ds in parts.values():
        if hub.text_field not in ds.column_names:
            raise LenxError(
                f"dataset '{name}' has no column '{hub.text_field}' (columns: {', '.join(ds.column_names)}); "
                "name the text column with --text-field"
            )
    if "train" in parts and "test" in parts:
        splits = {s: parts[s] for s in SPLITS if s in parts}
    else:  # one split (or no train/test pair): split its rows by a hash of the row index
        base = parts.get("train") or next(iter(parts.values()))
        which = np.array([SPLITS.index(_split_of(str(i))) for i in range(len(base))], dtype=np.int8)
        splits = {s: base.select(np.flatnonzero(which == k)) for k, s in enumerate(SPLITS)}
    h = hashlib.sha256(f"{hub.repo}\0{hub.config}\0{hub.text_field}\0{hub.wikitext}".encode())
    for s in SPLITS:
        if s in splits:
            h.update(f"\0{s}\0{splits[s]._fingerprint}".encode())
    sources = {s: _Rows(ds, hub.text_field, hub.wikitext) for s, ds in splits.items()}
    return Corpus(name, h.hexdigest()[:16], sources)


@lru_cache(maxsize=8)
def _load(spec: DataSpec) -> Corpus:
    name = spec.dataset
    if spec.files or name == "files":
        files = spec.files
        if name != "files":
            raise LenxError(f"give either --dataset ({name}) or --train-file/--validation-file/--test-file, not both")
        if not files:
            raise LenxError("--dataset files needs --train-file and --test-file (--validation-file is optional)")
        named, texts = [], {}
        for split, value in files.items():
            path = _local_path(value, f"--{split}-file")
            docs = _nonempty(_load_local(path, spec.text_field), str(path))
            named += [(f"{split}/{path.name}/{n}", t) for n, t in docs]
            texts[split] = [t for _, t in docs]
        kept = _drop_repeats(texts)
        if kept != texts:  # not the cache key of the splits that held the repeats (lenx used to keep them)
            named = [("split", "cross-split duplicates dropped"), *named]
        for split, value in files.items():
            if not kept[split]:
                raise LenxError(f"every document of --{split}-file {value} is in an earlier split (the same text); "
                                "a document must not be both trained on and scored: give other text")
        label = ",".join(f"{s}={files[s]}" for s in SPLITS if s in files)
        return Corpus(f"files({label})", _fingerprint(named), {s: _Docs(d) for s, d in kept.items()})
    if name == "stdlib":
        root, files = stdlib_files()
        named = [(p.relative_to(root).as_posix(), _read(p)) for p in files]
        return _local_corpus("stdlib", named)
    if name in HUB_DATASETS:
        return _load_hub(name, HUB_DATASETS[name])
    if name.startswith("hf:"):
        repo, _, config = name[3:].partition(":")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
            raise LenxError(f"dataset '{name}' is not hf:<repo>[:<config>] (e.g. hf:roneneldan/TinyStories)")
        return _load_hub(name, HubDataset(repo, config or None, spec.text_field))
    path = _local_path(name, "dataset")
    named = _nonempty(_load_local(path, spec.text_field), str(path))
    return _local_corpus(str(path), named)


def load_corpus(spec: Any) -> Corpus:
    """The corpus a `DataSpec` (or a dataset string, a TrainConfig, a run's config dict) names."""
    return _load(DataSpec.of(spec))


# ---------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
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
        dec = _byte_decoder()
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
        with _progress(f"training {name} on {corpus.name}", corpus.size("train"), progress) as advance:
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
        dec = _byte_decoder()
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

        from .hub import offline_reason, unreachable_note
        from .runinfo import quiet_hf

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


def get_tokenizer(name: str, dataset: Any = None, progress: bool = True) -> Tokenizer:
    """`byte`; `bpe:<n>`, trained on `dataset`'s training split (cached); or a transformers tokenizer."""
    check_tokenizer_name(name)
    if name == "byte":
        return ByteTokenizer()
    size = parse_bpe(name)
    if size is None:
        from .hub import is_path

        if is_path(name) and not Path(name).expanduser().exists():
            raise LenxError(f"--tokenizer {name}: no such directory; give a tokenizer directory, a hub name, byte or "
                            "bpe:<vocab_size>")
        path = Path(name).expanduser()
        if path.is_dir() and not any(path.iterdir()):
            raise LenxError(f"--tokenizer {name}: the directory is empty; save a tokenizer there (save_pretrained: "
                            "tokenizer.json, tokenizer_config.json) or use byte or bpe:<vocab_size>")
        return HFTokenizer.load(name)
    if dataset is None:
        raise LenxError(f"tokenizer '{name}' is trained on a dataset; none was given")
    corpus = load_corpus(dataset)
    path = cache_dir() / "tokenizers" / f"bpe{size}-{corpus.fingerprint}.json"
    tok = None
    if path.exists():
        try:
            tok = BPETokenizer.from_file(path, name)
        except Exception:  # unreadable: train it again below
            pass
    if tok is None:
        tok = BPETokenizer.train(name, size, corpus, progress)
        write_text(path, tok.tk.to_str())
    if tok.vocab_size != size:  # the trainer stops when no pair is left to merge
        raise LenxError(f"tokenizer '{name}': the training split of '{corpus.name}' has too little text for {size} "
                        f"tokens (it gives {tok.vocab_size}); use bpe:{tok.vocab_size} or fewer, or more text")
    return tok


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


# ---------------------------------------------------------------- cached token streams


def cache_dir() -> Path:
    """`$LENX_CACHE`, else `$HF_HOME/lenx`, else `~/.cache/huggingface/lenx` (`$XDG_CACHE_HOME` respected)."""
    if os.environ.get("LENX_CACHE"):
        return Path(os.environ["LENX_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(hf_home).expanduser() / "lenx"


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
    total = corpus.size(split)  # raises the usual one-line error for an empty split
    h, n, n_docs = hashlib.sha256(), 0, 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(
            f"cannot create the token cache {path.parent}: {e.strerror}; set LENX_CACHE to a writable directory"
        ) from None
    with atomic_path(path) as tmp:
        bar = _progress(f"tokenising {corpus.name} {split} ({tok.name})", total, progress)
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
    meta = {**want, "length": n, "documents": n_docs, "sha256": h.hexdigest(), "dataset": corpus.name,
            "tokenizer": tok.name}
    write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    stream = _read_cached(path, meta_path, want)
    if stream is None:
        raise LenxError(f"the token cache {path} changed while it was written; rerun (or set LENX_CACHE)")
    return stream


def document_tokens(spec: Any, tokenizer: Tokenizer | str, split: str, progress: bool = True) -> list[np.ndarray]:
    """The split's documents as a list of token arrays, each ending with its end-of-document token (views of
    the cached stream: the same tokens, in the same order, as `token_stream`)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer, spec, progress)
    stream = token_stream(spec, tok, split, progress)
    ends = np.flatnonzero(stream == tok.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s : e + 1] for s, e in zip(starts, ends)]


class _progress:
    """A rich progress bar (units: documents or rows) as a context manager yielding `advance(n)`."""

    def __init__(self, description: str, total: int, enabled: bool):
        self.description, self.total, self.enabled, self.bar = description, total, enabled, None

    def __enter__(self):
        from rich.console import Console

        if self.enabled and Console().is_terminal:  # transient: on a pipe or a log it would leave only blank lines
            from rich.errors import LiveError
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           transient=True)
            try:
                bar.start()
            except LiveError:  # an older rich with another live display running: go without
                bar = None
            if bar is not None:
                self.bar, self.task = bar, bar.add_task(self.description, total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
