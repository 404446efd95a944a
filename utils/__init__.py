"""Disentangling polysemantic channels in CNNs (Hesse et al., CVPRW 2025): the shared package.

Installed (``pip install .``) it is ``disentangle_channels``; in a clone the scripts import it as ``utils``.
"""
from .defaults import VERSION as __version__
from .errors import UserError

# The Python API (utils.api), imported when first used: the commands' --help stays quick. No submodule may share
# a name with these: importing it would set the package's attribute to the module (so stage 1 and stage 3 live in
# stages/relevance.py and stages/splitting.py).
_API = ("disentangle", "load", "prepare", "importances", "polysemantic_pairs", "split_channel", "evaluate_channel",
        "Result", "Data")
_MORE = {"Datasets": "data.datasets", "Preprocess": "data.preprocess", "ChannelSplit": "stages.result"}
__all__ = ["UserError", "__version__", *_API, *_MORE]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _MORE:
        return getattr(importlib.import_module(f".{_MORE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
