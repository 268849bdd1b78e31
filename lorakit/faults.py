"""Test-only fault hooks: environment variables that make a real run die, hang or fail a write at a chosen
point, so tests can prove recovery with real processes. A no-op unless the variable is set; never set them in
real runs (docs/scaling.md, docs/checkpoints.md).
"""

from __future__ import annotations

import errno
import os
import signal
import time

CHECKPOINT_FAULT_ENV = "LORAKIT_TEST_CHECKPOINT_FAULT"


# Test-only fault injection (see tests/distributed/test_distributed.py): "die:RANK:STEP" kills that rank with SIGKILL at
# the start of optimizer step STEP (0-based), as the OOM killer would; "hang:RANK:STEP" makes it sleep forever.
RANK_FAULT_ENV = "LORAKIT_TEST_FAULT"


def fault_injector(rank: int):
    """Test-only: a per-step hook that kills or hangs this rank when LORAKIT_TEST_FAULT says so (else a no-op)."""
    spec = os.environ.get(RANK_FAULT_ENV)
    if not spec:
        return lambda step: None
    kind, fault_rank, fault_step = spec.split(":")
    if int(fault_rank) != rank:
        return lambda step: None

    def inject(step: int) -> None:
        if step == int(fault_step):
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            # Stuck as in a C call, where Python's SIGTERM handler (GracefulStop) would never run: the launcher's
            # SIGTERM ends it at once instead of after its grace period.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(10**6)

    return inject


def checkpoint_fault(point: str, step: int) -> None:
    """Test-only: LORAKIT_TEST_CHECKPOINT_FAULT=kill:POINT[:STEP] SIGKILLs this process, enospc:POINT[:STEP] fails the write."""
    spec = os.environ.get(CHECKPOINT_FAULT_ENV)
    if not spec:
        return
    action, where, at = (spec.split(":") + ["", ""])[:3]
    if where != point or (at and int(at) != step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
