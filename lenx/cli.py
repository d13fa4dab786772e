"""The `lenx` command line. User mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from .config import TrainConfig
from .eval_config import EvalConfig
from .options import DEVICE_HELP, command_signature, from_flags, option, typer_parameters

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" and "cuda[:N]" print as written
    help="lenx: which positional encoding keeps working past its training length, and by how much.",
)


@dataclass
class TrainRun:
    """Where `lenx train` reads its settings and writes its run: not part of the run's config (nor of its id)."""

    config: Optional[Path] = option(None, "YAML file of settings (flags override it).")
    out: Optional[Path] = option(None, "Run directory [default: runs/<pe>-L<train_len>-s<seed>].")
    overwrite: bool = option(False, "Replace an existing run directory.")
    device: Optional[str] = option(None, DEVICE_HELP)


@dataclass
class SweepRun:
    """The options of `lenx sweep`; what it runs is in its YAML file (`lenx.sweep.SweepSpec`)."""

    config: Path = option(help="Sweep YAML (e.g. configs/quick.yaml).")
    dry_run: bool = option(False, "List what would run and its estimated time; change nothing.")
    device: Optional[str] = option(None, DEVICE_HELP)


def train(**flags) -> None:
    """Train one small causal LM with the given positional scheme."""
    from .config import resolve
    from .train import train as run_train

    run = TrainRun(**from_flags(TrainRun, flags))
    cfg = resolve(str(run.config) if run.config else None, **from_flags(TrainConfig, flags))
    run_dir = run_train(cfg, out=run.out, overwrite=run.overwrite, device=run.device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        typer.echo(f"run saved to {run_dir}")


_run = typer_parameters(TrainRun)  # --config first, then the run's settings, then where it runs
app.command()(command_signature(train, _run[:1], typer_parameters(TrainConfig, given_only=True), _run[1:]))


def eval_(
    run_dirs: Optional[List[Path]] = typer.Argument(None, help="Run directories [default: every run under runs/]."),
    **flags,
) -> None:
    """Perplexity of trained runs (or HF models, --model) at 1x, 2x, ... 16x their training length (each with its
    own tokenizer); with --probe, also retrieval probes (passkey, mqar, repeat) at the same lengths, in probes.csv."""
    from .evaluate import evaluate

    cfg = EvalConfig(**from_flags(EvalConfig, flags))
    table = evaluate(run_dirs or None, **cfg.kwargs())  # evaluate checks the options (check_eval_options)
    if os.environ.get("RANK", "0") == "0":
        if cfg.perplexity:
            typer.echo(f"{len(table)} rows in {cfg.out / 'results.csv'}")
        if cfg.probes:
            from .probes.cell import load_probes

            typer.echo(f"{len(load_probes(cfg.out))} rows in {cfg.out / 'probes.csv'}")


app.command("eval")(command_signature(eval_, typer_parameters(EvalConfig)))


@app.command()
def report(
    results_dir: Path = typer.Argument(Path("results"), help="Directory holding results.csv / results.parquet."),
    out: Optional[Path] = typer.Option(None, help="Where to write the report [default: RESULTS_DIR]."),
) -> None:
    """Write report.md, report.html, figures and results_<timestamp>.json from the results table."""
    from .report import report as make_report

    path = make_report(results_dir, out, echo=True)
    typer.echo(f"report written to {path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished lenx run directory."),
    out: Path = typer.Option(..., "--out", help="Directory to write the Hugging Face model to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out."),
    results: Path = typer.Option(Path("results"), "--results", help="Results directory whose rows for this run go "
                                 "into the model card."),
) -> None:
    """Write RUN_DIR as a self-contained Hugging Face directory (weights, config, tokenizer, model card) that
    AutoModelForCausalLM / AutoTokenizer load after `import lenx`."""
    from .export import export as run_export

    path = run_export(run_dir, out, overwrite=overwrite, results_dir=results)
    typer.echo(f"exported {run_dir} to {path}")


