"""Corpora, tokenizers and cached token streams.

- `corpora`: what `--dataset` names (`DataSpec`), loaded as a `Corpus` of documents per split;
  `splits`: how local documents are split, deterministically, and fingerprinted.
- `tokenizers`: `byte`, `bpe:<n>` and transformers tokenizers, each with a per-token table of UTF-8 bytes.
- `cache`: what is cached under `cache_dir()`: trained BPE tokenizers (`get_tokenizer`) and token streams
  (`token_stream`, `document_tokens`), keyed by the dataset's and the tokenizer's fingerprints.
"""

from .cache import cache_dir, document_tokens, get_tokenizer, token_stream
from .corpora import (
    DATASET_HELP,
    FILE_KEYS,
    HUB_DATASETS,
    LOCAL_KINDS,
    Corpus,
    DataSpec,
    HubDataset,
    group_wikitext,
    is_wikitext_title,
    load_corpus,
    load_hub,
    load_spec,
    quiet_datasets,
    stdlib_files,
    text_changed,
)
from .splits import SPLITS
from .tokenizers import (
    EOD_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    byte_decoder,
    check_tokenizer_name,
    hf_tokenizer,
    load_run_tokenizer,
    parse_bpe,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DATASET_HELP",
    "DataSpec",
    "EOD_TOKEN",
    "FILE_KEYS",
    "HFTokenizer",
    "HUB_DATASETS",
    "HubDataset",
    "LOCAL_KINDS",
    "SPLITS",
    "Tokenizer",
    "byte_decoder",
    "cache_dir",
    "check_tokenizer_name",
    "document_tokens",
    "get_tokenizer",
    "group_wikitext",
    "hf_tokenizer",
    "is_wikitext_title",
    "load_corpus",
    "load_hub",
    "load_run_tokenizer",
    "load_spec",
    "parse_bpe",
    "quiet_datasets",
    "stdlib_files",
    "text_changed",
    "token_stream",
]
