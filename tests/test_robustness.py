"""Never lose work, never crash on bad input, never execute a file."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lenx.cli import main
from lenx.positional import REGISTRY

SMALL = ["--train-len", "16", "--batch-size", "4", "--layers", "1", "--d-model", "32", "--heads", "2"]


def lenx(*args) -> int:
    return main([str(a) for a in args])


def run_cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lenx", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, text_dataset):
    args = ["train", "--pe", "alibi", *SMALL, "--steps", "200", "--save-every", "3", "--dataset", text_dataset]
    ref = run_cli(args + ["--out", tmp_path / "ref"], tmp_path)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    run = tmp_path / "killed"
    kill_after = random.Random().randint(1, 10)  # a random checkpoint count to wait for
    proc = run_cli(args + ["--out", run], tmp_path)
    latest = run / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            try:
                if json.loads(latest.read_text())["step"] >= 3 * kill_after:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    time.sleep(random.random() * 0.05)  # land anywhere inside a step
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "model.safetensors").exists()

    resumed = run_cli(args + ["--out", run], tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = (tmp_path / "ref" / "train_log.csv").read_text().splitlines()
    log_b = (run / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in log_a] == [r.split(",")[:3] for r in log_b]  # step, loss, lr


def test_killed_at_every_file_write_then_resumed_is_bit_identical(tmp_path, text_dataset):
    """SIGKILL just before and just after each os.replace of a run (every checkpoint file, the checkpoint's rename,
    the log, latest.json, run.json, the finished weights' files), each followed by a rerun of the same command:
    the weights and the logged losses equal an uninterrupted run's, bit for bit. Two threads (OMP_NUM_THREADS=2),
    so the steps take lenx/step.py's row shards as `lenx train` does by default on a CPU."""
    args = ["train", "--pe", "rope", *SMALL, "--steps", "6", "--save-every", "3", "--dataset", text_dataset]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}

    def lenx_train(out, kill=None):
        cmd = [sys.executable, *( [str(Path(__file__).parent / "kill_at.py")] if kill else ["-m", "lenx"]), *args]
        return subprocess.run([*map(str, cmd), "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, **({"LENX_TEST_KILL": kill} if kill else {})}, timeout=600)

    ref = lenx_train(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["cpu_shards"] == 2
    a = load_file(tmp_path / "ref" / "model.safetensors")
    log = [r.split(",")[:3] for r in (tmp_path / "ref" / "train_log.csv").read_text().splitlines()]
    killed_at = []
    for k in range(1, 40):
        for where in ("before-replace", "after-replace"):
            run = tmp_path / f"{where}-{k}"
            first = lenx_train(run, f"{where}:{k}")
            if first.returncode == 0:  # the run made fewer than k replaces: every write has been covered
                break
            assert first.returncode == -signal.SIGKILL, first.stderr
            killed_at.append((where, k))
            again = lenx_train(run)
            assert again.returncode == 0, (where, k, again.stderr)
            b = load_file(run / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), (where, k)
            assert [r.split(",")[:3] for r in (run / "train_log.csv").read_text().splitlines()] == log, (where, k)
            assert not [p.name for p in run.iterdir() if p.name.startswith(".") or "checkpoint" in p.name], (where, k)
        else:
            continue
        break
    assert len(killed_at) >= 2 * 8  # run.json; at the checkpoint its 5 writes and run.json; the finished run's files


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(tmp_path, text_dataset, capsys):
    out = tmp_path / "run"
    # a sane run that checkpoints at step 2, then continue with an absurd learning rate
    assert lenx("train", "--pe", "rope", *SMALL, "--steps", "4", "--save-every", "2", "--dataset", text_dataset,
                "--out", out) == 0
    capsys.readouterr()
    cfg = tmp_path / "boom.yaml"
    cfg.write_text("lr: 1.0e+30\nwarmup: 0\n")
    out2 = tmp_path / "run2"
    code = lenx("train", "--pe", "rope", *SMALL, "--steps", "30", "--save-every", "1", "--dataset", text_dataset,
                "--config", cfg, "--out", out2)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "at step" in err[0] and "lower --lr" in err[0]
    step = json.loads((out2 / "latest.json").read_text())["step"]
    ckpt = out2 / json.loads((out2 / "latest.json").read_text())["checkpoint"]
    state = load_file(ckpt / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert step >= 1


def test_out_of_memory_in_training_is_one_line_with_the_fix(tmp_path, text_dataset, capsys, monkeypatch):
    from lenx.model import LenxForCausalLM

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    args = ["train", "--pe", "nope", *SMALL, "--steps", "3", "--warmup", "1", "--dataset", text_dataset]
    monkeypatch.setattr(LenxForCausalLM, "forward", oom)
    one_line(capsys, lenx(*args, "--out", tmp_path / "a"), "out of memory at step 0")
    monkeypatch.setattr(LenxForCausalLM, "__init__", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 102800000000 bytes")))
    one_line(capsys, lenx(*args, "--out", tmp_path / "b"), "the model does not fit in memory")


def test_warmup_not_below_steps_is_noted_once(tmp_path, text_dataset, capsys):
    """A schedule whose warm-up outlasts the run never reaches its peak learning rate: a note says so (stderr, one
    line); a run with a proper warm-up and a resumed run print none."""
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "3", "--dataset", text_dataset, "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "note: warmup (80 steps) is not below steps (3)" in " ".join(err.split()) and "--warmup" in err, err
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "3", "--warmup", "2", "--dataset", text_dataset,
                "--out", tmp_path / "b") == 0
    assert "note: warmup" not in capsys.readouterr().err


def test_existing_run_with_other_config_is_refused(tmp_path, text_dataset, capsys):
    out = tmp_path / "run"
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", out) == 0
    code = lenx("train", "--pe", "nope", *SMALL, "--steps", "3", "--dataset", text_dataset, "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "different config (steps)" in err and "--overwrite" in err
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "3", "--dataset", text_dataset, "--out", out,
                "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 3


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path, text_dataset, capsys):
    """`--out runs --overwrite` deleted runs/ and every run in it, to train one run there."""
    runs = tmp_path / "runs"
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", runs / "a") == 0
    (runs / "notes.txt").write_text("mine")
    capsys.readouterr()
    for out in (runs, runs / "notes.txt"):
        code = lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", out,
                    "--overwrite")
        one_line(capsys, code, "is not a lenx run directory (no run.json)")
    assert (runs / "a" / "model.safetensors").exists() and (runs / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty directory is fine to replace
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out",
                tmp_path / "empty", "--overwrite") == 0


def test_a_run_is_never_trained_into_a_directory_holding_other_files(tmp_path, text_dataset, capsys):
    """`--out runs` (or results, or .) trained a run among the files there; a later `--overwrite` of that directory,
    now holding a run.json, deleted them all."""
    runs = tmp_path / "runs"
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", runs / "a") == 0
    (runs / "notes.txt").write_text("mine")
    capsys.readouterr()
    code = lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", runs)
    one_line(capsys, code, f"{runs} is not empty (a, notes.txt) and holds no lenx run (no run.json)")
    assert sorted(p.name for p in runs.iterdir()) == ["a", "notes.txt"]
    one_line(capsys, lenx("train", "--pe", "nope", *SMALL, "--steps", "3", "--dataset", text_dataset, "--out", runs,
                          "--overwrite"), "is not a lenx run directory")
    assert (runs / "a" / "model.safetensors").exists() and (runs / "notes.txt").read_text() == "mine"
    # what a new run writes before its run.json (its tokenizer; a temporary file) is no obstacle to rerunning it
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").write_text("{}")
    (tmp_path / "b" / ".run.json.1.ab.tmp").write_text("")
    assert lenx("train", "--pe", "nope", *SMALL, "--steps", "2", "--dataset", text_dataset, "--out", tmp_path / "b") == 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    out = root / "run"
    assert lenx("train", "--pe", "alibi", *SMALL, "--steps", "2", "--out", out) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_line(capsys, code, needle):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_corrupt_weights_give_one_line(small_run, tmp_path, capsys):
    run = copy_run(small_run, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    one_line(capsys, lenx("eval", run, "--lengths", "16", "--tokens", "16", "--out", tmp_path / "r"), "cannot load")


def interrupted_run(out: Path, text_dataset: Path) -> tuple[list, Path]:
    """A training run killed after its first checkpoint: (its command's arguments, the checkpoint)."""
    args = ["train", "--pe", "nope", *SMALL, "--steps", "400", "--save-every", "2", "--dataset", text_dataset,
            "--out", out]
    proc = run_cli(args, out.parent)
    while proc.poll() is None and not (out / "latest.json").exists():
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    return args, out / json.loads((out / "latest.json").read_text())["checkpoint"]


def test_ctrl_c_says_how_to_resume_and_the_rerun_says_it_resumes(tmp_path, text_dataset):
    out = tmp_path / "run"
    args = ["train", "--pe", "nope", *SMALL, "--steps", "400", "--save-every", "2", "--dataset", text_dataset,
            "--out", out]
    # SIGINT as a terminal's Ctrl-C sends it (a child of a background job would inherit it ignored)
    code = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
           "from lenx.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and not (out / "latest.json").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "rerun the same command to resume" in err, err
    step = json.loads((out / "latest.json").read_text())["step"]
    rerun = run_cli(args, tmp_path)  # the same command: it says where it resumes, first thing
    first = rerun.stderr.readline()
    rerun.kill()
    rerun.communicate()
    assert f"resuming {out} from its checkpoint at step {step} of 400" in first, first


def test_sigterm_ends_like_ctrl_c_and_leaves_no_temporary_files(tmp_path, text_dataset):
    """`kill` (a scheduler's preemption): the same message as Ctrl-C, exit 143, no half-written temporary files
    left beside the run's files; the rerun resumes."""
    out = tmp_path / "run"
    args = ["train", "--pe", "nope", *SMALL, "--steps", "400", "--save-every", "1", "--dataset", text_dataset,
            "--out", out]
    proc = run_cli(args, tmp_path)
    while proc.poll() is None and not (out / "latest.json").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # into the steps that each write a checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err and "rerun the same command to resume" in err, err
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    step = json.loads((out / "latest.json").read_text())["step"]
    rerun = run_cli(args, tmp_path)
    first = rerun.stderr.readline()
    rerun.kill()
    rerun.communicate()
    assert f"resuming {out} from its checkpoint at step {step} of 400" in first, first


def test_weights_get_the_umask_permissions_as_every_other_file(small_run, tmp_path, text_dataset):
    """safetensors creates its files 0600: a shared runs directory's weights were readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    assert oct((small_run / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~mask)
    _, ckpt = interrupted_run(tmp_path / "run", text_dataset)
    assert oct((ckpt / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~mask)


def test_a_finished_run_stopped_before_its_cleanup_drops_its_checkpoints_on_rerun(small_run, tmp_path, capsys):
    run = copy_run(small_run, tmp_path / "run")
    (run / "checkpoint-0000001").mkdir()
    (run / "checkpoint-0000001" / "optimizer.pt").write_bytes(b"x")
    (run / "latest.json").write_text('{"step": 1, "checkpoint": "checkpoint-0000001"}')
    assert lenx("train", "--pe", "alibi", *SMALL, "--steps", "2", "--out", run) == 0
    assert "already trained" in " ".join(capsys.readouterr().err.split())
    assert not (run / "latest.json").exists() and not list(run.glob("checkpoint-*"))


def test_corrupt_checkpoint_gives_one_line(tmp_path, text_dataset, capsys):
    args, ckpt = interrupted_run(tmp_path / "run", text_dataset)
    (ckpt / "optimizer.pt").write_bytes(b"not a checkpoint")
    one_line(capsys, lenx(*args), "corrupt")


def test_checkpoint_state_without_its_keys_gives_one_line(tmp_path, text_dataset, capsys):
    args, ckpt = interrupted_run(tmp_path / "run", text_dataset)
    (ckpt / "state.json").write_text("{}")
    one_line(capsys, lenx(*args), "corrupt")


@pytest.mark.parametrize("text", ["", "garbage\n"])
def test_corrupt_training_log_gives_one_line_on_resume(tmp_path, text_dataset, capsys, text):
    args, _ = interrupted_run(tmp_path / "run", text_dataset)
    (tmp_path / "run" / "train_log.csv").write_text(text)
    one_line(capsys, lenx(*args), "train_log.csv is unreadable")


def test_mismatched_run_directory(small_run, tmp_path, capsys):
    run = copy_run(small_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    info["config"]["train_len"] = 32
    (run / "run.json").write_text(json.dumps(info))
    one_line(capsys, lenx("eval", run, "--lengths", "32", "--tokens", "32", "--out", tmp_path / "r"), "train_len")


@pytest.mark.parametrize("edit, needle", [
    (lambda cfg: cfg.pop("tokenizer"), None),  # a key missing (e.g. a run from before lenx had it): its default
    (lambda cfg: cfg.update(train_len="abc"), "run.json: key 'train_len' must be int, got 'abc'"),
    (lambda cfg: cfg.update(pe=None), "run.json: key 'pe' must be str, got None"),
])
def test_edited_run_json_is_read_with_defaults_or_refused_in_one_line(small_run, tmp_path, capsys, edit, needle):
    run = copy_run(small_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    edit(info["config"])
    (run / "run.json").write_text(json.dumps(info))
    code = lenx("eval", run, "--lengths", "16", "--tokens", "32", "--out", tmp_path / "r")
    if needle is None:
        assert code == 0, capsys.readouterr().err
    else:
        one_line(capsys, code, needle)


def test_dataset_too_short_for_one_window(small_run, tmp_path, capsys):
    code = lenx("eval", small_run, "--lengths", "16,10000000", "--out", tmp_path / "r")
    one_line(capsys, code, "needs")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc " * 10)  # 36 training tokens; a 64-token window needs 66
    code = lenx("train", "--pe", "nope", *SMALL[:1], "64", *SMALL[2:], "--dataset", tiny, "--out", tmp_path / "t")
    one_line(capsys, code, "needs")


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    one_line(capsys, lenx("train", "--pe", "nope", "--dataset", empty, "--out", tmp_path / "x"), "empty")


def test_unwritable_output(small_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line(capsys, lenx("eval", small_run, "--lengths", "16", "--out", blocker / "sub"), "cannot create")
    one_line(capsys, lenx("train", "--pe", "nope", "--out", blocker / "sub"), "cannot write")


class Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_never_executed(small_run, tmp_path, text_dataset, capsys):
    marker = tmp_path / "pwned"
    # 1. a pickle beside the safetensors weights of a finished run
    run = copy_run(small_run, tmp_path / "run")
    (run / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    assert lenx("eval", run, "--lengths", "16", "--tokens", "32", "--out", tmp_path / "r") == 0
    # 2. a pickle as the optimizer state of a checkpoint being resumed
    args, ckpt = interrupted_run(tmp_path / "ckrun", text_dataset)
    torch.save({"optimizer": Payload(marker)}, ckpt / "optimizer.pt")
    assert lenx(*args) == 2
    # 3. a YAML config that asks for a Python object
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"pe: !!python/object/apply:os.system ['touch {marker}']\n")
    assert lenx("train", "--config", cfg) == 2
    assert not marker.exists()


# ---------------------------------------------------------------- property-based: any flags, exit 0 or 2

def exits_cleanly(capsys, code: int) -> None:
    """Exit 0, or 2 with one line on stderr; never a traceback."""
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


ints = st.one_of(st.integers(-3, 3), st.sampled_from([0, -1, 16, 17, 32, 10**9]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-3, 0.0, -1.0]))
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_train_flags_exit_0_or_2(data, tmp_path, text_dataset, capsys):
    args = ["train", "--out", tmp_path / f"r{random.random()}", "--dataset", text_dataset, "--save-every", "1000"]
    args += ["--steps", data.draw(st.integers(-2, 2))]
    args += ["--pe", data.draw(st.one_of(st.sampled_from(list(REGISTRY)), texts))]
    for flag, strat in [("--train-len", st.one_of(st.integers(-4, 24), st.just(10**9))), ("--batch-size", ints),
                        ("--layers", st.integers(-1, 2)), ("--d-model", st.sampled_from([-8, 0, 6, 8, 16, 30])),
                        ("--heads", st.integers(-1, 4)), ("--lr", floats), ("--seed", st.integers(-2, 3)),
                        ("--precision", st.one_of(st.sampled_from(["fp32", "auto"]), texts))]:
        if data.draw(st.booleans()):
            args += [flag, data.draw(strat)]
    exits_cleanly(capsys, lenx(*args))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_eval_flags_exit_0_or_2(data, small_run, tmp_path, capsys):
    args = ["eval", small_run, "--out", tmp_path / "res"]
    if data.draw(st.booleans()):
        args += ["--lengths", data.draw(st.one_of(texts, st.lists(st.integers(-2, 64), min_size=1, max_size=3).map(
            lambda xs: ",".join(map(str, xs)))))]
    if data.draw(st.booleans()):
        args += ["--max-len", data.draw(st.one_of(st.integers(-2, 64), st.just(10**9)))]
    args += ["--tokens", data.draw(st.one_of(st.integers(-2, 64), texts))]
    exits_cleanly(capsys, lenx(*args))


def test_an_interrupt_while_a_checkpoint_is_written_leaves_no_partial_checkpoint(tmp_path, text_dataset,
                                                                                monkeypatch):
    """Ctrl-C between a checkpoint's files (here: as its state.json is written): the directory of the unfinished
    checkpoint is gone, the previous checkpoint is the latest, and no temporary file is left."""
    from lenx import rundir

    write_json = rundir.write_json

    def interrupted_at_step_4(path, obj):
        if Path(path).name == "state.json" and obj["step"] == 4:
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(rundir, "write_json", interrupted_at_step_4)
    out = tmp_path / "run"
    assert lenx("train", "--pe", "alibi", *SMALL, "--steps", "6", "--save-every", "2", "--dataset", text_dataset,
                "--out", out) == 130
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-0000002"]
    assert json.loads((out / "latest.json").read_text())["step"] == 2


@pytest.mark.parametrize("finished", [False, True])
def test_a_save_killed_outright_leaves_nothing_after_the_next_start(tmp_path, text_dataset, monkeypatch, finished):
    """SIGKILL mid-save runs no cleanup and leaves the save's temporary directory: the next `lenx train` of the run
    (resuming it from its last complete checkpoint, or finding it finished) removes it."""
    from lenx import rundir

    out = tmp_path / "run"
    args = ("train", "--pe", "alibi", *SMALL, "--steps", "6", "--save-every", "2", "--dataset", text_dataset,
            "--out", out)
    if not finished:  # stopped after step 2's checkpoint
        def interrupted_at_step_4(path, obj):
            if Path(path).name == "state.json" and obj["step"] == 4:
                raise KeyboardInterrupt
            write_json(path, obj)

        write_json = rundir.write_json
        monkeypatch.setattr(rundir, "write_json", interrupted_at_step_4)
    assert lenx(*args) == (0 if finished else 130)
    monkeypatch.undo()
    killed = out / ".checkpoint-0000004.999999.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half a file")
    assert lenx(*args) == 0
    assert not killed.exists() and json.loads((out / "run.json").read_text())["status"] == "done"
    assert not [p.name for p in out.iterdir() if "checkpoint" in p.name]
