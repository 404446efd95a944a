#!/usr/bin/env python
"""Stage 2: runs utils/cli/get_cosine_similarities.py (installed: dc-similarities); --help says what it does."""
import sys

from utils.cli import get_cosine_similarities as command

if __name__ == "__main__":
    command.cli()
else:
    # Imported (tests and benchmarks import the scripts by name): the command module itself takes this name,
    # so that its functions are this module's attributes and monkeypatching one reaches the code that runs
    # (the import system hands out what sys.modules holds once this file has run).
    sys.modules[__name__] = command
