"""One exception type for mistakes a user can make, and the wrapper that turns it into one line."""
from __future__ import annotations

import errno
import functools
import re
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


# The commands' flags in the Python API's words: what a notebook caller passed. A flag not listed is its own name
# (--input_size -> input_size=).
API_WORDS = {
    "--proportion_attribution_required": "tau=", "--tau": "tau=", "--cos_sim_high": "gamma_high=",
    "--gamma": "gamma_high=", "--concept": "concepts=", "--channel_of_interest": "channel=",
    "--channel_disentangle": "channel=", "--data_dir": "train=", "--gpu": "device=", "--no_progress": "progress=False",
    "--wait": "wait=True", "--model": "model=", "--weights": "model=", "--nr_channels_in_layer_of_interest": "layer=",
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")


def in_api_words(line: str) -> str:
    """``line`` with every command-line flag named as the API's argument (``--p`` -> ``p=``)."""
    def word(m: re.Match) -> str:
        flag = m[0]
        if flag.startswith("--classes_for_concept"):
            return "concepts="
        return API_WORDS.get(flag, f"{m[1]}=")

    return _FLAG.sub(word, line)


def api_errors(fn: Callable):
    """Decorate a public API function: a :class:`UserError` or a failed file operation (a full disk, a read-only
    folder) leaves it as ONE :class:`UserError` line in the caller's words, without the package's frames behind
    it; a bug of the package keeps its whole traceback."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as e:
            line = in_api_words(describe_os_error(e) if isinstance(e, OSError) and not isinstance(e, UserError)
                                else str(e))
            raise UserError(line) from None

    return call
