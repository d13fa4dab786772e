"""Protocols and scoring: which windows of the test text are fed to the model, which of their targets are scored,
and the NLL of those targets summed per window position (so that a cell's row and its position buckets come from
the same sums). `lenx.perplexity` says what each protocol is for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Tokenizer
from .errors import LenxError

PROTOCOLS = ("nonoverlap", "sliding", "truncate")


@dataclass
class Windows:
    """Windows of eval_len + 1 tokens (inputs 0..L-1, targets 1..L); `first[w]`: targets at window positions
    >= first[w] are scored (position p predicts token p + 1 from tokens 0..p of the window)."""

    tokens: torch.Tensor  # (n, L + 1) int64
    first: torch.Tensor  # (n,) int64
    documents: int | None = None
    note: str = ""


def sliding_windows(stream: np.ndarray, eval_len: int, stride: int, n_tokens: int) -> Windows:
    """Targets 1..n_tokens of the stream, each scored once: the first window scores all its eval_len targets,
    each later window is advanced by `stride` and scores only its new targets (the last one may advance by
    less, to end exactly at target n_tokens). stride == eval_len is the non-overlapping protocol."""
    L = eval_len
    ends = list(range(L, n_tokens + 1, stride))  # end = index of a window's last target
    if ends[-1] != n_tokens:
        ends.append(n_tokens)
    ends = np.asarray(ends)
    starts = ends - L
    idx = starts[:, None] + np.arange(L + 1)[None, :]
    prev_end = np.concatenate([[0], ends[:-1]])
    first = np.where(np.arange(len(ends)) == 0, 0, L - (ends - prev_end))
    return Windows(torch.from_numpy(stream[idx].astype(np.int64)), torch.from_numpy(first.astype(np.int64)))


def truncated_windows(docs, eval_len: int, max_documents: int) -> Windows:
    """Document-truncated (YaRN's eval/perplexity.py): every test document with at least eval_len + 1 tokens
    (its end-of-document token included), cut to its first eval_len + 1 tokens: eval_len inputs, every one of
    the eval_len targets scored. (YaRN feeds the first eval_len tokens and scores eval_len - 1 of them; the one
    extra token makes every protocol score window positions 0..eval_len - 1.) At most `max_documents`, in
    split order."""
    qualified = [d for d in docs if len(d) >= eval_len + 1]
    used = qualified[:max_documents]
    note = ""
    if not qualified:
        note = f"no test document has {eval_len + 1} tokens; nothing to score at this length"
    elif len(used) < len(qualified):
        note = f"{len(qualified)} test documents qualify; the first {len(used)} scored (--tokens)"
    tokens = (
        torch.from_numpy(np.stack([d[: eval_len + 1] for d in used]).astype(np.int64))
        if used else torch.zeros(0, eval_len + 1, dtype=torch.int64)
    )
    return Windows(tokens, torch.zeros(len(used), dtype=torch.int64), documents=len(used), note=note)



def resolve_stride(protocol: str, eval_len: int, stride: int | None, name: str = "--stride",
                   where: str = "") -> int | None:
    """The stride a cell runs with: eval_len for nonoverlap, --stride (default eval_len // 2) for sliding,
    none for truncate. `name`, `where`: as in `lenx.evaluate.check_eval_options`."""
    if protocol == "nonoverlap":
        return eval_len
    if protocol == "truncate":
        return None
    if stride is None:
        return max(1, eval_len // 2)
    if not 1 <= stride <= eval_len:
        raise LenxError(f"{where}{name} {stride} must be between 1 and the evaluation length {eval_len}")
    return stride



# ---------------------------------------------------------------------------------------------------
# Scoring: NLL summed per window position, so the by-position table and the row come from the same sums


@dataclass
class Scores:
    nll: torch.Tensor  # (L,) float64: summed NLL of the scored targets at each window position
    count: torch.Tensor  # (L,) int64: scored targets at each window position
    bytes: int
    # with per_target: each scored target's NLL and window position, in the order of the windows (for windows of
    # one stream, each target once: stream order), so that two cells scoring the same targets pair token by token
    target_nll: torch.Tensor | None = None  # (tokens,) float64
    target_pos: torch.Tensor | None = None  # (tokens,) int64

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def buckets(self, width: int) -> list[dict]:
        """Position buckets [start, end) of `width` positions: tokens and mean NLL (empty buckets left out)."""
        L = len(self.count)
        out = []
        for start in range(0, L, width):
            end = min(start + width, L)
            n = int(self.count[start:end].sum())
            if n:
                out.append({"bucket_start": start, "bucket_end": end, "tokens": n,
                            "nll": float(self.nll[start:end].sum()) / n})
        return out


CE_CHUNK = 1 << 27  # logits per float32 cross-entropy call (512 MiB)


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, first: torch.Tensor | None, batch_tokens: int, device: str,
                  tok: Tokenizer | None = None, per_target: bool = False) -> Scores:
    """Run the model on (n, L + 1) windows; sum the NLL (nats) of the targets at positions >= first[w], and
    (given the tokenizer) the UTF-8 bytes of those targets; `per_target`: keep each target's NLL too."""
    n, L1 = windows.shape
    L = L1 - 1
    first = torch.zeros(n, dtype=torch.int64) if first is None else first
    nll = torch.zeros(L, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.int64)
    n_bytes = 0
    pos = torch.arange(L)
    targets_nll, targets_pos = [], []
    per_batch = max(1, batch_tokens // L)
    for i in range(0, n, per_batch):
        w = windows[i : i + per_batch]
        keep = pos[None, :] >= first[i : i + per_batch, None]  # (b, L)
        logits = model(w[:, :-1].to(device)).logits.flatten(0, 1)
        targets = w[:, 1:].flatten().to(device)
        # float32 cross-entropy in chunks of at most CE_CHUNK logits: a long window of a large vocabulary never
        # needs a second, float32 copy of all its logits (one chunk, i.e. one call, for small ones)
        step = max(1, CE_CHUNK // logits.shape[1])
        losses = torch.cat([F.cross_entropy(logits[j : j + step].float(), targets[j : j + step], reduction="none")
                            for j in range(0, len(logits), step)])
        del logits
        losses = losses.view(w.shape[0], L).cpu().double() * keep
        nll += losses.sum(0)
        count += keep.sum(0)
        if per_target:
            targets_nll.append(losses[keep])
            targets_pos.append(pos.expand(len(w), L)[keep])
        if tok is not None:
            n_bytes += tok.token_bytes(w[:, 1:][keep].numpy())
    if not per_target:
        return Scores(nll, count, n_bytes)
    return Scores(nll, count, n_bytes, torch.cat(targets_nll), torch.cat(targets_pos))
