"""One image pass for every command that reads images: stage 1, the rho scoring, stage 4, the top-k search,
the pictures and the layer command.

A :class:`Runner` says where passes run (the device, loader settings, progress, this process's rank under
torchrun); an :class:`ImagePass` is one walk over a list of batches of an :class:`utils.data.images.ImageList`:

    runner = Runner.of(cfg)                       # cfg: any RunOptions (device, gpu, batch_size, rank, ...)
    model = runner.model(lm.model)                # on the device, once (the caller's model is left as it is)
    ip = runner.image_pass(images, batches, lm.preprocess, "stage 4")
    ran = ip.run(lambda batches: [f(b.x, b.labels) for b in batches])    # every rank; failures agreed
    rows = ip.gather_rows(torch.cat(ran.value))   # all ranks' rows in dataset order; ran.seconds, ran.images

The pass owns the loader (pinned memory on a GPU), moving every batch to the device (images channels-last
on a GPU), the check for unreadable images, the progress bar, the share of this rank (contiguous blocks of
whole batches: each image meets the batch neighbours of a single-process run) and the agreement of all
ranks when one fails. A command is the few lines it does with each :class:`Batch`: tensors it gets are
already where the model is, so a device mismatch cannot happen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from ..data.images import ImageList, Preprocess, check_batch, make_loader
from .device import model_on, pin, resolve_device, synchronize, to_device
from ..errors import UserError
from .distributed import all_gather_rows, batch_shard, reduce_over_ranks, run_together

T = TypeVar("T")


@dataclass(kw_only=True)
class RunOptions:
    """What every image pass takes (stages 1, 3, 4, the pictures and the layer pipeline): each stage's options
    extend it; the commands fill it from their flags (``utils.cli.parsing``), the Python API from its arguments."""

    model: str = "resnet50"
    weights: str = "default"
    layer: str | None = None
    batch_size: int = 64
    device: str = "auto"
    gpu: int | None = None
    num_workers: int = 4
    progress: bool = True
    class_index: str | None = None  # --class_index FILE: JSON {folder: logit index}
    rank: int = 0  # under torchrun: this process's rank and the number of processes (utils.passes.distributed)
    world_size: int = 1
    input_size: int | None = None  # --input_size, --resize, --mean, --std: the transform (None: the model's own)
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def check(self) -> None:
        """The numbers every pass takes, checked once for every stage: a UserError before any work."""
        for flag, v, least in (("--batch_size", self.batch_size, 1), ("--num_workers", self.num_workers, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise UserError(f"{flag} must be a whole number >= {least}, not {v!r}")


@dataclass(frozen=True)
class Batch:
    """One batch of a pass: ``x`` (B x 3 x H x W) and ``labels`` (B,) on the pass's device; ``targets`` (the
    same labels) and ``index`` (dataset positions) on the host, to read without a device round trip."""

    x: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Runner:
    """Where and how image passes run: ``device``, loader settings, progress bars, and under torchrun this
    process's ``rank`` of ``world`` (rank 0 alone shows progress and, by the callers' rule, writes files)."""

    device: torch.device
    batch_size: int = 64
    num_workers: int = 4
    progress: bool = True
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, opts) -> "Runner":
        """The runner of a :class:`RunOptions` (device name resolved, ``--gpu`` applied)."""
        return cls(resolve_device(str(opts.device), opts.gpu), opts.batch_size, opts.num_workers, opts.progress,
                   opts.rank, opts.world_size)

    @property
    def lead(self) -> bool:
        """Whether this is the process that prints and writes (rank 0)."""
        return self.rank == 0

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` on this runner's device (a copy when it has to move; the caller's model is unchanged)."""
        return model_on(model, self.device)

    def together(self, step: Callable[[], T], what: str) -> T:
        """``step()`` on every rank; if it fails on one, it fails on all (see :func:`run_together`)."""
        return run_together(step, self.world, self.device, what)

    def slowest(self, seconds: float) -> float:
        """A job's time: the largest of every rank's ``seconds``."""
        return reduce_over_ranks(seconds, self.world, self.device)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (n_r x D) stacked in rank order, float64 on the host, on every rank."""
        return all_gather_rows(rows.double().cpu(), self.world, self.device)

    def image_pass(self, images: ImageList, batches: list[list[int]], transform: Preprocess | None, desc: str,
                   shard: bool = True) -> "ImagePass":
        """A pass over ``batches`` (lists of positions in ``images``); with ``shard`` this rank takes its
        contiguous block of whole batches, else (a caller that shares out work itself) all of them."""
        if shard:
            lo, hi = batch_shard(len(batches), 1, self.rank, self.world)
            batches = batches[lo:hi]
        return ImagePass(self, images, batches, transform, desc)


def layer_copies_agree(slow: torch.Tensor, fast: Callable[[], torch.Tensor]) -> bool:
    """Whether copies of a batch made at a layer (``fast()``: the network before the layer run once) give the
    outputs that copies of the input gave (``slow``). A network whose later part reads a tensor from before the
    layer (a residual connection) gives other outputs there, or raises: False. Ask it of a batch with two or more
    images; one image's copies agree even there."""
    try:
        out = fast()
    except RuntimeError:
        return False
    return out.shape == slow.shape and bool(torch.allclose(out, slow, rtol=1e-4, atol=1e-5))


