"""How many cores this process may really use, for sizing thread and process pools.

`os.cpu_count()` reports the host's cores. In a container with a CPU quota (Kubernetes,
Docker `--cpus`) or a restricted affinity mask, sizing pools by it starts many more
workers than the cores that run them, and they only take turns.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus() -> int:
    """The smaller of the affinity mask and the cgroup v2 CPU quota, at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _cgroup_quota() -> int | None:
    try:
        limit, period = _CGROUP_V2_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(1, math.ceil(int(limit) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None
