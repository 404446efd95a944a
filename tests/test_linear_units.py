"""Position-wise ``Linear`` layers as the layer of interest (``utils.model.units``): ViT, DeiT, Swin MLPs on tokens
``(B, N, C)`` and ConvNeXt's channels-last 1x1 convolutions ``(B, H, W, C)``.

Every number is compared with an independent computation: the relevance with back-propagation to the IMAGE in
float64 (as ``test_stage1.relevance_via_image`` does it, per position here), the stage-1 store's ARVs with
autograd of their definition on the layer's raw input (written here, not taken from ``utils.model.units``), the split
network's logits with the original's, the Linear's whole pipeline with a twin network whose layer is the
equivalent 1x1 ``Conv2d``, and a planted token model whose one polysemantic neuron has a known answer. Random
weights, no downloads; the models are built small (ViT-B/16 for 32 px images, DeiT 48 px, Swin and ConvNeXt 64 px).
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import write_image_folder
from test_stage1 import assert_relevance_close, backprop_seen
from utils.store.arvs import concept_arvs
from utils.data.images import ImageDataset, Preprocess, list_images
from utils.stages.splitting import Stage3Config, disentangle_channel
from utils.stages.relevance import Stage1Config, compute_relevance
from utils.model.loading import LoadedModel, default_layer, get_layer
from utils.store.records import rho_key
from utils.model.hooks import capture_layer, layer_input, relevance_batch, resolve_positions
from utils.method.split import Split, sweep
from utils.store.layout import Store
from utils.model.surgery import split_network
from utils.model.units import Unit

timm = pytest.importorskip("timm")

COLORS3 = {"A_red": (220, 30, 30), "B_blue": (30, 30, 220), "C_gray": (128, 128, 128)}


# ---------------------------------------------------------------- the models (random weights, 3 classes)


def frozen(model: nn.Module, name: str, side: int, weights: str = "random") -> LoadedModel:
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, name, weights, 3, None, Preprocess(resize=side, crop=side))


@functools.lru_cache(maxsize=None)
def vit_b_16() -> LoadedModel:
    """torchvision's ViT-B/16 built for 32 px images (``image_size=32``: 2 x 2 patch tokens and the class token;
    the same layers as at 224 px, 40x fewer tokens). torchvision zero-initialises ``heads.head``, so with
    ``weights=None`` every relevance would be 0: the head gets random weights here."""
    torch.manual_seed(0)
    m = torchvision.models.vit_b_16(weights=None, num_classes=3, image_size=32)
    nn.init.normal_(m.heads.head.weight, std=0.05)
    nn.init.normal_(m.heads.head.bias, std=0.05)
    return frozen(m, "vit_b_16", 32)


@functools.lru_cache(maxsize=None)
def convnext_tiny() -> LoadedModel:
    """torchvision's ConvNeXt-T at 64 px; the last block's layer scale (1e-6 at init) set to 1, so that the layer
    of interest's output weighs in the logits (a broken split must show)."""
    torch.manual_seed(0)
    m = torchvision.models.convnext_tiny(weights=None, num_classes=3)
    nn.init.normal_(m.classifier[2].weight, std=0.05)
    with torch.no_grad():
        m.features[7][2].layer_scale.fill_(1.0)
    return frozen(m, "convnext_tiny", 64)


@functools.lru_cache(maxsize=None)
def deit() -> LoadedModel:
    torch.manual_seed(0)
    return frozen(timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=48),
                  "timm/deit_tiny_patch16_224", 48)


@functools.lru_cache(maxsize=None)
def swin() -> LoadedModel:
    torch.manual_seed(0)
    return frozen(timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64),
                  "timm/swin_tiny_patch4_window7_224", 64)


@functools.lru_cache(maxsize=None)
def convnext_atto() -> LoadedModel:
    """timm's ConvNeXt-atto builds its MLP from 1x1 Conv2d (``conv_mlp=True``); ``conv_mlp=False`` gives the
    channels-last Linear. The last block's layer scale (``gamma``, 1e-6 at init) set to 1."""
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", num_classes=3, conv_mlp=False)
    with torch.no_grad():
        m.stages[3].blocks[1].gamma.fill_(1.0)
    return frozen(m, "timm/convnext_atto", 64)


