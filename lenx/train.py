"""`lenx train`: one model, one positional scheme, one fixed training context.

The batch at step s is a pure function of (seed, s), so a run resumed from a checkpoint sees exactly
the batches it would have seen uninterrupted. `train` sets a run up and loops over its steps (the log, the
progress bar, the checkpoint period); the run directory and its checkpoints are lenx/rundir.py's, one
optimizer step lenx/step.py's.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .attention import backend_taken, recording
from .config import TrainConfig
from .data import DataSpec, load_corpus, text_changed, token_stream
from .errors import LenxError, is_oom
from .mix import Mix
from .optim import build_optimizer
from .precision import Choice, autocast, choose, compile_model, compile_problem, precision_dtype, time_steps
from .progress import progress as make_progress
from .rundir import RunDir, check_run_dir
from .runinfo import provenance
from .step import TrainStep, cpu_shards, forward_backward, shard_threads

# Imported from here by other modules and scripts, though they live in lenx/precision.py and lenx/rundir.py.
__all__ = ["train", "default_run_dir", "model_config", "get_batch", "get_positions", "check_run_dir", "precision_dtype", "autocast", "compile_problem", "compile_model"]


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.pe}-L{cfg.train_len}-s{cfg.seed}"


def model_config(cfg: TrainConfig, vocab_size: int, eod_id: int):
    from .model import LenxConfig

    return LenxConfig(
        vocab_size=vocab_size,
        n_layer=cfg.layers,
        d_model=cfg.d_model,
        n_head=cfg.heads,
        d_ff=cfg.d_ff,
        train_len=cfg.train_len,
        train_positions=cfg.random_positions or None,
        pe=cfg.pe,
        pe_options=cfg.pe_options,
        attn_backend=cfg.attn_backend,
        attn_block_size=cfg.attn_block_size,
        eod_token_id=eod_id,
    )


def get_batch(stream: np.ndarray, cfg: TrainConfig, step: int, rows: int) -> torch.Tensor:
    """The global batch of step `step`: (rows, train_len + 1) windows at random offsets, a function of
    (seed, step, rows) alone, so any number of processes x accumulation steps sees the same batch."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.train_len - 1, (rows,), generator=g).numpy()
    idx = starts[:, None] + np.arange(cfg.train_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def get_positions(cfg: TrainConfig, step: int) -> torch.Tensor | None:
    """The positions of step `step`'s windows under --random-positions N (None without it): train_len distinct
    positions drawn uniformly from [0, N), sorted, as Ruoss et al. 2023's reference draws them (jax.random.choice
    without replacement, then sort). One draw per step, shared by every row, micro-batch, row shard and process
    (the reference draws one per batch; lenx models take one set of positions per forward): a function of
    (seed, step) alone, so a resumed run, any process count and any shard layout see the same positions. Its own
    generator (another stream than get_batch's and the mix's), so the batches are those of a run without it."""
    if not cfg.random_positions:
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + (2 << 40))
    return torch.randperm(cfg.random_positions, generator=g)[: cfg.train_len].sort().values


