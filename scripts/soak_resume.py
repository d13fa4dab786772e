"""Soak test of bit-exact resume: kill `lenx train` at random moments (SIGKILL), rerun the same command, and compare
every tensor of the finished weights (and the log's losses) with an uninterrupted run of the same command.

    python scripts/soak_resume.py                  # 20 kills of the issue's run (rope, save every 50), 400 steps
    python scripts/soak_resume.py --kills 50 --load 2 --precision fp32 --steps 1500

Each trial is killed --kills-per-trial times (a random delay after its log first appears, then after each rerun
starts) and then run to the end. --control also trains the command a second time uninterrupted: a difference
there is run-to-run nondeterminism, not a resume bug. --load N runs N busy processes beside it, as a machine shared with other work
(where resumes were seen to differ). Prints one line per trial and the count that were identical; exits 1 if any
was not. Uses the environment's thread settings as `lenx train` does (no OMP_NUM_THREADS of its own), so the row
shards of lenx/step.py run as a user's would.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def spin(_) -> None:  # one busy core
    while True:
        pass


def lenx_train(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lenx", "train", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def differences(ref: Path, run: Path) -> list[str]:
    """What differs between two finished runs: tensor names, and 'log' if the logged losses differ."""
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    bad = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    rows = lambda p: [r.split(",")[:3] for r in (p / "train_log.csv").read_text().splitlines()]  # noqa: E731
    return bad + (["log"] if rows(ref) != rows(run) else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="trials (each killed --kills-per-trial times)")
    p.add_argument("--kills-per-trial", type=int, default=1)
    p.add_argument("--pe", default="rope")
    p.add_argument("--steps", type=int, default=400, help="the kills land near step 50-150 whatever the length")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--precision", default="auto")
    p.add_argument("--max-delay", type=float, default=4.0, help="seconds: kills land 0.2 .. this after the log appears")
    p.add_argument("--control", action="store_true", help="a second uninterrupted run, compared too")
    p.add_argument("--load", type=int, default=0, help="busy processes beside the runs")
    p.add_argument("--seed", type=int, default=0, help="of the kill times")
    p.add_argument("--dir", type=Path, default=None, help="where runs go (default: a temporary directory)")
    a = p.parse_args()
    args = ["--pe", a.pe, "--steps", str(a.steps), "--train-len", "64", "--layers", "2", "--d-model", "64",
            "--heads", "4", "--batch-size", "8", "--seed", "1", "--save-every", str(a.save_every),
            "--precision", a.precision]
    rng = random.Random(a.seed)
    root = a.dir or Path(tempfile.mkdtemp(prefix="lenx-soak-"))
    load = mp.Pool(a.load) if a.load else None
    if load:
        load.map_async(spin, range(a.load))
    try:
        ref = root / "ref"
        t0 = time.perf_counter()
        proc = lenx_train(args, ref)
        if proc.wait() != 0:
            print(proc.stderr.read(), file=sys.stderr)
            return 2
        print(f"uninterrupted run: {time.perf_counter() - t0:.1f} s ({' '.join(args)}; load {a.load})", flush=True)
        if a.control:
            proc = lenx_train(args, root / "control")
            if proc.wait() != 0:
                print(proc.stderr.read(), file=sys.stderr)
                return 2
            diff = differences(ref, root / "control")
            print("a second uninterrupted run: " + ("identical" if not diff else f"DIFFERENT ({', '.join(diff[:4])})"),
                  flush=True)
        same = 0
        for trial in range(a.kills):
            run = root / f"trial-{trial:03d}"
            kills = []
            for _ in range(a.kills_per_trial):
                proc = lenx_train(args, run)
                while proc.poll() is None and not (run / "train_log.csv").exists():
                    time.sleep(0.01)
                delay = rng.uniform(0.2, a.max_delay)
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append(f"{delay:.2f}s")
                else:
                    kills.append("finished first")
            proc = lenx_train(args, run)
            if proc.wait() != 0:
                print(f"trial {trial}: the rerun failed: {proc.stderr.read().strip()}")
                continue
            diff = differences(ref, run)
            same += not diff
            print(f"trial {trial}: killed at {', '.join(kills)}: "
                  + ("identical" if not diff else f"DIFFERENT ({len(diff)}: {', '.join(diff[:4])})"), flush=True)
        print(f"{same} of {a.kills} resumed runs bit-identical to the uninterrupted one")
        return 0 if same == a.kills else 1
    finally:
        if load:
            load.terminate()


if __name__ == "__main__":
    sys.exit(main())
