"""The `lenx` command line. User mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .data import DATASET_HELP

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" and "cuda[:N]" print as written
    help="lenx: which positional encoding keeps working past its training length, and by how much.",
)


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expects comma-separated integers, got '{text}'", param_hint=flag) from None
    if not values:
        raise typer.BadParameter("expects at least one length", param_hint=flag)
    return values


@app.command()
def train(
    pe: Optional[str] = typer.Option(None, "--pe", help="Positional scheme (see `lenx schemes`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (flags override it)."),
    dataset: Optional[str] = typer.Option(None, help=f"Corpus: {DATASET_HELP}."),
    tokenizer: Optional[str] = typer.Option(
        None, help="byte | bpe:<vocab_size> (trained on the training split) | a transformers tokenizer name or path."
    ),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column (.jsonl/.json/.parquet/hf:)."),
    train_file: Optional[str] = typer.Option(None, "--train-file", help="Explicit training split (file or directory)."),
    validation_file: Optional[str] = typer.Option(None, "--validation-file", help="Explicit validation split."),
    test_file: Optional[str] = typer.Option(None, "--test-file", help="Explicit test split."),
    train_len: Optional[int] = typer.Option(None, "--train-len", help="Training context length in tokens."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per step per process."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches accumulated per step."),
    layers: Optional[int] = typer.Option(None, help="Transformer blocks."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="Model width."),
    heads: Optional[int] = typer.Option(None, help="Attention heads."),
    d_ff: Optional[int] = typer.Option(None, "--d-ff", help="Feed-forward width."),
    warmup: Optional[int] = typer.Option(None, help="Linear warm-up steps before the cosine decay."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the model [default: off; on CPU lenx's own training route is faster than compiled code].",
    ),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint period in steps."),
    out: Optional[Path] = typer.Option(None, help="Run directory [default: runs/<pe>-L<train_len>-s<seed>]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] [default: cuda when present]."),
) -> None:
    """Train one small causal LM with the given positional scheme."""
    from .config import resolve
    from .train import train as run_train

    cfg = resolve(
        str(config) if config else None,
        pe=pe, dataset=dataset, tokenizer=tokenizer, text_field=text_field, train_file=train_file,
        validation_file=validation_file, test_file=test_file, train_len=train_len, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, layers=layers, d_model=d_model, heads=heads, d_ff=d_ff, warmup=warmup, lr=lr, seed=seed, precision=precision,
        compile=compile, save_every=save_every,
    )
    run_dir = run_train(cfg, out=out, overwrite=overwrite, device=device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        typer.echo(f"run saved to {run_dir}")


@app.command("eval")
def eval_(
    run_dirs: Optional[List[Path]] = typer.Argument(None, help="Run directories [default: every run under runs/]."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Longest evaluation length: 1x, 2x, 4x ... the training length up to it, and itself [default: 16x train length]."),
    lengths: Optional[str] = typer.Option(None, help="Comma-separated evaluation lengths (overrides --max-len)."),
    tokens: Optional[int] = typer.Option(None, help="Tokens scored at every length, rounded up to a multiple of the longest "
                                        "length [default: max(65536, max length)]."),
    out: Path = typer.Option(Path("results"), help="Results directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for runs when none is named."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] [default: cuda when present]."),
    rope_scaling: Optional[List[str]] = typer.Option(
        None, "--rope-scaling", help="RoPE extension for rope/xpos runs: none, pi, ntk, dynamic-ntk, yarn. Repeat or "
        "comma-separate to sweep; with several, other schemes are evaluated with none [default: none]."),
    rope_factor: Optional[List[str]] = typer.Option(
        None, "--rope-factor", help="Scale factor s >= 1; repeat or comma-separate to sweep [default: eval length / "
        "train length; dynamic-ntk: max(1, window / train length) per window]."),
    protocol: Optional[List[str]] = typer.Option(
        None, "--protocol",
        help="nonoverlap | sliding | truncate; repeat or comma-separate for several [default: nonoverlap].",
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", help="Sliding-window stride in tokens [default: half the evaluation length]."
    ),
    position_buckets: int = typer.Option(
        1, "--position-buckets",
        help="Position buckets per training length in results_by_position (1: width = training length).",
    ),
    attn_backend: Optional[str] = typer.Option(
        None, "--attn-backend", help="sdpa | blocked | flex | materialized [default: the run's own setting]."
    ),
    dataset: Optional[str] = typer.Option(
        None, help="Score on this corpus's test split [default: each run's own dataset]; same forms as `train`."
    ),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column, with --dataset / --test-file."),
    test_file: Optional[str] = typer.Option(None, "--test-file", help="Score on this file (or directory) instead."),
    model: Optional[List[str]] = typer.Option(
        None, "--model", help="A Hugging Face causal LM (local directory, or hub name when online) to score with its own "
        "tokenizer, through the same protocols and tables; repeatable. With --model, RUN_DIRS default to none."),
    train_len: Optional[int] = typer.Option(
        None, "--train-len", help="1x length of --model [default: its max_position_embeddings / n_positions]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="--model weights: float32 | bfloat16 | float16 "
                                        "[default: float32]."),
) -> None:
    """Perplexity of trained runs (or HF models, --model) at 1x, 2x, ... 16x their training length (each with its
    own tokenizer)."""
    from .config import check_path_given
    from .data import DataSpec
    from .errors import LenxError
    from .evaluate import evaluate

    data = None
    for flag, value in (("--dataset", dataset), ("--test-file", test_file)):
        check_path_given(flag, value)
    if dataset is not None or test_file is not None:
        if dataset is not None and test_file is not None:
            raise LenxError(f"give either --dataset ({dataset}) or --test-file, not both")
        data = DataSpec(dataset=dataset or "files", text_field=text_field or "text", test_file=test_file)
    elif text_field is not None:
        raise LenxError("--text-field applies with --dataset or --test-file; give one of them")

    # every other option is checked by evaluate (check_eval_options: the checks `lenx sweep` gives its eval: section)
    lens = _ints(lengths, "--lengths")
    table = evaluate(run_dirs or None, max_len=max_len, lengths=lens, tokens=tokens, out=out, runs_dir=runs_dir,
                     device=device, protocols=protocol, stride=stride, position_buckets=position_buckets,
                     attn_backend=attn_backend, rope_scalings=rope_scaling, rope_factors=rope_factor, dataset=data,
                     models=model or None, train_len=train_len, dtype=dtype)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"{len(table)} rows in {out / 'results.csv'}")


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


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", help="Sweep YAML (e.g. configs/quick.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would run and its estimated time; change nothing."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] [default: cuda when present]."),
) -> None:
    """Schemes x seeds from one config: train what is missing, evaluate what is missing, write the report."""
    from .sweep import run_sweep

    path = run_sweep(config, dry_run=dry_run, device=device)
    if path:
        typer.echo(f"report written to {path} (and report.html beside it)")


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
        console.print(f"used by: {cls.used_by}", markup=False)
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
