"""Probe documents: pure functions from (tokenizer, text tokens, length, depth or distance, random generator) to one
window of token ids and the positions of its answer tokens. `lenx eval --probe` scores them (`lenx.probes.cell`);
training can mix them into its batches, calling the same builders with the step's own generator.

Every builder returns a `Document` of exactly `length` tokens of the subject's own tokenizer; token `answer[i]` is
predicted from the window's position `answer[i] - 1`. Everything random is drawn from `rng`: a numpy Generator, a
torch Generator (training's), or an int seed. One call draws a fixed sequence from it, so (seed, arguments) give one
document.

- `passkey`: the subject's own text (the haystack) with a needle stating a random key at a depth of it, then a
  question whose answer is the key (Mohtashami & Jaggi 2023, "Landmark Attention", `epfml/landmark-attention:
  llama/run_test.py`; YaRN's `eval/passkey.py`). `FORMATS`: the wordings.
- `mqar`: multi-query associative recall (Arora et al. 2023, Zoology, `HazyResearch/zoology:
  zoology/data/multiquery_ar.py`): key-value token pairs, then the same keys queried `distance` tokens later, in
  another order; the answers are the values. Keys and values are single tokens of disjoint halves of the vocabulary,
  as in Zoology; the rest of the window is random tokens other than the keys.
- `repeat`: a window of text whose last segment is also written `distance` tokens earlier (its first copy);
  `control` is the same window of plain text, with its own text where the first copy was. The NLL of the second copy without the
  first minus with it is the induction score of Olsson et al. 2022 at that distance.

`haystack_stream(stream, eod_id)`: a split's token stream without its end-of-document tokens (a haystack runs across
documents; a model trained with separators may rightly ignore what lies before one). `sample(name, ...)` draws a
depth or distance and builds one document, for a training mix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ..errors import LenxError

PROBES = ("passkey", "mqar", "repeat")


@dataclass
class Document:
    tokens: np.ndarray  # (length,) int64: the window
    answer: np.ndarray  # (n,) int64 positions of the answer tokens in `tokens`
    key: str = ""  # passkey: the key as its answer reads (digits)
    at: int = 0  # passkey: the needle's first token; mqar: the first pair's key; repeat: the first copy's first token
    distance: int | None = None  # mqar: from each pair to its query block; repeat: from the first copy to the second
    control: np.ndarray | None = None  # repeat: the window without the first copy (other text there)


# ---------------------------------------------------------------------------------------------------
# random draws from a numpy Generator, a torch Generator or a seed


class Draw:
    """The few draws the builders make, from a numpy Generator, a torch Generator (training's per-step one) or an int
    seed (a fresh numpy Generator)."""

    def __init__(self, rng):
        if isinstance(rng, Draw):
            rng = rng.rng
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = np.random.default_rng(int(rng))
        self.rng = rng
        self.numpy = isinstance(rng, np.random.Generator)
        if not self.numpy and type(rng).__module__.split(".")[0] != "torch":
            raise TypeError(f"rng must be a numpy or torch Generator or an int seed, not {type(rng).__name__}")

    def integers(self, low: int, high: int, n: int) -> np.ndarray:
        """n integers uniform in [low, high)."""
        if self.numpy:
            return self.rng.integers(low, high, n, dtype=np.int64)
        import torch

        return torch.randint(low, high, (n,), generator=self.rng).numpy().astype(np.int64)

    def integer(self, low: int, high: int) -> int:
        return int(self.integers(low, high, 1)[0])

    def permutation(self, n: int) -> np.ndarray:
        if self.numpy:
            return self.rng.permutation(n)
        import torch

        return torch.randperm(n, generator=self.rng).numpy().astype(np.int64)

    def uniform(self) -> float:
        """One float uniform in [0, 1)."""
        if self.numpy:
            return float(self.rng.random())
        import torch

        return float(torch.rand(1, generator=self.rng, dtype=torch.float64)[0])

    def choice(self, pool: np.ndarray, n: int) -> np.ndarray:
        """n distinct items of `pool`."""
        return np.asarray(pool)[self.permutation(len(pool))[:n]]


# ---------------------------------------------------------------------------------------------------
# text


def haystack_stream(stream: np.ndarray, eod_id: int) -> np.ndarray:
    """The split's tokens without end-of-document tokens, as int64: documents run into each other."""
    stream = np.asarray(stream)
    return stream[stream != eod_id].astype(np.int64)


def _slice(haystack: np.ndarray, n: int, draw: Draw, what: str) -> np.ndarray:
    """n consecutive haystack tokens at a random offset."""
    if len(haystack) < n:
        raise LenxError(f"the {what} needs {n} tokens of text and the split has {len(haystack)}; use a longer test "
                        "split or lower --max-len")
    start = draw.integer(0, len(haystack) - n + 1)
    return np.asarray(haystack[start:start + n], dtype=np.int64)


def _encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=np.int64) if text else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# passkey

