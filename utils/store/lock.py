"""One writer per store: an exclusive ``fcntl`` lock on the store's folder itself.

The kernel drops the lock when its process ends, however it ends, so a stale lock of a dead process
never blocks, and no lock file is left behind. While it holds the lock, the writer names itself in
``<store>/.writer`` (pid and host), so that a second job can say who has the store. Readers (stages
2-4) check that no writer holds it before they use a store.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import UserError

WRITER = ".writer"


def _holder(store: str, patience: float = 2.0) -> str:
    """Who holds the store's lock, from its ``.writer``. The holder names itself just after it takes the lock,
    so a job that finds the lock taken waits up to ``patience`` seconds for the name."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with open(os.path.join(store, WRITER)) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text or time.monotonic() >= deadline:
            return text or "another process"
        time.sleep(0.05)


@contextmanager
def writer_lock(store: str, wait: bool = False, poll: float = 1.0) -> Iterator[None]:
    """Hold the store's write lock for the block (the folder is made if missing, and removed again if the
    block leaves nothing in it). Held elsewhere: wait (``wait``), or a UserError naming the holder."""
    made = not os.path.isdir(store)
    os.makedirs(store, exist_ok=True)
    fd = os.open(store, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise UserError(f"store {store} is in use by {_holder(store)}: wait for it to finish, or "
                                    "pass --wait to wait for it") from None
                time.sleep(poll)
        tmp = os.path.join(store, f"{WRITER}.{os.getpid()}")  # renamed into place: never read half-written
        with open(tmp, "w") as f:
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        os.replace(tmp, os.path.join(store, WRITER))
        yield
    finally:
        _release(store, fd, made)


def _release(store: str, fd: int, made: bool) -> None:
    try:
        os.remove(os.path.join(store, WRITER))
    except OSError:
        pass
    if made and os.path.isdir(store) and not os.listdir(store):
        shutil.rmtree(store, ignore_errors=True)
    os.close(fd)  # releases the lock


def check_not_written(store: str) -> None:
    """Refuse to read a store whose write lock a live process holds (stage 1 is writing it)."""
    try:
        fd = os.open(store, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"store {store} is being written by {_holder(store)} (stage 1 is running): wait for it "
                        "to finish") from None
    finally:
        os.close(fd)
