"""A store's ARVs: the layer and the per-class tap sums read from the store, through the closed form of
``utils.method.arv`` (only the rows needed are read)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..method.arv import arv_from_profile, conv_from_meta, tap_maps, tap_profile
from . import layout as st


def store_conv(store: st.Store) -> nn.Conv2d:
    """The layer ``L`` (float64) rebuilt from the store's geometry, weight and bias."""
    bias_path = os.path.join(store.path, "layer_bias.npy")
    bias = np.load(bias_path, allow_pickle=False) if os.path.isfile(bias_path) else None
    return conv_from_meta(store.meta, store.layer_weight, bias)


def class_tap_sums(store: st.Store, rows: list[int]) -> torch.Tensor:
    """The tap sums of classes ``rows`` (len(rows) x C_in x T, float64); a store of format 1 keeps whole input
    maps, which convert exactly: ``T = sum_hw S * M`` with the layer's tap maps."""
    if store.format_version >= 2:
        T = np.asarray(store.tap_sums[rows], dtype=np.float64)
        return torch.from_numpy(T).reshape(len(rows), T.shape[1], -1)
    maps = tap_maps(store_conv(store), tuple(store.input_sums.shape[-2:]))
    return torch.cat([tap_profile(torch.from_numpy(np.asarray(store.input_sums[rows[lo:lo + 64]], np.float64)), maps)
                      for lo in range(0, len(rows), 64)])  # 64 classes at a time: input maps can be large


def group_profiles(store: st.Store, groups: list[list[int]]) -> torch.Tensor:
    """Tap profiles (G x C_in x T, float64): the mean over all training images of each group of classes
    (a class, or a concept's classes) of what each kernel tap sees; only the needed rows are read."""
    counts = store.class_counts
    n = torch.tensor([float(counts[sorted(g)].sum()) for g in groups], dtype=torch.float64)
    if (n == 0).any():
        raise UserError(f"classes {groups[int((n == 0).nonzero()[0, 0])]} have no training images in the store")
    used = sorted({t for g in groups for t in g})
    row = {t: i for i, t in enumerate(used)}
    T = class_tap_sums(store, used)
    sums = torch.stack([T[[row[t] for t in sorted(g)]].sum(0) for g in groups])
    return sums / n.view(-1, 1, 1)


def concept_arvs(store: st.Store, channel: int, concepts: list[list[int]]) -> torch.Tensor:
    """ARVs (k x C_in, float64) of ``channel`` for each concept: the mean of r_i over all training images
    of the concept's classes (stage 3; for single classes the ARVs stage 2 compares)."""
    conv = store_conv(store)
    return arv_from_profile(conv.weight[channel], group_profiles(store, [sorted(set(c)) for c in concepts]))


def candidate_arvs(store: st.Store, candidates: dict[int, list[int]], batch: int = 4096) -> dict[int, torch.Tensor]:
    """ARVs of every candidate for each of its relevant classes: ``c -> (m x C_in float64)``, computed
    in batches of ``batch`` (channel, class) rows."""
    if not candidates:
        return {}
    conv = store_conv(store)
    used = sorted({t for ts in candidates.values() for t in ts})
    row = {t: i for i, t in enumerate(used)}
    profiles = group_profiles(store, [[t] for t in used])  # |used| x C_in x T
    cs = torch.tensor([c for c, ts in candidates.items() for _ in ts])
    ts = torch.tensor([row[t] for ts_ in candidates.values() for t in ts_])
    flat = torch.cat([arv_from_profile(conv.weight[cs[lo:lo + batch]], profiles[ts[lo:lo + batch]])
                      for lo in range(0, len(cs), batch)])
    return dict(zip(candidates, torch.split(flat, [len(v) for v in candidates.values()])))
