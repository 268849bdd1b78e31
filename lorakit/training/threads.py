"""CPU threads: how many torch may use, and how its OpenMP threads wait.

torch's OpenMP threads spin at every barrier for a while before they sleep (libgomp: 300,000 spins, a few
ms). Where another process shares the cores, a spinning thread burns the slice the thread it waits for
needs: measured on 2 cores at load ≈ 13, a LoRA step of SmolLM2-135M took 45 s with 2 spinning threads,
3.2 s with 1 thread and 3.4 s with 2 passive ones. On idle cores it is the other way round: a LoRA step is
thousands of small ops, each a parallel region, and a passive thread must be woken for every one (the bench
run: 730 supervised tokens/s passive, 890–1,140 with a short spin; docs/performance.md). So
`choose_openmp_waits`, run before torch is imported (the CLI's entry point), looks at the machine once:
no other task runnable at this priority or above → a short bounded spin (GOMP_SPINCOUNT 10,000, ≈ 0.1 ms:
beside a load that appears later it costs far less than a long one); any → passive waits
(OMP_WAIT_POLICY=PASSIVE). Either is read once, when torch loads OpenMP; a value the user set is kept. The
wait policy changes no result, only how threads wait.
The thread count (train.threads) defaults to OMP_NUM_THREADS where set, else to the CPUs this process may
actually use (affinity and the cgroup quota) shared among the processes of one machine, where torch would
count the machine's cores.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from lorakit.cpus import cgroup_quota, usable_cpus  # noqa: F401  (re-exported: callers import them from here)
from lorakit.errors import UsageError


SPIN_COUNT = 10_000  # GOMP_SPINCOUNT on idle cores: ≈ 0.1 ms by libgomp's estimate (its default: 300,000)
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PROC = Path("/proc")


def choose_openmp_waits(others: int | None = None) -> str:
    """Set how OpenMP threads wait, before torch loads; returns what was chosen, for the run's settings.

    ``others``: tasks that compete for this process's CPU time (None: competing_tasks()). A wait setting
    already in the environment is kept."""
    chosen = _set_in_environment()
    if chosen:  # a parent lorakit process's choice, inherited, keeps its description
        return os.environ.setdefault("LORAKIT_OPENMP_WAITS", f"{chosen} (from the environment)")
    others = competing_tasks() if others is None else others
    if others == 0:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        os.environ["KMP_BLOCKTIME"] = "1"  # the same for Intel's OpenMP, where torch is built with it (ms)
        choice = f"spin up to {SPIN_COUNT:,} (no task at this priority or above was runnable at start)"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        what = "unknown load" if others < 0 else f"{others} other runnable task(s) at start"
        choice = f"passive ({what})"
    os.environ["LORAKIT_OPENMP_WAITS"] = choice  # read back by the effective settings, in this process and ranks
    return choice


def competing_tasks(samples: int = 5, interval: float = 0.002, proc: Path = PROC) -> int:
    """Runnable tasks besides this process's own that would take CPU time from it; -1 where /proc cannot tell.

    /proc/loadavg's "running/total" first, the least of a few samples (a momentary count: one sample can catch
    a passing process). Where it shows others, the tasks themselves: one that runs at a lower priority (a
    `nice`d background job) gets a small share of a core beside this process (1/9 at nice 10) and is not
    counted — beside one, a short spin measured faster than passive waits (docs/performance.md)."""
    for i in range(samples):
        try:
            running = int((proc / "loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return -1
        if running <= 1:  # this process's own thread is running while it reads: the least is found
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return min(_runnable_at_priority(proc) for _ in range(2))


def _runnable_at_priority(proc: Path) -> int:
    """Tasks (threads) of other processes in state R whose nice value is this process's or lower."""
    own, mine = os.getpid(), os.getpriority(os.PRIO_PROCESS, 0)
    count = 0
    for stat in proc.glob("[0-9]*/task/*/stat"):
        try:
            if int(stat.parts[-4]) == own:
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state is first, nice 17th
            count += fields[0] == "R" and int(fields[16]) <= mine
        except (OSError, IndexError, ValueError):
            continue  # the task ended while being read
    return count


def openmp_waits() -> str:
    """How this process's OpenMP threads wait, as choose_openmp_waits decided (or the environment says)."""
    if "LORAKIT_OPENMP_WAITS" in os.environ:
        return os.environ["LORAKIT_OPENMP_WAITS"]
    return _set_in_environment() or "OpenMP's default"


def _set_in_environment() -> str:
    """The OpenMP wait settings in the environment, as KEY=VALUE, ... ('' when none is)."""
    return ", ".join(f"{k}={os.environ[k]}" for k in USER_KEYS if k in os.environ)


def choose_threads(requested: int | None) -> int:
    """train.threads, else OMP_NUM_THREADS where the user set it, else the usable CPUs divided among the
    processes launched on this machine."""
    if requested is not None:
        cores = os.cpu_count() or 1
        if requested > cores:  # OpenMP would start them all: thousands exhaust the process's threads (exit 1)
            raise UsageError(f"train.threads: {requested} is more than the {cores} CPUs of this machine "
                             f"({usable_cpus()} usable here); give at most {cores}, or leave it unset")
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
