"""Faults a notebook user meets with the data (issue 28, items 3 and 11): a dataset's ``target_transform``
(ImageFolder, a Subset of one, any dataset with ``targets``) gives the labels every stage uses, as
``dataset[i][1]`` does; random augmentation, uint8 images and float labels are refused (or noted) in one line
that says why; and other hostile input (tensors of other sizes, items that are not (image, label) pairs,
labels a model has no output for, objects that are no Dataset, empty data, tensors on another device) is one
UserError line naming ``train`` or ``val``, never a torch traceback. All through the Python API."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset
from torchvision.datasets import ImageFolder

import utils.api as dc
from conftest import COLOURS, write_image_folder
from test_api import FAST, planted4, tensors
from utils.errors import UserError

# Folder names sort in the reverse of the model's logit order; target_transform maps each to its logit.
REVERSED = {"a_blue": COLOURS["D_blue"], "b_green": COLOURS["C_green"], "c_orange": COLOURS["B_orange"],
            "d_red": COLOURS["A_red"]}


def flip(t: int) -> int:
    return 3 - t


def by_hand(d: dc.Data, dataset) -> tuple[float, list[int]]:
    """The model's accuracy on ``dataset`` as ``dataset[i][1]`` labels it, the model run here on the tool's
    transform of each picture (or the tensor as it is), and those labels."""
    model = planted4()
    xs, ys = [], []
    for i in range(len(dataset)):
        image, label = dataset[i][0], dataset[i][1]
        xs.append(image if isinstance(image, torch.Tensor) else d.transform(image))
        ys.append(int(label))
    with torch.no_grad():
        pred = model(torch.stack(xs)).argmax(1)
    return float((pred == torch.tensor(ys)).double().mean()), ys


@pytest.fixture(scope="module")
def remapped(tmp_path_factory):
    root = write_image_folder(str(tmp_path_factory.mktemp("remapped")), n_train=5, n_val=4, colors=REVERSED,
                              size=16)
    return os.path.join(root, "train"), os.path.join(root, "val")


class Kept(Dataset):
    """Any dataset that keeps ``targets`` and applies a ``target_transform`` to them, as torchvision's do (here
    the targets are stored reversed, and the transform maps them back to the model's logits)."""

    def __init__(self, base: TensorDataset, target_transform):
        self.x, self.target_transform = base.tensors[0], target_transform
        self.targets = [flip(t) for t in base.tensors[1].tolist()]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.target_transform(self.targets[i])


def test_target_transform_labels_are_the_items_labels_in_stage_1(remapped, tmp_path, capsys):
    train = ImageFolder(remapped[0], target_transform=flip)
    part = Subset(ImageFolder(remapped[0], target_transform=flip), [0, 2, 3, 6, 7, 9, 11, 12, 14, 16, 18, 19])
    kept = Kept(tensors(3, 0), flip)
    for k, ds in enumerate((train, part, kept)):
        d = dc.prepare(planted4(), ds, store_dir=str(tmp_path / f"s{k}"))
        store = dc.importances(d, "conv", **FAST)
        want, labels = by_hand(d, ds)
        assert store.accuracy == pytest.approx(want) and want >= 0.7  # red reads as orange: 3/4 of the images
        assert sorted(store.targets.tolist()) == sorted(labels)
        assert store.class_counts.tolist() == [labels.count(t) for t in range(4)]
        if ds is not kept:  # each label is named after its folder (classes[j]: ImageFolder's j, label flip(j))
            assert store.class_index == {"d_red": 0, "c_orange": 1, "b_green": 2, "a_blue": 3}
    assert "note" not in capsys.readouterr().err  # the kept targets were read through the transform, not item by item


def test_target_transform_labels_reach_every_stage(remapped):
    res = dc.disentangle(planted4(), ImageFolder(remapped[0], target_transform=flip),
                         ImageFolder(remapped[1], target_transform=flip), layer="conv", top_k=4, log=None, **FAST)
    assert {c: s.concepts for c, s in res.channels.items()} == {0: [[0, 1], [3]], 1: [[0, 1], [2]]}
    assert res.channels[0].class_names == [["d_red", "c_orange"], ["a_blue"]]
    assert res.channels[0].purity["concepts"] == [1.0, 1.0]


