"""Faults a notebook user meets with two kinds of models (issue 28, items 4 and 5).

4. timm's weight-standardised convolutions (``StdConv2d``: BiT; ``ScaledStdConv2d``: NFNets) as the layer of
   interest and elsewhere in the network: the split uses the weight they apply, and the split network, the
   checkpoint and a saved result rebuild exactly the original's logits. Every check compares with the ORIGINAL
   timm model run here, never with the toolkit's internal logit check; the filters are checked against the
   standardisation written out here.
5. Which tokens count: those that reach the logits, checked against the gradient of the logits at the layer's
   output computed here (a distilled DeiT: class and distillation token; an average-pool ViT with register
   tokens: the patch tokens alone); the patch grid takes the prefix-token count from the model.

Real timm architectures with random weights at 32 px, nothing downloaded.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import utils.api as dc
from conftest import COLOURS
from utils.data.images import Preprocess
from utils.errors import UserError
from utils.model.loading import loaded_model
from utils.model.receptive import receptive_field
from utils.model.hooks import resolve_positions
from utils.method.split import sweep
from utils.model.surgery import export_network, load_checkpoint, split_network
from utils.model.units import Unit, prefix_tokens, unit_at

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, StdConv2d  # noqa: E402

FAST = dict(device="cpu", num_workers=0, progress=False, batch_size=8)
SIDE = 32


def pictures(n: int, seed: int, side: int = SIDE) -> TensorDataset:
    """``n`` noisy solid-colour pictures per class of COLOURS (4 classes) as normalised tensors, with labels."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for t, rgb in enumerate(COLOURS.values()):
        for _ in range(n):
            p = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (side, side, 3)), 0, 255) / 255.0
            x.append(torch.from_numpy((p - 0.5) / 0.25).permute(2, 0, 1).float())
            y.append(t)
    return TensorDataset(torch.stack(x), torch.tensor(y))


def logit_gap(net: nn.Module, original: nn.Module, x: torch.Tensor) -> float:
    """Largest |net(x) - original(x)| relative to the largest |original(x)| (which must not be 0)."""
    with torch.no_grad():
        want = original(x)
        got = net(x)
    scale = want.abs().max().item()
    assert scale > 0
    return (got - want).abs().max().item() / scale


def standardised(conv: nn.Conv2d) -> torch.Tensor:
    """The filters a timm StdConv2d / ScaledStdConv2d applies, written out: per output filter ``(w - mean) /
    sqrt(var + eps)`` (biased variance), times ``gain * gamma / sqrt(fan_in)`` for the scaled kind."""
    w = conv.weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    out = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + conv.eps)
    if isinstance(conv, ScaledStdConv2d):
        out = out * conv.gain.detach().double().reshape(-1, 1) * conv.scale
    return out.reshape_as(w).float()


def nf_resnet26() -> nn.Module:
    """timm's NF-ResNet-26 (every conv a ScaledStdConv2d) with 4 outputs; its residual gains start at 0, which
    would leave every block but the stem out of the logits: they get random values."""
    torch.manual_seed(0)
    m = timm.create_model("nf_resnet26", pretrained=False, num_classes=4).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("gain"):
                p.copy_(0.5 + torch.rand_like(p))
    return m


def bit() -> nn.Module:
    """timm's BiT ResNetV2-50x1 (every conv but the 1x1 head a StdConv2d) with 4 outputs; the last conv of each
    block starts at zero (then its standardised weight is 0 too): it gets random values."""
    torch.manual_seed(0)
    m = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=4).eval()
    with torch.no_grad():
        for n, mod in m.named_modules():
            if n.endswith("conv3"):
                mod.weight.normal_()
    return m