LANDMARK_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I "
                 "will quiz you about the important information there.")
LANDMARK_GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class PasskeyFormat:
    """A passkey prompt: `task`, the haystack with `needle` at its depth, `question`, then `answer` (the key's
    tokens are the answer's tokens after any leading whitespace-only ones, which belong to the prompt). `{key}`
    stands for the key, an integer uniform in [key_min, key_max]. `garbage`: the haystack is this sentence repeated
    (the papers' filler) rather than the split's text."""

    name: str
    needle: str
    question: str
    task: str = ""
    answer: str = " {key}"
    key_min: int = 1
    key_max: int = 50000
    garbage: str | None = None
    # token keys: the key is one token id drawn from these, placed by id wherever {key} stands (not text)
    key_tokens: tuple[int, ...] = ()

    def with_wording(self, needle: str | None = None, question: str | None = None) -> "PasskeyFormat":
        """This format with another needle or question (`--passkey-needle`, `--passkey-question`), named as a
        custom format by a fingerprint of its wording."""
        if needle is None and question is None:
            return self
        new = replace(self, needle=self.needle if needle is None else needle,
                      question=self.question if question is None else question)
        if "{key}" not in new.needle:
            raise LenxError(f"--passkey-needle must contain {{key}} (where the key goes), got '{new.needle}'")
        import hashlib

        text = "\0".join([new.task, new.needle, new.question, new.answer, str(new.garbage), str(new.key_tokens)])
        return replace(new, name=f"{self.name}+{hashlib.sha256(text.encode()).hexdigest()[:8]}")


