"""Test helper, run under torchrun: stage 1 whose process RANK exits abruptly (as if killed, no cleanup)
right after it has written its K-th chunk. The fault is injected here, by wrapping the chunk writer;
production code has no switch for it.

    torchrun --nproc_per_node=2 tests/kill_after_chunks.py RANK K <get_importances_for_classes.py flags>
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import get_importances_for_classes as stage1  # noqa: E402
from utils.store import chunks  # noqa: E402
from utils.errors import run_cli  # noqa: E402

rank, k = int(sys.argv[1]), int(sys.argv[2])
if int(os.environ.get("RANK", "0")) == rank:
    written = []
    write_chunk = chunks.write_chunk

    def write_then_die(path, j, *results):
        write_chunk(path, j, *results)
        written.append(j)
        if len(written) >= k:
            os._exit(17)

    chunks.write_chunk = write_then_die
run_cli(lambda: stage1.main(stage1.get_args_parser().parse_args(sys.argv[3:])))