def random_splits(unit: Unit, channels: dict[int, int], seed: int = 0):
    """A split of each ``channel`` into ``channels[c]`` concepts from random ARVs (rho 0.55), of ``unit``'s weight."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, k in channels.items():
        sw = sweep(unit.weight.detach()[c], torch.randn(k, unit.in_channels, generator=g, dtype=torch.float64))
        assert all(len(v) > 0 for v in sw.sources(10).values())
        out.append(sw.split(c, 10))
    return out


# ---------------------------------------------------------------- 4. weight-standardised convolutions


def test_an_nfnet_through_the_api_keeps_the_logits_and_loads_as_the_original(tmp_path):
    """The issue's notebook: nf_resnet26 through dc.disentangle with a ScaledStdConv2d as the layer of interest
    (and everywhere else). Before: the run ended in ``layer ... is a ScaledStdConv2d`` when the result was
    loaded. Now result.network, the saved and loaded result, and load_checkpoint with the original model all
    compute the original timm model's logits, and the split layer holds the standardised filters."""
    m = nf_resnet26()
    pristine = copy.deepcopy(m)
    layer = "stages.3.0.conv1"
    train, val = pictures(3, seed=0), pictures(2, seed=1)
    res = dc.disentangle(m, train, val, layer=layer, max_channels=1, tau=0.0, top_k=2, check_images=8, log=None,
                         store_dir=str(tmp_path / "store"), **FAST)
    assert res.channels, "nothing split: the test would check nothing"
    x = val.tensors[0]
    assert logit_gap(res.network, pristine, x) <= 1e-5
    conv = pristine.get_submodule(layer)
    expanded = res.network.get_submodule(layer).expanded
    assert type(expanded) is nn.Conv2d
    C = conv.out_channels
    unsplit = [c for c in range(C) if c not in res.channels]
    assert torch.allclose(expanded.weight[unsplit], standardised(conv)[unsplit], atol=1e-6)
    assert not torch.allclose(expanded.weight[unsplit], conv.weight[unsplit], atol=1e-3)  # not the raw weight
    saved = res.save(str(tmp_path / "saved"))
    again = dc.load(saved, pristine)
    assert logit_gap(again.network, pristine, x) <= 1e-5
    assert sorted(again.channels) == sorted(res.channels)
    for c in res.channels:
        assert torch.allclose(again.units(x)[c], res.units(x)[c])
    for name, p in m.state_dict().items():  # the caller's model is untouched
        assert torch.equal(p, pristine.state_dict()[name]), name
    assert isinstance(m.get_submodule(layer), ScaledStdConv2d)


def test_bit_split_at_a_stdconv2d_rebuilds_the_original_from_its_checkpoint(tmp_path):
    """BiT: a StdConv2d layer of interest with StdConv2d everywhere else. The checkpoint of the split network,
    loaded into the original timm model, computes its logits (before: 'layer ... is a StdConv2d'); splits made
    from the raw weight instead of the applied one would change them."""
    m = bit()
    layer = "stages.3.blocks.2.conv2"
    lm = loaded_model(copy.deepcopy(m), "bit", "random", None, Preprocess(resize=SIDE, crop=SIDE))
    unit = unit_at(lm.model, layer)
    assert torch.allclose(unit.weight, standardised(m.get_submodule(layer)), atol=1e-6)
    splits = {layer: random_splits(unit, {3: 2, 100: 3})}
    path = str(tmp_path / "bit.pt")
    export_network(lm.model, "bit", splits, path)
    x = pictures(1, seed=2).tensors[0]
    loaded = load_checkpoint(path, m)
    assert logit_gap(loaded, m, x) <= 1e-5
    assert logit_gap(split_network(m, splits), m, x) <= 1e-5  # split_network of the original model itself
    assert isinstance(m.get_submodule(layer), StdConv2d)  # unchanged
    raw = {layer: random_splits(Unit(m.get_submodule(layer)), {3: 2, 100: 3})}  # the raw weight: a wrong split
    assert logit_gap(split_network(lm.model, raw), m, x) > 1e-3