def sweep(**flags) -> None:
    """Schemes x seeds from one config: train what is missing, evaluate what is missing, write the report."""
    from .sweep import run_sweep

    run = SweepRun(**from_flags(SweepRun, flags))
    path = run_sweep(run.config, dry_run=run.dry_run, device=run.device)
    if path:
        typer.echo(f"report written to {path} (and report.html beside it)")


app.command()(command_signature(sweep, typer_parameters(SweepRun)))


def _reflow(text: str) -> str:
    """A scheme's details as the terminal should show them: the lines of a paragraph (written about 90 columns
    wide) joined, so that rich wraps them to the console's width; blank lines between paragraphs and indented
    lines (formulas) stay as written."""
    lines: list[str] = []
    for line in text.splitlines():
        if lines and lines[-1] and line and not line[0].isspace() and not lines[-1][0].isspace():
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def _trains(cls) -> str:
    """How a scheme's own parameters train by default, read from its param_groups on a model of the default size."""
    from .model import LenxConfig

    scheme = cls(LenxConfig(pe=cls.name))
    names = {id(p): n for n, p in scheme.named_parameters()}
    parts = []
    for g in scheme.param_groups():
        rate = "the model's learning rate" if g["lr_mult"] == 1 else f"{g['lr_mult']:g} x the learning rate"
        decay = "with weight decay" if g["weight_decay"] else "without weight decay"
        shown = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", names[id(p)]) for p in g["params"])  # one name per layer list
        parts.append(f"{', '.join(shown)} at {rate}, {decay}")
    return "; ".join(parts) + (" (pos_lr_mult null; a number sets one rate for all, without decay)" if parts else "")


