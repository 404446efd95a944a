"""One writer per store: an exclusive ``fcntl`` lock on ``.<store>.lock`` beside the store folder.

The kernel drops the lock when its process ends, however it ends, so a stale lock of a dead process
never blocks. The lock file holds the writer's pid and host, to say who has the store. Readers
(stages 2-4) check that no writer holds it before they use a store.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import UserError


def lock_path(store: str) -> str:
    """``<store_dir>/.<name>_channel_importances.lock``: beside the store, so removing a store never removes
    a lock someone holds (and the file is kept: unlinking a lock file races with the next locker)."""
    head, name = os.path.split(os.path.normpath(store))
    return os.path.join(head, f".{name}.lock")


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode(errors="replace").strip()
    return text or "another process"


@contextmanager
def writer_lock(store: str, wait: bool = False, poll: float = 1.0) -> Iterator[None]:
    """Hold the store's write lock for the block. Held elsewhere: wait for it (``wait``), or a UserError
    that names the holder. The store's parent folder must exist."""
    path = lock_path(store)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise UserError(f"store {store} is in use by {_holder(fd)}: wait for it to finish, or pass "
                                    "--wait to wait for it") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_not_written(store: str) -> None:
    """Refuse to read a store whose write lock a live process holds (stage 1 is writing it)."""
    path = lock_path(store)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or an unreadable one): no writer ever locked it here
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"store {store} is being written by {_holder(fd)} (stage 1 is running): wait for it "
                        "to finish") from None
    finally:
        os.close(fd)
