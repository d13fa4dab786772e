"""Corpora, tokenizers and the token cache, on files each test writes itself (no network, ever)."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lenx import data
from lenx.data import cache as token_cache
from lenx.data import splits, tokenizers
from lenx.cli import main
from lenx.config import DEFAULTS_FILE, TrainConfig, resolve
from lenx.data import (
    BPETokenizer,
    ByteTokenizer,
    DataSpec,
    cache_dir,
    document_tokens,
    get_tokenizer,
    group_wikitext,
    load_corpus,
    token_stream,
)
from lenx.errors import LenxError

TINY = ["--steps", "4", "--warmup", "1", "--train-len", "16", "--batch-size", "4", "--layers", "1", "--d-model", "32", "--heads", "2"]
# text the tokenizers must carry through unchanged: accents, CJK, emoji, tabs, CR, the separator's own spelling
TRICKY = "naïve café — 日本語 😀 tabs\tand\r\nCRLF  double  spaces <|endoftext|> end\n"


def lenx(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private token cache for this test."""
    monkeypatch.setenv("LENX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def words(seed: int, n_lines: int = 20) -> str:
    import random

    rng = random.Random(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(10)) for _ in range(n_lines))


# ---------------------------------------------------------------- loaders


def test_txt_file_is_one_document_cut_90_5_5(tmp_path, cache):
    path = tmp_path / "book.txt"
    text = words(1, 200)
    path.write_text(text)
    corpus = load_corpus(str(path))
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    assert corpus.documents("train") == [text[:a]]
    assert corpus.documents("validation") == [text[a:b]]
    assert corpus.documents("test") == [text[b:]]
    stream = token_stream(str(path), "byte", "test")
    assert bytes(stream[:-1].astype(np.uint8)) == text[b:].encode() and stream[-1] == 256


def test_directory_of_txt_files_one_document_per_file(text_dataset, cache):
    corpus = load_corpus(str(text_dataset))
    files = sorted(text_dataset.glob("*.txt"))
    texts = {p.read_text() for p in files}
    got = [d for docs in corpus.splits.values() for d in docs]
    assert sorted(got) == sorted(texts) and len(got) == 30
    # the split and fingerprint are those of the (name, text) documents, as before datasets did the reading
    named = [(p.name, p.read_text()) for p in files]
    assert corpus.fingerprint == splits.fingerprint(named)
    assert corpus.documents("test") == splits.split_documents(named)["test"]
    (text_dataset / "doc00.txt").write_text("changed")
    data.load_spec.cache_clear()
    assert load_corpus(str(text_dataset)).fingerprint != corpus.fingerprint


def test_a_directory_whose_names_hash_no_document_to_test_still_has_a_test_split(tmp_path, cache):
    """20 to 60 files often hash none to test (0.95 ** 20: a third of 20-file corpora): such a corpus trained and
    then could not be evaluated. It is split in order instead, under a fingerprint of its own (the token cache)."""
    names = [f"doc{i:02d}.txt" for i in range(40)]
    names = [n for n in names if splits.split_of(n) != "test"][:20]
    for i, n in enumerate(names):
        (tmp_path / n).write_text(f"document {i}\n" * 5)
    corpus = load_corpus(str(tmp_path))
    assert corpus.documents("test") == ["document 19\n" * 5] and len(corpus.documents("train")) == 18
    named = [(n, (tmp_path / n).read_text()) for n in sorted(names)]
    assert corpus.fingerprint != splits.fingerprint(named)


def test_jsonl_with_a_custom_text_field(tmp_path, cache, capsys):
    rows = [{"id": i, "body": words(i, 3) + (TRICKY if i == 7 else "")} for i in range(25)]
    rows.append({"id": 99, "body": None})  # a row without text is skipped, not an error
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(DataSpec(str(path), text_field="body"))
    got = [d for docs in corpus.splits.values() for d in docs]
    assert sorted(got) == sorted(r["body"] for r in rows if r["body"])
    # the default field 'text' is missing: one line naming the columns and the flag
    code = lenx("train", "--pe", "nope", "--dataset", path, "--out", tmp_path / "r")
    one_line_error(capsys, code, "no column 'text'", "body", "--text-field")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.json", "empty.parquet", "blank.jsonl"])