def test_standardised_convs_elsewhere_save_and_load_exactly(tmp_path):
    """A plain layer of interest with timm's StdConv2d and ScaledStdConv2d before it, through the API. Before:
    loading the result failed with ``Missing key(s) ... "2.gain"``; and without the ScaledStdConv2d, the StdConv2d
    standardised its already standardised weight again (eps 1e-3 here makes that visible)."""
    def net(scaled: bool) -> nn.Module:
        torch.manual_seed(0)
        second = ScaledStdConv2d(8, 8, 3, padding=1) if scaled else nn.Conv2d(8, 8, 3, padding=1)
        m = nn.Sequential(StdConv2d(3, 8, 3, padding=1, eps=1e-3), nn.ReLU(), second, nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        if scaled:
            with torch.no_grad():
                second.gain.copy_(0.5 + torch.rand_like(second.gain))
        return m.eval()

    train, val = pictures(3, seed=0), pictures(2, seed=1)
    x = val.tensors[0]
    for scaled in (True, False):
        m = net(scaled)
        res = dc.disentangle(m, train, val, layer="4", max_channels=1, tau=0.0, top_k=2, check_images=8, log=None,
                             store_dir=str(tmp_path / f"store{scaled}"), **FAST)
        assert res.channels
        assert logit_gap(res.network, m, x) <= 1e-5
        again = dc.load(res.save(str(tmp_path / f"saved{scaled}")), m)
        assert logit_gap(again.network, m, x) <= 1e-5, scaled
        assert type(again.network[0]) is nn.Conv2d
        assert torch.allclose(again.network[0].weight, standardised(m[0]), atol=1e-6)


def test_nfnet_checkpoint_with_the_head_split_loads_into_the_original(tmp_path):
    """NF-ResNet's Linear head split: ScaledStdConv2d everywhere else (before: 'Missing key(s) ... gain')."""
    m = nf_resnet26()
    lm = loaded_model(copy.deepcopy(m), "nf", "random", None, Preprocess(resize=SIDE, crop=SIDE))
    splits = {"head.fc": random_splits(unit_at(lm.model, "head.fc"), {1: 2})}
    path = str(tmp_path / "nf.pt")
    export_network(lm.model, "nf", splits, path)
    x = pictures(1, seed=3).tensors[0]
    assert logit_gap(load_checkpoint(path, m), m, x) <= 1e-5


# ---------------------------------------------------------------- 5. which tokens count


def vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=SIDE, depth=2,
                             **kw).eval()


def deit_distilled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4, img_size=SIDE).eval()


TOKEN_CASES = {  # model, its last block's MLP output, the positions auto must give there, its prefix tokens
    "deit_distilled": (deit_distilled, "blocks.11.mlp.fc2", "tokens[:2]", 2),
    "vit_avg_registers": (lambda: vit(global_pool="avg", reg_tokens=4), "blocks.1.mlp.fc2", "tokens[5:]", 5),
    "vit_avg_class": (lambda: vit(global_pool="avg"), "blocks.1.mlp.fc2", "tokens[1:]", 1),
    "vit_token_registers": (lambda: vit(reg_tokens=4), "blocks.1.mlp.fc2", "cls", 5),
    "vit_avg_no_class": (lambda: vit(global_pool="avg", class_token=False), "blocks.1.mlp.fc2", "all", 0),
}


def reaching_tokens(m: nn.Module, module: nn.Module, x: torch.Tensor) -> set[int]:
    """The tokens of ``module``'s output (B, N, C) at which the gradient of the logits (random projections)
    is not zero, computed here with a tensor hook."""
    seen = {}

    def hook(_m, _i, out):
        out.retain_grad()
        seen["a"] = out

    h = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xx = x.clone().requires_grad_(True)
            y = m(xx)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    finally:
        h.remove()
    g = seen["a"].grad
    return {int(i) for i in (g.abs().sum((0, 2)) > 0).nonzero().flatten()}


