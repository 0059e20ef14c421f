"""How tasks cache: key = inputs + task source + a digest of the code the tasks call; results persisted."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, TypeVar

from prefect import Task, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

_ROOT = Path(__file__).resolve().parent.parent
# The modules whose behaviour decides the numbers a task returns: editing any of them invalidates the
# cache (the CLI, the flows, reports and plots do not, so editing them keeps every result).
_CODE_GLOBS = ["rumflow/config.py", "rumflow/data.py", "rumflow/readers.py", "rumflow/models.py",
               "rumflow/training.py", "rumflow/planning.py", "rumflow/evaluation.py", "rumflow/metrics.py",
               "rumflow/runtime.py", "rumflow/registry.py", "methods/*.py", "methods/*.yaml", "proxies/*.py", "tasks/*.py", "artifacts/checkpoints.py",
               "artifacts/tables.py"]


def code_digest() -> str:
    """sha256 over the source of every module a cached task calls."""
    h = hashlib.sha256()
    for pattern in _CODE_GLOBS:
        for path in sorted(_ROOT.glob(pattern)):
            h.update(path.relative_to(_ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


CODE_VERSION = code_digest()
# TASK_SOURCE alone misses the helpers a task calls, hence the explicit code digest; no RUN_ID,
# so a result is found again by the next run (and after a crash).
POLICY = INPUTS + TASK_SOURCE + CachePolicy.from_cache_key_fn(lambda ctx, params: CODE_VERSION)

F = TypeVar("F", bound=Callable[..., Any])


def cached_task(name: str, run_name: str | Callable[[], str] | None = None) -> Callable[[F], Task]:
    """A Prefect task cached across runs and processes (bind storage with `in_run_dir`)."""

    def wrap(fn: F) -> Task:
        return task(fn, name=name, task_run_name=run_name, cache_policy=POLICY, persist_result=True,
                    log_prints=False)

    return wrap


def in_run_dir(t: Task, run_dir: Path) -> Task:
    """The task with its results (and cache records) stored under `<run_dir>/cache`."""
    return t.with_options(result_storage=Path(run_dir) / "cache")


def ensure(t: Task, *args: Any, **kwargs: Any) -> Any:
    """Call `t`; if the cached result points at files that are gone or damaged, recompute it."""
    result = t(*args, **kwargs)
    if hasattr(result, "intact") and not result.intact():
        result = t.with_options(refresh_cache=True)(*args, **kwargs)
    return result