def test_empty_dataset_file_is_one_line(name, tmp_path, cache, capsys):
    path = tmp_path / name
    path.write_text('{"text": "  "}\n' if name.startswith("blank") else "")
    code = lenx("train", "--pe", "nope", "--dataset", path, "--out", tmp_path / "r")
    one_line_error(capsys, code, f"dataset {path} is empty")


def test_json_array_file(tmp_path, cache):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": words(i, 2)} for i in range(5)]))
    corpus = load_corpus(str(path))
    assert corpus.documents("train") == [words(i, 2) for i in range(3)]  # few documents: last two are val / test
    assert corpus.documents("test") == [words(4, 2)]


def test_parquet(tmp_path, cache):
    texts = [words(i, 4) for i in range(40)]
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": texts, "n": range(40)}).to_parquet(path)
    corpus = load_corpus(str(path))
    got = [d for docs in corpus.splits.values() for d in docs]
    assert sorted(got) == sorted(texts)
    expect = splits.split_documents([(f"docs.parquet#{i}", t) for i, t in enumerate(texts)])
    assert corpus.documents("train") == expect["train"] and corpus.documents("test") == expect["test"]


def test_explicit_split_files(tmp_path, text_dataset, cache, capsys):
    val, test = tmp_path / "val.jsonl", tmp_path / "test.parquet"
    val.write_text(json.dumps({"text": "validation text"}) + "\n")
    pd.DataFrame({"text": ["test one", "test two"]}).to_parquet(test)
    cfg = resolve(train_file=str(text_dataset), validation_file=str(val), test_file=str(test))
    assert cfg.dataset == "files"
    corpus = load_corpus(cfg)
    assert sorted(corpus.documents("train")) == sorted(p.read_text() for p in text_dataset.glob("*.txt"))
    assert corpus.documents("validation") == ["validation text"]
    assert corpus.documents("test") == ["test one", "test two"]
    stream = token_stream(cfg, "byte", "test")
    assert bytes(stream[stream != 256].astype(np.uint8)) == b"test onetest two" and (stream == 256).sum() == 2
    with pytest.raises(LenxError, match="not both"):
        resolve(dataset="stdlib", train_file=str(text_dataset), test_file=str(test))
    one_line_error(capsys, lenx("train", "--pe", "nope", "--train-file", text_dataset), "--test-file")


def test_explicit_split_files_never_score_a_training_document(tmp_path, text_dataset, cache, capsys):
    """--test-file naming the training file, or holding copies of its documents, scored text the run was trained
    on. Copies are dropped from the later split (a fingerprint of their own); a split of nothing but copies is an
    error."""
    copies = tmp_path / "test.jsonl"
    train_docs = [p.read_text() for p in sorted(text_dataset.glob("*.txt"))]
    copies.write_text("".join(json.dumps({"text": t}) + "\n" for t in [train_docs[3], "held out", train_docs[7]]))
    corpus = load_corpus(DataSpec(train_file=str(text_dataset), test_file=str(copies)))
    assert corpus.documents("test") == ["held out"] and len(corpus.documents("train")) == 30
    stream = token_stream(DataSpec(train_file=str(text_dataset), test_file=str(copies)), "byte", "test")
    assert bytes(stream[:-1].astype(np.uint8)) == b"held out"
    for same in (text_dataset, text_dataset / "doc03.txt"):
        spec = DataSpec(train_file=str(text_dataset), test_file=str(same))
        with pytest.raises(LenxError, match="every document of --test-file"):
            load_corpus(spec)


def test_wikitext_lines_group_into_articles():
    lines = ["", " = First = \n", "", " Some text . \n", " = = Section = = \n", " more \n", "", " = Second = \n",
             " body \n"]
    articles = list(group_wikitext(lines))
    assert [a for a, _ in articles] == [
        "\n = First = \n\n Some text . \n = = Section = = \n more \n\n",
        " = Second = \n body \n",
    ]
    assert sum(n for _, n in articles) == len(lines)


