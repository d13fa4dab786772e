"""What is evaluated: a subject. `Subject` states what every evaluated model offers; `LenxRun` is a lenx run
directory, `lenx.hf.HFModel` a Hugging Face causal LM (and `lenx.hf.ExportedRun` a `lenx export` directory).
Every cell kind (`lenx.cells`) scores every subject the same way."""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from pathlib import Path

from .config import TRAIN_KEYS, TrainConfig, check_values
from .data import Tokenizer, load_run_tokenizer
from .errors import LenxError
from .ids import config_id, weights_id
from .positional import get_scheme
from .positional.rope import scaling_plan
from .runinfo import quiet_hf


class Subject(ABC):
    """An evaluated model: who it is (the identity columns of its rows) and how it is opened and scored.

    The driver (`lenx.cells.run_cells`) plans the cells of each subject (`plan_lengths`, `scaling_plan`), then
    for each subject in turn calls `open` once (its tokenizer), `check_tokens` on the text to be scored, and for
    each cell `prepare` (the callable to score with, RoPE extension set) and `batch_tokens`."""

    kind: str  # "lenx" (a run directory) or "hf" (a transformers model)
    name: str  # the `run` column
    pe: str  # the positional scheme, as the `pe` column shows it
    seed: int | None
    train_len: int  # its 1x length
    config_id: str  # one experiment: the same for every seed of a configuration
    weights_id: str | None  # a fingerprint of the weights it holds now (None: a hub name's published weights)
    tokenizer_name: str
    run_dir: str  # where it was read from
    default_data: object  # what it is scored on without --dataset (a DataSpec.of argument)
    probes: tuple[str, ...] = ("passkey", "mqar", "repeat")  # the retrieval probes it takes (`lenx.probes`)
    passkey_format: str = "short"  # the passkey wording of `--passkey-format auto` (`lenx.probes.FORMATS`)
    moved_positions: str | None = "rotation"  # how attention-level extensions move its positions (PositionalScheme's)

    def columns(self) -> dict:
        """The identity columns of its rows (attn_backend: the backend that ran, so read after `prepare`)."""
        return {"pe": self.pe, "seed": self.seed, "train_len": self.train_len, "tokenizer": self.tokenizer_name,
                "run_dir": self.run_dir, "attn_backend": self.attn_backend, "config_id": self.config_id,
                "weights_id": self.weights_id}

    def plan_lengths(self, lengths: list[int]) -> list[int]:
        """The evaluation lengths in the order its cells are scored."""
        return lengths

    @abstractmethod
    def scaling_plan(self, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
        """The (RoPE extension, factor) pairs it is evaluated with, refusing those it cannot take."""

    @abstractmethod
    def open(self, device: str, attn_backend: str | None = None) -> Tokenizer:
        """Load it onto `device` (or ready it to be loaded); its tokenizer."""

    @abstractmethod
    def check_tokens(self, stream) -> None:
        """Refuse text whose token ids it has no embedding for."""

    @abstractmethod
    def prepare(self, scaling: str, factor: float | None):
        """The callable to score with (token ids -> an output with .logits), this RoPE extension set."""

    @property
    @abstractmethod
    def attn_backend(self) -> str | None:
        """The attention implementation that runs (the `attn_backend` column)."""

    @abstractmethod
    def batch_tokens(self, eval_len: int, batch_tokens: int) -> int:
        """Tokens per forward at this length, given the command's budget."""


def find_runs(runs_dir: str | Path = "runs") -> list[Path]:
    """The finished runs under runs_dir; unfinished ones (training, or interrupted) are named on stderr and skipped."""
    root = Path(runs_dir)
    runs, unfinished = [], []
    for run in sorted(p.parent for p in root.glob("*/run.json")):
        try:
            done = json.loads((run / "run.json").read_text()).get("status") == "done"
        except (OSError, ValueError):
            done = False
        (runs if done and (run / "model.safetensors").exists() else unfinished).append(run)
    names = ", ".join(r.name for r in unfinished)
    if not runs:
        raise LenxError(f"no trained runs under {root}/" + (f" (unfinished: {names})" if unfinished else "")
                        + "; train one with `lenx train --pe NAME` (rerun its command to finish one) or name RUN_DIRs")
    if unfinished:
        print(f"note: skipping {len(unfinished)} unfinished run(s) under {root}/: {names} (rerun a run's `lenx train` "
              "command to finish it)", file=sys.stderr)
    return runs


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
        # keys added to lenx since the run was made take their defaults (as ids.identity does); known keys are
        # checked for their types, so an edited file is refused here, not mid-evaluation
        info["config"] = {**TrainConfig().to_dict(), **info["config"]}
        check_values({k: v for k, v in info["config"].items() if k in TRAIN_KEYS}, f"{run_dir}/run.json")
    except FileNotFoundError:
        inside = sorted(p.parent for p in run_dir.glob("*/run.json"))
        if inside:  # `lenx eval runs`: the runs' parent named as a run
            raise LenxError(f"{run_dir} is a directory of lenx runs, not a run; name a run (e.g. {inside[0]}), or, "
                            f"for `lenx eval`, give --runs-dir {run_dir} to evaluate them all") from None
        raise LenxError(f"{run_dir} is not a lenx run (no run.json); train it with `lenx train`") from None
    except LenxError as e:
        raise LenxError(f"{e} (corrupt?); retrain with `lenx train --overwrite`") from None
    except (ValueError, KeyError, TypeError):
        raise LenxError(f"{run_dir}/run.json is corrupt; retrain with `lenx train --overwrite`") from None
    if info.get("status") != "done" or not (run_dir / "model.safetensors").exists():
        raise LenxError(f"{run_dir} has not finished training; rerun its `lenx train` command to resume it")
    return info


def load_model(run_dir: Path, device: str):
    from .model import LenxForCausalLM  # transformers takes seconds to import: only once a model is loaded

    quiet_hf()
    try:
        # safetensors only: a pickle planted beside the weights is never read
        model = LenxForCausalLM.from_pretrained(run_dir, use_safetensors=True)
    except LenxError:
        raise
    except Exception as e:
        raise LenxError(f"cannot load the model in {run_dir} ({type(e).__name__}); retrain it with --overwrite") from None
    return model.to(device).eval()


def run_tokenizer(run_dir: Path, info: dict) -> Tokenizer:
    """The tokenizer the run was trained with, read from its directory."""
    return load_run_tokenizer(run_dir, info["config"]["tokenizer"], (info.get("tokenizer") or {}).get("fingerprint"))


def check_run_matches(run_dir: Path, model, cfg: dict, tok: Tokenizer) -> None:
    """The weights' config.json must agree with run.json and with the run's tokenizer."""
    mc = model.config
    pairs = [("pe", mc.pe, cfg["pe"]), ("train_len", mc.train_len, cfg["train_len"]),
             ("vocab_size", mc.vocab_size, tok.vocab_size)]
    for key, got, want in pairs:
        if got != want:
            raise LenxError(
                f"{run_dir}: config.json has {key}={got} but run.json / its tokenizer expect {want}; "
                "the directory mixes two runs, retrain it with --overwrite"
            )


class LenxRun(Subject):
    """A lenx run directory: its run.json says who it is, its own tokenizer and data, its scheme's extensions."""

    kind = "lenx"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self.info = read_run(self.path)
        self.cfg = cfg = self.info["config"]
        self.name, self.pe, self.seed, self.train_len = self.path.name, cfg["pe"], cfg["seed"], cfg["train_len"]
        self.tokenizer_name, self.run_dir, self.default_data = cfg["tokenizer"], str(self.path), cfg
        self.config_id = config_id(self.info)
        self.weights_id = weights_id(self.path)
        self.passkey_format = cfg.get("passkey_format", "short")  # probed in the wording its mix trained on
        self.moved_positions = get_scheme(self.pe).moved_positions
        self.model = None

    def scaling_plan(self, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
        return scaling_plan(self.pe, scalings, factors)

    def open(self, device: str, attn_backend: str | None = None) -> Tokenizer:
        self.model = load_model(self.path, device)
        tok = run_tokenizer(self.path, self.info)
        check_run_matches(self.path, self.model, self.cfg, tok)
        if attn_backend is not None:
            self.model.set_attention(attn_backend)
        return tok

    def check_tokens(self, stream) -> None:
        pass  # check_run_matches: the run's vocabulary is its tokenizer's

    def prepare(self, scaling: str, factor: float | None):
        self.model.pe.set_eval_scaling(scaling, factor)
        return self.model

    @property
    def attn_backend(self) -> str:
        """The backend that ran: `flex` off CUDA runs the `sdpa` route (attention.py), and is recorded so."""
        backend = self.model.config.attn_backend
        return "sdpa" if backend == "flex" and self.model.device.type != "cuda" else backend

    def batch_tokens(self, eval_len: int, batch_tokens: int) -> int:
        return batch_tokens