@app.command()
def schemes(name: Optional[str] = typer.Argument(None, help="Show one scheme in detail.")) -> None:
    """List the positional schemes, or explain one."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .positional import REGISTRY, get_scheme

    console = Console()
    if name:
        cls = get_scheme(name)
        console.print(f"[bold]{cls.name}[/]  ({', '.join(cls.acts) or 'nowhere'})")
        console.print(f"formula: {cls.formula}", markup=False)  # formulas hold [brackets], not markup
        console.print(f"paper:   {cls.paper}", markup=False)
        if cls.code:
            console.print(f"code:    {cls.code}", markup=False)
        console.print(f"used by: {cls.used_by}", markup=False)
        trains = _trains(cls)
        if trains:
            console.print(f"trains:  {trains}", markup=False)
        if cls.defaults:
            console.print("options: " + ", ".join(f"{k}={v}" for k, v in cls.defaults.items()), markup=False)
        console.print()
        console.print(_reflow(cls.details), markup=False)
        return
    wide = console.width >= 160  # paper and users only where they fit; else `lenx schemes NAME` has them
    table = Table(title="positional schemes", show_lines=not wide,
                  caption=None if wide else "lenx schemes NAME: paper, models that use it, options, details")
    for col in ("name", "acts on", "learned", "formula", *(("paper", "used by") if wide else ())):
        # names stay whole, to copy into --pe; the formula gets the room
        table.add_column(col, overflow="fold", no_wrap=col in ("name", "learned"), ratio=3 if col == "formula" else 1)
    where = {"embedding": "embedding", "qk": "q·k", "bias": "score bias"}
    for cls in REGISTRY.values():
        learned = "yes" if cls.learned else "no"
        row = [cls.name, ", ".join(where[a] for a in cls.acts) or "—", learned, escape(cls.formula)]
        table.add_row(*row, *((escape(cls.paper), escape(cls.used_by)) if wide else ()))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line and exit code 2; internal errors keep their traceback. Under
    torchrun, the first process to stop reports why; the others stop with it, without a word of their own."""
    from .errors import LenxError

    args = sys.argv[1:] if argv is None else list(argv)
    restore, disarm = _terminate_as_interrupt()
    try:
        result = app(args=args or ["--help"], prog_name="lenx", standalone_mode=False)
    except BaseException as e:
        disarm()  # a SIGTERM now (torchrun stopping this process) must not interrupt the report
        if isinstance(e, LenxError):
            return _report(f"lenx: error: {_one_line(str(e))}", e.exit_code, "failed")
        if isinstance(e, typer.Exit):
            return _report(None, e.exit_code, "failed" if e.exit_code else "")
        if isinstance(e, (typer.Abort, KeyboardInterrupt)):
            return _report(_interrupted(), 130, "interrupted")
        if isinstance(e, _Terminated):
            return _report(_interrupted("terminated"), 143, "interrupted")
        if isinstance(e, typer.TyperException):  # usage errors: unknown option, bad value, missing argument
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            return _report(f"lenx: error: {_one_line(' '.join(message.split()))}", 2, "failed")
        if isinstance(e, Exception) and _report(None, 1, "failed", internal=True) is not None:
            return 1  # the error of a process that lost its peers: the first process to stop said why
        raise
    finally:
        restore()
    if result == 130:  # typer turns Ctrl-C into Exit(130), which standalone_mode=False returns
        return _report(_interrupted(), 130, "interrupted")
    if _distributed():
        from . import distributed

        distributed.close()
    return result if isinstance(result, int) else 0


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _report(line: str | None, code: int, how: str, internal: bool = False) -> int | None:
    """Print `line` (if any) and return `code`. Under torchrun, a process that stops (`how`: "failed" or
    "interrupted") first tells the others and aborts the process group (`distributed.stop`), so that none waits
    for it; the first process to stop prints its line, the others nothing, except rank 0, which says that another
    process failed (its error is above) or was interrupted. `internal`: an unexpected error; None (its traceback
    follows) unless another process stopped first, whose going is then the cause."""
    first = None
    if how and _distributed():
        from . import distributed

        first = distributed.stop(how, (line or "") if how == "failed" else "")
    me = int(os.environ.get("RANK", "0"))
    if first is not None and first[0] != me:  # another process stopped first
        rank, first_how, first_line = first
        if me != 0 or (line == first_line and not internal):
            line = None  # said once, by that process
        elif first_how == "failed":
            line = (f"lenx: stopped: process {rank} of {os.environ['WORLD_SIZE']} failed (its error is above); "
                    "finished work is saved, rerun the same command to resume")
        elif internal or line is None:
            line = _interrupted()
    elif internal:
        return None
    elif me != 0 and how == "interrupted":
        line = None  # every process is interrupted; rank 0 says so
    if line is not None:
        print(line, file=sys.stderr)
    return code


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, as Ctrl-C is (not a KeyboardInterrupt, which typer turns into a
    plain exit code 130; not an Exception, which error handlers would catch)."""


def _terminate_as_interrupt():
    """SIGTERM (`kill`, a scheduler's preemption, torchrun stopping its workers) ends lenx as Ctrl-C does: the
    atomic writes in progress remove their temporary files, and the message says how to resume. Returns what
    puts the previous handler back (the main thread only can set one; elsewhere nothing changes), and what makes
    any later SIGTERM do nothing (once lenx is reporting how it stopped; it exits right after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), (lambda: None)
    armed = [True]

    def terminate(signum, frame):
        if armed[0]:
            armed[0] = False  # one SIGTERM: the cleanup it starts is not itself interrupted
            raise _Terminated

    def disarm():
        armed[0] = False

    previous = signal.signal(signal.SIGTERM, terminate)
    return (lambda: signal.signal(signal.SIGTERM, previous)), disarm


def _interrupted(how: str = "interrupted") -> str:
    return f"lenx: {how}; finished work is saved, rerun the same command to resume"


def _one_line(message: str) -> str:
    """Escape any character that would break the message over lines (user input may hold them)."""
    return "".join(c if len(f"a{c}a".splitlines()) == 1 else c.encode("unicode_escape").decode() for c in message)


if __name__ == "__main__":
    sys.exit(main())
