"""Retrieval probes: does a model use the context it is given? `documents` builds the probe windows (pure: a
tokenizer, text tokens and a random generator in, tokens and answer positions out), for evaluation and for a
training mix; `cell` scores them as a kind of evaluation cell (`lenx eval --probe`, table `probes`)."""

from .documents import (
    FORMATS,
    PROBES,
    Document,
    Draw,
    PasskeyFormat,
    first_integer,
    garbage_stream,
    haystack_stream,
    mqar,
    passkey,
    passkey_overhead,
    repeat,
    sample,
    token_pools,
)

__all__ = ["FORMATS", "PROBES", "Document", "Draw", "PasskeyFormat", "first_integer", "garbage_stream",
           "haystack_stream", "mqar", "passkey", "passkey_overhead", "repeat", "sample", "token_pools"]
