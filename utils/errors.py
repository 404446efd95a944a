"""One exception type for mistakes a user can make, and the wrapper that turns it into one line."""
from __future__ import annotations

import errno
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input: printed as one line on stderr, exit code 2."""


class Reported(UserError):
    """A UserError (or failed file operation) whose line this process has already printed: under torchrun
    the failing process says it BEFORE the others learn of the failure, so that its line is out before the
    launcher stops it together with them."""


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: a full disk, a read-only or missing folder, ..."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device of {where}: free some space and rerun the same command "
                "(finished work is kept)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where}: {e.strerror or 'not permitted'}"
    return f"{e.strerror or type(e).__name__}: {where}"


def say(line: str) -> None:
    """``line`` on stderr in ONE write, so that lines of several processes (torchrun) never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(e: BaseException) -> str:
    """The ``error: ...`` line of a UserError or a failed file operation."""
    return f"error: {describe_os_error(e) if isinstance(e, OSError) else e}"


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a :class:`UserError` or a failed file operation becomes ``error: ...`` on
    stderr and exit 2 (under torchrun the launcher reports the failed process with its own exit status)."""
    try:
        main()
    except Reported:
        sys.exit(2)
    except (UserError, OSError) as e:
        say(error_line(e))
        sys.exit(2)
    except KeyboardInterrupt:
        say("interrupted (rerun the same command to continue where it stopped)")
        sys.exit(130)
