"""One lorakit process per output directory: a lock file next to it, held for the whole run.

The lock is OUT's sibling ``.NAME.lorakit-lock`` (not inside OUT: ``--overwrite`` moves OUT aside, and a new
output does not exist yet). It records the holder's PID, host and start time and is held with fcntl.flock,
which the kernel releases when the process dies however it dies; so a lock file nobody holds is stale: it is
reported with the dead holder's PID and taken over. A live holder makes the second process exit 5 naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from lorakit.errors import SafetyError, UsageError


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lorakit-lock"


class OutputLock:
    """``with OutputLock(out, say):`` holds ``out`` for this process; released (file removed) on any exit."""

    def __init__(self, out: Path, say: Callable[[str], None], option: str = "output"):
        self.out, self.say, self.option = out, say, option
        self.path = lock_path(out)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while not self._try_acquire():
                pass
        except OSError as e:
            raise UsageError(f"{self.option} {self.out}: cannot create the lock file {self.path} "
                             f"({e.strerror or e}); choose a writable directory") from None
        return self

    def _try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise SafetyError(f"{self.option} {self.out} is in use by {holder}; wait for it to finish, or "
                              "choose another directory") from None
        # The holder before us may have removed the file after we opened it: then our lock is on a dead inode.
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        previous = _read(fd)
        if previous:
            self.say(f"{self.out}: taking over a stale lock: {_describe(previous)} ended without releasing it")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return True

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still held, so no one else can have taken it
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {"pid": "unknown"}
    return record if isinstance(record, dict) else {"pid": "unknown"}


def _describe(record: dict) -> str:
    return (f"lorakit process {record.get('pid', 'unknown')} on {record.get('host', 'an unknown host')} "
            f"(started {record.get('started', 'at an unknown time')})")