def test_the_same_text_under_two_names_is_never_both_trained_on_and_scored(tmp_path, cache):
    """A directory split by a hash of the names put a copy of a training file (another name, the same text) in
    test: its text was trained on and then scored. The later copy is dropped, under a fingerprint of its own."""
    names = [f"doc{i:03d}.txt" for i in range(200)]
    to_test = [n for n in names if splits.split_of(n) == "test"][:3]
    to_val = [n for n in names if splits.split_of(n) == "validation"][:2]
    to_train = [n for n in names if splits.split_of(n) == "train"][:30]
    for n in to_train + to_val + to_test:
        (tmp_path / n).write_text(f"the text of {n}\n" * 3)
    (tmp_path / to_test[0]).write_text((tmp_path / to_train[0]).read_text())  # a copy of a training file
    (tmp_path / to_val[0]).write_text((tmp_path / to_train[1]).read_text())
    (tmp_path / to_test[1]).write_text((tmp_path / to_val[1]).read_text())  # in validation, then test
    corpus = load_corpus(str(tmp_path))
    train, val, test = (corpus.documents(s) for s in ("train", "validation", "test"))
    assert len(train) == 30 and val == [(tmp_path / to_val[1]).read_text()]
    assert test == [(tmp_path / to_test[2]).read_text()]
    named = [(p.name, p.read_text()) for p in sorted(tmp_path.glob("*.txt"))]
    assert corpus.fingerprint != splits.fingerprint(named)  # not the cache key of the splits that held the copies
    stream = bytes(token_stream(str(tmp_path), "byte", "validation").astype(np.uint8)).decode("utf-8", "replace")
    assert (tmp_path / to_train[1]).read_text() not in stream


def test_stdlib_is_unchanged():
    corpus = load_corpus("stdlib")
    root, files = data.stdlib_files()
    assert not any(part in {"test", "tests", "site-packages"} for p in files for part in p.relative_to(root).parts)
    n = sum(len(corpus.documents(s)) for s in ("train", "validation", "test"))
    assert n == len(files)


# ---------------------------------------------------------------- the token cache


def test_second_call_hits_the_cache_and_a_corrupted_file_is_rebuilt(text_dataset, cache, monkeypatch):
    calls = []
    original = ByteTokenizer.encode_batch

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ByteTokenizer, "encode_batch", counting)
    tok = ByteTokenizer()
    first = np.array(token_stream(str(text_dataset), tok, "train"))
    assert calls and first.dtype == np.uint16
    expect = ByteTokenizer().encode_documents(load_corpus(str(text_dataset)).documents("train"))
    assert np.array_equal(first, expect)
    [path] = (cache / "tokens").glob("*-train.bin")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["length"] == len(first) and meta["dtype"] == "uint16"
    umask = os.umask(0)
    os.umask(umask)
    for f in (path, path.with_suffix(".json")):  # a shared cache: umask permissions, not the temp file's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    mtime = path.stat().st_mtime_ns

    calls.clear()
    time.sleep(0.01)
    again = token_stream(str(text_dataset), tok, "train")
    assert calls == [] and path.stat().st_mtime_ns == mtime  # not re-tokenised, not rewritten
    assert isinstance(again, np.memmap) and np.array_equal(again, first)

    # same length, one flipped token: the checksum catches it; the file is rebuilt, never read
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    rebuilt = token_stream(str(text_dataset), tok, "train")
    assert calls and np.array_equal(rebuilt, first)
    assert token_cache._sha256_file(path) == json.loads(path.with_suffix(".json").read_text())["sha256"]

    # a truncated file, and a file whose sidecar never got written (a crash between the two)
    for damage in ("truncate", "no sidecar"):
        calls.clear()
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        else:
            path.with_suffix(".json").unlink()
        assert np.array_equal(token_stream(str(text_dataset), tok, "train"), first) and calls, damage
    assert not list((cache / "tokens").glob(".*.tmp"))  # no temporary file left behind


