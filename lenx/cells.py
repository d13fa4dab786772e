"""Evaluation in three steps, for any kind of cell: plan (which cells are missing from --out), run (score a cell),
write (its rows, atomically: a killed evaluation loses at most the cell in progress, and a rerun resumes).

A cell is one measurement of one subject (`lenx.subject`), e.g. its perplexity at one length under one protocol
(`lenx.perplexity.Perplexity`). A cell kind (`CellKind`) says which cells a subject has, how one is scored and
which tables its rows go to; `run_cells` plans, runs and writes any kind, in one process or sharded under torchrun
(rank r scores cells r, r + world, ...; rank 0 alone plans and writes).

Adding a kind (retrieval probes, say): a `CellKind` subclass naming its table (`lenx.store.Table`: stem, columns,
key) and its `settings`, with `cells` (a subject's cells), `load` (what they are scored on, once per subject) and
`score` (one cell's rows); `run_cells(kind, subjects, out, ...)` does the rest, as it does for perplexity.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import distributed, store
from .attention import backend_taken, recording
from .errors import LenxError
from .positional import rope_scaling
from .progress import progress as make_progress
from .runinfo import provenance
from .store import Table, check_settings
from .subject import Subject


class CellKind(ABC):
    """One kind of evaluation cell. A cell is a dict keyed as the kind's main table (`table.key` reads its
    identity), plus the settings its numbers depend on; it names its RoPE extension (rope_scaling, rope_factor),
    which the subject is prepared with. Its rows get the cell's values, the subject's identity columns, and
    device, lenx_version, timestamp and seconds from the driver; a kind's `score` gives the rest."""

    tables: tuple[Table, ...]  # written in this order for each cell; the last one's row marks the cell finished
    settings: dict[str, str] = {}  # cell values outside its key that change its numbers -> the flag that sets each

    @property
    def table(self) -> Table:
        return self.tables[-1]

    @abstractmethod
    def cells(self, subject: Subject) -> list[dict]:
        """The subject's cells in scoring order, refusing options that do not apply to it."""

    def finished(self, out: Path) -> dict:
        """key -> row of every cell that `out` holds finished."""
        return {self.table.key(r): r for r in self.table.read(out).to_dict("records")}

    def check_finished(self, row, cell: dict, subject: Subject, fix: str) -> None:
        """Refuse a finished cell that this command would compute otherwise: it is never recomputed."""
        check_settings(row, cell, fix, self.settings)
        check_weights(row, subject, fix)

    @abstractmethod
    def load(self, subject: Subject, tok, cell: dict):
        """What the subject's cells are scored on (loaded once per subject; `cell`: the first one to score)."""

    @abstractmethod
    def score(self, subject: Subject, model, data, cell: dict) -> dict[str, list[dict]]:
        """Score one cell with `model` (`subject.prepare`d for it): its rows, by table stem."""

    def describe(self, subject: Subject, cell: dict) -> str:
        """The progress bar's text while the cell is scored."""
        return f"{subject.name} {cell}"


def check_weights(row, subject: Subject, fix: str) -> None:
    """Refuse a finished cell computed from other weights than the subject now holds (retrained since)."""
    recorded = row.get("weights_id")
    if subject.weights_id and isinstance(recorded, str) and recorded != subject.weights_id:
        if subject.weights_id.startswith("hub:"):
            raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} computed from revision "
                            f"{recorded.removeprefix('hub:')[:12]} of the model, and the HF cache now holds "
                            f"{subject.weights_id.removeprefix('hub:')[:12]}; a finished cell is never recomputed: "
                            f"{fix}")
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} computed from other weights than "
                        f"{subject.run_dir} holds now (retrained or saved again since?); a finished cell is never "
                        f"recomputed: {fix}")


# ---------------------------------------------------------------------------------------------------
# plan


def plan(kind: CellKind, subjects: list[Subject]) -> list[tuple[Subject, list[dict]]]:
    """Every subject's cells: every check that needs a subject, made before anything is written."""
    return [(subject, kind.cells(subject)) for subject in subjects]


def missing(kind: CellKind, planned: list[tuple[Subject, list[dict]]], out: Path) -> list[tuple[int, int]]:
    """(subject, cell) indices into `planned` of the cells still to do, each finished one checked against this
    command. Under torchrun rank 0 alone decides, from the tables it writes: another rank's view of --out (a
    node-local disk, a concurrent writer) would give it another list, and the ranks would take turns at
    different cells."""
    done = kind.finished(out)
    todo = []
    for i, (subject, cells) in enumerate(planned):
        for j, cell in enumerate(cells):
            row = done.get(kind.table.key(cell))
            if row is None:
                todo.append((i, j))
            else:
                kind.check_finished(row, cell, subject, f"use another --out than {out}")
    return todo


def make_out(out: str | Path) -> Path:
    out = Path(out)  # made once every option has passed its checks (bad input leaves nothing behind)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(f"cannot create output directory {out}: {e.strerror}; choose another --out") from None
    return out


# ---------------------------------------------------------------------------------------------------
# run


class Scorer:
    """Scores cells one after another, opening each subject (its model, tokenizer and data) when its first cell
    comes; the cells of a subject come together."""

    def __init__(self, kind: CellKind, device: str, attn_backend: str | None):
        self.kind, self.device, self.attn_backend = kind, device, attn_backend
        self.prov = provenance(device)
        self.subject, self.data = None, None

    def __call__(self, subject: Subject, cell: dict) -> dict[str, list[dict]]:
        if subject is not self.subject:
            self.subject = None
            tok = subject.open(self.device, self.attn_backend)
            self.data = self.kind.load(subject, tok, cell)
            self.subject = subject
        model = subject.prepare(cell["rope_scaling"], cell["rope_factor"])
        common = {**cell, **subject.columns(), "device": self.prov["device"],
                  **rope_scaling.columns(cell["rope_scaling"], cell["rope_factor"], subject.train_len,
                                         subject.moved_positions),
                  "lenx_version": self.prov["lenx_version"],
                  "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        t0 = time.perf_counter()
        with recording() as routes:
            tables = self.kind.score(subject, model, self.data, cell)
        seconds = round(time.perf_counter() - t0, 3)
        common.update(attn_backend=backend_taken(routes, common.get("attn_backend")),
                      attn_route="+".join(sorted(routes)) or None)  # what ran, not what was asked for
        return {stem: [{**common, **row, "seconds": seconds} for row in rows] for stem, rows in tables.items()}


def score_on_every_rank(ctx, scorer: Scorer, mine) -> list:
    """Each rank scores its cell (`mine`, or None); every rank gets every rank's rows, or the first error."""
    try:
        result = scorer(*mine) if mine is not None else None
    except LenxError as e:
        if not ctx.active:
            raise
        result = e  # handed to every rank, so none waits forever
    results = distributed.gather(ctx, result)
    for r in results:
        if isinstance(r, LenxError):
            raise r
    return results


# ---------------------------------------------------------------------------------------------------
# write


def write_cell(kind: CellKind, out: Path, cell: dict, rows: dict[str, list[dict]]) -> None:
    """The cell's rows into each of the kind's tables, in one transaction of the store (`lenx.store`): a killed
    write leaves the cell missing from every table, never in one of them only."""
    store.write_cell(out, [(table, cell, rows.get(table.stem, [])) for table in kind.tables])


@contextmanager
def progress_task(bar, show: bool, total: int, completed: int):
    """A task on `bar` (a rich Progress of the caller's, removed at the end), else on a bar of its own."""
    own = bar is None
    with make_progress(disable=not show) if own else nullcontext(bar) as bar:
        task = bar.add_task("eval", total=total, completed=completed)
        yield bar, task
        if not own:
            bar.remove_task(task)


def run_cells(kind: CellKind, subjects: list[Subject], out: str | Path, *, ctx, device: str,
              attn_backend: str | None = None, show: bool = True, bar=None, on_cell=None) -> pd.DataFrame:
    """Plan, run and write the cells of `kind` for every subject; returns the main table. `on_cell(cell)` is called
    after each cell, `bar`: a rich Progress to draw into. The csv / parquet tables are rebuilt from the store as
    cells are written (`store.Exporter`) and once more at the end, however the evaluation ends."""
    planned = plan(kind, subjects)
    out = make_out(out)
    todo = [(planned[i][0], planned[i][1][j])
            for i, j in distributed.from_main(ctx, lambda: missing(kind, planned, out))]
    scorer = Scorer(kind, device, attn_backend)
    total = sum(len(cells) for _, cells in planned)
    exporter = store.Exporter(out, [t.stem for t in kind.tables]) if ctx.main else None
    with progress_task(bar, show and ctx.main, total, total - len(todo)) as (bar, task), _closing(exporter):
        for start in range(0, len(todo), ctx.world):
            batch = todo[start : start + ctx.world]
            mine = batch[ctx.rank] if ctx.rank < len(batch) else None
            if mine is not None:
                bar.update(task, description=kind.describe(*mine))
            for (_, cell), rows in zip(batch, score_on_every_rank(ctx, scorer, mine)):
                if ctx.main:
                    write_cell(kind, out, cell, rows)
                    exporter.cell_written()
                bar.advance(task)
                if on_cell:
                    on_cell(cell)
    return kind.table.read(out)


@contextmanager
def _closing(exporter):
    try:
        yield
    finally:
        if exporter is not None:
            exporter.close()
