"""The results tables of an evaluation's --out: kept in an SQLite file beside them, appended one cell at a time,
and exported as the tables users read.

    <out>/cells.sqlite            every finished cell's rows, one SQL table per results table (the store)
    <out>/<stem>.csv, .parquet    the tables, rebuilt from the store (`export`)

Appending a cell is one transaction (its rows in every table of its kind replace any earlier rows of that cell),
so its cost does not grow with the table, a killed append leaves the store as it was before it, and several
`lenx eval` processes may write into one --out at once (SQLite's locking; WAL where the file system has it). The
csv / parquet tables are rebuilt under a lock on the directory, from the store as it is then: at the end of every
evaluation, every so often while one runs (`Exporter`), and by any reader that finds them older than the store or
not as it wrote them (`sync`: an edited table is rebuilt from the store, which is what lenx reads). A --out written by an older lenx (tables, no store) is read from its parquet tables and moved into the
store at its first append. A cell kind (`lenx.cells`) names its tables; each row carries its cell's key columns.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from .errors import LenxError
from .io import arrow_table, write_table
from .schema import NUMERIC, check_numeric

STORE = "cells.sqlite"


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
        """The table in `out` (from its store, else from an older lenx's parquet table), or an empty one; older
        tables get this version's columns (missing ones empty)."""
        out = Path(out)
        df = _read_store(out, self.stem) if (out / STORE).exists() else None
        if df is None:
            df = self._read_parquet(out)
        return self._shaped(df)

    def _shaped(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows of any lenx version as this one writes them: its columns (missing ones empty), typed, upgraded."""
        return self.upgrade(_typed(df.reindex(columns=self.columns)))

    def _read_parquet(self, out: Path) -> pd.DataFrame:
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
        return df


def write_cell(out: Path, parts: Iterable[tuple[Table, dict, list[dict]]]) -> None:
    """One cell's rows, (table, cell, rows) for each of its tables, into the store in one transaction: each table's
    earlier rows of the cell are replaced. Tables the store does not hold yet are created (with an older lenx's
    parquet rows, where --out has them)."""
    write_cells(out, [parts])


def write_cells(out: Path, cells: Iterable[Iterable[tuple[Table, dict, list[dict]]]]) -> None:
    """`write_cell` for many cells, in one transaction (a benchmark's or an import's bulk write)."""
    out = Path(out)
    with _connect(out) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            changed = set()
            for parts in cells:
                for table, cell, rows in parts:
                    if table.stem not in changed:
                        _ensure(con, out, table)
                        changed.add(table.stem)
                    gone = con.execute(f"DELETE FROM {_q(table.stem)} WHERE cell = ?", (_cell_id(table.key(cell)),))
                    if gone.rowcount > 0:  # rows replaced: the next export rebuilds the table whole
                        con.execute("UPDATE tables SET deleted = deleted + 1 WHERE stem = ?", (table.stem,))
                    _insert(con, table, [(cell, row) for row in rows])
            con.executemany("UPDATE tables SET version = version + 1 WHERE stem = ?", [(s,) for s in changed])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def export(out: Path, stems: Iterable[str] | None = None, force: bool = False) -> list[str]:
    """Rebuild `<stem>.csv` / `.parquet` from the store (each file atomically, under a lock on the directory) for
    the stems given (default: every table in the store) whose store has changed since they were last rebuilt (all
    of them with `force`); returns the stems rebuilt. Where rows were only added since the last export and its
    files are as it wrote them, the new rows are appended to its parquet table (no re-reading of the store);
    otherwise the table is read whole from the store. Nothing without a store."""
    out = Path(out)
    if not (out / STORE).exists():
        return []
    done = []
    with locked(out):
        with _connect(out) as con:
            known = {r[0]: r[1:] for r in con.execute(
                "SELECT stem, version, exported, columns, files, deleted, exported_rowid, exported_deleted, "
                "exported_columns FROM tables")}
        for stem in (known if stems is None else [s for s in stems if s in known]):
            version, exported, cols, files, deleted, last_rowid, last_deleted, last_cols = known[stem]
            same_files = files == _stamp(out, stem)
            if version == exported and not force and same_files:
                continue  # up to date, and the files are those it wrote (not edited, removed or replaced since)
            # read under the lock: the last export holds every committed cell
            appendable = (not force and same_files and deleted == last_deleted and last_rowid is not None
                          and last_cols == cols)
            table, rowid = _appended(out, stem, json.loads(cols), last_rowid) if appendable else (None, None)
            if table is None:
                df, rowid = _read_store(out, stem, json.loads(cols), with_rowid=True)
                table = _typed(df)
            write_table(table, out / stem)
            with _connect(out) as con:
                con.execute("UPDATE tables SET exported = ?, files = ?, exported_rowid = ?, exported_deleted = ?, "
                            "exported_columns = ? WHERE stem = ?",
                            (version, _stamp(out, stem), rowid, deleted, cols, stem))
            done.append(stem)
    return done


def _appended(out: Path, stem: str, cols: list[str], after: int):
    """(the last export's parquet table with the store's rows after rowid `after` appended, the last rowid), or
    (None, None) where the two do not join (a column's type changed, the file is not readable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        base = pq.read_table(out / f"{stem}.parquet")
    except Exception:
        return None, None
    df, rowid = _read_store(out, stem, cols, with_rowid=True, after=after)
    if rowid is None:
        return base, after
    new = arrow_table(_typed(df))
    if new is None or base.column_names != new.column_names:
        return None, None
    try:
        return pa.concat_tables([base, new], promote_options="permissive").combine_chunks(), rowid
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None, None


def _stamp(out: Path, stem: str) -> str:
    """The exported files as they are now (size and modification time of each; empty where missing)."""
    stamps = {}
    for ext in ("csv", "parquet"):
        try:
            st = (out / f"{stem}.{ext}").stat()
            stamps[ext] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[ext] = None
    return json.dumps(stamps)


def sync(out: Path) -> None:
    """Bring the exported tables up to date with the store (a reader's first step: the evaluation that wrote them
    may have been killed between two exports). A store that cannot be written here (a read-only copy) leaves the
    tables as they are."""
    try:
        export(out)
    except (OSError, sqlite3.Error):
        pass


class Exporter:
    """Rebuilds the exported tables while an evaluation appends cells: after a cell when `period` seconds have
    passed since the last rebuild and the rebuilds have taken at most a tenth of the time since (large tables
    are rebuilt less often, so appending stays cheap), and always at `close`."""

    def __init__(self, out: Path, stems: list[str], period: float = 10.0):
        self.out, self.stems, self.period = Path(out), stems, period
        self.last, self.cost = time.monotonic(), 0.0

    def cell_written(self) -> None:
        now = time.monotonic()
        if now - self.last >= max(self.period, 10 * self.cost):
            self.close()

    def close(self) -> None:
        t0 = time.monotonic()
        export(self.out, self.stems)
        self.last = time.monotonic()
        self.cost = self.last - t0


# ------------------------------------------------------------ the SQLite file


_CONNECTIONS: dict[tuple[int, str], sqlite3.Connection] = {}  # (process, store path) -> its open connection


@contextmanager
def _connect(out: Path):
    """This process's connection to --out's store (autocommit: transactions are explicit). Kept open: opening one
    costs more than an append, and closing the last one checkpoints the WAL."""
    path = Path(out) / STORE
    key = (os.getpid(), str(path.absolute()))  # a forked child opens its own
    con = _CONNECTIONS.get(key)
    if con is None or not path.exists():
        con = _open(path)
        _CONNECTIONS[key] = con
    yield con


def _open(path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path, timeout=600, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise LenxError(f"cannot open {path}: {e}; check the directory is writable, or use another --out") from None
    try:
        con.execute("PRAGMA busy_timeout = 600000")
        if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            con.execute("PRAGMA journal_mode = WAL")  # stays 'delete' where the file system cannot share memory
        con.execute("PRAGMA synchronous = NORMAL")  # a commit survives a killed process; fsync at checkpoints
        con.execute("CREATE TABLE IF NOT EXISTS tables (stem TEXT PRIMARY KEY, columns TEXT NOT NULL, "
                    "version INTEGER NOT NULL DEFAULT 0, exported INTEGER NOT NULL DEFAULT -1, files TEXT, "
                    "deleted INTEGER NOT NULL DEFAULT 0, exported_rowid INTEGER, exported_deleted INTEGER, "
                    "exported_columns TEXT)")
    except sqlite3.DatabaseError as e:
        con.close()
        raise LenxError(f"{path} is not a lenx results store ({e}); move it away and rerun (the csv / parquet "
                        "tables beside it are read again)") from None
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _cell_id(key: tuple) -> str:
    return json.dumps(list(key), default=str)


def _ensure(con, out: Path, table: Table) -> None:
    """The table in the store with every column of `table` (columns a newer lenx adds are appended); an older
    lenx's parquet rows moved in when the store first gets the table."""
    row = con.execute("SELECT columns FROM tables WHERE stem = ?", (table.stem,)).fetchone()
    if row is None:
        cols = ", ".join(_q(c) for c in table.columns)
        con.execute(f"CREATE TABLE {_q(table.stem)} (cell TEXT NOT NULL, {cols})")
        con.execute(f"CREATE INDEX {_q(table.stem + '_cell')} ON {_q(table.stem)} (cell)")
        con.execute("INSERT INTO tables (stem, columns) VALUES (?, ?)", (table.stem, json.dumps(table.columns)))
        old = table._read_parquet(out)
        if len(old):
            _insert(con, table, [(r, r) for r in table._shaped(old).to_dict("records")])
        return
    have = json.loads(row[0])
    new = [c for c in table.columns if c not in have]
    for c in new:
        con.execute(f"ALTER TABLE {_q(table.stem)} ADD COLUMN {_q(c)}")
    if new:
        con.execute("UPDATE tables SET columns = ? WHERE stem = ?", (json.dumps(have + new), table.stem))


def _insert(con, table: Table, rows: list[tuple[dict, dict]]) -> None:
    """(cell, row) pairs: each row's values of the table's columns, keyed by its cell."""
    if not rows:
        return
    cols = ", ".join(_q(c) for c in table.columns)
    marks = ", ".join("?" * (len(table.columns) + 1))
    con.executemany(f"INSERT INTO {_q(table.stem)} (cell, {cols}) VALUES ({marks})",
                    [(_cell_id(table.key(cell)), *(_value(row.get(c)) for c in table.columns)) for cell, row in rows])


def _value(x):
    """A row's value as SQLite stores it: numbers, text or NULL (missing and NaN alike)."""
    if x is None:
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()  # numpy scalars
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, (int, float, str)):
        return x
    if pd.isna(x):
        return None
    return str(x)


def _read_store(out: Path, stem: str, cols: list[str] | None = None, with_rowid: bool = False, after: int = 0):
    """The store's rows of one table (those after rowid `after`), in the order they were written; None where the
    store has no such table. `with_rowid`: (rows, the last rowid read or None)."""
    with _connect(out) as con:
        if cols is None:
            row = con.execute("SELECT columns FROM tables WHERE stem = ?", (stem,)).fetchone()
            if row is None:
                return (None, None) if with_rowid else None
            cols = json.loads(row[0])
        cur = con.execute(f"SELECT rowid, {', '.join(_q(c) for c in cols)} FROM {_q(stem)} WHERE rowid > ? "
                          "ORDER BY rowid", (after,))
        rows = cur.fetchall()
    df = pd.DataFrame.from_records([r[1:] for r in rows], columns=cols)
    return (df, rows[-1][0] if rows else None) if with_rowid else df


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whichever run wrote the rows: numbers numeric (None -> NaN), the rest as they are."""
    for col in NUMERIC:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


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
