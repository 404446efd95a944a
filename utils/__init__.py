"""Disentangling polysemantic channels in CNNs (Hesse et al., CVPRW 2025): the shared package.

Installed (``pip install .``) it is ``disentangle_channels``; in a clone the scripts import it as ``utils``.
"""
from .errors import UserError

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it

# The Python API (utils.api), imported when first used: the commands' --help stays quick. No submodule may share
# a name with these: importing it would set the package's attribute to the module (stage 1 and 3 live in stage1.py
# and stage3.py for that reason).
_API = ("disentangle", "load", "prepare", "importances", "polysemantic_pairs", "split_channel", "evaluate_channel",
        "Result", "Data")
_MORE = {"Datasets": "datasets", "Preprocess": "preprocess", "ChannelSplit": "result"}
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
