"""Distributed set-up read from the environment that ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import datetime
import os
import secrets
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .device import backend, resolve_device
from ..errors import Reported, UserError, error_line, say

T = TypeVar("T")


@contextmanager
def distributed_context(device: str = "auto", gpu: int | None = None) -> Iterator[tuple[int, int, str]]:
    """Yield ``(rank, world_size, device)``; under torchrun, join the process group for the block.

    Plain ``python script.py`` is rank 0 of 1 on the device ``device``/``gpu`` name (``--gpu N``: ``cuda:N``).
    Under torchrun, a CUDA request (``auto`` with CUDA present, ``cuda``, ``cuda:N``, ``--gpu``)
    gives each process the GPU of its local rank and the nccl backend; otherwise every process
    runs on the CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, str(resolve_device(device, gpu))
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
    dist.init_process_group(backend(device), timeout=datetime.timedelta(hours=72))
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of rank's contiguous share of ``n`` items, cut at whole batches.

    The ``ceil(n / batch_size)`` batches of a single-process pass go out in contiguous blocks (the first
    ``nb % world`` ranks get one more), so every rank's loader forms exactly the batches of the single
    run: each image meets the same batch neighbours and gives bit-identical numbers. Uneven counts
    work; a rank may get nothing when there are fewer batches than ranks.
    """
    nb = -(-n // batch_size) if n else 0
    first, last = rank * nb // world, (rank + 1) * nb // world
    return min(n, first * batch_size), min(n, last * batch_size)


def run_together(step: Callable[[], T], world: int, device: torch.device | str = "cpu", what: str = "the job") -> T:
    """Run ``step`` on every rank and return its value, then agree: if it failed anywhere, it fails
    everywhere (a barrier too). The failing rank re-raises its own error; the others raise a UserError
    that points to it. With ``world`` 1 this is just ``step()``.

    On a failure every rank's one line is out before any rank goes on to end: the launcher stops the
    other processes as soon as one ends, which would otherwise cut some of them short of saying theirs.
    """
    error, value = None, None
    try:
        value = step()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        error = e
    if world > 1 and isinstance(error, (UserError, OSError)) and not isinstance(error, Reported):
        # before the others know (they may end, and the launcher stop this process), on a line of its own even
        # when rank 0's progress bar is half-way through one
        say("\n" + error_line(error))
        error = Reported(str(error))
    failed = 0
    if world > 1:
        t = torch.tensor([error is not None], dtype=torch.int64, device=_comm_device(device))
        dist.all_reduce(t)
        failed = int(t.item())
    if error is None and failed:
        error = UserError(f"{what} stopped: {failed} other process(es) of this job failed (see their error)")
    if failed:
        if isinstance(error, UserError) and not isinstance(error, Reported):
            say("\n" + error_line(error))
            error = Reported(str(error))
        dist.all_reduce(torch.zeros(1, dtype=torch.int64, device=_comm_device(device)))  # every line is out
    if error is not None:
        raise error
    return value


def all_gather_rows(rows: torch.Tensor, world: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every rank's ``rows`` (n_r x D float64, n_r may differ) stacked in rank order, on every rank (CPU).

    Plain tensor collectives (no pickled objects): the row counts are gathered first, then rows padded
    to the longest share. With ``world`` 1 this is ``rows`` itself.
    """
    if world <= 1:
        return rows
    dev = _comm_device(device)
    rows = rows.to(dev, torch.float64)
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = max(int(c.item()) for c in counts)
    padded = torch.zeros(longest, rows.shape[1], dtype=torch.float64, device=dev)
    padded[: rows.shape[0]] = rows
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    return torch.cat([s[: int(c.item())] for s, c in zip(shares, counts)]).cpu()


def reduce_over_ranks(value: float, world: int, device: torch.device | str = "cpu", op: str = "max") -> float:
    """``value`` combined over the ranks: ``op`` "max" (a job's time is its slowest process) or "sum"."""
    if world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return float(t.item())


def broadcast_float(value: float | None, world: int, device: torch.device | str = "cpu") -> float | None:
    """Rank 0's ``value`` on every rank (None travels as NaN and comes back as None)."""
    if world <= 1:
        return value
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=_comm_device(device))
    dist.broadcast(t, 0)
    v = float(t.item())
    return None if v != v else v


def check_one_folder(folder: str, world: int, device: torch.device | str = "cpu", flag: str = "--store_dir",
                     what: str = "the job") -> None:
    """Under torchrun, stop every process before any work unless all of them see ``folder`` as ONE folder.

    Ranks started in different working folders read a relative ``--store_dir`` as different folders, and
    machines without a shared file system each see their own: the job would fail half-way (or never
    complete its store). Process 0 leaves a file with a random name in ``folder`` (in its nearest existing
    ancestor while it does not exist yet: nothing is created) and every process looks for it. A process
    that cannot see it fails with one line naming both paths; the others stop with it (:func:`run_together`).
    Nothing of a store is touched, so it stays as it was: resumable. With ``world`` 1 this does nothing.
    """
    if world <= 1:
        return
    rank, dev = dist.get_rank(), _comm_device(device)
    here = _nearest_folder(folder)
    tag = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64, device=dev)
    dist.broadcast(tag, 0)
    probe = f".same-folder-{int(tag.item()):016x}"
    path0 = _broadcast_text(os.path.abspath(folder), dev)

    def leave() -> None:
        if rank == 0:
            try:
                with open(os.path.join(here, probe), "w"):
                    pass
            except OSError as e:
                raise UserError(f"cannot write into {folder}: {e.strerror}") from None

    def look() -> None:
        seen = os.path.isfile(os.path.join(here, probe))
        for _ in range(20):  # a shared file system may show a new file a moment later
            if seen:
                break
            time.sleep(0.1)
            seen = os.path.isfile(os.path.join(here, probe))
        if not seen:
            mine = os.path.abspath(folder)
            where = (f"it is {mine} here and {path0} for process 0" if mine != path0 else
                     f"{mine} is not the folder that process 0 sees under that name")
            raise UserError(f"process {rank} does not see the folder of process 0 as {flag} {folder}: {where}; all "
                            "processes must see one folder: start them in the same working folder, or give an "
                            f"absolute {flag} on a file system that every machine shares")

    try:
        run_together(leave, world, device, what)
        run_together(look, world, device, what)
    finally:
        if rank == 0 and os.path.exists(os.path.join(here, probe)):
            os.remove(os.path.join(here, probe))


def _nearest_folder(folder: str) -> str:
    """``folder`` when it exists, else its nearest existing ancestor."""
    here = os.path.abspath(folder)
    while not os.path.isdir(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    return here


def _broadcast_text(text: str, dev: torch.device) -> str:
    """Rank 0's ``text`` on every rank (its UTF-8 bytes in a tensor: no pickled objects)."""
    data = torch.tensor(list(text.encode()) if dist.get_rank() == 0 else [], dtype=torch.uint8, device=dev)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(n, 0)
    if dist.get_rank() != 0:
        data = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


def _comm_device(device: torch.device | str) -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, else the CPU."""
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
