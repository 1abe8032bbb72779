"""Running a stage on several processes (GPUs, machines) under `torchrun`.

torchrun starts one process per device and tells each who it is through environment
variables: RANK (0..WORLD_SIZE-1, global), WORLD_SIZE, LOCAL_RANK (index on this machine),
MASTER_ADDR / MASTER_PORT (where rank 0 listens). `session()` reads them and joins the
process group; without them (a plain `lra ...` run) it is a no-op and every helper here
degrades to the single-process answer, so stage code needs no `if distributed` branches
for the common helpers.

Backend: NCCL when the stage's tensors live on CUDA, else gloo (CPU; also what the tests
use). The embed stage only exchanges small Python objects and waits at barriers, so it
always uses gloo.

`GlobalBatchNorm1d` is BatchNorm1d with the statistics of the global batch (all ranks),
written with two differentiable all-reduces. `torch.nn.SyncBatchNorm` does the same on
CUDA but refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU", torch
2.15), so CPU runs (and the gloo tests) could not use it; one implementation that works on
every backend keeps the multi-process objective equal to the single-process one
everywhere, and it is the one the tests exercise.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_ENV = "LRA_DIST_TIMEOUT"
"""Seconds a collective (barrier included) may wait for the other ranks; torch's default
(10 min NCCL, 30 min gloo) when unset."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is. The default is a single process (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)

    @property
    def enabled(self) -> bool:
        """True when collectives run (a process group of more than one rank)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes outputs."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer "
                          "(set by torchrun)") from None


def env_context() -> DistContext:
    """The rank / world size that torchrun set, without joining anything.

    Only WORLD_SIZE > 1 counts as distributed; RANK must then be set too.
    """
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return DistContext()
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    return DistContext(rank=rank, world_size=world, local_rank=rank if local is None else local)


def launched() -> bool:
    """True inside a torchrun worker (WORLD_SIZE set, even to 1)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> DistContext:
    """The context of the process group this process has joined (single if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    local = _env_int("LOCAL_RANK")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=dist.get_rank() if local is None else local,
                       backend=str(dist.get_backend()))


def rank_device(device: str, ctx: DistContext) -> str:
    """One device per rank: a bare "cuda" becomes cuda:LOCAL_RANK when distributed. An
    explicit cuda:N is kept (the user chose it); cpu stays cpu."""
    if not ctx.enabled or device != "cuda":
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ConfigError(f"LOCAL_RANK {ctx.local_rank} but only {count} CUDA device(s) are "
                          "visible on this machine; lower --nproc-per-node")
    return f"cuda:{ctx.local_rank}"


def _timeout() -> datetime.timedelta | None:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be > 0")
    return datetime.timedelta(seconds=seconds)


def init(*, device: str = "cpu", backend: str | None = None) -> DistContext:
    """Join the process group torchrun described (env:// rendezvous), or do nothing.

    device: the device this rank computes on ("cpu", "cuda:N"); picks the backend (NCCL
    for CUDA, gloo otherwise) unless `backend` is given. Idempotent.
    """
    ctx = env_context()
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():
        return current()
    if backend is None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed backend {backend!r}: valid: nccl, gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    kwargs: dict[str, Any] = {"backend": backend}
    timeout = _timeout()
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(**kwargs)
    log.info("rank %d of %d (local rank %d) joined the %s process group", ctx.rank,
             ctx.world_size, ctx.local_rank, backend)
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, backend)


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(*, device: str = "cpu", backend: str | None = None) -> Iterator[DistContext]:
    """with session(device=dev) as ctx: ...  -- init on entry, cleanup on exit."""
    ctx = init(device=device, backend=backend)
    try:
        yield ctx
    finally:
        if ctx.enabled:
            cleanup()


# --------------------------------------------------------------------------- helpers
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank`'s contiguous share of n rows: near-equal, the first
    n % world ranks one row more (the split torch.tensor_split makes)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def round_robin(items: Sequence[Any], ctx: DistContext) -> list[Any]:
    """This rank's items: items[rank], items[rank + world], ..."""
    return list(items[ctx.rank::ctx.world_size])


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, *, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (`obj` is ignored elsewhere)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def send_object(obj: Any, ctx: DistContext, *, dst: int) -> None:
    """Point-to-point: send a picklable object to rank `dst` (pair with recv_object)."""
    dist.send_object_list([obj], dst=dst)


def recv_object(ctx: DistContext, *, src: int) -> Any:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable object (e.g. a variable-size NumPy chunk), in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In place: the element-wise sum over ranks (no autograd). Returns `tensor`."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def relaunch(nproc: int, args: Sequence[str]) -> int:
    """Run `python -m stages <args>` under torchrun on this machine with `nproc`
    processes (--standalone: a free local port, no MASTER_ADDR needed) and return its
    exit code. What `lra embed --nproc N` does, so `dvc repro` can use several GPUs
    without changing the stage's command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "stages", *args]
    log.info("relaunching under torchrun: %s", " ".join(cmd[1:]))
    return subprocess.run(cmd, check=False).returncode


# --------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradients:
    with per-rank losses L_r of a total L = sum_r L_r, dL/dx_local is then exact."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (the rows of
    every rank), so a batch split over ranks is normalised as it would be whole.

    input (B_r, H) on each rank; mean and biased variance of the concatenated batch by two
    all-reduces (sum and count, then the centred sum of squares: the two-pass formula,
    no cancellation); the running variance gets the unbiased estimate, as BatchNorm1d.
    Gradients flow through the statistics to every rank (differentiable all-reduce).
    Evaluation mode, or no process group, is plain BatchNorm1d. Same parameters,
    buffers and state_dict keys as BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (B, H) input, got {tuple(x.shape)}")
        count = x.new_full((1,), float(x.shape[0]))  # a fill, not a host-device copy
        sums = _AllReduceSum.apply(torch.cat([x.sum(dim=0), count]))  # (H + 1,)
        n = sums[-1]  # global batch size
        mean = sums[:-1] / n  # (H,)
        centred = x - mean  # (B_r, H)
        var = _AllReduceSum.apply(centred.pow(2).sum(dim=0)) / n  # (H,) biased
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor: Any = (self.momentum if self.momentum is not None
                               else 1.0 / self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * (n / (n - 1)), factor)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` by a GlobalBatchNorm1d that shares its
    parameters and buffers (so optimiser state, EMA lists and state_dict keys are
    unchanged). Returns the (possibly new) top module."""
    if type(module) is nn.BatchNorm1d:
        new = GlobalBatchNorm1d(module.num_features, eps=module.eps, momentum=module.momentum,
                                affine=module.affine,
                                track_running_stats=module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