def test_a_token_cache_written_before_is_read_as_it_is(tmp_path, cache, monkeypatch):
    """The cache key (the file name), the sidecar and the tokens are pinned as an earlier lenx wrote them: such a
    cache is read, never re-tokenised or rewritten."""
    root = tmp_path / "c"
    root.mkdir()
    for i, text in enumerate(["alpha beta\n", "gamma delta\n", "epsilon zeta\n"]):  # 3 documents: the last is test
        (root / f"{i}.txt").write_text(text)
    tokens = np.array([*b"epsilon zeta\n", 256], dtype=np.uint16)
    sha = "7bc928dc40fe5080f446c55f19ca01207e63424834e65d54ab7aa830efdf4826"
    assert hashlib.sha256(tokens.tobytes()).hexdigest() == sha
    path = cache / "tokens" / "35fe1fe7468c8869-byte-utf8-eod256-test.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(tokens.tobytes())
    meta = {"dataset_fingerprint": "35fe1fe7468c8869", "tokenizer_fingerprint": "byte-utf8-eod256", "split": "test",
            "dtype": "uint16", "eod_id": 256, "length": 14, "documents": 1, "sha256": sha, "dataset": str(root),
            "tokenizer": "byte"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    mtimes = [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))]
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda self, texts: pytest.fail("re-tokenised"))
    assert load_corpus(str(root)).fingerprint == "35fe1fe7468c8869"
    assert np.array_equal(token_stream(str(root), "byte", "test"), tokens)
    assert [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))] == mtimes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.with_suffix(".json").name]


