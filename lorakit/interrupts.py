"""A Ctrl-C during setup is never lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode of the main thread, wherever that is: inside
a library's ``except BaseException`` or a finalizer, it is swallowed and the run goes on (it happened once while
the model loaded). lorakit's handler raises the same KeyboardInterrupt and also counts the signal, so every
setup stage (lorakit.console.stage) ends with a KeyboardInterrupt of its own when one arrived during it and none
came out. Inside the training loop lorakit.training.interrupt.GracefulStop handles the signals instead.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_received = {"sigint": 0}


def _on_sigint(signum, frame) -> None:
    _received["sigint"] += 1
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


def install() -> None:
    """Count SIGINTs (main thread only, and only where nobody replaced Python's default handler)."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


@contextmanager
def delivered():
    """A SIGINT inside the block ends it with KeyboardInterrupt, even where the one Python raised was swallowed."""
    before = _received["sigint"]
    yield
    if _received["sigint"] != before:
        raise KeyboardInterrupt
