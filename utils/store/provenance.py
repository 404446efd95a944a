"""Provenance: what made a result, in every JSON file and record the toolkit writes.

``{"command", "seed", "version", "commit", "dirty", "torch", "torchvision", "timm", "python", "transform"}``:
the command line (or the Python call) that ran, the seed when the run draws anything, this package's version,
the git commit of the clone it runs from (None when installed from a wheel; ``dirty`` when tracked files
differ from it), the library versions and the input transform.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib import metadata

from ..defaults import VERSION as __version__

_command: list[str] = []  # the calls being run, outermost first (the Python API's; what the user called is first)


@contextlib.contextmanager
def running(command: str):
    """Record ``command`` as what made every result written inside the block."""
    _command.append(command)
    try:
        yield
    finally:
        _command.pop()


def command_line() -> str:
    """The command being run: the outermost call :func:`running` set, else this process's command line."""
    if _command:
        return _command[0]
    return shlex.join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])


@lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git clone this package runs from; (None, None) outside a clone or without git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


@lru_cache(maxsize=None)
def _version(package: str) -> str | None:
    """An installed package's version: torch's and torchvision's own (with their build, e.g. ``+cu130``)."""
    if package in ("torch", "torchvision"):
        return __import__(package).__version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(seed: int | None = None, transform=None) -> dict:
    """The provenance of a result made now (``transform``: a :class:`utils.data.images.Preprocess`, or its JSON)."""
    commit, dirty = git_state()
    return {"command": command_line(), "seed": seed, "version": __version__, "commit": commit, "dirty": dirty,
            "torch": _version("torch"), "torchvision": _version("torchvision"), "timm": _version("timm"),
            "python": platform.python_version(),
            "transform": transform.to_json() if hasattr(transform, "to_json") else transform}