VIT_LAST, VIT_MIDDLE = "encoder.layers.encoder_layer_11.mlp.3", "encoder.layers.encoder_layer_5.mlp.3"

# id: (model, layer, --positions given to stage 1, the positions that must result, the default layer?)
CASES = {
    "vit_b_16-last-auto": (vit_b_16, VIT_LAST, "auto", "cls", True),
    "vit_b_16-last-all": (vit_b_16, VIT_LAST, "all", "all", True),
    "vit_b_16-middle-auto": (vit_b_16, VIT_MIDDLE, "auto", "all", False),
    "convnext_tiny": (convnext_tiny, "features.7.2.block.5", "auto", "all", True),
    "deit_tiny": (deit, "blocks.11.mlp.fc2", "auto", "cls", True),
    "swin_tiny": (swin, "layers.3.blocks.1.mlp.fc2", "auto", "all", True),
    "convnext_atto": (convnext_atto, "stages.3.blocks.1.mlp.fc2", "auto", "all", True),
}
@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """The models and references are built once for this file and let go after it."""
    yield
    for cached in (vit_b_16, convnext_tiny, deit, swin, convnext_atto, backprop_to_image):
        cached.cache_clear()


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> str:
    """1 red, 1 blue and 1 gray 32-px training image (each model's preprocess resizes them)."""
    return write_image_folder(str(tmp_path_factory.mktemp("colours") / "data"), n_train=1, n_val=1, colors=COLORS3,
                              size=32)


# ---------------------------------------------------------------- independent computations


def linear_arv_autograd(linear: nn.Linear, channel: int, x: torch.Tensor, positions: str) -> torch.Tensor:
    """The ARV of ``channel`` by its definition, on the Linear's raw input ``x`` ((B, N, C_in) tokens or
    (B, H, W, C_in) channels-last), float64: mean over images of ``sum over positions of x[..., k] * dS/dx[..., k]``
    with ``S`` the sum over the counted positions (every one, or token 0 for ``cls``) of ``linear(x)[..., channel]``."""
    x = x.double().detach().requires_grad_(True)
    b = None if linear.bias is None else linear.bias.double()
    with torch.enable_grad():
        out = F.linear(x, linear.weight.double(), b)
        counted = out[:, 0] if positions == "cls" else out
        (g,) = torch.autograd.grad(counted[..., channel].sum(), x)
    return (x * g).reshape(len(x), -1, x.shape[-1]).sum(1).mean(0).detach()


@functools.lru_cache(maxsize=None)
def backprop_to_image(build, layer: str, data: str):
    """The reference's way to the relevance, in float64, once per model, layer and image folder: the images
    (through the model's preprocess) require grad, the full graph is back-propagated from the label logits to
    the image, and a tensor hook reads the gradient at the layer output. Returns the images and labels, the
    products ``a * dz_label/da`` per position (B x positions x C, the layer's own layout flattened: for tokens,
    token 0 first), the predictions and the layer's raw input (float64)."""
    lm = build()
    images, labels = direct_images(data, lm)
    m = copy.deepcopy(lm.model).double().eval()
    seen, logits = backprop_seen(m, m.get_submodule(layer), images, labels)
    ag = seen["a"] * seen["g"]
    return images, labels, ag.reshape(len(images), -1, ag.shape[-1]), logits.detach().argmax(1), seen["x"]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| relative to the largest |ref| (which must not be 0: no comparison of zeros)."""
    scale = ref.abs().max().item()
    assert scale > 0, "vacuous comparison: the reference is all zeros"
    return (got.double() - ref.double()).abs().max().item() / scale


def direct_images(data_dir: str, lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Every train image through ``lm``'s preprocess, and the labels, in list order (the store's order)."""
    imgs = list_images(data_dir, "train")
    ds = ImageDataset(imgs, lm.preprocess)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(imgs.targets)


def run_stage1(data: str, store_dir, lm: LoadedModel, layer: str, positions: str = "auto") -> Store:
    s = compute_relevance(Stage1Config(data_dir=data, store_dir=str(store_dir), model=lm.name, weights=lm.weights,
                                         layer=layer, positions=positions, batch_size=4, num_workers=0,
                                         device="cpu", progress=False), loaded=lm)
    return Store.open(s["store"])


# ---------------------------------------------------------------- 1. relevance and ARVs


