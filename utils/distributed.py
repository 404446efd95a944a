"""Distributed set-up read from the environment that ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import UserError


@contextmanager
def distributed_context(device: str = "auto", gpu: int | None = None) -> Iterator[tuple[int, int, str]]:
    """Yield ``(rank, world_size, device)``; under torchrun, join the process group for the block.

    Plain ``python script.py`` is rank 0 of 1 and ``device``/``gpu`` pass through unchanged.
    Under torchrun, a CUDA request (``auto`` with CUDA present, ``cuda``, ``cuda:N``, ``--gpu``)
    gives each process the GPU of its local rank and the nccl backend; otherwise every process
    runs on the CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, device
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or gpu is not None
    use_cuda = (device == "auto" and torch.cuda.is_available()) or wants_cuda
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError(f"device {device if device != 'auto' else 'cuda'} requested but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU: this machine shows {torch.cuda.device_count()} "
                            "(use --nproc_per_node at most the number of GPUs)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    # Ranks wait for each other at the end of the pass, which can take hours on ImageNet.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=72))
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()
