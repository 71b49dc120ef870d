"""Process-group setup from the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def setup() -> DistEnv:
    """Join the process group; a plain single process becomes a world of one on loopback."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (a C++ build of minutes
        # on a small machine, repeated in every fresh container) that serves only inference all-reduce
        # among ranks of one host; training all-reduces go through gloo. Mark it unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return env


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def mean_over_ranks(value: float, env: DistEnv) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    torch_dist.all_reduce(t)
    return float(t.item()) / env.world_size


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any, so all ranks take the same branch."""
    if env.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


T = TypeVar("T")


def broadcast_from_main(value: T, env: DistEnv) -> T:
    """Rank 0's ``value`` on every rank (a small picklable object: a decision, not a tensor)."""
    if env.world_size == 1:
        return value
    box: list[object] = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]  # rank 0 sent a T


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        torch_dist.barrier()