@pytest.mark.parametrize("module", ["splits", "corpora", "tokenizers", "cache"])
def test_each_data_module_imports_alone(module):
    """No import cycle inside lenx.data: every module imports first, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", f"import lenx.data.{module}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cache_location_follows_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LENX_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == tmp_path / "hf" / "lenx"
    monkeypatch.setenv("LENX_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_memmap_dtype_follows_vocabulary():
    assert tokenizers._dtype_for(257) == np.uint16 and tokenizers._dtype_for(65536) == np.uint16
    assert tokenizers._dtype_for(65537) == np.uint32


# ---------------------------------------------------------------- tokenizers and bytes


@pytest.fixture
def bpe300(text_dataset, cache) -> BPETokenizer:
    return get_tokenizer("bpe:300", str(text_dataset))


def test_bpe_round_trips_text(bpe300, text_dataset, cache):
    tok = bpe300
    assert tok.vocab_size == 300 and tok.decode([tok.eod_id]) == ""
    samples = [TRICKY, "", " leading space", "alpha beta gamma\n" * 3, "\x00 control \x7f", "Ω≈ç√∫˜µ≤≥÷"]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.token_bytes(ids) == len(text.encode("utf-8"))  # the per-token byte table is exact
    # the training text really merged (fewer tokens than bytes), and the separator is only ever a separator
    doc = (text_dataset / "doc00.txt").read_text()
    assert len(tok.encode(doc)) < len(doc.encode()) / 2
    stream = tok.encode_documents([TRICKY, doc, TRICKY])
    assert (stream == tok.eod_id).sum() == 3
    # cached: the same trained tokenizer comes back, not a new training
    [saved] = (cache / "tokenizers").glob("bpe300-*.json")
    mtime = saved.stat().st_mtime_ns
    again = get_tokenizer("bpe:300", str(text_dataset))
    assert again.fingerprint == tok.fingerprint and saved.stat().st_mtime_ns == mtime


def test_bpe_is_trained_on_the_training_split_only(tmp_path, cache):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.txt").write_text(("zzqq " if i == 2 else "abab ") * 200)  # 3 documents: the last is test
    tok = get_tokenizer("bpe:260", str(root))
    vocab = tok.tk.get_vocab()
    assert any("ab" in t for t in vocab) and not any("zq" in t or "qz" in t for t in vocab)


def test_bpe_vocab_size_the_training_text_cannot_reach_is_one_line(tmp_path, cache, capsys):
    """The trainer stops when no pair is left to merge: a run named bpe:<n> never has fewer than n tokens."""
    root = tmp_path / "c"
    root.mkdir()
    for i, text in enumerate(["abab " * 50, "cdcd " * 50, "efef", "ghgh"]):
        (root / f"{i}.txt").write_text(text)
    code = lenx("train", "--pe", "nope", *TINY, "--dataset", root, "--tokenizer", "bpe:400", "--out", tmp_path / "r")
    # 256 bytes + end of document + 3 merges each for 'abab' and 'cdcd' (ab, abab, Ġabab); the last two are not train
    one_line_error(capsys, code, "bpe:400", "too little text", "use bpe:263 or fewer")
    assert not (tmp_path / "r").exists()
    assert get_tokenizer("bpe:263", str(root)).vocab_size == 263  # the size it names is reached exactly


def test_document_tokens_are_the_split_documents(bpe300, text_dataset, cache):
    docs = load_corpus(str(text_dataset)).documents("test")
    got = document_tokens(str(text_dataset), bpe300, "test")
    assert len(got) == len(docs)
    for ids, doc in zip(got, docs):
        assert ids[-1] == bpe300.eod_id  # each document ends with its end-of-document token
        assert bpe300.eod_id not in ids[:-1] and bpe300.decode(ids[:-1]) == doc
        assert np.array_equal(ids[:-1], bpe300.encode(doc))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_bpb_counts_the_utf8_bytes_of_the_scored_text(tokenizer, text_dataset, tmp_path, cache):
    """One window covering the whole test stream: the scored text is everything after the first token.
    The test text starts with '~', which never occurs in training, so that first token is the one byte '~'."""
    test_text = "~ " + TRICKY + words(5, 3) + " ünïcödé ✓"
    test_file = tmp_path / "test.txt"
    test_file.write_text(test_text)
    out = tmp_path / "run"
    assert lenx("train", "--pe", "rope", *TINY, "--tokenizer", tokenizer, "--train-file", text_dataset,
                "--test-file", test_file, "--out", out) == 0
    info = json.loads((out / "run.json").read_text())
    tok = data.load_run_tokenizer(out, tokenizer)
    spec = DataSpec.of(info["config"])
    stream = token_stream(spec, tok, "test")
    assert tok.decode(stream[:1]) == "~"
    k = len(stream) - 1
    assert lenx("eval", out, "--lengths", k, "--tokens", k, "--out", tmp_path / "res") == 0
    row = pd.read_csv(tmp_path / "res" / "results.csv").iloc[0]
    [scored_doc] = load_corpus(spec).documents("test")
    assert scored_doc == test_text.replace("\r\n", "\n")  # text files are read with universal newlines
    assert row["tokens"] == k and row["bytes"] == len(scored_doc[1:].encode("utf-8"))
    assert row["bpb"] == pytest.approx(row["nll"] * k / row["bytes"] / np.log(2))


def test_transformers_tokenizer_from_a_local_directory(bpe300, text_dataset, tmp_path, cache):
    """A tokenizer without an eos token gets one extra id for end of document; loading is local, offline."""
    from transformers import PreTrainedTokenizerFast

    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe300.tk).save_pretrained(hf_dir)
    tok = get_tokenizer(str(hf_dir))
    assert tok.kind == "hf" and tok.eod_id == 300 and tok.vocab_size == 301
    for text in (TRICKY, "alpha beta"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.token_bytes(ids) == len(text.encode())
        assert tok.eod_id not in ids
    out = tmp_path / "run"
    assert lenx("train", "--pe", "alibi", *TINY, "--dataset", text_dataset, "--tokenizer", hf_dir, "--out", out) == 0
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 301
    assert lenx("eval", out, "--lengths", "16", "--tokens", "32", "--out", tmp_path / "res") == 0


def test_added_tokens_of_a_byte_level_tokenizer_count_their_utf8_bytes(bpe300, tmp_path, cache):
    """An added token is spelled as text, not in the byte-level alphabet ('é' there is the one byte 0xE9)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    bpe300.tk.add_tokens([AddedToken("café", normalized=False), "ü", "<tool>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe300.tk).save_pretrained(tmp_path / "added")
    tok = get_tokenizer(str(tmp_path / "added"))
    text = "un café <tool> über ü"
    ids = tok.encode(text)
    assert {"café", "ü", "<tool>"} <= set(tok.tok.convert_ids_to_tokens(ids))
    assert tok.token_bytes(ids) == len(text.encode("utf-8"))


def test_a_tokenizer_that_adds_bos_gets_none_in_the_stream(bpe300, text_dataset, tmp_path, cache):
    """A Llama-style tokenizer adds BOS (and here EOS) to every encoding by itself; lenx's streams hold each document's
    text tokens and one end-of-document token, no BOS, in training and evaluation alike (README)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = bpe300.tk
    tk.add_special_tokens(["<s>"])
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A <|endoftext|>",
                                                      special_tokens=[("<s>", bos), ("<|endoftext|>", bpe300.eod_id)])
    hf_dir = tmp_path / "bos_tok"
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>").save_pretrained(hf_dir)
    tok = get_tokenizer(str(hf_dir))
    assert tok.tok("alpha").input_ids[0] == bos  # the tokenizer alone adds it
    for split in ("train", "test"):
        docs = load_corpus(str(text_dataset)).documents(split)
        stream = token_stream(str(text_dataset), tok, split)
        assert bos not in stream and int((stream == tok.eod_id).sum()) == len(docs)
        assert [tok.decode(d) for d in document_tokens(str(text_dataset), tok, split)] == docs


def test_bpe_run_end_to_end_through_the_cli(text_dataset, tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert lenx("train", "--pe", "alibi", *TINY, "--dataset", text_dataset, "--tokenizer", "bpe:300", "--out", out) == 0
    saved = out / "tokenizer.json"
    assert saved.exists()
    info = json.loads((out / "run.json").read_text())
    assert info["tokenizer"]["vocab_size"] == 300
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    # eval reads the run's own tokenizer: with the tokenizer cache gone it still works ...
    for f in (cache / "tokenizers").glob("*"):
        f.unlink()
    res = tmp_path / "res"
    assert lenx("eval", out, "--lengths", "16,32", "--tokens", "64", "--out", res) == 0
    df = pd.read_csv(res / "results.csv")
    assert len(df) == 2 and df["ppl"].notna().all() and (df["bpb"] > 0).all()
    assert (df["tokenizer"] == "bpe:300").all() and (df["bytes"] > df["tokens"]).all()  # BPE tokens hold >1 byte
    # ... and a damaged copy in the run directory is refused, not replaced by a fresh tokenizer
    saved.write_text(saved.read_text().replace('"alpha"', '"alphx"', 1) if '"alpha"' in saved.read_text()
                     else "{broken")
    code = lenx("eval", out, "--lengths", "16", "--tokens", "64", "--out", tmp_path / "res2")
    one_line_error(capsys, code, str(out))


@pytest.mark.parametrize("name, body, needle", [
    ("bad.jsonl", "{not json\n", "JSON parse error"),
    ("bad.parquet", "not parquet", "Parquet magic bytes"),
])
def test_malformed_dataset_file_is_one_line_with_the_parsers_reason(tmp_path, capsys, cache, name, body, needle):
    (tmp_path / name).write_text(body)
    code = lenx("train", "--pe", "nope", *TINY, "--dataset", tmp_path / name, "--out", tmp_path / "r")
    one_line_error(capsys, code, f"cannot read {tmp_path / name}", needle)


def test_bad_tokenizer_names_are_one_line(capsys, tmp_path):
    one_line_error(capsys, lenx("train", "--pe", "nope", "--tokenizer", "bpe:10", "--out", tmp_path / "a"), "257")
    code = lenx("train", "--pe", "nope", "--tokenizer", "bpe:many", "--out", tmp_path / "b")
    one_line_error(capsys, code, "bpe:4096")
    code = lenx("train", "--pe", "nope", *TINY, "--tokenizer", "no-such-org/no-such-tokenizer", "--out", tmp_path / "c")
    one_line_error(capsys, code, "no-such-org/no-such-tokenizer", "HF_HUB_OFFLINE")
    # a path that is not there is named as a missing directory, not as a hub name the cache lacks
    missing = tmp_path / "no-such-dir"
    code = lenx("train", "--pe", "nope", *TINY, "--tokenizer", missing, "--out", tmp_path / "d")
    one_line_error(capsys, code, f"--tokenizer {missing}: no such directory")
    assert not (tmp_path / "d").exists()
    # a directory with no tokenizer in it says so, not what the loader tried
    (tmp_path / "empty").mkdir()
    code = lenx("train", "--pe", "nope", *TINY, "--tokenizer", tmp_path / "empty", "--out", tmp_path / "e")
    one_line_error(capsys, code, f"--tokenizer {tmp_path / 'empty'}: the directory is empty", "save_pretrained")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- hub names, offline


@pytest.mark.parametrize("name", ["wikitext-2", "hf:no-such-user/no-such-dataset:cfg"])
def test_unreachable_hub_dataset_is_one_line_in_process(name, capsys, tmp_path):
    t0 = time.monotonic()
    code = lenx("train", "--pe", "nope", *TINY, "--dataset", name, "--out", tmp_path / "r")
    one_line_error(capsys, code, name, "HF_DATASETS_OFFLINE", "local")
    assert time.monotonic() - t0 < 60


def test_unreachable_hub_dataset_subprocess(tmp_path):
    """The installed entry point with the documented offline variables: exit 2, one line, promptly."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "lenx", "train", "--pe", "nope", "--dataset", "wikitext-103",
                           "--out", tmp_path / "r"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "wikitext-103" in proc.stderr and "Salesforce/wikitext" in proc.stderr


# ---------------------------------------------------------------- configuration


def test_default_yaml_lists_every_config_key():
    keys = set(yaml.safe_load(DEFAULTS_FILE.read_text()))
    assert keys == set(TrainConfig().to_dict())


# ---------------------------------------------------------------- report


def results_rows(tokenizers_and_values):
    rows = []
    for i, (tok, ppl, bpb) in enumerate(tokenizers_and_values):
        for L, f in ((16, 1.0), (32, 1.5)):
            rows.append({"run": f"alibi-{i}", "pe": "alibi", "seed": 0, "train_len": 16, "eval_len": L, "ratio": L / 16,
                         "protocol": "nonoverlap", "rope_scaling": "none", "rope_factor": None, "ppl": ppl * f,
                         "bpb": bpb * f, "note": "", "dataset": "d", "tokenizer": tok})
    return pd.DataFrame(rows)


def test_report_shows_bpb_when_tokenizers_differ(tmp_path):
    from lenx.report import report

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    results_rows([("byte", 3.0, 1.25), ("bpe:300", 40.0, 1.125)]).to_csv(mixed / "results.csv", index=False)
    md = report(mixed).read_text()
    assert "| alibi [byte] | 3.00 | 4.50 |" in md and "| alibi [bpe:300] | 40.00 | 60.00 |" in md
    assert "## Bits per byte (nonoverlap)" in md and "bits per UTF-8 byte" in md
    assert "| alibi [byte] | 1.250 | 1.875 |" in md and "| alibi [bpe:300] | 1.125 | 1.688 |" in md

    same = tmp_path / "same"
    same.mkdir()
    results_rows([("bpe:300", 40.0, 1.125)]).to_csv(same / "results.csv", index=False)
    md = report(same).read_text()
    assert "| alibi | 40.00 | 60.00 |" in md and "bits per UTF-8 byte" not in md


def test_runs_from_before_the_new_keys_still_match(text_dataset, tmp_path, capsys):
    """A finished run whose run.json predates text_field / *_file is the same run, not a 'different config'."""
    out = tmp_path / "run"
    assert lenx("train", "--pe", "nope", *TINY, "--dataset", text_dataset, "--out", out) == 0
    info = json.loads((out / "run.json").read_text())
    for key in ("text_field", "train_file", "validation_file", "test_file"):
        del info["config"][key]
    (out / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert lenx("train", "--pe", "nope", *TINY, "--dataset", text_dataset, "--out", out) == 0
    assert "already trained" in " ".join(capsys.readouterr().err.split())  # rich may wrap the line


def test_hub_code_path_on_a_local_dataset_directory(tmp_path, cache):
    """`load_dataset` on a directory stands in for a hub repo (offline): split mapping, wikitext grouping."""
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    lines = {"train": ["", " = A = \n", " a text \n", "", " = B = \n", " = = B1 = = \n", " b text \n"],
             "validation": [" = C = \n", " c \n"], "test": ["", " = D = \n", " d \n", " = E = \n", " e \n"]}
    for split, rows in lines.items():
        pd.DataFrame({"text": rows}).to_parquet(wiki / f"{split}.parquet")
    corpus = data.load_hub("wiki", data.HubDataset(str(wiki), None, wikitext=True))
    assert corpus.documents("train") == ["\n = A = \n a text \n\n", " = B = \n = = B1 = = \n b text \n"]
    assert corpus.documents("test") == ["\n = D = \n d \n", " = E = \n e \n"]
    assert corpus.size("train") == len(lines["train"])  # progress counts rows

    one = tmp_path / "one"
    one.mkdir()
    texts = [f"document {i} " + words(i, 1) for i in range(60)]
    pd.DataFrame({"content": texts}).to_parquet(one / "data.parquet")
    with pytest.raises(LenxError, match="no column 'text'.*content.*--text-field"):
        data.load_hub("one", data.HubDataset(str(one), None))
    corpus = data.load_hub("one", data.HubDataset(str(one), None, text_field="content"))
    by_split = corpus.splits
    assert sorted(d for docs in by_split.values() for d in docs) == sorted(texts)  # one split, divided by row hash
    assert by_split["test"] == [t for i, t in enumerate(texts) if splits.split_of(str(i)) == "test"]
    again = data.load_hub("one", data.HubDataset(str(one), None, text_field="content"))
    assert again.fingerprint == corpus.fingerprint


def test_eval_on_another_corpus_keeps_its_own_rows(text_dataset, tmp_path, cache, capsys):
    out, res = tmp_path / "run", tmp_path / "res"
    assert lenx("train", "--pe", "alibi", *TINY, "--dataset", text_dataset, "--tokenizer", "bpe:300", "--out", out) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": words(100 + i, 10)}) + "\n" for i in range(3)))
    assert lenx("eval", out, "--lengths", "16", "--tokens", "32", "--out", res) == 0
    assert lenx("eval", out, "--lengths", "16", "--tokens", "32", "--out", res, "--test-file", other,
                "--text-field", "body") == 0
    df = pd.read_csv(res / "results.csv")
    assert sorted(df["dataset"]) == sorted([str(text_dataset), "files"]) and df["ppl"].notna().all()
    assert df["dataset_fingerprint"].nunique() == 2 and (df["tokenizer"] == "bpe:300").all()
    one_line_error(capsys, lenx("eval", out, "--text-field", "body", "--out", res), "--text-field", "--dataset")


def test_a_single_periodic_text_keeps_its_test_split():
    """One .txt is cut 90/5/5 by characters; in a periodic text the validation and test parts can be the same
    characters, and they are parts of one document, not two copies of it: neither is dropped."""
    text = "gamma delta epsilon " * 200
    parts = splits.split_documents([("b.txt", text)])
    assert parts["validation"] == parts["test"] != [] and "".join(sum(parts.values(), [])) == text



def test_config_id_tells_transformers_tokenizers_apart_by_contents():
    """Two tokenizers saved at one path in turn are two experiments, not seeds of one; byte and bpe:<n> runs keep
    the ids they had (pinned: an id that changes splits old results tables from new ones in the report)."""
    from lenx.config import TrainConfig
    from lenx.ids import config_id

    def info(name, kind, fingerprint, seed=0):
        return {"config": {**TrainConfig().to_dict(), "tokenizer": name, "seed": seed},
                "tokenizer": {"name": name, "kind": kind, "fingerprint": fingerprint}}

    assert config_id(info("./tok", "hf", "hf-aaaa")) != config_id(info("./tok", "hf", "hf-bbbb"))
    assert config_id(info("./tok", "hf", "hf-aaaa", seed=0)) == config_id(info("./tok", "hf", "hf-aaaa", seed=1))
    assert config_id(info("byte", "byte", "byte-utf8-eod256")) == "b86a99"
    assert config_id(info("bpe:512", "bpe", "bpe-1")) == config_id(info("bpe:512", "bpe", "bpe-2"))
