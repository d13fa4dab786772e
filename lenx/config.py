"""Training configuration: TrainConfig's defaults, then a --config file, then the flags of `lenx train`. Each
option is written once, as a field of TrainConfig (`lenx.options`); its flag, its key in a --config file and
configs/default.yaml (a documented example, kept equal to these fields by a test) come from the field."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from .data import DATASET_HELP, FILE_KEYS
from .errors import LenxError
from .mix import parse_mix
from .options import (at_least_zero, check_types, file_keys, finite_at_least_zero, flag_of, one_of, option,
                      options, path_given, positive_finite, positive_int, run_checks, unit_interval, yaml_example)

# Where a checkout keeps the documented example of the defaults; lenx never reads it (a wheel has no configs/).
DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
DEFAULTS_HEADER = """\
lenx defaults: the fields of lenx.config.TrainConfig, written out by `python -m lenx.config` (a test keeps this
file equal to them; lenx itself does not read it). Every key here can be set in a --config file; most also by a
flag of `lenx train` (`lenx train --help`; the optimizer details, attention backend, scheme options and log
period only here); flags win. At these values `lenx train --pe alibi` already shows the published pattern
(ALiBi flat past the training length, sinusoidal and RoPE not)."""


def _scheme(value: str, name: str) -> str:
    from .positional import get_scheme

    get_scheme(value)
    return value


def _tokenizer(value: str, name: str) -> str:
    from .data import check_tokenizer_name

    check_tokenizer_name(value)
    return value


def _text_field(value: str, name: str) -> str:
    if not value.strip():
        raise LenxError(f"{name} is empty; name the column that holds the text (default: text)")
    return value


def _passkey_format(value: str, name: str) -> str:
    from .probes.documents import FORMATS

    return one_of(tuple(FORMATS), "passkey format")(value, name)


def _random_positions(value, name: str):
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise LenxError(f"{name} must be an integer above the training length (or 0: off), got {value!r}")
    return value


def _attn_backend(value: str, name: str) -> str:
    from .attention import BACKENDS

    return one_of(BACKENDS, "attention backend")(value, name)


@dataclass
class TrainConfig:
    pe: str = option("rope", "Positional scheme (see `lenx schemes`).", check=_scheme)
    pe_options: dict = option({}, "Scheme options (e.g. {base: 10000} for rope); `lenx schemes NAME` shows them.",
                              flag=None)
    dataset: str = option("stdlib", f"Corpus: {DATASET_HELP}.", check=path_given)
    tokenizer: str = option("byte", "byte | bpe:<vocab_size> (trained on the training split) | a transformers "
                            "tokenizer name or path.", check=_tokenizer)
    text_field: str = option("text", "Text column (.jsonl/.json/.parquet/hf:).", check=_text_field)
    train_file: str | None = option(None, "Explicit training split (file or directory).", check=path_given)
    validation_file: str | None = option(None, "Explicit validation split.", check=path_given)
    test_file: str | None = option(None, "Explicit test split.", check=path_given)
    train_len: int = option(128, "Training context length in tokens.", check=positive_int)
    random_positions: int | None = option(
        None, "Randomized positions (Ruoss et al. 2023): training windows take a sorted random subset of "
        "train_len distinct positions of [0, N), N > train_len (e.g. 16 x train_len), one subset per step shared "
        "by all its rows, as the reference draws one per batch (docs/training.md); evaluation keeps 0..T-1; a "
        "learned table gets N rows. null or 0: off [default: off].", check=_random_positions)
    steps: int = option(800, "Optimizer steps.", check=positive_int)
    batch_size: int = option(32, "Sequences per step per process.", check=positive_int)
    grad_accum: int = option(1, "Micro-batches accumulated per step.", check=positive_int)
    layers: int = option(4, "Transformer blocks.", check=positive_int)
    d_model: int = option(128, "Model width.", check=positive_int)
    heads: int = option(4, "Attention heads.", check=positive_int)
    d_ff: int = option(512, "Feed-forward width.", check=positive_int)
    lr: float = option(2e-3, "Peak learning rate (AdamW).", check=positive_finite)
    pos_lr_mult: float | None = option(None, "How a scheme's own parameters (learned table, T5, KERPLE, FIRE, Shaw, "
                                       "...) train: null (the default) as its reference implementation trains them "
                                       "(the model's learning rate, weight decay as the reference applies it; `lenx "
                                       "schemes NAME` says which); a number: all of them at lr times it, without "
                                       "weight decay (lenx's rule before 2026-12, at 10).", flag=None,
                                       check=lambda v, name: v if v is None else positive_finite(v, name))
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only (a scheme's own parameters: see "
                                 "pos_lr_mult); never on norms.",
                                 flag=None, check=finite_at_least_zero)
    beta1: float = option(0.9, "AdamW beta1.", flag=None, check=unit_interval(closed=False))
    beta2: float = option(0.95, "AdamW beta2.", flag=None, check=unit_interval(closed=False))
    warmup: int = option(80, "Linear warm-up steps before the cosine decay.", check=at_least_zero)
    min_lr_ratio: float = option(0.1, "The cosine decay ends at lr * min_lr_ratio.", flag=None,
                                 check=unit_interval(closed=True))
    grad_clip: float = option(1.0, "Gradient norm clip.", flag=None, check=finite_at_least_zero)
    seed: int = option(0, "Random seed.", check=at_least_zero)
    precision: str = option("auto", "auto | fp32 | bf16.", check=one_of(("auto", "fp32", "bf16"), "precision",
                                                                       suggest=False))
    compile: bool = option(False, "torch.compile the model [default: off; on CPU lenx's own training route is "
                           "faster than compiled code].", flag="--compile/--no-compile")
    attn_backend: str = option("sdpa", "sdpa (fused, blocked for score biases) | materialized (reference).",
                               flag=None, check=_attn_backend)
    attn_block_size: int = option(512, "Query rows per block when a scheme biases the scores.", flag=None,
                                  check=positive_int)
    mix: dict = option({}, "Training mix: shares of the training windows that are probe documents built at the "
                       "training length from the training split, in `lenx eval --probe`'s wording, e.g. "
                       "passkey:0.1,mqar:0.05 (a mapping {passkey: 0.1} in a config file) [default: none].",
                       flag_type=Optional[str], parse=lambda text, flag: parse_mix(text, flag), check=parse_mix)
    passkey_format: str = option("short", "Wording of the mix's passkey documents: short | byte-key | landmark | "
                                 "landmark-garbage (`lenx schemes`-like list in docs/protocols.md); `lenx eval --probe "
                                 "passkey` probes the run in it.", check=_passkey_format)
    log_every: int = option(10, "Logging period in steps.", flag=None, check=positive_int)
    save_every: int = option(200, "Checkpoint period in steps.", check=positive_int)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAIN_KEYS = tuple(file_keys(TrainConfig))  # the keys of a training config (a --config file)
# Settings that `lenx train` takes as flags; the others are set in a --config file.
FLAGS = tuple(f.name for f in options(TrainConfig) if flag_of(f))


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads `1e-3` as the number it is: YAML 1.1 (PyYAML) wants a dot (`1.0e-3`) and reads it as
    text, which a float setting then refused as "must be float, got '1e-3'"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(path: str | Path) -> dict:
    """Safe YAML (never constructs Python objects). One clear line on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LenxError(f"config file {path} not found") from None
    except OSError as e:
        raise LenxError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise LenxError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LenxError(f"config file {path} must be a mapping of keys to values")
    return data


