"""Launching and supervising worker processes: `lorakit train --nproc N` relaunches itself under torchrun, and a
collective that fails because another rank died or hangs becomes one line naming this rank."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from lorakit.config.schema import TrainSection
from lorakit.errors import EXIT_CODES, EXIT_UNEXPECTED, DistributedError, UsageError


@contextmanager
def collective_failures(cfg: TrainSection):
    """Around a whole run: a collective that fails or times out because another rank died or hangs (in setup,
    the loop, an evaluation or a save) becomes one line naming this rank, instead of a gloo/NCCL traceback."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not (dist.is_available() and dist.is_initialized()) or not _is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(
            f"rank {dist.get_rank()}: a collective with the other {dist.get_world_size() - 1} rank(s) failed "
            f"({first}); another rank died or did not respond within train.ddp_timeout={cfg.ddp_timeout}s: its "
            "own error, if it had time to print one, is above"
        ) from None


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    # gloo raises plain RuntimeErrors that name it; NCCL and the process group raise DistError subclasses.
    # The message match stays: a gloo failure (a peer that closed its connection) has no type or attribute of
    # its own, and this only decides how a failure that already ended the run is worded, never whether it does.
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("gloo", "NCCL", "ProcessGroup"))


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str] | None = None) -> None:
    """Run this same command (without --nproc) as ``torchrun --standalone --nproc-per-node N -m lorakit ...``.

    torch's launcher starts the processes, tears all of them down when one fails, and reports which rank
    failed first; we end with that rank's exit code, so a data error on every rank is still exit 3.
    """
    if "LOCAL_RANK" in os.environ:
        raise UsageError("--nproc: this process was already started by a launcher (torchrun / accelerate launch)")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = strip_option(list(sys.argv[1:] if argv is None else argv), "--nproc")
    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit", *args])
    try:
        run(launch)
    except ChildFailedError as e:
        rank, failure = cause_of(e)
        code = failure.exitcode
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        raise DistributedError(
            f"rank {rank} (local rank {failure.local_rank}) {how}; the launcher stopped the other ranks "
            "(the failing rank's own error is above)",
            exit_code=code if code in EXIT_CODES and code != 0 else EXIT_UNEXPECTED,
        ) from None
    except SignalException as e:
        raise DistributedError(f"the launcher received {e.sigval.name}; all ranks were stopped") from None


def cause_of(error) -> tuple:
    """(rank, ProcessFailure) of the rank that ended the job. A rank killed by a signal (SIGKILL: the OOM killer,
    a user) is the cause; then one that exited with an error of its own; last, ranks the launcher stopped with
    SIGTERM. A rank that died takes the others down with it (their collective fails, exit 1, or the launcher
    stops them), and which of them the launcher noticed first is a race."""
    import signal

    def order(rank):
        f = error.failures[rank]
        kind = 0 if f.exitcode < 0 and f.exitcode != -signal.SIGTERM else 1 if f.exitcode > 0 else 2
        return kind, f.timestamp, rank

    rank = min(error.failures, key=order)
    return rank, error.failures[rank]
