#!/usr/bin/env python
"""The whole pipeline: runs utils/cli/demo.py (installed: dc-demo); --help says what it does."""
import sys

from utils.cli import demo as command

if __name__ == "__main__":
    command.cli()
else:
    # Imported (tests and benchmarks import the scripts by name): the command module itself takes this name,
    # so that its functions are this module's attributes and monkeypatching one reaches the code that runs
    # (the import system hands out what sys.modules holds once this file has run).
    sys.modules[__name__] = command
