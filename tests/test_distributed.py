"""torchrun on CPU (gloo), 2 processes started by the test."""

import json
import os
import shutil
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


def run(cmd, cwd, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
            "--stride", "8"]
    run([*TORCHRUN, *args, "--out", tmp_path / "r2"], tmp_path)
    run(lenx1(*args, "--out", tmp_path / "r1"), tmp_path)
    key = ["eval_len", "protocol", "stride"]
    drop = ["seconds", "timestamp"]
    for name in ("results", "results_by_position"):
        a = pd.read_parquet(tmp_path / "r1" / f"{name}.parquet").drop(columns=drop, errors="ignore")
        b = pd.read_parquet(tmp_path / "r2" / f"{name}.parquet").drop(columns=drop, errors="ignore")
        sort = key + (["bucket_start"] if "bucket_start" in a else [])
        a, b = a.sort_values(sort).reset_index(drop=True), b.sort_values(sort).reset_index(drop=True)
        assert len(a) == len(b) and not b.duplicated(sort).any()
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=1e-6)
    assert len(pd.read_csv(tmp_path / "r2" / "results.csv")) == 6
