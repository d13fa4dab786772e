"""`lenx train`: one model, one positional scheme, one fixed training context.

The batch at step s is a pure function of (seed, s), so a run resumed from a checkpoint sees exactly
the batches it would have seen uninterrupted. Checkpoints are written atomically into a fresh
directory, then `latest.json` is replaced to point at it; a kill at any moment leaves the last
complete checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .config import TrainConfig
from .data import DataSpec, get_tokenizer, load_corpus, load_run_tokenizer, token_stream
from .errors import LenxError, is_oom
from .ids import identity
from .io import atomic_path, check_writable, readable, write_json
from .progress import progress as make_progress
from .runinfo import provenance, quiet_hf
from .step import cpu_shards, forward_backward


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
        pe=cfg.pe,
        pe_options=cfg.pe_options,
        attn_backend=cfg.attn_backend,
        attn_block_size=cfg.attn_block_size,
        eod_token_id=eod_id,
    )


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise LenxError("this GPU has no bf16 support; use --precision fp32")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # CPUs without native bf16 matrix units (AVX2, e.g. this project's CI machines) run bf16
    # autocast many times slower than fp32; only AMX / AVX512-BF16 parts gain from it.
    return "bf16" if _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a resolved precision ("fp32" or "bf16")."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot run here, or None: inductor builds CPU kernels with a C++ compiler."""
    if device.startswith("cpu") and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def compile_model(model, **options):
    """torch.compile, from scratch: torch 2.13's inductor cache, when warm, replays views of a graph's outputs
    with garbage shapes ("shape '[94090752410837, ...]' is invalid") wherever a graph breaks between them."""
    import warnings

    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # the expected effect of the line above
    return torch.compile(model, **options)


