"""Training across processes with torch.distributed: what a round needs when one device is not enough.

A launcher (``torchrun``, or MONAI Label's multi-GPU option, which starts ``torchrun``) starts one
process per device and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each process trains a replica wrapped in
DistributedDataParallel (DDP), which averages the gradients over all processes in every backward
pass, so the replicas stay identical: gloo between CPU processes, NCCL between GPUs (process i on
``cuda:LOCAL_RANK``). Without a launcher (WORLD_SIZE unset or 1) every function here is a no-op,
so the single-process path is unchanged.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from medprompt.errors import InputError
from medprompt.model.checkpoint import atomic_torch_save, resolve_device


@dataclass
class DistContext:
    """This process's place in the run: rank among ``world`` processes, and the device it trains on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, prints progress and validates."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InputError(f"environment variable {name}={value!r} is not a whole number >= 0 (set by torchrun)")
    return number


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group this process was launched into (once; later calls return the same context).

    ``device`` is resolved as everywhere else (``auto``: the GPU when there is one); with several
    processes on CUDA each takes ``cuda:LOCAL_RANK`` (the launcher's CUDA_VISIBLE_DEVICES picks
    which physical GPUs those are) and the backend is NCCL, else gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(0, 1, 0, dev)
    if rank >= world:
        raise InputError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             f"start at most that many processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise InputError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start with torchrun")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        atexit.register(_destroy)  # a process that never calls shutdown() still leaves the group cleanly
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise InputError(f"a process group of {dist.get_world_size()} is already running here, "
                         f"but the environment says {world}")
    return DistContext(rank, world, local_rank, dev)


def wrap_model(net: torch.nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP around ``net`` when there are several processes (its weights are broadcast from rank 0).

    Parameters used outside ``forward`` (e.g. MedPromptNet.region_logits, called on ``unwrap(net)``)
    are averaged too, as long as ``find_unused_parameters`` stays False: DDP then waits for every
    parameter's gradient instead of marking those it did not see in ``forward`` as unused.
    """
    if ctx.world <= 1:
        return net
    # 1x1 convolutions' gradients may come with other strides on their size-1 axes: DDP then copies
    # them (a few hundred numbers) and warns at every process's first backward pass.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (its state_dict has no ``module.`` prefix), else ``net`` itself."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def _active(ctx: DistContext) -> bool:
    return ctx.world > 1 and dist.is_initialized()


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here (e.g. until rank 0 has written the model file)."""
    if _active(ctx):
        dist.barrier(device_ids=[ctx.device.index]) if ctx.device.type == "cuda" else dist.barrier()


def all_mean(value: float, ctx: DistContext) -> float:
    """The mean of ``value`` over all processes (losses for the log; any-rank flags as mean > 0)."""
    if not _active(ctx):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64 if ctx.device.type == "cpu" else torch.float32,
                     device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world


T = TypeVar("T")


def shard(items: Sequence[T], ctx: DistContext) -> tuple[list[T], int]:
    """This process's share of ``items`` (every ``world``-th, from its rank) and on how many processes each
    item is: data parallel, so a round's studies are taught, encoded and held once across the processes,
    not once per process. With fewer items than processes every process takes them all (a share is never
    empty, so every process runs the same passes)."""
    if ctx.world <= 1 or len(items) < ctx.world:
        return list(items), max(1, ctx.world)
    return list(items[ctx.rank :: ctx.world]), 1


def which_process(ctx: DistContext) -> str:
    """", process 2 of 4" for progress bars that every process shows (each its own share); "" alone."""
    return f", process {ctx.rank + 1} of {ctx.world}" if ctx.world > 1 else ""


def all_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over all processes (a copy; ``t`` itself when there is one process)."""
    if not _active(ctx):
        return t
    out = t.detach().clone().to(ctx.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def gathered(items: Sequence[T], ctx: DistContext) -> list[T]:
    """Every process's ``items`` in rank order, each item once (e.g. the names of the studies trained on)."""
    if not _active(ctx):
        return list(items)
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, list(items))
    out: list[T] = []
    for part in parts:
        out.extend(x for x in part if x not in out)
    return out


def end_of_step(ctx: DistContext, done: int, steps: int, save_every: int, time_limit_s: float | None,
                started: float, save: Callable[[], None], state: Callable[[], dict], state_path,
                bar=None) -> bool:
    """The bookkeeping after training step ``done`` that every training loop shares: whether the time
    limit is reached (every rank agrees, or DDP would wait forever); on rank 0, every ``save_every``
    steps, at the last step and when stopping, the model file (``save()``) and beside it the resumable
    state (``state()`` plus the step counts, written atomically). True: stop now (``bar`` closed, a line
    printed)."""
    out_of_time = time_limit_s is not None and time.perf_counter() - started > time_limit_s
    if ctx.world > 1 and time_limit_s is not None:
        out_of_time = all_mean(float(out_of_time), ctx) > 0
    if ctx.is_main and (done % save_every == 0 or done == steps or out_of_time):
        save()
        atomic_torch_save({**state(), "step": done, "steps": steps}, state_path)
    if out_of_time:
        if bar is not None:
            bar.close()
        if ctx.is_main:
            print(f"time limit reached at step {done}/{steps}; saved, run again to resume")
    return out_of_time


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (idempotent)."""
    if _active(ctx):
        _destroy()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_torchrun(args: Sequence[str], nproc: int, env: dict[str, str] | None = None,
                 on_line: Callable[[str], None] = print) -> None:
    """Run ``medprompt ARGS`` in ``nproc`` processes on this machine (``torchrun --standalone``).

    Every line the processes write (tqdm's carriage-return refreshes included, at most one per
    ``TQDM_MININTERVAL`` seconds) goes to ``on_line``; a failure raises RuntimeError with the
    processes' own ``error:`` lines (the CLI's one-line errors), else the last lines.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "medprompt", *args]
    full_env = {**os.environ, "TQDM_MININTERVAL": "15", "PYTHONUNBUFFERED": "1", **(env or {})}
    tail: deque[str] = deque(maxlen=12)
    errors: list[str] = []
    # torchrun leaves a torchelastic_* folder of its own in the temp folder on every run: given one that
    # is removed afterwards, it leaves nothing.
    with tempfile.TemporaryDirectory(prefix="medprompt_torchrun_") as scratch, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**full_env, "TMPDIR": scratch}) as proc:
        assert proc.stdout is not None
        pending = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    if " error: " in f" {line}" and line not in errors:  # the CLI's and argparse's
                        errors.append(line)
                    on_line(line)
        if pending.strip():
            tail.append(pending.decode(errors="replace").rstrip())
            on_line(tail[-1])
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"torchrun ({nproc} processes: medprompt {' '.join(args[:1])}) failed with exit code "
                           f"{code}: " + " | ".join(errors[:3] or tail))