def check_values(values: dict, source: str) -> dict:
    """Reject unknown keys and wrong types, naming the key."""
    return check_types(TrainConfig, values, source)


def resolve(config_file: str | None = None, names: Callable[[str], str] | None = None, **flags) -> TrainConfig:
    """The run's config from a config file and flags, every value checked; `names(key)`: how the user set each
    value, in errors (default: its flag, or its config key)."""
    raw = read_yaml(config_file) if config_file else {}
    if "schemes" in raw:
        raise LenxError(f"{config_file} is a sweep config (schemes, seeds, train:, eval:); run it with "
                        f"`lenx sweep --config {config_file}`")
    explicit = check_values(raw, str(config_file))
    explicit.update(check_values({k: v for k, v in flags.items() if v is not None}, "flag"))
    values = {**TrainConfig().to_dict(), **explicit}
    if any(values.get(k) for k in FILE_KEYS):
        # explicit split files name the corpus themselves: dataset becomes 'files'
        if explicit.get("dataset", "files") != "files":
            raise LenxError(
                f"give either --dataset ({explicit['dataset']}) or --train-file/--validation-file/--test-file, not both"
            )
        values["dataset"] = "files"
    if values.get("random_positions") == 0:
        values["random_positions"] = None  # off, recorded as never set: the same run (and config id) as without it
    cfg = TrainConfig(**values)
    validate(cfg, names or _name)
    return cfg


