"""Registry of positional schemes. Adding a scheme: one module with a `PositionalScheme`
subclass decorated with `@register`, and its name and module in SCHEMES below.

The names are data, so that code needing only them and their order (the report, its plots) does not load
torch; the scheme modules are imported on first use of REGISTRY, get_scheme, build_scheme or the classes."""

from __future__ import annotations

import importlib

# scheme name -> its module, in listing order (tables, plots, `lenx schemes`)
SCHEMES = {"nope": "nope", "sinusoidal": "sinusoidal", "learned": "learned", "rope": "rope", "alibi": "alibi",
           "xpos": "xpos", "t5": "t5", "shaw": "shaw", "kerple-log": "kerple", "kerple-power": "kerple", "fire": "fire",
           # 2023-2025
           "fox": "fox", "cope": "cope", "sandwich": "sandwich", "dpb": "dpb", "pope": "pope"}

_registry: dict = {}
_BASE = ("Bias", "LinearBias", "PositionalScheme", "TableBias")


def register(cls):
    module = cls.__module__.rpartition(".")[2]
    assert SCHEMES.get(cls.name) == module, f"add {cls.name!r}: {module!r} to lenx.positional.SCHEMES"
    assert cls.name not in _registry, cls.name
    _registry[cls.name] = cls
    return cls


def registry() -> dict:
    """Scheme name -> class, in SCHEMES order."""
    return {name: get_scheme(name) for name in SCHEMES}


def get_scheme(name: str):
    """The class of a scheme, its module imported (and so registered) on first use."""
    if name not in SCHEMES:
        from ..errors import LenxError, did_you_mean

        raise LenxError(f"unknown positional scheme '{name}'{did_you_mean(name, SCHEMES)}; known schemes: {', '.join(SCHEMES)}")
    if name not in _registry:
        importlib.import_module(f".{SCHEMES[name]}", __name__)
    return _registry[name]


def build_scheme(config):
    return get_scheme(config.pe)(config)


def __getattr__(name: str):
    if name == "REGISTRY":
        return registry()
    if name in _BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SCHEMES", "REGISTRY", "register", "registry", "get_scheme", "build_scheme", *_BASE]