def train(cfg: TrainConfig, out: str | Path | None = None, overwrite: bool = False, device: str | None = None,
          progress: bool = True, bar=None) -> Path:
    """Train (or resume, or skip if finished) one run. `bar`: a rich Progress to draw into (e.g. a sweep's)."""
    ctx = distributed.init()
    device = distributed.device_for(ctx, device)  # checked before any directory is made
    if cfg.precision != "auto":
        choose(cfg.precision, device)  # refused here (bf16 on a GPU without it) before any directory is made
    problem = compile_problem(device) if cfg.compile else None
    if problem:
        raise LenxError(f"{problem}; install one or train without --compile")
    run = RunDir(out if out else default_run_dir(cfg))
    created = run.created_by_prepare(overwrite)
    state = distributed.from_main(ctx, lambda: run.prepare(cfg, overwrite, ctx.world))
    if ctx.main and run.path.is_dir():
        run.drop_partial_saves()
    if state == "done":
        if ctx.main:
            _already_trained(run)
        return run.path

    corpus, tok, stream, mix = _training_data(cfg, run, state, ctx, created, progress)
    model, opt = _model_and_optimizer(cfg, tok, device)
    shards, each = _shards(cfg, run, state, ctx, device)
    threads = shards * each  # what the steps use in all: the MFU's peak is taken at it
    choice = _precision(cfg, run, state, ctx, device, model, stream, shards, each)
    precision = choice.precision
    info = _run_info(run, cfg, ctx, corpus, tok, model, choice, shards, each, device)
    start, log, info = _resume_or_start(run, cfg, ctx, state, model, opt, info, progress)
    if ctx.main:
        run.write_info(info)

    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.active else model
    net = compile_model(net) if cfg.compile else net
    take_step = TrainStep(net, model, opt, cfg, ctx, device, lambda: autocast(precision, device), shards, each)
    with _progress_task(cfg, ctx, start, progress, bar) as (bar, task):
        wall = _run_steps(run, cfg, ctx, take_step, stream, mix, start, log, info, bar, task)
    if not ctx.main:
        return run.path
    info.update(_summary(cfg, ctx, log, wall, tok.vocab_size, device, precision, threads, shards))
    if info.get("mfu_warning") and progress:
        print(f"warning: {info['mfu_warning']}", file=sys.stderr)
    run.finish(model, log, info)
    return run.path


def _already_trained(run: RunDir) -> None:
    from rich.console import Console

    run.drop_checkpoints()  # left by a run stopped between its last write and its cleanup
    Console(stderr=True).print(f"[green]{run.path} is already trained[/]; nothing to do (--overwrite retrains)")


def _training_data(cfg: TrainConfig, run: RunDir, state: str, ctx, created: Path | None, progress: bool):
    """(corpus, tokenizer, training token stream, training mix or None), the same on every process; a new run's
    tokenizer is built and saved into its directory. A new run whose data, tokenizer or mix is bad leaves no
    directory behind."""
    try:
        spec = DataSpec.of(cfg)
        corpus = load_corpus(spec)
        tok = run.tokenizer(cfg.tokenizer, spec, state == "resume", progress)
        stream = token_stream(spec, tok, "train", progress)
        if len(stream) < cfg.train_len + 2:
            raise LenxError(f"the training split of '{cfg.dataset}' has {len(stream)} tokens; one window of "
                            f"--train-len {cfg.train_len} needs {cfg.train_len + 2}")
        _check_same_text(ctx, corpus.fingerprint, tok.fingerprint)
        if state == "resume":
            _check_resumed_text(run, cfg, corpus.fingerprint)
        mix = Mix.of(cfg.mix, tok, stream, cfg.train_len, cfg.passkey_format)
    except LenxError:
        if state == "new" and created is not None and ctx.main:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return corpus, tok, stream, mix


def _check_resumed_text(run: RunDir, cfg: TrainConfig, fingerprint: str) -> None:
    """A resumed run must read the text it began with: `stdlib` under another Python, an edited file or an updated
    hub dataset would give other batches from the checkpoint on (a run of two texts, not the one asked for)."""
    began = run.info().get("dataset_fingerprint")
    if isinstance(began, str) and began != fingerprint:
        raise LenxError(f"{run.path} began on other text than dataset '{cfg.dataset}' is now "
                        f"({text_changed(cfg.dataset)}: fingerprint {began}, now {fingerprint}); resume it where it "
                        "began, or pass --overwrite to train afresh")


def _check_same_text(ctx, corpus_fingerprint: str, tokenizer_fingerprint: str) -> None:
    """Under torchrun every process reads its data from its own node: refuse a job whose processes would train on
    different text (a node's copy of the dataset differs) or tokenizers, rather than train on a mixture."""
    seen = distributed.gather(ctx, (corpus_fingerprint, tokenizer_fingerprint))
    for rank, (text, tok) in enumerate(seen):
        if (text, tok) != seen[0]:
            what = f"text (dataset fingerprint {text}, not {seen[0][0]})" if text != seen[0][0] else "tokenizer"
            raise LenxError(f"process {rank} of {ctx.world} reads another training {what} than process 0; give every "
                            "node the same copy of the dataset")


