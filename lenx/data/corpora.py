"""Corpora: what `--dataset` names, loaded as documents per split (train / validation / test).

- `stdlib`: the embedded default, the running Python's own standard library (`*.py`, no tests, no
  site-packages, sorted, one document per file, split by a hash of the file path). No download.
- hub datasets, loaded with `datasets.load_dataset` into the usual Hugging Face cache: `wikitext-103`,
  `wikitext-2` (the raw configs of `Salesforce/wikitext`; its rows are lines, grouped here into articles at
  the ` = Title = ` headings), `pg19` (`deepmind/pg19`), and `hf:<repo>[:<config>]` (column `text_field`).
  A hub dataset without a test split is split by a hash of the row index.
- local paths, read with `datasets`' local loaders: a `.txt` file, a directory of `.txt` files (one document
  per file), `.jsonl` / `.json` (column `text_field`) or `.parquet` (one document per row). They are split
  by document, deterministically (`splits.split_documents`), unless explicit `train_file` / `validation_file` /
  `test_file` give the splits (`dataset: files`).

A corpus's fingerprint names its text and its split; it keys the token cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import LenxError, first_line
from .splits import SPLITS, drop_repeats, fingerprint, is_hashed, split_documents, split_of

FILE_KEYS = ("train_file", "validation_file", "test_file")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


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


# ---------------------------------------------------------------- documents of a split


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

    def texts(self) -> Iterator[str]:
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
            for text in self.texts():
                yield text, 1
            return
        yield from group_wikitext(self.texts())


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


def _local_corpus(label: str, named_texts: list[tuple[str, str]]) -> Corpus:
    """A corpus split by `split_documents`, under the fingerprint of its text, marked where 20 or more documents
    are split in order because none hashed to test, and where documents repeated across splits were dropped: a
    token cache keyed by the unmarked fingerprint may hold other splits of the same text (the earlier split rule's)
    and must not be read for these."""
    splits = split_documents(named_texts)
    marks = [("split", "in order")] if len(named_texts) >= 20 and not is_hashed(named_texts) else []
    # whole documents each go to one split, so fewer than were given means repeats were dropped
    if len(named_texts) >= 3 and sum(map(len, splits.values())) < len(named_texts):
        marks.append(("split", "cross-split duplicates dropped"))
    return Corpus(label, fingerprint([*marks, *named_texts]), {s: _Docs(d) for s, d in splits.items()})


# ---------------------------------------------------------------- local files


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
    texts = list(_Rows(ds, text_field).texts())
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


def _files_corpus(spec: DataSpec) -> Corpus:
    """`dataset: files`: the splits the explicit `--train-file` / `--validation-file` / `--test-file` give."""
    files = spec.files
    if spec.dataset != "files":
        raise LenxError(f"give either --dataset ({spec.dataset}) or --train-file/--validation-file/--test-file, "
                        "not both")
    if not files:
        raise LenxError("--dataset files needs --train-file and --test-file (--validation-file is optional)")
    named, texts = [], {}
    for split, value in files.items():
        path = _local_path(value, f"--{split}-file")
        docs = _nonempty(_load_local(path, spec.text_field), str(path))
        named += [(f"{split}/{path.name}/{n}", t) for n, t in docs]
        texts[split] = [t for _, t in docs]
    kept = drop_repeats(texts)
    if kept != texts:  # a key of its own: the splits with the repeats kept may be cached under the unmarked one
        named = [("split", "cross-split duplicates dropped"), *named]
    for split, value in files.items():
        if not kept[split]:
            raise LenxError(f"every document of --{split}-file {value} is in an earlier split (the same text); "
                            "a document must not be both trained on and scored: give other text")
    label = ",".join(f"{s}={files[s]}" for s in SPLITS if s in files)
    return Corpus(f"files({label})", fingerprint(named), {s: _Docs(d) for s, d in kept.items()})


# ---------------------------------------------------------------- hub datasets


def load_hub(name: str, hub: HubDataset) -> Corpus:
    """A dataset from the Hugging Face Hub (or its cache; a local dataset directory works the same)."""
    import datasets

    from ..hub import offline_unless_reachable, unreachable_note

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
    splits = _hub_splits(name, hub, dd)
    h = hashlib.sha256(f"{hub.repo}\0{hub.config}\0{hub.text_field}\0{hub.wikitext}".encode())
    for s in SPLITS:
        if s in splits:
            h.update(f"\0{s}\0{splits[s]._fingerprint}".encode())
    sources = {s: _Rows(ds, hub.text_field, hub.wikitext) for s, ds in splits.items()}
    return Corpus(name, h.hexdigest()[:16], sources)


def _hub_splits(name: str, hub: HubDataset, dd) -> dict[str, Any]:
    """The loaded dataset's splits by lenx's names; without a train/test pair, one split divided by row hash."""
    import datasets

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
        return {s: parts[s] for s in SPLITS if s in parts}
    base = parts.get("train") or next(iter(parts.values()))
    which = np.array([SPLITS.index(split_of(str(i))) for i in range(len(base))], dtype=np.int8)
    return {s: base.select(np.flatnonzero(which == k)) for k, s in enumerate(SPLITS)}


# ---------------------------------------------------------------- by name


@lru_cache(maxsize=8)
def load_spec(spec: DataSpec) -> Corpus:
    """The corpus a `DataSpec` names, loaded once per process (`load_spec.cache_clear()` reads files afresh)."""
    name = spec.dataset
    if spec.files or name == "files":
        return _files_corpus(spec)
    if name == "stdlib":
        root, files = stdlib_files()
        named = [(p.relative_to(root).as_posix(), _read(p)) for p in files]
        return _local_corpus("stdlib", named)
    if name in HUB_DATASETS:
        return load_hub(name, HUB_DATASETS[name])
    if name.startswith("hf:"):
        repo, _, config = name[3:].partition(":")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
            raise LenxError(f"dataset '{name}' is not hf:<repo>[:<config>] (e.g. hf:roneneldan/TinyStories)")
        return load_hub(name, HubDataset(repo, config or None, spec.text_field))
    path = _local_path(name, "dataset")
    named = _nonempty(_load_local(path, spec.text_field), str(path))
    return _local_corpus(str(path), named)


def text_changed(dataset: str) -> str:
    """Why dataset `dataset` can read as other text than it did (its fingerprint changed), for errors that refuse
    work done on the earlier text."""
    if dataset == "stdlib":
        return f"the standard library of another Python than this one ({platform.python_version()})"
    if dataset in HUB_DATASETS or dataset.startswith("hf:"):
        return "another revision of it"
    return "another file, or edited since"


def load_corpus(spec: Any) -> Corpus:
    """The corpus a `DataSpec` (or a dataset string, a TrainConfig, a run's config dict) names."""
    return load_spec(DataSpec.of(spec))
