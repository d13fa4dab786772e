"""torchrun on CPU (gloo), 2 processes started by the test."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lenx"]
SMALL = ["--train-len", "16", "--layers", "1", "--d-model", "32", "--heads", "2", "--lr", "1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


FAULTY = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          Path(__file__).with_name("one_rank_fault.py")]  # lenx with a fault on rank 1 (LENX_TEST_FAULT)


def run(cmd, cwd, timeout=300, check=True, **env):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def rank_tracebacks(stderr: str) -> list[str]:
    """Tracebacks printed by the workers (torch prefixes their lines with [rankN]:), not torchrun's own."""
    return [line for line in stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]


def lenx1(*args):
    return [sys.executable, "-m", "lenx", *args]


def assert_same_weights(a: Path, b: Path, atol=1e-5):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, text_dataset):
    args = ["train", "--pe", "rope", *SMALL, "--steps", "10", "--batch-size", "4", "--dataset", text_dataset]
    run([*TORCHRUN, *args, "--out", tmp_path / "r2"], tmp_path)
    run(lenx1(*args, "--grad-accum", "2", "--out", tmp_path / "r1"), tmp_path)
    la, lb = pd.read_csv(tmp_path / "r1" / "train_log.csv"), pd.read_csv(tmp_path / "r2" / "train_log.csv")
    assert list(la["step"]) == list(lb["step"]) == [10]
    assert abs(la["loss"].iloc[-1] - lb["loss"].iloc[-1]) < 1e-5
    assert_same_weights(tmp_path / "r1", tmp_path / "r2")
    info = json.loads((tmp_path / "r2" / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 8


def test_two_rank_run_stopped_midway_resumes_on_one_rank(tmp_path, text_dataset):
    args = ["train", "--pe", "alibi", *SMALL, "--steps", "12", "--save-every", "4", "--batch-size", "4",
            "--dataset", text_dataset]
    out = tmp_path / "run"
    proc = subprocess.Popen([str(c) for c in [*TORCHRUN, *args, "--out", out]], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "latest.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, 9)  # the launcher and both ranks
    proc.wait()
    assert (out / "latest.json").exists() and not (out / "model.safetensors").exists()
    run(lenx1(*args, "--grad-accum", "2", "--out", out), tmp_path)  # one process, same global batch
    run(lenx1(*args, "--grad-accum", "2", "--out", tmp_path / "ref"), tmp_path)
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert_same_weights(out, tmp_path / "ref")


def test_two_rank_eval_equals_one_rank_eval(tmp_path, text_dataset):
    run_dir = tmp_path / "run"
    run(lenx1("train", "--pe", "alibi", *SMALL, "--steps", "3", "--batch-size", "4", "--dataset", text_dataset,
              "--out", run_dir), tmp_path)
    args = ["eval", run_dir, "--lengths", "16,32,64", "--tokens", "128", "--protocol", "nonoverlap,sliding",
            "--stride", "8", "--probe", "passkey,repeat", "--probe-trials", "2", "--probe-depths", "0,1"]
    run([*TORCHRUN, *args, "--out", tmp_path / "r2"], tmp_path)
    run(lenx1(*args, "--out", tmp_path / "r1"), tmp_path)
    drop = ["seconds", "timestamp"]
    for name in ("results", "results_by_position", "probes"):
        a = pd.read_parquet(tmp_path / "r1" / f"{name}.parquet").drop(columns=drop, errors="ignore")
        b = pd.read_parquet(tmp_path / "r2" / f"{name}.parquet").drop(columns=drop, errors="ignore")
        key = ["eval_len", "probe", "depth", "distance"] if name == "probes" else ["eval_len", "protocol", "stride"]
        sort = key + (["bucket_start"] if "bucket_start" in a else [])
        a, b = a.sort_values(sort).reset_index(drop=True), b.sort_values(sort).reset_index(drop=True)
        assert len(a) == len(b) and not b.duplicated(sort).any()
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=1e-6)
    assert len(pd.read_csv(tmp_path / "r2" / "results.csv")) == 6
    assert len(pd.read_csv(tmp_path / "r2" / "probes.csv")) == 3 * 2 + 2 + 3 + 4  # depths; repeat's distances


def test_concurrent_writers_killed_and_rerun_end_with_the_serial_table(tmp_path, text_dataset):
    """Three `lenx eval` processes and a two-rank torchrun job score the same 144 cells into one --out at once; one
    process is killed mid-way and rerun. The tables equal a serial run's: no row lost, none duplicated."""
    runs = [tmp_path / pe for pe in ("alibi", "rope")]
    for r in runs:
        run(lenx1("train", "--pe", r.name, *SMALL, "--steps", "2", "--batch-size", "4", "--dataset", text_dataset,
                  "--out", r), tmp_path)
    lengths = ",".join(str(8 * k) for k in range(2, 26))  # 24 lengths x 3 protocols x 2 runs
    args = ["eval", *runs, "--lengths", lengths, "--tokens", "400", "--protocol", "nonoverlap,sliding,truncate"]
    run(lenx1(*args, "--out", tmp_path / "serial"), tmp_path)
    out = tmp_path / "together"
    cmds = [lenx1(*args, "--out", out) for _ in range(3)] + [[*TORCHRUN, *args, "--out", out]]
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    deadline = time.time() + 120
    while not (out / "cells.sqlite").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=600)
    assert procs[1].returncode == -signal.SIGKILL or procs[1].returncode == 0
    assert all(p.returncode == 0 for i, p in enumerate(procs) if i != 1), [p.stderr.read()[-2000:] for p in procs]
    run(lenx1(*args, "--out", out), tmp_path)  # the killed one, rerun
    drop = ["seconds", "timestamp"]
    for name in ("results", "results_by_position"):
        a = pd.read_parquet(tmp_path / "serial" / f"{name}.parquet").drop(columns=drop, errors="ignore")
        b = pd.read_parquet(out / f"{name}.parquet").drop(columns=drop, errors="ignore")
        sort = ["run", "eval_len", "protocol"] + (["bucket_start"] if "bucket_start" in a else [])
        assert not b.duplicated(sort).any(), name
        a, b = a.sort_values(sort).reset_index(drop=True), b.sort_values(sort).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=1e-6)
    assert len(pd.read_csv(out / "results.csv")) == 144


