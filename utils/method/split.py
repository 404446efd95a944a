"""The split of one channel into ``k`` concept channels and a residual: index sets, filters, the rho sweep.

For channel ``c`` of a Conv2d ``L`` with filter ``W[c]`` (C_in x kh x kw) and the ARVs ``A_1..A_k``
(C_in each) of ``k >= 2`` concepts, at a given ``rho``:

    input k' goes to S_j for the FIRST j with  rho * A_j[k'] > max over l != j of A_l[k'];  S_0 = the rest
    D_j = W[c] with the inputs of every S_l (l != j) set to zero;   Res = W[c] on S_0 only
    sum_j D_j - (k - 1) Res = W[c]

For k = 2 this is the paper's rule: S1 = {rho A1 > A2}, S2 = {not S1, rho A2 > A1}; D1 + D2 - Res = W[c].

The ``positive`` rule adds one condition: input k' may go to S_j only where A_j[k'] > 0 (it excites concept j
on average); every other input is shared. An input that inhibits on average then stays in every concept
filter, instead of being taken from the others, which would fire without their inhibition. The order
(first j), the rho sweep and the identity are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

RHOS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.00
SPLIT_RULES = ("paper", "positive")


def oriented(t: torch.Tensor, signs) -> torch.Tensor:
    """``t`` (k x ...) with row j times ``signs[j]`` (+1 or -1): filters, ARVs or biases read in their concepts'
    directions."""
    return t * torch.tensor([float(v) for v in signs], dtype=t.dtype, device=t.device).view(-1, *[1] * (t.dim() - 1))


def sub_names(k: int) -> tuple[str, ...]:
    """Names of a split's sub-channels, in the order of :meth:`Split.weight`: D1 .. Dk, Res."""
    return tuple(f"D{j}" for j in range(1, k + 1)) + ("Res",)


def assign_inputs(A: torch.Tensor, rho: float, rule: str = "paper") -> torch.Tensor:
    """Which set each input channel goes to (C_in, int64): j in 1..k for S_j, 0 for the shared S_0.

    ``A``: the concepts' ARVs, k x C_in, compared as signed values; ``rule``: ``paper`` or ``positive`` (an
    input may go to S_j only where A_j > 0).
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, not {rule!r}")
    A = A.double()
    out = torch.zeros(A.shape[1], dtype=torch.int64)
    for j in range(A.shape[0]):
        others = torch.cat([A[:j], A[j + 1:]]).max(0).values
        mine = (rho * A[j] > others) & (out == 0)
        out[mine & (A[j] > 0) if rule == "positive" else mine] = j + 1
    return out


def split_filters(weight_c: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``D`` (k x C_in x kh x kw) and ``Res`` (C_in x kh x kw) from filter ``W[c]`` and an input assignment."""
    w = weight_c.detach()
    shared = (assign == 0)[:, None, None]
    D = torch.stack([w * (shared | (assign == j)[:, None, None]).to(w.dtype) for j in range(1, k + 1)])
    return D, w * shared.to(w.dtype)


@dataclass
class Split:
    """One split channel: ``channel`` of its layer, its concept filters ``D`` (k x C_in x kh x kw) and ``Res``."""

    channel: int
    D: torch.Tensor
    Res: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.D.shape[0])

    def weight(self) -> torch.Tensor:
        """The sub-channels' filters stacked ((k + 1) x C_in x kh x kw): D_1 .. D_k, Res."""
        return torch.cat([self.D, self.Res[None]])

    def oriented(self, signs) -> "Split":
        """The split read in its concepts' directions: concept filter j times ``signs[j]`` (+1 or -1), for pictures
        and feature visualisations that look for what raises ``s_j * D_j`` (not a network: the identity needs
        the unoriented filters)."""
        return Split(self.channel, oriented(self.D, signs), self.Res)


