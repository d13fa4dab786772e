"""Column types of lenx's results tables, shared by the writer (`lenx eval`) and the readers (`lenx report`).
No torch here: the report must not need it."""

from __future__ import annotations

import pandas as pd

from .errors import LenxError

NUMERIC = ["seed", "train_len", "eval_len", "ratio", "stride", "rope_factor", "tokens", "windows", "documents", "nll",
           "ppl", "bpb", "bytes", "seconds", "token_budget", "bucket_width", "bucket_start", "bucket_end",
           # the probes table (`lenx.probes.cell`)
           "depth", "distance", "trials", "answers", "accuracy", "accuracy_low", "accuracy_high", "exact_match",
           "exact_match_low", "exact_match_high", "key_nll", "base_nll", "gain", "gain_low", "gain_high",
           "probe_seed", "cell_seed", "pairs", "segment",
           # a RoPE extension's parameters (`lenx.positional.rope_scaling.PARAM_COLUMNS`; rope_factors is a file name)
           "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_low_freq_factor",
           "rope_high_freq_factor", "rope_window", "rope_group", "rope_logn", "rope_leak", "rope_chunk", "rope_local",
           "rope_sinks", "rope_shift", "rope_global", "rope_cap"]

# Hex fingerprints: as text, never parsed as numbers ('012345' would lose its zero; '0e1234' and '0e5678' both be 0.0)
ID_COLUMNS = ("config_id", "weights_id", "dataset_fingerprint")


def check_numeric(df: pd.DataFrame, path, fix: str) -> None:
    """Refuse a table where a number belongs and something else stands (an edited or foreign table): one line that
    names the column and the value, rather than a traceback from the arithmetic later."""
    for col in NUMERIC:
        if col in df and not pd.api.types.is_numeric_dtype(df[col]):
            values = pd.to_numeric(df[col], errors="coerce")
            bad = df[col][values.isna() & df[col].notna()]
            if len(bad):
                raise LenxError(f"{path}: column {col} holds {str(bad.iloc[0])!r}, not a number; {fix}")