@pytest.mark.parametrize("case", list(CASES))
def test_relevance_and_arvs_match_backprop_and_autograd(case, colour_data, tmp_path):
    """Stage 1 on a Linear: the positions it resolves (``--positions auto``: ``resolve_positions``; cls for a
    ViT's last block read through its class token, all elsewhere), the store's relevance and predictions against
    back-propagation to the image (float64), relevance_batch's unrounded R too, and the closed-form ARVs of the
    store (``concept_arvs``) against autograd of the ARV's definition on the same images."""
    build, layer, requested, expected, is_default = CASES[case]
    lm = build()
    module = lm.model.get_submodule(layer)
    assert isinstance(module, nn.Linear)
    assert (default_layer(lm.model, lm.preprocess.crop) == layer) == is_default
    if case == "vit_b_16-last-auto":  # torchvision's own init: a zero head, through which no gradient flows
        zero = copy.deepcopy(lm.model)
        nn.init.zeros_(zero.heads.head.weight)
        nn.init.zeros_(zero.heads.head.bias)
        assert resolve_positions(zero, zero.get_submodule(layer), "auto", 32) == "cls"
        assert resolve_positions(zero, zero.get_submodule(VIT_MIDDLE), "auto", 32) == "all"
        del zero

    store = run_stage1(colour_data, tmp_path / "s", lm, layer, requested)
    assert store.positions == expected and store.meta["unit"] == "Linear"
    assert store.num_channels == module.out_features and store.meta["in_channels"] == module.in_features

    images, labels, ag, ref_pred, x64 = backprop_to_image(build, layer, colour_data)  # the images in store order
    ref = ag[:, 0] if expected == "cls" else ag.sum(1)
    if expected == "cls":  # the other tokens do not reach the logits: their products are 0
        assert ag[:, 0].abs().max() > 0 and not ag[:, 1:].any()
    assert_relevance_close(torch.from_numpy(np.array(store.relevance, np.float32)), ref, rtol=3e-3)
    assert np.array_equal(store.predictions, ref_pred.numpy())
    assert np.array_equal(store.targets, labels.numpy())
    R, pred, a, x = relevance_batch(lm.model, Unit(module, expected), images, labels)
    assert_relevance_close(R, ref, rtol=1e-3)
    assert torch.equal(pred, ref_pred)
    if expected == "cls":  # the class token alone counts: a 1 x 1 output; the other tokens' relevance is 0
        assert a.shape[2:] == (1, 1)
        R_all, _, a_all, _ = relevance_batch(lm.model, Unit(module, "all"), images, labels)
        assert a_all.shape[2:] == (x.shape[1], 1) and torch.equal(a_all[:, :, :1], a)
        assert rel_err(R_all, R) < 1e-6

    concepts = [[0], [1, 2]]  # red | blue and gray
    masks = [labels == 0, (labels == 1) | (labels == 2)]
    for c in (0, module.out_features // 2 + 1):
        got = concept_arvs(store, c, concepts)
        want = torch.stack([linear_arv_autograd(module, c, x64[m], expected) for m in masks])
        assert got.shape == (2, module.in_features) and got.dtype == torch.float64
        assert rel_err(got, want) < 1e-4, (c, rel_err(got, want))
        # and the closed form W[c, k] T[k] / n on relevance_batch's own layer input, restricted by Unit.counted
        T = [Unit(module, expected).counted(x[m]).double().sum((0, 2, 3)) for m in masks]
        closed = torch.stack([module.weight[c].double() * t / int(m.sum()) for t, m in zip(T, masks)])
        assert rel_err(closed, want) < 1e-4


# ---------------------------------------------------------------- 2. the split network keeps the logits


def random_splits(unit: Unit, channels: dict[int, int], seed: int, i: int = 10) -> list[Split]:
    """A split of each ``channel`` into ``channels[c]`` concepts from random ARVs, at rho number ``i`` (0.55);
    every concept set and the shared set are non-empty."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, k in channels.items():
        sw = sweep(unit.weight.detach()[c], torch.randn(k, unit.in_channels, generator=g, dtype=torch.float64))
        sources = sw.sources(i)
        assert all(len(v) > 0 for v in sources.values()), sources
        out.append(sw.split(c, i))
    return out


SPLIT_CASES = ["vit_b_16-last-auto", "vit_b_16-middle-auto", "convnext_tiny", "deit_tiny", "swin_tiny", "convnext_atto"]


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_network_computes_the_same_logits(case):
    """Three units of the layer split at once (k = 2, 3, 2) in ONE network: the layer becomes Sequential(wider
    Linear, merge Linear) and the logits stay, in float32 (1e-5 of their scale) and in float64 (1e-12). A split
    whose merge forgets the residual changes them by far more, so the check can fail."""
    build, layer, _, _, _ = CASES[case]
    lm = build()
    side = lm.preprocess.crop
    _, unit = get_layer(lm.model, layer)
    C = unit.out_channels
    splits = random_splits(unit, {1: 2, C // 2: 3, C - 1: 2}, seed=7)
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(8))
    net = split_network(lm.model, {layer: splits})
    new = net.get_submodule(layer)
    assert isinstance(new, nn.Sequential) and [type(m) for m in new] == [nn.Linear, nn.Linear]
    assert new.expanded.out_features == C + 2 + 3 + 2 and new.merge.in_features == C + 7
    assert new.merge.out_features == C and new.merge.bias is None
    assert isinstance(lm.model.get_submodule(layer), nn.Linear)  # the original is untouched
    with torch.no_grad():
        ref, got = lm.model(images), net(images)
        scale = ref.abs().max().item()
        assert scale > 0 and (got - ref).abs().max().item() <= 1e-5 * scale
        # the same splits without their residual terms: the logits move by far more than the tolerance above
        # (wider layer: split 1's D2, Res at C, C + 1; split 2's D2, D3, Res at C + 2 .. C + 4; split 3's at C + 5, 6)
        assert new.merge.weight[[1, C // 2, C - 1], [C + 1, C + 4, C + 6]].tolist() == [-1.0, -2.0, -1.0]
        new.merge.weight[[1, C // 2, C - 1], [C + 1, C + 4, C + 6]] = 0.0
        assert (net(images) - ref).abs().max().item() > 1e-4 * scale

    if case.startswith("vit"):  # float64 copies of ViT-B are large: the float32 check suffices for it
        return
    m64 = split_network(lm.model, {}).double()  # a float64 copy
    net64 = split_network(m64, {layer: [Split(s.channel, s.D.double(), s.Res.double()) for s in splits]})
    with torch.no_grad():
        ref64, got64 = m64(images.double()), net64(images.double())
    assert (got64 - ref64).abs().max().item() <= 1e-12 * ref64.abs().max().item()


# ---------------------------------------------------------------- 3. a Linear and its 1x1 Conv2d twin


class TwinNet(nn.Module):
    """Stem 3x3 conv -> ReLU -> the layer of interest ``unit`` (a Linear on the channels-last map, or the 1x1
    Conv2d with the same weights) -> ReLU -> mean -> fc. Weights: conftest's planted pattern (inputs 0-3 see red,
    4-7 blue, 8-9 constant; unit 0 reads red and blue) plus small random weights everywhere."""

    def __init__(self, linear: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = linear
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.unit = nn.Linear(10, 4) if linear else nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.stem.weight.copy_(0.05 * torch.randn(10, 3, 3, 3, generator=g))
            self.stem.weight[0:4, 0, 1, 1] += 1.0  # red
            self.stem.weight[4:8, 2, 1, 1] += 1.0  # blue
            self.stem.bias.copy_(0.05 * torch.randn(10, generator=g))
            self.stem.bias[8:10] = 1.0
            w = 0.05 * torch.randn(4, 10, generator=g)
            w[0, 0:8] += 0.5 + 0.5 * torch.rand(8, generator=g)
            w[1, 8:10] += 1.0
            w[2, 0:4] += 1.0
            w[3, 4:8] += 1.0
            self.unit.weight.copy_(w if linear else w[:, :, None, None])
            self.unit.bias.copy_(0.05 * torch.randn(4, generator=g))
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0]])
                                 + 0.05 * torch.randn(3, 4, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        h = torch.relu(self.stem(x))
        a = self.unit(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.linear else self.unit(h)
        return self.fc(torch.relu(a).mean((2, 3)))


def test_linear_and_its_conv_twin_give_the_same_pipeline(image_folder, tmp_path):
    """Stages 1 and 3 on a channels-last Linear and on its 1x1 Conv2d twin (float32, the same weights):

    - bitwise equal: targets, the per-class tap sums (the same layer input, summed by the same code), hence the
      ARVs, and stage 3's scores (the sub-units are one F.conv2d on the same inputs for both kinds);
    - equal: the predictions, the index sets of every rho and the best rho;
    - equal up to float rounding: the relevance (a Linear's matmul and a 1x1 conv round apart, by ~1e-7 in the
      logits; after the float16 rounding of the store the relevance came out bitwise equal here, but a value at
      a float16 rounding boundary may differ by one unit), and the split networks' logits.
    """
    data = image_folder(n_train=4, n_val=1, size=12)
    lin, conv = (frozen(TwinNet(linear), f"twin_{'linear' if linear else 'conv'}", 12) for linear in (True, False))
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(lin.model(x), conv.model(x)) < 1e-6  # the twins compute the same network

    out = {}
    for lm in (lin, conv):
        store = run_stage1(data, tmp_path / lm.name, lm, "unit")
        rec, sw = disentangle_channel(Stage3Config(data_dir=data, store_dir=str(tmp_path / lm.name), channel=0,
                                                   concepts=[[0], [1]], model=lm.name, weights=lm.weights,
                                                   layer="unit", batch_size=4, num_workers=0, device="cpu",
                                                   progress=False), loaded=lm)
        out[lm.name] = store, rec, sw
    (s_l, r_l, sw_l), (s_c, r_c, sw_c) = out["twin_linear"], out["twin_conv"]
    assert s_l.meta["unit"] == "Linear" and s_l.positions == "all" and "unit" not in s_c.meta

    rel_l, rel_c = np.asarray(s_l.relevance, np.float64), np.asarray(s_c.relevance, np.float64)
    assert np.abs(rel_c).max() > 0 and np.abs(rel_l - rel_c).max() <= 2e-3 * np.abs(rel_c).max()
    assert np.array_equal(s_l.targets, s_c.targets) and np.array_equal(s_l.predictions, s_c.predictions)
    assert np.abs(s_c.tap_sums).max() > 0 and np.array_equal(np.asarray(s_l.tap_sums), np.asarray(s_c.tap_sums))
    assert np.array_equal(s_l.layer_weight, s_c.layer_weight)
    A_l, A_c = concept_arvs(s_l, 0, [[0], [1]]), concept_arvs(s_c, 0, [[0], [1]])
    assert A_c.abs().max() > 0 and torch.equal(A_l, A_c)

    assert r_l.sources == r_c.sources and r_l.best_rho == r_c.best_rho
    assert r_l.scores == r_c.scores and max(r_c.scores.values()) > 0
    assert torch.equal(sw_l.assign, sw_c.assign)
    best = r_c.sources[rho_key(r_c.best_rho)]
    assert best["concept1"] and best["concept2"]  # a real split: both concepts keep inputs of their own
    assert r_l.positions == "all" and r_c.positions is None

    i = list(map(float, sw_c.rhos)).index(r_c.best_rho)
    nets = [split_network(lm.model, {"unit": [sw.split(0, i)]}) for lm, sw in ((lin, sw_l), (conv, sw_c))]
    with torch.no_grad():
        assert rel_err(nets[0](x), conv.model(x)) < 1e-6 and rel_err(nets[1](x), conv.model(x)) < 1e-6


# ---------------------------------------------------------------- 4. a planted transformer


class PlantedTokens(nn.Module):
    """A one-block token model with a known answer.

    patch: 4x4 patches, stride 4 -> tokens of 6 dims: 0 = the patch's mean red, 1 = green, 2 = blue (ImageNet-
    normalised: positive only on images of that colour), 3 = a constant 1, 4-5 = 0.
    fc1 (6 -> 4), ReLU: hidden 0 reads red, 1 blue, 2 the constant, 3 green.
    fc2 (4 -> 6), the layer of interest, added to the residual: neuron 0 = h_red + 0.8 h_blue (polysemantic),
    1 = h_const, 2-3 = h_green, 4 = h_red, 5 = h_blue (dims 4-5 carry nothing in the residual).
    head on the token mean y: red = y0 + y4, blue = y0 + y5, gray = 2 y1: every image is classified by its colour.
    """

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for d, rgb in ((0, 0), (1, 1), (2, 2)):
                self.patch.weight[d, rgb] = 1 / 16
            self.patch.bias[3] = 1.0
            for h, d in ((0, 0), (1, 2), (2, 3), (3, 1)):
                self.fc1.weight[h, d] = 1.0
            self.fc2.weight.copy_(torch.tensor([[1.0, 0.8, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1],
                                                [1, 0, 0, 0], [0, 1, 0, 0]]))
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1], [0, 2, 0, 0, 0, 0]]))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # B x N x 6
        y = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(y.mean(1))


def test_planted_transformer_neuron_splits_into_its_two_token_patterns(image_folder, tmp_path):
    """fc2's neuron 0 serves red patches (through hidden 0) and blue patches (through hidden 1). Stage 1 + stage 3
    with concepts [[red], [blue]] must split it so that D1 keeps hidden 0 and not hidden 1, D2 the reverse; on
    red images D1 responds and D2 is exactly 0, on blue images the reverse; the split network keeps the logits."""
    data = image_folder(n_train=3, n_val=2, size=16)
    lm = frozen(PlantedTokens(), "planted_tokens", 16, "planted-v1")
    store = run_stage1(data, tmp_path / "s", lm, "fc2")
    assert store.positions == "all" and store.meta["output_hw"] == [16, 1]  # 16 tokens, every one counts

    images, labels = direct_images(data, lm)
    assert torch.equal(torch.from_numpy(np.asarray(store.predictions)), labels)  # the planted head classifies
    R = torch.from_numpy(np.array(store.relevance, np.float32))
    # neuron 0's relevance: the token mean of its input from red (red images) or blue (blue images); gray: 0
    red, blue, gray = labels == 0, labels == 1, labels == 2
    with torch.no_grad():
        t = lm.model.patch(images).flatten(2).transpose(1, 2)
    assert (R[red | blue, 0] > 0.5).all() and (R[gray, 0] == 0).all()
    assert torch.allclose(R[red, 0].double(), t[red, :, 0].clamp_min(0).mean(1).double(), rtol=2e-3)
    assert torch.allclose(R[blue, 0].double(), 0.8 * t[blue, :, 2].clamp_min(0).mean(1).double(), rtol=2e-3)

    rec, sw = disentangle_channel(Stage3Config(data_dir=data, store_dir=str(tmp_path / "s"), channel=0,
                                               concepts=[[0], [1]], model=lm.name, weights=lm.weights, layer="fc2",
                                               batch_size=4, num_workers=0, device="cpu", progress=False), loaded=lm)
    assert rec.positions == "all" and rec.best_rho == 0.05  # every rho gives the same sets: the first is best
    assert rec.sources[rho_key(rec.best_rho)] == {"concept1": [0], "concept2": [1], "shared": [2, 3]}
    split = sw.split(0, 0)
    W0 = lm.model.fc2.weight[0]
    assert torch.equal(split.D[0, :, 0, 0], W0 * torch.tensor([1.0, 0, 0, 0]))  # D1: red in, blue out
    assert torch.equal(split.D[1, :, 0, 0], W0 * torch.tensor([0, 1.0, 0, 0]))  # D2: blue in, red out
    assert not split.Res.any()

    unit = Unit(lm.model.fc2)
    xc = unit.counted(layer_input(lm.model, unit, images))  # B x 4 x 16 x 1
    resp = unit.apply(xc, split.weight(), lm.model.fc2.bias[[0, 0, 0]]).sum((2, 3))  # B x (D1, D2, Res)
    assert (resp[red, 0] > 1).all() and (resp[red, 1] == 0).all()
    assert (resp[blue, 1] > 1).all() and (resp[blue, 0] == 0).all()

    net = split_network(lm.model, {"fc2": [split]})
    with torch.no_grad(), capture_layer(net.fc2.expanded) as cap:
        logits = net(images)
    wide = cap.a.sum(1)  # B x (6 + 2): D1 at 0, D2 at 6, Res at 7
    assert torch.allclose(wide[:, [0, 6, 7]], resp, rtol=1e-6, atol=0)  # exact zeros stay exact zeros
    with torch.no_grad():
        assert rel_err(logits, lm.model(images)) < 1e-6
