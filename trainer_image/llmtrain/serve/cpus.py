"""How many CPUs this process may really use: the cgroup CPU quota and the affinity mask, whichever is less.

torch sizes its intra-op thread pool from the node's cores, not the container's limit; in a pod
limited to 2 CPUs on a 64-core node that is 64 spinning threads sharing 2 CPUs. Even at the right
size, a pool whose threads are descheduled by other work waits on its slowest thread: on a shared
2-core machine a 124k-parameter model decoded 10-40x slower with 2 threads than with 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """CPUs allowed by the CFS quota (cgroup v2, then v1); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP) -> int:
    cpus = len(os.sched_getaffinity(0))
    quota = _quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus
