"""Deterministic train / validation / test splits of local documents, and the fingerprint of named texts.

Documents go to a split by a hash of their name when there are enough of them; otherwise in order, and a single
text is cut 90/5/5 by characters. Whole documents whose text is already in an earlier split are dropped from the
later one: the same text must never be both trained on and scored.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def split_of(key: str) -> str:
    """Deterministic split by document: 90% train, 5% validation, 5% test."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "train" if h < 90 else "validation" if h < 95 else "test"


def fingerprint(named_texts: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in named_texts:
        h.update(name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:16]


def is_hashed(named_texts: list[tuple[str, str]]) -> bool:
    """Whether documents are split by a hash of their names: 20 or more, at least one of which hashes to test
    (with 20 to 60 documents, often none does: such a corpus could be trained on but never evaluated)."""
    return len(named_texts) >= 20 and any(split_of(name) == "test" for name, _ in named_texts)


def split_documents(named_texts: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Split (name, text) documents: by a hash of the name when there are enough of them (`is_hashed`);
    otherwise (few documents, or none hashed to test) the last goes to test and the one before to validation;
    one document is cut 90/5/5 by characters. A document whose exact text (not blank) is already in an earlier
    split (train, then validation) is dropped from the later one: the same file under two names must not be both
    trained on and scored. (The three parts of a cut text are never dropped: a periodic text's parts can be equal.)"""
    splits = _split_as_named(named_texts)
    whole = len(named_texts) >= 3  # documents go to splits whole; fewer are one text cut in three, not copies
    return drop_repeats(splits) if whole else splits


def drop_repeats(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """The splits without the documents whose exact text (not blank) is in an earlier split (train, validation,
    test); repeats within one split stay."""
    out, seen = {}, set()
    for s in SPLITS:
        if s in splits:
            out[s] = [t for t in splits[s] if not (t.strip() and t in seen)]
            seen.update(out[s])
    return out


def _split_as_named(named_texts: list[tuple[str, str]]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    if is_hashed(named_texts):
        for name, text in named_texts:
            splits[split_of(name)].append(text)
    elif len(named_texts) >= 3:
        splits["train"] = [t for _, t in named_texts[:-2]]
        splits["validation"] = [named_texts[-2][1]]
        splits["test"] = [named_texts[-1][1]]
    elif named_texts:
        text = "\n".join(t for _, t in named_texts)
        a, b = int(len(text) * 0.90), int(len(text) * 0.95)
        splits = {"train": [text[:a]], "validation": [text[a:b]], "test": [text[b:]]}
    return splits