def get_batch(stream: np.ndarray, cfg: TrainConfig, step: int, rows: int) -> torch.Tensor:
    """The global batch of step `step`: (rows, train_len + 1) windows at random offsets, a function of
    (seed, step, rows) alone, so any number of processes x accumulation steps sees the same batch."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.train_len - 1, (rows,), generator=g).numpy()
    idx = starts[:, None] + np.arange(cfg.train_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio; a multiplier of the peak lr."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW. Weight decay on matrices only; the scheme's own parameters get lr * pos_lr_mult and no decay."""
    pe_ids = {id(p) for p in model.pe.parameters()}
    decay, no_decay, pe = [], [], []
    for p in model.parameters():
        (pe if id(p) in pe_ids else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": pe, "weight_decay": 0.0, "lr_mult": cfg.pos_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernel (CPU and CUDA): one pass per tensor instead of about ten (3 vs 10 ms a step at 3M params).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    mult = lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * mult * g["lr_mult"]
    return cfg.lr * mult


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, model, opt, step: int, log: list[dict]) -> None:
    """A checkpoint is written into a temporary directory, named before it exists (an interrupt anywhere removes
    it), and renamed once complete: a directory named checkpoint-* is always a whole one."""
    ckpt = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f".{ckpt.name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        readable(tmp / "model.safetensors")
        with atomic_path(tmp / "optimizer.pt") as path:
            torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, path)
        write_json(
            tmp / "state.json",
            {"step": step, "python_rng": _py_rng_to_json(random.getstate()), "numpy_rng": _np_rng_to_json()},
        )
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(tmp, ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_log(run_dir, log)
    write_json(run_dir / "latest.json", {"step": step, "checkpoint": ckpt.name})
    for old in run_dir.glob("checkpoint-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model, opt) -> int:
    """Restore model, optimizer and RNG states; returns the step to continue from."""
    latest = run_dir / "latest.json"
    try:
        info = json.loads(latest.read_text())
        ckpt = run_dir / info["checkpoint"]
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
        state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        meta = json.loads((ckpt / "state.json").read_text())
        random.setstate(_py_rng_from_json(meta["python_rng"]))
        np.random.set_state(_np_rng_from_json(meta["numpy_rng"]))
        return int(meta["step"])
    except Exception as e:  # any corrupt or partial file: say which, never guess
        raise LenxError(
            f"checkpoint in {run_dir} is unreadable or corrupt ({type(e).__name__}); delete it or pass --overwrite"
        ) from None


def _py_rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(state):
    return (state[0], tuple(state[1]), state[2])


def _np_rng_to_json():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_rng_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _write_log(run_dir: Path, log: list[dict]) -> None:
    import pandas as pd

    with atomic_path(run_dir / "train_log.csv") as tmp:
        pd.DataFrame(log, columns=["step", "loss", "lr", "tokens_per_s"]).to_csv(tmp, index=False)


def _read_log(run_dir: Path, upto: int) -> list[dict]:
    import pandas as pd

    path = run_dir / "train_log.csv"
    if not path.exists():
        return []
    try:
        df = pd.read_csv(path)
        return df[df["step"] <= upto].to_dict("records")
    except Exception as e:  # edited or truncated by hand (lenx writes it atomically)
        raise LenxError(f"{path} is unreadable ({type(e).__name__}); delete it (the run resumes without its earlier "
                        "log lines) or pass --overwrite") from None


# ---------------------------------------------------------------- the loop


_TRAIN_FIX = "use another --out or pass --overwrite"


def _foreign_entries(run_dir: Path) -> list[str]:
    """What a directory without run.json holds besides what a new run writes before its run.json (its tokenizer)
    and temporary files of interrupted writes: names, sorted; none for a directory that does not exist."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in ("tokenizer.json", "tokenizer") and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def check_run_dir(run_dir: Path, cfg: TrainConfig, world: int = 1, fix: str = _TRAIN_FIX) -> str:
    """'new', 'resume' or 'done' for `cfg` in `run_dir`, changing nothing. Refuses a directory holding a
    different config; `fix` tells the caller's way out."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        stray = _foreign_entries(run_dir)
        if stray:  # e.g. --out results, --out runs, --out .: a later --overwrite would delete what else is there
            raise LenxError(f"{run_dir} is not empty ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}) and "
                            "holds no lenx run (no run.json); a run is trained into a new or empty directory: "
                            + ("use another --out" if fix == _TRAIN_FIX else fix))
        return "new"
    try:
        info = json.loads(run_json.read_text())
        old = identity(info["config"], info.get("world_size", 1))
    except (ValueError, KeyError, TypeError):
        raise LenxError(f"{run_json} is corrupt; {fix}") from None
    new = identity(cfg.to_dict(), world)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise LenxError(f"{run_dir} holds a run with a different config ({', '.join(diff)}); {fix}")
    if (run_dir / "model.safetensors").exists() and info.get("status") == "done":
        return "done"
    return "resume" if (run_dir / "latest.json").exists() else "new"


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, overwrite: bool, world: int = 1) -> str:
    """Returns 'new', 'resume' or 'done'. Refuses a directory holding a different config."""
    if run_dir.exists() and overwrite:
        if not (run_dir / "run.json").exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            # e.g. --out runs: deleting it would delete every run in it
            raise LenxError(f"{run_dir} is not a lenx run directory (no run.json); --overwrite replaces only a run, "
                            "choose another --out")
        shutil.rmtree(run_dir)
    state = check_run_dir(run_dir, cfg, world)  # refuses another config, and a non-empty directory that is no run
    if (run_dir / "run.json").exists():
        return state
    try:
        check_writable(run_dir)
    except OSError as e:
        raise LenxError(f"cannot write to {run_dir}: {e.strerror}; choose another --out") from None
    return "new"


def _training_data(cfg: TrainConfig, run_dir: Path, state: str, progress: bool):
    """(corpus, tokenizer, training token stream); a new run's tokenizer is built and saved into run_dir."""
    spec = DataSpec.of(cfg)
    corpus = load_corpus(spec)
    if state == "resume":  # the tokenizer the checkpoint was trained with, from the run directory
        saved = json.loads((run_dir / "run.json").read_text()).get("tokenizer") or {}
        tok = load_run_tokenizer(run_dir, cfg.tokenizer, saved.get("fingerprint"))
    else:
        tok = get_tokenizer(cfg.tokenizer, spec, progress)
        tok.save(run_dir)
        tok = load_run_tokenizer(run_dir, cfg.tokenizer)  # train with exactly what eval will read back
    stream = token_stream(spec, tok, "train", progress)
    if len(stream) < cfg.train_len + 2:
        raise LenxError(
            f"the training split of '{cfg.dataset}' has {len(stream)} tokens; one window of --train-len "
            f"{cfg.train_len} needs {cfg.train_len + 2}"
        )
    return corpus, tok, stream


def _check_same_text(ctx, corpus_fingerprint: str, tokenizer_fingerprint: str) -> None:
    """Under torchrun every process reads its data from its own node: refuse a job whose processes would train on
    different text (a node's copy of the dataset differs) or tokenizers, rather than train on a mixture."""
    from . import distributed

    seen = distributed.gather(ctx, (corpus_fingerprint, tokenizer_fingerprint))
    for rank, (text, tok) in enumerate(seen):
        if (text, tok) != seen[0]:
            what = f"text (dataset fingerprint {text}, not {seen[0][0]})" if text != seen[0][0] else "tokenizer"
            raise LenxError(f"process {rank} of {ctx.world} reads another training {what} than process 0; give every "
                            "node the same copy of the dataset")


def train(cfg: TrainConfig, out: str | Path | None = None, overwrite: bool = False, device: str | None = None,
          progress: bool = True, bar=None) -> Path:
    """Train (or resume, or skip if finished) one run. `bar`: a rich Progress to draw into (e.g. a sweep's)."""
    from . import distributed
    from .model import LenxForCausalLM

    ctx = distributed.init()
    device = distributed.device_for(ctx, device)  # checked before any directory is made
    precision = resolve_precision(cfg.precision, device)
    problem = compile_problem(device) if cfg.compile else None
    if problem:
        raise LenxError(f"{problem}; install one or train without --compile")
    run_dir = Path(out) if out else default_run_dir(cfg)
    # what this run will create: its directory and any missing parents (removed again if its data is bad)
    created = run_dir if overwrite and run_dir.exists() else next(
        (q for q in [*reversed(run_dir.absolute().parents), run_dir.absolute()] if not q.exists()), None)
    state = distributed.from_main(ctx, lambda: prepare_run_dir(run_dir, cfg, overwrite, ctx.world))
    if ctx.main and run_dir.is_dir():
        _drop_partial_saves(run_dir)
    if state == "done":
        if ctx.main:
            from rich.console import Console

            _drop_checkpoints(run_dir)  # left by a run stopped between its last write and its cleanup
            Console(stderr=True).print(f"[green]{run_dir} is already trained[/]; nothing to do (--overwrite retrains)")
        return run_dir

    try:
        corpus, tok, stream = _training_data(cfg, run_dir, state, progress)
        _check_same_text(ctx, corpus.fingerprint, tok.fingerprint)
    except LenxError:
        if state == "new" and created is not None and ctx.main:  # a bad dataset or tokenizer leaves no directory
            shutil.rmtree(created, ignore_errors=True)
        raise

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    try:
        model = LenxForCausalLM(model_config(cfg, tok.vocab_size, tok.eod_id)).to(device)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        raise LenxError(f"the model does not fit in memory on {device}; lower --d-model, --d-ff or --layers") from None
    opt = build_optimizer(model, cfg)
    shards = cpu_shards(device, cfg.batch_size, distributed=ctx.active, compiled=cfg.compile)
    start, log = 0, []
    run_info = {
        "run": run_dir.name,
        "status": "training",
        "config": cfg.to_dict(),
        "precision": precision,
        "dataset_fingerprint": corpus.fingerprint,
        "tokenizer": tok.info(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world,
        "global_batch": cfg.batch_size * cfg.grad_accum * ctx.world,
        "cpu_shards": shards,
        **provenance(device),
    }
    if state == "resume":
        start = load_checkpoint(run_dir, model, opt)
        log = _read_log(run_dir, start)
        run_info = {**json.loads((run_dir / "run.json").read_text()), **run_info}
        if ctx.main and progress:
            print(f"resuming {run_dir} from its checkpoint at step {start} of {cfg.steps}", file=sys.stderr)
    elif ctx.main and progress and cfg.warmup >= cfg.steps:
        print(f"note: warmup ({cfg.warmup} steps) is not below steps ({cfg.steps}): the learning rate never reaches "
              f"its peak {cfg.lr:g}; lower --warmup for a full schedule", file=sys.stderr)
    if ctx.main:
        write_json(run_dir / "run.json", run_info)

    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.active else model
    net = compile_model(net) if cfg.compile else net
    cast = lambda: autocast(precision, device)  # noqa: E731
    rows = cfg.batch_size * cfg.grad_accum  # this process's share of the global batch
    tokens_per_step = rows * ctx.world * cfg.train_len
    progress, bar = progress and ctx.main, bar if ctx.main else None
    t_start, t_window, tok_window = time.perf_counter(), time.perf_counter(), 0
    elapsed_before = float(run_info.get("train_seconds", 0.0)) if state == "resume" else 0.0
    own_bar = bar is None and progress
    progress_cm = make_progress() if own_bar else nullcontext(bar)
    with progress_cm as bar:
        task = bar.add_task(f"train {cfg.pe} s{cfg.seed}", total=cfg.steps, completed=start, loss="", tps="") if bar else None
        for step in range(start, cfg.steps):
            lr = set_lr(opt, cfg, step)
            mine = get_batch(stream, cfg, step, rows * ctx.world)[ctx.rank * rows : (ctx.rank + 1) * rows]
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            try:
                for micro, batch in enumerate(mine.to(device).split(cfg.batch_size)):
                    last = micro == cfg.grad_accum - 1
                    with net.no_sync() if ctx.active and not last else nullcontext():
                        micro_loss = forward_backward(net, batch, cast, 1 / cfg.grad_accum, shards)
                    loss += micro_loss / cfg.grad_accum
            except (RuntimeError, MemoryError) as e:
                if not is_oom(e):
                    raise
                raise LenxError(
                    f"out of memory at step {step} on {device} ({cfg.batch_size} x {cfg.train_len} tokens a "
                    "micro-batch); lower --batch-size and raise --grad-accum to keep the global batch (the last "
                    "checkpoint is kept)"
                ) from None
            loss = distributed.mean(ctx, loss)
            if not torch.isfinite(loss):
                raise LenxError(
                    f"loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr:g}) and rerun "
                    "(the last good checkpoint is kept)"
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
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
                    run_info["train_seconds"] = elapsed_before + time.perf_counter() - t_start
                    write_json(run_dir / "run.json", run_info)
                    save_checkpoint(run_dir, model, opt, done, log)
                distributed.barrier(ctx)
        if task is not None and not own_bar:
            bar.remove_task(task)

    wall = elapsed_before + time.perf_counter() - t_start
    tps_values = [r["tokens_per_s"] for r in log[1:]] or [r["tokens_per_s"] for r in log]
    tps = float(np.median(tps_values)) if tps_values else None
    if not ctx.main:
        return run_dir
    quiet_hf()
    model.save_pretrained(run_dir, safe_serialization=True)
    readable(*run_dir.glob("*.safetensors"))
    _write_log(run_dir, log)
    run_info.update(
        status="done",
        steps_done=cfg.steps,
        train_seconds=round(wall, 2),
        tokens_per_s=round(tps, 1) if tps else None,
        mfu=_mfu(cfg, tok.vocab_size, tps / ctx.world, device, precision) if tps else None,
        final_loss=log[-1]["loss"] if log else None,
    )
    write_json(run_dir / "run.json", run_info)
    _drop_checkpoints(run_dir)
    return run_dir


def _drop_partial_saves(run_dir: Path) -> None:
    """Checkpoints whose save was killed outright (SIGKILL, power loss: no cleanup ran); never read, as only a
    complete one is renamed to checkpoint-*."""
    for tmp in run_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_checkpoints(run_dir: Path) -> None:
    """A finished run keeps its weights, not its checkpoints (optimizer state: twice the weights again)."""
    for old in run_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    (run_dir / "latest.json").unlink(missing_ok=True)


def _mfu(cfg: TrainConfig, vocab: int, tps: float, device: str, precision: str) -> float:
    """Model FLOPs utilisation against a matrix-multiply peak at the run's precision (`perf.matmul_peak`: measured
    once per process)."""
    from .perf import matmul_peak, train_flops_per_token

    dtype = precision_dtype(precision)
    flops = train_flops_per_token(cfg.d_model, cfg.layers, cfg.d_ff, vocab, cfg.train_len)
    return round(tps * flops / matmul_peak(device, dtype), 4)