def counted_tokens(unit: Unit, n: int) -> set[int]:
    """The token indices ``unit.counted`` keeps of a sequence of ``n``."""
    idx = torch.arange(n, dtype=torch.float32)[None, :, None]  # (1, N, 1): token i holds i
    return {int(v) for v in unit.counted(idx).flatten()}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_the_counted_tokens_are_those_that_reach_the_logits(case):
    """Before: a distilled DeiT counted all its tokens (class, distillation and patches), an average-pool ViT
    its class and register tokens too. Now the counted tokens of the last block are those at which the logits'
    gradient is not zero, and every token of the first block (attention mixes them)."""
    build, layer, expected, prefix = TOKEN_CASES[case]
    m = build()
    for p in m.parameters():
        p.requires_grad_(False)
    x = pictures(1, seed=4).tensors[0][:2]
    n = (SIDE // 16) ** 2 + prefix
    for name, want in ((layer, expected), ("blocks.0.mlp.fc2", "all")):
        module = m.get_submodule(name)
        got = resolve_positions(m, module, "auto", SIDE)
        reach = reaching_tokens(m, module, x)
        assert reach and counted_tokens(Unit(module, got), n) == reach, (name, got, reach)
        assert got == want, (name, got)
    assert prefix_tokens(m) == prefix


def test_a_distilled_deit_through_the_api_counts_class_and_distillation_tokens(tmp_path):
    """The API on a distilled DeiT: the store, the result and its concept units count tokens 0 and 1 alone, and
    the split network keeps the original's logits."""
    m = deit_distilled()
    train, val = pictures(3, seed=0), pictures(2, seed=1)
    res = dc.disentangle(m, train, val, max_channels=1, tau=0.0, top_k=2, check_images=8, log=None,
                         store_dir=str(tmp_path / "store"), **FAST)
    assert res.layer == "blocks.11.mlp.fc2" and res.positions == "tokens[:2]"
    assert res.channels
    x = val.tensors[0]
    assert logit_gap(res.network, m, x) <= 1e-5
    for c, s in res.channels.items():
        u = res.units(x)[c]
        assert u.shape == (len(x), s.k, 2, 1)


def test_the_patch_grid_takes_the_prefix_from_the_model():
    """A ViT with a class and 4 register tokens on a 2 x 2 patch grid has 9 tokens: the old guess (what is left
    after the largest square) took them for a 3 x 3 grid. The grid and the receptive field use the model's 5
    prefix tokens; torchvision's ViT declares its class token; a sequence whose rest is no square is refused."""
    import torchvision

    m = vit(reg_tokens=4)
    layer = "blocks.1.mlp.fc2"
    for positions in ("all", "cls"):
        unit = unit_at(m, layer, positions)
        t = torch.randn(2, 9, 192)
        grid = unit.grid(t)
        assert grid.shape == (2, 192, 2, 2)
        assert torch.equal(grid.flatten(2).transpose(1, 2), t[:, 5:])
    rf = receptive_field(m, unit_at(m, layer, "tokens[5:]"), (SIDE, SIDE))
    assert rf.out_hw == (2, 2) and rf.size == 16
    assert receptive_field(m, unit_at(m, layer, "cls"), (SIDE, SIDE)).size == SIDE  # the class token: the whole image

    tv = torchvision.models.VisionTransformer(image_size=SIDE, patch_size=16, num_layers=1, num_heads=2,
                                              hidden_dim=16, mlp_dim=32, num_classes=3)
    assert prefix_tokens(tv) == 1 and prefix_tokens(nn.Sequential(nn.Identity(), m)) == 5
    assert prefix_tokens(nn.Sequential(nn.Conv2d(3, 4, 1))) is None
    with pytest.raises(UserError, match="form no square grid"):
        Unit(m.get_submodule(layer), "all", prefix=2).grid(torch.randn(1, 9, 192))


class TwoTokenHead(nn.Module):
    """Tokens through a Linear; the logits read tokens 0 and 2 alone (not one run of tokens)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.fc(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(t[:, 0] + t[:, 2])


def test_tokens_that_reach_the_logits_in_two_runs_are_refused_in_one_line():
    m = TwoTokenHead().eval()
    with pytest.raises(UserError) as e:
        resolve_positions(m, m.fc, "auto", 16)
    assert "\n" not in str(e.value) and "0, 2 of 4" in str(e.value) and "not one run" in str(e.value)
    assert resolve_positions(m, m.fc, "all", 16) == "all"
    assert resolve_positions(m, m.fc, "tokens[:3]", 16) == "tokens[:3]"
    with pytest.raises(UserError, match="--positions must be auto, all, cls or tokens"):
        resolve_positions(m, m.fc, "patches", 16)
    with pytest.raises(UserError, match="positions must be all, cls or tokens"):
        Unit(m.fc, "tokens[2]")
    with pytest.raises(UserError, match="a Conv2d's positions all count"):
        Unit(m.embed, "tokens[1:]")
