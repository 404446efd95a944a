"""Distributed set-up read from the environment that ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[tuple[int, int, str]]:
    """Yield ``(rank, world_size, device)``; under torchrun, join the process group for the block.

    GPUs use nccl with one GPU per local rank; CPUs use gloo. Plain ``python script.py`` is rank 0 of 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, device
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    # Ranks wait for each other at the end of the pass, which can take hours on ImageNet.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=72))
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()
