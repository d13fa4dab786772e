"""Training configuration: defaults from configs/default.yaml, then a --config file, then flags."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import LenxError, did_you_mean

DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class TrainConfig:
    pe: str = "rope"
    pe_options: dict = field(default_factory=dict)
    dataset: str = "stdlib"
    tokenizer: str = "byte"
    text_field: str = "text"
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    train_len: int = 128
    steps: int = 800
    batch_size: int = 32
    grad_accum: int = 1
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    d_ff: int = 512
    lr: float = 2e-3
    pos_lr_mult: float = 10.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup: int = 80
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    compile: bool = False  # torch.compile the model (slower on CPU, where lenx's own training route is faster)
    attn_backend: str = "sdpa"
    attn_block_size: int = 512
    log_every: int = 10
    save_every: int = 200

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TRAIN_KEYS = tuple(_FIELDS)  # the keys of a training config (configs/default.yaml)
_TYPES = {"int": int, "float": float, "str": str, "dict": dict, "str | None": str, "bool": bool}
_FILE_KEYS = ("train_file", "validation_file", "test_file")


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
    out = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in _FIELDS:
            raise LenxError(f"{source}: unknown key '{key}'{did_you_mean(key, _FIELDS)}; known keys: {', '.join(_FIELDS)}")
        want = _TYPES[_FIELDS[key].type]
        if value is None and _FIELDS[key].type.endswith("| None"):
            out[key] = None
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise LenxError(f"{source}: key '{key}' must be {want.__name__}, got {value!r}")
        out[key] = value
    return out


def resolve(config_file: str | None = None, **flags) -> TrainConfig:
    values = check_values(read_yaml(DEFAULTS_FILE), str(DEFAULTS_FILE)) if DEFAULTS_FILE.exists() else {}
    raw = read_yaml(config_file) if config_file else {}
    if "schemes" in raw:
        raise LenxError(f"{config_file} is a sweep config (schemes, seeds, train:, eval:); run it with "
                        f"`lenx sweep --config {config_file}`")
    explicit = check_values(raw, str(config_file))
    explicit.update(check_values({k: v for k, v in flags.items() if v is not None}, "flag"))
    values.update(explicit)
    if any(values.get(k) for k in _FILE_KEYS):
        # explicit split files name the corpus themselves: dataset becomes 'files'
        if explicit.get("dataset", "files") != "files":
            raise LenxError(
                f"give either --dataset ({explicit['dataset']}) or --train-file/--validation-file/--test-file, not both"
            )
        values["dataset"] = "files"
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


# Settings that `lenx train` takes as flags; the others are set in a --config file (or configs/default.yaml).
FLAGS = ("pe", "dataset", "tokenizer", "text_field", "train_file", "validation_file", "test_file", "train_len", "steps",
         "batch_size", "grad_accum", "layers", "d_model", "heads", "d_ff", "warmup", "lr", "seed", "precision",
         "compile", "save_every")


def _name(key: str) -> str:
    """How a user sets `key`: its flag, or its config key."""
    return f"--{key.replace('_', '-')}" if key in FLAGS else f"config key '{key}'"


def _check_scheme_options(cfg: TrainConfig) -> None:
    """Build the scheme once, on the meta device (no memory, whatever the sizes): its options are checked before
    any run directory is made."""
    from types import SimpleNamespace

    import torch

    from .positional import build_scheme

    with torch.device("meta"):
        build_scheme(SimpleNamespace(pe=cfg.pe, pe_options=cfg.pe_options, n_head=cfg.heads, n_layer=cfg.layers,
                                     d_model=cfg.d_model, train_len=cfg.train_len))


def check_path_given(name: str, value: str | None) -> None:
    """A dataset or file flag given empty: one line (an empty path would read the current directory, or be
    ignored)."""
    if value is not None and not value.strip():
        raise LenxError(f"{name} is empty; give a corpus name or a file or directory path")


def validate(cfg: TrainConfig) -> None:
    from .positional import get_scheme

    get_scheme(cfg.pe)
    for key in ("train_len", "steps", "batch_size", "grad_accum", "layers", "d_model", "heads", "d_ff", "attn_block_size", "log_every", "save_every"):
        if getattr(cfg, key) <= 0:
            raise LenxError(f"{_name(key)} must be a positive integer, got {getattr(cfg, key)}")
    if cfg.d_model % cfg.heads or (cfg.d_model // cfg.heads) % 2:
        raise LenxError(f"--d-model {cfg.d_model} must split into {cfg.heads} heads of an even size")
    _check_scheme_options(cfg)
    for key in ("lr", "pos_lr_mult"):
        value = getattr(cfg, key)
        if not (value > 0 and math.isfinite(value)):
            raise LenxError(f"{_name(key)} must be a positive finite number, got {value}")
    for key in ("weight_decay", "grad_clip"):
        if not (getattr(cfg, key) >= 0 and math.isfinite(getattr(cfg, key))):
            raise LenxError(f"{_name(key)} must be a finite number >= 0, got {getattr(cfg, key)}")
    for key, closed in (("min_lr_ratio", True), ("beta1", False), ("beta2", False)):
        value = getattr(cfg, key)
        if not (0 <= value <= 1 if closed else 0 <= value < 1):
            raise LenxError(f"{_name(key)} must lie in [0, 1{']' if closed else ')'}, got {value}")
    for key in ("warmup", "seed"):
        if getattr(cfg, key) < 0:
            raise LenxError(f"{_name(key)} must be >= 0, got {getattr(cfg, key)}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise LenxError(f"unknown precision '{cfg.precision}'; known: auto, fp32, bf16")
    from .data import check_tokenizer_name

    check_tokenizer_name(cfg.tokenizer)
    for key in ("dataset", *_FILE_KEYS):
        check_path_given(_name(key), getattr(cfg, key))
    if not cfg.text_field.strip():
        raise LenxError("--text-field is empty; name the column that holds the text (default: text)")
    if cfg.dataset == "files" and not (cfg.train_file and cfg.test_file):
        raise LenxError("--dataset files needs --train-file and --test-file (--validation-file is optional)")
    from .attention import BACKENDS

    if cfg.attn_backend not in BACKENDS:
        raise LenxError(f"unknown attention backend '{cfg.attn_backend}'{did_you_mean(cfg.attn_backend, BACKENDS)}; known: {', '.join(BACKENDS)}")
