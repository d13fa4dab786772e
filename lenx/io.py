"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; on success fsync it and rename it over `path`.
    The name is unique (process id and 64 random bits) and the caller creates the file, so that an interrupt
    (Ctrl-C, SIGTERM) anywhere in the write finds the path already named and the file removed by `finally`. The
    file gets the usual umask permissions, so shared caches and run directories stay readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        yield tmp
        readable(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and write (then remove) a probe file in it: OSError if that cannot be done."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(*paths: str | os.PathLike) -> None:
    """Give files the usual umask permissions. safetensors' own save creates its files 0600: a shared run
    directory's weights would be readable by their owner alone."""
    mask = umask()
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def arrow_table(df):
    """A pandas table as a pyarrow one, without pandas' metadata (tables appended to one another keep one schema);
    None where a column mixes types (pandas alone writes it, as text)."""
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def write_table(table, stem: str | os.PathLike) -> None:
    """Write a table (pandas, or pyarrow) as `<stem>.csv` and `<stem>.parquet`, each atomically."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    stem = Path(stem)
    if not isinstance(table, pa.Table):
        arrow = arrow_table(table)
        if arrow is None:
            with atomic_path(stem.with_suffix(".csv")) as tmp:
                table.to_csv(tmp, index=False)
            with atomic_path(stem.with_suffix(".parquet")) as tmp:
                table.to_parquet(tmp, index=False)
            return
        table = arrow
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        pyarrow.csv.write_csv(table, tmp)  # 8x pandas' writer on a large table
    with atomic_path(stem.with_suffix(".parquet")) as tmp:
        pyarrow.parquet.write_table(table, tmp)