def test_one_rank_out_of_memory_stops_every_rank_with_its_one_line_error(tmp_path, text_dataset):
    """Rank 1 alone runs out of memory at step 4: it prints lenx's line; rank 0, waiting in DDP's all-reduce, stops
    at once (no traceback of the lost connection), naming the process that failed; the checkpoint stays, and the
    same command without the fault resumes from it."""
    out = tmp_path / "run"
    args = ["train", "--pe", "alibi", *SMALL, "--steps", "8", "--save-every", "2", "--batch-size", "4",
            "--dataset", text_dataset, "--out", out]
    proc = run([*FAULTY, *args], tmp_path, timeout=120, check=False, LENX_TEST_FAULT="oom:5")
    err = proc.stderr
    assert proc.returncode != 0
    assert err.count("lenx: error: out of memory at step 4") == 1, err[-3000:]
    assert err.count("lenx: stopped: process 1 of 2 failed (its error is above)") == 1, err[-3000:]
    assert not rank_tracebacks(err), err[-3000:]
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    rerun = run([*TORCHRUN, *args], tmp_path)
    assert "resuming" in rerun.stderr and "at step 4 of 8" in rerun.stderr, rerun.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_sigterm_to_torchrun_stops_every_rank_with_one_resume_message(tmp_path, text_dataset):
    """A scheduler's `kill` of the launcher: torchrun passes SIGTERM to its workers; rank 0 alone says how to
    resume, no worker prints a traceback or leaves a temporary file, and the rerun resumes."""
    out = tmp_path / "run"
    args = ["train", "--pe", "alibi", *SMALL, "--steps", "40", "--save-every", "1", "--batch-size", "4",
            "--dataset", text_dataset, "--out", out]
    proc = subprocess.Popen([str(c) for c in [*TORCHRUN, *args]], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "latest.json").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert err.count("lenx: terminated; finished work is saved, rerun the same command to resume") == 1, err[-3000:]
    assert not rank_tracebacks(err), err[-3000:]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    step = json.loads((out / "latest.json").read_text())["step"]
    rerun = run([*TORCHRUN, *args], tmp_path)
    assert f"from its checkpoint at step {step} of 40" in rerun.stderr, rerun.stderr[-3000:]


def test_eval_cells_are_rank_0s_to_decide(tmp_path, text_dataset):
    """Rank 1 sees --out empty (a disk of its own) while rank 0 holds finished cells: the ranks still work through
    rank 0's list of cells, each once, and the table equals a one-process evaluation's."""
    run_dir = tmp_path / "run"
    run(lenx1("train", "--pe", "alibi", *SMALL, "--steps", "3", "--batch-size", "4", "--dataset", text_dataset,
              "--out", run_dir), tmp_path)
    args = ["eval", run_dir, "--tokens", "128", "--protocol", "nonoverlap,sliding", "--stride", "8"]
    run(lenx1(*args, "--lengths", "16", "--out", tmp_path / "r2"), tmp_path)  # two cells finished
    run(lenx1(*args, "--lengths", "16,32", "--out", tmp_path / "r1"), tmp_path)
    run([*FAULTY, *args, "--lengths", "16,32", "--out", tmp_path / "r2"], tmp_path, timeout=120,
        LENX_TEST_FAULT="empty-out")
    key = ["eval_len", "protocol", "stride"]
    a, b = (pd.read_parquet(tmp_path / out / "results.parquet").drop(columns=["seconds", "timestamp"])
            .sort_values(key).reset_index(drop=True) for out in ("r1", "r2"))
    assert len(b) == 4 and not b.duplicated(key).any()
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=1e-6)


def test_processes_reading_different_text_are_refused(tmp_path, text_dataset):
    """One node's copy of the dataset differs: the job stops before training with one line naming the process,
    instead of training on a mixture of texts."""
    other = tmp_path / "other"
    shutil.copytree(text_dataset, other)
    (other / "doc00.txt").write_text("a different first document " * 20)
    out = tmp_path / "run"
    args = ["train", "--pe", "alibi", *SMALL, "--steps", "4", "--batch-size", "4", "--dataset", text_dataset,
            "--out", out]
    proc = run([*FAULTY, *args], tmp_path, timeout=120, check=False, LENX_TEST_FAULT=f"text:{other}")
    assert proc.returncode != 0
    assert proc.stderr.count("process 1 of 2 reads another training text") == 1, proc.stderr[-3000:]
    assert not rank_tracebacks(proc.stderr) and not out.exists(), proc.stderr[-3000:]

