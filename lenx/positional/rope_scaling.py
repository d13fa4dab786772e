"""RoPE extensions applied at evaluation (`lenx eval --rope-scaling`): their names, parameters and frequencies.

A setting is a method name with optional parameters, `yarn:beta_fast=16:beta_slow=2`. Its canonical text
(parameters at their defaults dropped, the others sorted) is what result rows key on, so `yarn` and
`yarn:beta_fast=32` are one cell, and rows written before a method had parameters keep their identity. Each row
also gets the values used, one column per parameter (`columns`), defaults and derived values included.

pi, dynamic-ntk, yarn, llama3 and longrope are computed as transformers' rope types linear, dynamic, yarn, llama3
and longrope compute them (the tests compare the frequencies with `ROPE_INIT_FUNCTIONS`); ntk, which transformers
does not have, by its formula. L is the subject's training length (its original context), s the factor.

The attention-level methods (kind "attention": self-extend, rerope, leaky-rerope, dca, sinks, lambda) leave the
frequencies alone and change which keys a query sees and at which positions (`lenx.extend`). Their window-like
parameters default to fractions of L (`resolve`): the references' own ratio to the pretrained context they were
tuned for, since their absolute defaults (1024, 512, 2048 tokens) assume a context of thousands."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: dict = field(default_factory=dict)  # name -> default (None: derived from s and L, see `summary`)
    static: bool = True  # one factor per evaluation, by default eval_len / L; dynamic-ntk derives its own per window
    hf_type: str | None = None  # transformers' rope type; None: lenx runs only
    kind: str = "frequency"  # "frequency": RoPE's angles (rope, xpos); "attention": keys seen and their positions
    moves: bool = False  # an attention method that moves positions: needs a scheme that can (`moved_positions`)


METHODS = {m.name: m for m in [
    Method("none", "the model as trained", static=False),
    Method("pi", "position interpolation: theta_k / s (Chen et al. 2023)", {"logn": 0.0}, hf_type="linear"),
    Method("ntk", "NTK-aware: base * s^(d/(d-2)) (bloc97 2023; transformers has no such type: lenx runs only)",
           {"logn": 0.0}),
    Method("dynamic-ntk", "NTK-aware with s = max(1, n / L) per window of length n (transformers' dynamic)",
           {"logn": 0.0}, static=False, hf_type="dynamic"),
    Method("yarn", "NTK-by-parts: theta_k / s for pairs turning fewer than beta_slow times over L, theta_k for "
           "pairs turning more than beta_fast times, a linear ramp between; cos, sin times attention_factor "
           "(default 0.1 ln s + 1) (Peng et al. 2023)",
           {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "logn": 0.0}, hf_type="yarn"),
    Method("llama3", "Llama 3.1's: theta_k / s for wavelengths above L / low_freq_factor, theta_k below "
           "L / high_freq_factor, a blend in L / wavelength between (Meta 2024)",
           {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "logn": 0.0}, hf_type="llama3"),
    Method("longrope", "per-pair factors: theta_k / long_factor[k] on windows longer than L, theta_k / "
           "short_factor[k] otherwise; cos, sin times attention_factor (default sqrt(1 + ln s / ln L)) (Ding et "
           "al. 2024). factors: a JSON file with long_factor and short_factor (d/2 numbers each; a Phi-3 "
           "config.json's rope_scaling is read too); default: long_factor the per-pair factors YaRN gives at s "
           "(beta 32 and 1), short_factor 1",
           {"factors": None, "attention_factor": None, "logn": 0.0}, hf_type="longrope"),
    # attention-level methods (`lenx.extend`). logn=1, on every method but none: queries times
    # max(1, ln(i+1) / ln L) before their rotation (ReRoPE's code; Llama 4's attention temperature tuning)
    Method("self-extend", "exact positions for i - j < window, beyond it grouped ones: query at i//group + window - "
           "window//group, key at j//group (Jin et al. 2024). window default L/4 (1024 of Llama 2's 4096); group "
           "default the smallest that keeps every distance below L at length sL, ceil((sL - window) / (L - window))",
           {"window": None, "group": None, "logn": 0.0}, kind="attention", moves=True),
    Method("rerope", "exact positions for i - j < window, the distance window beyond it (Su 2023); window default "
           "L/8 (512 of 4096); logn on, as in its code", {"window": None, "logn": 1.0},
           static=False, kind="attention", moves=True),
    Method("leaky-rerope", "exact positions for i - j < window, window + (i - j - window)/leak beyond it (Su 2023); "
           "window default L/8, leak 16; logn on, as in its code", {"window": None, "leak": 16.0, "logn": 1.0},
           static=False, kind="attention", moves=True),
    Method("dca", "dual chunk attention: chunks of chunk - local positions; keys at j mod that, queries at their "
           "own offset in the same chunk, offset + chunk length (at most chunk) from the next chunk, and the "
           "largest such position from later ones (An et al. 2024); chunk default 3L/4, local L/8",
           {"chunk": None, "local": None, "logn": 0.0}, static=False, kind="attention", moves=True),
    Method("sinks", "StreamingLLM: each query sees the first sinks keys and the window before it (Xiao et al. "
           "2024); with shift=1 keys sit at their place in that cache, as its pos_shift (schemes that cannot "
           "move positions: 0); sinks 4, window default L - sinks - 1 (the cache of L keys)",
           {"sinks": 4.0, "window": None, "shift": 1.0, "logn": 0.0}, static=False, kind="attention"),
    Method("lambda", "LM-Infinite's Lambda-shaped mask: keys i - j < window, and the first global keys at the "
           "distance cap (Han et al. 2024; schemes that cannot move positions: no cap); global 10, window "
           "default L, cap default window", {"global": 10.0, "window": None, "cap": None, "logn": 0.0},
           static=False, kind="attention"),
]}
FLAGS = ("logn", "shift")  # 0 or 1
COUNTS = ("window", "group", "chunk", "local", "sinks", "global", "cap")  # whole numbers of tokens
ROPE_SCALINGS = tuple(METHODS)
STATIC_SCALINGS = tuple(n for n, m in METHODS.items() if m.static)
# one column per parameter in the result rows: the values used (defaults and derived values included)
# (in the order they were added, so that a table's columns keep their places: logn is the attention methods')
PARAM_COLUMNS = ["rope_" + p for p in dict.fromkeys(p for m in METHODS.values() for p in m.params
                                                    if p != "logn" or m.kind == "attention")]


class ScalingError(ValueError):
    """A --rope-scaling setting that does not parse or check: the message is one line for the user."""


def split(text: str, name_of: str = "RoPE extension") -> tuple[str, dict]:
    """'yarn:beta_fast=16' -> ('yarn', {'beta_fast': 16.0}): the method and the parameters given, checked.
    `name_of`: how the user asked (--rope-scaling, a sweep file's key), for an unknown method's message."""
    from ..errors import did_you_mean

    name, *parts = str(text).strip().split(":")
    method = METHODS.get(name)
    if method is None:
        raise ScalingError(f"unknown {name_of} '{name}'{did_you_mean(name, METHODS)}; known: "
                           f"{', '.join(METHODS)}")
    given = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if key not in method.params:
            known = ", ".join(method.params) or "none"
            raise ScalingError(f"'{text}': {name} has no parameter '{key}'{did_you_mean(key, method.params)}; its "
                               f"parameters: {known}")
        if not eq or not value:
            raise ScalingError(f"'{text}': parameter {key} needs a value, as in {name}:{key}=VALUE")
        if key in given:
            raise ScalingError(f"'{text}': parameter {key} is given twice")
        given[key] = value if key == "factors" else _number(text, key, value, ok_zero=key in FLAGS)
        if key in FLAGS and given[key] not in (0.0, 1.0):
            raise ScalingError(f"'{text}': {key} is 0 (off) or 1 (on), got '{value}'")
        if key in COUNTS and not given[key].is_integer():
            raise ScalingError(f"'{text}': {key} is a number of tokens, a whole number, got '{value}'")
    _check(text, name, {**method.params, **given})
    return name, given


def _number(text: str, key: str, value: str, ok_zero: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0 or (x == 0 and not ok_zero):
        raise ScalingError(f"'{text}': {key} must be a positive number, got '{value}'")
    return x


def _check(text: str, name: str, p: dict) -> None:
    if name == "yarn" and not p["beta_fast"] > p["beta_slow"]:
        raise ScalingError(f"'{text}': beta_fast ({p['beta_fast']:g}) must exceed beta_slow ({p['beta_slow']:g}): "
                           "pairs turning more than beta_fast times keep their frequency, fewer than beta_slow "
                           "are interpolated")
    if name == "llama3" and not p["high_freq_factor"] > p["low_freq_factor"]:
        raise ScalingError(f"'{text}': high_freq_factor ({p['high_freq_factor']:g}) must exceed low_freq_factor "
                           f"({p['low_freq_factor']:g})")
    if name == "longrope" and p["factors"] is not None:
        load_factors(p["factors"], text)
    if name == "leaky-rerope" and p["leak"] < 1:
        raise ScalingError(f"'{text}': leak ({p['leak']:g}) must be at least 1: distances past the window grow at "
                           "1/leak of their true rate")
    if name == "dca" and None not in (p["chunk"], p["local"]) and not p["local"] < p["chunk"]:
        raise ScalingError(f"'{text}': local ({p['local']:g}) must be below chunk ({p['chunk']:g})")


def canonical(text: str, name_of: str = "RoPE extension") -> str:
    """The setting's identity: the method, then its parameters that differ from their defaults, sorted."""
    name, given = split(text, name_of)
    defaults = METHODS[name].params
    kept = sorted((k, v) for k, v in given.items() if v != defaults[k])
    return ":".join([name, *(f"{k}={_fmt(v)}" for k, v in kept)])


def _fmt(v) -> str:
    return v if isinstance(v, str) else (str(int(v)) if float(v).is_integer() else repr(float(v)))


def method_of(text: str) -> str:
    """'yarn:beta_fast=16' -> 'yarn' (the text unchecked: an unknown name comes back as it is)."""
    return str(text or "none").split(":", 1)[0]


def is_static(text: str) -> bool:
    return method_of(text) in STATIC_SCALINGS


def parameters(text: str) -> dict:
    """Every parameter of the setting: given, else its default (None where derived)."""
    name, given = split(text)
    return {**METHODS[name].params, **given}


def is_attention(text: str) -> bool:
    m = METHODS.get(method_of(text))
    return m is not None and m.kind == "attention"


def extends_attention(text: str) -> bool:
    """Whether the setting acts in attention (`lenx.extend`): an attention method, or any with logn on."""
    return is_attention(text) or bool(parameters(text).get("logn"))


def applies(text: str, scheme) -> bool:
    """Whether a scheme (its class) takes the setting: frequency methods the schemes that list them
    (`eval_scalings`: rope, xpos); attention methods that move positions the schemes that can move theirs
    (`moved_positions`); the masks (sinks, lambda) every scheme."""
    m = METHODS.get(method_of(text))
    if m is None or m.kind != "attention":
        return method_of(text) in scheme.eval_scalings
    return not m.moves or scheme.moved_positions is not None


def resolve(text: str, factor: float | None, train_len: int, moves: str | None = "rotation") -> dict:
    """The values an attention method uses at training length L = train_len and factor s (derived ones
    computed), as ints (flags 0/1); `moves`: the scheme's `moved_positions` (None: sinks' shift and lambda's cap
    cannot apply, and are 0 and None)."""
    name, p = method_of(text), dict(parameters(text))
    L, s = int(train_len), 1.0 if factor is None else float(factor)
    if name == "self-extend":
        w = int(p["window"] or max(1, L // 4))
        g = p["group"] or (max(1, math.ceil((s * L - w) / (L - w))) if w < L else 1)
        p.update(window=w, group=int(g))
    elif name in ("rerope", "leaky-rerope"):
        p["window"] = int(p["window"] or max(1, L // 8))
    elif name == "dca":
        chunk, local = int(p["chunk"] or max(2, 3 * L // 4)), int(p["local"] or L // 8)
        if not local < chunk:
            raise ScalingError(f"'{text}': local ({local}) must be below chunk ({chunk}) at training length {L}")
        p.update(chunk=chunk, local=local)
    elif name == "sinks":
        p["sinks"] = int(p["sinks"])
        p.update(window=int(p["window"] or max(1, L - p["sinks"] - 1)), shift=int(p["shift"]) if moves else 0)
    elif name == "lambda":
        p["global"] = int(p["global"])
        p["window"] = int(p["window"] or L)
        p["cap"] = int(p["cap"] or p["window"]) if moves else None
    if "logn" in p:
        p["logn"] = int(p["logn"])
    return p


def load_factors(path: str, text: str = "") -> tuple[list[float], list[float]]:
    """(long_factor, short_factor) from a JSON file: {"long_factor": [...], "short_factor": [...]}, or a
    transformers config.json holding them under rope_scaling or rope_parameters (Phi-3's)."""
    where = f"'{text}': " if text else ""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScalingError(f"{where}longrope factors file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ScalingError(f"{where}longrope factors file {path} is not readable JSON ({e})") from None
    if isinstance(data, dict):
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(data.get(key), dict) and "long_factor" in data[key]:
                data = data[key]
    lists = []
    for key in ("long_factor", "short_factor"):
        xs = data.get(key) if isinstance(data, dict) else None
        if not (isinstance(xs, list) and xs and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                     and math.isfinite(x) and x > 0 for x in xs)):
            raise ScalingError(f"{where}{path} needs {key}: a list of positive numbers, one per rotated pair")
        lists.append([float(x) for x in xs])
    if len(lists[0]) != len(lists[1]):
        raise ScalingError(f"{where}{path}: long_factor has {len(lists[0])} numbers, short_factor {len(lists[1])}")
    return lists[0], lists[1]


# ---------------------------------------------------------------------------------------------------
# frequencies


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> Tensor:
    """theta_k = base^(-2k/d), k = 0 .. d/2 - 1 (float64 for exactness, cast by the caller)."""
    # explicit device: schemes may be built under transformers' meta-device context
    return base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)


def yarn_ramp(d: int, base: float, train_len: int, beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """YaRN's share of interpolation per pair: 0 for pairs turning more than beta_fast times over L, 1 for fewer
    than beta_slow, linear in the pair index between (transformers' truncated bounds)."""
    def pair_turning(turns: float) -> float:  # the pair index k whose wavelength fits `turns` times in L
        return d * math.log(train_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(pair_turning(beta_fast)), 0), min(math.ceil(pair_turning(beta_slow)), d - 1)
    high += 1e-3 if high == low else 0  # as transformers: no division by zero
    return ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def default_long_factor(d: int, base: float, s: float, train_len: int) -> Tensor:
    """longrope's default long factors: theta_k / factor_k equals YaRN's frequencies at s (beta 32 and 1)."""
    ramp = yarn_ramp(d, base, train_len)
    return 1 / (ramp / s + (1 - ramp))


def attention_factor(text: str, factor: float | None, train_len: int) -> float:
    """The factor on cos and sin: YaRN's 0.1 ln s + 1, longrope's sqrt(1 + ln s / ln L), or the one given."""
    name, p = method_of(text), parameters(text)
    s = 1.0 if factor is None else float(factor)
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    if name == "yarn":
        return 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    if name == "longrope":
        return math.sqrt(1 + math.log(s) / math.log(train_len)) if s > 1 else 1.0
    return 1.0


def frequencies(head_dim: int, base: float, text: str = "none", factor: float | None = None,
                train_len: int | None = None, seq_len: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies (float64) and the factor on cos/sin of a setting, with scale s = factor, for a window of
    seq_len positions (dynamic-ntk and longrope read it)."""
    d, name, p = head_dim, method_of(text), parameters(text)
    theta = rope_inv_freq(d, base)
    s = 1.0 if factor is None else float(factor)
    attn = attention_factor(text, factor, train_len)
    if name == "none" or METHODS[name].kind == "attention":
        return theta, 1.0
    if name == "pi":
        return theta / s, 1.0
    if name == "ntk":
        return rope_inv_freq(d, base * s ** (d / (d - 2))), 1.0
    if name == "dynamic-ntk":
        n = max(seq_len or train_len, train_len)
        return rope_inv_freq(d, base * (s * n / train_len - (s - 1)) ** (d / (d - 2))), 1.0
    if name == "yarn":
        ramp = yarn_ramp(d, base, train_len, p["beta_fast"], p["beta_slow"])
        return theta / s * ramp + theta * (1 - ramp), attn
    if name == "llama3":
        low_wavelen, high_wavelen = train_len / p["low_freq_factor"], train_len / p["high_freq_factor"]
        wavelen = 2 * math.pi / theta
        smooth = ((train_len / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"]))
        blended = (1 - smooth) * theta / s + smooth * theta
        out = torch.where(wavelen > low_wavelen, theta / s, theta)
        return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out), 1.0
    if name == "longrope":
        long, short = longrope_factors(text, d, base, s, train_len)
        return theta / (long if (seq_len or 0) > train_len else short), attn
    raise ValueError(f"unknown RoPE scaling '{text}'")


def longrope_factors(text: str, d: int, base: float, s: float, train_len: int) -> tuple[Tensor, Tensor]:
    """(long, short) factors, d/2 each (float64): the file's, or the default."""
    path = parameters(text)["factors"]
    if path is None:
        return default_long_factor(d, base, s, train_len), torch.ones(d // 2, dtype=torch.float64)
    long, short = load_factors(path, text)
    if len(long) != d // 2:
        raise ScalingError(f"'{text}': {path} has {len(long)} factors per list; this model rotates {d // 2} pairs "
                           f"(head dimension {d})")
    return torch.tensor(long, dtype=torch.float64), torch.tensor(short, dtype=torch.float64)


def columns(text: str | None, factor: float | None, train_len: int | None, moves: str | None = "rotation") -> dict:
    """A row's parameter columns (`PARAM_COLUMNS`): the values the setting used, empty for parameters of other
    methods. `moves`: the scheme's `moved_positions` (attention methods' values depend on it)."""
    out = dict.fromkeys(PARAM_COLUMNS)
    text = text or "none"
    if method_of(text) not in METHODS:
        return out
    values = resolve(text, factor, train_len, moves) if is_attention(text) and train_len else parameters(text)
    for k, v in values.items():
        out["rope_" + k] = v
    if "attention_factor" in METHODS[method_of(text)].params and train_len:
        out["rope_attention_factor"] = attention_factor(text, factor, train_len) if factor is not None else None
    if method_of(text) == "longrope" and out["rope_factors"] is None:
        out["rope_factors"] = "default"
    return out


def hf_parameters(text: str, factor: float | None, train_len: int, head_dim: int, base: float,
                  partial: float = 1.0) -> dict:
    """transformers' rope_parameters (beyond rope_theta) for a setting, with original length L = train_len."""
    name, p = method_of(text), parameters(text)
    out = {"rope_type": METHODS[name].hf_type, "factor": 1.0 if factor is None else float(factor)}
    if name in ("pi", "yarn", "llama3", "longrope"):
        out["original_max_position_embeddings"] = train_len
    if name == "yarn":
        out.update(beta_fast=p["beta_fast"], beta_slow=p["beta_slow"])
    if name == "llama3":
        out.update(low_freq_factor=p["low_freq_factor"], high_freq_factor=p["high_freq_factor"])
    if name in ("yarn", "longrope") and p["attention_factor"] is not None:
        out["attention_factor"] = p["attention_factor"]
    if name == "longrope":
        d = int(head_dim * partial)
        long, short = longrope_factors(text, d, base, out["factor"], train_len)
        out.update(long_factor=long.tolist(), short_factor=short.tolist())
    return out


def help_text(indent: str = "") -> str:
    """Every method with its parameters and defaults, for `lenx schemes rope`: one indented entry each, wrapped at
    78 columns (indented lines are shown as written)."""
    import textwrap

    lines = []
    for m in METHODS.values():
        params = ", ".join(f"{k}={'derived' if v is None else _fmt(v)}" for k, v in m.params.items())
        entry = f"{m.name}{' (' + params + ')' if params else ''}: {m.summary}"
        lines += textwrap.wrap(entry, 78, initial_indent=indent, subsequent_indent=indent + "    ")
    return "\n".join(lines)