class Relabelled(Dataset):
    """A dataset that keeps ``targets`` but yields other labels (its own __getitem__, no target_transform)."""

    def __init__(self, base: TensorDataset):
        self.x, self.targets = base.tensors[0], base.tensors[1].tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], {2: 3, 3: 2}.get(self.targets[i], self.targets[i])  # green and blue swapped


def test_labels_are_those_the_items_yield_even_where_targets_say_otherwise(tmp_path):
    ds = Relabelled(tensors(4, 0))
    d = dc.prepare(planted4(), ds, store_dir=str(tmp_path / "s"))
    store = dc.importances(d, "conv", **FAST)
    want, labels = by_hand(d, ds)
    assert store.accuracy == pytest.approx(want) and sorted(store.targets.tolist()) == sorted(labels)
    assert want == 0.25 and by_hand(d, tensors(4, 0))[0] == 0.75  # orange only; the targets would give 3/4


class Augmented(Dataset):
    """Tensors with fresh noise at every read: random augmentation."""

    def __init__(self, base: TensorDataset, noise: float = 0.05):
        self.base, self.noise = base, noise

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, t = self.base[i]
        return x + self.noise * torch.randn_like(x), t


def test_random_augmentation_is_named_as_the_cause(tmp_path):
    torch.manual_seed(0)
    store_dir = tmp_path / "s"
    with pytest.raises(UserError, match=r"train data .*random \(augmentation\).*deterministic transform") as e:
        dc.disentangle(planted4(), Augmented(tensors(3, 0)), tensors(3, 1), layer="conv", store_dir=str(store_dir),
                       log=None, **FAST)
    assert "\n" not in str(e.value) and not os.path.exists(store_dir)  # said before anything is written
    with pytest.raises(UserError, match=r"val data .*random \(augmentation\)"):
        dc.prepare(planted4(), tensors(3, 0), Augmented(tensors(3, 1)))
    from torchvision import transforms  # a random flip of PIL images, as a training set has it
    flips = ImageFolder(write_image_folder(str(tmp_path / "f"), n_train=3, n_val=1, colors=REVERSED, size=16)
                        + "/train", transform=transforms.RandomHorizontalFlip())
    with pytest.raises(UserError, match=r"random \(augmentation\)"):
        dc.prepare(planted4(), flips)
    # the same data without the noise: a second run finds the store of the first and reuses it
    first = dc.importances(dc.prepare(planted4(), Augmented(tensors(3, 0), 0.0), store_dir=str(store_dir)),
                           "conv", **FAST)
    again = dc.importances(dc.prepare(planted4(), Augmented(tensors(3, 0), 0.0), store_dir=str(store_dir)),
                           "conv", **FAST)
    assert again.path == first.path and np.array_equal(again.relevance, first.relevance)


def test_uint8_tensors_are_refused_and_tensors_in_0_to_255_are_noted(tmp_path, capsys):
    base = tensors(2, 0)
    raw = TensorDataset((base.tensors[0] * 60 + 120).clamp(0, 255).to(torch.uint8), base.tensors[1])
    with pytest.raises(UserError, match=r"item 0 of the train data .* uint8 tensor .*normalis"):
        dc.prepare(planted4(), raw)
    with pytest.raises(UserError, match=r"item 0 of the val data .* uint8"):
        dc.prepare(planted4(), base, raw)
    wide = TensorDataset(raw.tensors[0].float(), base.tensors[1])
    d = dc.prepare(planted4(), wide, store_dir=str(tmp_path / "s"))
    store = dc.importances(d, "conv", **FAST)
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and re.search(r"note: the train data .* values up to 2\d\d \(item \d+\)", err)
    assert store.accuracy == pytest.approx(by_hand(d, wide)[0])  # noted, not refused: fed as it is


