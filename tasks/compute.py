"""What every task does first: settle its torch threads (a worker process may be fresh), and, on the
threads runner, take one of the run's compute slots."""
from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

_SLOTS: dict[int, threading.Semaphore] = {}
_SLOTS_LOCK = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def settle_threads() -> None:
    """Use the intra-op thread count the flow chose for its workers (RUMFLOW_TORCH_THREADS)."""
    n = int(os.environ.get("RUMFLOW_TORCH_THREADS", "0") or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def compute_slot() -> Iterator[None]:
    """Hold one of RUMFLOW_COMPUTE_SLOTS slots of this process while a task computes (0/unset: no limit).

    The threads runner gets more threads than slots, so a task whose upstream is still running waits in
    a thread of its own (Prefect resolves its inputs before the body starts) instead of holding one of
    the few workers the cores can feed; the slots then cap the tasks that compute at once."""
    n = int(os.environ.get("RUMFLOW_COMPUTE_SLOTS", "0") or 0)
    if n <= 0:
        yield
        return
    with _SLOTS_LOCK:
        slots = _SLOTS.setdefault(n, threading.Semaphore(n))
    with slots:
        yield


def in_compute_slot(fn: F) -> F:
    """`fn` with its body run inside `compute_slot()` (same name, module, signature and docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with compute_slot():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
