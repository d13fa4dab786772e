"""Options written once. Each option of a command is one dataclass field made by `option`: its name, type,
default, help text, flag and check live there, and the rest is derived from the fields: the typer parameters of
the command (`command_signature`), the keys a YAML file may set (`file_keys`), the type checks of those keys
(`check_types`) and the documented example of the defaults (`yaml_example`)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Callable, Optional

from .errors import LenxError, did_you_mean

DEVICE_HELP = "cpu or cuda[:N] [default: cuda when present]."
SAME = ""  # `flag` / `key` of `option`: derived from the field's name


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = SAME, key: str | None = SAME,
           check: Callable | None = None, flag_type: Any = None, parse: Callable | None = None) -> Any:
    """A dataclass field that is an option. `help`: its help text (the flag's, and the YAML comment of its key);
    `flag`: how the command line sets it (SAME: --<name with dashes>; None: no flag); `key`: how a YAML file sets
    it (SAME: its name; None: no key); `check(value, name)`: raises LenxError naming the option by `name`, and
    returns the value in the form the command uses. `flag_type`: the type typer parses, where the field's own is
    not it; `parse(text, flag)`: turns what typer parsed into the field's value."""
    meta = {"help": help, "flag": flag, "key": key, "check": check, "flag_type": flag_type, "parse": parse}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str | None:
    """The flag that sets this option ('--name'), or None."""
    flag = f.metadata.get("flag")
    if flag is None:
        return None
    return (flag or f"--{f.name.replace('_', '-')}").split("/")[0]


def key_of(f: dataclasses.Field) -> str | None:
    key = f.metadata.get("key")
    return None if key is None else key or f.name


def file_keys(cls) -> dict[str, dataclasses.Field]:
    """The keys a YAML file may set, and the field each sets."""
    return {key_of(f): f for f in options(cls) if key_of(f) is not None}


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _hints(cls) -> dict:
    module = inspect.getmodule(cls)
    return typing.get_type_hints(cls, vars(module) if module else None)


def typer_parameters(cls, given_only: bool = False) -> list[inspect.Parameter]:
    """The typer parameters of the flagged options of `cls`, in field order. `given_only`: every flag defaults
    to None (not given), so that a config file below the flags keeps its values."""
    import typer

    hints, params = _hints(cls), []
    for f in options(cls):
        if f.metadata["flag"] is None:
            continue
        kind = f.metadata["flag_type"] or hints[f.name]
        default = default_of(f)
        if given_only:
            kind, default = Optional[kind], None
        elif default is dataclasses.MISSING:
            default = ...  # required
        decls = f.metadata["flag"] or f"--{f.name.replace('_', '-')}"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                        default=typer.Option(default, decls, help=f.metadata["help"])))
    return params


def command_signature(fn: Callable, *parts: list[inspect.Parameter]) -> Callable:
    """`fn` as typer sees it: its own parameters (before its **options), then `parts` (`typer_parameters`);
    typer calls it with every parameter by name."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = inspect.Signature([*own, *(p for part in parts for p in part)])
    return fn


def from_flags(cls, flags: dict) -> dict:
    """The values of `cls`'s options among `flags` (as typer passed them), each through its `parse`."""
    out = {}
    for f in options(cls):
        if f.name in flags:
            parse = f.metadata["parse"]
            out[f.name] = parse(flags[f.name], flag_of(f)) if parse else flags[f.name]
    return out


def run_checks(cls, values: dict, names: Callable[[str], str], which: Callable | None = None) -> dict:
    """Every option's own check, in field order, on `values` (keyed by field name); `names(field)`: how the user
    set it; `which(check)`: only the options whose check it accepts. Returns the checked values."""
    out = dict(values)
    for f in options(cls):
        check = f.metadata["check"]
        if check is not None and f.name in out and (which is None or which(check)):
            out[f.name] = f.metadata["check"](out[f.name], names(f.name))
    return out


_TYPES = {int: "int", float: "float", str: "str", dict: "dict", bool: "bool"}


def check_types(cls, values: dict, source: str) -> dict:
    """File values keyed by `cls`'s keys (dashes read as underscores): unknown keys and wrong types are refused,
    naming the key; ints are taken where a float belongs. Returns them keyed by field name."""
    keys, hints, out = file_keys(cls), _hints(cls), {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in keys:
            raise LenxError(f"{source}: unknown key '{key}'{did_you_mean(key, keys)}; known keys: {', '.join(keys)}")
        kind = hints[keys[key].name]
        optional = type(None) in typing.get_args(kind)
        want = next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
        if value is None and optional:
            out[keys[key].name] = None
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise LenxError(f"{source}: key '{key}' must be {_TYPES[want]}, got {value!r}")
        out[keys[key].name] = value
    return out


def yaml_example(cls, header: str, width: int = 118) -> str:
    """A YAML file of `cls`'s keys at their defaults, each commented with its help text: the documented
    example a test keeps equal to the fields."""
    import yaml

    rows = []
    for key, f in file_keys(cls).items():
        value = yaml.safe_dump({key: default_of(f)}, default_flow_style=True, width=10**6).strip()
        rows.append((value[1:-1] if value.startswith("{") else value, f.metadata["help"]))
    pad = max(len(v) for v, _ in rows) + 2
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for value, text in rows:
        lines += [line.rstrip() for line in _comment(value.ljust(pad), text, width, pad)]
    return "\n".join(lines) + "\n"


def _comment(head: str, text: str, width: int, pad: int) -> list[str]:
    """`head` followed by `text` as a comment wrapped to `width`, continued under its first line."""
    import textwrap

    body = textwrap.wrap(text, width - pad - 2, break_on_hyphens=False) or [""]
    return [head + "# " + body[0], *(" " * pad + "# " + line for line in body[1:])]


# ---------------------------------------------------------------------------------------------------
# Checks (`option(check=...)`): each raises LenxError naming the option as the user set it


def shown(value) -> str:
    """A value as an error quotes it: text in quotes, anything else as Python writes it."""
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _integer(value) -> bool:
    from .positional.base import is_integer

    return is_integer(value)


def positive_int(value, name: str):
    if value is not None and not (_integer(value) and value > 0):
        raise LenxError(f"{name} must be a positive integer, got {shown(value)}")
    return value


def at_least_zero(value, name: str):
    if value < 0:
        raise LenxError(f"{name} must be >= 0, got {shown(value)}")
    return value


def positive_finite(value, name: str):
    if not (value > 0 and math.isfinite(value)):
        raise LenxError(f"{name} must be a positive finite number, got {shown(value)}")
    return value


def finite_at_least_zero(value, name: str):
    if not (value >= 0 and math.isfinite(value)):
        raise LenxError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return value


def unit_interval(closed: bool) -> Callable:
    """[0, 1] (`closed`) or [0, 1)."""
    def check(value, name: str):
        if not (0 <= value <= 1 if closed else 0 <= value < 1):
            raise LenxError(f"{name} must lie in [0, 1{']' if closed else ')'}, got {shown(value)}")
        return value
    return check


def one_of(known: tuple[str, ...], what: str, suggest: bool = True) -> Callable:
    """A value among `known` (None: not given); `what` names it in the error ("precision"); `suggest`: with the
    nearest known value."""
    def check(value, name: str):
        if value is not None and value not in known:
            near = did_you_mean(value, known) if suggest else ""
            where = f"{name}: " if ": " in name else ""  # a config file's key ("sweep.yaml: train.x"); a flag says itself
            raise LenxError(f"{where}unknown {what} {shown(value)}{near}; known: {', '.join(known)}")
        return value
    return check


def path_given(value, name: str):
    """A dataset or file option given empty: one line (an empty path would read the current directory, or be
    ignored)."""
    if value is not None and not value.strip():
        raise LenxError(f"{name} is empty; give a corpus name or a file or directory path")
    return value
