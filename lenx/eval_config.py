"""Evaluation options: EvalConfig's fields are the options of `lenx eval` (its flags), the keyword arguments of
`evaluate()` and, where a field has a key, the keys of a sweep's eval: section. Their checks live beside them:
`check_eval_options` (whatever the run) and `run_lengths` (those that need a run's training length)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import LenxError, did_you_mean
from .options import DEVICE_HELP, file_keys, flag_of, option, options, path_given, positive_int, shown


def _items(value) -> list:
    """A list of values from None (none), one value, or a list; text items split at commas, as `lenx eval`
    takes repeated or comma-separated flags."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [p for x in items for p in (x.replace(" ", "").split(",") if isinstance(x, str) else [x]) if p != ""]


def _comma_list(convert, what: str, one: str):
    """A flag's parser for comma-separated values as typed (typer's one-line usage error otherwise): `convert` each,
    `what` they must be, `one` what at least one of them is."""

    def parse(text: str | None, flag: str) -> list | None:
        import typer

        if text is None:
            return None
        try:
            values = [convert(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise typer.BadParameter(f"expects comma-separated {what}, got '{text}'", param_hint=flag) from None
        if not values:
            raise typer.BadParameter(f"expects at least one {one}", param_hint=flag)
        return values

    return parse


_ints = _comma_list(int, "integers", "length")  # --lengths
_floats = _comma_list(float, "numbers", "number")  # --probe-depths / --probe-distances


def _lengths(value, name: str) -> list[int] | None:
    from .positional.base import is_integer

    lengths = _items(value)
    bad = [n for n in lengths if not (is_integer(n) and n > 0)]
    if bad:
        raise LenxError(f"{name} must be positive integers, got {shown(bad[0])}")
    return lengths or None


def _scalings(value, name: str) -> list[str] | None:
    """Each setting in its canonical text (`lenx.positional.rope_scaling.canonical`), each once."""
    from .positional.rope_scaling import ScalingError, canonical

    try:
        scalings = [canonical(x, name) for x in _items(value)]
    except ScalingError as e:
        raise LenxError(str(e) if str(e).startswith("unknown") else f"{name} {e}") from None
    return list(dict.fromkeys(scalings)) or None


def _factors(value, name: str) -> list[float] | None:
    factors = []
    for x in _items(value):
        try:
            if isinstance(x, bool) or not isinstance(x, (int, float, str)):
                raise ValueError
            factors.append(float(x))
        except ValueError:
            raise LenxError(f"{name} expects numbers, got {shown(x)}") from None
    bad = [f for f in factors if not (math.isfinite(f) and f >= 1)]
    if bad:
        raise LenxError(f"{name} needs finite factors >= 1, got {bad[0]:g}")
    return factors or None


def _protocols(value, name: str) -> list[str]:
    from .windows import PROTOCOLS  # imported when checked: windows needs torch, `lenx eval --help` does not

    protocols = _items(value)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise LenxError(f"unknown protocol {shown(bad[0])}{did_you_mean(bad[0], PROTOCOLS)} in {name}; known: "
                        f"{', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(protocols)) or ["nonoverlap"]


def _buckets(value, name: str) -> int:
    return positive_int(1 if value is None else value, name)


def _numbers(value, name: str) -> list[float]:
    out = []
    for x in _items(value):
        try:
            if isinstance(x, bool) or not isinstance(x, (int, float, str)):
                raise ValueError
            out.append(float(x))
        except ValueError:
            raise LenxError(f"{name} expects numbers, got {shown(x)}") from None
    return out


def _probe_names(value, name: str) -> list[str]:
    from .probes.documents import PROBES

    probes = _items(value)
    bad = [p for p in probes if p not in PROBES]
    if bad:
        raise LenxError(f"unknown probe {shown(bad[0])}{did_you_mean(bad[0], PROBES)} in {name}; known: "
                        f"{', '.join(PROBES)}")
    return list(dict.fromkeys(probes))


def _depths(value, name: str) -> list[float]:
    depths = _numbers(value, name)
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise LenxError(f"{name} must lie in [0, 1] (0: the needle first, 1: right before the question), got {bad[0]:g}")
    return list(dict.fromkeys(depths)) or None


def _multiples(value, name: str) -> list[float] | None:
    multiples = _numbers(value, name)
    bad = [m for m in multiples if not (math.isfinite(m) and m > 0)]
    if bad:
        raise LenxError(f"{name} must be positive multiples of the training length, got {bad[0]:g}")
    return list(dict.fromkeys(multiples)) or None


def _flag_on(default: bool):
    def check(value, name: str) -> bool:
        value = default if value is None else value
        if not isinstance(value, bool):
            raise LenxError(f"{name} must be true or false, got {shown(value)}")
        return value
    return check


def _default(default, check=None):
    """`check` of an option whose None (not set, e.g. a key left out of a sweep's eval: section) is `default`."""
    def run(value, name: str):
        value = default if value is None else value
        return check(value, name) if check else value
    return run


def _seed(value, name: str) -> int:
    from .positional.base import is_integer

    if not (is_integer(value) and value >= 0):
        raise LenxError(f"{name} must be an integer >= 0, got {shown(value)}")
    return value


def _passkey_format(value, name: str) -> str:
    from .probes.documents import FORMATS

    known = ("auto", *FORMATS)
    if value not in known:
        raise LenxError(f"unknown passkey format {shown(value)}{did_you_mean(value, known)} in {name}; known: "
                        f"{', '.join(known)}")
    return value


def _text(value, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise LenxError(f"{name} must be text, got {shown(value)}")
    return value


@dataclass
class EvalConfig:
    max_len: Optional[int] = option(
        None, "Longest evaluation length: 1x, 2x, 4x ... the training length up to it, and itself [default: 16x "
        "train length].", check=positive_int)
    lengths: Optional[List[int]] = option(None, "Comma-separated evaluation lengths (overrides --max-len).",
                                          flag_type=Optional[str], parse=_ints, check=_lengths)
    tokens: Optional[int] = option(None, "Tokens scored at every length, rounded up to a multiple of the longest "
                                   "length [default: max(65536, max length)].", check=positive_int)
    out: Path = option(Path("results"), "Results directory.", key=None)
    runs_dir: Path = option(Path("runs"), "Where to look for runs when none is named.", key=None)
    device: Optional[str] = option(None, DEVICE_HELP, key=None)
    rope_scalings: Optional[List[str]] = option(
        None, "Training-free extension: none; of RoPE's frequencies (rope/xpos runs, HF RoPE models): pi, ntk, "
        "dynamic-ntk, yarn, llama3, longrope; of attention: self-extend, rerope, leaky-rerope, dca (runs whose "
        "scheme moves positions or reads a distance table; HF llama/mistral/qwen2/qwen3), sinks, lambda (every "
        "scheme). Parameters as METHOD:NAME=VALUE[:NAME=VALUE] (yarn: beta_fast 32, beta_slow 1, attention_factor; "
        "llama3: low_freq_factor 1, high_freq_factor 4; longrope: factors FILE.json, attention_factor; self-extend: "
        "window L/4, group; rerope: window L/8, logn 1; leaky-rerope: + leak 16; dca: chunk 3L/4, local L/8; sinks: "
        "sinks 4, window L-sinks-1, shift 1; lambda: global 10, window L, cap; logn 0/1 (log-length query scale) on every method; "
        "L = the training length; `lenx schemes rope` says what each does). Repeat or comma-separate to sweep; "
        "with several, each run is evaluated with those that apply to it (none if no one does) [default: none].",
        flag="--rope-scaling",
        key="rope_scaling", check=_scalings)
    rope_factors: Optional[List[str]] = option(
        None, "Scale factor s >= 1; repeat or comma-separate to sweep [default: eval length / train length; "
        "dynamic-ntk: max(1, window / train length) per window].", flag="--rope-factor", key="rope_factor",
        check=_factors)
    protocols: Optional[List[str]] = option(
        None, "nonoverlap | sliding | truncate; repeat or comma-separate for several [default: nonoverlap].",
        flag="--protocol", check=_protocols)
    stride: Optional[int] = option(None, "Sliding-window stride in tokens [default: half the evaluation length].",
                                   check=positive_int)
    position_buckets: int = option(1, "Position buckets per training length in results_by_position (1: width = "
                                   "training length).", check=_buckets)
    attn_backend: Optional[str] = option(None, "sdpa | blocked | flex | materialized [default: the run's own "
                                         "setting].", key=None)
    dataset: Optional[str] = option(None, "Score on this corpus's test split [default: each run's own dataset]; "
                                    "same forms as `train`.", key=None)
    text_field: Optional[str] = option(None, "Text column, with --dataset / --test-file.", key=None)
    test_file: Optional[str] = option(None, "Score on this file (or directory) instead.", key=None)
    models: Optional[List[str]] = option(
        None, "A Hugging Face causal LM (local directory, or hub name when online) to score with its own tokenizer, "
        "through the same protocols and tables; repeatable. With --model, RUN_DIRS default to none.",
        flag="--model", key=None)
    train_len: Optional[int] = option(None, "1x length of --model [default: its max_position_embeddings / "
                                      "n_positions].", key=None)
    dtype: Optional[str] = option(None, "--model weights: float32 | bfloat16 | float16 [default: float32].",
                                  key=None)
    probes: Optional[List[str]] = option(
        None, "Retrieval probes to run as well, at the same lengths and RoPE extensions: passkey, mqar, repeat; "
        "repeat or comma-separate. They add to perplexity (finished cells are never recomputed, so adding --probe "
        "to an earlier command scores only the probes); rows in probes.csv. HF models take passkey and repeat.",
        flag="--probe", key="probe", check=_probe_names)
    perplexity: bool = option(True, "Score perplexity (results.csv); --no-perplexity with --probe scores only the "
                              "probes.", flag="--perplexity/--no-perplexity", check=_flag_on(True))
    probe_trials: int = option(20, "Windows per probe cell (length x depth or distance).",
                               check=_default(20, positive_int))
    probe_depths: Optional[List[float]] = option(
        None, "Passkey needle depths in [0, 1] of the haystack, comma-separated [default: 0,0.25,0.5,0.75,1].",
        flag_type=Optional[str], parse=_floats, check=_depths)
    probe_distances: Optional[List[float]] = option(
        None, "mqar / repeat distances as multiples of the training length, comma-separated; those that fit a "
        "length are probed [default: 0.5, 1, 2, 4 ... and the longest that fits].", flag_type=Optional[str],
        parse=_floats, check=_multiples)
    probe_pairs: int = option(8, "mqar key-value pairs per window.", check=_default(8, positive_int))
    probe_segment: Optional[int] = option(None, "repeat segment length in tokens [default: training length / 4].",
                                          check=positive_int)
    probe_seed: int = option(0, "Seed of the probe windows (every cell's generator derives from it, the same for "
                             "every model).", check=_default(0, _seed))
    passkey_format: str = option(
        "auto", "Passkey wording: short (' The pass key is {key}. ' ... ' The pass key is'), landmark (Landmark / "
        "YaRN's prompt, haystack of the test text), landmark-garbage (also their filler sentences) or auto "
        "(landmark for HF models, short for lenx runs).", check=_default("auto", _passkey_format))
    passkey_needle: Optional[str] = option(None, "Passkey needle text, with {key} where the key goes [default: "
                                           "the format's].", check=_text)
    passkey_question: Optional[str] = option(None, "Passkey question, the key follows it [default: the "
                                             "format's].", check=_text)

    def data_spec(self):
        """The corpus every subject is scored on (--dataset, or --test-file, with --text-field), or None: each
        run's own."""
        from .data import DataSpec

        for f in ("dataset", "test_file"):
            path_given(getattr(self, f), f"--{f.replace('_', '-')}")
        if self.dataset is None and self.test_file is None:
            if self.text_field is not None:
                raise LenxError("--text-field applies with --dataset or --test-file; give one of them")
            return None
        if self.dataset is not None and self.test_file is not None:
            raise LenxError(f"give either --dataset ({self.dataset}) or --test-file, not both")
        return DataSpec(dataset=self.dataset or "files", text_field=self.text_field or "text",
                        test_file=self.test_file)

    def kwargs(self) -> dict:
        """The keyword arguments of `evaluate()`: every field, the corpus fields as one DataSpec (`dataset`)."""
        out = {f.name: getattr(self, f.name) for f in options(EvalConfig) if f.name not in ("text_field", "test_file")}
        return {**out, "dataset": self.data_spec()}


# How `lenx eval` names each option a sweep's eval: section may set (its flag), keyed as in that section.
EVAL_FLAGS = {key: flag_of(f) for key, f in file_keys(EvalConfig).items()}


def eval_kwargs(section: dict) -> dict:
    """The keyword arguments of `evaluate()` from options keyed as in a sweep's eval: section."""
    return {f.name: section[key] for key, f in file_keys(EvalConfig).items()}


def check_eval_options(opts: dict, names: dict = EVAL_FLAGS, where: str = "") -> dict:
    """The checks of every evaluation option that hold whatever the run: `evaluate` (so `lenx eval`) applies them
    to its arguments and `lenx sweep` to a config's eval: section when it reads the file. `opts`: values keyed as
    EVAL_FLAGS (missing: default), as given (a YAML value may be anything); `names`: how the user set each key;
    `where`: prefix of every error (e.g. the file). Returns the values in the form `evaluate` uses: lists for
    lengths, rope_scaling, rope_factor (floats) and protocols (default nonoverlap, each once), None where not
    given, position_buckets 1 by default, probe a list (maybe empty), the other probe options with their defaults
    where they have one. The checks that need a run's training length are `run_lengths`'."""
    out = {}
    try:
        for key, f in file_keys(EvalConfig).items():
            out[key] = f.metadata["check"](opts.get(key), names[key])
    except LenxError as e:
        raise LenxError(where + str(e)) from None
    if out["rope_factor"] and set(out["rope_scaling"] or ["none"]) == {"none"}:
        raise LenxError(f"{where}{names['rope_factor']} needs {names['rope_scaling']} other than none")
    if out["stride"] is not None and "sliding" not in out["protocols"]:
        raise LenxError(f"{where}{names['stride']} applies to the sliding protocol; add {names['protocols']} sliding "
                        f"(or drop {names['stride']})")
    probes = out["probe"]
    if not out["perplexity"] and not probes:
        raise LenxError(f"{where}nothing to score: perplexity is off ({names['perplexity']}) and no {names['probe']} "
                        f"is given; add {names['probe']} passkey,mqar,repeat (or keep perplexity)")
    needs = {"probe_depths": ("passkey",), "passkey_needle": ("passkey",), "passkey_question": ("passkey",),
             "probe_distances": ("mqar", "repeat"), "probe_segment": ("repeat",)}
    if out["passkey_format"] != "auto":
        needs["passkey_format"] = ("passkey",)
    for key, wanted in needs.items():
        if out[key] is not None and not set(wanted) & set(probes):
            raise LenxError(f"{where}{names[key]} applies to the {' and '.join(wanted)} probe; add {names['probe']} "
                            f"{wanted[0]} (or drop {names[key]})")
    return out


def default_lengths(train_len: int, max_len: int) -> list[int]:
    """1x, 2x, 4x, ... of the training length up to max_len, and max_len itself when it is not on that ladder
    (it was asked for)."""
    lengths, n = [], train_len
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths + ([max_len] if lengths[-1] != max_len else [])


def run_lengths(train_len: int, opts: dict, names: dict = EVAL_FLAGS, where: str = "") -> list[int]:
    """The evaluation lengths of a run with this training length, from options checked by `check_eval_options`:
    `lengths`, else 1x, 2x, 4x ... up to `max_len` (default 16x). Refuses a max_len below the training length and
    a sliding stride longer than a length."""
    from .windows import resolve_stride  # imported when checked: windows needs torch, `lenx eval --help` does not

    max_len = opts["max_len"]
    if max_len is not None and max_len < train_len:
        raise LenxError(f"{where}{names['max_len']} {max_len} is below the training length {train_len}; "
                        f"give {names['max_len']} >= {train_len}")
    lens = opts["lengths"] or default_lengths(train_len, max_len or 16 * train_len)
    for protocol in opts["protocols"]:
        for L in lens:
            resolve_stride(protocol, L, opts["stride"], names["stride"], where)
    return lens

