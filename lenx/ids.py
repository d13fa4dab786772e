"""Identifiers and fingerprints: what makes two runs the same run, an experiment's config id, and short hashes
of weights and files. Pure functions of their inputs, imported by training, evaluation and the HF subject alike."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import TrainConfig


# may change on resume (e.g. other process count) if the global batch does not; compiling changes no result
RESUME_FREE = ("batch_size", "grad_accum", "compile")


def identity(config: dict, world: int) -> dict:
    """What makes two runs the same run. Keys added to lenx since a run was made take their defaults,
    which preserve the old behaviour."""
    config = {**TrainConfig().to_dict(), **config}
    out = {k: v for k, v in config.items() if k not in RESUME_FREE}
    out["global_batch"] = config["batch_size"] * config.get("grad_accum", 1) * world
    return out


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


NOT_EXPERIMENT = ("seed", "log_every", "save_every")  # left out of config_id: seeds of one experiment share it
ADDED = {"mix": {}, "passkey_format": "short", "random_positions": None}  # keys added since config_ids were first recorded: at these values left out, so ids stay put


def config_id(info: dict) -> str:
    """A short fingerprint of a run's training config (as `identity` compares configs) apart from its seed
    and bookkeeping: runs that share it are seeds of one experiment, and `lenx report` pools only those.
    A transformers tokenizer is named by a path or hub name whose contents can change, so its fingerprint joins
    the config (two tokenizers saved at one path are two experiments); `byte` and `bpe:<n>` (trained on the
    run's text, which the results' dataset_fingerprint names) are fixed by their names, and keep their ids."""
    ident = {k: v for k, v in identity(info["config"], info.get("world_size", 1)).items() if k not in NOT_EXPERIMENT
             and not (k in ADDED and v == ADDED[k])}
    if ident.get("pos_lr_mult") is None and not _has_own_parameters(ident.get("pe")):
        # the default changed from 10 to null (2026-12); for a scheme without parameters of its own it changes
        # nothing, so such runs keep the ids they had
        ident["pos_lr_mult"] = 10.0
    tok = info.get("tokenizer") or {}
    if tok.get("kind") == "hf" and tok.get("fingerprint"):
        ident["tokenizer_fingerprint"] = tok["fingerprint"]
    return short_hash(ident)


def _has_own_parameters(pe) -> bool:
    from .errors import LenxError
    from .positional import get_scheme

    try:
        return bool(get_scheme(pe).learned)
    except LenxError:
        return True


def weights_id(run_dir: Path) -> str:
    """A short fingerprint of a run's trained weights: a run retrained in place gets another one."""
    return files_id([run_dir / "model.safetensors"])


def files_id(paths) -> str:
    """A short fingerprint of the files' contents, read in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:12]