@dataclass
class Sweep:
    """Every rho of one split: ``rhos`` (R,), ``assign`` (R x C_in), ``D`` (R x k x C_in x kh x kw), ``Res``."""

    rhos: torch.Tensor
    assign: torch.Tensor
    D: torch.Tensor
    Res: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.D.shape[1])

    def split(self, channel: int, i: int) -> Split:
        """The i-th rho's filters as a :class:`Split` of ``channel``."""
        return Split(channel, self.D[i], self.Res[i])

    def sources(self, i: int) -> dict[str, list[int]]:
        """The index sets of the i-th rho: ``{"concept1": [...], ..., "conceptk": [...], "shared": [...]}``."""
        a = self.assign[i]
        out = {f"concept{j}": (a == j).nonzero().flatten().tolist() for j in range(1, self.k + 1)}
        out["shared"] = (a == 0).nonzero().flatten().tolist()
        return out

    def replace(self, i: int, assign: torch.Tensor, weight_c: torch.Tensor) -> "Sweep":
        """This sweep with the i-th rho's index sets (and filters) replaced by ``assign`` (C_in, 0..k): how a
        searched split takes the place of the sets it started from (the identity is checked)."""
        D, Res = split_filters(weight_c, assign.to(self.assign), self.k)
        check_identity(weight_c, D[None], Res[None])
        out = Sweep(self.rhos, self.assign.clone(), self.D.clone(), self.Res.clone())
        out.assign[i], out.D[i], out.Res[i] = assign.to(self.assign), D.to(self.D), Res.to(self.Res)
        return out

    def distinct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rhos with the same index sets share filters (and scores): ``first`` (U,) = one rho index per
        distinct split, in sweep order; ``inverse`` (R,) = which distinct split each rho has."""
        first: dict[tuple, int] = {}
        inverse = []
        for i, row in enumerate(self.assign.tolist()):
            inverse.append(first.setdefault(tuple(row), len(first)))
        starts = [inverse.index(u) for u in range(len(first))]
        return torch.tensor(starts), torch.tensor(inverse)


def check_identity(weight_c: torch.Tensor, D: torch.Tensor, Res: torch.Tensor) -> None:
    """``sum_j D_j - (k - 1) Res = W[c]`` for every row of ``D`` (R x k x ...) and ``Res`` (R x ...): exact in
    float64 for float32 filters; float64 filters round in the sum (k of them, a few ulps)."""
    k = D.shape[1]
    w = weight_c.detach().double()
    total = D.double().sum(1) - (k - 1) * Res.double()
    tol = 0.0 if weight_c.dtype != torch.float64 else 4 * k * torch.finfo(torch.float64).eps * float(w.abs().max())
    if total.numel() and not float((total - w.expand_as(Res)).abs().max()) <= tol:
        raise AssertionError("the concept filters do not add up to the original")  # cannot happen: a partition


def sweep(weight_c: torch.Tensor, A: torch.Tensor, rhos: Iterable[float] = RHOS, rule: str = "paper",
          signs: Iterable[int] | None = None) -> Sweep:
    """Index sets and filters for every rho, from filter ``W[c]`` (C_in x kh x kw) and ARVs ``A`` (k x C_in),
    by the split ``rule`` (``paper`` or ``positive``); ``signs``: the concepts' orientations (k values of +1 or
    -1, default all +1): the rule compares the oriented ARVs ``s_j * A_j``."""
    rhos = [float(r) for r in rhos]
    k = A.shape[0]
    if signs is not None:
        A = oriented(A.double(), signs)
    assign = torch.stack([assign_inputs(A, r, rule) for r in rhos])
    parts = [split_filters(weight_c, a, k) for a in assign]
    D, Res = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    check_identity(weight_c, D, Res)
    return Sweep(torch.tensor(rhos, dtype=torch.float64), assign, D, Res)


@dataclass
class FilterBank:
    """Sub-channels of one layer applied together: ``keys[s] = (channel, name)`` (name ``original``, ``D1`` ..
    ``Dk`` or ``Res``); ``weight`` S x C_in x kh x kw; ``bias`` (S,) or None (channel c's bias on each)."""

    keys: list[tuple[int, str]]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def index(self, channel: int, name: str) -> int:
        return self.keys.index((int(channel), name))

    @staticmethod
    def join(banks: list["FilterBank"]) -> "FilterBank":
        """One bank holding the sub-channels of ``banks``, in order."""
        return FilterBank(sum((b.keys for b in banks), []), torch.cat([b.weight for b in banks]),
                          None if banks[0].bias is None else torch.cat([b.bias for b in banks]))

    def to(self, device) -> "FilterBank":
        return FilterBank(self.keys, self.weight.to(device), None if self.bias is None else self.bias.to(device))

    def maps(self, unit, x: torch.Tensor) -> torch.Tensor:
        """Output maps (B x S x H' x W') of every sub-channel on the layer input ``x`` (B x C_in x H x W), by the
        layer's geometry: ``unit.apply`` (a :class:`utils.model.units.Unit`)."""
        return unit.apply(x, self.weight, self.bias)


def filter_bank(conv, splits: list[Split], names: tuple[str, ...] | None = None) -> FilterBank:
    """Stack the sub-channels ``names`` of every split of ``conv`` into one bank (default: ``original`` and
    the concept channels ``D1 .. Dk``, for any number of splits, each with its own k)."""
    keys, ws, bs = [], [], []
    for s in splits:
        for n in names or ("original",) + sub_names(s.k)[:-1]:
            w = conv.weight[s.channel] if n == "original" else s.Res if n == "Res" else s.D[int(n[1:]) - 1]
            keys.append((int(s.channel), n))
            ws.append(w.detach().to(conv.weight))
            if conv.bias is not None:
                bs.append(conv.bias[s.channel].detach())
    return FilterBank(keys, torch.stack(ws), torch.stack(bs) if bs else None)


def oriented_bank(conv, split: Split, signs) -> FilterBank:
    """The sub-channels that read ``split`` in its concepts' directions: ``original``; ``-original`` (the original
    times -1) when a concept's sign is -1; ``D1 .. Dk`` times their signs, bias included."""
    signs = [int(v) for v in signs]
    keys = [(int(split.channel), "original")] + ([(int(split.channel), "-original")] if min(signs) < 0 else [])
    keys += [(int(split.channel), f"D{j}") for j in range(1, split.k + 1)]
    sign = [1] + ([-1] if min(signs) < 0 else []) + signs
    w = oriented(torch.cat([conv.weight[split.channel].detach()[None].expand(len(keys) - split.k, *split.D.shape[1:]),
                            split.D.to(conv.weight)]), sign)
    b = None if conv.bias is None else oriented(conv.bias[split.channel].detach().expand(len(keys)), sign)
    return FilterBank(keys, w, b)


def reading(signs, j: int) -> str:
    """The key under which :func:`oriented_bank` reads the original unit for concept ``j`` (from 1)."""
    return "-original" if signs and int(signs[j - 1]) < 0 else "original"


def channel_bank(conv, channels: list[int]) -> FilterBank:
    """The original filters of ``channels`` of ``conv`` as a bank (keys ``(c, "original")``)."""
    return FilterBank([(int(c), "original") for c in channels], conv.weight.detach()[channels],
                      None if conv.bias is None else conv.bias.detach()[channels])
