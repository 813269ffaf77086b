"""The process group of a torchrun launch: who this process is, and the few collectives the trainer needs.

Launched by torchrun (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set), the trainer joins
a process group: on GPUs NCCL for CUDA tensors and gloo for CPU ones, on CPU gloo. Launched plainly, it is rank 0
of 1 and nothing here communicates.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def restarted() -> bool:
    """True when torchrun (--max-restarts) relaunched this job after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> Processes:
    """Joins torchrun's process group (if there is one) and returns this process's place in it."""
    if not launched_by_torchrun():
        return Processes()
    procs = Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(procs.local_rank)
    if not dist.is_initialized():
        # The step's statistics and the stop flag are CPU tensors, which NCCL cannot reduce: gloo carries them
        # while NCCL carries the gradients.
        dist.init_process_group("cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo")
    return procs


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_across(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes (in place), a no-op for one process."""
    if procs.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(obj, procs: Processes) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if procs.world_size == 1:
        return [obj]
    gathered = [None] * procs.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(procs: Processes) -> None:
    if procs.world_size > 1:
        dist.barrier()
