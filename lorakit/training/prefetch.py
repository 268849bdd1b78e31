"""Micro-batches built ahead: step s+1 is collated in a thread while step s computes.

Collation reads the examples and builds tensors; it draws no random numbers and depends only on the step,
so building it early changes nothing that is learned: resumed and multi-process runs see the same batches.
torch releases the GIL inside its kernels, so the Python work of collation overlaps the step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Prefetch(Generic[T]):
    """``get(step)`` returns ``make(step)``; asking for a step starts building the next one (up to ``stop``)."""

    def __init__(self, make: Callable[[int], T], stop: int):
        self._make, self._stop = make, stop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-collate")
        self._ahead: dict[int, Future] = {}

    def get(self, step: int) -> T:
        future = self._ahead.pop(step, None) or self._pool.submit(self._make, step)
        for stale in self._ahead.values():  # a jump (never in the loop): drop what was built for another step
            stale.cancel()
        self._ahead.clear()
        if step + 1 < self._stop:
            self._ahead[step + 1] = self._pool.submit(self._make, step + 1)
        return future.result()  # re-raises what make raised, in the loop's thread

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
