"""Distribution, applied from outside the model code (torchrun sets the environment).

Model code is single-device. Training under `torchrun --nproc_per_node N` splits every global
batch across ranks; each rank runs on its own device (`cuda:LOCAL_RANK`) and
`torch.nn.parallel.DistributedDataParallel` averages gradients during backward (the same update as
one process on the whole batch). CPU uses gloo, CUDA uses NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits among the training processes."""

    rank: int = 0  # this process's index among all of them
    size: int = 1  # how many processes train together
    local_rank: int = 0  # its index on its node (which GPU it uses)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes; a plain `python` run is a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_device(name: str, world: World) -> torch.device:
    """The device a process trains on: "auto" is cuda:LOCAL_RANK where CUDA is available, else the CPU; "cuda"
    without an index is cuda:LOCAL_RANK; an explicit "cpu" or "cuda:N" is kept as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def all_mean(value: float, world: World) -> float:
    """Mean of a Python number over ranks (for logging)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world.size


def all_gather(value: object, world: World) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    if world.size == 1:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    """Wait until every rank gets here (e.g. before the main rank reads what all wrote)."""
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    """Leave the process group `init_world` joined."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: object, world: World) -> object:
    """Rank 0's `value` (any picklable object) on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
