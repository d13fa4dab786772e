"""A training mix (`--mix passkey:0.1,mqar:0.05`): a share of every step's training windows are probe documents
(`lenx.probes.documents`), built whole at the training length from the training split, in the wording that
`lenx eval --probe` uses for lenx runs, so that the model is probed in the format it was trained on.

Which rows of a step are probes, and each probe document, are drawn from a generator of (seed, step) alone, as the
text windows are (`lenx.train.get_batch`): a resumed run sees the batches an uninterrupted one would, and every
scheme trained with one seed sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import LenxError

MIXABLE = ("passkey", "mqar", "repeat")


def parse_mix(value, name: str = "--mix") -> dict[str, float]:
    """'passkey:0.1,mqar:0.05' or a mapping {passkey: 0.1} -> {'passkey': 0.1, 'mqar': 0.05}; '' or {} -> {}.
    Shares lie in (0, 1] and add up to at most 1; each probe at most once."""
    if value is None or value == "" or value == {}:
        return {}
    fix = f"e.g. {name} passkey:0.1,mqar:0.05 (shares of the training windows; known: {', '.join(MIXABLE)})"
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            probe, sep, share = part.strip().partition(":")
            if not sep:
                raise LenxError(f"{name} '{part.strip()}' has no share; {fix}")
            items.append((probe.strip(), share.strip()))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise LenxError(f"{name} must be text or a mapping of probe to share, got {type(value).__name__}; {fix}")
    out: dict[str, float] = {}
    for probe, share in items:
        if probe not in MIXABLE:
            raise LenxError(f"{name}: unknown probe '{probe}'; known: {', '.join(MIXABLE)}")
        if probe in out:
            raise LenxError(f"{name} names '{probe}' twice; {fix}")
        try:
            share = float(share)
        except (TypeError, ValueError):
            raise LenxError(f"{name}: the share of '{probe}' must be a number, got '{share}'; {fix}") from None
        if not 0 < share <= 1:
            raise LenxError(f"{name}: the share of '{probe}' must lie in (0, 1], got {share:g}")
        out[probe] = share
    if sum(out.values()) > 1 + 1e-9:
        raise LenxError(f"{name}: the shares add up to {sum(out.values()):g}, more than 1 (all of the windows)")
    return out


def mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in mix.items())


@dataclass
class Mix:
    """What a run's mix builds its documents from: the shares, the run's tokenizer and its training text without
    end-of-document tokens (the probes' haystack)."""

    shares: dict[str, float]
    tok: object
    haystack: np.ndarray
    pools: tuple | None = field(default=None, repr=False)
    passkey_format: str = "short"  # its passkey documents' wording (`lenx.probes.documents.FORMATS`)

    @classmethod
    def of(cls, shares: dict[str, float], tok, stream: np.ndarray, train_len: int,
           passkey_format: str = "short") -> "Mix | None":
        """The mix of a run (None without one), its documents checked to fit the training length."""
        if not shares:
            return None
        from .probes.documents import haystack_stream, token_pools

        mix = cls(shares, tok, haystack_stream(stream, int(tok.eod_id)),
                  token_pools(tok) if "mqar" in shares else None, passkey_format)
        for probe in shares:
            try:
                mix.document(probe, train_len + 1, np.random.default_rng(0))
            except LenxError as e:
                raise LenxError(f"--mix {probe}: {e}; raise --train-len or leave {probe} out of the mix") from None
        return mix

    def document(self, probe: str, length: int, rng) -> np.ndarray:
        from .probes.documents import FORMATS, sample

        return sample(probe, self.tok, self.haystack, length, rng, fmt=FORMATS[self.passkey_format],
                      pools=self.pools).tokens  # the vocabulary split computed once per run, not per document

    def _draws(self, rows: int, seed: int, step: int):
        """The step's generator (not get_batch's stream) and which rows are which probe ('' for text): row r is
        probe k where the step's r-th uniform draw falls in k's share."""
        import torch

        g = torch.Generator().manual_seed(seed * 1_000_003 + step + (1 << 40))
        edges = np.cumsum(list(self.shares.values()))
        names = list(self.shares)
        return g, [names[k] if (k := int(np.searchsorted(edges, x, side="right"))) < len(edges) else ""
                   for x in torch.rand(rows, generator=g).tolist()]

    def apply(self, batch, seed: int, step: int):
        """The global batch of step `step` (a tensor) with its probe rows (so each row is a probe with probability
        the mix's total share), each document drawn from the step's generator after the rows' draws."""
        import torch

        g, kinds = self._draws(len(batch), seed, step)
        out = batch.clone()
        for r, probe in enumerate(kinds):
            if probe:
                out[r] = torch.from_numpy(self.document(probe, batch.shape[1], g))
        return out

    def kinds(self, batch_rows: int, seed: int, step: int) -> list[str]:
        """Which rows of a step are which probe ('' for text), as `apply` draws them: for tests and counts."""
        return self._draws(batch_rows, seed, step)[1]
