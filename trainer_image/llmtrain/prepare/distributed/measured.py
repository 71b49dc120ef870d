"""``python -m llmtrain.prepare.distributed.measured ARGS``: ``python -m llmtrain.prepare ARGS``, then
the process's peak RSS (VmHWM) as the last line on stderr, for local runs and benchmarks.

VmHWM, not the parent's ``ru_maxrss``: Linux carries the parent's high-water mark into a child that
was vforked before its exec, so a parent holding a large corpus would inflate every pod's figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

PEAK_PREFIX = "peak_rss_bytes "


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    from llmtrain.prepare.__main__ import main as prepare_main

    try:
        return prepare_main(sys.argv[1:])
    finally:
        print(f"{PEAK_PREFIX}{peak_rss_bytes()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
