"""Kinds of conv layers: timm's weight-standardised and 'same'-padded convs made plain when a model is loaded,
Conv2d subclasses with their own forward refused as the layer of interest, and the default layer never the
classifier (a 1x1 conv head). Random weights, no downloads."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.model.loading import default_layer, get_layer, load_model, plain_convs
from utils.model.hooks import capture_layer, conv_with_filters
from utils.method.split import Split
from utils.model.surgery import split_network

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d  # noqa: E402

BIT = "resnetv2_50x1_bit"
BIT_LAYER = "stages.3.blocks.2.conv3"


def close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> bool:
    """``got`` equals ``ref`` within ``rel`` times the largest magnitude of ``ref`` (which is not zero)."""
    return bool(ref.abs().max() > 0 and (got - ref).abs().max() <= rel * ref.abs().max())


def unstandardised_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every conv filters far from standardised (mean 0.05, std 0.1) and ScaledStdConv2d gains in 0.5..1.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1 + 0.05)
            if isinstance(m, ScaledStdConv2d):
                m.gain.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.fixture(scope="module")
def bit(tmp_path_factory):
    """timm's BiT ResNet-V2 (StdConv2d, conv head) loaded from a checkpoint of unstandardised random weights,
    and the timm model that checkpoint came from."""
    torch.manual_seed(0)
    raw = unstandardised_(timm.create_model(BIT, pretrained=False)).eval()
    path = tmp_path_factory.mktemp("bit") / "bit.pth"
    torch.save(raw.state_dict(), path)
    return load_model(f"timm/{BIT}", str(path)), raw


def test_loaded_bit_is_plain_frozen_and_computes_as_timm(bit):
    lm, raw = bit
    assert any(isinstance(m, StdConv2d) for m in raw.modules())
    assert all(type(m) is nn.Conv2d for m in lm.model.modules() if isinstance(m, nn.Conv2d))
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert close(lm.model(x), raw(x), 1e-5)


def test_bit_layer_output_is_its_plain_convolution_and_the_split_keeps_the_logits(bit):
    lm, _ = bit
    layer, conv = get_layer(lm.model, BIT_LAYER)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture_layer(conv) as cap:
        ref = lm.model(x)
    assert close(conv_with_filters(conv, cap.x, conv.weight, conv.bias), cap.a, 1e-4)
    c = 5
    half = (torch.arange(conv.in_channels) < conv.in_channels // 2).to(conv.weight.dtype)[:, None, None]
    D = torch.stack([conv.weight[c] * half, conv.weight[c] * (1 - half)])  # D1 + D2 - Res = W[c]
    net = split_network(lm.model, {layer: [Split(c, D, torch.zeros_like(conv.weight[c]))]})
    with torch.no_grad():
        assert close(net(x), ref, 1e-4)


@pytest.mark.parametrize("make", [
    lambda: StdConv2d(6, 10, 3, stride=2, bias=True),
    lambda: StdConv2d(6, 10, 1, eps=1e-8),
    lambda: ScaledStdConv2d(6, 10, 3, gamma=1.7),
    lambda: ScaledStdConv2d(6, 10, 5, stride=2, dilation=2, bias=False),
    lambda: Conv2dSame(6, 10, 3),
    lambda: Conv2dSame(6, 10, (5, 3), dilation=(1, 2), bias=False),
    lambda: Conv2dSame(6, 10, 1, stride=2),
], ids=["std", "std-1x1", "scaled", "scaled-s2-d2", "same-3", "same-5x3-d2", "same-1x1-s2"])
def test_plain_conv_computes_what_the_timm_module_does(make):
    torch.manual_seed(0)
    m = unstandardised_(nn.Sequential(make()), seed=3).eval()
    m.requires_grad_(False)
    plain = plain_convs(copy.deepcopy(m))
    assert type(plain[0]) is nn.Conv2d and not plain[0].training and not plain[0].weight.requires_grad
    g = torch.Generator().manual_seed(4)
    for side in (13, 16):  # an odd and an even input size
        x = torch.randn(2, 6, side, side + 3, generator=g)
        with torch.no_grad():
            assert close(plain(x), m(x), 1e-5)


class SameStem(nn.Module):
    """A Conv2dSame with stride 2 (asymmetric 'same' padding at even sizes), then a plain conv and a head."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(self.stem(x)).mean((2, 3)))


def test_asymmetric_conv2d_same_stays_and_is_refused_as_layer_of_interest():
    torch.manual_seed(0)
    net = SameStem().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        assert type(plain_convs(net).stem) is Conv2dSame and torch.equal(net(x), ref)  # computes as itself
    with pytest.raises(UserError, match=r"layer stem is a timm Conv2dSame .*'same' padding.* asymmetric") as e:
        get_layer(net, "stem")
    assert "\n" not in str(e.value)
    assert default_layer(net) == "conv" and get_layer(net, None)[0] == "conv"


class ClampedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


class TaggedConv(nn.Conv2d):
    """A Conv2d subclass that computes as a plain one."""


def test_conv_subclass_with_its_own_forward_is_refused_and_one_without_is_fine():
    net = nn.Sequential(TaggedConv(3, 4, 3), ClampedConv(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"layer 1 is a ClampedConv, a Conv2d subclass with its own forward") as e:
        get_layer(net, "1")
    assert "\n" not in str(e.value)
    assert plain_convs(net)[1].__class__ is ClampedConv  # unknown kinds are left as they are
    assert get_layer(net, "0")[1].module is net[0] and default_layer(net) == "0"  # the default skips what it cannot compute


def test_default_layer_is_never_a_conv_classifier():
    cases = {"squeezenet1_1": "features.12.expand3x3", "resnet50": "layer4.2.conv3",
             "mobilenet_v3_small": "features.12.0", f"timm/{BIT}": BIT_LAYER}  # mobilenet: the demo's, unchanged
    for name, want in cases.items():
        model = load_model(name, "none").model
        assert default_layer(model) == want, name
        assert get_layer(model, None)[0] == want, name


def test_default_layer_probe_is_cached_and_leaves_the_model_as_it_was():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a conv head with 5 logits
    net.train()
    stats = net[1].running_mean.clone()
    assert default_layer(net) == "0"
    assert net.training and net[1].training and torch.equal(net[1].running_mean, stats)
    net[3].out_channels = 999  # a second call does not probe again
    assert default_layer(net) == "0"
