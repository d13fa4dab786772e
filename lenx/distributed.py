"""torch.distributed under torchrun: NCCL on CUDA, gloo on CPU. Without torchrun's environment,
a single process with rank 0 of 1 and no process group.

A process that stops (an error, Ctrl-C, SIGTERM) says so in the process group's store and aborts its process
group, so that no other process waits for it in a collective: they stop at once too, and `lenx.cli.main` reports
only the first process's error."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


_store = None  # lenx's keys in the process group's store, once init has joined one


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init() -> Context:
    """Join torchrun's process group (once); a plain process gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        global _store
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store, rank, world = next(dist.rendezvous("env://"))  # what init_process_group does, keeping the store
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
        # one namespace per attempt: torchrun --max-restarts keeps its store across restarts
        _store = dist.PrefixStore(f"lenx/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(ctx: Context, device: str | None) -> str:
    if device:
        return check_device(device)
    return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """A device lenx can run on here, or one clear line saying why not."""
    from .errors import LenxError

    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise LenxError(f"unknown device '{device}'; use cpu or cuda[:N]")
    if dev.type == "cpu":
        if dev.index:  # torch accepts cpu:N, but every index is the same CPU: refuse rather than pretend
            raise LenxError(f"--device {device}: the CPU has no device index; use --device cpu")
        return "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "sees no GPU" if torch.backends.cuda.is_built() else f"{torch.__version__} is a build without CUDA"
        raise LenxError(f"--device {device}: this torch {why}; use --device cpu")
    if dev.index is not None and dev.index >= count:
        raise LenxError(f"--device {device}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def from_main(ctx: Context, fn):
    """Run fn on rank 0 only and hand its result (or its exception) to every rank."""
    if not ctx.active:
        return fn()
    box = [None, None]
    if ctx.main:
        try:
            box[0] = fn()
        except Exception as e:  # re-raised on every rank, so no rank waits forever
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def gather(ctx: Context, obj) -> list:
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def mean(ctx: Context, value: torch.Tensor) -> torch.Tensor:
    if ctx.active:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world
    return value


def stop(how: str, message: str = "") -> tuple[int, str, str] | None:
    """This process is stopping (`how`: "failed" or "interrupted", with its error `message`). The first process of
    the job to stop records (rank, how, message) in the store; then the process group is aborted, so that a
    collective waiting for this process ends at once. Returns the record of the first process to stop (this one's
    own, or another's), or None outside a process group."""
    if _store is None or not dist.is_initialized():
        return None
    try:
        first = _store.compare_set("stopped", "", f"{dist.get_rank()} {how} {message}").decode()
        rank, how, message = first.split(" ", 2)
        first = int(rank), how, message
    except Exception:  # the store went away (torchrun's agent is stopping): nothing to tell or learn
        first = None
    try:
        dist.distributed_c10d._abort_process_group()  # the process group's own teardown, which waits for no one
    except Exception:
        pass
    return first


def close() -> None:
    """The command finished on this process: leave the process group as torch asks (every rank gets here). The
    barrier keeps a rank that finished early (rank 1 while rank 0 writes the run's files) from tearing the group
    down under the others, and the collection frees what still holds it (DDP's reducer, its pending gloo work)
    while the interpreter is whole: without both, a rank sometimes aborted at exit ("terminate called without an
    active exception") after a finished run."""
    if dist.is_initialized():
        import gc

        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