def _name(key: str) -> str:
    """How a user sets `key`: its flag, or its config key."""
    return f"--{key.replace('_', '-')}" if key in FLAGS else f"config key '{key}'"


def _check_scheme_options(cfg: TrainConfig) -> int | None:
    """Build the scheme once, on the meta device (no memory, whatever the sizes): its options are checked before
    any run directory is made. Returns the longest sequence it can represent (None: any)."""
    from types import SimpleNamespace

    import torch

    from .positional import build_scheme

    with torch.device("meta"):
        scheme = build_scheme(SimpleNamespace(pe=cfg.pe, pe_options=cfg.pe_options, n_head=cfg.heads,
                                              n_layer=cfg.layers, d_model=cfg.d_model, train_len=cfg.train_len,
                                              train_positions=cfg.random_positions or None))
    return scheme.max_len


def validate(cfg: TrainConfig, names: Callable[[str], str] = None) -> None:
    """Every option's own check (TrainConfig's fields) and the checks that join several. The scheme and the
    sizes come first: the scheme's options are checked by building it at those sizes. `names(key)`: how the user
    set each value (its flag by default)."""
    names = names or _name
    values = cfg.to_dict()
    first = (_scheme, positive_int, _random_positions)
    run_checks(TrainConfig, values, names, which=lambda check: check in first)
    if cfg.d_model % cfg.heads or (cfg.d_model // cfg.heads) % 2:
        raise LenxError(f"{names('d_model')} {cfg.d_model} must split into {cfg.heads} heads of an even size")
    _check_random_positions(cfg, names)
    max_len = _check_scheme_options(cfg)
    if cfg.random_positions and max_len is not None and cfg.random_positions > max_len:
        raise LenxError(f"{names('random_positions')} {cfg.random_positions} is past the {max_len} positions scheme "
                        f"'{cfg.pe}' can represent; give N <= {max_len}")
    run_checks(TrainConfig, values, names, which=lambda check: check not in first)
    if cfg.dataset == "files" and not (cfg.train_file and cfg.test_file):
        raise LenxError("--dataset files needs --train-file and --test-file (--validation-file is optional)")


def _check_random_positions(cfg: TrainConfig, names: Callable[[str], str]) -> None:
    """--random-positions N above the training length: a window's train_len distinct positions come from [0, N).
    (`validate` then checks N against what the scheme can represent: xPos's float32 range.)"""
    n = cfg.random_positions
    if n and n <= cfg.train_len:
        raise LenxError(f"{names('random_positions')} {n} must exceed {names('train_len')} {cfg.train_len} (each "
                        f"window draws its {cfg.train_len} positions from [0, N)); give N > {cfg.train_len}, e.g. "
                        f"{16 * cfg.train_len}, or 0 to train on positions 0..{cfg.train_len - 1}")


def default_yaml() -> str:
    """configs/default.yaml as these fields write it."""
    return yaml_example(TrainConfig, DEFAULTS_HEADER)


if __name__ == "__main__":  # python -m lenx.config > configs/default.yaml
    print(default_yaml(), end="")
