"""One exception type for mistakes a user can make, and the wrapper that turns it into one line."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input: printed as one line on stderr, exit code 2."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a :class:`UserError` becomes ``error: ...`` on stderr and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (rerun the same command to continue where it stopped)", file=sys.stderr)
        sys.exit(130)
