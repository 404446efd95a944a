"""Everything device-specific, in one place: which device, how batches and models get there, and the
distributed backend. The rest of the code is the same on CPU and GPU (and covered by the CPU tests)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError


def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """``auto``: cuda if available, else cpu; ``cuda`` or ``auto`` with ``--gpu N`` (the reference's flag):
    ``cuda:N``. Anything torch does not know, or CUDA where there is none, is a UserError."""
    if gpu is not None:
        if gpu < 0:
            raise UserError(f"--gpu must be a GPU index (0, 1, ...), not {gpu}")
        if device in ("auto", "cuda"):
            device = f"cuda:{gpu}"
        elif device != f"cuda:{gpu}":
            raise UserError(f"--device {device} and --gpu {gpu} disagree: give one of them")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device} requested but this machine shows {torch.cuda.device_count()} GPU(s)")
    return dev


def pin(device: torch.device) -> bool:
    """Whether loaders should pin host memory (for asynchronous copies to a GPU)."""
    return device.type == "cuda"


def to_device(x: torch.Tensor, device: torch.device, images: bool = False) -> torch.Tensor:
    """``x`` on ``device`` without waiting (pinned memory); image batches go channels-last on a GPU."""
    fmt = torch.channels_last if images and device.type == "cuda" and x.dim() == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=fmt)


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` ready for ``device`` (channels-last on a GPU), leaving the caller's model as it was given:
    a copy when it would have to move or change its memory format."""
    params = next(iter(model.parameters()), None)
    here = params is None or params.device == device
    if here and device.type != "cuda":
        return model
    out = copy.deepcopy(model).to(device)
    return out.to(memory_format=torch.channels_last) if device.type == "cuda" else out


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend(device: torch.device | str) -> str:
    """The torch.distributed backend for ranks on ``device``: nccl for GPUs, gloo for CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"
