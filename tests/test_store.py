"""The results store (lenx/store.py): the tables it gives are those of rewriting a table row by row (the store it
replaced), a killed append leaves it readable, an older lenx's tables are read and moved in, and several writer
processes lose nothing."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from lenx import store
from lenx.perplexity import BY_POSITION, RESULTS, cell_key
from lenx.schema import NUMERIC


def result_row(run: str, eval_len: int, protocol: str = "nonoverlap", ppl: float = 3.0, **kw) -> dict:
    return {"run": run, "pe": run.split("-")[0], "seed": 0, "train_len": 16, "eval_len": eval_len,
            "ratio": eval_len / 16, "protocol": protocol, "stride": eval_len, "rope_scaling": "none",
            "rope_factor": None, "tokens": 64, "windows": 4, "documents": None, "nll": 1.1, "ppl": ppl, "bpb": 1.5,
            "bytes": 64, "seconds": 0.01, "note": "", "dataset": "stdlib", "dataset_fingerprint": "0e12",
            "tokenizer": "byte", "run_dir": f"runs/{run}", "device": "cpu", "attn_backend": "sdpa",
            "lenx_version": "0", "timestamp": "2026-12-03T00:00:00+00:00", "token_budget": 64, "bucket_width": 16,
            "config_id": "012345", "weights_id": "abc", "context_gain": None, "context_gain_tokens": None, **kw}


def bucket_rows(row: dict, n: int = 3) -> list[dict]:
    return [{**{c: row.get(c) for c in BY_POSITION.columns}, "bucket_start": 16 * b, "bucket_end": 16 * (b + 1),
             "tokens": 16, "nll": 1.0 + b} for b in range(n)]


def reference_replace(table: pd.DataFrame, cell: dict, rows: list[dict], key, columns) -> pd.DataFrame:
    """The store lenx had before: the whole table read, the cell's rows filtered out row by row, the new appended."""
    keep = table[[key(r) != key(cell) for _, r in table.iterrows()]] if len(table) else table
    new = pd.DataFrame(rows, columns=columns)
    parts = [t for t in (keep, new) if len(t)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    for col in NUMERIC:
        if col in out:
            out[col] = pd.to_numeric(out[col], errors="coerce")
    return out


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal tables, whatever object/None vs NaN representation each column has."""
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    norm = lambda df: df.astype(object).where(df.notna(), None).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(norm(a), norm(b), check_dtype=False)


def test_appends_and_replacements_give_the_tables_a_whole_rewrite_gives(tmp_path):
    rng = random.Random(0)
    ref = {t.stem: pd.DataFrame(columns=t.columns) for t in (RESULTS, BY_POSITION)}
    for i in range(60):
        run, length = rng.choice(["rope-L16-s0", "alibi-L16-s0", "nope-L16-s0"]), rng.choice([16, 32, 64, 128])
        row = result_row(run, length, rng.choice(["nonoverlap", "sliding"]), ppl=rng.uniform(2, 9),
                         note=rng.choice(["", "a note"]), context_gain=rng.choice([None, 0.01 * i]))
        buckets = bucket_rows(row, rng.randint(0, 3))
        store.write_cell(tmp_path, [(BY_POSITION, row, buckets), (RESULTS, row, [row])])
        ref["results_by_position"] = reference_replace(ref["results_by_position"], row, buckets, cell_key,
                                                       BY_POSITION.columns)
        ref["results"] = reference_replace(ref["results"], row, [row], cell_key, RESULTS.columns)
    assert len(ref["results"]) < 60  # cells were replaced
    for table in (RESULTS, BY_POSITION):
        same(table.read(tmp_path), ref[table.stem])
    assert sorted(store.export(tmp_path)) == ["results", "results_by_position"]
    assert store.export(tmp_path) == []  # up to date: nothing rebuilt
    same(pd.read_parquet(tmp_path / "results.parquet"), ref["results"])
    same(pd.read_parquet(tmp_path / "results_by_position.parquet"), ref["results_by_position"])
    csv = pd.read_csv(tmp_path / "results.csv", dtype={"config_id": str, "weights_id": str,
                                                       "dataset_fingerprint": str})
    assert list(csv["config_id"]) == ["012345"] * len(csv)  # hex ids stay text
    assert csv["ppl"].tolist() == pytest.approx(ref["results"]["ppl"].tolist())


def test_an_export_that_appends_gives_the_table_a_whole_rebuild_gives(tmp_path):
    """After an export, new cells are appended to its parquet table; a replaced cell, an edited or removed file
    rebuilds the table whole; every way gives the same table, types included."""
    def add(i, **kw):
        row = result_row(f"run{i % 3}", 16 * (1 + i), ppl=float(i), **kw)
        store.write_cell(tmp_path, [(BY_POSITION, row, bucket_rows(row)), (RESULTS, row, [row])])

    def whole(stem):
        return getattr(store, "_typed")(getattr(store, "_read_store")(tmp_path, stem))

    for i in range(5):
        add(i, documents=None, attn_route=None)  # columns empty in the first export
    store.export(tmp_path)
    for step in range(3):
        for i in range(5 + 5 * step, 10 + 5 * step):
            add(i, documents=7, attn_route="stored", context_gain=0.5)
        assert sorted(store.export(tmp_path)) == ["results", "results_by_position"]
        for stem in ("results", "results_by_position"):
            same(pd.read_parquet(tmp_path / f"{stem}.parquet"), whole(stem))
    parquet = pd.read_parquet(tmp_path / "results.parquet")
    assert parquet["documents"].tolist() == [None] * 5 + [7.0] * 15 or parquet["documents"].isna().sum() == 5
    add(3, documents=1)  # a replaced cell: rebuilt whole
    store.export(tmp_path)
    same(pd.read_parquet(tmp_path / "results.parquet"), whole("results"))
    assert len(pd.read_csv(tmp_path / "results.csv")) == 20


def test_an_older_lenx_out_is_read_then_moved_into_the_store(tmp_path):
    old = pd.DataFrame([result_row("rope-L16-s0", 16), result_row("rope-L16-s0", 32)])
    old.drop(columns=["context_gain", "context_gain_tokens"]).to_parquet(tmp_path / "results.parquet")
    assert not (tmp_path / store.STORE).exists()
    assert RESULTS.read(tmp_path)["eval_len"].tolist() == [16, 32]
    new = result_row("rope-L16-s0", 32, ppl=5.0)
    store.write_cell(tmp_path, [(RESULTS, new, [new])])
    table = RESULTS.read(tmp_path)
    assert table["eval_len"].tolist() == [16, 32] and table["ppl"].tolist() == [3.0, 5.0]
    (tmp_path / "results.parquet").unlink()  # the store holds them now
    assert RESULTS.read(tmp_path)["ppl"].tolist() == [3.0, 5.0]


WRITER = textwrap.dedent("""
    import sys
    from lenx import store
    from lenx.perplexity import BY_POSITION, RESULTS
    from tests.test_store import bucket_rows, result_row
    out, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(first, last):
        row = result_row(f"run{i % 7}", 16 * (1 + i // 7), ppl=float(i))
        store.write_cell(out, [(BY_POSITION, row, bucket_rows(row)), (RESULTS, row, [row])])
        if i % 50 == 0:
            store.export(out)
    store.export(out)
""")


def writer(out, first, last):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(first), str(last)], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_writers_killed_and_rerun_lose_nothing_and_duplicate_nothing(tmp_path):
    """Four processes append 300 cells (overlapping ranges: the same cells written twice), two of them are killed
    mid-way and rerun: every cell's rows are there once, its buckets whole, and the exported tables hold them all."""
    ranges = [(0, 100), (80, 180), (160, 260), (240, 300)]
    procs = [writer(tmp_path, a, b) for a, b in ranges]
    for p in random.Random(1).sample(procs, 2):
        import time

        time.sleep(random.uniform(0.2, 1.0))
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=300)
    for (a, b), p in zip(ranges, procs):
        if p.returncode != 0:
            assert p.returncode == -signal.SIGKILL, p.stderr.read()
            rerun = writer(tmp_path, a, b)
            assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    results, buckets = RESULTS.read(tmp_path), BY_POSITION.read(tmp_path)
    assert sorted(results["ppl"]) == [float(i) for i in range(300)]
    assert len(buckets) == 3 * 300 and not buckets.duplicated(["run", "eval_len", "bucket_start"]).any()
    exported = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(exported["ppl"]) == [float(i) for i in range(300)]
    assert len(pd.read_csv(tmp_path / "results_by_position.csv")) == 900


def test_a_killed_append_leaves_the_store_readable(tmp_path):
    proc = writer(tmp_path, 0, 100_000)
    while not (tmp_path / store.STORE).exists():
        pass
    import time

    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    results, buckets = RESULTS.read(tmp_path), BY_POSITION.read(tmp_path)
    assert len(results) > 0 and len(buckets) == 3 * len(results)  # no cell half written
    store.export(tmp_path)
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == len(results)


def test_a_file_that_is_no_store_gives_one_line(tmp_path):
    (tmp_path / store.STORE).write_text("not a database " * 100)
    with pytest.raises(Exception) as e:
        RESULTS.read(tmp_path)
    assert "not a lenx results store" in str(e.value) and "move it away" in str(e.value)