def test_float_labels_are_refused_unless_whole_numbers(tmp_path):
    base = tensors(2, 0)
    with pytest.raises(UserError, match=r"train data .*label 0\.5.*whole"):
        dc.prepare(planted4(), TensorDataset(base.tensors[0], base.tensors[1].float() + 0.5))

    class Floats(Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            return base.tensors[0][i], float(base.tensors[1][i]) + (0.7 if i == 5 else 0.0)

    with pytest.raises(UserError, match=r"item 5 of the val data .*label 2\.7, not a whole number"):
        dc.prepare(planted4(), base, Floats())
    whole = TensorDataset(base.tensors[0], base.tensors[1].double())
    d = dc.prepare(planted4(), whole, store_dir=str(tmp_path / "s"))
    store = dc.importances(d, "conv", **FAST)
    assert store.accuracy == pytest.approx(by_hand(d, base)[0]) and store.targets.tolist() == \
        sorted(base.tensors[1].tolist())


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Stream(IterableDataset):
    def __iter__(self):
        return iter(tensors(1, 0))


def _items(n=2, seed=0, image=lambda i, x: x, label=lambda i, t: int(t)):
    base = tensors(n, seed)
    return Items([(image(i, x), label(i, t)) for i, (x, t) in enumerate(base)])


_GOOD = tensors(2, 1)
_EMPTY = TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
HOSTILE = {  # name: (train, val, what the line must say)
    "train tensors of two sizes": (_items(image=lambda i, x: x if i != 3 else torch.zeros(3, 20, 20)), _GOOD,
                                   r"item 3 of the train data .*shape \(3, 20, 20\).*3 x 16 x 16"),
    "an odd size among unsampled items": (  # item 7 of 20 is not among those checked up front: the pass says it
        _items(5, image=lambda i, x: x if i != 7 else torch.zeros(3, 20, 20)), _GOOD,
        r"item 7 of the train data .*shape \(3, 20, 20\).*must be 3 x 16 x 16, the input size"),
    "val tensors of another size": (_GOOD, TensorDataset(torch.zeros(4, 3, 20, 20), torch.arange(4)),
                                    r"val data .*shape \(3, 20, 20\).*3 x 16 x 16"),
    "grey tensors": (TensorDataset(_GOOD.tensors[0][:, :1], _GOOD.tensors[1]), None, r"train data .*3 x H x W"),
    "items that are images only": (_GOOD, Items([x for x, _ in _GOOD]), r"item 0 of the val data .*\(image, label\)"),
    "a string label": (_items(label=lambda i, t: "cat"), _GOOD, r"item 0 of the train data .*str label"),
    "one-hot labels": (_GOOD, _items(label=lambda i, t: torch.eye(4)[t]),
                       r"item 0 of the val data .*label of shape \(4,\)"),
    "a label the model has no output for": (_GOOD, TensorDataset(_GOOD.tensors[0], _GOOD.tensors[1] + 1),
                                            r"val data .*label 4 but the model has 4 outputs"),
    "a dict": ({"images": _GOOD.tensors[0]}, _GOOD, r"the train data is a dict"),
    "a number": (_GOOD, 7, r"the val data is an int"),
    "a path as val": (_GOOD, "data/val", r"the val data is a str"),
    "an iterable dataset": (Stream(), _GOOD, r"the train data is a Stream.*by index"),
    "an empty training set": (_EMPTY, _GOOD, r"the train data .* holds no images"),
    "an empty validation set": (_GOOD, _EMPTY, r"the val data .* holds no images"),
    "tensors on another device": (_GOOD, Items([(torch.empty(3, 16, 16, device="meta"), 0)] * 3),  # as CUDA ones
                                  r"item 0 of the val data .*tensor on meta.*CPU"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_data_is_one_line_naming_the_argument(case, tmp_path):
    train, val, says = HOSTILE[case]
    with pytest.raises(UserError, match=says) as e:
        dc.disentangle(planted4(), train, val, layer="conv", store_dir=str(tmp_path / "s"), top_k=2, log=None,
                       **FAST)
    assert "\n" not in str(e.value)