# Landmark / YaRN: "\n".join([task, garbage_prefix, information_line, garbage_suffix, final_question]), key
# randint(1, 50000), the answer generated after "The pass key is". `short` fits a small model's training length.
FORMATS = {
    "short": PasskeyFormat("short", needle=" The pass key is {key}. ", question=" The pass key is"),
    "landmark": PasskeyFormat("landmark", task=LANDMARK_TASK + "\n",
                              needle="\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                              question="\nWhat is the pass key? The pass key is"),
}
FORMATS["landmark-garbage"] = replace(FORMATS["landmark"], name="landmark-garbage", garbage=LANDMARK_GARBAGE)
# What small byte-level lenx models learn to retrieve within a CPU budget (configs/retrieval.yaml): the key one
# byte of 128-137 (never alone in UTF-8 text, so the needle is the only place it occurs), stated twice in the needle.
# Digit keys of several tokens need copying, which these models did not learn (docs/retrieval.md).
FORMATS["byte-key"] = PasskeyFormat("byte-key", needle=" The pass key is {key}. Remember it. {key} is the pass key. ",
                                    question=" What is the pass key? The pass key is", key_tokens=tuple(range(128, 138)))


def garbage_stream(tok, fmt: PasskeyFormat, length: int) -> np.ndarray:
    """The format's filler sentence repeated (joined by spaces, as Landmark does) to at least `length` tokens."""
    piece = _encode(tok, fmt.garbage + " ")
    if len(piece) == 0:
        raise LenxError("the passkey filler encodes to no tokens")
    return np.tile(piece, length // len(piece) + 2)


def _check_token_keys(tok, fmt: PasskeyFormat) -> None:
    """Token keys are byte values that text never holds alone (UTF-8 continuation bytes): the byte tokenizer's."""
    if fmt.key_tokens and getattr(tok, "vocab_size", None) != 257:
        raise LenxError(f"the '{fmt.name}' passkey wording keys on bytes {fmt.key_tokens[0]}-{fmt.key_tokens[-1]} of "
                        "the byte tokenizer; use --passkey-format short or landmark with this tokenizer")


def _with_key(tok, text: str, key: int, fmt: PasskeyFormat) -> np.ndarray:
    """`text` with {key} as the key: its digits, or (token keys) the key's token id between the encoded pieces."""
    if not fmt.key_tokens:
        return _encode(tok, text.format(key=key))
    pieces = [_encode(tok, piece) for piece in text.split("{key}")]
    out = [pieces[0]]
    for piece in pieces[1:]:
        out += [np.array([key], dtype=np.int64), piece]
    return np.concatenate(out).astype(np.int64)


def _answer_tokens(tok, fmt: PasskeyFormat, key: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer's tokens split into (prompt side: leading whitespace-only tokens, the key's own tokens)."""
    if fmt.key_tokens:  # the answer's text before {key}, then the key's one token
        return _encode(tok, fmt.answer.split("{key}")[0]), np.array([key], dtype=np.int64)
    ids = _encode(tok, fmt.answer.format(key=key))
    lead = 0
    while lead < len(ids) and tok.decode(ids[lead:lead + 1]).strip() == "":
        lead += 1
    if lead == len(ids):
        raise LenxError(f"the passkey answer '{fmt.answer}' encodes to whitespace only; it must contain {{key}}")
    return ids[:lead], ids[lead:]


def passkey_overhead(tok, fmt: PasskeyFormat, key: int | None = None) -> int:
    """Tokens of a passkey window that are not haystack, for the longest key (or `key`)."""
    _check_token_keys(tok, fmt)
    key = (fmt.key_tokens[0] if fmt.key_tokens else fmt.key_max) if key is None else key
    lead, own = _answer_tokens(tok, fmt, key)
    return (len(_encode(tok, fmt.task)) + len(_with_key(tok, fmt.needle, key, fmt)) + len(_encode(tok, fmt.question))
            + len(lead) + len(own))


def passkey(tok, haystack: np.ndarray, length: int, depth: float, rng, fmt: PasskeyFormat = FORMATS["short"]
            ) -> Document:
    """A passkey window of exactly `length` tokens: task, haystack[:cut], needle, haystack[cut:], question, key.
    `haystack`: text tokens (`haystack_stream`, or `garbage_stream` for a format with a filler sentence); a slice of
    it at a random offset fills what the wording leaves. `depth` in [0, 1]: the needle starts after
    round(depth * haystack tokens) of them (0: right after the task, 1: right before the question). The answer is
    the key's own tokens at the window's end. Draws: the key, then the haystack offset."""
    if not 0 <= depth <= 1:
        raise LenxError(f"passkey depth must lie in [0, 1], got {depth}")
    draw = Draw(rng)
    _check_token_keys(tok, fmt)
    key = (fmt.key_tokens[draw.integer(0, len(fmt.key_tokens))] if fmt.key_tokens
           else draw.integer(fmt.key_min, fmt.key_max + 1))
    task = _encode(tok, fmt.task)
    needle = _with_key(tok, fmt.needle, key, fmt)
    question = _encode(tok, fmt.question)
    lead, own = _answer_tokens(tok, fmt, key)
    n_hay = length - len(task) - len(needle) - len(question) - len(lead) - len(own)
    if n_hay < 0:
        raise LenxError(f"a passkey window of {length} tokens cannot hold the '{fmt.name}' wording "
                        f"({length - n_hay} tokens with this key); evaluate longer lengths or use --passkey-format short")
    hay = _slice(haystack, n_hay, draw, "passkey haystack")
    cut = round(depth * n_hay)
    tokens = np.concatenate([task, hay[:cut], needle, hay[cut:], question, lead, own])
    answer = np.arange(length - len(own), length, dtype=np.int64)
    return Document(tokens, answer, key=str(key), at=len(task) + cut)


def first_integer(text: str) -> str | None:
    """The first run of digits in generated text (YaRN's eval/passkey.py: re.search(r'\\d+', response))."""
    m = re.search(r"\d+", text)
    return m.group() if m else None


# ---------------------------------------------------------------------------------------------------
# mqar


@lru_cache(maxsize=8)
def _ordinary(byte_lengths: bytes, eod_id: int) -> np.ndarray:
    lengths = np.frombuffer(byte_lengths, dtype=np.int64)
    ids = np.flatnonzero(lengths > 0)
    return ids[ids != eod_id].astype(np.int64)


def token_pools(tok) -> tuple[np.ndarray, np.ndarray]:
    """Zoology's split of the vocabulary: keys from the first half of the tokenizer's ordinary tokens (those with
    text: no end-of-document or special token), values from the second half."""
    ids = _ordinary(np.ascontiguousarray(tok.byte_lengths, dtype=np.int64).tobytes(), int(tok.eod_id))
    half = len(ids) // 2
    return ids[:half], ids[half:]


def mqar(tok, length: int, distance: int, rng, pairs: int = 8, pools: tuple[np.ndarray, np.ndarray] | None = None
         ) -> Document:
    """An MQAR window of exactly `length` tokens: `pairs` key-value pairs k1 v1 k2 v2 ... at a random offset s,
    and at s + distance the same pairs in a random order; the answers are the values of that second block (each
    predicted from its key). Each query lies distance + 2 (i - j) after its pair (i, j: their places in the two
    blocks): `distance` on average. Elsewhere: tokens drawn uniformly from the pools, never one of the keys.
    `pools`: (keys, values) token ids [default: `token_pools(tok)`]. Draws: keys, values, order, offset, filler."""
    keys_pool, values_pool = token_pools(tok) if pools is None else pools
    span = 2 * pairs
    if pairs < 1 or pairs > min(len(keys_pool), len(values_pool)):
        raise LenxError(f"mqar needs 1 to {min(len(keys_pool), len(values_pool))} pairs with this vocabulary, "
                        f"got {pairs}")
    if distance < span or distance + span > length:
        raise LenxError(f"mqar with {pairs} pairs at distance {distance} needs {span} <= distance <= "
                        f"length - {span} ({length - span})")
    draw = Draw(rng)
    keys = draw.choice(keys_pool, pairs)
    values = draw.choice(values_pool, pairs)
    order = draw.permutation(pairs)
    s = draw.integer(0, length - distance - span + 1)
    others = np.setdiff1d(np.concatenate([keys_pool, values_pool]), keys)
    tokens = others[draw.integers(0, len(others), length)]
    block = np.stack([keys, values], 1).reshape(-1)
    tokens[s:s + span] = block
    tokens[s + distance:s + distance + span] = np.stack([keys[order], values[order]], 1).reshape(-1)
    answer = s + distance + 1 + 2 * np.arange(pairs, dtype=np.int64)
    return Document(tokens.astype(np.int64), answer, at=s, distance=distance)


# ---------------------------------------------------------------------------------------------------
# repeat


def repeat(haystack: np.ndarray, length: int, distance: int, segment: int, rng) -> Document:
    """A repeat window of exactly `length` tokens. `control`: `length` consecutive tokens of text (a haystack slice
    at a random offset); its last `segment` tokens are the segment S. `tokens`: the same window with S written a
    first time over tokens [length - segment - distance, length - distance), i.e. `distance` before its second copy.
    The answers are the second copy's tokens after its first (the first follows the filler, not what preceded the
    first copy), at the same positions in both windows. No tokenizer: the haystack is already the subject's tokens.
    Draws: the offset."""
    if segment < 2:
        raise LenxError(f"the repeat segment must be at least 2 tokens, got {segment}")
    if distance < segment or distance + segment > length:
        raise LenxError(f"repeat with a segment of {segment} at distance {distance} needs {segment} <= distance <= "
                        f"length - {segment} ({length - segment})")
    control = _slice(haystack, length, Draw(rng), "repeat probe")
    tokens = control.copy()
    first = length - segment - distance
    tokens[first:first + segment] = control[length - segment:]
    answer = np.arange(length - segment + 1, length, dtype=np.int64)
    return Document(tokens, answer, at=first, distance=distance, control=control)


# ---------------------------------------------------------------------------------------------------
# for a training mix


def sample(name: str, tok, haystack: np.ndarray, length: int, rng, *, fmt: PasskeyFormat = FORMATS["short"],
           pairs: int = 8, segment: int | None = None, pools: tuple[np.ndarray, np.ndarray] | None = None) -> Document:
    """One document of probe `name` with its depth (passkey: uniform in [0, 1]) or distance (mqar, repeat: uniform
    over those that fit) drawn from `rng` first; then the builder's own draws."""
    draw = Draw(rng)
    if name == "passkey":
        return passkey(tok, haystack, length, draw.uniform(), draw, fmt)
    if name == "mqar":
        return mqar(tok, length, draw.integer(2 * pairs, length - 2 * pairs + 1), draw, pairs, pools)
    if name == "repeat":
        seg = segment or max(2, length // 4)
        return repeat(haystack, length, draw.integer(seg, length - seg + 1), seg, draw)
    raise LenxError(f"unknown probe '{name}'; known: {', '.join(PROBES)}")