def _model_and_optimizer(cfg: TrainConfig, tok, device: str):
    """The initial model of the seed, on `device`, and its optimizer."""
    from .model import LenxForCausalLM

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    try:
        model = LenxForCausalLM(model_config(cfg, tok.vocab_size, tok.eod_id)).to(device)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        raise LenxError(f"the model does not fit in memory on {device}; lower --d-model, --d-ff or --layers") from None
    return model, build_optimizer(model, cfg)


def _shards(cfg: TrainConfig, run: RunDir, state: str, ctx, device: str) -> tuple[int, int]:
    """(row shards, intra-op threads of each) of the run's steps (`lenx.step`). A resumed run keeps those it
    began with, whatever this process's thread count (affinity, a cgroup, OMP_NUM_THREADS): its gradients are
    summed over the same shards, each computed with the same threads, as an uninterrupted run's."""
    if state == "resume" and device.startswith("cpu"):
        info = run.info()
        shards, each = info.get("cpu_shards"), info.get("shard_threads")
        if isinstance(shards, int) and shards >= 1:
            return shards, each if isinstance(each, int) and each >= 1 else shard_threads(shards)
    shards = cpu_shards(device, cfg.batch_size, distributed=ctx.active, compiled=cfg.compile)
    return shards, shard_threads(shards)


def _precision(cfg: TrainConfig, run: RunDir, state: str, ctx, device: str, model, stream: np.ndarray,
               shards: int, each: int) -> Choice:
    """The precision the run trains in, and why (`precision.choose`). A resumed run keeps the one it began with,
    whatever `auto` would choose now (another machine, another cache): its steps must stay those of one run."""
    if state == "resume" and cfg.precision == "auto":
        info = run.info()
        if info.get("precision") in ("fp32", "bf16"):
            return Choice(info["precision"], info.get("precision_reason") or "auto, as chosen when the run began")

    def measure() -> dict[str, float]:  # one step of this run's own model, batch and positions in each precision
        batch = get_batch(stream, cfg, 0, cfg.batch_size).to(device)
        positions = get_positions(cfg, 0)

        def step(precision: str) -> None:
            forward_backward(model, batch, lambda: autocast(precision, device), 1.0, shards, each, positions)
            model.zero_grad(set_to_none=True)

        return time_steps(step)

    return distributed.from_main(ctx, lambda: choose(cfg.precision, device, measure))


