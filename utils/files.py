"""Every file the project writes goes through :func:`atomic_path`: a temporary name beside the target,
flushed to disk, then renamed over it. A crash, a kill or a full disk leaves the old file or the new
one, never a half-written one, and never a stray temporary."""
from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .errors import UserError


def temp_name(path: str, pid: int | None = None) -> str:
    """``<path>.tmp-<pid><ext>``: beside the target (same file system) and with its extension, so that
    writers that add or read an extension (``np.save``, ``savefig``) keep the file's format."""
    return f"{path}.tmp-{os.getpid() if pid is None else pid}{os.path.splitext(path)[1]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temporary files of ``path`` that a killed writer left (``<path>.tmp-<pid><ext>`` whose
    process is gone); a live writer's are left alone. Returns the paths removed."""
    folder, name = os.path.split(os.path.abspath(path))
    ext, removed = os.path.splitext(path)[1], []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        pid = entry[len(name) + 5:len(entry) - len(ext)] if entry.startswith(name + ".tmp-") else ""
        if pid.isdigit() and entry.endswith(ext) and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
            except OSError:
                pass  # another run removed it first
    return removed


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s content to; on success it is synced and renamed to ``path``.

    On any error (or interrupt) the temporary file is removed and ``path`` is left as it was. Temporary
    files of ``path`` that killed writers left behind are removed first.
    """
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the user knows, not its temporary name
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder: str) -> str:
    """Make sure files can be written into ``folder`` before any long pass, without creating anything: a
    probe file is made and removed in ``folder`` or, when it does not exist yet, in its nearest existing
    ancestor (where it will be made). A UserError names the folder otherwise. Returns ``folder``."""
    here = os.path.abspath(folder)
    while not os.path.isdir(here):
        if os.path.exists(here):
            raise UserError(f"cannot write into {folder}: {here} is not a folder")
        here = os.path.dirname(here)
    probe = os.path.join(here, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror}") from None
    return folder


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: str) -> dict:
    """The JSON object in ``path``; an unreadable or damaged file is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def save_npy(path: str, arr: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, arr)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def write_bytes(path: str, data) -> None:
    """Write ``data`` (bytes or a buffer) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_arrays(path: str, arrays: dict) -> None:
    """numpy arrays (numbers, bools and str; nothing that needs pickle) into one ``.npz`` at ``path``, atomically;
    read back with ``numpy.load(path, allow_pickle=False)``."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getbuffer())


def save_torch(path: str, obj: Any) -> None:
    """``torch.save`` of tensors and plain containers to ``path`` atomically (read back with weights_only=True).

    Serialised in memory first, then written as plain bytes: a full disk is then the file system's own
    error (one line naming ``path``), not an error inside torch's zip writer."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def save_figure(path: str, fig, **kwargs) -> None:
    """``fig.savefig`` to ``path`` atomically; the format follows the extension of ``path``."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