def add_by_label(sums: dict[int, torch.Tensor], counts: dict[int, int], values: torch.Tensor,
                 targets: torch.Tensor) -> None:
    """Add each label's rows of ``values`` (B x ...; ``targets``: the batch's labels) to ``sums[label]`` and their
    number to ``counts[label]``, in place: per-class sums over a pass, a batch at a time."""
    for t in targets.unique().tolist():
        mask = (targets == t).to(values.device)
        part = values[mask].sum(0)
        sums[t] = sums[t] + part if t in sums else part
        counts[t] = counts.get(t, 0) + int(mask.sum())


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Per row of ``t`` (a batch's images, logits, relevance): whether all its values are finite (a bool tensor on
    t's device, to look at once per chunk or pass, not per batch)."""
    return torch.isfinite(t).reshape(len(t), -1).all(1)


def plain_batches(indices: Iterable[int], batch_size: int) -> list[list[int]]:
    """``indices`` in order, cut into batches of ``batch_size`` (the last one shorter)."""
    indices = list(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


@dataclass(frozen=True)
class Ran(Generic[T]):
    """What :meth:`ImagePass.run` gives back: the step's ``value``, the ``seconds`` of the slowest rank and the
    ``images`` all ranks read."""

    value: T
    seconds: float
    images: int


class ImagePass:
    """One walk over ``batches`` of ``images`` through ``transform`` on ``runner``'s device; iterate it for
    :class:`Batch` es, or :meth:`run` a step on every rank."""

    def __init__(self, runner: Runner, images: ImageList, batches: list[list[int]], transform: Preprocess | None,
                 desc: str):
        self.runner, self.images, self.batches, self.transform, self.desc = runner, images, batches, transform, desc

    @property
    def count(self) -> int:
        """Images this rank reads."""
        return sum(len(b) for b in self.batches)

    def __iter__(self) -> Iterator[Batch]:
        r = self.runner
        loader = make_loader(self.images, batch_sampler=self.batches, num_workers=r.num_workers,
                             pin_memory=pin(r.device), transform=self.transform)
        desc = self.desc if r.world == 1 else f"{self.desc} (rank 0 of {r.world})"
        bar = tqdm(total=self.count, unit="img", desc=desc, disable=not r.progress or not r.lead, dynamic_ncols=True)
        try:
            for x, labels, index in loader:
                check_batch(self.images, labels, index)
                yield Batch(to_device(x, r.device, images=True), to_device(labels, r.device), labels, index)
                bar.update(len(labels))
        except BaseException:
            bar.leave = False  # clear the bar, so that an error message starts on a clean line
            raise
        finally:
            bar.close()

    def run(self, step: Callable[[Iterator[Batch]], T], what: str | None = None) -> Ran[T]:
        """``step(batches)`` on every rank (it consumes this pass); all ranks agree on failure. Its value, with the
        slowest rank's seconds and the images all ranks read (:class:`Ran`)."""
        t0 = time.perf_counter()

        def walk() -> T:
            with torch.no_grad():
                value = step(iter(self))
            synchronize(self.runner.device)
            return value

        value = self.runner.together(walk, what or self.desc)
        seconds = self.runner.slowest(time.perf_counter() - t0)
        return Ran(value, seconds, int(reduce_over_ranks(self.count, self.runner.world, self.runner.device, "sum")))

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' ``rows`` in rank order = the order of the unsharded batches (see :meth:`Runner.gather_rows`)."""
        return self.runner.gather_rows(rows)