def _run_info(run: RunDir, cfg: TrainConfig, ctx, corpus, tok, model, choice: Choice, shards: int, each: int,
              device: str) -> dict:
    """run.json of a run in training."""
    return {
        "run": run.path.name,
        "status": "training",
        "config": cfg.to_dict(),
        "precision": choice.precision,
        "precision_reason": choice.reason,
        "dataset_fingerprint": corpus.fingerprint,
        "tokenizer": tok.info(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world,
        "global_batch": cfg.batch_size * cfg.grad_accum * ctx.world,
        "cpu_shards": shards,
        "shard_threads": each,
        **provenance(device),
    }


def _resume_or_start(run: RunDir, cfg: TrainConfig, ctx, state: str, model, opt, info: dict, progress: bool):
    """(the first step, the log so far, run.json): a resumed run's checkpoint restored into model and optimizer,
    with the fields of its run.json this run does not set kept; step 0 of a new run."""
    if state == "resume":
        start = run.load_checkpoint(model, opt)
        log = run.read_log(start)
        info = {**run.info(), **info}
        if ctx.main and progress:
            print(f"resuming {run.path} from its checkpoint at step {start} of {cfg.steps}", file=sys.stderr)
        return start, log, info
    if ctx.main and progress and cfg.warmup >= cfg.steps:
        print(f"note: warmup ({cfg.warmup} steps) is not below steps ({cfg.steps}): the learning rate never reaches "
              f"its peak {cfg.lr:g}; lower --warmup for a full schedule", file=sys.stderr)
    return 0, [], info


@contextmanager
def _progress_task(cfg: TrainConfig, ctx, start: int, progress: bool, bar):
    """(bar, task): this run's task in `bar` (a caller's rich Progress, the task removed again at the end), or in a
    bar of its own when `progress`; (None, None) without either, and on every process but the first."""
    bar = bar if ctx.main else None
    own_bar = bar is None and progress and ctx.main
    with make_progress() if own_bar else nullcontext(bar) as bar:
        task = bar.add_task(f"train {cfg.pe} s{cfg.seed}", total=cfg.steps, completed=start, loss="", tps="") if bar else None
        yield bar, task
        if task is not None and not own_bar:
            bar.remove_task(task)


def _run_steps(run: RunDir, cfg: TrainConfig, ctx, take_step: TrainStep, stream: np.ndarray, mix: Mix | None,
               start: int, log: list[dict], info: dict, bar, task) -> float:
    """Steps start..steps: a log row every log_every steps and at the last, a checkpoint (with run.json) every
    save_every steps but the last; `mix`: probe rows in every step's batch. Returns the run's training seconds,
    those before a resume included."""
    rows = cfg.batch_size * cfg.grad_accum  # this process's share of the global batch
    tokens_per_step = rows * ctx.world * cfg.train_len
    t_start = t_window = time.perf_counter()
    tok_window, elapsed_before = 0, float(info.get("train_seconds", 0.0))
    for step in range(start, cfg.steps):
        batch = get_batch(stream, cfg, step, rows * ctx.world)
        batch = mix.apply(batch, cfg.seed, step) if mix is not None else batch
        mine = batch[ctx.rank * rows : (ctx.rank + 1) * rows]
        positions = get_positions(cfg, step)  # None: 0..train_len-1
        if step == start:  # run.json records the attention routes that ran, not only the backend asked for
            with recording() as routes:
                loss, lr = take_step(step, mine, positions)
            info.update(attn_backend=backend_taken(routes, cfg.attn_backend), attn_route="+".join(sorted(routes)))
        else:
            loss, lr = take_step(step, mine, positions)
        tok_window += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            tps = tok_window / (now - t_window)
            t_window, tok_window = now, 0
            log.append({"step": done, "loss": loss.item(), "lr": lr, "tokens_per_s": tps})
            if bar:
                bar.update(task, completed=done, loss=f"loss {loss.item():.3f}", tps=f"{tps:,.0f} tok/s")
        elif bar:
            bar.update(task, completed=done)
        if done % cfg.save_every == 0 and done < cfg.steps:
            if ctx.main:
                info["train_seconds"] = elapsed_before + time.perf_counter() - t_start
                run.write_info(info)
                run.save_checkpoint(take_step.model, take_step.opt, done, log)
            distributed.barrier(ctx)
    return elapsed_before + time.perf_counter() - t_start


def _summary(cfg: TrainConfig, ctx, log: list[dict], wall: float, vocab: int, device: str, precision: str,
             threads: int, shards: int) -> dict:
    """run.json's fields of a finished run: throughput (the median of the log rows, the first, warm-up, left out
    when there are others), model FLOPs utilisation (and a warning where it cannot be true) and the final loss."""
    tps_values = [r["tokens_per_s"] for r in log[1:]] or [r["tokens_per_s"] for r in log]
    tps = float(np.median(tps_values)) if tps_values else None
    mfu, warning = _mfu(cfg, vocab, tps / ctx.world, device, precision, threads, shards) if tps else (None, None)
    summary = dict(
        status="done",
        steps_done=cfg.steps,
        train_seconds=round(wall, 2),
        tokens_per_s=round(tps, 1) if tps else None,
        mfu=mfu,
        final_loss=log[-1]["loss"] if log else None,
    )
    if warning:
        summary["mfu_warning"] = warning
    return summary


def _mfu(cfg: TrainConfig, vocab: int, tps: float, device: str, precision: str, threads: int,
         shards: int) -> tuple[float, str | None]:
    """Model FLOPs utilisation against a matrix-multiply peak at the run's precision, measured as its steps run:
    `threads` in all, in `shards` side by side (`perf.matmul_peak`: of the last minute), with
    `perf.utilisation`'s warning above 1."""
    from .perf import matmul_peak, train_flops_per_token, utilisation

    flops = train_flops_per_token(cfg.d_model, cfg.layers, cfg.d_ff, vocab, cfg.train_len)
    mfu, warning = utilisation(tps * flops, matmul_peak(device, precision_dtype(precision), threads, shards))
    return round(mfu, 4), warning
