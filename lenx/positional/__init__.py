"""Registry of positional schemes. Adding a scheme: one module with a `PositionalScheme`
subclass decorated with `@register`, and one import line below."""

from __future__ import annotations

from .base import Bias, LinearBias, PositionalScheme, TableBias

REGISTRY: dict[str, type[PositionalScheme]] = {}


def register(cls: type[PositionalScheme]) -> type[PositionalScheme]:
    assert cls.name and cls.name not in REGISTRY, cls.name
    REGISTRY[cls.name] = cls
    return cls


def get_scheme(name: str) -> type[PositionalScheme]:
    try:
        return REGISTRY[name]
    except KeyError:
        from ..errors import LenxError

        raise LenxError(f"unknown positional scheme '{name}'; known schemes: {', '.join(REGISTRY)}") from None


def build_scheme(config) -> PositionalScheme:
    return get_scheme(config.pe)(config)


from . import nope, sinusoidal, learned, rope, alibi, xpos, t5, shaw, kerple, fire  # noqa: E402,F401  (registration order = listing order)

__all__ = ["Bias", "LinearBias", "PositionalScheme", "TableBias", "REGISTRY", "register", "get_scheme", "build_scheme"]
