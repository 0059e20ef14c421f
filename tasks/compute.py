"""What every task does first: settle its torch threads (a worker process may be fresh), and, on the
threads runner, take one of the run's compute slots."""
from __future__ import annotations

import functools
import heapq
import itertools
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TypeVar

import torch

_SLOTS: dict[int, "RankedSlots"] = {}
_SLOTS_LOCK = threading.Lock()
_RANK: ContextVar[tuple[int, ...]] = ContextVar("rumflow_compute_rank", default=())
F = TypeVar("F", bound=Callable[..., Any])


class RankedSlots:
    """`n` slots, granted to the waiting caller of lowest rank first (in arrival order among equals)."""

    def __init__(self, n: int):
        self.free, self.cond, self.waiting, self.arrivals = n, threading.Condition(), [], itertools.count()

    def acquire(self, rank: tuple[int, ...]) -> None:
        with self.cond:
            entry = (rank, next(self.arrivals))
            heapq.heappush(self.waiting, entry)
            while not (self.free > 0 and self.waiting[0] == entry):
                self.cond.wait()
            heapq.heappop(self.waiting)
            self.free -= 1
            self.cond.notify_all()  # the next in line may find a slot free too

    def release(self) -> None:
        with self.cond:
            self.free += 1
            self.cond.notify_all()


@contextmanager
def ranked(rank: tuple[int, ...]) -> Iterator[None]:
    """Tasks submitted inside the block (from this thread's context) wait for a compute slot with `rank`:
    lower first. The experiment ranks each chain by its order, so one chain's steps run ahead of the
    next chain's and their step boundaries (subflow bookkeeping, nothing ready to compute) fall at
    different times, each covered by another chain's work; unranked work (the sources) goes first."""
    token = _RANK.set(rank)
    try:
        yield
    finally:
        _RANK.reset(token)


def settle_threads() -> None:
    """Use the intra-op thread count the flow chose for its workers (RUMFLOW_TORCH_THREADS)."""
    n = int(os.environ.get("RUMFLOW_TORCH_THREADS", "0") or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def compute_slot() -> Iterator[None]:
    """Hold one of RUMFLOW_COMPUTE_SLOTS slots of this process while a task computes (0/unset: no limit);
    waiting tasks get them in `ranked` order.

    The threads runner gets more threads than slots, so a task whose upstream is still running waits in
    a thread of its own (Prefect resolves its inputs before the body starts) instead of holding one of
    the few workers the cores can feed; the slots then cap the tasks that compute at once."""
    n = int(os.environ.get("RUMFLOW_COMPUTE_SLOTS", "0") or 0)
    if n <= 0:
        yield
        return
    with _SLOTS_LOCK:
        slots = _SLOTS.setdefault(n, RankedSlots(n))
    slots.acquire(_RANK.get())
    try:
        yield
    finally:
        slots.release()


def in_compute_slot(fn: F) -> F:
    """`fn` with its body run inside `compute_slot()` (same name, module, signature and docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with compute_slot():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
