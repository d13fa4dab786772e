"""A run directory: its state for a config (new, resume or done) and every file `lenx train` keeps in it.

    run.json                     config, provenance and status ("training", then "done")
    tokenizer.json | tokenizer/  the tokenizer the run trains with (none for `byte`)
    train_log.csv                step, loss, lr, tokens_per_s
    checkpoint-NNNNNNN/          model.safetensors, optimizer.pt (optimizer and torch RNG), state.json (step,
                                 Python and NumPy RNG); latest.json names the newest
    model.safetensors, config.json, generation_config.json   the finished run's weights (Hugging Face layout)

A checkpoint is written into a temporary directory and renamed once complete, then `latest.json` is replaced to
point at it: a kill at any moment leaves the last complete checkpoint in place. A finished run keeps its weights,
not its checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .config import TrainConfig
from .data import get_tokenizer, load_run_tokenizer
from .errors import LenxError
from .ids import identity
from .io import atomic_path, check_writable, readable, write_json
from .runinfo import quiet_hf

TRAIN_FIX = "use another --out or pass --overwrite"
LOG_COLUMNS = ["step", "loss", "lr", "tokens_per_s"]


class RunDir:
    """One run's directory; nothing is read or written until a method is called."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------ state

    def foreign_entries(self) -> list[str]:
        """What a directory without run.json holds besides what a new run writes before its run.json (its
        tokenizer) and temporary files of interrupted writes: names, sorted; none for a directory that does not
        exist."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in ("tokenizer.json", "tokenizer")
                      and not (p.name.startswith(".") and p.name.endswith(".tmp")))

    def state(self, cfg: TrainConfig, world: int = 1, fix: str = TRAIN_FIX) -> str:
        """'new', 'resume' or 'done' for `cfg`, changing nothing. Refuses a directory holding a different config;
        `fix` tells the caller's way out."""
        run_json = self.path / "run.json"
        if not run_json.exists():
            stray = self.foreign_entries()
            if stray:  # e.g. --out results, --out runs, --out .: a later --overwrite would delete what else is there
                raise LenxError(f"{self.path} is not empty ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})"
                                " and holds no lenx run (no run.json); a run is trained into a new or empty directory: "
                                + ("use another --out" if fix == TRAIN_FIX else fix))
            return "new"
        try:
            info = json.loads(run_json.read_text())
            old = identity(info["config"], info.get("world_size", 1))
        except (ValueError, KeyError, TypeError):
            raise LenxError(f"{run_json} is corrupt; {fix}") from None
        new = identity(cfg.to_dict(), world)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise LenxError(f"{self.path} holds a run with a different config ({', '.join(diff)}); {fix}")
        if (self.path / "model.safetensors").exists() and info.get("status") == "done":
            return "done"
        return "resume" if (self.path / "latest.json").exists() else "new"

    def created_by_prepare(self, overwrite: bool) -> Path | None:
        """What `prepare` will create: the directory itself when --overwrite replaces it, else its first missing
        ancestor (or itself), None when it exists. A new run whose data turns out bad removes it again."""
        if overwrite and self.path.exists():
            return self.path
        path = self.path.absolute()
        return next((q for q in [*reversed(path.parents), path] if not q.exists()), None)

    def prepare(self, cfg: TrainConfig, overwrite: bool, world: int = 1) -> str:
        """`state`, after --overwrite has removed a previous run, with a new run's directory created and writable."""
        if self.path.exists() and overwrite:
            if not (self.path / "run.json").exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                # e.g. --out runs: deleting it would delete every run in it
                raise LenxError(f"{self.path} is not a lenx run directory (no run.json); --overwrite replaces only a "
                                "run, choose another --out")
            shutil.rmtree(self.path)
        state = self.state(cfg, world)  # refuses another config, and a non-empty directory that is no run
        if (self.path / "run.json").exists():
            return state
        try:
            check_writable(self.path)
        except OSError as e:
            raise LenxError(f"cannot write to {self.path}: {e.strerror}; choose another --out") from None
        return "new"

    # ------------------------------------------------------------ run.json, the tokenizer, the log

    def info(self) -> dict:
        return json.loads((self.path / "run.json").read_text())

    def write_info(self, info: dict) -> None:
        write_json(self.path / "run.json", info)

    def tokenizer(self, name: str, spec, resume: bool, progress: bool):
        """A resumed run's tokenizer as saved here (checked against run.json's fingerprint); a new run's built,
        saved here and read back, so that it trains with exactly what eval will read."""
        if resume:
            saved = self.info().get("tokenizer") or {}
            return load_run_tokenizer(self.path, name, saved.get("fingerprint"))
        get_tokenizer(name, spec, progress).save(self.path)
        return load_run_tokenizer(self.path, name)

    def write_log(self, log: list[dict]) -> None:
        import pandas as pd

        with atomic_path(self.path / "train_log.csv") as tmp:
            pd.DataFrame(log, columns=LOG_COLUMNS).to_csv(tmp, index=False)

    def read_log(self, upto: int) -> list[dict]:
        """The log's rows up to step `upto` (those of the checkpoint resumed from); none without a log."""
        import pandas as pd

        path = self.path / "train_log.csv"
        if not path.exists():
            return []
        try:
            df = pd.read_csv(path)
            return df[df["step"] <= upto].to_dict("records")
        except Exception as e:  # edited or truncated by hand (lenx writes it atomically)
            raise LenxError(f"{path} is unreadable ({type(e).__name__}); delete it (the run resumes without its "
                            "earlier log lines) or pass --overwrite") from None

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, model, opt, step: int, log: list[dict]) -> None:
        """A checkpoint is written into a temporary directory, named before it exists (an interrupt anywhere
        removes it), and renamed once complete: a directory named checkpoint-* is always a whole one."""
        ckpt = self.path / f"checkpoint-{step:07d}"
        tmp = self.path / f".{ckpt.name}.{os.getpid()}.tmp"
        try:
            tmp.mkdir(parents=True)
            save_model(model, str(tmp / "model.safetensors"))
            readable(tmp / "model.safetensors")
            with atomic_path(tmp / "optimizer.pt") as path:
                torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, path)
            write_json(tmp / "state.json",
                       {"step": step, "python_rng": _py_rng_to_json(random.getstate()), "numpy_rng": _np_rng_to_json()})
            if ckpt.exists():
                shutil.rmtree(ckpt)
            os.replace(tmp, ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.write_log(log)
        write_json(self.path / "latest.json", {"step": step, "checkpoint": ckpt.name})
        for old in self.path.glob("checkpoint-*"):
            if old != ckpt:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, model, opt) -> int:
        """Restore model, optimizer and RNG states; returns the step to continue from."""
        try:
            info = json.loads((self.path / "latest.json").read_text())
            ckpt = self.path / info["checkpoint"]
            load_model(model, str(ckpt / "model.safetensors"), strict=True)
            state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            meta = json.loads((ckpt / "state.json").read_text())
            random.setstate(_py_rng_from_json(meta["python_rng"]))
            np.random.set_state(_np_rng_from_json(meta["numpy_rng"]))
            return int(meta["step"])
        except Exception as e:  # any corrupt or partial file: say which, never guess
            raise LenxError(f"checkpoint in {self.path} is unreadable or corrupt ({type(e).__name__}); delete it or "
                            "pass --overwrite") from None

    def drop_partial_saves(self) -> None:
        """Checkpoints and files whose write was killed outright (SIGKILL, power loss: no cleanup ran); never read,
        as only a complete one is renamed into place (`lenx.io.atomic_path`)."""
        for tmp in self.path.glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def drop_checkpoints(self) -> None:
        """A finished run keeps its weights, not its checkpoints (optimizer state: twice the weights again)."""
        for old in self.path.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        (self.path / "latest.json").unlink(missing_ok=True)

    # ------------------------------------------------------------ the finished run

    def finish(self, model, log: list[dict], info: dict) -> None:
        """The finished run: its weights, its whole log, run.json (`info`, status "done"), and no checkpoints."""
        quiet_hf()
        model.save_pretrained(self.path, safe_serialization=True)
        readable(*self.path.glob("*.safetensors"))
        self.write_log(log)
        self.write_info(info)
        self.drop_checkpoints()


def check_run_dir(run_dir: Path, cfg: TrainConfig, world: int = 1, fix: str = TRAIN_FIX) -> str:
    """'new', 'resume' or 'done' for `cfg` in `run_dir`, changing nothing (RunDir.state)."""
    return RunDir(run_dir).state(cfg, world, fix)


def _py_rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(state):
    return (state[0], tuple(state[1]), state[2])


def _np_rng_to_json():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_rng_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])
