"""Process placement under torchrun: rank, world size and the device this process trains on.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python -m`
run has none of them and is rank 0 of a world of 1 (no process group is created).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    node: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, local_rank: int) -> torch.device:
    """`auto` takes this process's GPU when CUDA is available, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for but CUDA is not available; pass --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str, timeout_seconds: float = 300.0) -> DistContext:
    """Read torchrun's environment and join the process group when there is more than one process."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        # NCCL for GPUs; gloo lets the same code run (and be tested) on CPUs.
        # A bounded timeout turns a dead peer into a failed job (restarted from its checkpoint), not a hang.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_seconds))
    node = os.environ.get("NODE_NAME") or socket.gethostname()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, node=node)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
