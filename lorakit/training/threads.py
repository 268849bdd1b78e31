"""CPU threads: how many torch may use, and how its OpenMP threads wait.

torch's OpenMP threads spin at every barrier by default (libgomp's active wait). Where another process
shares the cores, a spinning thread burns the slice the thread it waits for needs: measured on 2 cores at
load ≈ 13, a LoRA step of SmolLM2-135M took 45 s with 2 spinning threads, 3.2 s with 1 thread and 3.4 s
with 2 passive ones (docs/performance.md). The wait policy is read once, when torch loads OpenMP, so
`passive_openmp_waits` runs before torch is imported (the CLI's entry point); a value the user set is kept.
The thread count (train.threads) defaults to OMP_NUM_THREADS where set, else to the CPUs this process may
actually use (affinity and the cgroup quota) shared among the processes of one machine, where torch would
count the machine's cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lorakit.cpus import cgroup_quota, usable_cpus  # noqa: F401  (re-exported: callers import them from here)


def passive_openmp_waits() -> None:
    """OpenMP threads sleep instead of spinning while they wait (unless OMP_WAIT_POLICY is already set)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def choose_threads(requested: int | None) -> int:
    """train.threads, else OMP_NUM_THREADS where the user set it, else the usable CPUs divided among the
    processes launched on this machine."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cpus() // max(local_processes, 1))


def set_threads(requested: int | None) -> int:
    import torch

    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads
