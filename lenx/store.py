"""The results tables of an evaluation's --out: read, and rewritten one cell at a time (atomic, under a lock).

A table is `<stem>.csv` + `<stem>.parquet` (the parquet file is the one read back). A cell kind (`lenx.cells`)
names its tables; each row carries its cell's key columns, so a cell's rows can be found and replaced.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .errors import LenxError
from .io import write_table
from .schema import NUMERIC, check_numeric


@dataclass(frozen=True)
class Table:
    """One results table: its file stem, its columns in order, the identity of a cell (`key`, from a row or a
    cell dict) and the columns every lenx version wrote (`required`: a table without one is another tool's).
    `upgrade`: rows of older lenx versions, as this one writes them."""

    stem: str
    columns: list[str]
    key: Callable[[object], tuple]
    required: list[str]
    upgrade: Callable[[pd.DataFrame], pd.DataFrame] = field(default=lambda df: df)

    def path(self, out: Path) -> Path:
        return Path(out) / f"{self.stem}.parquet"

    def read(self, out: Path) -> pd.DataFrame:
        """The table in `out`, or an empty one; older tables get this version's columns (missing ones empty)."""
        path = self.path(out)
        if not path.exists():
            return pd.DataFrame(columns=self.columns)
        try:
            df = pd.read_parquet(path)
        except Exception:
            raise LenxError(f"{path} is unreadable; move it away and rerun") from None
        missing = [c for c in self.required if c not in df]
        if missing:  # another tool's table, or not a table of this kind
            raise LenxError(f"{path} is not a lenx results table (no column {missing[0]}); move it away or use "
                            "another --out")
        check_numeric(df, path, "move it away or use another --out")
        return self.upgrade(df.reindex(columns=self.columns))

    def replace(self, out: Path, cell: dict, rows: list[dict]) -> pd.DataFrame:
        """Replace the cell's rows by `rows` and write the table (csv + parquet, each atomically). The table is
        read afresh under a lock on its directory, so `lenx eval` processes writing into one --out at once (one
        per GPU) keep each other's rows."""
        with locked(Path(out)):
            table = self.read(out)
            key = self.key(cell)
            keep = table[[self.key(r) != key for _, r in table.iterrows()]] if len(table) else table
            new = pd.DataFrame(rows, columns=self.columns)
            parts = [t for t in (keep, new) if len(t)]
            table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=self.columns)
            for col in NUMERIC:  # one dtype per column, whichever run wrote the rows (None -> NaN)
                if col in table:
                    table[col] = pd.to_numeric(table[col], errors="coerce")
            write_table(table, Path(out) / self.stem)
        return table


@contextmanager
def locked(directory: Path):
    """An exclusive flock on `directory` (POSIX; elsewhere, no lock) while the block runs."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def optional(x, kind):
    """A key column's value as `kind`, None where the row has none."""
    return None if x is None or pd.isna(x) else kind(x)


def check_settings(row, cell: dict, fix: str, settings: dict[str, str]) -> None:
    """Refuse a finished cell (its row) computed with other settings than `cell` asks for: it is never recomputed.
    `settings`: the cell's values outside its key that its numbers depend on -> the flag that sets each. Rows from
    lenx versions that did not record a setting pass."""
    diff = [f"{k} {int(row[k])}, not {cell[k]} ({flag})" for k, flag in settings.items()
            if not pd.isna(row[k]) and int(row[k]) != cell[k]]
    if diff:
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} computed with {'; '.join(diff)}; "
                        f"a finished cell is never recomputed: {fix}")
